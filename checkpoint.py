"""
Checkpoints: written atomically, loaded safely; RunDir, all that a training run writes into out_dir, and its
eval and iteration lines (report_eval, report_iter); and how a run stops: StopSignal (a signal: save and exit)
and DivergenceGuard (a NaN/inf step: skip it or stop).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (RNG states included, see
rng_state), so it loads with torch.load(weights_only=True): loading one never runs code from the file.
Its zip CRCs are checked too, so a truncated or bit-flipped file is one clear error, never a wrong model.
"""

import os
import sys
import json
import fcntl
import math
import pickle
import random
import signal
import tempfile
import zipfile

import numpy as np
import torch


class CheckpointError(Exception):
    pass


def save_checkpoint(obj, path):
    """Write to a temp file in the same folder, fsync, then rename over `path`: a crash at any
    moment leaves either the old checkpoint or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # a failed write (disk full) reaches torch.save's zip
        # writer, whose own error then hides it: raise the OSError
        if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location='cpu'):
    """torch.load(weights_only=True) with one clear error for a missing, truncated or corrupt file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        # torch.save writes a zip whose members carry CRC-32s that torch.load never checks:
        # check them, so a flipped bit in the weights is an error rather than a silently wrong model
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise ValueError(f"CRC mismatch in {bad}")
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # whatever pickle or zip raise deep inside, the user gets one line
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be loaded "
                              f"({first_line[:200]})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict)
            and isinstance(ckpt.get('model_args'), dict)):
        raise CheckpointError(f"checkpoint {path} is not a nanoMoE checkpoint (no 'model'/'model_args')")
    # compile's prefix, and the causal-mask buffer nanoGPT's attention keeps without flash attention
    ckpt['model'] = {k: v for k, v in clean_state_dict(ckpt['model']).items() if not k.endswith('.attn.bias')}
    if bad := first_nonfinite(ckpt['model'].items()):  # (train.py never saves one; another program may have)
        raise CheckpointError(f"checkpoint {path} holds non-finite values (NaN/inf) in model {bad}: its "
                              f"weights cannot be used")
    # older checkpoints kept the MoE layers' probe top-1 experts beside the model, by block index
    for i, top1 in ckpt.pop('probe_top1', {}).items():
        ckpt['model'].setdefault(f'transformer.h.{i}.mlp._extra_state', top1)
    return ckpt


def load_for_resume(path):
    """load_checkpoint, plus what a resume needs: CheckpointError, one line, if it lacks optimizer, iter_num
    or best_val_loss, or holds them of the wrong type or non-finite. What keeps a resume from being exact or
    from saving ckpt_best.pt is said in a note: an empty optimizer state; a NaN best_val_loss (which no val
    loss is below: it becomes 1e9, as for a new run)."""
    ckpt = load_checkpoint(path)
    if missing := {'optimizer', 'iter_num', 'best_val_loss'} - set(ckpt):
        raise CheckpointError(f"checkpoint {path} cannot be resumed: it has no {', '.join(sorted(missing))}")
    it, best, opt = ckpt['iter_num'], ckpt['best_val_loss'], ckpt['optimizer']
    best = best.item() if torch.is_tensor(best) and best.numel() == 1 else best  # (nanoGPT saves a tensor)
    cannot = f"checkpoint {path} cannot be resumed: its"
    if type(it) is not int or it < 0:  # (a bool is an int to Python)
        raise CheckpointError(f"{cannot} iter_num is {it!r}, not an integer >= 0")
    if type(best) not in (int, float):
        raise CheckpointError(f"{cannot} best_val_loss is {best!r}, not a number")
    if not (isinstance(opt, dict) and isinstance(opt.get('state'), dict)
            and isinstance(opt.get('param_groups'), list)):
        raise CheckpointError(f"{cannot} optimizer is not an optimizer state_dict (state, param_groups)")
    if bad := first_nonfinite((f'{i} {k}', v) for i, state in opt['state'].items() for k, v in state.items()):
        raise CheckpointError(f"{cannot} optimizer state {bad} holds non-finite values (NaN/inf)")
    if not opt['state'] and it > 0:
        print(f"note: the checkpoint's optimizer state is empty at iter {it}: AdamW's moments start at zero, "
              f"so this resume is not exact")
    if math.isnan(best):
        print("note: the checkpoint's best_val_loss is NaN, which no val loss is below: it starts again at "
              "1e9 (the next eval saves ckpt_best.pt)")
        best = 1e9
    ckpt['best_val_loss'] = best
    return ckpt


def load_weights(model, ckpt, path):
    """model.load_state_dict(ckpt['model']); CheckpointError, one line, if the weights do not fit
    model_args."""
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:  # torch's message lists every key: the first is enough
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(f"checkpoint {path} does not match its model_args: {detail[:300]}") from None


def training_state(model, optimizer, scaler, parallel, device, **meta):
    """What a checkpoint holds: always the full model and optimizer (parallel, an ExpertParallel, gathers the
    experts under expert parallelism, so every rank must call this; then the master saves it), the scaler,
    every RNG, and meta (model_args, iter_num, best_val_loss, config)."""
    return {'model': parallel.state_dict(model), 'optimizer': parallel.optimizer_state_dict(optimizer, model),
            'scaler': scaler.state_dict(), 'rng': rng_state(device), **meta}


def restore(ckpt, model, optimizer, scaler, parallel, device):
    """The inverse of training_state for a resumed run: optimizer state (cut to this rank's experts), scaler
    and RNGs (the global RNGs drive dropout, router noise and sampling: an exact resume needs them). The
    optimizer's hyperparameters stay the run's own (load_state_dict would bring back the checkpoint's betas
    and weight decay, silently overriding --beta1/--beta2/--weight_decay). What a checkpoint lacks (a
    nanoGPT one has no RNG state; an fp32 one no scaler state for a float16 run) starts fresh, with a note.
    The model's weights are loaded before it is sharded and moved, see train.py."""
    hyper = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    parallel.load_optimizer_state_dict(optimizer, model, ckpt['optimizer'])
    for group, own in zip(optimizer.param_groups, hyper):
        group.update(own)
    if scaler.is_enabled():
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        else:
            print("note: the checkpoint has no GradScaler state (it was not a float16 run): "
                  "the scaler starts fresh")
    if 'rng' in ckpt:
        set_rng_state(ckpt['rng'], device)
    else:
        print("note: the checkpoint has no RNG state: "
              "dropout and router noise do not continue the old sequence")


def lock_out_dir(out_dir):
    """Hold out_dir for this training run: an exclusive flock on the folder itself, which the kernel releases
    when the process ends in any way (kill -9 too), so a lock is never stale, and which no deleted file can
    undo (a lock on out_dir/train.lock was gone with the file). train.lock holds the holder's pid, for the
    message. Returns the folder's open file descriptor: keep it for the life of the run. CheckpointError,
    naming the holder's pid, if another run holds it."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            with open(os.path.join(out_dir, 'train.lock')) as f:
                holder = f.read().strip() or 'unknown'
        except OSError:
            holder = 'unknown'
        raise CheckpointError(f"out_dir {out_dir!r} is in use by another training run (pid {holder}); "
                              f"wait for it to end or choose another --out_dir") from None
    with open(os.path.join(out_dir, 'train.lock'), 'w') as f:
        f.write(f'{os.getpid()}\n')
    return fd


def nonfinite_tensor(state):
    """The name of the first model weight or optimizer tensor of a training_state holding NaN or inf, or None:
    such a state is never saved (it would replace the last good checkpoint)."""
    named = [(f'model {k}', v) for k, v in state['model'].items()]
    named += [(f'optimizer state {i} {k}', v) for i, s in state['optimizer']['state'].items()
              for k, v in s.items()]
    return first_nonfinite(named)


def first_nonfinite(named):
    """The first name of (name, value) pairs whose value is a float tensor holding NaN or inf, or None."""
    return next((name for name, t in named if torch.is_tensor(t) and t.is_floating_point()
                 and not torch.isfinite(t).all()),
                None)


def finite_or_none(record):
    """record with NaN/inf floats as None: log.jsonl stays valid JSON (json.dumps writes bare NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def remove_stale_temps(out_dir):
    """A run killed while saving (kill -9, power loss) leaves its temp file: never a checkpoint, remove it.
    Only a run that holds out_dir's lock may call this: a live run's temp file is not stale."""
    for name in os.listdir(out_dir):
        if name.startswith(('ckpt.pt.', 'ckpt_best.pt.')) and name.endswith('.tmp'):
            os.remove(os.path.join(out_dir, name))


def rng_state(device='cpu'):
    """Every RNG a run may draw from, as tensors, ints and lists only, so weights_only=True loads it."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if device.startswith('cuda') else None,
            'numpy': {'key': torch.from_numpy(key.astype(np.int64)), 'pos': pos, 'has_gauss': has_gauss,
                      'gauss': gauss},
            'python': [version, list(mt), gauss_next]}


def set_rng_state(state, device='cpu'):
    """Inverse of rng_state (checkpoints from before numpy/python states were saved lack those keys)."""
    torch.set_rng_state(state['torch'])
    if device.startswith('cuda') and state.get('cuda') is not None:
        torch.cuda.set_rng_state(state['cuda'], device)
    if 'numpy' in state:
        s = state['numpy']
        np.random.set_state(('MT19937', s['key'].numpy().astype(np.uint32), s['pos'], s['has_gauss'],
                             s['gauss']))
    if 'python' in state:
        version, mt, gauss_next = state['python']
        random.setstate((version, tuple(mt), gauss_next))


def read_log(path, torn_ok=True):
    """The records of a log.jsonl (JSON objects with an integer 'iter'); a resumed run re-logs the steps after
    its checkpoint, so the last record of each (iter, kind) wins. A log that cannot be read or holds no record
    (empty, binary) is a CheckpointError, one line; so is a line that is no record (torn by a run killed
    mid-write, or glued to the next record by an older version) unless torn_ok: then one warning names it."""
    try:
        with open(path, 'rb') as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    records, bad = {}, []
    for i, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
            if not (isinstance(r, dict) and type(r.get('iter')) is int):
                raise ValueError
        except ValueError:  # (a UnicodeDecodeError too)
            bad.append(i)
            continue
        records[(r['iter'], 'val/ce' in r, 'event' in r)] = r
    if not records:
        raise CheckpointError(f"{path} holds no log record: " + (
            f"none of its {len(lines)} lines is one (not a train.py log.jsonl?)" if lines else "it is empty"))
    if bad:
        what = f"line {bad[0]} is" if len(bad) == 1 else f"{len(bad)} lines (the first: line {bad[0]}) are"
        message = f"{path}: {what} not a log record (torn by a run stopped mid-write?)"
        if not torn_ok:
            raise CheckpointError(message)
        print(f"warning: {message}; skipped", file=sys.stderr)
    return sorted(records.values(), key=lambda r: r['iter'])


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


def load_meta(path):
    """A dataset's meta.pkl (vocab_size, stoi, itos): plain dicts, strings and ints only. Unlike
    pickle.load this never imports or calls anything named in the file."""
    try:
        with open(path, 'rb') as f:
            meta = _PlainUnpickler(f).load()
    except Exception as e:
        raise CheckpointError(f"{path} is not a plain meta.pkl "
                              f"({str(e).strip()[:200] or type(e).__name__})") from None
    vocab_size = meta.get('vocab_size') if isinstance(meta, dict) else None
    if type(vocab_size) is not int or vocab_size < 1:  # (True is an int to Python; 0 read as "not given")
        raise CheckpointError(f"{path} has no positive integer 'vocab_size' (it has {vocab_size!r})")
    return meta


def clean_state_dict(state_dict):
    """Strip the '_orig_mod.' prefix that torch.compile adds to parameter names."""
    unwanted_prefix = '_orig_mod.'
    return {k[len(unwanted_prefix):] if k.startswith(unwanted_prefix) else k: v
            for k, v in state_dict.items()}


class RunDir:
    """What a training run writes into out_dir (its master process only): ckpt.pt and ckpt_best.pt, written
    atomically, and log.jsonl, one JSON line per event (NaN/inf as null; to wandb too when started, where
    train/ce and val/ce are also train/loss and val/loss, and mfu is in percent, as nanoGPT logs them), under
    out_dir's lock for the life of the run. A record is a whole line or nothing: a failed append is cut back,
    and the torn tail that a kill -9 mid-write leaves is moved to log.jsonl.torn at the next start (else the
    next record would be glued onto it). A write that fails (disk full, quota) is one error line and exit
    code 1; the checkpoint it would have replaced stays whole."""

    def __init__(self, out_dir, resumed=False, wandb=None):
        self.out_dir, self.wandb = out_dir, wandb
        self.good = os.path.join(out_dir, 'ckpt.pt') if resumed else None  # (checked finite at load)
        try:
            os.makedirs(out_dir, exist_ok=True)
            self.lock = lock_out_dir(out_dir)
        except OSError as e:
            raise CheckpointError(f"out_dir={out_dir!r} cannot be used: {e.strerror or e}") from None
        remove_stale_temps(out_dir)
        self._write(self.path('log.jsonl'), lambda: cut_torn_tail(self.path('log.jsonl')))

    def path(self, name):
        return os.path.join(self.out_dir, name)

    def last_good(self):
        """The ckpt.pt that this run resumed from or saved (never one of another run in out_dir)."""
        return self.good or 'none (this run saved none yet)'

    def save(self, state, name='ckpt.pt'):
        self._write(self.path(name), lambda: save_checkpoint(state, self.path(name)))
        if name == 'ckpt.pt':
            self.good = self.path(name)  # it passed nonfinite_tensor

    def log(self, record):
        record = finite_or_none(record)
        self._write(self.path('log.jsonl'), lambda: append_line(self.path('log.jsonl'), json.dumps(record)))
        if self.wandb is not None:  # a list (tokens per expert) becomes one series per expert
            flat = {}
            for k, v in record.items():
                flat.update({f'{k}/expert{e}': x for e, x in enumerate(v)} if isinstance(v, list) else {k: v})
            # nanoGPT's names too (dashboards made for nanoGPT runs key on them), and its mfu in percent
            flat.update({f'{s}/loss': flat[f'{s}/ce'] for s in ('train', 'val') if f'{s}/ce' in flat})
            if flat.get('mfu') is not None:
                flat['mfu'] = 100 * flat['mfu']
            self.wandb.log(flat, step=record['iter'])

    def start_wandb(self, project, name, config):
        """wandb.init, then log() logs to wandb too. If it fails (wandb not logged in: its UsageError; no
        network), one error line says what to do, exit code 2."""
        import wandb
        try:
            wandb.init(project=project, name=name, config=config)
        except Exception as e:
            reason = ' '.join(str(e).split())[:200] or type(e).__name__
            print(f"error: wandb_log=True, but wandb.init failed ({reason}); log in with `wandb login` (or "
                  f"set WANDB_API_KEY), or log offline with WANDB_MODE=offline", file=sys.stderr)
            sys.exit(2)
        self.wandb = wandb

    @staticmethod
    def _write(path, write):
        try:
            write()
        except OSError as e:
            after = ('its records before it are whole' if path.endswith('.jsonl') else
                     'the checkpoint before it is intact' if os.path.exists(path) else
                     'there was no checkpoint before it')
            print(f"error: could not write {path} ({e.strerror or e}); {after}", file=sys.stderr)
            sys.exit(1)


def report_eval(run_dir, iter_num, losses, hellaswag, probe, routing, lr):
    """An eval's lines (the master's): the losses and HellaSwag's numbers; the routing on the fixed eval batch
    (probe) and of the last step (routing), lists left out; and its log.jsonl record (run_dir None, as under
    eval_only: none)."""
    print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
          + ''.join(f", {k} {v:.4f}" for k, v in hellaswag.items()))
    stats = {k: v for k, v in {**routing, **probe}.items() if not isinstance(v, list)}
    if stats:
        print('routing (fixed eval batch): ' + ', '.join(f'{k} {v:.3f}' for k, v in stats.items()))
    if run_dir:
        run_dir.log({'iter': iter_num, 'train/ce': losses['train'], 'val/ce': losses['val'], 'lr': lr,
                     **probe, **hellaswag})


def report_iter(run_dir, iter_num, max_iters, loss, terms, dt, tokens, mfu, lr, grad_norm, extra, routing):
    """An iteration's line (the master's): the loss and its terms (tensors), the time, tokens/s over `tokens`
    per iteration, the MFU (once measured: >= 0) and `extra` (under expert parallelism, the megabytes sent by
    all-to-all); and its log.jsonl record, with the step's routing too."""
    terms = {k: v.item() for k, v in terms.items()}
    parts = ', '.join(f'{k} {v:.4f}' for k, v in terms.items())
    print(f"iter {iter_num}/{max_iters}: loss {loss:.4f} ({parts}), time {dt * 1000:.2f}ms, "
          f"{tokens / dt:,.0f} tok/s" + (f", mfu {mfu * 100:.2f}%" if mfu >= 0 else '')
          + ''.join(f', {k} {v:.2f}' for k, v in extra.items()))
    run_dir.log({'iter': iter_num, 'loss': loss, **terms, 'lr': lr, 'grad_norm': grad_norm,
                 'dt_ms': dt * 1000, 'mfu': mfu, **extra, **routing})


def append_line(path, text):
    """Append text and a newline to path as one whole line, or nothing: a write that fails partway (disk full)
    is cut back to where the file ended, so a later record never lands on half of this one."""
    data = memoryview((text + '\n').encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:  # a short write (the last bytes before a full disk) is followed by the error
                data = data[os.write(fd, data):]
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def cut_torn_tail(path):
    """A run killed while appending (kill -9, power loss) leaves path ending in part of a line: move that part
    to path + '.torn' and cut it off, saying so, so that the next record starts on a line of its own."""
    if not os.path.exists(path):
        return
    with open(path, 'rb+') as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:  # back to the last newline, a block at a time
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            if (nl := block.rfind(b'\n')) >= 0:
                end = start + nl + 1
                break
            end = start
        if end == size:
            return
        f.seek(end)
        tail = f.read()
        with open(path + '.torn', 'ab') as torn:
            torn.write(tail + b'\n')
        f.truncate(end)
    print(f"note: {path} ended in a torn record ({size - end} bytes, from a run stopped mid-write); moved it "
          f"to {path}.torn")


def any_rank(flag, device):
    """True on every rank if flag is True on any: the ranks take the same branch (collectives follow)."""
    if not torch.distributed.is_initialized():
        return bool(flag)
    flag = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() > 0


class StopSignal:
    """SIGTERM, SIGINT, SIGHUP (preemption, Ctrl-C, a closed terminal): the run finishes the step in flight,
    saves and exits cleanly (torchrun passes the signal on to every rank; the ranks agree on the step); a
    second one exits at once (writes are atomic: that is safe). A torchrun worker also gets SIGUSR1 when its
    launcher dies (kill -9; PR_SET_PDEATHSIG), sent again as each of the launcher's threads dies: it stops the
    run like SIGTERM, but is never taken as a second signal. Installed before the model is built."""

    def __init__(self, ddp=False):
        self.name = None  # the first signal's name, once one came
        if ddp and sys.platform == 'linux':
            import ctypes
            ctypes.CDLL(None).prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.name is not None and signum != signal.SIGUSR1:
            print(f"received {signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.name = self.name or signal.Signals(signum).name

    def exit_at_startup(self, master, kept=None):
        """A signal while the run was starting (building, loading, compiling a large model takes minutes on a
        CPU): exit now, before the first eval and step, which would take as long again before the run could
        save. `kept`: the checkpoint the run would have resumed from, untouched."""
        if master:
            kept = f" ({kept} is as it was)" if kept else ''
            print(f"received {self.name or 'a stop signal (on another rank)'} during start-up: stopped "
                  f"before training; nothing was trained or saved{kept}")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.exit(0)

    def saved(self, iter_num, path):
        """The line of a stop in the loop, once the master saved the checkpoint `path`."""
        print(f"received {self.name or 'a stop signal (on another rank)'}: "
              f"saved checkpoint at iter {iter_num} to {path}; continue with --init_from=resume")


class DivergenceGuard:
    """A NaN/inf loss or gradient norm would poison the weights. on_nonfinite='stop' stops the run at the
    first, 'skip' skips that step. fp16's GradScaler skips such a step itself (and lowers its scale), so there
    only `patience` in a row mean divergence; 'skip' also stops after `patience` in a row (25 halvings take
    fp16's initial loss scale 2**16 down to 2**-9)."""

    def __init__(self, on_nonfinite, scaler_skips, patience=25):
        self.on_nonfinite, self.scaler_skips, self.patience = on_nonfinite, scaler_skips, patience
        self.in_a_row = 0

    def __call__(self, nonfinite):
        """What to do with this step: 'ok' (fp16's scaler may still skip it), 'skip' or 'stop'."""
        self.in_a_row = self.in_a_row + 1 if nonfinite else 0
        if not nonfinite or self.scaler_skips and self.in_a_row < self.patience:
            return 'ok'
        return 'stop' if self.on_nonfinite == 'stop' or self.in_a_row >= self.patience else 'skip'

    def message(self, iter_num, loss, grad_norm):
        return (f"non-finite loss or gradient at iter {iter_num} (loss {float(loss):.4g}, "
                f"grad norm {float(grad_norm):.4g})"
                + (f", {self.in_a_row} steps in a row" if self.in_a_row > 1 else ''))

    @staticmethod
    def stop(run_dir, iter_num, message, diagnosis):
        """The stop: a 'nonfinite' record in log.jsonl and one error line (by the master, the rank with a
        run_dir), exit code 1 on every rank."""
        if run_dir:
            run_dir.log({'iter': iter_num, 'event': 'nonfinite', 'message': message, **diagnosis})
            print(f"error: {message}; stopping. Last good checkpoint: {run_dir.last_good()}", file=sys.stderr)
        sys.exit(1)

    @staticmethod
    def skip(run_dir, iter_num, message, diagnosis):
        """A skipped step: a 'nonfinite' record in log.jsonl (the master's) and a warning (each rank's)."""
        if run_dir:
            run_dir.log({'iter': iter_num, 'event': 'nonfinite', **diagnosis})
        print(f"warning: {message}; skipping this step")
