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

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from ohd_guard import hf_internals as hf
from ohd_guard.adapters import ArchitectureAdapter, get_adapter
from ohd_guard.errors import InvalidInputError, ScreeningError
from ohd_guard.hooks import scoped_hooks
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.scoring import DeflectionScorer, Prefill

__all__ = ["MaskedBranch", "PrefillDetector", "PrefillReads", "Reads", "Screener"]


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
    masked: MaskedBranch | None = None


@dataclass
class PrefillReads:
    """The reads of one batch: ``heads[h]`` is [B, head_dim], ``layers[i]`` is [B, hidden] (float32,
    on the model's device), ``angles`` is [B, K] in degrees (K = number of masked columns)."""

    heads: dict[HeadRef, torch.Tensor] = field(default_factory=dict)
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    angles: np.ndarray | None = None


class PrefillDetector(ABC):
    """A detector the guard can run: it reads the screening prefill and returns one score per row
    (higher = more unsafe); the guard flags ``score > threshold``."""

    kind: str = "detector"

    @property
    @abstractmethod
    def threshold(self) -> float: ...

    @abstractmethod
    def reads(self) -> Reads:
        """What this detector needs from the prefill (fixed once fitted)."""

    @abstractmethod
    def score_reads(self, reads: PrefillReads) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Scores [B] and, per row, JSON-able details for the verdict (e.g. the angle, top heads)."""

    @abstractmethod
    def risk(self, scores: np.ndarray) -> np.ndarray:
        """Graded risk in [0, 1] of each score (equal priors)."""

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
        for i in reads.layers:
            if not 0 <= i < a.num_layers:
                raise InvalidInputError(f"layer {i} does not exist: the model has {a.num_layers} layers")
        if reads.masked is not None:
            self.scorer(reads.masked)  # validates the score layer

    @contextmanager
    def _observe(self, reads: Reads, out: PrefillReads, pos: int) -> Iterator[None]:
        """Copy the requested reads at sequence position ``pos`` (the last prompt token) during the
        forward pass inside the block; the first write wins, so a replay could never overwrite it."""
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

                hooks.forward_pre_hook(a.output_projection(layer), pre)
            for layer in reads.layers:

                def post(module, args, output, layer=layer) -> None:
                    x = output[0] if isinstance(output, (tuple, list)) else output
                    out.layers.setdefault(layer, x[:, pos].float().clone())

                hooks.forward_hook(a.layers[layer], post)
            yield

    @torch.no_grad()
    def run(self, inputs: dict[str, Any], reads: Reads, keep_cache: bool) -> tuple[PrefillReads, Prefill]:
        """The reads of one batch and its unmasked prefill (KV cache when ``keep_cache``, next-token logits)."""
        got = PrefillReads()
        branch = reads.masked
        if branch is None:
            with self._observe(reads, got, -1):
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
        if missing:
            raise ScreeningError(f"the prefill never reached {', '.join(missing)} (hooks did not fire)")
        return got, pre


def union(*requests: Reads) -> Reads:
    """One request serving several (for a fused detector); at most one masked branch."""
    branches = [r.masked for r in requests if r.masked is not None]
    if len(branches) > 1:
        raise InvalidInputError("only one masked branch per prefill")
    heads = tuple(dict.fromkeys(h for r in requests for h in r.heads))
    layers = tuple(dict.fromkeys(i for r in requests for i in r.layers))
    return Reads(heads=heads, layers=layers, masked=branches[0] if branches else None)


def columns_of(heads: Sequence[HeadRef] | Sequence[Sequence[HeadRef]]) -> tuple[tuple[HeadRef, ...], ...]:
    return tuple((h,) if isinstance(h, HeadRef) else tuple(h) for h in heads)
