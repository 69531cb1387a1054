"""Metrics, threshold rules and risk calibration on synthetic angle distributions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ohd_guard.errors import CalibrationError, InvalidInputError
from ohd_guard.metrics import (
    DetectionRates,
    auroc,
    bootstrap_auroc_ci,
    rates_at_threshold,
    roc_curve,
    tpr_at_fpr,
)
from ohd_guard.threshold import (
    RiskCalibration,
    ThresholdFit,
    fpr_threshold,
    kde_threshold,
    manual_threshold,
)


def normals(mu_u: float, mu_s: float, sd: float = 3.0, n: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(mu_u, sd, n), rng.normal(mu_s, sd, n)


def labelled(unsafe, safe):
    return np.r_[unsafe, safe], np.r_[np.ones(len(unsafe)), np.zeros(len(safe))]


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([3, 4, 1, 2], [1, 1, 0, 0], 1.0),
        ([1, 2, 3, 4], [1, 1, 0, 0], 0.0),
        ([5, 5, 5, 5], [1, 0, 1, 0], 0.5),  # all ties count half
        ([1, 2, 3, 0, 2], [1, 1, 1, 0, 0], 4.5 / 6),  # pairs: 4 wins + 1 tie out of 6
        ([0.9, 0.1, 0.8, 0.4], [1, 0, 0, 1], 0.75),
    ],
)
def test_auroc_hand_computed(scores, labels, expected):
    assert auroc(scores, labels) == pytest.approx(expected)


def test_auroc_equals_trapezoid_area_of_roc():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=300), 1)  # rounding creates many ties
    labels = (rng.random(300) < 0.4 + 0.2 * (scores > 0)).astype(int)
    fpr, tpr, thr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc(scores, labels), abs=1e-12)
    # each ROC point is exactly what rates_at_threshold reports for its threshold
    r = rates_at_threshold(scores, labels, thr[5])
    assert (r.false_positive_rate, r.detection_rate) == (fpr[5], tpr[5])


def test_tpr_at_fpr():
    scores = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    labels = [1, 1, 0, 1, 0, 1, 0, 0, 0, 0]  # 4 unsafe, 6 safe
    assert tpr_at_fpr(scores, labels, 0.0) == 0.5  # threshold 8: flags 10, 9
    assert tpr_at_fpr(scores, labels, 1 / 6) == 0.75  # one safe allowed: flags 10..7
    assert tpr_at_fpr(scores, labels, 2 / 6) == 1.0
    assert tpr_at_fpr(scores, labels, 1.0) == 1.0
    with pytest.raises(InvalidInputError):
        tpr_at_fpr(scores, labels, 1.5)


def test_rates_at_threshold_is_strict():
    r = rates_at_threshold([1, 2, 3, 4], [0, 0, 1, 1], 3.0)  # 3 is not flagged
    assert r == DetectionRates(0.5, 0.0, 0.75, 2, 2)
    with pytest.raises(InvalidInputError):
        rates_at_threshold([1, 2], [0, 1], float("nan"))


def test_bootstrap_ci_brackets_auroc():
    u, s = normals(22, 20, n=200)
    scores, labels = labelled(u, s)
    lo, hi = bootstrap_auroc_ci(scores, labels, n=500, seed=3)
    assert lo < auroc(scores, labels) < hi and hi - lo < 0.15
    assert bootstrap_auroc_ci(scores, labels, n=500, seed=3) == (lo, hi)  # seeded


@pytest.mark.parametrize(
    ("scores", "labels"),
    [
        ([1, 2, 3], [1, 1, 1]),  # no safe items
        ([1, 2, 3], [0, 0, 0]),  # no unsafe items
        ([], []),
        ([1, 2], [0, 1, 1]),  # length mismatch
        ([1, float("nan")], [0, 1]),
        ([1, 2], [0, 2]),  # bad label
    ],
)
def test_metrics_reject_invalid_input(scores, labels):
    with pytest.raises(InvalidInputError):
        auroc(scores, labels)
    with pytest.raises(InvalidInputError):
        roc_curve(scores, labels)


# ----------------------------------------------------------------------------- thresholds


def test_kde_threshold_well_separated():
    u, s = normals(60, 20, sd=4)
    fit = kde_threshold(u, s)
    assert fit.method == "kde_crossing" and s.max() < fit.value < u.min()
    assert fit.balanced_accuracy > 0.95 and fit.value in fit.crossings
    assert isinstance(fit, ThresholdFit)
    with pytest.raises(Exception):  # frozen
        fit.value = 0.0


@pytest.mark.parametrize(("mu_u", "mu_s", "sd"), [(26, 20, 3), (35, 25, 5)])
def test_kde_threshold_near_theoretical_crossing(mu_u, mu_s, sd):
    u, s = normals(mu_u, mu_s, sd=sd, n=4000, seed=7)
    fit = kde_threshold(u, s)
    assert fit.method == "kde_crossing"
    assert fit.value == pytest.approx((mu_u + mu_s) / 2, abs=0.15 * sd)  # equal variances: midpoint


def test_kde_threshold_no_crossing_falls_back_to_median_midpoint():
    # two points each: the broad safe KDE stays above the unsafe one over the whole data range
    fit = kde_threshold([0.2, 8.3], [0.4, 6.1])
    assert fit.method == "no_crossing_midpoint" and fit.crossings == []
    assert fit.value == pytest.approx((4.25 + 3.25) / 2)


def test_kde_threshold_zero_variance_falls_back():
    safe = np.random.default_rng(0).normal(10, 2, 50)
    fit = kde_threshold([30.0] * 5, safe)  # gaussian_kde raises LinAlgError on constant data
    assert fit.method == "no_crossing_midpoint" and fit.crossings == []
    assert fit.value == pytest.approx((30 + np.median(safe)) / 2) and fit.balanced_accuracy == 1.0
    fit = kde_threshold([30.0] * 5, [10.0] * 5)  # both degenerate
    assert fit.method == "no_crossing_midpoint" and fit.value == 20.0 and fit.balanced_accuracy == 1.0


def test_kde_threshold_several_crossings_picks_best_balanced_accuracy():
    rng = np.random.default_rng(2)
    safe = np.r_[rng.normal(10, 1.5, 700), rng.normal(50, 1.5, 300)]  # bimodal: some safe prompts deflect a lot
    unsafe = rng.normal(30, 2, 1000)
    fit = kde_threshold(unsafe, safe)
    assert len(fit.crossings) >= 2
    assert 15 < fit.value < 25  # the low crossing: catches all unsafe, 30 % false positives
    assert fit.detection_rate > 0.99 and fit.balanced_accuracy == pytest.approx(0.85, abs=0.03)
    for c in fit.crossings:
        assert manual_threshold(c, unsafe, safe).balanced_accuracy <= fit.balanced_accuracy


def test_kde_threshold_inverted_signal_raises():
    u, s = normals(20, 40)
    with pytest.raises(CalibrationError, match="median safe angle"):
        kde_threshold(u, s)
    with pytest.raises(CalibrationError):
        fpr_threshold(u, s)
    with pytest.raises(CalibrationError):
        RiskCalibration.fit(u, s)
    with pytest.raises(CalibrationError):
        kde_threshold([5.0, 5.0], [5.0, 5.0])  # identical: no signal at all


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.1, 0.333])
def test_fpr_threshold_meets_target(target):
    u, s = normals(26, 20, n=777, seed=4)
    fit = fpr_threshold(u, s, target)
    assert fit.method == "target_fpr" and fit.false_positive_rate <= target
    # smallest such threshold: the next safe angle below it would break the target
    below = np.sort(s)[np.sort(s) < fit.value].max()
    assert np.mean(s > below) > target
    assert fit.detection_rate == np.mean(u > fit.value)


def test_fpr_threshold_with_ties():
    fit = fpr_threshold([5, 6, 7], [1, 2, 2, 2, 3], target_fpr=0.2)
    assert fit.value == 2 and fit.false_positive_rate == 0.2


@pytest.mark.parametrize(
    ("unsafe", "safe"),
    [([1.0], [0.0, 0.5]), ([2.0, 3.0], [0.0]), ([], []), ([1.0, float("inf")], [0.0, 0.5]),
     ([1.0, 2.0], [0.0, float("nan")]), ([[1.0, 2.0]], [0.0, 0.5]), (["a", "b"], [0.0, 0.5])],
)
def test_threshold_rules_reject_invalid_input(unsafe, safe):
    for fn in (kde_threshold, fpr_threshold, RiskCalibration.fit):
        with pytest.raises(InvalidInputError):
            fn(unsafe, safe)


def test_bad_parameters_raise():
    u, s = normals(26, 20, n=50)
    with pytest.raises(InvalidInputError):
        fpr_threshold(u, s, target_fpr=1.0)
    with pytest.raises(InvalidInputError):
        kde_threshold(u, s, grid_size=2)
    with pytest.raises(InvalidInputError):
        manual_threshold(float("inf"), u, s)
    assert manual_threshold(23.0, u, s).method == "manual"


# ----------------------------------------------------------------------------- risk


@pytest.mark.parametrize("feature", ["angle", "log_angle", "auto"])
def test_risk_is_monotone_and_bounded(feature):
    u, s = normals(30, 20, n=1000)
    cal = RiskCalibration.fit(u, s, feature=feature)
    grid = np.linspace(0, 90, 500)
    r = cal.risk(grid)
    assert isinstance(r, np.ndarray) and r.shape == grid.shape
    assert np.all((r >= 0) & (r <= 1)) and np.all(np.diff(r) >= 0) and cal.slope > 0
    assert r[0] < 0.05 and r[-1] > 0.95
    assert isinstance(cal.risk(25.0), float)


def test_risk_half_at_crossing_of_equal_variance_normals():
    u, s = normals(30, 20, n=4000, seed=5)
    cal = RiskCalibration.fit(u, s, feature="angle")
    assert cal.risk(25.0) == pytest.approx(0.5, abs=0.05)  # sampling noise of the fit
    assert cal.angle_at_risk(0.5) == pytest.approx(25.0, abs=0.3)
    # under equal variances the Bayes log-odds slope is (mu_u - mu_s) / sd^2
    assert cal.slope == pytest.approx(10 / 9, rel=0.1)
    log_cal = RiskCalibration.fit(u, s, feature="log_angle")
    assert log_cal.risk(log_cal.angle_at_risk(0.8)) == pytest.approx(0.8)


def test_risk_separable_data_stays_finite():
    cal = RiskCalibration.fit([60.0, 61.0, 62.0], [10.0, 11.0, 12.0])
    assert np.isfinite(cal.slope) and cal.risk(11.0) < 0.1 and cal.risk(61.0) > 0.9


def test_risk_json_round_trip():
    u, s = normals(30, 20, n=300)
    cal = RiskCalibration.fit(u, s)
    text = cal.model_dump_json()
    back = RiskCalibration.model_validate_json(text)
    assert back == cal and back.model_dump_json() == text
    assert set(json.loads(text)) == {"slope", "intercept", "feature", "eps"}
    np.testing.assert_array_equal(back.risk(u), cal.risk(u))
    fit = kde_threshold(u, s)
    assert ThresholdFit.model_validate_json(fit.model_dump_json()) == fit


def test_risk_model_validation():
    with pytest.raises(ValueError):
        RiskCalibration(slope=-1.0, intercept=0.0)
    with pytest.raises(ValueError):
        RiskCalibration(slope=float("nan"), intercept=0.0)
    cal = RiskCalibration(slope=1.0, intercept=-3.0, feature="angle")
    with pytest.raises(InvalidInputError):
        cal.risk([1.0, float("nan")])
    with pytest.raises(InvalidInputError):
        RiskCalibration.fit([-1.0, 5.0], [-3.0, -2.0], feature="log_angle")
    assert RiskCalibration.fit([-1.0, 5.0, 6.0], [-3.0, -2.0, 0.5]).feature == "angle"  # auto skips log
