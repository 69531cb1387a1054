"""Calibration: search the head, fit the threshold and the risk curve, and write a profile."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Literal, Sequence

import numpy as np

from ohd_guard.datasets import LabelledPrompt
from ohd_guard.errors import CalibrationError
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.metrics import auroc, rates_at_threshold
from ohd_guard.profile import CalibrationMetrics, CalibrationSummary, ModelFingerprint, Profile
from ohd_guard.scoring import DeflectionScorer
from ohd_guard.search import RankBy, Strategy, search_heads
from ohd_guard.threshold import RiskCalibration, fpr_threshold, kde_threshold

log = logging.getLogger("ohd_guard.calibrate")


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


def as_conversation(item: Any) -> Any:
    """A LabelledPrompt becomes one user turn (with its image if it has one); others pass through."""
    if isinstance(item, LabelledPrompt):
        if item.image is None:
            return item.text
        from ohd_guard.conversation import to_conversation

        return to_conversation(  # a labelled set's own image file: trusted, local by nature
            [{"role": "user", "content": [{"type": "image", "image": item.image}, {"type": "text", "text": item.text}]}],
            allow_local_files=True,
        )
    return item


def evaluate_angles(split: str, unsafe: np.ndarray, safe: np.ndarray, threshold: float) -> CalibrationMetrics:
    scores = np.r_[unsafe, safe]
    labels = np.r_[np.ones(len(unsafe)), np.zeros(len(safe))]
    r = rates_at_threshold(scores, labels, threshold)
    return CalibrationMetrics(
        split=split, n_unsafe=len(unsafe), n_safe=len(safe), auroc=auroc(scores, labels),
        detection_rate=r.detection_rate, false_positive_rate=r.false_positive_rate,
        balanced_accuracy=r.balanced_accuracy,
    )


SURFACE_FEATURES = {"length": "prompt length", "question": "ending the request with a question mark"}
"""Surface features checked on every calibration set; names are keys of :func:`surface_aurocs`."""


def surface_aurocs(processor: Any, unsafe: Sequence[Any], safe: Sequence[Any]) -> dict[str, float]:
    """AUROC of each surface feature alone for unsafe vs safe: 0.5 means the feature tells nothing.

    ``length``: token count of the rendered prompt; ``question``: the last user message ends in "?".
    A calibration set whose classes differ in such a feature lets the head search pick a head that
    reacts to it, which fails on sets where the feature goes the other way (measured on the embedded
    model: length 0.85 on an early version of our prompts; question form 0.31, 29 % of unsafe vs
    67 % of safe prompts, on a later one).
    """
    from ohd_guard.conversation import to_conversation
    from ohd_guard.rendering import encode_conversations

    convs = [*unsafe, *safe]
    labels = np.r_[np.ones(len(unsafe)), np.zeros(len(safe))]
    tokens = [int(encode_conversations(processor, [c])["attention_mask"].sum()) for c in convs]
    question = [to_conversation(c).last_user_text.rstrip().endswith("?") for c in convs]
    return {"length": auroc(np.array(tokens, float), labels), "question": auroc(np.array(question, float), labels)}


def calibrate(
    model,
    processor,
    unsafe: Sequence[Any],
    safe: Sequence[Any],
    *,
    spec: MaskSpec = MaskSpec(),
    score_layer: int | None = None,
    score_layers: Sequence[int] | None = None,
    head: HeadRef | None = None,
    strategy: Strategy = "two-stage",
    top_k: int = 8,
    percentile: float = 80.0,
    rank_by: RankBy = "auroc",
    threshold: Literal["kde"] | float = "kde",
    heldout: tuple[Sequence[Any], Sequence[Any]] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    sources: Sequence[str] = (),
) -> Profile:
    """Calibrate One-head Defense on ``model`` and return a :class:`Profile`.

    ``unsafe``/``safe`` are conversations (str, message lists, Conversation or LabelledPrompt).
    ``head`` fixes the head by hand (no search). ``score_layers`` searches the score layer with the
    head (see :func:`search_heads`). ``threshold`` is ``"kde"`` (the paper's density
    crossing) or a target false-positive rate such as ``0.05``. ``heldout`` (unsafe, safe) adds
    held-out metrics to the profile.
    """
    from ohd_guard import __version__

    t0 = time.perf_counter()
    u_conv = [as_conversation(x) for x in unsafe]
    s_conv = [as_conversation(x) for x in safe]
    top_heads = []
    surface = surface_aurocs(processor, u_conv, s_conv)
    for name, value in surface.items():
        if abs(value - 0.5) > 0.15:
            log.warning(
                "%s alone separates the calibration sets (AUROC %.2f): a head search may pick a head that reacts "
                "to it, which fails on sets where it goes the other way; balance the sets on it",
                SURFACE_FEATURES[name], value,
            )  # fmt: skip
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
    metrics = [evaluate_angles("calibration", u_angles, s_angles, fit.value)]
    scorer = DeflectionScorer(model, processor, spec=spec, score_layer=score_layer)
    if heldout is not None:
        hu = scorer.angles([as_conversation(x) for x in heldout[0]], [head], batch_size=batch_size)[:, 0]
        hs = scorer.angles([as_conversation(x) for x in heldout[1]], [head], batch_size=batch_size)[:, 0]
        metrics.append(evaluate_angles("heldout", hu, hs, fit.value))
    return Profile(
        library_version=__version__,
        model=ModelFingerprint.of(model, processor),
        heads=(head,),
        mask=spec,
        score_layer=scorer.score_layer,
        threshold=fit,
        risk=RiskCalibration.fit(u_angles, s_angles),
        calibration=CalibrationSummary(
            n_unsafe=len(unsafe), n_safe=len(safe), data_hash=data_hash(list(unsafe) + list(safe)),
            sources=list(sources), search=how, seconds=round(time.perf_counter() - t0, 2),
            length_auroc=round(surface["length"], 4), question_auroc=round(surface["question"], 4),
        ),
        metrics=metrics,
        top_heads=top_heads,
    )
