"""
The grouped GEMMs of the 'grouped' backend (and of expert parallelism) as torch.library custom ops, with a
fake (shape-only) implementation and their own autograd, so that torch.compile traces the whole MoE layer:
torch's grouped_mm traces in bfloat16 only (torch 2.13) and the CPU kernel not at all, which used to cost a
graph break per GEMM. Callers use the registered ops themselves (grouped_mm, grouped_mm_t below): that skips
custom_op's Python wrapper, which cost as much again as the rest of a small grouped_mm's forward and backward
on the CPU (0.33 vs 0.25 ms).
"""
import torch
from torch.nn import functional as F

from moe_kernels import cpu_grouped_mm

# (public from torch 2.9; 2.8 has the other)
_torch_grouped_mm = getattr(F, 'grouped_mm', None) or torch._grouped_mm


@torch.library.custom_op('nanomoe::grouped_mm', mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [M, K] (rows sorted by group), b [G, K, N], offs [G] int32 (the end row of each group) -> [M, N]:
    group g's rows times b[g]. On the CPU moe_kernels/cpu_grouped_mm's kernel (groups side by side), else
    torch's."""
    if a.device.type == 'cpu' and cpu_grouped_mm.available():
        return torch.ops.nanomoe_cpu.grouped_mm(a, b, offs)
    return _torch_grouped_mm(a, b, offs=offs)


@torch.library.custom_op('nanomoe::grouped_mm_t', mutates_args=())
def _grouped_mm_t_op(a: torch.Tensor, c: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [M, K], c [M, N], rows grouped by offs -> [G, K, N]: a_g^T @ c_g (grouped_mm's weight gradient;
    an empty group gives zeros)."""
    if a.device.type == 'cpu' and cpu_grouped_mm.available():
        return torch.ops.nanomoe_cpu.grouped_mm_t(a, c, offs)
    return _torch_grouped_mm(a.t(), c, offs=offs)


grouped_mm, grouped_mm_t = torch.ops.nanomoe.grouped_mm.default, torch.ops.nanomoe.grouped_mm_t.default


@_grouped_mm_op.register_fake
def _(a, b, offs):
    return a.new_empty(a.size(0), b.size(2))


@_grouped_mm_t_op.register_fake
def _(a, c, offs):
    return a.new_empty(offs.size(0), a.size(1), c.size(1))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # y.sum() hands back a stride-0 gradient
    grad_a = grouped_mm(grad, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    grad_b = grouped_mm_t(a, grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)
