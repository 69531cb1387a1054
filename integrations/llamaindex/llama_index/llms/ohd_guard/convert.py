"""LlamaIndex ``ChatMessage`` -> :class:`ohd_guard.Conversation`.

A thin translator: each block becomes one of the core's OpenAI/HF-style part dicts and
:func:`ohd_guard.to_conversation` decodes the images, applies the size limits and names the
location of any problem. ``ImageBlock`` sources: inline bytes (raw or base64, as LlamaIndex stores
them), a file-like object, a ``path`` or a ``url`` (``data:``/``file://``, or ``http(s)`` through a
``fetcher``; the guard never downloads on its own). Audio, video, non-text documents and unknown
blocks raise :class:`UnsupportedContentError` rather than being dropped unscreened.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from io import IOBase
from pathlib import Path
from typing import Any

from llama_index.core.base.llms.types import (
    AudioBlock,
    CachePoint,
    ChatMessage,
    CitableBlock,
    CitationBlock,
    DocumentBlock,
    ImageBlock,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
    VideoBlock,
)

from ohd_guard.conversation import Conversation, ConversationLimits, Message, to_conversation as _core
from ohd_guard.errors import InvalidInputError

__all__ = ["UnsupportedContentError", "to_conversation", "to_message_dicts"]

_DEFAULT_LIMITS = ConversationLimits()
_B64 = re.compile(rb"[A-Za-z0-9+/\-_\s]*={0,2}\s*")
_ROLE_OF = {"chatbot": "assistant", "model": "assistant"}


class UnsupportedContentError(InvalidInputError):
    """A block the guard cannot screen (audio, video, a non-text document, an unknown block type).
    Raised instead of silently dropping it: screening without part of what the answering model will
    see is not screening."""

    def __init__(self, msg: str, message_index: int | None = None, block_index: int | None = None):
        where = ""
        if message_index is not None:
            where = f" (at messages[{message_index}]" + (f".blocks[{block_index}]" if block_index is not None else "") + ")"
        super().__init__(msg + where)
        self.message_index, self.part_index = message_index, block_index


def _read_io(f: IOBase, cap: int) -> bytes:
    try:
        f.seek(0)
    except (OSError, ValueError):
        pass
    data = f.read(cap + 1)
    return data.encode() if isinstance(data, str) else bytes(data)


def _image_part(b: ImageBlock, limits: ConversationLimits, mi: int, bi: int) -> dict[str, Any]:
    img = b.image
    if isinstance(img, (bytes, bytearray)) and img:
        # LlamaIndex stores inline images base64-encoded (and accepts raw bytes): tell them apart by
        # alphabet alone, so nothing is decoded here before the core's size limits apply.
        if _B64.fullmatch(bytes(img)):
            return {"type": "image", "base64": bytes(img).decode("ascii")}
        return {"type": "image", "image": bytes(img)}
    if isinstance(img, IOBase):
        return {"type": "image", "image": _read_io(img, limits.max_image_bytes)}
    if b.path is not None:
        return {"type": "image", "path": str(b.path)}
    if b.url is not None:
        return {"type": "image", "url": str(b.url)}
    raise UnsupportedContentError("ImageBlock has no image, path or url", mi, bi)


def _call_text(name: Any, args: Any) -> str:
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False, sort_keys=True, default=str)
    return f"[tool call] {name}({args})"


def _block_parts(b: Any, limits: ConversationLimits, mi: int, bi: int) -> list[dict[str, Any]]:
    if isinstance(b, TextBlock):
        return [{"type": "text", "text": b.text}]
    if isinstance(b, ImageBlock):
        return [_image_part(b, limits, mi, bi)]
    if isinstance(b, ToolCallBlock):
        return [{"type": "text", "text": _call_text(b.tool_name, b.tool_kwargs)}]
    if isinstance(b, (ThinkingBlock, CachePoint)):
        return []  # a hidden reasoning trace / a provider cache marker: nothing the model reads as input
    if isinstance(b, CitableBlock):
        head = [{"type": "text", "text": f"[{b.title}]"}] if b.title else []
        return head + [p for sub in b.content for p in _block_parts(sub, limits, mi, bi)]
    if isinstance(b, CitationBlock):
        return [p for sub in (b.cited_content if isinstance(b.cited_content, list) else [b.cited_content])
                for p in _block_parts(sub, limits, mi, bi)]
    if isinstance(b, DocumentBlock):
        mime = str(b.document_mimetype or "")
        if mime.startswith("image/"):
            return [_image_part(ImageBlock(image=b.data, path=b.path, url=b.url), limits, mi, bi)]
        if mime.startswith("text/") and b.data:
            data = b.data if isinstance(b.data, (bytes, bytearray)) else _read_io(b.data, limits.max_text_chars)
            import base64

            raw = base64.b64decode(data) if _B64.fullmatch(bytes(data)) else bytes(data)
            return [{"type": "text", "text": raw.decode("utf-8", "replace")}]
        raise UnsupportedContentError(f"DocumentBlock of type {mime or 'unknown'!r} cannot be screened "
                                      "(only images and inline text are)", mi, bi)
    if isinstance(b, (AudioBlock, VideoBlock)):
        kind = "audio" if isinstance(b, AudioBlock) else "video"
        raise UnsupportedContentError(f"{kind} blocks cannot be screened by a vision-language guard; "
                                      "transcribe or remove them first", mi, bi)
    raise UnsupportedContentError(f"unknown content block {type(b).__name__}: refusing to drop it unscreened",
                                  mi, bi)


def _plain(obj: Any) -> Any:
    return obj.model_dump() if hasattr(obj, "model_dump") else obj


def _message_dict(m: ChatMessage, limits: ConversationLimits, mi: int) -> dict[str, Any]:
    role = m.role.value if hasattr(m.role, "value") else str(m.role)
    role = _ROLE_OF.get(role, role)
    parts = [p for bi, b in enumerate(m.blocks) for p in _block_parts(b, limits, mi, bi)]
    out: dict[str, Any] = {"role": role, "content": parts}
    kw = m.additional_kwargs or {}
    if role == "assistant" and kw.get("tool_calls"):
        out["tool_calls"] = [_plain(c) for c in kw["tool_calls"]]
    if role in ("tool", "function"):
        out["name"] = kw.get("name") or kw.get("tool_name")
    return out


def _as_messages(obj: Any) -> list[ChatMessage] | None:
    if isinstance(obj, ChatMessage):
        return [obj]
    if isinstance(obj, Mapping) and "messages" in obj:
        obj = obj["messages"]
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)) and obj \
            and any(isinstance(m, ChatMessage) for m in obj):
        bad = next((i for i, m in enumerate(obj) if not isinstance(m, ChatMessage)), None)
        if bad is not None:
            raise InvalidInputError(f"messages[{bad}] is a {type(obj[bad]).__name__}; a list mixing "
                                    "ChatMessage with other types cannot be read")
        return list(obj)
    return None


def to_message_dicts(obj: Any, *, limits: ConversationLimits = _DEFAULT_LIMITS) -> list[dict[str, Any]]:
    """LlamaIndex messages -> the core's OpenAI/HF-style message dicts (images still undecoded)."""
    msgs = _as_messages(obj)
    if msgs is None:
        raise InvalidInputError(f"cannot read {type(obj).__name__} as LlamaIndex chat messages")
    return [_message_dict(m, limits, i) for i, m in enumerate(msgs)]


def to_conversation(obj: Any, *, limits: ConversationLimits = _DEFAULT_LIMITS,
                    fetcher: Callable[[str], bytes] | None = None, base_dir: Path | str | None = None,
                    allow_local_files: bool = False) -> Conversation:
    """Convert LlamaIndex input into a :class:`~ohd_guard.Conversation`.

    Accepts a ``ChatMessage``, a list of them, a dict with a ``"messages"`` list, a ``str`` (one
    user turn; what ``complete`` receives), or anything :func:`ohd_guard.to_conversation` accepts.
    Roles ``chatbot``/``model`` are assistant turns; ``tool``/``function`` messages are screened as
    user-visible ``[tool result: name]`` turns (tool output is where indirect injections arrive).
    """
    kw: dict[str, Any] = {"limits": limits, "fetcher": fetcher, "base_dir": base_dir,
                          "allow_local_files": allow_local_files}
    if isinstance(obj, (Conversation, Message, str)):
        return _core(obj, **kw)
    msgs = _as_messages(obj)
    if msgs is None:
        return _core(obj, **kw)
    return _core([_message_dict(m, limits, i) for i, m in enumerate(msgs)], **kw)
