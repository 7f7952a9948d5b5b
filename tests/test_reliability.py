"""Reliability as a hostile or unlucky user meets it: one run per out_dir, no non-finite checkpoint ever, the
fp16 guard, signals and a dead launcher, and one `error:` line for each bad input (train.py, sample.py,
bench.py, plot.py, prepare.py)."""
import dataclasses
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, run, read_log, nan_at, tiny_tokenizer
from checkpoint import load_checkpoint, save_checkpoint
from configurator import configure
from test_faults import FAST, RUN_ONLY, ENV, start, wait_for_steps


def unbuffered(script, *args):
    """script in the background, its stdout and stderr pipes written line by line."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, text=True,
                            env={**ENV, 'PYTHONUNBUFFERED': '1'}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def one_error_line(p, message, code=2):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and 'Traceback' not in p.stderr, p.stderr[-3000:]
    assert lines and lines[-1].startswith('error: ') and message in lines[-1], p.stderr[-3000:]


@pytest.fixture(scope='module')
def good_run(shakespeare_char, tmp_path_factory):
    """A tiny MoE with a checkpoint at iter 6 (every weight finite)."""
    out = str(tmp_path_factory.mktemp('good') / 'out')
    run('train.py', *FAST, f'--out_dir={out}', '--max_iters=6', '--eval_interval=3')
    return out

# -----------------------------------------------------------------------------
# one run per out_dir


@pytest.mark.slow
def test_a_second_run_on_a_live_out_dir_stops_and_eval_only_deletes_nothing(shakespeare_char, tmp_path):
    out = str(tmp_path / 'out')
    p = start(out, *FAST, '--eval_interval=1000000', '--max_iters=100000')  # no eval of its own after iter 0
    try:
        wait_for_steps(p, out, 2)
        in_flight = os.path.join(out, 'ckpt.pt.live.tmp')  # what a live run's save looks like mid-write
        open(in_flight, 'w').close()
        second = run('train.py', *FAST, f'--out_dir={out}', check=False)
        one_error_line(second, f"out_dir {out!r} is in use by another training run (pid {p.pid})")
        os.remove(os.path.join(out, 'train.lock'))  # by hand: it used to let a second run train in here
        second = run('train.py', *FAST, f'--out_dir={out}', check=False)
        one_error_line(second, f"out_dir {out!r} is in use by another training run (pid unknown)")
        lines_before = open(os.path.join(out, 'log.jsonl')).read().count('\n')
        # "check the val loss"
        check = run('train.py', *FAST, f'--out_dir={out}', '--eval_only=True', check=False)
        assert check.returncode == 0 and 'val loss' in check.stdout, check.stderr
        assert os.path.exists(in_flight)  # the live run's temp file is not "stale"
        assert p.poll() is None  # the live run goes on
        assert all('val/ce' not in json.loads(line)
                   for line in open(os.path.join(out, 'log.jsonl')).readlines()[lines_before:])
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 0
    run('train.py', *FAST, f'--out_dir={out}', '--init_from=resume', '--max_iters=1')
    assert not os.path.exists(in_flight)  # now stale: the next run that holds the lock removes it


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_never_stale(shakespeare_char, tmp_path):
    out = str(tmp_path / 'out')
    p = start(out, *FAST, '--eval_interval=1000', '--max_iters=100000')
    wait_for_steps(p, out, 1)
    p.kill()  # kill -9: the kernel releases the flock
    p.wait()
    assert open(os.path.join(out, 'train.lock')).read().strip() == str(p.pid)
    run('train.py', *FAST, f'--out_dir={out}', '--max_iters=2')

# -----------------------------------------------------------------------------
# no non-finite checkpoint, the fp16 guard


@pytest.mark.slow
def test_nonfinite_weights_are_never_saved_over_a_good_checkpoint(good_run, tmp_path):
    """A step with a finite loss and gradient can still leave inf weights (weight decay 1e300 in fp32 AdamW):
    the next eval would have saved them over ckpt.pt."""
    out = str(tmp_path / 'out')
    shutil.copytree(good_run, out)
    p = run('train.py', *FAST, f'--out_dir={out}', '--init_from=resume', '--eval_interval=1',
            '--max_iters=10', '--weight_decay=1e300', check=False)
    ckpt = os.path.join(out, 'ckpt.pt')
    one_error_line(p, "non-finite values in model ", code=1)
    assert f"at iter 7, not saved; stopping. Last good checkpoint: {ckpt}" in p.stderr
    saved = load_checkpoint(ckpt)
    assert saved['iter_num'] == 6 and all(torch.isfinite(v).all() for v in saved['model'].values()
                                          if torch.is_tensor(v))
    assert read_log(out)[-1]['event'] == 'nonfinite'


@pytest.mark.slow
def test_float16_persistent_nan_stops_after_a_bounded_number_of_skipped_steps(shakespeare_char, tmp_path):
    """fp16's GradScaler skips a non-finite step by itself; only 25 of them in a row stop the run (with the
    same nonfinite record as in fp32), instead of training to max_iters on NaN and exiting 0."""
    out = str(tmp_path / 'out')
    p = run('train.py', *FAST, f'--out_dir={out}', '--dtype=float16', '--weight_decay=1e300',
            '--max_iters=60', '--eval_interval=1000', check=False)
    one_error_line(p, 'non-finite loss or gradient at iter 25 (loss nan, grad norm nan), 25 steps in a row; '
                      'stopping',
                   code=1)
    records = read_log(out)
    assert records[-1]['event'] == 'nonfinite' and records[-1]['loss'] is None  # JSON null, not a bare NaN
    assert max(r['iter'] for r in records if 'loss' in r and 'event' not in r) == 24
    for line in open(os.path.join(out, 'log.jsonl')):
        json.loads(line, parse_constant=lambda c: pytest.fail(f'{c} in log.jsonl'))

# -----------------------------------------------------------------------------
# signals and a dead launcher


@pytest.mark.slow
def test_two_sigterms_while_the_model_is_built_exit_at_once(shakespeare_char, tmp_path):
    """The handlers are installed before the model is built (a large model takes minutes to start on a
    CPU)."""
    p = unbuffered('train.py', *FAST, '--n_layer=4', '--n_embd=512', '--n_head=8', '--n_expert=8',
                   '--expert_hidden=2048', '--batch_size=2', f'--out_dir={tmp_path}')
    for line in p.stdout:  # printed just before build_model (~1 s for these 71M parameters)
        if line.startswith('Initializing a new model from scratch'):
            break
    p.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # two signals sent at once would merge into one
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    stdout, stderr = p.communicate()
    assert 'received SIGTERM again: exiting now' in stderr and 'Traceback' not in stderr
    assert 'step 0:' not in stdout  # it did not go on to the first eval


@pytest.mark.slow
def test_one_sigterm_while_the_model_is_built_stops_it_before_training(shakespeare_char, tmp_path):
    """It used to go on to the first eval and a step (as long again for a large model) before it saved."""
    out = tmp_path / 'out'
    p = unbuffered('train.py', *FAST, '--n_layer=4', '--n_embd=512', '--n_head=8', '--n_expert=8',
                   '--expert_hidden=2048', '--batch_size=2', f'--out_dir={out}')
    for line in p.stdout:
        if line.startswith('Initializing a new model from scratch'):
            break
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    stdout, stderr = p.communicate()
    assert 'received SIGTERM during start-up: stopped before training; nothing was trained or saved' in stdout
    assert 'step 0:' not in stdout and 'Traceback' not in stderr, stderr[-2000:]
    assert not (out / 'ckpt.pt').exists() and not (out / 'log.jsonl').exists()


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once_with_128_plus_the_signal_and_no_traceback(shakespeare_char, tmp_path):
    out = str(tmp_path / 'out')
    p = start(out, *FAST, '--eval_interval=1000', '--max_iters=100000', '--gradient_accumulation_steps=100')
    wait_for_steps(p, out, 1)  # a step takes a second or more: both signals arrive within it
    p.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # two signals sent at once would merge into one
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    err = open(out + '.stderr').read()
    assert 'Traceback' not in err and 'received SIGTERM again: exiting now' in err


@pytest.mark.slow
def test_workers_save_and_exit_when_the_torchrun_launcher_is_killed(shakespeare_char, tmp_path):
    out = str(tmp_path / 'out')
    with open(out + '.stdout', 'w') as stdout, open(out + '.stderr', 'w') as stderr:
        launcher = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                     '--nproc_per_node=2', os.path.join(ROOT, 'train.py'), *FAST,
                                     '--gradient_accumulation_steps=2', '--eval_interval=1000',
                                     '--max_iters=100000', f'--out_dir={out}'],
                                    cwd=ROOT, stdout=stdout, stderr=stderr, env=ENV)
    wait_for_steps(launcher, out, 2, timeout=240)
    workers = [int(pid) for pid in subprocess.run(['pgrep', '-P', str(launcher.pid)], capture_output=True,
                                                   text=True).stdout.split()]
    assert len(workers) == 2
    launcher.kill()  # kill -9: no chance to pass a signal on
    launcher.wait()
    deadline = time.time() + 120
    while any(os.path.exists(f'/proc/{pid}') and open(f'/proc/{pid}/stat').read().split()[2] != 'Z'
              for pid in workers):
        assert time.time() < deadline, 'orphaned workers are still training'
        time.sleep(0.2)
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))  # they saved before leaving
    assert ckpt['iter_num'] >= 2

# -----------------------------------------------------------------------------
# bad input: one error line, exit 2, before any work


def write_dataset(folder, tokens, vocab=None):
    os.makedirs(folder, exist_ok=True)
    for split in ('train', 'val'):
        np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    if vocab is not None:
        import pickle
        with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
            pickle.dump({'vocab_size': vocab, 'itos': {}, 'stoi': {}}, f)


@pytest.mark.parametrize('args, message', [
    (['--device=mps'], "device='mps'; allowed: 'cpu', 'cuda', 'cuda:N'"),
    (['--device=tpu'], "device='tpu'; allowed"),
    (['--seed=-1'], 'seed=-1 must be >= 0'),
    (['--beta2=2'], 'beta2=2.0 must be >= 0 and < 1'),
    (['--learning_rate=-1'], 'learning_rate=-1.0 must be >= 0'),
    (['--learning_rate=1e999'], 'learning_rate=inf must be >= 0 and finite'),
    (['--out_dir='], "out_dir='' must name a folder"),
    pytest.param(['--n_layer=64', '--n_embd=8192', '--n_head=64', '--n_expert=64', '--top_k=2'],
                 'GiB (weights ', marks=pytest.mark.slow),  # ~3 s
    (['--batch_size=1000000000'], 'activations of 32,000,000,000 tokens'),  # a tiny model: its activations
])
def test_bad_values_fail_at_start_with_one_clear_line(shakespeare_char, tmp_path, args, message):
    out = tmp_path / 'out'
    p = run('train.py', *TINY, f'--out_dir={out}', *args, check=False)
    one_error_line(p, message)
    assert not out.exists()


@pytest.mark.slow  # ~3 s
def test_out_dir_that_is_a_file_is_one_line(shakespeare_char, tmp_path):
    (tmp_path / 'file').write_text('not a folder')
    p = run('train.py', *TINY, f'--out_dir={tmp_path / "file"}', check=False)
    one_error_line(p, f"out_dir='{tmp_path / 'file'}' cannot be used")


@pytest.mark.parametrize('case, message', [
    ('odd', 'it must be uint16 token ids (an even number of bytes), at least block_size + 1 = 33'),
    ('short', 'at least block_size + 1 = 33'),
    ('empty', 'holds 0 bytes'),
    pytest.param('token_id', 'holds token id 70, but the model\'s vocab_size is 65',
                 marks=pytest.mark.slow),  # ~3 s
])
def test_malformed_data_is_one_line(tmp_path, case, message):
    folder = str(tmp_path / case)
    if case == 'odd':
        write_dataset(folder, range(100))
        with open(os.path.join(folder, 'train.bin'), 'ab') as f:
            f.write(b'\x01')
    elif case == 'short':
        write_dataset(folder, range(20))
    elif case == 'empty':
        write_dataset(folder, [])
    else:  # meta.pkl says 65, the data holds a 70: a smaller vocabulary than the data
        write_dataset(folder, [1, 2, 70] * 40, vocab=65)
    p = run('train.py', *TINY, f'--dataset={folder}', f'--out_dir={tmp_path / "out"}', check=False)
    one_error_line(p, message)


def test_an_absolute_dataset_path_gets_a_sensible_hint(tmp_path):
    p = run('train.py', *TINY, f'--dataset={tmp_path / "nothing"}', f'--out_dir={tmp_path / "out"}',
            check=False)
    one_error_line(p, 'write train.bin and val.bin there')
    assert 'data//' not in p.stderr


@pytest.mark.slow
def test_checkpoints_that_do_not_fit_their_model_args_are_one_line(good_run, tmp_path):
    ckpt = load_checkpoint(os.path.join(good_run, 'ckpt.pt'))
    cases = {'mismatch': {**ckpt, 'model_args': {**ckpt['model_args'], 'expert_hidden': 64}},
             'missing': {k: v for k, v in ckpt.items() if k != 'optimizer'}}
    for name, broken in cases.items():
        out = tmp_path / name
        out.mkdir()
        save_checkpoint(broken, str(out / 'ckpt.pt'))
        p = run('train.py', *RUN_ONLY, f'--out_dir={out}', '--init_from=resume', check=False)
        one_error_line(p, 'does not match its model_args: size mismatch' if name == 'mismatch' else
                       'cannot be resumed: it has no optimizer')


@pytest.mark.slow
def test_resume_applies_the_new_optimizer_settings_and_a_float32_checkpoint_resumes_in_float16(
        good_run, tmp_path):
    out = str(tmp_path / 'out')
    shutil.copytree(good_run, out)
    p = run('train.py', *FAST, f'--out_dir={out}', '--init_from=resume', '--max_iters=9', '--eval_interval=3',
            '--weight_decay=0.5', '--beta1=0.8', '--beta2=0.9', '--dtype=float16')
    assert 'the checkpoint has no GradScaler state' in p.stdout
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    decay, no_decay = ckpt['optimizer']['param_groups']
    assert (decay['weight_decay'] == 0.5 and no_decay['weight_decay'] == 0.0
            and tuple(decay['betas']) == (0.8, 0.9))
    assert ckpt['config']['weight_decay'] == 0.5 and ckpt['scaler']  # recorded and applied alike


@pytest.mark.slow
def test_warmup_equal_to_lr_decay_iters_trains_through(shakespeare_char, tmp_path):
    p = run('train.py', *FAST, f'--out_dir={tmp_path / "out"}', '--decay_lr=True', '--warmup_iters=3',
            '--lr_decay_iters=3', '--max_iters=6')
    assert p.returncode == 0


@pytest.mark.slow
def test_bfloat16_on_the_cpu_runs_in_bfloat16(shakespeare_char, tmp_path):
    losses = {}
    for dtype in ('float32', 'bfloat16'):
        out = tmp_path / dtype
        run('train.py', *FAST, f'--out_dir={out}', f'--dtype={dtype}', '--max_iters=2')
        losses[dtype] = [r['loss'] for r in read_log(str(out)) if 'loss' in r]
    assert losses['float32'] != losses['bfloat16']  # it did not silently run float32


@pytest.mark.slow
def test_a_full_disk_at_save_is_one_line_and_the_checkpoint_before_stays(good_run, tmp_path):
    out = str(tmp_path / 'out')
    shutil.copytree(good_run, out)
    size = os.path.getsize(os.path.join(out, 'ckpt.pt'))

    def small_files():  # writes past 64 KiB fail (EFBIG, as ENOSPC would) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *FAST, f'--out_dir={out}',
                        '--init_from=resume', '--max_iters=8', '--eval_interval=2'], cwd=ROOT, env=ENV,
                        capture_output=True, text=True,
                       preexec_fn=small_files, timeout=300)
    one_error_line(p, f"could not write {os.path.join(out, 'ckpt.pt')} (File too large); "
                      "the checkpoint before it is intact", code=1)
    assert os.path.getsize(os.path.join(out, 'ckpt.pt')) == size and \
        load_checkpoint(os.path.join(out, 'ckpt.pt'))
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]


@pytest.mark.parametrize('args, message', [
    (['--temperature=0'], 'temperature=0.0 must be > 0'),
    (['--temperature=-1'], 'temperature=-1.0 must be > 0'),
    (['--top_k=0'], 'top_k=0 must be >= 1'),
    (['--top_k=-3'], 'top_k=-3 must be >= 1'),
    (['--start='], "start='' is empty"),
    (['--device=mps'], "device='mps'; allowed"),
])
@pytest.mark.slow
def test_sample_bad_values_are_one_line(good_run, args, message):
    one_error_line(run('sample.py', f'--out_dir={good_run}', '--device=cpu', *args, check=False), message)


@pytest.mark.slow
def test_sample_with_a_non_utf8_prompt_file_is_one_line(good_run, tmp_path):
    (tmp_path / 'prompt.txt').write_bytes(b'\xff\xfe ROMEO')
    p = run('sample.py', f'--out_dir={good_run}', '--device=cpu', f'--start=FILE:{tmp_path / "prompt.txt"}',
            check=False)
    one_error_line(p, 'cannot be read as UTF-8 text')


@pytest.mark.slow  # ~10 s
def test_bench_with_no_arguments_refuses_in_one_line_what_this_machine_cannot_hold():
    """bench.py's defaults are a 520M-parameter MoE at 12 x 1024 tokens: on a 24 GiB CPU machine the kernel's
    out-of-memory killer used to end it after 85 s, with no line at all."""
    from configurator import available_memory
    from init_model import memory_need
    from moe_model import MoEConfig, MODEL_KEYS
    defaults = {**{f.name: f.default for f in dataclasses.fields(MoEConfig)}, 'bias': False}
    model_args = {**{k: defaults[k] for k in MODEL_KEYS}, 'vocab_size': 50304}
    if sum(memory_need(model_args, 12 * 1024).values()) < available_memory('cpu'):
        pytest.skip("this machine has the memory for bench.py's defaults")
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--device=cpu'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    one_error_line(p, 'the run needs at least ')
    assert 'the defaults are GPT-2 size, for a GPU' in p.stderr and time.time() - t0 < 60


@pytest.mark.slow
def test_train_with_the_default_model_refuses_in_one_line_what_this_machine_cannot_hold(tmp_path):
    """train.py's model defaults (bench.py's) on a CPU: it used to build the model and grow to 10.6 GB in 99 s
    with no step done (nanoGPT fails at once on the missing CUDA). Sized on the meta device: no wait."""
    from configurator import available_memory
    from init_model import memory_need
    from moe_model import MoEConfig, MODEL_KEYS
    defaults = {**{f.name: f.default for f in dataclasses.fields(MoEConfig)}, 'bias': False}
    model_args = {**{k: defaults[k] for k in MODEL_KEYS}, 'vocab_size': 50304}
    if sum(memory_need(model_args, 12 * 1024).values()) < available_memory('cpu'):
        pytest.skip("this machine has the memory for train.py's defaults")
    write_dataset(str(tmp_path / 'owt'), range(2000))  # GPT-2 token ids, no meta.pkl: vocab_size 50304
    t0 = time.time()
    p = run('train.py', f'--dataset={tmp_path / "owt"}', '--device=cpu', f'--out_dir={tmp_path / "out"}',
            check=False, timeout=120)
    one_error_line(p, 'the run needs at least ')
    assert 'activations of 12,288 tokens' in p.stderr and time.time() - t0 < 60
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_sample_sizes_the_model_before_it_builds_it(tmp_path):
    """A checkpoint whose model_args say n_embd=100000: building that model was an out-of-memory kill."""
    model_args = dict(n_layer=1, n_head=1, n_embd=100000, block_size=32, vocab_size=65, bias=False,
                      dropout=0.0)
    save_checkpoint({'model': {}, 'model_args': model_args, 'config': {'dataset': 'shakespeare_char'}},
                    str(tmp_path / 'ckpt.pt'))
    p = run('sample.py', f'--out_dir={tmp_path}', '--device=cpu', check=False)
    one_error_line(p, 'GiB (weights 447.')


@pytest.mark.slow
def test_a_huge_eval_iters_allocates_nothing(shakespeare_char, tmp_path):
    """eval_iters=10**12 used to allocate a tensor of 10**12 losses at the first eval (4 TB: a traceback)."""
    p = unbuffered('train.py', *FAST, '--eval_iters=1000000000000', f'--out_dir={tmp_path}')
    try:
        for line in p.stdout:  # the first eval starts right after this line
            if line.startswith('number of parameters'):
                break
        time.sleep(3)
        assert p.poll() is None, p.stderr.read()[-2000:]  # still evaluating
    finally:
        p.kill()
        p.wait()


def test_bench_layer_tokens_0_is_one_line():
    one_error_line(run('bench.py', '--device=cpu', '--moe_layer=True', '--layer_tokens=0', check=False),
                   'layer_tokens=0 must be >= 1')


@pytest.mark.slow
def test_plot_skips_a_torn_last_line(good_run, tmp_path):
    out = str(tmp_path / 'out')
    shutil.copytree(good_run, out)
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:
        f.write('{"iter": 7, "loss": 1.2')  # a run killed mid-write
    p = run('tools/plot.py', f'--out_dir={out}')
    log = os.path.join(out, 'log.jsonl')
    lines = len(open(log).read().splitlines())
    assert p.stderr.strip().splitlines() == [
        f"warning: {log}: line {lines} is not a log record (torn by a run stopped mid-write?); skipped"]
    assert os.path.exists(os.path.join(out, 'loss.png'))


@pytest.mark.parametrize('case, message', [
    ('empty', 'holds no log record: it is empty'),
    ('start event only', 'holds no training step or eval yet (only 1 event record(s)): nothing to plot'),
    ('binary', 'holds no log record: none of its'),
    ('iter not a number', 'warning: {log}: line 2 is not a log record'),
    ('plot_dir a file', 'cannot write'),
])
@pytest.mark.slow  # ~3 s each
def test_plot_names_a_log_it_cannot_plot_in_one_line(tmp_path, case, message):
    log = tmp_path / 'log.jsonl'
    step = b'{"iter": 1, "loss": 4.0, "ce": 4.0}\n'
    log.write_bytes({'empty': b'', 'start event only': b'{"iter": 0, "event": "start"}\n',
                     'binary': np.random.default_rng(0).bytes(3000), 'plot_dir a file': step,
                     'iter not a number': step + b'{"iter": "12", "loss": 3.0}\n'}[case])
    (tmp_path / 'file').write_text('not a folder')
    plot_dir = tmp_path / ('file' if case == 'plot_dir a file' else 'plots')
    p = run('tools/plot.py', f'--out_dir={tmp_path}', f'--plot_dir={plot_dir}', check=False)
    if case == 'iter not a number':  # the other records are plotted
        assert p.returncode == 0 and p.stderr.strip().splitlines() == [
            message.format(log=log) + ' (torn by a run stopped mid-write?); skipped']
        assert (tmp_path / 'plots' / 'loss.png').exists()
    else:
        one_error_line(p, message)


@pytest.mark.slow
def test_prepared_data_files_are_readable_like_any_other_file():
    """They were mode 0600 (mkstemp's): another user could not train on them."""
    source = os.path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')
    if not os.path.exists(source):
        pytest.skip('no offline copy of tiny shakespeare')
    run('data/shakespeare_char/prepare.py', source)
    umask = os.umask(0)
    os.umask(umask)
    for name in ('train.bin', 'val.bin', 'meta.pkl'):
        mode = os.stat(os.path.join(ROOT, 'data', 'shakespeare_char', name)).st_mode & 0o777
        assert mode == 0o666 & ~umask, (name, oct(mode))


@pytest.mark.parametrize('text, message', [('', 'the input holds 0 characters'),
                                           (''.join(chr(i) for i in range(0x4e00, 0x4e00 + 72000)
                                                    if not 0xd800 <= i < 0xe000), 'at most 65,536')])
def test_prepare_refuses_empty_or_too_wide_input_and_leaves_no_temp_file(tmp_path, text, message):
    (tmp_path / 'input.txt').write_text(text, encoding='utf-8')
    before = set(os.listdir(os.path.join(ROOT, 'data', 'shakespeare_char')))
    one_error_line(run('data/shakespeare_char/prepare.py', str(tmp_path / 'input.txt'), check=False), message)
    assert set(os.listdir(os.path.join(ROOT, 'data', 'shakespeare_char'))) == before


# -----------------------------------------------------------------------------
# bad files: one error line


@pytest.mark.parametrize('vocab', [0, True])
def test_a_meta_vocab_size_that_is_not_a_positive_integer_is_one_line(tmp_path, vocab):
    """0 used to become GPT-2's 50304, True a vocabulary of 1, silently."""
    folder = str(tmp_path / 'data')
    write_dataset(folder, range(100), vocab=vocab)
    p = run('train.py', *TINY, f'--dataset={folder}', f'--out_dir={tmp_path / "out"}', check=False)
    one_error_line(p, f"meta.pkl has no positive integer 'vocab_size' (it has {vocab!r})")


@pytest.mark.parametrize('content, message', [
    (b'\x00\x01\x02', 'is not valid Python: source code string cannot contain null bytes'),  # binary
    ('n_layer = 2  # é\n'.encode('latin-1'), "cannot be read as UTF-8 text (invalid continuation byte)"),
    (b'n_layer = [2,\n', "is not valid Python (line 1): '[' was never closed"),
    (b'n_layer = 2\nmax_iters = 1 // 0\n', 'raised ZeroDivisionError at line 2: integer division or modulo'),
    (b'import sys\nsys.exit(0)\n', 'calls sys.exit(0): a config file only sets keys'),  # (it was exit code 0)
])
def test_a_config_file_that_cannot_run_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / 'bad.py').write_bytes(content)
    with pytest.raises(SystemExit) as e:
        configure({'n_layer': 12, 'max_iters': 100}, [str(tmp_path / 'bad.py')])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith('error: config file ') and message in err[0], err


@pytest.mark.parametrize('case, message', [
    ('iter_num a string', "its iter_num is '12', not an integer >= 0"),
    ('NaN weights', "holds non-finite values (NaN/inf) in model transformer.h.0.attn.c_attn.weight"),
    ('empty optimizer state', None),
    ('best_val_loss NaN', None),
])
@pytest.mark.slow
def test_a_checkpoint_that_cannot_resume_exactly_says_so(good_run, tmp_path, case, message):
    """A NaN checkpoint used to resume (then "Last good checkpoint" named it); a NaN best_val_loss never let
    ckpt_best.pt be saved again; an empty optimizer state was a silently inexact resume."""
    out = str(tmp_path / 'out')
    shutil.copytree(good_run, out)
    ckpt = load_checkpoint(os.path.join(out, 'ckpt.pt'))
    if case == 'iter_num a string':
        ckpt['iter_num'] = '12'
    elif case == 'NaN weights':
        ckpt['model']['transformer.h.0.attn.c_attn.weight'][0, 0] = float('nan')
    elif case == 'empty optimizer state':
        ckpt['optimizer']['state'] = {}
    else:
        ckpt['best_val_loss'] = float('nan')
    save_checkpoint(ckpt, os.path.join(out, 'ckpt.pt'))
    p = run('train.py', *RUN_ONLY, f'--out_dir={out}', '--init_from=resume', '--max_iters=9',
            '--eval_interval=3', check=False)
    if message:
        return one_error_line(p, message)
    assert p.returncode == 0, p.stderr
    if case == 'empty optimizer state':
        assert "note: the checkpoint's optimizer state is empty at iter 6: AdamW's moments start" in p.stdout
    else:
        assert "note: the checkpoint's best_val_loss is NaN" in p.stdout
        assert load_checkpoint(os.path.join(out, 'ckpt_best.pt'))['iter_num'] == 9


@pytest.mark.slow
def test_the_last_good_checkpoint_is_this_runs_own(good_run, tmp_path):
    """A new run in an out_dir that holds another run's ckpt.pt diverges before its first save: "Last good
    checkpoint" used to name the other run's."""
    out = str(tmp_path / 'out')
    shutil.copytree(good_run, out)
    p = run('train.py', *FAST, f'--out_dir={out}', '--eval_interval=1000', check=False, env=nan_at(2))
    one_error_line(p, 'non-finite loss or gradient at iter 2', code=1)
    assert p.stderr.strip().endswith('stopping. Last good checkpoint: none (this run saved none yet)')


@pytest.mark.parametrize('case, message', [
    ('temperature 1e-300', None),
    ('NaN weights', 'holds non-finite values (NaN/inf) in model transformer.wte.weight'),
    ('meta.pkl without stoi', "has no 'stoi' and 'itos' dicts"),
    ('prompt from /dev/zero', "prompt file '/dev/zero' holds more than 1,048,576 characters"),
])
@pytest.mark.slow
def test_sample_faults_are_one_line(good_run, tmp_path, case, message):
    out = str(tmp_path / 'out')
    shutil.copytree(good_run, out)
    ckpt, args = load_checkpoint(os.path.join(out, 'ckpt.pt')), []
    if case == 'temperature 1e-300':  # logits / 1e-300 were inf - inf = NaN: now greedy
        args = ['--temperature=1e-300', '--num_samples=2', '--max_new_tokens=30']
    elif case == 'NaN weights':
        ckpt['model']['transformer.wte.weight'][3] = float('nan')
    elif case == 'meta.pkl without stoi':
        write_dataset(str(tmp_path / 'data'), range(100), vocab=65)
        with open(tmp_path / 'data' / 'meta.pkl', 'wb') as f:
            pickle.dump({'vocab_size': 65}, f)
        ckpt['config']['dataset'] = str(tmp_path / 'data')
    else:
        args = ['--start=FILE:/dev/zero']
    save_checkpoint(ckpt, os.path.join(out, 'ckpt.pt'))
    p = run('sample.py', f'--out_dir={out}', '--device=cpu', *args, check=False)
    if message:
        return one_error_line(p, message)
    assert p.returncode == 0 and 'Traceback' not in p.stderr, p.stderr
    samples = p.stdout.split('---------------')[:2]
    assert samples[0].strip().endswith(samples[1].strip()[-30:])  # greedy: the two samples are one


@pytest.fixture(scope='module')
def moe_folder(good_run, tmp_path_factory):
    """good_run exported to a Hugging Face folder (NanoMoEForCausalLM)."""
    folder = str(tmp_path_factory.mktemp('hf') / 'moe')
    run('tools/export_hf.py', f'--out_dir={good_run}', f'--hf_dir={folder}')
    return folder


@pytest.mark.parametrize('case, message', [
    ('no model.safetensors', 'cannot be loaded: No such file or directory'),
    ('truncated model.safetensors', 'cannot be loaded: '),
    ('corrupt model.safetensors', 'cannot be loaded: '),
    ('config.json without num_experts_per_tok', 'config.json has no num_experts_per_tok (top_k)'),
    ('config.json not JSON', 'config.json cannot be read as JSON'),
])
@pytest.mark.slow
def test_a_hugging_face_folder_that_cannot_be_loaded_is_one_line(moe_folder, tmp_path, case, message):
    folder = tmp_path / 'hf'
    shutil.copytree(moe_folder, folder)
    tiny_tokenizer(folder)  # (a character-level folder has none: sample.py would stop at that first)
    weights, config = folder / 'model.safetensors', folder / 'config.json'
    if case == 'no model.safetensors':
        weights.unlink()
    elif case == 'truncated model.safetensors':
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif case == 'corrupt model.safetensors':
        weights.write_bytes(np.random.default_rng(0).bytes(weights.stat().st_size))
    elif case == 'config.json without num_experts_per_tok':
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                      if k != 'num_experts_per_tok'}))
    else:
        config.write_bytes(b'\xff{"n_layer": ')
    one_error_line(run('sample.py', f'--init_from={folder}', '--device=cpu', check=False), message)
    p = run('train.py', *RUN_ONLY, f'--init_from={folder}', f'--out_dir={tmp_path / "out"}', check=False)
    one_error_line(p, message)


@pytest.mark.slow
def test_an_export_that_cannot_write_is_one_line(good_run, tmp_path):
    (tmp_path / 'file').write_text('not a folder')
    hf_dir = tmp_path / 'file' / 'hf'
    p = run('tools/export_hf.py', f'--out_dir={good_run}', f'--hf_dir={hf_dir}', check=False)
    one_error_line(p, f"cannot write {hf_dir} (")
    assert os.listdir(tmp_path) == ['file']


@pytest.mark.slow
def test_two_exports_into_one_folder_at_once_one_says_so(good_run, tmp_path):
    """Both found the folder free; the other one's rename lands first (here: as this one's save returns)."""
    hf_dir = str(tmp_path / 'hf')
    child = f"""
import os, runpy, shutil, sys
sys.path.insert(0, {ROOT!r})
import hf
save = hf.save
def save_and_the_other_lands(model, folder):
    save(model, folder)
    shutil.copytree(folder, {hf_dir!r})
hf.save = save_and_the_other_lands
sys.argv = ['tools/export_hf.py', '--out_dir={good_run}', '--hf_dir={hf_dir}']
runpy.run_path(os.path.join({ROOT!r}, 'tools', 'export_hf.py'), run_name='__main__')
"""
    p = subprocess.run([sys.executable, '-c', child], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    one_error_line(p, f"hf_dir={hf_dir!r} was written by another export meanwhile: nothing is overwritten")
    assert os.listdir(tmp_path) == ['hf'] and 'config.json' in os.listdir(hf_dir)  # the other's, whole


# what wandb.init raises where no one is logged in and there is no terminal to ask on (wandb 0.31's words)
WANDB_STAND_IN = """
class UsageError(Exception):
    pass


def init(**kwargs):
    raise UsageError('api_key not configured (no-tty). call wandb.login(key=[your_api_key])')
"""


@pytest.mark.parametrize('wandb', ['installed', 'stand-in'])
@pytest.mark.slow
def test_wandb_not_logged_in_is_one_line(shakespeare_char, tmp_path, wandb):
    """wandb.init's UsageError was a traceback (after the model was built). The stand-in (a wandb module
    first on PYTHONPATH) raises it where wandb is not installed, or would find a login."""
    env = {k: v for k, v in ENV.items() if not k.startswith('WANDB_')}
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), WANDB_SILENT='true')  # no ~/.netrc, no API key
    if wandb == 'installed':
        pytest.importorskip('wandb')
    else:
        (tmp_path / 'stand_in' / 'wandb').mkdir(parents=True)
        (tmp_path / 'stand_in' / 'wandb' / '__init__.py').write_text(WANDB_STAND_IN)
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(tmp_path / 'stand_in'), env.get('PYTHONPATH')]))
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *FAST, '--wandb_log=True',
                        f'--out_dir={tmp_path / "out"}'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    one_error_line(p, 'wandb_log=True, but wandb.init failed (')
    assert 'log in with `wandb login`' in p.stderr and 'WANDB_MODE=offline' in p.stderr
    if wandb == 'stand-in':
        assert 'failed (api_key not configured (no-tty). call wandb.login(key=[your_api_key]))' in p.stderr
