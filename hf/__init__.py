"""
Hugging Face model folders, both ways (tools/export_hf.py is the command line):
- export_dense: a dense model as a plain GPT2LMHeadModel (activation_function='gelu', nanoGPT's exact GELU,
  so the logits are this project's; zero biases where the model has none);
- export_moe: an MoE as NanoMoEForCausalLM, whose code (hf/modeling_nanomoe.py) travels in the folder:
  AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) loads it with no nanoMoE checkout;
- load_hf_folder: the way back (train.py, sample.py and tools/eval_hellaswag.py --init_from=<folder>);
  hf_model_args reads a folder's keys before any weights.
"""
import os
import re
import json

import torch

from model import GPT, GPTConfig
from moe_model import EXPORTED_KEYS

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
                          block_size=c.n_positions, bias=True, dropout=dropout))
    sd, sd_hf = model.state_dict(), model_hf.state_dict()
    keys_hf = [k for k in sd_hf if not k.endswith(('.attn.masked_bias', '.attn.bias'))]
    assert len(keys_hf) == len(sd), f"mismatched keys: {len(keys_hf)} != {len(sd)}"
    with torch.no_grad():
        for k in keys_hf:  # the OpenAI checkpoints use a "Conv1D" module: its weights are transposed Linears
            w = sd_hf[k].t() if k.endswith(CONV1D) else sd_hf[k]
            assert w.shape == sd[k].shape, k
            sd[k].copy_(w)
    return model


def export_dense(model):
    """A GPT2LMHeadModel holding model's weights (HF's Conv1D keeps them transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                                    n_head=c.n_head, activation_function='gelu', resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=None, eos_token_id=None))
    sd = model.state_dict()
    hf.load_state_dict({k: (sd[k].t() if k.endswith(CONV1D) else sd[k]) if k in sd else torch.zeros_like(v)
                        for k, v in hf.state_dict().items()})
    return hf


def export_moe(model):
    """A NanoMoEForCausalLM (hf/modeling_nanomoe.py) holding model's weights, under the same names."""
    from hf.modeling_nanomoe import NanoMoEConfig, NanoMoEForCausalLM
    c = model.config
    hf = NanoMoEForCausalLM(NanoMoEConfig(num_experts_per_tok=c.top_k,
                                          **{k: getattr(c, k) for k in EXPORTED_KEYS if k != 'top_k'}))
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith('_extra_state')})
    return hf


def modeling_source():
    """The folder's modeling_nanomoe.py: hf/modeling_nanomoe.py with the repo's model.py and moe_model.py in
    place of its import of them, so that the folder runs the very code that trained the model. Their imports
    of each other go (model.py's names come first), and their imports of moe_kernels/ (the fast backends; the
    exported model runs 'loop') are kept only where that package is there (elsewhere their names are None)."""
    def read(name):
        with open(os.path.join(REPO, name)) as f:
            return f.read()
    model = read('model.py')
    moe = re.sub(r'^from model import .*\n', '', read('moe_model.py'), flags=re.M)
    def optional(m):  # the names such an import binds are None where moe_kernels is not there
        names = [n.split(' as ')[-1].strip() for n in m[3].split('#')[0].split(',')]
        return (f"{m[1]}try:  # (hf/__init__.py: not in an exported folder)\n{m[1]}    {m[2]}\n"
                f"{m[1]}except ImportError:\n{m[1]}    {' = '.join(names)} = None")
    moe = re.sub(r'^( *)(from moe_kernels\S* import (.*))$', optional, moe, flags=re.M)
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
    """The model_args of a GPT-2 name, or of a Hugging Face folder's config.json (GPT-2's, or one exported
    here), read before any weights are."""
    if init_from in GPT2_SIZES:
        n_layer, n_head, n_embd = GPT2_SIZES[init_from]
        return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50257, bias=True,
                    n_expert=0)
    cfg = hf_config(init_from)
    if cfg.get('model_type') == 'nanomoe':
        return dict(top_k=cfg['num_experts_per_tok'], **{k: cfg[k] for k in EXPORTED_KEYS if k in cfg})  # (older: fewer)
    return dict(n_layer=cfg.get('n_layer', 12), n_head=cfg.get('n_head', 12), n_embd=cfg.get('n_embd', 768),
                block_size=cfg.get('n_positions', 1024), vocab_size=cfg.get('vocab_size', 50257), bias=True, n_expert=0)


def load_hf_folder(folder, run_args=None):
    """A GPT (a GPT2LMHeadModel folder, through load_gpt2) or an MoEGPT (a folder this file
    exported); ValueError with one line if it cannot be loaded. run_args: a run's model keys, the folder's
    shape keys among them (init_model.Init's): the keys that config.json does not fix, dropout and the
    RUN_KEYS (expert_impl, aux_loss_coef, ...), are the run's; without run_args, MoEConfig's defaults."""
    cfg = hf_config(folder)
    if cfg is None:
        raise ValueError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    if cfg.get('model_type') != 'nanomoe':
        return load_gpt2(folder, (run_args or {}).get('dropout', 0.0))
    from safetensors.torch import load_file
    from moe_model import MoEGPT, MoEConfig
    model = MoEGPT(MoEConfig(**(run_args or hf_model_args(folder))))
    sd = load_file(os.path.join(folder, 'model.safetensors'))
    sd.setdefault('lm_head.weight', sd['transformer.wte.weight'])  # tied: saved once
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{folder} does not match its config.json: {str(e).strip().splitlines()[-1][:300]}") from None
    return model
