"""The key registry (model.key: each model key declared once, with its kind), the router presets against the
routers they replaced, the Hugging Face export of every router and forward key, and resume with changed
keys."""
import os
import re
import sys
import subprocess
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY, run
from checkpoint import load_checkpoint
from model import GPTConfig, KINDS, keys_of
from moe_model import (EXPORTED_KEYS, MODEL_KEYS, ROUTERS, SHAPE_KEYS, TRAIN_KEYS, MoEConfig, MoEGPT, Router,
                       build_model, model_args_of)

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0, n_expert=4, top_k=2,
             expert_hidden=32)


# -----------------------------------------------------------------------------
# the registry


def test_every_model_key_has_one_kind_and_the_lists_derive_from_the_kinds():
    assert MODEL_KEYS == tuple(f.name for f in fields(MoEConfig))
    assert all(f.metadata['kind'] in KINDS for f in fields(MoEConfig))
    assert set(SHAPE_KEYS) | set(TRAIN_KEYS) | set(keys_of(MoEConfig, 'forward')) == set(MODEL_KEYS)
    assert set(EXPORTED_KEYS) == set(MODEL_KEYS) - set(TRAIN_KEYS)
    assert set(keys_of(GPTConfig)) < set(MODEL_KEYS)
    # what the kinds promise: a shape key changes the weights' names, shapes or sharing; the others do not
    def weights(**kw):
        sd = MoEGPT(MoEConfig(**{**SMALL, 'n_layer': 3, 'n_dense_layers': 1,
                                 **kw})).state_dict(keep_vars=True)
        shared = sorted(tuple(n for n in sd if sd[n] is v) for v in sd.values())
        return {n: v.shape for n, v in sd.items()}, shared
    base = weights()
    changed = dict(n_expert=8, expert_hidden=16, n_layer=4, n_embd=16, vocab_size=50, block_size=8,
                   bias=False, moe_every=2, n_shared_expert=1, n_dense_layers=2, router='noisy_topk',
                   router_bias=True, router_noise=True, top_k=1, n_head=4, router_score='sigmoid',
                   norm_topk=False, norm_top1=True, router_temperature=2.0, route_scale=2.0,
                   expert_choice=True, dropout=0.1,
                   norm='rmsnorm', norm_eps=1e-6, rope=True, rope_theta=5e5, mlp='swiglu', mlp_hidden=48,
                   qk_norm='head', n_kv_head=1, head_dim=8, tie_embeddings=False)
    assert set(changed) | set(TRAIN_KEYS) == set(MODEL_KEYS)  # (every key not in TRAIN_KEYS is tried)
    for k, v in changed.items():
        assert (weights(**{k: v}) != base) == (k in SHAPE_KEYS), k



def test_a_train_key_leaves_the_eval_logits_as_they_are():
    """What the 'train' kind promises (the export leaves those keys out): the run's own setting, not the
    model, so a model in eval computes the same logits whatever it is (on a dropless backend: batched's
    capacity drops tokens in eval too, by design)."""
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(**SMALL, expert_impl='loop')).eval()
    x = torch.randint(65, (2, 16))
    want = model(x)[0]
    changed = dict(expert_impl='grouped', capacity_factor=0.5, expert_choice=True, router_jitter=0.5,
                   bias_update_rate=0.1, aux_loss_coef=1.0, z_loss_coef=1.0, aux_loss_scope='sequence',
                   expert_dropout=0.5, dropout=0.5)
    assert set(changed) == set(TRAIN_KEYS)
    for k, v in changed.items():
        other = MoEGPT(MoEConfig(**{**SMALL, 'expert_impl': 'loop', k: v})).eval()
        other.load_state_dict(model.state_dict())
        torch.testing.assert_close(other(x)[0], want, msg=k)

def test_every_model_key_is_in_the_checkpoint_the_export_readme_train_and_bench():
    model = MoEGPT(MoEConfig(**SMALL))
    assert set(model_args_of(model)) == set(MODEL_KEYS)
    assert build_model(model_args_of(model)).config == model.config
    from hf.modeling_nanomoe import NanoMoEConfig
    cfg = NanoMoEConfig(**{k: getattr(model.config, k) for k in EXPORTED_KEYS if k != 'top_k'})
    assert set(cfg.model_args()) == set(EXPORTED_KEYS)
    with open(os.path.join(ROOT, 'README.md')) as f:
        documented = set(re.findall(r'^\| `(\w+)` \|', f.read(), flags=re.M))
    assert set(MODEL_KEYS) <= documented, set(MODEL_KEYS) - documented
    for script in ('train.py', 'bench.py'):  # the error for an unknown key lists the known ones
        p = run(script, '--no_such_key=1', check=False)
        known = set(p.stderr.split('known keys: ')[1].strip().split(', '))
        assert p.returncode == 2 and set(MODEL_KEYS) <= known, (script, set(MODEL_KEYS) - known)


# -----------------------------------------------------------------------------
# router presets: bit for bit the routers they replaced


def old_router(router, logits, noisy, bias, top_k, route_scale):
    """moe_model.Router.forward before its settings became orthogonal (commit f01943c), after the gate:
    (topk_idx, topk_weight, probs) from the clean and the noisy logits."""
    if router == 'deepseek_v3':
        scores = noisy.sigmoid()
        topk_idx = (scores + bias).topk(top_k, dim=-1).indices
        topk_weight = scores.gather(1, topk_idx)
        if top_k > 1:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return topk_idx, topk_weight * route_scale, scores / scores.sum(dim=-1, keepdim=True)
    probs = noisy.softmax(dim=-1)
    if bias is None:
        chosen_logits, topk_idx = noisy.topk(top_k, dim=-1)
    else:
        topk_idx = (probs + bias).topk(top_k, dim=-1).indices
        chosen_logits = noisy.gather(1, topk_idx)
    if top_k > 1 and router != 'expert_choice':
        topk_weight = chosen_logits.softmax(dim=-1)
    else:
        topk_weight = probs.gather(1, topk_idx)
    return topk_idx, topk_weight, probs


@pytest.mark.parametrize('top_k', [1, 2, 3])
@pytest.mark.parametrize('router', list(ROUTERS))
@pytest.mark.parametrize('training', [False, True])
def test_router_presets_equal_the_old_routers_bit_for_bit(router, top_k, training):
    torch.manual_seed(0)
    r = Router(MoEConfig(n_layer=1, n_head=1, n_embd=16, n_expert=8, top_k=top_k, router=router,
                         route_scale=2.5 if router == 'deepseek_v3' else 1.0)).train(training)
    with torch.no_grad():
        r.gate.weight.normal_(0, 1.0)
        if r.expert_bias is not None:
            r.expert_bias.normal_(0, 0.2)
    x = torch.randn(64, 16)
    x[:4] = x[4:8]  # tied rows: the same choices
    torch.manual_seed(1)
    idx, w, logits, probs = r(x)[:4]
    logits_ref = F.linear(x, r.gate.weight)
    torch.manual_seed(1)
    noisy = logits_ref + torch.randn_like(logits_ref) * F.softplus(F.linear(x, r.noise.weight)) \
        if training and r.noise is not None else logits_ref
    idx_ref, w_ref, probs_ref = old_router(router, logits_ref, noisy, r.expert_bias, top_k,
                                           r.config.route_scale)
    assert torch.equal(logits, logits_ref) and torch.equal(idx, idx_ref)
    assert torch.equal(w, w_ref) and torch.equal(probs, probs_ref)


def test_router_settings_compose_and_override_their_preset():
    cfg = MoEConfig(**SMALL, router='deepseek_v3', router_bias=False, norm_topk=False)
    assert (cfg.router_score, cfg.router_bias, cfg.norm_topk,
            cfg.router_noise) == ('sigmoid', False, False, False)
    cfg = MoEConfig(**SMALL, router='topk', router_score='sigmoid', router_noise=True, expert_choice=True)
    r = Router(cfg)
    assert r.noise is not None and r.expert_bias is None
    with pytest.raises(ValueError, match="router_score='tanh' is unknown; allowed: softmax, sigmoid"):
        MoEConfig(**SMALL, router_score='tanh')
    with pytest.raises(ValueError, match='norm_topk=1 must be a bool'):
        MoEConfig(**SMALL, norm_topk=1)
    # a checkpoint from before the settings (model_args with the preset name only) gets the preset's
    old = {k: v for k, v in model_args_of(MoEGPT(MoEConfig(**SMALL, router='aux_free'))).items()
           if k not in ('router_score', 'norm_topk', 'router_bias', 'router_noise', 'expert_choice')}
    assert build_model(old).config.router_bias is True


# -----------------------------------------------------------------------------
# the Hugging Face export carries every router and forward key


FORWARD_SETTINGS = [dict(router=name) for name in ROUTERS] + [
    dict(router='topk', router_score='sigmoid', norm_topk=False, route_scale=1.7),
    dict(router='aux_free', router_temperature=0.5, top_k=3), dict(n_head=4, top_k=1)]


@pytest.mark.parametrize('settings', FORWARD_SETTINGS,
                         ids=lambda s: '-'.join(f'{k}={v}' for k, v in s.items()))
def test_the_export_computes_what_the_model_computes_for_every_router(settings):
    pytest.importorskip('transformers')
    from hf import export_moe
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(**{**SMALL, 'n_layer': 3, 'n_dense_layers': 1, 'n_shared_expert': 1,
                                **settings})).eval()
    with torch.no_grad():
        for layer in model.moe_layers().values():
            layer.router.gate.weight.normal_(0, 1.0)  # routing far from uniform: a wrong key shows
            if layer.router.expert_bias is not None:
                layer.router.expert_bias.normal_(0, 0.5)
    idx = torch.randint(65, (2, 16))
    with torch.no_grad():
        assert torch.equal(export_moe(model).eval()(idx).logits, model(idx, idx)[0])


def test_the_exported_folder_runs_without_the_repo(tmp_path):
    """The folder's modeling_nanomoe.py is the repo's own model code: it loads in a process that cannot import
    the repo (cwd elsewhere), gives the same logits, and tells the repo's kernels apart from its model
    code."""
    pytest.importorskip('transformers')
    from hf import export_moe, save
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(**SMALL, router='deepseek_v3', route_scale=2.5, router_temperature=0.7)).eval()
    idx = torch.randint(65, (2, 16))
    with torch.no_grad():
        torch.save({'idx': idx, 'logits': model(idx, idx)[0]}, tmp_path / 'ref.pt')
    # (not named hf: a folder of that name in the cwd would stand in for the repo's hf package)
    save(export_moe(model), str(tmp_path / 'exported'))
    source = (tmp_path / 'exported' / 'modeling_nanomoe.py').read_text()
    with open(os.path.join(ROOT, 'moe_model.py')) as f:
        assert 'class Router(nn.Module):' + \
            f.read().split('class Router(nn.Module):')[1].split('\n# ---')[0] in source
    code = ("import sys, torch; from transformers import AutoModelForCausalLM\n"
            "assert not any('moe_kernels' in m or m == 'moe_model' for m in sys.modules)\n"
            "m = AutoModelForCausalLM.from_pretrained('exported', trust_remote_code=True).eval()\n"
            "ref = torch.load('ref.pt')\n"
            "with torch.no_grad(): assert torch.equal(m(ref['idx']).logits, ref['logits'])\n"
            "assert 'moe_model' not in sys.modules; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'} | {
        'HF_HUB_OFFLINE': '1', 'HF_MODULES_CACHE': str(tmp_path / 'modules')}
    p = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith('ok'), p.stderr[-2000:]


# -----------------------------------------------------------------------------
# resume and init_from with keys that differ from the weights'


@pytest.mark.slow
def test_resume_refuses_a_changed_shape_key_and_applies_a_changed_forward_key(shakespeare_char, tmp_path):
    out = str(tmp_path / 'out')
    run('train.py', *TINY, f'--out_dir={out}', '--max_iters=4', '--eval_interval=4')
    (tmp_path / 'wider.py').write_text('n_embd = 64\n')  # a config file's key as a flag's
    for flag, old in (('--top_k=1', 'top_k=2'), ('--n_expert=8', 'n_expert=4'), ('--n_embd=64', 'n_embd=32'),
                      ('--n_layer=3', 'n_layer=2'), (str(tmp_path / 'wider.py'), 'n_embd=32'),
                      ('--router=aux_free', "router='topk'"), ('--vocab_size=100', 'vocab_size=65')):
        p = run('train.py', *TINY, f'--out_dir={out}', '--init_from=resume', '--max_iters=6', flag,
                check=False)
        flag = '--n_embd=64' if flag.endswith('wider.py') else flag
        if flag == '--top_k=1':  # forward: applied, said in one line, and the checkpoint records what ran
            assert p.returncode == 0 and "note: this run changes what the weights of init_from='resume' " \
                "compute: top_k 2 -> 1" in p.stdout
            ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
            assert ckpt['model_args']['top_k'] == ckpt['config']['top_k'] == 1 and ckpt['iter_num'] == 6
            continue
        key, value = flag[2:].split('=')
        value = value if key == 'router' else int(value)
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [
            f"error: {key}={value!r}, but the weights of init_from='resume' have {old}: "
            "it fixes their shape, so it cannot change (leave it out, or start a new run)"], p.stderr
