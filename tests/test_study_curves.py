"""tools/study.py's comparison of two val-loss curves (the compute multiplier and the loss gaps), on
synthetic curves whose answers are known."""
import importlib.util
import os

import numpy as np
import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location('study', os.path.join(ROOT, 'tools', 'study.py'))
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)  # (its command line runs under __main__ only)


def loss(flops):
    """A dense model's val loss against its training FLOPs: a power law down to 1."""
    return 1 + 3 * (flops / 1e12) ** -0.3


def curve(flops, val, seconds_per_flop):
    return {'flops': flops, 'seconds': flops * seconds_per_flop, 'val': val}


def test_the_compute_multiplier_and_gaps_of_synthetic_curves():
    """An MoE that reaches at F FLOPs the dense model's loss at 2F (a compute multiplier of 2), each step 1.5x
    slower (a time multiplier of 2 / 1.5), against a dense run twice as long."""
    flops = np.arange(1, 1001) * 2e11  # evals close enough for linear interpolation to be within 1e-3
    dense = curve(flops, loss(flops), 1e-12)  # 2e14 FLOPs, 200 s
    half = flops[:500]  # 1e14 FLOPs
    moe = curve(half, loss(2 * half), 1.5e-12)  # 150 s in all
    flops_vs = study.compare(moe, dense, 'flops')
    assert flops_vs['multiplier'] == pytest.approx(2.0, rel=1e-3) and flops_vs['bound'] == ''
    assert flops_vs['gap'] == pytest.approx(loss(2e14) - loss(1e14), rel=1e-6)  # both at 1e14 FLOPs
    secs_vs = study.compare(moe, dense, 'seconds')
    assert secs_vs['multiplier'] == pytest.approx(2.0 / 1.5, rel=1e-3)
    assert secs_vs['gap'] == pytest.approx(loss(2e14) - loss(1.5e14), rel=1e-3)  # both at 150 s
    # the other way round: the MoE matches the dense run's final loss with half its FLOPs
    back = study.compare(dense, moe, 'flops')
    assert back['multiplier'] == pytest.approx(0.5, rel=1e-3) and back['bound'] == ''
    # a dense run that stopped before reaching the MoE's final loss: a lower bound, its FLOPs over the MoE's
    early = study.compare(moe, curve(half, loss(half), 1e-12), 'flops')
    assert early['bound'] == '>' and early['multiplier'] == pytest.approx(1.0)


def test_reach_reads_the_first_crossing_linearly_between_evals():
    x, y = np.array([0.0, 10.0, 20.0, 30.0]), np.array([4.0, 3.0, 3.2, 2.0])
    assert study.reach(x, y, 3.5) == pytest.approx(5.0)
    assert study.reach(x, y, 3.0) == pytest.approx(10.0)  # the first time, not after the bump
    assert study.reach(x, y, 2.6) == pytest.approx(25.0)
    assert study.reach(x, y, 5.0) == 0.0 and study.reach(x, y, 1.0) is None
