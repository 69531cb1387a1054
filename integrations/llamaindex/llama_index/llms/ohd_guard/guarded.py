"""``GuardedLLM``: the local guard in front of any LlamaIndex LLM, function calling included."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, MessageRole
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection
from pydantic import Field, SerializeAsAny

from llama_index.llms.ohd_guard.events import adispatch_verdict, dispatch_verdict
from llama_index.llms.ohd_guard.responses import (
    GuardLLMBase,
    aonce,
    apassed_stream,
    areplay,
    chat,
    completion,
    info,
    once,
    passed,
    passed_stream,
    replay,
)
from llama_index.llms.ohd_guard.tools import guard_input, messages_with, tool_choice_of, tool_schemas

if TYPE_CHECKING:  # annotations only
    from llama_index.core.base.llms.types import (
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
    )
    from llama_index.core.tools.types import BaseTool

__all__ = ["GuardedLLM"]

SOURCE = "GuardedLLM"


def _as_chat(r: CompletionResponse) -> ChatResponse:
    """A completion as a chat response, for the output check (verdict, delta and raw kept in place)."""
    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=r.text), delta=r.delta, raw=r.raw,
                        additional_kwargs=r.additional_kwargs)


def _as_completion(r: ChatResponse) -> CompletionResponse:
    return CompletionResponse(text=r.message.content or "", delta=r.delta, raw=r.raw, additional_kwargs=r.additional_kwargs)


class GuardedLLM(GuardLLMBase):
    """Screens every call with the local guard, then hands safe ones to ``llm`` (any LlamaIndex LLM,
    local or remote) unchanged; ``metadata`` is ``llm``'s, so engines treat it exactly like ``llm``.

    A flagged input never reaches ``llm``: with ``on_flag="refuse"`` the response is the guard's
    refusal, written by the guard's local model (anchored) or its static message, with the verdict
    in ``additional_kwargs["ohd_guard"]`` (a safe response carries its verdict there too); with
    ``on_flag="raise"`` a :class:`~ohd_guard.errors.GuardViolation` is raised. Every verdict is
    dispatched as an :class:`~llama_index.llms.ohd_guard.events.OhdGuardVerdictEvent`.

    Function calling (``chat_with_tools`` and the rest, so ``FunctionAgent``): the conversation is
    screened with the tools' schemas in its system prompt (an injection in a tool description is
    screened too), then the call goes to ``llm``'s own ``*_with_tools`` (``llm`` must be a
    ``FunctionCallingLLM``); a refusal calls no tool (:meth:`get_tool_calls_from_response` gives none).

    ``check_output=True``: ``llm``'s answer is checked too by the guard's model (the core's output
    check, read at the answer's last token; ``answer_profile`` defaults to the one shipped for the
    guard's model); a flagged answer is replaced by the guard's refusal, the output verdict in
    ``additional_kwargs["ohd_guard"]["output_verdict"]``. Streams are then held back: ``llm``'s
    pieces are delivered once the whole answer passed, else the refusal alone.
    """

    llm: SerializeAsAny[LLM] = Field(description="The LLM that answers safe inputs.")
    on_flag: Literal["refuse", "raise"] = Field(default="refuse", description="Refuse or raise GuardViolation.")

    def __init__(self, llm: LLM | None = None, guard: Any = None, **kwargs: Any):
        if llm is not None:
            kwargs["llm"] = llm
        kwargs.setdefault("callback_manager", getattr(kwargs.get("llm"), "callback_manager", None))
        if kwargs["callback_manager"] is None:
            kwargs.pop("callback_manager")
        super().__init__(**kwargs)
        self._bind(guard)

    @classmethod
    def class_name(cls) -> str:
        return "GuardedLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return self.llm.metadata

    # -- screening ----------------------------------------------------------------------------
    def _screen(self, raw: Any) -> Any:
        verdict = self.guard.screen(raw)
        dispatch_verdict(verdict, SOURCE)
        if verdict.flagged and self.on_flag == "raise":
            from ohd_guard.errors import GuardViolation

            raise GuardViolation(verdict)
        return verdict

    async def _ascreen(self, raw: Any) -> Any:
        verdict = await self.guard.ascreen(raw)
        await adispatch_verdict(verdict, SOURCE)
        if verdict.flagged and self.on_flag == "raise":
            from ohd_guard.errors import GuardViolation

            raise GuardViolation(verdict)
        return verdict

    def _refusal(self, raw: Any, verdict: Any) -> tuple[str, dict[str, Any]]:
        """The guard's refusal for the input it has just flagged, without screening it again."""
        resp = self.guard.refuse(raw, verdict, max_new_tokens=self.refusal_max_new_tokens)
        return resp.text, info(verdict, True, resp.refusal_kind)

    async def _arefusal(self, raw: Any, verdict: Any) -> tuple[str, dict[str, Any]]:
        resp = await self.guard.arefuse(raw, verdict, max_new_tokens=self.refusal_max_new_tokens)
        return resp.text, info(verdict, True, resp.refusal_kind)

    # -- the output check (check_output=True) -------------------------------------------------
    def _checked(self, raw: Any, verdict: Any, resp: ChatResponse) -> ChatResponse:
        return self._output.apply(raw, verdict, resp) if self._output is not None else resp

    async def _achecked(self, raw: Any, verdict: Any, resp: ChatResponse) -> ChatResponse:
        return await self._output.aapply(raw, verdict, resp) if self._output is not None else resp

    def _held(self, raw: Any, verdict: Any, gen: Any) -> Any:
        if self._output is None:
            return passed_stream(gen, verdict)
        return replay(self._output.held(raw, verdict, [passed(r, verdict) for r in gen]))

    async def _aheld(self, raw: Any, verdict: Any, gen: Any) -> Any:
        if self._output is None:
            return apassed_stream(gen, verdict)
        return areplay(await self._output.aheld(raw, verdict, [passed(r, verdict) async for r in gen]))

    def _checked_completion(self, prompt: str, verdict: Any, resp: CompletionResponse) -> CompletionResponse:
        if self._output is None:
            return resp
        return _as_completion(self._output.apply(prompt, verdict, _as_chat(resp)))

    async def _achecked_completion(self, prompt: str, verdict: Any, resp: CompletionResponse) -> CompletionResponse:
        if self._output is None:
            return resp
        checked = await self._output.aapply(prompt, verdict, _as_chat(resp))
        return _as_completion(checked)

    # -- chat ---------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        raw = guard_input(self.guard, messages)
        verdict = self._screen(raw)
        if not verdict.flagged:
            return self._checked(raw, verdict, passed(self.llm.chat(messages, **kwargs), verdict))
        return chat(*self._refusal(raw, verdict))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        raw = guard_input(self.guard, messages)
        verdict = await self._ascreen(raw)
        if not verdict.flagged:
            return await self._achecked(raw, verdict, passed(await self.llm.achat(messages, **kwargs), verdict))
        return chat(*await self._arefusal(raw, verdict))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        raw = guard_input(self.guard, messages)
        verdict = self._screen(raw)
        if not verdict.flagged:
            return self._held(raw, verdict, self.llm.stream_chat(messages, **kwargs))
        text, meta = self._refusal(raw, verdict)
        return once(chat(text, meta, delta=text))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        raw = guard_input(self.guard, messages)
        verdict = await self._ascreen(raw)
        if not verdict.flagged:
            return await self._aheld(raw, verdict, await self.llm.astream_chat(messages, **kwargs))
        text, meta = await self._arefusal(raw, verdict)
        return aonce(chat(text, meta, delta=text))

    # -- function calling: screened with the tool schemas, then the wrapped LLM's own -------------
    def _calling(self) -> FunctionCallingLLM:
        if not isinstance(self.llm, FunctionCallingLLM):
            from ohd_guard.errors import InvalidInputError

            raise InvalidInputError(f"GuardedLLM: the wrapped {type(self.llm).__name__} is not a FunctionCallingLLM, "
                                    "so it cannot call tools")
        return self.llm

    def _with_tools(self, name: str, tools: Sequence[Any], user_msg: Any, chat_history: Any, tool_required: bool,
                    kwargs: dict[str, Any]) -> Any:
        """``name`` (a ``*_with_tools`` method): the call screened with the tools' schemas in the system
        prompt, then refused, or made on the wrapped LLM and its answer checked (a stream held back)."""
        stream = name.startswith("stream")
        choice = tool_choice_of(tool_required, kwargs.get("tool_choice"))
        raw = guard_input(self.guard, messages_with(user_msg, chat_history), tool_schemas(tools), choice)
        verdict = self._screen(raw)
        if verdict.flagged:
            text, meta = self._refusal(raw, verdict)
            return once(chat(text, meta, delta=text)) if stream else chat(text, meta)
        out = getattr(self._calling(), name)(tools, user_msg=user_msg, chat_history=chat_history,
                                             tool_required=tool_required, **kwargs)
        return self._held(raw, verdict, out) if stream else self._checked(raw, verdict, passed(out, verdict))

    async def _awith_tools(self, name: str, tools: Sequence[Any], user_msg: Any, chat_history: Any,
                           tool_required: bool, kwargs: dict[str, Any]) -> Any:
        stream = name.startswith("astream")
        choice = tool_choice_of(tool_required, kwargs.get("tool_choice"))
        raw = guard_input(self.guard, messages_with(user_msg, chat_history), tool_schemas(tools), choice)
        verdict = await self._ascreen(raw)
        if not verdict.flagged:
            out = await getattr(self._calling(), name)(tools, user_msg=user_msg, chat_history=chat_history,
                                                       tool_required=tool_required, **kwargs)
            return await (self._aheld(raw, verdict, out) if stream else self._achecked(raw, verdict, passed(out, verdict)))
        text, meta = await self._arefusal(raw, verdict)
        return aonce(chat(text, meta, delta=text)) if stream else chat(text, meta)

    def chat_with_tools(self, tools: Sequence[BaseTool], user_msg: str | ChatMessage | None = None,
                        chat_history: list[ChatMessage] | None = None, verbose: bool = False,
                        allow_parallel_tool_calls: bool = False, tool_required: bool = False, **kwargs: Any) -> ChatResponse:
        return self._with_tools("chat_with_tools", tools, user_msg, chat_history, tool_required,
                                dict(kwargs, verbose=verbose, allow_parallel_tool_calls=allow_parallel_tool_calls))

    async def achat_with_tools(self, tools: Sequence[BaseTool], user_msg: str | ChatMessage | None = None,
                               chat_history: list[ChatMessage] | None = None, verbose: bool = False,
                               allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                               **kwargs: Any) -> ChatResponse:
        return await self._awith_tools("achat_with_tools", tools, user_msg, chat_history, tool_required,
                                       dict(kwargs, verbose=verbose, allow_parallel_tool_calls=allow_parallel_tool_calls))

    def stream_chat_with_tools(self, tools: Sequence[BaseTool], user_msg: str | ChatMessage | None = None,
                               chat_history: list[ChatMessage] | None = None, verbose: bool = False,
                               allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                               **kwargs: Any) -> ChatResponseGen:
        return self._with_tools("stream_chat_with_tools", tools, user_msg, chat_history, tool_required,
                                dict(kwargs, verbose=verbose, allow_parallel_tool_calls=allow_parallel_tool_calls))

    async def astream_chat_with_tools(self, tools: Sequence[BaseTool], user_msg: str | ChatMessage | None = None,
                                      chat_history: list[ChatMessage] | None = None, verbose: bool = False,
                                      allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                      **kwargs: Any) -> ChatResponseAsyncGen:
        return await self._awith_tools("astream_chat_with_tools", tools, user_msg, chat_history, tool_required,
                                       dict(kwargs, verbose=verbose, allow_parallel_tool_calls=allow_parallel_tool_calls))

    def _prepare_chat_with_tools(self, tools: Sequence[BaseTool], user_msg: str | ChatMessage | None = None,
                                 chat_history: list[ChatMessage] | None = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                 **kwargs: Any) -> dict[str, Any]:
        """The wrapped LLM's own (the ``*_with_tools`` methods above screen, then call its)."""
        return self._calling()._prepare_chat_with_tools_compat(
            tools, user_msg=user_msg, chat_history=chat_history, verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls, tool_required=tool_required, **kwargs)

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        """The wrapped LLM's calls; a refusal has none (also under ``error_on_no_tool_call``: it is
        the answer, which ``predict_and_call`` then returns)."""
        if (response.additional_kwargs.get("ohd_guard") or {}).get("refused"):
            return []
        return self._calling().get_tool_calls_from_response(response, error_on_no_tool_call=error_on_no_tool_call,
                                                            **kwargs)

    # -- completion ---------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        verdict = self._screen(prompt)
        if not verdict.flagged:
            resp = passed(self.llm.complete(prompt, formatted=formatted, **kwargs), verdict)
            return self._checked_completion(prompt, verdict, resp)
        return completion(*self._refusal(prompt, verdict))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        verdict = await self._ascreen(prompt)
        if not verdict.flagged:
            resp = passed(await self.llm.acomplete(prompt, formatted=formatted, **kwargs), verdict)
            return await self._achecked_completion(prompt, verdict, resp)
        return completion(*await self._arefusal(prompt, verdict))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        verdict = self._screen(prompt)
        if not verdict.flagged:
            gen = self.llm.stream_complete(prompt, formatted=formatted, **kwargs)
            if self._output is None:
                return passed_stream(gen, verdict)
            pieces = [_as_chat(passed(r, verdict)) for r in gen]
            return replay([_as_completion(p) for p in self._output.held(prompt, verdict, pieces)])
        text, meta = self._refusal(prompt, verdict)
        return once(completion(text, meta, delta=text))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        verdict = await self._ascreen(prompt)
        if not verdict.flagged:
            gen = await self.llm.astream_complete(prompt, formatted=formatted, **kwargs)
            if self._output is None:
                return apassed_stream(gen, verdict)
            pieces = [_as_chat(passed(r, verdict)) async for r in gen]
            return areplay([_as_completion(p) for p in await self._output.aheld(prompt, verdict, pieces)])
        text, meta = await self._arefusal(prompt, verdict)
        return aonce(completion(text, meta, delta=text))
