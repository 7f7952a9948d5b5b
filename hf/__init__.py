"""
Hugging Face model folders, both ways (tools/export_hf.py is the command line):
- export: the transformers class that computes exactly the model, where one does (hf/native.py's table:
  Mixtral, Qwen3-MoE, OLMoE, Llama, Qwen3, GPT-2), else this repo's own; and which one, and why;
- export_dense: a GPT-2-block model as a plain GPT2LMHeadModel (activation_function='gelu', nanoGPT's exact
  GELU, so the logits are this project's; zero biases where the model has none);
- export_native: the other transformers classes (hf/native.py);
- export_moe: any other model as NanoMoEForCausalLM, whose code (hf/modeling_nanomoe.py) travels in the
  folder: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) loads it with no nanoMoE
  checkout;
- load_hf_folder: the way back (train.py, sample.py, bench.py, tools/eval_hellaswag.py --init_from=<folder>);
  hf_model_args reads a folder's keys before any weights; a folder this repo cannot compute exactly is one
  ValueError line naming the config field.
"""
import os
import re
import json

import torch

from model import GPT, GPTConfig
from moe_model import EXPORTED_KEYS, build_model
from hf.native import NATIVE, choose, export_native, hf_kwargs, load_native, native_model_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')  # HF stores x @ W
GPT2_SIZES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280),  # n_layer, n_head,
              'gpt2-xl': (48, 25, 1600)}  # n_embd


def load_gpt2(model_type, dropout=0.0):
    """A GPT with GPT-2's weights (model.GPT.from_pretrained, as in nanoGPT): model_type is 'gpt2',
    'gpt2-medium', 'gpt2-large', 'gpt2-xl', or a local folder holding a GPT2LMHeadModel (save_pretrained).
    ValueError, one line, if transformers cannot load it (offline, a wrong name or folder)."""
    from transformers import GPT2LMHeadModel
    print("loading weights from pretrained gpt: %s" % model_type)
    try:
        model_hf = GPT2LMHeadModel.from_pretrained(model_type)
    except Exception as e:  # whatever transformers raises, one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise ValueError(f"cannot load GPT-2 weights from {model_type!r}: {lines[0][:300]}") from None
    c = model_hf.config
    model = GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size,
                          block_size=c.n_positions, bias=True, dropout=dropout, mlp_hidden=c.n_inner or 0,
                          norm_eps=c.layer_norm_epsilon))
    sd, sd_hf = model.state_dict(), model_hf.state_dict()
    keys_hf = [k for k in sd_hf if not k.endswith(('.attn.masked_bias', '.attn.bias'))]
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


def export_dense(model):
    """A GPT2LMHeadModel holding a GPT-2-block model's weights (HF's Conv1D keeps them transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(**hf_kwargs('GPT2LMHeadModel', model.config)))
    sd = model.state_dict()
    hf.load_state_dict({k: (sd[k].t() if k.endswith(CONV1D) else sd[k]) if k in sd else torch.zeros_like(v)
                        for k, v in hf.state_dict().items()})
    return hf


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
    exported model runs 'loop') are kept only where that package is there."""
    def read(name):
        with open(os.path.join(REPO, name)) as f:
            return f.read()
    model = read('model.py')
    moe = re.sub(r'^from model import .*\n', '', read('moe_model.py'), flags=re.M)
    moe = re.sub(r'^( *)(from moe_kernels\S* import .*)$', r'\1try:  # (hf/__init__.py: not in an exported folder)\n'
                 r'\1    \2\n\1except ImportError:\n\1    pass', moe, flags=re.M)
    head, tail = read('hf/modeling_nanomoe.py').split('from moe_model import', 1)
    tail = tail.split('\n', 1)[1]
    banner = '# ' + '-' * 77 + '\n# {} (generated by hf/__init__.py at export: the repo\'s own model code)\n\n'
    return head + banner.format('model.py') + model + '\n\n' + banner.format('moe_model.py') + moe + '\n\n' + \
        '# ' + '-' * 77 + '\n# the transformers classes\n' + tail


def save(hf, folder):
    """hf.save_pretrained(folder); for an MoE with the self-contained modeling_nanomoe.py (modeling_source)."""
    hf.save_pretrained(folder)
    if hf.config.model_type == 'nanomoe':
        with open(os.path.join(folder, 'modeling_nanomoe.py'), 'w') as f:
            f.write(modeling_source())


def hf_config(folder):
    """The config.json of a Hugging Face model folder, or None if folder is not one."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def hf_model_args(init_from):
    """The model_args of a GPT-2 name, or of a Hugging Face folder's config.json (GPT-2's, a NATIVE class's,
    or one exported here), read before any weights are; ValueError (one line) for a folder this repo cannot
    compute exactly."""
    if init_from in GPT2_SIZES:
        n_layer, n_head, n_embd = GPT2_SIZES[init_from]
        return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50257, bias=True,
                    n_expert=0)
    cfg = hf_config(init_from)
    if cfg is None:
        raise ValueError(f"init_from={init_from!r} is neither a GPT-2 name nor a folder with a config.json")
    if cfg.get('model_type') == 'nanomoe':
        return dict(top_k=cfg['num_experts_per_tok'], **{k: cfg[k] for k in EXPORTED_KEYS if k in cfg})  # (older: fewer)
    if cfg.get('model_type', 'gpt2') == 'gpt2':
        return dict(n_layer=cfg.get('n_layer', 12), n_head=cfg.get('n_head', 12),
                    n_embd=cfg.get('n_embd', 768), block_size=cfg.get('n_positions', 1024),
                    vocab_size=cfg.get('vocab_size', 50257),
                    bias=True, n_expert=0, mlp_hidden=cfg.get('n_inner') or 0,
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
    if cfg.get('model_type', 'gpt2') == 'gpt2':
        return load_gpt2(folder, (run_args or {}).get('dropout', 0.0))
    folder_args = hf_model_args(folder)  # (a native folder's config checked, with run_args too)
    model = build_model(run_args or folder_args)
    if cfg['model_type'] != 'nanomoe':
        return load_native(folder, model)
    from safetensors.torch import load_file
    sd = load_file(os.path.join(folder, 'model.safetensors'))
    sd.setdefault('lm_head.weight', sd['transformer.wte.weight'])  # tied: saved once
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{folder} does not match its config.json: {str(e).strip().splitlines()[-1][:300]}") from None
    return model
