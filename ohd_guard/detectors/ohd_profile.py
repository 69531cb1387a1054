"""One-head Defense's profile and its calibration: search the head, fit the threshold and risk curve.

The profile names the masked head, the mask, the layer where the deflection angle is read and the
angle threshold (the KDE crossing of unsafe and safe calibration angles, as in the paper, or a
target false-positive rate). Profiles written before every kind shared one shape (no ``kind``, a
``threshold`` object and a ``calibration`` summary) are migrated on load by :func:`migrate_legacy`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from ohd_guard.conversation import to_conversation
from ohd_guard.detectors.base import as_input, data_hash, evaluate_scores, midpoint_of_medians, target_fpr_method
from ohd_guard.errors import CalibrationError, InvalidInputError
from ohd_guard.metrics import auroc
from ohd_guard.profile import HeadStats, ModelFingerprint, Profile, library_version
from ohd_guard.rendering import encode_conversations
from ohd_guard.scoring import DeflectionScorer
from ohd_guard.search import RankBy, Strategy, search_heads
from ohd_guard.threshold import RiskCalibration, ThresholdFit, fpr_threshold, kde_threshold, manual_threshold
from ohd_guard.types import HeadRef, MaskSpec

log = logging.getLogger("ohd_guard.calibrate")

Mode = Literal["exact", "fast"]
_POSITIONS = {"exact": "all", "fast": "last"}


def mode_spec(mode: Mode, base: MaskSpec = MaskSpec()) -> MaskSpec:
    """``exact``: mask at every position (paper). ``fast``: only the last position (one decode step)."""
    if mode not in _POSITIONS:
        raise InvalidInputError(f"mode must be 'exact' or 'fast', not {mode!r}")
    return base.model_copy(update={"positions": _POSITIONS[mode]})


class OhdProfile(Profile):
    """One-head Defense: the masked head, the mask and the score layer; ``threshold`` in degrees."""

    kind: Literal["ohd"] = "ohd"
    heads: tuple[HeadRef, ...] = Field(min_length=1)
    mask: MaskSpec
    score_layer: int = Field(ge=1)
    threshold_fit: ThresholdFit
    """How the threshold was chosen and what it does on the calibration angles."""
    risk: RiskCalibration
    search: str = ""
    """How the head was chosen: e.g. ``two-stage(k=8, p=80, rank_by=auroc)`` or ``manual``."""
    length_auroc: float | None = None
    """AUROC of prompt length alone on the calibration sets (0.5: length tells nothing)."""
    question_auroc: float | None = None
    """AUROC of "the request ends in a question mark" alone on the calibration sets."""
    top_heads: list[HeadStats] = Field(default_factory=list)

    @model_validator(mode="after")
    def _is_a_detector(self) -> OhdProfile:
        """Hand edits that would silently disable the guard are errors, not settings."""
        if self.score_layer > self.model.num_layers:
            raise ValueError(f"score_layer {self.score_layer} is above the model's {self.model.num_layers} layers")
        self.check_heads(self.heads)
        if any(h.layer >= self.score_layer for h in self.heads):
            raise ValueError(f"a head is at or above score_layer {self.score_layer}: masking it cannot move "
                             "the angle read there, so nothing would ever be flagged")
        if not self.mask.alpha < 1.0:
            raise ValueError("mask.alpha must be below 1 (1.0 leaves the head unmasked: every angle is 0)")
        t = self.threshold_fit
        method = "target_fpr" if self.threshold_method.startswith("target_fpr=") else self.threshold_method
        if (self.threshold, method) != (t.value, t.method):
            raise ValueError(f"threshold {self.threshold} ({self.threshold_method}) differs from the fitted "
                             f"{t.value} ({t.method})")
        if not 0.0 < t.value <= 180.0:
            raise ValueError(f"threshold {t.value} is not an angle in (0, 180] degrees")
        if t.method == "kde_crossing" and t.crossings and not any(abs(t.value - c) <= 1e-9 for c in t.crossings):
            raise ValueError(f"threshold {t.value} is not one of the KDE crossings {t.crossings} it was fitted as")
        calib = next((m for m in self.metrics if m.split == "calibration"), None)
        if calib is not None and (abs(calib.detection_rate - t.detection_rate) > 1e-9
                                  or abs(calib.false_positive_rate - t.false_positive_rate) > 1e-9):
            raise ValueError("threshold's detection/false-positive rates differ from the calibration metrics "
                             "(the threshold was changed after calibration)")
        self.check_detector()
        return self

    @classmethod
    def fit(cls, model: Any, processor: Any, unsafe: Sequence[Any], safe: Sequence[Any], **options: Any) -> OhdProfile:
        """Calibrate One-head Defense (options: :func:`calibrate`'s) and return its profile."""
        return calibrate(model, processor, unsafe, safe, **options)


def migrate_legacy(raw: dict[str, Any]) -> dict[str, Any]:
    """A One-head Defense profile of the first layout (no ``kind``; ``threshold`` a fit object, the fit
    summary under ``calibration``) in today's shape; the content is unchanged."""
    thr, cal = raw.get("threshold"), raw.get("calibration")
    if not isinstance(thr, dict) or not isinstance(cal, dict):
        raise ValueError("neither a current profile (no 'kind') nor a One-head Defense profile of the first layout")
    out = {k: v for k, v in raw.items() if k not in ("threshold", "calibration", "digest")}
    out.update(kind="ohd", threshold=thr.get("value"), threshold_method=thr.get("method"), threshold_fit=thr,
               n_unsafe=cal.get("n_unsafe"), n_safe=cal.get("n_safe"), data_hash=cal.get("data_hash", ""),
               sources=cal.get("sources", []), seconds=cal.get("seconds", 0.0), search=cal.get("search", ""),
               length_auroc=cal.get("length_auroc"), question_auroc=cal.get("question_auroc"))
    return out


Profile.LEGACY = migrate_legacy


# -- calibration ----------------------------------------------------------------------------------
SURFACE_FEATURES = {"length": "prompt length", "question": "ending the request with a question mark"}
"""Surface features checked on every calibration set; names are keys of :func:`surface_aurocs`."""


def surface_aurocs(processor: Any, unsafe: Sequence[Any], safe: Sequence[Any]) -> dict[str, float]:
    """AUROC of each surface feature alone for unsafe vs safe: 0.5 means the feature tells nothing.

    ``length``: token count of the rendered prompt; ``question``: the last user message ends in "?".
    A calibration set whose classes differ in such a feature lets a fit pick a signal that reacts to
    it, which fails on sets where the feature goes the other way (measured on the embedded model:
    length 0.85 on an early version of our prompts; question form 0.31 on a later one).
    """
    convs = [to_conversation(as_input(c), allow_local_files=True) for c in [*unsafe, *safe]]
    labels = np.r_[np.ones(len(unsafe)), np.zeros(len(safe))]
    tokens = [int(encode_conversations(processor, [c])["attention_mask"].sum()) for c in convs]
    question = [c.last_user_text.rstrip().endswith("?") for c in convs]
    return {"length": auroc(np.array(tokens, float), labels), "question": auroc(np.array(question, float), labels)}


def warn_surface(surface: dict[str, float]) -> None:
    """Log when a surface feature alone separates the calibration sets."""
    for name, value in surface.items():
        if abs(value - 0.5) > 0.15:
            log.warning("%s alone separates the calibration sets (AUROC %.2f): a detector may learn it, and fail "
                        "where it goes the other way; balance the sets on it", SURFACE_FEATURES[name], value)


def _method(fit: ThresholdFit, rule: Literal["kde"] | float, n_safe: int) -> str:
    """``threshold_method``: the fit's method, naming the target and the benign prompts for a target FPR."""
    return target_fpr_method(float(rule), n_safe) if fit.method == "target_fpr" else fit.method


def calibrate(
    model, processor, unsafe: Sequence[Any], safe: Sequence[Any], *,
    spec: MaskSpec = MaskSpec(), score_layer: int | None = None, score_layers: Sequence[int] | None = None,
    head: HeadRef | None = None, strategy: Strategy = "two-stage", top_k: int = 8, percentile: float = 80.0,
    rank_by: RankBy = "auroc", threshold: Literal["kde"] | float = "kde",
    heldout: tuple[Sequence[Any], Sequence[Any]] | None = None, batch_size: int = 8, progress: bool = False,
    sources: Sequence[str] = (),
) -> OhdProfile:
    """Calibrate One-head Defense on ``model`` and return its :class:`OhdProfile`.

    ``unsafe``/``safe`` are conversations (str, message lists, Conversation or LabelledPrompt).
    ``head`` fixes the head by hand (no search). ``score_layers`` searches the score layer with the
    head (see :func:`~ohd_guard.search.search_heads`). ``threshold`` is ``"kde"`` (the paper's
    density crossing) or a target false-positive rate such as ``0.05``. ``heldout`` (unsafe, safe)
    adds held-out metrics to the profile.
    """
    t0 = time.perf_counter()
    u_conv = [as_input(x) for x in unsafe]
    s_conv = [as_input(x) for x in safe]
    top_heads: list[HeadStats] = []
    surface = surface_aurocs(processor, u_conv, s_conv)
    warn_surface(surface)
    if head is None:
        result = search_heads(
            model, processor, u_conv, s_conv, spec=spec, score_layer=score_layer, score_layers=score_layers,
            strategy=strategy, top_k=top_k, percentile=percentile, rank_by=rank_by, batch_size=batch_size,
            progress=progress,
        )
        head, score_layer = result.best, result.score_layer
        k = result.scores.heads.index(head)
        u_angles, s_angles = result.scores.unsafe[:, k], result.scores.safe[:, k]
        top_heads = result.ranking[: max(top_k, 10)]
        how = f"{result.strategy}(k={top_k}, p={percentile:g}, rank_by={rank_by}"
        how += f", score layer of {min(score_layers)}..{max(score_layers)})" if score_layers else ")"
    else:
        scorer = DeflectionScorer(model, processor, spec=spec, score_layer=score_layer)
        u_angles = scorer.angles(u_conv, [head], batch_size=batch_size, progress=progress)[:, 0]
        s_angles = scorer.angles(s_conv, [head], batch_size=batch_size, progress=progress)[:, 0]
        how = "manual"
    if float(np.median(u_angles)) <= float(np.median(s_angles)):
        raise CalibrationError(f"head {head}: unsafe prompts do not turn the state more than safe ones")
    fit = kde_threshold(u_angles, s_angles) if threshold == "kde" else fpr_threshold(u_angles, s_angles, float(threshold))
    metrics = [evaluate_scores("calibration", u_angles, s_angles, fit.value)]
    scorer = DeflectionScorer(model, processor, spec=spec, score_layer=score_layer)
    if heldout is not None:
        hu = scorer.angles([as_input(x) for x in heldout[0]], [head], batch_size=batch_size)[:, 0]
        hs = scorer.angles([as_input(x) for x in heldout[1]], [head], batch_size=batch_size)[:, 0]
        metrics.append(evaluate_scores("heldout", hu, hs, fit.value))
    return OhdProfile(
        library_version=library_version(), model=ModelFingerprint.of(model, processor), heads=(head,), mask=spec,
        score_layer=scorer.score_layer, threshold=fit.value, threshold_method=_method(fit, threshold, len(s_angles)),
        threshold_fit=fit,
        risk=RiskCalibration.fit(u_angles, s_angles), n_unsafe=len(unsafe), n_safe=len(safe),
        data_hash=data_hash(list(unsafe) + list(safe)), sources=list(sources), search=how,
        seconds=round(time.perf_counter() - t0, 2), length_auroc=round(surface["length"], 4),
        question_auroc=round(surface["question"], 4), metrics=metrics, top_heads=top_heads,
    )


def profile_from_angles(
    model, processor, head: HeadRef, spec: MaskSpec, score_layer: int, u: np.ndarray, s: np.ndarray, *,
    threshold: Literal["kde"] | float, calibration: Sequence[Any], search: str, seconds: float,
    top_heads: list[HeadStats],
) -> OhdProfile:
    """A profile for a head chosen outside :func:`calibrate`, from its calibration angles.

    Unlike :func:`calibrate` it does not refuse a head whose safe angles are not below its unsafe
    ones: a baseline that picks such a head should be measured, not crash. It then gets the
    midpoint of the medians and a flat risk curve.
    """
    try:
        fit = kde_threshold(u, s) if threshold == "kde" else fpr_threshold(u, s, float(threshold))
        risk = RiskCalibration.fit(u, s)
    except CalibrationError:
        fit = manual_threshold(midpoint_of_medians(u, s), u, s)
        risk = RiskCalibration(slope=0.0, intercept=0.0)
    return OhdProfile(
        library_version=library_version(), model=ModelFingerprint.of(model, processor), heads=(head,), mask=spec,
        score_layer=score_layer, threshold=fit.value, threshold_method=_method(fit, threshold, len(s)),
        threshold_fit=fit, risk=risk,
        n_unsafe=len(u), n_safe=len(s), data_hash=data_hash(list(calibration)), search=search,
        seconds=round(seconds, 2), metrics=[evaluate_scores("calibration", u, s, fit.value)], top_heads=top_heads,
    )
