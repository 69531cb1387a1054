"""The guard as LlamaIndex LLMs: the guarded local (V)LM itself, and a screen in front of any LLM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from llama_index.core.base.llms.generic_utils import (
    achat_to_completion_decorator,
    astream_chat_to_completion_decorator,
    chat_to_completion_decorator,
    stream_chat_to_completion_decorator,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import LLM
from pydantic import Field, PrivateAttr, SerializeAsAny

from llama_index.llms.ohd_guard.convert import to_message_dicts
from llama_index.llms.ohd_guard.events import adispatch_verdict, dispatch_verdict
from ohd_guard.types import response_payload

__all__ = ["GuardedLLM", "OhdGuardLLM"]


def _need(guard: Any, who: str) -> Any:
    if guard is None:
        from ohd_guard.errors import InvalidInputError

        raise InvalidInputError(f"{who} has no guard: pass guard=<OhdGuard> (or use {who}.from_profile)")
    return guard


def _raw(guard: Any, messages: Sequence[ChatMessage] | str) -> Any:
    """What the guard is handed: a prompt string as is, chat messages as the core's message dicts."""
    if isinstance(messages, str):
        return messages
    return to_message_dicts(list(messages), limits=guard.limits)


def _info(verdict: Any, refused: bool, kind: str | None) -> dict[str, Any]:
    """``additional_kwargs["ohd_guard"]`` of every response (the core's one payload shape)."""
    return response_payload(verdict, refused, kind)


def _chat(text: str, info: dict[str, Any], raw: Any = None, delta: str | None = None) -> ChatResponse:
    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, raw=raw,
                        additional_kwargs={"ohd_guard": info})


def _completion(text: str, info: dict[str, Any], raw: Any = None, delta: str | None = None) -> CompletionResponse:
    return CompletionResponse(text=text, delta=delta, raw=raw, additional_kwargs={"ohd_guard": info})


def _passed(resp: Any, verdict: Any) -> Any:
    """A safe response of the answering LLM with its verdict in ``additional_kwargs["ohd_guard"]``."""
    resp.additional_kwargs["ohd_guard"] = _info(verdict, False, None)
    return resp


def _passed_stream(gen: Any, verdict: Any):
    for resp in gen:
        yield _passed(resp, verdict)


async def _apassed_stream(gen: Any, verdict: Any):
    async for resp in gen:
        yield _passed(resp, verdict)


def _once(item: Any):
    """A one-item generator (LlamaIndex's stream callbacks recognise generators, not iterators)."""
    yield item


# ----------------------------------------------------------------------------- the local model
class OhdGuardLLM(LLM):
    """The guarded local (vision-)language model as a LlamaIndex LLM.

    ``chat`` takes ``ChatMessage`` with ``TextBlock``/``ImageBlock`` (bytes, path, url). Each call
    screens the whole conversation and then answers from the screening prefill, or returns the
    guard's refusal (anchored or static; :class:`~ohd_guard.errors.GuardViolation` when the guard
    was built with ``refusal="raise"``). The verdict is in ``additional_kwargs["ohd_guard"]`` and
    is dispatched as an :class:`~llama_index.llms.ohd_guard.events.OhdGuardVerdictEvent`. Async calls
    run on the guard's worker thread (concurrent ones share batched screening prefills).
    """

    model_name: str = Field(default="", description="Name reported in metadata (default: the model's).")
    max_new_tokens: int = Field(default=256, gt=0, description="Most new tokens per answer.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 decodes greedily.")
    context_window: int = Field(default=0, ge=0, description="Context window reported in metadata "
                                                               "(default: the guard's max_prompt_tokens).")
    generate_kwargs: dict[str, Any] = Field(default_factory=dict,
                                            description="Extra model.generate arguments for every call.")

    _guard: Any = PrivateAttr(default=None)

    def __init__(self, guard: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._guard = guard
        if guard is not None:
            cfg = getattr(guard.model, "config", None)
            if not self.model_name:
                self.model_name = str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or "local")
            if not self.context_window:
                self.context_window = int(guard.max_prompt_tokens or 4096)

    @classmethod
    def from_profile(cls, model_ref: Any = None, profile_path: str | Path | None = None, *, device: str = "auto",
                     dtype: str = "auto", guard_options: dict[str, Any] | None = None, **kwargs: Any) -> OhdGuardLLM:
        """Load a model and its profile with :meth:`OhdGuard.load` (default: the embedded model)."""
        from ohd_guard.guard import OhdGuard

        return cls(OhdGuard.load(model_ref, profile_path, device=device, dtype=dtype, **(guard_options or {})), **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "OhdGuardLLM"

    @property
    def guard(self) -> Any:
        """The :class:`~ohd_guard.guard.OhdGuard` screening every call."""
        return _need(self._guard, "OhdGuardLLM")

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window or 4096, num_output=self.max_new_tokens,
                           is_chat_model=True, model_name=self.model_name or "ohd-guard")

    def _gen(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kw = {**self.generate_kwargs, **kwargs}
        kw.pop("formatted", None)
        kw["max_new_tokens"] = kw.pop("max_tokens", None) or kw.get("max_new_tokens") or self.max_new_tokens
        temperature = kw.pop("temperature", self.temperature)
        if temperature:
            kw.update(do_sample=True, temperature=float(temperature))
        else:
            kw.setdefault("do_sample", False)
        return kw

    # -- one-shot -----------------------------------------------------------------------------
    def _respond(self, raw: Any, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], Any]:
        try:
            resp = self.guard.generate(raw, **self._gen(kwargs))
        except Exception as e:
            if getattr(e, "verdict", None) is not None:  # GuardViolation (refusal="raise")
                dispatch_verdict(e.verdict, "OhdGuardLLM")  # type: ignore[attr-defined]
            raise
        dispatch_verdict(resp.verdict, "OhdGuardLLM")
        return resp.text, _info(resp.verdict, resp.refused, resp.refusal_kind), resp

    async def _arespond(self, raw: Any, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], Any]:
        try:
            resp = await self.guard.agenerate(raw, **self._gen(kwargs))
        except Exception as e:
            if getattr(e, "verdict", None) is not None:
                await adispatch_verdict(e.verdict, "OhdGuardLLM")  # type: ignore[attr-defined]
            raise
        await adispatch_verdict(resp.verdict, "OhdGuardLLM")
        return resp.text, _info(resp.verdict, resp.refused, resp.refusal_kind), resp

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        text, info, resp = self._respond(_raw(self.guard, messages), kwargs)
        return _chat(text, info, raw=resp)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        text, info, resp = await self._arespond(_raw(self.guard, messages), kwargs)
        return _chat(text, info, raw=resp)

    # -- streaming: the verdict event goes out before the first piece; every piece carries the
    # refusal decision, the last one the final response's (as a one-shot call reports it) ------------
    def _provisional(self, verdict: Any) -> dict[str, Any]:
        kind = None
        if verdict.flagged:
            kind = "static" if verdict.error or self.guard.refusal == "static" else "anchored"
        return _info(verdict, bool(verdict.flagged), kind)

    def _final(self, stream: Any) -> dict[str, Any]:
        resp = stream.response
        return _info(resp.verdict, resp.refused, resp.refusal_kind) if resp is not None else self._provisional(stream.verdict)

    def _pieces(self, raw: Any, kwargs: dict[str, Any], span_id: str | None):
        """Yield (accumulated text, delta, info) as the guard streams (one piece behind, so the last
        one can carry the final response's info)."""
        stream = self.guard.stream(raw, **self._gen(kwargs))
        text, sent, held = "", False, None
        try:
            for piece in stream:
                if not sent:
                    dispatch_verdict(stream.verdict, "OhdGuardLLM", span_id)
                    sent = True
                if held is not None:
                    text += held
                    yield text, held, self._provisional(stream.verdict)
                held = piece
        finally:
            if not sent and stream.verdict is not None:
                dispatch_verdict(stream.verdict, "OhdGuardLLM", span_id)
            stream.close()
        if held is not None:
            yield text + held, held, self._final(stream)

    async def _apieces(self, raw: Any, kwargs: dict[str, Any], span_id: str | None):
        stream = self.guard.astream(raw, **self._gen(kwargs))
        text, sent, held = "", False, None
        try:
            async for piece in stream:
                if not sent:
                    await adispatch_verdict(stream.verdict, "OhdGuardLLM", span_id)
                    sent = True
                if held is not None:
                    text += held
                    yield text, held, self._provisional(stream.verdict)
                held = piece
        finally:
            if not sent and stream.verdict is not None:
                await adispatch_verdict(stream.verdict, "OhdGuardLLM", span_id)
            await stream.aclose()
        if held is not None:
            yield text + held, held, self._final(stream)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        raw, span_id = _raw(self.guard, messages), active_span_id.get()

        def gen() -> ChatResponseGen:
            for text, delta, info in self._pieces(raw, kwargs, span_id):
                yield _chat(text, info, delta=delta)

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        raw, span_id = _raw(self.guard, messages), active_span_id.get()

        async def gen() -> ChatResponseAsyncGen:
            async for text, delta, info in self._apieces(raw, kwargs, span_id):
                yield _chat(text, info, delta=delta)

        return gen()

    # -- completion: derived from chat (the prompt is one user turn), with LlamaIndex's own converters
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return chat_to_completion_decorator(self.chat)(prompt, **kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await achat_to_completion_decorator(self.achat)(prompt, **kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return stream_chat_to_completion_decorator(self.stream_chat)(prompt, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return await astream_chat_to_completion_decorator(self.astream_chat)(prompt, **kwargs)


# ----------------------------------------------------------------------------- screen + any LLM
class GuardedLLM(LLM):
    """Screens every call with the local guard, then hands safe ones to ``llm`` (any LlamaIndex LLM,
    local or remote) unchanged; ``metadata`` is ``llm``'s, so engines treat it exactly like ``llm``.

    A flagged input never reaches ``llm``: with ``on_flag="refuse"`` the response is the guard's
    refusal, written by the guard's local model (anchored) or its static message, with the verdict
    in ``additional_kwargs["ohd_guard"]`` (a safe response carries its verdict there too); with ``on_flag="raise"`` a
    :class:`~ohd_guard.errors.GuardViolation` is raised. Every verdict is dispatched as an
    :class:`~llama_index.llms.ohd_guard.events.OhdGuardVerdictEvent`.
    """

    llm: SerializeAsAny[LLM] = Field(description="The LLM that answers safe inputs.")
    on_flag: Literal["refuse", "raise"] = Field(default="refuse", description="Refuse or raise GuardViolation.")
    refusal_max_new_tokens: int = Field(default=64, gt=0, description="Length cap of an anchored refusal.")

    _guard: Any = PrivateAttr(default=None)

    def __init__(self, llm: LLM | None = None, guard: Any = None, **kwargs: Any):
        if llm is not None:
            kwargs["llm"] = llm
        kwargs.setdefault("callback_manager", getattr(kwargs.get("llm"), "callback_manager", None))
        if kwargs["callback_manager"] is None:
            kwargs.pop("callback_manager")
        super().__init__(**kwargs)
        self._guard = guard

    @classmethod
    def class_name(cls) -> str:
        return "GuardedLLM"

    @property
    def guard(self) -> Any:
        return _need(self._guard, "GuardedLLM")

    @property
    def metadata(self) -> LLMMetadata:
        return self.llm.metadata

    # -- screening ----------------------------------------------------------------------------
    def _screen(self, raw: Any) -> Any:
        verdict = self.guard.screen(raw)
        dispatch_verdict(verdict, "GuardedLLM")
        if verdict.flagged and self.on_flag == "raise":
            from ohd_guard.errors import GuardViolation

            raise GuardViolation(verdict)
        return verdict

    async def _ascreen(self, raw: Any) -> Any:
        verdict = await self.guard.ascreen(raw)
        await adispatch_verdict(verdict, "GuardedLLM")
        if verdict.flagged and self.on_flag == "raise":
            from ohd_guard.errors import GuardViolation

            raise GuardViolation(verdict)
        return verdict

    def _refusal(self, raw: Any, verdict: Any) -> tuple[str, dict[str, Any]]:
        """The guard's refusal for the input it has just flagged, without screening it again."""
        resp = self.guard.refuse(raw, verdict, max_new_tokens=self.refusal_max_new_tokens)
        return resp.text, _info(verdict, True, resp.refusal_kind)

    async def _arefusal(self, raw: Any, verdict: Any) -> tuple[str, dict[str, Any]]:
        resp = await self.guard.arefuse(raw, verdict, max_new_tokens=self.refusal_max_new_tokens)
        return resp.text, _info(verdict, True, resp.refusal_kind)

    # -- chat ---------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        raw = _raw(self.guard, messages)
        verdict = self._screen(raw)
        if not verdict.flagged:
            return _passed(self.llm.chat(messages, **kwargs), verdict)
        return _chat(*self._refusal(raw, verdict))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        raw = _raw(self.guard, messages)
        verdict = await self._ascreen(raw)
        if not verdict.flagged:
            return _passed(await self.llm.achat(messages, **kwargs), verdict)
        return _chat(*await self._arefusal(raw, verdict))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        raw = _raw(self.guard, messages)
        verdict = self._screen(raw)
        if not verdict.flagged:
            return _passed_stream(self.llm.stream_chat(messages, **kwargs), verdict)
        text, info = self._refusal(raw, verdict)
        return _once(_chat(text, info, delta=text))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        raw = _raw(self.guard, messages)
        verdict = await self._ascreen(raw)
        if not verdict.flagged:
            return _apassed_stream(await self.llm.astream_chat(messages, **kwargs), verdict)
        text, info = await self._arefusal(raw, verdict)

        async def gen() -> ChatResponseAsyncGen:
            yield _chat(text, info, delta=text)

        return gen()

    # -- completion ---------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        verdict = self._screen(prompt)
        if not verdict.flagged:
            return _passed(self.llm.complete(prompt, formatted=formatted, **kwargs), verdict)
        return _completion(*self._refusal(prompt, verdict))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        verdict = await self._ascreen(prompt)
        if not verdict.flagged:
            return _passed(await self.llm.acomplete(prompt, formatted=formatted, **kwargs), verdict)
        return _completion(*await self._arefusal(prompt, verdict))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        verdict = self._screen(prompt)
        if not verdict.flagged:
            return _passed_stream(self.llm.stream_complete(prompt, formatted=formatted, **kwargs), verdict)
        text, info = self._refusal(prompt, verdict)
        return _once(_completion(text, info, delta=text))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        verdict = await self._ascreen(prompt)
        if not verdict.flagged:
            return _apassed_stream(await self.llm.astream_complete(prompt, formatted=formatted, **kwargs), verdict)
        text, info = await self._arefusal(prompt, verdict)

        async def gen() -> CompletionResponseAsyncGen:
            yield _completion(text, info, delta=text)

        return gen()
