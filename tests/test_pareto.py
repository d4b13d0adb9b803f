"""Pareto front, hypervolume and recommendation rule on hand-made points."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from biasprune.pareto import (
    Recommendation,
    default_reference_point,
    feasible_mask,
    hypervolume,
    pareto_front,
    recommend,
)

OBJECTIVES = ["quality", "macs", "fairness_divergence"]


def _points(rows: list[dict]) -> pd.DataFrame:
    defaults = {"status": "finished", "pruner": "l1", "finetune_steps": 0}
    return pd.DataFrame([{**defaults, **row} for row in rows])


def _names(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["name"])


# --- pareto_front ---------------------------------------------------------------------------------


def test_pareto_front_dominance_hand_made():
    points = _points([
        {"name": "a", "quality": 1.0, "macs": 5.0, "fairness_divergence": 0.3},
        {"name": "b", "quality": 2.0, "macs": 2.0, "fairness_divergence": 0.3},
        {"name": "c", "quality": 2.0, "macs": 3.0, "fairness_divergence": 0.3},  # b is <= everywhere, < in macs
        {"name": "d", "quality": 3.0, "macs": 1.0, "fairness_divergence": 0.1},
        {"name": "e", "quality": 3.0, "macs": 1.0, "fairness_divergence": 0.2},  # d is < in fairness only
        {"name": "f", "quality": 0.5, "macs": 9.0, "fairness_divergence": 0.9},  # best quality, so kept
    ])  # fmt: skip
    front = pareto_front(points, OBJECTIVES)
    assert _names(front) == ["a", "b", "d", "f"]
    assert list(front["quality"]) == [0.5, 1.0, 2.0, 3.0]  # sorted by the objectives


def test_pareto_front_identical_vectors_all_kept():
    points = _points([
        {"name": "a", "quality": 1.0, "macs": 2.0, "fairness_divergence": 0.1},
        {"name": "b", "quality": 1.0, "macs": 2.0, "fairness_divergence": 0.1},
        {"name": "c", "quality": 1.0, "macs": 2.0, "fairness_divergence": 0.2},
    ])  # fmt: skip
    assert _names(pareto_front(points, OBJECTIVES)) == ["a", "b"]


def test_pareto_front_constraint_violation_excluded():
    points = _points([
        {"name": "a", "quality": 1.0, "macs": 9.0, "fairness_divergence": 0.1},  # best but macs > 5
        {"name": "b", "quality": 2.0, "macs": 4.0, "fairness_divergence": 0.2},
        {"name": "c", "quality": 3.0, "macs": 5.0, "fairness_divergence": 0.3},  # dominated by b
        {"name": "d", "quality": 9.0, "macs": 1.0, "fairness_divergence": 0.1},  # quality > 8
    ])  # fmt: skip
    # Without constraints a dominates c and d survives; with them a and d are infeasible.
    assert _names(pareto_front(points, OBJECTIVES)) == ["a", "b", "d"]
    assert _names(pareto_front(points, OBJECTIVES, {"macs": 5.0, "quality": 8.0})) == ["b"]
    # macs <= 5 is inclusive: c stays feasible (and dominated by b).
    assert list(feasible_mask(points, OBJECTIVES, {"macs": 5.0})) == [False, True, True, True]


def test_pareto_front_failed_and_nan_excluded():
    points = _points([
        {"name": "failed", "status": "failed", "quality": 0.1, "macs": 0.1, "fairness_divergence": 0.0},
        {"name": "nan", "quality": math.nan, "macs": 0.1, "fairness_divergence": 0.0},
        {"name": "ok", "quality": 5.0, "macs": 5.0, "fairness_divergence": 0.5},
    ])  # fmt: skip
    # The failed and NaN rows would dominate "ok"; they neither join nor shape the front.
    assert _names(pareto_front(points, OBJECTIVES)) == ["ok"]


def test_pareto_front_nan_constraint_metric_infeasible():
    points = _points([
        {"name": "a", "quality": 1.0, "macs": 1.0, "fairness_divergence": 0.1, "params": math.nan},
        {"name": "b", "quality": 2.0, "macs": 2.0, "fairness_divergence": 0.2, "params": 10.0},
    ])  # fmt: skip
    assert _names(pareto_front(points, OBJECTIVES, {"params": 100.0})) == ["b"]


def test_pareto_front_no_status_column():
    # Without a status column every row counts as finished.
    points = pd.DataFrame({"name": ["a", "b"], "x": [1.0, 2.0], "y": [2.0, 1.0]})
    assert _names(pareto_front(points, ["x", "y"])) == ["a", "b"]


def test_pareto_front_nothing_feasible_returns_empty():
    points = _points([{"name": "a", "status": "failed", "quality": 1.0, "macs": 1.0, "fairness_divergence": 0.1}])
    front = pareto_front(points, OBJECTIVES)
    assert front.empty
    assert list(front.columns) == list(points.columns)


@pytest.mark.parametrize(
    "objectives, constraints, match",
    [
        ([], None, "objectives is empty"),
        (["quality", "fid"], None, r"objective\(s\) \['fid'\]"),
        (OBJECTIVES, {"latency": 1.0}, r"constrained metric\(s\) \['latency'\]"),
        (OBJECTIVES, {"macs": math.nan}, "finite number"),
    ],
)
def test_pareto_front_invalid(objectives, constraints, match):
    points = _points([{"name": "a", "quality": 1.0, "macs": 1.0, "fairness_divergence": 0.1}])
    with pytest.raises(ValueError, match=match):
        pareto_front(points, objectives, constraints)


# --- hypervolume ----------------------------------------------------------------------------------


def test_hypervolume_2d_single_point():
    # Box [1, 4] × [2, 5]: 3 × 3 = 9.
    assert hypervolume(np.array([[1.0, 2.0]]), np.array([4.0, 5.0])) == pytest.approx(9.0)


def test_hypervolume_2d_two_overlapping_points():
    # Boxes [1, 4] × [3, 4] (area 3) and [2, 4] × [1, 4] (area 6) overlap on [2, 4] × [3, 4]
    # (area 2): 3 + 6 - 2 = 7.
    front = np.array([[1.0, 3.0], [2.0, 1.0]])
    assert hypervolume(front, np.array([4.0, 4.0])) == pytest.approx(7.0)
    assert hypervolume(front[::-1], np.array([4.0, 4.0])) == pytest.approx(7.0)  # order does not matter


def test_hypervolume_2d_dominated_and_outside_points_add_nothing():
    # (3, 3) lies inside the box of (1, 3); (5, 0) and (0, 4) are not strictly below the reference.
    front = np.array([[1.0, 3.0], [2.0, 1.0], [3.0, 3.0], [5.0, 0.0], [0.0, 4.0]])
    assert hypervolume(front, np.array([4.0, 4.0])) == pytest.approx(7.0)


def test_hypervolume_3d_single_point():
    # Box [1, 2] × [1, 3] × [1, 4]: 1 × 2 × 3 = 6.
    assert hypervolume(np.array([[1.0, 1.0, 1.0]]), np.array([2.0, 3.0, 4.0])) == pytest.approx(6.0)


def test_hypervolume_3d_two_overlapping_points():
    # a = (1, 2, 1): box 2 × 1 × 2 = 4. b = (2, 1, 2): box 1 × 2 × 1 = 2.
    # Overlap [2, 3] × [2, 3] × [2, 3] = 1, so the union is 4 + 2 - 1 = 5.
    front = np.array([[1.0, 2.0, 1.0], [2.0, 1.0, 2.0]])
    assert hypervolume(front, np.array([3.0, 3.0, 3.0])) == pytest.approx(5.0)


def test_hypervolume_3d_three_points_inclusion_exclusion():
    # Unit-cube corners: a = (0, 1, 1), b = (1, 0, 1), c = (1, 1, 0) with reference (2, 2, 2).
    # Each box is 2 × 1 × 1 = 2; each pairwise overlap is 1 × 1 × 1 = 1; the triple overlap is
    # [1, 2]^3 = 1. Union: 3 × 2 - 3 × 1 + 1 = 4.
    front = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert hypervolume(front, np.array([2.0, 2.0, 2.0])) == pytest.approx(4.0)


def test_hypervolume_empty_front_is_zero():
    assert hypervolume(np.empty((0, 3)), np.array([1.0, 1.0, 1.0])) == 0.0
    assert hypervolume(np.array([[2.0, 0.5, 0.5]]), np.array([1.0, 1.0, 1.0])) == 0.0


@pytest.mark.parametrize(
    "front, reference, match",
    [
        (np.array([[1.0, 2.0]]), np.array([3.0, 3.0, 3.0]), "shapes"),
        (np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([5.0, 5.0, 5.0, 5.0]), "2 or 3 objectives"),
        (np.array([[math.nan, 1.0]]), np.array([3.0, 3.0]), "finite"),
    ],
)
def test_hypervolume_invalid(front, reference, match):
    with pytest.raises(ValueError, match=match):
        hypervolume(front, reference)


def test_default_reference_point_max_times_margin():
    # Each objective's maximum over the feasible finished rows × 1.1.
    points = _points([
        {"quality": 10.0, "macs": 100.0, "fairness_divergence": 0.2},
        {"quality": 20.0, "macs": 50.0, "fairness_divergence": 0.0},
        {"quality": 99.0, "macs": 999.0, "fairness_divergence": 9.0, "status": "failed"},  # ignored
    ])  # fmt: skip
    reference = default_reference_point(points, OBJECTIVES)
    np.testing.assert_allclose(reference, [22.0, 110.0, 0.22])
    # With macs <= 60 only the second row is feasible; its 0 fairness gets the margin 0.1 itself.
    np.testing.assert_allclose(default_reference_point(points, OBJECTIVES, {"macs": 60.0}), [22.0, 55.0, 0.1])


def test_default_reference_point_invalid():
    points = _points([{"quality": 1.0, "macs": 1.0, "fairness_divergence": 0.1, "status": "failed"}])
    with pytest.raises(ValueError, match="no finished point"):
        default_reference_point(points, OBJECTIVES)


# --- recommend ------------------------------------------------------------------------------------

DENSE = {"pruner": "dense", "pruning_ratio": 0.0, "fid": 10.0, "fairness_divergence": 0.05,
         "fairness_divergence_ci_low": 0.03, "fairness_divergence_ci_high": 0.07, "macs": 100.0}  # fmt: skip


def _candidate(ratio: float, fid: float, divergence: float, low: float, **extra) -> dict:
    return {"pruning_ratio": ratio, "fid": fid, "fairness_divergence": divergence,
            "fairness_divergence_ci_low": low, "fairness_divergence_ci_high": low + 0.04,
            "macs": 100.0 * (1 - ratio) ** 2, **extra}  # fmt: skip


def _recommend(rows: list[dict], **kwargs) -> Recommendation:
    settings = {"quality_metric": "fid", "quality_tolerance": 0.2, **kwargs}
    return recommend(_points([DENSE | {"status": "finished"}, *rows]), DENSE, **settings)


def test_recommend_largest_ratio_wins():
    rec = _recommend([_candidate(0.25, 10.5, 0.05, 0.03), _candidate(0.5, 11.0, 0.06, 0.04)])
    assert rec.pruning_ratio == 0.5
    assert rec.candidates == 2  # the dense row is never a candidate
    assert rec.qualified == 2
    assert rec.quality_limit == pytest.approx(12.0)  # 10 × (1 + 0.2)
    assert "pruning ratio 0.5 " in rec.reason
    assert "[0.04, 0.08]" in rec.reason  # its interval
    assert "[0.03, 0.07]" in rec.reason  # the dense interval
    assert "fid 11 is within the relative quality limit 12" in rec.reason


def test_recommend_fairness_clause_excludes_largest_ratio():
    # At 0.75 the interval [0.08, 0.12] lies wholly above dense's [0.03, 0.07]; at 0.5 its lower
    # end 0.07 equals dense's upper end, so the intervals touch and 0.5 passes.
    rec = _recommend([_candidate(0.75, 10.1, 0.10, 0.08), _candidate(0.5, 11.0, 0.09, 0.07)])
    assert rec.pruning_ratio == 0.5
    assert rec.eliminated == {"unfinished": 0, "constraints": 0, "fairness": 1, "quality": 0}


def test_recommend_quality_clause_excludes_largest_ratio():
    # 12.5 > 12 (relative limit) excludes 0.75; 12.0 is within it (<=).
    rec = _recommend([_candidate(0.75, 12.5, 0.05, 0.03), _candidate(0.5, 12.0, 0.05, 0.03)])
    assert rec.pruning_ratio == 0.5
    assert rec.eliminated["quality"] == 1


def test_recommend_absolute_tolerance():
    # Absolute limit 10 + 2.4 = 12.4 keeps 12.3 at 0.75; the relative limit 12 would not.
    rows = [_candidate(0.75, 12.3, 0.05, 0.03), _candidate(0.5, 11.0, 0.05, 0.03)]
    assert _recommend(rows, quality_tolerance=2.4, tolerance_kind="absolute").pruning_ratio == 0.75
    assert _recommend(rows, quality_tolerance=0.2).pruning_ratio == 0.5


def test_recommend_constraints_exclude():
    # 0.25 keeps macs 100 × 0.75² = 56.25 > 50, so only 0.5 (macs 25) is allowed.
    rec = _recommend([_candidate(0.25, 10.1, 0.05, 0.03), _candidate(0.5, 10.2, 0.05, 0.03)],
                     constraints={"macs": 50.0})  # fmt: skip
    assert rec.pruning_ratio == 0.5
    rec = _recommend([_candidate(0.75, 10.1, 0.05, 0.03)], constraints={"macs": 1.0})
    assert rec.row is None
    assert rec.eliminated["constraints"] == 1
    assert "macs <= 1" in rec.reason


def test_recommend_ratio_tie_breaks():
    # Ties on the ratio go to the lower divergence, then the lower quality, then fewer steps.
    rows = [
        _candidate(0.5, 11.0, 0.06, 0.04, pruner="l1", finetune_steps=400),
        _candidate(0.5, 11.0, 0.05, 0.03, pruner="random", finetune_steps=400),  # lowest divergence
        _candidate(0.5, 10.5, 0.06, 0.04, pruner="taylor", finetune_steps=400),
    ]
    assert _recommend(rows).row["pruner"] == "random"
    rows[1]["fairness_divergence"] = 0.06  # now a three-way tie on divergence: lowest fid wins
    assert _recommend(rows).row["pruner"] == "taylor"
    rows = [
        _candidate(0.5, 11.0, 0.05, 0.03, finetune_steps=400),
        _candidate(0.5, 11.0, 0.05, 0.03, finetune_steps=200),  # same numbers, fewer steps
    ]
    assert _recommend(rows).row["finetune_steps"] == 200


def test_recommend_failed_and_nan_points_never_chosen():
    rows = [
        _candidate(0.75, 10.0, 0.05, 0.03, status="failed"),
        _candidate(0.7, math.nan, 0.05, 0.03),
        _candidate(0.25, 10.0, 0.05, 0.03),
    ]
    rec = _recommend(rows)
    assert rec.pruning_ratio == 0.25
    assert rec.eliminated["unfinished"] == 2


def test_recommend_nothing_qualifies_counts_each_clause():
    rows = [
        _candidate(0.75, 10.0, 0.05, 0.03, status="failed"),  # unfinished
        _candidate(0.7, 10.0, 0.05, 0.03, macs=999.0),  # breaks macs <= 500
        _candidate(0.6, 10.0, 0.20, 0.18),  # unfair, and too poor; counted under fairness only
        _candidate(0.5, 30.0, 0.05, 0.03),  # too poor
        _candidate(0.4, 12.1, 0.05, 0.03),  # too poor
    ]
    rec = _recommend(rows, constraints={"macs": 500.0})
    assert rec.row is None
    assert rec.pruning_ratio is None
    assert rec.eliminated == {"unfinished": 1, "constraints": 1, "fairness": 1, "quality": 2}
    assert rec.reason.startswith("no point met the rule: of 5 pruned point(s), 1 did not finish")
    assert "2 exceed the relative quality limit 12" in rec.reason


def test_recommend_no_candidates():
    rec = _recommend([])
    assert rec.row is None
    assert rec.candidates == 0
    assert "no pruned point" in rec.reason


@pytest.mark.parametrize(
    "kwargs, dense, match",
    [
        ({"tolerance_kind": "percent"}, DENSE, "tolerance_kind"),
        ({"quality_tolerance": -0.1}, DENSE, "quality_tolerance"),
        ({}, {**DENSE, "fid": math.nan}, r"dense_row\['fid'\]"),
        ({}, {k: v for k, v in DENSE.items() if k != "fairness_divergence_ci_high"}, "ci_high"),
    ],
)
def test_recommend_invalid(kwargs, dense, match):
    points = _points([_candidate(0.5, 10.0, 0.05, 0.03)])
    settings = {"quality_metric": "fid", "quality_tolerance": 0.2, **kwargs}
    with pytest.raises(ValueError, match=match):
        recommend(points, dense, **settings)
