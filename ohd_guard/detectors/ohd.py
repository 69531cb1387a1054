"""One-head Defense as a :class:`Detector`, and the largest-effect head (Ships/Sahara-style) baseline.

Both score a prompt by the deflection angle of one masked head and threshold it with the same KDE
rule; they differ only in how the head is chosen. One-head Defense keeps heads that barely move
safe prompts (the selectivity rule) and ranks them by ``unsafe - safe``; the largest-effect
baseline takes the head that moves unsafe prompts most, whatever it does to safe ones. Comparing
the two measures what the selectivity rule buys. Both save an :class:`~ohd_guard.detectors.ohd_profile.OhdProfile`.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import numpy as np

from ohd_guard.datasets import evenly
from ohd_guard.detectors.base import Detector, as_input
from ohd_guard.detectors.ohd_profile import Mode, OhdProfile, calibrate, mode_spec, profile_from_angles
from ohd_guard.metrics import auroc
from ohd_guard.profile import HeadStats
from ohd_guard.scoring import DeflectionScorer, all_heads
from ohd_guard.screening import MaskedBranch, PrefillReads, Reads
from ohd_guard.search import Strategy, score_heads
from ohd_guard.types import HeadRef, MaskSpec


class OneHeadDefense(Detector):
    """The deflection angle of one head selected by the selectivity rule (wraps :func:`calibrate`).

    Args:
        mode: ``"exact"`` (paper, all positions) or ``"fast"`` (last position only).
        head: use this head instead of searching (e.g. from a shipped profile); the threshold is
            still fitted on the calibration prompts given to :meth:`fit`, in this mode.
        strategy, top_k, percentile: head search (see :func:`~ohd_guard.search.search_heads`).
        threshold: ``"kde"`` (density crossing, paper) or a target false-positive rate.
    """

    kind = "ohd"
    Profile = OhdProfile

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

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"OhD ({self.mode})"

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
        return Reads(masked=MaskedBranch((tuple(p.heads),), p.mask, p.score_layer))

    @property
    def verdict_heads(self) -> tuple[HeadRef, ...]:
        return tuple(self.profile.heads) if self.profile is not None else ()

    def score_reads(self, reads: PrefillReads) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Deflection angle in degrees of each conversation."""
        angles = reads.angles[:, 0]  # type: ignore[index]
        return angles, [{"angle": float(a)} for a in angles]

    def explain(self, score: float, flagged: bool, risk: float) -> str:
        heads = "+".join(map(str, self.verdict_heads))
        return (f"deflection {score:.3f} deg {'>' if flagged else '<='} threshold {self.threshold:.3f} deg at head "
                f"{heads} (risk {risk:.2f}): {'flagged as unsafe' if flagged else 'passed'}")  # fmt: skip

    @classmethod
    def _configured(cls, profile: OhdProfile) -> "OneHeadDefense":  # type: ignore[override]
        mode: Mode = "fast" if profile.mask.positions == "last" else "exact"
        return cls(mode, head=profile.heads[0], mask=profile.mask, score_layer=profile.score_layer)


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
