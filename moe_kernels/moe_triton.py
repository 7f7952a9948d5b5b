"""
Block-sparse ("MegaBlocks"-style) Triton kernels for the MoE expert MLPs.

The idea (Gale et al., 2022, "MegaBlocks"): instead of giving every expert a fixed
capacity (and dropping or padding tokens), sort the N*k (token, slot) pairs by expert
and pad each expert's group only up to a multiple of the block size B. The hidden
activations of all experts then form one block-sparse matrix of shape [P, E*h]
(P = padded number of slots): row block r belongs to a single expert e and holds
nonzero blocks only in that expert's h/B column blocks. The first layer is an SDD
product (dense x dense -> sparse, computed only at the nonzero blocks), the second a
DSD product (sparse x dense -> dense). Backward reuses the same kernels with the
weight operand transposed, plus a TSD kernel (transposed-sparse x dense -> dense)
that walks the transposed topology (column blocks -> their blocks) for the weight
gradients. No token is ever dropped, and an expert without tokens has no blocks.

Shapes: the expert hidden size h must be a multiple of the block size B (B in
{16, 32, 64, 128}; by default the largest that divides h, see BLOCK_SIZE), otherwise a
ValueError is raised. The model width d may be anything (kernel tiles are masked).

Fallback: see _use_kernels. Without triton, on CPU without TRITON_INTERPRET=1, or for
tiny batches (N*k < MIN_TRITON_SLOTS) moe_model.loop_experts, the reference, runs instead.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_model import compute_dtype, combine, count_per_expert, loop_experts

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # triton is optional: the torch path still works
    triton, tl = None, None
    HAS_TRITON = False

BLOCK_SIZE = None        # topology block size B; None = largest of (128, 64, 32, 16) dividing h
MIN_TRITON_SLOTS = 256   # below this many (token, slot) pairs the torch path is used; 0 forces the kernels
_BLOCK_CHOICES = (128, 64, 32, 16)


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# triton.jit picks compiled vs interpreted kernels when the module is imported, so remember which
_KERNELS_INTERPRETED = _interpret()


def _use_kernels(x, n_slots):
    # The fallback rule: run the Triton kernels iff triton is importable, the device can run
    # them (CUDA, or CPU under the Triton interpreter, which the tests use), and the batch is
    # big enough that launch + topology overhead is worth it (N*k >= MIN_TRITON_SLOTS).
    # Empty batches (N*k == 0) always take the torch path.
    if not HAS_TRITON or n_slots == 0:
        return False
    if not (x.is_cuda or _KERNELS_INTERPRETED):
        return False
    return n_slots >= MIN_TRITON_SLOTS

# -----------------------------------------------------------------------------
# kernels


# What the autotuner tries on a GPU: every tile size but the first (the interpreter's single small one)
# with every num_warps and num_stages. moe_kernels/triton_aot.py compiles them ahead of time for each GPU.
TILES = {"sdd": [{"BLOCK_K": 16}, {"BLOCK_K": 32}, {"BLOCK_K": 64}],
         "dsd": [{"BLOCK_N": 32, "BLOCK_K": 16}, {"BLOCK_N": 64, "BLOCK_K": 32},
                 {"BLOCK_N": 64, "BLOCK_K": 64}, {"BLOCK_N": 128, "BLOCK_K": 32}]}
TILES["tsd"] = TILES["dsd"]
WARPS, STAGES = (4, 8), (3, 4)
# (compute capability, dtype) where every configuration above compiles and fits the GPU's shared memory,
# as moe_kernels/triton_aot.py finds (the tests check it); moe_kernels.auto_expert_impl uses 'triton' only
# there.
# Before sm80 there are no tensor cores for bfloat16 or TF32: not used there even where they compile.
# The most a 16-bit configuration needs (sdd, BLOCK=128, BLOCK_K=64, 4 stages): 32 KiB before sm80, 96 on
# sm80-sm89 (3 buffers of pipelined loads: sm86/sm89 allow 99, so one more stage would not fit), 128 on
# sm90.
# float32 (TF32) fits nowhere: that configuration needs 256 KiB on sm90, 192 on sm80.
SUPPORTED = {(70, 'float16'), (75, 'float16'), (80, 'bfloat16'), (80, 'float16'), (86, 'bfloat16'),
             (86, 'float16'), (89, 'bfloat16'), (89, 'float16'), (90, 'bfloat16'), (90, 'float16')}
NOT_FAST = {(cc, dtype) for cc in (70, 75) for dtype in ('bfloat16', 'float32')}

if HAS_TRITON:
    def _configs(tile_kwargs, interpreted=_KERNELS_INTERPRETED):  # interpreted=False: a GPU's (triton_aot.py)
        if interpreted:  # the interpreter is slow and cannot benchmark: a single small config
            return [triton.Config(tile_kwargs[0], num_warps=4, num_stages=1)]
        # correctness tests on a GPU: one config, no tuning
        if os.environ.get("NANOMOE_TRITON_AUTOTUNE") == "0":
            return [triton.Config(tile_kwargs[1], num_warps=4, num_stages=3)]
        return [triton.Config(kw, num_warps=w, num_stages=s) for kw in tile_kwargs[1:] for w in WARPS
                for s in STAGES]

    def _prune_block_k(configs, nargs, **kwargs):
        # DSD/TSD step through a BxB block BLOCK_K at a time, so BLOCK_K must divide B
        B = {**nargs, **kwargs}["BLOCK"]
        kept = [c for c in configs if c.kwargs["BLOCK_K"] <= B]
        return kept or [triton.Config({**configs[0].kwargs, "BLOCK_K": B}, num_warps=4, num_stages=3)]

    @triton.autotune(configs=_configs(TILES["sdd"]), key=["K", "BLOCK"])
    @triton.jit
    def _sdd_kernel(a_ptr, w_ptr, out_ptr, row_idx_ptr, col_idx_ptr, K,
                    stride_am, stride_ak, stride_we, stride_wk, stride_wn, BLOCKS_PER_EXPERT,
                    BLOCK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
        # one program = one nonzero BxB block: out[b] = a[row block] @ w[expert][:, col block]
        b = tl.program_id(0).to(tl.int64)
        r = tl.load(row_idx_ptr + b).to(tl.int64)
        c = tl.load(col_idx_ptr + b).to(tl.int64)
        e = c // BLOCKS_PER_EXPERT
        offs_m = r * BLOCK + tl.arange(0, BLOCK)
        offs_n = (c % BLOCKS_PER_EXPERT) * BLOCK + tl.arange(0, BLOCK)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k + k0 < K  # K (= d or h) need not be a multiple of BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        offs_blk = tl.arange(0, BLOCK)
        out_ptrs = out_ptr + b * BLOCK * BLOCK + offs_blk[:, None] * BLOCK + offs_blk[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))

    @triton.autotune(configs=_configs(TILES["dsd"]), key=["N", "BLOCK"],
                     prune_configs_by={"early_config_prune": _prune_block_k})
    @triton.jit
    def _dsd_kernel(data_ptr, offsets_ptr, col_idx_ptr, w_ptr, out_ptr, N,
                    stride_we, stride_wk, stride_wn, stride_om, stride_on, BLOCKS_PER_EXPERT,
                    BLOCK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        # one program = rows of row block r x BLOCK_N output columns: sum over the row's blocks
        r = tl.program_id(0).to(tl.int64)
        offs_m = tl.arange(0, BLOCK)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        start = tl.load(offsets_ptr + r).to(tl.int64)  # int64 loop index: b * B * B can pass 2**31
        end = tl.load(offsets_ptr + r + 1).to(tl.int64)
        acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        for b in range(start, end):
            c = tl.load(col_idx_ptr + b).to(tl.int64)
            e = c // BLOCKS_PER_EXPERT
            k_base = (c % BLOCKS_PER_EXPERT) * BLOCK
            blk_ptrs = data_ptr + b * BLOCK * BLOCK + offs_m[:, None] * BLOCK + offs_k[None, :]
            w_ptrs = (w_ptr + e * stride_we + (k_base + offs_k)[:, None] * stride_wk
                      + offs_n[None, :] * stride_wn)
            for k0 in range(0, BLOCK, BLOCK_K):
                blk = tl.load(blk_ptrs)
                w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
                acc = tl.dot(blk, w, acc, input_precision=PRECISION)
                blk_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_wk
        out_ptrs = out_ptr + (r * BLOCK + offs_m)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[None, :])

    @triton.autotune(configs=_configs(TILES["tsd"]), key=["N", "BLOCK"],
                     prune_configs_by={"early_config_prune": _prune_block_k})
    @triton.jit
    def _tsd_kernel(data_ptr, offsets_t_ptr, block_offsets_t_ptr, row_idx_ptr, d_ptr, out_ptr, N,
                    stride_dm, stride_dn, stride_oe, stride_ok, stride_on, BLOCKS_PER_EXPERT,
                    BLOCK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        # one program = column block c (= B hidden units of expert e) x BLOCK_N columns of d:
        # out[e, j-block, n] = sum over the blocks in column c of block^T @ d[rows of that block, n]
        c = tl.program_id(0).to(tl.int64)
        e = c // BLOCKS_PER_EXPERT
        offs_j = (c % BLOCKS_PER_EXPERT) * BLOCK + tl.arange(0, BLOCK)
        offs_blk = tl.arange(0, BLOCK)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        start = tl.load(offsets_t_ptr + c)
        end = tl.load(offsets_t_ptr + c + 1)
        acc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        for i in range(start, end):  # empty experts: no blocks, the stored gradient is 0
            b = tl.load(block_offsets_t_ptr + i).to(tl.int64)
            r = tl.load(row_idx_ptr + b).to(tl.int64)
            # block^T tile [BLOCK, BLOCK_K]: element (j, m) = data[b, m, j]
            blk_ptrs = data_ptr + b * BLOCK * BLOCK + offs_k[None, :] * BLOCK + offs_blk[:, None]
            d_ptrs = d_ptr + (r * BLOCK + offs_k)[:, None] * stride_dm + offs_n[None, :] * stride_dn
            for k0 in range(0, BLOCK, BLOCK_K):
                blk_t = tl.load(blk_ptrs)
                dd = tl.load(d_ptrs, mask=n_mask[None, :], other=0.0)
                acc = tl.dot(blk_t, dd, acc, input_precision=PRECISION)
                blk_ptrs += BLOCK_K * BLOCK
                d_ptrs += BLOCK_K * stride_dm
        out_ptrs = out_ptr + e * stride_oe + offs_j[:, None] * stride_ok + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[None, :])

# -----------------------------------------------------------------------------
# topology


@dataclass
class Topology:
    block: int                   # B
    n_expert: int                # E
    blocks_per_expert: int       # h // B
    n_tokens: int                # N
    # P: room for every expert's slots padded to a multiple of B, in the worst case
    n_rows: int
    order: torch.Tensor          # [N*k] flat slot ids sorted (stably) by expert
    pos: torch.Tensor            # [N*k] padded row of each sorted slot
    row_src: torch.Tensor        # [P] source token of each padded row (N = the zero padding row)
    row_expert: torch.Tensor     # [P] expert of each padded row
    row_idx: torch.Tensor        # [nnz] int32 row block of each nonzero block (blocks in row-major order)
    col_idx: torch.Tensor        # [nnz] int32 column block (in [0, E*h/B)) of each nonzero block
    offsets: torch.Tensor        # [P/B + 1] int32 CSR: the blocks of row block r are offsets[r]:offsets[r+1]
    offsets_t: torch.Tensor      # [E*h/B + 1] int32 CSC: the blocks of column block c are ...
    block_offsets_t: torch.Tensor  # [nnz] int32 ... block_offsets_t[offsets_t[c]:offsets_t[c+1]]

    def tensors(self):
        """What the kernel ops below take, as their arguments *topo (custom ops take tensors, not this class;
        and tensors one by one: torch 2.13's autograd for custom ops mishandles a list of tensors)."""
        return self.row_idx, self.col_idx, self.offsets, self.offsets_t, self.block_offsets_t


def make_topology(topk_idx, n_expert, hidden, block):
    """Every size here depends on N, k, E and B alone, never on the routing: each expert pads its slots to
    a multiple of B, which takes at most N*k + E*(B - 1) rows in all, and P is that worst case. So there is
    no device-to-host sync (the CPU can queue the next layers while the GPU works) and torch.compile sees
    static shapes. The row blocks past the real ones are zero rows given to the last expert: they add at
    most E*(B-1) rows of work (3% at 8 experts, B=128 and 16k tokens top-2) and nothing to any result."""
    N, k = topk_idx.shape
    dev, E, B = topk_idx.device, n_expert, block
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert_sorted = flat[order]
    counts = count_per_expert(topk_idx, E)
    padded = (counts + B - 1) // B * B
    start = torch.cumsum(counts, 0) - counts
    pstart = torch.cumsum(padded, 0) - padded
    R, nb = (N * k + E * (B - 1)) // B, hidden // B
    P = R * B
    pos = pstart[expert_sorted] + torch.arange(N * k, device=dev) - start[expert_sorted]
    row_src = torch.full((P,), N, dtype=torch.long, device=dev)
    row_src[pos] = order // k
    # row block r belongs to the first expert whose padded rows end past it (the tail: to the last expert)
    block_expert = torch.searchsorted(torch.cumsum(padded // B, 0), torch.arange(R, device=dev), right=True)
    block_expert = block_expert.clamp(max=E - 1)
    row_idx = torch.arange(R, device=dev).repeat_interleave(nb)
    col_idx = (block_expert[:, None] * nb + torch.arange(nb, device=dev)).reshape(-1)
    offsets = torch.arange(R + 1, device=dev) * nb
    block_offsets_t = torch.argsort(col_idx, stable=True)  # stable: blocks of a column stay in row order
    offsets_t = F.pad(torch.cumsum(count_per_expert(col_idx[:, None], E * nb), 0), (1, 0))
    i32 = lambda t: t.to(torch.int32).contiguous()
    return Topology(B, E, nb, N, P, order, pos, row_src, block_expert.repeat_interleave(B),
                    i32(row_idx), i32(col_idx), i32(offsets), i32(offsets_t), i32(block_offsets_t))


def blocks_to_dense(data, topo):
    """[nnz, B, B] block values -> the dense [P, E*h] matrix they represent (for tests / debugging)."""
    B = topo.block
    dense = data.new_zeros(topo.n_rows // B, topo.n_expert * topo.blocks_per_expert, B, B)
    dense[topo.row_idx.long(), topo.col_idx.long()] = data
    return dense.transpose(1, 2).reshape(topo.n_rows, -1)

# -----------------------------------------------------------------------------
# The block-sparse products, as torch.library custom ops: torch.compile traces them as opaque ops (from
# their fake implementations, which give the output shapes) and autograd differentiates them (each one's
# backward is two of these products). *topo is Topology.tensors(); weights are [E, *, *], and "trans" means
# each w[e] is used transposed.


def tf32_allowed():
    """torch's TF32 setting for float32 matmuls. torch >= 2.9 has the fp32_precision API ('tf32', 'ieee', or
    'none': the default, no TF32), and once it is in use, reading the legacy allow_tf32 flag raises."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32


def _precision(dtype):
    # fp32 inputs: follow torch's TF32 setting so results match torch matmul; 16-bit: irrelevant
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def _weight_strides(w, trans):
    return (w.stride(0), w.stride(2), w.stride(1)) if trans else w.stride()


@torch.library.custom_op("nanomoe::sdd", mutates_args=())
def sdd(a: torch.Tensor, w: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor, offsets: torch.Tensor,
        offsets_t: torch.Tensor, block_offsets_t: torch.Tensor, trans_w: bool = False) -> torch.Tensor:
    """a [P, K] @ w[e] ([E, K, h], or [E, h, K] if trans_w) at the topology's blocks -> [nnz, B, B]."""
    B = a.shape[0] // (offsets.numel() - 1)
    out = torch.empty(row_idx.numel(), B, B, device=a.device, dtype=a.dtype)
    _sdd_kernel[(row_idx.numel(),)](a, w, out, row_idx, col_idx, a.shape[1], a.stride(0), a.stride(1),
                                    *_weight_strides(w, trans_w), w.shape[1 if trans_w else 2] // B,
                                    BLOCK=B, PRECISION=_precision(a.dtype))
    return out


@torch.library.custom_op("nanomoe::dsd", mutates_args=())
def dsd(data: torch.Tensor, w: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor,
        offsets: torch.Tensor, offsets_t: torch.Tensor, block_offsets_t: torch.Tensor,
        trans_w: bool = False) -> torch.Tensor:
    """sparse [P, E*h] (block values [nnz, B, B]) @ w viewed as [E*h, N] (w [E, h, N], or [E, N, h]
    if trans_w) -> dense [P, N]."""
    B, data = data.shape[1], data.contiguous()  # the kernels index blocks as [nnz, B, B] row-major
    N = w.shape[1] if trans_w else w.shape[2]
    out = torch.empty((offsets.numel() - 1) * B, N, device=data.device, dtype=data.dtype)
    grid = lambda meta: (offsets.numel() - 1, triton.cdiv(N, meta["BLOCK_N"]))
    _dsd_kernel[grid](data, offsets, col_idx, w, out, N, *_weight_strides(w, trans_w), out.stride(0),
                      out.stride(1), w.shape[2 if trans_w else 1] // B, BLOCK=B,
                      PRECISION=_precision(data.dtype))
    return out


@torch.library.custom_op("nanomoe::tsd", mutates_args=())
def tsd(data: torch.Tensor, d: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor,
        offsets: torch.Tensor, offsets_t: torch.Tensor, block_offsets_t: torch.Tensor, n_expert: int,
        trans_out: bool = False) -> torch.Tensor:
    """sparse^T [E*h, P] @ d [P, N], per expert -> [E, h, N] (or [E, N, h] if trans_out).
    These are the weight gradients x_e^T @ grad_h_e and act_e^T @ grad_out_e."""
    B, E, N, data = data.shape[1], n_expert, d.shape[1], data.contiguous()
    nb = (offsets_t.numel() - 1) // E
    out = torch.empty((E, N, nb * B) if trans_out else (E, nb * B, N), device=d.device, dtype=d.dtype)
    grid = lambda meta: (E * nb, triton.cdiv(N, meta["BLOCK_N"]))
    _tsd_kernel[grid](data, offsets_t, block_offsets_t, row_idx, d, out, N, d.stride(0), d.stride(1),
                      *_weight_strides(out, trans_out), nb, BLOCK=B, PRECISION=_precision(data.dtype))
    return out


@sdd.register_fake
def _(a, w, row_idx, col_idx, offsets, offsets_t, block_offsets_t, trans_w=False):
    B = a.shape[0] // (offsets.numel() - 1)
    return a.new_empty(row_idx.numel(), B, B)


@dsd.register_fake
def _(data, w, row_idx, col_idx, offsets, offsets_t, block_offsets_t, trans_w=False):
    return data.new_empty((offsets.numel() - 1) * data.shape[1], w.shape[1] if trans_w else w.shape[2])


@tsd.register_fake
def _(data, d, row_idx, col_idx, offsets, offsets_t, block_offsets_t, n_expert, trans_out=False):
    h = (offsets_t.numel() - 1) // n_expert * data.shape[1]
    return d.new_empty((n_expert, d.shape[1], h) if trans_out else (n_expert, h, d.shape[1]))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])  # x, w and the topology
    ctx.trans = inputs[7]


def _sdd_backward(ctx, grad):
    a, w, *topo = ctx.saved_tensors
    grad = grad.contiguous()
    # grad_h @ w[e]^T
    grad_a = dsd(grad, w, *topo, trans_w=not ctx.trans) if ctx.needs_input_grad[0] else None
    # a_e^T @ grad_h_e
    grad_w = tsd(grad, a, *topo, w.shape[0], trans_out=not ctx.trans) if ctx.needs_input_grad[1] else None
    return grad_a, grad_w, *[None] * 6


def _dsd_backward(ctx, grad):
    data, w, *topo = ctx.saved_tensors
    grad = grad.contiguous()
    # grad @ w[e]^T
    grad_data = sdd(grad, w, *topo, trans_w=not ctx.trans) if ctx.needs_input_grad[0] else None
    # act_e^T @ grad_e
    grad_w = tsd(data, grad, *topo, w.shape[0], trans_out=ctx.trans) if ctx.needs_input_grad[1] else None
    return grad_data, grad_w, *[None] * 6


sdd.register_autograd(_sdd_backward, setup_context=_setup)
dsd.register_autograd(_dsd_backward, setup_context=_setup)

# -----------------------------------------------------------------------------
# expert computation


def _block_size(h):
    if BLOCK_SIZE is not None:
        B = BLOCK_SIZE
        if B not in _BLOCK_CHOICES or h % B:
            raise ValueError(f"triton_experts: BLOCK_SIZE={B} must be one of {_BLOCK_CHOICES} and divide "
                             f"the expert hidden size h={h}")
        return B
    for B in _BLOCK_CHOICES:
        if h % B == 0:
            return B
    raise ValueError(f"triton_experts: the expert hidden size h={h} must be a multiple of 16 "
                     f"(the block size B is one of {_BLOCK_CHOICES} and must divide h)")


def block_sparse_experts(x, topk_idx, topk_weight, c_fc, c_proj, c_fc_bias=None, c_proj_bias=None):
    """The Triton path of triton_experts (always runs the kernels). A SwiGLU expert's c_fc holds its gate and
    up projections side by side: each is its own block-sparse product over the same topology."""
    (E, h, d), halves = c_proj.shape, c_fc.size(2) // c_proj.size(1)
    B = _block_size(h)
    dt = compute_dtype(x)
    topo = make_topology(topk_idx, E, h, B)
    # gather tokens into expert-sorted, per-expert-padded rows (padding rows read a zero row)
    x_pad = F.pad(x.to(dt), (0, 0, 0, 1))[topo.row_src]
    hid = []
    for i in range(halves):  # gelu: c_fc; swiglu: gate, then up
        # [nnz, B, B]
        part = sdd(x_pad, c_fc.to(dt).view(E, d, halves, h)[:, :, i].contiguous(), *topo.tensors())
        if c_fc_bias is not None:
            part = part + c_fc_bias.to(dt).view(E, halves,
                                                h)[:, i].reshape(-1, B)[topo.col_idx.long()].unsqueeze(1)
        hid.append(part)
    # moe_model's activation(), elementwise on the block values, so the sparsity is preserved
    act = F.gelu(hid[0]) if halves == 1 else F.silu(hid[0]) * hid[1]
    out = dsd(act, c_proj.to(dt).contiguous(), *topo.tensors())                # [P, d]
    if c_proj_bias is not None:
        out = out + c_proj_bias.to(dt)[topo.row_expert]
    # weight the k slots of each token and add them up, in float32
    return combine(out[topo.pos], topk_weight, topo.order, topo.order // topk_idx.shape[1],
                   x.size(0)).to(x.dtype)


def triton_experts(x, topk_idx, topk_weight, experts):
    """The 'triton' backend (moe_model's signature): dropless block-sparse MoE experts, or moe_model's
    loop where the kernels cannot or should not run (_use_kernels). Returns (y [N, d] in x.dtype, 0.0)."""
    _block_size(experts.c_proj.shape[1])  # same shape rule on both paths, whatever the batch size
    if not _use_kernels(x, topk_idx.numel()):
        return loop_experts(x, topk_idx, topk_weight, experts)
    y = block_sparse_experts(x, topk_idx, topk_weight, experts.c_fc, experts.c_proj,
                             experts.c_fc_bias, experts.c_proj_bias)
    return y, 0.0
