"""
The Triton kernels of moe_triton.py compiled ahead of time for the GPUs users have, on any machine (no GPU
needed): triton.compile(ASTSource(...), target=GPUTarget('cuda', cc, 32)) runs Triton's compiler and ptxas
for that GPU, and metadata.shared says how much shared memory a block of the kernel needs. Where every
configuration the autotuner can launch compiles and fits the GPU's shared memory per block, the (GPU,
dtype) pair belongs in moe_triton.SUPPORTED, the static table moe_kernels.auto_expert_impl reads (it compiles
nothing); check() is what the tests compare that table with.

The kernels are compiled as the launchers call them. Triton specialises a kernel on its arguments, not
only its constexprs: a pointer or an integer divisible by 16 is marked so, and an integer equal to 1
becomes a constant. Knowing the unit strides and the alignment, it turns 16-bit loads into cp.async copies
on sm80+ and pipelines them over num_stages buffers: sdd at BLOCK=128, BLOCK_K=64 and 4 stages needs
96 KiB on sm80 and 128 KiB on sm90, not the 32 KiB of the same kernel compiled without that knowledge. So
launches() runs the experts' forward and backward on the CPU with the kernel launches recorded instead of
run (model width and hidden size multiples of 16: the most specialised case, which pipelines the most).

$ python moe_kernels/triton_aot.py                        # what the tests compile (~20 s on 2 cores)
$ python moe_kernels/triton_aot.py --all --targets=all    # every launch and configuration, everywhere (~1 h)

One row per compile (target, dtype, kernel, the strides that are 1, configuration, shared bytes, verdict),
then one verdict per target and dtype; exit code 1 if moe_triton.SUPPORTED disagrees with the compiles.
A compile takes ~0.5 s for sm80-sm90 and 0.5-15 s for sm70/sm75 (ptxas), and the autotuner can launch 196
(launch, configuration) pairs per target in a 16-bit dtype. So the default compiles, per kernel, the one
configuration whose dot operands take the most room in all pipeline stages (BLOCK=128, the largest tiles,
4 stages; 8 warps, which compile fastest) in the forward's launch. `--all` compiles everything and says
whether those bound the rest. They did everywhere: num_warps never mattered, nor did the backward's
launches but for sm70's tsd (up to the same maximum); smaller BLOCKs and fewer stages need less;
everything compiled; a width of 72 (strides not multiples of 16) needs less (RESULTS.md section 11).
Rerun it after changing the kernels, TILES/WARPS/STAGES or Triton.

Only fp32 has configurations that do not fit (sdd at BLOCK=128, BLOCK_K=64, 4 stages: 192 KiB on sm80,
256 on sm90; 32 of 392 on sm86's 99 KiB). A GPU's autotuner skips those (OutOfResources while it
benchmarks), so expert_impl='triton' still runs in fp32 there; but a single configuration is launched
untried (NANOMOE_TRITON_AUTOTUNE=0; dsd/tsd at BLOCK=16), and the winner is cached per size, not per
launch. So a pair counts only if everything fits, and auto leaves fp32 to 'grouped' rather than prune
configurations per GPU (a device-aware early_config_prune would be the way to enable it).

Compiles run in fresh processes: under TRITON_INTERPRET=1 (the CPU tests) Triton patches triton.language
for the interpreter, and a compile in that process fails.
"""
import os
import sys
import time
import argparse
import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402  (how the JIT specialises an argument)

from moe_kernels import moe_triton  # noqa: E402

# shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin, what Triton checks a launch
# against; from sm80 on 1 KiB less than the SM has: 163 KiB on an A100's 164), in KiB, and GPUs with it
GPUS = {70: (96, 'V100'), 75: (64, 'T4'), 80: (163, 'A100'), 86: (99, 'A10, RTX 30xx'),
        89: (99, 'L4, RTX 40xx'), 90: (227, 'H100, H200')}
DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float32': torch.float32}
KERNELS = {'sdd': moe_triton._sdd_kernel, 'dsd': moe_triton._dsd_kernel, 'tsd': moe_triton._tsd_kernel}
# what the tests compile: every pair moe_triton.SUPPORTED lists, and fp32 on an A100, which does not fit
REQUIRED = [(70, 'float16'), (75, 'float16'), *((cc, d) for cc in (80, 86, 89, 90)
                                                for d in ('bfloat16', 'float16')),
            (80, 'float32')]


def _jit(name):
    # the kernel as a JITFunction even where moe_triton was imported under TRITON_INTERPRET=1
    return JITFunction(KERNELS[name].fn.fn)


def _specialise(jit, args, kwargs):
    """(signature, constexprs, attrs) of one launch, as Triton's JIT makes them (JITFunction._pack_args)."""
    bound = {**dict(zip(jit.arg_names, args)), **kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(jit.params):
        if p.is_constexpr:
            signature[p.name] = 'constexpr'
            if p.name in bound:  # the tile sizes come from the configuration
                constexprs[p.name] = bound[p.name]
            continue
        ty, spec = native_specialize_impl(BaseBackend, bound[p.name], p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == 'constexpr':  # an integer equal to 1
            constexprs[p.name] = spec
        else:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


@lru_cache
def launches(dtype, n_embd=64, hidden=256):
    """The distinct kernel launches of one forward and backward of the block-sparse experts in this dtype
    at each block size: [(kernel name, signature, constexprs, attrs)], recorded on the CPU, not run. fp32
    records both PRECISIONs (torch's TF32 setting picks one at run time: moe_triton.tf32_allowed)."""
    seen = {}

    def recorder(name):
        jit = _jit(name)

        def run(*args, grid, warmup, **kwargs):
            launch = (name, *_specialise(jit, args, kwargs))
            seen.setdefault(repr(launch), launch)
        return run

    old_block, old_tf32 = moe_triton.BLOCK_SIZE, moe_triton.tf32_allowed
    try:
        for name, kernel in KERNELS.items():
            kernel.run = recorder(name)  # the launchers call kernel[grid](...), which calls kernel.run
        for block, tf32 in itertools.product(moe_triton._BLOCK_CHOICES, (True, False) if dtype == 'float32'
                                             else (True,)):
            # torch's flags untouched
            moe_triton.BLOCK_SIZE, moe_triton.tf32_allowed = block, lambda tf32=tf32: tf32
            g = torch.Generator().manual_seed(0)
            make = lambda *shape: torch.randn(*shape, generator=g, dtype=DTYPES[dtype], requires_grad=True)
            x, c_fc, c_proj = make(64, n_embd), make(2, n_embd, hidden), make(2, hidden, n_embd)
            topk_idx = torch.randint(0, 2, (64, 1), generator=g)
            y = moe_triton.block_sparse_experts(x, topk_idx, torch.ones(64, 1), c_fc, c_proj)
            y.float().sum().backward()  # the outputs are uninitialised memory: only the launches matter
    finally:
        moe_triton.BLOCK_SIZE, moe_triton.tf32_allowed = old_block, old_tf32
        for kernel in KERNELS.values():
            del kernel.run  # the Autotuner's own run again
    return list(seen.values())


def configurations(name, block):
    """The configurations the autotuner runs on a GPU for this kernel at this BLOCK (after its pruning)."""
    configs = moe_triton._configs(moe_triton.TILES[name], interpreted=False)
    prune = KERNELS[name].early_config_prune
    return prune(configs, {'BLOCK': block}) if prune else configs


def footprint(constexprs, config):
    """(elements of the dot operands' tiles in all pipeline stages, warps): the largest needs the most shared
    memory (--all checks it), and among equals the most warps compile the fastest."""
    block, tile = constexprs['BLOCK'], config.kwargs
    return config.num_stages * tile['BLOCK_K'] * (block + tile.get('BLOCK_N', block)), config.num_warps


def jobs(dtype, everything=False):
    """[(name, signature, constexprs, attrs, config)] to compile for one dtype: every launch in every
    configuration (everything=True), or per kernel the one with the largest footprint (the first such
    launch: the forward's)."""
    out = [(name, sig, cx, attrs, c) for name, sig, cx, attrs in launches(dtype)
           for c in configurations(name, cx['BLOCK'])]
    if not everything:
        out = [max((j for j in out if j[0] == name), key=lambda j: footprint(j[2], j[4])) for name in KERNELS]
    return out


def compile_one(cc, name, signature, constexprs, attrs, tiles, options):
    """Shared memory in bytes of one launch compiled for sm{cc} in one configuration, or the error (a
    string)."""
    src = ASTSource(_jit(name), signature, constexprs={**constexprs, **tiles}, attrs=attrs)
    try:
        return triton.compile(src, target=GPUTarget('cuda', cc, 32), options=options).metadata.shared
    except Exception as e:  # what does not compile for this GPU
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:100]}"


@contextmanager
def _compiler_environment():
    # the workers start with the compiler's environment: no TRITON_INTERPRET
    saved = os.environ.pop('TRITON_INTERPRET', None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ['TRITON_INTERPRET'] = saved


def check(pairs, everything=False, workers=2, verbose=False):
    """Compile for each (compute capability, dtype) pair: {pair: [(name, unit strides, constexprs, config,
    shared bytes or the compiler's error, fits)]}. The slow targets go first, to keep both workers busy."""
    todo = sorted(((cc, dtype, *job) for cc, dtype in pairs for job in jobs(dtype, everything)),
                  key=lambda j: j[0])
    args = [(cc, name, sig, cx, attrs, c.kwargs, {k: v for k, v in c.all_kwargs().items()
                                                  if k not in c.kwargs})
            for cc, dtype, name, sig, cx, attrs, c in todo]
    table = {pair: [] for pair in pairs}
    with _compiler_environment(), \
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as pool:
        t0 = time.time()
        for (cc, dtype, name, sig, cx, attrs, c), shared in zip(todo, pool.map(compile_one, *zip(*args))):
            fits = isinstance(shared, int) and shared <= GPUS[cc][0] * 1024
            table[cc, dtype].append((name, unit_strides(sig), cx, c, shared, fits))
            if verbose:
                print(f'{time.time() - t0:5.0f} s  ' + row(cc, dtype, *table[cc, dtype][-1]), flush=True)
    return table


def unit_strides(signature):
    return ','.join(a for a, ty in signature.items() if ty == 'constexpr' and a.startswith('stride')) or '-'


def describe(constexprs, config):
    return ' '.join(f'{k}={v}' for k, v in {**constexprs, **config.kwargs}.items()
                    if not k.startswith('stride')) + \
        f' warps={config.num_warps} stages={config.num_stages}'


def row(cc, dtype, name, units, constexprs, config, shared, fits):
    verdict = 'fits' if fits else 'DOES NOT FIT' if isinstance(shared, int) else 'DOES NOT COMPILE'
    return (f'sm{cc} {dtype:8s} {name} 1:{units:21s} {describe(constexprs, config):62s} '
            f'{shared if isinstance(shared, int) else "-":>6} '
            f'{verdict}{"" if isinstance(shared, int) else ": " + shared}')


def verdicts(table):
    """{pair: True if every configuration compiled and fits}, and the pairs where moe_triton.SUPPORTED says
    otherwise (pairs in moe_triton.NOT_FAST are never used, so never disagree)."""
    ok = {pair: all(r[-1] for r in rows) for pair, rows in table.items()}
    return ok, [p for p in ok if p not in moe_triton.NOT_FAST and ok[p] != (p in moe_triton.SUPPORTED)]


def main():
    parser = argparse.ArgumentParser(description='Compile the Triton MoE kernels for each GPU, without one.')
    parser.add_argument('--all', action='store_true',
                        help='every launch and configuration the autotuner can run')
    parser.add_argument('--targets', default='required',
                        help="'required' (the tests'), 'all', or pairs like '80:bfloat16,90:float16'")
    parser.add_argument('--workers', type=int, default=2, help='compiler processes')
    args = parser.parse_args()
    if args.targets == 'required':
        pairs = REQUIRED
    elif args.targets == 'all':
        pairs = [(cc, d) for cc in GPUS for d in DTYPES]
    else:
        try:
            pairs = [(int(cc), d) for cc, d in (t.split(':') for t in args.targets.split(','))]
            assert all(cc in GPUS and d in DTYPES for cc, d in pairs)
        except (ValueError, AssertionError):
            parser.error(f'--targets={args.targets!r}: cc:dtype pairs, cc in {sorted(GPUS)}, '
                         f'dtype in {list(DTYPES)}')
    table = check(pairs, args.all, args.workers, verbose=True)
    ok, disagree = verdicts(table)
    for (cc, dtype), rows in table.items():
        biggest = max((r for r in rows if isinstance(r[4], int)), key=lambda r: r[4], default=None)
        if args.all and biggest:  # do the tests' configurations need the most shared memory? (they should)
            tested = {(n, unit_strides(sig), cx['BLOCK'], str(c)) for n, sig, cx, _, c in jobs(dtype)}
            most = max((r[4] for r in rows if isinstance(r[4], int)
                        and (r[0], r[1], r[2]['BLOCK'], str(r[3])) in tested),
                       default=0)
            print(f'sm{cc} {dtype}: the configurations the tests compile need {most} bytes, '
                  f'all of them at most {biggest[4]}: '
                  f'{"they bound the rest" if most >= biggest[4] else "THEY DO NOT BOUND THE REST"}')
        print(f'sm{cc} ({GPUS[cc][1]}: {GPUS[cc][0]} KiB a block) {dtype}: '
              + ('every configuration compiles and fits' if ok[cc, dtype]
                 else 'EXCLUDED: not every configuration compiles and fits')
              + (f'; the most shared memory: {biggest[4] // 1024} KiB '
                 f'({biggest[0]} {describe(biggest[2], biggest[3])})' if biggest else '')
              + (' (not used: no tensor cores for it)' if (cc, dtype) in moe_triton.NOT_FAST else ''))
    for cc, dtype in disagree:
        print(f'error: moe_triton.SUPPORTED says sm{cc} {dtype} '
              f'{"does not fit" if ok[cc, dtype] else "fits"}, '
              f'the compiles say it {"does" if ok[cc, dtype] else "does not"}', file=sys.stderr)
    sys.exit(1 if disagree else 0)


if __name__ == '__main__':
    main()
