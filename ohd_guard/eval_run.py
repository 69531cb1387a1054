"""An evaluation run from names and paths, as ``ohd-guard eval`` asks for it: the labelled sets loaded
(and deduplicated, limited, placed in contexts), the attacks built, the detectors loaded, bound or
fitted, then :func:`ohd_guard.evaluation.evaluate` and the report with its notes. The CLI only parses
arguments and prints; everything it asks for is decided here.

Cost model: the sets are loaded before the model (a typo in a file name should not cost a model
load), and the detectors fitted in one run share one prefill (:func:`~ohd_guard.detectors.shared_prefill`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ohd_guard.errors import InvalidInputError, ProfileMismatchError
from ohd_guard.evaluation import EvalReport, evaluate, round_robin
from ohd_guard.shipped import DEFAULT_DETECTOR, shipped_profiles

__all__ = ["EVAL_DETECTORS", "EvalPlan", "EvalSets", "build_detectors", "default_detectors", "load_sets"]

EVAL_DETECTORS: dict[str, str] = {
    "ohd": "the profile's One-head Defense as saved (head, mode and threshold from --profile)",
    "ohd-fast": "One-head Defense, last-position mask; head from the profile, threshold fitted on the fit data",
    "ohd-exact": "One-head Defense, mask at every position (paper); head from the profile, threshold fitted",
    "largest-effect": "the head moving unsafe prompts most, no selectivity rule (exact mode), fitted",
    "sahs": "logistic probe on the last-token outputs of the top 16 heads, fitted",
    "hiddendetect": "logit-lens refusal-token cosine over the best band of layers, fitted",
    "self-refusal": "the model's own greedy answer opens with a refusal phrase",
    "judge": "the model asked as a judge: log p(unsafe) - log p(safe) of its first answer (a second prefill), "
             "threshold at the midpoint of the fit data's class medians",
}
"""Detector names an evaluation run accepts (``ohd-guard eval --detectors``)."""

Say = Callable[[str], None]
"""Where progress lines go (the CLI: stderr, unless ``--quiet``)."""


def _quiet(msg: str) -> None:
    pass


def _threshold(det: Any) -> str:
    return f"threshold {det.threshold:.4g}"


# -------------------------------------------------------------------------------------------- sets
@dataclass
class EvalSets:
    """The labelled sets of a run (by report name), its attacks and the contexts they were placed in."""

    sets: dict[str, list[Any]]
    attacks: dict[str, list[Any]] | None = None
    seeds: list[Any] = field(default_factory=list)
    """The unsafe text items the attacks were built from."""
    placed: dict[Any, list[Any]] = field(default_factory=dict)
    """``{(set, context): items}`` when placed in contexts (:mod:`ohd_guard.evaluation_contexts`)."""
    notes: list[str] = field(default_factory=list)


def load_sets(files: Sequence[Path], shared: Sequence[str] = (), *, project_heldout: bool = False,
              dedupe_fit: bool = False, fit_data: Path | None = None, limit: int | None = None,
              attacks: bool = False, attack_seeds: int = 10, attack_names: Sequence[str] | None = None,
              contexts: Sequence[str] | None = None, context_limit: int | None = None,
              say: Say = _quiet) -> EvalSets:
    """Labelled files and shared sets, at most ``limit`` unsafe and ``limit`` safe items each; with
    ``dedupe_fit`` without the items the shipped profiles (and ``fit_data``) were fitted on; then the
    attack suite built from their unsafe text items; then, with ``contexts``, every set placed in each."""
    from ohd_guard.datasets import load_calibration_prompts, load_labelled_file, load_shared_set, per_class

    sets: dict[str, list[Any]] = {}
    for f in files:
        key = Path(f).name if Path(f).name not in sets else str(f)
        sets[key] = per_class(load_labelled_file(f), limit)
    if project_heldout:
        held = load_calibration_prompts("heldout")
        sets["project heldout"] = held  # whole: it is what the profiles' held-out numbers are measured on
        sets["project look-alike pairs"] = [p for p in held if p.category.startswith("contrast_")]
    for name in shared:
        sets[name] = load_shared_set(name, limit=limit if name == "figstep_images" else None)
    if dedupe_fit:  # numbers only on items the shipped (or fit_data) detectors were not fitted on
        from ohd_guard.datasets import dedupe_against, shipped_fit_items

        fit = shipped_fit_items()[0] + (load_labelled_file(fit_data) if fit_data else [])
        for name in list(sets):
            if not name.startswith("project "):  # the project's held-out split is disjoint by construction
                kept = dedupe_against(sets[name], fit)
                say(f"[eval] {name}: {len(sets[name]) - len(kept)} items dropped (duplicates of fit data or within the set)")
                sets[name] = kept
    for name in shared:
        if name != "figstep_images":
            sets[name] = per_class(sets[name], limit)
    out = EvalSets(sets=sets)
    if attacks:
        from ohd_guard.attacks import ATTACKS, make_attacks

        pools = [[p for p in items if p.label == 1 and p.image is None and p.text.strip()] for items in sets.values()]
        out.seeds = round_robin(pools, attack_seeds)
        if not out.seeds:
            raise InvalidInputError("--attacks: the sets hold no text-only unsafe items to build the attacks from")
        out.attacks = make_attacks(out.seeds, attacks=attack_names or ATTACKS)
    if contexts:  # each set's items in every context, bare first; attacks stay as built above
        from ohd_guard.evaluation_contexts import context_sets, set_name

        if project_heldout:  # a subset of the held-out split, which is placed whole
            sets.pop("project look-alike pairs")
        out.placed, out.notes = context_sets(sets, list(contexts), per_class=context_limit)
        for n in out.notes:
            say(f"[eval] {n}")
        out.sets = {set_name(*k): v for k, v in out.placed.items()}
    return out


# --------------------------------------------------------------------------------------- detectors
def default_detectors(profile: Path | None, model_name: Any = None,
                      allow_edited: bool = False) -> tuple[list[str], Path | None]:
    """What a run evaluates when no detector is named: ``profile`` (any kind), else the shipped
    :data:`~ohd_guard.shipped.DEFAULT_DETECTOR` profile of the model, else that kind fitted here.
    Returns ``(names to build, a profile file to load or None)``."""
    if profile is not None:
        from ohd_guard.detectors import load_profile

        if load_profile(profile, allow_edited=allow_edited).kind == "ohd":
            return ["ohd"], None
        return [], profile
    default_file = shipped_profiles(model_name).get(DEFAULT_DETECTOR)
    return ([DEFAULT_DETECTOR], None) if default_file is None else ([], default_file)


class _Renamed:
    """A detector under another report name (two detectors of one kind in a run need distinct names)."""

    def __init__(self, inner: Any, name: str):
        self.inner, self.name = inner, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


def unique_names(entries: Sequence[tuple[Any, str]]) -> list[Any]:
    """Detectors with distinct names: on a clash, every clashing detector not fitted in this run gets
    its source (``profile``, a file name) appended, and any remaining clash a number."""
    counts: dict[str, int] = {}
    for det, _ in entries:
        counts[det.name] = counts.get(det.name, 0) + 1
    out, seen = [], set()
    for det, source in entries:
        name = det.name
        if counts[name] > 1 and source != "fitted":
            name = f"{name} [{source}]"
        base, k = name, 2
        while name in seen:
            name, k = f"{base} #{k}", k + 1
        seen.add(name)
        out.append(det if name == det.name else _Renamed(det, name))
    return out


def build_detectors(model: Any, processor: Any, names: Sequence[str], *, profile: Path | None = None,
                    model_name: Any = None, detector_files: Sequence[Path] = (), use_shipped: bool = False,
                    default_file: Path | None = None, allow_edited: bool = False, fit_data: Path | None = None,
                    fit_per_class: int | None = None, save_fitted: Path | None = None, max_new_tokens: int = 24,
                    batch_size: int = 8, describe: Callable[[Any], str] = _threshold,
                    say: Say = _quiet) -> tuple[list[Any], list[str]]:
    """The detectors ``names`` (:data:`EVAL_DETECTORS`) bound to ``model``: loaded from ``profile`` or the
    shipped profiles of ``model_name``, from ``detector_files``, or fitted on ``fit_data`` (default:
    the project's calibration split) and saved to ``save_fitted``. Returns the detectors under distinct
    report names and one note per detector (``describe`` says what it chose)."""
    from ohd_guard.datasets import load_calibration_prompts, load_labelled_file, stratified
    from ohd_guard.detectors import (
        HiddenDetect,
        Judge,
        LargestEffectHead,
        OhdProfile,
        OneHeadDefense,
        SAHs,
        SelfRefusal,
        load_detector,
        shared_prefill,
    )

    shipped = shipped_profiles(model_name)
    bs = batch_size
    entries: list[tuple[Any, str]] = []
    notes: list[str] = []
    names = list(names)
    ohd_profile = None
    det: Any
    if "ohd" in names or {"ohd-fast", "ohd-exact"} & set(names):
        profile_path = profile or shipped.get("ohd", shipped_profiles()["ohd"])
        loaded = OhdProfile.load(profile_path, allow_edited=allow_edited)
        if profile is not None or "ohd" in names:
            loaded.verify(model, processor)  # ProfileMismatchError: exit 2 with the reason
            ohd_profile = loaded
        else:  # only the head is wanted, and the shipped profile need not fit a user's model
            try:
                loaded.verify(model, processor)
                ohd_profile = loaded
            except ProfileMismatchError:
                say("[eval] the shipped profile is for another model: "
                    "One-head Defense searches its head (fast strategy)")
        if "ohd" in names:
            det = OneHeadDefense.from_profile(ohd_profile, model, processor)
            det.batch_size = bs
            entries.append((det, "profile"))
            notes.append(f"{det.name} from profile {profile_path}: {describe(det)}")
    files = list(detector_files)
    if use_shipped:
        files += [p for k, p in shipped.items() if not (k == "ohd" and "ohd" in names)]
    if default_file is not None:
        try:
            load_detector(default_file, model, processor, allow_edited=allow_edited)
            files.append(default_file)
        except ProfileMismatchError as e:
            if default_file == profile:
                raise
            say(f"[eval] the shipped {DEFAULT_DETECTOR} profile is for another model ({e}): "
                f"fitting {DEFAULT_DETECTOR} on the fit data instead")
            names = [DEFAULT_DETECTOR]
    for path in files:
        det = load_detector(path, model, processor, allow_edited=allow_edited)
        if hasattr(det, "batch_size"):
            det.batch_size = bs
        entries.append((det, Path(path).name))
        notes.append(f"{det.name} loaded from {path}: {describe(det)}")

    # the profile's head, mask target and score layer; only the position mode and the threshold change
    same: dict[str, Any] = ({} if ohd_profile is None else
                            {"head": ohd_profile.heads[0], "mask": ohd_profile.mask, "score_layer": ohd_profile.score_layer})
    factories: dict[str, Callable[[], Any]] = {
        "ohd-fast": lambda: OneHeadDefense("fast", strategy="fast", batch_size=bs, **same),
        "ohd-exact": lambda: OneHeadDefense("exact", strategy="fast", batch_size=bs, **same),
        "largest-effect": lambda: LargestEffectHead("exact", top_k=4, search_per_class=16, batch_size=bs),
        "sahs": lambda: SAHs(top_k=16, batch_size=bs),
        "hiddendetect": lambda: HiddenDetect(batch_size=bs),
        "self-refusal": lambda: SelfRefusal(max_new_tokens=max_new_tokens, batch_size=bs),
        "judge": lambda: Judge(batch_size=bs),
    }
    to_fit = [n for n in names if n in factories]
    if to_fit:
        if fit_data:
            fit_items, fit_src = load_labelled_file(fit_data), str(fit_data)
        else:
            fit_items, fit_src = load_calibration_prompts("calib"), "the project's calibration split"
        unsafe = stratified([p for p in fit_items if p.label == 1], fit_per_class)
        safe = stratified([p for p in fit_items if p.label == 0], fit_per_class)
        with shared_prefill():  # SAHs and HiddenDetect read the same prefill
            for n in to_fit:
                t0 = time.perf_counter()
                det = factories[n]().fit(model, processor, unsafe, safe)
                say(f"[fit] {det.name}: {time.perf_counter() - t0:.1f} s, {describe(det)}")
                entries.append((det, "fitted"))
                notes.append(f"{det.name} fitted on {len(unsafe)} unsafe + {len(safe)} safe prompts of {fit_src}: "
                             f"{describe(det)}")
                if save_fitted:
                    saved = det.save(save_fitted / f"{n}.json")
                    say(f"[fit] {det.name} saved to {saved}")
    return unique_names(entries), notes


# --------------------------------------------------------------------------------------------- run
@dataclass
class EvalPlan:
    """Sets and detectors ready to evaluate; :meth:`run` scores them, :meth:`markdown` writes the report."""

    sets: EvalSets
    detectors: list[Any]
    notes: list[str] = field(default_factory=list)
    max_fpr: float = 0.05
    latency_prompts: int = 8

    def run(self, progress: bool = False) -> EvalReport:
        """:func:`~ohd_guard.evaluation.evaluate` (its progress lines on stdout), notes added."""
        s = self.sets
        report = evaluate(self.detectors, s.sets, attacks=s.attacks, max_fpr=self.max_fpr,
                          latency_prompts=self.latency_prompts, progress=progress)
        notes = list(self.notes)
        if s.placed:
            notes.extend(s.notes)
        if s.attacks:
            notes.append(f"attacks built from {len(s.seeds)} unsafe text items of the sets (round-robin over the sets)")
        report.notes.extend(notes)
        return report

    def markdown(self, report: EvalReport) -> str:
        """The report's tables; with contexts, the per-context tables first (they are what was asked for)."""
        markdown = report.to_markdown()
        if self.sets.placed:
            from ohd_guard.evaluation_contexts import context_markdown

            markdown = context_markdown(report, self.sets.placed) + "\n" + markdown
        return markdown
