"""``OhdGuardMiddleware``: One-head Defense around the model calls of a LangChain 1.x agent, with
the checks and exits of LangChain's own moderation middleware (``OpenAIModerationMiddleware``).

Needs the ``langchain`` package (``pip install 'langchain-ohd-guard[agents]'``); the rest of
``langchain_ohd_guard`` needs only ``langchain-core``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

try:
    from langchain.agents.middleware import AgentMiddleware, hook_config
except ImportError as e:  # pragma: no cover - exercised by the install message test
    raise ImportError(
        "OhdGuardMiddleware needs the `langchain` package (LangChain 1.x agents): "
        "pip install 'langchain-ohd-guard[agents]'"
    ) from e
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from langchain_ohd_guard.events import adispatch_verdict, dispatch_verdict, verdict_payload
from langchain_ohd_guard.runnable import arefusal, refusal, refusal_metadata, screen_input
from langchain_ohd_guard.tools import with_tools

__all__ = ["DEFAULT_VIOLATION_MESSAGE", "INPUT_REPLACEMENTS", "OhdGuardMiddleware"]

Stage = Literal["input", "output", "tool"]
ExitBehavior = Literal["error", "end", "replace"]

DEFAULT_VIOLATION_MESSAGE = "I cannot help with that: the {stage} was flagged as unsafe by ohd-guard."
"""Text of a violation (``{stage}``, ``{reason}``, ``{score}``, ``{threshold}`` are filled in);
an input flagged under ``exit_behavior="end"`` gets the guard's own refusal instead, unless
``violation_message`` is given."""

_STAGE_TEXT = {"input": "request", "output": "answer", "tool": "tool result"}

INPUT_REPLACEMENTS = ("[This message was removed.]", "Hello.")
"""What a flagged human turn becomes under ``exit_behavior="replace"`` (after ``violation_message``
when one is given): the first the guard does not flag when the request is screened again. A
refusal sentence is not among them: written as the user's turn it reads as one, and the shipped
detector flags it (the old default replacement scored +0.79 over the threshold)."""


def _last(messages: list[BaseMessage], cls: type) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], cls)), None)


@contextmanager
def _unstreamed() -> Iterator[None]:
    """Model calls made inside run with LangGraph's ``nostream`` tag (``langgraph.constants.TAG_NOSTREAM``,
    the tag LangChain's own summarization middleware uses for its hidden calls): LangGraph's
    ``stream_mode="messages"`` handler then ignores their tokens and their final message. The tag
    rides on the child config LangChain reads from the context (``var_child_runnable_config``),
    because the agent's model node invokes the model without a config of ours."""
    from langchain_core.runnables.config import var_child_runnable_config
    from langgraph.constants import TAG_NOSTREAM

    parent = var_child_runnable_config.get() or {}
    token = var_child_runnable_config.set({**parent, "tags": [*(parent.get("tags") or []), TAG_NOSTREAM]})
    try:
        yield
    finally:
        var_child_runnable_config.reset(token)


def _ai_messages(response: Any) -> tuple[Any, list[BaseMessage]]:
    """(the ``ModelResponse`` holding the messages, its messages) of any handler result shape
    (``ModelResponse``, ``ExtendedModelResponse``, a bare ``AIMessage``: ``(None, [msg])``)."""
    inner = getattr(response, "model_response", response)
    result = getattr(inner, "result", None)
    return (None, [response]) if result is None else (inner, list(result))


def _with_meta(msg: BaseMessage, key: str, verdict: Any, **extra: Any) -> BaseMessage:
    """``msg`` with the verdict under ``response_metadata["ohd_guard"][key]`` (kept: what was there)."""
    meta = dict(msg.response_metadata or {})
    info = dict(meta.get("ohd_guard") or {})
    info[key] = verdict_payload(verdict)
    info.setdefault("refused", False)
    info.setdefault("refusal_kind", None)
    info.setdefault("verdict", info[key])
    info.update(extra)
    meta["ohd_guard"] = info
    return msg.model_copy(update={"response_metadata": meta})


class OhdGuardMiddleware(AgentMiddleware):
    """Screens an agent's model calls with an :class:`~ohd_guard.guard.OhdGuard`.

    Three checks, as in ``OpenAIModerationMiddleware``:

    * ``check_input`` (``wrap_model_call``): what the model will actually receive, the request's
      system prompt, the tool definitions and the messages as other middleware left them, so an
      injection in ``system_prompt``, in a tool description or added by another middleware is seen.
      List this middleware **last** so that it sees every change the others make.
    * ``check_tool_results`` (``before_model``, the first hook after the tools ran): each
      ``ToolMessage`` that arrived since the last model answer, on its own as a ``[tool result]``
      turn, so a flag is pinned on that message (which ``"replace"`` then replaces). The next
      model call's input check screens it again, in context.
    * ``check_output`` (``wrap_model_call``, around the model call): the messages the model received
      with its answer (text and tool calls) read at the answer's last token by an
      :class:`~ohd_guard.output_check.AnswerCheck` (the core's output check; ``answer_profile``
      defaults to the one shipped for the guard's model, or pass one calibrated with
      :func:`~ohd_guard.output_check.calibrate_answers`). The answer is checked *before* it
      leaves the model node, and the model call runs with LangGraph's ``nostream`` tag, so no
      stream mode (``messages``, ``updates``, ``values``, ...) carries an unchecked token: the
      checked answer (or its replacement) is streamed whole once it passed. The cost: nothing of
      an answer is streamed until all of it is generated and checked.

    On a flag, ``exit_behavior``: ``"error"`` raises :class:`~ohd_guard.errors.GuardViolation`
    (``.stage`` is ``"input"``, ``"tool"`` or ``"output"``); ``"end"`` ends the run with an
    ``AIMessage`` of the violation (for the input the model is not called: the guard's refusal, or
    ``violation_message``); ``"replace"`` replaces the offending content with ``violation_message``
    and goes on: the flagged last human turn of the request (by ``violation_message``, else or if
    that is flagged too by the first of :data:`INPUT_REPLACEMENTS` the guard passes when the request
    is screened again; none passes: the run ends), in the agent state too, so a checkpointed thread
    goes on without it; the tool result; or the answer (its tool calls dropped, so nothing flagged
    is executed).
    A flagged answer never reaches the state or a stream: ``"end"`` replaces it too (the
    replacement has no tool calls, so the agent ends after it under both).

    Every verdict is sent as the custom event ``"ohd_guard.verdict"`` and is kept on the answer in
    ``response_metadata["ohd_guard"]`` (``input_verdict``, ``output_verdict``; ``verdict`` is the
    first), safe answers included; a replaced tool result carries its verdict the same way.
    """

    def __init__(self, guard: Any, *, check_input: bool = True, check_output: bool = False,
                 check_tool_results: bool = True, exit_behavior: ExitBehavior = "end",
                 violation_message: str | None = None, answer_profile: Any = None,
                 refusal_max_new_tokens: int = 64):
        super().__init__()
        if exit_behavior not in ("error", "end", "replace"):
            from ohd_guard.errors import InvalidInputError

            raise InvalidInputError(f"exit_behavior must be 'error', 'end' or 'replace', not {exit_behavior!r}")
        self.guard, self.exit_behavior, self.violation_message = guard, exit_behavior, violation_message
        self.check_input, self.check_output, self.check_tool_results = check_input, check_output, check_tool_results
        self.refusal_max_new_tokens = refusal_max_new_tokens
        self.answer_check = None
        if check_output:
            from ohd_guard.output_check import AnswerCheck

            self.answer_check = AnswerCheck(guard, answer_profile)
        self.tools = []

    # -- shared ---------------------------------------------------------------------------------
    @staticmethod
    def _received(request: Any) -> Any:
        """What the model receives: the system message (with the tool definitions), then the messages."""
        system = getattr(request, "system_message", None)
        return with_tools(screen_input(([system] if system is not None else []) + list(request.messages)),
                          request.tools or [])

    def _text(self, stage: Stage, verdict: Any) -> str:
        template = self.violation_message or DEFAULT_VIOLATION_MESSAGE
        try:
            return template.format(stage=_STAGE_TEXT[stage], reason=verdict.reason, score=verdict.score,
                                   threshold=verdict.threshold)
        except (KeyError, IndexError, ValueError):
            return template

    def _raise(self, stage: Stage, verdict: Any) -> None:
        from ohd_guard.errors import GuardViolation

        err = GuardViolation(verdict, f"ohd-guard flagged the {_STAGE_TEXT[stage]}: {verdict.reason}")
        err.stage = stage  # type: ignore[attr-defined]
        raise err

    def _violation_message(self, stage: Stage, verdict: Any, **kw: Any) -> AIMessage:
        meta = {"ohd_guard": {**refusal_metadata(verdict, None), f"{stage}_verdict": verdict_payload(verdict),
                              "stage": stage}}  # fmt: skip
        return AIMessage(content=self._text(stage, verdict), response_metadata=meta, **kw)

    # -- input: wrap_model_call -------------------------------------------------------------------
    def _replacements(self, request: Any, verdict: Any) -> Iterator[tuple[Any, BaseMessage]]:
        """(the request with its last human turn replaced, the replaced turn) per candidate text:
        ``violation_message`` when given, then :data:`INPUT_REPLACEMENTS`."""
        from langchain_core.messages import HumanMessage

        msgs = list(request.messages)
        i = _last(msgs, HumanMessage)
        if i is None:
            return
        texts = ([self._text("input", verdict)] if self.violation_message is not None else []) + list(INPUT_REPLACEMENTS)
        meta = {**(msgs[i].response_metadata or {}), "ohd_guard": {"replaced": True, "verdict": verdict_payload(verdict)}}
        for text in dict.fromkeys(texts):
            msgs[i] = msgs[i].model_copy(update={"content": text, "response_metadata": meta})
            yield request.override(messages=list(msgs)), msgs[i]

    @staticmethod
    def _in_state(response: Any, turn: BaseMessage) -> Any:
        """``response`` with a state update that puts the replaced ``turn`` where the flagged one was
        (same id: ``add_messages`` replaces it), so a checkpointed thread never holds the flagged turn."""
        from langchain.agents.middleware.types import ExtendedModelResponse, ModelResponse
        from langgraph.types import Command

        if turn.id is None:  # not from the state: nothing there to replace
            return response
        if isinstance(response, ExtendedModelResponse):
            command = response.command
            update = dict(command.update) if command is not None and isinstance(command.update, dict) else {}
            if command is not None and not isinstance(command.update, dict):
                return response  # another middleware's command we cannot merge into: keep it as it is
            update["messages"] = [*(update.get("messages") or []), turn]
            response.command = Command(update=update) if command is None else dataclasses.replace(command, update=update)
            return response
        if not isinstance(response, ModelResponse):
            response = ModelResponse(result=[response])
        return ExtendedModelResponse(model_response=response, command=Command(update={"messages": [turn]}))

    def _answered(self, response: Any, verdict: Any) -> Any:
        """The model's response with the input verdict on its AI message(s)."""
        result = getattr(response, "result", None)
        if result is None:
            return _with_meta(response, "input_verdict", verdict) if isinstance(response, AIMessage) else response
        response.result = [_with_meta(m, "input_verdict", verdict) if isinstance(m, AIMessage) else m for m in result]
        return response

    def _call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        """The model's response; with the output check on, unstreamed and checked."""
        if self.answer_check is None:
            return handler(request)
        with _unstreamed():
            response = handler(request)
        found = self._answer_raw(request, response)
        if found is None:
            return response
        verdict = self.answer_check.check(*found[1])
        dispatch_verdict(verdict)
        return self._on_output(response, found[0], verdict)

    async def _acall(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        if self.answer_check is None:
            return await handler(request)
        with _unstreamed():
            response = await handler(request)
        found = self._answer_raw(request, response)
        if found is None:
            return response
        verdict = await self.answer_check.acheck(*found[1])
        await adispatch_verdict(verdict)
        return self._on_output(response, found[0], verdict)

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        if not self.check_input:
            return self._call(request, handler)
        raw = self._received(request)
        verdict = self.guard.screen(raw)
        dispatch_verdict(verdict)
        if not verdict.flagged:
            return self._answered(self._call(request, handler), verdict)
        if self.exit_behavior == "error":
            self._raise("input", verdict)
        if self.exit_behavior == "replace":
            for req, turn in self._replacements(request, verdict):
                again = self.guard.screen(self._received(req))
                dispatch_verdict(again)
                if not again.flagged:
                    return self._in_state(self._answered(self._call(req, handler), again), turn)
                verdict = again
        if self.violation_message is not None:
            return self._violation_message("input", verdict)
        resp = refusal(self.guard, raw, verdict, self.refusal_max_new_tokens)
        return AIMessage(content=resp.text, response_metadata={"ohd_guard": {
            **refusal_metadata(verdict, resp.refusal_kind), "input_verdict": verdict_payload(verdict)}})

    async def awrap_model_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        if not self.check_input:
            return await self._acall(request, handler)
        raw = self._received(request)
        verdict = await self.guard.ascreen(raw)
        await adispatch_verdict(verdict)
        if not verdict.flagged:
            return self._answered(await self._acall(request, handler), verdict)
        if self.exit_behavior == "error":
            self._raise("input", verdict)
        if self.exit_behavior == "replace":
            for req, turn in self._replacements(request, verdict):
                again = await self.guard.ascreen(self._received(req))
                await adispatch_verdict(again)
                if not again.flagged:
                    return self._in_state(self._answered(await self._acall(req, handler), again), turn)
                verdict = again
        if self.violation_message is not None:
            return self._violation_message("input", verdict)
        resp = await arefusal(self.guard, raw, verdict, self.refusal_max_new_tokens)
        return AIMessage(content=resp.text, response_metadata={"ohd_guard": {
            **refusal_metadata(verdict, resp.refusal_kind), "input_verdict": verdict_payload(verdict)}})

    # -- tool results: before_model ---------------------------------------------------------------
    def _arrived(self, state: Any) -> tuple[list[BaseMessage], list[int]]:
        msgs = list(state.get("messages", []))
        last_ai = _last(msgs, AIMessage)
        if last_ai is None:
            return msgs, []
        return msgs, [i for i in range(last_ai + 1, len(msgs)) if isinstance(msgs[i], ToolMessage)]

    def _on_tool_flag(self, msgs: list[BaseMessage], i: int, verdict: Any) -> dict[str, Any] | None:
        if self.exit_behavior == "error":
            self._raise("tool", verdict)
        if self.exit_behavior == "end":
            return {"jump_to": "end", "messages": [self._violation_message("tool", verdict)]}
        meta = {**(msgs[i].response_metadata or {}), "ohd_guard": {"replaced": True, "verdict": verdict_payload(verdict)}}
        msgs[i] = msgs[i].model_copy(update={"content": self._text("tool", verdict), "response_metadata": meta})
        return None

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if not self.check_tool_results:
            return None
        msgs, arrived = self._arrived(state)
        changed = False
        for i in arrived:
            verdict = self.guard.screen(screen_input([msgs[i]]))
            dispatch_verdict(verdict)
            if verdict.flagged:
                if (action := self._on_tool_flag(msgs, i, verdict)) is not None:
                    return action
                changed = True
        return {"messages": [msgs[i] for i in arrived]} if changed else None

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if not self.check_tool_results:
            return None
        msgs, arrived = self._arrived(state)
        changed = False
        for i in arrived:
            verdict = await self.guard.ascreen(screen_input([msgs[i]]))
            await adispatch_verdict(verdict)
            if verdict.flagged:
                if (action := self._on_tool_flag(msgs, i, verdict)) is not None:
                    return action
                changed = True
        return {"messages": [msgs[i] for i in arrived]} if changed else None

    # -- output: inside wrap_model_call ------------------------------------------------------------
    def _answer_raw(self, request: Any, response: Any) -> tuple[AIMessage, tuple[Any, Any]] | None:
        """(the answer, what the output check reads: (the messages the model received, the answer))."""
        _, msgs = _ai_messages(response)
        answer = next((m for m in reversed(msgs) if isinstance(m, AIMessage)), None)
        if answer is None or (not answer.text.strip() and not answer.tool_calls):
            return None  # nothing to check (the core check calls a blank answer invalid input)
        raw = screen_input([*request.messages, answer])
        return answer, (raw[:-1], raw[-1])

    def _on_output(self, response: Any, answer: AIMessage, verdict: Any) -> Any:
        """``response`` with the output verdict on the answer, or with the answer replaced (nothing
        else of the model's output kept: no tool calls, no structured response) or raised."""
        if verdict.flagged and self.exit_behavior == "error":
            self._raise("output", verdict)
        if verdict.flagged:
            new = self._violation_message("output", verdict, id=answer.id)  # same id: replaces the answer
        else:
            new = _with_meta(answer, "output_verdict", verdict)
        inner, msgs = _ai_messages(response)
        if inner is None:
            return new
        inner.result = [new] if verdict.flagged else [new if m is answer else m for m in msgs]
        if verdict.flagged:
            inner.structured_response = None
        return response
