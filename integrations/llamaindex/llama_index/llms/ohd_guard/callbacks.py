"""A legacy LlamaIndex callback handler that aborts flagged LLM calls.

Legacy callbacks can only observe or raise, so this handler screens the messages (or prompt) of
every ``CBEventType.LLM`` start event and raises :class:`~ohd_guard.errors.GuardViolation` when the
guard flags them: the LLM is never called and the exception propagates out of ``query``/``chat``.
It screens synchronously (also inside async engines, where it blocks the event loop for one
screening pass); prefer :class:`~llama_index.llms.ohd_guard.base.GuardedLLM`, which screens on the guard's
worker thread and answers with a refusal instead of an exception.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.callbacks.schema import CBEventType, EventPayload

from llama_index.llms.ohd_guard.convert import to_message_dicts
from llama_index.llms.ohd_guard.events import dispatch_verdict

if TYPE_CHECKING:
    from ohd_guard.guard import OhdGuard
    from ohd_guard.types import Verdict

__all__ = ["OhdGuardCallbackHandler"]

#: LLM classes that screen by themselves; their LLM events are not screened a second time.
_SELF_SCREENING = frozenset({"OhdGuardLLM", "GuardedLLM"})


class OhdGuardCallbackHandler(BaseCallbackHandler):
    """Screens every LLM call seen by the callback manager; raises GuardViolation on a flag.

    Use it with ``Settings.callback_manager = CallbackManager([OhdGuardCallbackHandler(guard)])`` or
    an engine's ``callback_manager``. ``verdicts`` keeps the latest verdict per event id (bounded).
    """

    def __init__(self, guard: OhdGuard, max_kept: int = 256):
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])
        self.guard = guard
        self.max_kept = max_kept
        self.verdicts: dict[str, Verdict] = {}

    def on_event_start(self, event_type: CBEventType, payload: dict[str, Any] | None = None, event_id: str = "",
                       parent_id: str = "", **kwargs: Any) -> str:
        if event_type != CBEventType.LLM or not payload:
            return event_id
        serialized = payload.get(EventPayload.SERIALIZED) or {}
        if isinstance(serialized, dict) and serialized.get("class_name") in _SELF_SCREENING:
            return event_id
        if payload.get(EventPayload.MESSAGES) is not None:
            raw: Any = to_message_dicts(list(payload[EventPayload.MESSAGES]), limits=self.guard.limits)
        elif isinstance(payload.get(EventPayload.PROMPT), str):
            raw = payload[EventPayload.PROMPT]
        else:
            return event_id
        verdict = self.guard.screen(raw)
        dispatch_verdict(verdict, "OhdGuardCallbackHandler")
        self.verdicts[event_id] = verdict
        while len(self.verdicts) > self.max_kept:
            self.verdicts.pop(next(iter(self.verdicts)))
        if verdict.flagged:
            from ohd_guard.errors import GuardViolation

            raise GuardViolation(verdict)
        return event_id

    def on_event_end(self, event_type: CBEventType, payload: dict[str, Any] | None = None, event_id: str = "",
                     **kwargs: Any) -> None:
        return None

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None) -> None:
        return None
