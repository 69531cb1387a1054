"""The guard as LangChain Runnables: a screener returning verdicts, and a guarded-chain wrapper."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.prompts import BasePromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSequence, RunnableSerializable
from langchain_core.runnables.config import patch_config
from pydantic import ConfigDict, Field

from langchain_ohd_guard.convert import to_message_dicts
from langchain_ohd_guard.events import adispatch_verdict, dispatch_verdict, verdict_payload

if TYPE_CHECKING:
    from typing import TypeAlias

    from ohd_guard.guard import OhdGuard
    from ohd_guard.types import GuardedResponse, Verdict

    GuardField: TypeAlias = OhdGuard
else:
    # The pydantic fields below hold the guard unvalidated, as before: the type checker sees OhdGuard,
    # pydantic sees Any (a runtime OhdGuard annotation would make pydantic resolve the core's classes).
    GuardField = Any

__all__ = ["GuardedRunnable", "OhdGuardRunnable", "guarded"]

_NONE = object()


def screen_input(obj: Any) -> Any:
    """What the guard is handed: str and core types pass through; LangChain input (PromptValue,
    messages, ``{"messages": [...]}``) becomes the core's message dicts (typed error if it cannot),
    message names and reasoning text included: the messages go on to a model as they are, and a
    provider forwards both (screen what is forwarded)."""
    from ohd_guard.conversation import Conversation

    if isinstance(obj, (str, Conversation)):
        return obj
    return to_message_dicts(obj, forwarded=True)


# --------------------------------------------------------------------------------- refusals
def refusal(guard: OhdGuard, raw: Any, verdict: Verdict, max_new_tokens: int) -> GuardedResponse:
    """The guard's refusal (anchored, static, or GuardViolation per ``guard.refusal``) for an input
    it has just screened as ``verdict``; ``OhdGuard.refuse`` does not screen it a second time."""
    return guard.refuse(raw, verdict, max_new_tokens=max_new_tokens)


async def arefusal(guard: OhdGuard, raw: Any, verdict: Verdict, max_new_tokens: int) -> GuardedResponse:
    return await guard.arefuse(raw, verdict, max_new_tokens=max_new_tokens)


def refusal_metadata(verdict: Verdict, kind: str | None) -> dict[str, Any]:
    """``response_metadata["ohd_guard"]`` of a refusal message."""
    return {"refused": True, "refusal_kind": kind, "verdict": verdict_payload(verdict)}


def passed(out: Any, verdict: Verdict) -> Any:
    """A safe answer with its verdict in ``response_metadata["ohd_guard"]`` (messages only: a
    ``str`` or other output cannot carry it; the custom event still does)."""
    if not isinstance(out, (AIMessage, AIMessageChunk)):
        return out
    meta = {**(out.response_metadata or {}), "ohd_guard": {"refused": False, "refusal_kind": None,
                                                           "verdict": verdict_payload(verdict)}}  # fmt: skip
    return out.model_copy(update={"response_metadata": meta})


# --------------------------------------------------------------------------------- screener
class OhdGuardRunnable(RunnableSerializable[Any, Any]):
    """Screens its input with an :class:`~ohd_guard.guard.OhdGuard` and returns the ``Verdict``.

    Input: a ``str``, a ``PromptValue``, a list of messages (or message-likes) or a dict with
    ``"messages"``. ``batch`` screens in the guard's batched prefills; ``abatch``/``ainvoke`` go
    through the guard's async worker, which micro-batches concurrent calls. Each verdict is also
    sent as the LangChain custom event ``"ohd_guard.verdict"``. Flagging does not raise here: the
    verdict is the output (a failed screening is a flagged verdict with ``error`` set, unless the
    guard's ``on_error`` says otherwise).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    guard: GuardField = Field(exclude=True)
    """The :class:`~ohd_guard.guard.OhdGuard` that screens."""

    def __init__(self, guard: OhdGuard | None = None, /, **kwargs: Any):
        if guard is not None:
            kwargs["guard"] = guard
        super().__init__(**kwargs)

    @property
    def OutputType(self) -> type[Verdict]:  # noqa: N802 - LangChain's name
        from ohd_guard.types import Verdict

        return Verdict

    def _screen(self, input: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> Verdict:
        verdict = self.guard.screen(screen_input(input))
        dispatch_verdict(verdict, run_manager=run_manager)
        return verdict

    async def _ascreen(self, input: Any, run_manager: AsyncCallbackManagerForChainRun,
                       config: RunnableConfig) -> Verdict:
        verdict = await self.guard.ascreen(screen_input(input))
        await adispatch_verdict(verdict, run_manager=run_manager)
        return verdict

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Verdict:
        return self._call_with_config(self._screen, input, config, run_type="chain")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Verdict:
        return await self._acall_with_config(self._ascreen, input, config, run_type="chain")

    def _screen_many(self, inputs: list[Any], run_manager: list[CallbackManagerForChainRun],
                     config: list[RunnableConfig]) -> list[Verdict | Exception]:
        out: list[Any] = [None] * len(inputs)
        raws, idx = [], []
        for i, x in enumerate(inputs):
            try:
                raws.append(screen_input(x))
                idx.append(i)
            except Exception as e:  # noqa: BLE001 - reported per input by _batch_with_config
                out[i] = e
        if raws:
            try:
                verdicts = self.guard.screen_batch(raws)
            except Exception:  # on_error="raise": redo one by one so each input gets its own outcome
                verdicts = []
                for r in raws:
                    try:
                        verdicts.append(self.guard.screen(r))
                    except Exception as e:  # noqa: BLE001
                        verdicts.append(e)
            for i, v in zip(idx, verdicts):
                out[i] = v
                if not isinstance(v, Exception):
                    dispatch_verdict(v, run_manager=run_manager[i])
        return out

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        return self._batch_with_config(self._screen_many, list(inputs), config,
                                       return_exceptions=return_exceptions, run_type="chain")


# --------------------------------------------------------------------------------- guarded chain
def _mentions_message(tp: Any) -> bool:
    if isinstance(tp, type):
        return issubclass(tp, BaseMessage)
    return any(_mentions_message(a) for a in typing.get_args(tp))


class GuardedRunnable(RunnableSerializable[Any, Any]):
    """A chain (or chat model) behind the guard: see :func:`guarded`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    bound: Runnable = Field(exclude=True)
    """The chain or chat model that answers safe inputs, unchanged."""
    guard: GuardField = Field(exclude=True)
    """The :class:`~ohd_guard.guard.OhdGuard` that screens every input first."""
    on_flag: Literal["refuse", "raise"] = "refuse"
    """``"refuse"``: return the guard's refusal in the chain's output type; ``"raise"``: raise
    :class:`~ohd_guard.errors.GuardViolation` (carrying the verdict)."""
    output: Literal["auto", "message", "str"] | Callable[[str, Any], Any] = "auto"
    """Shape of a refusal: ``"auto"`` (``str`` for string chains, ``AIMessage`` otherwise),
    ``"message"``, ``"str"``, or a callable ``(refusal_text, verdict) -> output``."""
    input_key: str | None = None
    """For dict inputs that are neither agent state (``"messages"``) nor prompt variables of a leading
    prompt template: the key whose value is screened."""
    refusal_max_new_tokens: int = Field(64, gt=0)
    """Length cap of an anchored refusal generated by the guard's local model."""

    @property
    def InputType(self) -> Any:  # noqa: N802
        return self.bound.InputType

    @property
    def OutputType(self) -> Any:  # noqa: N802
        return self.bound.OutputType

    # -- plan: (what to screen, what the rest of the chain gets) --------------------------------
    def _split(self) -> tuple[BasePromptTemplate | None, Runnable]:
        b = self.bound
        if isinstance(b, RunnableSequence) and isinstance(b.first, BasePromptTemplate):
            steps = b.steps
            rest = steps[1] if len(steps) == 2 else RunnableSequence(*steps[1:])
            return b.first, rest
        return None, b

    def _target(self, input: Any) -> Any:
        if isinstance(input, dict) and "messages" not in input:
            if self.input_key is None:
                from ohd_guard.errors import InvalidInputError

                raise InvalidInputError(
                    "guarded(): cannot tell what to screen in a dict input; start the chain with a prompt "
                    f"template (the rendered prompt is screened) or pass input_key= (keys: {sorted(input)})")
            return input[self.input_key]
        return input

    def _kind(self) -> Any:
        if self.output != "auto":
            return self.output
        ot = self.bound.OutputType
        return "str" if ot is str else "message"

    def _refusal_output(self, text: str, verdict: Verdict, kind: str | None) -> Any:
        k = self._kind()
        if callable(k):
            return k(text, verdict)
        if k == "str":
            return text
        return AIMessage(content=text, response_metadata={"ohd_guard": refusal_metadata(verdict, kind)})

    def _chunk(self, text: str, verdict: Verdict, kind: str | None, last: bool) -> Any:
        k = self._kind()
        if callable(k):
            return k(text, verdict)
        if k == "str":
            return text
        meta = {"ohd_guard": refusal_metadata(verdict, kind)} if last else {}
        return AIMessageChunk(content=text, response_metadata=meta, chunk_position="last" if last else None)

    def _violation(self, verdict: Verdict) -> Exception:
        from ohd_guard.errors import GuardViolation

        return GuardViolation(verdict)

    # -- sync -------------------------------------------------------------------------------------
    def _prepare(self, input: Any, child: RunnableConfig) -> tuple[Any, Runnable, Any]:
        """(what the guard screens, what answers a safe input, that runnable's input)."""
        prompt, rest = self._split()
        if prompt is not None:
            rendered = prompt.invoke(input, child)
            return screen_input(rendered), rest, rendered
        return screen_input(self._target(input)), self.bound, input

    def _invoke(self, input: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> Any:
        child = patch_config(config, callbacks=run_manager.get_child())
        raw, rest, rest_input = self._prepare(input, child)
        verdict = self.guard.screen(raw)
        dispatch_verdict(verdict, run_manager=run_manager)
        if not verdict.flagged:
            return passed(rest.invoke(rest_input, child), verdict)
        if self.on_flag == "raise":
            raise self._violation(verdict)
        resp = refusal(self.guard, raw, verdict, self.refusal_max_new_tokens)
        return self._refusal_output(resp.text, verdict, resp.refusal_kind)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke, input, config, run_type="chain")

    def _transform(self, inputs: Iterator[Any], run_manager: CallbackManagerForChainRun,
                   config: RunnableConfig) -> Iterator[Any]:
        items = list(inputs)
        if len(items) != 1:
            from ohd_guard.errors import InvalidInputError

            raise InvalidInputError("a guarded chain screens one whole input; it cannot stream its input")
        child = patch_config(config, callbacks=run_manager.get_child())
        raw, rest, rest_input = self._prepare(items[0], child)
        verdict = self.guard.screen(raw)
        dispatch_verdict(verdict, run_manager=run_manager)
        if not verdict.flagged:
            last = _NONE
            for chunk in rest.stream(rest_input, child):  # one behind: the verdict goes on the last chunk
                if last is not _NONE:
                    yield last
                last = chunk
            if last is not _NONE:
                yield passed(last, verdict)
            return
        if self.on_flag == "raise":
            raise self._violation(verdict)
        resp = refusal(self.guard, raw, verdict, self.refusal_max_new_tokens)
        yield self._chunk(resp.text, verdict, resp.refusal_kind, last=True)

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield from self._transform_stream_with_config(input, self._transform, config, run_type="chain")

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield from self.transform(iter([input]), config, **kwargs)

    # -- async ------------------------------------------------------------------------------------
    async def _aprepare(self, input: Any, child: RunnableConfig) -> tuple[Any, Runnable, Any]:
        prompt, rest = self._split()
        if prompt is not None:
            rendered = await prompt.ainvoke(input, child)
            return screen_input(rendered), rest, rendered
        return screen_input(self._target(input)), self.bound, input

    async def _ainvoke(self, input: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig) -> Any:
        child = patch_config(config, callbacks=run_manager.get_child())
        raw, rest, rest_input = await self._aprepare(input, child)
        verdict = await self.guard.ascreen(raw)
        await adispatch_verdict(verdict, run_manager=run_manager)
        if not verdict.flagged:
            return passed(await rest.ainvoke(rest_input, child), verdict)
        if self.on_flag == "raise":
            raise self._violation(verdict)
        resp = await arefusal(self.guard, raw, verdict, self.refusal_max_new_tokens)
        return self._refusal_output(resp.text, verdict, resp.refusal_kind)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke, input, config, run_type="chain")

    async def _atransform(self, inputs: AsyncIterator[Any], run_manager: AsyncCallbackManagerForChainRun,
                          config: RunnableConfig) -> AsyncIterator[Any]:
        items = [x async for x in inputs]
        if len(items) != 1:
            from ohd_guard.errors import InvalidInputError

            raise InvalidInputError("a guarded chain screens one whole input; it cannot stream its input")
        child = patch_config(config, callbacks=run_manager.get_child())
        raw, rest, rest_input = await self._aprepare(items[0], child)
        verdict = await self.guard.ascreen(raw)
        await adispatch_verdict(verdict, run_manager=run_manager)
        if not verdict.flagged:
            last = _NONE
            async for chunk in rest.astream(rest_input, child):
                if last is not _NONE:
                    yield last
                last = chunk
            if last is not _NONE:
                yield passed(last, verdict)
            return
        if self.on_flag == "raise":
            raise self._violation(verdict)
        resp = await arefusal(self.guard, raw, verdict, self.refusal_max_new_tokens)
        yield self._chunk(resp.text, verdict, resp.refusal_kind, last=True)

    async def atransform(self, input: AsyncIterator[Any], config: RunnableConfig | None = None,
                         **kwargs: Any) -> AsyncIterator[Any]:
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config, run_type="chain"):
            yield chunk

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        async def one() -> AsyncIterator[Any]:
            yield input

        async for chunk in self.atransform(one(), config, **kwargs):
            yield chunk


def guarded(chain_or_chat_model: Runnable, guard: OhdGuard, on_flag: Literal["refuse", "raise"] = "refuse",
            **options: Any) -> GuardedRunnable:
    """Put ``guard`` in front of an existing chain or chat model.

    What is screened: when the chain starts with a prompt template, the rendered prompt (exactly
    what the model will read); otherwise the input itself (a str, PromptValue, messages, or agent
    state with ``"messages"``; for other dicts name the key with ``input_key=``). A safe input runs
    the chain unchanged (same output, same streaming; a message output, or a stream's last chunk,
    gets the verdict in ``response_metadata["ohd_guard"]``). A flagged one never reaches the chain: with
    ``on_flag="refuse"`` the guard's refusal is returned in the chain's own output type (``AIMessage``
    with ``response_metadata["ohd_guard"]`` for chat chains, ``str`` for string chains), with
    ``on_flag="raise"`` a :class:`~ohd_guard.errors.GuardViolation` is raised. ``options`` are
    :class:`GuardedRunnable` fields (``output``, ``input_key``, ``refusal_max_new_tokens``).
    """
    if on_flag not in ("refuse", "raise"):
        from ohd_guard.errors import InvalidInputError

        raise InvalidInputError(f"on_flag must be 'refuse' or 'raise', not {on_flag!r}")
    return GuardedRunnable(bound=chain_or_chat_model, guard=guard, on_flag=on_flag, **options)
