"""Turn-aware screening: one score per user/tool message, read from the conversation's one prefill.

A detector reads the last prompt position, right after the generation prompt (``<|im_start|>assistant\\n``).
For a user/tool message followed by an assistant turn, the rendered conversation up to and including
that assistant turn's header is, token for token, the rendering of the conversation prefix ending with
the message (``add_generation_prompt=True``); causal attention makes the states there exactly those of
scoring the prefix alone. So reading the same features at that extra position of the one prefill
scores the message as it was when it was the latest, at the cost of a few copies (no extra forward).

The prefix property is checked per conversation against each prefix's own rendering (rendered
together for a batch, and remembered by digest: a thread's earlier prefixes were screened whole on
its earlier turns, so there the check is a comparison of token ids). Where it fails (a template that
rewrites earlier turns, e.g. one that strips reasoning or counts messages) that prefix is scored in
a prefill of its own, batched, before the screening prefill (the last forward leaves the model state
generation continues from). A masked detector (One-head Defense, fused) measures its angle by a
masked branch at the last position, so its prefixes always take their own prefill. Consecutive
user/tool messages share the read after the last of them; messages after the last assistant turn are
scored by the conversation's final read.

Cost: the extra reads are copies of the detector's features at a few positions and one more
``score_reads`` call; planning renders a batch's unseen prefixes once (O(turns x length) tokens, CPU).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ohd_guard.conversation import Conversation
from ohd_guard.rendering import encode_conversations
from ohd_guard.types import MessageScore, Scope

__all__ = ["Group", "PrefixIds", "TurnPlan", "attach", "decide", "message_scores", "plan_turns", "prepare",
           "read_positions"]


@dataclass
class Group:
    """User/tool messages scored by one read: at ``pos`` of the shared prefill (the last token of the
    next assistant turn's header, in the row's unpadded tokens), or on ``prefix`` in a prefill of its
    own (``pos`` None), or by the conversation's final read (``final``)."""

    messages: tuple[int, ...]
    final: bool = False
    pos: int | None = None
    prefix: Conversation | None = None


@dataclass
class TurnPlan:
    """One conversation's groups, in order; the last is the final read's."""

    groups: list[Group]

    @property
    def extra(self) -> list[Group]:
        """Groups read at an extra position of the shared prefill."""
        return [g for g in self.groups if g.pos is not None]

    @property
    def own(self) -> list[Group]:
        """Groups whose prefix needs a prefill of its own."""
        return [g for g in self.groups if g.prefix is not None]


def _groups(conv: Conversation) -> list[tuple[tuple[int, ...], int | None]]:
    """``(user/tool message indices, index of the assistant turn that closes them or None)``."""
    out: list[tuple[tuple[int, ...], int | None]] = []
    pending: list[int] = []
    for i, m in enumerate(conv.messages):
        if m.role == "user":
            pending.append(i)
        elif m.role == "assistant" and pending:
            out.append((tuple(pending), i))
            pending = []
    if pending:
        out.append((tuple(pending), None))
    elif out:  # the conversation ends on an assistant turn: its last group is the final read's
        out[-1] = (out[-1][0], None)
    return out


class PrefixIds:
    """Rendered ids (generation prompt included) of recently screened conversations and prefixes, by
    digest, least recently used dropped first. An agent thread's earlier prefixes were screened whole on
    its earlier turns, so checking the prefix property there costs no rendering or tokenising."""

    def __init__(self, size: int = 512):
        self.size = size
        self._ids: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str) -> np.ndarray | None:
        ids = self._ids.get(key)
        if ids is not None:
            self._ids.move_to_end(key)
        return ids

    def put(self, key: str, ids: np.ndarray) -> None:
        self._ids[key] = np.asarray(ids, dtype=np.int32)  # a 512-entry cache of 8k-token threads: 16 MB
        self._ids.move_to_end(key)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)


def _rows(inputs: dict[str, Any]) -> list[np.ndarray]:
    """Each row's own token ids (left padding dropped)."""
    ids = inputs["input_ids"].cpu().numpy()
    mask = inputs.get("attention_mask")
    if mask is None:
        return list(ids)
    real = mask.cpu().numpy().astype(bool)
    return [row[m] for row, m in zip(ids, real)]


def plan_turns(processor: Any, convs: Sequence[Conversation], rows: Sequence[np.ndarray], shared: bool = True,
               cache: PrefixIds | None = None) -> list[TurnPlan]:
    """Where each user/tool message of each conversation is read. ``rows``: the conversations' own
    rendered tokens (no padding); ``shared=False`` sends every earlier prefix to its own prefill (masked
    detectors). Prefixes not in ``cache`` are rendered together in one call."""
    cache = cache if cache is not None else PrefixIds()
    layout = [_groups(c) for c in convs]
    keys = []
    for c, row, groups in zip(convs, rows, layout):
        ends = [end for _, end in groups if end is not None]
        keys.append(c.prefix_digests([*ends, len(c.messages)]))
        cache.put(keys[-1][len(c.messages)], row)  # the next turn's earlier prefix
    fresh: dict[str, np.ndarray] = {}  # this batch's renderings, whatever the cache evicts meanwhile
    if shared:
        missing = {keys[b][end]: Conversation(messages=list(c.messages[:end]))
                   for b, (c, groups) in enumerate(zip(convs, layout)) for _, end in groups
                   if end is not None and cache.get(keys[b][end]) is None}
        if missing:
            for key, ids in zip(missing, _rows(encode_conversations(processor, list(missing.values())))):
                fresh[key] = ids
                cache.put(key, ids)
    plans = []
    for b, (c, row, groups) in enumerate(zip(convs, rows, layout)):
        out = []
        for msgs, end in groups:
            if end is None:
                out.append(Group(msgs, final=True))
                continue
            key = keys[b][end]
            own = (fresh.get(key) if key in fresh else cache.get(key)) if shared else None
            if own is not None and len(own) < len(row) and np.array_equal(row[: len(own)], own):
                out.append(Group(msgs, pos=len(own) - 1))
            else:
                out.append(Group(msgs, prefix=Conversation(messages=list(c.messages[:end]))))
        plans.append(TurnPlan(out))
    return plans


def read_positions(plans: Sequence[TurnPlan], attention_mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """[B, P] columns of the left-padded batch to read the extra groups at (P = the most any row has;
    shorter rows repeat their last column), or None when no row has an extra group."""
    P = max((len(p.extra) for p in plans), default=0)
    if P == 0:
        return None
    lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else [width] * len(plans)
    cols = [[width - int(n) + g.pos for g in p.extra] + [width - 1] * (P - len(p.extra))  # type: ignore[operator]
            for p, n in zip(plans, lengths)]
    return torch.tensor(cols, dtype=torch.long)


def message_scores(conv: Conversation, plan: TurnPlan, final: float, extra: Sequence[float],
                   own: Sequence[float | None], threshold: float) -> list[MessageScore]:
    """Every user/tool message's score: ``extra`` for the plan's extra groups in order, ``own`` for its
    own-prefill groups in order (None: skipped), ``final`` for the final group."""
    it_extra, it_own = iter(extra), iter(own)
    out = []
    for g in plan.groups:
        score: float | None
        if g.final:
            score, source = final, "final"
        elif g.pos is not None:
            score, source = float(next(it_extra)), "prefill"
        else:
            got = next(it_own)
            score, source = (None, "skipped") if got is None else (float(got), "own_prefill")
        for i in g.messages:
            out.append(MessageScore(index=i, role=conv.messages[i].role, score=score, source=source,  # type: ignore[arg-type]
                                    flagged=score is not None and score > threshold))
    return out


def prepare(stage: Any, convs: Sequence[Conversation], inputs: dict[str, Any]
            ) -> tuple[list[TurnPlan], list[float | None], torch.Tensor | None]:
    """For one batch of a :class:`~ohd_guard.screening.ConversationScreener`: each conversation's plan,
    the scores of the prefixes that need their own prefill (run here, before the screening prefill,
    whose model state generation continues from; None each under ``scope="latest"``, where they cannot
    change the verdict) and the extra columns to read in the screening prefill."""
    shared = stage.reads.masked is None  # a masked branch is measured at the last position only
    plans = plan_turns(stage.processor, convs, _rows(inputs), shared, stage.prefix_ids)
    prefixes = [g.prefix for p in plans for g in p.own]
    own: list[float | None] = [None] * len(prefixes)
    if stage.scope == "conversation" and prefixes:
        own = []
        for k in range(0, len(prefixes), stage.max_batch_size):
            part = prefixes[k : k + stage.max_batch_size]
            got, _, _ = stage.prefill(part, stage.reads, keep_cache=False)
            own += stage.finite(stage.detector.score_reads(got)[0], len(part), stage.detector.kind).tolist()
    return plans, own, read_positions(plans, inputs.get("attention_mask"), inputs["input_ids"].shape[1])


def attach(stage: Any, convs: Sequence[Conversation], plans: Sequence[TurnPlan], own: Sequence[float | None],
           at_reads: Any, scores: Any) -> list[list[MessageScore]]:
    """Every conversation's message scores, from the screening prefill's extra reads (``at_reads``: the
    detector scores them with its own ``score_reads``), the own prefills and the final scores."""
    P = max((len(p.extra) for p in plans), default=0)
    extra = None
    if at_reads is not None and P:
        raw = stage.detector.score_reads(at_reads)[0]
        extra = stage.finite(raw, len(plans) * P, stage.detector.kind).reshape(len(plans), P)
    it = iter(own)
    out = []
    for b, (c, p) in enumerate(zip(convs, plans)):
        mine = [next(it) for _ in p.own]
        row = extra[b, : len(p.extra)].tolist() if extra is not None else []
        out.append(message_scores(c, p, float(scores[b]), row, mine, stage.threshold))
    return out


def decide(scope: Scope, final: float, messages: Sequence[MessageScore]) -> tuple[float, MessageScore | None]:
    """The score a verdict is decided on and, when an earlier message gave it, that message:
    ``latest`` -> the final read; ``conversation`` -> the highest of the final read and every message."""
    if scope == "latest":
        return final, None
    earlier = [(m.score, m) for m in messages if m.score is not None and m.source != "final"]
    best = max(earlier, key=lambda sm: sm[0], default=None)
    if best is not None and best[0] > final:
        return best[0], best[1]
    return final, None
