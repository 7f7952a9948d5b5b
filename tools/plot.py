"""
Plots of one training run, from its out_dir/log.jsonl:
$ python tools/plot.py --out_dir=out-shakespeare-char-moe-cpu                 # PNGs into the run's out_dir
$ python tools/plot.py --out_dir=out-shakespeare-char-moe-cpu --plot_dir=assets/moe-cpu
  loss.png    training loss parts (cross-entropy, balance loss, z-loss) and train/val cross-entropy
  load.png    per MoE layer: fraction of token-slots per expert over training (heatmap; each optimizer step)
  probe.png   per MoE layer, on the fixed probe batch, eval to eval: routing flip rate and dead experts
  hellaswag.png  HellaSwag acc and acc_norm at evals (a run with hellaswag_interval > 0)
A dense run gets loss.png (and hellaswag.png) only.
"""
import os
import sys
import json

import numpy as np
import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt

# the repo root, for its modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, fail  # noqa: E402
from checkpoint import read_log, CheckpointError  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run: reads out_dir/log.jsonl
plot_dir = ''  # where the PNGs go; '' = out_dir
# -----------------------------------------------------------------------------


def moe_layers(records):
    """'layer{i}' names in the log, in block order."""
    names = {k.split('/')[0] for r in records for k in r if k.startswith('layer') and k.endswith('/load')}
    return sorted(names, key=lambda name: int(name[len('layer'):]))


def plot_losses(steps, evals, path):
    parts = [('ce', 'cross-entropy'), ('aux', 'balance loss (1 = balanced)'), ('z', 'router z-loss')]
    parts = [(k, title) for k, title in parts if any(k in r for r in steps)]
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], parts):
        ax.plot([r['iter'] for r in steps if key in r], [r[key] for r in steps if key in r], lw=0.8,
                label='training step')
        if key == 'ce':
            for split in ('train', 'val'):
                ax.plot([r['iter'] for r in evals], [r[f'{split}/ce'] for r in evals], marker='o',
                        label=f'{split} (eval)')
            ax.legend()
        ax.set(title=title, xlabel='iteration')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_load(steps, layers, path):
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 2 + 1.5 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        rows = [r for r in steps if f'{layer}/load' in r]
        load = np.array([r[f'{layer}/load'] for r in rows]).T  # [n_expert, logged steps]
        iters = [r['iter'] for r in rows]
        im = ax.imshow(load, aspect='auto', interpolation='nearest', cmap='viridis', vmin=0,
                       extent=(iters[0], iters[-1], load.shape[0] - 0.5, -0.5))
        ax.set(title=f'{layer}: fraction of token-slots per expert (uniform = {1 / load.shape[0]:.3f})',
               ylabel='expert', xlabel='iteration')
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_probe(evals, layers, path):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for key, ax, title, ylabel in (
            ('flip_rate', axes[0], 'routing flip rate: '
                                   'probe tokens whose top-1 expert changed since the last eval',
             'fraction of tokens'),
            ('dead_fraction', axes[1], 'dead experts: under 10% of the uniform share of the probe batch',
             'fraction of experts')):
        for layer in layers:
            rows = [r for r in evals if f'{layer}/{key}' in r]
            ax.plot([r['iter'] for r in rows], [r[f'{layer}/{key}'] for r in rows], marker='o', label=layer)
        ax.set(title=title, xlabel='iteration', ylabel=ylabel)
        ax.title.set_fontsize(9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_hellaswag(evals, path):
    rows = [r for r in evals if r.get('hellaswag/acc_norm') is not None]  # (log.jsonl holds a NaN as null)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ('acc_norm', 'acc'):
        ax.plot([r['iter'] for r in rows], [r[f'hellaswag/{key}'] for r in rows], marker='o', label=key)
    ax.axhline(0.25, color='gray', ls='--', lw=0.8, label='chance')
    ax.set(title='HellaSwag (validation examples scored at evals)', xlabel='iteration', ylabel='accuracy')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == '__main__':
    config = configure({'out_dir': out_dir, 'plot_dir': plot_dir}, sys.argv[1:])
    out_dir, plot_dir = config['out_dir'], config['plot_dir'] or config['out_dir']
    log_path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.exists(log_path):
        fail(f"{log_path} not found: tools/plot.py reads the log.jsonl that train.py writes into out_dir")
    try:
        records = read_log(log_path)  # a torn line: one warning, skipped
    except CheckpointError as e:
        fail(str(e))
    steps = [r for r in records if 'loss' in r and 'event' not in r]
    evals = [r for r in records if 'val/ce' in r]
    if not steps and not evals:
        fail(f"{log_path} holds no training step or eval yet (only {len(records)} event record(s)): nothing "
             f"to plot")
    layers = moe_layers(steps)
    written = [os.path.join(plot_dir, 'loss.png')]
    try:
        os.makedirs(plot_dir, exist_ok=True)
        plot_losses(steps, evals, written[0])
        if layers:
            written.append(os.path.join(plot_dir, 'load.png'))
            plot_load(steps, layers, written[-1])
            written.append(os.path.join(plot_dir, 'probe.png'))
            plot_probe(evals, layers, written[-1])
        if any('hellaswag/acc_norm' in r for r in evals):
            written.append(os.path.join(plot_dir, 'hellaswag.png'))
            plot_hellaswag(evals, written[-1])
    except OSError as e:  # plot_dir is a file, read-only, the disk is full
        fail(f"cannot write {e.filename or written[-1]} (plot_dir={plot_dir!r}): {e.strerror or e}")
    print('wrote ' + ', '.join(written))
