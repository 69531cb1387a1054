"""``OhdGuardLLM``: the guarded local (vision-)language model as a LlamaIndex function-calling LLM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    ToolCallBlock,
)
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import ToolSelection
from pydantic import Field

from llama_index.llms.ohd_guard.events import adispatch_verdict, dispatch_verdict
from llama_index.llms.ohd_guard.responses import GuardLLMBase, aonce, chat, info, once
from llama_index.llms.ohd_guard.tools import (
    answer_message,
    guard_input,
    messages_with,
    tool_choice_of,
    tool_schemas,
    tool_selections,
)

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["OhdGuardLLM"]

SOURCE = "OhdGuardLLM"


class OhdGuardLLM(GuardLLMBase):
    """The guarded local (vision-)language model as a LlamaIndex LLM, with function calling.

    ``chat`` takes ``ChatMessage`` with ``TextBlock``/``ImageBlock`` (bytes, path, url). Each call
    screens the whole conversation and then answers from the screening prefill, or returns the
    guard's refusal (anchored or static; :class:`~ohd_guard.errors.GuardViolation` when the guard
    was built with ``refusal="raise"``). The verdict is in ``additional_kwargs["ohd_guard"]`` and
    is dispatched as an :class:`~llama_index.llms.ohd_guard.events.OhdGuardVerdictEvent`. Async calls
    run on the guard's worker thread (concurrent ones share batched screening prefills).

    Tools (``chat_with_tools``, so ``FunctionAgent``): their definitions go into the screened system
    prompt (:mod:`ohd_guard.tools`), earlier calls and tool results are written in the chat
    template's own tool format where the core reproduces it (Qwen2.5's), and a call to a given tool
    in the answer (tagged, bare or fenced JSON) becomes a ``ToolCallBlock``. A refusal never calls a tool.

    ``check_output=True``: every answer is checked too (the core's output check, read at the
    answer's last token; ``answer_profile`` defaults to the one shipped for the model) and a flagged
    one is replaced by the guard's refusal, the output verdict in ``additional_kwargs["ohd_guard"]
    ["output_verdict"]``. Streams with tools or with the output check hold the answer back and
    deliver it (or the refusal) as one piece once generated and checked.
    """

    model_name: str = Field(default="", description="Name reported in metadata (default: the model's).")
    max_new_tokens: int = Field(default=256, gt=0, description="Most new tokens per answer.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 decodes greedily.")
    context_window: int = Field(default=0, ge=0, description="Context window reported in metadata "
                                                               "(default: the guard's max_prompt_tokens).")
    generate_kwargs: dict[str, Any] = Field(default_factory=dict,
                                            description="Extra model.generate arguments for every call.")
    refusal_max_new_tokens: int = Field(default=64, gt=0, description="Length cap of the refusal of a flagged answer.")

    def __init__(self, guard: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._bind(guard)
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
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window or 4096, num_output=self.max_new_tokens,
                           is_chat_model=True, is_function_calling_model=True,
                           model_name=self.model_name or "ohd-guard")

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

    @staticmethod
    def _request(messages: Sequence[ChatMessage] | str, kwargs: dict[str, Any], guard: Any) -> tuple[Any, Any]:
        """(what the guard screens and the model answers, the tool names a call may make or None);
        ``tools``/``tool_choice`` are taken out of ``kwargs`` (the rest goes to generation)."""
        schemas, choice = kwargs.pop("tools", None) or [], kwargs.pop("tool_choice", None)
        if choice == "none":
            schemas = []
        names = [s["function"]["name"] for s in schemas] or None
        return guard_input(guard, messages, schemas, choice), names

    # -- one-shot -----------------------------------------------------------------------------
    def _respond(self, raw: Any, kwargs: dict[str, Any], span_id: str | None = None) -> Any:
        try:
            resp = self.guard.generate(raw, **self._gen(kwargs))
        except Exception as e:
            if getattr(e, "verdict", None) is not None:  # GuardViolation (refusal="raise")
                dispatch_verdict(e.verdict, SOURCE, span_id)  # type: ignore[attr-defined]
            raise
        dispatch_verdict(resp.verdict, SOURCE, span_id)
        return resp

    async def _arespond(self, raw: Any, kwargs: dict[str, Any], span_id: str | None = None) -> Any:
        try:
            resp = await self.guard.agenerate(raw, **self._gen(kwargs))
        except Exception as e:
            if getattr(e, "verdict", None) is not None:
                await adispatch_verdict(e.verdict, SOURCE, span_id)  # type: ignore[attr-defined]
            raise
        await adispatch_verdict(resp.verdict, SOURCE, span_id)
        return resp

    @staticmethod
    def _answer(resp: Any, names: Any, delta: bool = False) -> ChatResponse:
        msg = answer_message(resp.text, None if resp.refused else names)
        return ChatResponse(message=msg, raw=resp, delta=(msg.content or "") if delta else None,
                            additional_kwargs={"ohd_guard": info(resp.verdict, resp.refused, resp.refusal_kind)})

    def _checked(self, raw: Any, resp: Any, names: Any, delta: bool = False) -> ChatResponse:
        out = self._answer(resp, names, delta)
        return out if self._output is None or resp.refused else self._output.apply(raw, resp.verdict, out)

    async def _achecked(self, raw: Any, resp: Any, names: Any, delta: bool = False) -> ChatResponse:
        out = self._answer(resp, names, delta)
        return out if self._output is None or resp.refused else await self._output.aapply(raw, resp.verdict, out)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        raw, names = self._request(messages, kwargs, self.guard)
        return self._checked(raw, self._respond(raw, kwargs), names)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        raw, names = self._request(messages, kwargs, self.guard)
        return await self._achecked(raw, await self._arespond(raw, kwargs), names)

    # -- function calling ---------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self, tools: Sequence[BaseTool], user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None, verbose: bool = False, allow_parallel_tool_calls: bool = False,
        tool_required: bool = False, tool_choice: Any = None, **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat`` arguments: the messages, the tools as OpenAI schemas and the core's tool choice."""
        out: dict[str, Any] = {"messages": messages_with(user_msg, chat_history), **kwargs}
        if tools:
            out.update(tools=tool_schemas(tools), tool_choice=tool_choice_of(tool_required, tool_choice))
        return out

    def _validate_chat_with_tools_response(self, response: ChatResponse, tools: Sequence[BaseTool],
                                           allow_parallel_tool_calls: bool = False, **kwargs: Any) -> ChatResponse:
        """Without parallel calls only the first call is kept (as LlamaIndex's OpenAI LLM does)."""
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not allow_parallel_tool_calls and len(calls) > 1:
            response.message.blocks = [b for b in response.message.blocks
                                       if not isinstance(b, ToolCallBlock) or b is calls[0]]
        return response

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        return tool_selections(response, error_on_no_tool_call)

    # -- streaming: the verdict event goes out before the first piece; every piece carries the
    # refusal decision, the last one the final response's (as a one-shot call reports it) ------------
    def _pieces(self, raw: Any, kwargs: dict[str, Any], span_id: str | None):
        """Yield (accumulated text, delta, info) as the guard streams."""
        stream = self.guard.stream(raw, **self._gen(kwargs))
        behind = _OneBehind(stream, self.guard.refusal)
        try:
            for piece in stream:
                if behind.event_due():
                    dispatch_verdict(stream.verdict, SOURCE, span_id)
                yield from behind.push(piece)
        finally:
            if behind.event_due(at_end=True):
                dispatch_verdict(stream.verdict, SOURCE, span_id)
            stream.close()
        yield from behind.rest()

    async def _apieces(self, raw: Any, kwargs: dict[str, Any], span_id: str | None):
        stream = self.guard.astream(raw, **self._gen(kwargs))
        behind = _OneBehind(stream, self.guard.refusal)
        try:
            async for piece in stream:
                if behind.event_due():
                    await adispatch_verdict(stream.verdict, SOURCE, span_id)
                for item in behind.push(piece):
                    yield item
        finally:
            if behind.event_due(at_end=True):
                await adispatch_verdict(stream.verdict, SOURCE, span_id)
            await stream.aclose()
        for item in behind.rest():
            yield item

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        raw, names = self._request(messages, kwargs, self.guard)
        span_id = active_span_id.get()
        if names or self._output is not None:  # held back: one piece, generated, parsed and checked
            return once(self._checked(raw, self._respond(raw, kwargs, span_id), names, delta=True))

        def gen() -> ChatResponseGen:
            for text, delta, meta in self._pieces(raw, kwargs, span_id):
                yield chat(text, meta, delta=delta)

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        raw, names = self._request(messages, kwargs, self.guard)
        span_id = active_span_id.get()
        if names or self._output is not None:
            return aonce(await self._achecked(raw, await self._arespond(raw, kwargs, span_id), names, delta=True))

        async def gen() -> ChatResponseAsyncGen:
            async for text, delta, meta in self._apieces(raw, kwargs, span_id):
                yield chat(text, meta, delta=delta)

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


class _OneBehind:
    """The guard's stream (sync or async) as (accumulated text, delta, info), one piece behind so the
    last one can carry the final response's info; the others carry the refusal decision as the
    verdict gives it. ``event_due`` says once when the verdict event is to go out: before the first
    piece, or at the end of a stream that yielded none (when it has a verdict)."""

    def __init__(self, stream: Any, refusal: str):
        self.stream, self.refusal = stream, refusal
        self.text, self.sent = "", False
        self.held: str | None = None

    def event_due(self, at_end: bool = False) -> bool:
        if self.sent or (at_end and self.stream.verdict is None):
            return False
        self.sent = True
        return True

    def push(self, piece: str) -> list[tuple[str, str, dict[str, Any]]]:
        out: list[tuple[str, str, dict[str, Any]]] = []
        if self.held is not None:
            self.text += self.held
            out.append((self.text, self.held, self._provisional(self.stream.verdict)))
        self.held = piece
        return out

    def rest(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [] if self.held is None else [(self.text + self.held, self.held, self._final())]

    def _provisional(self, verdict: Any) -> dict[str, Any]:
        kind = None
        if verdict.flagged:
            kind = "static" if verdict.error or self.refusal == "static" else "anchored"
        return info(verdict, bool(verdict.flagged), kind)

    def _final(self) -> dict[str, Any]:
        resp = self.stream.response
        return info(resp.verdict, resp.refused, resp.refusal_kind) if resp is not None else self._provisional(self.stream.verdict)
