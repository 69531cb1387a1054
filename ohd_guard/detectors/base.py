"""What every detector shares: a fitted :class:`~ohd_guard.profile.Profile` bound to one model, the
screening protocol the guard runs, and the helpers every ``fit`` uses.

A detector kind is fitted on unsafe and safe calibration prompts for one model
(``SAHs(**options).fit(model, processor, unsafe, safe)``, or ``SAHsProfile.fit(...)`` for the bare
artefact); its profile is saved, loaded with :func:`~ohd_guard.detectors.load_profile` and bound to a
model with ``profile.bind(model, processor)``, which refuses a model it was not fitted on. Scores
(higher = more unsafe, flag ``score > threshold``) always come from the guard's own screening
prefill (:func:`~ohd_guard.screening.score_conversations`), so evaluation measures what the guard
runs. Nothing here knows the guard.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar, Sequence, TypeVar

import numpy as np

from ohd_guard.datasets import LabelledPrompt
from ohd_guard.errors import CalibrationError, InvalidInputError
from ohd_guard.metrics import auroc, rates_at_threshold
from ohd_guard.profile import CalibrationMetrics, ModelFingerprint, Profile, library_version
from ohd_guard.screening import PrefillDetector, as_input, batched, length_order, score_conversations
from ohd_guard.threshold import RiskCalibration, kde_threshold

D = TypeVar("D", bound="Detector")

__all__ = ["Detector", "as_input", "batched", "check_sets", "data_hash", "evaluate_scores", "kde_or_midpoint",
           "length_order", "midpoint_of_medians", "probe_fields", "probe_threshold", "risk_of", "risk_or_none",
           "target_fpr_method", "target_fpr_threshold"]


# -- what every fit needs ----------------------------------------------------------------------
def check_sets(unsafe: Sequence[Any], safe: Sequence[Any], minimum: int = 2) -> None:
    """Every fit needs both classes: at least ``minimum`` prompts each."""
    if len(unsafe) < minimum or len(safe) < minimum:
        raise CalibrationError(f"need at least {minimum} unsafe and {minimum} safe prompts, got {len(unsafe)} and {len(safe)}")


def data_hash(items: Sequence[Any]) -> str:
    """Stable hash of calibration inputs (text and, for images, their pixels)."""
    h = hashlib.sha256()
    for it in items:
        if isinstance(it, LabelledPrompt):
            h.update(f"{it.label}\x00{it.text}\x00".encode())
            if it.image is not None:
                h.update(it.image.tobytes())
        elif hasattr(it, "digest"):
            h.update(it.digest().encode())
        else:
            h.update(repr(it).encode())
    return h.hexdigest()


def evaluate_scores(split: str, unsafe: np.ndarray, safe: np.ndarray, threshold: float) -> CalibrationMetrics:
    """AUROC and the rates at ``threshold`` of any detector's scores (angles, log-odds, cosines)."""
    scores = np.r_[unsafe, safe]
    labels = np.r_[np.ones(len(unsafe)), np.zeros(len(safe))]
    r = rates_at_threshold(scores, labels, threshold)
    return CalibrationMetrics(
        split=split, n_unsafe=len(unsafe), n_safe=len(safe), auroc=auroc(scores, labels),
        detection_rate=r.detection_rate, false_positive_rate=r.false_positive_rate,
        balanced_accuracy=r.balanced_accuracy,
    )


def midpoint_of_medians(unsafe: np.ndarray, safe: np.ndarray) -> float:
    """The fallback threshold when no density rule applies: halfway between the class medians."""
    return (float(np.median(unsafe)) + float(np.median(safe))) / 2


def kde_or_midpoint(unsafe: np.ndarray, safe: np.ndarray) -> tuple[float, str]:
    """The KDE crossing of the two score densities; the midpoint of the medians when the KDE rule refuses the data."""
    try:
        fit = kde_threshold(unsafe, safe)
        return float(fit.value), fit.method
    except (CalibrationError, InvalidInputError):
        return midpoint_of_medians(unsafe, safe), "median_midpoint"


def target_fpr_threshold(safe_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold flagging at most ``fpr`` of ``safe_scores`` (flag iff score > threshold);
    ``fpr=0`` is the highest safe score."""
    if not 0.0 <= fpr < 1.0:
        raise InvalidInputError(f"a target false-positive rate is in [0, 1), got {fpr}")
    s = np.sort(np.asarray(safe_scores, dtype=float))[::-1]
    k = int(np.floor(fpr * len(s) + 1e-9))  # this many safe scores may lie above the threshold
    return float(s[min(k, len(s) - 1)])


def target_fpr_method(fpr: float, n_safe: int, scored: str = "") -> str:
    """The ``threshold_method`` every kind records for a target false-positive rate: the target and how
    many benign prompts it was met on (``"target_fpr=0.05 on 400 benign prompts (out-of-fold)"``)."""
    return f"target_fpr={fpr:g} on {n_safe} benign prompts" + (f" ({scored})" if scored else "")


def probe_threshold(rule: str | float, oof: np.ndarray, y: np.ndarray,
                    scored: str = "out-of-fold") -> tuple[float, str]:
    """A probe's threshold from its calibration scores (out-of-fold for a fitted probe): ``"prob"``
    (log-odds 0, probability 0.5 under equal priors), ``"kde"`` (crossing of the two score densities)
    or a target false-positive rate on the safe calibration prompts (a number in (0, 1), e.g. ``0.01``)."""
    if rule == "prob":
        return 0.0, "probability_0.5"
    if rule == "kde":
        return kde_or_midpoint(oof[y == 1], oof[y == 0])
    if isinstance(rule, str):
        raise InvalidInputError(f"threshold must be 'prob', 'kde' or a target false-positive rate, not {rule!r}")
    fpr = float(rule)
    return target_fpr_threshold(oof[y == 0], fpr), target_fpr_method(fpr, int((y == 0).sum()), scored)


def probe_fields(model: Any, processor: Any, probe: Any, l2: float, oof: np.ndarray, y: np.ndarray,
                 rule: str | float, seconds: float, items: Sequence[Any]) -> dict[str, Any]:
    """The profile fields every probe kind fills the same way from its fit (weights, threshold, risk curve,
    out-of-fold metrics, provenance)."""
    threshold, method = probe_threshold(rule, oof, y)
    return dict(
        library_version=library_version(), model=ModelFingerprint.of(model, processor), threshold=threshold,
        threshold_method=method, n_unsafe=int((y == 1).sum()), n_safe=int((y == 0).sum()),
        seconds=round(seconds, 2), l2=l2, mean=probe.mean.tolist(), scale=probe.scale.tolist(),
        coef=probe.coef.tolist(), intercept=probe.intercept, cv_auroc=auroc(oof, y),
        risk=risk_or_none(oof[y == 1], oof[y == 0]), data_hash=data_hash(list(items)),
        metrics=[evaluate_scores("calibration (out-of-fold)", oof[y == 1], oof[y == 0], threshold)],
    )


def risk_or_none(unsafe: np.ndarray, safe: np.ndarray) -> RiskCalibration | None:
    """A risk curve fitted on calibration scores, or None (then risk is the logistic of the score)."""
    try:
        return RiskCalibration.fit(unsafe, safe)
    except (CalibrationError, InvalidInputError):
        return None


def risk_of(profile: Profile, scores: np.ndarray) -> np.ndarray:
    """Graded risk in [0, 1] of scores under ``profile`` (its risk curve, else the logistic of the log-odds)."""
    from scipy.special import expit

    s = np.asarray(scores, dtype=float)
    return np.asarray(profile.risk.risk(s)) if profile.risk is not None else expit(s)


# -- the detector -------------------------------------------------------------------------------
class Detector(PrefillDetector):
    """A fitted profile bound to one model: it scores conversations through the guard's screening
    path and is what the guard runs. Higher score = more unsafe; flag ``score > threshold``.

    Subclasses set :attr:`Profile` (their profile class), implement ``fit`` (options in ``__init__``),
    :meth:`from_profile` and the screening protocol (``reads``, ``score_reads``).
    """

    Profile: ClassVar[type[Profile]]
    name: str = "detector"
    batch_size: int = 8

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        kind = cls.__dict__.get("Profile")
        if kind is not None:
            Profile.SCORERS[kind.model_fields["kind"].default] = cls

    def __init__(self) -> None:
        self.model: Any = None
        self.processor: Any = None
        self.profile: Any = None
        self._stage: Any = None

    @property
    def fitted(self) -> bool:
        return self.profile is not None and self.model is not None

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise CalibrationError(f"{self.name} is not fitted: call fit() or bind a profile first")

    @property
    def threshold(self) -> float:
        self._require_fitted()
        return float(self.profile.threshold)

    def _bind(self, model: Any, processor: Any, profile: Any) -> None:
        """Attach a (checked) profile; subclasses extend this to build their scorer's state."""
        self.model, self.processor, self.profile, self._stage = model, processor, profile, None

    @classmethod
    def from_profile(cls: type[D], profile: Any, model: Any, processor: Any, verify: bool = True) -> D:
        """Bind ``profile`` to ``model`` without refitting (its fingerprint checked unless ``verify=False``)."""
        if not isinstance(profile, cls.Profile):
            raise InvalidInputError(f"{cls.__name__} takes a {cls.Profile.__name__}, not {type(profile).__name__}")
        if verify:
            profile.verify(model, processor)
        det = cls._configured(profile)
        det._bind(model, processor, profile)
        return det

    @classmethod
    def _configured(cls: type[D], profile: Any) -> D:
        """A detector whose options are those the profile was fitted with."""
        return cls()

    def risk(self, scores: np.ndarray) -> np.ndarray:
        return risk_of(self.profile, scores)

    def score(self, convs: Sequence[Any]) -> np.ndarray:
        """One score per conversation (higher = more unsafe), from the guard's own screening prefill."""
        self._require_fitted()
        return score_conversations([self], list(convs), batch_size=self.batch_size)[:, 0]

    def predict(self, convs: Sequence[Any]) -> np.ndarray:
        """True where the conversation is flagged unsafe."""
        return self.score(convs) > self.threshold

    def save(self, path: str | Path) -> Path:
        self._require_fitted()
        return self.profile.save(path)

    @classmethod
    def load(cls: type[D], path: str | Path, model: Any, processor: Any, allow_edited: bool = False) -> D:
        """Read a saved profile of this kind and bind it to ``model``, refusing a model it was not fitted on."""
        return cls.from_profile(cls.Profile.load(path, allow_edited=allow_edited), model, processor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, fitted={self.fitted})"
