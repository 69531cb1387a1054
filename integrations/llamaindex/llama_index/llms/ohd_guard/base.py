"""The guard as LlamaIndex LLMs: the guarded local (V)LM itself (:mod:`.local`), and a screen in front
of any LLM (:mod:`.guarded`); both are ``FunctionCallingLLM`` s. Kept as the import path both have
always had."""

from __future__ import annotations

from llama_index.llms.ohd_guard.guarded import GuardedLLM
from llama_index.llms.ohd_guard.local import OhdGuardLLM

__all__ = ["GuardedLLM", "OhdGuardLLM"]
