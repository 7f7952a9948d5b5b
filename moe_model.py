"""
Mixture-of-Experts GPT: model.py's dense GPT with routed experts in place of (some of) its MLPs.

Reading order:
  ROUTERS, MoEConfig        router presets; the MoE keys, on top of GPTConfig's (model.key: what each is)
  Router, aux losses        fp32 scores and top-k, with orthogonal settings (score function, renormalisation,
                            selection bias, noise, scale); the Switch balance loss and the ST-MoE z-loss, per
                            layer
  dispatch helpers          sort token-slots by expert; weight and sum them back (combine)
  Experts                   every expert's weights stacked [n_expert, ...], named like the MLP's
  backends                  one signature, looked up by name in EXPERT_IMPLS:
                              backend(x [N, d], topk_idx [N, k], topk_weight [N, k], experts)
                                -> (y [N, d], drop_fraction of the token-slots)
                            'loop'     the reference: a for-loop over experts. Simple, slow.
                            'grouped'  dropless: slots sorted by expert, two grouped GEMMs (on the CPU, one
                                       fused op: moe_kernels/fused.py, as is the softmax router with its
                                       losses)
                            'batched'  capacity (GShard/Switch): fixed slots per expert, one bmm
                            'triton'   block-sparse kernels (moe_kernels/moe_triton.py, optional)
                            (expert parallelism puts expert_parallel.py's all-to-all dispatch in their place)
  expert choice             experts pick their tokens (training only), run as batched's table
  MoE                       drop-in for MLP: token order, routing, the backend; record() keeps its aux terms,
                            routing stats and the step's loads on itself
  MoEGPT, build_model       the model, and the one place that picks GPT or MoEGPT
"""

import math
import importlib.util
from typing import NamedTuple
from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
import torch.distributed as dist
from torch.nn import functional as F

from moe_kernels import cpu_grouped_mm
from moe_kernels.grouped_mm import grouped_mm  # the grouped GEMM as a custom op (torch.compile traces it)
from moe_kernels.fused import fused_experts as fused_experts_op, softmax_router  # (CPU kernel)
from model import GPT, GPTConfig, MLP, activation, checkpointed, key, keys_of


# Router presets: each names the router settings that a run leaves unset (None). The names stay those that
# configs and checkpoints have always used; every router name is written here and only here.
_TOPK = dict(router_score='softmax', norm_topk=True, router_bias=False, router_noise=False,
             expert_choice=False)
ROUTERS = {
    'topk': _TOPK,                                             # Switch, GShard, Mixtral
    'noisy_topk': {**_TOPK, 'router_noise': True},             # Shazeer et al. 2017
    'expert_choice': {**_TOPK, 'norm_topk': False, 'expert_choice': True},  # Zhou et al. 2022
    'aux_free': {**_TOPK, 'router_bias': True},                # DeepSeek-V3's balancing, softmax scores
    # DeepSeek-V3's router (torchtitan)
    'deepseek_v3': {**_TOPK, 'router_score': 'sigmoid', 'router_bias': True},
}


@dataclass
class MoEConfig(GPTConfig):
    n_expert: int = key(8, 'shape')         # experts per MoE layer
    top_k: int = key(2, 'forward')          # experts each token is sent to
    expert_hidden: int = key(0, 'shape')    # hidden size of one expert; 0 means mlp_hidden, the dense MLP's
    # every moe_every-th block is MoE (1: all; 2: every other, as in Switch)
    moe_every: int = key(1, 'shape')
    # experts of expert_hidden that every token passes through (DeepSeekMoE)
    n_shared_expert: int = key(0, 'shape')
    n_dense_layers: int = key(0, 'shape')   # the first n_dense_layers blocks keep a dense MLP (DeepSeekMoE)
    expert_impl: str = key('grouped', 'train')  # one of EXPERT_IMPLS below; all share the same parameters
    # capacity backends only: slots per expert = cf * tokens * top_k / n_expert
    capacity_factor: float = key(1.25, 'train')
    # the router (Router below): a preset of ROUTERS, whose settings a run may set one by one
    router: str = key('topk', 'shape')
    router_score: str = key(None, 'forward')   # 'softmax' over the experts, or each expert's 'sigmoid'
    norm_topk: bool = key(None, 'forward')     # the chosen experts' weights divided by their sum (top_k > 1)
    # norm_topk at top_k = 1 too: every weight 1.0 (Mixtral's and Qwen3-MoE's top-1 folders); False in every
    # model before this key, so those compute what they did
    norm_top1: bool = key(False, 'forward')
    router_bias: bool = key(None, 'shape')     # aux-loss-free balancing: a per-expert bias that only selects
    # noisy top-k: learned Gaussian noise on the logits, training only
    router_noise: bool = key(None, 'shape')
    expert_choice: bool = key(None, 'train')   # training only: each expert picks its tokens (eval: top-k)
    # softmax temperature of the router (logits / temperature)
    router_temperature: float = key(1.0, 'forward')
    # the chosen experts' weights are scaled by this (DeepSeek-V3: 2.5)
    route_scale: float = key(1.0, 'forward')
    # training only: router input times U(1 - jitter, 1 + jitter) (Switch)
    router_jitter: float = key(0.0, 'train')
    # router_bias: per-step change of an expert's selection bias
    bias_update_rate: float = key(0.001, 'train')
    # the auxiliary losses and regularisers of training
    aux_loss_coef: float = key(0.01, 'train')  # weight of the Switch load-balancing loss
    z_loss_coef: float = key(0.001, 'train')   # weight of the ST-MoE router z-loss
    # balance loss over the 'micro'-batch, the 'global' batch, each 'sequence'
    aux_loss_scope: str = key('micro', 'train')
    # training only: each whole expert is dropped with this probability
    expert_dropout: float = key(0.0, 'train')

    def __post_init__(self):
        super().__post_init__()
        if self.expert_hidden == 0:
            self.expert_hidden = self.mlp_hidden
        for key_ in ('n_expert', 'top_k', 'expert_hidden', 'moe_every'):
            if not isinstance(getattr(self, key_), int) or getattr(self, key_) < 1:
                raise ValueError(f"{key_}={getattr(self, key_)!r} must be a positive integer")
        if self.top_k > self.n_expert:
            raise ValueError(f"top_k={self.top_k} must be <= n_expert={self.n_expert}")
        if self.moe_every > self.n_layer:
            raise ValueError(f"moe_every={self.moe_every} must be <= n_layer={self.n_layer}, "
                             "else no layer is MoE")
        if self.expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl={self.expert_impl!r} is unknown; allowed: "
                             f"{', '.join(EXPERT_IMPLS)}")
        if self.expert_impl == 'triton' and importlib.util.find_spec('triton') is None:
            raise ValueError("expert_impl='triton' needs the triton package (pip install triton); "
                             f"other choices: {', '.join(k for k in EXPERT_IMPLS if k != 'triton')}")
        if self.expert_impl == 'triton' and self.expert_hidden % 16:
            raise ValueError("expert_impl='triton' needs expert_hidden divisible by 16, "
                             f"got {self.expert_hidden}")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is unknown; allowed: {', '.join(ROUTERS)}")
        for key_, preset in ROUTERS[self.router].items():  # the settings a run left unset are the preset's
            if getattr(self, key_) is None:
                setattr(self, key_, preset)
            elif not isinstance(getattr(self, key_), type(preset)):
                raise ValueError(f"{key_}={getattr(self, key_)!r} must be a {type(preset).__name__}")
        if self.router_score not in ('softmax', 'sigmoid'):
            raise ValueError(f"router_score={self.router_score!r} is unknown; allowed: softmax, sigmoid")
        for key_ in ('aux_loss_coef', 'z_loss_coef', 'bias_update_rate'):
            if getattr(self, key_) < 0:
                raise ValueError(f"{key_}={getattr(self, key_)} must be >= 0")
        if self.aux_loss_scope not in ('micro', 'global', 'sequence'):
            raise ValueError(f"aux_loss_scope={self.aux_loss_scope!r} is unknown; allowed: micro, global, "
                             "sequence")
        for key_ in ('router_temperature', 'route_scale'):
            if getattr(self, key_) <= 0:
                raise ValueError(f"{key_}={getattr(self, key_)} must be > 0")
        for key_ in ('router_jitter', 'expert_dropout'):
            if not 0.0 <= getattr(self, key_) < 1.0:
                raise ValueError(f"{key_}={getattr(self, key_)} must be in [0, 1)")
        for key_ in ('n_shared_expert', 'n_dense_layers'):
            if not isinstance(getattr(self, key_), int) or getattr(self, key_) < 0:
                raise ValueError(f"{key_}={getattr(self, key_)!r} must be a non-negative integer")
        if not any(self.is_moe_layer(i) for i in range(self.n_layer)):
            raise ValueError(f"n_dense_layers={self.n_dense_layers} with moe_every={self.moe_every} leaves "
                             f"no MoE layer among n_layer={self.n_layer}")

    def is_moe_layer(self, layer_idx):
        return layer_idx >= self.n_dense_layers and (layer_idx + 1) % self.moe_every == 0

    def renormalises(self):
        """Whether the router divides the chosen weights by their sum (norm_topk; at top_k = 1 norm_top1)."""
        return self.norm_topk and (self.top_k > 1 or self.norm_top1)

# -----------------------------------------------------------------------------
# Router and auxiliary losses


class Routing(NamedTuple):
    """What Router computes for rows x [N, d]."""
    topk_idx: torch.Tensor     # [N, k] int64: the chosen experts of each row
    topk_weight: torch.Tensor  # [N, k] float32: their weights
    logits: torch.Tensor       # [N, E] the clean logits (no noise), which the z-loss sees
    probs: torch.Tensor        # [N, E] the probabilities P of the balance loss (and of expert choice)
    counts: torch.Tensor       # [E] int64: the token-slots routed to each expert
    balance_loss: torch.Tensor  # load_balance_loss of these rows' slots
    z_loss: torch.Tensor       # router_z_loss of the logits

    def with_topk(self, topk_idx):
        """These rows sent to other experts (a test's or a study's forced routing), with the loads and the
        balance loss that follow from them; the weights (and so their gradients) stay."""
        counts = count_per_expert(topk_idx, self.logits.size(1))
        return self._replace(topk_idx=topk_idx, counts=counts,
                             balance_loss=load_balance_loss(self.probs, topk_idx, counts))


class Router(nn.Module):
    """A bias-free linear gate in float32 (routing flips on tiny logit differences, so autocast is off here),
    with orthogonal settings (MoEConfig; ROUTERS names the usual combinations):
      router_score   'softmax' over the experts (logits / router_temperature), or each expert's 'sigmoid'
                     (DeepSeek-V3); the balance loss's P_i are the softmax, or s_i / sum_j s_j
      router_noise   in training N(0, 1) * softplus(x @ W_noise) is added to the logits, W_noise learned
                     (Shazeer et al. 2017); no noise in eval
      router_bias    a per-expert bias added to the scores to pick the top-k, not to the weights;
                     MoEGPT.end_step() moves it against each expert's load error after every step
                     (DeepSeek-V3's balancing)
      norm_topk      with top_k > 1 the chosen weights are divided by their sum (a softmax of the chosen
                     logits); at top_k = 1 that would make every weight 1.0 and cut the router off from the
                     language-model gradient, so k = 1 keeps the raw score, unless norm_top1 (weight 1.0,
                     as transformers' Mixtral and Qwen3-MoE compute a top-1 router: renormalises)
      route_scale    the weights times this
      expert_choice  in training each expert picks its tokens (expert_choice() below, called by MoE.forward)
      router_jitter  in training the router input is multiplied by U(1 - jitter, 1 + jitter) (Switch)
    Noise and jitter are drawn row by row in the layer's token order (see the backends), so the same seed
    draws differently for 'batched' than for the dropless backends.
    Returns a Routing: the top-k and their weights, the loads and the two aux losses of these rows (in one
    op on the CPU: moe_kernels/fused.py); MoE.record() puts other loads in the balance loss where it needs."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.noise = nn.Linear(config.n_embd, config.n_expert, bias=False) if config.router_noise else None
        # a buffer, not a parameter: it gets no gradient, but is saved in checkpoints
        self.register_buffer('expert_bias', torch.zeros(config.n_expert) if config.router_bias else None)

    def forward(self, x):
        cfg = self.config
        x = x.float()
        if self.training and cfg.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
        noise = self.training and self.noise is not None
        if cfg.router_score == 'softmax' and not noise and x.device.type == 'cpu' and cpu_kernel_available():
            # the ops below in one, the same bits, with a one-pass backward (moe_kernels/fused.py); a C++ op
            # is not autocast's, so it needs no context (whose Python costs more than the rest of this path)
            return Routing(*softmax_router(x, self.gate.weight.float(), self.expert_bias, cfg.top_k,
                                           cfg.renormalises(), cfg.router_temperature,
                                           cfg.route_scale)[:len(Routing._fields)])
        with torch.autocast(device_type=x.device.type, enabled=False):  # the products in float32
            logits = F.linear(x, self.gate.weight.float())
            if cfg.router_temperature != 1.0:
                logits = logits / cfg.router_temperature
            noisy = logits  # the z-loss sees the clean logits
            if noise:
                noisy = logits + torch.randn_like(logits) * F.softplus(F.linear(x, self.noise.weight.float()))
        softmax, norm = cfg.router_score == 'softmax', cfg.renormalises()
        scores = noisy.softmax(dim=-1) if softmax else noisy.sigmoid()
        chosen = None  # the chosen logits, where a softmax of them is the weights
        if self.expert_bias is not None:  # the bias only selects
            topk_idx = (scores + self.expert_bias).topk(cfg.top_k, dim=-1).indices
            chosen = noisy.gather(1, topk_idx) if softmax and norm else None
        # softmax keeps the order of the logits (and keeps ties that its rounding would make apart)
        elif softmax:
            chosen, topk_idx = noisy.topk(cfg.top_k, dim=-1)
        else:
            topk_idx = scores.topk(cfg.top_k, dim=-1).indices
        if softmax and norm:
            topk_weight = chosen.softmax(dim=-1)
        else:
            topk_weight = scores.gather(1, topk_idx)
            if norm:
                topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        if cfg.route_scale != 1.0:
            topk_weight = topk_weight * cfg.route_scale
        probs = scores if softmax else scores / scores.sum(dim=-1, keepdim=True)
        counts = count_per_expert(topk_idx, cfg.n_expert)
        return Routing(topk_idx, topk_weight, logits, probs, counts,
                       load_balance_loss(probs, topk_idx, counts), router_z_loss(logits))


def count_per_expert(topk_idx, n_expert):
    """Token-slots routed to each expert (int64 [n_expert]); static shape, unlike bincount."""
    flat = topk_idx.flatten()
    return torch.zeros(n_expert, dtype=torch.long,
                       device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balance_loss(probs, topk_idx, counts=None):
    """Switch Transformer balance loss of ONE layer: n_expert * sum_i f_i * P_i, with f_i the fraction
    of token-slots sent to expert i and P_i the mean of the FULL softmax probability of expert i.
    1.0 at perfect balance, n_expert when every token picks the same expert. `counts` (slots per expert)
    replaces topk_idx's own when f_i is measured over more tokens (aux_loss_scope='global')."""
    n_expert = probs.size(-1)
    counts = count_per_expert(topk_idx, n_expert) if counts is None else counts
    f = counts.float() / counts.sum()
    P = probs.mean(dim=0)
    return n_expert * torch.dot(f, P)


def sequence_balance_loss(probs, topk_idx):
    """DeepSeek-V3's sequence-wise balance loss: load_balance_loss within each sequence, averaged over the
    sequences. probs [B, T, n_expert], topk_idx [B, T, k]."""
    B, n_expert = probs.size(0), probs.size(-1)
    idx = topk_idx.reshape(B, -1)
    counts = torch.zeros(B, n_expert, device=probs.device).scatter_add_(
        1, idx, torch.ones(idx.shape, device=idx.device))
    f = counts / counts.sum(dim=1, keepdim=True)
    return n_expert * (f * probs.mean(dim=1)).sum(dim=1).mean()


def router_z_loss(logits):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def summed_over_ranks(t):
    """t summed over all DDP processes (t itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t

# -----------------------------------------------------------------------------
# Dispatch helpers


def sort_by_expert(topk_idx, n_expert):
    """Order the N*k token-slots by expert, stably (tokens keep their order within an expert).
    Returns the slot order, the token of each sorted slot, and the slot count of each expert."""
    order = torch.argsort(topk_idx.flatten(), stable=True)
    return order, order // topk_idx.size(1), count_per_expert(topk_idx, n_expert)


def combine(out, topk_weight, slot, token, n_tokens):
    """Weight each slot's expert output by its router weight and sum a token's slots, in float32."""
    y = torch.zeros(n_tokens, out.size(1), dtype=torch.float32, device=out.device)
    return y.index_add_(0, token, out.float() * topk_weight.flatten().index_select(0, slot)[:, None])


def compute_dtype(x):
    """The dtype the expert GEMMs run in: autocast's when it is on (as nn.Linear's would), else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

# -----------------------------------------------------------------------------
# Experts: weights of every expert of a layer stacked on dim 0, named after the dense MLP's


class Experts(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        E, d, h = config.n_expert, config.n_embd, config.expert_hidden
        w = 2 * h if config.mlp == 'swiglu' else h  # swiglu: the gate and up projections side by side
        self.c_fc = nn.Parameter(torch.empty(E, d, w))    # expert e computes x @ c_fc[e]
        self.c_proj = nn.Parameter(torch.empty(E, h, d))
        self.c_fc_bias = nn.Parameter(torch.zeros(E, w)) if config.bias else None
        self.c_proj_bias = nn.Parameter(torch.zeros(E, d)) if config.bias else None

    def forward(self, x, e=slice(None)):
        """The dense MLP with expert weights: every expert on its rows, x [E, C, d] -> [E, C, d] (batched
        matmuls), or expert e alone, x [n, d] -> [n, d]."""
        h = x @ self.c_fc[e]
        if self.c_fc_bias is not None:
            h = h + self.c_fc_bias[e].unsqueeze(-2)
        out = activation(h, self.config.mlp) @ self.c_proj[e]
        return out + self.c_proj_bias[e].unsqueeze(-2) if self.c_proj_bias is not None else out

# -----------------------------------------------------------------------------
# Expert backends: backend(x, topk_idx, topk_weight, experts) -> (y, drop_fraction)
# A backend with position_major = True drops slots over a capacity, in token order: MoE gives it the
# tokens position-major (t * B + b), so a token only loses its place to tokens at the same or earlier
# positions (causal). The others take the batch's own order (b * T + t), which costs no copy.


def loop_experts(x, topk_idx, topk_weight, experts):
    """The reference: for each expert, gather its tokens, run the MLP, weight, scatter-add back."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(experts.c_fc.size(0)):
        token, slot = torch.where(topk_idx == e)  # an empty expert still runs (on 0 rows), so every
        out = experts(x[token], e)                # parameter gets a gradient, as DDP expects
        y.index_add_(0, token, out.float() * topk_weight[token, slot, None])
    return y.to(x.dtype), 0.0


def grouped_mlp(x_sorted, counts, experts):
    """The expert MLPs on rows sorted by expert (counts[e] rows for expert e), as two grouped GEMMs,
    in compute_dtype (grouped_mm is not on autocast's list everywhere, so the casts are explicit).
    grouped_mm's backward rejects stride-0 gradients (a bare out.sum() gives one): callers weigh
    the output by the router weights first (combine), whose backward hands it a dense gradient."""
    dtype = compute_dtype(x_sorted)
    if x_sorted.size(0) == 0:  # grouped_mm rejects empty inputs; a plain matmul keeps the autograd graph
        return experts(x_sorted, 0).to(dtype)
    offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group (grouped_mm wants int32)
    c_fc, c_proj, c_fc_bias = experts.c_fc.to(dtype), experts.c_proj.to(dtype), experts.c_fc_bias
    (E, h, d), halves = c_proj.shape, c_fc.size(2) // c_proj.size(1)  # halves: 2 for swiglu (gate, up)
    pad_d, pad_h = -d % (16 // c_fc.element_size()), -h % (16 // c_fc.element_size())
    # grouped_mm wants row strides in multiples of 16 bytes: zero-pad (gelu(0) = silu(0) = 0)
    if pad_d or pad_h:
        # (swiglu's gate and up halves are padded each, so that they still pair up)
        c_fc = F.pad(c_fc.view(E, d, halves, h), (0, pad_h, 0, 0, 0, pad_d)).flatten(2)
        c_proj = F.pad(c_proj, (0, pad_d, 0, pad_h))
        if c_fc_bias is not None:
            c_fc_bias = F.pad(c_fc_bias.view(E, halves, h), (0, pad_h)).flatten(1)
    x_sorted = x_sorted.to(dtype)
    h = grouped_mm(F.pad(x_sorted, (0, pad_d)) if pad_d else x_sorted, c_fc, offs)
    if experts.c_fc_bias is not None or experts.c_proj_bias is not None:
        expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                                output_size=x_sorted.size(0))
    if c_fc_bias is not None:
        h = h + c_fc_bias.to(dtype).index_select(0, expert_of_row)
    out = grouped_mm(activation(h, experts.config.mlp), c_proj, offs)[:, :d]
    if experts.c_proj_bias is not None:
        out = out + experts.c_proj_bias.to(dtype).index_select(0, expert_of_row)
    return out


def cpu_kernel_available():
    """moe_kernels/cpu_grouped_mm.cpp built and loaded (never in an exported folder, where the import of
    moe_kernels left None: hf/__init__.py). torch.compile cannot trace a build: it reads the answer of an
    eager call before it (train.py and bench.py make one), else takes torch's ops."""
    if cpu_grouped_mm is None:
        return False
    return bool(cpu_grouped_mm._built) if torch.compiler.is_compiling() else cpu_grouped_mm.available()


def fused_experts(x, topk_idx, topk_weight, experts):
    """grouped_experts as one op forward and one backward (moe_kernels/fused.py, on the CPU kernel): the rows
    gathered by expert, both GEMMs with the activation between, the router-weighted sum in float32."""
    dtype, out_dtype = compute_dtype(x), x.dtype
    tensors = (x, experts.c_fc, experts.c_fc_bias, experts.c_proj, experts.c_proj_bias)
    if any(t is not None and t.dtype != dtype for t in tensors):  # autocast, or another dtype: cast
        tensors = [None if t is None else t.to(dtype) for t in tensors]
    x, c_fc, c_fc_bias, c_proj, c_proj_bias = tensors
    return fused_experts_op(x, topk_idx, topk_weight, c_fc, c_fc_bias, c_proj, c_proj_bias,
                            experts.config.mlp)[0].to(out_dtype)


def grouped_experts(x, topk_idx, topk_weight, experts):
    """Dropless: sort token-slots by expert, then one grouped GEMM per layer of the expert MLP. An expert
    without tokens is an empty group: its weights get a zero gradient, so DDP sees every parameter used.
    On the CPU where moe_kernels/cpu_grouped_mm.cpp builds, all of it is one op (fused_experts)."""
    if x.device.type == 'cpu' and cpu_kernel_available():
        return fused_experts(x, topk_idx, topk_weight, experts), 0.0
    order, token, counts = sort_by_expert(topk_idx, experts.c_fc.size(0))
    # index_select rather than x[token]: its backward is a fast index_add, not an accumulating index_put
    out = grouped_mlp(x.index_select(0, token), counts, experts)
    return combine(out, topk_weight, order, token, x.size(0)).to(x.dtype), 0.0


def table_experts(x, token, weight, experts):
    """Experts that each run the same number C of rows: token [E, C] says which token fills each row
    (N: a zero row), weight [E, C] its router weight. One batched MLP (Experts.forward), no padding
    beyond the table's; returns y [N, d] in float32."""
    token = token.flatten()
    x_pad = F.pad(x, (0, 0, 0, 1))  # row N is zeros: empty places read it and add to a row dropped here
    # index_select rather than x[token]: its backward is a fast index_add, not an accumulating index_put
    out = experts(x_pad.index_select(0, token).view(*weight.shape, x.size(1))).flatten(0, 1)
    return combine(out, weight, torch.arange(token.numel(), device=x.device), token, x.size(0) + 1)[:-1]


def batched_experts(x, topk_idx, topk_weight, experts):
    """Capacity-based (GShard/Switch): every expert gets the same number of slots,
    capacity = ceil(capacity_factor * N * k / n_expert), and runs as one batched matmul.
    Slots claim places in token order, then slot order (position_major: see above).
    A dropped slot contributes nothing: its token is carried by the residual connection."""
    N, k = topk_idx.shape
    E = experts.c_fc.size(0)
    capacity = math.ceil(experts.config.capacity_factor * N * k / E)
    flat = topk_idx.flatten()
    onehot = F.one_hot(flat, E)
    place = (onehot.cumsum(0) * onehot).sum(1) - 1  # how many earlier slots chose the same expert
    keep = place < capacity
    # every expert gets one extra place where all its dropped slots land; that place is never run
    row = flat * (capacity + 1) + place.clamp(max=capacity)
    token = torch.full((E * (capacity + 1),), N, dtype=torch.long, device=x.device).index_put_(
        (row,), torch.arange(N * k, device=x.device) // k)
    weight = topk_weight.new_zeros(E * (capacity + 1)).index_put((row,), topk_weight.flatten())
    y = table_experts(x, token.view(E, -1)[:, :capacity], weight.view(E, -1)[:, :capacity], experts)
    return y.to(x.dtype), (~keep).sum() / keep.numel()


batched_experts.position_major = True


def triton_experts(x, topk_idx, topk_weight, experts):
    """MegaBlocks-style block-sparse kernels; see moe_kernels/moe_triton.py (imported on first use)."""
    from moe_kernels import moe_triton
    return moe_triton.triton_experts(x, topk_idx, topk_weight, experts)


EXPERT_IMPLS = {'loop': loop_experts, 'grouped': grouped_experts, 'batched': batched_experts,
                'triton': triton_experts}


def expert_choice(probs, top_k):
    """Expert choice (Zhou et al. 2022), in training: each expert takes the capacity =
    ceil(top_k * N / n_expert) tokens that give it the highest probability, so every expert runs exactly
    `capacity` tokens and a token gets 0..n_expert experts (top_k on average: the FLOPs of top-k routing).
    Returns the table_experts table: token [n_expert, capacity] and its weight, the raw probability, and the
    fraction of tokens that no expert took. Non-causal: a token's experts depend on all tokens of the batch,
    so eval routes per token instead."""
    N, E = probs.shape
    weight, token = probs.t().topk(min(N, math.ceil(top_k * N / E)), dim=1)
    taken = torch.zeros(N, dtype=torch.bool, device=probs.device).index_fill_(0, token.flatten(), True)
    return token, weight, 1 - taken.float().mean()


def as_rows(x, position_major):
    """x [B, T, ...] as rows [B * T, ...]: batch-major (b * T + t), or position-major (t * B + b) for the
    backends that drop over capacity in token order (see the backends)."""
    return (x.transpose(0, 1) if position_major else x).flatten(0, 1)


def from_rows(rows, B, T, position_major):
    """as_rows's inverse: rows [B * T, ...] -> [B, T, ...], contiguous (as x is)."""
    return (rows.unflatten(0, (T, B)).transpose(0, 1).contiguous() if position_major
            else rows.unflatten(0, (B, T)))

# -----------------------------------------------------------------------------
# The MoE layer


class MoE(nn.Module):
    """Drop-in for MLP: routes each token to top_k experts (with expert_choice, in training, each expert to
    its tokens), plus n_shared_expert shared experts that every token passes through. After each forward it
    holds its own aux-loss terms (balance_loss, z_loss) and routing stats (tokens_per_expert, drop_fraction,
    probs, topk_idx): record() below; its probe_top1 (the top-1 experts of the last probe_routing batch) is
    saved in checkpoints as the module's extra state."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = Experts(config)
        # DeepSeekMoE: n shared experts of expert_hidden each are one MLP of n * expert_hidden
        self.shared = MLP(config,
                          config.n_shared_expert * config.expert_hidden) if config.n_shared_expert else None
        self.dropout = nn.Dropout(config.dropout)
        # None: EXPERT_IMPLS[config.expert_impl]; expert parallelism puts its dispatch here
        self.backend = None
        self.step_counts = None  # this rank's token-slots per expert over the optimizer step so far
        self.probe_top1 = None
        # recompute the experts' activations in backward (set_activation_checkpointing)
        self.checkpoint = False

    def forward(self, x):
        cfg, (B, T, C) = self.config, x.shape
        backend = self.backend or EXPERT_IMPLS[cfg.expert_impl]
        position_major = getattr(backend, 'position_major', False)
        x_rows = as_rows(x, position_major)
        r = self.router(x_rows)
        # the experts (not the router, whose forward has effects:
        # the step's loads) may be recomputed in backward
        run = checkpointed if self.checkpoint else (lambda fn, *args: fn(*args))
        keep = None  # expert dropout: inverted dropout, one coin per whole expert
        if self.training and cfg.expert_dropout > 0:
            keep = (torch.rand(cfg.n_expert,
                               device=x.device) >= cfg.expert_dropout).float() / (1 - cfg.expert_dropout)
        counts = None  # the slots each expert runs: None, the router's (r.counts)
        if self.training and cfg.expert_choice:  # experts pick their tokens: a table
            token, weight, drop_fraction = expert_choice(r.probs, cfg.top_k)
            y = run(table_experts, x_rows, token, weight if keep is None else weight * keep[:, None],
                    self.experts)
            counts = torch.full((cfg.n_expert,), token.size(1), dtype=torch.long, device=x.device)
        else:
            weight = r.topk_weight if keep is None else r.topk_weight * keep[r.topk_idx]
            y, drop_fraction = run(backend, x_rows, r.topk_idx, weight, self.experts)
        self.record(r, drop_fraction, lambda rows: from_rows(rows, B, T, position_major), counts)
        y = self.dropout(from_rows(y.to(x.dtype), B, T, position_major))
        return y if self.shared is None else y + run(self.shared, x)

    def record(self, r, drop_fraction, by_sequence, counts=None):
        """This forward's aux losses and routing stats, and the step's loads (in training), kept on the layer
        for MoEGPT. r: the router's Routing, its rows in the backend's order; by_sequence([B*T, ...]) gives
        [B, T, ...] in x's order; counts: the slots each expert ran where not the router's (expert choice)."""
        cfg = self.config
        balance_counts = counts  # None: the router's own loads, and its balance loss stands
        counts = r.counts if counts is None else counts
        if self.training:
            self.step_counts = counts if self.step_counts is None else self.step_counts + counts
            if cfg.aux_loss_scope == 'global':
                # Qwen-style global-batch balancing: f_i over every micro-batch of this step so far, on
                # every rank (the step's last micro-batch sees the whole global batch); P_i stays local
                balance_counts = summed_over_ranks(self.step_counts)
        if cfg.aux_loss_scope == 'sequence':
            self.balance_loss = sequence_balance_loss(by_sequence(r.probs), by_sequence(r.topk_idx))
        elif balance_counts is None:
            self.balance_loss = r.balance_loss
        else:
            self.balance_loss = load_balance_loss(r.probs, r.topk_idx, balance_counts)
        self.z_loss = r.z_loss
        self.tokens_per_expert, self.drop_fraction = counts, drop_fraction
        self.probs = r.probs.detach()  # for routing_stats' entropy, computed only when asked for
        self.topk_idx = by_sequence(r.topk_idx).flatten(0, 1)  # [token (b * T + t), choice]

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # checkpoints from before the layer kept its probe
        state_dict.setdefault(prefix + '_extra_state', None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def get_extra_state(self):  # a tensor always (empty: none yet), so that a state_dict holds tensors only
        return torch.zeros(0, dtype=torch.long) if self.probe_top1 is None else self.probe_top1

    def set_extra_state(self, state):
        self.probe_top1 = state if state is not None and state.numel() else None

# -----------------------------------------------------------------------------
# The model


class MoEGPT(GPT):
    """GPT whose MoE layers (every moe_every-th block) route tokens to experts."""

    def make_mlp(self, layer_idx):
        return MoE(self.config) if self.config.is_moe_layer(layer_idx) else MLP(self.config)

    def moe_layers(self):
        """{block index: MoE layer}: the 'layer{i}' of logged stats is the block index."""
        return {i: block.mlp for i, block in enumerate(self.transformer.h) if isinstance(block.mlp, MoE)}

    def set_expert_impl(self, expert_impl):
        """Switch backend in place: all backends share the same parameters."""
        if expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl={expert_impl!r} is unknown; allowed: {', '.join(EXPERT_IMPLS)}")
        self.config.expert_impl = expert_impl  # the layers read the model's config

    def set_activation_checkpointing(self, mode):
        """As GPT's, but an MoE block is not recomputed whole: its router's forward has effects (the step's
        loads, which 'global' balancing sums over ranks), so there the attention is recomputed alone ('all')
        and the MoE layer recomputes its experts, routed and shared ('moe' and 'all')."""
        super().set_activation_checkpointing(mode)
        for i, layer in self.moe_layers().items():
            self.transformer.h[i].checkpoint = 'attn' if mode == 'all' else None
            layer.checkpoint = mode != 'none'

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Experts):
            # same std as the dense MLP, with GPT-2's 1/sqrt(2*n_layer) on the residual projection
            torch.nn.init.normal_(module.c_fc, mean=0.0, std=0.02)
            torch.nn.init.normal_(module.c_proj, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def aux_loss(self):
        # each term is computed per layer (never pooled over layers), then averaged over layers
        layers = self.moe_layers().values()
        balance = torch.stack([layer.balance_loss for layer in layers]).mean()
        z = torch.stack([layer.z_loss for layer in layers]).mean()
        self.loss_terms.update(aux=balance.detach(), z=z.detach())
        return self.config.aux_loss_coef * balance + self.config.z_loss_coef * z

    def get_num_params(self, non_embedding=True, active=False):
        n_params = super().get_num_params(non_embedding)
        if active:  # a token only runs top_k of each layer's experts (of this rank's shard, under EP)
            for layer in self.moe_layers().values():
                n_local = layer.experts.c_fc.size(0)
                per_expert = sum(p.numel() for p in layer.experts.parameters()) // n_local
                n_params -= per_expert * (n_local - self.config.top_k)
        return n_params

    def routing_stats(self):
        """Per MoE layer: fraction of token-slots per expert and max/mean load, of the last optimizer step
        (all its micro-batches, this rank's; after end_step) or else of the last forward; and of the last
        forward, mean router entropy (nats; log(n_expert) is uniform) and dropped fraction (of slots; with
        expert choice in training, of tokens no expert took)."""
        stats = {}
        for i, layer in self.moe_layers().items():
            load = layer.tokens_per_expert.float()
            stats[f'layer{i}/load'] = (load / load.sum()).tolist()
            stats[f'layer{i}/max_load'] = (load.max() / load.mean()).item()
            stats[f'layer{i}/entropy'] = torch.special.entr(layer.probs).sum(-1).mean().item()
            stats[f'layer{i}/drop_fraction'] = float(layer.drop_fraction)
        return stats

    @torch.no_grad()
    def probe_routing(self, idx):
        """Routing on the fixed probe batch idx, per MoE layer, in eval mode (no noise): the dead-expert
        fraction (experts given under 10% of the uniform share of its token-slots) and the flip rate (the
        fraction of its tokens whose top-1 expert changed since the previous call; none on the first)."""
        training = self.training
        self.eval()
        self(idx)
        self.train(training)
        stats = {}
        for i, layer in self.moe_layers().items():
            share = layer.tokens_per_expert.float() / layer.tokens_per_expert.sum()
            stats[f'layer{i}/dead_fraction'] = (share < 0.1 / self.config.n_expert).float().mean().item()
            top1, previous = layer.topk_idx[:, 0].clone(), layer.probe_top1
            # (a resumed run may have another batch size)
            if previous is not None and previous.shape == top1.shape:
                stats[f'layer{i}/flip_rate'] = (top1 != previous.to(top1.device)).float().mean().item()
            layer.probe_top1 = top1.cpu()
        return stats

    @torch.no_grad()
    def diagnose(self, idx):
        """For the divergence guard's post-mortem: the routing stats of the last forward, and per MoE
        layer the router's weight and aux losses, then its logits on idx, re-run in eval mode (no
        dropout, so no RNG is consumed)."""
        stats, hooks = self.routing_stats(), []
        for i, layer in self.moe_layers().items():
            w = layer.router.gate.weight
            stats[f'layer{i}/gate_weight_norm'] = w.float().norm().item()
            stats[f'layer{i}/gate_weight_finite'] = bool(torch.isfinite(w).all())
            stats[f'layer{i}/z_loss'] = float(layer.z_loss)
            stats[f'layer{i}/balance_loss'] = float(layer.balance_loss)

            def hook(module, args, out, i=i):
                logits = out[2]
                finite = torch.isfinite(logits)
                stats[f'layer{i}/router_logits_finite'] = finite.float().mean().item()
                if finite.any():
                    stats[f'layer{i}/router_logits_absmax'] = logits[finite].abs().max().item()
                    stats[f'layer{i}/router_logits_std'] = logits[finite].float().std().item()
            hooks.append(layer.router.register_forward_hook(hook))
        training = self.training
        self.eval()
        self(idx)
        self.train(training)
        for h in hooks:
            h.remove()
        return stats

    @torch.no_grad()
    def end_step(self, skipped=False):
        """Once per optimizer step, after its last micro-batch: with router_bias (aux_free, deepseek_v3) each
        expert's selection bias moves by bias_update_rate against its load error over the step's global
        batch (DeepSeek-V3: overloaded experts down, underloaded up), minus the mean move, so that the
        biases keep mean 0 and cannot drift together (a common shift picks the same experts); not for a
        skipped step. The step's loads (this rank's) become tokens_per_expert, for routing_stats, and
        restart."""
        for layer in self.moe_layers().values():
            if layer.step_counts is None:
                continue
            if layer.router.expert_bias is not None and not skipped:
                load = summed_over_ranks(layer.step_counts).float()
                move = self.config.bias_update_rate * torch.sign(load.mean() - load)
                layer.router.expert_bias += move - move.mean()
            layer.tokens_per_expert, layer.step_counts = layer.step_counts, None

# -----------------------------------------------------------------------------
# Building a model from its keys (the one place that picks the class)

NANOGPT_KEYS = ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'dropout', 'bias')  # its GPTConfig
MODEL_KEYS = keys_of(MoEConfig)  # every key a checkpoint's model_args may hold (model.key says what each is)
SHAPE_KEYS = keys_of(MoEConfig, 'shape')  # fixed by the weights
TRAIN_KEYS = keys_of(MoEConfig, 'train')  # the run's own, whatever the weights were trained with
EXPORTED_KEYS = keys_of(MoEConfig, 'shape', 'forward')  # what a model is, wherever it goes (Hugging Face)


def model_config(model_args):
    """GPTConfig when n_expert is 0 (or absent), else MoEConfig; ValueError names a bad key."""
    if model_args.get('n_expert', 0) == 0:
        dense_keys = {f.name for f in fields(GPTConfig)}
        return GPTConfig(**{k: v for k, v in model_args.items() if k in dense_keys})
    return MoEConfig(**model_args)


def build_model(model_args):
    """GPT or MoEGPT, as model_config says."""
    config = model_config(model_args)
    return MoEGPT(config) if isinstance(config, MoEConfig) else GPT(config)


def model_args_of(model):
    """The constructor arguments of a model, for checkpoints (build_model inverts this). A dense GPT-2-block
    model's are nanoGPT's GPTConfig keys alone, so that nanoGPT's GPTConfig(**model_args) reads them too:
    the block's keys only where they differ from GPT-2's (their defaults)."""
    args = asdict(model.config)
    if isinstance(model.config, MoEConfig):
        return args
    defaults = GPTConfig(n_embd=args['n_embd'], n_head=args['n_head'])  # (mlp_hidden, n_kv_head: from these)
    return {k: v for k, v in args.items() if k in NANOGPT_KEYS or v != getattr(defaults, k)}
