"""
Tests for the block-sparse Triton experts (moe_kernels/moe_triton.py). On a machine without CUDA the
kernels run under the Triton interpreter (TRITON_INTERPRET=1), so shapes are tiny; on a GPU they run
compiled, on CUDA tensors (tests/test_cuda.py has the GPU-only checks).
"""
import importlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels are defined
triton = pytest.importorskip("triton", reason="triton is not installed (optional dependency: "
                                              "pip install triton)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_model  # noqa: E402
from moe_model import loop_experts  # noqa: E402  (the reference)
from moe_kernels import moe_triton as mt  # noqa: E402

if mt._interpret() != mt._KERNELS_INTERPRETED:
    mt = importlib.reload(mt)  # imported earlier (e.g. via moe_model) before TRITON_INTERPRET was set

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = 16  # tiny topology blocks keep the interpreter fast

# The interpreter runs the kernels on numpy, and some releases of the two do not work together; on a GPU
# the kernels run compiled and numpy plays no part. (Triton
# major.minor, the first numpy release it fails with): Triton 3.6 with numpy 2.4 ("TypeError: only
# 0-dimensional arrays can be converted to Python scalars")
INTERPRETER_FAILS_WITH = {(3, 6): (2, 4)}
major_minor = lambda version: tuple(int(n) for n in re.findall(r"\d+", version)[:2])
_numpy_from = INTERPRETER_FAILS_WITH.get(major_minor(triton.__version__))
kernels_run = pytest.mark.skipif(  # the tests that run the kernels
    DEVICE == "cpu" and _numpy_from is not None and major_minor(np.__version__) >= _numpy_from,
    reason=f"Triton {triton.__version__}'s interpreter fails with numpy {np.__version__} (numpy >= "
           f"{'.'.join(map(str, _numpy_from or ()))}); on a GPU these kernels run compiled")

@pytest.fixture(autouse=True)
def _kernel_settings(monkeypatch):
    monkeypatch.setattr(mt, "BLOCK_SIZE", B)
    monkeypatch.setattr(mt, "MIN_TRITON_SLOTS", 0)  # force the kernels even for tiny batches
    # exact fp32 on GPU (the kernels and torch's matmuls), so the tight tolerances below hold
    if DEVICE == "cuda":
        # torch >= 2.9's API where it exists (the legacy flag's reads can raise)
        matmul = torch.backends.cuda.matmul
        monkeypatch.setattr(matmul, *(("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else
                                      ("allow_tf32", False)))

# -----------------------------------------------------------------------------
# reference and experts module

def Experts(n_expert, d, h, bias, dtype=torch.float32, mlp="gelu"):
    """moe_model's Experts with random weights (large enough that every product matters)."""
    experts = moe_model.Experts(moe_model.MoEConfig(n_layer=1, n_head=1, n_embd=d, n_expert=n_expert, top_k=1,
                                                    expert_hidden=h, bias=bias, mlp=mlp))
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
    return experts.to(device=DEVICE, dtype=dtype)

def make_routing(N, E, k, mode):
    if mode == "random":
        idx = torch.stack([torch.randperm(E)[:k]
                           for _ in range(N)]) if k <= E else torch.randint(0, E, (N, k))
    elif mode == "empty":  # only experts 1, 4, 6 get tokens: the others are empty
        allowed = torch.tensor([1, 4, 6])
        idx = allowed[torch.stack([torch.randperm(3)[:k] for _ in range(N)])]
    elif mode == "one":  # every slot of every token goes to expert E-1
        idx = torch.full((N, k), E - 1)
    weight = torch.softmax(torch.randn(N, k), -1)
    return idx.to(DEVICE), weight.to(DEVICE).requires_grad_()

def run_and_grads(fn, x, idx, weight, experts, seed=123):
    y, n_dropped = fn(x, idx, weight, experts)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    leaves = [x, weight] + [p for p in (experts.c_fc, experts.c_proj, experts.c_fc_bias, experts.c_proj_bias)
                            if p is not None]
    grads = torch.autograd.grad((y.float() * g.float()).sum(), leaves)
    return y, n_dropped, grads

def assert_close_all(a, b, atol=1e-5, rtol=1e-4):
    for i, (u, v) in enumerate(zip(a, b)):
        torch.testing.assert_close(u, v, atol=atol, rtol=rtol, msg=lambda m: f"tensor {i}: {m}")

# -----------------------------------------------------------------------------
# topology and the raw kernels against dense torch

def dense_mats(topo, E, d, h):
    w1 = torch.randn(E, d, h, device=DEVICE)
    w2 = torch.randn(E, h, d, device=DEVICE)
    W1 = w1.permute(1, 0, 2).reshape(d, E * h)  # [d, E*h]: expert e's columns are e*h:(e+1)*h
    W2 = w2.reshape(E * h, d)
    nnz = topo.row_idx.numel()
    mask = mt.blocks_to_dense(torch.ones(nnz, B, B, device=DEVICE), topo)
    return w1, w2, W1, W2, mask

def test_topology():
    torch.manual_seed(0)
    E, h, N, k = 4, 32, 13, 2
    idx = torch.tensor([0, 2] * 6 + [2] * 14, device=DEVICE).reshape(N, k)  # experts 1 and 3 are empty
    topo = mt.make_topology(idx, E, h, B)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    real_rows = int(((counts + B - 1) // B * B).sum())  # padded per expert: 16 + 32
    assert topo.n_rows == (N * k + E * (B - 1)) // B * B  # the worst case: no size depends on the routing
    assert (topo.row_src[topo.pos] == topo.order // k).all()  # each slot's row reads its token
    assert (topo.row_expert[topo.pos] == idx.reshape(-1)[topo.order]).all()  # ... in its expert's rows
    assert (topo.row_src == N).sum() == topo.n_rows - N * k  # the rest is padding (zero rows)
    nb = h // B
    block_expert = topo.col_idx.long() // nb
    assert (block_expert == topo.row_expert[topo.row_idx.long() * B]).all()  # row block -> one expert
    real = topo.row_idx.long() < real_rows // B
    assert set(block_expert[real].tolist()) == {0, 2}  # empty experts own no real blocks
    assert (block_expert[~real] == E - 1).all()  # the tail's zero rows go to the last expert
    assert (topo.offsets_t.diff().reshape(E, nb)[1] == 0).all()
    # the transposed topology lists every block once, grouped by column
    t = topo.block_offsets_t.long()
    assert sorted(t.tolist()) == list(range(topo.row_idx.numel()))
    cols = topo.col_idx.long()[t]
    assert (cols.diff() >= 0).all()

@pytest.mark.parametrize("d", [16, 24])  # 24: d need not be a multiple of the kernel tiles
@kernels_run
def test_kernels_match_dense(d):
    torch.manual_seed(1)
    E, h, N, k = 4, 32, 11, 2
    idx, _ = make_routing(N, E, k, "random")
    idx[idx == 1] = 0  # expert 1 empty (the last expert also owns the worst-case tail)
    topo = mt.make_topology(idx, E, h, B)
    P = topo.n_rows
    w1, w2, W1, W2, mask = dense_mats(topo, E, d, h)
    a = torch.randn(P, d, device=DEVICE)
    tol = dict(atol=1e-4, rtol=1e-4)
    # SDD: dense x dense -> blocks; and with the weight transposed (grad of act = grad_out @ w2^T)
    data = mt.sdd(a, w1, *topo.tensors())
    torch.testing.assert_close(mt.blocks_to_dense(data, topo), (a @ W1) * mask, **tol)
    torch.testing.assert_close(mt.blocks_to_dense(mt.sdd(a, w2, *topo.tensors(), trans_w=True), topo),
                               (a @ W2.T) * mask, **tol)
    # DSD: blocks x dense -> dense; and transposed (grad of x = grad_h @ w1^T)
    H = mt.blocks_to_dense(data, topo)
    torch.testing.assert_close(mt.dsd(data, w2, *topo.tensors()), H @ W2, **tol)
    torch.testing.assert_close(mt.dsd(data, w1, *topo.tensors(), trans_w=True), H @ W1.T, **tol)
    # TSD: the weight gradients act^T @ grad_out (-> [E, h, d]) and x^T @ grad_h (-> [E, d, h])
    torch.testing.assert_close(mt.tsd(data, a, *topo.tensors(), E), (H.T @ a).reshape(E, h, d), **tol)
    torch.testing.assert_close(mt.tsd(data, a, *topo.tensors(), E, trans_out=True),
                               (a.T @ H).reshape(d, E, h).transpose(0, 1), **tol)
    # empty expert: zero gradient, written by the kernel
    assert (mt.tsd(data, a, *topo.tensors(), E)[1] == 0).all()

@kernels_run
def test_sdd_dsd_autograd():
    torch.manual_seed(2)
    E, d, h, N, k = 4, 24, 32, 9, 2
    idx, _ = make_routing(N, E, k, "random")
    topo = mt.make_topology(idx, E, h, B)
    w1, w2, W1, W2, mask = dense_mats(topo, E, d, h)
    a = torch.randn(topo.n_rows, d, device=DEVICE, requires_grad=True)
    w1.requires_grad_(), w2.requires_grad_()
    g = torch.randn(topo.n_rows, d, device=DEVICE)
    out = mt.dsd(torch.tanh(mt.sdd(a, w1, *topo.tensors())), w2, *topo.tensors())
    grads = torch.autograd.grad((out * g).sum(), [a, w1, w2])
    W1r = w1.permute(1, 0, 2).reshape(d, E * h)
    ref = (torch.tanh(a @ W1r) * mask) @ w2.reshape(E * h, d)
    ref_grads = torch.autograd.grad((ref * g).sum(), [a, w1, w2])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert_close_all(grads, ref_grads, atol=1e-4, rtol=1e-4)

# -----------------------------------------------------------------------------
# triton_experts against the loop reference

CASES = [  # (n_expert, top_k, bias, routing, n_tokens)
    (1, 1, True, "random", 7),
    (4, 1, False, "random", 12),
    (4, 2, True, "random", 12),
    (8, 2, False, "random", 20),
    (8, 1, True, "empty", 10),
    (8, 2, False, "empty", 10),
    (4, 1, True, "one", 9),
    (4, 2, False, "one", 9),  # both slots of every token -> one expert
]

@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("E,k,bias,routing,N", CASES)
@kernels_run
def test_triton_experts_matches_loop(E, k, bias, routing, N, mlp):
    torch.manual_seed(3)
    d, h = 24, 32
    experts = Experts(E, d, h, bias, mlp=mlp)
    x = torch.randn(N, d, device=DEVICE, requires_grad=True)
    idx, weight = make_routing(N, E, k, routing)
    y, n_dropped, grads = run_and_grads(mt.triton_experts, x, idx, weight, experts)
    y_ref, _, grads_ref = run_and_grads(loop_experts, x, idx, weight, experts)
    assert n_dropped == 0 and y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    assert_close_all(grads, grads_ref)
    empty = torch.bincount(idx.reshape(-1), minlength=E) == 0
    if empty.any():  # experts without tokens get exactly zero weight gradients
        assert (grads[2][empty] == 0).all() and (grads[3][empty] == 0).all()

@kernels_run
def test_kernel_path_is_used(monkeypatch):
    calls = []
    real = mt.block_sparse_experts
    monkeypatch.setattr(mt, "block_sparse_experts", lambda *a: calls.append(1) or real(*a))
    experts = Experts(2, 16, 32, True)
    idx, weight = make_routing(5, 2, 2, "random")
    mt.triton_experts(torch.randn(5, 16, device=DEVICE), idx, weight, experts)
    assert calls == [1]

@kernels_run
def test_block_size_64():
    # the default rule picks the largest block size dividing h; here B=64 with h=64
    mt.BLOCK_SIZE = None  # restored by the fixture's monkeypatch
    torch.manual_seed(4)
    E, d, h, N, k = 3, 16, 64, 6, 2
    assert mt._block_size(h) == 64
    experts = Experts(E, d, h, True)
    x = torch.randn(N, d, device=DEVICE, requires_grad=True)
    idx, weight = make_routing(N, E, k, "random")
    _, _, grads = run_and_grads(mt.triton_experts, x, idx, weight, experts)
    _, _, grads_ref = run_and_grads(loop_experts, x, idx, weight, experts)
    assert_close_all(grads, grads_ref)

@kernels_run
def test_half_precision():
    # 16-bit inputs with fp32 accumulation. fp16 stands in for bf16 here: the Triton interpreter's
    # tl.dot does not handle bf16 (numpy has no bf16), on CUDA bf16 is exercised the same way.
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    torch.manual_seed(5)
    E, d, h, N, k = 4, 16, 32, 10, 2
    experts = Experts(E, d, h, True, dtype=dtype)
    x = torch.randn(N, d, device=DEVICE, dtype=dtype, requires_grad=True)
    idx, weight = make_routing(N, E, k, "random")
    y, _, grads = run_and_grads(mt.triton_experts, x, idx, weight, experts)
    y_ref, _, grads_ref = run_and_grads(loop_experts, x, idx, weight, experts)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, atol=3e-2, rtol=3e-2)
    assert_close_all(grads, grads_ref, atol=5e-2, rtol=5e-2)

# -----------------------------------------------------------------------------
# fallbacks and shape rules

@pytest.mark.parametrize("E,k,bias,routing,N", [(4, 2, True, "random", 6), (8, 1, False, "empty", 5)])
def test_tiny_batch_fallback(monkeypatch, E, k, bias, routing, N):
    monkeypatch.setattr(mt, "MIN_TRITON_SLOTS", 256)  # the default rule: N*k < 256 -> torch path
    monkeypatch.setattr(mt, "block_sparse_experts", lambda *a: pytest.fail("kernels used for a tiny batch"))
    torch.manual_seed(6)
    d, h = 16, 32
    experts = Experts(E, d, h, bias)
    x = torch.randn(N, d, device=DEVICE, requires_grad=True)
    idx, weight = make_routing(N, E, k, routing)
    assert not mt._use_kernels(x, idx.numel())
    y, n_dropped, grads = run_and_grads(mt.triton_experts, x, idx, weight, experts)
    y_ref, _, grads_ref = run_and_grads(loop_experts, x, idx, weight, experts)
    assert n_dropped == 0
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    assert_close_all(grads, grads_ref)

def test_fallback_rule():
    x = torch.randn(4, 16, device=DEVICE)
    assert mt._use_kernels(x, 8)  # MIN_TRITON_SLOTS = 0 here
    assert not mt._use_kernels(x, 0)  # empty batch
    mt.MIN_TRITON_SLOTS = 9  # restored by the fixture
    assert not mt._use_kernels(x, 8) and mt._use_kernels(x, 9)

def test_empty_batch():
    experts = Experts(4, 16, 32, True)
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    idx = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    weight = torch.zeros(0, 2, device=DEVICE, requires_grad=True)
    y, n_dropped = mt.triton_experts(x, idx, weight, experts)
    assert y.shape == (0, 16) and n_dropped == 0

def test_bad_hidden_size():
    experts = Experts(2, 16, 40, False)  # h=40 is not a multiple of 16
    idx, weight = make_routing(4, 2, 1, "random")
    mt.BLOCK_SIZE = None
    with pytest.raises(ValueError, match="h=40"):
        mt.triton_experts(torch.randn(4, 16, device=DEVICE), idx, weight, experts)
    mt.BLOCK_SIZE = 32  # an explicit block size must divide h too
    with pytest.raises(ValueError, match="BLOCK_SIZE=32"):
        mt.triton_experts(torch.randn(4, 16, device=DEVICE), idx, weight, Experts(2, 16, 48, False))


@kernels_run
def test_moe_layer_with_triton_backend_matches_loop():
    """The wiring: MoE(expert_impl='triton') goes through moe_model's table to these kernels."""
    from moe_model import MoE, MoEConfig
    torch.manual_seed(0)
    layer = MoE(MoEConfig(n_layer=1, n_head=1, n_embd=16, n_expert=4, top_k=2, expert_hidden=32, bias=True))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    layer.to(DEVICE)  # (CPU tensors on a GPU machine would take the loop path: loop against loop)
    x = torch.randn(2, 6, 16, device=DEVICE)
    outs = []
    for impl in ("loop", "triton"):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        layer.config.expert_impl = impl
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        outs.append([y, xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@kernels_run
@pytest.mark.parametrize("block", ["gpt2", "modern"])
def test_compiled_training_step_has_no_graph_break(block):
    """The block-sparse products are custom ops (and the topology has static shapes, no host sync): compile
    traces the whole model with the triton backend, and its step equals eager's; with GPT-2's block and the
    modern one (RMSNorm, RoPE, qk_norm, SwiGLU experts: three products per expert, not two)."""
    if DEVICE == "cuda":
        pytest.skip("a CPU model runs interpreted kernels only; "
                    "tests/test_cuda.py compiles triton on the GPU")
    from test_backends import MODERN, compiled_step_matches_eager
    compiled_step_matches_eager("triton", block=MODERN if block == "modern" else None)


@kernels_run
def test_activation_checkpointing_recomputes_the_triton_experts_exactly():
    """activation_checkpointing='all' with the triton backend: the same loss and gradients, less kept."""
    from test_model import test_activation_checkpointing_keeps_less_and_gives_the_same_gradients as check
    check("triton", "topk", "all", {}, device=DEVICE)
