"""
The one-shot GPU check: everything this repo should show on a GPU, in one command and one markdown report,
made for a GPU machine with no network, where only the working tree travels (not ../shared, not the
git-ignored data), one command may run 10 minutes and only one folder comes back ($OUT below).
$ python3 data/shakespeare_char/prepare.py            # first, where the data is: carry the three files
                                                      # it writes,
                                                      # data/shakespeare_char/{train.bin,val.bin,meta.pkl}
$ python3 tools/gpu_check.py --out=$OUT               # then on the GPU: the report is $OUT/gpu_check.md,
                                                      # and the whole check ends inside --budget=540 seconds
                                                      # (start-up included)
$ python3 tools/gpu_check.py --quick                  # the same on the CPU with tiny sizes (the test
                                                      # suite runs it)
$ python3 tools/gpu_check.py --long --budget=4800     # (d) becomes the project goal run (longer)

  (a) the CUDA tests: tests/test_cuda.py (every backend in bf16 and fp16 against loop, compiled vs eager, an
      empty expert's gradients, auto's choice) and tests/test_triton.py (the kernels compiled on the GPU);
      needs pytest, and gives each test a time limit where pytest-timeout is installed
  (b) one MoE layer at GPT-2 small width (d=768), 16k tokens, per backend: ms, ratio to a dense MLP of the
      same active FLOPs, and GFLOP/s against torch's dense GEMM (the ceiling): 8 experts x 3072 top-2 and
      64 experts x 384 top-8 (bench.py --moe_layer)
  (d) a short shakespeare_char MoE run (train.py) and its val loss; --long: about 10M active parameters to
      val loss < 1.467 (nanoGPT's dense 10.7M model reaches 1.4697). Without the three files: one line that
      names them, and the other parts still run
  (c) a training step at GPT-2 small width (6 layers, to keep compiling short), MoE (8 experts x 1536,
      top-2) vs its dense twin, eager and compiled, bf16: tokens/s, MFU (active parameters), peak memory;
      and the peak memory with activation checkpointing (bench.py)
(a)-(c) run on random tokens. The parts run in this order, (c)'s compiles last as the likeliest to run out of
time. Each is a subprocess with its share of the budget (WEIGHTS; what a part leaves unused goes to those
after it); one that outlives its share is killed, with every process it started, and marked cut short. The
report is rewritten after each part (a run that is cut short still leaves one) and starts with a summary
against the targets of issue 17.
"""
import time
T0 = time.time()  # the budget counts from here, the imports below included

import os
import re
import sys
import json
import signal
import argparse
import platform
import tempfile
import subprocess
import importlib.util

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: the parts run there
sys.path.insert(0, ROOT)
from configurator import fail  # noqa: E402
from moe_kernels import auto_expert_impl  # noqa: E402
from model import peak_flops  # noqa: E402
TARGETS = {'layer': 0.70, 'step': 1.15, 'val': 1.467}  # share of the GEMM ceiling; MoE/dense step; val loss
DATA = ('train.bin', 'val.bin', 'meta.pkl')  # data/shakespeare_char/, for (d)
# each command's share of the budget, in proportion (estimates for an H100: (a) compiles two models and many
# kernels, (b) autotunes the Triton kernels, (c)'s first command compiles two models)
WEIGHTS = {'a': 3.0, 'b': 1.0, 'd': 2.0, 'c': 2.5, 'c memory': 0.5}
RESERVE = 5  # seconds kept back at the end of the budget: to kill a part and write the last report
MIN_SHARE = 3  # a part is not started with fewer seconds than this
TEST_TIMEOUT = {False: 120, True: 60}  # per test, with pytest-timeout (GPU: a cold compile; --quick)
# tests only: NANOMOE_GPU_CHECK_FAULT='b=fail' gives part b's commands an unknown option, 'a=hang' makes
# part a a process that starts another and never ends (comma-separated for several)
FAULT = dict(f.split('=') for f in os.environ.get('NANOMOE_GPU_CHECK_FAULT', '').split(',') if f)


def parts(quick, long, out_dir):
    """[(part, title, command, weight)] in the order they run; --quick: tiny, on the CPU, in float32."""
    py = [sys.executable]
    if quick:
        dev = ['--device=cpu', '--dtype=float32']
        layer = dev + ['--moe_layer=True', '--n_embd=32', '--layer_tokens=256', '--warmup_iters=1',
                       '--bench_iters=2', '--layer_impls=loop,grouped,batched']
        step = dev + ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
                      '--vocab_size=64', '--warmup_iters=1', '--bench_iters=2']
        train = dev + ['config/train_shakespeare_char_moe_cpu.py', '--max_iters=20', '--eval_interval=20',
                       '--eval_iters=5', '--compile=False', '--log_interval=10']
        layer_sizes = [('8 experts x 64, top-2', ['--layer_experts=8', '--top_k=2', '--expert_hidden=64'])]
        compiled = []
    else:
        dev = ['--device=cuda', '--dtype=bfloat16',
               f'--peak_flops={peak_flops(torch.cuda.get_device_name())}']
        layer = dev + ['--moe_layer=True', '--n_embd=768', '--layer_tokens=16384', '--warmup_iters=3',
                       '--bench_iters=20', '--layer_impls=loop,grouped,batched,triton']
        step = dev + ['--n_layer=6', '--n_head=12', '--n_embd=768', '--block_size=1024', '--batch_size=8',
                      '--vocab_size=50304', '--warmup_iters=3', '--bench_iters=10']
        train = ['config/train_shakespeare_char_moe.py', '--device=cuda', '--dtype=bfloat16',
                 '--compile=True']
        train += [] if long else ['--max_iters=300', '--eval_interval=300', '--eval_iters=50',
                                  '--lr_decay_iters=300', '--warmup_iters=30']
        layer_sizes = [('8 experts x 3072, top-2', ['--layer_experts=8', '--top_k=2',
                                                    '--expert_hidden=3072']),
                       ('64 experts x 384, top-8', ['--layer_experts=64', '--top_k=8',
                                                    '--expert_hidden=384'])]
        compiled = ['--compare_compile=True']
    # top_k * hidden = 4 * n_embd
    moe = ['--n_expert=8', '--top_k=2', f"--expert_hidden={64 if quick else 1536}"]
    # (the Triton tests run interpreted on the CPU, and the test suite has them already)
    tests = ['tests/test_cuda.py'] + ([] if quick else ['tests/test_triton.py'])
    timeout = [f'--timeout={TEST_TIMEOUT[quick]}'] if importlib.util.find_spec('pytest_timeout') else []
    todo = [('a', 'CUDA tests', py + ['-m', 'pytest', '-q', '-rs', '-p',
                                      'no:cacheprovider'] + timeout + tests, WEIGHTS['a'])]
    todo += [('b', f'One MoE layer: {name}', py + ['bench.py'] + layer + extra, WEIGHTS['b'])
             for name, extra in layer_sizes]
    todo += [('d', 'shakespeare_char MoE run' + (' (the project goal)' if long else ''),
              py + ['train.py'] + train + [f'--out_dir={out_dir}'], WEIGHTS['d'] * (20 if long else 1))]
    todo += [('c', 'Training step, MoE vs dense twin',
              py + ['bench.py'] + step + moe + ['--compare_dense=True'] + compiled, WEIGHTS['c'])]
    todo += [('c', f'Training step peak memory, eager, activation_checkpointing={m}',
              py + ['bench.py'] + step + moe + ['--compare_dense=True', f'--activation_checkpointing={m}',
                                                '--bench_iters=2'],
              WEIGHTS['c memory']) for m in (('all',) if quick else ('none', 'moe', 'all'))]
    for i, (part, title, cmd, weight) in enumerate(todo):  # the faults the tests inject
        if FAULT.get(part) == 'fail':
            todo[i] = (part, title, cmd + ['--no_such_key=1'], weight)
        elif FAULT.get(part) == 'hang':
            todo[i] = (part, title, py + ['-c', "import subprocess, sys; "
                                          "p = subprocess.Popen([sys.executable, '-c', "
                                          "'import time; time.sleep(3600)']); print('started', p.pid, "
                                          "flush=True); p.wait()"], weight)
    return todo


def run(cmd, seconds):
    """(exit code, stdout + stderr, seconds, cut short?): cmd in a process group of its own, killed with every
    process it started (Inductor's compile workers, ...) once it has run `seconds`, or when this one stops."""
    t0 = time.time()
    # the tests check correctness: one Triton configuration each, not minutes of autotuning
    env = {**os.environ, 'PYTHONUNBUFFERED': '1',
           **({'NANOMOE_TRITON_AUTOTUNE': '0'} if 'pytest' in cmd else {})}
    # a file, not a pipe: what a killed part printed stays
    with tempfile.TemporaryFile('w+', errors='replace') as log:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
        cut = False
        try:
            p.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            cut = True
        # done, past its share, or this check stopped (Ctrl-C, SIGTERM): no process of the part lives on
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:  # (none left)
                pass
            p.wait()
        log.seek(0)
        return p.returncode, log.read(), time.time() - t0, cut


def summarize(results, out_dir, quick):
    """The numbers the targets are about, read off the parts' outputs (the targets are for the GPU run)."""
    lines = []
    for r in results:
        part, title, out = r['part'], r['title'], r.get('out', '')
        if r['status'] == 'not run':
            lines.append(f"- ({part}) {title}: **NOT RUN**: {r['why']}")
            continue
        if r['status'] == 'cut short':
            lines.append(f"- ({part}) {title}: **CUT SHORT** after {r['seconds']:.0f} s, "
                         "its share of the budget")
        elif r['code'] != 0:
            last = (out.strip().splitlines() or [''])[-1].strip()
            lines.append(f"- ({part}) {title}: **FAILED** (exit code {r['code']}): {last[:300]}")
            continue
        if part == 'a':
            lines.append(f"- (a) {title}: {(out.strip().splitlines() or [''])[-1].strip('= ')}")
        elif part == 'b':
            rows = [l.split() for l in out.splitlines() if re.match(r'\s*\d+\s+\w+\s+[\d.]+\s+[\d.]+', l)]
            for row in rows:
                mark = (' (target met)' if row[1] == 'grouped' and float(row[6]) >= 100 * TARGETS['layer']
                        and not quick else '')
                lines.append(f"- (b) {title}, `{row[1]}`: {row[2]} ms, {float(row[3]):.2f}x the dense MLP, "
                             f"{row[5]} GFLOP/s = {row[6]}% of the dense GEMM{mark}")
        elif part == 'c':
            for l in out.splitlines():
                ratio = re.match(r'model / dense twin.*?: ([\d.]+)x', l)
                mark = (' (target met)' if ratio and float(ratio.group(1)) <= TARGETS['step'] and not quick
                        else '')
                if 'ms/iter' in l or ' / ' in l and 'x (' in l:
                    lines.append(f"- (c) {l.strip()}{mark}")
        elif part == 'd':
            log = os.path.join(out_dir, 'log.jsonl')
            val = [r['val/ce'] for r in map(json.loads, open(log))
                   if 'val/ce' in r] if os.path.exists(log) else []
            if val:
                met = ('no target (--quick)' if quick else
                       'target met' if val[-1] < TARGETS['val'] else 'target not met')
                lines.append(f"- (d) {title}: val loss {val[-1]:.4f} ({met})")
    return lines


def write_report(path, header, results, pending, out_dir, quick):
    text = header + ['## Summary', ''] + summarize(results, out_dir, quick)
    text += [f"- ({part}) {title}: pending" for part, title in pending] + ['']
    for r in results:
        status = (f"not run: {r['why']}" if r['status'] == 'not run' else
                  f"cut short after {r['seconds']:.0f} s (its share of the budget), killed"
                  if r['status'] == 'cut short' else
                  f"exit code {r['code']}, {r['seconds']:.0f} s")
        text += [f"## ({r['part']}) {r['title']}", '', status, '']
        if r['status'] != 'not run':
            text += [f"`{' '.join(r['cmd'][1:])}`", '', '```', r['out'].strip()[-20000:], '```', '']
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(text))
    os.replace(tmp, path)  # a reader never sees half a report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes on the CPU (what the test suite runs)')
    parser.add_argument('--long', action='store_true',
                        help='(d) trains to the project goal (give a --budget for it)')
    parser.add_argument('--out', default='gpu_check.md',
                        help='the report: a file, or a folder to write gpu_check.md in')
    parser.add_argument('--budget', type=float, default=None,
                        help='seconds the whole check may take, start-up '
                        'included (default 540, with --long 4800); each part gets a share')
    parser.add_argument('--parts', default='abcd', help='which parts to run, e.g. "bc" '
                                                        '(they run in the order a, b, d, c)')
    parser.add_argument('--out_dir', default=time.strftime('out-gpu-check-%Y%m%d-%H%M%S'),
                        help="(d)'s run: a new folder")
    args = parser.parse_args()
    budget = args.budget or (4800 if args.long else 540)
    if not args.quick and not torch.cuda.is_available():
        fail('no CUDA GPU here; --quick runs the check on the CPU')
    if set(args.parts) - set('abcd'):
        fail(f"--parts={args.parts!r}: allowed letters a, b, c, d")
    if 'd' in args.parts and os.path.exists(args.out_dir):
        fail(f"--out_dir={args.out_dir!r} exists: (d) trains from scratch into a new folder")
    report = (os.path.join(args.out, 'gpu_check.md') if os.path.isdir(args.out) or args.out.endswith(os.sep)
              else args.out)
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    # stop as Ctrl-C does: run() kills the part
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    device = 'CPU (--quick)' if args.quick else (
        f"{torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))}; "
        f"expert_impl='auto' picks {auto_expert_impl('cuda', 'bfloat16', 1536)[0]!r} in bf16, "
        f"{auto_expert_impl('cuda', 'float16', 1536)[0]!r} in fp16)")
    header = ['# nanoMoE GPU check', '',
              f"{device}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}; "
              f"`{' '.join(['python3 tools/gpu_check.py'] + sys.argv[1:])}`; budget {budget:.0f} s", '',
              f"Targets (issue 17): MoE layer `grouped` >= {TARGETS['layer']:.0%} of the dense GEMM's "
              f"FLOP/s; MoE step <= {TARGETS['step']}x its dense twin; "
              f"shakespeare_char MoE val loss < {TARGETS['val']}.", '']
    out_dir = os.path.abspath(args.out_dir)
    todo = [t for t in parts(args.quick, args.long, out_dir) if t[0] in args.parts]
    missing = [f for f in DATA if not os.path.exists(os.path.join(ROOT, 'data', 'shakespeare_char', f))]
    why_not = {'d': (f"data/shakespeare_char/{', '.join(missing)} missing: "
                     "run python3 data/shakespeare_char/prepare.py where the data is and bring train.bin, "
                     "val.bin and meta.pkl along") if missing else None,
               'a': None if importlib.util.find_spec('pytest') else 'pytest is not installed'}
    for part, why in why_not.items():
        if why and part in args.parts:
            print(f"({part}) will not run: {why}", flush=True)
    results = []
    write_report(report, header, results, [(p, t) for p, t, _, _ in todo], out_dir, args.quick)
    for i, (part, title, cmd, _) in enumerate(todo):
        left = budget - (time.time() - T0) - RESERVE
        weights = sum(w for p, _, _, w in todo[i:] if not why_not.get(p))  # what the parts still to run share
        seconds = left * todo[i][3] / weights if not why_not.get(part) else 0
        if why_not.get(part) or seconds < MIN_SHARE:
            why = why_not.get(part) or f"the budget ({budget:.0f} s) was spent"
            results.append(dict(part=part, title=title, cmd=cmd, status='not run', why=why))
        else:
            print(f"({part}) {title}, {seconds:.0f} s at most: {' '.join(cmd[1:])}", flush=True)
            try:
                code, out, took, cut = run(cmd, seconds)
            # the part is killed by now; the report says where it stopped
            except (KeyboardInterrupt, SystemExit):
                results.append(dict(part=part, title=title, cmd=cmd, status='not run',
                                    why='the check was stopped here'))
                write_report(report, header, results, [(p, t) for p, t, _, _ in todo[i + 1:]], out_dir,
                             args.quick)
                raise
            status = 'cut short' if cut else 'passed' if code == 0 else 'failed'
            print(f"    {status}: exit code {code}, {took:.0f} s", flush=True)
            results.append(dict(part=part, title=title, cmd=cmd, status=status, code=code, out=out,
                                seconds=took))
        write_report(report, header, results, [(p, t) for p, t, _, _ in todo[i + 1:]], out_dir, args.quick)
    print(f"wrote {report} ({time.time() - T0:.0f} s)")
    sys.exit(0 if all(r['status'] == 'passed' for r in results) else 1)


if __name__ == '__main__':
    main()
