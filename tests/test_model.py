"""The dense GPT, the MoE GPT, the router and the aux losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from moe_model import (MoEConfig, MoEGPT, MoE, Router, build_model, model_args_of, load_balance_loss,
                       router_z_loss, cpu_kernel_available)

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97, dropout=0.0)


def moe(**kw):
    torch.manual_seed(0)
    return MoEGPT(MoEConfig(**{**SMALL, 'n_expert': 4, 'top_k': 2, **kw}))


def test_dense_shapes_backward_and_init_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    idx, targets = torch.randint(97, (3, 16)), torch.randint(97, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 97)
    assert abs(loss.item() - math.log(97)) < 0.1  # an untrained model is close to uniform
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 97) and loss is None


def test_moe_init_loss_and_all_params_get_gradients():
    model = moe()
    idx, targets = torch.randint(97, (3, 16)), torch.randint(97, (3, 16))
    _, loss = model(idx, targets)
    assert abs(model.loss_terms['ce'].item() - math.log(97)) < 0.1
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('bias', [True, False])
def test_one_expert_top1_equals_dense(bias):
    torch.manual_seed(0)
    dense = GPT(GPTConfig(**SMALL, bias=bias))
    model = MoEGPT(MoEConfig(**SMALL, bias=bias, n_expert=1, top_k=1, expert_impl='loop'))
    sd = {k: v for k, v in dense.state_dict().items() if '.mlp.' not in k}
    missing, _ = model.load_state_dict(sd, strict=False)
    assert all('.mlp.' in k for k in missing)
    with torch.no_grad():
        for blk_d, blk_m in zip(dense.transformer.h, model.transformer.h):
            ex = blk_m.mlp.experts
            ex.c_fc[0].copy_(blk_d.mlp.c_fc.weight.t())
            ex.c_proj[0].copy_(blk_d.mlp.c_proj.weight.t())
            if bias:
                ex.c_fc_bias[0].copy_(blk_d.mlp.c_fc.bias)
                ex.c_proj_bias[0].copy_(blk_d.mlp.c_proj.bias)
    dense.eval(), model.eval()
    idx = torch.randint(97, (2, 16))
    for impl in ('loop', 'grouped', 'batched'):
        model.set_expert_impl(impl)
        (ld, lossd), (lm, lossm) = dense(idx, idx), model(idx, idx)
        torch.testing.assert_close(lm, ld, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lossm, lossd)


def test_balance_loss_uniform_is_one_and_collapsed_is_n_expert():
    E, N = 8, 64
    probs = torch.full((N, E), 1.0 / E)
    idx = torch.arange(N * 2).view(N, 2) % E  # every expert gets the same number of slots
    assert load_balance_loss(probs, idx).item() == pytest.approx(1.0)
    probs = F.one_hot(torch.zeros(N, dtype=torch.long), E).float()
    idx = torch.zeros(N, 1, dtype=torch.long)
    assert load_balance_loss(probs, idx).item() == pytest.approx(E)


def test_balance_loss_uses_full_softmax_probabilities():
    # P_i is the mean of the FULL softmax, not of the renormalised top-k weights
    torch.manual_seed(0)
    router = Router(MoEConfig(**SMALL, n_expert=4, top_k=2))
    x = torch.randn(50, 32)
    idx, w, logits, probs = router(x)[:4]
    f = torch.bincount(idx.flatten(), minlength=4).float() / idx.numel()
    expected = 4 * (f * logits.softmax(-1).mean(0)).sum()
    torch.testing.assert_close(load_balance_loss(probs, idx), expected)
    torch.testing.assert_close(w.sum(-1), torch.ones(50))  # k>1: renormalised weights


def test_z_loss_formula():
    logits = torch.randn(10, 6) * 3
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 10
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_aux_loss_is_per_layer_mean_and_not_in_eval_loss():
    model = moe(aux_loss_coef=0.1, z_loss_coef=0.01)
    idx = torch.randint(97, (4, 16))
    model.train()
    _, loss = model(idx, idx)
    layers = list(model.moe_layers().values())
    balance = sum(l.balance_loss for l in layers) / len(layers)
    z = sum(l.z_loss for l in layers) / len(layers)
    torch.testing.assert_close(loss, model.loss_terms['ce'] + 0.1 * balance + 0.01 * z)
    torch.testing.assert_close(model.loss_terms['aux'], balance.detach())
    model.eval()
    _, loss = model(idx, idx)
    torch.testing.assert_close(loss, model.loss_terms['ce'])


def test_top1_router_gets_gradient_from_the_language_model_loss():
    # with k=1 the raw probability weights the expert output; renormalising would make it 1.0
    model = moe(top_k=1, aux_loss_coef=0.0, z_loss_coef=0.0)
    idx = torch.randint(97, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.moe_layers()[0].router.gate.weight.grad.abs().sum() > 0


def test_norm_top1_weighs_the_one_expert_1_and_changes_nothing_else():
    """norm_top1 (Mixtral's, Qwen3-MoE's top-1 folders): weight 1.0, the same experts; without it (every
    model before the key) a top-1 router keeps its probability; at top_k > 1 it changes nothing."""
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    out = {}
    for top_k, norm_top1 in ((1, False), (1, True), (2, False), (2, True)):
        torch.manual_seed(0)
        out[top_k, norm_top1] = Router(MoEConfig(**SMALL, n_expert=4, top_k=top_k, norm_top1=norm_top1))(x)
    (idx, w, *_), (idx1, w1, *_) = out[1, False], out[1, True]
    assert torch.equal(idx, idx1) and (w < 1).all() and torch.equal(w1, torch.ones_like(w1))
    for a, b in zip(out[2, False], out[2, True]):
        assert torch.equal(a, b)


@pytest.mark.parametrize('fused', [True, False])
def test_router_runs_in_float32_under_autocast(monkeypatch, fused):
    """On both paths (the fused op's kernel turns autocast off itself; torch's ops in a context): the same
    bits as without autocast, forward and backward."""
    from moe_kernels import cpu_grouped_mm
    assert cpu_grouped_mm.available()
    monkeypatch.setattr(cpu_grouped_mm, '_built', fused)
    router = Router(MoEConfig(**SMALL, n_expert=4, top_k=2))
    x = torch.randn(5, 32).bfloat16().requires_grad_()
    out, grads = [], []
    for autocast in (True, False):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            r = router(x)
        (r.topk_weight.sum() * 3 + r.balance_loss + r.z_loss).backward()  # (as train.py: outside autocast)
        out.append(r)
        grads.append((x.grad, router.gate.weight.grad))
        x.grad = router.gate.weight.grad = None
    assert ('SoftmaxRouter' in out[0].topk_weight.grad_fn.name()) == fused
    assert all(t.dtype == torch.float32 for t in out[0][1:4])
    for got, ref in zip([*out[0], *grads[0]], [*out[1], *grads[1]]):
        assert torch.equal(got, ref)


def test_active_params_and_mfu_use_active_count():
    model = moe(n_expert=8, top_k=2)
    total, active = model.get_num_params(), model.get_num_params(active=True)
    per_expert = 2 * 32 * 128 + 128 + 32  # c_fc, c_proj, biases
    assert total - active == 2 * per_expert * (8 - 2)  # 2 MoE layers, 6 idle experts each
    dense = GPT(GPTConfig(**SMALL))
    assert dense.get_num_params(active=True) == dense.get_num_params()
    assert model.estimate_mfu(1, 1.0) < moe(n_expert=8, top_k=8).estimate_mfu(1, 1.0)


def test_moe_every_places_moe_layers():
    model = MoEGPT(MoEConfig(**{**SMALL, 'n_layer': 4}, n_expert=4, top_k=1, moe_every=2))
    assert [isinstance(b.mlp, MoE) for b in model.transformer.h] == [False, True, False, True]


def test_residual_projection_init_applies_to_experts():
    model = MoEGPT(MoEConfig(**{**SMALL, 'n_layer': 8, 'n_embd': 64}, n_expert=8, top_k=2))
    ex = model.moe_layers()[0].experts
    assert ex.c_fc.std().item() == pytest.approx(0.02, rel=0.05)
    assert ex.c_proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_model_args_round_trip_rebuilds_the_same_model():
    for model in (moe(moe_every=2, expert_hidden=48), GPT(GPTConfig(**SMALL))):
        rebuilt = build_model(model_args_of(model))
        assert type(rebuilt) is type(model) and rebuilt.config == model.config


@pytest.mark.parametrize('kw, message', [
    (dict(n_expert=4, top_k=5), 'top_k=5 must be <= n_expert=4'),
    (dict(n_embd=30, n_head=4), 'n_embd=30 must be divisible by n_head=4'),
    (dict(expert_impl='nope'), "expert_impl='nope' is unknown"),
    (dict(capacity_factor=0.0), 'capacity_factor=0.0 must be > 0'),
])
def test_bad_model_configs_raise_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(')):
        MoEConfig(**{**SMALL, **kw})


MODERN = dict(norm='rmsnorm', rope=True, mlp='swiglu', qk_norm='full', n_kv_head=1, tie_embeddings=False)


@pytest.mark.parametrize('make', [lambda: GPT(GPTConfig(**SMALL)), lambda: moe(),
                                  lambda: moe(expert_impl='loop'), lambda: GPT(GPTConfig(**SMALL, **MODERN)),
                                  lambda: moe(**MODERN)])
def test_kv_cache_generation_equals_cache_free(make):
    model = make().eval()
    idx = torch.randint(97, (2, 5))
    # top_k=1 is greedy; 30 new tokens overflow block_size=16, exercising the cache restart
    a = model.generate(idx, 30, top_k=1, use_kv_cache=True)
    b = model.generate(idx, 30, top_k=1, use_kv_cache=False)
    assert torch.equal(a, b)


def test_crop_block_size_and_from_pretrained_local_tiny_gpt2(tmp_path):
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=24,
                                        activation_function='gelu')  # nanoGPT's exact GELU
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(101, (2, 24))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = model(idx, idx)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape[0] == 8
    with pytest.raises(ValueError, match='block_size=32 is larger'):
        model.crop_block_size(32)


def test_layers_carry_their_probe_in_checkpoints_and_old_checkpoints_still_load(tmp_path):
    """The top-1 experts of the last probe_routing batch are each MoE layer's own state (state_dict's
    _extra_state), so a checkpoint carries them with no train.py code; a checkpoint of before, which kept
    them beside the model as {block index: tensor}, or not at all, still loads."""
    from checkpoint import save_checkpoint, load_checkpoint
    model = moe(moe_every=2, n_layer=4)
    probe = torch.randint(97, (2, 16))
    assert not any('flip_rate' in k for k in model.probe_routing(probe))
    sd = model.state_dict()
    assert set(k for k in sd if k.endswith('_extra_state')) == {'transformer.h.1.mlp._extra_state',
                                                               'transformer.h.3.mlp._extra_state'}
    top1 = {i: layer.probe_top1.clone() for i, layer in model.moe_layers().items()}
    rebuilt = build_model(model_args_of(model))
    rebuilt.load_state_dict(sd)
    assert all(torch.equal(rebuilt.moe_layers()[i].probe_top1, t) for i, t in top1.items())
    flips = {k: v for k, v in rebuilt.probe_routing(probe).items() if 'flip_rate' in k}
    assert flips == {'layer1/flip_rate': 0.0, 'layer3/flip_rate': 0.0}
    # another batch size: nothing to compare
    assert not any('flip_rate' in k for k in rebuilt.probe_routing(probe[:1]))
    old = {k: v for k, v in sd.items() if not k.endswith('_extra_state')}
    save_checkpoint({'model': old, 'model_args': model_args_of(model), 'probe_top1': top1},
                    tmp_path / 'old.pt')
    save_checkpoint({'model': old, 'model_args': model_args_of(model)}, tmp_path / 'older.pt')
    # none yet: empty
    assert all(torch.is_tensor(v) for v in build_model(model_args_of(model)).state_dict().values())
    for name, expected in (('old.pt', top1), ('older.pt', {1: None, 3: None})):
        rebuilt = build_model(model_args_of(model))
        rebuilt.load_state_dict(load_checkpoint(str(tmp_path / name))['model'])  # strict
        for i, t in expected.items():
            assert (rebuilt.moe_layers()[i].probe_top1 is None) if t is None else \
                torch.equal(rebuilt.moe_layers()[i].probe_top1, t)


def test_the_model_keys_come_from_the_config_classes():
    """train.py, bench.py and resume read one list of model keys: the config dataclasses' fields."""
    from dataclasses import fields
    from moe_model import MODEL_KEYS, TRAIN_KEYS
    assert set(MODEL_KEYS) == {f.name for f in fields(MoEConfig)} >= {f.name for f in fields(GPTConfig)}
    assert set(TRAIN_KEYS) < set(MODEL_KEYS) and 'n_expert' not in TRAIN_KEYS and 'n_embd' not in TRAIN_KEYS


def test_diagnose_dense_is_empty_and_moe_names_each_layer():
    torch.manual_seed(0)
    idx = torch.randint(97, (2, 16))
    assert GPT(GPTConfig(**SMALL)).diagnose(idx) == {}
    model = moe()
    model(idx, idx)
    stats = model.diagnose(idx)
    for i in (0, 1):
        assert stats[f'layer{i}/gate_weight_finite'] is True \
            and stats[f'layer{i}/router_logits_finite'] == 1.0
        assert {f'layer{i}/max_load', f'layer{i}/router_logits_std', f'layer{i}/z_loss'} <= set(stats)


@pytest.mark.parametrize('n_expert', [4, 0])
def test_a_compiled_model_compiles_once_for_training_and_once_for_eval(n_expert):
    """What the forward leaves on the model (its loss terms; an MoE layer's loads of the step, which end_step
    restarts) must not make torch.compile trace again on the next step: one graph for training, one for
    eval. A backend that counts its calls (and runs the graph eagerly, so it is quick) sees every compile."""
    import torch._dynamo
    compiles = []

    def backend(graph, example_inputs):
        compiles.append('train' if torch.is_grad_enabled() else 'eval')
        return graph.forward
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(dict(SMALL, n_expert=n_expert, top_k=2, expert_hidden=32, expert_impl='grouped'))
    cpu_kernel_available()  # as train.py before compiling: a trace cannot build the CPU kernel (run alone)
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randint(97, (4, 16)), torch.randint(97, (4, 16))

    def train_step():  # as train.py's (and bench.py's): forward, backward, end_step, optimizer step
        _, loss = compiled(x, y)
        loss.backward()
        model.end_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(3):
        train_step()
    model.eval()
    with torch.no_grad():  # as train.py's estimate_loss
        for _ in range(2):
            compiled(x, y)
    model.train()
    train_step()
    assert compiles == ['train', 'eval']


@pytest.mark.parametrize('impl, router, mode, block', [
    ('loop', 'topk', 'moe', {}), ('grouped', 'topk', 'all', {}), ('batched', 'noisy_topk', 'all', {}),
    ('grouped', 'expert_choice', 'moe', {}), ('dense', None, 'all', {}),
    ('grouped', 'expert_choice', 'all', MODERN), ('dense', None, 'all', MODERN)])
def test_activation_checkpointing_keeps_less_and_gives_the_same_gradients(
        impl, router, mode, block, device='cpu'):
    """With dropout and a shared expert: the same loss and gradients as without checkpointing (the RNG is
    replayed in the recompute), and fewer bytes kept for backward (else nothing was checkpointed).
    (device: tests/test_triton.py runs it on the GPU where there is one)"""
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.1, bias=True, **block)
    if impl != 'dense':
        args.update(n_expert=4, top_k=2, expert_hidden=32, expert_impl=impl, router=router, n_shared_expert=1)
    x, y = torch.randint(64, (4, 16), device=device), torch.randint(64, (4, 16), device=device)
    results, kept = [], []
    for m in ('none', mode):
        torch.manual_seed(0)
        model = build_model(args).to(device)
        model.set_activation_checkpointing(m)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            _, loss = model(x, y)
        loss.backward()
        kept.append(sum(saved))
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    assert kept[1] < 0.8 * kept[0], kept
    for r, g in zip(*results):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_rejects_an_unknown_mode():
    with pytest.raises(ValueError,
                       match="activation_checkpointing='some' is unknown; allowed: none, moe, all"):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8,
                      vocab_size=16)).set_activation_checkpointing('some')
