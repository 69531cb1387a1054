"""ChatOhdGuard's tool calling and structured output on the planted tiny model, its answers scripted
(:class:`ohd_guard.testing.scripted.Scripted`): calls in the forms real models emit, earlier calls and
results in the chat template's own tool format, ``with_structured_output`` for every method."""

from __future__ import annotations

import pytest
from langchain_core.tools import tool

from langchain_ohd_guard import ChatOhdGuard
from ohd_guard.testing.scripted import Scripted


@pytest.fixture(scope="module")
def guard(planted_guard):
    return planted_guard


def scripted(guard, *texts: str, **kw) -> ChatOhdGuard:
    return ChatOhdGuard(guard=guard, max_tokens=80,
                        generation_kwargs={"logits_processor": [Scripted(guard.tokenizer, *texts)]}, **kw)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.mark.parametrize("answer", [
    '{"name": "add", "arguments": {"a": 17, "b": 25}}',
    '```json\n{"name": "add", "parameters": {"a": 17, "b": 25}}\n```',
    '[{"name": "add", "arguments": {"a": 17, "b": 25}}]',
])
def test_bound_tools_are_called_in_every_form(guard, answer):
    out = scripted(guard, answer).bind_tools([add]).invoke("what is 17 + 25?")
    assert [(c["name"], c["args"]) for c in out.tool_calls] == [("add", {"a": 17, "b": 25})]
    assert out.content == "" and out.response_metadata["ohd_guard"]["refused"] is False


def test_json_naming_an_unbound_tool_stays_text(guard):
    answer = '{"name": "delete_all", "arguments": {}}'
    out = scripted(guard, answer).bind_tools([add]).invoke("what is 17 + 25?")
    assert out.tool_calls == [] and out.content == answer
    assert scripted(guard, answer).invoke("hi").content == answer  # no tools bound: nothing is parsed
