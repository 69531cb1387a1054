"""``--check-output`` (``OHD_GUARD_CHECK_OUTPUT=1``): every answer the server generates is checked
before it is sent, with the core's output check (:class:`~ohd_guard.output_check.AnswerCheck`: the
answer read at its last token, with the answer profile shipped for the model unless
``--answer-profile`` names one). A flagged answer is never sent: the guard's refusal takes its place
(``finish_reason: "content_filter"``), or a 403 under ``--refusal raise``. A stream is held back: its
first chunk (role and input verdict) goes out at once, the answer only once it was generated whole
and checked. The output verdict travels as ``ohd_guard.output_verdict`` in the body (the final
chunk of a stream) and, unstreamed, as the ``X-OHD-Guard-Output-Flagged`` header."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ohd_guard.output_check import AnswerCheck

__all__ = ["OutputGate", "Reviewed"]


@dataclass
class Reviewed:
    """What the output check made of one answer: its verdict (None: blank, nothing to check) and,
    when it was flagged, the refusal sent instead."""

    verdict: Any = None
    refusal: Any = None

    @property
    def flagged(self) -> bool:
        return self.verdict is not None and bool(self.verdict.flagged)

    def payload(self) -> dict[str, Any]:
        """The fields added to the body's ``ohd_guard`` object."""
        return {"output_verdict": self.verdict.model_dump(mode="json") if self.verdict is not None else None}

    def headers(self) -> dict[str, str]:
        return {"X-OHD-Guard-Output-Flagged": str(self.flagged).lower()} if self.verdict is not None else {}


class OutputGate:
    """The server's output check over ``guard``'s model (async, on the guard's worker)."""

    def __init__(self, guard: Any, profile: Any = None):
        self.guard = guard
        self.check = AnswerCheck(guard, profile)

    async def review(self, messages: Any, message: dict[str, Any], max_tokens: int) -> Reviewed:
        """Check ``message`` (the assistant message about to be sent, tool calls included) as the
        answer to ``messages`` (what the model answered from); flagged: the guard's refusal, written
        for that verdict without screening anything again."""
        text = message.get("content") or ""
        if not text.strip() and not message.get("tool_calls"):
            return Reviewed()
        verdict = await self.check.acheck(messages, message)
        if not verdict.flagged:
            return Reviewed(verdict)
        return Reviewed(verdict, await self.guard.arefuse(messages, verdict, max_new_tokens=max_tokens))
