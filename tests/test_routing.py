"""Router variants and MoE layer options: each test fails if its option were silently ignored."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, run, read_log
from checkpoint import load_checkpoint
from model import MLP
from moe_model import (MoEConfig, MoE, MoEGPT, Router, build_model, model_args_of, count_per_expert,
                       load_balance_loss, sequence_balance_loss, loop_experts, expert_choice, table_experts)

SMALL = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50, dropout=0.0)


def layer(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(n_layer=1, n_head=1, n_embd=16, expert_hidden=24, **{'n_expert': 4, 'top_k': 2, **kw})
    moe = MoE(cfg)
    with torch.no_grad():  # large enough weights that routing and outputs are far from uniform
        for p in moe.parameters():
            p.normal_(0, 0.5)
    return moe


def skewed_input(n=64, d=16, seed=1):
    """Tokens that all lean the same way, so a router with row 0 of the gate along it prefers expert 0."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, d, generator=g) + 2.0 * F.one_hot(torch.tensor(0), d).float()


# -----------------------------------------------------------------------------
# expert choice


def test_expert_choice_gives_every_expert_exactly_its_capacity():
    moe = layer(router='expert_choice', n_expert=4, top_k=1)
    with torch.no_grad():
        moe.router.gate.weight[0, 0] = 5.0  # every token prefers expert 0: top-k routing would overload it
    x = skewed_input(n=30)
    moe.train()
    moe(x)
    capacity = math.ceil(1 * 30 / 4)
    assert moe.tokens_per_expert.tolist() == [capacity] * 4
    # tokens choose nothing: some get more than top_k experts, some none (the dropped fraction)
    token, _, dropped = expert_choice(moe.router(x[0])[3], 1)
    per_token = torch.bincount(token.flatten(), minlength=30)
    assert per_token.max() > 1 and per_token.min() == 0
    assert float(moe.drop_fraction) == float(dropped) == pytest.approx((per_token == 0).float().mean().item())
    # top-k routing of the same router is unbalanced, so the balance above is expert choice's doing
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.max() > capacity


def test_expert_choice_table_matches_a_loop_reference_with_gradients():
    moe = layer(router='expert_choice', n_expert=4, top_k=2, bias=True)
    x = torch.randn(21, 16, requires_grad=True)
    probs = moe.router(x)[3]
    token, weight, _ = expert_choice(probs, 2)
    y = table_experts(x, token, weight, moe.experts)
    ref = torch.zeros_like(x)
    for e in range(4):
        for c in range(token.size(1)):
            n = token[e, c]
            ref = ref.index_add(0, n[None], weight[e, c] * moe.experts(x[n][None], e))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.pow(2).sum(), [x, *moe.parameters()], allow_unused=True, retain_graph=True)
    grads_ref = torch.autograd.grad(ref.pow(2).sum(), [x, *moe.parameters()], allow_unused=True)
    for g, r in zip(grads, grads_ref):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_expert_choice_is_non_causal_in_training_and_causal_per_token_topk_in_eval():
    moe = layer(router='expert_choice', n_expert=4, top_k=2)
    x = torch.randn(2, 12, 16)
    x2 = x.clone()
    x2[:, 8:] = torch.randn(2, 4, 16)  # change only the later positions
    moe.train()
    assert not torch.allclose(moe(x)[:, :8], moe(x2)[:, :8])  # the documented non-causality
    moe.eval()
    y = moe(x)
    torch.testing.assert_close(y[:, :8], moe(x2)[:, :8])
    # eval = per-token top-k with the raw (not renormalised)
    # probabilities, as expert choice weighs in training
    x_flat = x.transpose(0, 1).reshape(-1, 16)
    probs = moe.router.gate(x_flat).softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    ref, _ = loop_experts(x_flat, idx, w, moe.experts)
    torch.testing.assert_close(y, ref.view(12, 2, 16).transpose(0, 1), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# noisy top-k, temperature, jitter


def test_noisy_topk_is_deterministic_in_eval_and_noisy_in_training():
    noisy, plain = layer(router='noisy_topk'), layer(router='topk')
    plain.load_state_dict({k: v for k, v in noisy.state_dict().items() if 'noise' not in k})
    x = torch.randn(2, 16, 16)
    noisy.eval(), plain.eval()
    torch.testing.assert_close(noisy(x), noisy(x))
    torch.testing.assert_close(noisy(x), plain(x))  # eval: no noise at all
    noisy.train()
    a, idx_a = noisy(x), noisy.topk_idx
    b, idx_b = noisy(x), noisy.topk_idx
    assert not torch.equal(idx_a, idx_b) and not torch.allclose(a, b)
    (a.sum() + noisy.balance_loss).backward()
    assert noisy.router.noise.weight.grad.abs().sum() > 0  # the noise scale is learned


def test_router_temperature_scales_the_logits():
    x = torch.randn(40, 16)
    hot, cold = Router(MoEConfig(n_layer=1, n_head=1, n_embd=16, n_expert=4, top_k=2,
                                 router_temperature=4.0)), \
        Router(MoEConfig(n_layer=1, n_head=1, n_embd=16, n_expert=4, top_k=2))
    cold.load_state_dict(hot.state_dict())
    probs_hot, probs_cold = hot(x)[3], cold(x)[3]
    torch.testing.assert_close(probs_hot, (x @ hot.gate.weight.t() / 4.0).softmax(-1))
    entropy = lambda p: torch.special.entr(p).sum(-1).mean()
    assert entropy(probs_hot) > entropy(probs_cold)


def test_router_jitter_is_training_only():
    jit, plain = layer(router_jitter=0.5), layer(router_jitter=0.0)
    x = torch.randn(2, 16, 16)
    jit.eval(), plain.eval()
    torch.testing.assert_close(jit(x), plain(x))
    jit.train()
    torch.manual_seed(3)
    a = jit(x)
    assert not torch.allclose(a, jit(x))


# -----------------------------------------------------------------------------
# aux-loss-free balancing (DeepSeek-V3)


@pytest.mark.parametrize('router', ['aux_free', 'deepseek_v3'])
def test_the_bias_moves_toward_balance_on_a_skewed_batch_and_keeps_mean_0(router):
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(**SMALL, n_expert=4, top_k=1, router=router, bias_update_rate=0.01))
    moe = model.moe_layers()[0]
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 0.3)
        moe.router.gate.weight[0, 0] = 1.5  # expert 0 is most tokens' favourite
    x = skewed_input(n=64)
    model.train()
    moe(x)
    assert count_per_expert(moe.topk_idx, 4)[0] > 45  # of 64: heavily skewed
    probs_before = moe.router(x[0])[3]
    for step in range(60):
        moe(x)
        model.end_step()
    load = count_per_expert(moe.topk_idx, 4)
    assert load.max() <= 20, load  # nearly balanced: 16 each
    bias = moe.router.expert_bias
    assert bias[0] < 0 and bias[0] == bias.min()  # the overloaded expert pushed down
    assert abs(bias.mean().item()) < 1e-6  # re-centred every step: the biases cannot drift together
    assert bias.abs().max().item() <= 60 * 2 * 0.01 + 1e-6  # a move of at most 2 * bias_update_rate per step
    # the bias only selects: probabilities and the chosen experts' weights come from the gate alone
    torch.testing.assert_close(moe.router(x[0])[3], probs_before)
    idx, w, logits, probs = moe.router(x[0])[:4]
    torch.testing.assert_close(w, probs.gather(1, idx) if router == 'aux_free'
                               else logits.sigmoid().gather(1, idx))
    assert 'transformer.h.0.mlp.router.expert_bias' in model.state_dict()  # checkpointed


def test_deepseek_v3_router_formulas_on_hand_made_logits():
    """Sigmoid scores; the top-k of score + bias; weights = the chosen scores normalised, times route_scale;
    probabilities (the balance loss's P_i) = scores normalised over all experts."""
    cfg = MoEConfig(n_layer=1, n_head=1, n_embd=4, n_expert=4, top_k=2, router='deepseek_v3', route_scale=2.5)
    router = Router(cfg)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))  # logits = x
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]])
    idx, w, logits, probs = router(x)[:4]
    s = torch.sigmoid(x)
    # row 0: scores .881 .731 .5 .269, + bias -> .881 .731 .5 .769: experts 0 and 3 (the bias picks 3, not 1)
    # row 1: .5 .953 .731 .5, + bias -> .5 .953 .731 1.0: experts 3 and 1, in that order
    assert idx[0].tolist() == [0, 3] and idx[1].tolist() == [3, 1]
    torch.testing.assert_close(w[0], 2.5 * torch.stack([s[0, 0], s[0, 3]]) / (s[0, 0] + s[0, 3]))
    torch.testing.assert_close(w[1], 2.5 * torch.stack([s[1, 3], s[1, 1]]) / (s[1, 1] + s[1, 3]))
    torch.testing.assert_close(probs, s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(logits, x)
    top1 = Router(MoEConfig(n_layer=1, n_head=1, n_embd=4, n_expert=4, top_k=1, router='deepseek_v3'))
    with torch.no_grad():
        top1.gate.weight.copy_(torch.eye(4))
    # k=1: the raw score
    torch.testing.assert_close(top1(x)[1][:, 0], torch.sigmoid(torch.tensor([2.0, 3.0])))


@pytest.mark.parametrize('expert_impl', ['grouped', 'batched'])  # batched routes tokens position-major
def test_sequence_balance_loss_is_the_mean_over_sequences(expert_impl):
    moe = layer(aux_loss_scope='sequence', expert_impl=expert_impl, capacity_factor=4.0)
    x = torch.randn(3, 10, 16)
    moe.train()
    moe(x)
    direct = []
    for b in range(3):  # each sequence alone: its own f_i and P_i
        idx, _, _, probs = moe.router(x[b])[:4]
        direct.append(load_balance_loss(probs, idx))
    torch.testing.assert_close(moe.balance_loss, torch.stack(direct).mean())
    whole = load_balance_loss(moe.router(x.view(30, 16))[3], moe.router(x.view(30, 16))[0])
    assert not torch.allclose(moe.balance_loss, whole)  # not the micro-batch's
    # the function itself, on hand-made numbers: one sequence all on expert 0 with P = (1, 0), one balanced
    probs = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    idx = torch.tensor([[[0], [0]], [[0], [1]]])
    torch.testing.assert_close(sequence_balance_loss(probs, idx), torch.tensor((2 * 1.0 + 2 * 0.5) / 2))


def test_step_loads_count_every_micro_batch_and_the_probe_counts_dead_experts():
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(**SMALL, n_expert=4, top_k=1))
    moe = model.moe_layers()[0]
    model.train()
    counts = []
    for seed in (1, 2):
        model(torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(seed)))
        counts.append(moe.tokens_per_expert.clone())
    model.end_step()
    total = (counts[0] + counts[1]).float()
    assert model.routing_stats()['layer0/load'] == pytest.approx((total / total.sum()).tolist())
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        # experts 2 and 3 lose every token
        moe.router.gate.weight[:, 0] = torch.tensor([3.0, 3.0, -3.0, -3.0])
    probe = torch.randint(50, (2, 16))
    stats = model.probe_routing(probe)
    share = moe.tokens_per_expert.float() / moe.tokens_per_expert.sum()
    assert stats['layer0/dead_fraction'] == (share < 0.1 / 4).float().mean().item() >= 0.5


def test_aux_free_bias_needs_end_step_and_eval_does_not_count():
    model = MoEGPT(MoEConfig(**SMALL, n_expert=4, top_k=1, router='aux_free'))
    idx = torch.randint(50, (2, 16))
    model.eval()
    model(idx)
    model.end_step()
    # eval forwards are not counted
    assert all((l.router.expert_bias == 0).all() for l in model.moe_layers().values())


# -----------------------------------------------------------------------------
# global-batch balance loss


def test_global_aux_loss_scope_counts_every_micro_batch_of_the_step():
    glob, micro = layer(aux_loss_scope='global'), layer(aux_loss_scope='micro')
    a, b = skewed_input(n=32, seed=1), torch.randn(1, 32, 16)
    glob.train(), micro.train()
    glob(a)
    counts_a = glob.tokens_per_expert
    glob(b), micro(b)
    probs_b = glob.router(b[0])[3]
    torch.testing.assert_close(micro.balance_loss, load_balance_loss(probs_b, glob.topk_idx))
    torch.testing.assert_close(glob.balance_loss, load_balance_loss(probs_b, glob.topk_idx,
                                                                    counts_a + glob.tokens_per_expert))
    assert not torch.allclose(glob.balance_loss, micro.balance_loss)
    # a new optimizer step starts counting afresh
    model = MoEGPT(MoEConfig(**SMALL, n_expert=4, top_k=2, aux_loss_scope='global'))
    model.train()
    model(torch.randint(50, (2, 16)))
    model.end_step()
    assert all(l.step_counts is None for l in model.moe_layers().values())


def _ddp_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    moe = layer(aux_loss_scope='global')  # same weights on every rank (seed 0)
    x = skewed_input(n=24, seed=10 + rank)  # different tokens on every rank
    moe.train()
    moe(x)
    torch.save({'loss': moe.balance_loss.detach(), 'counts': moe.tokens_per_expert,
                'probs': moe.router(x[0])[3].detach(), 'idx': moe.topk_idx}, f'{out_file}.{rank}')
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_aux_loss_scope_sums_loads_over_ddp_ranks(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), str(tmp_path / 'out')),
                                nprocs=2)
    r0, r1 = (torch.load(tmp_path / f'out.{r}') for r in range(2))
    assert not torch.equal(r0['counts'], r1['counts'])
    for r in (r0, r1):  # f_i from both ranks' tokens, P_i from the rank's own
        torch.testing.assert_close(r['loss'], load_balance_loss(r['probs'], r['idx'],
                                                                r0['counts'] + r1['counts']))


# -----------------------------------------------------------------------------
# shared experts, dense layers, expert dropout


def test_shared_experts_add_parameters_and_their_mlp_output():
    shared, plain = layer(n_shared_expert=2, bias=True), layer(n_shared_expert=0, bias=True)
    d, h = 16, 24
    assert sum(p.numel() for p in shared.parameters()) - sum(p.numel() for p in plain.parameters()) == \
        2 * d * (2 * h) + 2 * h + d
    assert isinstance(shared.shared, MLP) and shared.shared.c_fc.out_features == 2 * h
    plain.load_state_dict({k: v for k, v in shared.state_dict().items() if not k.startswith('shared.')})
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(shared(x), plain(x) + shared.shared(x))
    assert not torch.allclose(shared(x), plain(x))
    model = MoEGPT(MoEConfig(**SMALL, n_expert=4, top_k=2, n_shared_expert=1))
    per_layer = 2 * 16 * 64 + 64 + 16  # one shared expert of expert_hidden = 4 * 16
    assert model.get_num_params(active=True) \
        - MoEGPT(MoEConfig(**SMALL, n_expert=4, top_k=2)).get_num_params(active=True) \
        == 2 * per_layer  # every token runs them: all active


def test_n_dense_layers_keeps_the_first_blocks_dense():
    model = MoEGPT(MoEConfig(**{**SMALL, 'n_layer': 4}, n_expert=4, top_k=2, n_dense_layers=2))
    assert [type(b.mlp) for b in model.transformer.h] == [MLP, MLP, MoE, MoE]
    model = MoEGPT(MoEConfig(**{**SMALL, 'n_layer': 4}, n_expert=4, top_k=2, n_dense_layers=1, moe_every=2))
    assert [type(b.mlp) for b in model.transformer.h] == [MLP, MoE, MLP, MoE]
    model(torch.randint(50, (1, 8)))
    assert sorted({k.split('/')[0] for k in model.routing_stats()}) == ['layer1', 'layer3']


def test_expert_dropout_drops_whole_experts_in_training_only():
    p = 0.5
    drop, plain = layer(expert_dropout=p), layer()
    x = torch.randn(2, 8, 16)
    drop.eval(), plain.eval()
    torch.testing.assert_close(drop(x), plain(x))
    drop.train()
    torch.manual_seed(7)
    y = drop(x)
    torch.manual_seed(7)
    keep = (torch.rand(4) >= p).float() / (1 - p)  # the layer's one coin per expert
    assert 0 < (keep == 0).sum() < 4, keep  # this seed drops some experts, not all
    x_flat = x.transpose(0, 1).reshape(-1, 16)
    idx, w, _, _ = drop.router(x_flat)[:4]
    ref, _ = loop_experts(x_flat, idx, w * keep[idx], drop.experts)
    torch.testing.assert_close(y, ref.view(8, 2, 16).transpose(0, 1), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# metrics, configs, checkpoints


def test_routing_stats_and_flip_rate():
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(**SMALL, n_expert=4, top_k=2))
    probe = torch.randint(50, (3, 16))
    assert set(model.probe_routing(probe)) == {'layer0/dead_fraction', 'layer1/dead_fraction'}  # no flips yet
    assert {k: v for k, v in model.probe_routing(probe).items() if 'flip' in k} == {'layer0/flip_rate': 0.0,
                                                                                      'layer1/flip_rate': 0.0}
    stats = model.routing_stats()
    assert {'layer0/load', 'layer0/max_load', 'layer0/entropy', 'layer0/drop_fraction'} <= set(stats)
    assert 0 < stats['layer0/entropy'] <= math.log(4) + 1e-6 and stats['layer0/max_load'] >= 1
    before = model.moe_layers()[0].topk_idx[:, 0].clone()
    with torch.no_grad():
        model.moe_layers()[0].router.gate.weight.add_(torch.randn(4, 16) * 0.05)
    flips = model.probe_routing(probe)
    expected = (model.moe_layers()[0].topk_idx[:, 0] != before).float().mean().item()
    assert flips['layer0/flip_rate'] == pytest.approx(expected) and expected > 0
    assert model.training  # the probe restores the mode it found


def test_every_new_key_round_trips_through_model_args():
    model = MoEGPT(MoEConfig(**{**SMALL, 'n_layer': 3}, n_expert=4, top_k=2, router='aux_free',
                             router_temperature=0.7, router_jitter=0.1, bias_update_rate=0.02,
                             n_shared_expert=1, n_dense_layers=1, expert_dropout=0.1, aux_loss_scope='global',
                             expert_hidden=24))
    rebuilt = build_model(model_args_of(model))
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # same parameters and buffers (the aux-free bias)
    noisy = MoEGPT(MoEConfig(**SMALL, n_expert=4, top_k=2, router='noisy_topk'))
    build_model(model_args_of(noisy)).load_state_dict(noisy.state_dict())


@pytest.mark.parametrize('kw, message', [
    (dict(router='hash'), "router='hash' is unknown; allowed: topk, noisy_topk, expert_choice, aux_free, "
                          "deepseek_v3"),
    (dict(aux_loss_scope='batch'), "aux_loss_scope='batch' is unknown; allowed: micro, global, sequence"),
    (dict(route_scale=0.0), 'route_scale=0.0 must be > 0'),
    (dict(router_temperature=0.0), 'router_temperature=0.0 must be > 0'),
    (dict(router_jitter=1.0), r'router_jitter=1.0 must be in \[0, 1\)'),
    (dict(expert_dropout=-0.1), r'expert_dropout=-0.1 must be in \[0, 1\)'),
    (dict(n_shared_expert=-1), 'n_shared_expert=-1 must be a non-negative integer'),
    (dict(n_dense_layers=2), 'n_dense_layers=2 with moe_every=1 leaves no MoE layer among n_layer=2'),
    (dict(bias_update_rate=-1.0), 'bias_update_rate=-1.0 must be >= 0'),
])
def test_bad_routing_configs_raise_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**SMALL, 'n_expert': 4, 'top_k': 2, **kw})


def test_train_rejects_a_bad_router_before_any_work(shakespeare_char, tmp_path):
    p = run('train.py', *TINY, f'--out_dir={tmp_path / "out"}', '--router=hash', check=False)
    assert p.returncode == 2 and p.stderr.strip() == \
        "error: router='hash' is unknown; allowed: topk, noisy_topk, expert_choice, aux_free, deepseek_v3"
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_stateful_routing_resumes_exactly(shakespeare_char, tmp_path):
    # the aux-free bias (a buffer) and the RNG of jitter and expert dropout must all come back on resume
    args = [*TINY, '--router=aux_free', '--router_jitter=0.1', '--expert_dropout=0.2',
            '--aux_loss_scope=global', '--gradient_accumulation_steps=2', '--eval_interval=3']
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    run('train.py', *args, f'--out_dir={full}', '--max_iters=6')
    run('train.py', *args, f'--out_dir={part}', '--max_iters=3')
    run('train.py', *args, f'--out_dir={part}', '--max_iters=6', '--init_from=resume')
    losses = lambda out: [r['loss'] for r in read_log(out) if 'loss' in r]
    assert len(losses(full)) == 6 and losses(full) == losses(part)  # bit-identical on CPU
    assert load_checkpoint(os.path.join(part, 'ckpt.pt'))['model'][
        'transformer.h.0.mlp.router.expert_bias'].abs().sum() > 0


@pytest.mark.slow
def test_the_first_eval_after_a_resume_has_a_flip_rate(shakespeare_char, tmp_path):
    # the probe's top-1 experts travel in the checkpoint: the resumed run re-evaluates the checkpoint's
    # weights at iter 4, so nothing flipped there; its next eval compares against that one
    out = str(tmp_path)
    run('train.py', *TINY, f'--out_dir={out}', '--max_iters=4', '--eval_interval=2')
    run('train.py', *TINY, f'--out_dir={out}', '--max_iters=6', '--eval_interval=2', '--init_from=resume')
    evals = [r for r in read_log(out) if 'val/ce' in r]
    assert [r['iter'] for r in evals] == [0, 2, 4, 4, 6]
    assert 'layer0/flip_rate' not in evals[0]
    assert evals[3]['layer0/flip_rate'] == evals[3]['layer1/flip_rate'] == 0.0
    assert all('layer1/flip_rate' in r for r in evals[1:])


@pytest.mark.slow
def test_expert_choice_with_shared_experts_and_a_dense_layer_trains(shakespeare_char, tmp_path):
    run('train.py', *TINY, '--router=expert_choice', '--n_shared_expert=1', '--n_layer=3',
        '--n_dense_layers=1', f'--out_dir={tmp_path}', '--max_iters=4', '--eval_interval=2')
    records = read_log(tmp_path)
    steps = [r for r in records if 'loss' in r]
    assert set(k.split('/')[0] for k in steps[-1] if k.startswith('layer')) == {'layer1', 'layer2'}
    assert steps[-1]['layer1/max_load'] == 1.0  # expert choice: every expert exactly at capacity
    assert 'layer1/flip_rate' in records[-1] and records[-1]['val/ce'] < 4.3


# -----------------------------------------------------------------------------
# the fused softmax router (moe_kernels/fused.py) against the router's torch ops


@pytest.mark.parametrize('settings', [
    dict(router='topk', top_k=1), dict(router='topk', top_k=2), dict(router='topk', n_expert=1, top_k=1),
    dict(router='topk', top_k=3, router_temperature=0.5), dict(router='aux_free', top_k=2),
    dict(router='aux_free', norm_topk=False, top_k=2, route_scale=2.5), dict(router='expert_choice', top_k=2),
    dict(router='noisy_topk', top_k=2), dict(router='topk', top_k=2, route_scale=2.5),
    dict(router='topk', top_k=1, norm_top1=True), dict(router='aux_free', top_k=1, norm_top1=True),
    # routers wider than a vector register: torch's softmax, the fused top-k (top 16: torch's softmax of it)
    dict(router='topk', n_expert=64, top_k=8), dict(router='aux_free', n_expert=32, top_k=4),
    dict(router='aux_free', n_expert=64, norm_topk=False, top_k=8),
    dict(router='topk', n_expert=64, top_k=16),
], ids=lambda s: '-'.join(f'{k}={v}' for k, v in s.items()))
@pytest.mark.parametrize('aux_loss_scope', ['micro', 'global', 'sequence'])
def test_fused_router_matches_its_torch_ops(monkeypatch, settings, aux_loss_scope):
    """Outputs bit for bit (test_keys checks them against the old routers too) and the gradients of x and the
    gate: through the chosen weights, the balance loss (probs) and the z-loss (logits), in training and eval
    (noisy_topk: the fused router in eval only, its noise in training is the torch ops'); 300 rows, which
    the fused router shares between threads."""
    from moe_kernels import cpu_grouped_mm
    assert cpu_grouped_mm.available()
    results = {}
    for fused, training in ((True, True), (False, True), (True, False), (False, False)):
        monkeypatch.setattr(cpu_grouped_mm, '_built', fused)
        moe = layer(aux_loss_scope=aux_loss_scope, **settings).train(training)
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.normal_(0, 0.3)
        x = torch.randn(2, 150, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
        torch.manual_seed(5)  # (noise)
        r = moe.router(x.view(-1, 16))
        noise = training and settings['router'] == 'noisy_topk'
        assert ('SoftmaxRouter' in r.topk_weight.grad_fn.name()) == (fused and not noise)
        assert torch.equal(r.counts, count_per_expert(r.topk_idx, moe.config.n_expert))
        moe.record(r, 0.0, lambda rows: rows.view(2, 150, *rows.shape[1:]))
        g = torch.randn(r.topk_weight.shape, generator=torch.Generator().manual_seed(6))
        ((r.topk_weight * g).sum() + moe.balance_loss + moe.z_loss).backward()
        results[fused, training] = ([*r[:5]], [moe.balance_loss, moe.z_loss, x.grad,
                                                moe.router.gate.weight.grad])
    for training in (True, False):
        (out, close), (out_ref, close_ref) = results[True, training], results[False, training]
        for got, ref in zip(out, out_ref):
            assert torch.equal(got, ref)
        for got, ref in zip(close, close_ref):  # (sums over the rows in another order)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('router', ['topk', 'aux_free'])
def test_fused_router_with_ties_everywhere_matches_its_torch_ops(monkeypatch, router):
    """Every logit (and bias) equal: each row's top-k is a tie, which the fused router leaves to torch's
    top-k (its order of ties is its own), with the same indices and weights, and so the same loads."""
    from moe_kernels import cpu_grouped_mm
    assert cpu_grouped_mm.available()
    results = []
    for fused in (True, False):
        monkeypatch.setattr(cpu_grouped_mm, '_built', fused)
        moe = layer(router=router, n_expert=8, top_k=3)
        with torch.no_grad():
            moe.router.gate.weight.zero_()
            if moe.router.expert_bias is not None:
                moe.router.expert_bias.zero_()
        results.append(moe.router(torch.randn(40, 16, generator=torch.Generator().manual_seed(1))))
    for got, ref in zip(*results):  # (the losses: sums in another order)
        torch.testing.assert_close(got, ref, **{} if got.dim() == 0 else dict(rtol=0, atol=0))
