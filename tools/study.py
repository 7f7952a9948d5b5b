"""
Ablation runner: train a list of configs one after the other, then write one results table (markdown)
and one loss-vs-config plot. A study is a config file (config/study/*.py) naming its runs:
$ python tools/study.py config/study/experts.py

Each run trains with train.py into out_dir/<run name>. Re-running a study skips finished runs (their
ckpt.pt reached max_iters), resumes interrupted ones from their ckpt.pt, and starts the rest, so a
killed study continues where it stopped. To redo a run, delete its folder.
The study's `results` key names the output (the bundled studies write assets/study_*): a table with one
row per run (arguments, parameters total/active, val loss of the eval at max_iters, best val loss, train
loss, iterations, training minutes; routing averaged over the MoE layers: the last logged step's max/mean
load, the last eval's dead-expert fraction and flip rate) and a plot (val-loss curves, final val loss per
run). A run whose log.jsonl is torn, empty or lacks that eval gets no numbers, and one error line names it.
"""
import os
import sys
import math
import time
import platform
import statistics
import subprocess

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for its modules
from configurator import configure, fail  # noqa: E402
from checkpoint import load_checkpoint, read_log, CheckpointError  # noqa: E402
from moe_model import build_model  # noqa: E402

# -----------------------------------------------------------------------------
runs = {}  # run name -> train.py arguments (config files and --key=value), e.g. {'moe8': ['config/x.py', '--n_expert=8']}
out_dir = 'out-study'  # each run trains in out_dir/<run name>
results = 'out-study/results'  # writes results.md and results.png
title = 'study'
# -----------------------------------------------------------------------------
config = configure({k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (dict, str))},
                   sys.argv[1:])
globals().update(config)
if not runs:
    fail("the study has no runs: set runs = {'name': ['config/x.py', '--key=value', ...], ...} in its config file")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def progress(run_dir):
    """(iterations done, max_iters) from the run's latest checkpoint; (0, None) if it has none."""
    path = os.path.join(run_dir, 'ckpt.pt')
    if not os.path.exists(path):
        return 0, None
    ckpt = load_checkpoint(path)
    return ckpt['iter_num'], ckpt['config']['max_iters']


def train(name, args):
    run_dir = os.path.join(out_dir, name)
    done, max_iters = progress(run_dir)
    if max_iters is not None and done >= max_iters:
        print(f"{name}: finished earlier ({done}/{max_iters} iters), skipping")
        return True
    resume = ['--init_from=resume'] if max_iters is not None else []
    print(f"{name}: {'resuming at iter ' + str(done) if resume else 'training'}: train.py {' '.join(args)}", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(run_dir, 'train.log'), 'a') as log:
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args, f'--out_dir={run_dir}',
                            f'--wandb_run_name={title}-{name}', *resume], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    print(f"{name}: exit code {p.returncode} after {(time.time() - t0) / 60:.1f} min", flush=True)
    return p.returncode == 0


def summary(name, args, failed):
    """One table row: the run's final and best val loss, its size and its training time. The result is the
    eval at the run's last iteration (max_iters; a failed run's: its last eval). A log that is torn, empty or
    lacks that eval gives no result, never an earlier eval in its place: row['error'] says why."""
    run_dir = os.path.join(out_dir, name)
    path = os.path.join(run_dir, 'log.jsonl')
    row = {'name': name, 'args': ' '.join(args), 'iters': 0, 'val': math.nan, 'train': math.nan,
           'best_val': math.nan, 'evals': [], 'minutes': math.nan}
    row.update(max_load=math.nan, dead=math.nan, flips=math.nan)
    if failed and not os.path.exists(path):  # it stopped before logging anything: train.log says why
        return row
    try:
        records = read_log(path, torn_ok=False)
    except CheckpointError as e:
        return {**row, 'error': str(e)}
    evals = [r for r in records if 'val/ce' in r]
    steps = [r for r in records if 'dt_ms' in r and r['iter'] > 0]
    done, max_iters = progress(run_dir)
    if not failed and (not evals or evals[-1]['iter'] != max_iters):
        return {**row, 'error': f"the run ended at iter {done} of {max_iters}" if done < max_iters else
                f"{path} lacks the eval at the run's last iteration {max_iters} (its last eval: "
                f"{evals[-1]['iter'] if evals else 'none'}); delete {run_dir} to redo the run"}
    row.update({'iters': evals[-1]['iter'] if evals else 0, 'evals': evals,
                'val': evals[-1]['val/ce'] if evals else math.nan,
                'train': evals[-1]['train/ce'] if evals else math.nan,
                'best_val': min((r['val/ce'] for r in evals), default=math.nan),
                # the median step time (logged steps that hold an eval are slower) times the iterations
                'minutes': statistics.median(r['dt_ms'] for r in steps) * evals[-1]['iter'] / 6e4
                if steps and evals else math.nan})
    # routing, averaged over the MoE layers: max/mean load of the last logged step, and on the last eval's probe
    # batch the dead-expert fraction and the flip rate (none for a dense run)
    for col, rows, key in (('max_load', steps, '/max_load'), ('dead', evals, '/dead_fraction'),
                           ('flips', evals, '/flip_rate')):
        values = [v for k, v in (rows[-1] if rows else {}).items() if k.endswith(key)]
        row[col] = statistics.mean(values) if values else math.nan
    ckpt_path = os.path.join(run_dir, 'ckpt.pt')
    if os.path.exists(ckpt_path):
        with torch.device('meta'):  # sizes only: no memory, no init cost
            model = build_model(load_checkpoint(ckpt_path)['model_args'])
        row['params'] = f"{model.get_num_params() / 1e6:.2f}M / {model.get_num_params(active=True) / 1e6:.2f}M"
    return row


def number(x, digits):
    return '-' if math.isnan(x) else f'{x:.{digits}f}'


def write_table(rows, failed):
    command = ' '.join(['python', 'tools/study.py', *sys.argv[1:]])
    threads = os.environ.get('OMP_NUM_THREADS')
    lines = [f"# {title}", '',
             f"Command: `{'OMP_NUM_THREADS=' + threads + ' ' if threads else ''}{command}` "
             f"(torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}). "
             f"Val loss is the cross-entropy of the last eval; train min is the median step time times the "
             f"iterations (evals excluded); max/mean load (last logged step), dead experts and flip rate (last "
             f"eval's probe batch) are means over the MoE layers; runs are in `{out_dir}/`.", '',
             '| run | train.py arguments | params total / active | val loss | best val loss | train loss | iters | '
             'train min | max/mean load | dead experts | flip rate |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        status = (' (FAILED: see train.log)' if r['name'] in failed else
                  ' (NO RESULT: its log.jsonl, see the error)' if 'error' in r else '')
        lines.append(f"| {r['name']}{status} | `{r['args']}` | {r.get('params', '?')} | "
                     f"{number(r['val'], 4)} | {number(r['best_val'], 4)} | {number(r['train'], 4)} | "
                     f"{r['iters']} | {number(r['minutes'], 1)} | "
                     + ' | '.join(number(r[c], 3) for c in ('max_load', 'dead', 'flips')) + ' |')
    with open(results + '.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')


def write_plot(rows):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        evals = r['evals'][1:] or r['evals']  # without the untrained model's eval, which squashes the curves
        curves.plot([e['iter'] for e in evals], [e['val/ce'] for e in evals], marker='.', label=r['name'])
    curves.set(xlabel='iteration', ylabel='val loss (cross-entropy)', title='val loss during training')
    curves.legend()
    names, vals = [r['name'] for r in rows], [r['val'] for r in rows]
    bars.bar(names, vals, color='tab:blue')
    for i, v in enumerate(vals):
        bars.annotate(number(v, 4), (i, v if math.isfinite(v) else 0), ha='center', va='bottom')
    finite = [v for v in vals if math.isfinite(v)]
    if finite:  # zoom on the differences: they are small next to the loss itself
        spread = max(finite) - min(finite) or 0.01
        bars.set_ylim(min(finite) - spread, max(finite) + spread)
    bars.set(ylabel='final val loss', title='final val loss per config')
    bars.tick_params(axis='x', labelrotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(results + '.png', dpi=100)
    plt.close(fig)


os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
failed = {name for name, args in runs.items() if not train(name, args)}
rows = [summary(name, args, name in failed) for name, args in runs.items()]
write_table(rows, failed)
write_plot(rows)
print(open(results + '.md').read())
print(f"wrote {results}.md and {results}.png")
problems = [f"no result for {r['name']}: {r['error']}" for r in rows if 'error' in r]
if failed:
    problems.insert(0, f"{len(failed)} run(s) failed: {', '.join(sorted(failed))} (re-run the same command "
                       f"to retry them)")
if problems:  # one line, however many
    print(f"error: {'; '.join(problems)}", file=sys.stderr)
    sys.exit(1)
