"""Tool calling for a local model, in one template-independent text format (Qwen2.5's / Hermes').

Tool definitions (OpenAI function schemas) are written into the system message, JSON inside
``<tools>...</tools>``, and the model answers calls as ``<tool_call>{"name": ..., "arguments":
...}</tool_call>``. They are part of the conversation rather than an argument of the chat
template, so the guard screens exactly the prompt the model answers from, tool definitions
included: an injection hidden in a tool description is screened like any other text. Answers are
parsed in the forms real models emit (tagged, a bare JSON object or list, fenced), and only tools
actually bound count as calls. Used by the server (``ohd_guard.serve``) and the LangChain chat
model; no framework types here.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ohd_guard.errors import InvalidInputError

__all__ = ["RESULT_LINE", "ParsedCall", "InvalidCall", "check_schemas", "has_tool_result", "parse_tool_calls",
           "response_instruction", "template_tool_format", "tool_turns", "tools_text", "with_system_section",
           "with_tools"]

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n(.*?)\n?[ \t]*```", re.S)
_JSON_START = re.compile(r"(?:^|\n)[ \t]*([\[{])")
_DECODER = json.JSONDecoder()
_CALL_KEYS = {"name", "arguments", "parameters", "id", "type"}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: dict[str, Any]
    id: str


@dataclass(frozen=True)
class InvalidCall:
    body: str
    error: str
    id: str


def check_schemas(schemas: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI tool schemas (``{"type": "function", "function": {"name": ..., ...}}``), checked."""
    out = []
    for i, s in enumerate(schemas):
        fn = s.get("function") if isinstance(s, dict) else None
        if not isinstance(s, dict) or s.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidInputError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., "
                                    "'description': ..., 'parameters': {...}}}}")
        out.append({"type": "function", "function": fn})
    return out


def tools_text(schemas: Sequence[dict[str, Any]], tool_choice: Any = None) -> str:
    """The system-prompt section that offers ``schemas`` (and says which call is required:
    ``tool_choice`` ``"auto"``/``None``, ``"any"``/``"required"``, or a function name).

    Qwen2.5's own tool section (:func:`with_tools` adds :data:`RESULT_LINE` once a result is in the
    conversation)."""
    lines = "\n".join(json.dumps(s, ensure_ascii=False, sort_keys=True) for s in schemas)
    text = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{lines}\n</tools>\n\nFor each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')  # fmt: skip
    if tool_choice in ("any", "required"):
        text += "\n\nYou must call at least one of these functions."
    elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none"):
        text += f"\n\nYou must call the function {tool_choice!r}."
    return text


RESULT_LINE = "When a function's result comes back, use it to answer the user in plain words."
"""Said once a tool result is in the conversation: without it Qwen2.5-Coder 1.5B answers a
``<tool_response>`` by repeating the call it just made (also under the template's native ``tools=``
rendering); with it, it answers from the result. Only then: the shipped profiles were fitted on tool
sections without it, and on the first call it moved their false positives (``docs/results.md``)."""


def has_tool_result(messages: Any) -> bool:
    """Whether a tool result is among ``messages``: a ``tool``/``function`` message, or a turn that
    :func:`tool_turns` or the core wrote from one (``<tool_response>`` / ``[tool result``)."""
    if isinstance(messages, str):
        return False
    for m in messages:
        if not isinstance(m, Mapping):
            continue
        if m.get("role") in ("tool", "function"):
            return True
        text = _text_of(m.get("content")) if m.get("role") == "user" else None
        if text and text.lstrip().startswith(("<tool_response>", "[tool result")):
            return True
    return False


def with_tools(raw: Any, schemas: Sequence[dict[str, Any]], tool_choice: Any = None) -> Any:
    """Message dicts with the tools' section appended to the system message (one is added first
    when there is none), ending with :data:`RESULT_LINE` once a result came back; ``raw``
    unchanged without tools."""
    if not schemas:
        return raw
    section = tools_text(schemas, tool_choice)
    return with_system_section(raw, section + "\n\n" + RESULT_LINE if has_tool_result(raw) else section)


def response_instruction(response_format: dict[str, Any]) -> str:
    """The system-prompt sentence that asks for a JSON answer (``response_format`` as OpenAI's:
    ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema": ...}}``)."""
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema", {})
        return ("Respond only with valid JSON, following this JSON schema:\n"
                + json.dumps(schema, ensure_ascii=False, sort_keys=True))
    return "Respond only with valid JSON."


def with_system_section(raw: Any, section: str) -> list[Any]:
    """Message dicts with ``section`` appended to the system message (one is added first when
    there is none): instructions the guard screens with the rest of the prompt."""
    msgs = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw)
    if msgs and msgs[0].get("role") in ("system", "developer"):
        content = msgs[0]["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        msgs[0] = {**msgs[0], "content": [*parts, {"type": "text", "text": "\n\n" + section}]}
    else:
        msgs.insert(0, {"role": "system", "content": section})
    return msgs


def _arguments(data: Mapping[str, Any]) -> Any:
    """The call's arguments (``arguments`` or ``parameters``; a JSON string decoded)."""
    args = data.get("arguments", data.get("parameters", {}))
    return json.loads(args) if isinstance(args, str) else args


def _unwrap(data: Any) -> Any:
    """An OpenAI-shaped call (``{"type": "function", "function": {...}}``) as its inner object."""
    if isinstance(data, Mapping) and isinstance(data.get("function"), Mapping) and "name" not in data:
        return data["function"]
    return data


def _cid() -> str:
    return f"call_{uuid.uuid4().hex[:12]}"


def _bare_calls(data: Any, names: Collection[str] | None) -> tuple[list[ParsedCall], list[InvalidCall]] | None:
    """The calls a bare JSON value makes (an object or a list of objects, each with a ``name`` and
    ``arguments``/``parameters``); ``None`` when the value is not a call (then it stays text)."""
    items = [_unwrap(x) for x in (data if isinstance(data, list) else [data])]
    if not items or not all(isinstance(x, Mapping) and isinstance(x.get("name"), str)
                            and ("arguments" in x or "parameters" in x)
                            and set(x) <= _CALL_KEYS for x in items):
        return None
    if names is not None and not all(x["name"] in names for x in items):
        return None  # JSON that names no bound tool is an answer, not a call
    calls: list[ParsedCall] = []
    invalid: list[InvalidCall] = []
    for x in items:
        i = _cid()
        try:
            args = _arguments(x)
            if not isinstance(args, dict):
                raise ValueError("arguments must be an object")
            calls.append(ParsedCall(x["name"], args, i))
        except ValueError as e:
            invalid.append(InvalidCall(json.dumps(x, ensure_ascii=False), f"{type(e).__name__}: {e}", i))
    return calls, invalid


def _tagged(text: str, start: int, names: Collection[str] | None) -> tuple[list[ParsedCall], list[InvalidCall]]:
    calls: list[ParsedCall] = []
    invalid: list[InvalidCall] = []
    for m in _CALL.finditer(text, start):
        body, i = m.group(1), _cid()
        try:
            data = _unwrap(json.loads(body))
            name, args = data["name"], _arguments(data)
            if not isinstance(name, str) or not isinstance(args, dict):
                raise ValueError("name must be a string and arguments an object")
            if names is not None and name not in names:
                raise ValueError(f"no tool named {name!r} is bound (tools: {sorted(names)})")
            calls.append(ParsedCall(name, args, i))
        except (ValueError, KeyError, TypeError) as e:
            invalid.append(InvalidCall(body, f"{type(e).__name__}: {e}", i))
    return calls, invalid


# -- earlier calls and tool results in the chat template's own format ---------------------------------
def template_tool_format(chat_template: Any) -> str | None:
    """``"hermes"`` when the chat template renders assistant ``tool_calls`` as ``<tool_call>`` and
    ``tool`` messages as ``<tool_response>`` (Qwen2.5, Hermes); ``None`` for any other template
    (no tool branch, or one this module does not reproduce: the core text format is used)."""
    if isinstance(chat_template, dict):  # named templates: the default one renders chats
        chat_template = chat_template.get("default")
    if not isinstance(chat_template, str):
        return None
    if all(k in chat_template for k in ("tool_calls", "<tool_call>", "<tool_response>", '"tool"')):
        return "hermes"
    return None


def _text_of(content: Any) -> str | None:
    """A message content as one string, or ``None`` when it holds anything but text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = [p.get("text") if isinstance(p, Mapping) and p.get("type") == "text" else p for p in content]
    return "\n".join(t for t in texts if isinstance(t, str)) if all(isinstance(t, str) for t in texts) else None


def _hermes_call(call: Any) -> str:
    """One call exactly as Qwen2.5's template writes it (``tojson`` = ``json.dumps``, unsorted)."""
    f = call.get("function", call) if isinstance(call, Mapping) else {}
    args = f.get("arguments", f.get("args", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return f'\n<tool_call>\n{{"name": "{f.get("name")}", "arguments": {json.dumps(args, ensure_ascii=False)}}}\n</tool_call>'


def tool_turns(messages: Sequence[Mapping[str, Any]], chat_template: Any) -> list[dict[str, Any]]:
    """OpenAI-style message dicts whose assistant ``tool_calls`` and ``tool`` results are written
    the way ``chat_template`` itself writes them, as plain turns the core renders to the same text.

    For a Hermes-style template (:func:`template_tool_format`) an assistant's calls become
    ``<tool_call>`` blocks after its text, and each run of tool results one user turn of
    ``<tool_response>`` blocks, as Qwen2.5's template renders them; the guard screens exactly that
    prefill and the model answers from it. For any other template the messages are returned
    unchanged: the core then shows calls as ``[tool call] name(args)`` and results as
    ``[tool result: name]`` user turns.
    """
    msgs = [dict(m) for m in messages]
    if template_tool_format(chat_template) != "hermes":
        return msgs
    out: list[dict[str, Any]] = []
    results: list[Any] | None = None  # the parts of the tool-result turn being gathered
    for m in msgs:
        if m.get("role") in ("tool", "function"):
            if results is None:
                results = []
                out.append({"role": "user", "content": results})
            text = _text_of(m.get("content"))
            results += ([{"type": "text", "text": f"\n<tool_response>\n{text}\n</tool_response>"}] if text is not None
                        else [{"type": "text", "text": "\n<tool_response>\n"}, *m["content"],
                              {"type": "text", "text": "\n</tool_response>"}])
            continue
        results = None
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "".join(_hermes_call(c) for c in m.pop("tool_calls"))
            text = _text_of(m.get("content"))
            if text is None:
                m["content"] = [*m["content"], {"type": "text", "text": calls}]
            else:
                m["content"] = text + calls if text else calls[1:]
        out.append(m)
    for m in out:  # each tool-result turn: one string when it is all text, its leading newline dropped
        if m["role"] == "user" and isinstance(m["content"], list) and m["content"] \
                and isinstance(m["content"][0], dict) and m["content"][0].get("text", "").startswith("\n<tool_response>"):
            parts = m["content"]
            parts[0] = {**parts[0], "text": parts[0]["text"][1:]}
            text = _text_of(parts)
            if text is not None:
                m["content"] = "".join(p["text"] for p in parts)
    return out


def parse_tool_calls(text: str, names: Collection[str] | None = None) -> tuple[str, list[ParsedCall], list[InvalidCall]]:
    """(text that is not a call, tool calls, unparseable calls) of a generated answer.

    Reads the forms real models emit: ``<tool_call>{...}</tool_call>`` (Qwen2.5 / Hermes; the
    text before the first tag is the content), a bare JSON object ``{"name": ..., "arguments":
    {...}}`` (or ``"parameters"``; arguments given as a JSON string are decoded) or a JSON list of
    them, either as the whole answer, at the end of the answer from a line start, or inside
    ```` ```json ```` fences (prose outside the fences is the content). ``names``: the bound tools;
    bare or fenced JSON that names another tool (or is not call-shaped) stays text, a tagged call
    naming another tool is an :class:`InvalidCall`. ``names=None`` accepts any name.
    """
    start = text.find("<tool_call>")
    if start >= 0:
        calls, invalid = _tagged(text, start, names)
        return text[:start].rstrip(), calls, invalid
    fenced = _fenced(text, names)
    if fenced is not None:
        return fenced
    stripped = text.rstrip()
    for m in _JSON_START.finditer(stripped):  # a call from a line start to the end of the answer
        try:
            data, end = _DECODER.raw_decode(stripped, m.start(1))
        except ValueError:
            continue
        if end != len(stripped):
            continue
        bare = _bare_calls(data, names)
        if bare is not None:
            return stripped[:m.start(1)].rstrip(), bare[0], bare[1]
        break
    return text, [], []


def _fenced(text: str, names: Collection[str] | None) -> tuple[str, list[ParsedCall], list[InvalidCall]] | None:
    """The calls in ```` ```json ```` fences (the prose and other fences kept as text), or ``None``."""
    calls: list[ParsedCall] = []
    invalid: list[InvalidCall] = []
    rest: list[str] = []
    pos = 0
    for m in _FENCE.finditer(text):
        found = _bare_calls(_loads(m.group(1)), names)
        if found is not None:
            rest.append(text[pos:m.start()])
            pos = m.end()
            calls += found[0]
            invalid += found[1]
    if not calls and not invalid:
        return None
    rest.append(text[pos:])
    return "\n".join(r.strip() for r in rest if r.strip()), calls, invalid


def _loads(body: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
