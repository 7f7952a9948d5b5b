"""
Expert parallelism (EP) for training: the experts of every MoE layer are split over the expert_parallel
ranks of an EP group, and token-slots travel to their expert's rank by all-to-all (the forward is
moe_model.expert_parallel_experts). The world of W processes is a (W / EP) x EP grid of ranks:
  a row    (ranks r with the same r // EP) is an EP group: together it holds every expert once,
           rank r holding experts [i * E / EP, (i + 1) * E / EP) of each layer, i = r % EP;
  a column (ranks r with the same r % EP) holds the same experts: their gradients are all-reduced there.
Every other parameter is data-parallel over all W ranks, as with plain DDP (train.py wraps the model in
DDP and tells it to leave the expert weights alone). Checkpoints hold the full, unsharded model and
optimizer, so they load in one process, or under any other EP degree.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moe_model import Experts, expert_parallel_experts


def init_expert_parallel(expert_parallel, device_type):
    """The EP group of this rank and its expert-data-parallel group (same experts, other EP groups)."""
    mesh = init_device_mesh(device_type, (dist.get_world_size() // expert_parallel, expert_parallel),
                            mesh_dim_names=('expert_dp', 'ep'))
    return mesh.get_group('ep'), mesh.get_group('expert_dp')


def expert_params(model):
    """(name, parameter) of every expert weight (the sharded ones under EP), in a fixed order."""
    return [(f'{module_name}.{name}', p) for module_name, module in model.named_modules() if isinstance(module, Experts)
            for name, p in module.named_parameters()]


def _shard(t, group):
    """This rank's contiguous slice of t along dim 0 (the expert dim)."""
    n = t.size(0) // dist.get_world_size(group)
    return t[dist.get_rank(group) * n:(dist.get_rank(group) + 1) * n].clone()


def _gather(t, group):
    """The full tensor, from every rank's shard of it (concatenated along dim 0), on the CPU."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat([part.cpu() for part in parts])


def shard_experts(model, ep_group):
    """Keep only this rank's experts, in place. Call it before model.to(device), so that no device ever
    holds every expert, and before building the optimizer. Every rank must start from the same full
    weights: the same seed, or the same checkpoint."""
    for _, p in expert_params(model):
        p.data = _shard(p.data, ep_group)
    # torch.compile must run the dispatch eagerly (data-dependent split sizes, collectives); wrapped here,
    # not where it is defined, so that importing moe_model does not load torch._dynamo
    dispatch = torch.compiler.disable(expert_parallel_experts)
    for module in model.modules():
        if isinstance(module, Experts):
            module.ep_group, module.ep_dispatch = ep_group, dispatch


def _expert_state_ids(optimizer, model):
    """The optimizer's state-dict keys (parameter indices) of the expert weights, with those weights."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group['params'])}
    return [(index[id(p)], p) for _, p in expert_params(model)]


def shard_optimizer_state_dict(sd, optimizer, model, ep_group):
    """A full (unsharded) optimizer state dict cut to this rank's experts, for optimizer.load_state_dict."""
    sd = {**sd, 'state': dict(sd['state'])}
    for i, p in _expert_state_ids(optimizer, model):
        if i in sd['state']:  # per-expert tensors (AdamW's exp_avg, exp_avg_sq) are cut; 'step' is shared
            sd['state'][i] = {k: _shard(v, ep_group) if torch.is_tensor(v) and v.dim() == p.dim() else v
                              for k, v in sd['state'][i].items()}
    return sd


def full_state_dict(model, ep_group):
    """model.state_dict() with every expert weight gathered from the EP group, one tensor at a time,
    to the CPU. Collective: every rank of the EP group calls it."""
    sd = model.state_dict()
    for name, p in expert_params(model):
        sd[name] = _gather(p, ep_group)
    return sd


def full_optimizer_state_dict(optimizer, model, ep_group):
    """optimizer.state_dict() with the expert weights' state gathered to the CPU (collective, as above)."""
    sd = optimizer.state_dict()
    sd['state'] = dict(sd['state'])
    for i, p in _expert_state_ids(optimizer, model):
        if i in sd['state']:
            sd['state'][i] = {k: _gather(v, ep_group) if torch.is_tensor(v) and v.shape == p.shape else v
                              for k, v in sd['state'][i].items()}
    return sd


def sync_expert_grads(model, expert_dp_group, world_size):
    """After the backward of a step's last micro-batch: each expert's gradient summed over the ranks
    holding that expert, over world_size. That equals DDP's mean over all ranks: the all-to-all backward
    already summed, on the expert's owner, the gradients of every token the EP group sent it."""
    for _, p in expert_params(model):
        if p.grad is None:  # no token reached this rank's experts in the whole step
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=expert_dp_group)
        p.grad.div_(world_size)


def clip_grad_norm(model, max_norm, ep_group):
    """torch.nn.utils.clip_grad_norm_ over the whole, unsharded model: the expert weights' share of the
    norm is summed over the EP group (every other gradient is already the same on every rank)."""
    expert_ids = {id(p) for _, p in expert_params(model)}
    with_grad = [p for p in model.parameters() if p.grad is not None]
    expert_sq = torch.nn.utils.get_total_norm([p.grad for p in with_grad if id(p) in expert_ids]).pow(2)
    dist.all_reduce(expert_sq, group=ep_group)
    other_sq = torch.nn.utils.get_total_norm([p.grad for p in with_grad if id(p) not in expert_ids]).pow(2)
    total = (other_sq + expert_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
    return total
