"""The conversation types (frozen, validated): :class:`TextPart`, :class:`ImagePart`,
:class:`Message`, :class:`Conversation`. Built directly they check their input as converting does."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union

from PIL import Image
from pydantic import Field, ValidationInfo, field_validator, model_validator

from ohd_guard.conversation.images import normalize_pil
from ohd_guard.conversation.limits import DEFAULT_LIMITS, StrictModel, fail

__all__ = ["Conversation", "ImagePart", "Message", "Part", "Role", "TextPart"]

Role = Literal["system", "user", "assistant"]
_SEP = "\n\n"


# ---------------------------------------------------------------------------------------- types
class TextPart(StrictModel):
    """A piece of text in a message."""

    type: Literal["text"] = "text"
    text: str = Field(strict=True)


class ImagePart(StrictModel):
    """An image in a message: always a decoded, size-checked RGB ``PIL.Image.Image``.

    Built directly, it is checked against the default :class:`ConversationLimits`; converters pass
    their own limits through the validation context (``context={"limits": ...}``).
    """

    type: Literal["image"] = "image"
    image: Image.Image

    @field_validator("image")
    @classmethod
    def _decoded_rgb(cls, img: Image.Image, info: ValidationInfo) -> Image.Image:
        limits = (info.context or {}).get("limits", DEFAULT_LIMITS)
        return normalize_pil(img, limits)


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]  # noqa: UP007 (public runtime alias kept as is)


class Message(StrictModel):
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


class Conversation(StrictModel):
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
            fail(f"conversation has {self.num_images} image(s) but the model is text-only and cannot see "
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
        return self.prefix_digests([len(self.messages)])[len(self.messages)]

    def prefix_digests(self, ends: Iterable[int]) -> dict[int, str]:
        """:meth:`digest` of ``messages[:j]`` for every ``j`` in ``ends``, in one pass over the same
        byte stream, so a prefix's digest is the one it had when it was a whole conversation."""
        h = hashlib.sha256(b"ohd-guard/conversation/v1")
        want = set(ends)
        out = {0: h.hexdigest()} if 0 in want else {}

        def put(tag: bytes, data: bytes) -> None:
            h.update(tag + struct.pack(">Q", len(data)) + data)

        for j, m in enumerate(self.messages, start=1):
            put(b"M", m.role.encode())
            for p in m.parts:
                if isinstance(p, TextPart):
                    put(b"T", p.text.encode("utf-8", "surrogatepass"))
                else:
                    put(b"I", f"{p.image.mode}:{p.image.width}x{p.image.height}".encode())
                    put(b"P", p.image.tobytes())
            if j in want:
                out[j] = h.hexdigest()
        return out
