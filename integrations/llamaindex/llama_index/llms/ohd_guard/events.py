"""Verdicts as LlamaIndex instrumentation events.

Every verdict is dispatched as an :class:`OhdGuardVerdictEvent` through this module's dispatcher
(``get_dispatcher("llama_index.llms.ohd_guard.events")``, which propagates to the root dispatcher), so
any ``BaseEventHandler`` added to the root or to this dispatcher sees it, with the ``span_id`` of
the LLM call that produced it.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.base import BaseEvent
from pydantic import Field

__all__ = ["OhdGuardVerdictEvent", "adispatch_verdict", "dispatch_verdict", "dispatcher"]

dispatcher = get_dispatcher(__name__)


class OhdGuardVerdictEvent(BaseEvent):
    """The guard screened a conversation on its way to an LLM."""

    verdict: Any
    """The :class:`ohd_guard.guard.Verdict` (``flagged``, ``angle``, ``threshold``, ``risk``, ``reason``, ...)."""
    source: str = Field(default="")
    """What screened: ``"OhdGuardLLM"``, ``"GuardedLLM"`` or ``"OhdGuardCallbackHandler"``."""

    @classmethod
    def class_name(cls) -> str:
        return "OhdGuardVerdictEvent"

    @property
    def flagged(self) -> bool:
        return bool(self.verdict.flagged)

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        data = super().model_dump(**kwargs)
        data["verdict"] = self.verdict.model_dump(mode="json")  # JSON-able for exporters
        return data


def _event(verdict: Any, source: str, span_id: str | None) -> OhdGuardVerdictEvent:
    """The event, on ``span_id`` when given (a stream runs after its LLM call's span has closed, so
    it passes the span it was opened in), else on the active span."""
    extra = {"span_id": span_id} if span_id is not None else {}
    return OhdGuardVerdictEvent(verdict=verdict, source=source, **extra)


def dispatch_verdict(verdict: Any, source: str, span_id: str | None = None) -> None:
    dispatcher.event(_event(verdict, source, span_id))


async def adispatch_verdict(verdict: Any, source: str, span_id: str | None = None) -> None:
    await dispatcher.aevent(_event(verdict, source, span_id))
