"""A screening's outcome with what it built (:class:`Screened`), typed screening errors, and where
verdicts go (:class:`VerdictEvents`). The verdict and response types themselves are torch-free, in
:mod:`ohd_guard.types` (re-exported here)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ohd_guard.conversation import Conversation
from ohd_guard.errors import InvalidInputError, ScreeningError
from ohd_guard.scoring import Prefill
from ohd_guard.types import EVENT_NAME, GuardedResponse, GuardStats, Verdict

__all__ = ["EVENT_NAME", "GuardStats", "GuardedResponse", "Screened", "Verdict", "VerdictEvents", "typed_error"]

log = logging.getLogger("ohd_guard.guard")


@dataclass
class Screened:
    """One conversation's screening: the verdict with what screening built on the way (the converted
    conversation, its rendered inputs and the prefill), so answering or refusing it never converts,
    fetches or decodes images again and a safe answer starts from the screening prefill.

    Returned by :meth:`OhdGuard.screen_for_answer <ohd_guard.guard.OhdGuard.screen_for_answer>`; pass it to
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
    row: int = 0
    """This conversation's row in ``inputs``/``prefill`` (a micro-batch screened together)."""

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
