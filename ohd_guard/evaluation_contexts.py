"""Evaluation in context (issue #22): the same labelled items bare and inside tools, RAG, history...

A detector fitted on bare single-turn prompts can flag a benign question once a tool is bound and
pass a harmful one inside a RAG template. :func:`context_sets` places every text item of each set
in each context of :mod:`ohd_guard.contexts` (label kept, one placement per item, the
``"heldout"`` context material and a fixed seed, so nothing a shipped fit saw is reused and every
run builds the same items); :func:`context_results` reads the per-context numbers off an
:class:`~ohd_guard.evaluation.EvalReport` of those sets: DR and FPR at each detector's own
threshold (fixed before testing), AUROC, and the change from ``bare``, the same items without a
context. ``bare`` is always evaluated: it is the reference of every difference.

AUROC pairing: a set holding both classes is ranked on its own items in that context; a one-class
set (a harmful-only benchmark) against the opposite class pooled over the run's sets *in the same
context*, so a context that shifts every score alike does not change its AUROC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ohd_guard.contexts import CONTEXT_KINDS, ContextConversation, in_contexts
from ohd_guard.datasets import LabelledPrompt, per_class as limit_per_class
from ohd_guard.errors import InvalidInputError
from ohd_guard.metrics import auroc

__all__ = ["CONTEXT_SEED", "ContextResult", "context_kinds", "context_markdown", "context_results", "context_sets",
           "set_name"]

CONTEXT_SEED = 0
"""Seed of every placement: the same items in every run, so numbers of two runs compare."""


def set_name(dataset: str, kind: str) -> str:
    """The report name of ``dataset`` placed in context ``kind``."""
    return f"{dataset} @ {kind}"


def context_kinds(kinds: Sequence[str]) -> list[str]:
    """``kinds`` validated and deduplicated, with ``bare`` first (added when missing)."""
    unknown = [k for k in kinds if k not in CONTEXT_KINDS]
    if unknown:
        raise InvalidInputError(f"unknown context(s) {unknown}; known: {', '.join(CONTEXT_KINDS)}")
    return ["bare", *[k for k in dict.fromkeys(kinds) if k != "bare"]]


def _placeable(x: Any) -> bool:
    return isinstance(x, LabelledPrompt) and x.image is None and bool(x.text.strip())


def context_sets(
    sets: Mapping[str, Sequence[Any]],
    kinds: Sequence[str],
    *,
    per_class: int | None = None,
    seed: int = CONTEXT_SEED,
) -> tuple[dict[tuple[str, str], list[ContextConversation]], list[str]]:
    """``{(set, kind): items}`` for every set and context (``bare`` first), and notes on what was left out.

    Only text-only :class:`LabelledPrompt` items can be placed (an image or a ready-made
    conversation has no single request to wrap); others are left out of every context alike and
    counted in the notes. ``per_class`` keeps at most that many unsafe and safe items of each set,
    evenly spread through it (as ``--limit`` does), before placing.
    """
    kinds = context_kinds(kinds)
    out: dict[tuple[str, str], list[ContextConversation]] = {}
    notes: list[str] = []
    for name, items in sets.items():
        keep = [x for x in items if _placeable(x)]
        if len(keep) < len(items):
            notes.append(f"{name}: {len(items) - len(keep)} of {len(items)} items left out of the contexts "
                         "(images or multi-turn conversations)")
        if per_class is not None:
            keep = limit_per_class(keep, per_class)
        if not keep:
            continue
        placed = in_contexts(keep, kinds, seed=seed, per_prompt=1, split="heldout")
        for kind in kinds:
            out[(name, kind)] = [c for c in placed if c.context == kind]
    if not out:
        raise InvalidInputError("--contexts: no set holds text-only prompts to place in contexts")
    return out, notes


@dataclass(frozen=True)
class ContextResult:
    """One detector on one set in one context; ``d_*`` are the differences to ``bare`` (None there)."""

    detector: str
    dataset: str
    context: str
    n_unsafe: int
    n_safe: int
    detection_rate: float | None
    false_positive_rate: float | None
    auroc: float | None
    paired_with: str
    skipped: str = ""
    """Why the detector could not screen this set in this context (e.g. over the context window)."""
    d_detection_rate: float | None = None
    d_false_positive_rate: float | None = None
    d_auroc: float | None = None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def context_results(report: Any, keys: Sequence[tuple[str, str]]) -> list[ContextResult]:
    """Per-context numbers of ``report`` (an ``EvalReport`` of the sets named by :func:`set_name`)."""
    out: list[ContextResult] = []
    for det in report.detectors:
        sc, thr = report.scores.get(det, {}), report.thresholds[det]
        got = {k: (np.asarray(sc[set_name(*k)]), np.asarray(report.labels[set_name(*k)]))
               for k in keys if set_name(*k) in sc}
        rows: dict[tuple[str, str], ContextResult] = {}
        for (name, kind), (s, y) in got.items():
            if (y == 1).any() and (y == 0).any():
                pair_s, pair_y, paired = s, y, "own"
            else:
                want = 0 if (y == 1).all() else 1
                pool = [ps[py == want] for (n2, k2), (ps, py) in got.items() if k2 == kind and n2 != name]
                pool_s = np.concatenate(pool) if pool else np.zeros(0)
                pair_s, pair_y = np.r_[s, pool_s], np.r_[y, np.full(pool_s.size, want)]
                paired = f"pooled {'safe' if want == 0 else 'unsafe'} ({pool_s.size})" if pool_s.size else ""
            rows[(name, kind)] = ContextResult(
                detector=det, dataset=name, context=kind, n_unsafe=int((y == 1).sum()), n_safe=int((y == 0).sum()),
                detection_rate=float(np.mean(s[y == 1] > thr)) if (y == 1).any() else None,
                false_positive_rate=float(np.mean(s[y == 0] > thr)) if (y == 0).any() else None,
                auroc=auroc(pair_s, pair_y) if paired else None, paired_with=paired)
        for name, kind in keys:
            if (name, kind) not in rows:  # evaluate skipped it: say why rather than drop the row
                try:
                    why = report.result(det, set_name(name, kind)).skipped
                except KeyError:
                    continue
                n_unsafe = sum(report.labels[set_name(name, kind)])
                out.append(ContextResult(detector=det, dataset=name, context=kind, n_unsafe=n_unsafe,
                                         n_safe=len(report.labels[set_name(name, kind)]) - n_unsafe,
                                         detection_rate=None, false_positive_rate=None, auroc=None, paired_with="",
                                         skipped=why or "not scored"))
                continue
            r, bare = rows[(name, kind)], rows.get((name, "bare"))
            if kind != "bare" and bare is not None:
                r = replace(r, d_detection_rate=_diff(r.detection_rate, bare.detection_rate),
                            d_false_positive_rate=_diff(r.false_positive_rate, bare.false_positive_rate),
                            d_auroc=_diff(r.auroc, bare.auroc))
            out.append(r)
    return out


def _variant_rates(report: Any, sets: Mapping[tuple[str, str], Sequence[ContextConversation]]) -> list[str]:
    """Markdown rows: flag rate per detector, set, variant and label (DR on unsafe, FPR on safe)."""
    lines = []
    for det in report.detectors:
        thr = report.thresholds[det]
        for (name, kind), items in sets.items():
            s = report.scores.get(det, {}).get(set_name(name, kind))
            if s is None or kind == "bare":
                continue
            groups: dict[tuple[str, int], list[float]] = {}
            for x, v in zip(items, s):
                groups.setdefault((x.variant, int(x.label)), []).append(v)
            for (variant, lab), vs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
                rate = float(np.mean(np.asarray(vs) > thr))
                lines.append(f"| {det} | {name} | {variant} | {'DR' if lab else 'FPR'} | {len(vs)} | {rate:.3f} |")
    return lines


def context_markdown(report: Any, sets: Mapping[tuple[str, str], Sequence[ContextConversation]]) -> str:
    """The in-context tables: per context, and per variant of each context."""
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    d = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
    out = ["### In context: DR / FPR at the calibrated threshold, AUROC, and the change from bare", "",
           "| detector | set | context | n unsafe | n safe | DR | FPR | AUROC | Δ DR | Δ FPR | Δ AUROC |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in context_results(report, list(sets)):
        if r.skipped:
            out.append(f"| {r.detector} | {r.dataset} | {r.context} | {r.n_unsafe} | {r.n_safe} | "
                       f"skipped: {r.skipped} | | | | | |")
            continue
        out.append(f"| {r.detector} | {r.dataset} | {r.context} | {r.n_unsafe} | {r.n_safe} | "
                   f"{f(r.detection_rate)} | {f(r.false_positive_rate)} | {f(r.auroc)} | "
                   f"{d(r.d_detection_rate)} | {d(r.d_false_positive_rate)} | {d(r.d_auroc)} |")
    out += ["", "### In context, per variant (flag rate at the calibrated threshold)", "",
            "| detector | set | variant | rate | n | value |", "|---|---|---|---|---:|---:|"]
    out += _variant_rates(report, sets)
    out += ["", f"Contexts drawn from the held-out context material (`ohd_guard.contexts`, split `heldout`, "
                f"seed {CONTEXT_SEED}), one placement per item; one-class sets are paired with the opposite "
                "class of the other sets in the same context."]
    return "\n".join(out) + "\n"
