"""
Mixture-of-Experts GPT: model.py's dense GPT with routed experts in place of (some of) its MLPs.

Reading order: MoEConfig -> Router (fp32 logits, top-k; or noisy top-k, expert choice, aux-loss-free
bias) and the two aux losses -> dispatch helpers
-> Experts (weights stacked [n_expert, ...]) -> expert backends, one function signature each:
    backend(x [N, d], topk_idx [N, k], topk_weight [N, k], experts) -> (y [N, d], n_dropped slots)
  'loop'     the reference: a for-loop over experts. Simple, slow.
  'grouped'  dropless: sort token-slots by expert, two grouped GEMMs (torch grouped_mm; on the CPU
             cpu_grouped_mm's, which runs the experts side by side).
  'batched'  capacity-based (GShard/Switch): fixed slots per expert, overflow dropped, one bmm.
  'triton'   MegaBlocks-style block-sparse kernels (moe_triton.py, optional dependency).
-> expert parallelism (training with expert_parallel > 1: grouped, with the slots sent to the rank that
owns their expert by all-to-all; expert_parallel.py does the sharding) -> expert choice (each expert
picks its tokens, training only) -> MoE (drop-in for MLP, optional shared experts, keeps its aux terms
and routing stats on the module) -> MoEGPT(GPT).
"""

import math
import importlib.util
import warnings
from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
import torch.distributed as dist
from torch.nn import functional as F

import cpu_grouped_mm
from model import GPT, GPTConfig, MLP


@dataclass
class MoEConfig(GPTConfig):
    n_expert: int = 8            # experts per MoE layer
    top_k: int = 2               # experts each token is sent to
    expert_hidden: int = 0       # hidden size of one expert; 0 means 4 * n_embd, like the dense MLP
    moe_every: int = 1           # every moe_every-th block is MoE (1: all; 2: every other, as in Switch)
    expert_impl: str = 'grouped' # one of EXPERT_IMPLS below; all share the same parameters
    aux_loss_coef: float = 0.01  # weight of the Switch load-balancing loss
    z_loss_coef: float = 0.001   # weight of the ST-MoE router z-loss
    capacity_factor: float = 1.25  # capacity backends only: slots per expert = cf * tokens * top_k / n_expert
    router: str = 'topk'         # one of ROUTERS below: 'topk', 'noisy_topk', 'expert_choice', 'aux_free'
    router_temperature: float = 1.0  # softmax temperature of the router
    router_jitter: float = 0.0   # training only: router input times U(1 - jitter, 1 + jitter) (Switch)
    bias_update_rate: float = 0.001  # router='aux_free': per-step change of an expert's selection bias
    n_shared_expert: int = 0     # experts of expert_hidden that every token passes through (DeepSeekMoE)
    n_dense_layers: int = 0      # the first n_dense_layers blocks keep a dense MLP (DeepSeekMoE)
    expert_dropout: float = 0.0  # training only: each whole expert is dropped with this probability
    aux_loss_scope: str = 'micro'  # balance-loss loads f_i over the 'micro'-batch or the 'global' batch

    def __post_init__(self):
        super().__post_init__()
        if self.expert_hidden == 0:
            self.expert_hidden = 4 * self.n_embd
        for key in ('n_expert', 'top_k', 'expert_hidden', 'moe_every'):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} must be a positive integer")
        if self.top_k > self.n_expert:
            raise ValueError(f"top_k={self.top_k} must be <= n_expert={self.n_expert}")
        if self.moe_every > self.n_layer:
            raise ValueError(f"moe_every={self.moe_every} must be <= n_layer={self.n_layer}, else no layer is MoE")
        if self.expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl={self.expert_impl!r} is unknown; allowed: {', '.join(EXPERT_IMPLS)}")
        if self.expert_impl == 'triton' and importlib.util.find_spec('triton') is None:
            raise ValueError("expert_impl='triton' needs the triton package (pip install triton); "
                             f"other choices: {', '.join(k for k in EXPERT_IMPLS if k != 'triton')}")
        if self.expert_impl == 'triton' and self.expert_hidden % 16:
            raise ValueError(f"expert_impl='triton' needs expert_hidden divisible by 16, got {self.expert_hidden}")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")
        for key in ('aux_loss_coef', 'z_loss_coef', 'bias_update_rate'):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is unknown; allowed: {', '.join(ROUTERS)}")
        if self.aux_loss_scope not in ('micro', 'global'):
            raise ValueError(f"aux_loss_scope={self.aux_loss_scope!r} is unknown; allowed: micro, global")
        if self.router_temperature <= 0:
            raise ValueError(f"router_temperature={self.router_temperature} must be > 0")
        for key in ('router_jitter', 'expert_dropout'):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key}={getattr(self, key)} must be in [0, 1)")
        for key in ('n_shared_expert', 'n_dense_layers'):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be a non-negative integer")
        if not any(self.is_moe_layer(i) for i in range(self.n_layer)):
            raise ValueError(f"n_dense_layers={self.n_dense_layers} with moe_every={self.moe_every} leaves no MoE "
                             f"layer among n_layer={self.n_layer}")

    def is_moe_layer(self, layer_idx):
        return layer_idx >= self.n_dense_layers and (layer_idx + 1) % self.moe_every == 0


def build_model(model_args):
    """GPT when n_expert is 0 (or absent), else MoEGPT: the one place that picks the class."""
    if model_args.get('n_expert', 0) == 0:
        dense_keys = {f.name for f in fields(GPTConfig)}
        return GPT(GPTConfig(**{k: v for k, v in model_args.items() if k in dense_keys}))
    return MoEGPT(MoEConfig(**model_args))


def model_args_of(model):
    """The constructor arguments of a model, for checkpoints (build_model inverts this)."""
    return {**asdict(model.config), 'n_expert': getattr(model.config, 'n_expert', 0)}

# -----------------------------------------------------------------------------
# Router and auxiliary losses


ROUTERS = ('topk', 'noisy_topk', 'expert_choice', 'aux_free')


class Router(nn.Module):
    """A bias-free linear gate: softmax over all experts (logits / router_temperature), then each token
    keeps its top_k. config.router picks a variant:
      'topk'           just that (Switch, GShard, Mixtral).
      'noisy_topk'     Shazeer et al. 2017: in training, N(0, 1) * softplus(x @ W_noise) is added to the
                       logits before softmax and top-k; W_noise is learned. No noise in eval.
      'expert_choice'  Zhou et al. 2022: in training each expert picks its tokens (expert_choice() below,
                       called by MoE.forward); this forward is the per-token top-k that eval uses.
      'aux_free'       DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias is added to the
                       probabilities to pick the top-k, but not to the weights; MoEGPT.end_step() moves
                       it against each expert's load error after every optimizer step.
    router_jitter > 0 (Switch): in training the router input is multiplied by U(1 - jitter, 1 + jitter)."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.noise = nn.Linear(config.n_embd, config.n_expert, bias=False) if config.router == 'noisy_topk' else None
        # a buffer, not a parameter: it gets no gradient, but is saved in checkpoints
        self.register_buffer('expert_bias', torch.zeros(config.n_expert) if config.router == 'aux_free' else None)
        self.top_k, self.temperature, self.jitter = config.top_k, config.router_temperature, config.router_jitter
        self.renormalise = config.top_k > 1 and config.router != 'expert_choice'

    def forward(self, x):
        # routing flips on tiny logit differences, so logits and softmax run in float32, autocast off
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
            logits = F.linear(x, self.gate.weight.float())
            if self.temperature != 1.0:
                logits = logits / self.temperature
            noisy = logits  # the z-loss sees the clean logits
            if self.training and self.noise is not None:
                noisy = logits + torch.randn_like(logits) * F.softplus(F.linear(x, self.noise.weight.float()))
        probs = noisy.softmax(dim=-1)
        if self.expert_bias is None:  # softmax keeps the order: the top-k logits are the top-k probabilities
            chosen_logits, topk_idx = noisy.topk(self.top_k, dim=-1)
        else:  # the bias only selects
            topk_idx = (probs + self.expert_bias).topk(self.top_k, dim=-1).indices
            chosen_logits = noisy.gather(1, topk_idx)
        if self.renormalise:
            # renormalised over the chosen experts, p_i / sum_j p_j, which is a softmax of their logits.
            # With k=1 that would make every weight 1.0 and cut the router off from the language-model
            # gradient, so k=1 keeps the raw probability. Expert choice keeps raw probabilities too: that
            # is how its training weighs experts
            topk_weight = chosen_logits.softmax(dim=-1)
        else:
            topk_weight = probs.gather(1, topk_idx)
        return topk_idx, topk_weight, logits, probs


def count_per_expert(topk_idx, n_expert):
    """Token-slots routed to each expert (int64 [n_expert]); static shape, unlike bincount."""
    flat = topk_idx.flatten()
    return torch.zeros(n_expert, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


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

# -----------------------------------------------------------------------------
# Experts: weights of every expert of a layer stacked on dim 0, named after the dense MLP's


class Experts(nn.Module):

    def __init__(self, config):
        super().__init__()
        E, d, h = config.n_expert, config.n_embd, config.expert_hidden
        self.c_fc = nn.Parameter(torch.empty(E, d, h))    # expert e computes x @ c_fc[e]
        self.c_proj = nn.Parameter(torch.empty(E, h, d))
        self.c_fc_bias = nn.Parameter(torch.zeros(E, h)) if config.bias else None
        self.c_proj_bias = nn.Parameter(torch.zeros(E, d)) if config.bias else None
        self.capacity_factor = config.capacity_factor
        self.ep_group = None  # under expert parallelism: the process group this layer's experts are sharded over
        self.ep_dispatch = None  # ... and expert_parallel_experts, as expert_parallel.shard_experts sets it
        self.a2a_bytes = 0    # under expert parallelism: bytes the last forward sent to other ranks

    def forward_one(self, e, x):
        """Expert e on rows x: the dense MLP with this expert's weights."""
        h = x @ self.c_fc[e]
        if self.c_fc_bias is not None:
            h = h + self.c_fc_bias[e]
        out = F.gelu(h) @ self.c_proj[e]
        return out + self.c_proj_bias[e] if self.c_proj_bias is not None else out

# -----------------------------------------------------------------------------
# Expert backends: backend(x, topk_idx, topk_weight, experts) -> (y, n_dropped)


def loop_experts(x, topk_idx, topk_weight, experts):
    """The reference: for each expert, gather its tokens, run the MLP, weight, scatter-add back."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(experts.c_fc.size(0)):
        token, slot = torch.where(topk_idx == e)  # an empty expert still runs (on 0 rows), so every
        out = experts.forward_one(e, x[token])    # parameter gets a gradient, as DDP expects
        y.index_add_(0, token, out.float() * topk_weight[token, slot, None])
    return y.to(x.dtype), 0


_grouped_mm = getattr(F, 'grouped_mm', None) or getattr(torch, '_grouped_mm', None)


def grouped_mm(a, b, offs):
    """torch's grouped GEMM; on the CPU cpu_grouped_mm's, which runs the groups side by side (faster: see
    that file). torch.compile traces torch's in bfloat16 only (torch 2.13's shape function rejects other
    dtypes) and cannot trace the CPU one, so those run eagerly under compile: a graph break, not a crash."""
    if torch.compiler.is_compiling() and (a.dtype != torch.bfloat16 or a.device.type == 'cpu'):
        return torch.compiler.disable(grouped_mm)(a, b, offs)
    if a.device.type == 'cpu' and cpu_grouped_mm.available():
        return cpu_grouped_mm.GroupedMM.apply(a, b, offs)
    return _grouped_mm(a, b, offs=offs)


def grouped_experts(x, topk_idx, topk_weight, experts):
    """Dropless: sort token-slots by expert, then one grouped GEMM per layer of the expert MLP."""
    if _grouped_mm is None:
        warnings.warn(f"torch {torch.__version__} has no grouped_mm: expert_impl='grouped' falls back to 'loop'")
        return loop_experts(x, topk_idx, topk_weight, experts)
    order, token, counts = sort_by_expert(topk_idx, experts.c_fc.size(0))
    # index_select rather than x[token]: its backward is a fast index_add, not an accumulating index_put
    out = grouped_mlp(x.index_select(0, token), counts, experts)
    return combine(out, topk_weight, order, token, x.size(0)).to(x.dtype), 0


def compute_dtype(x):
    """The dtype the expert GEMMs run in: autocast's when it is on (as nn.Linear's would), else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def grouped_mlp(x_sorted, counts, experts):
    """The expert MLPs on rows sorted by expert (counts[e] rows for expert e), as two grouped GEMMs,
    in compute_dtype (grouped_mm is not on autocast's list everywhere, so the casts are explicit).
    grouped_mm's backward rejects stride-0 gradients (a bare out.sum() gives one): callers weigh
    the output by the router weights first (combine), whose backward hands it a dense gradient."""
    dtype = compute_dtype(x_sorted)
    if x_sorted.size(0) == 0:  # grouped_mm rejects empty inputs; a plain matmul keeps the autograd graph
        return experts.forward_one(0, x_sorted).to(dtype)
    offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group (grouped_mm wants int32)
    c_fc, c_proj = experts.c_fc.to(dtype), experts.c_proj.to(dtype)
    d, h = c_fc.shape[1:]
    pad_d, pad_h = -d % (16 // c_fc.element_size()), -h % (16 // c_fc.element_size())
    if pad_d or pad_h:  # grouped_mm wants row strides in multiples of 16 bytes: zero-pad (gelu(0) = 0)
        c_fc, c_proj = F.pad(c_fc, (0, pad_h, 0, pad_d)), F.pad(c_proj, (0, pad_d, 0, pad_h))
    x_sorted = x_sorted.to(dtype)
    h = grouped_mm(F.pad(x_sorted, (0, pad_d)) if pad_d else x_sorted, c_fc, offs)
    if experts.c_fc_bias is not None or experts.c_proj_bias is not None:
        expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                                output_size=x_sorted.size(0))
    if experts.c_fc_bias is not None:
        c_fc_bias = F.pad(experts.c_fc_bias, (0, pad_h)) if pad_h else experts.c_fc_bias
        h = h + c_fc_bias.to(dtype).index_select(0, expert_of_row)
    out = grouped_mm(F.gelu(h), c_proj, offs)[:, :d]
    if experts.c_proj_bias is not None:
        out = out + experts.c_proj_bias.to(dtype).index_select(0, expert_of_row)
    return out


def batched_experts(x, topk_idx, topk_weight, experts):
    """Capacity-based (GShard/Switch): every expert gets the same number of slots,
    capacity = ceil(capacity_factor * N * k / n_expert), and runs as one batched matmul.
    Slots claim places in token order (the MoE layer orders tokens position-major, so a token is
    only ever dropped because of tokens at the same or earlier positions: causal), then slot order.
    A dropped slot contributes nothing: its token is carried by the residual connection."""
    N, k = topk_idx.shape
    E = experts.c_fc.size(0)
    capacity = math.ceil(experts.capacity_factor * N * k / E)
    flat = topk_idx.flatten()
    onehot = F.one_hot(flat, E)
    place = (onehot.cumsum(0) * onehot).sum(1) - 1  # how many earlier slots chose the same expert
    keep = place < capacity
    # every expert gets one extra row where all its dropped slots land; that row is never read back
    row = flat * (capacity + 1) + place.clamp(max=capacity)
    token = torch.arange(N * k, device=x.device) // k
    buf = torch.zeros(E * (capacity + 1), x.size(1), dtype=x.dtype, device=x.device)
    buf = buf.index_add(0, row, x.index_select(0, token) * keep[:, None].to(x.dtype)).view(E, capacity + 1, -1)
    h = torch.bmm(buf, experts.c_fc)
    if experts.c_fc_bias is not None:
        h = h + experts.c_fc_bias[:, None, :]
    out = torch.bmm(F.gelu(h), experts.c_proj)
    if experts.c_proj_bias is not None:
        out = out + experts.c_proj_bias[:, None, :]
    slot = torch.arange(N * k, device=x.device)
    y = combine(out.view(-1, x.size(1)).index_select(0, row), topk_weight * keep.view(N, k), slot, token, N)
    return y.to(x.dtype), (~keep).sum()


def triton_experts(x, topk_idx, topk_weight, experts):
    """MegaBlocks-style block-sparse kernels; see moe_triton.py (imported on first use)."""
    from moe_triton import triton_experts as block_sparse_experts
    return block_sparse_experts(x, topk_idx, topk_weight, experts)


EXPERT_IMPLS = {'loop': loop_experts, 'grouped': grouped_experts, 'batched': batched_experts,
                'triton': triton_experts}
CAPACITY_IMPLS = ('batched',)  # the backends that drop slots, so for which the order of the tokens matters

# -----------------------------------------------------------------------------
# Expert parallelism: each rank of an EP group holds a contiguous shard of every MoE layer's experts
# (expert_parallel.py shards the weights and sets experts.ep_group; train.py wires up the groups)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable split sizes whose backward is the reverse all-to-all
    (torch.distributed.nn's differentiable version aborts at exit on gloo)."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad.new_empty(sum(ctx.send_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_x, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_x, None, None, None


def expert_parallel_experts(x, topk_idx, topk_weight, experts):
    """The grouped backend over an EP group: slots sorted by (global) expert are also sorted by the rank
    that owns the expert, so one all-to-all sends each rank its slots (split sizes exchanged first);
    the owner regroups what it received by local expert, runs grouped_mlp, and the reverse all-to-all
    brings the outputs home to be weighted and summed. Same signature as the backends above."""
    group = experts.ep_group
    n_ranks, rank, E_local = dist.get_world_size(group), dist.get_rank(group), experts.c_fc.size(0)
    order, token, counts = sort_by_expert(topk_idx, n_ranks * E_local)
    recv_counts = torch.empty_like(counts)  # [source rank, local expert]: slots coming to this rank
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv_counts = recv_counts.view(n_ranks, E_local)
    send_splits, recv_splits = counts.view(n_ranks, E_local).sum(1).tolist(), recv_counts.sum(1).tolist()
    # slots travel in the GEMMs' dtype (bf16 under autocast: half the bytes of x's float32)
    x_recv = _AllToAll.apply(x.index_select(0, token).to(compute_dtype(x)), send_splits, recv_splits, group)
    # x_recv is ordered by (source rank, local expert): regroup by local expert, stably
    local_expert = torch.arange(E_local, device=x.device).repeat(n_ranks)
    by_expert = torch.argsort(torch.repeat_interleave(local_expert, recv_counts.flatten(), output_size=x_recv.size(0)),
                              stable=True)
    out = grouped_mlp(x_recv.index_select(0, by_expert), recv_counts.sum(0), experts)
    out = out.index_select(0, torch.argsort(by_expert))  # back to (source rank, local expert) order
    out = _AllToAll.apply(out, recv_splits, send_splits, group)
    # bytes this rank sent to other ranks in this forward (the backward sends as many again)
    experts.a2a_bytes = (sum(send_splits) - send_splits[rank] + sum(recv_splits) - recv_splits[rank]) \
        * out.size(1) * out.element_size()
    return combine(out, topk_weight, order, token, x.size(0)).to(x.dtype), 0

# -----------------------------------------------------------------------------
# Expert choice (Zhou et al. 2022): experts pick tokens, instead of tokens picking experts


def expert_choice(probs, top_k):
    """Each expert takes the capacity = ceil(top_k * N / n_expert) tokens that give it the highest
    probability: every expert gets exactly `capacity` tokens, a token gets 0..n_expert experts (top_k
    on average, so the FLOPs match top-k routing). Returns token [n_expert, capacity] and its weight,
    the router probability. Non-causal: a token's experts depend on all tokens of the batch."""
    N, E = probs.shape
    weight, token = probs.t().topk(min(N, math.ceil(top_k * N / E)), dim=1)
    return token, weight


def expert_choice_experts(x, token, weight, experts):
    """Run every expert on its chosen tokens (equal counts, so one bmm per MLP layer and no padding),
    then sum each token's weighted expert outputs in float32."""
    h = torch.bmm(x[token], experts.c_fc)
    if experts.c_fc_bias is not None:
        h = h + experts.c_fc_bias[:, None, :]
    out = torch.bmm(F.gelu(h), experts.c_proj)
    if experts.c_proj_bias is not None:
        out = out + experts.c_proj_bias[:, None, :]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return y.index_add_(0, token.flatten(), (out.float() * weight[..., None]).flatten(0, 1)).to(x.dtype)

# -----------------------------------------------------------------------------
# The MoE layer and the model


class MoE(nn.Module):
    """Drop-in for MLP: routes each token to top_k experts (with router='expert_choice', in training,
    each expert to its tokens), plus n_shared_expert shared experts that every token passes through.
    After each forward it holds its own aux-loss terms (balance_loss, z_loss) and routing stats
    (tokens_per_expert, drop_fraction, probs, topk_idx)."""

    def __init__(self, config):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)
        # DeepSeekMoE: n shared experts of expert_hidden each are one MLP of n * expert_hidden
        self.shared = MLP(config, config.n_shared_expert * config.expert_hidden) if config.n_shared_expert else None
        self.dropout = nn.Dropout(config.dropout)
        self.expert_impl = config.expert_impl
        self.router_kind = config.router
        self.expert_dropout = config.expert_dropout
        self.aux_loss_scope = config.aux_loss_scope
        self.step_counts = None  # this rank's token-slots per expert over the optimizer step so far

    def forward(self, x):
        B, T, C = x.shape
        E = self.router.gate.out_features  # all experts of the layer (under EP this rank holds a shard)
        # capacity backends give places to slots in token order, so they get the tokens position-major
        # (t * B + b): a token only ever loses its place to tokens at the same or earlier positions (causal).
        # The dropless backends take x's own order (b * T + t), which costs no copy
        position_major = self.expert_impl in CAPACITY_IMPLS
        x_flat = x.transpose(0, 1).reshape(T * B, C) if position_major else x.reshape(B * T, C)
        topk_idx, topk_weight, logits, probs = self.router(x_flat)
        keep = None
        if self.training and self.expert_dropout > 0:  # inverted dropout, one coin per whole expert
            keep = (torch.rand(E, device=x.device) >= self.expert_dropout).float() / (1 - self.expert_dropout)
        if self.training and self.router_kind == 'expert_choice':
            # a token's experts depend on later tokens of the batch, which a decoder must not see at
            # inference (and one token alone would get every expert): eval uses Router.forward's top-k
            token, weight = expert_choice(probs, self.router.top_k)
            y = expert_choice_experts(x_flat, token, weight if keep is None else weight * keep[:, None], self.experts)
            counts = torch.full((E,), token.size(1), dtype=torch.long, device=x.device)
            taken = torch.zeros(x_flat.size(0), dtype=torch.bool, device=x.device).index_fill_(0, token.flatten(), True)
            self.drop_fraction = 1 - taken.float().mean()  # tokens that no expert took
        else:
            weight = topk_weight if keep is None else topk_weight * keep[topk_idx]
            backend = EXPERT_IMPLS[self.expert_impl] if self.experts.ep_group is None else self.experts.ep_dispatch
            y, n_dropped = backend(x_flat, topk_idx, weight, self.experts)
            counts = count_per_expert(topk_idx, E)
            self.drop_fraction = n_dropped / topk_idx.numel()
        balance_counts = counts
        if self.training:
            self.step_counts = counts if self.step_counts is None else self.step_counts + counts
            if self.aux_loss_scope == 'global':
                # Qwen-style global-batch balancing: f_i over every micro-batch of this step so far, on
                # every rank (the step's last micro-batch sees the whole global batch); P_i stays local
                balance_counts = summed_over_ranks(self.step_counts)
        self.balance_loss = load_balance_loss(probs, topk_idx, balance_counts)
        self.z_loss = router_z_loss(logits)
        self.tokens_per_expert = counts
        self.probs = probs.detach()  # for routing_stats' entropy, computed only when asked for
        if position_major:  # back to x's order
            topk_idx, y = topk_idx.view(T, B, -1).transpose(0, 1), y.view(T, B, C).transpose(0, 1).contiguous()
        self.topk_idx = topk_idx.reshape(B * T, -1)  # [token (b * T + t), choice]
        y = self.dropout(y.view(B, T, C))
        return y if self.shared is None else y + self.shared(x)


class MoEGPT(GPT):
    """GPT whose MoE layers (every moe_every-th block) route tokens to experts."""

    def make_mlp(self, layer_idx):
        return MoE(self.config) if self.config.is_moe_layer(layer_idx) else MLP(self.config)

    def moe_layers(self):
        return [layer for _, layer in self.indexed_moe_layers()]

    def indexed_moe_layers(self):
        """(block index, MoE layer) pairs: the 'layer{i}' of logged stats is the block index."""
        return [(i, block.mlp) for i, block in enumerate(self.transformer.h) if isinstance(block.mlp, MoE)]

    def set_expert_impl(self, expert_impl):
        """Switch backend in place: all backends share the same parameters."""
        if expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl={expert_impl!r} is unknown; allowed: {', '.join(EXPERT_IMPLS)}")
        self.config.expert_impl = expert_impl
        for layer in self.moe_layers():
            layer.expert_impl = expert_impl

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Experts):
            # same std as the dense MLP, with GPT-2's 1/sqrt(2*n_layer) on the residual projection
            torch.nn.init.normal_(module.c_fc, mean=0.0, std=0.02)
            torch.nn.init.normal_(module.c_proj, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def aux_loss(self):
        # each term is computed per layer (never pooled over layers), then averaged over layers
        layers = self.moe_layers()
        balance = torch.stack([layer.balance_loss for layer in layers]).mean()
        z = torch.stack([layer.z_loss for layer in layers]).mean()
        self.loss_terms.update(aux=balance.detach(), z=z.detach())
        return self.config.aux_loss_coef * balance + self.config.z_loss_coef * z

    def get_num_params(self, non_embedding=True, active=False):
        n_params = super().get_num_params(non_embedding)
        if active:  # a token only runs top_k of each layer's experts (of this rank's shard, under EP)
            for layer in self.moe_layers():
                n_local = layer.experts.c_fc.size(0)
                per_expert = sum(p.numel() for p in layer.experts.parameters()) // n_local
                n_params -= per_expert * (n_local - self.config.top_k)
        return n_params

    def routing_stats(self):
        """Per MoE layer, after a forward: fraction of token-slots per expert, max/mean load, mean
        router entropy (nats; log(n_expert) is uniform) and dropped fraction (of slots; with expert
        choice in training, of tokens no expert took)."""
        stats = {}
        for i, layer in self.indexed_moe_layers():
            load = layer.tokens_per_expert.float()
            stats[f'layer{i}/load'] = (load / load.sum()).tolist()
            stats[f'layer{i}/max_load'] = (load.max() / load.mean()).item()
            stats[f'layer{i}/entropy'] = torch.special.entr(layer.probs).sum(-1).mean().item()
            stats[f'layer{i}/drop_fraction'] = float(layer.drop_fraction)
        return stats

    @torch.no_grad()
    def routing_flips(self, idx):
        """Routing flip rate: per MoE layer, the fraction of the probe batch idx's tokens whose top-1
        expert changed since the previous call ({} on the first). Runs in eval mode: no noise."""
        training = self.training
        self.eval()
        self(idx)
        self.train(training)
        top1 = {i: layer.topk_idx[:, 0].clone() for i, layer in self.indexed_moe_layers()}
        previous, self.probe_top1 = getattr(self, 'probe_top1', None), top1
        if previous is None:
            return {}
        return {f'layer{i}/flip_rate': (top1[i] != previous[i].to(top1[i].device)).float().mean().item() for i in top1}

    @torch.no_grad()
    def end_step(self, skipped=False):
        """Once per optimizer step, after its last micro-batch: with router='aux_free' each expert's
        selection bias moves by bias_update_rate against its load error over the step's global batch
        (DeepSeek-V3: overloaded experts down, underloaded up); not for a skipped step. Then the step's
        load counts restart."""
        for layer in self.moe_layers():
            if layer.step_counts is None:
                continue
            if layer.router.expert_bias is not None and not skipped:
                load = summed_over_ranks(layer.step_counts).float()
                layer.router.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
            layer.step_counts = None
