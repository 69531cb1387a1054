"""The one canonical multimodal conversation type of ohd-guard, and the converters into it.

Every input (a plain prompt, OpenAI-style or HF-style message lists, and later LangChain /
LlamaIndex messages) becomes a :class:`Conversation` first, so screening sees a single shape,
each image is decoded, size-checked and made RGB exactly once, and every bad input fails here
with an :class:`~ohd_guard.errors.InvalidInputError` that names the problem and where it is.

One module per step: ``limits`` (the validated base model and :class:`ConversationLimits`),
``images`` (image sources decoded and checked), ``model`` (the types), ``convert``
(:func:`to_conversation`). ``TOOL_PREFIX`` and ``Role`` stay importable from here, outside ``__all__``.
"""

from __future__ import annotations

from ohd_guard.conversation.convert import TOOL_PREFIX as TOOL_PREFIX, to_conversation
from ohd_guard.conversation.limits import ConversationLimits
from ohd_guard.conversation.model import Conversation, ImagePart, Message, Part, Role as Role, TextPart

__all__ = [
    "Conversation",
    "ConversationLimits",
    "ImagePart",
    "Message",
    "Part",
    "TextPart",
    "to_conversation",
]
