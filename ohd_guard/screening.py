"""One screening prefill per batch, read by whichever detector the guard runs.

A detector declares what it needs from the prefill (:class:`Reads`): each listed head's output at
the last prompt token (SAHs), decoder-layer states there (HiddenDetect), the deflection angles of
masked branches (One-head Defense), or several of these (the fused detector). :class:`Screener`
runs the unmasked prefill the answer needs anyway, with hooks that copy exactly those reads, adds
the masked branch only when one is asked for, and returns the reads with the prefill (KV cache and
next-token logits) so a safe conversation is answered without a second prefill.

Capture hooks are scoped (:func:`~ohd_guard.hooks.scoped_hooks`) and live only around the unmasked
forward pass of this call: a masked replay or another caller's forward is never read.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from ohd_guard import hf_internals as hf
from ohd_guard.adapters import ArchitectureAdapter, get_adapter, model_device
from ohd_guard.conversation import ConversationLimits, to_conversation
from ohd_guard.datasets import LabelledPrompt
from ohd_guard.errors import InvalidInputError, ScreeningError
from ohd_guard.hooks import scoped_hooks
from ohd_guard.rendering import content_mask, encode_conversations, is_multimodal
from ohd_guard.scoring import DeflectionScorer, Prefill
from ohd_guard.types import GuardStats, HeadRef, MaskSpec, Scope, Verdict
from ohd_guard.verdict import Screened, typed_error

__all__ = [
    "ConversationScreener", "MaskedBranch", "PrefillDetector", "PrefillReads", "Reads", "Screener",
    "score_conversations", "union",
]

log = logging.getLogger("ohd_guard.guard")

_MESSAGES = "_messages"
"""Key under which :meth:`ConversationScreener.score` hands per-message scores to its verdict."""


@dataclass(frozen=True)
class MaskedBranch:
    """Angles to measure: column ``k`` masks the heads ``columns[k]`` together (One-head Defense)."""

    columns: tuple[tuple[HeadRef, ...], ...]
    spec: MaskSpec
    score_layer: int

    def __post_init__(self) -> None:
        if not self.columns or any(not c for c in self.columns):
            raise InvalidInputError("a masked branch needs at least one non-empty head set")


@dataclass(frozen=True)
class Reads:
    """What a detector needs from the screening prefill, at the last prompt token."""

    heads: tuple[HeadRef, ...] = ()
    """Heads whose output (their slice of the ``o_proj`` input) is read."""
    layers: tuple[int, ...] = ()
    """Decoder layers (0-based) whose output (the residual stream, before the final norm) is read."""
    pooled: tuple[int, ...] = ()
    """Decoder layers whose output is averaged over every prompt position (not only the last one):
    what a pooled probe reads, at no extra forward cost. Not combinable with a masked branch."""
    maxed: tuple[int, ...] = ()
    """Decoder layers whose output is max-pooled (per dimension) over every prompt position: a signal
    on one token survives a long context that an average would dilute."""
    content_pooled: tuple[int, ...] = ()
    """Like ``pooled``, over the positions of the user and tool-result messages' text only
    (:func:`~ohd_guard.rendering.content_mask`): not the operator's system prompt, tool definitions,
    assistant turns or template tokens."""
    content_maxed: tuple[int, ...] = ()
    """Like ``maxed``, over the same positions as ``content_pooled``."""
    masked: MaskedBranch | None = None

    @property
    def pools(self) -> tuple[int, ...]:
        """Every layer read pooled over positions (any span, mean or max)."""
        return tuple(dict.fromkeys((*self.pooled, *self.maxed, *self.content_pooled, *self.content_maxed)))

    @property
    def needs_content(self) -> bool:
        return bool(self.content_pooled or self.content_maxed)


@dataclass
class PrefillReads:
    """The reads of one batch: ``heads[h]`` is [B, head_dim], ``layers[i]`` is [B, hidden] (float32,
    on the model's device), ``angles`` is [B, K] in degrees (K = number of masked columns)."""

    heads: dict[HeadRef, torch.Tensor] = field(default_factory=dict)
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)
    """``pooled[i]`` is [B, hidden]: layer ``i``'s output averaged over each row's real (unpadded) positions."""
    maxed: dict[int, torch.Tensor] = field(default_factory=dict)
    """``maxed[i]`` is [B, hidden]: layer ``i``'s output, per dimension the maximum over real positions."""
    content_pooled: dict[int, torch.Tensor] = field(default_factory=dict)
    """Like ``pooled``, over the user and tool-result text positions only."""
    content_maxed: dict[int, torch.Tensor] = field(default_factory=dict)
    """Like ``maxed``, over the user and tool-result text positions only."""
    angles: np.ndarray | None = None
    at: PrefillReads | None = None
    """The same reads at the extra positions ``Screener.run(at=...)`` asked for, rows flattened to
    [B * P] (row ``b * P + k`` = row ``b``'s ``k``-th position; pooled reads over its positions up to
    there), so a detector scores them with its own ``score_reads`` (turn-aware screening)."""


class PrefillDetector(ABC):  # noqa: B024 (a protocol: a kind that cannot read a prefill leaves reads() unimplemented)
    """The screening protocol: what the guard runs. A bound detector reads the screening prefill and
    returns one score per row (higher = more unsafe); the guard flags ``score > threshold``.

    Every guard detector kind implements it (:class:`~ohd_guard.detectors.base.Detector`); a
    detector that cannot read a prefill (the self-refusal baseline generates) leaves it unimplemented.
    """

    kind: str = "detector"
    reads_prefill: bool = True
    """False for a detector that cannot read a prefill (the self-refusal baseline generates instead)."""

    @property
    def threshold(self) -> float:
        raise NotImplementedError

    def reads(self) -> Reads:
        """What this detector needs from the prefill (fixed once fitted)."""
        raise NotImplementedError(f"{type(self).__name__} does not read the screening prefill")

    def score_reads(self, reads: PrefillReads) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Scores [B] and, per row, JSON-able details for the verdict (e.g. the angle, top heads)."""
        raise NotImplementedError(f"{type(self).__name__} does not read the screening prefill")

    def risk(self, scores: np.ndarray) -> np.ndarray:
        """Graded risk in [0, 1] of each score (equal priors)."""
        raise NotImplementedError

    @property
    def verdict_heads(self) -> tuple[HeadRef, ...]:
        """Heads the verdict names: the masked heads of One-head Defense, the probe's heads of SAHs."""
        return ()

    @property
    def mask_positions(self) -> Literal["all", "last"] | None:
        m = self.reads().masked
        return m.spec.positions if m is not None else None

    def explain(self, score: float, flagged: bool, risk: float) -> str:
        heads = "+".join(map(str, self.verdict_heads[:4])) + ("+..." if len(self.verdict_heads) > 4 else "")
        at = f" at {heads}" if heads else ""
        return (f"{self.kind} score {score:.3f} {'>' if flagged else '<='} threshold {self.threshold:.3f}{at} "
                f"(risk {risk:.2f}): {'flagged as unsafe' if flagged else 'passed'}")  # fmt: skip


# -- feeding conversations -------------------------------------------------------------------------------------
def as_input(item: Any) -> Any:
    """What the screening path takes: a LabelledPrompt becomes one user turn (with its image), a
    labelled multi-turn conversation (``.label`` + ``.messages``) its message list; others pass."""
    if isinstance(item, LabelledPrompt):
        if item.image is None:
            return item.text
        return to_conversation(  # a labelled set's own image: trusted, local by nature
            [{"role": "user", "content": [{"type": "image", "image": item.image}, {"type": "text", "text": item.text}]}],
            allow_local_files=True,
        )
    msgs = getattr(item, "messages", None)
    if hasattr(item, "label") and isinstance(msgs, list):
        return msgs
    return item


def _approx_len(conv: Any) -> int:
    """Rough rendered length, only to batch similar lengths together (less padding)."""
    if isinstance(conv, str):
        return len(conv)
    if hasattr(conv, "text") and hasattr(conv, "num_images"):  # Conversation
        return len(conv.text) + 1000 * conv.num_images
    if isinstance(conv, list):
        n = 0
        for m in conv:
            c = m.get("content") if isinstance(m, dict) else m
            if isinstance(c, str):
                n += len(c)
            elif isinstance(c, list):
                n += sum(len(p.get("text", "")) if isinstance(p, dict) and p.get("type") == "text" else 1000 for p in c)
        return n
    return 0


def length_order(convs: Sequence[Any]) -> list[int]:
    """Indices of ``convs`` from shortest to longest (stable)."""
    return sorted(range(len(convs)), key=lambda i: _approx_len(convs[i]))


def batched(fn: Callable[[list[Any]], Any], items: Sequence[Any], batch_size: int) -> np.ndarray:
    """``fn`` on length-sorted batches of ``items`` (rendered with :func:`as_input`), rows back in input order.

    Sorting by length keeps left padding small, which matters on CPU where padded positions cost as
    much as real ones.
    """
    if not len(items):
        raise InvalidInputError("no conversations to score")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    convs = [as_input(x) for x in items]
    order = length_order(convs)
    parts = [np.asarray(fn([convs[i] for i in order[s : s + batch_size]])) for s in range(0, len(order), batch_size)]
    out = np.concatenate(parts, axis=0)
    result = np.empty_like(out)
    result[np.asarray(order)] = out
    return result



class Screener:
    """Runs one screening prefill for a :class:`Reads` request on one model."""

    def __init__(self, model: torch.nn.Module, adapter: ArchitectureAdapter | None = None):
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self._scorers: dict[tuple, DeflectionScorer] = {}

    def scorer(self, branch: MaskedBranch) -> DeflectionScorer:
        key = (branch.spec, branch.score_layer)
        if key not in self._scorers:
            self._scorers[key] = DeflectionScorer(self.model, spec=branch.spec, score_layer=branch.score_layer,
                                                  adapter=self.adapter)  # fmt: skip
        return self._scorers[key]

    def check(self, reads: Reads) -> None:
        """Raise InvalidInputError for reads this model cannot serve (checked once, at binding)."""
        a = self.adapter
        for h in reads.heads:
            if not (0 <= h.layer < a.num_layers and 0 <= h.head < a.num_heads):
                raise InvalidInputError(f"head {h} does not exist: the model has {a.num_layers} layers x {a.num_heads} heads")
        for i in (*reads.layers, *reads.pools):
            if not 0 <= i < a.num_layers:
                raise InvalidInputError(f"layer {i} does not exist: the model has {a.num_layers} layers")
        if reads.pools and reads.masked is not None:
            raise InvalidInputError("pooled reads cannot share a prefill with a masked branch")
        if reads.masked is not None:
            self.scorer(reads.masked)  # validates the score layer

    @contextmanager
    def _observe(self, reads: Reads, out: PrefillReads, pos: int, mask: torch.Tensor | None = None,
                 at: torch.Tensor | None = None, content: torch.Tensor | None = None) -> Iterator[None]:
        """Copy the requested reads at sequence position ``pos`` (the last prompt token), and the pooled
        layers' means over the positions ``mask`` [B, T] marks, during the forward pass inside the
        block; the first write wins, so a replay could never overwrite it. ``at`` [B, P]: also copy
        them at these columns into ``out.at``. ``content`` [B, T]: the positions content-pooled reads
        pool over (:func:`~ohd_guard.rendering.content_mask`)."""
        if at is not None:
            out.at = PrefillReads()
        extra = out.at
        a = self.adapter
        H, d = a.num_heads, a.head_dim
        by_layer: dict[int, list[HeadRef]] = {}
        for h in reads.heads:
            by_layer.setdefault(h.layer, []).append(h)
        with scoped_hooks() as hooks:
            for layer, heads in by_layer.items():

                def pre(module, args, heads=heads) -> None:
                    x = args[0][:, pos, : H * d].float().unflatten(-1, (H, d))
                    for h in heads:
                        out.heads.setdefault(h, x[:, h.head].clone())
                    if extra is not None:
                        y = _gather(args[0][..., : H * d], at).float().unflatten(-1, (H, d))  # [B*P, H, d]
                        for h in heads:
                            extra.heads.setdefault(h, y[:, h.head].clone())

                hooks.forward_pre_hook(a.output_projection(layer), pre)
            for layer in reads.layers:

                def post(module, args, output, layer=layer) -> None:
                    x = output[0] if isinstance(output, (tuple, list)) else output
                    out.layers.setdefault(layer, x[:, pos].float().clone())
                    if extra is not None:
                        extra.layers.setdefault(layer, _gather(x, at).float())

                hooks.forward_hook(a.layers[layer], post)
            # (field prefix, positions pooled over): every real prompt position, or the user/tool text only
            spans = (("", mask), ("content_", content))
            if reads.needs_content and content is None:
                raise ScreeningError("content-pooled reads need the content mask of the batch (none was given)")
            for layer in reads.pools:

                def pool(module, args, output, layer=layer) -> None:
                    x = (output[0] if isinstance(output, (tuple, list)) else output).float()  # [B, T, D]
                    for prefix, span in spans:
                        want_mean = layer in getattr(reads, prefix + "pooled")
                        want_max = layer in getattr(reads, prefix + "maxed")
                        if not (want_mean or want_max):
                            continue
                        m = torch.ones(x.shape[:2], device=x.device) if span is None else span.to(x.device, x.dtype)
                        m = m[:, -x.shape[1] :, None]  # [B, T, 1]: 1 on the positions pooled over, 0 on padding
                        if want_mean:
                            getattr(out, prefix + "pooled").setdefault(layer, (x * m).sum(1) / m.sum(1).clamp_min(1.0))
                            if extra is not None:  # the mean over each prefix
                                getattr(extra, prefix + "pooled").setdefault(
                                    layer, _gather((x * m).cumsum(1), at) / _gather(m.cumsum(1), at).clamp_min(1.0))
                        if want_max:
                            masked_x = x.masked_fill(m == 0, float("-inf"))
                            getattr(out, prefix + "maxed").setdefault(layer, masked_x.amax(1))
                            if extra is not None:
                                getattr(extra, prefix + "maxed").setdefault(layer, _gather(masked_x.cummax(1).values, at))

                hooks.forward_hook(a.layers[layer], pool)
            yield

    @torch.no_grad()
    def run(self, inputs: dict[str, Any], reads: Reads, keep_cache: bool,
            at: torch.Tensor | None = None, content: torch.Tensor | None = None) -> tuple[PrefillReads, Prefill]:
        """The reads of one batch and its unmasked prefill (KV cache when ``keep_cache``, next-token logits);
        ``at`` [B, P]: the reads at these extra columns too (``got.at``; not with a masked branch);
        ``content`` [B, T]: the positions content-pooled reads pool over."""
        got = PrefillReads()
        branch = reads.masked
        if at is not None and branch is not None:
            raise InvalidInputError("extra read positions cannot share a prefill with a masked branch")
        if branch is None:
            with self._observe(reads, got, -1, inputs.get("attention_mask"), at, content):
                out = self.model(**inputs, use_cache=keep_cache, logits_to_keep=1)
            B = inputs["input_ids"].shape[0]
            pre = Prefill(inputs, torch.empty(B, 0), cache=hf.output_cache(out) if keep_cache else None,
                          next_token_logits=out.logits[:, -1])  # fmt: skip
        else:
            angles, pre = self.scorer(branch).screen_columns(
                inputs, branch.columns, keep_cache=keep_cache, observe=lambda pos: self._observe(reads, got, pos)
            )
            got.angles = angles
        missing = [str(h) for h in reads.heads if h not in got.heads] + [f"layer {i}" for i in reads.layers if i not in got.layers]
        missing += [f"pooled layer {i}" for i in reads.pooled if i not in got.pooled]
        missing += [f"max-pooled layer {i}" for i in reads.maxed if i not in got.maxed]
        missing += [f"content-pooled layer {i}" for i in reads.content_pooled if i not in got.content_pooled]
        missing += [f"content-max-pooled layer {i}" for i in reads.content_maxed if i not in got.content_maxed]
        if missing:
            raise ScreeningError(f"the prefill never reached {', '.join(missing)} (hooks did not fire)")
        return got, pre


def _gather(x: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` [B, T, ...] at columns ``at`` [B, P], flattened to [B * P, ...]."""
    assert at is not None  # only called when extra positions were asked for
    idx = at.to(x.device)
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(idx)
    return x[rows, idx].flatten(0, 1)


def union(*requests: Reads) -> Reads:
    """One request serving several (for a fused detector); at most one masked branch."""
    branches = list(dict.fromkeys(r.masked for r in requests if r.masked is not None))
    if len(branches) > 1:
        raise InvalidInputError("only one masked branch per prefill (the detectors mask different heads)")
    heads = tuple(dict.fromkeys(h for r in requests for h in r.heads))
    layers = tuple(dict.fromkeys(i for r in requests for i in r.layers))
    pooled = tuple(dict.fromkeys(i for r in requests for i in r.pooled))
    maxed = tuple(dict.fromkeys(i for r in requests for i in r.maxed))
    c_pooled = tuple(dict.fromkeys(i for r in requests for i in r.content_pooled))
    c_maxed = tuple(dict.fromkeys(i for r in requests for i in r.content_maxed))
    if (pooled or maxed or c_pooled or c_maxed) and branches:
        raise InvalidInputError("pooled reads cannot share a prefill with a masked branch (it splits the prompt pass)")
    return Reads(heads=heads, layers=layers, pooled=pooled, maxed=maxed, content_pooled=c_pooled, content_maxed=c_maxed,
                 masked=branches[0] if branches else None)


# ------------------------------------------------------------------------- screening conversations
class ConversationScreener:
    """The guard's screening stage: raw conversations in, :class:`~ohd_guard.verdict.Screened` out.

    Converts and checks each conversation (limits, local files, images on a text-only model, prompt
    length), screens them in batched prefills with one detector, and applies the error policy.
    Without a detector it only converts and prefills (:meth:`prefill`: reading features to fit one).
    Callers hold the guard's lock. Verdicts are published through ``emit``; the counters it keeps are
    :attr:`stats`.
    """

    reads_turns: bool = True
    """Score every user/tool message where the model answered it (:mod:`~ohd_guard.turns`); False for a
    stage whose detector reads another position (the output check reads the answer's last token)."""

    def __init__(
        self, model: torch.nn.Module, processor: Any, detector: PrefillDetector | None, *, on_error: str = "raise",
        limits: ConversationLimits | None = None, fetcher: Any = None, base_dir: Any = None,
        allow_local_files: bool = False, max_prompt_tokens: int | None = None, max_batch_size: int = 8,
        emit: Callable[[Any], None] = lambda verdict: None, scope: Scope = "conversation",
    ):
        if scope not in ("conversation", "latest"):
            raise InvalidInputError(f"scope must be 'conversation' or 'latest', not {scope!r}")
        self.scope: Scope = scope
        """Which reads decide (:data:`~ohd_guard.types.Scope`); every user/tool message is scored either way."""
        from ohd_guard.turns import PrefixIds

        self.prefix_ids = PrefixIds()

        self.model, self.processor = model, processor
        # None only for the fitting reader (it reads features and never scores, so never reaches self.detector).
        self.detector: PrefillDetector = detector  # type: ignore[assignment]
        self.on_error, self.limits, self.fetcher, self.base_dir = on_error, limits or ConversationLimits(), fetcher, base_dir
        self.allow_local_files, self.max_batch_size, self.emit = allow_local_files, max_batch_size, emit
        self.screener = Screener(model)
        self.reads = detector.reads() if detector is not None else Reads()
        self.screener.check(self.reads)
        self.heads: tuple[HeadRef, ...] = tuple(detector.verdict_heads) if detector is not None else ()
        self.mode = detector.mask_positions if detector is not None else None  # fixed once fitted
        ctx = getattr(self.screener.adapter.text_config, "max_position_embeddings", None)
        self.max_prompt_tokens = max_prompt_tokens or (int(ctx) if ctx else None)
        self._multimodal = is_multimodal(processor)
        # Qwen-VL keeps multimodal rope offsets on the model between calls; a stale one from another
        # batch would shift the positions of a continued generation, so it is reset before a prefill.
        self._rope_state = hf.rope_state_modules(model)
        self.stats = GuardStats()
        self._stats_lock = threading.Lock()

    @property
    def threshold(self) -> float:
        return float(self.detector.threshold)

    def encode(self, conversations: list[Any]) -> dict[str, Any]:
        return encode_conversations(self.processor, conversations, device=model_device(self.model))

    def convert(self, raw: Any) -> Any:
        conv = to_conversation(raw, limits=self.limits, fetcher=self.fetcher, base_dir=self.base_dir,
                               allow_local_files=self.allow_local_files)  # fmt: skip
        if not self._multimodal and conv.num_images:
            conv.to_text_chat_messages()  # raises InvalidInputError: a text-only model cannot see images
        return conv

    def score(self, convs: list[Any], keep_cache: bool) -> tuple[np.ndarray, list[dict], Prefill, dict[str, Any]]:
        """Scores, per-row details, the prefill and the rendered inputs of one batch. Every user/tool
        message is scored too (:mod:`~ohd_guard.turns`); its scores travel to :meth:`verdict` in the
        row's details under ``_MESSAGES`` (popped there)."""
        from ohd_guard import turns

        inputs = self.encode(convs)
        self._check_length(inputs)
        plans, own, at = turns.prepare(self, convs, inputs) if self.reads_turns else (None, [], None)
        reads, pre, inputs = self.prefill(convs, self.reads, keep_cache, inputs=inputs, at=at)  # own ones ran first
        scores, details = self.detector.score_reads(reads)
        scores = self.finite(scores, len(convs), self.detector.kind)
        messages = turns.attach(self, convs, plans, own, reads.at, scores) if plans is not None else [[]] * len(convs)
        return scores, [{**d, _MESSAGES: m} for d, m in zip(details, messages)], pre, inputs

    @staticmethod
    def finite(scores: Any, n: int, kind: str) -> np.ndarray:
        scores = np.asarray(scores, dtype=float)
        if scores.shape != (n,) or not np.all(np.isfinite(scores)):
            raise ScreeningError(f"the {kind} score is not finite (NaN or infinite hidden states)")
        return scores

    def prefill(self, convs: list[Any], reads: Reads, keep_cache: bool, inputs: dict[str, Any] | None = None,
                at: torch.Tensor | None = None) -> tuple[PrefillReads, Prefill, dict[str, Any]]:
        """The reads, the prefill and the rendered inputs (``inputs`` when already rendered) of one batch
        of converted conversations; ``at``: extra read columns (:meth:`Screener.run`)."""
        inputs = inputs if inputs is not None else self.encode(convs)
        self._check_length(inputs)
        content = content_mask(self.processor, convs, inputs) if reads.needs_content else None
        hf.reset_rope_state(self._rope_state)
        got, pre = self.screener.run(inputs, reads, keep_cache=keep_cache, at=at, content=content)
        return got, pre, inputs

    def _check_length(self, inputs: dict[str, Any]) -> None:
        if self.max_prompt_tokens is not None:
            mask = inputs.get("attention_mask")
            ids = inputs["input_ids"]
            lengths = mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
            if int(lengths.max()) > self.max_prompt_tokens:
                raise InvalidInputError(
                    f"prompt too long: {int(lengths.max())} tokens rendered, over the model's context window "
                    f"of {self.max_prompt_tokens} tokens (max_prompt_tokens)"
                )

    def verdict(self, score: float, detail: dict, t0: float, conv: Any, batch: int) -> Verdict:
        from ohd_guard.turns import decide

        detail = dict(detail)
        messages = detail.pop(_MESSAGES, [])
        score, by = decide(self.scope, score, messages)
        flagged = score > self.threshold
        risk = float(self.detector.risk(np.array([score]))[0])
        if self.mode is not None:
            detail = {**detail, "mode": self.mode}
        reason = self.detector.explain(score, flagged, risk)
        if by is not None:
            reason += f" (read at message {by.index}, {by.role}, where the model answered it)"
        return Verdict(
            flagged=flagged, threshold=self.threshold, risk=risk, heads=self.heads,
            latency_ms=(time.perf_counter() - t0) * 1e3, reason=reason, conversation_digest=conv.digest(),
            batch_size=batch, detector=self.detector.kind, score=float(score), details=detail, messages=messages,
        )

    def failed(self, exc: BaseException, t0: float, conv: Any) -> Screened:
        # "allow" covers internal faults only: an input the guard could not screen because of the
        # input itself (too long, bad image, ...) is never answered, or padding would bypass the guard
        allow = self.on_error == "allow" and not isinstance(exc, InvalidInputError)
        what = "input rejected" if isinstance(exc, InvalidInputError) else "screening failed"
        verdict = Verdict(
            flagged=not allow, score=None, threshold=self.threshold, risk=None, heads=self.heads,
            details={"mode": self.mode} if self.mode is not None else {}, detector=self.detector.kind, latency_ms=(time.perf_counter() - t0) * 1e3,
            reason=f"{what} ({type(exc).__name__}); "
            + ("passed unscreened because on_error='allow'" if allow else "treated as unsafe (fail closed)"),
            error=f"{type(exc).__name__}: {exc}", conversation_digest=conv.digest() if conv is not None else None,
        )
        return Screened(verdict, conversation=conv, exc=exc)

    def screen_many(self, raws: list[Any], t0s: list[float], keep_cache: bool = False) -> list[Any]:
        """Screen conversations in batches of ``max_batch_size``; a batch that fails is retried one by
        one, so a bad or unlucky request never takes its batch-mates down with it."""
        out: list[Any] = [None] * len(raws)
        convs: dict[int, Any] = {}
        for i, raw in enumerate(raws):
            try:
                convs[i] = self.convert(raw)
            except Exception as e:
                out[i] = self.failed(e, t0s[i], None)
        ids = list(convs)
        todo = deque(ids[k : k + self.max_batch_size] for k in range(0, len(ids), self.max_batch_size))
        while todo:
            chunk = todo.popleft()
            try:
                scores, details, pre, inputs = self.score([convs[i] for i in chunk], keep_cache)
            except Exception as e:
                if len(chunk) > 1:
                    todo.extendleft([i] for i in reversed(chunk))
                else:
                    out[chunk[0]] = self.failed(e, t0s[chunk[0]], convs[chunk[0]])
                continue
            self._count_batch(len(chunk))
            for j, i in enumerate(chunk):  # every row keeps the batch's prefill (KV cache) and its row in it
                out[i] = Screened(self.verdict(float(scores[j]), details[j], t0s[i], convs[i], len(chunk)), convs[i],
                                  inputs, pre if keep_cache else None, row=j)  # fmt: skip
        return out

    def settle(self, s: Screened) -> Verdict:
        """Publish the verdict, then apply ``on_error='raise'``."""
        self.emit(s.verdict)
        if s.exc is not None and self.on_error == "raise":
            raise typed_error(s.exc)
        if s.exc is not None and not s.verdict.flagged:
            with self._stats_lock:
                self.stats = self.stats.model_copy(update={"failed_open": self.stats.failed_open + 1})
            log.warning("screening failed and on_error='allow' lets the input through unscreened: %s", s.verdict.error)
        return s.verdict

    def settle_all(self, results: list[Screened]) -> list[Verdict]:
        """:meth:`settle` every result, so every verdict is published; then raise the first error."""
        verdicts: list[Verdict] = []
        first: BaseException | None = None
        for s in results:
            try:
                verdicts.append(self.settle(s))
            except Exception as e:
                first = first or e
        if first is not None:
            raise first
        return verdicts

    def text_flagged(self, text: str) -> bool:
        """Whether the detector flags ``text`` read as a user turn (an error counts as flagged)."""
        try:
            scores, _, _, _ = self.score([self.convert(text)], keep_cache=False)
            return bool(scores[0] > self.threshold)
        except Exception:
            return True

    def _count_batch(self, n: int) -> None:
        with self._stats_lock:
            s = self.stats
            self.stats = s.model_copy(update={"screened": s.screened + n, "batches": s.batches + 1,
                                              "largest_batch": max(s.largest_batch, n)})  # fmt: skip


def score_conversations(detectors: Sequence[PrefillDetector], items: Sequence[Any], batch_size: int = 8) -> np.ndarray:
    """[N, D] scores of bound detectors on one model, read from ONE screening prefill per batch.

    Exactly the guard's path (conversion, limits, rendering, capture, finite-score check), so each
    column equals what a guard running that detector alone computes, at the cost of one prefill for
    all of them. Calibration sets' own local images are trusted here (``allow_local_files``). Errors
    are raised typed (:class:`InvalidInputError` for bad input, :class:`ScreeningError` otherwise).
    """
    if not detectors:
        raise InvalidInputError("no detectors to score with")
    d0: Any = detectors[0]  # bound detectors carry model, processor (and _stage), not declared on the protocol
    if any(d.model is not d0.model for d in detectors):  # type: ignore[attr-defined]
        raise InvalidInputError("joint scoring needs detectors bound to one model")
    stage = getattr(d0, "_stage", None) if len(detectors) == 1 else None
    if stage is None:
        stage = ConversationScreener(d0.model, d0.processor, d0, allow_local_files=True, max_batch_size=batch_size)
        if len(detectors) == 1:
            d0._stage = stage
    reads = union(*(d.reads() for d in detectors))
    stage.screener.check(reads)

    def batch(raws: list[Any]) -> np.ndarray:
        try:
            got, _, _ = stage.prefill([stage.convert(r) for r in raws], reads, keep_cache=False)
            cols = [stage.finite(d.score_reads(got)[0], len(raws), d.kind) for d in detectors]
        except Exception as e:
            raise typed_error(e) from e
        return np.stack(cols, axis=1)

    return batched(batch, list(items), batch_size)  # batched renders each item with as_input
