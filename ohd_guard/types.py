"""The guard's vocabulary, importable without torch: heads, masks, verdicts, responses, counters.

Integrations and servers type their code against these (``Verdict``, ``GuardedResponse``) without
pulling in the model stack; everything here is a frozen pydantic model, so a verdict is also its own
JSON event payload (``model_dump(mode="json")``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

__all__ = ["EVENT_NAME", "GuardStats", "GuardedResponse", "HeadRef", "MaskSpec", "MessageScore", "Scope", "Verdict",
           "response_payload"]

EVENT_NAME = "ohd_guard.verdict"
"""Stable name of the event emitted for every verdict (logging, listeners, framework callbacks)."""


class HeadRef(BaseModel):
    """One attention head of the language model, 0-indexed."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    layer: int = Field(ge=0)
    head: int = Field(ge=0)

    def __str__(self) -> str:
        return f"L{self.layer}.H{self.head}"


class MaskSpec(BaseModel):
    """How a head is masked; part of a One-head Defense profile because the threshold depends on it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    target: Literal["query", "output"] = "query"
    """``query``: scale the head's query (paper). ``output``: scale the head's output before o_proj."""
    positions: Literal["all", "last"] = "all"
    """``all``: every position (paper-exact). ``last``: the last prompt position only (fast)."""
    alpha: float = Field(default=1e-5, ge=0.0, le=1.0)
    """Scale factor; 1.0 is no mask, 0.0 a hard mask."""


Scope = Literal["conversation", "latest"]
"""Which reads decide a verdict: ``conversation`` (the whole conversation and every earlier user/tool
message, each read where the model answered it) or ``latest`` (the final position only: the latest turn
in its context, so an earlier flagged turn no longer flags once the conversation has moved on)."""


class MessageScore(BaseModel):
    """One user/tool message's score: the detector read where the model would start answering it (the
    conversation up to that message, with the generation prompt), i.e. the message judged as it was
    when it was the latest. Consecutive user/tool messages share the read after the last of them."""

    model_config = ConfigDict(frozen=True)
    index: int
    """The message's index in the conversation (tool results count as user turns)."""
    role: str
    score: float | None
    """None when it was not scored (``scope="latest"`` skips a prefix that needs its own prefill)."""
    flagged: bool
    """``score > threshold``."""
    source: Literal["final", "prefill", "own_prefill", "skipped"]
    """``final``: the conversation's own read (the latest messages); ``prefill``: an extra position of the
    same prefill; ``own_prefill``: its prefix in a prefill of its own (a template that rewrites earlier
    turns, or a masked detector); ``skipped``: not scored."""


class Verdict(BaseModel):
    """The guard's decision on one conversation, the same shape for every detector kind.

    ``flagged`` iff ``score > threshold``; what a kind measures beyond its score (One-head Defense's
    angle and mask mode, SAHs's top heads, ...) is in ``details``. ``model_dump(mode="json")`` is the
    event payload (``angle`` and ``mode`` are included, read from ``details``).
    """

    model_config = ConfigDict(frozen=True)
    flagged: bool
    detector: str
    """Which detector kind decided: ``ohd``, ``sahs``, ``hiddendetect`` or ``fused``."""
    score: float | None
    """The detector's score (the angle for ``ohd``, log-odds for ``sahs``/``fused``); None when screening failed.
    Under ``scope="conversation"`` the highest of the final read and every earlier message's read."""
    threshold: float
    risk: float | None
    """Graded risk in [0, 1] from the profile's risk calibration; None when screening failed."""
    heads: tuple[HeadRef, ...] = ()
    """The heads the detector reads: the masked heads of One-head Defense, the probe's heads of SAHs."""
    details: dict[str, Any] = {}
    """Per-kind details: the angle(s) and mask mode of One-head Defense, the top heads of SAHs, ..."""
    latency_ms: float
    reason: str
    error: str | None = None
    """``"ExceptionType: message"`` when screening failed (the verdict then follows ``on_error``)."""
    conversation_digest: str | None = None
    batch_size: int = 1
    """How many conversations shared the prefill that screened this one (micro-batching)."""
    messages: list[MessageScore] = []
    """Every user/tool message's own score (empty when screening failed, and in payloads older than it).
    Under ``scope="conversation"`` the verdict's ``score`` is the highest of these and the final read."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def angle(self) -> float | None:
        """One-head Defense's deflection angle in degrees (also for the fused detector), else None."""
        a = self.details.get("angle")
        return float(a) if a is not None else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mode(self) -> Literal["all", "last"] | None:
        """Mask positions of a masked detector (``all``: paper-exact, ``last``: fast); None without a mask."""
        return self.details.get("mode")


class GuardedResponse(BaseModel):
    """An answer produced under the guard."""

    model_config = ConfigDict(frozen=True)
    text: str
    verdict: Verdict
    refused: bool
    refusal_kind: Literal["anchored", "static"] | None = None

    def payload(self) -> dict[str, Any]:
        """What integrations attach to this response (see :func:`response_payload`)."""
        return response_payload(self.verdict, self.refused, self.refusal_kind)


def response_payload(verdict: Verdict, refused: bool, refusal_kind: str | None) -> dict[str, Any]:
    """What every surface attaches to an answer (LangChain ``response_metadata["ohd_guard"]``, LlamaIndex
    ``additional_kwargs["ohd_guard"]``, server bodies): written once so they all report the same fields."""
    return {"refused": refused, "refusal_kind": refusal_kind, "verdict": verdict.model_dump(mode="json")}


class GuardStats(BaseModel):
    """Counters of the screening prefills run so far (to see micro-batching at work)."""

    model_config = ConfigDict(frozen=True)
    screened: int = 0
    batches: int = 0
    largest_batch: int = 0
    failed_open: int = 0
    """Verdicts that let an input through unscreened because screening failed (``on_error="allow"``)."""
