"""Choosing the decision threshold on deflection angles, and grading risk.

Every prompt gets a deflection angle (degrees, larger = more likely unsafe). Calibration yields the
angles of known-unsafe and known-safe prompts; from these we pick a threshold (flag iff
``angle > threshold``) either by the One-head Defense rule (where the two angle densities cross,
:func:`kde_threshold`) or for a target false-positive rate (:func:`fpr_threshold`), and optionally a
:class:`RiskCalibration` that turns an angle into a graded risk in [0, 1].
"""

from __future__ import annotations

import math
from typing import Literal, overload

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import gaussian_kde

from ohd_guard.errors import CalibrationError, InvalidInputError
from ohd_guard.metrics import rates_at_threshold

__all__ = ["RiskCalibration", "ThresholdFit", "fpr_threshold", "kde_threshold", "manual_threshold"]

ThresholdMethod = Literal["kde_crossing", "no_crossing_midpoint", "target_fpr", "manual"]


class ThresholdFit(BaseModel):
    """A chosen threshold plus what it does on the calibration angles (flag iff angle > value)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: FiniteFloat
    method: ThresholdMethod
    balanced_accuracy: float = Field(ge=0.0, le=1.0)
    detection_rate: float = Field(ge=0.0, le=1.0)
    false_positive_rate: float = Field(ge=0.0, le=1.0)
    crossings: list[FiniteFloat] = Field(default_factory=list)  # all KDE crossings found, sorted


def _angles(x: ArrayLike, name: str) -> np.ndarray:
    """Validate one class of calibration angles: 1-D, finite, at least two values."""
    try:
        a = np.atleast_1d(np.asarray(x, dtype=float))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} angles must be numeric: {exc}") from exc
    if a.ndim != 1:
        raise InvalidInputError(f"{name} angles must be 1-D, got shape {a.shape}")
    if a.size < 2:
        raise InvalidInputError(f"need at least 2 {name} angles, got {a.size}")
    if not np.all(np.isfinite(a)):
        raise InvalidInputError(f"{name} angles contain NaN or infinite values")
    return a


def _check_direction(u: np.ndarray, s: np.ndarray, *, allow_equal: bool) -> tuple[float, float]:
    """Refuse calibration data whose safe angles are not below the unsafe ones (no usable signal)."""
    mu, ms = float(np.median(u)), float(np.median(s))
    if ms > mu or (ms == mu and not allow_equal):
        what = "above" if ms > mu else "equal to"
        raise CalibrationError(
            f"median safe angle ({ms:.4g}) is {what} the median unsafe angle ({mu:.4g}): the angle does "
            "not separate unsafe from safe prompts in this direction (wrong head or layer, swapped "
            "calibration sets, or an unsuitable model); refusing to calibrate a threshold"
        )
    return mu, ms


def _fit(value: float, method: ThresholdMethod, u: np.ndarray, s: np.ndarray, crossings=()) -> ThresholdFit:
    r = rates_at_threshold(np.concatenate([u, s]), np.r_[np.ones(u.size), np.zeros(s.size)], value)
    return ThresholdFit(
        value=value, method=method, balanced_accuracy=r.balanced_accuracy, detection_rate=r.detection_rate,
        false_positive_rate=r.false_positive_rate, crossings=sorted(float(c) for c in crossings),
    )


def manual_threshold(value: float, unsafe: ArrayLike, safe: ArrayLike) -> ThresholdFit:
    """Report what a hand-picked threshold does on calibration angles (method ``"manual"``)."""
    if not math.isfinite(value):
        raise InvalidInputError(f"threshold must be finite, got {value}")
    return _fit(float(value), "manual", _angles(unsafe, "unsafe"), _angles(safe, "safe"))


def _crossings(grid: np.ndarray, diff: np.ndarray) -> list[float]:
    """Zeros of ``diff`` on ``grid`` from sign changes, refined by linear interpolation.

    Differences below a tiny fraction of the peak density count as zero, so underflowed or
    round-off tails far from the data do not produce spurious crossings.
    """
    sign = np.sign(diff) * (np.abs(diff) > 1e-9 * np.abs(diff).max())
    idx = np.flatnonzero(sign)
    out = []
    for a, b in zip(idx[:-1], idx[1:]):
        if sign[a] != sign[b]:  # crosses somewhere in [grid[a], grid[b]] (b > a + 1 if zeros between)
            out.append(float(grid[a] - diff[a] * (grid[b] - grid[a]) / (diff[b] - diff[a])))
    return out


def kde_threshold(unsafe: ArrayLike, safe: ArrayLike, grid_size: int = 2048) -> ThresholdFit:
    """One-head Defense rule: threshold where the unsafe and safe angle densities cross.

    Densities are Gaussian KDEs (Scott bandwidth) evaluated on a grid spanning all angles. Where they
    cross, the two classes are equally likely under equal priors, so flagging above the crossing is
    the Bayes rule. Several crossings (multi-modal data) are ranked by balanced accuracy on the
    calibration angles, ties going to a crossing between the two medians (then the one nearest their
    midpoint). No crossing, or a KDE that cannot be fitted (e.g. zero variance), falls back to the
    midpoint of the two medians.
    """
    u, s = _angles(unsafe, "unsafe"), _angles(safe, "safe")
    if int(grid_size) < 3:
        raise InvalidInputError(f"grid_size must be at least 3, got {grid_size}")
    mu, ms = _check_direction(u, s, allow_equal=False)
    mid = (mu + ms) / 2.0
    try:
        ku, ks = gaussian_kde(u), gaussian_kde(s)
    except (np.linalg.LinAlgError, ValueError):  # singular covariance: a class has zero variance
        return _fit(mid, "no_crossing_midpoint", u, s)
    both = np.concatenate([u, s])
    grid = np.linspace(both.min(), both.max(), int(grid_size))
    crossings = _crossings(grid, ku(grid) - ks(grid))
    if not crossings:
        return _fit(mid, "no_crossing_midpoint", u, s)
    fits = [_fit(c, "kde_crossing", u, s, crossings) for c in crossings]
    best = max(
        fits,
        key=lambda f: (round(f.balanced_accuracy, 12), ms <= f.value <= mu, -abs(f.value - mid)),
    )
    return best


def fpr_threshold(unsafe: ArrayLike, safe: ArrayLike, target_fpr: float = 0.05) -> ThresholdFit:
    """Smallest threshold whose false-positive rate on the safe calibration angles is <= target.

    With ``n`` safe angles at most ``m = floor(target * n)`` may exceed the threshold, so it is the
    (n - m)-th smallest safe angle (an order statistic, not an interpolated quantile, which could
    overshoot the target). Ties only lower the realised rate. It is an empirical guarantee: expect
    the rate on new data to scatter around the target, more so with few safe angles.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise InvalidInputError(f"target_fpr must lie in [0, 1), got {target_fpr}")
    u, s = _angles(unsafe, "unsafe"), _angles(safe, "safe")
    _check_direction(u, s, allow_equal=True)
    m = int(math.floor(target_fpr * s.size + 1e-9))
    return _fit(float(np.sort(s)[s.size - m - 1]), "target_fpr", u, s)


class RiskCalibration(BaseModel):
    """Graded risk from an angle: ``risk = sigmoid(slope * f(angle) + intercept)``.

    ``f`` is the angle itself or ``log(max(angle, 0) + eps)``. Fitted by class-balanced logistic
    (Platt) regression, so ``risk`` estimates the probability that a prompt is unsafe *if unsafe
    and safe prompts were equally common*; for another prior ``pi`` of unsafe prompts, add
    ``log(pi / (1 - pi))`` to the logit. ``slope >= 0`` keeps risk non-decreasing in the angle.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    slope: FiniteFloat = Field(ge=0.0)
    intercept: FiniteFloat
    feature: Literal["angle", "log_angle"] = "log_angle"
    eps: FiniteFloat = Field(default=1e-3, gt=0.0)

    def _f(self, a: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(a, 0.0) + self.eps) if self.feature == "log_angle" else a

    @overload
    def risk(self, angles: float) -> float: ...
    @overload
    def risk(self, angles: ArrayLike) -> np.ndarray: ...

    def risk(self, angles):
        """Risk in [0, 1] of each angle (a float for a scalar input)."""
        a = np.asarray(angles, dtype=float)
        if not np.all(np.isfinite(a)):
            raise InvalidInputError("angles contain NaN or infinite values")
        r = expit(self.slope * self._f(a) + self.intercept)
        return float(r) if r.ndim == 0 else r

    def angle_at_risk(self, p: float = 0.5) -> float:
        """The angle where risk equals ``p`` (risk 0.5 plays the role of a threshold)."""
        if not 0.0 < p < 1.0:
            raise InvalidInputError(f"p must lie in (0, 1), got {p}")
        if self.slope == 0.0:
            raise CalibrationError("risk is constant (slope 0); no angle reaches a given risk")
        z = (math.log(p / (1.0 - p)) - self.intercept) / self.slope
        return math.exp(z) - self.eps if self.feature == "log_angle" else z

    @classmethod
    def fit(
        cls,
        unsafe: ArrayLike,
        safe: ArrayLike,
        feature: Literal["angle", "log_angle", "auto"] = "auto",
        l2: float = 1e-4,
        eps: float = 1e-3,
    ) -> RiskCalibration:
        """Maximum-likelihood fit with class-balanced weights and a small L2 penalty on the slope.

        The penalty (on the standardised slope) keeps perfectly separable calibration sets from
        driving the slope to infinity; at the default it flattens the slope of overlapping
        distributions by only a few per cent (risk errs slightly toward 0.5). ``"auto"`` keeps whichever feature has the lower weighted
        log-loss (``"log_angle"`` only when all angles are >= 0).
        """
        u, s = _angles(unsafe, "unsafe"), _angles(safe, "safe")
        if l2 < 0 or eps <= 0:
            raise InvalidInputError(f"need l2 >= 0 and eps > 0, got l2={l2}, eps={eps}")
        _check_direction(u, s, allow_equal=True)
        x = np.concatenate([u, s])
        if np.ptp(x) == 0:
            raise CalibrationError("all calibration angles are identical; risk cannot be calibrated")
        if feature == "log_angle" and x.min() < 0:
            raise InvalidInputError("log_angle needs non-negative angles")
        feats = [feature] if feature != "auto" else (["angle", "log_angle"] if x.min() >= 0 else ["angle"])
        sign = np.r_[np.ones(u.size), -np.ones(s.size)]
        w = np.r_[np.full(u.size, 0.5 / u.size), np.full(s.size, 0.5 / s.size)]  # sums to 1
        best: tuple[float, RiskCalibration] | None = None
        for name in feats:
            f = np.log(x + eps) if name == "log_angle" else x
            mean, sd = f.mean(), f.std()  # sd > 0: the angles are not all equal
            z = (f - mean) / sd

            def obj(p: np.ndarray) -> tuple[float, np.ndarray]:
                m = sign * (p[0] * z + p[1])  # noqa: B023 (minimize runs inside this iteration)
                g = -sign * w * expit(-m)  # d loss / d logit
                return float(w @ np.logaddexp(0.0, -m) + 0.5 * l2 * p[0] ** 2), np.array(
                    [g @ z + l2 * p[0], g.sum()]  # noqa: B023
                )

            res = minimize(obj, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)])
            a, b = (float(v) for v in res.x)
            model = cls(slope=a / sd, intercept=b - a * mean / sd, feature=name, eps=eps)
            loss = float(w @ np.logaddexp(0.0, -sign * (a * z + b)))
            if best is None or loss < best[0] - 1e-12:
                best = (loss, model)
        assert best is not None
        return best[1]
