"""The one canonical multimodal conversation type of ohd-guard, and the converters into it.

Every input (a plain prompt, OpenAI-style or HF-style message lists, and later LangChain /
LlamaIndex messages) becomes a :class:`Conversation` first, so screening sees a single shape,
each image is decoded, size-checked and made RGB exactly once, and every bad input fails here
with an :class:`~ohd_guard.errors.InvalidInputError` that names the problem and where it is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import struct
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Union
from urllib.parse import unquote_to_bytes, urlparse
from urllib.request import url2pathname

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ohd_guard.errors import InvalidInputError

__all__ = [
    "Conversation",
    "ConversationLimits",
    "ImagePart",
    "Message",
    "Part",
    "TextPart",
    "to_conversation",
]

Role = Literal["system", "user", "assistant"]
TOOL_PREFIX = "[tool result]"
_SEP = "\n\n"


# --------------------------------------------------------------------------------------- errors
def _fail(msg: str, mi: int | None = None, pi: int | None = None, cause: BaseException | None = None) -> NoReturn:
    """Raise InvalidInputError with the input location (``messages[i].content[j]``) attached."""
    if mi is not None:
        msg += f" (at messages[{mi}]" + (f".content[{pi}]" if pi is not None else "") + ")"
    err = InvalidInputError(msg)
    err.message_index, err.part_index = mi, pi  # type: ignore[attr-defined]
    raise err from cause


def _short(s: str, n: int = 80) -> str:
    """Keep error messages readable when the offending string is a megabyte-long data URI."""
    return s if len(s) <= n else s[: n - 3] + "..."


def _from_validation(e: ValidationError) -> InvalidInputError:
    lines = []
    for d in e.errors():
        loc = ".".join(str(x) for x in d["loc"])
        msg = d["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return InvalidInputError("; ".join(lines))


class _Meta(type(BaseModel)):  # type: ignore[misc]
    """Turns pydantic's ValidationError into InvalidInputError for direct construction only.

    Done in the metaclass (not ``__init__``) because a custom ``__init__`` would also run, and
    nest error messages, for every sub-model pydantic validates.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as e:
            raise _from_validation(e) from e


class _Model(BaseModel, metaclass=_Meta):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            raise _from_validation(e) from e


# --------------------------------------------------------------------------------------- limits
class ConversationLimits(_Model):
    """Caps applied while converting, so a hostile input cannot exhaust memory or time before
    it is even screened. ``max_image_pixels`` is checked from the image header, before any
    pixel is decoded; Pillow's own ``Image.MAX_IMAGE_PIXELS`` bomb guard applies as well."""

    max_images: int = Field(8, ge=0)
    max_image_pixels: int = Field(4096 * 4096, gt=0)
    max_total_pixels: int = Field(2 * 4096 * 4096, gt=0)
    """All images of one conversation together (8 images at the per-image cap would decode to ~1 GB)."""
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_text_chars: int = Field(200_000, gt=0)
    max_messages: int = Field(256, gt=0)
    max_parts_per_message: int = Field(256, gt=0)
    max_parts: int = Field(1024, gt=0)
    """Content parts per message and in the whole conversation (an assistant's tool calls count),
    checked before any part is converted: empty parts pass every size limit yet each still costs a
    rendered token or more (a million empty strings rendered to a million tokens)."""


_DEFAULT_LIMITS = ConversationLimits()


# --------------------------------------------------------------------------------------- images
def _check_pixels(w: int, h: int, limits: ConversationLimits, mi: int | None, pi: int | None, used: int = 0) -> None:
    if w <= 0 or h <= 0:
        _fail(f"image is empty ({w}x{h})", mi, pi)
    if w * h > limits.max_image_pixels:
        _fail(f"image has too many pixels: {w}x{h} = {w * h}, over max_image_pixels={limits.max_image_pixels} "
              "(decompression-bomb guard)", mi, pi)
    if used + w * h > limits.max_total_pixels:
        _fail(f"images have too many pixels together: {used + w * h}, over max_total_pixels={limits.max_total_pixels}",
              mi, pi)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (a plain convert turns it black or noisy)."""
    if img.mode == "RGB" and type(img) is Image.Image:
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # also detaches a file-backed image into a plain Image


def _load_checked(open_: Callable[[], Image.Image], limits: ConversationLimits, mi: int | None, pi: int | None,
                  *, transpose: bool, used: int = 0) -> Image.Image:
    """Open (header only), check size, then decode; every Pillow failure becomes our error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = open_()
            _check_pixels(img.width, img.height, limits, mi, pi, used)  # nothing decoded yet
            img.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        _fail(f"image has too many pixels: rejected by Pillow's decompression-bomb guard ({e})", mi, pi, e)
    except Exception as e:  # Pillow raises many kinds (OSError, SyntaxError, struct.error, ...) on bad data
        _fail(f"undecodable image: {type(e).__name__}: {e}", mi, pi, e)
    if transpose:  # phone photos carry their orientation in EXIF; the model should see them upright
        try:
            img = ImageOps.exif_transpose(img) or img
        except Exception:
            pass
    return _to_rgb(img)


def _decode_bytes(data: bytes, limits: ConversationLimits, mi: int | None, pi: int | None, used: int = 0) -> Image.Image:
    if len(data) > limits.max_image_bytes:
        _fail(f"image too large: {len(data)} bytes, over max_image_bytes={limits.max_image_bytes}", mi, pi)
    if not data:
        _fail("undecodable image: no bytes", mi, pi)
    return _load_checked(lambda: Image.open(io.BytesIO(data)), limits, mi, pi, transpose=True, used=used)


def _normalize_pil(img: Image.Image, limits: ConversationLimits, mi: int | None = None,
                   pi: int | None = None, used: int = 0) -> Image.Image:
    """A caller's PIL image (maybe lazily opened): size-check before load, then RGB. Not copied
    when already a plain RGB image, so callers should not mutate images after handing them in."""
    return _load_checked(lambda: img, limits, mi, pi, transpose=False, used=used)


def _b64decode(payload: str, limits: ConversationLimits, what: str, mi: int | None, pi: int | None) -> bytes:
    payload = re.sub(r"\s+", "", payload)
    if len(payload) * 3 // 4 > limits.max_image_bytes:  # refuse before allocating the decoded copy
        _fail(f"image too large: about {len(payload) * 3 // 4} bytes of base64 data, over "
              f"max_image_bytes={limits.max_image_bytes}", mi, pi)
    altchars = b"-_" if ("-" in payload or "_" in payload) else None
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        _fail(f"{what}: invalid base64 ({e})", mi, pi, e)


def _data_uri(uri: str, limits: ConversationLimits, mi: int | None, pi: int | None) -> bytes:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        _fail(f"bad data URI {_short(uri)!r}: no ',' between header and data", mi, pi)
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0]
    if mime and not (mime.startswith("image/") or mime == "application/octet-stream"):
        _fail(f"bad data URI: media type {mime!r} is not an image", mi, pi)
    if "base64" in params[1:]:
        return _b64decode(payload, limits, "bad data URI", mi, pi)
    return unquote_to_bytes(payload)


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
            _fail(f"too many content parts: {n} in one message, over max_parts_per_message="
                  f"{self.limits.max_parts_per_message}", mi)
        self.n_parts += n
        if self.n_parts > self.limits.max_parts:
            _fail(f"too many content parts: {self.n_parts} in the conversation, over max_parts={self.limits.max_parts}",
                  mi)

    def text(self, text: Any, mi: int | None, pi: int | None) -> TextPart:
        if not isinstance(text, str):
            _fail(f"text must be a string, got {type(text).__name__}", mi, pi)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: no tokenizer can encode it
            _fail(f"text is not valid Unicode: {e.reason} at position {e.start} ({text[e.start]!r})", mi, pi, e)
        self.n_chars += len(text)
        if self.n_chars > self.limits.max_text_chars:
            _fail(f"text too long: conversation text exceeds max_text_chars={self.limits.max_text_chars}", mi, pi)
        return TextPart(text=text)

    def image(self, src: Any, mi: int | None, pi: int | None) -> ImagePart:
        self.n_images += 1
        if self.n_images > self.limits.max_images:  # before decoding: a flood of images costs nothing
            _fail(f"too many images: more than max_images={self.limits.max_images}", mi, pi)
        img = self._load(src, mi, pi)
        self.n_pixels += img.width * img.height
        return ImagePart.model_validate({"type": "image", "image": img}, context={"limits": self.limits})

    def _load(self, src: Any, mi: int | None, pi: int | None) -> Image.Image:
        lim, used = self.limits, self.n_pixels
        if isinstance(src, Image.Image):
            return _normalize_pil(src, lim, mi, pi, used)
        if isinstance(src, (bytes, bytearray, memoryview)):
            return _decode_bytes(bytes(src), lim, mi, pi, used)
        if isinstance(src, os.PathLike):
            return self._local(os.fspath(src), mi, pi)
        if not isinstance(src, str):
            _fail(f"unsupported image source of type {type(src).__name__} "
                  "(expected a PIL image, bytes, a path, a data URI or a URL)", mi, pi)
        if src[:5].lower() == "data:":
            return _decode_bytes(_data_uri(src, lim, mi, pi), lim, mi, pi, used)
        m = re.match(r"([a-zA-Z][a-zA-Z0-9+.\-]*)://", src)
        scheme = m.group(1).lower() if m else ""
        if scheme in ("http", "https"):
            return _decode_bytes(self._fetch(src, mi, pi), lim, mi, pi, used)
        if scheme == "file":
            u = urlparse(src)
            if u.netloc not in ("", "localhost"):
                _fail(f"file URL {_short(src)!r} names a host; only local files are read", mi, pi)
            return self._local(url2pathname(u.path), mi, pi)
        if scheme:
            _fail(f"unsupported image URL scheme {scheme!r} in {_short(src)!r}", mi, pi)
        return self._local(src, mi, pi)

    def _local(self, raw: str, mi: int | None, pi: int | None) -> Image.Image:
        """A local image file: refused unless allowed, confined to ``base_dir`` when given, and past
        those checks ONE message for every failure ("not found" vs "undecodable" would tell a remote
        user which server paths exist; the detail is the error's cause)."""
        if not self.allow_local_files:
            _fail(f"local image files are not allowed here: {_short(raw)!r} (OhdGuard(allow_local_files=True) "
                  "opts in, for trusted input only)", mi, pi)
        p = Path(raw)
        if self.base_dir is not None:
            try:
                p = (self.base_dir / p).resolve()
            except (OSError, ValueError) as e:  # e.g. an embedded NUL byte
                _fail(f"bad image path {_short(raw)!r}: {e}", mi, pi, e)
            if not p.is_relative_to(self.base_dir):
                _fail(f"image path {_short(raw)!r} is outside base_dir", mi, pi)
        try:
            return _decode_bytes(self._read_file(p, raw, mi, pi), self.limits, mi, pi, self.n_pixels)
        except InvalidInputError as e:
            _fail(f"cannot use local image file {_short(raw)!r}: missing, unreadable, too large or not an image",
                  mi, pi, e)

    def _fetch(self, url: str, mi: int | None, pi: int | None) -> bytes:
        if self.fetcher is None:
            _fail(f"remote image URL {_short(url)!r} needs a fetcher: ohd-guard never downloads on its own; "
                  "pass fetcher=<callable(url) -> bytes> to to_conversation", mi, pi)
        try:
            data = self.fetcher(url)
        except Exception as e:
            _fail(f"fetcher failed for {_short(url)!r}: {type(e).__name__}: {e}", mi, pi, e)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            _fail(f"fetcher returned {type(data).__name__} for {_short(url)!r}, expected bytes", mi, pi)
        return bytes(data)

    def _read_file(self, p: Path, raw: str, mi: int | None, pi: int | None) -> bytes:
        """Read a local image (``p``, already allowed and confined by :meth:`_local`), capped at
        max_image_bytes (``/dev/zero`` reports size 0)."""
        cap = self.limits.max_image_bytes
        try:
            if not p.exists():
                _fail(f"image file not found: {_short(str(p), 200)!r}", mi, pi)
            if not p.is_file():
                _fail(f"image path is not a regular file: {_short(str(p), 200)!r}", mi, pi)
            if p.stat().st_size > cap:
                _fail(f"image too large: file {p.name!r} has {p.stat().st_size} bytes, over max_image_bytes={cap}",
                      mi, pi)
            with p.open("rb") as f:
                data = f.read(cap + 1)
        except InvalidInputError:
            raise
        except (OSError, ValueError) as e:
            _fail(f"could not read image file {_short(raw)!r}: {e}", mi, pi, e)
        if len(data) > cap:
            _fail(f"image too large: file {_short(raw)!r} is over max_image_bytes={cap}", mi, pi)
        return data


# ---------------------------------------------------------------------------------------- types
class TextPart(_Model):
    """A piece of text in a message."""

    type: Literal["text"] = "text"
    text: str = Field(strict=True)


class ImagePart(_Model):
    """An image in a message: always a decoded, size-checked RGB ``PIL.Image.Image``.

    Built directly, it is checked against the default :class:`ConversationLimits`; converters pass
    their own limits through the validation context (``context={"limits": ...}``).
    """

    type: Literal["image"] = "image"
    image: Image.Image

    @field_validator("image")
    @classmethod
    def _decoded_rgb(cls, img: Image.Image, info: ValidationInfo) -> Image.Image:
        limits = (info.context or {}).get("limits", _DEFAULT_LIMITS)
        return _normalize_pil(img, limits)


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]  # noqa: UP007 (public runtime alias kept as is)


class Message(_Model):
    """One turn. Tool results are converted to ``user`` turns (see :func:`to_conversation`)."""

    role: Role
    parts: list[Part] = Field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def images(self) -> list[Image.Image]:
        return [p.image for p in self.parts if isinstance(p, ImagePart)]


def _add_text(msg: Message, text: str, *, front: bool) -> Message:
    """Merge into the adjacent text part (with a blank line) rather than adding a new part, since
    many VLM templates glue consecutive text parts together with no separator."""
    parts = list(msg.parts)
    i = 0 if front else len(parts) - 1
    if parts and isinstance(parts[i], TextPart) and parts[i].text:
        old = parts[i].text
        parts[i] = TextPart(text=text + _SEP + old if front else old + _SEP + text)
    else:
        parts.insert(0 if front else len(parts), TextPart(text=text))
    return Message(role=msg.role, parts=parts)


class Conversation(_Model):
    """A whole multimodal conversation: the single type the model code screens and renders."""

    messages: list[Message]

    @model_validator(mode="after")
    def _has_user_turn(self) -> Conversation:
        if not self.messages:
            raise ValueError("empty conversation: there are no messages")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("conversation has no user turn: there is no input to screen")
        return self

    @property
    def images(self) -> list[Image.Image]:
        return [img for m in self.messages for img in m.images]

    @property
    def num_images(self) -> int:
        return sum(isinstance(p, ImagePart) for m in self.messages for p in m.parts)

    @property
    def text(self) -> str:
        """All text, one ``role: text`` line block per message; for logs, not for the model."""
        return "\n".join(f"{m.role}: {m.text}" for m in self.messages)

    @property
    def last_user_text(self) -> str:
        return next(m.text for m in reversed(self.messages) if m.role == "user")

    def to_chat_messages(self) -> list[dict[str, Any]]:
        """The form HF VLM processors' ``apply_chat_template`` expects (images inline as PIL)."""
        return [{"role": m.role,
                 "content": [{"type": "image", "image": p.image} if isinstance(p, ImagePart)
                             else {"type": "text", "text": p.text} for p in m.parts]}
                for m in self.messages]

    def to_text_chat_messages(self) -> list[dict[str, str]]:
        """Plain-string contents for text-only tokenizers; refuses images rather than silently
        dropping them, because a text-only model would screen a conversation it cannot see."""
        if self.num_images:
            _fail(f"conversation has {self.num_images} image(s) but the model is text-only and cannot see "
                  "them; use a vision-language model to screen images")
        return [{"role": m.role, "content": m.text} for m in self.messages]

    def _last_user_index(self) -> int:
        return max(i for i, m in enumerate(self.messages) if m.role == "user")

    def _replace(self, i: int, msg: Message) -> Conversation:
        msgs = list(self.messages)
        msgs[i] = msg
        return Conversation(messages=msgs)

    def with_system(self, text: str) -> Conversation:
        """Add a system instruction; merged into a leading system message because many chat
        templates accept only one system message, and only at the start."""
        if self.messages[0].role == "system":
            return self._replace(0, _add_text(self.messages[0], text, front=True))
        return Conversation(messages=[Message(role="system", parts=[TextPart(text=text)]), *self.messages])

    def with_appended_user_text(self, text: str) -> Conversation:
        """New conversation with ``text`` at the end of the last user turn (self is untouched)."""
        i = self._last_user_index()
        return self._replace(i, _add_text(self.messages[i], text, front=False))

    def with_prepended_user_text(self, text: str) -> Conversation:
        """New conversation with ``text`` at the start of the last user turn (self is untouched)."""
        i = self._last_user_index()
        return self._replace(i, _add_text(self.messages[i], text, front=True))

    def digest(self) -> str:
        """Stable sha256 over roles, text and image pixels (length-prefixed, so no two different
        conversations share a byte stream); for caching verdicts and for logs."""
        h = hashlib.sha256(b"ohd-guard/conversation/v1")

        def put(tag: bytes, data: bytes) -> None:
            h.update(tag + struct.pack(">Q", len(data)) + data)

        for m in self.messages:
            put(b"M", m.role.encode())
            for p in m.parts:
                if isinstance(p, TextPart):
                    put(b"T", p.text.encode("utf-8", "surrogatepass"))
                else:
                    put(b"I", f"{p.image.mode}:{p.image.width}x{p.image.height}".encode())
                    put(b"P", p.image.tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------------- converters
_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
          "assistant": "assistant", "ai": "assistant", "tool": "tool", "function": "tool"}


def _part(raw: Any, st: _State, mi: int, pi: int) -> TextPart | ImagePart:
    if isinstance(raw, (TextPart, str)):
        return st.text(raw if isinstance(raw, str) else raw.text, mi, pi)
    if isinstance(raw, ImagePart):
        return st.image(raw.image, mi, pi)
    if not isinstance(raw, Mapping):
        _fail(f"content part must be a dict, got {type(raw).__name__}", mi, pi)
    kind = raw.get("type")
    if kind == "text":
        return st.text(raw.get("text"), mi, pi)
    if kind == "image_url":
        iu = raw.get("image_url")
        url = iu.get("url") if isinstance(iu, Mapping) else iu
        if not isinstance(url, str) or not url:
            _fail("image_url part needs a URL string in 'image_url' or 'image_url.url'", mi, pi)
        return st.image(url, mi, pi)
    if kind == "image":  # HF style ('image', 'url', 'path', 'base64'); LangChain's 'data'
        key = next((k for k in ("image", "url", "path", "base64", "data") if raw.get(k) is not None), None)
        if key is None:
            _fail("image part has no 'image', 'url', 'path' or 'base64' field", mi, pi)
        src = raw[key]
        if key in ("base64", "data") and isinstance(src, str) and not src.startswith("data:"):
            src = _b64decode(src, st.limits, "bad base64 image", mi, pi)
        return st.image(src, mi, pi)
    _fail(f"unknown content-part type {kind!r}; supported: 'text', 'image_url', 'image'", mi, pi)


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
        _fail(f"message must be a dict with 'role' and 'content', got {type(raw).__name__}", mi)
    r = _ROLES.get(role.lower()) if isinstance(role, str) else None
    if r is None:
        _fail(f"unknown role {role!r}; expected one of {sorted(_ROLES)}", mi)
    if content is None:
        items: list[Any] = []
    elif isinstance(content, str):
        items = [content]
    elif isinstance(content, (list, tuple)):
        items = list(content)
    else:
        _fail(f"message content must be a string or a list of parts, got {type(content).__name__}", mi)
    calls = raw.get("tool_calls") if isinstance(raw, Mapping) and r == "assistant" else None
    st.parts(len(items) + (len(calls) if isinstance(calls, list) else 0), mi)  # each call is a part
    parts = [_part(x, st, mi, j) for j, x in enumerate(items)]
    parts += [st.text(t, mi, None) for t in _tool_calls_text(calls)]
    if r in ("user", "tool"):
        if any(isinstance(p, ImagePart) or p.text.strip() for p in parts):
            st.n_input_turns += 1
        elif r == "user":  # an assistant turn may be empty, a tool may return nothing; a user turn may not
            _fail("empty or blank user message: it has no text and no image to screen", mi)
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


def to_conversation(obj: Any, *, limits: ConversationLimits = _DEFAULT_LIMITS,
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
        _fail(f"cannot convert {type(obj).__name__} to a conversation "
              "(expected Conversation, str, or a list of message dicts)")
    if not items:
        _fail("empty conversation: there are no messages")
    if len(items) > limits.max_messages:
        _fail(f"too many messages: {len(items)}, over max_messages={limits.max_messages}")
    msgs = [_message(m, st, i) for i, m in enumerate(items)]
    if not any(m.role == "user" for m in msgs):
        _fail("conversation has no user turn: there is no input to screen")
    if not st.n_input_turns:
        _fail("no user or tool message carries text or an image: the input is empty or blank")
    return Conversation(messages=msgs)
