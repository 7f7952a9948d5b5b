"""
Tests for moe_kernels/triton_aot.py: the Triton kernels compiled ahead of time for sm70-sm90 on this machine,
with no GPU, and moe_triton.SUPPORTED (the table expert_impl='auto' reads) checked against those compiles.
"""
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (optional dependency: "
                                              "pip install triton)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_kernels import moe_triton as mt  # noqa: E402
from moe_kernels import triton_aot as aot  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    """aot.check of the required targets, compiled once for the tests below (2 processes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("NANOMOE_TRITON_AUTOTUNE", raising=False)  # the autotuner's full list of configurations
        return aot.check(aot.REQUIRED)


@pytest.mark.parametrize("cc, dtype", aot.REQUIRED)
@pytest.mark.slow
def test_supported_lists_the_gpus_and_dtypes_where_every_configuration_compiles_and_fits(compiled, cc, dtype):
    """Triton compiled each kernel's most shared-memory-hungry configuration for this GPU, as the launchers
    call it; SUPPORTED (auto's table) lists the pair iff all of them compiled and fit the GPU's shared
    memory per block. sm80 float32 is out: sdd's BLOCK_K=64 at 4 stages needs 192 KiB there."""
    rows = compiled[cc, dtype]
    table = "\n".join(aot.row(cc, dtype, *r) for r in rows)
    assert sorted(r[0] for r in rows) == sorted(aot.KERNELS), table
    assert all(isinstance(r[4], int) for r in rows), table  # compiled (a fit or not) for every target
    ok, disagree = aot.verdicts({(cc, dtype): rows})
    assert not disagree, \
        f"moe_triton.SUPPORTED {'lacks' if ok[cc, dtype] else 'lists'} sm{cc} {dtype}:\n{table}"
    if (cc, dtype) == (80, "float32"):
        assert [r[4] for r in rows if not r[5]] == [192 * 1024] and not ok[cc, dtype], table


def test_the_kernels_are_compiled_as_the_launchers_call_them():
    """The forward's and the backward's launches of each kernel are recorded: unit strides are the constant 1
    and pointers are 16-byte aligned, as Triton's JIT specialises them (sm80 then pipelines the loads)."""
    launches = aot.launches("bfloat16")
    assert {cx["BLOCK"] for _, _, cx, _ in launches} == set(mt._BLOCK_CHOICES)
    for name in aot.KERNELS:
        mine = [(sig, cx, attrs) for n, sig, cx, attrs in launches if n == name and cx["BLOCK"] == 128]
        assert len(mine) == 2, name  # the forward's and the backward's (the weight transposed)
        for sig, cx, attrs in mine:
            assert sum(ty == "constexpr" and a.startswith("stride") for a, ty in sig.items()) == 2
            assert all(cx[a] == 1 for a, ty in sig.items() if ty == "constexpr" and a.startswith("stride"))
            pointers = [i for i, (a, ty) in enumerate(sig.items()) if ty.startswith("*")]
            assert all(attrs[(i,)] == [["tt.divisibility", 16]] for i in pointers)
            assert sig["a_ptr" if name == "sdd" else "data_ptr"] == "*bf16"


def test_the_configurations_are_the_autotuners():
    """jobs(everything=True) is every configuration each launch can run: the tile sizes the GPU autotuner
    tries, those with BLOCK_K > BLOCK pruned for dsd and tsd, and at BLOCK=16 their single fallback."""
    jobs = aot.jobs("float16", everything=True)
    per_launch = {}
    for name, sig, cx, attrs, c in jobs:
        per_launch.setdefault((name, repr(sig), cx["BLOCK"]), []).append(c)
    n = len(mt.WARPS) * len(mt.STAGES)
    for (name, _, block), configs in per_launch.items():
        tiles = [t for t in mt.TILES[name][1:] if name == "sdd" or t["BLOCK_K"] <= block]
        assert len(configs) == (len(tiles) * n if tiles else 1), (name, block)
