"""Tool calling for a local model, in one template-independent text format.

The tool definitions are written into the system message (Qwen2.5's / Hermes' format: JSON
schemas inside ``<tools>...</tools>``, calls answered as ``<tool_call>{"name": ..., "arguments":
...}</tool_call>``), instead of being handed to the chat template's own ``tools=`` argument: many
templates (the tiny test models', Gemma's) have none, and, above all, the guard then screens
exactly the prompt the model answers from (the screening prefill *is* the answer's prefill), tool
definitions included, so an injection hidden in a tool description is screened too.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.utils.function_calling import convert_to_openai_tool

__all__ = ["parse_tool_calls", "tool_schemas", "tools_text", "with_tools"]

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def tool_schemas(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-style function schemas of LangChain tools, functions, pydantic models or dicts."""
    return [convert_to_openai_tool(t) for t in tools]


def tools_text(schemas: Sequence[dict[str, Any]], tool_choice: Any = None) -> str:
    """The system-prompt section that offers ``schemas`` (and says which call is required)."""
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


def with_tools(raw: Any, tools: Sequence[Any], tool_choice: Any = None) -> Any:
    """The core's message dicts with the tools' section appended to the system message (one is
    added first when there is none); ``raw`` unchanged without tools."""
    if not tools:
        return raw
    section = tools_text(tool_schemas(tools), tool_choice)
    msgs = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw)
    if msgs and msgs[0].get("role") == "system":
        content = msgs[0]["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        msgs[0] = {**msgs[0], "content": [*parts, {"type": "text", "text": "\n\n" + section}]}
    else:
        msgs.insert(0, {"role": "system", "content": section})
    return msgs


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """(text before the first call, tool calls, unparseable calls) of a generated answer."""
    start = text.find("<tool_call>")
    if start < 0:
        return text, [], []
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for m in _CALL.finditer(text, start):
        body, cid = m.group(1), f"call_{uuid.uuid4().hex[:12]}"
        try:
            data = json.loads(body)
            name, args = data["name"], data.get("arguments", data.get("parameters", {}))
            if isinstance(args, str):
                args = json.loads(args)
            if not isinstance(name, str) or not isinstance(args, dict):
                raise ValueError("name must be a string and arguments an object")
            calls.append(ToolCall(name=name, args=args, id=cid, type="tool_call"))
        except (ValueError, KeyError, TypeError) as e:
            invalid.append(InvalidToolCall(name=None, args=body, id=cid, error=f"{type(e).__name__}: {e}",
                                           type="invalid_tool_call"))
    return text[:start].rstrip(), calls, invalid
