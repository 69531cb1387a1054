"""Function calling for the LlamaIndex LLMs, through the core (:mod:`ohd_guard.tools`): LlamaIndex
tools as OpenAI function schemas, the conversation (earlier ``ToolCallBlock`` calls, ``tool``
results) in the chat template's own tool format where the core reproduces it (Qwen2.5's) and the
core's text format elsewhere, the tools' section in the screened system prompt, and the core
parser's calls as ``ToolCallBlock`` s and ``ToolSelection`` s."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.llms.llm import ToolSelection

from llama_index.llms.ohd_guard.convert import to_message_dicts
from ohd_guard import tools as core

__all__ = ["answer_message", "guard_input", "messages_with", "tool_choice_of", "tool_schemas", "tool_selections"]


def tool_schemas(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI function schemas of LlamaIndex tools (``BaseTool``) or schema dicts, checked by the core."""
    out = []
    for t in tools:
        meta: Any = getattr(t, "metadata", None)
        out.append(meta.to_openai_tool(skip_length_check=True) if hasattr(meta, "to_openai_tool") else t)
    return core.check_schemas(out)


def tool_choice_of(tool_required: bool, tool_choice: Any = None) -> Any:
    """The core's ``tool_choice`` (a name, ``"required"``, ``"auto"``/``None``) of LlamaIndex's
    ``tool_required`` flag and an OpenAI-style ``tool_choice`` (a name or a dict naming one)."""
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name") or "required"
    if tool_choice in (None, "auto") and tool_required:
        return "required"
    return tool_choice


def messages_with(user_msg: str | ChatMessage | None, chat_history: Sequence[ChatMessage] | None) -> list[ChatMessage]:
    """``chat_history`` then ``user_msg``: the messages a ``*_with_tools`` call sends."""
    msgs = list(chat_history or [])
    if user_msg is not None:
        msgs.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg)
    return msgs


def _template(guard: Any) -> Any:
    return getattr(guard.processor, "chat_template", None) or getattr(guard.tokenizer, "chat_template", None)


def guard_input(guard: Any, messages: Sequence[ChatMessage] | str, schemas: Sequence[dict[str, Any]] = (),
                tool_choice: Any = None) -> Any:
    """What the guard screens (and its model answers from): the messages as the core's dicts, earlier
    calls and tool results in the template's tool format, the tools' section in the system prompt."""
    if isinstance(messages, str):
        return core.with_tools(messages, schemas, tool_choice) if schemas else messages
    template = _template(guard)
    msgs = list(messages)
    hermes = core.template_tool_format(template) is not None
    calls = [[b for b in m.blocks if isinstance(b, ToolCallBlock)] if hermes else [] for m in msgs]
    if any(calls):  # passed on as OpenAI tool_calls, which the template's format writes
        msgs = [m.model_copy(update={"blocks": [b for b in m.blocks if not isinstance(b, ToolCallBlock)]}) if c else m
                for m, c in zip(msgs, calls, strict=True)]
    dicts = to_message_dicts(msgs, limits=guard.limits)
    for d, c in zip(dicts, calls, strict=True):
        if c:
            d["tool_calls"] = [{"id": b.tool_call_id, "type": "function",
                                "function": {"name": b.tool_name, "arguments": _kwargs(b.tool_kwargs)}} for b in c]
    return core.with_tools(core.tool_turns(dicts, template), schemas, tool_choice)


def _kwargs(args: Any) -> dict[str, Any]:
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return {}
    return args if isinstance(args, dict) else {}


def answer_message(text: str, names: Collection[str] | None) -> ChatMessage:
    """The model's answer as an assistant message: calls to the bound tools ``names`` (every form the
    core parser reads) as ``ToolCallBlock`` s after the remaining text; unparseable calls listed in
    ``additional_kwargs["invalid_tool_calls"]`` (the text then kept whole). ``names=None``: no tools."""
    if not names:
        return ChatMessage(role=MessageRole.ASSISTANT, content=text)
    content, calls, invalid = core.parse_tool_calls(text, names)
    extra = {"invalid_tool_calls": [{"id": c.id, "body": c.body, "error": c.error} for c in invalid]} if invalid else {}
    if not calls:
        return ChatMessage(role=MessageRole.ASSISTANT, content=text, additional_kwargs=extra)
    blocks: list[Any] = [TextBlock(text=content)] if content else []
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def tool_selections(response: ChatResponse, error_on_no_tool_call: bool) -> list[ToolSelection]:
    """The ``ToolCallBlock`` s of a response as ``ToolSelection`` s; a refusal has none."""
    calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    if not calls and error_on_no_tool_call:
        raise ValueError(f"Expected at least one tool call, but got {len(calls)} tool calls.")
    return [ToolSelection(tool_id=b.tool_call_id or "", tool_name=b.tool_name, tool_kwargs=_kwargs(b.tool_kwargs))
            for b in calls]
