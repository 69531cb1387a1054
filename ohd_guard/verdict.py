"""What the guard decides and returns: verdicts, responses, counters, and a screening's outcome."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ohd_guard.conversation import Conversation
from ohd_guard.errors import InvalidInputError, ScreeningError
from ohd_guard.masking import HeadRef
from ohd_guard.scoring import Prefill

__all__ = ["EVENT_NAME", "GuardStats", "GuardedResponse", "Screened", "Verdict", "VerdictEvents", "typed_error"]

log = logging.getLogger("ohd_guard.guard")

EVENT_NAME = "ohd_guard.verdict"
"""Stable name of the event emitted for every verdict (logging, listeners, framework callbacks)."""


class Verdict(BaseModel):
    """The guard's decision on one conversation; ``model_dump(mode="json")`` is the event payload."""

    model_config = ConfigDict(frozen=True)
    flagged: bool
    angle: float | None
    """One-head Defense's deflection angle in degrees (also for the fused detector); None for a
    detector that measures no angle, or when screening failed."""
    threshold: float
    risk: float | None
    """Graded risk in [0, 1] from the profile's risk calibration; None when screening failed."""
    heads: tuple[HeadRef, ...]
    """The masked heads of One-head Defense, the probe's heads of SAHs (none for HiddenDetect)."""
    mode: Literal["all", "last"] | None
    """Mask positions of a masked detector (``all``: paper-exact, ``last``: fast); None without a mask."""
    detector: str = "ohd"
    """Which detector decided: ``ohd``, ``sahs``, ``hiddendetect`` or ``fused``."""
    score: float | None = None
    """The detector's score (the angle for ``ohd``, log-odds for ``sahs``/``fused``); flagged iff > threshold."""
    details: dict[str, Any] = {}
    """Per-detector details: the angle(s) for One-head Defense, the top heads of SAHs, ..."""
    latency_ms: float
    reason: str
    error: str | None = None
    """``"ExceptionType: message"`` when screening failed (the verdict then follows ``on_error``)."""
    conversation_digest: str | None = None
    batch_size: int = 1
    """How many conversations shared the prefill that screened this one (micro-batching)."""


class GuardedResponse(BaseModel):
    """An answer produced under the guard."""

    model_config = ConfigDict(frozen=True)
    text: str
    verdict: Verdict
    refused: bool
    refusal_kind: Literal["anchored", "static"] | None = None


class GuardStats(BaseModel):
    """Counters of the screening prefills run so far (to see micro-batching at work)."""

    model_config = ConfigDict(frozen=True)
    screened: int = 0
    batches: int = 0
    largest_batch: int = 0
    failed_open: int = 0
    """Verdicts that let an input through unscreened because screening failed (``on_error="allow"``)."""


@dataclass
class Screened:
    """One conversation's screening: the verdict with what screening built on the way (the converted
    conversation, its rendered inputs and the prefill), so answering or refusing it never converts,
    fetches or decodes images again and a safe answer starts from the screening prefill.

    Returned by :meth:`OhdGuard.screening <ohd_guard.guard.OhdGuard.screening>`; pass it to
    :meth:`~ohd_guard.guard.OhdGuard.answer` or :meth:`~ohd_guard.guard.OhdGuard.refuse`. The
    prefill (a KV cache) is used at most once: a second answer re-runs the prompt unscreened by
    nothing, since the verdict already covers this exact conversation.
    """

    verdict: Verdict
    conversation: Conversation | None = None
    inputs: dict[str, Any] | None = None
    prefill: Prefill | None = None
    exc: BaseException | None = None
    """Why screening failed (the verdict then follows ``on_error``)."""

    def take_prefill(self) -> Prefill | None:
        """The prefill, once: generation extends its KV cache, so it cannot serve twice."""
        pre, self.prefill = self.prefill, None
        return pre


def typed_error(exc: BaseException) -> BaseException:
    """Bad input stays InvalidInputError; every other screening failure becomes a ScreeningError."""
    if isinstance(exc, (InvalidInputError, ScreeningError)):
        return exc
    err = ScreeningError(f"screening failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


class VerdictEvents:
    """Where verdicts go: the ``ohd_guard.guard`` logger (as the event :data:`EVENT_NAME`) and listeners.

    A broken listener is logged and skipped: it must never break screening.
    """

    def __init__(self) -> None:
        self._listeners: list[Callable[[Verdict], Any]] = []

    def add(self, fn: Callable[[Verdict], Any]) -> None:
        self._listeners.append(fn)

    def remove(self, fn: Callable[[Verdict], Any]) -> None:
        self._listeners.remove(fn)

    def emit(self, verdict: Verdict) -> None:
        payload = verdict.model_dump(mode="json")
        level = logging.WARNING if verdict.error else logging.INFO
        log.log(level, "%s %s", EVENT_NAME, json.dumps(payload), extra={"event_name": EVENT_NAME, "payload": payload})
        for fn in list(self._listeners):
            try:
                fn(verdict)
            except Exception:
                log.exception("verdict listener %r failed", fn)
