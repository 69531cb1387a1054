"""``ChatOhdGuard``: the guarded local (vision-)language model as a LangChain chat model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    BaseCallbackManager,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, PrivateAttr

from langchain_ohd_guard.convert import to_message_dicts
from langchain_ohd_guard.events import adispatch_verdict, dispatch_verdict
from langchain_ohd_guard.structured import response_instruction, structured
from langchain_ohd_guard.tools import parse_tool_calls, tool_names, tool_schemas, with_tools
from ohd_guard.generation import StopTrimmer, cut_at_stops
from ohd_guard.tools import template_tool_format, tool_turns, with_system_section
from ohd_guard.types import response_payload

if TYPE_CHECKING:
    from typing import TypeAlias

    from ohd_guard.guard import AsyncGuardedStream, GuardedStream, OhdGuard
    from ohd_guard.types import GuardedResponse, Verdict

    GuardField: TypeAlias = OhdGuard
else:
    GuardField = Any  # the guard is held unvalidated, as before; the type checker sees OhdGuard

__all__ = ["ChatOhdGuard"]

#: Per-call keyword arguments passed on to ``model.generate`` (others are refused, not ignored).
_GEN_KEYS = {"top_p", "top_k", "repetition_penalty", "do_sample", "num_beams", "min_new_tokens"}
_CALL_KEYS = _GEN_KEYS | {"max_tokens", "max_new_tokens", "temperature", "timeout"}


def _has_tools(kwargs: dict[str, Any]) -> bool:
    return bool(kwargs.get("tools")) and kwargs.get("tool_choice") != "none"


def _bound(kwargs: dict[str, Any]) -> list[str] | None:
    """The names of the tools a call may make (``None`` without tools: then nothing is parsed)."""
    return tool_names(kwargs["tools"]) if _has_tools(kwargs) else None


def _as_chunk(result: ChatResult) -> ChatGenerationChunk:
    """A whole answer (with its tool calls) as the one, last chunk of a stream."""
    import json

    msg = result.generations[0].message
    calls = [{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i, "type": "tool_call_chunk"}
             for i, c in enumerate(msg.tool_calls)]
    return ChatGenerationChunk(message=AIMessageChunk(content=msg.content, tool_call_chunks=calls,
                                                      response_metadata=msg.response_metadata, chunk_position="last"))


def _cut(text: str, stop: Sequence[str] | None) -> str:
    return cut_at_stops(text, stop)[0]


# -- the run of a streamed call -----------------------------------------------------------------------
# langchain-core opens the chat-model run (``on_chat_model_start``) itself but calls ``_stream`` /
# ``_astream`` *without* its run manager, on purpose: in ``stream()``, ``astream()`` and in
# ``invoke()``/``ainvoke()``/``batch()`` when they stream (``streaming=True``, ``astream_events``),
# and it reports every chunk to ``on_llm_new_token`` itself. Only the v2 streaming path passes the run
# manager. So the call sites below publish the open run here, for ``_stream``/``_astream`` to attach
# the verdict event to: ``_(a)generate_with_cache`` publishes its run manager, ``stream``/``astream``
# a :class:`_RunTap` that learns the run from ``on_chat_model_start``. The value is set and reset
# within one step of the caller, so it never outlives the call that set it.
_OPEN_RUN: ContextVar[Any] = ContextVar("langchain_ohd_guard_open_run", default=None)
_NOTHING = object()


class _RunTap(BaseCallbackHandler):
    """Learns the chat-model run that ``BaseChatModel.stream``/``astream`` open, and rebuilds a run
    manager for it over ``handlers`` (the handlers that call runs with, the tap left out)."""

    run_inline = True  # record the run before langchain-core goes on to call _astream

    def __init__(self, handlers: list[BaseCallbackHandler]):
        self.handlers = handlers
        self.run: dict[str, Any] | None = None

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID,
                            parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.run is None:
            self.run = {"run_id": run_id, "parent_run_id": parent_run_id, "tags": list(tags or []),
                        "metadata": dict(metadata or {})}

    def run_manager(self, cls: type[Any]) -> Any:
        if self.run is None:
            return None
        return cls(handlers=self.handlers, inheritable_handlers=[], **self.run)


def _open_run(cls: type[Any]) -> Any:
    """The run manager of the run langchain-core opened for the current call (``cls`` when rebuilt)."""
    run = _OPEN_RUN.get()
    return run.run_manager(cls) if isinstance(run, _RunTap) else run


class ChatOhdGuard(BaseChatModel):
    """A local (vision-)language model that answers only what its One-head Defense guard passes.

    Every call renders the whole conversation (text and images: v1 image blocks, OpenAI
    ``image_url`` data URIs, legacy v0 blocks) with the model's chat template, screens it, and then
    either answers from the screening prefill's KV cache or returns the guard's refusal (anchored,
    static, or :class:`~ohd_guard.errors.GuardViolation` under ``refusal="raise"``). The verdict is
    in ``response_metadata["ohd_guard"]`` of every response (safe ones too; in a stream, on the
    last chunk) and is sent as the custom event ``"ohd_guard.verdict"``.

    Tools (:meth:`bind_tools`, ``tool_choice``, ``ToolMessage`` results, and so ``create_agent``)
    go through the text format of
    :mod:`langchain_ohd_guard.tools`: the definitions are part of the screened system prompt and
    a call to a bound tool in the answer (``<tool_call>{...}</tool_call>``, bare or fenced JSON,
    see :func:`ohd_guard.tools.parse_tool_calls`) becomes ``AIMessage.tool_calls``. With tools
    bound a stream sends the answer in one chunk (calls cannot be told from text before the end).
    Earlier calls and ``ToolMessage`` results are written in the chat template's own tool format
    where it has one this package reproduces (Qwen2.5's ``<tool_call>`` / ``<tool_response>``, see
    :func:`ohd_guard.tools.tool_turns`), else as ``[tool call] name(args)`` / ``[tool result]`` text.
    A refusal never carries tool calls. :meth:`with_structured_output` returns the parsed object,
    or raises :class:`~langchain_ohd_guard.structured.GuardRefusedError` when the guard refused.

    Build it with ``ChatOhdGuard(guard=...)``, :meth:`from_guard` or :meth:`from_profile`.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model_name: str = Field(default="", alias="model")
    """Name reported to tracing (default: the guarded model's name or type)."""
    temperature: float | None = None
    """Sampling temperature; ``None`` or ``0`` decode greedily."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Most new tokens per answer (default 256)."""
    top_p: float | None = None
    """Nucleus sampling (with ``temperature > 0``)."""
    stop: list[str] | None = None
    """Stop sequences: generation ends at, and the answer is cut before, the first one."""
    timeout: float | None = None
    """Wall-clock cap of one generation in seconds (``max_time`` of ``generate``)."""
    max_retries: int = 0
    """Accepted for LangChain compatibility; a local model is not retried."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks then see each token)."""
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra ``model.generate`` arguments for every call (``repetition_penalty``, ...)."""

    _guard: GuardField | None = PrivateAttr(default=None)

    def __init__(self, *, guard: OhdGuard | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._guard = guard
        if guard is not None and not self.model_name:
            cfg = getattr(guard.model, "config", None)
            self.model_name = str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or "local")

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_guard(cls, guard: OhdGuard, **kwargs: Any) -> ChatOhdGuard:
        """Chat with the model an existing :class:`~ohd_guard.guard.OhdGuard` already holds."""
        return cls(guard=guard, **kwargs)

    @classmethod
    def from_profile(cls, model_ref: Any = None, profile_path: str | Path | None = None, *,
                     device: str = "auto", dtype: str = "auto", guard_options: dict[str, Any] | None = None,
                     **kwargs: Any) -> ChatOhdGuard:
        """Load a model and its profile with :meth:`OhdGuard.load` (defaults: the embedded model and
        its shipped profile). ``guard_options`` go to ``OhdGuard`` (``refusal``, ``on_error``, ...)."""
        from ohd_guard.guard import OhdGuard

        guard = OhdGuard.load(model_ref, profile_path, device=device, dtype=dtype, **(guard_options or {}))
        return cls(guard=guard, **kwargs)

    @property
    def guard(self) -> OhdGuard:
        """The :class:`~ohd_guard.guard.OhdGuard` screening every call."""
        if self._guard is None:
            from ohd_guard.errors import InvalidInputError

            raise InvalidInputError("ChatOhdGuard has no guard: build it with ChatOhdGuard(guard=...), "
                                    "ChatOhdGuard.from_guard(guard) or ChatOhdGuard.from_profile(...)")
        return self._guard

    # -- LangChain metadata -------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "ohd-guard"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "top_p": self.top_p}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="ohd_guard", ls_model_name=kwargs.get("model", self.model_name),
                                 ls_model_type="chat")
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # -- translation --------------------------------------------------------------------------------
    def _request(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any], list[str] | None]:
        from ohd_guard.errors import InvalidInputError

        if kwargs.get("functions"):
            raise NotImplementedError("ChatOhdGuard takes tools through bind_tools(...) (or tools=...), not the legacy "
                                      "`functions`; to guard another model's function calling use guarded(model, guard) "
                                      "or OhdGuardMiddleware")
        tools, tool_choice = kwargs.get("tools") or [], kwargs.get("tool_choice")
        if tool_choice == "none":
            tools = []
        response_format = kwargs.get("response_format")
        if response_format is not None and not (isinstance(response_format, dict)
                                                and response_format.get("type") in ("json_object", "json_schema")):
            raise InvalidInputError("ChatOhdGuard: response_format must be {'type': 'json_object'} or "
                                    "{'type': 'json_schema', 'json_schema': {'schema': ...}}")
        kw = {k: v for k, v in kwargs.items()
              if not k.startswith("ls_") and k not in ("model", "tools", "tool_choice", "response_format")}
        gen: dict[str, Any] = dict(self.generation_kwargs)
        max_tokens, max_new_tokens = kw.pop("max_tokens", None), kw.pop("max_new_tokens", None)
        gen["max_new_tokens"] = max_tokens or max_new_tokens or self.max_tokens or 256
        temperature = kw.pop("temperature", self.temperature)
        top_p = kw.pop("top_p", self.top_p)
        if temperature:
            gen.update(do_sample=True, temperature=float(temperature))
            if top_p is not None:
                gen["top_p"] = float(top_p)
        else:
            gen.setdefault("do_sample", False)
        timeout = kw.pop("timeout", self.timeout)
        if timeout:
            gen["max_time"] = float(timeout)
        unknown = set(kw) - _GEN_KEYS
        if unknown:
            raise InvalidInputError(f"ChatOhdGuard: unsupported call arguments {sorted(unknown)}; generation "
                                    f"arguments allowed per call: {sorted(_CALL_KEYS)}")
        gen.update(kw)
        stop = stop if stop is not None else self.stop
        if stop:
            gen.update(stop_strings=list(stop), tokenizer=self.guard.tokenizer)
        template = getattr(self.guard.processor, "chat_template", None) or getattr(self.guard.tokenizer,
                                                                                    "chat_template", None)
        msgs = to_message_dicts(messages, tool_calls=template_tool_format(template) is not None)
        msgs = with_tools(tool_turns(msgs, template), tools, tool_choice)
        if response_format is not None:
            msgs = with_system_section(msgs, response_instruction(response_format))
        return msgs, gen, stop

    def _metadata(self, verdict: Verdict, refused: bool, kind: str | None) -> dict[str, Any]:
        return {"model_name": self.model_name, "model_provider": "ohd_guard",
                "ohd_guard": response_payload(verdict, refused, kind)}

    def _result(self, resp: GuardedResponse, stop: list[str] | None, tools: list[str] | None = None) -> ChatResult:
        text = _cut(resp.text, stop)
        meta = self._metadata(resp.verdict, resp.refused, resp.refusal_kind)
        if tools and not resp.refused:
            text, calls, invalid = parse_tool_calls(text, tools)
            msg = AIMessage(content=text, tool_calls=calls, invalid_tool_calls=invalid, response_metadata=meta)
        else:
            msg = AIMessage(content=text, response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=msg)])

    # -- tools --------------------------------------------------------------------------------------
    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool], *,
                   tool_choice: str | bool | dict[str, Any] | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` to the model (``tool_choice``: ``"auto"``, ``"any"``/``"required"``,
        ``"none"``, a tool name, ``True`` for the only tool, or an OpenAI-style dict)."""
        schemas = tool_schemas(tools)
        if isinstance(tool_choice, dict):
            tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name") or "any"
        elif tool_choice is True:
            tool_choice = schemas[0]["function"]["name"] if len(schemas) == 1 else "any"
        elif tool_choice is False:
            tool_choice = None
        return super().bind(tools=schemas, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: Any = None, *, method: str = "json_schema",
                               include_raw: bool = False, strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, Any]:
        """The answer parsed into ``schema`` (a pydantic model gives an instance; a TypedDict, JSON
        schema or tool dict a dict) by ``method`` ``"json_schema"`` (default), ``"function_calling"``
        or ``"json_mode"``; a refused conversation raises
        :class:`~langchain_ohd_guard.structured.GuardRefusedError` (with its verdict); ``include_raw``
        gives ``{"raw", "parsed", "parsing_error"}``. See :mod:`langchain_ohd_guard.structured`."""
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        return structured(self, schema, method, include_raw, strict)

    # -- calls --------------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        raw, gen, stop = self._request(messages, stop, kwargs)
        tools = _bound(kwargs)
        try:
            resp = self.guard.generate(raw, **gen)
        except Exception as e:
            verdict = getattr(e, "verdict", None)  # GuardViolation under refusal="raise"
            if verdict is not None and run_manager is not None:
                dispatch_verdict(verdict, run_manager=run_manager)
            raise
        if run_manager is not None:
            dispatch_verdict(resp.verdict, run_manager=run_manager)
        return self._result(resp, stop, tools)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        raw, gen, stop = self._request(messages, stop, kwargs)
        tools = _bound(kwargs)
        try:
            resp = await self.guard.agenerate(raw, **gen)
        except Exception as e:
            verdict = getattr(e, "verdict", None)
            if verdict is not None and run_manager is not None:
                await adispatch_verdict(verdict, run_manager=run_manager)
            raise
        if run_manager is not None:
            await adispatch_verdict(resp.verdict, run_manager=run_manager)
        return self._result(resp, stop, tools)

    # -- handing the open run to _stream / _astream (see _OPEN_RUN) -----------------------------------
    def _generate_with_cache(self, messages: list[BaseMessage], stop: list[str] | None = None,
                             run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        token = _OPEN_RUN.set(run_manager)
        try:
            return super()._generate_with_cache(messages, stop=stop, run_manager=run_manager, **kwargs)
        finally:
            _OPEN_RUN.reset(token)

    async def _agenerate_with_cache(self, messages: list[BaseMessage], stop: list[str] | None = None,
                                    run_manager: AsyncCallbackManagerForLLMRun | None = None,
                                    **kwargs: Any) -> ChatResult:
        token = _OPEN_RUN.set(run_manager)
        try:
            return await super()._agenerate_with_cache(messages, stop=stop, run_manager=run_manager, **kwargs)
        finally:
            _OPEN_RUN.reset(token)

    def _tapped(self, config: RunnableConfig | None) -> tuple[RunnableConfig, _RunTap]:
        """``config`` plus a :class:`_RunTap` among its callbacks."""
        config = ensure_config(config)
        callbacks = config.get("callbacks")
        tap = _RunTap(CallbackManager.configure(callbacks, self.callbacks, self.verbose).handlers)
        if isinstance(callbacks, BaseCallbackManager):
            callbacks = callbacks.copy()
            callbacks.add_handler(tap, inherit=False)
        else:
            callbacks = [*(callbacks or []), tap]
        return {**config, "callbacks": callbacks}, tap

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        config, tap = self._tapped(config)
        chunks = super().stream(input, config, stop=stop, **kwargs)
        try:
            token = _OPEN_RUN.set(tap)
            try:
                first = next(chunks, _NOTHING)  # opens the run and enters _stream
            finally:
                _OPEN_RUN.reset(token)
            if first is _NOTHING:
                return
            yield first
            yield from chunks
        finally:
            chunks.close()

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        config, tap = self._tapped(config)
        chunks = super().astream(input, config, stop=stop, **kwargs)
        try:
            token = _OPEN_RUN.set(tap)
            try:
                first = await anext(chunks, _NOTHING)  # opens the run and enters _astream
            finally:
                _OPEN_RUN.reset(token)
            if first is _NOTHING:
                return
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    def _final_chunk(self, stream: GuardedStream | AsyncGuardedStream) -> ChatGenerationChunk:
        resp, verdict = stream.response, stream.verdict
        refused = resp.refused if resp is not None else bool(verdict and verdict.flagged)
        kind = resp.refusal_kind if resp is not None else None
        meta = self._metadata(verdict, refused, kind) if verdict is not None else {}
        return ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=meta, chunk_position="last"))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # A run manager passed in (the v2 streaming path) gets the tokens from us; otherwise
        # langchain-core reports them itself and we only need its run for the verdict event.
        run = run_manager if run_manager is not None else _open_run(CallbackManagerForLLMRun)
        if _has_tools(kwargs):
            chunk = _as_chunk(self._generate(messages, stop, run, **kwargs))
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
            return
        raw, gen, stop = self._request(messages, stop, kwargs)
        stream = self.guard.stream(raw, **gen)
        trim, sent = StopTrimmer(stop), False

        def announce() -> None:
            nonlocal sent
            if not sent and stream.verdict is not None and run is not None:
                dispatch_verdict(stream.verdict, run_manager=run)
                sent = True

        try:
            for piece in stream:
                announce()
                if text := trim.feed(piece):
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
                    if run_manager is not None:
                        run_manager.on_llm_new_token(text, chunk=chunk)
                    yield chunk
                if trim.stopped:
                    break
            else:
                if tail := trim.flush():
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=tail))
                    if run_manager is not None:
                        run_manager.on_llm_new_token(tail, chunk=chunk)
                    yield chunk
        finally:
            announce()
            stream.close()
        yield self._final_chunk(stream)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        run = run_manager if run_manager is not None else _open_run(AsyncCallbackManagerForLLMRun)
        if _has_tools(kwargs):
            chunk = _as_chunk(await self._agenerate(messages, stop, run, **kwargs))
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
            return
        raw, gen, stop = self._request(messages, stop, kwargs)
        stream = self.guard.astream(raw, **gen)
        trim, sent = StopTrimmer(stop), False

        async def announce() -> None:
            nonlocal sent
            if not sent and stream.verdict is not None and run is not None:
                await adispatch_verdict(stream.verdict, run_manager=run)
                sent = True

        try:
            async for piece in stream:
                await announce()
                if text := trim.feed(piece):
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(text, chunk=chunk)
                    yield chunk
                if trim.stopped:
                    break
            else:
                if tail := trim.flush():
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=tail))
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(tail, chunk=chunk)
                    yield chunk
        finally:
            await announce()
            await stream.aclose()
        yield self._final_chunk(stream)
