"""What both LlamaIndex LLMs share: the guard's input, the response shapes with the verdict in
``additional_kwargs["ohd_guard"]``, the output check (:class:`OutputCheck`, over the core's
:class:`~ohd_guard.output_check.AnswerCheck`) and their base holding both (:class:`GuardLLMBase`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, MessageRole, TextBlock
from llama_index.core.llms.function_calling import FunctionCallingLLM
from pydantic import Field, PrivateAttr

from llama_index.llms.ohd_guard.convert import to_message_dicts
from llama_index.llms.ohd_guard.events import adispatch_verdict, dispatch_verdict
from ohd_guard.types import response_payload

__all__ = ["GuardLLMBase", "OutputCheck", "aonce", "apassed_stream", "areplay", "chat", "completion", "info", "need",
           "once", "passed", "passed_stream", "raw_input", "replay"]


def need(guard: Any, who: str) -> Any:
    if guard is None:
        from ohd_guard.errors import InvalidInputError

        raise InvalidInputError(f"{who} has no guard: pass guard=<OhdGuard> (or use {who}.from_profile)")
    return guard


def raw_input(guard: Any, messages: Sequence[ChatMessage] | str) -> Any:
    """What the guard is handed: a prompt string as is, chat messages as the core's message dicts."""
    if isinstance(messages, str):
        return messages
    return to_message_dicts(list(messages), limits=guard.limits)


def info(verdict: Any, refused: bool, kind: str | None) -> dict[str, Any]:
    """``additional_kwargs["ohd_guard"]`` of every response (the core's one payload shape)."""
    return response_payload(verdict, refused, kind)


def chat(text: str, meta: dict[str, Any], raw: Any = None, delta: str | None = None) -> ChatResponse:
    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, raw=raw,
                        additional_kwargs={"ohd_guard": meta})


def completion(text: str, meta: dict[str, Any], raw: Any = None, delta: str | None = None) -> CompletionResponse:
    return CompletionResponse(text=text, delta=delta, raw=raw, additional_kwargs={"ohd_guard": meta})


def passed(resp: Any, verdict: Any, extra: dict[str, Any] | None = None) -> Any:
    """A safe response of the answering LLM with its verdict in ``additional_kwargs["ohd_guard"]``."""
    resp.additional_kwargs["ohd_guard"] = {**info(verdict, False, None), **(extra or {})}
    return resp


def passed_stream(gen: Any, verdict: Any) -> Iterator[Any]:
    for resp in gen:
        yield passed(resp, verdict)


async def apassed_stream(gen: Any, verdict: Any) -> AsyncIterator[Any]:
    async for resp in gen:
        yield passed(resp, verdict)


def once(item: Any) -> Iterator[Any]:
    """A one-item generator (LlamaIndex's stream callbacks recognise generators, not iterators)."""
    yield item


async def aonce(item: Any) -> AsyncIterator[Any]:
    yield item


def replay(items: Sequence[Any]) -> Iterator[Any]:
    """Pieces held back (and checked) as the generator LlamaIndex's stream callbacks expect."""
    yield from items


async def areplay(items: Sequence[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


# ----------------------------------------------------------------------------- the output check
class OutputCheck:
    """``check_output=True`` of both LLMs: the answer read at its last token in the conversation it
    answers (the core's :class:`~ohd_guard.output_check.AnswerCheck`, with the answer profile shipped
    for the guard's model unless ``profile`` is given). A flagged answer is never returned: the
    response becomes the guard's refusal (anchored or static; :class:`~ohd_guard.errors.GuardViolation`
    under ``refusal="raise"``), with the output verdict next to the input one."""

    def __init__(self, guard: Any, source: str, profile: Any = None, refusal_max_new_tokens: int = 64):
        from ohd_guard.output_check import AnswerCheck

        self.guard, self.source, self.max_new_tokens = guard, source, refusal_max_new_tokens
        self.check = AnswerCheck(guard, profile)

    def answer(self, message: ChatMessage) -> dict[str, Any] | None:
        """What is checked of ``message`` (its text and tool calls), or ``None`` when it is blank."""
        d = to_message_dicts([message], limits=self.guard.limits)[0]
        d["role"] = "assistant"
        text = "".join(p.get("text", "") for p in d["content"] if isinstance(p, dict))
        return d if text.strip() or d.get("tool_calls") or any(p.get("type") != "text" for p in d["content"]) else None

    def verdict(self, raw: Any, message: ChatMessage) -> Any:
        answer = self.answer(message)
        if answer is None:
            return None
        v = self.check.check(raw, answer)
        dispatch_verdict(v, self.source)
        return v

    async def averdict(self, raw: Any, message: ChatMessage) -> Any:
        answer = self.answer(message)
        if answer is None:
            return None
        v = await self.check.acheck(raw, answer)
        await adispatch_verdict(v, self.source)
        return v

    def refusal(self, raw: Any, input_verdict: Any, verdict: Any) -> ChatResponse:
        resp = self.guard.refuse(raw, verdict, max_new_tokens=self.max_new_tokens)
        return self._refused(resp, input_verdict, verdict)

    async def arefusal(self, raw: Any, input_verdict: Any, verdict: Any) -> ChatResponse:
        resp = await self.guard.arefuse(raw, verdict, max_new_tokens=self.max_new_tokens)
        return self._refused(resp, input_verdict, verdict)

    @staticmethod
    def _refused(resp: Any, input_verdict: Any, verdict: Any) -> ChatResponse:
        meta = {**info(input_verdict, True, resp.refusal_kind), "output_verdict": verdict.model_dump(mode="json")}
        return chat(resp.text, meta, raw=resp, delta=resp.text)

    def apply(self, raw: Any, input_verdict: Any, response: ChatResponse) -> ChatResponse:
        """``response`` with its output verdict, or the refusal when the answer is flagged."""
        v = self.verdict(raw, response.message)
        return self._settle(response, v) if v is None or not v.flagged else self.refusal(raw, input_verdict, v)

    async def aapply(self, raw: Any, input_verdict: Any, response: ChatResponse) -> ChatResponse:
        v = await self.averdict(raw, response.message)
        return self._settle(response, v) if v is None or not v.flagged else await self.arefusal(raw, input_verdict, v)

    @staticmethod
    def _settle(response: ChatResponse, v: Any) -> ChatResponse:
        meta = response.additional_kwargs.setdefault("ohd_guard", {})
        meta["output_verdict"] = v.model_dump(mode="json") if v is not None else None
        return response

    @staticmethod
    def _whole(pieces: Sequence[ChatResponse]) -> ChatMessage:
        """The whole streamed answer: the last piece's message (LlamaIndex streams accumulate it),
        or the deltas joined where a stream leaves the message empty."""
        msg = pieces[-1].message
        deltas = "".join(p.delta or "" for p in pieces)
        if not (msg.content or "").strip() and deltas.strip():
            return msg.model_copy(update={"blocks": [*msg.blocks, TextBlock(text=deltas)]})
        return msg

    def held(self, raw: Any, input_verdict: Any, pieces: Sequence[ChatResponse]) -> list[ChatResponse]:
        """A stream held back until checked: its pieces when the whole answer passed, else the refusal."""
        if not pieces:
            return []
        v = self.verdict(raw, self._whole(pieces))
        if v is not None and v.flagged:
            return [self.refusal(raw, input_verdict, v)]
        return [self._settle(p, v) for p in pieces]

    async def aheld(self, raw: Any, input_verdict: Any, pieces: Sequence[ChatResponse]) -> list[ChatResponse]:
        if not pieces:
            return []
        v = await self.averdict(raw, self._whole(pieces))
        if v is not None and v.flagged:
            return [await self.arefusal(raw, input_verdict, v)]
        return [self._settle(p, v) for p in pieces]


# ----------------------------------------------------------------------------- both LLMs' base
class GuardLLMBase(FunctionCallingLLM):
    """The guard both LLMs hold (``guard``: a typed error naming the class when none was given) and
    their output check (``check_output``, ``answer_profile``, ``refusal_max_new_tokens``)."""

    check_output: bool = Field(default=False, description="Check every answer too; a flagged one is refused.")
    answer_profile: Any = Field(default=None, exclude=True,
                                description="The output check's profile (path or object); default: the shipped one.")
    refusal_max_new_tokens: int = Field(default=64, gt=0, description="Length cap of an anchored refusal.")

    _guard: Any = PrivateAttr(default=None)
    _output: OutputCheck | None = PrivateAttr(default=None)

    def _bind(self, guard: Any) -> None:
        """Hold ``guard`` (``None``: the ``guard`` property raises) and, under ``check_output``, its output check."""
        self._guard = guard
        if guard is not None and self.check_output:
            self._output = OutputCheck(guard, self.class_name(), self.answer_profile, self.refusal_max_new_tokens)

    @property
    def guard(self) -> Any:
        """The :class:`~ohd_guard.guard.OhdGuard` screening every call."""
        return need(self._guard, self.class_name())
