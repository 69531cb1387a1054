"""Side-by-side evaluation of fitted detectors on labelled sets and attack suites.

For every detector x set: detection rate (DR) and false-positive rate (FPR) at the detector's own
calibrated threshold, AUROC and the detection rate at a fixed false-positive budget (TPR at 5 % FPR
by default), a per-category breakdown, and the screening latency per prompt relative to an
unguarded prefill of the same prompts.

One-class sets. Public harmful sets (AdvBench, JBB, ...) have no safe items and harmless sets no
unsafe ones, so AUROC and TPR@FPR pair them with the *pooled opposite class of the reference
sets* (by default every non-attack set in the run): a harmful-only set is ranked against all safe
items of the reference sets, a harmless-only set against all their unsafe items. Sets holding both
classes use their own items only. The pairing is written next to each number.

Sets a detector cannot screen (an image for a text-only model) are reported as skipped, not as
failures of the run.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ohd_guard.adapters import model_device
from ohd_guard.detectors import Detector, as_input, shared_prefill
from ohd_guard.errors import InvalidInputError
from ohd_guard.metrics import auroc, tpr_at_fpr
from ohd_guard.rendering import encode_conversations
from ohd_guard.screening import score_conversations, union

log = logging.getLogger("ohd_guard.evaluation")

__all__ = ["CategoryResult", "EvalReport", "LatencyResult", "SetResult", "evaluate"]


class SetResult(BaseModel):
    """One detector on one set."""

    model_config = ConfigDict(frozen=True)
    detector: str
    dataset: str
    kind: Literal["dataset", "attack"]
    n: int
    n_unsafe: int
    n_safe: int
    detection_rate: float | None = None
    false_positive_rate: float | None = None
    auroc: float | None = None
    tpr_at_fpr: float | None = None
    paired_with: str = ""
    """``own`` (both classes in the set), ``pooled safe (n)`` or ``pooled unsafe (n)``; empty if none."""
    seconds: float = 0.0
    """Batched scoring time of the whole set (shared prefills make later detectors cheaper)."""
    skipped: str = ""


class CategoryResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    detector: str
    dataset: str
    category: str
    label: int
    n: int
    flagged_rate: float
    """DR for unsafe items, FPR for safe ones."""


class LatencyResult(BaseModel):
    """Prompts screened one at a time against an unguarded prefill (tokenise + forward) of the same
    prompts; medians over prompts, the two interleaved."""

    model_config = ConfigDict(frozen=True)
    detector: str
    n_prompts: int
    ms_per_prompt: float
    prefill_ms_per_prompt: float
    ratio: float


class EvalReport(BaseModel):
    """Everything :func:`evaluate` measured; scores are kept so any number can be recomputed."""

    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    max_fpr: float
    detectors: list[str]
    thresholds: dict[str, float]
    datasets: dict[str, int]
    attacks: dict[str, int] = Field(default_factory=dict)
    reference_sets: list[str]
    results: list[SetResult] = Field(default_factory=list)
    categories: list[CategoryResult] = Field(default_factory=list)
    latency: list[LatencyResult] = Field(default_factory=list)
    scores: dict[str, dict[str, list[float]]] = Field(default_factory=dict)
    labels: dict[str, list[int]] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    # -- access ----------------------------------------------------------------------------------
    def result(self, detector: str, dataset: str) -> SetResult:
        for r in self.results:
            if r.detector == detector and r.dataset == dataset:
                return r
        raise KeyError((detector, dataset))

    def paired(self, detector: str, dataset: str) -> tuple[np.ndarray, np.ndarray, str] | None:
        """(scores, labels, pairing) used for AUROC/TPR@FPR of ``dataset``, or None if not computable."""
        sc = self.scores.get(detector, {})
        if dataset not in sc:
            return None
        s, y = np.asarray(sc[dataset]), np.asarray(self.labels[dataset])
        if (y == 1).any() and (y == 0).any():
            return s, y, "own"
        want = 0 if (y == 1).all() else 1
        pool = [np.asarray(sc[r])[np.asarray(self.labels[r]) == want] for r in self.reference_sets if r in sc]
        pool_s = np.concatenate(pool) if pool else np.zeros(0)
        if not pool_s.size:
            return None
        return (np.r_[s, pool_s], np.r_[y, np.full(pool_s.size, want)],
                f"pooled {'safe' if want == 0 else 'unsafe'} ({pool_s.size})")

    # -- output ----------------------------------------------------------------------------------
    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    def _pivot(self, kind: str, cell) -> list[str]:
        names = list(self.datasets) if kind == "dataset" else list(self.attacks)
        head = "| set | n | " + " | ".join(self.detectors) + " |"
        lines = [head, "|---|---:|" + "---:|" * len(self.detectors)]
        for name in names:
            row = [name, str((self.datasets if kind == "dataset" else self.attacks)[name])]
            for d in self.detectors:
                r = self.result(d, name)
                row.append("skipped" if r.skipped else cell(r))
            lines.append("| " + " | ".join(row) + " |")
        return lines

    def to_markdown(self, categories: bool = True) -> str:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731

        def rate(r: SetResult) -> str:
            parts = []
            if r.n_unsafe:
                parts.append(f"DR {f(r.detection_rate)}")
            if r.n_safe:
                parts.append(f"FPR {f(r.false_positive_rate)}")
            return " / ".join(parts)

        out = ["### Flag rate at the calibrated threshold (DR on unsafe items, FPR on safe items)", ""]
        out += self._pivot("dataset", rate)
        out += ["", "### AUROC (one-class sets paired with the pooled opposite class of the reference sets)", ""]
        out += self._pivot("dataset", lambda r: f(r.auroc))
        out += ["", f"### Detection rate at {self.max_fpr:.0%} FPR (threshold chosen on the paired data, an upper bound)", ""]
        out += self._pivot("dataset", lambda r: f(r.tpr_at_fpr))
        if self.attacks:
            out += ["", "### Adaptive attacks: DR at the calibrated threshold (AUROC vs pooled safe items)", ""]
            out += self._pivot("attack", lambda r: f"{f(r.detection_rate)} ({f(r.auroc)})")
        if self.latency:
            out += ["", "### Screening latency, one prompt at a time", "",
                    "| detector | ms / prompt | unguarded prefill ms / prompt | x prefill |", "|---|---:|---:|---:|"]
            out += [f"| {r.detector} | {r.ms_per_prompt:.1f} | {r.prefill_ms_per_prompt:.1f} | {r.ratio:.2f} |"
                    for r in self.latency]
        thr = ", ".join(f"{d}: {t:.4g}" for d, t in self.thresholds.items())
        out += ["", f"Thresholds: {thr}.", f"Reference sets for one-class pairing: {', '.join(self.reference_sets)}."]
        if categories and self.categories:
            out += ["", "### Per category (flag rate)", "", "| set / category | label | n | " + " | ".join(self.detectors) + " |",
                    "|---|---:|---:|" + "---:|" * len(self.detectors)]
            keys = list(dict.fromkeys((c.dataset, c.category, c.label) for c in self.categories
                                      if c.dataset not in self.attacks))  # attack categories: JSON only
            by = {(c.detector, c.dataset, c.category, c.label): c for c in self.categories}
            for ds, cat, lab in keys:
                cells = [f(by[(d, ds, cat, lab)].flagged_rate) if (d, ds, cat, lab) in by else "-" for d in self.detectors]
                n = next(by[k].n for k in by if k[1:] == (ds, cat, lab))
                out.append(f"| {ds} / {cat} | {lab} | {n} | " + " | ".join(cells) + " |")
        if self.notes:
            out += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(out) + "\n"

    def plot_roc(self, path: str | Path, sets: Sequence[str] | None = None) -> Path:
        """One ROC panel per set (paired as in the tables), one curve per detector, saved as PNG
        (drawn by :func:`ohd_guard.plot.report_roc`)."""
        from ohd_guard.plot import report_roc

        report_roc(self, path, sets)
        return Path(path)


# -- evaluation ---------------------------------------------------------------------------------
def _labels(name: str, items: Sequence[Any]) -> np.ndarray:
    try:
        y = np.array([int(x.label) for x in items])
    except AttributeError:
        raise InvalidInputError(f"set {name!r}: every item needs a .label (use LabelledPrompt / LabelledConversation)") from None
    if not len(y) or not np.isin(y, (0, 1)).all():
        raise InvalidInputError(f"set {name!r} is empty or has labels other than 0/1")
    return y


def _metrics(report: EvalReport, det: Detector, name: str, kind: str, y: np.ndarray, s: np.ndarray | None,
             seconds: float, skipped: str) -> SetResult:
    base = dict(detector=det.name, dataset=name, kind=kind, n=len(y), n_unsafe=int((y == 1).sum()),
                n_safe=int((y == 0).sum()), seconds=round(seconds, 3))
    if s is None:
        return SetResult(**base, skipped=skipped)
    thr = det.threshold
    pair = report.paired(det.name, name)
    return SetResult(
        **base,
        detection_rate=float(np.mean(s[y == 1] > thr)) if (y == 1).any() else None,
        false_positive_rate=float(np.mean(s[y == 0] > thr)) if (y == 0).any() else None,
        auroc=auroc(pair[0], pair[1]) if pair else None,
        tpr_at_fpr=tpr_at_fpr(pair[0], pair[1], report.max_fpr) if pair else None,
        paired_with=pair[2] if pair else "",
    )


def joint_scores(detectors: Sequence[Any], items: Sequence[Any], batch_size: int = 8) -> np.ndarray:
    """[N, D] scores of prefill detectors bound to one model, read from one screening prefill per batch
    (each column equals what a guard running that detector alone computes)."""
    return score_conversations(list(detectors), items, batch_size)


def _joint_groups(detectors: Sequence[Detector]) -> list[list[Any]]:
    """Prefill detectors that can share one screening prefill (same model, compatible masked branches)."""
    groups: list[list[Any]] = []
    for d in detectors:
        if not getattr(d, "reads_prefill", False):
            continue
        for g in groups:
            if g[0].model is d.model:
                try:
                    union(*(m.reads() for m in g), d.reads())
                except InvalidInputError:
                    continue
                g.append(d)
                break
        else:
            groups.append([d])
    return [g for g in groups if len(g) > 1]


@torch.no_grad()
def _prefill(model, processor, conv: Any) -> None:
    """What an unguarded model runs before its first answer token: tokenise + forward with KV cache."""
    model(**encode_conversations(processor, [conv], device=model_device(model)), use_cache=True, logits_to_keep=1)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _latency(detectors: Sequence[Detector], convs: list[Any], progress: bool) -> list[LatencyResult]:
    """Per prompt, the unguarded prefill and then every detector, interleaved so that load from other
    processes hits both alike; medians over prompts, after two warm-up runs of each."""
    models = {id(d.model): d for d in detectors}
    for _ in range(2):
        for d in models.values():
            _prefill(d.model, d.processor, convs[0])
        for d in detectors:
            d.score(convs[:1])
    base: dict[int, list[float]] = {k: [] for k in models}
    own: dict[str, list[float]] = {d.name: [] for d in detectors}
    for c in convs:
        for k, d in models.items():
            base[k].append(_timed(lambda: _prefill(d.model, d.processor, c)))  # noqa: B023 (called at once)
        for d in detectors:
            own[d.name].append(_timed(lambda: d.score([c])))  # noqa: B023 (called at once)
    out = []
    for d in detectors:
        per, ref = float(np.median(own[d.name])), float(np.median(base[id(d.model)]))
        out.append(LatencyResult(detector=d.name, n_prompts=len(convs), ms_per_prompt=1000 * per,
                                 prefill_ms_per_prompt=1000 * ref, ratio=per / ref))
        if progress:
            print(f"[eval] latency {d.name}: {1000 * per:.1f} ms/prompt ({per / ref:.2f}x prefill)", flush=True)
    return out


def round_robin(pools: Sequence[Sequence[Any]], n: int) -> list[Any]:
    """At most ``n`` items taken in turn from each of ``pools`` (deterministic)."""
    out: list[Any] = []
    i = 0
    while len(out) < n and any(i < len(p) for p in pools):
        out += [p[i] for p in pools if i < len(p)][: n - len(out)]
        i += 1
    return out


def _latency_prompts(datasets: Mapping[str, Sequence[Any]], n: int) -> list[Any]:
    """``n`` text-only items taken round-robin over the sets."""
    return round_robin([[x for x in items if getattr(x, "image", None) is None] for items in datasets.values()], n)


def evaluate(
    detectors: Sequence[Detector],
    datasets: Mapping[str, Sequence[Any]],
    *,
    attacks: Mapping[str, Sequence[Any]] | None = None,
    reference_sets: Sequence[str] | None = None,
    max_fpr: float = 0.05,
    latency_prompts: int = 8,
    progress: bool = False,
) -> EvalReport:
    """Score every set with every fitted detector and collect the metrics described in the module doc.

    ``datasets`` and ``attacks`` map a name to labelled items (:class:`~ohd_guard.datasets.LabelledPrompt`
    or :class:`~ohd_guard.datasets.LabelledConversation`); attack sets are reported in their own table
    and never enter the reference pools. ``latency_prompts=0`` skips the latency measurement.
    """
    if not detectors:
        raise InvalidInputError("no detectors to evaluate")
    names = [d.name for d in detectors]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"detector names must be unique, got {names}")
    for d in detectors:
        if not d.fitted:
            raise InvalidInputError(f"{d.name} is not fitted")
    attacks = dict(attacks or {})
    clash = set(datasets) & set(attacks)
    if clash:
        raise InvalidInputError(f"set names used both as dataset and attack: {sorted(clash)}")
    refs = list(reference_sets) if reference_sets is not None else list(datasets)
    if any(r not in datasets for r in refs):
        raise InvalidInputError(f"reference sets must be datasets of this run, got {refs}")
    sets = {**{k: ("dataset", v) for k, v in datasets.items()}, **{k: ("attack", v) for k, v in attacks.items()}}
    labels = {k: _labels(k, v) for k, (_, v) in sets.items()}
    report = EvalReport(
        max_fpr=max_fpr, detectors=names, thresholds={d.name: float(d.threshold) for d in detectors},
        datasets={k: len(v) for k, v in datasets.items()}, attacks={k: len(v) for k, v in attacks.items()},
        reference_sets=refs, labels={k: v.tolist() for k, v in labels.items()},
    )
    timing: dict[tuple[str, str], tuple[float, str]] = {}
    joint: dict[str, tuple[list[Any], int]] = {}  # detector name -> (its group, its column)
    for g in _joint_groups(detectors):
        for k, d in enumerate(g):
            joint[d.name] = (g, k)
    shared: dict[tuple[int, str], tuple[np.ndarray | None, str]] = {}  # (group, set) -> (scores [N, D], error)
    with shared_prefill():
        for det in detectors:
            report.scores[det.name] = {}
            for name, (_, items) in sets.items():
                t0 = time.perf_counter()
                try:
                    if det.name in joint:
                        g, k = joint[det.name]
                        key = (id(g), name)
                        if key not in shared:
                            try:
                                shared[key] = (joint_scores(g, items, getattr(g[0], "batch_size", 8)), "")
                            except InvalidInputError as e:
                                shared[key] = (None, str(e))
                        cols, err = shared[key]
                        if cols is None:
                            raise InvalidInputError(err)
                        s = cols[:, k]
                    else:
                        s = np.asarray(det.score(items), dtype=float)
                    report.scores[det.name][name] = s.tolist()
                    why = ""
                except InvalidInputError as e:  # e.g. images for a text-only model
                    why = str(e).splitlines()[0]
                    log.info("%s cannot screen %s: %s", det.name, name, why)
                timing[(det.name, name)] = (time.perf_counter() - t0, why)
                if progress:
                    print(f"[eval] {det.name:>22} {name:<28} {timing[(det.name, name)][0]:7.1f} s {why}", flush=True)
    for det in detectors:
        for name, (kind, items) in sets.items():
            sec, why = timing[(det.name, name)]
            got = report.scores[det.name].get(name)
            report.results.append(_metrics(report, det, name, kind, labels[name], None if got is None else np.asarray(got), sec, why))
            if got is None:
                continue
            cats: dict[tuple[str, int], list[int]] = {}
            for i, x in enumerate(items):
                if getattr(x, "category", ""):
                    cats.setdefault((x.category, int(x.label)), []).append(i)
            for (cat, lab), idx in sorted(cats.items()):
                report.categories.append(CategoryResult(
                    detector=det.name, dataset=name, category=cat, label=lab, n=len(idx),
                    flagged_rate=float(np.mean(np.asarray(got)[idx] > det.threshold))))
    if latency_prompts > 0:
        report.latency = _latency(detectors, [as_input(x) for x in _latency_prompts(datasets, latency_prompts)], progress)
    return report
