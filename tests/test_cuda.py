"""Checks that need a CUDA GPU (marker `cuda`: skipped, not failed, without one). gpu_check.py runs them,
with tests/test_triton.py, whose kernels then run compiled on the GPU instead of interpreted."""
import importlib.util

import pytest
import torch

from moe_kernels import auto_expert_impl
from moe_model import EXPERT_IMPLS, MoE, MoEConfig, build_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]
FAST = [i for i in EXPERT_IMPLS if i != 'loop' and (i != 'triton' or importlib.util.find_spec('triton'))]
DTYPES = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                            else [])


def layer_step(layer, impl, x, dtype):
    """Forward + backward of one MoE layer under autocast; its output and every gradient."""
    layer.zero_grad()
    layer.config.expert_impl = impl
    x = x.clone().requires_grad_(True)
    with torch.autocast('cuda', dtype=dtype):
        y = layer(x)
    (y.float() * torch.randn(y.shape, device='cuda',
                             generator=torch.Generator('cuda').manual_seed(1))).sum().backward()
    return [y.float()] + [t.grad.float() for t in (x, *layer.parameters())]


# 64 x 128: fine-grained experts
@pytest.mark.parametrize('E, k, d, h', [(8, 2, 256, 512), (64, 8, 128, 128)])
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('impl', FAST)
def test_backend_matches_loop_on_the_gpu(impl, dtype, E, k, d, h):
    torch.manual_seed(0)
    layer = MoE(MoEConfig(n_layer=1, n_head=1, n_embd=d, n_expert=E, top_k=k, expert_hidden=h, bias=True,
                          capacity_factor=float(E))).cuda()  # capacity = every slot: batched drops nothing
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(4, 256, d, device='cuda')
    ref, got = layer_step(layer, 'loop', x, dtype), layer_step(layer, impl, x, dtype)
    for i, (r, g) in enumerate(zip(ref, got)):  # both round to 16 bits, in different orders
        torch.testing.assert_close(g, r, rtol=0.05, atol=0.05 * r.abs().mean().item() + 1e-6,
                                   msg=lambda m: f'tensor {i}: {m}')


@pytest.mark.parametrize('impl', [i for i in FAST if i != 'batched'])  # (batched: the CPU tests compile it)
def test_compiled_step_has_no_graph_break_and_matches_eager_on_the_gpu(impl):
    """Inductor on the GPU: no graph break in a training step, and eager's loss and gradients (bf16
    autocast)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = build_model(dict(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=256, n_expert=8,
                             top_k=2, expert_hidden=256, expert_impl=impl, capacity_factor=8.0)).cuda()
    x, y = torch.randint(256, (8, 128), device='cuda'), torch.randint(256, (8, 128), device='cuda')
    dtype = DTYPES[-1]
    results = []
    for step in (model, torch.compile(model)):
        torch._dynamo.reset()
        counters.clear()
        model.zero_grad()
        with torch.autocast('cuda', dtype=dtype):
            _, loss = step(x, y)
        loss.backward()
        results.append([loss.detach().float()] + [p.grad.float() for p in model.parameters()])
    assert not counters['graph_break'], dict(counters['graph_break'])
    for r, g in zip(*results):
        torch.testing.assert_close(g, r, rtol=0.05, atol=0.05 * r.abs().mean().item() + 1e-6)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('impl', EXPERT_IMPLS if importlib.util.find_spec('triton')
                         else [i for i in EXPERT_IMPLS if i != 'triton'])
def test_an_empty_expert_gets_exactly_zero_weight_gradients(impl, dtype):
    """Experts 0, 5 and 7 (the first, a middle and the last group) get no token: their weight gradients must
    be exactly zero, on every backend. Empty groups are where grouped GEMM kernels have written garbage into
    the weight gradient (CUTLASS issue 2674), and torch's bf16 grouped_mm on sm90+ is such a kernel."""
    torch.manual_seed(0)
    E, empty = 8, [0, 5, 7]
    layer = MoE(MoEConfig(n_layer=1, n_head=1, n_embd=256, n_expert=E, top_k=2, expert_hidden=512, bias=True,
                          capacity_factor=float(E))).cuda()  # batched: capacity for every slot
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.05)
    used = torch.tensor([e for e in range(E) if e not in empty], device='cuda')
    route = layer.router.forward

    def forced(x):  # the router's choices, mapped onto the used experts (a token may then pick one twice)
        r = route(x)
        return r.with_topk(used[r.topk_idx % len(used)])
    layer.router.forward = forced
    layer_step(layer, impl, torch.randn(4, 256, 256, device='cuda'), dtype)
    assert layer.tokens_per_expert[empty].eq(0).all() and layer.tokens_per_expert[used].gt(0).all()
    for name, p in layer.experts.named_parameters():
        assert (p.grad[empty] == 0).all(), f'{name}: {p.grad[empty].abs().amax(dim=tuple(range(1, p.dim())))}'
        assert torch.isfinite(p.grad).all() and (p.grad[used].flatten(1).abs().amax(1) > 0).all(), name


@pytest.mark.parametrize('dtype', DTYPES)
def test_auto_picks_what_this_gpu_runs_fast_and_it_trains(dtype):
    major, _ = torch.cuda.get_device_capability()
    name = str(dtype).split('.')[1]
    impl, warning = auto_expert_impl('cuda', name, 256)
    if major in (9, 10) and dtype == torch.bfloat16:
        assert (impl, warning) == ('grouped', None)  # torch's fused grouped_mm
    elif importlib.util.find_spec('triton'):
        assert impl == 'triton' or 'slow' in warning
    model = build_model(dict(n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=64, n_expert=4,
                             top_k=2, expert_hidden=256, expert_impl=impl)).cuda()
    with torch.autocast('cuda', dtype=dtype):
        _, loss = model(torch.randint(64, (4, 32), device='cuda'), torch.randint(64, (4, 32), device='cuda'))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
