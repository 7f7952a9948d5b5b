"""
Hugging Face model folders, both ways (tools/export_hf.py is the command line):
- export: the transformers class that computes exactly the model, where one does (hf/native.py's table:
  Mixtral, Qwen3-MoE, OLMoE, Llama, Qwen3, GPT-2), else this repo's own; and which one, and why;
- export_dense: a GPT-2-block model as a plain GPT2LMHeadModel (activation_function='gelu', nanoGPT's exact
  GELU, so the logits are this project's; zero biases where the model has none, and config.json says bias:
  false);
- export_native: the other transformers classes (hf/native.py);
- export_moe: any other model as NanoMoEForCausalLM, whose code (hf/modeling_nanomoe.py) travels in the
  folder: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) loads it with no nanoMoE
  checkout;
- describe: what any export's folder needs beside the weights: a GPT-2 BPE model's tokenizer files and
  bos/eos ids, a note (README.md) saying what it is and how to encode text for it;
- load_hf_folder: the way back (train.py, sample.py, bench.py, tools/eval_hellaswag.py --init_from=<folder>);
  hf_model_args reads a folder's keys before any weights; a folder this repo cannot compute exactly is one
  ValueError line naming the config field;
- folder_tokenizer: how text is encoded for a folder (sample.py, HellaSwag): its tokenizer, or GPT-2's BPE;
  copy_tokenizer keeps a folder's tokenizer with the run that fine-tunes it (train.py's out_dir).
"""
import os
import re
import json
import shutil
import socket
import urllib.parse

import torch

from model import GPT, GPTConfig
from moe_model import EXPORTED_KEYS, build_model
from hf.native import (NATIVE, check_loading_info, choose, export_native, hf_kwargs, load_native,
                       native_model_args)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# HF stores x @ W
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
GPT2_VOCAB, GPT2_EOT = 50257, 50256  # GPT-2's BPE: its tokens, and <|endoftext|> (its bos and eos)
# n_layer, n_head,
GPT2_SIZES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280),
              'gpt2-xl': (48, 25, 1600)}  # n_embd


# GPT2LMHeadModel settings and the values that model.GPT computes (its GELU is exact, within ~1e-3 of
# GPT-2's tanh one, as nanoGPT's from_pretrained takes it)
GPT2_FIELDS = {'activation_function': ('gelu_new', 'gelu', 'gelu_pytorch_tanh'),
               'tie_word_embeddings': (True,), 'scale_attn_weights': (True,),
               'scale_attn_by_inverse_layer_idx': (False,)}


def load_gpt2(model_type, dropout=0.0):
    """A GPT with GPT-2's weights (model.GPT.from_pretrained, as in nanoGPT): model_type is 'gpt2',
    'gpt2-medium', 'gpt2-large', 'gpt2-xl', or a local folder holding a GPT2LMHeadModel (save_pretrained).
    ValueError, one line, if transformers cannot load it (offline, a wrong name or folder)."""
    from transformers import GPT2LMHeadModel
    print("loading weights from pretrained gpt: %s" % model_type)
    offline = None if os.path.isdir(model_type) else hub_unreachable()
    try:  # offline, the cache only: transformers would retry the Hub for ~30 s before it failed
        model_hf, info = GPT2LMHeadModel.from_pretrained(model_type, local_files_only=offline is not None,
                                                         output_loading_info=True)
    except Exception as e:  # whatever transformers raises, one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = f"they are not in the Hugging Face cache, and {offline}" if offline else lines[0][:300]
        raise ValueError(f"cannot load GPT-2 weights from {model_type!r}: {why}") from None
    check_loading_info(model_type, info)
    c = model_hf.config  # a setting our GPT does not compute: never silently
    for field, allowed in GPT2_FIELDS.items():
        if getattr(c, field, allowed[0]) not in allowed:
            raise ValueError(f"{model_type}: config.json {field}={getattr(c, field)!r}, this repo's GPT "
                             f"computes {' or '.join(map(repr, allowed))}")
    bias = getattr(c, 'bias', True)  # False: a bias=False model that export_dense wrote, its biases zeros
    model = GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size,
                          block_size=c.n_positions, bias=bias, dropout=dropout, mlp_hidden=c.n_inner or 0,
                          norm_eps=c.layer_norm_epsilon))
    sd, sd_hf = model.state_dict(), model_hf.state_dict()
    keys_hf = [k for k in sd_hf if not k.endswith(('.attn.masked_bias', '.attn.bias'))]
    if not bias:
        if nonzero := [k for k in keys_hf if k.endswith('.bias') and sd_hf[k].any()]:
            raise ValueError(f"{model_type} says bias=false, but its {nonzero[0]} is not all zeros")
        keys_hf = [k for k in keys_hf if not k.endswith('.bias')]
    assert len(keys_hf) == len(sd), f"mismatched keys: {len(keys_hf)} != {len(sd)}"
    with torch.no_grad():
        for k in keys_hf:  # the OpenAI checkpoints use a "Conv1D" module: its weights are transposed Linears
            w = sd_hf[k].t() if k.endswith(CONV1D) else sd_hf[k]
            assert w.shape == sd[k].shape, k
            sd[k].copy_(w)
    return model


def export(model):
    """(a transformers model holding model's weights, one line: which class and why): the class that computes
    exactly this model, with no trust_remote_code (hf/native.py's NATIVE), or else NanoMoEForCausalLM."""
    name, why = choose(model.config)
    if name == 'GPT2LMHeadModel':
        return export_dense(model), f"{name}: {why}"
    if name is not None:
        return export_native(model, name), f"{name}: {why} (no trust_remote_code)"
    return export_moe(model), f"NanoMoEForCausalLM, with its code (trust_remote_code=True): no " \
                              f"transformers class computes this model: {why}"


def hub_unreachable(timeout=5):
    """Why the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE, or no connection to it in timeout s), or
    None."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return 'HF_HUB_OFFLINE is set'
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        port = url.port or (443 if url.scheme == 'https' else 80)
        socket.create_connection((url.hostname, port), timeout).close()
    except OSError as e:
        return f"{constants.ENDPOINT} cannot be reached ({e.strerror or e})"
    return None


def export_dense(model):
    """A GPT2LMHeadModel holding a GPT-2-block model's weights (HF's Conv1D keeps them transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    # bias=False is said in config.json too (bias: false), so that load_gpt2 leaves out the zero biases
    hf = GPT2LMHeadModel(GPT2Config(**hf_kwargs('GPT2LMHeadModel', model.config), bias=model.config.bias))
    sd = model.state_dict()
    hf.load_state_dict({k: (sd[k].t() if k.endswith(CONV1D) else sd[k]) if k in sd else torch.zeros_like(v)
                        for k, v in hf.state_dict().items()})
    return hf


def describe(folder, model_args, meta=None, cls=None, own_tokenizer=False):
    """What a user needs beside the weights, written into an exported folder (any export's, after save). A
    GPT-2 BPE model (no meta.pkl, vocab_size >= 50257) gets GPT-2's tokenizer files (from the BPE files that
    data/ uses: offline too) and <|endoftext|> as its bos and eos in config.json and generation_config.json;
    a model with a vocabulary of its own (meta: its meta.pkl, a character-level one) gets it in the note. The
    note, README.md, says what the folder holds and how to encode text for it; own_tokenizer: the folder
    already holds the model's tokenizer (copy_tokenizer: a model fine-tuned from a folder). -> the note."""
    bpe = meta is None and not own_tokenizer and model_args['vocab_size'] >= GPT2_VOCAB
    cls = cls or ('NanoMoEForCausalLM' if model_args.get('n_expert') else 'GPT2LMHeadModel')
    kind = ('An MoE' if model_args.get('n_expert') else 'A dense GPT') + f' as {cls}' + (
        ' (its code: modeling_nanomoe.py; load it with trust_remote_code=True)' if cls == 'NanoMoEForCausalLM'
        else ' (transformers\' own class: no trust_remote_code)')
    note = ['# nanoMoE export', f"{kind}, written by nanoMoE's tools/export_hf.py."]
    if bpe:
        try:
            from data.tiktoken_offline import gpt2_bpe_files
            files = gpt2_bpe_files()
            shutil.copyfile(files['encoder.json'], os.path.join(folder, 'vocab.json'))
            shutil.copyfile(files['vocab.bpe'], os.path.join(folder, 'merges.txt'))
            eot = '<|endoftext|>'
            write_json(os.path.join(folder, 'tokenizer_config.json'), {
                'tokenizer_class': 'GPT2Tokenizer', 'bos_token': eot, 'eos_token': eot, 'unk_token': eot,
                'model_max_length': model_args['block_size'], 'add_prefix_space': False})
            note.append(f"Tokenizer: GPT-2's BPE (vocab.json, merges.txt: `AutoTokenizer.from_pretrained` on "
                        f"this folder); {eot} (id {GPT2_EOT}) is its bos and eos token.")
        except (RuntimeError, OSError, ValueError) as e:  # offline with no copy of GPT-2's BPE files
            print(f"warning: no tokenizer files written ({e}): use AutoTokenizer.from_pretrained('gpt2')")
            note.append("Tokenizer: GPT-2's BPE (`AutoTokenizer.from_pretrained('gpt2')`); its bos and eos "
                        f"token is <|endoftext|> (id {GPT2_EOT}).")
        for name in ('config.json', 'generation_config.json'):
            path = os.path.join(folder, name)
            if name == 'config.json' or os.path.exists(path):
                with open(path) as f:
                    cfg = json.load(f)
                write_json(path, {**cfg, 'bos_token_id': GPT2_EOT, 'eos_token_id': GPT2_EOT})
        if model_args['vocab_size'] > GPT2_VOCAB:
            note.append(f"vocab_size is {model_args['vocab_size']}, GPT-2's {GPT2_VOCAB} padded (nanoGPT's "
                        f"speed-up): ids from {GPT2_VOCAB} on never occurred in training.")
    elif own_tokenizer:
        note.append("Tokenizer: the one of the folder this model was fine-tuned from (its files, here: "
                    "`AutoTokenizer.from_pretrained` on this folder).")
    elif meta is not None:
        itos = meta.get('itos') if isinstance(meta.get('itos'), dict) else {}
        chars = ''.join(str(itos.get(i, '')) for i in range(meta['vocab_size']))
        note.append("Tokenizer: its own, from its dataset's meta.pkl (no tokenizer files here): token id i "
                    "is character i of this string (JSON), and text is encoded character by character:")
        note.append(f"    {json.dumps(chars)}" if len(chars) == meta['vocab_size'] else
                    "    (meta.pkl's itos, its id -> character map, is not complete)")
    else:
        note.append(f"Tokenizer: unknown here (vocab_size {model_args['vocab_size']}, not GPT-2's BPE, and "
                    f"no meta.pkl was found): encode text as its training data was.")
    if not model_args.get('bias', True) and cls == 'GPT2LMHeadModel':
        note.append("The model has no biases (bias=False): GPT2LMHeadModel's are zeros, and config.json's "
                    "\"bias\": false lets nanoMoE's load_hf_folder leave them out.")
    text = '\n\n'.join(note) + '\n'
    with open(os.path.join(folder, 'README.md'), 'w') as f:
        f.write(text)
    return text


def write_json(path, obj):
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write('\n')


def export_moe(model):
    """A NanoMoEForCausalLM (hf/modeling_nanomoe.py) holding model's weights, under the same names (a dense
    model too: n_expert=0)."""
    from hf.modeling_nanomoe import NanoMoEConfig, NanoMoEForCausalLM
    c = model.config
    keys = {'n_expert': 0, **{k: getattr(c, k) for k in EXPORTED_KEYS if k != 'top_k' and hasattr(c, k)}}
    hf = NanoMoEForCausalLM(NanoMoEConfig(num_experts_per_tok=getattr(c, 'top_k', 2), **keys))
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith('_extra_state')})
    return hf


def modeling_source():
    """The folder's modeling_nanomoe.py: hf/modeling_nanomoe.py with the repo's model.py and moe_model.py in
    place of its import of them, so that the folder runs the very code that trained the model. Their imports
    of each other go (model.py's names come first), and their imports of moe_kernels/ (the fast backends; the
    exported model runs 'loop') and of hf/ (GPT.from_pretrained's) are kept only where that package is there
    (elsewhere their names are None): transformers refuses to load a folder whose code imports a module it
    cannot find, outside a try block."""
    def read(name):
        with open(os.path.join(REPO, name)) as f:
            return f.read()
    def optional(m):  # the names such an import binds are None where its package is not there
        names = [n.split(' as ')[-1].strip() for n in m[3].split('#')[0].split(',')]
        return (f"{m[1]}try:  # (hf/__init__.py: not in an exported folder)\n{m[1]}    {m[2]}\n"
                f"{m[1]}except ImportError:\n{m[1]}    {' = '.join(names)} = None")
    optional_imports = r'^( *)(from (?:moe_kernels|hf)\b\S* import (.*))$'
    model, moe = (re.sub(optional_imports, optional, read(name), flags=re.M)
                  for name in ('model.py', 'moe_model.py'))
    moe = re.sub(r'^from model import .*\n', '', moe, flags=re.M)
    head, tail = read('hf/modeling_nanomoe.py').split('from moe_model import', 1)
    tail = tail.split('\n', 1)[1]
    banner = '# ' + '-' * 77 + ('\n# {} (generated by hf/__init__.py at export: the repo\'s own model '
                                'code)\n\n')
    return head + banner.format('model.py') + model + '\n\n' + banner.format('moe_model.py') + moe + \
        '\n\n' + '# ' + '-' * 77 + '\n# the transformers classes\n' + tail


def save(hf, folder):
    """hf.save_pretrained(folder); for an MoE with the self-contained modeling_nanomoe.py
    (modeling_source)."""
    hf.save_pretrained(folder)
    if hf.config.model_type == 'nanomoe':
        with open(os.path.join(folder, 'modeling_nanomoe.py'), 'w') as f:
            f.write(modeling_source())


def hf_config(folder):
    """The config.json of a Hugging Face model folder, or None if folder is not one; ValueError, one line, if
    it is not a JSON object."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:  # (a UnicodeDecodeError, a JSONDecodeError)
        raise ValueError(f"{path} cannot be read as JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object of config keys")
    if not isinstance(cfg.get('model_type'), str):  # (transformers refuses it too; never a guess)
        raise ValueError(f"{path} has no model_type: which model it holds is unknown")
    return cfg


def hf_model_args(init_from):
    """The model_args of a GPT-2 name, or of a Hugging Face folder's config.json (GPT-2's, a NATIVE class's,
    or one exported here), read before any weights are; ValueError (one line) for a folder this repo cannot
    compute exactly."""
    if init_from in GPT2_SIZES:
        n_layer, n_head, n_embd = GPT2_SIZES[init_from]
        return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50257,
                    bias=True, n_expert=0)
    cfg = hf_config(init_from)
    if cfg is None:
        raise ValueError(f"init_from={init_from!r} is neither a GPT-2 name nor a folder with a config.json")
    if cfg['model_type'] == 'nanomoe':  # a key it lacks (an older export: fewer) is MoEConfig's default
        if 'num_experts_per_tok' not in cfg:  # (every export wrote it)
            raise ValueError(f"{os.path.join(init_from, 'config.json')} has no num_experts_per_tok (top_k)")
        return dict(top_k=cfg['num_experts_per_tok'], **{k: cfg[k] for k in EXPORTED_KEYS if k in cfg})
    if cfg['model_type'] == 'gpt2':
        return dict(n_layer=cfg.get('n_layer', 12), n_head=cfg.get('n_head', 12),
                    n_embd=cfg.get('n_embd', 768), block_size=cfg.get('n_positions', 1024),
                    vocab_size=cfg.get('vocab_size', 50257),
                    bias=cfg.get('bias', True), n_expert=0, mlp_hidden=cfg.get('n_inner') or 0,
                    norm_eps=cfg.get('layer_norm_epsilon', 1e-5))
    if any(native.model_type == cfg['model_type'] for native in NATIVE.values()):
        try:
            return native_model_args(init_from, cfg)
        except ValueError as e:
            raise ValueError(f"{init_from} ({cfg['model_type']}): {e}") from None
    raise ValueError(f"{init_from} holds a {cfg['model_type']!r} model (config.json), which this repo does "
                     f"not load; it loads {', '.join(n.model_type for n in NATIVE.values())} and its exports")


def load_hf_folder(folder, run_args=None):
    """A GPT (a GPT2LMHeadModel folder, through load_gpt2; a Llama or Qwen3 folder) or an MoEGPT (a Mixtral,
    Qwen3-MoE or OLMoE folder), or either from a folder this file exported; ValueError with one line if it
    cannot be loaded. run_args: a run's model keys, the folder's shape keys among them (init_model.Init's):
    the keys that config.json does not fix, dropout and the RUN_KEYS (expert_impl, aux_loss_coef, ...), are
    the run's; without run_args, MoEConfig's defaults."""
    cfg = hf_config(folder)
    if cfg is None:
        raise ValueError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    if cfg['model_type'] == 'gpt2':
        return load_gpt2(folder, (run_args or {}).get('dropout', 0.0))
    folder_args = hf_model_args(folder)  # (a native folder's config checked, with run_args too)
    model = build_model(run_args or folder_args)
    if cfg['model_type'] != 'nanomoe':
        return load_native(folder, model)
    from safetensors.torch import load_file
    path = os.path.join(folder, 'model.safetensors')
    try:
        sd = load_file(path)  # missing, truncated or corrupt: whatever safetensors raises, one line
    except Exception as e:
        reason = ' '.join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"{folder} cannot be loaded: {reason}") from None
    if 'transformer.wte.weight' in sd:
        sd.setdefault('lm_head.weight', sd['transformer.wte.weight'])  # tied: saved once
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{folder} does not match its config.json: "
                         f"{str(e).strip().splitlines()[-1][:300]}") from None
    return model


# a folder's own tokenizer: any one of these files is enough for AutoTokenizer (a SentencePiece model, a fast
# tokenizer's tokenizer.json, GPT-2's vocab.json and merges.txt that describe() writes, ...); copy_tokenizer
# takes these and the rest of what save_pretrained writes
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model', 'vocab.json')
TOKENIZER_EXTRA = ('merges.txt', 'special_tokens_map.json', 'added_tokens.json', 'chat_template.jinja')


def has_tokenizer(folder):
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def copy_tokenizer(src, dst):
    """src's tokenizer files into dst, each whole (a temp file renamed): train.py keeps the tokenizer of the
    folder a run fine-tunes in its out_dir, for its resumes, samples, HellaSwag and exports."""
    for name in TOKENIZER_FILES + TOKENIZER_EXTRA:
        if os.path.isfile(os.path.join(src, name)):
            tmp = os.path.join(dst, f'.{name}.tmp')
            shutil.copyfile(os.path.join(src, name), tmp)
            os.replace(tmp, os.path.join(dst, name))


class FolderTokenizer:
    """A folder's AutoTokenizer with the tiktoken methods that sample.py and hellaswag.py call."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text, allowed_special=()):  # its own special tokens (a bos, <|endoftext|>) as it says
        return self.tokenizer.encode(text)

    def encode_ordinary(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def continuation(self, context, text):
        """text's tokens as they follow context (lm-eval-harness's way): a SentencePiece tokenizer (Llama's,
        Mixtral's) starts text alone with a space token of its own, which never follows a context."""
        head = self.encode_ordinary(context)
        return self.encode_ordinary(context + text)[len(head):]


def folder_tokenizer(folder, vocab_size):
    """How text is encoded for a Hugging Face model folder (sample.py, HellaSwag): its own tokenizer where it
    has tokenizer files (AutoTokenizer: a Llama's or Qwen3's, or GPT-2's that an export here wrote), else
    tiktoken's GPT-2 BPE where vocab_size holds GPT-2's tokens (a bare GPT-2 folder: 50257, or 50304 padded).
    ValueError, one line, for a folder with neither: GPT-2's ids would be wrong tokens for it, silently."""
    if not has_tokenizer(folder):
        if vocab_size < GPT2_VOCAB:
            raise ValueError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}) and its "
                             f"vocab_size={vocab_size} is not GPT-2's BPE (>= {GPT2_VOCAB}): a tokenizer is "
                             f"needed to encode text for it; save one in the folder")
        from data.tiktoken_offline import get_gpt2_encoding  # tiktoken 'gpt2', seeded offline if need be
        try:
            return get_gpt2_encoding(verbose=False)
        except RuntimeError as e:
            raise ValueError(' '.join(str(e).split())) from None
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # a missing package (sentencepiece), a broken file: whatever it raises, one line
        reason = ' '.join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"{folder}'s tokenizer cannot be loaded (AutoTokenizer): {reason}") from None
    if len(tokenizer) > vocab_size:  # its ids past the embedding would be an IndexError in the forward
        raise ValueError(f"{folder}'s tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size={vocab_size}: they do not belong together")
    return FolderTokenizer(tokenizer)
