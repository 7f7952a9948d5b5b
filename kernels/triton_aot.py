"""
The Triton kernels of moe_triton.py compiled ahead of time for the GPUs users have, on any machine: no GPU
is needed, triton.compile(ASTSource(...), target=GPUTarget('cuda', cc, 32)) runs Triton's compiler and
ptxas for that GPU, and the result says how much shared memory a block needs. A configuration the
autotuner may launch must compile and fit the GPU's shared memory per block; SUPPORTED lists the (GPU,
dtype) pairs where every one does (moe_triton.SUPPORTED), and moe_model.auto_expert_impl picks 'triton'
only there.

$ python kernels/triton_aot.py              # the check: the configurations that need the most shared memory
$ python kernels/triton_aot.py --all        # every configuration the autotuner can launch (slow: ~1 s each)

The default check compiles each kernel's tile sizes at the largest block size (BLOCK=128) and the most
pipeline stages, with 4 warps: smaller blocks, fewer stages and more warps need no more shared memory
(`--all` shows it). It prints one row per compile and exits 1 if SUPPORTED disagrees with the compiles.
tests/test_triton.py runs it for the required targets. Run it without TRITON_INTERPRET=1.
"""
import os
import sys
import argparse
import itertools
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import moe_triton  # noqa: E402

# shared memory per block (the opt-in maximum), in KiB, of each compute capability, and a GPU that has it
GPUS = {70: (96, 'V100'), 75: (64, 'T4'), 80: (164, 'A100'), 86: (100, 'A10, RTX 30xx'), 89: (100, 'L4, RTX 40xx'),
        90: (228, 'H100, H200')}
DTYPES = {'float16': 'fp16', 'bfloat16': 'bf16', 'float32': 'fp32'}
SUPPORTED, NOT_FAST = moe_triton.SUPPORTED, moe_triton.NOT_FAST
REQUIRED = [(70, 'float16'), (80, 'bfloat16'), (80, 'float16'), (80, 'float32'), (90, 'bfloat16'), (90, 'float16')]
INT_POINTERS = {'row_idx_ptr', 'col_idx_ptr', 'offsets_ptr', 'offsets_t_ptr', 'block_offsets_t_ptr'}


def configurations(everything=False):
    """(kernel name, constexprs, num_warps, num_stages) the autotuner may launch (everything=True) or the
    ones that bound their shared memory (the largest BLOCK and num_stages, 4 warps)."""
    blocks = moe_triton._BLOCK_CHOICES if everything else (max(moe_triton._BLOCK_CHOICES),)
    warps = moe_triton.WARPS if everything else (min(moe_triton.WARPS),)
    stages = moe_triton.STAGES if everything else (max(moe_triton.STAGES),)
    for name, tiles in moe_triton.TILES.items():
        for tile, block, w, s in itertools.product(tiles[1:], blocks, warps, stages):
            if name != 'sdd' and tile['BLOCK_K'] > block:  # pruned at launch (_prune_block_k)
                continue
            yield name, {'BLOCK': block, **tile}, w, s


def compile_one(cc, dtype, name, constexprs, num_warps, num_stages):
    """Shared memory in bytes of one compiled configuration, or the compiler's error (a string)."""
    fn = getattr(moe_triton, f'_{name}_kernel').fn  # the jitted function under the autotuner
    constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
    signature = {a: 'constexpr' if a in constexpr_names else '*i32' if a in INT_POINTERS else
                 f'*{DTYPES[dtype]}' if a.endswith('_ptr') else 'i32' for a in fn.arg_names}
    constexprs = {**constexprs, 'PRECISION': 'tf32' if dtype == 'float32' else 'ieee'}
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget('cuda', cc, 32),
                                options={'num_warps': num_warps, 'num_stages': num_stages})
        return kernel.metadata.shared
    except Exception as e:  # what does not compile for this GPU
        return f'{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}' if str(e).strip() else type(e).__name__


def check(pairs, everything=False, workers=2):
    """{(cc, dtype): [(name, constexprs, warps, stages, shared bytes or error, fits)]}, compiled in parallel."""
    jobs = [(cc, dtype, *c) for cc, dtype in pairs for c in configurations(everything)]
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(compile_one, *zip(*jobs)))
    table = {pair: [] for pair in pairs}
    for (cc, dtype, name, constexprs, w, s), shared in zip(jobs, results):
        fits = isinstance(shared, int) and shared <= GPUS[cc][0] * 1024
        table[cc, dtype].append((name, constexprs, w, s, shared, fits))
    return table


def main():
    parser = argparse.ArgumentParser(description='Compile the Triton MoE kernels for each GPU, without one.')
    parser.add_argument('--all', action='store_true', help='every configuration the autotuner can launch')
    parser.add_argument('--targets', default='required', help="'required' (the tests'), 'all', or e.g. '80:bfloat16,90:float16'")
    parser.add_argument('--workers', type=int, default=2)
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
            parser.error(f"--targets={args.targets!r}: want cc:dtype pairs, cc in {sorted(GPUS)}, dtype in {list(DTYPES)}")
    if os.environ.get('TRITON_INTERPRET') == '1':
        parser.error('TRITON_INTERPRET=1: the interpreter\'s kernels cannot be compiled; unset it')
    disagree = []
    for (cc, dtype), rows in check(pairs, args.all, args.workers).items():
        ok = all(fits for *_, fits in rows)
        verdict = 'every configuration fits' if ok else 'EXCLUDED: not every configuration compiles and fits'
        print(f"sm{cc} ({GPUS[cc][1]}, {GPUS[cc][0]} KiB per block) {dtype}: {verdict}"
              + (' (not used: no tensor cores for it)' if (cc, dtype) in NOT_FAST else ''))
        for name, constexprs, w, s, shared, fits in rows:
            size = f'{shared / 1024:.0f} KiB' if isinstance(shared, int) else shared
            print(f"    {name} {constexprs} warps={w} stages={s}: {size}{'' if fits else '  <- does not fit'}")
        if ok != ((cc, dtype) in SUPPORTED) and (cc, dtype) not in NOT_FAST:
            disagree.append(f"sm{cc} {dtype}: SUPPORTED says {not ok}, the compiles say {ok}")
    for line in disagree:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(1 if disagree else 0)


if __name__ == '__main__':
    main()
