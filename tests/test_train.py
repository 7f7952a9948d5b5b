"""train.py and sample.py end to end, as a user runs them (subprocesses, tiny models, CPU)."""
import os
import re
import time

import pytest
import torch

from conftest import TINY, run, read_log
from checkpoint import load_checkpoint


@pytest.fixture(scope='module')
def trained(shakespeare_char, tmp_path_factory):
    """A tiny MoE trained 60 steps, with a checkpoint (shared by the tests below)."""
    out = str(tmp_path_factory.mktemp('trained'))
    run('train.py', *TINY, f'--out_dir={out}', '--max_iters=60', '--eval_interval=30', '--eval_iters=10')
    return out


@pytest.mark.slow
def test_training_lowers_the_loss(trained):
    evals = [r for r in read_log(trained) if 'val/ce' in r]
    assert [r['iter'] for r in evals] == [0, 30, 60]
    assert evals[-1]['val/ce'] < evals[0]['val/ce'] - 0.5, evals
    steps = [r for r in read_log(trained) if 'loss' in r]
    assert len(steps) == 60 and {'ce', 'aux', 'z', 'layer0/load', 'mfu'} <= set(steps[0])
    assert steps[0]['loss'] > steps[0]['ce']  # the training loss adds the aux losses


@pytest.mark.slow
@pytest.mark.parametrize('n_expert', [16, 0])
def test_the_modern_block_preset_trains_and_samples(shakespeare_char, tmp_path, n_expert):
    """config/train_shakespeare_char_olmoe_cpu.py (OLMoE's block) and its dense twin (a Llama-style GPT),
    cut to 30 steps of a smaller model: the loss falls, the checkpoint records the block, sample.py runs."""
    out = str(tmp_path / 'out')
    run('train.py', 'config/train_shakespeare_char_olmoe_cpu.py', f'--out_dir={out}',
        f'--n_expert={n_expert}', '--n_layer=2', '--max_iters=30', '--eval_interval=30', '--eval_iters=5',
        '--log_interval=10')
    evals = [r for r in read_log(out) if 'val/ce' in r]
    assert evals[-1]['val/ce'] < evals[0]['val/ce'] - 0.5, evals
    args = load_checkpoint(os.path.join(out, 'ckpt.pt'))['model_args']
    assert (args['norm'], args['rope'], args['mlp'], args['qk_norm'], args['tie_embeddings']) == \
        ('rmsnorm', True, 'swiglu', 'full', False)
    assert args.get('norm_topk', False) is False and args.get('n_expert', 0) == n_expert
    p = run('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=20', '--device=cpu')
    assert p.stdout.count('---------------') == 1


@pytest.mark.slow
def test_checkpoint_holds_the_full_config_and_loads_weights_only(trained):
    ckpt = load_checkpoint(os.path.join(trained, 'ckpt.pt'))  # weights_only=True inside
    assert ckpt['iter_num'] == 60
    args = ckpt['model_args']
    assert (args['n_expert'], args['top_k'], args['expert_hidden'],
            args['expert_impl']) == (4, 2, 32, 'grouped')
    assert os.path.exists(os.path.join(trained, 'ckpt_best.pt'))
    assert ckpt['best_val_loss'] == min(r['val/ce'] for r in read_log(trained) if 'val/ce' in r)


@pytest.mark.slow
def test_sample_from_checkpoint(trained):
    p = run('sample.py', f'--out_dir={trained}', '--num_samples=2', '--max_new_tokens=40', '--start=ROMEO:',
            '--device=cpu', '--expert_impl=loop')
    samples = p.stdout.split('---------------')
    assert len(samples) == 3
    for sample in samples[:2]:
        assert 'ROMEO:' in sample and len(sample.split('ROMEO:', 1)[1]) >= 40  # prompt + 40 new characters


MUON = ['--optimizer=muon', '--router_lr=1e-3']


@pytest.mark.parametrize('extra', [[], ['--dropout=0.1', '--n_expert=0'], MUON])
@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(shakespeare_char, tmp_path, extra):
    args = [*TINY, *extra, '--eval_interval=6']
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    run('train.py', *args, f'--out_dir={full}', '--max_iters=12')
    run('train.py', *args, f'--out_dir={part}', '--max_iters=6')
    run('train.py', *args, f'--out_dir={part}', '--max_iters=12', '--init_from=resume')
    losses = lambda out: {r['iter']: r['loss'] for r in read_log(out) if 'loss' in r}
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(12))
    assert [a[i] for i in range(12)] == [b[i] for i in range(12)]  # bit-identical on CPU
    if extra == MUON:  # another optimizer's state does not fit: one line, before any work
        p = run('train.py', *TINY, f'--out_dir={part}', '--init_from=resume', check=False)
        said = f"error: init_from='resume' with optimizer='adamw', but {part}/ckpt.pt was trained with "
        assert p.returncode == 2 and p.stderr.startswith(said + "optimizer='muon'"), p.stderr


@pytest.mark.parametrize('args, message', [
    (['--top_k=5'], 'top_k=5 must be <= n_expert=4'),
    (['--n_embd=33'], 'n_embd=33 must be divisible by n_head=2'),
    (['--expert_impl=fast'], "expert_impl='fast' is unknown; allowed: loop, grouped, batched, triton"),
    (['--activation_checkpointing=some'], "activation_checkpointing='some'"),
    (['--expert_impl=batched', '--capacity_factor=0'], 'capacity_factor=0.0 must be > 0'),
    (['--n_exprt=4'], "unknown config key 'n_exprt'"),
    (['--batch_size=big'], "batch_size='big' (from --batch_size=big) must be of type int"),
    (['--dataset=nonexistent'], 'run: python data/nonexistent/prepare.py'),
    (['--init_from=resume'], 'ckpt.pt not found'),
    (['config/no_such_file.py'], "config file 'config/no_such_file.py' not found"),
    (['--expert_parallel=0'], 'expert_parallel=0 must be a positive integer'),
    (['--expert_parallel=3'], 'expert_parallel=3 must divide n_expert=4'),
    (['--expert_parallel=2', '--n_expert=0'], 'expert_parallel=2 needs an MoE model'),
    (['--expert_parallel=2', '--expert_impl=loop'], "expert_impl='loop' with expert_parallel=2; allowed: "
                                                    "'grouped'"),
    (['--expert_parallel=2', '--router=expert_choice'], "router='expert_choice' with expert_parallel=2"),
    (['--expert_parallel=2'], 'expert_parallel=2 must divide the number of processes (1)'),
    (['--optimizer=sgd'], "optimizer='sgd'; allowed: 'adamw', 'muon'"),
    (['--optimizer=muon', '--learning_rate=0'], "learning_rate=0.0 with optimizer='muon', router_lr=0.0"),
])
def test_bad_config_fails_at_start_with_one_clear_line(shakespeare_char, tmp_path, args, message):
    out = tmp_path / 'out'
    p = run('train.py', *TINY, f'--out_dir={out}', *args, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], p.stderr
    assert not out.exists()  # no work started, nothing written


@pytest.mark.slow
def test_override_is_never_executed(shakespeare_char, tmp_path):
    marker = tmp_path / 'pwned'
    p = run('train.py', *TINY, f"--out_dir={tmp_path}/__import__('os').system('touch {marker}')",
            '--eval_only=True', check=False)
    assert not marker.exists()
    p = run('train.py', *TINY, f"--max_iters=__import__('os').system('touch {marker}')", check=False)
    assert p.returncode == 2 and not marker.exists()


@pytest.mark.slow
def test_truncated_checkpoint_gives_a_clear_error(trained, tmp_path):
    out = tmp_path / 'broken'
    out.mkdir()
    data = open(os.path.join(trained, 'ckpt.pt'), 'rb').read()
    (out / 'ckpt.pt').write_bytes(data[:len(data) // 2])
    p = run('train.py', *TINY, f'--out_dir={out}', '--init_from=resume', check=False)
    assert p.returncode == 2 and 'is truncated or corrupt' in p.stderr and 'Traceback' not in p.stderr
    p = run('sample.py', f'--out_dir={out}', check=False)
    assert p.returncode == 2 and 'is truncated or corrupt' in p.stderr and 'Traceback' not in p.stderr


@pytest.mark.slow
def test_bench_runs_dense_moe_and_the_layer_mode():
    """The model mode times an MoE and its dense twin and reports each one's peak memory, which activation
    checkpointing lowers, with no profiler lines, and MFU on a CPU only against a peak_flops given; the layer
    mode times every backend."""
    peaks = {}
    for mode, peak in (('none', []), ('all', ['--peak_flops=1e12'])):
        p = run('bench.py', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
                '--vocab_size=64', '--warmup_iters=1', '--bench_iters=2', '--device=cpu', '--n_expert=4',
                '--expert_hidden=64', '--compare_dense=True', f'--activation_checkpointing={mode}', *peak)
        # a bench says which kernel it timed
        assert 'grouped GEMMs on the CPU: cpu_grouped_mm.cpp, float32 products by BLAS directly' in p.stdout
        assert 'profiler' not in p.stdout + p.stderr
        lines = [l for l in p.stdout.splitlines() if 'ms/iter' in l]
        assert [l.split(':')[0] for l in lines] == ['dense twin', 'model']
        assert all(('MFU' in l) == bool(peak) and ('of 1 TFLOP/s' in l) == bool(peak) for l in lines), lines
        peaks[mode] = [float(l.split('peak memory ')[1].split(' MiB')[0]) for l in lines]
    assert all(0 < b < 0.8 * a for a, b in zip(peaks['none'], peaks['all'])), peaks
    # profile_steps: each op's time per step in both models, the MoE's fused ops only in its column
    p = run('bench.py', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
            '--vocab_size=64', '--warmup_iters=1', '--bench_iters=1', '--device=cpu', '--n_expert=4',
            '--expert_hidden=64', '--compare_dense=True', '--profile_steps=2')
    table = p.stdout.split('profiled steps each:\n')[1].splitlines()
    assert table[0].split() == ['op', 'dense', 'twin', 'model', 'difference'] and table[1].startswith('total')
    # an op's name may hold spaces ('autograd::engine::evaluate_function: AddBackward0'): read from the right
    rows = {' '.join(r.split()[:-3]): [float(v) for v in r.split()[-3:]] for r in table[1:]}
    assert rows['nanomoe::fused_experts_backward'][0] == 0 < rows['nanomoe::fused_experts_backward'][1]
    assert all(abs(t[1] - t[0] - t[2]) < 2e-3 for t in rows.values()), rows
    assert 'profiler' not in p.stdout + p.stderr
    p = run('bench.py', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
            '--vocab_size=64', '--warmup_iters=1', '--bench_iters=1', '--device=cpu', '--n_expert=4',
            '--optimizer=muon')  # Muon's step, the experts' by ExpertMuon
    assert 'experts parameters: 2 tensors' in p.stdout and 'ms/iter' in p.stdout
    p = run('bench.py', '--moe_layer=True', '--n_embd=16', '--expert_hidden=32', '--layer_tokens=64',
            '--layer_experts=4,8', '--warmup_iters=1', '--bench_iters=2', '--device=cpu')
    rows = [l.split() for l in p.stdout.splitlines() if l.split() and l.split()[0] in ('4', '8')]
    assert [(r[0], r[1]) for r in rows] == [(e, i) for e in '48' for i in ('loop', 'grouped', 'batched')]


def bare_copy(dest):
    """The repo as it travels to the GPU machine: the files git tracks or would track, as they are in the work
    tree; nothing git ignores (no .venv, no prepared data, no out*/), and no ../shared beside it."""
    import shutil
    import subprocess
    from conftest import ROOT
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split('\0')
    for name in filter(None, listed):
        if os.path.isfile(os.path.join(ROOT, name)):  # (not one deleted in the work tree)
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))
    assert not os.path.exists(os.path.join(dest, '..', 'shared'))
    return dest


def gpu_check(copy, *args, fault=''):
    """tools/gpu_check.py run in `copy` (with NANOMOE_GPU_CHECK_FAULT=fault); the CompletedProcess."""
    import subprocess
    import sys
    env = {**os.environ, 'NANOMOE_GPU_CHECK_FAULT': fault}
    return subprocess.run([sys.executable, 'tools/gpu_check.py', *args], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_gpu_check_quick_in_a_bare_copy_runs_every_part_and_reports_a_failed_one(shakespeare_char, tmp_path):
    """The GPU machine's conditions, rehearsed with --quick (the CPU, tiny sizes): a bare copy of the repo
    with the three data files brought along, one command, the report into a folder outside the repo, a budget.
    A fault injected into part (b) (an unknown option): the report says so, and every other part still
    runs."""
    import shutil
    copy = bare_copy(tmp_path / 'repo')
    for name in ('train.bin', 'val.bin', 'meta.pkl'):
        shutil.copy(os.path.join(shakespeare_char, name), copy / 'data' / 'shakespeare_char' / name)
    out = tmp_path / 'OUT'
    out.mkdir()
    p = gpu_check(copy, '--quick', f'--out={out}', '--budget=240', fault='b=fail')
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stdout + p.stderr
    assert os.listdir(out) == ['gpu_check.md']  # the report, in the folder that comes back, and nothing else
    text = (out / 'gpu_check.md').read_text()
    assert re.findall(r'^## \((\w)\) ', text, re.M) == ['a', 'b', 'd', 'c', 'c']  # (c)'s compiles last
    summary = text.split('## Summary')[1].split('## (a)')[0]
    assert ("(b) One MoE layer: 8 experts x 64, top-2: **FAILED** (exit code 2): "
            "error: unknown config key 'no_such_key'" in summary)
    assert text.count('exit code 0,') == 4 and 'pending' not in summary
    assert 'skipped' in summary  # (a): the CUDA tests, skipped on the CPU
    assert 'model / dense twin: ' in summary and 'activation_checkpointing=all' in summary
    assert re.search(r'val loss \d\.\d{4} \(no target', summary)


@pytest.mark.slow
def test_gpu_check_cuts_a_part_short_and_names_the_data_to_bring(tmp_path):
    """A part that outlives its share of the budget is killed with the processes it started and marked cut
    short, and the check ends inside its budget; without the data, (d) says in one line which files to bring;
    and with no GPU and no --quick, one line says what to do."""
    copy = bare_copy(tmp_path / 'repo')
    t0 = time.time()
    p = gpu_check(copy, '--quick', '--parts=ad', f'--out={tmp_path}/OUT/', '--budget=20', fault='a=hang')
    assert p.returncode == 1 and 'Traceback' not in p.stderr and time.time() - t0 < 20 + 10, \
        p.stdout + p.stderr
    bring = ('data/shakespeare_char/train.bin, val.bin, meta.pkl missing: '
             'run python3 data/shakespeare_char/prepare.py '
             'where the data is and bring train.bin, val.bin and meta.pkl along')
    assert f'(d) will not run: {bring}' in p.stdout.splitlines()
    text = (tmp_path / 'OUT' / 'gpu_check.md').read_text()
    summary = text.split('## Summary')[1].split('## (a)')[0]
    assert re.search(r'- \(a\) CUDA tests: \*\*CUT SHORT\*\* after \d+ s, its share of the budget',
                     summary), summary
    assert f'- (d) shakespeare_char MoE run: **NOT RUN**: {bring}' in summary
    started = int(re.search(r'started (\d+)', text).group(1))  # the hanging part's own child
    state = (open(f'/proc/{started}/stat').read().split(')')[1].split()[0]
             if os.path.exists(f'/proc/{started}') else 'gone')
    assert state in ('gone', 'Z'), state  # killed with it (a zombie until its new parent reaps it)
    p = gpu_check(copy)  # no GPU here
    assert p.returncode == 2 and \
        p.stderr.strip() == 'error: no CUDA GPU here; --quick runs the check on the CPU'


def test_gpu_check_picks_peak_flops_and_a_per_test_timeout(monkeypatch):
    """MFU against the right peak (an H100 PCIe is not an SXM); pytest gets a time limit per test where
    pytest-timeout is installed (its option is an error where it is not)."""
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location('gpu_check', os.path.join(ROOT, 'tools', 'gpu_check.py'))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    peaks = {'NVIDIA H100 PCIe': 756e12, 'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100 NVL': 835e12,
             'NVIDIA H200': 989e12, 'NVIDIA GH200 480GB': 989e12, 'NVIDIA A100-SXM4-80GB': 312e12}
    assert {name: gpu_check.peak_flops(name) for name in peaks} == peaks
    find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: (object() if installed else None)
                            if name == 'pytest_timeout' else find_spec(name, *a))
        (tests,) = [cmd for part, _, cmd, _ in gpu_check.parts(quick=True, long=False, out_dir='run')
                    if part == 'a']
        assert ('--timeout=60' in tests) == installed, tests


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(shakespeare_char, tmp_path):
    """torchrun with 2 CPU processes (gloo) and gradient_accumulation_steps=2 (one micro-batch each)
    trains exactly what one process does with 2 micro-batches: same weights after a few steps, with the
    DDP run's activations checkpointed (recomputed in backward). (With Muon: test_expert_parallel.py.)"""
    import subprocess, sys
    from conftest import ROOT
    args = [*TINY, '--gradient_accumulation_steps=2', '--max_iters=4', '--eval_interval=4']
    run('train.py', *args, f'--out_dir={tmp_path / "single"}')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.join(ROOT, 'train.py'), *args, f'--out_dir={tmp_path / "ddp"}',
                        '--activation_checkpointing=all'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    single = load_checkpoint(str(tmp_path / 'single' / 'ckpt.pt'))['model']
    ddp = load_checkpoint(str(tmp_path / 'ddp' / 'ckpt.pt'))['model']
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5)
