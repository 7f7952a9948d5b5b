"""
Benchmarks. Two modes:

1) a whole training step (forward + backward + optimizer step) of the configured model, dense
   (n_expert=0) or MoE, on random tokens (or real data with real_data=True):
   $ python bench.py --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --vocab_size=65 --n_expert=8 \
         --expert_hidden=256
   $ python bench.py --init_from=resume --out_dir=out-shakespeare-char-moe   (the checkpoint's model)
   $ python bench.py --init_from=<a Hugging Face folder> --block_size=256       (its model, random weights)
   prints ms/iter, tokens/s, MFU (from ACTIVE parameters; against peak_flops, by default the GPU's bf16 peak,
   and none on a CPU unless peak_flops is given) and the step's peak memory (activation_checkpointing
   = 'moe' or 'all' trades compute for it). compare_dense=True also times the dense twin (n_expert=0; needs
   top_k * expert_hidden = mlp_hidden, every layer MoE, no shared experts), and compare_compile=True each
   model both eager and compiled, one step of each in turn: on a shared machine only a ratio measured that
   way means anything. optimizer='muon' times Muon's step instead of AdamW's (muon.py). profile_steps=N
   then profiles N more steps of each and prints the ops whose time per step differs most between them.
   $ python bench.py --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --vocab_size=65 --expert_hidden=256 \
         --compare_compile=True

2) moe_layer=True: ONE MoE layer forward + backward for every expert backend, next to a dense MLP
   with the same active FLOPs (hidden = top_k * expert_hidden), for each n_expert in layer_experts:
   $ python bench.py --moe_layer=True --n_embd=384 --expert_hidden=1536 --layer_tokens=4096
   prints ms, the ratio to the dense-equivalent MLP (timed in turn with each backend), achieved GFLOP/s, that
   as a share of torch's dense GEMM of the same FLOPs (the ceiling, timed first) and peak memory (CUDA only).
   On the CPU, NANOMOE_CPU_GROUPED_MM=0 times torch's grouped_mm instead of moe_kernels/cpu_grouped_mm.cpp:
   $ NANOMOE_CPU_GROUPED_MM=0 python bench.py --moe_layer=True --n_embd=384 --expert_hidden=1536 \
         --layer_impls=grouped
"""
import os
import sys
import time
import itertools
from contextlib import nullcontext, contextmanager
from dataclasses import fields

import numpy as np
import torch

from moe_kernels import cpu_grouped_mm
from configurator import FORK_KEYS, configure, fail, check_choice, check_range, check_device, check_memory
from moe_kernels.cpu_memory import keep_freed_memory
from checkpoint import load_checkpoint, CheckpointError
from init_model import memory_need
from model import CHECKPOINTING, GPTConfig, MLP, peak_flops as gpu_peak_flops
from moe_model import build_model, MoE, MoEConfig, EXPERT_IMPLS, MODEL_KEYS
from muon import OPTIMIZERS, configure_optimizers

# -----------------------------------------------------------------------------
init_from = 'scratch'  # 'scratch' (the config below), 'resume' (out_dir/ckpt.pt's model), an HF folder
out_dir = 'out'
batch_size = 12
# the model: every key of moe_model.MoEConfig, at its default
# there (n_expert = 0: the dense GPT), except for these
globals().update({f.name: f.default for f in fields(MoEConfig)})
bias = False
real_data = False
dataset = 'openwebtext'
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # examples: 'cpu', 'cuda', 'cuda:0', 'cuda:1', etc.
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = False  # use PyTorch 2.0 to compile the model to be faster
activation_checkpointing = 'none'  # 'none', 'moe' (the experts) or 'all': recompute activations in backward
optimizer = 'adamw'  # the step's: 'adamw' or 'muon' (train.py's key, muon.py: its Newton-Schulz costs time)
warmup_iters = 5
bench_iters = 20
peak_flops = 0.0  # for MFU; 0: a GPU's bf16 peak (model.peak_flops: A100 312e12...), none on a CPU
# model mode: also time the dense twin (n_expert=0), interleaved step by step, and print the ratio
compare_dense = False
# model mode: time each model eager and compiled (torch.compile), interleaved, and print the ratio
compare_compile = False
# model mode: profile this many more steps of each model (torch profiler) and print the ops whose self time
# per step differs most between them (with compare_dense: where the MoE's extra time goes); 0: off
profile_steps = 0
# moe_layer mode
moe_layer = False
layer_tokens = 4096
layer_experts = '8,32,128'  # comma-separated n_expert values
layer_impls = 'loop,grouped,batched'  # comma-separated backends (add triton on a GPU)
# -----------------------------------------------------------------------------
config = configure({k: v for k, v in globals().items() if not k.startswith('_')
                    and isinstance(v, (int, float, bool, str))
                    or k in MODEL_KEYS}, sys.argv[1:], foreign=FORK_KEYS)  # the seed forks' keys too
globals().update(config)
check_choice(config, 'dtype', ('float32', 'bfloat16', 'float16'))
check_choice(config, 'activation_checkpointing', CHECKPOINTING)
check_choice(config, 'optimizer', OPTIMIZERS)
check_device(device)
check_range(config, ('batch_size', 'block_size', 'bench_iters', 'layer_tokens'), 1)
check_range(config, ('warmup_iters', 'profile_steps'), 0)
HINT = ("make it smaller (batch_size, block_size, n_layer, n_embd, n_expert, expert_hidden, layer_tokens): "
        "the defaults are GPT-2 size, for a GPU; bench.py's docstring has CPU-sized examples")

torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
device_type = 'cuda' if 'cuda' in device else 'cpu'  # for later use in torch.autocast
if device_type == 'cpu':
    # reuse freed memory: no page faults on every step's large tensors (moe_kernels/cpu_memory.py)
    keep_freed_memory()
    print("grouped GEMMs on the CPU: " + (
        "cpu_grouped_mm.cpp, " + ("float32 products by BLAS directly" if torch.ops.nanomoe_cpu.blas_direct()
                                  else "products by at::mm") if cpu_grouped_mm.available()
        else "torch's grouped_mm"))
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize()


def time_it(*steps):
    """Median milliseconds of each step() over bench_iters runs, after warmup_iters. Several steps are
    timed in turn, one run of each per round, so that a noisy machine slows them all alike."""
    for _ in range(warmup_iters):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(bench_iters):
        for step, t in zip(steps, times):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            t.append(time.perf_counter() - t0)
    ms = [1000 * float(np.median(t)) for t in times]
    return ms if len(steps) > 1 else ms[0]


def bench_moe_layer():
    hidden = expert_hidden or mlp_hidden or 4 * n_embd
    E = max(int(e) for e in layer_experts.split(','))  # the largest layer and the dense twin, with gradients
    matmuls = 3 if mlp == 'swiglu' else 2  # (gate, up, down)
    per_token = 2 * matmuls * top_k * hidden + 2 * n_embd + 3 * E  # the two layers' activations
    check_memory({'weights and gradients': 8 * n_embd * hidden * matmuls * (E + top_k),
                  f'activations of {layer_tokens:,} tokens': 4 * layer_tokens * per_token}, device, hint=HINT)
    print(f"one layer, fwd+bwd: {layer_tokens} tokens, n_embd {n_embd}, expert hidden {hidden}, "
          f"top_k {top_k}, {mlp}, {dtype} on {device}")
    x = torch.randn(1, layer_tokens, n_embd, device=device, dtype=ptdtype if device_type == 'cpu'
                    else torch.float32)
    x.requires_grad_(True)
    # an active-FLOPs twin: a dense MLP whose hidden size is what a token runs in the MoE
    dense = MLP(GPTConfig(n_embd=n_embd, n_head=1, bias=bias, mlp=mlp), top_k * hidden).to(device)
    flops = 3 * matmuls * 2 * layer_tokens * n_embd * top_k * hidden  # fwd+bwd = 3x fwd; matmuls of 2*m*n*k

    def layer_step(layer):
        def step():
            # as a training step does: gradients are written, not accumulated
            layer.zero_grad(set_to_none=True)
            x.grad = None
            with ctx:
                y = layer(x)
            y.float().sum().backward()
        return step

    def peak_memory():
        return (f"{torch.cuda.max_memory_allocated() / 2**20:8.0f} MiB" if device_type == 'cuda'
                else '     n/a')

    # the ceiling: torch's dense GEMM, [tokens, d] @ [d, top_k * hidden], in the compute dtype
    a = torch.randn(layer_tokens, n_embd, device=device, dtype=ptdtype)
    w = torch.randn(n_embd, top_k * hidden, device=device, dtype=ptdtype)
    gemm = flops / (3 * matmuls) / time_it(lambda: a @ w) / 1e6
    print(f"torch's dense GEMM [{layer_tokens}, {n_embd}] @ [{n_embd}, {top_k * hidden}], {dtype}: "
          f"{gemm:.1f} GFLOP/s (the ceiling)")
    if device_type == 'cpu' and ptdtype != torch.float32:
        dense = dense.to(ptdtype)
    dense_step = layer_step(dense)
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    dense_ms = time_it(dense_step)
    print(f"{'n_expert':>8} {'impl':>8} {'ms':>9} {'x dense':>8} {'dense ms':>9} {'GFLOP/s':>9} "
          f"{'% GEMM':>7} {'peak mem':>12}")
    print(f"{'-':>8} {'dense':>8} {dense_ms:9.2f} {1.0:8.2f} {dense_ms:9.2f} {flops / dense_ms / 1e6:9.1f} "
          f"{100 * flops / dense_ms / 1e6 / gemm:7.1f} {peak_memory():>12}")
    for E in [int(e) for e in layer_experts.split(',')]:
        cfg = MoEConfig(n_embd=n_embd, n_head=1, n_layer=1, bias=bias, n_expert=E, top_k=top_k,
                        expert_hidden=hidden, capacity_factor=capacity_factor, mlp=mlp)
        layer = MoE(cfg).to(device)
        torch.nn.init.normal_(layer.experts.c_fc, std=0.02)
        torch.nn.init.normal_(layer.experts.c_proj, std=0.02)
        if device_type == 'cpu' and ptdtype != torch.float32:
            layer = layer.to(ptdtype)
        for impl in layer_impls.split(','):
            if impl not in EXPERT_IMPLS:
                fail(f"layer_impls has {impl!r}; allowed: {', '.join(EXPERT_IMPLS)}")
            layer.config.expert_impl = impl
            step = layer_step(layer)
            if device_type == 'cuda':  # the peak of this layer alone
                torch.cuda.reset_peak_memory_stats()
                step()
            mem = peak_memory()
            # timed in turn with the dense MLP, so that the ratio compares the two under the same machine load
            ms, dense_ms = time_it(step, dense_step)
            print(f"{E:>8} {impl:>8} {ms:9.2f} {ms / dense_ms:8.2f} {dense_ms:9.2f} {flops / ms / 1e6:9.1f} "
                  f"{100 * flops / ms / 1e6 / gemm:7.1f} {mem:>12}")


def bench_model():
    if init_from == 'resume':
        try:
            model_args = dict(load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['model_args'])
        except CheckpointError as e:
            fail(str(e))
        model_args['expert_impl'] = expert_impl
    elif init_from != 'scratch':  # a Hugging Face folder's (or GPT-2's) model, at most this run's block_size
        from hf import hf_model_args
        try:
            folder_args = hf_model_args(init_from)
        except (ValueError, OSError) as e:
            fail(str(e))
        model_args = {**{k: config[k] for k in MODEL_KEYS}, **folder_args,
                      'block_size': min(block_size, folder_args['block_size'])}
    else:
        model_args = {k: config[k] for k in MODEL_KEYS}
    models = {'model': model_args}
    if compare_dense:
        if model_args.get('n_expert', 0) == 0:
            fail("compare_dense needs an MoE model (n_expert > 0): its twin is the dense model")
        try:
            cfg = MoEConfig(**model_args)  # validates, and fills in expert_hidden
        except ValueError as e:
            fail(str(e))
        if (cfg.top_k * cfg.expert_hidden != cfg.mlp_hidden or cfg.n_shared_expert or cfg.moe_every > 1
                or cfg.n_dense_layers):
            fail("compare_dense needs a twin of equal active FLOPs: "
                 f"top_k * expert_hidden = {cfg.top_k * cfg.expert_hidden} must be mlp_hidden = "
                 f"{cfg.mlp_hidden}, with every layer MoE and no shared experts")
        models = {'dense twin': {**model_args, 'n_expert': 0}, 'model': model_args}
    peak = peak_flops
    if not peak and device_type == 'cuda':  # the GPU's own peak, not an A100's
        peak = gpu_peak_flops(torch.cuda.get_device_name(device))
    runs = [(name, c) for name in models for c in ((False, True) if compare_compile else (compile,))]
    act_dtype = dtype if device_type == 'cuda' else 'float32'  # (a CPU step runs without autocast)
    try:  # every run's model and AdamW state live to the end; one step's activations at a time
        needs = [memory_need(models[name], batch_size * models[name]['block_size'], dtype=act_dtype,
                             checkpointing=activation_checkpointing) for name, _ in runs]
    except ValueError as e:
        fail(str(e))
    check_memory({k: (max if k.startswith('activations') else sum)(n[k] for n in needs) for k in needs[0]},
                 device, hint=HINT)
    steps = [make_step(name, models[name], c) for name, c in runs]
    results = time_it(*steps) if len(steps) > 1 else [time_it(*steps)]
    for (name, compiled), ms, step in zip(runs, results, steps):
        name += ' (compiled)' if compiled else ''
        mfu = step.model.estimate_mfu(batch_size, ms / 1000, peak) if peak else None
        # (a CPU: none unless given)
        mfu = f"MFU {mfu * 100:.2f}% of {peak / 1e12:.0f} TFLOP/s, " if peak else ''
        print(f"{name}: {ms:.2f} ms/iter, {batch_size * step.model.config.block_size / (ms / 1000):,.0f} "
              f"tokens/s, {mfu}peak memory {peak_memory(step) / 2**20:.1f} MiB "
              f"(activation_checkpointing={activation_checkpointing})")
    ms = dict(zip(runs, results))
    for compiled in sorted({c for _, c in runs}):
        if compare_dense:
            print(f"model / dense twin{' (compiled)' if compiled else ''}: "
                  f"{ms['model', compiled] / ms['dense twin', compiled]:.2f}x (same active FLOPs, "
                  "timed in turn in one run)")
    for name in models:
        if compare_compile:
            print(f"{name} compiled / eager: {ms[name, True] / ms[name, False]:.2f}x "
                  "(timed in turn in one run)")
    if profile_steps:
        profile_ops([name + (' (compiled)' if c else '') for name, c in runs], steps)


def profile_ops(names, steps, rows=15):
    """Each op's self time per step (ms; the GPU's on CUDA, else the CPU's: a fused op's worker threads
    count as its own) in each model, the ops that differ most from the first model's first."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    attr = 'self_device_time_total' if device_type == 'cuda' else 'self_cpu_time_total'
    per_op = [{} for _ in steps]
    for _ in range(profile_steps):  # one step of each in turn, as time_it: a noisy machine slows all alike
        for step, times in zip(steps, per_op):
            with quiet_stderr(), torch.profiler.profile(activities=activities) as prof:
                step()
                sync()
            for e in prof.key_averages():  # CPU ops only: on CUDA each holds its kernels' time (the kernels'
                # own events would count them twice), and annotations hold their ops'
                cpu_op = e.device_type == torch.autograd.DeviceType.CPU
                if cpu_op and not getattr(e, 'is_user_annotation', False):
                    times[e.key] = times.get(e.key, 0.0) + getattr(e, attr) / profile_steps / 1000
    ops = sorted(set().union(*per_op), key=lambda k: -abs(per_op[-1].get(k, 0) - per_op[0].get(k, 0)))
    print(f"self time per step, ms, {profile_steps} profiled steps each:")
    print(f"{'op':<48}" + ''.join(f"{n:>14}" for n in names) + f"{'difference':>12}")
    for op in ['total'] + ops[:rows]:
        t = [sum(p.values()) if op == 'total' else p.get(op, 0.0) for p in per_op]
        print(f"{op[:47]:<48}" + ''.join(f"{v:14.3f}" for v in t) + f"{t[-1] - t[0]:+12.3f}")


def peak_memory(step):
    """Bytes at the peak of one (untimed) step: what the model and its optimizer hold between steps, plus
    the most the step allocates on top. CUDA: from torch's max_memory_allocated; CPU: the highest running
    sum of the allocations and frees the profiler records (its own lines on stderr silenced)."""
    held = sum(t.numel() * t.element_size() for t in itertools.chain(
        step.model.parameters(), (v for s in step.optimizer.state.values() for v in s.values()
                                  if torch.is_tensor(v))))
    if device_type == 'cuda':
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        return held + torch.cuda.max_memory_allocated() - before
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return held + max(itertools.accumulate(e.self_cpu_memory_usage for e in events), default=0)


@contextmanager
def quiet_stderr():
    """stderr (the file descriptor, which C++ writes to) to /dev/null: the profiler prints its start and stop
    there ('USDT: ... profiler_start'), and a warning about blocks allocated before it started."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def make_step(name, model_args, compiled=False):
    """A training step (forward, backward, optimizer step) of a fresh model, compiled or not; step.model."""
    torch.manual_seed(seed)
    try:
        model = build_model(model_args)
    except ValueError as e:
        fail(str(e))
    T = model.config.block_size
    model.set_activation_checkpointing(activation_checkpointing)
    model.to(device)
    optimizer = configure_optimizers(model, device_type, config['optimizer'], learning_rate=1e-4,
                                     weight_decay=1e-2)
    print(f"{name}: {model.get_num_params() / 1e6:.2f}M parameters, "
          f"{model.get_num_params(active=True) / 1e6:.2f}M active")
    if real_data:
        data = np.memmap(os.path.join('data', dataset, 'train.bin'), dtype=np.uint16, mode='r')

        def get_batch():
            ix = torch.randint(len(data) - T, (batch_size,))
            x = torch.stack([torch.from_numpy((data[i:i + T]).astype(np.int64)) for i in ix])
            y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + T]).astype(np.int64)) for i in ix])
            return x.to(device), y.to(device)
    else:
        # alternatively, if fixed data is desired to not care about data loading
        x = torch.randint(model.config.vocab_size, (batch_size, T), device=device)
        y = torch.randint(model.config.vocab_size, (batch_size, T), device=device)
        get_batch = lambda: (x, y)
    raw_model = model
    if compiled:
        print(f"{name}: compiling...")
        model = torch.compile(model)  # pytorch 2.0

    def step():
        X, Y = get_batch()
        with ctx:
            logits, loss = model(X, Y)
        loss.backward()
        raw_model.end_step()  # as train.py does: the step's expert loads restart (else a recompile on step 2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.model, step.optimizer = raw_model, optimizer
    return step


if moe_layer:
    bench_moe_layer()
else:
    bench_model()
