"""Tool calling for a local model, in one template-independent text format (Qwen2.5's / Hermes').

Tool definitions (OpenAI function schemas) are written into the system message, JSON inside
``<tools>...</tools>``, and the model answers calls as ``<tool_call>{"name": ..., "arguments":
...}</tool_call>``. They are part of the conversation rather than an argument of the chat
template, so the guard screens exactly the prompt the model answers from, tool definitions
included: an injection hidden in a tool description is screened like any other text. Used by the
server (``ohd_guard.serve``) and the LangChain chat model; no framework types here.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ohd_guard.errors import InvalidInputError

__all__ = ["ParsedCall", "InvalidCall", "check_schemas", "parse_tool_calls", "tools_text", "with_tools"]

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


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
    ``tool_choice`` ``"auto"``/``None``, ``"any"``/``"required"``, or a function name)."""
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


def with_tools(raw: Any, schemas: Sequence[dict[str, Any]], tool_choice: Any = None) -> Any:
    """Message dicts with the tools' section appended to the system message (one is added first
    when there is none); ``raw`` unchanged without tools."""
    if not schemas:
        return raw
    section = tools_text(schemas, tool_choice)
    msgs = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw)
    if msgs and msgs[0].get("role") in ("system", "developer"):
        content = msgs[0]["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        msgs[0] = {**msgs[0], "content": [*parts, {"type": "text", "text": "\n\n" + section}]}
    else:
        msgs.insert(0, {"role": "system", "content": section})
    return msgs


def parse_tool_calls(text: str) -> tuple[str, list[ParsedCall], list[InvalidCall]]:
    """(text before the first call, tool calls, unparseable calls) of a generated answer."""
    start = text.find("<tool_call>")
    if start < 0:
        return text, [], []
    calls: list[ParsedCall] = []
    invalid: list[InvalidCall] = []
    for m in _CALL.finditer(text, start):
        body, cid = m.group(1), f"call_{uuid.uuid4().hex[:12]}"
        try:
            data = json.loads(body)
            name, args = data["name"], data.get("arguments", data.get("parameters", {}))
            if isinstance(args, str):
                args = json.loads(args)
            if not isinstance(name, str) or not isinstance(args, dict):
                raise ValueError("name must be a string and arguments an object")
            calls.append(ParsedCall(name, args, cid))
        except (ValueError, KeyError, TypeError) as e:
            invalid.append(InvalidCall(body, f"{type(e).__name__}: {e}", cid))
    return text[:start].rstrip(), calls, invalid
