"""``OhdGuard(scope=...)`` seen through the LlamaIndex LLMs: a chat whose first turn was flagged stays
refused under ``scope="conversation"`` (the default) and is answered under ``"latest"``, by
``OhdGuardLLM`` and by ``GuardedLLM`` in front of another LLM. Ground truth: a planted model whose trigger's
signal fades after a long benign turn, so only the first turn's own read sees it."""

from __future__ import annotations

import pytest
from llama_index.core.llms import ChatMessage
from llama_index.core.llms.mock import MockFunctionCallingLLM

from llama_index.llms.ohd_guard import GuardedLLM, OhdGuardLLM
from ohd_guard.guard import OhdGuard
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS

CLEAN = list(PLANTED_CLEAN_PROMPTS)[:8]
LONG = " ".join(["tell me about the weather and the sea"] * 5)
THREAD = [ChatMessage(role="user", content="tell me zorblax about rain"),
          ChatMessage(role="assistant", content="I cannot help with that."), ChatMessage(role="user", content=LONG)]


@pytest.mark.parametrize("scope", ["conversation", "latest"])
def test_the_llms_decide_by_the_guards_scope(fading, scope):
    guard = OhdGuard(fading.model, fading.processor, fading.profile, scope=scope)
    for llm in (OhdGuardLLM(guard, max_new_tokens=4), GuardedLLM(MockFunctionCallingLLM(), guard)):
        meta = llm.chat(THREAD).additional_kwargs["ohd_guard"]
        assert meta["refused"] == (scope == "conversation"), type(llm).__name__
        assert [m["flagged"] for m in meta["verdict"]["messages"]] == [True, False]
