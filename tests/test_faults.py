"""Fault tolerance: kill -9 during checkpoint writes, SIGTERM, exact resume, NaN guard, bad configs,
corrupt checkpoints and hostile input. Tiny models, one micro-batch per step, so this file stays fast."""
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, run, read_log, nan_at
from checkpoint import save_checkpoint, load_checkpoint, CheckpointError, rng_state, set_rng_state, load_meta
from configurator import configure
from moe_model import MODEL_KEYS

FAST = [*TINY, '--gradient_accumulation_steps=1']
RUN_ONLY = [a for a in FAST if a[2:].split('=')[0] not in MODEL_KEYS]  # for weights that fix the model keys
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # see conftest.run


def start(out, *args):
    """train.py in the background; stdout/stderr go to files (a full pipe would block the child)."""
    with open(out + '.stdout', 'w') as stdout, open(out + '.stderr', 'w') as stderr:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args, f'--out_dir={out}'],
                                cwd=ROOT, stdout=stdout, stderr=stderr, env=ENV)


def logged_steps(out):
    path = os.path.join(out, 'log.jsonl')
    return sum('"loss"' in line for line in open(path)) if os.path.exists(path) else 0


def wait_for_steps(p, out, n, timeout=120):
    """Poll log.jsonl until it holds n training steps (all runs in out together)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert p.poll() is None, \
            f"train.py exited early ({p.returncode}): {open(out + '.stderr').read()[-2000:]}"
        if logged_steps(out) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {n} steps logged in {timeout}s")


def step_losses(out):
    return {r['iter']: r['loss'] for r in read_log(out) if 'loss' in r and 'event' not in r}


def assert_same(a, b, where='ckpt'):
    """Exactly equal nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{i}]')
    else:
        assert a == b, where

# -----------------------------------------------------------------------------
# crash-safe checkpoints


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    """Deterministic: a child process blocks inside save_checkpoint after writing the temp file but
    before the rename; kill -9 it there. The old checkpoint must still load, unchanged."""
    path = tmp_path / 'ckpt.pt'
    child = f"""
import os, sys, time
sys.path.insert(0, {ROOT!r})
import torch
from checkpoint import save_checkpoint
save_checkpoint({{'model': {{'w': torch.zeros(1000)}}, 'model_args': {{}}, 'iter_num': 1}}, {str(path)!r})
os.fsync = lambda fd: (print('writing', flush=True), time.sleep(60))
save_checkpoint({{'model': {{'w': torch.ones(1000)}}, 'model_args': {{}}, 'iter_num': 2}}, {str(path)!r})
"""
    p = subprocess.Popen([sys.executable, '-c', child], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == 'writing'
    p.kill()
    p.wait()
    ckpt = load_checkpoint(str(path))
    assert ckpt['iter_num'] == 1 and torch.equal(ckpt['model']['w'], torch.zeros(1000))
    # the orphan that train.py removes at start
    assert [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


@pytest.mark.slow
def test_kill9_at_random_moments_always_leaves_a_loadable_resumable_checkpoint(shakespeare_char, tmp_path):
    """train.py writes checkpoints at every step (eval_interval=1) and is killed -9 at random moments,
    5 times, each time resuming from what the previous kill left."""
    rnd = random.Random(1234)
    out = str(tmp_path / 'out')
    args = [*FAST, '--eval_interval=1', '--max_iters=100000']
    last_iter, mid_write = -1, 0
    for kill in range(5):
        resume = ['--init_from=resume'] if os.path.exists(os.path.join(out, 'ckpt.pt')) else []
        logged = logged_steps(out)
        p = start(out, *args, *resume)
        wait_for_steps(p, out, logged + 1)  # training, past its startup
        time.sleep(rnd.uniform(0.0, 1.0))
        p.kill()
        assert p.wait() == -signal.SIGKILL
        mid_write += any(f.endswith('.tmp') for f in os.listdir(out))
        for name in ('ckpt.pt', 'ckpt_best.pt'):
            if os.path.exists(os.path.join(out, name)):
                ckpt = load_checkpoint(os.path.join(out, name))  # never half a checkpoint
                assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
        if os.path.exists(os.path.join(out, 'ckpt.pt')):
            it = load_checkpoint(os.path.join(out, 'ckpt.pt'))['iter_num']
            assert it >= last_iter  # progress is never lost
            last_iter = it
    assert last_iter > 0
    # an orphaned temp file is never taken for a checkpoint, and the next run clears it
    with open(os.path.join(out, 'ckpt.pt.stale123.tmp'), 'wb') as f:
        f.write(b'half a checkpoint')
    run('train.py', *args, f'--out_dir={out}', '--init_from=resume', f'--max_iters={last_iter + 2}')
    assert load_checkpoint(os.path.join(out, 'ckpt.pt'))['iter_num'] == last_iter + 2
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]
    print(f"5 kills, {mid_write} left a temp file (killed mid-write), last checkpoint iter {last_iter}")

@pytest.mark.slow
def test_a_kill_during_the_first_cpu_kernel_build_costs_the_next_start_no_wait(tmp_path, monkeypatch):
    """kill -9 of a start (and its compiler) while it builds moe_kernels/cpu_grouped_mm.cpp: torch's lock
    stays behind. Every later start used to wait 120 s on it, then fall back to torch's kernel, until the
    folder was deleted by hand."""
    from moe_kernels import cpu_grouped_mm
    if not cpu_grouped_mm.available():
        pytest.skip('no C++ toolchain here: the kernel does not build')
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    lock = os.path.join(cpu_grouped_mm.build_folder(), 'lock')  # torch's, taken while it builds
    start = [sys.executable, '-c', 'from moe_kernels import cpu_grouped_mm as c; print(c.available())']
    env = {**ENV, 'TORCH_EXTENSIONS_DIR': str(tmp_path)}
    p = subprocess.Popen(start, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(lock):
        assert p.poll() is None and time.time() < deadline, 'the build did not start'
        time.sleep(0.05)
    time.sleep(1)  # compiling
    os.killpg(p.pid, signal.SIGKILL)  # the process, ninja and the compiler
    p.wait()
    assert os.path.exists(lock) and not os.path.exists(lock.replace('lock', 'nanomoe_cpu_grouped_mm.so'))
    t0 = time.time()
    again = subprocess.run(start, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert again.stdout.strip() == 'True' and 'waiting' not in again.stderr, again.stderr
    assert 'note: a build of cpu_grouped_mm.cpp was killed midway; building it again' in again.stderr
    assert time.time() - t0 < 90  # a build (15 s on 2 busy cores), not BUILD_WAIT_S and a fallback


# -----------------------------------------------------------------------------
# log.jsonl: whole lines only


def disk_full_past(size):
    """A preexec_fn: the child's writes past `size` bytes fail (EFBIG, as ENOSPC would), never kill it."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def assert_whole_lines(path):
    text = open(path).read()
    assert text.endswith('\n')
    return [json.loads(line) for line in text.splitlines()]  # a torn or glued record fails here


@pytest.mark.slow
def test_a_full_disk_during_a_log_write_leaves_whole_lines_for_the_resume(small_dense_ckpt, tmp_path):
    """A record the disk has room for only part of is cut back: it used to stay, torn, and the resumed
    run glued its first record onto it (two records lost)."""
    out = str(tmp_path / 'out')
    shutil.copytree(small_dense_ckpt, out)
    log = os.path.join(out, 'log.jsonl')
    before = assert_whole_lines(log)
    resume = [*RUN_ONLY, f'--out_dir={out}', '--init_from=resume', '--max_iters=4', '--eval_interval=1000']
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *resume], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300,
                       preexec_fn=disk_full_past(os.path.getsize(log) + 40))
    assert p.returncode == 1 and f"error: could not write {log} (File too large)" in p.stderr, p.stderr
    assert assert_whole_lines(log) == before  # the step 2 record did not fit: nothing of it stays
    run('train.py', *resume)
    records = assert_whole_lines(log)
    assert [r['iter'] for r in records[len(before):] if 'loss' in r] == [2, 3]


@pytest.mark.slow
def test_a_torn_last_line_is_moved_aside_at_the_next_start(small_dense_ckpt, tmp_path):
    """What a kill -9 in the middle of an append leaves: the next run moves it to log.jsonl.torn, saying
    so."""
    out = str(tmp_path / 'out')
    shutil.copytree(small_dense_ckpt, out)
    log = os.path.join(out, 'log.jsonl')
    before = assert_whole_lines(log)
    with open(log, 'a') as f:
        f.write('{"iter": 2, "loss": 4.08984')
    p = run('train.py', *RUN_ONLY, f'--out_dir={out}', '--init_from=resume', '--max_iters=4',
            '--eval_interval=1000')
    assert (f"note: {log} ended in a torn record (27 bytes, from a run stopped mid-write); moved it to "
            f"{log}.torn") in p.stdout
    records = assert_whole_lines(log)
    assert records[:len(before)] == before
    assert [r['iter'] for r in records[len(before):] if 'loss' in r] == [2, 3]
    assert open(log + '.torn').read() == '{"iter": 2, "loss": 4.08984\n'

@pytest.mark.slow
def test_a_full_disk_at_the_first_save_does_not_claim_a_checkpoint_before_it(shakespeare_char, tmp_path):
    out = str(tmp_path / 'out')
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *FAST, f'--out_dir={out}',
                        '--max_iters=2', '--eval_interval=1'], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300, preexec_fn=disk_full_past(64 * 1024))
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (  # it used to say "... is intact"
        f"error: could not write {os.path.join(out, 'ckpt.pt')} (File too large); there was no checkpoint "
        f"before it")
    assert not [f for f in os.listdir(out) if f.startswith('ckpt')]

# -----------------------------------------------------------------------------
# Hugging Face export: whole or nothing


@pytest.mark.slow
def test_the_temp_folder_of_an_export_killed_midway_is_removed_by_the_next(small_dense_ckpt, tmp_path):
    hf_dir = str(tmp_path / 'hf')
    child = f"""
import os, runpy, sys, time
sys.path.insert(0, {ROOT!r})
import hf
save = hf.save
def save_and_hang(model, folder):
    save(model, folder)
    print('written', flush=True)
    time.sleep(60)
hf.save = save_and_hang
sys.argv = ['tools/export_hf.py', '--out_dir={small_dense_ckpt}', '--hf_dir={hf_dir}']
runpy.run_path(os.path.join({ROOT!r}, 'tools', 'export_hf.py'), run_name='__main__')
"""
    p = subprocess.Popen([sys.executable, '-c', child], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    while p.stdout.readline().strip() != 'written':  # (after the config lines)
        assert p.poll() is None
    p.kill()  # kill -9 before the rename
    p.wait()
    assert os.listdir(tmp_path) == [f'hf.tmp-{p.pid}']
    again = run('tools/export_hf.py', f'--out_dir={small_dense_ckpt}', f'--hf_dir={hf_dir}')
    assert f"removed {hf_dir}.tmp-{p.pid}, left by an export that was killed midway" in again.stdout
    assert os.listdir(tmp_path) == ['hf']


@pytest.mark.slow
def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(small_dense_ckpt, tmp_path):
    hf_dir = str(tmp_path / 'hf')
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'export_hf.py'),
                        f'--out_dir={small_dense_ckpt}', f'--hf_dir={hf_dir}'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300, preexec_fn=disk_full_past(16 * 1024))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert lines[-1].startswith(f'error: cannot write {hf_dir} (')
    assert os.listdir(tmp_path) == []

@pytest.mark.slow
def test_a_hellaswag_download_killed_midway_leaves_nothing_after_the_next_one(tmp_path, monkeypatch):
    """The killed download's hellaswag_val.jsonl.<pid>.tmp used to stay forever."""
    import io
    import urllib.request
    import hellaswag
    data_dir = str(tmp_path / 'hs')
    child = f"""
import sys, time, urllib.request
sys.path.insert(0, {ROOT!r})
import hellaswag

class Stalls:  # one chunk, then a network that hangs
    sent = False
    def __enter__(self): return self
    def __exit__(self, *args): pass
    def read(self, n):
        if self.sent:
            time.sleep(60)
        self.sent = True
        return b'{{"ctx": '
urllib.request.urlopen = lambda url, timeout: Stalls()
hellaswag.fetch({data_dir!r})
"""
    p = subprocess.Popen([sys.executable, '-c', child], cwd=ROOT, env=ENV)
    deadline = time.time() + 60
    while not (os.path.isdir(data_dir) and os.listdir(data_dir)):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    p.kill()
    p.wait()
    assert os.listdir(data_dir) == [f'hellaswag_val.jsonl.{p.pid}.tmp']
    data = b'{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}\n'
    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, timeout: io.BytesIO(data))
    assert hellaswag.fetch(data_dir) == os.path.join(data_dir, 'hellaswag_val.jsonl')
    assert os.listdir(data_dir) == ['hellaswag_val.jsonl']

# -----------------------------------------------------------------------------
# SIGTERM and exact resume


@pytest.fixture(scope='module')
def small_dense_ckpt(shakespeare_char, tmp_path_factory):
    """A dense model (block_size 32) trained 2 steps, with its checkpoint."""
    out = str(tmp_path_factory.mktemp('small'))
    run('train.py', *FAST, f'--out_dir={out}', '--n_expert=0', '--max_iters=2', '--eval_interval=2')
    return out


@pytest.fixture(scope='module')
def sigtermed(shakespeare_char, tmp_path_factory):
    """A run (MoE with dropout 0.1) sent SIGTERM after it logged a few steps, between evals."""
    out = str(tmp_path_factory.mktemp('sigterm') / 'part')
    args = [*FAST, '--dropout=0.1', '--eval_interval=1000']
    p = start(out, *args, '--max_iters=100000')
    wait_for_steps(p, out, 3)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=120)
    return out, args, rc, open(out + '.stdout').read(), sorted(step_losses(out))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_0(sigtermed):
    out, args, rc, stdout, steps = sigtermed
    assert rc == 0
    k = load_checkpoint(os.path.join(out, 'ckpt.pt'))['iter_num']
    assert f"received SIGTERM: saved checkpoint at iter {k} to {os.path.join(out, 'ckpt.pt')}" in stdout
    assert steps == list(range(k))  # the step in flight finished, nothing after it


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGHUP])  # Ctrl-C; a closed terminal or ssh session
@pytest.mark.slow
def test_sigint_and_sighup_too(shakespeare_char, tmp_path, sig):
    out = str(tmp_path / 'out')
    p = start(out, *FAST, '--eval_interval=1000', '--max_iters=100000')
    wait_for_steps(p, out, 1)
    p.send_signal(sig)
    assert p.wait(timeout=120) == 0
    k = load_checkpoint(os.path.join(out, 'ckpt.pt'))['iter_num']
    assert k >= 1 and f"received {sig.name}: saved checkpoint at iter {k}" in open(out + '.stdout').read()


@pytest.mark.slow
def test_resume_after_sigterm_is_bit_identical_to_an_uninterrupted_run(sigtermed, tmp_path):
    out, args, rc, stdout, steps = sigtermed
    k = load_checkpoint(os.path.join(out, 'ckpt.pt'))['iter_num']
    full = str(tmp_path / 'full')
    run('train.py', *args, f'--out_dir={full}', f'--max_iters={k + 4}')
    run('train.py', *args, f'--out_dir={out}', f'--max_iters={k + 4}', '--init_from=resume')
    a, b = step_losses(full), step_losses(out)
    assert sorted(a) == sorted(b) == list(range(k + 4))
    assert [a[i] for i in range(k + 4)] == [b[i] for i in range(k + 4)]  # bit-identical on CPU
    ca, cb = load_checkpoint(os.path.join(full, 'ckpt.pt')), load_checkpoint(os.path.join(out, 'ckpt.pt'))
    for key in ('model', 'optimizer', 'rng', 'iter_num', 'best_val_loss'):  # same weights, Adam state, RNGs
        assert_same(ca[key], cb[key], key)


@pytest.mark.slow
def test_a_dense_checkpoint_resumes_dense_and_a_run_that_says_n_expert_stops(small_dense_ckpt, tmp_path):
    """A dense checkpoint resumes as dense (train.py's default n_expert=8 is not the run's word); a run that
    says n_expert=4 stops with one line: the checkpoint fixes the model's shape (it used to resume dense,
    silently)."""
    out = str(tmp_path / 'out')
    shutil.copytree(small_dense_ckpt, out)
    p = run('train.py', *FAST, f'--out_dir={out}', '--init_from=resume', '--max_iters=3', check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: n_expert=4, but the weights of init_from='resume' have n_expert=0: it fixes their shape, "
        "so it cannot change (leave it out, or start a new run)"]
    run('train.py', *RUN_ONLY, f'--out_dir={out}', '--init_from=resume', '--max_iters=3')
    args = load_checkpoint(os.path.join(out, 'ckpt.pt'))['model_args']  # dense: nanoGPT's keys, no n_expert
    assert set(args) == {'block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'dropout', 'bias'}


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    torch.rand(3), np.random.rand(3), random.random(), np.random.randn()  # randn leaves a cached gaussian
    save_checkpoint({'model': {}, 'model_args': {}, 'rng': rng_state()}, str(tmp_path / 'ckpt.pt'))
    expected = torch.rand(5), np.random.rand(5), np.random.randn(), [random.random() for _ in range(5)]
    set_rng_state(load_checkpoint(str(tmp_path / 'ckpt.pt'))['rng'])  # weights_only=True inside
    got = torch.rand(5), np.random.rand(5), np.random.randn(), [random.random() for _ in range(5)]
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all() and expected[2:] == got[2:]

# -----------------------------------------------------------------------------
# divergence guard


@pytest.mark.parametrize('mode', ['stop', 'skip'])
@pytest.mark.slow
def test_injected_nan_triggers_the_guard(shakespeare_char, tmp_path, mode):
    out = str(tmp_path / 'out')
    p = run('train.py', *FAST, f'--out_dir={out}', '--eval_interval=5', '--max_iters=10',
            f'--on_nonfinite={mode}', check=False, env=nan_at(7))
    records = [r for r in read_log(out) if r.get('event') == 'nonfinite']
    assert len(records) == 1 and records[0]['iter'] == 7
    diagnosis = records[0]
    for i in (0, 1):  # expert loads and router state of both MoE layers at the failing step
        assert len(diagnosis[f'layer{i}/load']) == 4 and diagnosis[f'layer{i}/gate_weight_finite'] is True
        assert {f'layer{i}/router_logits_absmax', f'layer{i}/router_logits_finite',
                f'layer{i}/z_loss'} <= set(diagnosis)
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())  # NaN never reached the weights
    if mode == 'stop':
        assert p.returncode == 1
        assert ("non-finite loss or gradient at iter 7" in p.stderr
                and f"Last good checkpoint: {os.path.join(out, 'ckpt.pt')}" in p.stderr), p.stderr
        assert ckpt['iter_num'] == 5 and sorted(step_losses(out)) == list(range(7))
    else:
        assert p.returncode == 0, p.stderr
        assert ('non-finite loss or gradient at iter 7 (loss nan, grad norm nan); skipping this step'
                in p.stdout)
        assert ckpt['iter_num'] == 10 and sorted(step_losses(out)) == [0, 1, 2, 3, 4, 5, 6, 8, 9]

@pytest.mark.slow
def test_a_dense_model_skips_a_nonfinite_step_too(shakespeare_char, tmp_path):
    p = run('train.py', *FAST, '--n_expert=0', f'--out_dir={tmp_path}', '--max_iters=4',
            '--on_nonfinite=skip', env=nan_at(2))
    assert 'non-finite loss or gradient at iter 2' in p.stdout and 'skipping this step' in p.stdout


# float16: the GradScaler skips the step, not the guard
@pytest.mark.parametrize('dtype', ['float32', 'float16'])
@pytest.mark.slow
def test_a_skipped_step_leaves_the_model_as_if_it_never_ran(shakespeare_char, tmp_path, dtype):
    # with the aux-loss-free router: the skipped step's loads must not move the expert bias either
    args = [*FAST, '--router=aux_free', '--bias_update_rate=0.01', f'--dtype={dtype}']
    skipped, clean = str(tmp_path / 'skipped'), str(tmp_path / 'clean')
    run('train.py', *args, f'--out_dir={skipped}', '--max_iters=8', '--eval_interval=8',
        '--on_nonfinite=skip', env=nan_at(7))  # checkpoint at iter 8: steps 0-6 trained, 7 skipped
    # checkpoint after steps 0-6
    run('train.py', *args, f'--out_dir={clean}', '--max_iters=7', '--eval_interval=7')
    a, b = (load_checkpoint(os.path.join(out, 'ckpt.pt')) for out in (skipped, clean))
    # the bias did move in steps 0-6
    assert a['model']['transformer.h.0.mlp.router.expert_bias'].abs().sum() > 0
    assert a['model'].keys() == b['model'].keys()
    for key in a['model']:
        torch.testing.assert_close(a['model'][key], b['model'][key], rtol=0, atol=0, msg=key)

# -----------------------------------------------------------------------------
# bad configs: one line, exit code 2, nothing written


def assert_clean_failure(p, message):
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], p.stderr


@pytest.mark.slow
def test_resume_with_a_larger_block_size_fails_before_any_work(small_dense_ckpt):
    before = {f: os.path.getmtime(os.path.join(small_dense_ckpt, f)) for f in os.listdir(small_dense_ckpt)}
    p = run('train.py', *RUN_ONLY, f'--out_dir={small_dense_ckpt}', '--init_from=resume', '--block_size=64',
            check=False)
    assert_clean_failure(p, "block_size=64 is larger than the model's block_size=32")
    assert {f: os.path.getmtime(os.path.join(small_dense_ckpt, f))
            for f in os.listdir(small_dense_ckpt)} == before


def test_gpt2_with_a_larger_block_size_fails_before_any_work(shakespeare_char, tmp_path):
    p = run('train.py', *RUN_ONLY, f'--out_dir={tmp_path / "out"}', '--init_from=gpt2', '--block_size=2048',
            check=False)
    assert_clean_failure(p, "block_size=2048 is larger than the model's block_size=1024")
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('text, message', [
    ('n_exprt = 4\n', "unknown config key 'n_exprt'"),
    ("max_iters = '10'\n", "max_iters='10'"),
    ('top_k = 8\n', 'top_k=8 must be <= n_expert=4'),
    ('import sys\nsys.exit(0)\n', 'calls sys.exit(0): a config file only sets keys'),  # (it was exit code 0)
])
def test_bad_config_file_fails_before_any_work(shakespeare_char, tmp_path, text, message):
    (tmp_path / 'bad.py').write_text(text)
    p = run('train.py', *FAST, f'--out_dir={tmp_path / "out"}', str(tmp_path / 'bad.py'), check=False)
    assert_clean_failure(p, message)
    assert not (tmp_path / 'out').exists()

# -----------------------------------------------------------------------------
# safe loading


class _Pwn:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_truncated_or_bit_flipped_checkpoint_is_a_clear_error_never_a_wrong_model(tmp_path):
    good = str(tmp_path / 'good.pt')
    model = torch.nn.Linear(64, 64)
    save_checkpoint({'model': model.state_dict(), 'model_args': {'n_layer': 1}, 'iter_num': 3}, good)
    data = open(good, 'rb').read()
    rnd = random.Random(0)
    cases = [data[:n] for n in rnd.sample(range(len(data)), 40)]
    for _ in range(40):
        flipped = bytearray(data)
        flipped[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        cases.append(bytes(flipped))
    for case in cases:
        with open(tmp_path / 'bad.pt', 'wb') as f:
            f.write(case)
        try:
            ckpt = load_checkpoint(str(tmp_path / 'bad.pt'))
        except CheckpointError as e:
            assert 'is truncated or corrupt' in str(e) and '\n' not in str(e)
        else:  # a flip in zip metadata the data does not depend on: the contents must be intact
            assert_same(ckpt, load_checkpoint(good))


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'model': {}, 'model_args': {}, 'x': _Pwn(marker)}, str(tmp_path / 'ckpt.pt'))
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint(str(tmp_path / 'ckpt.pt'))
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 65, 'x': _Pwn(marker)}, f)
    with pytest.raises(CheckpointError, match='not a plain meta.pkl'):
        load_meta(str(tmp_path / 'meta.pkl'))
    assert not marker.exists()
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 65, 'itos': {0: 'a'}, 'stoi': {'a': 0}}, f)
    assert load_meta(str(tmp_path / 'meta.pkl'))['itos'] == {0: 'a'}


@pytest.mark.parametrize('value', [
    "__import__('os').system('touch {marker}')",
    "(lambda: __import__('os').system('touch {marker}'))()",
    "[x for x in ().__class__.__base__.__subclasses__()]",
    "1; __import__('os').system('touch {marker}')",
    "exec(\"open('{marker}', 'w')\")",
])
def test_an_override_is_never_executed(tmp_path, value, capsys):
    marker = tmp_path / 'pwned'
    value = value.format(marker=marker)
    config = configure({'max_iters': 10, 'out_dir': 'out'}, [f'--out_dir={value}'])
    assert config['out_dir'] == value  # a string key takes the text as typed
    with pytest.raises(SystemExit) as e:
        configure({'max_iters': 10, 'out_dir': 'out'}, [f'--max_iters={value}'])
    assert e.value.code == 2 and 'must be of type int' in capsys.readouterr().err
    assert not marker.exists()
