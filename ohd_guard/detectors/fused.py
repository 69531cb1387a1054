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

from ohd_guard.calibrate import data_hash, evaluate_angles
from ohd_guard.detectors.base import DetectorState, GuardScored, StateDetector, as_input, library_version
from ohd_guard.detectors.features import Logistic, log_loss, out_of_fold, stratified_folds
from ohd_guard.detectors.probes import SAHs, SAHsState, _check_sets, _risk, _risk_or_none
from ohd_guard.errors import CalibrationError
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.metrics import auroc
from ohd_guard.profile import ModelFingerprint, Profile
from ohd_guard.scoring import DeflectionScorer
from ohd_guard.screening import MaskedBranch, PrefillDetector, PrefillReads, Reads, union

ANGLE_EPS = 1e-3


class FusedState(DetectorState):
    kind: Literal["fused"] = "fused"
    sahs: SAHsState
    ohd_heads: list[HeadRef]
    """Each head is masked alone: one deflection angle per head."""
    mask: MaskSpec
    score_layer: int
    features: list[str]
    l2: float
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    cv_auroc: float
    """AUROC of the out-of-fold fused scores on the calibration prompts."""


def _features(angles: np.ndarray, sahs_log_odds: np.ndarray) -> np.ndarray:
    return np.concatenate([np.log(np.maximum(angles, 0.0) + ANGLE_EPS), sahs_log_odds[:, None]], axis=1)


class Fused(GuardScored, StateDetector, PrefillDetector):
    """Logistic on ``log(angle + 1e-3)`` of up to ``n_angles`` selective heads and the SAHs log-odds.

    One angle (the default) keeps screening to one forward pass (the one-pass masked branch); more
    angles replay the layers above the lowest head for every extra head.

    Args:
        ohd_profile: the One-head Defense profile whose mask, score layer and selective heads
            (``top_heads``, eligible first) give the angles; without one, the chosen heads of a fast
            calibration run on the same prompts.
        sahs: an SAHs detector to fit (its options), default ``SAHs()``.
    """

    State = FusedState
    name = "Fused"
    kind = "fused"

    def __init__(self, ohd_profile: Profile | None = None, n_angles: int = 1, sahs: SAHs | None = None,
                 l2_grid: Sequence[float] = (1e-2, 1e-1, 1.0, 10.0), folds: int = 5, batch_size: int = 8, seed: int = 0):
        super().__init__()
        self.ohd_profile, self.n_angles, self.sahs = ohd_profile, n_angles, sahs or SAHs(batch_size=batch_size)
        self.l2_grid, self.folds, self.batch_size, self.seed = tuple(l2_grid), folds, batch_size, seed
        self._probe: Logistic | None = None

    def fit(self, model, processor, unsafe: Sequence[Any], safe: Sequence[Any],
            sahs_oof: np.ndarray | None = None) -> "Fused":
        """Fit SAHs (unless it is fitted already and ``sahs_oof``, its out-of-fold scores on
        ``unsafe + safe``, is given), the angles of the selective heads, then the combination."""
        _check_sets(unsafe, safe)
        t0 = time.perf_counter()
        profile = self.ohd_profile
        if profile is None:
            from ohd_guard.calibrate import calibrate
            from ohd_guard.detectors.ohd import mode_spec

            profile = calibrate(model, processor, [as_input(x) for x in unsafe], [as_input(x) for x in safe],
                                spec=mode_spec("fast"), strategy="fast", batch_size=self.batch_size)  # fmt: skip
        heads = _selective_heads(profile, self.n_angles)
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
        names = [f"log_angle {h}" for h in heads] + ["sahs_log_odds"]
        state = FusedState(
            library_version=library_version(), model=ModelFingerprint.of(model, processor), threshold=0.0,
            threshold_method="probability_0.5", n_unsafe=len(unsafe), n_safe=len(safe), sahs=self.sahs.state,
            ohd_heads=heads, mask=profile.mask, score_layer=profile.score_layer, features=names, l2=l2,
            mean=probe.mean.tolist(), scale=probe.scale.tolist(), coef=probe.coef.tolist(), intercept=probe.intercept,
            cv_auroc=auroc(oof, y), seconds=round(time.perf_counter() - t0, 2),
            risk=_risk_or_none(oof[y == 1], oof[y == 0]), data_hash=data_hash(list(unsafe) + list(safe)),
            metrics=[evaluate_angles("calibration (out-of-fold)", oof[y == 1], oof[y == 0], 0.0)],
        )  # fmt: skip
        self._bind(model, processor, state)
        return self

    def _bind(self, model, processor, state) -> None:
        super()._bind(model, processor, state)
        self.sahs = SAHs._from_state(state.sahs)
        self.sahs._bind(model, processor, state.sahs)
        self._probe = Logistic(np.array(state.mean), np.array(state.scale), np.array(state.coef), state.intercept)
        self._scoring_guard = None

    @classmethod
    def _from_state(cls, state: FusedState) -> "Fused":  # type: ignore[override]
        return cls(n_angles=len(state.ohd_heads))

    # -- the guard's side ----------------------------------------------------------------------------
    def reads(self) -> Reads:
        self._require_fitted()
        s = self.state
        branch = MaskedBranch(tuple((h,) for h in s.ohd_heads), s.mask, s.score_layer)  # type: ignore[union-attr]
        return union(self.sahs.reads(), Reads(masked=branch))

    @property
    def verdict_heads(self) -> tuple[HeadRef, ...]:
        return tuple(self.state.ohd_heads) if self.state is not None else ()  # type: ignore[union-attr]

    def score_reads(self, reads: PrefillReads) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Fused log-odds; details carry every angle, the SAHs log-odds and its top heads."""
        sahs, sahs_details = self.sahs.score_reads(reads)
        angles = reads.angles  # type: ignore[assignment]
        scores = self._probe.decision(_features(angles, sahs))  # type: ignore[union-attr]
        heads = self.state.ohd_heads  # type: ignore[union-attr]
        details = [
            {"angle": float(a[0]), "angles": {str(h): round(float(x), 6) for h, x in zip(heads, a)},
             "sahs_log_odds": round(float(z), 4), **d}
            for a, z, d in zip(angles, sahs, sahs_details)
        ]
        return scores, details

    def risk(self, scores: np.ndarray) -> np.ndarray:
        return _risk(self.state, scores)  # type: ignore[arg-type]

    def explain(self, score: float, flagged: bool, risk: float) -> str:
        return (f"fused log-odds {score:.3f} {'>' if flagged else '<='} threshold {self.threshold:.3f} (OhD angle at "
                f"{'+'.join(map(str, self.verdict_heads))} and SAHs; risk {risk:.2f}): "
                f"{'flagged as unsafe' if flagged else 'passed'}")


def _selective_heads(profile: Profile, n: int) -> list[HeadRef]:
    """The profile's head first, then its other top heads (eligible ones first), ``n`` in all."""
    if n < 1:
        raise CalibrationError(f"n_angles must be >= 1, got {n}")
    ranked = [profile.heads[0]] + [s.head for s in sorted(profile.top_heads, key=lambda s: not s.eligible)]
    heads = [h for h in dict.fromkeys(ranked) if h.layer < profile.score_layer]
    return heads[:n]
