"""The head guard's figures against hand-computed values, its bounds, and the canary reservoir's limits."""

from __future__ import annotations

import pytest
import torch

from r2m.service.config import ServiceSettings
from r2m.service.update.guard import CanaryItem, CanarySet, guard_report, spearman

PLAIN = torch.tensor([0.0, 1.0, 2.0, 3.0])  # mean 1.5, population std sqrt(1.25)
STD = 1.25**0.5


def _settings(**kw) -> ServiceSettings:
    return ServiceSettings(_env_file=None, **{"guard_min_items": 4, **kw})


def test_figures_match_hand_computed_values() -> None:
    candidate = PLAIN * 2 + 1  # shift (mean 4 - 1.5) / std, spread 2, same order
    r = guard_report(candidate, PLAIN.clone(), PLAIN, _settings(guard_max_mean_shift=10))
    assert r.problem is None and r.items == 4
    assert r.mean_shift == pytest.approx(2.5 / STD) and r.spread_ratio == pytest.approx(2.0)
    assert r.rank_agreement == pytest.approx(1.0)
    assert (r.served_mean_shift, r.served_spread_ratio, r.served_rank_agreement) == pytest.approx((0.0, 1.0, 1.0))
    assert spearman(torch.tensor([3.0, 2.0, 1.0, 0.0]), PLAIN) == pytest.approx(-1.0)
    # ranks (0, 2, 1, 3) against (0, 1, 2, 3): 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman(torch.tensor([0.0, 2.0, 1.0, 3.0]), PLAIN) == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("candidate", "problem"),
    [
        (PLAIN + 4 * STD, "guard_scale"),  # shift 4 > 3
        (PLAIN * 5, "guard_spread"),  # ratio 5 > 4 (its mean shift 6 / std too, but scale is checked first)
        (PLAIN * 0.2 + 1.5 * 0.8, "guard_spread"),  # ratio 0.2 < 1/4, same mean
        (torch.tensor([3.0, 2.0, 1.0, 0.0]), "guard_rank"),  # reversed order, same scale
        (torch.tensor([0.0, float("nan"), 2.0, 3.0]), "non_finite_reward"),
    ],
)
def test_each_bound_refuses_with_its_reason(candidate: torch.Tensor, problem: str) -> None:
    s = _settings(guard_max_mean_shift=3.0, guard_max_spread_ratio=4.0, guard_min_rank_agreement=0.3)
    if problem == "guard_spread" and candidate.std() > PLAIN.std():
        s = _settings(guard_max_mean_shift=100.0)
    r = guard_report(candidate, PLAIN, PLAIN, s)
    assert r.problem == problem, r
    assert problem == "non_finite_reward" or "R2M_GUARD_" in r.detail


def test_a_candidate_moving_back_towards_the_bounds_passes() -> None:
    served = PLAIN * 6  # out of bounds on this canary (it grew since the served head was checked)
    back = guard_report(PLAIN * 5, served, PLAIN, _settings(guard_max_mean_shift=100.0))
    assert back.problem is None and back.spread_ratio == pytest.approx(5.0)
    further = guard_report(PLAIN * 7, served, PLAIN, _settings(guard_max_mean_shift=100.0))
    assert further.problem == "guard_spread"


def test_below_the_minimum_items_the_guard_only_records() -> None:
    r = guard_report(PLAIN * 100, PLAIN, PLAIN, _settings(guard_min_items=5))
    assert r.problem is None and r.spread_ratio == pytest.approx(100.0)


def test_the_canary_keeps_its_count_and_byte_bounds() -> None:
    item = lambda rows: CanaryItem(torch.zeros(8), torch.zeros(rows, 16) if rows else None, 0.6)  # noqa: E731
    canary = CanarySet(size=10, max_bytes=10 * item(4).nbytes)
    canary.offer([item(4) for _ in range(100)])
    assert len(canary) == 10 and canary.seen == 100
    small = CanarySet(size=10, max_bytes=3 * item(4).nbytes)
    small.offer([item(4) for _ in range(20)] + [item(1000)])  # the last one alone is larger than the bound
    assert len(small) == 3 and sum(i.nbytes for i in small.items) <= small.max_bytes


def test_the_reservoir_is_a_uniform_sample() -> None:
    counts = torch.zeros(100)
    for seed in range(200):
        canary = CanarySet(size=10, max_bytes=10**9, seed=seed)
        canary.offer([CanaryItem(torch.tensor([float(i)]), None, 1.0) for i in range(100)])
        for it in canary.items:
            counts[int(it.rte[0])] += 1
    # each item is kept with probability 1/10: 20 of the 200 samples on average; early and late items alike
    assert counts[:50].mean() == pytest.approx(20, rel=0.15) and counts[50:].mean() == pytest.approx(20, rel=0.15)
