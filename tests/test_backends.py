"""Every fast expert backend against the for-loop reference: outputs and gradients."""
import contextlib
import math
import itertools
import os
import re
import warnings

import pytest
import torch

from conftest import ROOT
from moe_kernels import cpu_grouped_mm
import moe_model
from moe_model import MoEConfig, MoE, EXPERT_IMPLS, batched_experts, loop_experts

FAST = ['grouped', 'batched']  # triton: tests/test_triton.py (under TRITON_INTERPRET=1)


def make_layer(E, k, d, h, bias, seed=0, mlp='gelu'):
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(n_layer=1, n_head=1, n_embd=d, n_expert=E, top_k=k, expert_hidden=h, bias=bias,
                          mlp=mlp, capacity_factor=float(E)))  # capacity = all slots: nothing dropped
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def run(layer, impl, x, force_expert=None):
    """Forward + backward of one MoE layer; returns its output and every gradient."""
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    layer.config.expert_impl = impl
    if force_expert is not None:  # every token to expert `force_expert` (router weights still differentiable)
        orig = layer.router.forward
        def forced(inp):
            r = orig(inp)
            return r.with_topk(torch.full_like(r.topk_idx, force_expert) + torch.arange(r.topk_idx.size(1)))
        layer.router.forward = forced
    y = layer(x)
    (y * torch.randn_like(y, generator=torch.Generator().manual_seed(1))).sum().backward()
    if force_expert is not None:
        del layer.router.forward
    return [y, x.grad] + [p.grad for p in layer.parameters()]


CASES = [  # n_expert, top_k, d, h, bias, batch, seq
    (1, 1, 8, 16, True, 2, 5),
    (4, 1, 12, 20, False, 3, 7),
    (4, 2, 16, 32, True, 2, 9),
    (8, 2, 24, 16, False, 4, 6),
    (8, 3, 8, 24, True, 1, 11),
    (16, 2, 16, 16, True, 1, 3),  # 6 slots over 16 experts: most experts are empty
    (32, 4, 6, 10, False, 2, 4),  # sizes that are not 16-byte aligned
]


@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
@pytest.mark.parametrize('impl', FAST)
@pytest.mark.parametrize('E, k, d, h, bias, B, T', CASES)
def test_backend_matches_loop(impl, E, k, d, h, bias, B, T, mlp):
    layer = make_layer(E, k, d, h, bias, mlp=mlp)
    x = torch.randn(B, T, d)
    ref = run(layer, 'loop', x)
    got = run(layer, impl, x)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
@pytest.mark.parametrize('E, k, d, h, bias, B, T', CASES)
def test_grouped_on_torchs_grouped_mm_matches_loop(monkeypatch, E, k, d, h, bias, B, T, mlp):
    """The grouped backend where cpu_grouped_mm.cpp does not build (or on a GPU): torch's grouped_mm."""
    monkeypatch.setattr(cpu_grouped_mm, '_built', False)
    layer = make_layer(E, k, d, h, bias, mlp=mlp)
    x = torch.randn(B, T, d)
    rows = x.view(-1, d).requires_grad_()
    y, _ = moe_model.grouped_experts(rows, *layer.router(rows)[:2], layer.experts)
    assert 'fused' not in y.grad_fn.name()
    for r, g in zip(run(layer, 'loop', x), run(layer, 'grouped', x)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_grouped_on_the_cpu_is_one_fused_op():
    """Where the kernel builds, grouped's forward is one op (test_backend_matches_loop checks it)."""
    layer = make_layer(4, 2, 8, 16, True)
    x = torch.randn(6, 8, requires_grad=True)
    y, _ = moe_model.grouped_experts(x, *layer.router(x)[:2], layer.experts)
    assert 'FusedExperts' in y.grad_fn.name()  # (its C++ autograd Function, cpu_grouped_mm.cpp)


def test_cpu_grouped_mm_builds():
    # CI has a C++ compiler and ninja: a kernel that stopped building would silently cost the CPU speed
    assert cpu_grouped_mm.available()


@contextlib.contextmanager
def threads(n):
    """n intra-op threads, and uninitialised memory filled with NaN: a row the kernel skips shows."""
    previous, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(n)
    # torch.utils.deterministic.fill_uninitialized_memory is on by default
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize('n_threads', [1, 3])
@pytest.mark.parametrize('sizes', [[5, 0, 9, 2], [0, 0, 7], [40], [0, 0], [13, 1, 0, 30, 0]])
@pytest.mark.parametrize('dtype, a_layout', [(torch.float32, 'rows'), (torch.float32, 'columns'),
                                             (torch.bfloat16, 'rows')])
def test_cpu_grouped_mm_matches_a_matmul_per_group(n_threads, sizes, dtype, a_layout):
    """The kernel and both its gradients against one matmul per group: empty groups (first, last, all),
    one group split over threads, and 3 threads, so that pieces of a group land on different threads."""
    assert cpu_grouped_mm.available()
    torch.manual_seed(0)
    G, K, N = len(sizes), 12, 20
    a = torch.randn(sum(sizes), K, dtype=dtype)
    # 'columns': a non-contiguous a
    a = (a if a_layout == 'rows' else a.t().contiguous().t()).requires_grad_(True)
    b = torch.randn(G, K, N, dtype=dtype, requires_grad=True)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    w = torch.randn(sum(sizes), N, dtype=dtype)
    result = {}
    for name in ('kernel', 'reference'):
        a.grad = b.grad = None
        if name == 'kernel':
            with threads(n_threads):
                out = moe_model.grouped_mm(a, b, offs)
                (out * w).sum().backward()
        else:
            out = torch.cat([rows @ b[g] for g, rows in enumerate(a.split(sizes))])
            (out * w).sum().backward()
        result[name] = [out, a.grad, b.grad]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for got, ref in zip(result['kernel'], result['reference']):
        torch.testing.assert_close(got, ref, **tol)


@pytest.mark.parametrize('n_threads', [2, 3])
@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
def test_grouped_matches_loop_on_several_threads(n_threads, mlp):
    """Experts cut into row slices on different threads, and memory the kernel leaves unwritten as NaN."""
    layer = make_layer(8, 2, 24, 16, True, mlp=mlp)
    x = torch.randn(4, 6, 24)
    ref = run(layer, 'loop', x)
    with threads(n_threads):
        got = run(layer, 'grouped', x)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('n_threads', [2, 3])
@pytest.mark.parametrize('loads', ['even', 'uneven'])
def test_grouped_backward_on_whole_or_cut_experts(n_threads, loads):
    """The fused backward gives each thread whole experts where that shares the rows evenly (even: 6 experts
    of 8 rows), else cuts experts between threads and computes a cut one's weight gradients after (uneven:
    20, 20 and 8 rows in experts 0 to 2, which no split of whole experts shares evenly; 3 to 5 empty)."""
    layer = make_layer(6, 2, 24, 16, True, mlp='gelu')
    x = torch.randn(4, 6, 24)
    n = torch.arange(24)
    if loads == 'even':
        idx = torch.stack([n % 6, (n + 3) % 6], 1)
    else:
        idx = torch.tensor([[0, 1]] * 16 + [[0, 2]] * 4 + [[1, 2]] * 4)
    orig = layer.router.forward
    layer.router.forward = lambda inp: orig(inp).with_topk(idx)
    ref = run(layer, 'loop', x)
    with threads(n_threads):
        got = run(layer, 'grouped', x)
    assert layer.tokens_per_expert.tolist() == ([8] * 6 if loads == 'even' else [20, 20, 8, 0, 0, 0])
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('impl', FAST)
def test_backend_takes_no_tokens(impl):
    """An empty batch: no rows at all, every expert empty; zero weight gradients, as loop's."""
    layer = make_layer(4, 2, 8, 16, True, mlp='swiglu')
    x = torch.randn(0, 8, requires_grad=True)
    topk_idx, topk_weight = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, requires_grad=True)
    grads = []
    for backend in (loop_experts, EXPERT_IMPLS[impl]):
        layer.zero_grad()
        y, _ = backend(x, topk_idx, topk_weight, layer.experts)
        assert y.shape == (0, 8)
        grads.append(torch.autograd.grad(y.sum(), [x, topk_weight] + list(layer.experts.parameters()),
                                         allow_unused=True, materialize_grads=True))
    for r, g in zip(*grads):
        torch.testing.assert_close(g, r)


def test_cpu_grouped_mm_rejects_bad_offsets():
    assert cpu_grouped_mm.available()
    a, b = torch.randn(8, 4), torch.randn(3, 4, 5)
    for offs, message in (([5, 3, 8], 'must not decrease'), ([3, 5, 7], 'must end at the row count 8')):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.nanomoe_cpu.grouped_mm(a, b, torch.tensor(offs, dtype=torch.int32))


def test_cpu_kernel_products_are_torchs_matmul_bit_for_bit():
    """The kernel's float32 products go to BLAS directly (torch's build has MKL), with the operands and
    leading dimensions at::mm would pass: on one thread (the kernel's products each run on one), grouped_mm
    and its weight-gradient product grouped_mm_t give a matmul per group's bits: groups of one row or none,
    one column, an inner size of one, a transposed a."""
    assert cpu_grouped_mm.available() and torch.ops.nanomoe_cpu.blas_direct()
    with threads(1):
        for sizes, K, N in itertools.product([[1], [3, 0, 1, 5], [40, 7, 0, 64]], [1, 2, 17], [1, 3, 64]):
            for a in (torch.randn(sum(sizes), K), torch.randn(K, sum(sizes)).t()):
                b, c = torch.randn(len(sizes), K, N), torch.randn(sum(sizes), N)
                offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
                rows, grads = a.split(sizes), c.split(sizes)
                assert torch.equal(torch.ops.nanomoe_cpu.grouped_mm(a, b, offs),
                                   torch.cat([r @ b[g] for g, r in enumerate(rows)])), (sizes, K, N)
                assert torch.equal(torch.ops.nanomoe_cpu.grouped_mm_t(a, c, offs),
                                   torch.stack([r.t() @ gr for r, gr in zip(rows, grads)])), (sizes, K, N)


def test_cpu_kernel_products_follow_torchs_matmul_precision_and_default_dtype():
    """Where torch's float32 matmul precision lets at::mm run in lower precision (through oneDNN), the
    kernel's products go through at::mm too, so that they stay its bits; back at 'highest', BLAS directly
    again. And the check of the direct path on first use works whatever torch's default dtype is then (a
    process of its own: the check runs once per process)."""
    assert cpu_grouped_mm.available()
    a, b, offs = torch.randn(64, 256), torch.randn(2, 256, 64), torch.tensor([40, 64], dtype=torch.int32)
    with threads(1):
        for precision in ('medium', 'high', 'highest'):
            torch.set_float32_matmul_precision(precision)
            try:
                assert torch.ops.nanomoe_cpu.blas_direct() == (precision == 'highest')
                assert torch.equal(torch.ops.nanomoe_cpu.grouped_mm(a, b, offs),
                                   torch.cat([a[:40] @ b[0], a[40:] @ b[1]])), precision
            finally:
                torch.set_float32_matmul_precision('highest')
    import subprocess
    import sys
    code = ('import torch; from moe_kernels import cpu_grouped_mm; assert cpu_grouped_mm.available(); '
            'torch.set_default_dtype(torch.float64); a, b = torch.randn(6, 4), torch.randn(2, 4, 3); '
            'o = torch.tensor([3, 6], dtype=torch.int32); '
            'got = torch.ops.nanomoe_cpu.grouped_mm(a.float(), b.float(), o); '
            'print(torch.ops.nanomoe_cpu.blas_direct(), '
            'torch.allclose(got.double(), torch.cat([a[:3] @ b[0], a[3:] @ b[1]]), atol=1e-5))')
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ['True', 'True'], p.stderr[-2000:]


def test_grouped_mm_double_backward_matches_a_matmul_per_group():
    """grouped_mm's backward is made of grouped_mm ops, so it is differentiable again (e.g. gradient
    penalties)."""
    sizes, a, b = [3, 0, 5], torch.randn(8, 4, requires_grad=True), torch.randn(3, 4, 5, requires_grad=True)
    grads = []
    for fn in (lambda: moe_model.grouped_mm(a, b, torch.tensor(sizes).cumsum(0).to(torch.int32)),
               lambda: torch.cat([rows @ b[g] for g, rows in enumerate(a.split(sizes))])):
        (grad_a,) = torch.autograd.grad(fn().square().sum(), a, create_graph=True)
        grads.append(torch.autograd.grad(grad_a.square().sum(), (a, b)))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def second_derivative(layer, impl, x):
    """x's gradient built as a graph (create_graph), and its own gradient: a Hessian-vector product."""
    layer.config.expert_impl = impl
    x = x.clone().requires_grad_(True)
    y = layer(x)
    g, = torch.autograd.grad((y ** 2).sum() + layer.balance_loss + layer.z_loss, x, create_graph=True)
    return g, torch.autograd.grad((g ** 2).sum(), x)[0]


@pytest.mark.parametrize('loss', ['square', 'linear'])
def test_fused_cpu_ops_refuse_second_derivatives(loss):
    """The fused ops' backwards have no autograd of their own: differentiating their gradients again is an
    error that names the way out (not zeros, as torch's fallback gives), with respect to x or a weight, also
    where the loss is linear in the output (its incoming gradient needs none); their gradients are right."""
    layer = make_layer(4, 2, 8, 16, True)
    layer.config.expert_impl = 'grouped'
    assert cpu_grouped_mm.available()
    error = (r'nanomoe::\w+: second derivatives \(create_graph=True\) are not implemented '
             r'.*NANOMOE_CPU_GROUPED_MM=0')
    f = (lambda y: y.pow(2).sum()) if loss == 'square' else (lambda y: (y * torch.linspace(-1, 1, 8)).sum())
    for wrt in (lambda x: x, lambda x: layer.experts.c_fc, lambda x: layer.router.gate.weight):
        x = torch.randn(2, 5, 8, requires_grad=True)
        g, = torch.autograd.grad(f(layer(x)), wrt(x), create_graph=True)
        with pytest.raises(RuntimeError, match=error):
            torch.autograd.grad(g.pow(2).sum(), wrt(x))
        plain, = torch.autograd.grad(f(layer(x)), wrt(x))
        torch.testing.assert_close(g, plain, rtol=0, atol=0)


@pytest.mark.parametrize('logit', [1e30, float('inf'), float('-inf')])
def test_fused_router_z_loss_of_huge_or_infinite_logits_is_torchs(logit):
    """A z-loss past float's range is inf, as torch's ops give it, not an error; so is one of a row with an
    infinite logit, whose logsumexp the fused router cannot take from its softmax."""
    router = moe_model.Router(MoEConfig(n_layer=1, n_head=1, n_embd=2, n_expert=2, top_k=1))
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[logit, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0]])  # logits [logit, 0]
    assert cpu_grouped_mm.available()
    fused = router(x)
    assert fused.logits[0, 0] == logit
    z = moe_model.router_z_loss(fused.logits)
    assert torch.equal(fused.z_loss, z) and z.item() == (float('inf') if logit > 0 else 0.0)


@pytest.mark.parametrize('impl', FAST)
def test_second_derivatives_match_loop_on_torchs_ops(monkeypatch, impl):
    """With NANOMOE_CPU_GROUPED_MM=0 (torch's ops), Hessian-vector products through the router, its losses
    and each backend match loop's."""
    monkeypatch.setattr(cpu_grouped_mm, '_built', False)
    layer = make_layer(4, 2, 8, 16, True)
    x = torch.randn(2, 5, 8)
    for r, g in zip(second_derivative(layer, 'loop', x), second_derivative(layer, impl, x)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-3)


def test_cpu_grouped_mm_falls_back_with_one_warning_when_it_cannot_build(monkeypatch, tmp_path):
    import torch.utils.cpp_extension
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))  # nothing built there yet

    def no_compiler(*args, **kwargs):  # what torch raises: the failed command first, the reason further down
        raise RuntimeError("Error building extension 'nanomoe_cpu_grouped_mm': "
                           "[1/2] c++ -MMD -O3 -c cpu_grouped_mm.cpp\nFAILED: cpu_grouped_mm.o\n/bin/sh: 1: "
                           "c++: not found\nninja: build stopped: subcommand failed.")
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', no_compiler)
    monkeypatch.setattr(cpu_grouped_mm, '_built', None)
    with pytest.warns(UserWarning,
                      match=r"did not build \(/bin/sh: 1: c\+\+: not found\).*torch's grouped_mm"):
        assert not cpu_grouped_mm.available()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once per process
        assert not cpu_grouped_mm.available()
    monkeypatch.setattr(cpu_grouped_mm, '_built', None)
    monkeypatch.setenv('NANOMOE_CPU_GROUPED_MM', '0')  # switched off: torch's grouped_mm, and no warning
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not cpu_grouped_mm.available()


@pytest.mark.slow
def test_a_built_cpu_kernel_loads_without_the_build_lock(tmp_path):
    """A kill -9 during the (no-op) build of an earlier start left the lock: the built library still loads,
    directly, at once (torch's load() would wait on that lock forever)."""
    import shutil
    import subprocess
    import sys
    assert cpu_grouped_mm.available()
    env = {**os.environ, 'TORCH_EXTENSIONS_DIR': str(tmp_path)}
    folder = subprocess.run([sys.executable, '-c', 'from moe_kernels import cpu_grouped_mm; '
                                                   'print(cpu_grouped_mm.build_folder())'],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    os.makedirs(folder)
    shutil.copy(os.path.join(cpu_grouped_mm.build_folder(), 'nanomoe_cpu_grouped_mm.so'), folder)
    open(os.path.join(folder, 'lock'), 'w').close()
    p = subprocess.run([sys.executable, '-c', 'from moe_kernels import cpu_grouped_mm; '
                                              'print(cpu_grouped_mm.available())'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == 'True', p.stderr


def test_a_live_build_is_waited_on_for_a_bounded_time(monkeypatch, tmp_path):
    """(A killed build is built again at once: tests/test_faults.py.)"""
    import fcntl
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    monkeypatch.setattr(cpu_grouped_mm, '_built', None)
    monkeypatch.setattr(cpu_grouped_mm, 'BUILD_WAIT_S', 1)
    folder = cpu_grouped_mm.build_folder()
    os.makedirs(folder)
    with open(folder + '.lock', 'a') as other:  # another process building it, hung
        fcntl.flock(other, fcntl.LOCK_EX)
        message = ("gave up after 1 s waiting for another build of cpu_grouped_mm.cpp (the process that "
                   f"holds {folder}.lock)")
        with pytest.warns(UserWarning, match=re.escape(message)):
            assert not cpu_grouped_mm.available()


@pytest.mark.parametrize('impl', FAST)
@pytest.mark.parametrize('k', [1, 2])
def test_backend_matches_loop_when_all_tokens_pick_one_expert(impl, k):
    layer = make_layer(8, k, 16, 32, True)
    x = torch.randn(2, 8, 16)
    ref = run(layer, 'loop', x, force_expert=3)
    got = run(layer, impl, x, force_expert=3)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    assert layer.tokens_per_expert.tolist()[3] == 16


@pytest.mark.parametrize('impl', FAST)
@pytest.mark.parametrize('d, h', [(16, 32), (6, 10)])  # (6, 10): grouped zero-pads to 16-byte rows
def test_backend_takes_a_stride_0_output_gradient(impl, d, h):
    # y.sum() sends back a gradient with stride 0, which grouped_mm's backward rejects if it reaches it
    layer = make_layer(4, 2, d, h, True)
    grads = {}
    for name in ('loop', impl):
        layer.zero_grad()
        layer.config.expert_impl = name
        x = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(3), requires_grad=True)
        layer(x).sum().backward()
        grads[name] = [x.grad] + [p.grad for p in layer.parameters()]
    for r, g in zip(grads['loop'], grads[impl]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_batched_drops_exactly_the_slots_over_capacity():
    torch.manual_seed(0)
    E, k, N, d = 4, 2, 10, 8
    layer = make_layer(E, k, d, 16, True)
    layer.config.capacity_factor = 1.0
    capacity = math.ceil(1.0 * N * k / E)  # 5 slots per expert
    # token-major priority: expert 0 is everybody's first choice, so tokens 5.. lose their slot there
    idx = torch.stack([torch.zeros(N, dtype=torch.long), torch.arange(N) % (E - 1) + 1], dim=1)
    w = torch.rand(N, k, requires_grad=True)
    x = torch.randn(N, d)
    y, drop_fraction = batched_experts(x, idx, w, layer.experts)
    seen, keep = {}, torch.zeros(N, k, dtype=torch.bool)
    for n in range(N):
        for j in range(k):
            e = idx[n, j].item()
            keep[n, j] = seen.get(e, 0) < capacity
            seen[e] = seen.get(e, 0) + 1
    assert drop_fraction.item() * N * k == (~keep).sum().item() == N - capacity
    ref, _ = loop_experts(x, idx, w * keep, layer.experts)  # dropped slots weigh zero
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # and their router weights get no gradient
    y.sum().backward()
    assert torch.all(w.grad[~keep] == 0) and torch.all(w.grad[keep] != 0)


def test_batched_capacity_is_causal_in_position():
    # a token's output may not depend on tokens at later positions (of any sequence in the batch)
    layer = make_layer(4, 2, 16, 16, False)
    layer.config.capacity_factor = 0.5
    layer.config.expert_impl = 'batched'
    x = torch.randn(3, 12, 16)
    y_full = layer(x)
    x2 = x.clone()
    x2[:, 8:] = torch.randn(3, 4, 16)  # change only positions 8..11
    y_prefix = layer(x2)
    torch.testing.assert_close(y_full[:, :8], y_prefix[:, :8])
    assert 0 < float(layer.drop_fraction) < 1


def test_every_backend_is_registered_and_shares_parameters():
    assert set(EXPERT_IMPLS) == {'loop', 'grouped', 'batched', 'triton'}
    a = MoE(MoEConfig(n_layer=1, n_head=1, n_embd=8, n_expert=4, top_k=2, expert_impl='loop'))
    b = MoE(MoEConfig(n_layer=1, n_head=1, n_embd=8, n_expert=4, top_k=2, expert_impl='batched'))
    assert a.state_dict().keys() == b.state_dict().keys()


def test_grouped_runs_its_gemms_in_the_autocast_dtype():
    """Under bf16 autocast the grouped GEMMs run in bf16, like loop's matmuls (grouped_mm is not on
    autocast's list on every device): close to loop under autocast, not equal to grouped in float32."""
    layer = make_layer(E=4, k=2, d=24, h=40, bias=True)
    x = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(2))
    out = {}
    for impl in ('loop', 'grouped'):
        layer.config.expert_impl = impl
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out[impl] = layer(x).detach()
    out['fp32'] = layer(x).detach()
    scale = out['fp32'].abs().mean()
    torch.testing.assert_close(out['grouped'], out['loop'], atol=0.05 * scale, rtol=0.05)
    assert (out['grouped'] - out['fp32']).abs().max() > 1e-4 * scale  # it did not run in float32


MODERN = dict(norm='rmsnorm', rope=True, mlp='swiglu', qk_norm='head', n_kv_head=1, tie_embeddings=False)


def compiled_step_matches_eager(impl, dtype=torch.float32, checkpointing='none', block=None):
    """A training step of a small MoE model (forward, cross-entropy + aux losses, backward) under
    torch.compile: no graph break (dynamo's counters), and the loss and every gradient equal eager's (eager
    without activation checkpointing; the compiled step with `checkpointing`).
    aot_eager traces as inductor does (fake tensors, AOT autograd) without needing a C++ compiler."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from moe_model import build_model
    torch.manual_seed(0)
    model = build_model(dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_expert=4,
                             top_k=2, expert_hidden=32, expert_impl=impl, bias=True, n_shared_expert=1,
                             **(block or {}))).to(dtype)
    x, y = torch.randint(64, (4, 16)), torch.randint(64, (4, 16))
    results = []
    for step in (model, torch.compile(model, backend='aot_eager')):
        model.set_activation_checkpointing('none' if step is model else checkpointing)
        torch._dynamo.reset()
        counters.clear()
        model.zero_grad()
        _, loss = step(x, y)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    assert not counters['graph_break'], dict(counters['graph_break'])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for r, g in zip(*results):
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize('impl, dtype, checkpointing, block', [
    ('grouped', torch.float32, 'none', None), ('grouped', torch.bfloat16, 'none', None),
    ('batched', torch.float32, 'none', None), ('grouped', torch.float32, 'all', None),
    ('grouped', torch.float32, 'none', MODERN), ('batched', torch.float32, 'all', MODERN)])
@pytest.mark.slow
def test_compiled_training_step_has_no_graph_break(impl, dtype, checkpointing, block):
    """The grouped GEMMs are custom ops (moe_model.grouped_mm): compile traces them in every dtype, on the CPU
    kernel too, and with activation checkpointing; with GPT-2's block and the modern one (swiglu experts)."""
    compiled_step_matches_eager(impl, dtype, checkpointing, block)


@pytest.mark.parametrize('device, capability, triton, dtype, hidden, expected, why', [
    ('cpu', None, True, 'float32', 64, 'grouped', None),
    ('cuda', (9, 0), True, 'bfloat16', 64, 'grouped', None),      # H100/H200: torch's fused grouped_mm
    ('cuda', (9, 0), False, 'bfloat16', 24, 'grouped', None),
    ('cuda', (9, 0), True, 'float16', 64, 'triton', None),        # ... which is bfloat16-only
    ('cuda', (9, 0), False, 'float16', 64, 'grouped', 'triton is not installed'),
    ('cuda', (9, 0), True, 'float16', 24, 'grouped', 'divisible by 16'),
    ('cuda', (9, 0), True, 'float32', 64, 'grouped', 'does not list sm90 with float32'),  # 256 KiB > 227
    ('cuda', (10, 0), True, 'bfloat16', 64, 'grouped', None),     # B200
    # not checked ahead
    ('cuda', (10, 0), True, 'float16', 64, 'grouped', 'does not list sm100 with float16'),
    ('cuda', (10, 0), True, 'float32', 64, 'grouped', 'does not list sm100 with float32'),
    # RTX 50xx: no fused kernel
    ('cuda', (12, 0), True, 'bfloat16', 64, 'grouped', 'does not list sm120 with bfloat16'),
    ('cuda', (8, 0), True, 'bfloat16', 64, 'triton', None),       # A100
    ('cuda', (8, 0), False, 'bfloat16', 64, 'grouped', 'triton is not installed'),
    ('cuda', (8, 0), True, 'float16', 24, 'grouped', 'divisible by 16'),
    ('cuda', (7, 0), True, 'float16', 64, 'triton', None),        # V100: fp16
    ('cuda', (7, 0), True, 'bfloat16', 64, 'grouped', 'sm70 has no tensor cores for bfloat16'),
    ('cuda', (8, 0), True, 'float32', 64, 'grouped', 'does not list sm80 with float32'),  # 192 KiB > 163
    ('cuda', (8, 6), True, 'bfloat16', 64, 'triton', None),       # A10, RTX 30xx
    # not checked ahead: not used
    ('cuda', (8, 7), True, 'float16', 64, 'grouped', 'does not list sm87 with float16'),
])
def test_auto_expert_impl_for_each_gpu(monkeypatch, device, capability, triton, dtype, hidden, expected, why):
    import importlib.util
    from moe_kernels import auto_expert_impl
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: (object() if triton else None)
                        if name == 'triton'
                        else find_spec(name, *a))
    impl, warning = auto_expert_impl(device, dtype, hidden)
    assert impl == expected and (warning is None if why is None else why in warning and 'slow' in warning)
    if warning:  # on the GPUs with torch's fused grouped GEMM, the warning says why it is not used
        assert ('its fused kernel is bfloat16-only' in warning) == (capability[0] in (9, 10)), warning
