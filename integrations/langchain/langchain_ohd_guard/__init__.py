"""LangChain partner package of ohd-guard (One-head Defense).

- :class:`ChatOhdGuard` — the guarded local (vision-)language model as a chat model (tools, structured output).
- :class:`OhdGuardMiddleware` — agent middleware for ``langchain.agents.create_agent``: input, tool-result
  and output checks, ``exit_behavior`` ``"error"``/``"end"``/``"replace"`` (needs ``langchain``).
- :func:`guarded` / :class:`GuardedRunnable` — put the guard in front of any chain or chat model.
- :class:`OhdGuardRunnable` — a Runnable that returns the guard's ``Verdict``.
- :class:`AnswerCheck` / :func:`calibrate_answers` — screen a model's answer (the output check).
- :func:`to_conversation` — LangChain messages / PromptValue / agent state -> ``ohd_guard.Conversation``.
- :func:`dispatch_verdict` / :data:`EVENT_NAME` — verdicts as LangChain custom events.

Names are imported on first use, so ``import langchain_ohd_guard`` stays cheap and the middleware's
``langchain`` dependency is only needed by those who use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "EVENT_NAME",
    "AnswerCheck",
    "ChatOhdGuard",
    "GuardRefusedError",
    "GuardedRunnable",
    "OhdGuardMiddleware",
    "OhdGuardRunnable",
    "UnsupportedContentError",
    "adispatch_verdict",
    "calibrate_answers",
    "dispatch_verdict",
    "guarded",
    "to_conversation",
]

_WHERE = {
    "EVENT_NAME": "events", "adispatch_verdict": "events", "dispatch_verdict": "events",
    "AnswerCheck": "answers", "calibrate_answers": "answers",
    "ChatOhdGuard": "chat_model", "GuardRefusedError": "structured", "GuardedRunnable": "runnable", "OhdGuardRunnable": "runnable",
    "guarded": "runnable", "OhdGuardMiddleware": "middleware", "UnsupportedContentError": "convert",
    "to_conversation": "convert",
}  # fmt: skip

if TYPE_CHECKING:
    from langchain_ohd_guard.answers import AnswerCheck, calibrate_answers
    from langchain_ohd_guard.chat_model import ChatOhdGuard
    from langchain_ohd_guard.convert import UnsupportedContentError, to_conversation
    from langchain_ohd_guard.events import EVENT_NAME, adispatch_verdict, dispatch_verdict
    from langchain_ohd_guard.middleware import OhdGuardMiddleware
    from langchain_ohd_guard.runnable import GuardedRunnable, OhdGuardRunnable, guarded
    from langchain_ohd_guard.structured import GuardRefusedError


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'langchain_ohd_guard' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"langchain_ohd_guard.{_WHERE[name]}")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "langchain_core":
            raise ImportError(f"langchain_ohd_guard.{name} needs langchain-core: pip install langchain-ohd-guard") from e
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
