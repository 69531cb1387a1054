"""LlamaIndex integration of ohd-guard (One-head Defense).

- :func:`to_conversation` — ``ChatMessage`` (``TextBlock``/``ImageBlock``...) -> ``ohd_guard.Conversation``.
- :class:`OhdGuardLLM` — the guarded local (vision-)language model as a LlamaIndex LLM.
- :class:`GuardedLLM` — screen with the local guard in front of any other LlamaIndex LLM.
- :class:`OhdGuardVerdictEvent` — verdicts as instrumentation events.
- :class:`OhdGuardCallbackHandler` — legacy callback handler that aborts flagged LLM calls.

Names are imported on first use, so ``import llama_index.llms.ohd_guard`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "GuardedLLM",
    "OhdGuardCallbackHandler",
    "OhdGuardLLM",
    "OhdGuardVerdictEvent",
    "UnsupportedContentError",
    "to_conversation",
]

_WHERE = {
    "GuardedLLM": "base", "OhdGuardLLM": "base", "OhdGuardCallbackHandler": "callbacks",
    "OhdGuardVerdictEvent": "events", "UnsupportedContentError": "convert", "to_conversation": "convert",
}  # fmt: skip

if TYPE_CHECKING:
    from llama_index.llms.ohd_guard.base import GuardedLLM, OhdGuardLLM
    from llama_index.llms.ohd_guard.callbacks import OhdGuardCallbackHandler
    from llama_index.llms.ohd_guard.convert import UnsupportedContentError, to_conversation
    from llama_index.llms.ohd_guard.events import OhdGuardVerdictEvent


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'llama_index.llms.ohd_guard' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"llama_index.llms.ohd_guard.{_WHERE[name]}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("llama_index.core"):
            raise ImportError(f"llama_index.llms.ohd_guard.{name} needs llama-index-core: "
                              "pip install llama-index-llms-ohd-guard") from e
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
