"""Tests of group shares, divergences, study ratios and the fairness metric dict."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest

from biasprune.classifier import UNKNOWN, Predictions
from biasprune.fairness import (
    DEFAULT_KL_SMOOTHING,
    fairness_discrepancy,
    fairness_metrics,
    group_shares,
    js_divergence,
    kl_divergence,
    shares_from_labels,
    study_ratio,
    total_variation,
)

# p = [0.5, 0.5], q = [0.75, 0.25], m = (p + q) / 2 = [0.625, 0.375].
# KL(p‖m) = 0.5·log2(0.5/0.625) + 0.5·log2(0.5/0.375)
#         = 0.5·log2(0.8) + 0.5·log2(4/3) = -0.1609640 + 0.2075187 = 0.0465547
# KL(q‖m) = 0.75·log2(0.75/0.625) + 0.25·log2(0.25/0.375)
#         = 0.75·log2(1.2) + 0.25·log2(2/3) = 0.1972758 - 0.1462406 = 0.0510352
# JS = ½·0.0465547 + ½·0.0510352 = 0.0487949
P_HALF = np.array([0.5, 0.5])
Q_SKEWED = np.array([0.75, 0.25])
JS_HAND = 0.5 * (0.5 * math.log2(0.8) + 0.5 * math.log2(4 / 3)) + 0.5 * (
    0.75 * math.log2(1.2) + 0.25 * math.log2(2 / 3)
)
# KL(p‖q) unsmoothed = 0.5·log2(0.5/0.75) + 0.5·log2(0.5/0.25) = 0.5·(-0.5849625) + 0.5 = 0.2075187
KL_HAND = 0.5 * math.log2(2 / 3) + 0.5
# With ε = 1e-3 both are divided by 1 + 2ε = 1.002:
# p' = [0.5, 0.5], q' = [0.751, 0.251] / 1.002, so
# KL = 0.5·log2(0.501/0.751) + 0.5·log2(0.501/0.251) = 0.2065605
KL_DEFAULT_HAND = 0.5 * math.log2(0.501 / 0.751) + 0.5 * math.log2(0.501 / 0.251)

GROUPS = {"gender": ["male", "female"], "age": ["0-9", "10-49", "50+"]}
METRIC_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _predictions(**labels: list[int]) -> Predictions:
    arrays = {a: np.asarray(x, dtype=np.int64) for a, x in labels.items()}
    return Predictions(labels=arrays, confidence={a: np.ones(len(x)) for a, x in arrays.items()})


def _balanced_predictions() -> Predictions:
    # gender shares [0.5, 0.5]; age shares [0.25, 0.5, 0.25], no unknown labels.
    return _predictions(gender=[0, 1, 0, 1], age=[0, 1, 1, 2])


def _references() -> dict[str, dict[str, np.ndarray]]:
    return {
        "data_predicted": {"gender": Q_SKEWED, "age": np.array([0.25, 0.5, 0.25])},
        "dense": {"gender": P_HALF},
    }


# --- Divergences -------------------------------------------------------------------------------


def test_js_divergence_hand_value():
    assert js_divergence(P_HALF, Q_SKEWED) == pytest.approx(0.0487949406953985, abs=1e-9)
    assert js_divergence(P_HALF, Q_SKEWED) == pytest.approx(JS_HAND, abs=1e-9)


def test_total_variation_hand_value():
    # ½·(|0.5 - 0.75| + |0.5 - 0.25|) = ½·0.5 = 0.25
    assert total_variation(P_HALF, Q_SKEWED) == pytest.approx(0.25, abs=1e-9)


def test_kl_divergence_hand_value_unsmoothed():
    assert kl_divergence(P_HALF, Q_SKEWED, smoothing=0.0) == pytest.approx(KL_HAND, abs=1e-9)
    assert KL_HAND == pytest.approx(0.2075187496, abs=1e-9)


def test_kl_divergence_default_smoothing_hand_value():
    assert DEFAULT_KL_SMOOTHING == 1e-3
    assert kl_divergence(P_HALF, Q_SKEWED) == pytest.approx(KL_DEFAULT_HAND, abs=1e-9)


def test_kl_divergence_zero_in_q_finite():
    # ε = 0.25: p' = [0.75, 0.75] / 1.5 = [0.5, 0.5], q' = [1.25, 0.25] / 1.5 = [5/6, 1/6]
    # KL = 0.5·log2(0.5/(5/6)) + 0.5·log2(0.5/(1/6)) = 0.5·log2(0.6·3) = 0.5·log2(1.8) = 0.4239985
    assert kl_divergence(P_HALF, [1.0, 0.0], smoothing=0.25) == pytest.approx(
        0.5 * math.log2(1.8), abs=1e-9
    )
    # ε = 1e-3: q' = [1.001, 0.001] / 1.002, p' = [0.5, 0.5]
    # KL = 0.5·log2(0.5·1.002/1.001) + 0.5·log2(0.5·1.002/0.001) = 3.9850537
    default = kl_divergence(P_HALF, [1.0, 0.0])
    assert math.isfinite(default)
    assert default == pytest.approx(
        0.5 * math.log2(0.5 * 1.002 / 1.001) + 0.5 * math.log2(0.5 * 1.002 / 0.001), abs=1e-9
    )


def test_kl_divergence_zero_in_q_unsmoothed_is_inf():
    # 0.5·log2(0.5 / 0) = inf
    assert kl_divergence(P_HALF, [1.0, 0.0], smoothing=0.0) == math.inf


def test_kl_divergence_default_smoothing_small_effect():
    # Unsmoothed: 0.6·log2(1.2) + 0.4·log2(0.8) = 0.1578206 - 0.1287712 = 0.0290494
    unsmoothed = 0.6 * math.log2(1.2) + 0.4 * math.log2(0.8)
    assert kl_divergence([0.6, 0.4], P_HALF, smoothing=0.0) == pytest.approx(unsmoothed, abs=1e-9)
    assert kl_divergence([0.6, 0.4], P_HALF) == pytest.approx(unsmoothed, rel=0.01)


@pytest.mark.parametrize(
    ("p", "q"),
    [(P_HALF, Q_SKEWED), ([0.1, 0.2, 0.7], [0.6, 0.3, 0.1]), ([1.0, 0.0], [0.3, 0.7])],
)
def test_js_divergence_symmetric(p, q):
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_js_divergence_bounded(seed):
    rng = np.random.default_rng(seed)
    p, q = rng.dirichlet(np.full(5, 0.2), size=2)
    assert 0.0 <= js_divergence(p, q) <= 1.0


def test_js_divergence_disjoint_support_is_one():
    # m = [0.25, 0.25, 0.5]; KL([0.5, 0.5, 0]‖m) = log2(2) = 1 and KL([0, 0, 1]‖m) = log2(2) = 1
    assert js_divergence([0.5, 0.5, 0.0], [0.0, 0.0, 1.0]) == pytest.approx(1.0, abs=1e-12)


def test_js_divergence_identical_is_zero():
    assert js_divergence([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("function", [js_divergence, total_variation, kl_divergence])
@pytest.mark.parametrize(
    ("p", "q", "message"),
    [
        ([0.5, 0.6], P_HALF, "sum to 1"),
        ([1.5, -0.5], P_HALF, "non-negative"),
        ([math.nan, 1.0], P_HALF, "finite"),
        ([[0.5, 0.5]], P_HALF, "1-D"),
        ([0.2, 0.3, 0.5], P_HALF, "p has 3 groups but q has 2"),
    ],
)
def test_divergences_invalid(function, p, q, message):
    with pytest.raises(ValueError, match=message):
        function(p, q)


@pytest.mark.parametrize("smoothing", [-1e-3, math.inf, math.nan])
def test_kl_divergence_smoothing_invalid(smoothing):
    with pytest.raises(ValueError, match="smoothing must be a finite number"):
        kl_divergence(P_HALF, Q_SKEWED, smoothing=smoothing)


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        # √((0.75 - 0.5)² + (0.25 - 0.5)²) = √0.125 = 0.3535534
        ([0.75, 0.25], math.sqrt(0.125)),
        # √((1 - 1/3)² + 2·(1/3)²) = √(6/9) = 0.8164966
        ([1.0, 0.0, 0.0], math.sqrt(6 / 9)),
        ([0.25, 0.25, 0.25, 0.25], 0.0),
    ],
)
def test_fairness_discrepancy_hand_value(p, expected):
    assert fairness_discrepancy(p) == pytest.approx(expected, abs=1e-9)


# --- Shares and ratios -------------------------------------------------------------------------


def test_group_shares_excludes_unknown():
    # 4 known labels: group 0 twice, groups 1 and 2 once -> [2/4, 1/4, 1/4]
    labels = np.array([0, 0, 1, UNKNOWN, UNKNOWN, 2])
    np.testing.assert_allclose(group_shares(labels, 3), [0.5, 0.25, 0.25], atol=1e-12)


def test_group_shares_absent_group_is_zero():
    # 3 known labels, all group 1 -> [0, 1, 0]
    np.testing.assert_allclose(group_shares(np.array([1, 1, 1]), 3), [0.0, 1.0, 0.0], atol=1e-12)


def test_group_shares_all_unknown_is_nan():
    shares = group_shares(np.array([UNKNOWN, UNKNOWN]), 2)
    assert shares.shape == (2,)
    assert np.all(np.isnan(shares))


@pytest.mark.parametrize(
    ("labels", "num_groups", "message"),
    [
        (np.array([0, 3]), 3, "group index 3"),
        (np.array([0, -2]), 3, "group index -2"),
        (np.array([0.0, 1.0]), 2, "integer array"),
        (np.array([[0, 1]]), 2, "1-D"),
        (np.array([0, 1]), 0, "num_groups must be an integer"),
    ],
)
def test_group_shares_invalid(labels, num_groups, message):
    with pytest.raises(ValueError, match=message):
        group_shares(labels, num_groups)


def test_shares_from_labels_skips_missing_attribute():
    # gender: [0, 1, 1, -1] -> 3 known, [1/3, 2/3]; age is absent from the labels.
    shares = shares_from_labels({"gender": np.array([0, 1, 1, UNKNOWN])}, GROUPS)
    assert list(shares) == ["gender"]
    np.testing.assert_allclose(shares["gender"], [1 / 3, 2 / 3], atol=1e-12)


def test_shares_from_labels_invalid():
    with pytest.raises(ValueError, match=r"labels\['age'\] contains group index 5"):
        shares_from_labels({"age": np.array([0, 5])}, GROUPS)


@pytest.mark.parametrize(
    ("shares", "groups", "numerator", "denominator", "expected"),
    [
        # male / female = 0.6 / 0.4
        ([0.6, 0.4], ["male", "female"], ["male"], ["female"], 1.5),
        # 10-49 / others = 0.6 / (0.1 + 0.3)
        ([0.1, 0.6, 0.3], ["0-9", "10-49", "50+"], ["10-49"], None, 1.5),
        # (0-9 + 50+) / 10-49 = (0.1 + 0.3) / 0.6
        ([0.1, 0.6, 0.3], ["0-9", "10-49", "50+"], ["0-9", "50+"], ["10-49"], 0.4 / 0.6),
    ],
)
def test_study_ratio_hand_value(shares, groups, numerator, denominator, expected):
    assert study_ratio(np.array(shares), groups, numerator, denominator) == pytest.approx(
        expected, abs=1e-9
    )


def test_study_ratio_zero_denominator_is_inf():
    assert study_ratio(np.array([1.0, 0.0]), ["male", "female"], ["male"], ["female"]) == math.inf


def test_study_ratio_zero_over_zero_is_nan():
    shares = np.array([0.0, 0.0, 1.0])
    assert math.isnan(study_ratio(shares, ["a", "b", "c"], ["a"], ["b"]))


@pytest.mark.parametrize(
    ("numerator", "denominator", "message"),
    [
        (["white"], ["female"], "not among the attribute's groups"),
        ([], ["female"], "numerator is empty"),
        (["male"], ["male", "female"], "in both numerator and denominator"),
        (["male", "female"], None, "denominator is empty"),
    ],
)
def test_study_ratio_invalid(numerator, denominator, message):
    with pytest.raises(ValueError, match=message):
        study_ratio(np.array([0.5, 0.5]), ["male", "female"], numerator, denominator)


def test_study_ratio_shape_invalid():
    with pytest.raises(ValueError, match="shares has shape"):
        study_ratio(np.array([0.2, 0.3, 0.5]), ["male", "female"], ["male"], None)


# --- fairness_metrics --------------------------------------------------------------------------


def test_fairness_metrics_shares_exclude_unknown():
    # gender [0, 0, 1, -1]: 3 known -> [2/3, 1/3]; age [1, -1, 1, 0]: 3 known -> [1/3, 2/3, 0]
    predictions = _predictions(gender=[0, 0, 1, UNKNOWN], age=[1, UNKNOWN, 1, 0])
    metrics = fairness_metrics(predictions, GROUPS, {}, default_reference="uniform")
    assert metrics["share_gender_male"] == pytest.approx(2 / 3, abs=1e-12)
    assert metrics["share_gender_female"] == pytest.approx(1 / 3, abs=1e-12)
    assert metrics["share_age_0-9"] == pytest.approx(1 / 3, abs=1e-12)
    assert metrics["share_age_10-49"] == pytest.approx(2 / 3, abs=1e-12)
    assert metrics["share_age_50plus"] == pytest.approx(0.0, abs=1e-12)


def test_fairness_metrics_unknown_rate():
    # Image 3 is unknown for gender and image 1 for age: 1/4 each, 2/4 for either.
    predictions = _predictions(gender=[0, 0, 1, UNKNOWN], age=[1, UNKNOWN, 1, 0])
    metrics = fairness_metrics(predictions, GROUPS, {}, default_reference="uniform")
    assert metrics["unknown_rate_gender"] == pytest.approx(0.25, abs=1e-12)
    assert metrics["unknown_rate_age"] == pytest.approx(0.25, abs=1e-12)
    assert metrics["unknown_rate"] == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize(("warn_rate", "warned"), [(0.4, True), (0.5, False)])
def test_fairness_metrics_unknown_rate_warning(caplog, warn_rate, warned):
    # unknown_rate = 0.5: warns only when it exceeds the warning rate.
    predictions = _predictions(gender=[0, 0, 1, UNKNOWN], age=[1, UNKNOWN, 1, 0])
    with caplog.at_level(logging.WARNING, logger="biasprune.fairness"):
        fairness_metrics(
            predictions, GROUPS, {}, default_reference="uniform", unknown_warn_rate=warn_rate
        )
    assert any("unknown label" in r.message for r in caplog.records) is warned


def test_fairness_metrics_divergences_hand_value():
    # gender shares [0.5, 0.5] against [0.75, 0.25]; age shares equal the reference.
    metrics = fairness_metrics(_balanced_predictions(), GROUPS, _references())
    for suffix in ("", "_vs_data_predicted"):
        assert metrics[f"js_gender{suffix}"] == pytest.approx(JS_HAND, abs=1e-9)
        assert metrics[f"tv_gender{suffix}"] == pytest.approx(0.25, abs=1e-9)
        assert metrics[f"kl_gender{suffix}"] == pytest.approx(KL_DEFAULT_HAND, abs=1e-9)
        assert metrics[f"js_age{suffix}"] == pytest.approx(0.0, abs=1e-12)
        assert metrics[f"tv_age{suffix}"] == pytest.approx(0.0, abs=1e-12)


def test_fairness_metrics_fd_l2():
    # gender: ‖[0.5, 0.5] - 0.5‖ = 0; age: ‖[0.25, 0.5, 0.25] - 1/3‖ = √(2·(1/12)² + (1/6)²) = √(1/24)
    metrics = fairness_metrics(_balanced_predictions(), GROUPS, _references())
    assert metrics["fd_l2_gender"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["fd_l2_age"] == pytest.approx(math.sqrt(1 / 24), abs=1e-9)


def test_fairness_metrics_uniform_reference_added():
    # gender shares equal the uniform [0.5, 0.5]; age: TV = ½·(1/12 + 1/6 + 1/12) = 1/6
    metrics = fairness_metrics(_balanced_predictions(), GROUPS, _references())
    assert metrics["js_gender_vs_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["tv_age_vs_uniform"] == pytest.approx(1 / 6, abs=1e-9)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        # Equal weights: (JS_gender + JS_age) / 2 = (JS_HAND + 0) / 2
        (None, JS_HAND / 2),
        # 3 : 1 -> (3·JS_HAND + 1·0) / 4
        ({"gender": 3.0, "age": 1.0}, 0.75 * JS_HAND),
        # age unnamed gets weight 0
        ({"gender": 2.0}, JS_HAND),
        ({"age": 1.0}, 0.0),
    ],
)
def test_fairness_metrics_weighted_divergence(weights, expected):
    metrics = fairness_metrics(_balanced_predictions(), GROUPS, _references(), weights=weights)
    assert metrics["fairness_divergence"] == pytest.approx(expected, abs=1e-9)
    assert metrics["fairness_divergence_vs_data_predicted"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"race": 1.0}, "not configured"),
        ({"gender": -1.0, "age": 2.0}, "finite and ≥ 0"),
        ({"gender": 0.0, "age": 0.0}, "positive sum"),
    ],
)
def test_fairness_metrics_weights_invalid(weights, message):
    with pytest.raises(ValueError, match=message):
        fairness_metrics(_balanced_predictions(), GROUPS, _references(), weights=weights)


def test_fairness_metrics_reference_attribute_skipped():
    # "dense" has gender only: its divergence is JS_gender alone, [0.5, 0.5] vs itself = 0.
    metrics = fairness_metrics(_balanced_predictions(), GROUPS, _references())
    assert "js_age_vs_dense" not in metrics
    assert metrics["js_gender_vs_dense"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["fairness_divergence_vs_dense"] == pytest.approx(0.0, abs=1e-12)


def test_fairness_metrics_default_reference_invalid():
    with pytest.raises(ValueError, match=r"'data_labels' is not among .*'data_predicted', 'dense'"):
        fairness_metrics(
            _balanced_predictions(), GROUPS, _references(), default_reference="data_labels"
        )


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        (np.array([0.5, 0.3, 0.2]), "has shape \\(3,\\)"),
        (np.array([0.5, 0.6]), "must sum to 1"),
    ],
)
def test_fairness_metrics_reference_vector_invalid(vector, message):
    references = _references()
    references["dense"] = {"gender": vector}
    with pytest.raises(ValueError, match=f"reference 'dense' for attribute 'gender'.*{message}"):
        fairness_metrics(_balanced_predictions(), GROUPS, references)


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        (_predictions(gender=[0, 2], age=[0, 1]), r"labels\['gender'\] contains group index 2"),
        (_predictions(gender=[0, 1], age=[0, -3]), r"labels\['age'\] contains group index -3"),
        (_predictions(gender=[0, 1]), r"no labels for attributes \['age'\]"),
        (_predictions(gender=[0, 1], age=[0]), "differ in length"),
        (_predictions(gender=[], age=[]), "no images"),
    ],
)
def test_fairness_metrics_predictions_invalid(predictions, message):
    with pytest.raises(ValueError, match=message):
        fairness_metrics(predictions, GROUPS, _references())


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"bootstrap_samples": -1}, "bootstrap_samples"),
        ({"confidence": 1.0}, "confidence"),
        ({"kl_smoothing": -0.1}, "smoothing"),
        ({"unknown_warn_rate": 1.5}, "unknown_warn_rate"),
    ],
)
def test_fairness_metrics_settings_invalid(setting, message):
    with pytest.raises(ValueError, match=message):
        fairness_metrics(_balanced_predictions(), GROUPS, _references(), **setting)


def test_fairness_metrics_ratios():
    # gender [0, 0, 0, 1]: male/female = 0.75/0.25 = 3; age [0, 1, 1, 2]: 0.5 / (0.25 + 0.25) = 1
    predictions = _predictions(gender=[0, 0, 0, 1], age=[0, 1, 1, 2])
    ratios = {
        "gender": (["male"], ["female"]),
        "age": (["10-49"], None),
        "race": (["white"], ["black"]),
    }
    metrics = fairness_metrics(predictions, GROUPS, _references(), ratios=ratios)
    assert metrics["ratio_gender"] == pytest.approx(3.0, abs=1e-9)
    assert metrics["ratio_age"] == pytest.approx(1.0, abs=1e-9)
    assert "ratio_race" not in metrics


def test_fairness_metrics_ratio_unknown_group_skipped():
    ratios = {"age": (["20-29"], None)}
    metrics = fairness_metrics(_balanced_predictions(), GROUPS, _references(), ratios=ratios)
    assert "ratio_age" not in metrics


def test_fairness_metrics_settings_recorded():
    metrics = fairness_metrics(
        _balanced_predictions(), GROUPS, _references(), bootstrap_samples=50, kl_smoothing=0.01
    )
    assert metrics["kl_smoothing"] == pytest.approx(0.01, abs=1e-15)
    assert metrics["bootstrap_samples"] == pytest.approx(50.0, abs=0)
    assert metrics["num_images"] == pytest.approx(4.0, abs=0)


def test_fairness_metrics_sanitized_names():
    groups = {"race": ["White", "East Asian", "Latino/Hispanic"], "age": ["0-9", "10-49", "50+"]}
    predictions = _predictions(race=[0, 1, 2, 2], age=[0, 1, 2, 1])
    references = {"dense model": {"race": np.array([0.5, 0.25, 0.25])}}
    metrics = fairness_metrics(
        predictions, groups, references, default_reference="dense model", bootstrap_samples=10
    )
    # race shares [1/4, 1/4, 2/4]
    assert metrics["share_race_East_Asian"] == pytest.approx(0.25, abs=1e-12)
    assert metrics["share_race_Latino_Hispanic"] == pytest.approx(0.5, abs=1e-12)
    assert metrics["share_age_50plus"] == pytest.approx(0.25, abs=1e-12)
    assert metrics["share_age_10-49"] == pytest.approx(0.5, abs=1e-12)
    assert "js_race_vs_dense_model" in metrics
    assert all(METRIC_KEY.match(key) for key in metrics)


def test_fairness_metrics_sanitized_names_collision_invalid():
    groups = {"race": ["East Asian", "East_Asian"]}
    with pytest.raises(ValueError, match="both become 'East_Asian'"):
        fairness_metrics(_predictions(race=[0, 1]), groups, {}, default_reference="uniform")


def test_fairness_metrics_default_reference_unweighted_nan():
    # "dense" has gender only, but only age has a positive weight: no attribute to average.
    metrics = fairness_metrics(
        _balanced_predictions(),
        GROUPS,
        _references(),
        default_reference="dense",
        weights={"age": 1.0},
        bootstrap_samples=10,
    )
    assert math.isnan(metrics["fairness_divergence"])
    assert math.isnan(metrics["fairness_divergence_ci_low"])
    assert "fairness_divergence_vs_dense" not in metrics


def test_fairness_metrics_all_unknown_attribute_nan():
    predictions = _predictions(gender=[UNKNOWN, UNKNOWN], age=[0, 1])
    metrics = fairness_metrics(predictions, GROUPS, _references(), bootstrap_samples=20)
    assert math.isnan(metrics["share_gender_male"])
    assert math.isnan(metrics["js_gender"])
    assert math.isnan(metrics["fd_l2_gender"])
    assert math.isnan(metrics["fairness_divergence"])
    assert metrics["unknown_rate"] == pytest.approx(1.0, abs=1e-12)


# --- Bootstrap interval ------------------------------------------------------------------------


def _skewed_predictions(num_images: int) -> Predictions:
    # 70 % male, and ages 20 % / 60 % / 20 %, repeated to `num_images` (a multiple of 10).
    repeats = num_images // 10
    gender = np.tile([0] * 7 + [1] * 3, repeats)
    age = np.tile([0, 0, 1, 1, 1, 1, 1, 1, 2, 2], repeats)
    return _predictions(gender=gender.tolist(), age=age.tolist())


def test_fairness_metrics_bootstrap_constant_sample():
    # Every image is male and aged 10-49, so every resample has the same shares and both bounds
    # equal the point estimate.
    # gender p = [1, 0] vs [0.5, 0.5]: m = [0.75, 0.25],
    # JS = ½·log2(1/0.75) + ½·(0.5·log2(0.5/0.75) + 0.5·log2(0.5/0.25)) = 0.3112781
    # age p = [0, 1, 0] equals the reference, JS = 0; equal weights -> 0.3112781 / 2
    predictions = _predictions(gender=[0] * 20, age=[1] * 20)
    references = {"data_predicted": {"gender": P_HALF, "age": np.array([0.0, 1.0, 0.0])}}
    metrics = fairness_metrics(predictions, GROUPS, references, bootstrap_samples=50)
    expected = (0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5)) / 2
    assert metrics["fairness_divergence"] == pytest.approx(expected, abs=1e-9)
    assert metrics["fairness_divergence_ci_low"] == pytest.approx(expected, abs=1e-9)
    assert metrics["fairness_divergence_ci_high"] == pytest.approx(expected, abs=1e-9)


def test_fairness_metrics_bootstrap_contains_estimate():
    metrics = fairness_metrics(_skewed_predictions(400), GROUPS, _references(), seed=1)
    assert metrics["fairness_divergence_ci_low"] < metrics["fairness_divergence"]
    assert metrics["fairness_divergence"] < metrics["fairness_divergence_ci_high"]


def test_fairness_metrics_bootstrap_narrows():
    def width(num_images: int) -> float:
        metrics = fairness_metrics(_skewed_predictions(num_images), GROUPS, _references())
        return metrics["fairness_divergence_ci_high"] - metrics["fairness_divergence_ci_low"]

    # The interval width shrinks like 1/√N: 100× the images gives about a tenth of the width.
    assert width(10_000) < 0.2 * width(100)


def test_fairness_metrics_bootstrap_reproducible():
    def interval(seed: int) -> tuple[float, float]:
        metrics = fairness_metrics(_skewed_predictions(200), GROUPS, _references(), seed=seed)
        return metrics["fairness_divergence_ci_low"], metrics["fairness_divergence_ci_high"]

    assert interval(7) == interval(7)
    assert interval(7) != interval(8)


def test_fairness_metrics_bootstrap_disabled_nan():
    metrics = fairness_metrics(_balanced_predictions(), GROUPS, _references(), bootstrap_samples=0)
    assert math.isnan(metrics["fairness_divergence_ci_low"])
    assert math.isnan(metrics["fairness_divergence_ci_high"])
    assert metrics["bootstrap_samples"] == pytest.approx(0.0, abs=0)
