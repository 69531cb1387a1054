"""Converting anything the library accepts into a :class:`Conversation` (:func:`to_conversation`),
with the limits held across the whole conversation and image sources resolved under one policy
(local files opt-in and confined, remote URLs only through a caller's fetcher)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from PIL import Image

from ohd_guard.conversation.images import b64decode, data_uri_bytes, decode_bytes, normalize_pil
from ohd_guard.conversation.limits import DEFAULT_LIMITS, ConversationLimits, fail, short
from ohd_guard.conversation.model import Conversation, ImagePart, Message, TextPart
from ohd_guard.errors import InvalidInputError

__all__ = ["TOOL_PREFIX", "to_conversation"]

TOOL_PREFIX = "[tool result]"


class _State:
    """Per-call settings and running totals, so limits hold across the whole conversation."""

    def __init__(self, limits: ConversationLimits, fetcher: Callable[[str], bytes] | None,
                 base_dir: Path | None, allow_local_files: bool):
        self.limits, self.fetcher, self.allow_local_files = limits, fetcher, allow_local_files
        self.base_dir = Path(base_dir).resolve() if base_dir is not None else None
        self.n_images = self.n_chars = self.n_pixels = self.n_parts = 0
        self.n_input_turns = 0  # user/tool turns with non-blank text or an image

    def parts(self, n: int, mi: int) -> None:
        """Count ``n`` more parts of message ``mi`` against the limits, before converting them."""
        if n > self.limits.max_parts_per_message:
            fail(f"too many content parts: {n} in one message, over max_parts_per_message="
                  f"{self.limits.max_parts_per_message}", mi)
        self.n_parts += n
        if self.n_parts > self.limits.max_parts:
            fail(f"too many content parts: {self.n_parts} in the conversation, over max_parts={self.limits.max_parts}",
                  mi)

    def text(self, text: Any, mi: int | None, pi: int | None) -> TextPart:
        if not isinstance(text, str):
            fail(f"text must be a string, got {type(text).__name__}", mi, pi)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: no tokenizer can encode it
            fail(f"text is not valid Unicode: {e.reason} at position {e.start} ({text[e.start]!r})", mi, pi, e)
        self.n_chars += len(text)
        if self.n_chars > self.limits.max_text_chars:
            fail(f"text too long: conversation text exceeds max_text_chars={self.limits.max_text_chars}", mi, pi)
        return TextPart(text=text)

    def image(self, src: Any, mi: int | None, pi: int | None) -> ImagePart:
        self.n_images += 1
        if self.n_images > self.limits.max_images:  # before decoding: a flood of images costs nothing
            fail(f"too many images: more than max_images={self.limits.max_images}", mi, pi)
        img = self._load(src, mi, pi)
        self.n_pixels += img.width * img.height
        return ImagePart.model_validate({"type": "image", "image": img}, context={"limits": self.limits})

    def _load(self, src: Any, mi: int | None, pi: int | None) -> Image.Image:
        lim, used = self.limits, self.n_pixels
        if isinstance(src, Image.Image):
            return normalize_pil(src, lim, mi, pi, used)
        if isinstance(src, (bytes, bytearray, memoryview)):
            return decode_bytes(bytes(src), lim, mi, pi, used)
        if isinstance(src, os.PathLike):
            return self._local(os.fspath(src), mi, pi)
        if not isinstance(src, str):
            fail(f"unsupported image source of type {type(src).__name__} "
                  "(expected a PIL image, bytes, a path, a data URI or a URL)", mi, pi)
        if src[:5].lower() == "data:":
            return decode_bytes(data_uri_bytes(src, lim, mi, pi), lim, mi, pi, used)
        m = re.match(r"([a-zA-Z][a-zA-Z0-9+.\-]*)://", src)
        scheme = m.group(1).lower() if m else ""
        if scheme in ("http", "https"):
            return decode_bytes(self._fetch(src, mi, pi), lim, mi, pi, used)
        if scheme == "file":
            u = urlparse(src)
            if u.netloc not in ("", "localhost"):
                fail(f"file URL {short(src)!r} names a host; only local files are read", mi, pi)
            return self._local(url2pathname(u.path), mi, pi)
        if scheme:
            fail(f"unsupported image URL scheme {scheme!r} in {short(src)!r}", mi, pi)
        return self._local(src, mi, pi)

    def _local(self, raw: str, mi: int | None, pi: int | None) -> Image.Image:
        """A local image file: refused unless allowed, confined to ``base_dir`` when given, and past
        those checks ONE message for every failure ("not found" vs "undecodable" would tell a remote
        user which server paths exist; the detail is the error's cause)."""
        if not self.allow_local_files:
            fail(f"local image files are not allowed here: {short(raw)!r} (OhdGuard(allow_local_files=True) "
                  "opts in, for trusted input only)", mi, pi)
        p = Path(raw)
        if self.base_dir is not None:
            try:
                p = (self.base_dir / p).resolve()
            except (OSError, ValueError) as e:  # e.g. an embedded NUL byte
                fail(f"bad image path {short(raw)!r}: {e}", mi, pi, e)
            if not p.is_relative_to(self.base_dir):
                fail(f"image path {short(raw)!r} is outside base_dir", mi, pi)
        try:
            return decode_bytes(self._read_file(p, raw, mi, pi), self.limits, mi, pi, self.n_pixels)
        except InvalidInputError as e:
            fail(f"cannot use local image file {short(raw)!r}: missing, unreadable, too large or not an image",
                  mi, pi, e)

    def _fetch(self, url: str, mi: int | None, pi: int | None) -> bytes:
        if self.fetcher is None:
            fail(f"remote image URL {short(url)!r} needs a fetcher: ohd-guard never downloads on its own; "
                  "pass fetcher=<callable(url) -> bytes> to to_conversation", mi, pi)
        try:
            data = self.fetcher(url)
        except Exception as e:
            fail(f"fetcher failed for {short(url)!r}: {type(e).__name__}: {e}", mi, pi, e)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            fail(f"fetcher returned {type(data).__name__} for {short(url)!r}, expected bytes", mi, pi)
        return bytes(data)

    def _read_file(self, p: Path, raw: str, mi: int | None, pi: int | None) -> bytes:
        """Read a local image (``p``, already allowed and confined by :meth:`_local`), capped at
        max_image_bytes (``/dev/zero`` reports size 0)."""
        cap = self.limits.max_image_bytes
        try:
            if not p.exists():
                fail(f"image file not found: {short(str(p), 200)!r}", mi, pi)
            if not p.is_file():
                fail(f"image path is not a regular file: {short(str(p), 200)!r}", mi, pi)
            if p.stat().st_size > cap:
                fail(f"image too large: file {p.name!r} has {p.stat().st_size} bytes, over max_image_bytes={cap}",
                      mi, pi)
            with p.open("rb") as f:
                data = f.read(cap + 1)
        except InvalidInputError:
            raise
        except (OSError, ValueError) as e:
            fail(f"could not read image file {short(raw)!r}: {e}", mi, pi, e)
        if len(data) > cap:
            fail(f"image too large: file {short(raw)!r} is over max_image_bytes={cap}", mi, pi)
        return data


# ----------------------------------------------------------------------------------- converters
_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
          "assistant": "assistant", "ai": "assistant", "tool": "tool", "function": "tool"}


def _part(raw: Any, st: _State, mi: int, pi: int) -> TextPart | ImagePart:
    if isinstance(raw, (TextPart, str)):
        return st.text(raw if isinstance(raw, str) else raw.text, mi, pi)
    if isinstance(raw, ImagePart):
        return st.image(raw.image, mi, pi)
    if not isinstance(raw, Mapping):
        fail(f"content part must be a dict, got {type(raw).__name__}", mi, pi)
    kind = raw.get("type")
    if kind == "text":
        return st.text(raw.get("text"), mi, pi)
    if kind == "image_url":
        iu = raw.get("image_url")
        url = iu.get("url") if isinstance(iu, Mapping) else iu
        if not isinstance(url, str) or not url:
            fail("image_url part needs a URL string in 'image_url' or 'image_url.url'", mi, pi)
        return st.image(url, mi, pi)
    if kind == "image":  # HF style ('image', 'url', 'path', 'base64'); LangChain's 'data'
        key = next((k for k in ("image", "url", "path", "base64", "data") if raw.get(k) is not None), None)
        if key is None:
            fail("image part has no 'image', 'url', 'path' or 'base64' field", mi, pi)
        src = raw[key]
        if key in ("base64", "data") and isinstance(src, str) and not src.startswith("data:"):
            src = b64decode(src, st.limits, "bad base64 image", mi, pi)
        return st.image(src, mi, pi)
    fail(f"unknown content-part type {kind!r}; supported: 'text', 'image_url', 'image'", mi, pi)


def _tool_calls_text(calls: Any) -> list[str]:
    """Assistant tool calls as text, so the screened context shows what the tools were asked."""
    out = []
    for c in calls if isinstance(calls, list) else []:
        f = c.get("function", c) if isinstance(c, Mapping) else {}
        if isinstance(f, Mapping) and f.get("name"):
            out.append(f"[tool call] {f['name']}({f.get('arguments', f.get('args', ''))})")
    return out


def _message(raw: Any, st: _State, mi: int) -> Message:
    if isinstance(raw, Message):
        role: Any = raw.role
        content: Any = list(raw.parts)
    elif isinstance(raw, Mapping):
        role, content = raw.get("role"), raw.get("content")
    else:
        fail(f"message must be a dict with 'role' and 'content', got {type(raw).__name__}", mi)
    r = _ROLES.get(role.lower()) if isinstance(role, str) else None
    if r is None:
        fail(f"unknown role {role!r}; expected one of {sorted(_ROLES)}", mi)
    if content is None:
        items: list[Any] = []
    elif isinstance(content, str):
        items = [content]
    elif isinstance(content, (list, tuple)):
        items = list(content)
    else:
        fail(f"message content must be a string or a list of parts, got {type(content).__name__}", mi)
    calls = raw.get("tool_calls") if isinstance(raw, Mapping) and r == "assistant" else None
    st.parts(len(items) + (len(calls) if isinstance(calls, list) else 0), mi)  # each call is a part
    parts = [_part(x, st, mi, j) for j, x in enumerate(items)]
    parts += [st.text(t, mi, None) for t in _tool_calls_text(calls)]
    if r in ("user", "tool"):
        if any(isinstance(p, ImagePart) or p.text.strip() for p in parts):
            st.n_input_turns += 1
        elif r == "user":  # an assistant turn may be empty, a tool may return nothing; a user turn may not
            fail("empty or blank user message: it has no text and no image to screen", mi)
    if r == "tool":
        # Tool output is where indirect prompt injection arrives (a web page, a file, an API reply),
        # so it is screened as user-visible input rather than dropped or trusted.
        name = raw.get("name") if isinstance(raw, Mapping) else None
        prefix = f"[tool result: {name}]" if isinstance(name, str) and name else TOOL_PREFIX
        st.text(prefix + " ", mi, None)  # count it against the text limit
        if parts and isinstance(parts[0], TextPart):
            parts[0] = TextPart(text=f"{prefix} {parts[0].text}")
        else:
            parts.insert(0, TextPart(text=prefix))
        r = "user"
    return Message(role=r, parts=parts)


def to_conversation(obj: Any, *, limits: ConversationLimits = DEFAULT_LIMITS,
                    fetcher: Callable[[str], bytes] | None = None, base_dir: Path | str | None = None,
                    allow_local_files: bool = False) -> Conversation:
    """Convert (and validate against ``limits``) anything the library accepts into a Conversation.

    Accepts a :class:`Conversation` (re-validated), a :class:`Message`, a ``str`` (one user turn),
    a list of OpenAI-style message dicts (string content, or parts ``text`` / ``image_url`` /
    HF-style ``image``), or a dict with a ``"messages"`` list. Images may be PIL images, bytes,
    ``data:`` URIs, ``file://`` URIs or local paths (relative to and confined to ``base_dir`` when
    given; read only with ``allow_local_files=True``, an opt-in for trusted input), and
    ``http(s)`` URLs only through ``fetcher``: the library never downloads on its own.
    Roles ``human``/``ai``/``developer`` map to user/assistant/system; ``tool``/``function``
    results become user turns prefixed ``[tool result]`` so they are screened too.
    Empty or blank input is :class:`InvalidInputError`: a user message without non-whitespace text
    or an image, or a conversation none of whose user/tool messages carries any (an assistant turn
    may be empty, a tool may return nothing, a system prompt may be absent).
    """
    st = _State(limits, fetcher, Path(base_dir) if base_dir is not None else None, allow_local_files)
    if isinstance(obj, Conversation):
        items: list[Any] = list(obj.messages)
    elif isinstance(obj, (Message, str)):
        items = [obj if isinstance(obj, Message) else {"role": "user", "content": obj}]
    elif isinstance(obj, Mapping) and isinstance(obj.get("messages"), (list, tuple)):
        items = list(obj["messages"])
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    else:
        fail(f"cannot convert {type(obj).__name__} to a conversation "
              "(expected Conversation, str, or a list of message dicts)")
    if not items:
        fail("empty conversation: there are no messages")
    if len(items) > limits.max_messages:
        fail(f"too many messages: {len(items)}, over max_messages={limits.max_messages}")
    msgs = [_message(m, st, i) for i, m in enumerate(items)]
    if not any(m.role == "user" for m in msgs):
        fail("conversation has no user turn: there is no input to screen")
    if not st.n_input_turns:
        fail("no user or tool message carries text or an image: the input is empty or blank")
    return Conversation(messages=msgs)
