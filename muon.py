"""
The optimizers of train.py's `optimizer` key, which configure_optimizers builds:
  'adamw'  nanoGPT's AdamW (model.configure_optimizers); the router in a group of its own if router_lr is set
  'muon'   Muon (Keller Jordan's: momentum, then each matrix's update orthogonalised by a Newton-Schulz
           iteration) for the hidden matrices, AdamW for the rest:
             torch.optim.Muon  the 2D hidden matrices: attention, the dense MLPs, shared experts
             ExpertMuon        the stacked expert weights (moe_model.Experts: c_fc [E, d, w] and c_proj
                               [E, h, d]): each expert's matrix orthogonalised on its own, all of them in
                               one batched iteration; under expert parallelism a rank holds E/EP experts and
                               updates those alone, so Muon needs no communication
             AdamW             embeddings, the head, norms, biases, and the router (gate and noise weights)
                               at its own learning rate, router_lr: nanochat's MoE (karpathy/nanochat PR 798)
                               found the router sensitive to it and settled on 0.005
           held by Optimizers, which train.py's loop, GradScaler and checkpoints use as one optimizer.
A group's peak learning rate is param_group['lr_scale'] times learning_rate: train.py's schedule (warmup,
cosine down to min_lr) scales every group alike.
"""
import math

import torch
from torch import nn

from moe_model import Router

OPTIMIZERS = ('adamw', 'muon')
OPTIMIZER_KEYS = ('optimizer', 'learning_rate', 'weight_decay', 'beta1', 'beta2', 'muon_lr', 'muon_momentum',
                  'muon_weight_decay', 'router_lr')


def config_error(config):
    """Why the optimizer keys of config cannot train (a one-line message), or None."""
    if config['optimizer'] not in OPTIMIZERS:
        return f"optimizer={config['optimizer']!r}; allowed: {', '.join(map(repr, OPTIMIZERS))}"
    for key in ('muon_lr', 'muon_weight_decay', 'router_lr'):
        if not 0 <= config[key] < math.inf:
            return f"{key}={config[key]} must be >= 0 and finite"
    if not 0 <= config['muon_momentum'] < 1:
        return f"muon_momentum={config['muon_momentum']} must be >= 0 and < 1"
    scaled = config['optimizer'] == 'muon' or config['router_lr'] > 0  # (lr_scale: a ratio to learning_rate)
    if scaled and not config['learning_rate'] > 0:
        return (f"learning_rate={config['learning_rate']} with optimizer={config['optimizer']!r}, router_lr="
                f"{config['router_lr']}: must be > 0 (muon_lr and router_lr follow its schedule, in ratio)")
    return None


def resume_error(saved, config, path):
    """Why a run with config cannot resume the optimizer state of a checkpoint whose config is saved (its
    parameter groups differ: another optimizer, or router_lr set or not under AdamW), or None."""
    def layout(c):  # (checkpoints from before these keys were AdamW's)
        name = c.get('optimizer', 'adamw')
        router = name == 'adamw' and c.get('router_lr', 0) > 0
        return f"optimizer={name!r}" + (', router_lr > 0' if router else '')
    if layout(saved) == layout(config):
        return None
    return (f"init_from='resume' with {layout(config)}, but {path} was trained with {layout(saved)}: its "
            f"optimizer state does not fit; resume with its settings, or start a new run from its weights "
            f"(init_from={path})")


def configure_optimizers(model, device_type, optimizer='adamw', learning_rate=6e-4, weight_decay=0.1,
                         beta1=0.9, beta2=0.95, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0,
                         router_lr=0.0):
    """The run's optimizer for model, built after expert parallelism sharded it (ExpertMuon gets this rank's
    experts). 'adamw' without router_lr is model.configure_optimizers itself: older checkpoints resume."""
    betas = (beta1, beta2)
    if optimizer == 'adamw' and not router_lr:
        return model.configure_optimizers(weight_decay, learning_rate, betas, device_type)
    router = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    embeddings.add(id(model.lm_head.weight))  # (the token embedding too when tied)
    groups = {'decay': [], 'no_decay': [], 'router': [], 'muon': [], 'experts': []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in router:
            kind = 'router'
        elif p.dim() < 2 or name.endswith('bias'):  # (stacked expert biases are 2D)
            kind = 'no_decay'
        elif optimizer == 'adamw' or id(p) in embeddings:
            kind = 'decay'
        else:  # a hidden matrix, or a stack of them: the experts'
            kind = 'muon' if p.dim() == 2 else 'experts'
        groups[kind].append(p)
    for kind, params in groups.items():
        if params:
            print(f"{kind} parameters: {len(params)} tensors, {sum(p.numel() for p in params):,} parameters")
    router_scale = (router_lr or learning_rate) / learning_rate
    adamw = [{'params': groups['decay'], 'weight_decay': weight_decay},
             {'params': groups['no_decay'], 'weight_decay': 0.0},
             {'params': groups['router'], 'weight_decay': weight_decay, 'lr_scale': router_scale}]
    fused = device_type in ('cuda', 'cpu')  # as model.configure_optimizers
    adamw = torch.optim.AdamW([g for g in adamw if g['params']], lr=learning_rate, betas=betas, fused=fused)
    if optimizer == 'adamw':
        return adamw
    muon = dict(lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay)
    muons = [opt([{'params': groups[kind], 'lr_scale': muon_lr / learning_rate}], **muon)
             for kind, opt in (('muon', torch.optim.Muon), ('experts', ExpertMuon)) if groups[kind]]
    return Optimizers(adamw, *muons)


def orthogonalize(G, coefficients, steps, eps):
    """torch.optim.Muon's Newton-Schulz iteration (torch/optim/_muon.py, _zeropower_via_newtonschulz: the
    same bfloat16 arithmetic, op for op) on every matrix of a stack G [n, A, B] at once: batched matmuls, one
    norm per matrix, so each matrix's result is its own (tests/test_muon.py: torch.optim.Muon's, bitwise)."""
    a, b, c = coefficients
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side: A @ A.T is the smaller square
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    return X.mT if tall else X


class ExpertMuon(torch.optim.Optimizer):
    """torch.optim.Muon for stacks of matrices W [E, fan_in, fan_out] (moe_model.Experts: expert e computes
    x @ W[e]): torch.optim.Muon's defaults and math, applied to each W[e] as it would be to that expert's
    nn.Linear weight W[e].T [fan_out, fan_in], whose shape sets the learning-rate adjustment (so an expert
    steps as the dense MLP it stands for); every expert's matrix is orthogonalised on its own, all E in one
    batched Newton-Schulz iteration (orthogonalize). The state is torch.optim.Muon's: a momentum_buffer per
    parameter, of its shape (expert_parallel.py gathers and cuts it along the experts, as AdamW's moments)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None):
        if adjust_lr_fn not in (None, 'original', 'match_rms_adamw'):
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}; allowed: None, 'original', 'match_rms_adamw'")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, eps=eps,
                        ns_coefficients=ns_coefficients, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group['params']:
                if p.dim() != 3:
                    raise ValueError(f"ExpertMuon takes stacks [E, fan_in, fan_out], not {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group['lr'], group['momentum']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state['momentum_buffer']
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group['nesterov'] else buf
                update = orthogonalize(update, group['ns_coefficients'], group['ns_steps'], group['eps'])
                fan_out, fan_in = p.size(2), p.size(1)
                if group['adjust_lr_fn'] == 'match_rms_adamw':
                    adjusted_lr = lr * 0.2 * math.sqrt(max(fan_out, fan_in))
                else:  # None, 'original': Keller Jordan's sqrt(max(1, rows / cols)) of the nn.Linear weight
                    adjusted_lr = lr * math.sqrt(max(1, fan_out / fan_in))
                p.mul_(1 - lr * group['weight_decay'])
                p.add_(update, alpha=-adjusted_lr)
        return loss


class Optimizers:
    """Optimizers over disjoint parameters, as one optimizer: what train.py's loop, GradScaler (unscale_ and
    step read param_groups, then call step) and checkpoints ask of one. The state dict is in torch's format,
    parameters numbered across all the param groups in order (what expert_parallel.py's optimizer state
    dicts and checkpoint.restore expect)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # read afresh: load_state_dict replaces an optimizer's groups
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self):
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()  # numbers its own parameters from 0
            state.update({i + offset: s for i, s in sd['state'].items()})
            groups += [{**g, 'params': [i + offset for i in g['params']]} for g in sd['param_groups']]
            offset += sum(len(g['params']) for g in opt.param_groups)
        return {'state': state, 'param_groups': groups}

    def load_state_dict(self, state_dict):
        groups = state_dict['param_groups']
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, the optimizers "
                             f"{len(self.param_groups)}")
        offset = 0
        for opt in self.optimizers:
            own, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
            ids = [i for g in own for i in g['params']]
            state = {i - offset: state_dict['state'][i] for i in ids if i in state_dict['state']}
            own = [{**g, 'params': [i - offset for i in g['params']]} for g in own]
            opt.load_state_dict({'state': state, 'param_groups': own})
            offset += len(ids)
