"""Turn-aware screening: one score per user/tool message, read from the conversation's one prefill.

A detector reads the last prompt position, right after the generation prompt (``<|im_start|>assistant\\n``).
For a user/tool message followed by an assistant turn, the rendered conversation up to and including
that assistant turn's header is, token for token, the rendering of the conversation prefix ending with
the message (``add_generation_prompt=True``); causal attention makes the states there exactly those of
scoring the prefix alone. So reading the same features at that extra position of the one prefill
scores the message as it was when it was the latest, at the cost of a few copies (no extra forward).

The prefix property is checked per conversation by tokenising each prefix (a CPU render per assistant
turn); where it fails (a template that rewrites earlier turns, e.g. one that strips reasoning or counts
messages) that prefix is scored in a prefill of its own, batched. A masked detector (One-head Defense,
fused) measures its angle by a masked branch at the last position, so its prefixes always take their
own prefill. Consecutive user/tool messages share the read after the last of them; messages after the
last assistant turn are scored by the conversation's final read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ohd_guard.conversation import Conversation
from ohd_guard.rendering import encode_conversations
from ohd_guard.types import MessageScore, Scope

__all__ = ["Group", "TurnPlan", "attach", "decide", "message_scores", "plan_turns", "prepare", "read_positions"]


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


def plan_turns(processor: Any, conv: Conversation, row_ids: Sequence[int], shared: bool = True) -> TurnPlan:
    """Where each user/tool message of ``conv`` is read. ``row_ids``: the conversation's own rendered
    tokens (no padding); ``shared=False`` sends every earlier prefix to its own prefill (masked detectors)."""
    groups = []
    ids = list(row_ids)
    for msgs, end in _groups(conv):
        if end is None:
            groups.append(Group(msgs, final=True))
            continue
        prefix = Conversation(messages=list(conv.messages[:end]))
        if shared:
            own = encode_conversations(processor, [prefix])["input_ids"][0].tolist()
            if len(own) < len(ids) and ids[: len(own)] == own:
                groups.append(Group(msgs, pos=len(own) - 1))
                continue
        groups.append(Group(msgs, prefix=prefix))
    return TurnPlan(groups)


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
    mask = inputs.get("attention_mask")
    real = mask.cpu().bool() if mask is not None else None  # left padding excluded
    shared = stage.reads.masked is None  # a masked branch is measured at the last position only
    plans = [plan_turns(stage.processor, c, ids[real[b]] if real is not None else ids, shared)
             for b, (c, ids) in enumerate(zip(convs, inputs["input_ids"].cpu()))]
    prefixes = [g.prefix for p in plans for g in p.own]
    own: list[float | None] = [None] * len(prefixes)
    if stage.scope == "conversation" and prefixes:
        own = []
        for k in range(0, len(prefixes), stage.max_batch_size):
            part = prefixes[k : k + stage.max_batch_size]
            got, _, _ = stage.prefill(part, stage.reads, keep_cache=False)
            own += stage.finite(stage.detector.score_reads(got)[0], len(part), stage.detector.kind).tolist()
    return plans, own, read_positions(plans, mask, inputs["input_ids"].shape[1])


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
