"""LangChain integration of ohd-guard (One-head Defense).

- :func:`to_conversation` — LangChain messages / PromptValue / agent state -> ``ohd_guard.Conversation``.
- :class:`OhdGuardRunnable` — a Runnable that returns the guard's ``Verdict``.
- :func:`guarded` — put the guard in front of any chain or chat model (refuse or raise on flag).
- :class:`OhdGuardMiddleware` — agent middleware for ``langchain.agents.create_agent`` (needs ``langchain``).
- :class:`ChatOhdGuard` — the guarded local (vision-)language model as a chat model.
- :func:`dispatch_verdict` / :data:`EVENT_NAME` — verdicts as LangChain custom events.

Names are imported on first use, so ``import ohd_guard_langchain`` stays cheap and the middleware's
``langchain`` dependency is only needed by those who use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "EVENT_NAME",
    "ChatOhdGuard",
    "GuardedRunnable",
    "OhdGuardMiddleware",
    "OhdGuardRunnable",
    "UnsupportedContentError",
    "adispatch_verdict",
    "dispatch_verdict",
    "guarded",
    "to_conversation",
]

_WHERE = {
    "EVENT_NAME": "events", "adispatch_verdict": "events", "dispatch_verdict": "events",
    "ChatOhdGuard": "chat_model", "GuardedRunnable": "runnable", "OhdGuardRunnable": "runnable",
    "guarded": "runnable", "OhdGuardMiddleware": "middleware", "UnsupportedContentError": "convert",
    "to_conversation": "convert",
}  # fmt: skip

if TYPE_CHECKING:
    from ohd_guard_langchain.chat_model import ChatOhdGuard
    from ohd_guard_langchain.convert import UnsupportedContentError, to_conversation
    from ohd_guard_langchain.events import EVENT_NAME, adispatch_verdict, dispatch_verdict
    from ohd_guard_langchain.middleware import OhdGuardMiddleware
    from ohd_guard_langchain.runnable import GuardedRunnable, OhdGuardRunnable, guarded


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ohd_guard_langchain' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ohd_guard_langchain.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
