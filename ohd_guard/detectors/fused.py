"""A fused detector: a logistic regression on One-head Defense angles and the SAHs log-odds.

Both signals come from the same screening prefill: the SAHs heads are read from the unmasked pass,
and the masked branch measures one deflection angle per selective head. The combination is fitted
on *out-of-fold* SAHs scores (an in-sample probe score would look perfect and drown the angles), so
the weights say what the angles add on prompts the probe has not seen.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import model_validator

from ohd_guard.detectors.base import (
    Detector,
    as_input,
    check_sets,
    data_hash,
    evaluate_scores,
    probe_threshold,
    risk_or_none,
)
from ohd_guard.detectors.features import Logistic, log_loss, out_of_fold, stratified_folds
from ohd_guard.detectors.ohd import OhdProfile, calibrate, mode_spec
from ohd_guard.detectors.probes import ProbeProfile, SAHs, SAHsProfile
from ohd_guard.errors import CalibrationError
from ohd_guard.metrics import auroc
from ohd_guard.profile import ModelFingerprint, library_version
from ohd_guard.scoring import DeflectionScorer
from ohd_guard.screening import MaskedBranch, PrefillReads, Reads, union
from ohd_guard.types import HeadRef, MaskSpec

ANGLE_EPS = 1e-3


class FusedProfile(ProbeProfile):
    """The fused detector: its SAHs probe, the masked heads whose angles it reads, and the combination."""

    kind: Literal["fused"] = "fused"
    sahs: SAHsProfile
    ohd_heads: list[HeadRef]
    """Each head is masked alone: one deflection angle per head."""
    mask: MaskSpec
    score_layer: int
    features: list[str]

    @model_validator(mode="after")
    def _is_a_detector(self) -> "FusedProfile":
        if self.sahs.model != self.model:
            raise ValueError("the nested SAHs profile was fitted on another model than the fused profile")
        if not self.mask.alpha < 1.0:
            raise ValueError("mask.alpha must be below 1 (1.0 leaves the heads unmasked: every angle is 0)")
        if not 1 <= self.score_layer <= self.model.num_layers:
            raise ValueError(f"score_layer {self.score_layer} is outside the model's {self.model.num_layers} layers")
        self.check_heads(self.ohd_heads, "masked head")
        if any(h.layer >= self.score_layer for h in self.ohd_heads):
            raise ValueError(f"a masked head is at or above score_layer {self.score_layer}: its angle is always 0")
        self.check_probe(len(self.ohd_heads) + 1)
        self.check_detector()
        return self

    @classmethod
    def fit(cls, model: Any, processor: Any, unsafe: Sequence[Any], safe: Sequence[Any], **options: Any) -> "FusedProfile":
        """Fit the fused detector (options: :class:`Fused`'s) and return its profile."""
        return Fused(**options).fit(model, processor, unsafe, safe).profile



def _features(angles: np.ndarray, sahs_log_odds: np.ndarray) -> np.ndarray:
    return np.concatenate([np.log(np.maximum(angles, 0.0) + ANGLE_EPS), sahs_log_odds[:, None]], axis=1)


class Fused(Detector):
    """Logistic on ``log(angle + 1e-3)`` of up to ``n_angles`` selective heads and the SAHs log-odds.

    One angle (the default) keeps screening to one forward pass (the one-pass masked branch); more
    angles replay the layers above the lowest head for every extra head.

    Args:
        ohd_profile: the One-head Defense profile whose mask, score layer and selective heads
            (``top_heads``, eligible first) give the angles; without one, the chosen heads of a fast
            calibration run on the same prompts.
        sahs: an SAHs detector to fit (its options), default ``SAHs()``.
        threshold: ``"prob"`` (probability 0.5, default), ``"kde"`` or a target false-positive rate on
            the safe calibration prompts' out-of-fold scores (``0.05``).
    """

    Profile = FusedProfile
    name = "Fused"
    kind = "fused"

    def __init__(self, ohd_profile: OhdProfile | None = None, n_angles: int = 1, sahs: SAHs | None = None,
                 l2_grid: Sequence[float] = (1e-2, 1e-1, 1.0, 10.0), folds: int = 5, batch_size: int = 8, seed: int = 0,
                 threshold: Literal["prob", "kde"] | float = "prob"):
        super().__init__()
        self.ohd_profile, self.n_angles, self.sahs = ohd_profile, n_angles, sahs or SAHs(batch_size=batch_size)
        self.l2_grid, self.folds, self.batch_size, self.seed = tuple(l2_grid), folds, batch_size, seed
        self.threshold_rule = threshold
        self._probe: Logistic | None = None

    def fit(self, model, processor, unsafe: Sequence[Any], safe: Sequence[Any],
            sahs_oof: np.ndarray | None = None) -> "Fused":
        """Fit SAHs (unless it is fitted already and ``sahs_oof``, its out-of-fold scores on
        ``unsafe + safe``, is given), the angles of the selective heads, then the combination."""
        check_sets(unsafe, safe)
        t0 = time.perf_counter()
        profile = self.ohd_profile
        if profile is None:
            profile = calibrate(model, processor, [as_input(x) for x in unsafe], [as_input(x) for x in safe],
                                spec=mode_spec("fast"), strategy="fast", batch_size=self.batch_size)  # fmt: skip
        heads = selective_heads(profile, self.n_angles)
        if sahs_oof is None or not self.sahs.fitted:
            self.sahs.fit(model, processor, unsafe, safe)
            sahs_oof = self.sahs.oof_
        oof_sahs = np.asarray(sahs_oof, dtype=float)
        if oof_sahs.shape != (len(unsafe) + len(safe),):
            raise CalibrationError(f"sahs_oof has {oof_sahs.shape} scores for {len(unsafe) + len(safe)} prompts")
        scorer = DeflectionScorer(model, processor, spec=profile.mask, score_layer=profile.score_layer)
        convs = [as_input(x) for x in list(unsafe) + list(safe)]
        angles = scorer.angles(convs, heads, batch_size=self.batch_size)
        y = np.r_[np.ones(len(unsafe), int), np.zeros(len(safe), int)]
        X = _features(angles, oof_sahs)
        folds = stratified_folds(y, min(self.folds, int(min((y == 1).sum(), (y == 0).sum()))), self.seed)
        cv = {l2: out_of_fold(X, y, l2, folds) for l2 in self.l2_grid}
        l2 = min(self.l2_grid, key=lambda v: (log_loss(cv[v], y), -v))
        oof = cv[l2]
        probe = Logistic.fit(X, y, l2)
        threshold, method = probe_threshold(self.threshold_rule, oof, y)
        names = [f"log_angle {h}" for h in heads] + ["sahs_log_odds"]
        fused = FusedProfile(
            library_version=library_version(), model=ModelFingerprint.of(model, processor), threshold=threshold,
            threshold_method=method, n_unsafe=len(unsafe), n_safe=len(safe), sahs=self.sahs.profile,
            ohd_heads=heads, mask=profile.mask, score_layer=profile.score_layer, features=names, l2=l2,
            mean=probe.mean.tolist(), scale=probe.scale.tolist(), coef=probe.coef.tolist(), intercept=probe.intercept,
            cv_auroc=auroc(oof, y), seconds=round(time.perf_counter() - t0, 2),
            risk=risk_or_none(oof[y == 1], oof[y == 0]), data_hash=data_hash(list(unsafe) + list(safe)),
            metrics=[evaluate_scores("calibration (out-of-fold)", oof[y == 1], oof[y == 0], threshold)],
        )  # fmt: skip
        self._bind(model, processor, fused)
        return self

    def _bind(self, model, processor, profile) -> None:
        super()._bind(model, processor, profile)
        self.sahs = SAHs.from_profile(profile.sahs, model, processor, verify=False)  # same model: checked above
        self._probe = profile.logistic()

    @classmethod
    def _configured(cls, profile: FusedProfile) -> "Fused":  # type: ignore[override]
        return cls(n_angles=len(profile.ohd_heads))

    # -- the guard's side ----------------------------------------------------------------------------
    def reads(self) -> Reads:
        self._require_fitted()
        p = self.profile
        branch = MaskedBranch(tuple((h,) for h in p.ohd_heads), p.mask, p.score_layer)
        return union(self.sahs.reads(), Reads(masked=branch))

    @property
    def verdict_heads(self) -> tuple[HeadRef, ...]:
        return tuple(self.profile.ohd_heads) if self.profile is not None else ()

    def score_reads(self, reads: PrefillReads) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Fused log-odds; details carry every angle, the SAHs log-odds and its top heads."""
        sahs, sahs_details = self.sahs.score_reads(reads)
        angles: np.ndarray = reads.angles  # type: ignore[assignment]
        scores = self._probe.decision(_features(angles, sahs))  # type: ignore[union-attr]
        heads = self.profile.ohd_heads
        details = [
            {"angle": float(a[0]), "angles": {str(h): round(float(x), 6) for h, x in zip(heads, a)},
             "sahs_log_odds": round(float(z), 4), **d}
            for a, z, d in zip(angles, sahs, sahs_details)
        ]
        return scores, details

    def explain(self, score: float, flagged: bool, risk: float) -> str:
        return (f"fused log-odds {score:.3f} {'>' if flagged else '<='} threshold {self.threshold:.3f} (OhD angle at "
                f"{'+'.join(map(str, self.verdict_heads))} and SAHs; risk {risk:.2f}): "
                f"{'flagged as unsafe' if flagged else 'passed'}")


def selective_heads(profile: OhdProfile, n: int) -> list[HeadRef]:
    """The profile's head first, then its other top heads (eligible ones first), ``n`` in all."""
    if n < 1:
        raise CalibrationError(f"n_angles must be >= 1, got {n}")
    ranked = [profile.heads[0]] + [s.head for s in sorted(profile.top_heads, key=lambda s: not s.eligible)]
    heads = [h for h in dict.fromkeys(ranked) if h.layer < profile.score_layer]
    return heads[:n]
