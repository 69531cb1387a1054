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


def _text_of(content: Any) -> list[str]:
    """The text pieces of one chat-template message content (a str, or a list of typed parts)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return []


def content_spans(processor: Any, conversation: Any, ids: Sequence[int]) -> list[tuple[int, int]] | None:
    """Token spans ``[start, end)`` of the user (and tool-result) messages' text in ``ids``, the
    conversation's rendered ids (generation prompt included, no padding); None where they cannot be
    located: a tokenizer without offsets, a template that rewrites the text, or a processor that
    expands image placeholders (the rendered text's tokens are then not ``ids``).

    Why: a probe pooled over the whole prompt also averages the operator's system prompt, tool
    definitions and the template's own tokens; pooled over these spans it reads what users wrote."""
    tok = tokenizer_of(processor)
    mm = is_multimodal(processor)
    messages = chat_messages(conversation, mm)
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except Exception:  # noqa: BLE001 - slow tokenizers have no offsets, some processors cannot render text
        return None  # only the span is lost: the caller pools over the whole prompt
    if list(enc["input_ids"]) != [int(i) for i in ids]:
        return None
    chars: list[tuple[int, int]] = []
    cursor = 0
    for m in messages:
        for piece in _text_of(m.get("content")):
            piece = piece.strip()
            if not piece:
                continue
            at = text.find(piece, cursor)
            if at < 0:
                if m.get("role") == "user":
                    return None  # the template rewrote the user's text: no span to trust
                continue  # a template may drop or rewrite other turns (e.g. reasoning); the user's text it keeps
            cursor = at + len(piece)
            if m.get("role") == "user":
                chars.append((at, cursor))
    offsets = enc["offset_mapping"]
    spans: list[tuple[int, int]] = []
    for lo, hi in chars:
        inside = [k for k, (s, e) in enumerate(offsets) if s < hi and e > lo]
        if inside:
            spans.append((inside[0], inside[-1] + 1))
    return spans or None


def content_mask(processor: Any, conversations: Sequence[Any], inputs: dict[str, Any]) -> torch.Tensor:
    """[B, T] float mask of ``inputs`` (left-padded, :func:`encode_conversations`): 1 on the tokens of
    the user and tool-result messages' text (:func:`content_spans`), 0 on the template's tokens, system
    prompts, tool definitions, assistant turns and padding. A row whose spans cannot be located gets 1
    on every real token (the whole prompt), so a content-pooled read never silently reads nothing."""
    ids = inputs["input_ids"]
    attn = inputs.get("attention_mask")
    B, T = ids.shape
    out = torch.zeros(B, T)
    lengths = attn.sum(-1).tolist() if attn is not None else [T] * B
    for b, conv in enumerate(conversations):
        n = int(lengths[b])
        spans = content_spans(processor, conv, ids[b, T - n :].tolist())
        if spans is None:
            out[b, T - n :] = 1.0
        for s, e in spans or ():
            out[b, T - n + s : T - n + e] = 1.0
    return out
