"""``OhdGuardMiddleware``: One-head Defense in front of every model call of a LangChain 1.x agent.

Needs the ``langchain`` package (``pip install 'ohd-guard[langchain-agents]'``); the rest of
``ohd_guard_langchain`` needs only ``langchain-core``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

try:
    from langchain.agents.middleware import AgentMiddleware
except ImportError as e:  # pragma: no cover - exercised by the install message test
    raise ImportError(
        "OhdGuardMiddleware needs the `langchain` package (LangChain 1.x agents); install it with "
        "`pip install 'ohd-guard[langchain-agents]'` or `pip install 'langchain>=1,<2'`"
    ) from e
from langchain_core.messages import AIMessage

from ohd_guard_langchain.events import adispatch_verdict, dispatch_verdict
from ohd_guard_langchain.runnable import arefusal, refusal, refusal_metadata, screen_input

__all__ = ["OhdGuardMiddleware"]


class OhdGuardMiddleware(AgentMiddleware):
    """Screens what every model call of a LangChain 1.x agent will actually receive
    (``wrap_model_call`` / ``awrap_model_call``): the request's system prompt, and its messages as
    other middleware and hooks left them, so a harmful user turn, an injection in the agent's
    ``system_prompt`` and one arriving in a tool result (screened as a ``[tool result: name]`` turn)
    are all caught before the model reads them. List it **last** in ``middleware=[...]`` so that
    it sees every change the others make to the request.

    A safe request goes on to the model untouched. A flagged one is not sent to the model: with
    ``on_flag="refuse"`` the guard's refusal is the model's answer (an ``AIMessage`` with the verdict
    in ``response_metadata["ohd_guard"]`` and no tool calls, so the run ends); with
    ``on_flag="raise"`` a :class:`~ohd_guard.errors.GuardViolation` propagates out of ``invoke``.
    Each verdict is sent as the custom event ``"ohd_guard.verdict"`` on the model node's run.

    Args:
        guard: the :class:`~ohd_guard.guard.OhdGuard` (its local model also writes anchored refusals).
        on_flag: ``"refuse"`` or ``"raise"``.
        refusal_max_new_tokens: length cap of an anchored refusal.
    """

    def __init__(self, guard: Any, *, on_flag: Literal["refuse", "raise"] = "refuse",
                 refusal_max_new_tokens: int = 64):
        super().__init__()
        if on_flag not in ("refuse", "raise"):
            from ohd_guard.errors import InvalidInputError

            raise InvalidInputError(f"on_flag must be 'refuse' or 'raise', not {on_flag!r}")
        self.guard, self.on_flag, self.refusal_max_new_tokens = guard, on_flag, refusal_max_new_tokens
        self.tools = []

    @staticmethod
    def _received(request: Any) -> Any:
        """The conversation the model receives: the system message, then the request's messages."""
        system = getattr(request, "system_message", None)
        return screen_input(([system] if system is not None else []) + list(request.messages))

    def _refused(self, verdict: Any, resp: Any) -> AIMessage:
        return AIMessage(content=resp.text, response_metadata={"ohd_guard": refusal_metadata(verdict, resp.refusal_kind)})

    def _violation(self, verdict: Any) -> Exception:
        from ohd_guard.errors import GuardViolation

        return GuardViolation(verdict)

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        raw = self._received(request)
        verdict = self.guard.screen(raw)
        dispatch_verdict(verdict)
        if not verdict.flagged:
            return handler(request)
        if self.on_flag == "raise":
            raise self._violation(verdict)
        return self._refused(verdict, refusal(self.guard, raw, verdict, self.refusal_max_new_tokens))

    async def awrap_model_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        raw = self._received(request)
        verdict = await self.guard.ascreen(raw)
        await adispatch_verdict(verdict)
        if not verdict.flagged:
            return await handler(request)
        if self.on_flag == "raise":
            raise self._violation(verdict)
        return self._refused(verdict, await arefusal(self.guard, raw, verdict, self.refusal_max_new_tokens))
