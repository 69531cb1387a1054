"""Tool-call parsing (:func:`ohd_guard.tools.parse_tool_calls`) in the forms real models emit, and
what must stay text: JSON that is no call, a tool that is not bound, a call with prose after it."""

from __future__ import annotations

import pytest

from ohd_guard.tools import parse_tool_calls

NAMES = {"add", "search"}


def _calls(text: str, names=NAMES):
    content, calls, invalid = parse_tool_calls(text, names)
    return content, [(c.name, c.arguments) for c in calls], invalid


def test_tagged_calls_as_before():
    content, calls, bad = _calls('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
                                 '<tool_call>{"name": "add"</tool_call>')
    assert content == "Let me add." and calls == [("add", {"a": 1, "b": 2})] and len(bad) == 1
    assert parse_tool_calls("<tool_call>{\"name\": \"x\", \"arguments\": {}}</tool_call>")[1][0].name == "x"  # any name


@pytest.mark.parametrize("text", [
    '{"name": "add", "arguments": {"a": 17, "b": 25}}',
    '  {"name": "add", "parameters": {"a": 17, "b": 25}}\n',
    '{"name": "add", "arguments": "{\\"a\\": 17, \\"b\\": 25}"}',
    '{"type": "function", "function": {"name": "add", "arguments": "{\\"a\\": 17, \\"b\\": 25}"}}',
    '```json\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n```',
    '```\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n```',
])
def test_one_bare_or_fenced_call(text):
    assert _calls(text) == ("", [("add", {"a": 17, "b": 25})], [])


def test_a_list_of_calls_bare_and_fenced():
    body = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "search", "parameters": {"q": "cats"}}]'
    want = [("add", {"a": 1, "b": 2}), ("search", {"q": "cats"})]
    assert _calls(body) == ("", want, [])
    assert _calls(f"I will do both.\n```json\n{body}\n```") == ("I will do both.", want, [])


def test_prose_before_a_call_is_the_content():
    assert _calls('Adding them.\n{"name": "add", "arguments": {"a": 1, "b": 2}}') == \
        ("Adding them.", [("add", {"a": 1, "b": 2})], [])


def test_bad_arguments_of_a_bound_tool_are_an_invalid_call():
    content, calls, bad = _calls('{"name": "add", "arguments": "{a: 1"}')
    assert calls == [] and len(bad) == 1 and "JSONDecodeError" in bad[0].error
    assert len(_calls('{"name": "add", "arguments": [1, 2]}')[2]) == 1


@pytest.mark.parametrize("text", [
    '{"answer": 42}',                                          # JSON, not a call
    '{"name": "Ada", "age": 36}',                              # a "name" key is not enough
    '{"name": "add"}',                                         # no arguments: an answer with a name
    '[{"name": "add", "arguments": {}}, {"answer": 1}]',       # a list that is not all calls
    '{"name": "delete_all", "arguments": {}}',                 # a tool that is not bound
    '```json\n{"name": "delete_all", "arguments": {}}\n```',
    'Call {"name": "add", "arguments": {"a": 1}} now.',        # prose around it
    '{"name": "add", "arguments": {"a": 1}}\nand then I am done.',
    "no calls at all",
    '{"name": "add", "arguments": {',                          # truncated
])
def test_what_stays_text(text):
    assert parse_tool_calls(text, NAMES) == (text, [], [])


def test_a_tagged_call_to_an_unbound_tool_is_invalid():
    content, calls, bad = _calls('<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>')
    assert calls == [] and "no tool named 'delete_all'" in bad[0].error


def test_without_names_any_call_shaped_json_counts():
    assert parse_tool_calls('{"name": "x", "arguments": {}}')[1][0].name == "x"
    assert parse_tool_calls('{"answer": 42}') == ('{"answer": 42}', [], [])
