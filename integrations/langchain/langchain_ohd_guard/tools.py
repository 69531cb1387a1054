r"""Tool calling for ChatOhdGuard: LangChain tools in the core's text format (:mod:`ohd_guard.tools`,
Qwen2.5's / Hermes' ``<tools>`` / ``<tool_call>``), and parsed calls as LangChain ``ToolCall``\ s.

The definitions are written into the system message rather than handed to the chat template's own
``tools=`` argument: many templates (the tiny test models', Gemma's) have none, and the guard then
screens exactly the prompt the model answers from, tool definitions included.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.utils.function_calling import convert_to_openai_tool

from ohd_guard import tools as core
from ohd_guard.tools import tools_text

__all__ = ["parse_tool_calls", "tool_names", "tool_schemas", "tools_text", "with_tools"]


def tool_schemas(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-style function schemas of LangChain tools, functions, pydantic models or dicts."""
    return [convert_to_openai_tool(t) for t in tools]


def with_tools(raw: Any, tools: Sequence[Any], tool_choice: Any = None) -> Any:
    """The core's message dicts with the tools' section in the system message; unchanged without tools."""
    return core.with_tools(raw, tool_schemas(tools) if tools else [], tool_choice)


def tool_names(tools: Sequence[Any]) -> list[str]:
    """The names the model may call (of tools as :func:`tool_schemas` reads them)."""
    return [s["function"]["name"] for s in tool_schemas(tools)]


def parse_tool_calls(text: str, names: Collection[str] | None = None) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """(text that is not a call, tool calls, unparseable calls) of a generated answer, in every form
    :func:`ohd_guard.tools.parse_tool_calls` reads; ``names``: the bound tools (others stay text)."""
    content, calls, invalid = core.parse_tool_calls(text, names)
    return (content,
            [ToolCall(name=c.name, args=c.arguments, id=c.id, type="tool_call") for c in calls],
            [InvalidToolCall(name=None, args=c.body, id=c.id, error=c.error, type="invalid_tool_call") for c in invalid])
