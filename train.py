"""
This training script can be run both on a single gpu in debug mode,
and also in a larger training run with distributed data parallel (ddp).

To run on a single CPU or GPU, example:
$ python train.py config/train_shakespeare_char_moe_cpu.py

To run with DDP on 4 gpus on 1 node, example:
$ torchrun --standalone --nproc_per_node=4 train.py config/train_gpt2_moe.py

To run with DDP on 4 gpus across 2 nodes, example:
- Run on the first (master) node with example IP 123.456.123.456:
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 --master_port=1234 \
    train.py
- Run on the worker node:
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=123.456.123.456 --master_port=1234 \
    train.py
(If your cluster does not have Infiniband interconnect prepend NCCL_IB_DISABLE=1)

The model is dense (model.GPT) when n_expert=0, else an MoE (moe_model.MoEGPT): the loop only calls model
methods that the dense GPT has as no-ops, and expert parallelism is an object that is plain torch when off.
Beyond nanoGPT: the data order is a pure function of (seed, step), so a resume is exact; a divergence guard
(on_nonfinite); SIGTERM saves and exits; bad input is one `error:` line before any work; log.jsonl.
"""

import os
import sys
import time
import math
import random
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
from torch.distributed import init_process_group, destroy_process_group

from configurator import FORK_KEYS, configure, fail, fail_on, check_dataset, check_memory
from moe_kernels import cpu_grouped_mm
from moe_kernels.cpu_memory import keep_freed_memory
from checkpoint import (CheckpointError, load_meta, training_state, restore, nonfinite_tensor, RunDir,
                        StopSignal, DivergenceGuard, any_rank, report_eval, report_iter)
from moe_model import MODEL_KEYS, MoEConfig, model_args_of
from expert_parallel import ExpertParallel, config_error
from init_model import Init, memory_need
from muon import OPTIMIZER_KEYS, configure_optimizers
from model import peak_flops as gpu_peak_flops
from train_checks import check_config
from hf import copy_tokenizer, has_tokenizer
import hellaswag

# -----------------------------------------------------------------------------
# default config values designed to train a GPT-2 (124M) sized MoE on OpenWebText
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # if True, script exits right after the first eval
# at evals where iter_num % hellaswag_interval == 0: HellaSwag acc (hellaswag.py); 0: off
hellaswag_interval = 0
hellaswag_examples = 500  # the first N HellaSwag validation examples; 0: all 10,042
hellaswag_dir = ''  # where hellaswag_val.jsonl is cached (downloaded on first use); '': data/hellaswag
# 'scratch', 'resume', 'gpt2*', a Hugging Face folder, or a checkpoint file (.pt): its weights
init_from = 'scratch'
always_save_checkpoint = True  # nanoGPT's: False writes ckpt.pt only at an eval that improves the val loss
seed = 1337
# wandb logging
wandb_log = False  # disabled by default
wandb_project = 'nanomoe'
wandb_run_name = 'gpt2-moe'  # 'run' + str(time.time())
# data
dataset = 'openwebtext'
gradient_accumulation_steps = 5 * 8  # used to simulate larger batch sizes
batch_size = 12  # if gradient_accumulation_steps > 1, this is the micro-batch size
# model: every key of moe_model.MoEConfig (GPTConfig's and the MoE's, block_size among them; n_expert = 0
# trains the dense GPT), at its default there (what each key is, and the router presets: moe_model.py),
# except for these
globals().update({f.name: f.default for f in fields(MoEConfig)})
bias = False  # do we use bias inside LayerNorm and Linear layers?
vocab_size = 0  # 0: from the dataset's meta.pkl, else GPT-2's 50304
# 'auto': the fast one for this device (moe_kernels.auto_expert_impl), or one of EXPERT_IMPLS
expert_impl = 'auto'
expert_parallel = 1  # EP degree: each MoE layer's experts are split over this many ranks (torchrun); 1: none
# init_from a dense model and n_expert set: experts start as its MLPs plus this noise (upcycle.py)
upcycle_noise = 0.0
# adamw optimizer
learning_rate = 6e-4  # max learning rate
max_iters = 600000  # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
# the optimizer (muon.py): 'adamw', or 'muon': Muon for the hidden matrices and experts, AdamW for the rest
optimizer = 'adamw'
muon_lr = 0.02  # Muon's peak learning rate (nanochat's matrix_lr); the schedule scales it as learning_rate's
muon_momentum = 0.95  # torch.optim.Muon's, Keller Jordan's, modded-nanogpt's (nanochat: 0.85 up to it)
muon_weight_decay = 0.0  # Muon's decoupled weight decay: none, as Keller Jordan's Muon and nanochat's
router_lr = 0.0  # the router's peak AdamW learning rate (nanochat's MoE settled on 0.005); 0: learning_rate
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
backend = ''  # DDP backend: 'nccl', 'gloo'; '' picks nccl on CUDA, gloo on CPU
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:0', ... (not 'mps')
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else \
    ('float16' if torch.cuda.is_available() else 'float32')
compile = torch.cuda.is_available()  # use PyTorch 2.0 to compile the model to be faster
# recompute activations in backward to save memory: 'none', 'moe' (experts), 'all'
activation_checkpointing = 'none'
peak_flops = 0.0  # for MFU; 0: the GPU's own bf16 peak (model.peak_flops), on a CPU an A100's (nanoGPT's)
on_nonfinite = 'stop'  # a NaN/inf loss or grad norm: 'stop' the run, or 'skip' the step
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_')
               and isinstance(v, (int, float, bool, str))
               or k in MODEL_KEYS]
given = set()  # the keys that the config files and the command line set
# config files and --key=value, in nanoGPT's dialect or the seed forks' (FORK_KEYS: their keys, translated)
config = configure({k: globals()[k] for k in config_keys}, sys.argv[1:], given, foreign=FORK_KEYS)
globals().update(config)
# -----------------------------------------------------------------------------
# check everything we can before any work starts: one clear line and exit code 2 otherwise
check_config(config)  # the values of train.py's own keys (train_checks.py)
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
check_dataset(data_dir, dataset, block_size)
# attempt to derive vocab_size from the dataset
meta_path = os.path.join(data_dir, 'meta.pkl')
meta_vocab_size = None
if os.path.exists(meta_path):
    with fail_on(CheckpointError):
        meta_vocab_size = load_meta(meta_path)['vocab_size']  # plain data only, never runs code
    print(f"found vocab_size = {meta_vocab_size} (inside {meta_path})")
ddp = int(os.environ.get('RANK', -1)) != -1  # is this a ddp run?
# SIGTERM, Ctrl-C, ...: finish the step, save, exit (from here on: building a model takes time)
stop = StopSignal(ddp)
# where the model comes from (init_model.py): a checkpoint, GPT-2, ...; and expert_impl='auto' resolved
with fail_on(ValueError, CheckpointError):
    init = Init(init_from, out_dir, config, given, vocab_size or meta_vocab_size or 50304)
model_args, block_size = init.model_args, config['block_size']  # (the weights' unless the run gives one)
# torchrun's WORLD_SIZE is known before the process group starts
world_size = int(os.environ.get('WORLD_SIZE', 1))
if message := config_error(expert_parallel, model_args, config['expert_impl'], dtype, world_size):
    fail(message)
need = memory_need(model_args, batch_size * block_size, dtype=dtype, checkpointing=activation_checkpointing,
                   expert_parallel=expert_parallel)  # weights, AdamW state, activations: before allocating
check_memory(need, device)
# a Hugging Face folder's tokenizer, kept in out_dir for the run's resumes (below) and its samples and exports
text_from = (init_from if init.hf is not None
             else out_dir if init_from == 'resume' and has_tokenizer(out_dir) else None)
if hellaswag_interval:  # read and tokenised now: a character-level dataset or no data file stops here
    with fail_on(hellaswag.HellaSwagError, prefix=f"hellaswag_interval={hellaswag_interval}: "):
        hs_examples = hellaswag.prepare(hellaswag_dir, hellaswag_examples, block_size,
                                        model_args['vocab_size'], meta_path, text_from)

# -----------------------------------------------------------------------------
# various inits, derived attributes, I/O setup
if ddp:
    init_process_group(backend=backend or ('nccl' if device.startswith('cuda') else 'gloo'))
    ddp_rank = int(os.environ['RANK'])
    ddp_local_rank = int(os.environ['LOCAL_RANK'])
    ddp_world_size = int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0  # this process will do logging, checkpointing etc.
    # world_size number of processes will be training simultaneously, so we can scale
    # down the desired gradient accumulation iterations per process proportionally
    if gradient_accumulation_steps % ddp_world_size != 0:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the world size "
             f"{ddp_world_size}")
    gradient_accumulation_steps //= ddp_world_size
else:
    # if not ddp, we are running on a single gpu, and one process
    master_process = True
    ddp_rank = 0
    ddp_world_size = 1
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
print(f"tokens per iteration will be: {tokens_per_iter:,}")

# the master writes out_dir (one run at a time: a lock); eval_only never writes or deletes there
run_dir = None
if master_process and not eval_only:
    with fail_on(CheckpointError):
        run_dir = RunDir(out_dir, resumed=init_from == 'resume')
torch.manual_seed(seed)
random.seed(seed)
np.random.seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
device_type = 'cuda' if 'cuda' in device else 'cpu'  # for later use in torch.autocast
if not peak_flops:  # an H100's MFU against its own peak, not an A100's (3x too high)
    peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device)) if device_type == 'cuda' else 312e12
if device_type == 'cpu':
    # reuse freed memory: no page faults on every step's large tensors (moe_kernels/cpu_memory.py)
    keep_freed_memory()
    if compile:  # build or load the CPU kernel now: a compiled forward cannot (it takes torch's grouped_mm)
        cpu_grouped_mm.available()
# note: float16 data type will automatically use a GradScaler
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)


# poor man's data loader
def get_batch(split, step, micro_step):
    """Batch `micro_step` of iteration `step`. Each batch has its own seed, so the data order is a
    pure function of (seed, step, global micro step): a resumed run sees exactly the batches the
    uninterrupted run would have, and DDP ranks split the same global batch as one process would."""
    g = torch.Generator().manual_seed(hash((seed, split == 'train', step, micro_step)) & 0x7fffffffffffffff)
    # We recreate np.memmap every batch to avoid a memory leak, as per
    # https://stackoverflow.com/questions/45132940/numpy-memmap-memory-usage-want-to-iterate-once/61472122#61472122
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=g)
    xy = torch.stack([torch.from_numpy((data[i:i + block_size + 1]).astype(np.int64)) for i in ix])
    if xy.max() >= raw_model.config.vocab_size:  # cheap here, a device-side assert or garbage later
        fail(f"{split}.bin of {data_dir} holds token id {int(xy.max())}, but the model's vocab_size is "
             f"{raw_model.config.vocab_size} (from meta.pkl, --vocab_size, "
             "the checkpoint or the pretrained model)")
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if device_type == 'cuda':
        # pin arrays x,y, which allows us to move them to GPU asynchronously (non_blocking=True)
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y


# model init
if meta_vocab_size is None and not vocab_size and init_from == 'scratch':
    print("defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)")
with fail_on(ValueError, CheckpointError):
    model = init.build()
if run_dir and init.hf is not None and has_tokenizer(init_from):
    copy_tokenizer(init_from, out_dir)
iter_num, best_val_loss = (init.ckpt['iter_num'],
                           init.ckpt['best_val_loss']) if init_from == 'resume' else (0, 1e9)
# crop down the model block size if desired, using model surgery (growing it was refused above)
if block_size < model.config.block_size:
    model.crop_block_size(block_size)  # the checkpoint's model_args are read off the model (model_args_of)
config.update({k: v for k, v in {'n_expert': 0, **model_args_of(model)}.items() if k in config})  # what ran
n_total, n_active = model.get_num_params(), model.get_num_params(active=True)
print(f"number of parameters: {n_total / 1e6:.2f}M total, {n_active / 1e6:.2f}M active per token")
model.set_activation_checkpointing(activation_checkpointing)
# expert parallelism: keep this rank's experts (every rank built or loaded the same full model, on the CPU)
parallel = ExpertParallel(expert_parallel, device_type)
parallel.shard(model)
model.to(device)

# initialize a GradScaler. If enabled=False scaler is a no-op
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))

# optimizer
optimizer = configure_optimizers(model, device_type, **{k: config[k] for k in OPTIMIZER_KEYS})
if init_from == 'resume':
    restore(init.ckpt, model, optimizer, scaler, parallel, device)
init = None  # free up memory

# compile the model
if compile:
    print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)  # requires PyTorch 2.0

# wrap model into DDP container
if ddp:
    model = parallel.data_parallel(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)
raw_model = model.module if ddp else model  # unwrap DDP container if needed
raw_model = getattr(raw_model, '_orig_mod', raw_model)  # and torch.compile


# helps estimate an arbitrarily accurate loss over either split using many batches
@torch.no_grad()
def estimate_loss():
    """Mean cross-entropy (no aux losses: the model is in eval mode) over the same eval_iters batches
    of each split every time, so successive evals are comparable."""
    out = {}
    model.eval()
    for split in ['train', 'val']:
        total = 0.0  # (a tensor of eval_iters losses would be a memory error for a huge eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split, -1, ddp_rank * eval_iters + k)
            with ctx:
                logits, loss = model(X, Y)
            total += loss.item()
        out[split] = total / eval_iters
    model.train()
    return out


# learning rate decay scheduler (cosine with warmup)
def get_lr(it):
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    # (the cosine below is min_lr there too; no 0/0 when warmup_iters == lr_decay_iters)
    if it >= lr_decay_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


def checkpoint_state():
    """Every rank calls this (expert parallelism gathers the experts); the master saves it. A state with a
    NaN/inf weight (a step can have a finite loss and gradient and still leave one) stops the run instead:
    it would replace the last good checkpoint."""
    state = training_state(raw_model, optimizer, scaler, parallel, device,
                           model_args=model_args_of(raw_model), iter_num=iter_num,
                           best_val_loss=best_val_loss, config=config)
    if bad := nonfinite_tensor(state):  # the same full state on every rank: they all stop here
        guard.stop(run_dir, iter_num, f"non-finite values in {bad} at iter {iter_num}, not saved", {})
    return state


# a stop signal during start-up: stop here, before the first eval and step (every rank, or one would hang)
if any_rank(stop.name is not None, device):
    stop.exit_at_startup(master_process, os.path.join(out_dir, 'ckpt.pt') if init_from == 'resume' else None)

# logging
if wandb_log and run_dir:  # (not logged in, ...: one error line)
    run_dir.start_wandb(wandb_project, wandb_run_name, config)

if run_dir and model_args['n_expert']:  # which backend expert_impl='auto' picked, beside the run's numbers
    run_dir.log({'iter': iter_num, 'event': 'start', 'expert_impl': model_args['expert_impl']})
# training loop
t0 = time.time()
local_iter_num = 0  # number of iterations in the lifetime of this process
guard = DivergenceGuard(on_nonfinite, scaler_skips=scaler.is_enabled())
# tests only: a NaN loss at this iteration
debug_nan_at = int(os.environ.get('NANOMOE_DEBUG_NAN_AT_ITER', -1))
running_mfu = -1.0
while True:

    # determine and set the learning rate for this iteration
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr * param_group.get('lr_scale', 1.0)  # Muon's and the router's peaks (muon.py)

    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        losses = estimate_loss()
        # every rank (EP forwards are collective: master-only would hang); raw_model: no DDP sync, no
        # recompiles; a stop signal cuts it short, all ranks at the same example
        hs = (hellaswag.metrics(raw_model, hs_examples, device, ctx,
                                lambda: any_rank(stop.name is not None, device))
              if hellaswag_interval and iter_num % hellaswag_interval == 0 else {})
        improved = losses['val'] < best_val_loss  # each rank has its own eval batches; the master's decide
        best_val_loss = min(best_val_loss, losses['val'])
        with ctx:  # routing on a fixed batch: dead experts, top-1 flips since the previous eval
            # every rank: EP forwards are collective
            probe = raw_model.probe_routing(get_batch('val', -2, 0)[0])
        # every rank: EP gathers experts
        state = checkpoint_state() if iter_num > 0 and not eval_only else None
        if master_process:
            report_eval(run_dir, iter_num, losses, hs, probe, raw_model.routing_stats(), lr)
            if state is not None:
                if always_save_checkpoint or improved:
                    print(f"saving checkpoint to {out_dir}")
                    run_dir.save(state, 'ckpt.pt')  # the latest, for resume
                if improved:
                    run_dir.save(state, 'ckpt_best.pt')  # the best val loss so far
        state = None
    if iter_num >= max_iters or eval_only:
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    # and using the GradScaler if data type is float16
    loss_sum = 0.0
    for micro_step in range(gradient_accumulation_steps):
        X, Y = get_batch('train', iter_num, ddp_rank * gradient_accumulation_steps + micro_step)
        if ddp:
            # in DDP training we only need to sync gradients at the last micro step.
            # the official way to do this is with model.no_sync() context manager, but
            # I really dislike that this bloats the code and forces us to repeat code
            # looking at the source of that context manager, it just toggles this variable
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps  # scale the loss to account for gradient accumulation
        if iter_num == debug_nan_at:
            loss = loss * float('nan')
        loss_sum = loss_sum + loss.detach()
        # backward pass, with gradient scaling if training in fp16
        scaler.scale(loss).backward()
    parallel.sync_grads(raw_model, ddp_world_size)  # expert weights that DDP left alone (expert parallelism)
    # clip the gradient (or just measure its norm, for the non-finite guard), over the whole model
    scaler.unscale_(optimizer)
    grad_norm = parallel.clip_grad_norm(raw_model, grad_clip if grad_clip > 0 else float('inf'))
    # the divergence guard; every rank takes the same branch (the diagnosis runs collective forwards under EP)
    nonfinite = any_rank(not torch.isfinite(loss_sum + grad_norm), device)
    if (action := guard(nonfinite)) != 'ok':
        message = guard.message(iter_num, loss_sum, grad_norm)
        with ctx:  # expert loads and router state at this step, for the post-mortem
            diagnosis = {'loss': float(loss_sum), 'grad_norm': float(grad_norm), **raw_model.diagnose(X)}
        if action == 'stop':
            guard.stop(run_dir, iter_num, message, diagnosis)
        guard.skip(run_dir, iter_num, message, diagnosis)
        raw_model.end_step(skipped=True)  # restart the step's loads; the bias does not move
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        continue
    # aux-loss-free bias update from the step's global-batch load, then the step loads restart; with fp16 the
    # scaler skips a non-finite step on its own (scaler.step below), and then the bias must not move either
    raw_model.end_step(skipped=nonfinite)
    # step the optimizer and scaler if training in fp16
    scaler.step(optimizer)
    scaler.update()
    # flush the gradients as soon as we can, no need for this memory anymore
    optimizer.zero_grad(set_to_none=True)

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0 and master_process:
        # the training loss (CE + aux) averaged over micro steps; a CPU-GPU sync point
        lossf = loss_sum.item()
        if local_iter_num >= 5:  # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, peak_flops)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        report_iter(run_dir, iter_num, max_iters, lossf, raw_model.loss_terms, dt, tokens_per_iter,
                    running_mfu, lr, float(grad_norm), parallel.step_stats(), raw_model.routing_stats())
    iter_num += 1
    local_iter_num += 1

    # ranks get the signal at different steps: agree on one, or a rank hangs in its next all-reduce
    if any_rank(stop.name is not None, device):
        state = checkpoint_state()
        if master_process:
            run_dir.save(state, 'ckpt.pt')
            stop.saved(iter_num, run_dir.path('ckpt.pt'))
        break

if ddp:
    # the master may still be writing the last checkpoint: the ranks leave together
    torch.distributed.barrier()
    destroy_process_group()
