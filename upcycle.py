"""
Sparse upcycling (Komatsuzaki et al. 2022): an MoE whose experts start as the MLPs of a trained dense model.
$ python train.py config/train_shakespeare_char_cpu.py --init_from=out-shakespeare-char-cpu/ckpt.pt \
    --n_expert=8

train.py upcycles when init_from is a dense model (a GPT-2 name, a local GPT-2 folder, or a checkpoint file
of this project or nanoGPT) and the run sets n_expert (a config file or the command line; without it the
model stays dense, as in nanoGPT). Attention, norms, embeddings and the blocks that stay dense are copied;
each MoE layer's experts are made of its block's MLP:
- expert_hidden = mlp_hidden (4 * n_embd by default): every expert is a copy of the MLP.
- expert_hidden = mlp_hidden / g (granular upcycling): the MLP's hidden units are cut into g slices and
  expert c * g + s is slice s of copy c. The g slices of a copy share one router row, so their logits tie
  and they are chosen together ("virtual groups", He et al. 2024): top_k must be a multiple of g, and
  top_k = g (the default then) keeps the dense model's active FLOPs. Each slice's c_proj is scaled by g,
  because a chosen copy's weight is split evenly over its g slices.
With top_k >= 2 the chosen weights sum to 1 (Router renormalises them), so at step 0 the MoE computes the
dense model's function exactly (in eval mode: noisy_topk's noise and expert choice are training-time).
With top_k = 1 the weight is the router probability (< 1) and the output is scaled down. upcycle_noise > 0
adds noise * std(weight) * N(0, 1) to every expert weight, so that copies differ from the first step.
The routers start from their usual random init.
"""
import torch

from model import GPTConfig, keys_of
from moe_model import build_model, MODEL_KEYS

DENSE_KEYS = keys_of(GPTConfig, 'shape', 'forward')  # what the dense model decides


def upcycle_args(dense_args, config, given):
    """The model_args of the MoE that upcycles the model with model_args dense_args, or None: when the run
    does not set n_expert (keys in `given`), or sets the model's own. The shape (n_layer, n_embd, ...) is
    the dense model's and the MoE keys the run's. ValueError (one line) for what cannot be upcycled."""
    n_expert, have = config['n_expert'], dense_args.get('n_expert', 0)
    if 'n_expert' not in given or n_expert == have:
        return None
    if have:
        raise ValueError(f"n_expert={n_expert}, but init_from={config['init_from']!r} is an MoE with "
                         f"n_expert={have}: upcycling starts from a dense model "
                         "(leave n_expert out to train this one as it is)")
    hidden = dense_args.get('mlp_hidden') or 4 * dense_args['n_embd']
    expert_hidden = config['expert_hidden'] or hidden
    if hidden % expert_hidden:
        raise ValueError(f"expert_hidden={expert_hidden} must divide the dense MLP's hidden size mlp_hidden "
                         f"= {hidden} to upcycle it: each expert is a slice of it")
    g = hidden // expert_hidden
    top_k = config['top_k'] if 'top_k' in given or g == 1 else g
    if n_expert % g or top_k % g:
        raise ValueError(f"upcycling with expert_hidden={expert_hidden} cuts each MLP into {g} slices: "
                         f"n_expert={n_expert} and top_k={top_k} must be multiples of {g} "
                         f"(top_k={g} keeps the dense model's active FLOPs)")
    if config['n_shared_expert']:
        raise ValueError(f"n_shared_expert={config['n_shared_expert']}: upcycling makes routed experts only; "
                         f"set n_shared_expert=0")
    return {**{k: config[k] for k in MODEL_KEYS}, **{k: dense_args[k] for k in DENSE_KEYS if k in dense_args},
            'n_expert': n_expert, 'top_k': top_k, 'expert_hidden': expert_hidden}


@torch.no_grad()
def upcycle(dense, model_args, noise=0.0):
    """An MoEGPT with model_args (from upcycle_args) whose weights come from the dense GPT `dense`."""
    moe = build_model(model_args)
    E, h, hidden = moe.config.n_expert, moe.config.expert_hidden, moe.config.mlp_hidden
    print(f"sparse upcycling: the {E} experts of each MoE layer are {E * h // hidden} copies of its dense MLP"
          + (f", each cut into {hidden // h} slices of {h} hidden units" if h < hidden else "")
          + f"; top_k={moe.config.top_k}, upcycle_noise={noise}")
    own = moe.state_dict()
    # every name but the MoE layers' MLP weights is the same in both models
    missing = moe.load_state_dict({k: v for k, v in dense.state_dict().items() if k in own},
                                  strict=False).missing_keys
    assert all(int(k.split('.')[2]) in moe.moe_layers() for k in missing), missing
    for i, layer in moe.moe_layers().items():
        mlp, experts = dense.transformer.h[i].mlp, layer.experts
        d, g, halves = moe.config.n_embd, hidden // h, 2 if moe.config.mlp == 'swiglu' else 1
        # expert c * g + s: hidden units s * h .. (s + 1) * h
        # of the MLP (nn.Linear keeps weights [out, in]), of its gate and of its up projection alike with
        # swiglu (c_fc holds them side by side)
        experts.c_fc.copy_(mlp.c_fc.weight.view(halves, g, h,
                                                d).permute(1, 3, 0, 2).reshape(g, d, -1).repeat(E // g, 1, 1))
        experts.c_proj.copy_(g * mlp.c_proj.weight.view(d, g, h).permute(1, 2, 0).repeat(E // g, 1, 1))
        if experts.c_fc_bias is not None:
            experts.c_fc_bias.copy_(mlp.c_fc.bias.view(halves, g,
                                                       h).transpose(0, 1).reshape(g, -1).repeat(E // g, 1))
            experts.c_proj_bias.copy_(mlp.c_proj.bias.expand(E, d))  # the chosen weights sum to 1: added once
        gate = layer.router.gate.weight  # [E, d]: one random row per copy, shared by its g slices
        gate.copy_(gate[::g].repeat_interleave(g, dim=0))
        if noise:
            for w in (experts.c_fc, experts.c_proj):
                w.add_(torch.randn_like(w) * (noise * w.std()))
    return moe
