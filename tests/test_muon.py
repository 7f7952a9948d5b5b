"""muon.py: ExpertMuon against torch.optim.Muon on every expert's matrix, and what train.py's optimizer='muon'
builds: which optimizer each parameter gets, and the optimizers as one (state dicts, GradScaler)."""
import copy

import pytest
import torch

from moe_model import MoEConfig, MoEGPT
from muon import ExpertMuon, Optimizers, configure_optimizers


@pytest.mark.parametrize('shape', [(4, 16, 64), (3, 48, 16)])  # as c_fc [E, d, w] (wide) and c_proj [E, h, d]
@pytest.mark.parametrize('nesterov, adjust_lr_fn', [(True, None), (False, 'match_rms_adamw')])
def test_expert_muon_equals_torch_muon_on_every_expert_slice(shape, nesterov, adjust_lr_fn):
    """Expert e computes x @ W[e]: W[e] steps exactly as torch.optim.Muon steps its nn.Linear weight W[e].T
    (momentum, Newton-Schulz, the shape's learning-rate adjustment, weight decay), bit for bit; and a shard
    of the experts (expert parallelism) steps as those experts do in the whole stack."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(shape))
    linears = [torch.nn.Parameter(W[e].T.clone()) for e in range(shape[0])]
    shard = torch.nn.Parameter(W[1:].clone())
    hyper = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, theirs = ExpertMuon([W], **hyper), torch.optim.Muon(linears, **hyper)
    sharded = ExpertMuon([shard], **hyper)
    for _ in range(3):
        G = torch.randn(shape)
        W.grad, shard.grad = G.clone(), G[1:].clone()
        for e, p in enumerate(linears):
            p.grad = G[e].T.clone()
        for opt in (ours, theirs, sharded):
            opt.step()
    assert not torch.allclose(W[0].T, linears[0].grad)  # (it moved)
    for e, p in enumerate(linears):
        assert torch.equal(W[e].T, p), e
        assert torch.equal(ours.state[W]['momentum_buffer'][e].T, theirs.state[p]['momentum_buffer']), e
    assert torch.equal(shard, W[1:])


MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_expert=4, top_k=2,
             expert_hidden=32, bias=True, router='noisy_topk', n_shared_expert=1)


def test_muon_takes_the_hidden_matrices_and_experts_adamw_the_rest_and_the_router_its_own_lr():
    model = MoEGPT(MoEConfig(**MODEL))
    opt = configure_optimizers(model, 'cpu', optimizer='muon', learning_rate=1e-3, muon_lr=0.02,
                               router_lr=5e-3)
    adamw, muon, experts = opt.optimizers
    assert (type(adamw), type(muon), type(experts)) == (torch.optim.AdamW, torch.optim.Muon, ExpertMuon)
    name = {id(p): n for n, p in model.named_parameters()}
    names = lambda groups: {name[id(p)] for g in groups for p in g['params']}
    decay, no_decay, router = adamw.param_groups
    assert names([decay]) == {'transformer.wte.weight', 'transformer.wpe.weight'}  # (lm_head: tied to wte)
    every_layer = lambda names: {f'transformer.h.{i}.{n}' for i in (0, 1) for n in names}
    assert names([router]) == every_layer(['mlp.router.gate.weight', 'mlp.router.noise.weight'])
    assert names(experts.param_groups) == every_layer(['mlp.experts.c_fc', 'mlp.experts.c_proj'])
    matrices = ('attn.c_attn', 'attn.c_proj', 'mlp.shared.c_fc', 'mlp.shared.c_proj')
    assert names(muon.param_groups) == every_layer([f'{m}.weight' for m in matrices])
    assert all(p.dim() < 2 or name[id(p)].endswith('bias') for p in no_decay['params'])
    assert sum(len(g['params']) for g in opt.param_groups) == len(name)  # every parameter, once
    assert [g.get('lr_scale', 1.0) for g in opt.param_groups] == [1.0, 1.0, 5.0, 20.0, 20.0]
    # AdamW without router_lr is nanoGPT's, as before; with it the router gets a third group
    assert [len(g['params']) for g in configure_optimizers(model, 'cpu').param_groups] == \
        [len(g['params']) for g in model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 'cpu').param_groups]
    assert [g.get('lr_scale') for g in configure_optimizers(model, 'cpu', router_lr=1.2e-3).param_groups] == \
        [None, None, 2.0]


def test_the_optimizers_step_under_grad_scaler_and_resume_from_their_state_dict():
    """GradScaler unscales every optimizer's gradients (a power-of-two scale: exactly the unscaled step) and
    skips them all on an inf; a state dict loaded into fresh optimizers continues exactly."""
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(**{**MODEL, 'router': 'topk'}))
    twin = copy.deepcopy(model)
    X = torch.randint(64, (3, 16))
    opts = [configure_optimizers(m, 'cpu', optimizer='muon', learning_rate=1e-3) for m in (model, twin)]
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0**10)

    def step(m, opt, scaler=None, poison=False):
        loss = m(X, X)[1]
        (scaler.scale(loss) if scaler else loss).backward()
        if poison:
            m.transformer.h[0].mlp.experts.c_fc.grad[0, 0, 0] = float('inf')
        if scaler:
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step(model, opts[0], scaler)
        step(twin, opts[1])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    before = copy.deepcopy(model.state_dict())
    step(model, opts[0], scaler, poison=True)  # skipped: by every optimizer
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 2.0**9

    sd = opts[1].state_dict()
    assert isinstance(opts[1], Optimizers) and len(sd['param_groups']) == len(opts[1].param_groups) == 5
    fresh_twin = MoEGPT(MoEConfig(**{**MODEL, 'router': 'topk'}))
    fresh_twin.load_state_dict(twin.state_dict())
    fresh = configure_optimizers(fresh_twin, 'cpu', optimizer='muon', learning_rate=1e-3)
    fresh.load_state_dict(copy.deepcopy(sd))
    step(twin, opts[1])
    step(fresh_twin, fresh)
    for p, q in zip(twin.parameters(), fresh_twin.parameters()):
        assert torch.equal(p, q)
