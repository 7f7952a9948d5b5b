"""The routing metrics of a real (tiny, CPU) training run, and the tools that read them: plot.py,
specialisation.py and study.py."""
import os
import re

import pytest
import torch

from conftest import TINY, run, read_log
from checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow  # every test reads a training run (moe_run) or trains (study.py)


@pytest.fixture(scope='module')
def moe_run(shakespeare_char, tmp_path_factory):
    """A tiny MoE trained 30 steps (2 micro-batches each, global-batch balance loss), evaluated every 10."""
    out = str(tmp_path_factory.mktemp('moe_run'))
    run('train.py', *TINY, f'--out_dir={out}', '--max_iters=30', '--eval_interval=10',
        '--gradient_accumulation_steps=2', '--aux_loss_scope=global', '--n_shared_expert=1')
    return out


def test_routing_metrics_are_in_the_jsonl_log(moe_run):
    records = read_log(moe_run)
    steps = [r for r in records if 'loss' in r]
    assert len(steps) == 30
    for layer in ('layer0', 'layer1'):
        for r in steps:
            assert len(r[f'{layer}/load']) == 4 and sum(r[f'{layer}/load']) == pytest.approx(1.0)
            assert r[f'{layer}/max_load'] >= 1.0 and r[f'{layer}/drop_fraction'] == 0.0
            assert 0 < r[f'{layer}/entropy'] <= 1.3863  # log(4)
    evals = [r for r in records if 'val/ce' in r]
    assert [r['iter'] for r in evals] == [0, 10, 20, 30]
    assert 'layer0/flip_rate' not in evals[0]  # nothing to compare the first probe with
    flips = [r['layer1/flip_rate'] for r in evals[1:]]
    assert all(0 <= f <= 1 for f in flips) and max(flips) > 0  # the router learns, so routing moves
    assert all(0 <= r[f'{layer}/dead_fraction'] <= 1 for r in evals for layer in ('layer0', 'layer1'))


def test_plot_writes_the_three_pngs(moe_run, tmp_path):
    import matplotlib.image
    run('tools/plot.py', f'--out_dir={moe_run}', f'--plot_dir={tmp_path}')
    for name in ('loss.png', 'load.png', 'probe.png'):
        path = tmp_path / name
        assert path.stat().st_size > 10_000, name
        pixels = matplotlib.image.imread(path)
        assert pixels.std() > 0.05, name  # a real figure, not a blank canvas
    run('tools/plot.py', f'--out_dir={moe_run}')  # default: next to the log
    assert os.path.exists(os.path.join(moe_run, 'load.png'))


def test_specialisation_table_and_image(moe_run, tmp_path):
    p = run('tools/specialisation.py', f'--out_dir={moe_run}', f'--plot_dir={tmp_path}', '--n_windows=16',
            '--batch_size=8')
    table = (tmp_path / 'specialisation.md').read_text()
    assert '## layer 0' in table and '## layer 1' in table
    rows = [l for l in table.splitlines() if l.startswith('| ') and l[2].isdigit()]
    assert len(rows) == 2 * 4  # one row per expert per layer
    assert all('`' in r for r in rows)  # every expert lists tokens
    assert (tmp_path / 'specialisation.png').stat().st_size > 10_000
    assert 'wrote' in p.stdout


def test_study_runs_configs_over_seeds_writes_one_table_and_plot_and_resumes(shakespeare_char, tmp_path):
    tiny = [a for a in TINY if not a.startswith('--max_iters')] + ['--max_iters=4', '--eval_interval=2',
                                                                   '--eval_iters=1']
    study = tmp_path / 'study.py'
    study.write_text(f"title = 'tiny'\nout_dir = {str(tmp_path / 'runs')!r}\nresults = "
                     f"{str(tmp_path / 'results')!r}\nruns = {{'dense': {tiny + ['--n_expert=0']!r}, 'moe': "
                     f"{tiny!r}}}\nseeds = [1337, 7]\nbaselines = {{'moe': 'dense'}}\n")
    # an interrupted run: 'moe' of seed 7 stopped at iter 2 of 4
    run('train.py', *tiny, f'--out_dir={tmp_path / "runs" / "moe-s7"}', '--max_iters=2', '--seed=7')
    ckpt_path = str(tmp_path / 'runs' / 'moe-s7' / 'ckpt.pt')
    ckpt = load_checkpoint(ckpt_path)
    ckpt['config']['max_iters'] = 4
    save_checkpoint(ckpt, ckpt_path)

    p = run('tools/study.py', str(study))
    assert 'dense-s1337: training' in p.stdout and 'moe-s7: resuming at iter 2' in p.stdout
    assert [r['iter'] for r in read_log(tmp_path / 'runs' / 'moe-s7') if 'val/ce' in r][-1] == 4
    assert load_checkpoint(str(tmp_path / 'runs' / 'dense-s7' / 'ckpt.pt'))['config']['seed'] == 7
    table = (tmp_path / 'results.md').read_text()
    assert 'python tools/study.py' in table  # the command that made it
    runs, versus = table.split('Against a baseline')
    rows = {l.split('|')[1].strip(): l for l in runs.splitlines() if l.startswith(('| dense', '| moe'))}
    assert set(rows) == {'dense', 'moe'} and all('nan' not in r for r in rows.values())
    assert rows['dense'].rstrip(' |').endswith('| - | - | -')  # no routing columns for a dense run
    max_load, dead, flips = (float(c) for c in rows['moe'].split('|')[-4:-1])
    assert max_load >= 1 and 0 <= dead <= 1 and 0 <= flips <= 1
    # one row per run: the mean over its seeds, their standard deviation after the ±
    finals = [[r['val/ce'] for r in read_log(tmp_path / 'runs' / f'moe-s{s}') if 'val/ce' in r][-1]
              for s in (1337, 7)]
    mean, std = (float(v) for v in rows['moe'].split('|')[4].split('±'))
    assert mean == pytest.approx(sum(finals) / 2, abs=1e-4)
    assert std == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5, abs=1e-4)
    # against its baseline: the multipliers (seed means, then per seed min to max) and the gaps
    (row,) = [l for l in versus.splitlines() if l.startswith('| moe | dense |')]
    versus = [c.strip() for c in row.split('|')[3:7]]
    multiplier = r'>?\d+\.\d\dx \(>?\d+\.\d\d to >?\d+\.\d\d\)'
    gap = r'[+-]\d\.\d{4} \([+-]\d\.\d{4} to [+-]\d\.\d{4}\)'
    assert all(re.fullmatch(p, c) for p, c in zip([multiplier] * 2 + [gap] * 2, versus)), versus
    assert (tmp_path / 'results.png').stat().st_size > 10_000
    mtime = os.path.getmtime(tmp_path / 'runs' / 'dense-s7' / 'ckpt.pt')
    p = run('tools/study.py', str(study))  # everything is finished: nothing is retrained
    assert p.stdout.count('skipping') == 4
    assert os.path.getmtime(tmp_path / 'runs' / 'dense-s7' / 'ckpt.pt') == mtime


def finished_run(folder, log_text, max_iters=20):
    """A run folder as a finished train.py run leaves it (ckpt.pt at max_iters, then log.jsonl): study.py only
    summarises it, training nothing."""
    os.makedirs(folder)
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65, bias=False, dropout=0.0)
    save_checkpoint({'model': {}, 'model_args': model_args, 'iter_num': max_iters,
                     'config': {'max_iters': max_iters, 'gradient_accumulation_steps': 1, 'batch_size': 4,
                                'block_size': 16}}, os.path.join(folder, 'ckpt.pt'))
    with open(os.path.join(folder, 'log.jsonl'), 'w') as f:
        f.write(log_text)


def test_study_never_reports_an_earlier_eval_as_a_result_and_names_a_torn_or_empty_log(tmp_path):
    """Three of four finished runs lost their last eval: torn and glued to the next record (an older version
    after a full disk), an empty log, and records that are gone. study.py used to report their iter-10 eval
    (or a row of nan) as the result, with exit code 0."""
    step = '{"iter": 5, "loss": 4.0, "ce": 4.0, "dt_ms": 100.0}\n'
    eval10 = '{"iter": 10, "train/ce": 3.9, "val/ce": 3.8550}\n'
    eval20 = '{"iter": 20, "train/ce": 3.6, "val/ce": 3.5967}\n'
    glued = eval20[:30] + '{"iter": 20, "event": "start"}\n'
    runs = {'good': step + eval10 + eval20, 'torn': step + eval10 + glued, 'empty': '',
            'short': step + eval10}
    for name, text in runs.items():
        finished_run(str(tmp_path / 'runs' / name), text)
    study = tmp_path / 'study.py'
    study.write_text(f"out_dir = {str(tmp_path / 'runs')!r}\nresults = {str(tmp_path / 'results')!r}\n"
                     f"runs = {{name: ['--n_expert=0'] for name in {list(runs)!r}}}\n")
    p = run('tools/study.py', str(study), check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
    assert p.returncode == 1 and 'Traceback' not in p.stderr and len(errors) == 1, p.stderr
    log = str(tmp_path / 'runs' / '{}' / 'log.jsonl')
    assert f"no result for torn: {log.format('torn')}: line 3 is not a log record" in errors[0]
    assert f"no result for empty: {log.format('empty')} holds no log record: it is empty" in errors[0]
    assert (f"no result for short: {log.format('short')} lacks the eval at the run's last iteration 20 (its "
            f"last eval: 10)") in errors[0]
    table = (tmp_path / 'results.md').read_text()
    rows = {line.split('|')[1].split()[0]: line for line in table.splitlines() if line.startswith('| ')}
    assert '| 3.5967 |' in rows['good'] and '| 20 |' in rows['good']
    for name in ('torn', 'empty', 'short'):
        assert 'NO RESULT' in rows[name] and '3.8550' not in rows[name] and 'nan' not in rows[name]
