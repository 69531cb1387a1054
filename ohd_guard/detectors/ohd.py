"""One-head Defense as a :class:`Detector`, and the largest-effect head (Ships/Sahara-style) baseline.

Both score a prompt by the deflection angle of one masked head and threshold it with the same KDE
rule; they differ only in how the head is chosen. One-head Defense keeps heads that barely move
safe prompts (the selectivity rule) and ranks them by ``unsafe - safe``; the largest-effect
baseline takes the head that moves unsafe prompts most, whatever it does to safe ones. Comparing
the two measures what the selectivity rule buys. Both save a :class:`~ohd_guard.profile.Profile`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from ohd_guard.calibrate import calibrate, data_hash, evaluate_angles
from ohd_guard.detectors.base import Detector, GuardScored, as_input, library_version
from ohd_guard.datasets import evenly
from ohd_guard.errors import CalibrationError, InvalidInputError
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.metrics import auroc
from ohd_guard.profile import CalibrationSummary, HeadStats, ModelFingerprint, Profile
from ohd_guard.scoring import DeflectionScorer, all_heads
from ohd_guard.screening import MaskedBranch, PrefillDetector, PrefillReads, Reads
from ohd_guard.search import Strategy, score_heads
from ohd_guard.threshold import RiskCalibration, fpr_threshold, kde_threshold, manual_threshold

Mode = Literal["exact", "fast"]
_POSITIONS = {"exact": "all", "fast": "last"}


def mode_spec(mode: Mode, base: MaskSpec = MaskSpec()) -> MaskSpec:
    """``exact``: mask at every position (paper). ``fast``: only the last position (one decode step)."""
    if mode not in _POSITIONS:
        raise InvalidInputError(f"mode must be 'exact' or 'fast', not {mode!r}")
    return base.model_copy(update={"positions": _POSITIONS[mode]})


class OneHeadDefense(GuardScored, Detector, PrefillDetector):
    """The deflection angle of one head selected by the selectivity rule (wraps :func:`calibrate`).

    Args:
        mode: ``"exact"`` (paper, all positions) or ``"fast"`` (last position only).
        head: use this head instead of searching (e.g. from a shipped profile); the threshold is
            still fitted on the calibration prompts given to :meth:`fit`, in this mode.
        strategy, top_k, percentile: head search (see :func:`~ohd_guard.search.search_heads`).
        threshold: ``"kde"`` (density crossing, paper) or a target false-positive rate.
    """

    kind = "ohd"

    def __init__(
        self,
        mode: Mode = "exact",
        *,
        head: HeadRef | None = None,
        strategy: Strategy = "two-stage",
        top_k: int = 8,
        percentile: float = 80.0,
        threshold: Literal["kde"] | float = "kde",
        score_layer: int | None = None,
        mask: MaskSpec = MaskSpec(),
        batch_size: int = 8,
    ):
        super().__init__()
        self.spec = mode_spec(mode, mask)
        self.mode: Mode = mode
        self.head, self.strategy, self.top_k, self.percentile = head, strategy, top_k, percentile
        self.threshold_rule, self.score_layer, self.batch_size = threshold, score_layer, batch_size
        self.profile: Profile | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"OhD ({self.mode})"

    @property
    def threshold(self) -> float:
        self._require_fitted()
        return float(self.profile.threshold.value)  # type: ignore[union-attr]

    def _bind(self, model: Any, processor: Any, profile: Profile) -> None:
        self.model, self.processor, self.profile = model, processor, profile
        self._scoring_guard = None

    def fit(self, model, processor, unsafe: Sequence[Any], safe: Sequence[Any]) -> "OneHeadDefense":
        profile = calibrate(
            model, processor, [as_input(x) for x in unsafe], [as_input(x) for x in safe], spec=self.spec,
            score_layer=self.score_layer, head=self.head, strategy=self.strategy, top_k=self.top_k,
            percentile=self.percentile, threshold=self.threshold_rule, batch_size=self.batch_size,
        )
        self._bind(model, processor, profile)
        return self

    # -- the guard's side: the deflection angle of the profile's heads ------------------------------
    def reads(self) -> Reads:
        self._require_fitted()
        p = self.profile
        return Reads(masked=MaskedBranch((tuple(p.heads),), p.mask, p.score_layer))  # type: ignore[union-attr]

    @property
    def verdict_heads(self) -> tuple[HeadRef, ...]:
        return tuple(self.profile.heads) if self.profile is not None else ()

    def score_reads(self, reads: PrefillReads) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Deflection angle in degrees of each conversation."""
        angles = reads.angles[:, 0]  # type: ignore[index]
        return angles, [{"angle": float(a)} for a in angles]

    def risk(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(self.profile.risk.risk(np.asarray(scores, dtype=float)))  # type: ignore[union-attr]

    def explain(self, score: float, flagged: bool, risk: float) -> str:
        heads = "+".join(map(str, self.verdict_heads))
        return (f"deflection {score:.3f} deg {'>' if flagged else '<='} threshold {self.threshold:.3f} deg at head "
                f"{heads} (risk {risk:.2f}): {'flagged as unsafe' if flagged else 'passed'}")  # fmt: skip

    def save(self, path: str | Path) -> Path:
        self._require_fitted()
        return self.profile.save(path)  # type: ignore[union-attr]

    @classmethod
    def from_profile(cls, profile: Profile, model: Any, processor: Any, batch_size: int = 8,
                     verify: bool = True) -> "OneHeadDefense":
        """Bind a profile (checked against the model's fingerprint) without recalibrating."""
        if verify:
            profile.verify(model, processor)
        mode: Mode = "fast" if profile.mask.positions == "last" else "exact"
        det = cls(mode, head=profile.heads[0], mask=profile.mask, score_layer=profile.score_layer, batch_size=batch_size)
        det._bind(model, processor, profile)
        return det

    @classmethod
    def load(cls, path: str | Path, model: Any, processor: Any, allow_edited: bool = False) -> "OneHeadDefense":
        return cls.from_profile(Profile.load(path, allow_edited=allow_edited), model, processor)


def profile_from_angles(
    model, processor, head: HeadRef, spec: MaskSpec, score_layer: int, u: np.ndarray, s: np.ndarray, *,
    threshold: Literal["kde"] | float, calibration: Sequence[Any], search: str, seconds: float,
    top_heads: list[HeadStats],
) -> Profile:
    """A profile for a head chosen outside :func:`calibrate`, from its calibration angles.

    Unlike :func:`calibrate` it does not refuse a head whose safe angles are not below its unsafe
    ones: a baseline that picks such a head should be measured, not crash. It then gets the
    midpoint of the medians and a flat risk curve.
    """
    try:
        fit = kde_threshold(u, s) if threshold == "kde" else fpr_threshold(u, s, float(threshold))
        risk = RiskCalibration.fit(u, s)
    except CalibrationError:
        fit = manual_threshold((float(np.median(u)) + float(np.median(s))) / 2, u, s)
        risk = RiskCalibration(slope=0.0, intercept=0.0)
    n_u = len(u)
    return Profile(
        library_version=library_version(), model=ModelFingerprint.of(model, processor), heads=(head,), mask=spec,
        score_layer=score_layer, threshold=fit, risk=risk,
        calibration=CalibrationSummary(
            n_unsafe=n_u, n_safe=len(s), data_hash=data_hash(list(calibration)), search=search, seconds=round(seconds, 2)
        ),
        metrics=[evaluate_angles("calibration", u, s, fit.value)], top_heads=top_heads,
    )


class LargestEffectHead(OneHeadDefense):
    """Ships/Sahara-style: the head whose mask turns *unsafe* prompts most, with no selectivity rule.

    All heads are ranked by mean unsafe angle with the fast (last-position) mask, on at most
    ``search_per_class`` prompts per class (a large effect shows on few prompts; the all-heads pass
    is the expensive part); the ``top_k`` largest are re-scored on every calibration prompt in this
    detector's mode and the largest wins. Threshold and score are One-head Defense's, so any
    difference comes from the choice of head.
    """

    SEARCH_TAG = "largest-effect"

    def __init__(self, mode: Mode = "exact", *, search_per_class: int | None = None, **kwargs: Any):
        super().__init__(mode, **kwargs)
        self.search_per_class = search_per_class

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"LargestEffect ({self.mode})"

    def fit(self, model, processor, unsafe: Sequence[Any], safe: Sequence[Any]) -> "LargestEffectHead":
        t0 = time.perf_counter()
        u_conv, s_conv = [as_input(x) for x in unsafe], [as_input(x) for x in safe]
        final = DeflectionScorer(model, processor, spec=self.spec, score_layer=self.score_layer)
        fast = DeflectionScorer(model, processor, spec=mode_spec("fast", self.spec), score_layer=self.score_layer,
                                adapter=final.adapter)
        candidates = [self.head] if self.head is not None else all_heads(final.adapter, below_layer=final.score_layer)
        n = self.search_per_class
        pick = lambda xs: evenly(xs, n)  # noqa: E731
        (first,) = score_heads(fast, pick(u_conv), pick(s_conv), candidates, self.batch_size)
        top = np.argsort(-first.unsafe.mean(0), kind="stable")[: self.top_k]
        (scores,) = score_heads(final, u_conv, s_conv, [first.heads[k] for k in top], self.batch_size)
        order = np.argsort(-scores.unsafe.mean(0), kind="stable")
        labels = np.r_[np.ones(len(u_conv)), np.zeros(len(s_conv))]
        stats = [
            HeadStats(head=scores.heads[k], unsafe_mean=float(scores.unsafe[:, k].mean()),
                      safe_mean=float(scores.safe[:, k].mean()),
                      gap=float(scores.unsafe[:, k].mean() - scores.safe[:, k].mean()),
                      auroc=auroc(np.r_[scores.unsafe[:, k], scores.safe[:, k]], labels), eligible=True)
            for k in order
        ]
        k = int(order[0])
        how = f"{self.SEARCH_TAG}(fast->{self.mode}, k={self.top_k}" + (f", search {n}/class)" if n else ")")
        profile = profile_from_angles(
            model, processor, scores.heads[k], self.spec, final.score_layer, scores.unsafe[:, k], scores.safe[:, k],
            threshold=self.threshold_rule, calibration=list(unsafe) + list(safe), search=how,
            seconds=time.perf_counter() - t0, top_heads=stats,
        )
        self._bind(model, processor, profile)
        return self
