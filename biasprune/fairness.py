"""Demographic bias of generated faces: group shares, divergences from references, study ratios.

For each attribute a (gender, race, age), p̂_a is the share of generated images the classifier
puts in each group, among images whose label for a is known, and r_a is a reference distribution
over the same groups. The metrics compare p̂_a with r_a:

- ``js``: Jensen–Shannon divergence, base 2, so it lies in [0, 1].
- ``tv``: total variation distance, ½·Σ|p̂ − r|, in [0, 1].
- ``kl``: Kullback–Leibler divergence KL(p̂‖r), base 2 (bits), after additive smoothing.
- ``fd_l2``: the fairness discrepancy ‖p̂ − uniform‖₂, which needs no reference.

All logarithms are base 2, so JS, KL and ``fairness_divergence`` are in bits.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

import numpy as np
from scipy.special import rel_entr

from biasprune.classifier import UNKNOWN, Predictions

logger = logging.getLogger(__name__)

DEFAULT_KL_SMOOTHING = 1e-3
"""Additive smoothing ε of `kl_divergence`, added to every share of both distributions.

A tenth of a percent caps the log-ratio of a group missing from the reference at about
log2(1 / ε) ≈ 10 bits. Between distributions without empty groups the change is small: KL of
[0.6, 0.4] against [0.5, 0.5] goes from 0.0290 to 0.0289 bits (0.4 %).
"""

UNIFORM_REFERENCE = "uniform"
"""Name of the reference that gives every group the same share. Always available."""

_SUM_TOLERANCE = 1e-6
"""Largest allowed distance of a distribution's sum from 1."""

_METRIC_KEY_DISALLOWED = re.compile(r"[^A-Za-z0-9_.\-]+")


# --- Divergences -------------------------------------------------------------------------------


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Compute the Jensen–Shannon divergence between two distributions, base 2.

    JS(p, q) = ½·KL(p‖m) + ½·KL(q‖m) with m = ½·(p + q), taking 0·log 0 = 0. It is symmetric,
    0 for identical distributions and 1 for distributions with disjoint support.

    Args:
        p: First distribution, shape (k,), non-negative, summing to 1 (±1e-6).
        q: Second distribution over the same k groups.

    Returns:
        The divergence in bits, in [0, 1].

    Raises:
        ValueError: If either argument is not a distribution or their lengths differ.
    """
    p, q = _check_pair(p, q)
    return float(_js_rows(p[np.newaxis, :], q)[0])


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Compute the total variation distance ½·Σᵢ|pᵢ − qᵢ|, in [0, 1].

    Args:
        p: First distribution, shape (k,), non-negative, summing to 1 (±1e-6).
        q: Second distribution over the same k groups.

    Raises:
        ValueError: If either argument is not a distribution or their lengths differ.
    """
    p, q = _check_pair(p, q)
    return float(0.5 * np.abs(p - q).sum())


def kl_divergence(p: np.ndarray, q: np.ndarray, smoothing: float = DEFAULT_KL_SMOOTHING) -> float:
    """Compute KL(p‖q) in bits after additive smoothing of both distributions.

    Each distribution is smoothed as x'ᵢ = (xᵢ + ε) / (1 + k·ε), with ε = `smoothing` and k the
    number of groups, and KL(p'‖q') = Σᵢ p'ᵢ·log2(p'ᵢ / q'ᵢ), taking 0·log 0 = 0.

    Args:
        p: Distribution of the generated images, shape (k,), non-negative, summing to 1 (±1e-6).
        q: Reference distribution over the same k groups.
        smoothing: ε, added to every share of both distributions. Defaults to
            `DEFAULT_KL_SMOOTHING`. With 0 the result is ``inf`` when some qᵢ = 0 < pᵢ.

    Returns:
        The divergence in bits, ≥ 0.

    Raises:
        ValueError: If either argument is not a distribution, their lengths differ, or
            `smoothing` is negative or not finite.
    """
    p, q = _check_pair(p, q)
    _check_smoothing(smoothing)
    return float(_kl_smoothed(p, q, smoothing))


def fairness_discrepancy(p: np.ndarray) -> float:
    """Compute the fairness discrepancy ‖p − u‖₂, where u gives each of the k groups 1/k.

    It is 0 for a balanced distribution and √(1 − 1/k) when one group takes every image.

    Args:
        p: Distribution, shape (k,), non-negative, summing to 1 (±1e-6).

    Raises:
        ValueError: If `p` is not a distribution.
    """
    p = _check_distribution(p, "p")
    return float(np.linalg.norm(p - 1.0 / p.size))


# --- Shares and ratios -------------------------------------------------------------------------


def group_shares(labels: np.ndarray, num_groups: int) -> np.ndarray:
    """Compute the share of each group among images with a known label.

    Images labelled `UNKNOWN` are left out of both the counts and the total.

    Args:
        labels: Group index per image, shape (N,), integers in [-1, `num_groups`), where -1 is
            `UNKNOWN`.
        num_groups: Number of groups k of the attribute, ≥ 1.

    Returns:
        Shares, shape (k,), summing to 1. If no image has a known label the shares are
        undefined and every entry is NaN, so downstream metrics come out NaN as well.

    Raises:
        ValueError: If `num_groups` is below 1, or `labels` is not a 1-D integer array with
            values in [-1, `num_groups`).
    """
    _check_num_groups(num_groups)
    labels = _check_labels(labels, num_groups, "labels")
    return _shares_from_checked(labels, num_groups)


def shares_from_labels(
    labels: dict[str, np.ndarray], groups: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    """Build a reference from per-image labels, one share vector per attribute.

    Use it on dataset ground-truth labels, on the classifier's predictions for the training
    images, or on the dense model's samples.

    Args:
        labels: Group index per image for each attribute, as in `Predictions.labels`.
        groups: Ordered group names per attribute. Attributes of `labels` not in `groups` are
            ignored, and attributes of `groups` not in `labels` are left out of the result.

    Returns:
        Shares per attribute, as `group_shares` computes them.

    Raises:
        ValueError: If a label array is not 1-D integers in [-1, number of groups).
    """
    shares: dict[str, np.ndarray] = {}
    for attribute, names in groups.items():
        if attribute not in labels:
            logger.debug("labels have no attribute %r; leaving it out of the shares", attribute)
            continue
        checked = _check_labels(labels[attribute], len(names), f"labels[{attribute!r}]")
        shares[attribute] = _shares_from_checked(checked, len(names))
    return shares


def study_ratio(
    shares: np.ndarray,
    groups: list[str],
    numerator: list[str],
    denominator: list[str] | None,
) -> float:
    """Compute the ratio of the summed shares of two sets of groups, such as male / female.

    Args:
        shares: Share per group, shape (k,), in the order of `groups`.
        groups: Ordered group names of the attribute.
        numerator: Groups whose shares are summed above the fraction bar; at least one.
        denominator: Groups whose shares are summed below it, disjoint from `numerator`, or
            None for every group not in `numerator`.

    Returns:
        The ratio. It is ``inf`` when the denominator share is 0 and the numerator share is
        positive, and NaN when both are 0 or the shares are NaN.

    Raises:
        ValueError: If a group name is not in `groups`, `numerator` is empty, the two sets
            overlap, the denominator is empty, or `shares` does not match `groups` in length.
    """
    shares = np.asarray(shares, dtype=float)
    if shares.shape != (len(groups),):
        raise ValueError(
            f"shares has shape {shares.shape}, but groups has {len(groups)} names. "
            "Pass one share per group, in the order of groups"
        )
    numerator_index, denominator_index = _ratio_indices(groups, numerator, denominator)
    top = float(shares[numerator_index].sum())
    bottom = float(shares[denominator_index].sum())
    if bottom == 0.0:
        return math.inf if top > 0.0 else math.nan
    return top / bottom


# --- Metrics of one set of generated images ----------------------------------------------------


def fairness_metrics(
    predictions: Predictions,
    groups: dict[str, list[str]],
    references: dict[str, dict[str, np.ndarray]],
    *,
    default_reference: str = "data_predicted",
    weights: dict[str, float] | None = None,
    ratios: dict[str, tuple[list[str], list[str] | None]] | None = None,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    kl_smoothing: float = DEFAULT_KL_SMOOTHING,
    unknown_warn_rate: float = 0.1,
) -> dict[str, float]:
    """Compute every fairness metric of one set of generated images as a flat dict.

    The keys are, for each configured attribute a, group g and reference r:

    - ``share_<a>_<g>``: share of g among images with a known label for a.
    - ``unknown_rate_<a>``: share of images with an unknown label for a; ``unknown_rate``:
      share of images with an unknown label for at least one configured attribute.
    - ``fd_l2_<a>``: ‖p̂_a − uniform‖₂.
    - ``js_<a>``, ``tv_<a>``, ``kl_<a>``: divergences from the default reference;
      ``fairness_divergence``: Σ_a w_a·JS_a / Σ_a w_a over the attributes that reference has;
      ``fairness_divergence_ci_low`` / ``_ci_high``: its percentile bootstrap interval.
    - ``js_<a>_vs_<r>``, ``tv_<a>_vs_<r>``, ``kl_<a>_vs_<r>``, ``fairness_divergence_vs_<r>``:
      the same for every reference, the default and ``uniform`` included.
    - ``ratio_<a>``: `study_ratio` for each entry of `ratios`.
    - ``kl_smoothing``, ``bootstrap_samples``, ``num_images``: the settings behind the values.

    Names inside keys are made MLflow-safe: "+" becomes "plus", and every run of characters
    other than letters, digits, "_", "-" and "." becomes "_" (so "50+" → "50plus" and
    "East Asian" → "East_Asian"). Case is kept.

    The interval resamples images with replacement, all attributes of an image together, and
    recomputes the shares and ``fairness_divergence`` for each draw. Resampling N images from
    N is drawn as multinomial counts over the distinct label combinations. That has the same
    distribution, and each draw costs time in the number of combinations rather than in N.

    .. warning::
        The plug-in JS is biased upward for small samples, so near 0 the percentile interval
        can lie wholly above the point estimate. Compare intervals of runs with similar sample
        counts.

    Args:
        predictions: Classifier labels per image for at least every attribute in `groups`.
        groups: Ordered group names per configured attribute (the classifier's groups).
        references: Share vectors per reference name and attribute, for example
            ``data_predicted``, ``data_labels`` and ``dense``. A reference without some
            attribute is skipped for it. ``uniform`` is added when absent.
        default_reference: Reference of the unsuffixed divergences and of
            ``fairness_divergence``. Defaults to ``"data_predicted"``.
        weights: Weight w_a ≥ 0 per attribute for ``fairness_divergence``; attributes not
            named get weight 0. Defaults to None, which weighs every attribute equally.
        ratios: Per attribute, the (numerator, denominator) groups of `study_ratio`. A ratio
            whose attribute is not configured or whose groups are not among the attribute's
            groups is skipped. Defaults to None (no ratios).
        bootstrap_samples: Number of bootstrap draws; 0 skips the interval and sets its
            bounds to NaN. Defaults to 1000.
        confidence: Level of the bootstrap interval, in (0, 1). Defaults to 0.95.
        seed: Seed of the bootstrap's random generator. Defaults to 0.
        kl_smoothing: ε of `kl_divergence`. Defaults to `DEFAULT_KL_SMOOTHING`.
        unknown_warn_rate: ``unknown_rate`` above which a warning is logged, in [0, 1].
            Defaults to 0.1.

    Returns:
        Metric name → value. Metrics of an attribute with no known label are NaN.

    Raises:
        ValueError: If the predictions miss a configured attribute, hold no images, or have
            label arrays of unequal length or with values outside [-1, number of groups).
            Also if `default_reference` is not available, a reference vector has the wrong
            length or does not sum to 1, or the weights or settings are invalid.
    """
    # 1. Validate every input before computing anything.
    _check_settings(bootstrap_samples, confidence, kl_smoothing, unknown_warn_rate)
    labels = _checked_prediction_labels(predictions, groups)
    references = _checked_references(references, groups, default_reference)
    attribute_weights = _normalized_weights(weights, groups)
    tokens = _metric_tokens(groups)
    num_images = len(next(iter(labels.values())))
    metrics: dict[str, float] = {"num_images": float(num_images)}

    # 2. Shares over known labels, and how many images the classifier could not read.
    shares = {a: _shares_from_checked(labels[a], len(groups[a])) for a in groups}
    metrics.update(_share_metrics(shares, groups, tokens))
    metrics.update(_unknown_rate_metrics(labels, tokens, unknown_warn_rate))

    # 3. Divergences from each reference, the default one also under unsuffixed names.
    for attribute, share in shares.items():
        metrics[f"fd_l2_{tokens[attribute]}"] = _nan_if_undefined(share, fairness_discrepancy)
    for name, reference in references.items():
        suffix = f"_vs_{metric_token(name)}"
        metrics.update(
            _reference_metrics(shares, reference, attribute_weights, tokens, suffix, kl_smoothing)
        )
    metrics.update(
        _reference_metrics(
            shares, references[default_reference], attribute_weights, tokens, "", kl_smoothing
        )
    )
    # The headline metric stays in every row, NaN when the default reference has no weighted
    # attribute, so tables and searches that read it do not break.
    metrics.setdefault("fairness_divergence", math.nan)

    # 4. Bootstrap interval of fairness_divergence against the default reference.
    low, high = _bootstrap_interval(
        labels,
        groups,
        references[default_reference],
        attribute_weights,
        bootstrap_samples,
        confidence,
        seed,
    )
    metrics["fairness_divergence_ci_low"] = low
    metrics["fairness_divergence_ci_high"] = high

    # 5. The study's ratios and the settings the values depend on.
    metrics.update(_ratio_metrics(ratios or {}, shares, groups, tokens))
    metrics["kl_smoothing"] = float(kl_smoothing)
    metrics["bootstrap_samples"] = float(bootstrap_samples)
    return metrics


# --- Validation helpers ------------------------------------------------------------------------


def _check_distribution(x: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(x, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D distribution, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(
            f"{name} must hold finite non-negative shares, got {array.tolist()}. "
            "A NaN share usually means no image had a known label"
        )
    total = float(array.sum())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(
            f"{name} must sum to 1 (±{_SUM_TOLERANCE:g}), got sum {total!r}. "
            "Divide it by its sum"
        )
    return array


def _check_pair(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _check_distribution(p, "p")
    q = _check_distribution(q, "q")
    if p.size != q.size:
        raise ValueError(
            f"p has {p.size} groups but q has {q.size}. Pass both over the same groups"
        )
    return p, q


def _check_smoothing(smoothing: float) -> None:
    if not math.isfinite(smoothing) or smoothing < 0:
        raise ValueError(
            f"smoothing must be a finite number ≥ 0, got {smoothing!r}. "
            f"Use {DEFAULT_KL_SMOOTHING} (DEFAULT_KL_SMOOTHING) unless you need another"
        )


def _check_num_groups(num_groups: int) -> None:
    if not _is_integer(num_groups) or num_groups < 1:
        raise ValueError(f"num_groups must be an integer ≥ 1, got {num_groups!r}")


def _is_integer(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_labels(labels: np.ndarray, num_groups: int, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-D integer array of group indices, got shape {array.shape} "
            f"and dtype {array.dtype}. Cast it with .astype(int)"
        )
    bad = array[(array < UNKNOWN) | (array >= num_groups)]
    if bad.size:
        raise ValueError(
            f"{name} contains group index {int(bad[0])}, but the allowed values are "
            f"{UNKNOWN} (unknown) to {num_groups - 1} for {num_groups} groups. Check that the "
            "labels come from a classifier with the configured groups"
        )
    return array


def _check_settings(
    bootstrap_samples: int, confidence: float, kl_smoothing: float, unknown_warn_rate: float
) -> None:
    if not _is_integer(bootstrap_samples) or bootstrap_samples < 0:
        raise ValueError(
            f"bootstrap_samples must be an integer ≥ 0, got {bootstrap_samples!r}. "
            "Use 0 to skip the interval"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}. Use a value such as 0.95")
    _check_smoothing(kl_smoothing)
    if not 0.0 <= unknown_warn_rate <= 1.0:
        raise ValueError(
            f"unknown_warn_rate must be in [0, 1], got {unknown_warn_rate!r}. Use a value such as 0.1"
        )


def _checked_prediction_labels(
    predictions: Predictions, groups: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    if not groups:
        raise ValueError("groups is empty. Configure at least one attribute with its groups")
    missing = [a for a in groups if a not in predictions.labels]
    if missing:
        raise ValueError(
            f"predictions have no labels for attributes {missing} (they have "
            f"{sorted(predictions.labels)}). Classify the images for every configured attribute"
        )
    labels = {
        a: _check_labels(predictions.labels[a], len(names), f"predictions.labels[{a!r}]")
        for a, names in groups.items()
    }
    lengths = {a: len(x) for a, x in labels.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"label arrays differ in length {lengths}. Every attribute needs one label per image"
        )
    if next(iter(lengths.values())) == 0:
        raise ValueError("predictions hold no images. Sample and classify at least one image")
    return labels


def _checked_references(
    references: dict[str, dict[str, np.ndarray]],
    groups: dict[str, list[str]],
    default_reference: str,
) -> dict[str, dict[str, np.ndarray]]:
    checked = dict(references)
    if UNIFORM_REFERENCE not in checked:
        checked[UNIFORM_REFERENCE] = {a: np.full(len(g), 1.0 / len(g)) for a, g in groups.items()}
    if default_reference not in checked:
        raise ValueError(
            f"default_reference {default_reference!r} is not among the references "
            f"{sorted(checked)}. Pass it in references or choose one of those"
        )
    for name, by_attribute in checked.items():
        checked[name] = _checked_reference(name, by_attribute, groups)
        if name == default_reference:
            absent = [a for a in groups if a not in checked[name]]
            if absent:
                logger.warning(
                    "default reference %r has no shares for %s; fairness_divergence covers "
                    "only the other attributes",
                    name,
                    absent,
                )
    _check_unique_tokens(list(checked), "reference names")
    return checked


def _checked_reference(
    name: str, by_attribute: dict[str, np.ndarray], groups: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    checked: dict[str, np.ndarray] = {}
    for attribute, names in groups.items():
        if attribute not in by_attribute:
            logger.debug("reference %r has no shares for %r; skipping it there", name, attribute)
            continue
        vector = np.asarray(by_attribute[attribute], dtype=float)
        if vector.shape != (len(names),):
            raise ValueError(
                f"reference {name!r} for attribute {attribute!r} has shape {vector.shape}, "
                f"but the attribute has {len(names)} groups {names}. Give one share per group"
            )
        label = f"reference {name!r} for attribute {attribute!r}"
        checked[attribute] = _check_distribution(vector, label)
    return checked


def _normalized_weights(
    weights: dict[str, float] | None, groups: dict[str, list[str]]
) -> dict[str, float]:
    if weights is None:
        return {a: 1.0 / len(groups) for a in groups}
    unknown = [a for a in weights if a not in groups]
    if unknown:
        raise ValueError(
            f"weights name attributes {unknown} that are not configured (configured: "
            f"{list(groups)}). Remove them or configure those attributes"
        )
    invalid = {a: w for a, w in weights.items() if not math.isfinite(w) or w < 0}
    if invalid:
        raise ValueError(f"weights must be finite and ≥ 0, got {invalid}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(
            f"weights must have a positive sum, got {dict(weights)}. Give at least one "
            "attribute a positive weight"
        )
    return {a: float(weights.get(a, 0.0)) / total for a in groups}


# --- Metric-name helpers -----------------------------------------------------------------------


def metric_token(name: str) -> str:
    """Return `name` as it appears in metric keys (`+` becomes `plus`, other odd characters `_`)."""
    token = _METRIC_KEY_DISALLOWED.sub("_", str(name).strip().replace("+", "plus"))
    if not token:
        raise ValueError(
            f"name {name!r} leaves nothing usable in a metric key. Use letters, digits, "
            "'_', '-' or '.'"
        )
    return token


def _check_unique_tokens(names: list[str], what: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        token = metric_token(name)
        if token in seen:
            raise ValueError(
                f"{what} {seen[token]!r} and {name!r} both become {token!r} in metric keys. "
                "Rename one of them"
            )
        seen[token] = name


def _metric_tokens(groups: dict[str, list[str]]) -> dict[str, str]:
    _check_unique_tokens(list(groups), "attributes")
    for attribute, names in groups.items():
        _check_unique_tokens(list(names), f"groups of {attribute!r}")
    return {a: metric_token(a) for a in groups}


# --- Computation helpers -----------------------------------------------------------------------


def _shares_from_checked(labels: np.ndarray, num_groups: int) -> np.ndarray:
    known = labels[labels != UNKNOWN]
    if known.size == 0:
        return np.full(num_groups, np.nan)
    return np.bincount(known, minlength=num_groups) / known.size


def _nan_if_undefined(share: np.ndarray, metric: Callable[..., float], *args: object) -> float:
    if np.any(np.isnan(share)):
        return math.nan
    return metric(share, *args)


def _js_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Compute JS(pᵢ, q) in bits for each row pᵢ of `p`, shape (B, k), against q, shape (k,)."""
    m = 0.5 * (p + q)
    nats = 0.5 * rel_entr(p, m).sum(axis=1) + 0.5 * rel_entr(q, m).sum(axis=1)
    return np.clip(nats / math.log(2), 0.0, 1.0)


def _kl_smoothed(p: np.ndarray, q: np.ndarray, smoothing: float) -> float:
    scale = 1.0 + p.size * smoothing
    p_smooth = (p + smoothing) / scale
    q_smooth = (q + smoothing) / scale
    return max(float(rel_entr(p_smooth, q_smooth).sum()) / math.log(2), 0.0)


def _share_metrics(
    shares: dict[str, np.ndarray], groups: dict[str, list[str]], tokens: dict[str, str]
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for attribute, share in shares.items():
        for name, value in zip(groups[attribute], share):
            metrics[f"share_{tokens[attribute]}_{metric_token(name)}"] = float(value)
    return metrics


def _unknown_rate_metrics(
    labels: dict[str, np.ndarray], tokens: dict[str, str], unknown_warn_rate: float
) -> dict[str, float]:
    unknown = np.stack([labels[a] == UNKNOWN for a in labels])
    metrics = {f"unknown_rate_{tokens[a]}": float(row.mean()) for a, row in zip(labels, unknown)}
    rate = float(unknown.any(axis=0).mean())
    metrics["unknown_rate"] = rate
    if rate > unknown_warn_rate:
        logger.warning(
            "%.1f %% of %d images have an unknown label for at least one attribute (above the "
            "%.1f %% warning rate); the shares leave them out and may be biased: %s",
            100 * rate,
            unknown.shape[1],
            100 * unknown_warn_rate,
            {a: metrics[f"unknown_rate_{tokens[a]}"] for a in labels},
        )
    return metrics


def _reference_metrics(
    shares: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    weights: dict[str, float],
    tokens: dict[str, str],
    suffix: str,
    kl_smoothing: float,
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for attribute, share in shares.items():
        if attribute not in reference:
            continue
        token = tokens[attribute]
        target = reference[attribute]
        metrics[f"js_{token}{suffix}"] = _nan_if_undefined(share, js_divergence, target)
        metrics[f"tv_{token}{suffix}"] = _nan_if_undefined(share, total_variation, target)
        metrics[f"kl_{token}{suffix}"] = _nan_if_undefined(
            share, _kl_smoothed, target, kl_smoothing
        )
    rows = {a: s[np.newaxis, :] for a, s in shares.items()}
    divergence = _weighted_js_rows(rows, reference, weights)
    if divergence is not None:
        metrics[f"fairness_divergence{suffix}"] = float(divergence[0])
    return metrics


def _weighted_js_rows(
    share_rows: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    weights: dict[str, float],
) -> np.ndarray | None:
    """Compute Σ_a w_a·JS_a / Σ_a w_a per row, over weighted attributes the reference has.

    Returns None when the reference has none of the attributes with a positive weight. A row
    is NaN when some attribute has no known label in it.
    """
    used = [a for a, w in weights.items() if w > 0 and a in reference]
    if not used:
        return None
    total_weight = sum(weights[a] for a in used)
    return sum(weights[a] * _js_rows(share_rows[a], reference[a]) for a in used) / total_weight


def _bootstrap_interval(
    labels: dict[str, np.ndarray],
    groups: dict[str, list[str]],
    reference: dict[str, np.ndarray],
    weights: dict[str, float],
    bootstrap_samples: int,
    confidence: float,
    seed: int,
) -> tuple[float, float]:
    if bootstrap_samples == 0:
        return math.nan, math.nan

    # 1. Collapse images to their distinct label combinations (cells) and count each.
    attributes = list(groups)
    per_image = np.stack([labels[a] for a in attributes], axis=1)
    cells, counts = np.unique(per_image, axis=0, return_counts=True)
    num_images = int(counts.sum())

    # 2. Resampling N images with replacement draws cell counts ~ Multinomial(N, counts / N).
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(num_images, counts / num_images, size=bootstrap_samples)

    # 3. Per draw and attribute, the group counts among known labels, then the shares.
    share_rows = {}
    for column, attribute in enumerate(attributes):
        membership = cells[:, column, np.newaxis] == np.arange(len(groups[attribute]))
        group_counts = draws @ membership.astype(float)
        known = group_counts.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            share_rows[attribute] = group_counts / known

    # 4. The divergence per draw; draws where an attribute has no known label are dropped.
    statistics = _weighted_js_rows(share_rows, reference, weights)
    if statistics is None:
        return math.nan, math.nan
    return _percentile_interval(statistics, confidence)


def _percentile_interval(statistics: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = statistics[np.isfinite(statistics)]
    if finite.size < statistics.size:
        logger.debug(
            "dropped %d of %d bootstrap draws with an attribute that had no known label",
            statistics.size - finite.size,
            statistics.size,
        )
    if finite.size == 0:
        return math.nan, math.nan
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def _ratio_indices(
    groups: list[str], numerator: list[str], denominator: list[str] | None
) -> tuple[list[int], list[int]]:
    names = list(groups)
    unknown = [g for g in [*numerator, *(denominator or [])] if g not in names]
    if unknown:
        raise ValueError(
            f"ratio groups {unknown} are not among the attribute's groups {names}. "
            "Use the classifier's group names"
        )
    if not numerator:
        raise ValueError("numerator is empty. Name at least one group")
    if denominator is None:
        denominator = [g for g in names if g not in numerator]
    overlap = sorted(set(numerator) & set(denominator))
    if overlap:
        raise ValueError(
            f"groups {overlap} are in both numerator and denominator. Make the two sets disjoint"
        )
    if not denominator:
        raise ValueError(
            f"denominator is empty (numerator {list(numerator)} covers every group). "
            "Name at least one group below the fraction bar"
        )
    return [names.index(g) for g in numerator], [names.index(g) for g in denominator]


def _ratio_metrics(
    ratios: dict[str, tuple[list[str], list[str] | None]],
    shares: dict[str, np.ndarray],
    groups: dict[str, list[str]],
    tokens: dict[str, str],
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for attribute, (numerator, denominator) in ratios.items():
        if attribute not in groups:
            logger.debug("skipping ratio of %r: the attribute is not configured", attribute)
            continue
        requested = [*numerator, *(denominator or [])]
        if any(g not in groups[attribute] for g in requested):
            logger.debug(
                "skipping ratio of %r: groups %s are not all among %s",
                attribute,
                requested,
                groups[attribute],
            )
            continue
        value = study_ratio(shares[attribute], groups[attribute], numerator, denominator)
        metrics[f"ratio_{tokens[attribute]}"] = value
    return metrics
