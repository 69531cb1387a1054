"""Choosing items from a set, deterministically so that a fit, a benchmark or an eval run is reproducible:
subsamples (``evenly``, ``per_class``, ``stratified``), deduplication across sets, and dev splits."""

from __future__ import annotations

import hashlib
import random
import unicodedata
from collections import defaultdict
from typing import Any, TypeVar

from ohd_guard.datasets.prompts import LabelledPrompt
from ohd_guard.errors import InvalidInputError

T = TypeVar("T")


def evenly(items: list, n: int | None) -> list:
    """At most ``n`` items at even strides through ``items`` (covers the whole list, not only its start)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def per_class(items: list[LabelledPrompt], n: int | None) -> list[LabelledPrompt]:
    """At most ``n`` unsafe and ``n`` safe items, each class evenly spread through the set (order kept)."""
    if n is None:
        return list(items)
    keep = {id(x) for lab in (1, 0) for x in evenly([p for p in items if p.label == lab], n)}
    return [p for p in items if id(p) in keep]


def stratified(items: list[LabelledPrompt], n: int | None, seed: int | None = None) -> list[LabelledPrompt]:
    """At most ``n`` items spread evenly over categories, round-robin; within a category in file
    order, or shuffled with ``seed``."""
    if n is None or n >= len(items):
        return list(items)
    groups: dict[str, list[LabelledPrompt]] = defaultdict(list)
    for p in items:
        groups[p.category].append(p)
    if seed is not None:
        rng = random.Random(seed)
        for g in groups.values():
            rng.shuffle(g)
    out: list[LabelledPrompt] = []
    i = 0
    while len(out) < n:
        for k in sorted(groups):
            if i < len(groups[k]) and len(out) < n:
                out.append(groups[k][i])
        i += 1
    return out


def _norm(item: Any) -> str:
    """Lower-cased text with whitespace collapsed and punctuation stripped at both ends."""
    text = item if isinstance(item, str) else str(getattr(item, "text", ""))
    text = " ".join(text.lower().split())
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def dedupe_against(items: list, reference: Any = ()) -> list:
    """``items`` without those whose normalised text equals that of a ``reference`` item or of an earlier item.

    Texts are compared lower-cased, with whitespace collapsed and punctuation stripped at the ends.
    Items and references may be :class:`LabelledPrompt`, :class:`LabelledConversation` (compared on
    its last user turn) or ``str``. Use it before evaluating on one public set after calibrating on
    another that shares its source (several of them reuse Anthropic HH red-team or BeaverTails prompts).
    Images are not compared: FigStep image items, which all share one instruction, collapse to one.
    """
    seen = {_norm(r) for r in reference}
    out = []
    for x in items:
        key = _norm(x)
        if key in seen:
            continue
        seen.add(key)
        out.append(x)
    return out


def split_dev(items: list[T], fraction: float = 0.2, seed: int = 0) -> tuple[list[T], list[T]]:
    """``(fit, dev)``: each item on the dev side when a hash of its normalised text (and ``seed``) falls
    below ``fraction``, order kept.

    The side depends on the text alone, not on the item's position or on the other items, so a prompt
    (and every duplicate of it) is always on the same side: adding rows to a set or loading a subset
    never moves a dev prompt into the fit data. Texts are normalised as :func:`dedupe_against` does.
    """
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"fraction must be strictly between 0 and 1, not {fraction!r}")
    fit: list[T] = []
    dev: list[T] = []
    for x in items:
        digest = hashlib.sha256(f"{seed}\0{_norm(x)}".encode()).digest()
        (dev if int.from_bytes(digest[:8], "big") < fraction * 2**64 else fit).append(x)
    return fit, dev
