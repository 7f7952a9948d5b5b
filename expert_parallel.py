"""
Expert parallelism (EP) for training: the experts of every MoE layer are split over the expert_parallel
ranks of an EP group, and token-slots travel to their expert's rank by all-to-all (expert_parallel_experts,
the grouped backend over the group). The world of W processes is a (W / EP) x EP grid of ranks:
  a row    (ranks r with the same r // EP) is an EP group: together it holds every expert once,
           rank r holding experts [i * E / EP, (i + 1) * E / EP) of each layer, i = r % EP;
  a column (ranks r with the same r % EP) holds the same experts: their gradients are all-reduced there.
Every other parameter is data-parallel over all W ranks, as with plain DDP. Checkpoints hold the full,
unsharded model and optimizer, so they load in one process, or under any other EP degree.

train.py talks to one ExpertParallel object, whose methods do what plain torch does when EP is off
(degree 1), so the training loop never asks whether it is on. Per MoE layer a forward makes three
collectives (the split sizes, with one host sync, then two all-to-alls) and a backward two. EP groups
are consecutive ranks, so with torchrun and EP <= GPUs per node the all-to-alls stay inside a node.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from moe_model import Experts, MoEConfig, sort_by_expert, combine, compute_dtype, grouped_mlp


def config_error(expert_parallel, model_args, expert_impl, dtype, world_size):
    """Why this run cannot use expert_parallel (a one-line message), or None."""
    if not isinstance(expert_parallel, int) or expert_parallel < 1:
        return f"expert_parallel={expert_parallel!r} must be a positive integer"
    if expert_parallel == 1:
        return None
    if model_args['n_expert'] == 0:
        return f"expert_parallel={expert_parallel} needs an MoE model (n_expert > 0)"
    if model_args['n_expert'] % expert_parallel:
        return f"expert_parallel={expert_parallel} must divide n_expert={model_args['n_expert']}"
    if expert_impl != 'grouped':
        return f"expert_impl={expert_impl!r} with expert_parallel={expert_parallel}; allowed: 'grouped'"
    if MoEConfig(**model_args).expert_choice:  # (the router preset's, or the run's own setting)
        return (f"router={model_args['router']!r} with expert_parallel={expert_parallel}: expert choice "
                f"(expert_choice=True) is not supported under expert parallelism")
    if dtype == 'float16':  # GradScaler checks for inf per rank, and expert gradients differ between ranks
        return f"dtype='float16' with expert_parallel={expert_parallel}; allowed: 'float32', 'bfloat16'"
    if world_size % expert_parallel:
        return (f"expert_parallel={expert_parallel} must divide the number of processes ({world_size}); "
                f"launch with torchrun --nproc_per_node=<a multiple of {expert_parallel}>")
    return None


def expert_params(model):
    """(name, parameter) of every expert weight (the sharded ones under EP), in a fixed order."""
    return [(f'{module_name}.{name}', p) for module_name, module in model.named_modules()
            if isinstance(module, Experts)
            for name, p in module.named_parameters()]


class ExpertParallel:
    """EP of `degree` over the world of a torchrun launch, or plain torch when degree is 1."""

    def __init__(self, degree=1, device_type='cpu'):
        self.degree, self.group, self.expert_dp_group = degree, None, None
        # by this rank to others by all-to-all, in training forwards and backwards
        self.bytes_sent = self.step_bytes = 0
        if degree > 1:
            mesh = init_device_mesh(device_type, (dist.get_world_size() // degree, degree),
                                    mesh_dim_names=('expert_dp', 'ep'))
            self.group, self.expert_dp_group = mesh.get_group('ep'), mesh.get_group('expert_dp')

    def shard(self, model):
        """Keep only this rank's experts, in place, and route every MoE layer through the all-to-all
        dispatch. Call it before model.to(device), so that no device ever holds every expert, and
        before building the optimizer. Every rank must start from the same full weights: the same seed,
        or the same checkpoint."""
        if self.group is None:
            return
        for _, p in expert_params(model):
            p.data = _shard(p.data, self.group)
        # torch.compile must run the dispatch eagerly (data-dependent split sizes, collectives); wrapped
        # here, not where it is defined, so that importing this file does not load torch._dynamo
        dispatch = torch.compiler.disable(lambda *args: expert_parallel_experts(*args, ep=self))
        for layer in model.moe_layers().values():
            layer.backend = dispatch
        print(f"expert parallel: {self.degree} ranks per EP group, "
              f"{layer.experts.c_fc.size(0)} experts per layer on this rank")

    def data_parallel(self, model, **kwargs):
        """DDP around model; under EP it leaves the expert weights alone (sync_grads syncs them)."""
        if self.group is not None:
            DDP._set_params_and_buffers_to_ignore_for_model(model, [name for name, _ in expert_params(model)])
        return DDP(model, **kwargs)

    def state_dict(self, model):
        """model.state_dict(), with every expert weight gathered from the EP group, one tensor at a time,
        to the CPU. Collective under EP: every rank of the EP group calls it."""
        sd = model.state_dict()
        if self.group is not None:
            for name, p in expert_params(model):
                sd[name] = _gather(p, self.group)
        return sd

    def optimizer_state_dict(self, optimizer, model):
        """optimizer.state_dict(), with the expert weights' state gathered to the CPU (collective, as
        above)."""
        sd = optimizer.state_dict()
        if self.group is not None:
            sd['state'] = dict(sd['state'])
            for i, p in _expert_state_ids(optimizer, model):
                if i in sd['state']:
                    sd['state'][i] = {k: _gather(v, self.group) if torch.is_tensor(v) and v.shape == p.shape
                                      else v
                                      for k, v in sd['state'][i].items()}
        return sd

    def load_optimizer_state_dict(self, optimizer, model, sd):
        """optimizer.load_state_dict of a full (unsharded) state dict, cut to this rank's experts."""
        if self.group is not None:
            sd = {**sd, 'state': dict(sd['state'])}
            for i, p in _expert_state_ids(optimizer, model):
                # per-expert tensors (AdamW's exp_avg, exp_avg_sq) are cut; 'step' is shared
                if i in sd['state']:
                    sd['state'][i] = {k: _shard(v, self.group) if torch.is_tensor(v) and v.dim() == p.dim()
                                      else v
                                      for k, v in sd['state'][i].items()}
        optimizer.load_state_dict(sd)

    def sync_grads(self, model, world_size):
        """After the backward of a step's last micro-batch: each expert's gradient summed over the ranks
        holding that expert, over world_size. That equals DDP's mean over all ranks: the all-to-all
        backward already summed, on the expert's owner, the gradients of every token the EP group sent it.
        Without EP, DDP (or the single process) has done it already."""
        if self.group is None:
            return
        self.step_bytes, self.bytes_sent = self.bytes_sent, 0  # the step's all-to-alls are done
        for _, p in expert_params(model):
            if p.grad is None:  # no token reached this rank's experts in the whole step
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.expert_dp_group)
            p.grad.div_(world_size)

    def clip_grad_norm(self, model, max_norm):
        """torch.nn.utils.clip_grad_norm_ over the whole, unsharded model: under EP the expert weights'
        share of the norm is summed over the EP group (every other gradient is the same on every rank)."""
        if self.group is None:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        expert_ids = {id(p) for _, p in expert_params(model)}
        with_grad = [p for p in model.parameters() if p.grad is not None]
        expert_sq = torch.nn.utils.get_total_norm([p.grad for p in with_grad if id(p) in expert_ids]).pow(2)
        dist.all_reduce(expert_sq, group=self.group)
        other_sq = torch.nn.utils.get_total_norm([p.grad for p in with_grad
                                                  if id(p) not in expert_ids]).pow(2)
        total = (other_sq + expert_sq).sqrt()
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
        return total

    def step_stats(self):
        """For the training log: the megabytes this rank sent by all-to-all in the last step ({} without
        EP)."""
        return {} if self.group is None else {'a2a_MB': self.step_bytes / 1e6}


def _shard(t, group):
    """This rank's contiguous slice of t along dim 0 (the expert dim)."""
    n = t.size(0) // dist.get_world_size(group)
    return t[dist.get_rank(group) * n:(dist.get_rank(group) + 1) * n].clone()


def _gather(t, group):
    """The full tensor, from every rank's shard of it (concatenated along dim 0), on the CPU."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat([part.cpu() for part in parts])


def _expert_state_ids(optimizer, model):
    """The optimizer's state-dict keys (parameter indices) of the expert weights, with those weights."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group['params'])}
    return [(index[id(p)], p) for _, p in expert_params(model)]

# -----------------------------------------------------------------------------
# The dispatch: moe_model's backend signature, over an EP group


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable split sizes whose backward is the reverse all-to-all
    (torch.distributed.nn's differentiable version aborts at exit on gloo)."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad.new_empty(sum(ctx.send_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_x, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_x, None, None, None


def expert_parallel_experts(x, topk_idx, topk_weight, experts, ep):
    """The grouped backend over ep's EP group: slots sorted by (global) expert are also sorted by the
    rank that owns the expert, so one all-to-all sends each rank its slots (split sizes exchanged first);
    the owner regroups what it received by local expert, runs grouped_mlp, and the reverse all-to-all
    brings the outputs home to be weighted and summed. experts holds this rank's shard."""
    group = ep.group
    n_ranks, rank, E_local = dist.get_world_size(group), dist.get_rank(group), experts.c_fc.size(0)
    order, token, counts = sort_by_expert(topk_idx, n_ranks * E_local)
    recv_counts = torch.empty_like(counts)  # [source rank, local expert]: slots coming to this rank
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv_counts = recv_counts.view(n_ranks, E_local)
    send_splits, recv_splits = counts.view(n_ranks, E_local).sum(1).tolist(), recv_counts.sum(1).tolist()
    # slots travel in the GEMMs' dtype (bf16 under autocast: half the bytes of x's float32)
    x_recv = _AllToAll.apply(x.index_select(0, token).to(compute_dtype(x)), send_splits, recv_splits, group)
    # x_recv is ordered by (source rank, local expert): regroup by local expert, stably
    local_expert = torch.arange(E_local, device=x.device).repeat(n_ranks)
    by_expert = torch.argsort(torch.repeat_interleave(local_expert, recv_counts.flatten(),
                                                      output_size=x_recv.size(0)),
                              stable=True)
    out = grouped_mlp(x_recv.index_select(0, by_expert), recv_counts.sum(0), experts)
    out = out.index_select(0, torch.argsort(by_expert))  # back to (source rank, local expert) order
    out = _AllToAll.apply(out, recv_splits, send_splits, group)
    if torch.is_grad_enabled():  # a training forward; its backward sends as many bytes again
        sent = sum(send_splits) - send_splits[rank] + sum(recv_splits) - recv_splits[rank]
        ep.bytes_sent += 2 * sent * out.size(1) * out.element_size()
    return combine(out, topk_weight, order, token, x.size(0)).to(x.dtype), 0.0
