"""LangChain messages -> :class:`ohd_guard.Conversation`.

A thin translator: every message is read through ``message.content_blocks`` (LangChain's own
v0/OpenAI/Anthropic/... -> v1 standard-block normaliser), each block is mapped to the core's
OpenAI/HF-style part dicts, and :func:`ohd_guard.to_conversation` does the decoding, the size
limits and the error locations. Nothing the model could see is dropped silently: an image that
cannot be resolved, an audio/video/file block, or a block of an unknown type raises
:class:`UnsupportedContentError` (an :class:`~ohd_guard.errors.InvalidInputError`).

Two things a local chat template drops but a provider forwards to its model (OpenAI sends a
message's ``name``; reasoning blocks go back to OpenAI's and Anthropic's models with the history)
are read only with ``forwarded=True``: as ``[name: ...]`` and ``[reasoning] ...`` text parts. The
screens whose messages go on to another model as they are (``guarded``, ``OhdGuardRunnable``, the
agent middleware) pass it; ``ChatOhdGuard`` does not, since its own model never sees either.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue

from ohd_guard.conversation import Conversation, ConversationLimits, Message, to_conversation as _core
from ohd_guard.errors import InvalidInputError

__all__ = ["UnsupportedContentError", "to_conversation", "to_message_dicts"]

_DEFAULT_LIMITS = ConversationLimits()


class UnsupportedContentError(InvalidInputError):
    """A content block the guard cannot screen (audio, video, a non-image file, an image known only
    by a provider ``file_id``, or an unknown block type). Raised instead of dropping the block,
    because screening a conversation without part of what the model will see is not screening it."""

    def __init__(self, msg: str, message_index: int | None = None, block_index: int | None = None):
        where = ""
        if message_index is not None:
            where = f" (at messages[{message_index}]" + (f".content[{block_index}]" if block_index is not None else "") + ")"
        super().__init__(msg + where)
        self.message_index, self.part_index = message_index, block_index


_ROLE_OF = {"human": "user", "ai": "assistant", "system": "system", "developer": "system",
            "tool": "tool", "function": "tool"}


def _role(msg: BaseMessage) -> str:
    if msg.type == "chat":  # ChatMessage: free-form role, the core maps and validates it
        return str(getattr(msg, "role", "user"))
    if msg.type in ("remove",):
        raise UnsupportedContentError("a RemoveMessage is a graph-state instruction, not a turn to screen")
    role = _ROLE_OF.get(msg.type.removesuffix("Chunk").lower())
    if role is None:
        raise UnsupportedContentError(f"unknown LangChain message type {msg.type!r}")
    return role


def _call_text(name: Any, args: Any) -> str:
    if not isinstance(args, str):
        try:
            args = json.dumps(args, ensure_ascii=False, sort_keys=True, default=str)
        except (TypeError, ValueError):
            args = str(args)
    return f"[tool call] {name}({args or ''})"


def _image_part(block: Mapping[str, Any], mi: int, bi: int) -> dict[str, Any]:
    """A v1 image (or image ``file``) block as a core image part."""
    for key in ("base64", "url", "path", "image", "data"):
        if block.get(key) is not None:
            return {"type": "image", key: block[key]}
    if block.get("file_id"):
        raise UnsupportedContentError(
            f"image block refers to provider file_id {block['file_id']!r}, which the local guard cannot read; "
            "pass the image as base64, a data URI, a URL (with a fetcher) or a local path", mi, bi)
    raise UnsupportedContentError("image block has no 'base64', 'url' or 'path' data", mi, bi)


def _block_parts(block: Any, role: str, mi: int, bi: int, forwarded: bool = False) -> list[dict[str, Any]]:
    """One v1 standard content block -> zero or more core part dicts (empty only for reasoning
    traces, unless ``forwarded``, and for reasoning without readable text: an encrypted trace)."""
    if isinstance(block, str):
        return [{"type": "text", "text": block}]
    if not isinstance(block, Mapping):
        raise UnsupportedContentError(f"content block must be a dict, got {type(block).__name__}", mi, bi)
    kind = block.get("type")
    if kind == "text":
        return [{"type": "text", "text": block.get("text", "")}]
    if kind == "text-plain":
        text = block.get("text")
        if not isinstance(text, str):
            raise UnsupportedContentError("text-plain block without inline 'text' (a url/file_id cannot be "
                                          "read by the local guard)", mi, bi)
        title = block.get("title")
        return [{"type": "text", "text": f"[{title}]\n{text}" if title else text}]
    if kind == "image":
        return [_image_part(block, mi, bi)]
    if kind == "file":
        mime = str(block.get("mime_type") or "")
        if mime.startswith("image/"):
            return [_image_part(block, mi, bi)]
        raise UnsupportedContentError(f"file block of type {mime or 'unknown'!r} cannot be screened "
                                      "(only images and text are)", mi, bi)
    if kind in ("audio", "video"):
        raise UnsupportedContentError(f"{kind} blocks cannot be screened by a vision-language guard; "
                                      "transcribe or remove them first", mi, bi)
    if kind in ("tool_call", "server_tool_call", "tool_call_chunk", "invalid_tool_call", "server_tool_call_chunk"):
        return [{"type": "text", "text": _call_text(block.get("name"), block.get("args"))}]
    if kind == "server_tool_result":
        out = block.get("output")
        return [{"type": "text", "text": f"[tool result] {out if isinstance(out, str) else json.dumps(out, default=str)}"}]
    if kind == "reasoning":  # the model's own trace: local chat templates do not feed it back, providers do
        text = block.get("reasoning")
        return [{"type": "text", "text": f"[reasoning] {text}"}] if forwarded and isinstance(text, str) and text else []
    if kind == "non_standard":
        value = block.get("value")
        if isinstance(value, Mapping) and value.get("type") in ("image_url", "input_image"):
            url = value.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if isinstance(url, str) and url:
                return [{"type": "image_url", "image_url": {"url": url}}]
        if isinstance(value, Mapping) and value.get("type") in ("text", "input_text") and isinstance(value.get("text"), str):
            return [{"type": "text", "text": value["text"]}]
        if isinstance(value, Mapping) and value.get("type") == "tool_use" and value.get("name"):  # Anthropic's call
            return [{"type": "text", "text": _call_text(value["name"], value.get("input"))}]
        vt = value.get("type") if isinstance(value, Mapping) else type(value).__name__
        raise UnsupportedContentError(f"unknown content block of type {vt!r}: refusing to drop it unscreened", mi, bi)
    raise UnsupportedContentError(f"unknown content block of type {kind!r}: refusing to drop it unscreened", mi, bi)


def _repeats_a_call(block: Any, call_ids: set[Any]) -> bool:
    """An Anthropic-style ``tool_use`` block (kept as ``non_standard``) that repeats one of the message's
    ``tool_calls``, which LangChain also gives as a standard ``tool_call`` block."""
    value = block.get("value") if isinstance(block, Mapping) and block.get("type") == "non_standard" else None
    return isinstance(value, Mapping) and value.get("type") == "tool_use" and value.get("id") in call_ids


def _message_dict(msg: BaseMessage, mi: int, forwarded: bool = False, tool_calls: bool = False) -> dict[str, Any]:
    role = _role(msg)
    parts: list[dict[str, Any]] = []
    calls = list(getattr(msg, "tool_calls", None) or []) if tool_calls and role == "assistant" else []
    ids = {c.get("id") for c in getattr(msg, "tool_calls", None) or []} if role == "assistant" else set()
    for bi, block in enumerate(msg.content_blocks):
        if _repeats_a_call(block, ids) or (calls and isinstance(block, Mapping) and block.get("type") == "tool_call"):
            continue  # written once: from the standard tool_call block, or as the message's tool_calls below
        parts.extend(_block_parts(block, role, mi, bi, forwarded))
    out: dict[str, Any] = {"role": role, "content": parts}
    if calls:
        out["tool_calls"] = [{"id": c.get("id"), "type": "function",
                              "function": {"name": c["name"], "arguments": c.get("args", {})}} for c in calls]
    name = getattr(msg, "name", None) or None
    if role == "tool":
        out["name"] = name
    elif forwarded and name is not None:
        parts.insert(0, {"type": "text", "text": f"[name: {name}]"})
    return out


def _as_messages(obj: Any) -> list[BaseMessage] | None:
    """The LangChain message list inside ``obj``, or None when obj is not LangChain-shaped."""
    if isinstance(obj, PromptValue):
        return list(obj.to_messages())
    if isinstance(obj, BaseMessage):
        return [obj]
    if isinstance(obj, Mapping) and "messages" in obj:
        obj = obj["messages"]
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        items = list(obj)
        if any(isinstance(m, BaseMessage) for m in items) or any(isinstance(m, tuple) for m in items):
            return convert_to_messages(items)
        if items and all(isinstance(m, Mapping) for m in items):
            try:  # OpenAI-style dicts: LangChain reads more block dialects than the core does...
                return convert_to_messages(items)
            except (ValueError, NotImplementedError, KeyError, TypeError):
                return None  # ...and where it cannot, the core reads them (or names the problem)
    return None


def to_message_dicts(obj: Any, *, forwarded: bool = False, tool_calls: bool = False) -> list[dict[str, Any]]:
    """LangChain input -> the core's OpenAI/HF-style message dicts (images still undecoded); with
    ``forwarded``, message names and reasoning text too (see the module docstring); with
    ``tool_calls``, an AI message's calls as OpenAI ``tool_calls`` (for
    :func:`ohd_guard.tools.tool_turns`) instead of ``[tool call] name(args)`` text."""
    msgs = _as_messages(obj)
    if msgs is None:
        if isinstance(obj, str):
            return [{"role": "user", "content": obj}]
        raise InvalidInputError(f"cannot read {type(obj).__name__} as LangChain messages")
    return [_message_dict(m, i, forwarded, tool_calls) for i, m in enumerate(msgs)]


def to_conversation(obj: Any, *, limits: ConversationLimits = _DEFAULT_LIMITS,
                    fetcher: Callable[[str], bytes] | None = None, base_dir: Path | str | None = None,
                    allow_local_files: bool = False, forwarded: bool = False) -> Conversation:
    """Convert LangChain input into a :class:`~ohd_guard.Conversation` (``forwarded``: with message
    names and reasoning text, as a provider forwards them; see the module docstring).

    Accepts a ``str`` (one user turn), a ``PromptValue``, a ``BaseMessage``, a list of messages
    or message-likes (``("human", "...")`` tuples, role/content dicts), a dict with a ``"messages"``
    list (LangGraph/agent state), or anything :func:`ohd_guard.to_conversation` accepts.
    Image blocks may be v1 standard blocks (``base64``/``url``, including ``data:`` and ``file://``
    URLs), OpenAI ``image_url`` parts or legacy v0 blocks (``source_type``); ``http(s)`` images
    need ``fetcher``. A ``ToolMessage`` is screened as a user-visible ``[tool result: name]`` turn.
    """
    kw: dict[str, Any] = {"limits": limits, "fetcher": fetcher, "base_dir": base_dir,
                          "allow_local_files": allow_local_files}
    if isinstance(obj, (Conversation, Message, str)):
        return _core(obj, **kw)
    msgs = _as_messages(obj)
    if msgs is None:
        return _core(obj, **kw)
    if not msgs:
        raise InvalidInputError("empty conversation: there are no messages")
    return _core([_message_dict(m, i, forwarded) for i, m in enumerate(msgs)], **kw)
