"""
The one-shot GPU check: everything this repo should show on a GPU, in one command and one markdown report.
$ python data/shakespeare_char/prepare.py            # once, where there is a network (gpu_check downloads nothing;
                                                      # elsewhere bring data/shakespeare_char/*.bin and meta.pkl)
$ python tools/gpu_check.py                                 # ~6 min on one H100/H200 (estimated) -> gpu_check.md
$ python tools/gpu_check.py --quick                         # the same on the CPU with tiny sizes (the test suite runs it)
$ python tools/gpu_check.py --long                          # (d) becomes the project goal run (longer)

  (a) the CUDA tests: tests/test_cuda.py (every backend in bf16 and fp16 against loop, compiled vs eager,
      auto's choice) and tests/test_triton.py (the kernels compiled on the GPU); needs pytest
  (b) one MoE layer at GPT-2 small width (d=768), 16k tokens, per backend: ms, ratio to a dense MLP of the
      same active FLOPs, and GFLOP/s against torch's dense GEMM (the ceiling): 8 experts x 3072 top-2 and
      64 experts x 384 top-8 (bench.py --moe_layer)
  (c) a training step at GPT-2 small width (6 layers, to keep compiling short), MoE (8 experts x 1536,
      top-2) vs its dense twin, eager and compiled, bf16: tokens/s, MFU (active parameters), peak memory;
      and the peak memory with activation checkpointing (bench.py)
  (d) a short shakespeare_char MoE run (train.py) and its val loss; --long: about 10M active parameters to
      val loss < 1.467 (nanoGPT's dense 10.7M model reaches 1.4697)
Each part is a subprocess with its own time limit; the report is rewritten after each part (so a run that is
cut short still leaves one) and starts with a summary against the targets of issue 17.
"""
import os
import re
import sys
import json
import time
import argparse
import platform
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: the parts run there
sys.path.insert(0, ROOT)
from moe_model import auto_expert_impl  # noqa: E402
TARGETS = {'layer': 0.70, 'step': 1.15, 'val': 1.467}  # share of the GEMM ceiling; MoE/dense step; val loss


def sizes(quick, long, out_dir):
    """The commands of each part (lists of arguments to this python); --quick: tiny, on the CPU, in float32."""
    py = [sys.executable]
    if quick:
        dev = ['--device=cpu', '--dtype=float32']
        layer = dev + ['--moe_layer=True', '--n_embd=32', '--layer_tokens=256', '--warmup_iters=1', '--bench_iters=2',
                       '--layer_impls=loop,grouped,batched']
        step = dev + ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--vocab_size=64',
                      '--warmup_iters=1', '--bench_iters=2']
        train = dev + ['config/train_shakespeare_char_moe_cpu.py', '--max_iters=20', '--eval_interval=20', '--eval_iters=5',
                       '--compile=False', '--log_interval=10']
        layer_sizes = [('8 experts x 64, top-2', ['--layer_experts=8', '--top_k=2', '--expert_hidden=64'])]
        compiled = []
    else:
        peak = 989e12 if re.search(r'H100|H200|H800|GH200', torch.cuda.get_device_name()) else 312e12
        dev = ['--device=cuda', '--dtype=bfloat16', f'--peak_flops={peak}']
        layer = dev + ['--moe_layer=True', '--n_embd=768', '--layer_tokens=16384', '--warmup_iters=3', '--bench_iters=20',
                       '--layer_impls=loop,grouped,batched,triton']
        step = dev + ['--n_layer=6', '--n_head=12', '--n_embd=768', '--block_size=1024', '--batch_size=8',
                      '--vocab_size=50304', '--warmup_iters=3', '--bench_iters=10']
        train = ['config/train_shakespeare_char_moe.py', '--device=cuda', '--dtype=bfloat16', '--compile=True']
        train += [] if long else ['--max_iters=300', '--eval_interval=300', '--eval_iters=50', '--lr_decay_iters=300',
                                  '--warmup_iters=30']
        layer_sizes = [('8 experts x 3072, top-2', ['--layer_experts=8', '--top_k=2', '--expert_hidden=3072']),
                       ('64 experts x 384, top-8', ['--layer_experts=64', '--top_k=8', '--expert_hidden=384'])]
        compiled = ['--compare_compile=True']
    moe = ['--n_expert=8', '--top_k=2', f"--expert_hidden={64 if quick else 1536}"]  # top_k * hidden = 4 * n_embd
    # (the Triton tests run interpreted on the CPU, and the test suite has them already)
    tests = ['tests/test_cuda.py'] + ([] if quick else ['tests/test_triton.py'])
    parts = [('a', 'CUDA tests', py + ['-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider'] + tests, 600)]
    parts += [('b', f'One MoE layer: {name}', py + ['bench.py'] + layer + extra, 300) for name, extra in layer_sizes]
    parts += [('c', 'Training step, MoE vs dense twin', py + ['bench.py'] + step + moe + ['--compare_dense=True'] + compiled, 600)]
    parts += [('c', f'Training step peak memory, eager, activation_checkpointing={m}',
               py + ['bench.py'] + step + moe + ['--compare_dense=True', f'--activation_checkpointing={m}', '--bench_iters=2'], 300)
              for m in (('all',) if quick else ('none', 'moe', 'all'))]
    parts += [('d', 'shakespeare_char MoE run' + (' (the project goal)' if long else ''),
               py + ['train.py'] + train + [f'--out_dir={out_dir}'], 3600 if long else 600)]
    return parts


def run(cmd, timeout):
    """(exit code, stdout + stderr, seconds); a command past its time limit is killed (exit code 124)."""
    t0 = time.time()
    # the tests check correctness: one Triton configuration each, not minutes of autotuning
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **({'NANOMOE_TRITON_AUTOTUNE': '0'} if 'pytest' in cmd else {})}
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code, out = 124, (e.stdout or b'').decode(errors='replace') + (e.stderr or b'').decode(errors='replace')
    return code, out, time.time() - t0


def summarize(results, out_dir, quick):
    """The numbers the targets are about, read off the parts' outputs (the targets are for the GPU run)."""
    lines = []
    for part, title, code, out, _ in results:
        if code != 0:
            lines.append(f"- ({part}) {title}: **FAILED** (exit code {code})")
        elif part == 'a':
            lines.append(f"- (a) {title}: {(out.strip().splitlines() or [''])[-1].strip('= ')}")
        elif part == 'b':
            rows = [l.split() for l in out.splitlines() if re.match(r'\s*\d+\s+\w+\s+[\d.]+\s+[\d.]+', l)]
            for r in rows:
                mark = ' (target met)' if r[1] == 'grouped' and float(r[6]) >= 100 * TARGETS['layer'] and not quick else ''
                lines.append(f"- (b) {title}, `{r[1]}`: {r[2]} ms, {float(r[3]):.2f}x the dense MLP, "
                             f"{r[5]} GFLOP/s = {r[6]}% of the dense GEMM{mark}")
        elif part == 'c':
            for l in out.splitlines():
                ratio = re.match(r'model / dense twin.*?: ([\d.]+)x', l)
                mark = ' (target met)' if ratio and float(ratio.group(1)) <= TARGETS['step'] and not quick else ''
                if 'ms/iter' in l or ' / ' in l and 'x (' in l:
                    lines.append(f"- (c) {l.strip()}{mark}")
        elif part == 'd':
            log = os.path.join(out_dir, 'log.jsonl')
            val = [r['val/ce'] for r in map(json.loads, open(log)) if 'val/ce' in r] if os.path.exists(log) else []
            if val:
                met = 'no target (--quick)' if quick else 'target met' if val[-1] < TARGETS['val'] else 'target not met'
                lines.append(f"- (d) {title}: val loss {val[-1]:.4f} ({met})")
    return lines


def write_report(path, header, results, out_dir, quick):
    text = header + ['## Summary', ''] + summarize(results, out_dir, quick) + ['']
    for part, title, code, out, seconds in results:
        text += [f'## ({part}) {title}', '', f'exit code {code}, {seconds:.0f} s', '', '```', out.strip()[-20000:], '```', '']
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(text))
    os.replace(tmp, path)  # a reader never sees half a report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--quick', action='store_true', help='tiny sizes on the CPU (what the test suite runs)')
    parser.add_argument('--long', action='store_true', help='(d) trains to the project goal')
    parser.add_argument('--out', default='gpu_check.md', help='the markdown report')
    parser.add_argument('--parts', default='abcd', help='which parts to run, e.g. "bc"')
    parser.add_argument('--out_dir', default=time.strftime('out-gpu-check-%Y%m%d-%H%M%S'), help="(d)'s run: a new folder")
    args = parser.parse_args()
    if not args.quick and not torch.cuda.is_available():
        parser.error('no CUDA GPU here; --quick runs the check on the CPU')
    if set(args.parts) - set('abcd'):
        parser.error(f"--parts={args.parts!r}: allowed letters a, b, c, d")
    if 'd' in args.parts and os.path.exists(args.out_dir):
        parser.error(f"--out_dir={args.out_dir!r} exists: (d) trains from scratch into a new folder")
    if 'd' in args.parts and not os.path.exists(os.path.join(ROOT, 'data', 'shakespeare_char', 'val.bin')):
        parser.error('data/shakespeare_char is not prepared: python data/shakespeare_char/prepare.py (or --parts=abc)')
    device = 'CPU (--quick)' if args.quick else (
        f"{torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))}; expert_impl='auto' "
        f"picks {auto_expert_impl('cuda', 'bfloat16', 1536)[0]!r} in bf16, {auto_expert_impl('cuda', 'float16', 1536)[0]!r} in fp16)")
    header = ['# nanoMoE GPU check', '',
              f"{device}; torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}; `{' '.join(['python tools/gpu_check.py'] + sys.argv[1:])}`", '',
              f"Targets (issue 17): MoE layer `grouped` >= {TARGETS['layer']:.0%} of the dense GEMM's FLOP/s; "
              f"MoE step <= {TARGETS['step']}x its dense twin; shakespeare_char MoE val loss < {TARGETS['val']}.", '']
    out_dir = os.path.abspath(args.out_dir)
    parts = sizes(args.quick, args.long, out_dir)
    results, t0 = [], time.time()
    for part, title, cmd, timeout in parts:
        if part not in args.parts:
            continue
        print(f"({part}) {title}: {' '.join(cmd[1:])}", flush=True)
        code, out, seconds = run(cmd, timeout)
        print(f"    exit code {code}, {seconds:.0f} s", flush=True)
        results.append((part, title, code, out, seconds))
        write_report(args.out, header, results, out_dir, args.quick)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    sys.exit(1 if any(code != 0 for _, _, code, _, _ in results) else 0)


if __name__ == '__main__':
    main()
