"""
Where train.py's model comes from (its init_from), read and checked before any work, built after:
  'scratch'     a new model of the run's keys
  'resume'      out_dir/ckpt.pt: its weights (train.py then restores the optimizer, step and RNG states; the
                run's optimizer must be the checkpoint's: muon.resume_error)
  a .pt file    the weights of a checkpoint, this project's or nanoGPT's, for a new run
  'gpt2*', a folder   GPT-2's weights (through transformers), or a Hugging Face folder: GPT-2's, Llama's,
                Qwen3's, Mixtral's, Qwen3-MoE's, OLMoE's (hf/native.py), or an export_hf.py one
The weights fix their 'shape' keys (n_layer, n_embd, n_expert, ...; a checkpoint without n_expert is dense):
a run that gives another value stops with one line (block_size may only shrink: train.py crops). A
'forward' key the run gives (top_k, router_temperature, ...) replaces the weights' own, said in one line;
'train' keys (dropout, expert_impl, ...) are the run's (model.key says which key is which). A dense model
whose run sets n_expert is upcycled into an MoE (upcycle.py). expert_impl='auto' becomes the backend for
the run's device.
"""
import os

import torch

from checkpoint import load_checkpoint, load_for_resume, load_weights
from hf import GPT2_SIZES, hf_config, hf_model_args, load_hf_folder, load_gpt2
from moe_kernels import auto_expert_impl
from moe_model import Experts, MoE, build_model, model_config, MODEL_KEYS, SHAPE_KEYS, TRAIN_KEYS
from muon import resume_error
from upcycle import upcycle_args, upcycle


class Init:

    def __init__(self, init_from, out_dir, config, given, vocab_size):
        """config: the run's keys, given: those its files and flags set; vocab_size: the dataset's. A model
        from weights can be cropped to the run's block_size (train.py does), never grown.
        ValueError or checkpoint.CheckpointError: one line, for configurator.fail."""
        self.init_from, self.hf = init_from, hf_config(init_from)
        self.pretrained = init_from in GPT2_SIZES or self.hf is not None  # (transformers reads the weights)
        if init_from not in ('scratch', 'resume') and not self.pretrained and not init_from.endswith('.pt'):
            raise ValueError(f"init_from={init_from!r}; allowed: 'scratch', 'resume', 'gpt2', 'gpt2-medium', "
                             f"'gpt2-large', 'gpt2-xl', a Hugging Face model folder (config.json and "
                             f"weights), or a checkpoint file (.pt)")
        self.path = os.path.join(out_dir, 'ckpt.pt') if init_from == 'resume' else init_from
        self.ckpt = None
        if init_from == 'resume' or init_from.endswith('.pt'):
            self.ckpt = (load_for_resume if init_from == 'resume' else load_checkpoint)(self.path)
        saved = self.ckpt.get('config', {}) if self.ckpt else {}
        if init_from == 'resume' and (message := resume_error(saved, config, self.path)):
            raise ValueError(message)  # (before any work: train.py restores the optimizer after the build)
        args = {**{k: config[k] for k in MODEL_KEYS}, 'vocab_size': vocab_size}
        if init_from != 'scratch':
            keys = {'n_expert': 0, **self.ckpt['model_args']} if self.ckpt else hf_model_args(init_from)
            args.update(weights_keys(keys, config, given, init_from))
        if 'block_size' not in given:  # the weights' (the run's default is for a new model)
            config['block_size'] = args['block_size']
        elif config['block_size'] > args['block_size']:
            raise ValueError(f"block_size={config['block_size']} is larger than the model's "
                             f"block_size={args['block_size']}")
        self.weights_args = args  # the model that the weights load into
        upcycled = init_from not in ('scratch', 'resume') and upcycle_args(args, config, given)
        self.model_args = args = upcycled or args  # the model this run trains
        # resolved once, then saved and logged as resolved
        if args['n_expert'] and args['expert_impl'] == 'auto':
            hidden = args['expert_hidden'] or 4 * args['n_embd']
            # (EP runs grouped's GEMMs)
            impl, warning = (('grouped', None) if config['expert_parallel'] != 1 else
                             auto_expert_impl(config['device'], config['dtype'], hidden))
            print(f"expert_impl='auto': {impl}" + (f"\nwarning: {warning}" if warning else ''))
            args['expert_impl'] = config['expert_impl'] = impl
        self.upcycle_noise = config['upcycle_noise']
        model_config(args)  # every model key checked (top_k <= n_expert, n_embd % n_head, ...)

    def build(self):
        """The model, with its weights (a CheckpointError or ValueError, one line, if they cannot be
        loaded)."""
        if self.init_from == 'scratch':
            print("Initializing a new model from scratch")
            return build_model(self.model_args)
        if self.ckpt is not None:
            print(f"Resuming training from {self.path}" if self.init_from == 'resume' else
                  f"Initializing from {self.init_from}")
            model = build_model(self.weights_args)
            load_weights(model, self.ckpt, self.path)
        else:
            print(f"Initializing from pretrained weights: {self.init_from}")
            model = (load_hf_folder(self.init_from, self.weights_args) if self.hf else
                     load_gpt2(self.init_from, self.weights_args['dropout']))
        if self.model_args is not self.weights_args:
            model = upcycle(model, self.model_args, self.upcycle_noise)
        return model


def weights_keys(weights_args, config, given, init_from):
    """The model keys that weights with model_args weights_args fix for a run with keys config (given: those
    its files and flags set): their shape keys, and their forward keys that the run does not give. A given
    shape key that differs is a ValueError (one line, naming both values), except block_size (Init: it may
    shrink, a crop) and, for a new run, n_expert (upcycling: upcycle.py); a given forward key is printed."""
    fixed, changed = {}, []
    for k, v in weights_args.items():
        if k not in MODEL_KEYS or k in TRAIN_KEYS:
            continue
        upcycling = k == 'n_expert' and init_from != 'resume'  # (upcycle_args decides)
        if k not in given or config[k] == v or k == 'block_size' or upcycling:  # (block_size: Init checks it)
            fixed[k] = v
        elif k in SHAPE_KEYS:
            raise ValueError(f"{k}={config[k]!r}, but the weights of init_from={init_from!r} have {k}={v!r}: "
                             f"it fixes their shape, so it cannot change (leave it out, or start a new run)")
        elif k not in SHAPE_KEYS:
            changed.append(f"{k} {v!r} -> {config[k]!r}")
    if changed:
        print(f"note: this run changes what the weights of init_from={init_from!r} compute: "
              f"{', '.join(changed)}")
    return fixed


def memory_need(model_args, tokens, train=True, dtype='float32', checkpointing='none', expert_parallel=1):
    """Bytes that a run of this model needs, by part, for configurator.check_memory, counted on the meta
    device (nothing allocated): the fp32 weights (one rank's: the experts split over expert_parallel ranks),
    in training their gradients and two AdamW moments, and the activations of `tokens` tokens (training: one
    micro-batch, kept for backward; else one forward without grad, and generation's cache of keys and values).
    Activations per token, as measured on the CPU in float32 (which used 5-10% more): ~8 n_embd of attention
    and 2 hidden of MLP per block (an MoE block: 2 top_k expert_hidden + top_k n_embd), 2.5 vocab_size of
    logits and their gradient; half of that in bfloat16/float16. A lower bound: what it refuses cannot fit."""
    with torch.device('meta'):
        model = build_model(model_args)
    c = model.config
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    params = sum(p.numel() for p in model.parameters()) - experts + experts // expert_parallel
    attn, blocks = 8 * c.n_embd, []  # per token, each block's MLP or MoE: (all of it, what 'moe' keeps of it)
    for block in model.transformer.h:
        if isinstance(block.mlp, MoE):
            shared = 2 * block.mlp.shared.c_fc.out_features if block.mlp.shared is not None else 0
            routed = c.top_k * c.n_embd + 3 * c.n_expert  # the dispatched rows, the router's scores
            blocks.append((routed + 2 * c.top_k * c.expert_hidden + shared, routed))
        else:
            blocks.append((2 * block.mlp.c_fc.out_features, None))
    if not train:  # one block at a time, and the cache
        per_token = attn + max(m for m, _ in blocks) + 2 * c.n_layer * c.n_embd
    elif checkpointing == 'none':
        per_token = sum(attn + m for m, _ in blocks)
    # with checkpointing, what is kept for backward (one layer's recomputed activations come on top, while the
    # gradients are not all there yet: measured, leaving both out stays under the peak)
    elif checkpointing == 'moe':  # the experts recompute
        per_token = sum(attn + (m if k is None else k) for m, k in blocks)
    else:  # 'all': the blocks' inputs (and an MoE block's routing) are kept
        per_token = sum(c.n_embd + (k or 0) for _, k in blocks)
    logits = 2.5 * c.vocab_size * tokens if train else c.vocab_size  # (generation: the last position's)
    need = {'weights': 4 * params}
    if train:
        need['gradients and AdamW moments'] = 12 * params
    act = (tokens * per_token + logits) * (4 if dtype == 'float32' else 2)
    need[f'activations of {tokens:,} tokens'] = int(act)
    return need
