"""Turning conversations into model inputs with the model's own chat template.

Screening renders the *whole* conversation exactly as generation would, with the generation prompt
appended, so the last prompt position is the one that produces the first answer token.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ohd_guard.errors import InvalidInputError


def is_multimodal(processor: Any) -> bool:
    """A processor with an image processor can take images; a bare tokenizer cannot."""
    return getattr(processor, "image_processor", None) is not None


def tokenizer_of(processor: Any):
    return getattr(processor, "tokenizer", processor)


def chat_messages(conversation: Any, multimodal: bool) -> list[dict]:
    """HF chat-template messages for a str, a list of message dicts, or a Conversation."""
    if isinstance(conversation, str):
        text = conversation
        content: Any = [{"type": "text", "text": text}] if multimodal else text
        return [{"role": "user", "content": content}]
    if hasattr(conversation, "to_chat_messages"):
        return conversation.to_chat_messages() if multimodal else conversation.to_text_chat_messages()
    if isinstance(conversation, list) and all(isinstance(m, dict) for m in conversation):
        return conversation
    raise InvalidInputError(
        f"cannot render a {type(conversation).__name__} as a conversation; pass a str, a list of "
        "message dicts or an ohd_guard.Conversation"
    )


def encode_conversations(processor: Any, conversations: Sequence[Any], device=None) -> dict[str, Any]:
    """Batch-encode conversations, left-padded so the last column is every row's last prompt token."""
    if processor is None:
        raise InvalidInputError("no tokenizer/processor was given, so conversations cannot be rendered")
    if not conversations:
        raise InvalidInputError("no conversations to encode")
    mm = is_multimodal(processor)
    batch = [chat_messages(c, mm) for c in conversations]
    tok = tokenizer_of(processor)
    old_side = getattr(tok, "padding_side", "left")
    try:
        tok.padding_side = "left"
        if tok.pad_token is None:
            raise InvalidInputError("the tokenizer has no pad token; set tokenizer.pad_token first")
        if not getattr(processor, "chat_template", None) and not getattr(tok, "chat_template", None):
            raise InvalidInputError(
                "the model's tokenizer/processor has no chat template, so conversations cannot be rendered "
                "as generation would see them; set processor.chat_template (a Jinja template) first"
            )
        pad = {"processor_kwargs": {"padding": True}} if mm else {"padding": True}
        enc = processor.apply_chat_template(
            batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **pad
        )
    finally:
        tok.padding_side = old_side
    enc = dict(enc)
    if device is not None:
        enc = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}
    return enc
