"""
Ablation runner: train a list of configs one after the other, then write one results table (markdown)
and one plot of the val-loss curves. A study is a config file (config/study/*.py) naming its runs:
$ python tools/study.py config/study/experts.py

Each run trains with train.py into out_dir/<run name>; with `seeds` set, once per seed, as
out_dir/<run name>-s<seed> with --seed=<seed>. Re-running a study skips finished runs (their ckpt.pt
reached max_iters), resumes interrupted ones from their ckpt.pt, and starts the rest, so a killed study
continues where it stopped. To redo a run, delete its folder.
The study's `results` key names the output (the bundled studies write assets/study_*):
  results.md   one row per run (over its seeds: the mean, and the standard deviation after a ±): arguments,
               parameters total/active, val loss of the last eval, best val loss, train loss, iterations,
               tokens, training FLOPs, training minutes; routing averaged over the MoE layers (the last
               logged step's max/mean load, the last eval's dead-expert fraction and flip rate). With
               `baselines`, a second table measures each run against its baseline (compare() below): the
               compute multiplier, the same in wall-clock seconds, and the val-loss gaps at equal FLOPs and
               at equal seconds.
  results.png  val loss against tokens, training FLOPs and training seconds, one line per run (the mean
               over its seeds), and the final val loss per run.
Training FLOPs count the active parameters, as model.estimate_mfu does (6 per parameter per token, plus
attention); training seconds add up log.jsonl's step times (dt_ms), evals excluded: on a shared machine
they are noise.
"""
import os
import sys
import math
import time
import platform
import statistics
import subprocess

import numpy as np
import torch

# the repo root, for its modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, fail  # noqa: E402
from checkpoint import load_checkpoint, read_log, CheckpointError  # noqa: E402
from moe_model import build_model  # noqa: E402

# -----------------------------------------------------------------------------
# run name -> train.py arguments (config files and --key=value),
# e.g. {'moe8': ['config/x.py', '--n_expert=8']}
runs = {}
seeds = []  # each run once per seed, as '<name>-s<seed>' with --seed=<seed>; []: once, as named
baselines = {}  # run name -> the run it is measured against (the second table), e.g. {'moe8': 'dense'}
out_dir = 'out-study'  # each run trains in out_dir/<run name>
results = 'out-study/results'  # writes results.md and results.png
title = 'study'
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = (('tokens', 'tokens', 'tokens'), ('flops', 'training FLOPs (active parameters)', 'FLOPs'),
        ('seconds', 'training seconds (evals excluded)', 'seconds'))


def seeded(runs, seeds):
    """run name -> [(trained run name, train.py arguments)], one per seed."""
    if not seeds:
        return {name: [(name, args)] for name, args in runs.items()}
    return {name: [(f'{name}-s{seed}', args + [f'--seed={seed}']) for seed in seeds]
            for name, args in runs.items()}


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
    print(f"{name}: {'resuming at iter ' + str(done) if resume else 'training'}: train.py {' '.join(args)}",
          flush=True)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(run_dir, 'train.log'), 'a') as log:
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args, f'--out_dir={run_dir}',
                            f'--wandb_run_name={title}-{name}', *resume], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    print(f"{name}: exit code {p.returncode} after {(time.time() - t0) / 60:.1f} min", flush=True)
    return p.returncode == 0


def train_seconds(steps, eval_iters, n):
    """Seconds of training steps 0..n-1, from the logged step times (dt_ms) of the steps that ran no eval:
    each stands for the unlogged steps before it (log_interval), the last one for any after it."""
    times = {r['iter']: r['dt_ms'] / 1000 for r in steps if r['iter'] not in eval_iters}
    if not times or n == 0:
        return np.full(n, math.nan)
    iters = np.array(sorted(times))
    at = np.minimum(np.searchsorted(iters, np.arange(n)), len(iters) - 1)  # the first logged step at or after
    return np.array([times[i] for i in iters])[at]


def run_curve(run_dir, failed):
    """A run's val-loss curve and summary: per eval its iteration, tokens, FLOPs, seconds and val loss; the
    final and best val loss, train loss, routing. Or (None, why): the result is the eval at the run's last
    iteration (max_iters; a failed run's: its last eval), and a log that is torn, empty or lacks that eval
    gives none, never an earlier eval in its place (why is None for a run that failed before logging)."""
    log_path, ckpt_path = os.path.join(run_dir, 'log.jsonl'), os.path.join(run_dir, 'ckpt.pt')
    if failed and not (os.path.exists(log_path) and os.path.exists(ckpt_path)):
        return None, None  # it stopped before logging anything: train.log says why
    try:
        records = read_log(log_path, torn_ok=False)
    except CheckpointError as e:
        return None, str(e)
    evals = [r for r in records if 'val/ce' in r]
    steps = [r for r in records if 'dt_ms' in r]
    done, max_iters = progress(run_dir)
    if not failed and (not evals or evals[-1]['iter'] != max_iters):
        return None, (f"the run ended at iter {done} of {max_iters}" if done < max_iters else
                      f"{log_path} lacks the eval at the run's last iteration {max_iters} (its last eval: "
                      f"{evals[-1]['iter'] if evals else 'none'}); delete {run_dir} to redo the run")
    if not evals:
        return None, None
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt['config']
    with torch.device('meta'):  # sizes only: no memory, no init cost
        model = build_model(ckpt['model_args'])
    tokens_per_iter = cfg['gradient_accumulation_steps'] * cfg['batch_size'] * cfg['block_size']
    # estimate_mfu's count: FLOPs of one sequence's forward and backward at dt = 1 s and a peak of 1 FLOP/s
    flops_per_token = model.estimate_mfu(1, 1.0, 1.0) / model.config.block_size
    iters = np.array([r['iter'] for r in evals])
    seconds = np.concatenate([[0.0], np.cumsum(train_seconds(steps, set(iters.tolist()), iters[-1]))])[iters]
    curve = {'iter': iters, 'tokens': iters * tokens_per_iter, 'seconds': seconds,
             'flops': iters * tokens_per_iter * flops_per_token,
             'val': np.array([r['val/ce'] for r in evals]),
             'best_val': min(r['val/ce'] for r in evals), 'train': evals[-1]['train/ce'],
             'params': (model.get_num_params(), model.get_num_params(active=True))}
    # routing, averaged over the MoE layers: max/mean load
    # of the last logged step, and on the last eval's probe batch the
    # dead-expert fraction and the flip rate (none for a dense run)
    for col, rows, key in (('max_load', steps, '/max_load'), ('dead', evals, '/dead_fraction'),
                           ('flips', evals, '/flip_rate')):
        values = [v for k, v in (rows[-1] if rows else {}).items() if k.endswith(key)]
        curve[col] = statistics.mean(values) if values else math.nan
    return curve, None


def mean_curve(curves):
    """The mean over seeds, eval by eval (up to the shortest run): the x values (seconds differ by seed)
    and the val losses; and every per-seed number of the summary, with its list of values."""
    n = min(len(c['iter']) for c in curves)
    mean = {k: np.mean([c[k][:n] for c in curves], axis=0)
            for k in ('iter', 'tokens', 'flops', 'seconds', 'val')}
    for k in ('best_val', 'train', 'max_load', 'dead', 'flips'):
        mean[k] = statistics.mean(c[k] for c in curves)
    mean['finals'] = {k: [c[k] for c in curves] for k in ('best_val', 'train')}
    mean['finals']['val'] = [c['val'][-1] for c in curves]
    mean['params'], mean['seeds'] = curves[0]['params'], curves
    return mean


def reach(x, y, target):
    """The first x at which the curve through the points (x, y) reaches y <= target, linear in between;
    None if it never does."""
    below = np.flatnonzero(y <= target)
    if len(below) == 0:
        return None
    j = below[0]
    if j == 0:
        return float(x[0])
    return float(x[j - 1] + (y[j - 1] - target) / (y[j - 1] - y[j]) * (x[j] - x[j - 1]))


def compare(run, base, axis):
    """run's curve against base's along axis ('flops' or 'seconds': arrays, increasing, beside 'val'):
      multiplier  base's x to reach run's final val loss (read off base's curve), over run's final x; when
                  base never gets there, base's final x over run's: a lower bound (bound '>')
      gap         run's val loss minus base's at the x both reached (the smaller final x)
    A multiplier above 1 and a negative gap: run is ahead."""
    x, base_x = run[axis], base[axis]
    reached = reach(base_x, base['val'], run['val'][-1])
    multiplier = (reached if reached is not None else base_x[-1]) / x[-1]
    at = min(x[-1], base_x[-1])
    gap = np.interp(at, x, run['val']) - np.interp(at, base_x, base['val'])
    return {'multiplier': float(multiplier), 'bound': '' if reached is not None else '>', 'gap': float(gap)}


def spread(values, digits=4):
    """The mean, and the standard deviation over seeds after a ± (one value: itself)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return 'nan'
    mean = statistics.mean(values)
    return f'{mean:.{digits}f}' + (f' ± {statistics.stdev(values):.{digits}f}' if len(values) > 1 else '')


def versus_text(run, base, axis):
    """compare() on the seed means, then seed by seed (seed i of run against seed i of base): min to max."""
    whole = compare(run, base, axis)
    by_seed = [compare(r, b, axis) for r, b in zip(run['seeds'], base['seeds'])]

    def span(key, fmt):  # (a seed's lower bound keeps its '>')
        show = lambda c: (c['bound'] if key == 'multiplier' else '') + format(c[key], fmt)
        low, high = min(by_seed, key=lambda c: c[key]), max(by_seed, key=lambda c: c[key])
        return f" ({show(low)} to {show(high)})" if len(by_seed) > 1 else ''
    return (f"{whole['bound']}{whole['multiplier']:.2f}x" + span('multiplier', '.2f'),
            f"{whole['gap']:+.4f}" + span('gap', '+.4f'))


def write_table(curves, failed, trained, errors):
    command = ' '.join(['python', 'tools/study.py', *sys.argv[1:]])
    threads = os.environ.get('OMP_NUM_THREADS')
    over_seeds = f", the mean over seeds {seeds} ± their standard deviation" if seeds else ''
    lines = [f"# {title}", '',
             f"Command: `{'OMP_NUM_THREADS=' + threads + ' ' if threads else ''}{command}` (torch "
             f"{torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
             f"{time.strftime('%Y-%m-%d')}). Val loss is the cross-entropy of the last eval{over_seeds}; "
             f"training FLOPs count active parameters (model.estimate_mfu); train min adds up the logged "
             f"step times (evals excluded); max/mean load (last logged step), dead experts and flip rate "
             f"(last eval's probe batch) are means over the MoE layers; runs are in `{out_dir}/`.", '',
             '| run | train.py arguments | params total / active | val loss | best val loss | train loss | '
             'iters | tokens | train FLOPs | train min | max/mean load | dead experts | flip rate |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for name, c in curves.items():
        ran = {run for run, _ in trained[name]}
        status = (' (FAILED: see train.log)' if failed & ran else
                  ' (NO RESULT: its log.jsonl, see the error)' if ran & set(errors) else '')
        head = f"| {name}{status} | `{' '.join(runs[name])}` |"
        if c is None:
            lines.append(head + ' ? |' + ' - |' * 10)
            continue
        total, active = c['params']
        finals = ' | '.join(spread(c['finals'][k]) for k in ('val', 'best_val', 'train'))
        routing = ' | '.join('-' if math.isnan(c[k]) else f'{c[k]:.3f}'
                             for k in ('max_load', 'dead', 'flips'))
        lines.append(f"{head} {total / 1e6:.2f}M / {active / 1e6:.2f}M | {finals} | {c['iter'][-1]:.0f} | "
                     f"{c['tokens'][-1]:.3g} | {c['flops'][-1]:.3g} | {c['seconds'][-1] / 60:.1f} | "
                     f"{routing} |")
    pairs = [(name, base) for name, base in baselines.items() if curves.get(name) and curves.get(base)]
    if pairs:
        per_seed = ' (seed means; per seed, min to max, in brackets)' if seeds else ''
        lines += ['', f"Against a baseline{per_seed}: the compute multiplier is the baseline's training "
                  f"FLOPs to reach the run's final val loss (read off its curve, linear between evals) over "
                  f"the run's FLOPs ('>': the baseline never got there, its final FLOPs instead); the time "
                  f"multiplier the same in training seconds; the gaps are the run's val loss minus the "
                  f"baseline's where both had trained as long (the shorter of the two). Above 1 and below 0: "
                  f"the run is ahead.", '',
                  '| run | baseline | compute multiplier | time multiplier | val loss gap at equal FLOPs | '
                  'at equal seconds |', '|---|---|---|---|---|---|']
        for name, base in pairs:
            (flops_x, flops_gap), (secs_x, secs_gap) = (versus_text(curves[name], curves[base], axis)
                                                        for axis in ('flops', 'seconds'))
            lines.append(f"| {name} | {base} | {flops_x} | {secs_x} | {flops_gap} | {secs_gap} |")
    with open(results + '.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')


def write_plot(curves):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    rows = [(name, c) for name, c in curves.items() if c is not None]
    colors = plt.cm.tab20.colors if len(rows) > 10 else plt.cm.tab10.colors  # a color per run
    for ax, (key, label, short) in zip(axes.flat, AXES):
        for i, (name, c) in enumerate(rows):  # without the untrained model's eval, which squashes the curves
            ax.plot(c[key][1:], c['val'][1:], marker='.', label=name, color=colors[i % len(colors)])
        ax.set(xlabel=label, ylabel='val loss (cross-entropy)', title=f'val loss against {short}'
               + (f' (mean over {len(seeds)} seeds)' if len(seeds) > 1 else ''))
        if key != 'tokens':  # runs of several sizes spread over decades
            ax.set_xscale('log')
        ax.legend(fontsize=8 if len(rows) < 8 else 6)
    bars = axes[1, 1]
    names, vals = [name for name, _ in rows], [statistics.mean(c['finals']['val']) for _, c in rows]
    errs = [statistics.stdev(c['finals']['val']) if len(c['finals']['val']) > 1 else 0 for _, c in rows]
    bars.bar(names, vals, yerr=errs, color='tab:blue', capsize=3)
    for i, v in enumerate(vals):
        bars.annotate(f'{v:.4f}', (i, v), ha='center', va='bottom', fontsize=10 if len(rows) < 8 else 6)
    finite = [v for v in vals if math.isfinite(v)]
    if finite:  # zoom on the differences: they are small next to the loss itself
        pad = max(finite) - min(finite) + 2 * max(errs, default=0) or 0.01
        bars.set_ylim(min(finite) - pad, max(finite) + pad)
    bars.set(ylabel='final val loss',
             title='final val loss per run' + (' (± std over seeds)' if len(seeds) > 1 else ''))
    bars.tick_params(axis='x', labelrotation=30 if len(rows) < 8 else 60)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(results + '.png', dpi=100)
    plt.close(fig)


if __name__ == '__main__':
    keys = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (dict, list, str))}
    config = configure({k: v for k, v in keys.items() if k != 'ROOT'}, sys.argv[1:])
    globals().update(config)
    if not runs:
        fail("the study has no runs: set runs = {'name': ['config/x.py', '--key=value', ...], ...} in its "
             "config file")
    if not all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds) or len(set(seeds)) < len(seeds):
        fail(f"seeds={seeds!r} must be distinct integers in [0, 2**32)")
    if bad := [f'{k}: {v}' for k, v in baselines.items() if k not in runs or v not in runs]:
        fail(f"baselines name runs that the study does not have ({', '.join(bad)}); runs: {', '.join(runs)}")
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    trained = seeded(runs, seeds)
    failed = {run for name in runs for run, args in trained[name] if not train(run, args)}
    curves, errors = {}, {}
    for name in runs:
        got = {run: run_curve(os.path.join(out_dir, run), run in failed) for run, _ in trained[name]}
        errors.update({run: why for run, (_, why) in got.items() if why})
        seed_curves = [curve for curve, _ in got.values()]
        curves[name] = mean_curve(seed_curves) if all(seed_curves) else None
    write_table(curves, failed, trained, errors)
    write_plot(curves)
    print(open(results + '.md').read())
    print(f"wrote {results}.md and {results}.png")
    problems = [f"no result for {run}: {why}" for run, why in errors.items()]
    if failed:
        problems.insert(0, f"{len(failed)} run(s) failed: {', '.join(sorted(failed))} (re-run the same "
                           f"command to retry them)")
    if problems:  # one line, however many
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        sys.exit(1)
