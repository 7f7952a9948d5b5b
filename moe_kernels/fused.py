"""
The MoE layer's fused ops for the CPU, as torch.library custom ops with fake (shape-only) implementations
and their own autograd, so that torch.compile traces them without a graph break. The schemas and the fake
implementations are defined here; their CPU kernels and their autograd (C++ autograd Functions: Python's
cost ~0.1 ms per op and pass) are moe_kernels/cpu_grouped_mm.cpp's, registered when
cpu_grouped_mm.available() loads it (moe_model calls them only then; elsewhere, and on GPUs, it runs the
unfused torch ops).

  fused_experts    the grouped backend: the token rows gathered by expert, both GEMMs with the activation
                   between, the router-weighted sum back to tokens
  softmax_router   Router's softmax path: the gate, softmax, top-k and weights, the same bits as its ops,
                   and the layer's slots per expert, balance loss and z-loss

Each is one op forward and one backward. Unfused, a small MoE layer's step was some eighty small ops around
its GEMMs (sort, index_select, casts, pads, the bias gather, index_add, softmax, top-k, the losses' sums,
and their backwards), a fixed cost that a small model pays in full (RESULTS.md section 3). A forward returns,
after its results, what its backward needs (fused_experts: the slot of each row sorted by expert, and per
row its x, c_fc output, activation and expert output; softmax_router: each row's logsumexp): a custom op's
outputs are the only place to keep them.
The backwards have no second derivatives: gradients built as a graph (create_graph=True) come back right,
and differentiating them again raises an error (cpu_grouped_mm.cpp's once_differentiable).
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


# softmax_router: moe_model.Router's softmax path (the gate, the softmax over the experts, the top-k and the
# chosen weights) as one op, in float32 under autocast too (its kernel turns autocast off, where the torch ops
# need a context), bit for bit its torch ops, with the layer's routing losses (count_per_expert,
# load_balance_loss of this forward's slots, router_z_loss); its backward is one pass over the rows, where
# the torch ops' backward was a dozen autograd nodes (two softmax backwards, the top-k's and gather's
# scatters, the losses', the sums of their gradients, the gate's). Returns the fields of moe_model.Routing,
# then each row's logsumexp (kept for the backward).
_lib.define('softmax_router(Tensor x, Tensor weight, Tensor? expert_bias, int top_k, bool norm_topk, '
            'float temperature, float route_scale) '
            '-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)')
_lib.define('softmax_router_backward(Tensor? grad_weights, Tensor? grad_logits, Tensor? grad_probs, '
            'Tensor? grad_balance, Tensor? grad_z, Tensor x, Tensor weight, Tensor topk_idx, '
            'Tensor topk_weight, Tensor probs, Tensor counts, Tensor lse, bool norm_topk, float temperature, '
            'float route_scale) -> (Tensor, Tensor)')
softmax_router = torch.ops.nanomoe.softmax_router.default


@torch.library.register_fake('nanomoe::softmax_router')
def _(x, weight, expert_bias, top_k, norm_topk, temperature, route_scale):
    (N, E), new = (x.size(0), weight.size(0)), x.new_empty
    return (new(N, top_k, dtype=torch.long), new(N, top_k), new(N, E), new(N, E), new(E, dtype=torch.long),
            new(()), new(()), new(N))


@torch.library.register_fake('nanomoe::softmax_router_backward')
def _(grad_weights, grad_logits, grad_probs, grad_balance, grad_z, x, weight, *saved_and_settings):
    return torch.empty_like(x), torch.empty_like(weight)
