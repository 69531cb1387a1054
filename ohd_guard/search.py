"""Head search: which single head's mask separates unsafe from safe prompts best.

The paper's selectivity rule: score every head by its mean angle on unsafe and on safe prompts;
keep heads whose safe angle is below the ``percentile``-th percentile of safe angles over all heads
(heads that move *every* prompt react to surface form, not safety); rank the kept heads by
``unsafe - safe``. The two-stage search ranks all heads with the fast (last-position, KV-cached)
score, then re-scores the best ``top_k`` with the requested (e.g. paper-exact) mask.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from ohd_guard.errors import CalibrationError
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.metrics import auroc
from ohd_guard.profile import HeadStats
from ohd_guard.scoring import DeflectionScorer, all_heads

Strategy = Literal["two-stage", "exact", "fast"]
RankBy = Literal["gap", "auroc"]


@dataclass
class HeadScores:
    """Angles of every scored head on the unsafe and safe calibration prompts, at one score layer."""

    heads: list[HeadRef]
    unsafe: np.ndarray  # [N_unsafe, K] degrees
    safe: np.ndarray  # [N_safe, K] degrees
    spec: MaskSpec
    score_layer: int | None = None

    def stats(
        self, percentile: float = 80.0, eligible: np.ndarray | None = None, rank_by: RankBy = "gap"
    ) -> list[HeadStats]:
        """Per-head statistics, selective heads first, each group ranked by ``rank_by``.

        ``gap`` (the paper): unsafe minus safe mean angle. ``auroc``: how well the head's angle
        separates the two sets prompt by prompt, which a few extreme prompts cannot inflate.
        """
        u, s = self.unsafe.mean(0), self.safe.mean(0)
        if eligible is None:
            eligible = s <= np.percentile(s, percentile)
        labels = np.r_[np.ones(len(self.unsafe)), np.zeros(len(self.safe))]
        rows = [
            HeadStats(
                head=h, unsafe_mean=float(u[k]), safe_mean=float(s[k]), gap=float(u[k] - s[k]),
                auroc=auroc(np.r_[self.unsafe[:, k], self.safe[:, k]], labels), eligible=bool(eligible[k]),
            )
            for k, h in enumerate(self.heads)
        ]
        return sorted(rows, key=lambda r: (not r.eligible, -(r.gap if rank_by == "gap" else r.auroc)))


@dataclass
class SearchResult:
    ranking: list[HeadStats]  # best first
    scores: HeadScores  # angles under the final mask spec (top_k heads in a two-stage search)
    first_stage: HeadScores | None = None
    strategy: str = ""
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    layer_scores: dict[int, float] = field(default_factory=dict)
    """With several candidate score layers: the AUROC of each layer's best head (first stage)."""

    @property
    def score_layer(self) -> int:
        assert self.scores.score_layer is not None
        return self.scores.score_layer

    @property
    def best(self) -> HeadRef:
        if not self.ranking or not self.ranking[0].eligible:
            raise CalibrationError("no head passed the selectivity rule")
        return self.ranking[0].head


def score_heads(
    scorer: DeflectionScorer,
    unsafe: Sequence[Any],
    safe: Sequence[Any],
    heads: Sequence[HeadRef],
    batch_size: int = 8,
    progress: bool = False,
    score_layers: Sequence[int] | None = None,
) -> list[HeadScores]:
    """Angles of ``heads`` at each score layer (default: the scorer's), one replay per prompt batch.

    At a score layer ``k`` only heads below it are kept: a higher head cannot move it, and its zero
    angles would distort the selectivity percentile.
    """
    if len(unsafe) < 2 or len(safe) < 2:
        raise CalibrationError(f"need at least 2 unsafe and 2 safe prompts, got {len(unsafe)} and {len(safe)}")
    sites = list(score_layers) if score_layers else [scorer.score_layer]
    u = scorer.angles(list(unsafe), heads, batch_size=batch_size, progress=progress, sites=sites)
    s = scorer.angles(list(safe), heads, batch_size=batch_size, progress=progress, sites=sites)
    out = []
    for j, site in enumerate(sites):
        keep = [k for k, h in enumerate(heads) if h.layer < site]
        if keep:
            out.append(HeadScores([heads[k] for k in keep], u[:, keep, j], s[:, keep, j], scorer.spec, site))
    if not out:
        raise CalibrationError("no candidate head lies below any candidate score layer")
    return out


def _best_layer(per_layer: list[HeadScores], percentile: float, rank_by: RankBy) -> tuple[HeadScores, list[HeadStats], dict[int, float]]:
    """The score layer whose best selective head separates the sets best (AUROC: comparable across
    layers, unlike raw angle gaps), with that layer's ranking."""
    best, table = None, {}
    for sc in per_layer:
        ranking = sc.stats(percentile, rank_by=rank_by)
        top = next((r for r in ranking if r.eligible), ranking[0])
        table[sc.score_layer] = top.auroc
        if best is None or top.auroc > best[2]:
            best = (sc, ranking, top.auroc)
    assert best is not None
    return best[0], best[1], table  # type: ignore[return-value]  # score layers are set once scored


def search_heads(
    model,
    processor,
    unsafe: Sequence[Any],
    safe: Sequence[Any],
    *,
    spec: MaskSpec = MaskSpec(),
    score_layer: int | None = None,
    score_layers: Sequence[int] | None = None,
    strategy: Strategy = "two-stage",
    top_k: int = 8,
    percentile: float = 80.0,
    heads: Sequence[HeadRef] | None = None,
    rank_by: RankBy = "auroc",
    batch_size: int = 8,
    progress: bool = False,
) -> SearchResult:
    """Rank heads by the selectivity rule; ``result.best`` is the head to use.

    ``score_layers`` searches the score layer too (``result.score_layer``): every candidate layer
    is read from the same replays, so this costs about as much as the highest layer alone. The
    layer is chosen by its best selective head's AUROC (in the first stage of a two-stage search).
    """
    t0 = time.perf_counter()
    if score_layers:
        if score_layer is not None:
            raise CalibrationError("give score_layer or score_layers, not both")
        sites = sorted({int(x) for x in score_layers})
        final = DeflectionScorer(model, processor, spec=spec, score_layer=max(sites))
    else:
        final = DeflectionScorer(model, processor, spec=spec, score_layer=score_layer)
        sites = [final.score_layer]
    candidates = list(heads) if heads is not None else all_heads(final.adapter, below_layer=final.score_layer)
    timings: dict[str, float] = {}
    if strategy == "exact" or (strategy == "two-stage" and spec.positions == "last"):
        scores, ranking, table = _best_layer(score_heads(final, unsafe, safe, candidates, batch_size, progress, sites),
                                             percentile, rank_by)
        result = SearchResult(ranking, scores, strategy=strategy)
    else:
        fast_spec = spec.model_copy(update={"positions": "last"})
        fast = DeflectionScorer(model, processor, spec=fast_spec, score_layer=final.score_layer, adapter=final.adapter)
        first, ranked, table = _best_layer(score_heads(fast, unsafe, safe, candidates, batch_size, progress, sites),
                                           percentile, rank_by)
        timings["rank_all_fast"] = time.perf_counter() - t0
        if strategy == "fast":
            result = SearchResult(ranked, first, first, strategy=strategy)
        else:
            top = [r.head for r in ranked if r.eligible][:top_k] or [r.head for r in ranked[:top_k]]
            t1 = time.perf_counter()
            exact = DeflectionScorer(model, processor, spec=spec, score_layer=first.score_layer, adapter=final.adapter)
            (scores,) = score_heads(exact, unsafe, safe, top, batch_size, progress)
            timings["rescore_top_exact"] = time.perf_counter() - t1
            eligible = np.array([next(r.eligible for r in ranked if r.head == h) for h in top])
            result = SearchResult(scores.stats(percentile, eligible, rank_by), scores, first, strategy=strategy)
    result.seconds = time.perf_counter() - t0
    result.timings = timings
    result.layer_scores = table if len(sites) > 1 else {}
    return result
