"""Pareto front, hypervolume and the fairness-aware pruning level of a set of evaluated points.

All objectives are minimised. The functions take the rows of a sweep's ``trials.parquet`` as a
pandas DataFrame (one row per evaluated point, see `biasprune.results`) and depend only on
numpy and pandas.

- `pareto_front`: the feasible finished points that no other feasible finished point dominates.
- `hypervolume`: the exact volume that a front dominates below a reference point (2 or 3 objectives).
- `default_reference_point`: each objective's maximum over the feasible finished points × 1.1.
- `recommend`: the largest pruning ratio whose fairness divergence is not worse than the dense
  model's beyond the bootstrap intervals and whose quality stays within a tolerance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

STATUS_FINISHED = "finished"
"""``status`` of a finished row, as `biasprune.results` writes it."""

DENSE = "dense"
"""Pruner name of the unpruned baseline row (`biasprune.config.DENSE`, which imports torch)."""

FAIRNESS = "fairness_divergence"
FAIRNESS_CI_LOW = "fairness_divergence_ci_low"
FAIRNESS_CI_HIGH = "fairness_divergence_ci_high"

TOLERANCE_KINDS = ("relative", "absolute")

REFERENCE_MARGIN = 0.1
"""Default reference point = maximum × (1 + this) per objective."""

# Clauses of `recommend`, in the order they are checked; each candidate counts under the first it fails.
CLAUSE_UNFINISHED = "unfinished"
CLAUSE_CONSTRAINTS = "constraints"
CLAUSE_FAIRNESS = "fairness"
CLAUSE_QUALITY = "quality"
CLAUSES = (CLAUSE_UNFINISHED, CLAUSE_CONSTRAINTS, CLAUSE_FAIRNESS, CLAUSE_QUALITY)


def feasible_mask(points: pd.DataFrame, objectives: Sequence[str], constraints: Mapping[str, float] | None = None) -> pd.Series:
    """Return which rows are finished, have every objective defined and meet every constraint.

    Args:
        points: One row per evaluated point. A row counts as finished when its ``status`` is
            ``"finished"``; without a ``status`` column every row counts as finished.
        objectives: Columns that must be defined (not NaN).
        constraints: Upper bounds, metric column → maximum; ``{"macs": 5e6}`` keeps rows with
            macs <= 5e6. A row whose constrained metric is NaN is infeasible. Default none.

    Returns:
        A boolean Series aligned with ``points``.

    Raises:
        ValueError: An objective or constrained metric is not a column of ``points``, or a bound
            is not a finite number.
    """
    _check_columns(points, objectives, "objective")
    constraints = dict(constraints or {})
    _check_columns(points, list(constraints), "constrained metric")
    for name, bound in constraints.items():
        if not _is_finite_number(bound):
            raise ValueError(f"constraint {name!r} has bound {bound!r}; give a finite number, the maximum allowed {name}")

    mask = pd.Series(True, index=points.index)
    if "status" in points:
        mask &= points["status"] == STATUS_FINISHED
    for name in objectives:
        mask &= _numeric(points[name]).notna()
    for name, bound in constraints.items():
        mask &= _numeric(points[name]) <= bound  # NaN compares False, so it is infeasible
    return mask


def pareto_front(
    points: pd.DataFrame, objectives: Sequence[str], constraints: Mapping[str, float] | None = None
) -> pd.DataFrame:
    """Return the rows on the Pareto front: feasible rows that no feasible row dominates.

    Every objective is minimised. Row q dominates row p when q <= p in every objective and
    q < p in at least one. Rows with identical objective vectors do not dominate each other, so
    all of them stay on the front. Rows that are not finished, lack an objective (NaN) or break
    a constraint are never on it, and never dominate another row (see `feasible_mask`).

    Args:
        points: One row per evaluated point.
        objectives: Columns to minimise, at least one.
        constraints: Upper bounds, metric column → maximum. Default none.

    Returns:
        The front's rows, with all of their columns, sorted by the objectives in order.

    Raises:
        ValueError: ``objectives`` is empty, or an objective or constrained metric is not a column.
    """
    if not objectives:
        raise ValueError("objectives is empty; give at least one column to minimise, e.g. ['fid', 'macs']")
    feasible = points[feasible_mask(points, objectives, constraints)]
    if feasible.empty:
        return feasible.copy()
    values = feasible[list(objectives)].to_numpy(dtype=float)
    front = feasible[~_dominated(values)]
    return front.sort_values(list(objectives), kind="stable")


def _dominated(values: np.ndarray) -> np.ndarray:
    """Return, for each row of an (n, k) array, whether another row dominates it (minimisation)."""
    # no_worse[q, p]: row q is <= row p in every objective; better[q, p]: < in at least one.
    no_worse = np.all(values[:, None, :] <= values[None, :, :], axis=2)
    better = np.any(values[:, None, :] < values[None, :, :], axis=2)
    return np.any(no_worse & better, axis=0)


def default_reference_point(
    points: pd.DataFrame,
    objectives: Sequence[str],
    constraints: Mapping[str, float] | None = None,
    margin: float = REFERENCE_MARGIN,
) -> np.ndarray:
    """Return each objective's maximum over the feasible finished rows, times (1 + margin).

    With a margin above 0 every feasible point with positive objectives lies strictly inside the
    reference box, so each one adds volume. A maximum of 0 or below becomes maximum +
    margin × |maximum|, or + margin when the maximum is 0.

    Args:
        points: One row per evaluated point.
        objectives: Columns to minimise.
        constraints: Upper bounds, metric column → maximum. Default none.
        margin: Relative margin above the maximum. Default 0.1.

    Raises:
        ValueError: No row is feasible, or ``margin`` is negative.
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}; 0.1 puts the reference 10 % above the worst point")
    feasible = points[feasible_mask(points, objectives, constraints)]
    if feasible.empty:
        raise ValueError(
            "no finished point meets the constraints, so the reference point has no maximum to start from; "
            "pass reference_point explicitly or loosen the constraints"
        )
    maximum = feasible[list(objectives)].to_numpy(dtype=float).max(axis=0)
    reference = maximum + margin * np.abs(maximum)
    return np.where(maximum == 0, margin, reference)


def hypervolume(front: np.ndarray, reference_point: np.ndarray) -> float:
    """Return the exact hypervolume that ``front`` dominates, bounded by ``reference_point``.

    The hypervolume is the volume of the union of the boxes [p, reference_point] over the points
    p of the front (all objectives minimised). Points that are not strictly below the reference
    in every objective add nothing and are ignored, and so are dominated points. Two objectives
    use a sweep over the sorted points. Three objectives slice the volume at each point's third
    objective and sum, over the slabs, thickness × the 2-D hypervolume of the points below.

    Args:
        front: An (n, k) array of objective vectors, k = 2 or 3; n may be 0.
        reference_point: A length-k array.

    Returns:
        The hypervolume in the product of the objectives' units; 0.0 when no point counts.

    Raises:
        ValueError: Wrong shapes, k not 2 or 3, or non-finite values.
    """
    points = np.asarray(front, dtype=float)
    reference = np.asarray(reference_point, dtype=float)
    if points.ndim == 1 and points.size == 0:
        points = points.reshape(0, reference.size)
    if points.ndim != 2 or reference.ndim != 1 or points.shape[1] != reference.size:
        raise ValueError(
            f"front must be an (n, k) array and reference_point a length-k array, got shapes "
            f"{points.shape} and {reference.shape}; pass one row per point and one value per objective"
        )
    if reference.size not in (2, 3):
        raise ValueError(f"hypervolume supports 2 or 3 objectives, got {reference.size}; pass 2 or 3 columns")
    if not (np.all(np.isfinite(points)) and np.all(np.isfinite(reference))):
        raise ValueError("front and reference_point must be finite; drop points with NaN or infinite objectives first")

    points = points[np.all(points < reference, axis=1)]
    if len(points) == 0:
        return 0.0
    if reference.size == 2:
        return _hypervolume_2d(points, reference)
    return _hypervolume_3d(points, reference)


def _hypervolume_2d(points: np.ndarray, reference: np.ndarray) -> float:
    # Sorted by the first objective, each point that lowers the running minimum of the second
    # adds the strip [x, ref_x] × [y, previous minimum]; dominated points lower nothing.
    order = np.lexsort((points[:, 1], points[:, 0]))
    volume, ceiling = 0.0, reference[1]
    for x, y in points[order]:
        if y < ceiling:
            volume += (reference[0] - x) * (ceiling - y)
            ceiling = y
    return float(volume)


def _hypervolume_3d(points: np.ndarray, reference: np.ndarray) -> float:
    levels = np.unique(points[:, 2])
    bounds = np.append(levels, reference[2])
    volume = 0.0
    for low, high in zip(bounds[:-1], bounds[1:]):
        below = points[points[:, 2] <= low]
        volume += (high - low) * _hypervolume_2d(below[:, :2], reference[:2])
    return float(volume)


@dataclass(frozen=True)
class Recommendation:
    """The fairness-aware pruning level chosen by `recommend`, with the rule that chose it.

    Attributes:
        row: The chosen point's row as a dict, or None when no point met the rule.
        quality_metric: Quality column the rule compared (lower is better).
        quality_tolerance: Allowed quality loss against the dense model.
        tolerance_kind: ``"relative"`` (limit = dense × (1 + tolerance)) or ``"absolute"``
            (limit = dense + tolerance).
        quality_limit: The largest quality value a point may have.
        dense_quality: The dense model's quality.
        dense_interval: The dense model's fairness divergence bootstrap interval (low, high).
        constraints: Upper bounds, metric column → maximum.
        candidates: Pruned points considered (every row except the dense baseline).
        eliminated: Candidates removed by each clause, in `CLAUSES` order; a candidate counts
            under the first clause it fails.
        qualified: Candidates that met every clause.
        reason: Why the chosen point won, or which clauses removed every candidate.
    """

    row: dict[str, Any] | None
    quality_metric: str
    quality_tolerance: float
    tolerance_kind: str
    quality_limit: float
    dense_quality: float
    dense_interval: tuple[float, float]
    constraints: dict[str, float] = field(default_factory=dict)
    candidates: int = 0
    eliminated: dict[str, int] = field(default_factory=dict)
    qualified: int = 0
    reason: str = ""

    @property
    def pruning_ratio(self) -> float | None:
        """The recommended pruning ratio, or None when no point met the rule."""
        return None if self.row is None else float(self.row["pruning_ratio"])


def recommend(
    points: pd.DataFrame,
    dense_row: Mapping[str, Any],
    *,
    quality_metric: str,
    quality_tolerance: float,
    tolerance_kind: str = "relative",
    constraints: Mapping[str, float] | None = None,
) -> Recommendation:
    """Choose the fairness-aware pruning level: the largest ratio that keeps fairness and quality.

    A pruned point qualifies when it passes, in this order:

    1. finished: ``status`` is ``"finished"`` (or there is no ``status`` column) and its ratio,
       quality, fairness divergence and interval are defined;
    2. constraints: every constrained metric is at most its bound;
    3. fairness: its fairness divergence is not worse than the dense model's beyond the bootstrap
       intervals, that is ``fairness_divergence_ci_low`` <= the dense row's
       ``fairness_divergence_ci_high``. The two intervals overlap, or the point's lies wholly below;
    4. quality: quality <= dense quality × (1 + tolerance) (relative) or dense quality +
       tolerance (absolute).

    Among the qualified points the largest ``pruning_ratio`` wins. Ties go to the lower
    ``fairness_divergence``, then the lower quality, then fewer ``finetune_steps``, then the
    pruner name in alphabetical order.

    NOTE: Overlapping 95 % intervals are a lenient test: two estimates can differ significantly
    at the 5 % level while their intervals still overlap a little. The rule therefore rejects a
    point only when its whole interval lies above the dense model's.

    Args:
        points: One row per evaluated point; rows whose ``pruner`` is ``"dense"`` are ignored.
        dense_row: The dense baseline's row; needs the quality metric and both interval ends.
        quality_metric: Quality column, lower is better (``fid`` or ``fd_<extractor>``).
        quality_tolerance: Allowed quality loss, >= 0 (0.25 with ``relative`` allows 25 % worse).
        tolerance_kind: ``"relative"`` (default) or ``"absolute"``.
        constraints: Upper bounds, metric column → maximum. Default none.

    Returns:
        The recommendation, with the chosen row or None, the rule's settings and a reason.

    Raises:
        ValueError: An invalid tolerance or kind, a missing column, or a dense row without the
            quality metric or the interval.
    """
    # 1. Validate the rule and the dense reference before looking at any point.
    if tolerance_kind not in TOLERANCE_KINDS:
        raise ValueError(f"tolerance_kind must be one of {list(TOLERANCE_KINDS)}, got {tolerance_kind!r}")
    if not _is_finite_number(quality_tolerance) or quality_tolerance < 0:
        raise ValueError(
            f"quality_tolerance must be a finite number >= 0, got {quality_tolerance!r}; "
            "0.25 with tolerance_kind=relative allows a quality 25 % worse than the dense model's"
        )
    dense_quality = _dense_value(dense_row, quality_metric)
    dense_interval = (_dense_value(dense_row, FAIRNESS_CI_LOW), _dense_value(dense_row, FAIRNESS_CI_HIGH))
    if tolerance_kind == "relative":
        quality_limit = dense_quality * (1 + quality_tolerance)
    else:
        quality_limit = dense_quality + quality_tolerance
    constraints = {str(k): float(v) for k, v in (constraints or {}).items()}
    required = ["pruning_ratio", quality_metric, FAIRNESS, FAIRNESS_CI_LOW, FAIRNESS_CI_HIGH]

    # 2. Remove candidates clause by clause; each counts under the first clause it fails.
    candidates = points[points["pruner"] != DENSE] if "pruner" in points else points
    finished = feasible_mask(candidates, required)
    meets_constraints = feasible_mask(candidates, required, constraints)
    fair = _numeric(candidates[FAIRNESS_CI_LOW]) <= dense_interval[1]
    good = _numeric(candidates[quality_metric]) <= quality_limit
    eliminated = {
        CLAUSE_UNFINISHED: int((~finished).sum()),
        CLAUSE_CONSTRAINTS: int((finished & ~meets_constraints).sum()),
        CLAUSE_FAIRNESS: int((meets_constraints & ~fair).sum()),
        CLAUSE_QUALITY: int((meets_constraints & fair & ~good).sum()),
    }
    qualified = candidates[meets_constraints & fair & good]

    # 3. Largest ratio, then the tie-breaks.
    row = None
    if not qualified.empty:
        ranked = qualified.assign(_neg_ratio=-_numeric(qualified["pruning_ratio"]))
        keys = ["_neg_ratio", FAIRNESS, quality_metric] + [k for k in ("finetune_steps", "pruner") if k in ranked]
        row = ranked.sort_values(keys, kind="stable").iloc[0].drop("_neg_ratio").to_dict()

    recommendation = Recommendation(
        row=row,
        quality_metric=quality_metric,
        quality_tolerance=float(quality_tolerance),
        tolerance_kind=tolerance_kind,
        quality_limit=float(quality_limit),
        dense_quality=dense_quality,
        dense_interval=dense_interval,
        constraints=constraints,
        candidates=len(candidates),
        eliminated=eliminated,
        qualified=len(qualified),
    )
    reason = _reason(recommendation)
    logger.debug("recommendation: %s", reason)
    return Recommendation(**{**recommendation.__dict__, "reason": reason})


def _reason(rec: Recommendation) -> str:
    limit = _limit_text(rec)
    low, high = rec.dense_interval
    if rec.row is not None:
        row = rec.row
        return (
            f"{row.get('pruner', '?')} at pruning ratio {row['pruning_ratio']:.4g} after {row.get('finetune_steps', '?')} "
            f"fine-tuning steps is the largest ratio that meets the rule. Its fairness divergence "
            f"{row[FAIRNESS]:.4g} [{row[FAIRNESS_CI_LOW]:.4g}, {row[FAIRNESS_CI_HIGH]:.4g}] is not worse than the "
            f"dense model's [{low:.4g}, {high:.4g}] beyond the interval, because its lower end is at most the "
            f"dense upper end. Its {rec.quality_metric} {row[rec.quality_metric]:.4g} is within {limit}"
            f"{_constraints_text(rec)}. {rec.qualified} of {rec.candidates} pruned point(s) met the rule."
        )
    if rec.candidates == 0:
        return "no point met the rule: there is no pruned point to choose from"
    e = rec.eliminated
    return (
        f"no point met the rule: of {rec.candidates} pruned point(s), {e[CLAUSE_UNFINISHED]} did not finish or lack a "
        f"metric, {e[CLAUSE_CONSTRAINTS]} break the constraints{_constraints_text(rec, short=True)}, "
        f"{e[CLAUSE_FAIRNESS]} have a fairness divergence interval wholly above the dense model's "
        f"[{low:.4g}, {high:.4g}], and {e[CLAUSE_QUALITY]} exceed {limit} (clauses checked in that order)"
    )


def _limit_text(rec: Recommendation) -> str:
    if rec.tolerance_kind == "relative":
        how = f"dense {rec.dense_quality:.4g} × (1 + {rec.quality_tolerance:g})"
    else:
        how = f"dense {rec.dense_quality:.4g} + {rec.quality_tolerance:g}"
    return f"the {rec.tolerance_kind} quality limit {rec.quality_limit:.4g} = {how}"


def _constraints_text(rec: Recommendation, short: bool = False) -> str:
    if not rec.constraints:
        return ""
    bounds = ", ".join(f"{name} <= {bound:.4g}" for name, bound in rec.constraints.items())
    return f" ({bounds})" if short else f", and it meets {bounds}"


def _dense_value(dense_row: Mapping[str, Any], name: str) -> float:
    value = dense_row.get(name)
    if not _is_finite_number(value):
        raise ValueError(
            f"dense_row[{name!r}] is {value!r}; the recommendation compares every point with the dense model, "
            f"so pass the dense baseline's finished row, which has a finite {name}"
        )
    return float(value)


def _check_columns(points: pd.DataFrame, names: Sequence[str], what: str) -> None:
    missing = [name for name in names if name not in points.columns]
    if missing:
        raise ValueError(
            f"{what}(s) {missing} are not columns of points; choose from its columns, e.g. "
            f"{sorted(c for c in points.columns if not str(c).startswith('share_'))[:15]}"
        )


def _numeric(column: pd.Series) -> pd.Series:
    return pd.to_numeric(column, errors="coerce").astype(float)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


__all__ = [
    "CLAUSES",
    "Recommendation",
    "default_reference_point",
    "feasible_mask",
    "hypervolume",
    "pareto_front",
    "recommend",
]
