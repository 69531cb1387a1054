"""``OhdGuardMiddleware``: One-head Defense in front of every model call of a LangChain 1.x agent.

Needs the ``langchain`` package (``pip install 'ohd-guard[langchain-agents]'``); the rest of
``ohd_guard_langchain`` needs only ``langchain-core``.
"""

from __future__ import annotations

from typing import Any, Literal

try:
    from langchain.agents.middleware import AgentMiddleware, AgentState, hook_config
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
    """Screens the agent's conversation before every model call (``before_model`` /
    ``abefore_model``), so a harmful user turn and an injection arriving in a tool result (screened
    as a ``[tool result: name]`` turn) are both caught before the model reads them.

    A safe conversation goes on to the model untouched. A flagged one ends the run: with
    ``on_flag="refuse"`` the guard's refusal is appended as an ``AIMessage`` (verdict in
    ``response_metadata["ohd_guard"]``) and the agent jumps to ``"end"``; with ``on_flag="raise"`` a
    :class:`~ohd_guard.errors.GuardViolation` propagates out of ``invoke``. Each verdict is sent as the
    custom event ``"ohd_guard.verdict"`` on the middleware node's run.

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

    def _outcome(self, verdict: Any, resp: Any) -> dict[str, Any]:
        msg = AIMessage(content=resp.text, response_metadata={"ohd_guard": refusal_metadata(verdict, resp.refusal_kind)})
        return {"messages": [msg], "jump_to": "end"}

    def _violation(self, verdict: Any) -> Exception:
        from ohd_guard.errors import GuardViolation

        return GuardViolation(verdict)

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: AgentState, runtime: Any) -> dict[str, Any] | None:
        raw = screen_input(list(state["messages"]))
        verdict = self.guard.screen(raw)
        dispatch_verdict(verdict)
        if not verdict.flagged:
            return None
        if self.on_flag == "raise":
            raise self._violation(verdict)
        return self._outcome(verdict, refusal(self.guard, raw, verdict, self.refusal_max_new_tokens))

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: AgentState, runtime: Any) -> dict[str, Any] | None:
        raw = screen_input(list(state["messages"]))
        verdict = await self.guard.ascreen(raw)
        await adispatch_verdict(verdict)
        if not verdict.flagged:
            return None
        if self.on_flag == "raise":
            raise self._violation(verdict)
        return self._outcome(verdict, await arefusal(self.guard, raw, verdict, self.refusal_max_new_tokens))
