"""The validated base of the conversation types, and the limits converting checks.

Every failure here is an :class:`~ohd_guard.errors.InvalidInputError` that names the problem and,
where known, its place (``messages[i].content[j]``); pydantic's ValidationError never escapes.
"""

from __future__ import annotations

from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ohd_guard.errors import InvalidInputError

__all__ = ["DEFAULT_LIMITS", "ConversationLimits", "StrictModel", "fail", "short"]


# --------------------------------------------------------------------------------------- errors
def fail(msg: str, mi: int | None = None, pi: int | None = None, cause: BaseException | None = None) -> NoReturn:
    """Raise InvalidInputError with the input location (``messages[i].content[j]``) attached."""
    if mi is not None:
        msg += f" (at messages[{mi}]" + (f".content[{pi}]" if pi is not None else "") + ")"
    err = InvalidInputError(msg)
    err.message_index, err.part_index = mi, pi  # type: ignore[attr-defined]
    raise err from cause


def short(s: str, n: int = 80) -> str:
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


class StrictModel(BaseModel, metaclass=_Meta):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            raise _from_validation(e) from e


# --------------------------------------------------------------------------------------- limits
class ConversationLimits(StrictModel):
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


DEFAULT_LIMITS = ConversationLimits()
