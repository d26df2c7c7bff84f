"""Router metrics on hand-computed cases: bootstrap intervals, paired differences, PGR, APGR, CPT, AIQ,
the gap to the oracle."""

from __future__ import annotations

import math

import pytest
import torch

from haps.errors import ConfigError, ShapeError
from haps.router_metrics import (
    aiq,
    apgr,
    bootstrap_indices,
    cpt,
    gap_closed,
    mean_ci,
    oracle_gap,
    paired_difference,
    pgr,
    upper_hull,
)


# ------------------------------------------------------------------------------ bootstrap
def test_mean_ci_of_constant_values_is_a_point():
    ci = mean_ci([0.25, 0.25, 0.25, 0.25], n_boot=200)
    assert (ci.mean, ci.low, ci.high, ci.n) == (0.25, 0.25, 0.25, 4)
    assert mean_ci([3.0]).to_dict() == {"mean": 3.0, "low": 3.0, "high": 3.0, "n": 1}


def test_mean_ci_is_the_percentile_interval_of_the_resampled_means():
    values = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 1.0])
    ci = mean_ci(values, n_boot=500, level=0.9, seed=3)
    idx = bootstrap_indices(8, 500, seed=3)
    means = sorted(float(values[row].double().mean()) for row in idx)
    # numpy-style linear interpolation at 0.05 and 0.95 of 500 sorted means: positions 24.95 and 474.05
    low = means[24] + 0.95 * (means[25] - means[24])
    high = means[474] + 0.05 * (means[475] - means[474])
    assert ci.mean == pytest.approx(0.5625)  # 4.5 / 8
    assert ci.low == pytest.approx(low) and ci.high == pytest.approx(high)
    assert mean_ci(values, n_boot=500, level=0.9, seed=3) == ci  # seeded
    assert not torch.equal(bootstrap_indices(8, 500, seed=4), idx)


def test_paired_difference_shifted_and_equal_methods():
    b = [0.0, 1.0, 0.5, 0.25]
    d = paired_difference([x + 0.5 for x in b], b, n_boot=300)
    assert (d.diff, d.low, d.high, d.p_greater, d.n) == (0.5, 0.5, 0.5, 1.0, 4)
    same = paired_difference(b, b, n_boot=300)
    assert (same.diff, same.p_greater) == (0.0, 0.0)


def test_paired_difference_share_of_positive_resamples():
    # a - b = [1, 0, 0, 1]: a resample's mean difference is > 0 unless all 4 draws hit problems 1 and 2,
    # which happens with probability (1/2)^4 = 1/16, so p_greater -> 15/16
    d = paired_difference([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], n_boot=20000, seed=0)
    assert d.diff == 0.5
    idx = bootstrap_indices(4, 20000, seed=0)
    exact = float(((idx == 0) | (idx == 3)).any(dim=1).double().mean())
    assert d.p_greater == exact
    assert abs(d.p_greater - 15 / 16) < 0.01
    assert d.low == 0.0 and d.high == 1.0  # resampled means take values k/4; 2.5% of them are 0 (1/16 > 2.5%)


def test_bootstrap_input_errors():
    with pytest.raises(ShapeError, match="same problems"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError, match="empty"):
        mean_ci([])
    with pytest.raises(ConfigError, match="NaN"):
        mean_ci([1.0, math.nan])
    with pytest.raises(ConfigError, match=r"level must be in \(0, 1\)"):
        mean_ci([1.0], level=95)


# ------------------------------------------------------------------------------ RouteLLM
def test_pgr():
    assert pgr(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert pgr(0.9, 0.5, 0.9) == 1.0 and pgr(0.5, 0.5, 0.9) == 0.0
    assert math.isnan(pgr(0.6, 0.5, 0.5))


def test_apgr_by_trapezoids():
    # area = 0.5 * (0.5 + 0.8) / 2 + 0.5 * (0.8 + 0.9) / 2 = 0.325 + 0.425 = 0.75; (0.75 - 0.5) / 0.4 = 0.625
    assert apgr([0.0, 0.5, 1.0], [0.5, 0.8, 0.9], q_weak=0.5, q_strong=0.9) == pytest.approx(0.625)
    assert apgr([1.0, 0.0, 0.5], [0.9, 0.5, 0.8], 0.5, 0.9) == pytest.approx(0.625)  # order does not matter
    assert apgr([0.0, 1.0], [0.5, 0.9], 0.5, 0.9) == pytest.approx(0.5)  # the weak-strong line
    with pytest.raises(ConfigError, match="add the points at share 0 and 1"):
        apgr([0.0, 0.5], [0.5, 0.8], 0.5, 0.9)
    with pytest.raises(ShapeError):
        apgr([0.0, 1.0], [0.5], 0.5, 0.9)


def test_cpt():
    shares, q = [0.0, 0.25, 0.5, 1.0], [0.5, 0.6, 0.8, 0.9]
    assert cpt(shares, q, 0.5, 0.9, 0.5) == 0.5  # target 0.7: first reached at share 0.5
    assert cpt(shares, q, 0.5, 0.9, 0.25) == 0.25  # target 0.6 (reached exactly)
    assert cpt(shares, q, 0.5, 0.9, 1.0) == 1.0 and cpt(shares, q, 0.5, 0.9, 0.0) == 0.0
    assert math.isnan(cpt([0.0, 1.0], [0.5, 0.6], 0.5, 0.9, 0.5))  # never reaches 0.7
    with pytest.raises(ConfigError, match="0.5 for CPT"):
        cpt(shares, q, 0.5, 0.9, 50)


# ------------------------------------------------------------------------------ RouterBench AIQ
def test_aiq_upper_hull_drops_points_below_it():
    # hull (0, .2) -> (1, .8) -> (3, .9): area 0.5 + 1.7 = 2.2 over the cost range 3
    costs, q = [0.0, 1.0, 2.0, 3.0, 0.5], [0.2, 0.8, 0.6, 0.9, 0.3]
    hc, hq = upper_hull(costs, q)
    assert hc.tolist() == [0.0, 1.0, 3.0] and hq.tolist() == [0.2, 0.8, 0.9]
    assert aiq(costs, q) == pytest.approx(2.2 / 3)


def test_aiq_is_flat_after_the_best_point():
    # hull up to (1, .9), then flat at .9 to cost 2: area 0.7 + 0.9 = 1.6 over 2
    assert aiq([0.0, 1.0, 2.0], [0.5, 0.9, 0.7]) == pytest.approx(0.8)
    assert upper_hull([0.0, 1.0, 2.0], [0.5, 0.9, 0.7])[0].tolist() == [0.0, 1.0]


def test_aiq_degenerate_cases():
    assert aiq([1.0, 1.0], [0.3, 0.6]) == 0.6  # one distinct cost: the best quality
    assert aiq([0.0, 2.0], [0.4, 0.4]) == pytest.approx(0.4)
    assert aiq([0.0, 2.0, 2.0], [0.0, 0.2, 1.0]) == pytest.approx(0.5)  # equal costs: the best point counts


# ------------------------------------------------------------------------------ oracle
def test_gap_to_the_oracle():
    assert oracle_gap(0.6, 0.8) == pytest.approx(0.2)
    assert gap_closed(0.6, 0.4, 0.8) == pytest.approx(0.5)
    assert math.isnan(gap_closed(0.6, 0.8, 0.8))
