"""
The MoE layer's fused ops for the CPU, as torch.library custom ops with fake (shape-only) implementations
and their own autograd, so that torch.compile traces them without a graph break. The schemas are defined
here; their CPU kernels are moe_kernels/cpu_grouped_mm.cpp's, registered when cpu_grouped_mm.available()
loads it (moe_model calls them only then; elsewhere it runs the unfused torch ops).

fused_experts: the grouped backend's whole dispatch, one op forward and one backward: the token rows
gathered by expert, both GEMMs with the activation between, and the router-weighted sum back to tokens.
Unfused, that was a hundred small ops per layer and step around the GEMMs (sort, index_select, casts,
pads, the bias gather, index_add and their backwards), a fixed cost that a small model pays in full. The
forward returns, after y and the slots per expert, what its backward needs (the slot of each row sorted by
expert, and per row its x, c_fc output, activation and expert output): a custom op's outputs are the only
place to keep them.
"""
import torch

_lib = torch.library.Library('nanomoe', 'FRAGMENT')
_lib.define('fused_experts(Tensor x, Tensor topk_idx, Tensor topk_weight, Tensor c_fc, Tensor? c_fc_bias, '
            'Tensor c_proj, Tensor? c_proj_bias, str act) '
            '-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)')
_lib.define('fused_experts_backward(Tensor grad_y, Tensor topk_weight, Tensor c_fc, Tensor c_proj, '
            'bool bias, str act, Tensor counts, Tensor order, Tensor xs, Tensor h, Tensor a, Tensor out) '
            '-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)')
# callers use the registered ops themselves (as grouped_mm.py's): custom_op's Python wrapper costs time
fused_experts = torch.ops.nanomoe.fused_experts.default
fused_experts_backward = torch.ops.nanomoe.fused_experts_backward.default


@torch.library.register_fake('nanomoe::fused_experts')
def _(x, topk_idx, topk_weight, c_fc, c_fc_bias, c_proj, c_proj_bias, act):
    (N, d), S, new = x.shape, topk_idx.numel(), x.new_empty
    return (new(N, d, dtype=torch.float32), topk_idx.new_empty(c_fc.size(0)), topk_idx.new_empty(S),
            new(S, d), new(S, c_fc.size(2)), new(S, c_proj.size(1)), new(S, d))


@torch.library.register_fake('nanomoe::fused_experts_backward')
def _(grad_y, topk_weight, c_fc, c_proj, bias, act, counts, order, xs, h, a, out):
    n_bias = c_fc.size(0) if bias else 0
    return (xs.new_empty(grad_y.size(0), c_fc.size(1)), torch.empty_like(topk_weight, dtype=torch.float32),
            torch.empty_like(c_fc), c_fc.new_empty(n_bias, c_fc.size(2)), torch.empty_like(c_proj),
            c_fc.new_empty(n_bias, c_fc.size(1)))


def _fused_setup(ctx, inputs, output):
    _, _, topk_weight, c_fc, c_fc_bias, c_proj, c_proj_bias, act = inputs
    y, counts, order, xs, h, a, out = output
    ctx.mark_non_differentiable(xs, h, a, out)  # kept for the backward, not results
    ctx.set_materialize_grads(False)  # the backward gets None for them, not zeros the size of the activations
    ctx.save_for_backward(topk_weight, c_fc, c_proj, counts, order, xs, h, a, out)
    ctx.act, ctx.biases = act, (c_fc_bias is not None, c_proj_bias is not None)


def _fused_backward(ctx, grad_y, *unused):
    topk_weight, c_fc, c_proj, counts, order, xs, h, a, out = ctx.saved_tensors
    if grad_y is None:
        return (None,) * 8
    grad_x, grad_w, grad_fc, grad_fc_bias, grad_proj, grad_proj_bias = fused_experts_backward(
        grad_y, topk_weight, c_fc, c_proj, any(ctx.biases), ctx.act, counts, order, xs, h, a, out)
    fc_bias, proj_bias = ctx.biases
    return (grad_x, None, grad_w, grad_fc, grad_fc_bias if fc_bias else None, grad_proj,
            grad_proj_bias if proj_bias else None, None)


torch.library.register_autograd('nanomoe::fused_experts', _fused_backward, setup_context=_fused_setup)

