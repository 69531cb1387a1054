"""Detection metrics for angle-based screening.

Conventions used throughout: label 1 = unsafe (the positive class), 0 = safe; a higher score means
"more likely unsafe"; an input is *flagged* when ``score > threshold`` (strictly), the same rule the
guard applies at screening time, so the numbers here describe what the guard will actually do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import mannwhitneyu, rankdata

from ohd_guard.errors import InvalidInputError

__all__ = [
    "DetectionRates",
    "auroc",
    "average_precision",
    "f1_at_threshold",
    "bootstrap_auroc_ci",
    "rates_at_threshold",
    "roc_curve",
    "tpr_at_fpr",
]


def _split(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``scores``/``labels`` and return (positive scores, negative scores)."""
    try:
        s = np.asarray(scores, dtype=float)
        y = np.asarray(labels)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"scores and labels must be numeric arrays: {exc}") from exc
    if s.ndim != 1 or y.ndim != 1 or s.shape != y.shape:
        raise InvalidInputError(f"scores and labels must be 1-D of equal length, got {s.shape} and {y.shape}")
    if not np.all(np.isfinite(s)):
        raise InvalidInputError("scores contain NaN or infinite values")
    if y.dtype == bool:
        y = y.astype(int)
    if not np.all((y == 0) | (y == 1)):
        raise InvalidInputError("labels must be 0 (safe) or 1 (unsafe)")
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        raise InvalidInputError(f"both classes are needed, got {pos.size} unsafe and {neg.size} safe")
    return pos, neg


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """P(score of a random unsafe item > score of a random safe one), ties counting half."""
    pos, neg = _split(scores, labels)
    u = mannwhitneyu(pos, neg, alternative="two-sided", method="asymptotic").statistic
    return float(u) / (pos.size * neg.size)


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)`` for the rule ``score > threshold``.

    Thresholds are the distinct scores in decreasing order followed by ``-inf``, so the curve runs
    from (0, 0) to (1, 1) and its trapezoid area equals :func:`auroc` (ties give diagonal steps).
    """
    pos, neg = _split(scores, labels)
    thresholds = np.append(np.unique(np.concatenate([pos, neg]))[::-1], -np.inf)
    ps, ns = np.sort(pos), np.sort(neg)
    tpr = (pos.size - np.searchsorted(ps, thresholds, side="right")) / pos.size
    fpr = (neg.size - np.searchsorted(ns, thresholds, side="right")) / neg.size
    return fpr, tpr, thresholds


def tpr_at_fpr(scores: ArrayLike, labels: ArrayLike, max_fpr: float = 0.05) -> float:
    """Best detection rate reachable by a threshold whose false-positive rate is <= ``max_fpr``.

    Only thresholds actually realisable on the data count (no interpolation between ROC points).
    """
    if not 0.0 <= max_fpr <= 1.0:
        raise InvalidInputError(f"max_fpr must lie in [0, 1], got {max_fpr}")
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(tpr[fpr <= max_fpr + 1e-12].max())  # (0, 0) always qualifies


@dataclass(frozen=True)
class DetectionRates:
    """What a fixed threshold does on labelled data."""

    detection_rate: float  # TPR: unsafe items flagged
    false_positive_rate: float  # safe items flagged
    balanced_accuracy: float  # 1 - (FNR + FPR) / 2, insensitive to the class ratio
    n_pos: int
    n_neg: int


def rates_at_threshold(scores: ArrayLike, labels: ArrayLike, threshold: float) -> DetectionRates:
    """Detection rate, false-positive rate and balanced accuracy of ``score > threshold``."""
    try:
        threshold = float(threshold)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"threshold must be a number, got {threshold!r}") from exc
    if np.isnan(threshold):
        raise InvalidInputError("threshold must not be NaN")
    pos, neg = _split(scores, labels)
    tpr = float(np.mean(pos > threshold))
    fpr = float(np.mean(neg > threshold))
    return DetectionRates(tpr, fpr, 1.0 - ((1.0 - tpr) + fpr) / 2.0, int(pos.size), int(neg.size))


def f1_at_threshold(scores: ArrayLike, labels: ArrayLike, threshold: float) -> float:
    """F1 of ``score > threshold`` with unsafe as the positive class, at the set's own class ratio
    (the number guard-model papers report; unlike AUROC it moves with the ratio and the threshold)."""
    pos, neg = _split(scores, labels)
    tp, fp = float(np.sum(pos > threshold)), float(np.sum(neg > threshold))
    fn = pos.size - tp
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the precision-recall curve (average precision, step-wise, ties counted together):
    threshold-free like AUROC, but it reflects how rare unsafe items are in the set."""
    pos, neg = _split(scores, labels)
    s = np.r_[pos, neg]
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # the last index of each group of tied scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall_gain = np.diff(np.r_[0.0, tp]) / pos.size
    return float(np.sum(precision * recall_gain))


def bootstrap_auroc_ci(
    scores: ArrayLike, labels: ArrayLike, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUROC.

    Resampling is stratified (within each class) so every replicate keeps both classes and the
    calibration set's class ratio; this reflects the uncertainty of small calibration sets.
    """
    if n < 1 or not 0.0 < level < 1.0:
        raise InvalidInputError(f"need n >= 1 and 0 < level < 1, got n={n}, level={level}")
    pos, neg = _split(scores, labels)
    rng = np.random.default_rng(seed)
    stats = np.empty(n)
    chunk = max(1, 2_000_000 // (pos.size + neg.size))  # bound memory of the rank matrix
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        bp = pos[rng.integers(0, pos.size, size=(k, pos.size))]
        bn = neg[rng.integers(0, neg.size, size=(k, neg.size))]
        ranks = rankdata(np.concatenate([bp, bn], axis=1), axis=1)  # midranks: ties count half
        u = ranks[:, : pos.size].sum(axis=1) - pos.size * (pos.size + 1) / 2.0
        stats[start : start + k] = u / (pos.size * neg.size)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
