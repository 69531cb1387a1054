"""``OhdGuardMiddleware``: One-head Defense around the model calls of a LangChain 1.x agent, with
the checks and exits of LangChain's own moderation middleware (``OpenAIModerationMiddleware``).

Needs the ``langchain`` package (``pip install 'langchain-ohd-guard[agents]'``); the rest of
``langchain_ohd_guard`` needs only ``langchain-core``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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

__all__ = ["DEFAULT_VIOLATION_MESSAGE", "OhdGuardMiddleware"]

Stage = Literal["input", "output", "tool"]
ExitBehavior = Literal["error", "end", "replace"]

DEFAULT_VIOLATION_MESSAGE = "I cannot help with that: the {stage} was flagged as unsafe by ohd-guard."
"""Text of a violation (``{stage}``, ``{reason}``, ``{score}``, ``{threshold}`` are filled in);
an input flagged under ``exit_behavior="end"`` gets the guard's own refusal instead, unless
``violation_message`` is given."""

_STAGE_TEXT = {"input": "request", "output": "answer", "tool": "tool result"}


def _last(messages: list[BaseMessage], cls: type) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], cls)), None)


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
    * ``check_output`` (``after_model``): the conversation with the model's answer (its text and
      tool calls) read at the answer's last token by an :class:`~langchain_ohd_guard.answers.AnswerCheck`
      (pass ``answer_profile``, calibrated with :func:`~langchain_ohd_guard.answers.calibrate_answers`).

    On a flag, ``exit_behavior``: ``"error"`` raises :class:`~ohd_guard.errors.GuardViolation`
    (``.stage`` is ``"input"``, ``"tool"`` or ``"output"``); ``"end"`` ends the run with an
    ``AIMessage`` of the violation (for the input the model is not called: the guard's refusal, or
    ``violation_message``); ``"replace"`` replaces the offending content with ``violation_message``
    and goes on: the flagged last human turn of the request (re-screened; still flagged: the run
    ends), the tool result, or the answer (its tool calls dropped, so nothing flagged is executed).
    A flagged answer never stays in the state: ``"end"`` replaces it too.

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
            from langchain_ohd_guard.answers import AnswerCheck

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
    def _replaced_request(self, request: Any, verdict: Any) -> Any | None:
        from langchain_core.messages import HumanMessage

        msgs = list(request.messages)
        i = _last(msgs, HumanMessage)
        if i is None:
            return None
        msgs[i] = msgs[i].model_copy(update={"content": self._text("input", verdict)})
        return request.override(messages=msgs)

    def _answered(self, response: Any, verdict: Any) -> Any:
        """The model's response with the input verdict on its AI message(s)."""
        result = getattr(response, "result", None)
        if result is None:
            return _with_meta(response, "input_verdict", verdict) if isinstance(response, AIMessage) else response
        response.result = [_with_meta(m, "input_verdict", verdict) if isinstance(m, AIMessage) else m for m in result]
        return response

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        if not self.check_input:
            return handler(request)
        raw = self._received(request)
        verdict = self.guard.screen(raw)
        dispatch_verdict(verdict)
        if not verdict.flagged:
            return self._answered(handler(request), verdict)
        if self.exit_behavior == "error":
            self._raise("input", verdict)
        if self.exit_behavior == "replace" and (req := self._replaced_request(request, verdict)) is not None:
            again = self.guard.screen(self._received(req))
            dispatch_verdict(again)
            if not again.flagged:
                return self._answered(handler(req), again)
            verdict = again
        if self.violation_message is not None:
            return self._violation_message("input", verdict)
        resp = refusal(self.guard, raw, verdict, self.refusal_max_new_tokens)
        return AIMessage(content=resp.text, response_metadata={"ohd_guard": {
            **refusal_metadata(verdict, resp.refusal_kind), "input_verdict": verdict_payload(verdict)}})

    async def awrap_model_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        if not self.check_input:
            return await handler(request)
        raw = self._received(request)
        verdict = await self.guard.ascreen(raw)
        await adispatch_verdict(verdict)
        if not verdict.flagged:
            return self._answered(await handler(request), verdict)
        if self.exit_behavior == "error":
            self._raise("input", verdict)
        if self.exit_behavior == "replace" and (req := self._replaced_request(request, verdict)) is not None:
            again = await self.guard.ascreen(self._received(req))
            await adispatch_verdict(again)
            if not again.flagged:
                return self._answered(await handler(req), again)
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

    # -- output: after_model ----------------------------------------------------------------------
    def _answer_raw(self, state: Any) -> tuple[AIMessage, Any] | None:
        msgs = list(state.get("messages", []))
        i = _last(msgs, AIMessage)
        if i is None or i != len(msgs) - 1:
            return None
        answer = msgs[i]
        info = (answer.response_metadata or {}).get("ohd_guard") or {}
        if info.get("refused") or info.get("stage"):  # the guard's own refusal or violation message
            return None
        if not answer.text and not answer.tool_calls:
            return None
        return answer, screen_input(msgs[: i + 1])

    def _on_output(self, answer: AIMessage, verdict: Any) -> dict[str, Any]:
        if not verdict.flagged:
            return {"messages": [_with_meta(answer, "output_verdict", verdict)]}
        if self.exit_behavior == "error":
            self._raise("output", verdict)
        replaced = self._violation_message("output", verdict, id=answer.id)  # same id: replaces the answer
        if self.exit_behavior == "end":
            return {"jump_to": "end", "messages": [replaced]}
        return {"messages": [replaced]}  # no tool calls left: the agent ends after it

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if self.answer_check is None or (found := self._answer_raw(state)) is None:
            return None
        answer, raw = found
        verdict = self.answer_check.screen(raw)
        dispatch_verdict(verdict)
        return self._on_output(answer, verdict)

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if self.answer_check is None or (found := self._answer_raw(state)) is None:
            return None
        answer, raw = found
        verdict = await self.answer_check.ascreen(raw)
        await adispatch_verdict(verdict)
        return self._on_output(answer, verdict)
