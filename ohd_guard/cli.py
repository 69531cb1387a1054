"""The ``ohd-guard`` command: calibrate, screen, inspect, eval."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ohd_guard.errors import OhdGuardError

from ohd_guard.shipped import DEFAULT_DETECTOR, KINDS, default_profile, shipped_profiles

SHIPPED_PROFILES: dict[str, Path] = shipped_profiles()
"""Profiles shipped for the embedded default model, one per guard detector (``ohd-guard calibrate``);
other embedded models' profiles: :func:`ohd_guard.shipped.shipped_profiles`."""
OHD_PROFILE = SHIPPED_PROFILES["ohd"]
DEFAULT_PROFILE = default_profile()


def _shipped(args) -> dict[str, Path]:
    """The shipped profiles of ``--model`` (an embedded model's name; the default model otherwise)."""
    return shipped_profiles(getattr(args, "model", None))


def _load(args):
    from ohd_guard.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _layer_range(value: str | None, model) -> list[int] | None:
    """``"8-24"``, ``"12,18,24"`` or ``"all"`` -> score layers (1-based, as ``hidden_states`` indices)."""
    if value is None:
        return None
    from ohd_guard.adapters import get_adapter
    from ohd_guard.errors import InvalidInputError

    L = get_adapter(model).num_layers
    try:
        if value == "all":
            return list(range(1, L + 1))
        if "-" in value:
            a, b = (int(x) for x in value.split("-", 1))
            return list(range(a, b + 1))
        return [int(x) for x in value.split(",")]
    except ValueError:
        raise InvalidInputError(f"--score-layers: expected FIRST-LAST, a comma list or 'all', got {value!r}") from None


def _fit_items(args) -> tuple[list, list, list[str]]:
    """(fit items, held-out items, sources) for ``calibrate``: the project's calibration split (or
    ``--data``) plus ``--fit-shared`` sets read from the shared datasets folder at run time."""
    from ohd_guard.datasets import load_calibration_prompts, load_labelled_file, load_shared_parts, stratified

    if args.data:
        items, heldout_items, sources = load_labelled_file(args.data), [], [str(args.data)]
    else:
        items, heldout_items = load_calibration_prompts("calib"), load_calibration_prompts("heldout")
        sources = ["ohd_guard/data (calib split)"]
    extra, extra_sources = load_shared_parts(args.fit_shared or [])
    items, sources = items + extra, sources + extra_sources
    if args.limit:
        # spread over categories (seeded): the first N of a file are one source or one form
        items = stratified([p for p in items if p.label == 1], args.limit, seed=0) + stratified(
            [p for p in items if p.label == 0], args.limit, seed=0)
    return items, heldout_items, sources


def cmd_calibrate(args) -> int:
    items, heldout_items, sources = _fit_items(args)
    unsafe = [p for p in items if p.label == 1]
    safe = [p for p in items if p.label == 0]
    if args.detector != "ohd":
        return _calibrate_probe(args, unsafe, safe, heldout_items, sources)
    from ohd_guard.calibrate import calibrate
    from ohd_guard.masking import HeadRef, MaskSpec

    model, processor = _load(args)
    head = HeadRef(layer=args.head[0], head=args.head[1]) if args.head else None
    threshold = "kde" if args.target_fpr is None else args.target_fpr
    profile = calibrate(
        model, processor, unsafe, safe,
        spec=MaskSpec(target=args.target, positions=args.positions, alpha=args.alpha),
        score_layer=args.score_layer, score_layers=_layer_range(args.score_layers, model), head=head, strategy=args.strategy, top_k=args.top_k,
        percentile=args.percentile, rank_by=args.rank_by, threshold=threshold, batch_size=args.batch_size, progress=not args.quiet,
        heldout=(
            [p for p in heldout_items if p.label == 1], [p for p in heldout_items if p.label == 0]
        ) if heldout_items else None,
        sources=sources,
    )
    profile.save(args.output)
    print(f"head {profile.heads[0]}  score layer {profile.score_layer}  "
          f"threshold {profile.threshold.value:.4f} deg ({profile.threshold.method})  "
          f"search {profile.calibration.search} in {profile.calibration.seconds:.0f} s")
    print(_table([m.model_dump() for m in profile.metrics],
                 ["split", "n_unsafe", "n_safe", "auroc", "detection_rate", "false_positive_rate"]))
    print(_table([{"head": str(h.head), **h.model_dump(exclude={"head"})} for h in profile.top_heads[:10]],
                 ["head", "unsafe_mean", "safe_mean", "gap", "auroc", "eligible"]))
    print(f"profile written to {args.output}")
    return 0


def _calibrate_probe(args, unsafe: list, safe: list, heldout_items: list, sources: list[str]) -> int:
    """``calibrate --detector sahs|hiddendetect|fused``: fit, measure on the held-out split, save."""
    import time

    import numpy as np

    from ohd_guard.calibrate import evaluate_angles
    from ohd_guard.detectors import Fused, HiddenDetect, SAHs, save_state
    from ohd_guard.profile import Profile

    model, processor = _load(args)
    bs = args.batch_size
    if args.detector == "sahs":
        det = SAHs(top_k=args.heads, batch_size=bs)
    elif args.detector == "hiddendetect":
        det = HiddenDetect(batch_size=bs)
    else:
        ohd = Profile.load(args.ohd_profile or _shipped(args)["ohd"], allow_edited=args.allow_edited)
        det = Fused(ohd, n_angles=args.angles, sahs=SAHs(top_k=args.heads, batch_size=bs), batch_size=bs)
    t0 = time.perf_counter()
    if not args.quiet:
        print(f"[calibrate] fitting {det.name} on {len(unsafe)} unsafe + {len(safe)} safe prompts", file=sys.stderr, flush=True)
    det.fit(model, processor, unsafe, safe)
    state = det.state.model_copy(update={"sources": sources, "seconds": round(time.perf_counter() - t0, 2)})
    if heldout_items:
        u = [p for p in heldout_items if p.label == 1]
        s = [p for p in heldout_items if p.label == 0]
        scores = det.score(u + s)
        state = state.model_copy(update={"metrics": [*state.metrics, evaluate_angles(
            "heldout", np.asarray(scores[: len(u)]), np.asarray(scores[len(u):]), state.threshold)]})  # fmt: skip
    save_state(state, args.output)
    print(f"{det.name}: {_describe(det)}  in {state.seconds:.0f} s")
    print(_table([m.model_dump() for m in state.metrics],
                 ["split", "n_unsafe", "n_safe", "auroc", "detection_rate", "false_positive_rate"]))
    print(f"profile written to {args.output}")
    return 0


def _screen_input(args):
    if not args.image:
        return args.text
    content = [{"type": "image_url", "image_url": {"url": str(Path(p).resolve())}} for p in args.image]
    return [{"role": "user", "content": content + [{"type": "text", "text": args.text}]}]


def screen_json(verdict) -> dict:
    """What ``ohd-guard screen`` prints for a verdict of :meth:`OhdGuard.screen`."""
    rounded = (lambda x: None if x is None else round(float(x), 6))
    out = {
        "flagged": verdict.flagged, "angle": rounded(verdict.angle), "threshold": rounded(verdict.threshold),
        "risk": rounded(verdict.risk), "heads": [str(h) for h in verdict.heads], "mode": verdict.mode,
        "detector": verdict.detector, "score": rounded(verdict.score), "details": verdict.details,
        "reason": verdict.reason,
    }
    if verdict.error is not None:
        out["error"] = verdict.error
    return out


def cmd_screen(args) -> int:
    from ohd_guard.detectors import load_profile
    from ohd_guard.guard import OhdGuard

    for p in args.image or []:
        if not Path(p).is_file():
            args.parser.error(f"--image: no such file: {p}")
    if args.profile is None and args.detector not in _shipped(args):
        args.parser.error(f"no {args.detector} profile ships for {args.model or 'the default model'}: pass --profile")
    profile = load_profile(args.profile or _shipped(args)[args.detector], allow_edited=args.allow_edited)
    model, processor = _load(args)
    # the guard's own screening path (one-pass/two-pass, length limits, fail closed); the user's own
    # image files are theirs to read
    guard = OhdGuard(model, processor, profile, allow_local_files=True)
    verdict = guard.screen(_screen_input(args))
    print(json.dumps(screen_json(verdict), indent=2))
    return 2 if verdict.error is not None else 0


def cmd_inspect(args) -> int:
    from ohd_guard.detectors import load_profile
    from ohd_guard.profile import Profile

    p = load_profile(args.profile or DEFAULT_PROFILE, allow_edited=args.allow_edited)
    if args.json:
        print(p.model_dump_json(indent=2))
        return 0
    if not isinstance(p, Profile):
        m = p.model
        print(f"detector   {p.kind}")
        print(f"model      {m.architecture} ({m.model_type}, {m.num_layers} layers x {m.num_heads} heads, {m.dtype}) "
              f"weights {m.weights_hash[:12]}")
        print(f"fitted     {_describe_state(p)}")
        print(f"threshold  {p.threshold:.4f} ({p.threshold_method})")
        print(f"calibrated {p.n_unsafe}+{p.n_safe} prompts in {p.seconds:.0f} s, library {p.library_version}, {p.created_at}")
        for src in p.sources:
            print(f"  source   {src}")
        print(_table([x.model_dump() for x in p.metrics],
                     ["split", "n_unsafe", "n_safe", "auroc", "detection_rate", "false_positive_rate"]))
        return 0
    print(f"model      {p.model.architecture} ({p.model.model_type}, {p.model.num_layers} layers x "
          f"{p.model.num_heads} heads, {p.model.dtype}) weights {p.model.weights_hash[:12]}")
    print(f"heads      {', '.join(map(str, p.heads))}   mask {p.mask.target}/{p.mask.positions} alpha={p.mask.alpha:g}"
          f"   score layer {p.score_layer}")
    print(f"threshold  {p.threshold.value:.4f} deg ({p.threshold.method}), risk 0.5 at "
          f"{p.risk.angle_at_risk(0.5):.4f} deg")
    print(f"calibrated {p.calibration.n_unsafe}+{p.calibration.n_safe} prompts, {p.calibration.search}, "
          f"library {p.library_version}, {p.created_at}")
    print(_table([m.model_dump() for m in p.metrics],
                 ["split", "n_unsafe", "n_safe", "auroc", "detection_rate", "false_positive_rate"]))
    return 0


EVAL_DETECTORS: dict[str, str] = {
    "ohd": "the profile's One-head Defense as saved (head, mode and threshold from --profile)",
    "ohd-fast": "One-head Defense, last-position mask; head from the profile, threshold fitted on the fit data",
    "ohd-exact": "One-head Defense, mask at every position (paper); head from the profile, threshold fitted",
    "largest-effect": "the head moving unsafe prompts most, no selectivity rule (exact mode), fitted",
    "sahs": "logistic probe on the last-token outputs of the top 16 heads, fitted",
    "hiddendetect": "logit-lens refusal-token cosine over the best band of layers, fitted",
    "self-refusal": "the model's own greedy answer opens with a refusal phrase",
}
"""Detector names ``ohd-guard eval --detectors`` accepts."""


def _name_list(known, what: str, allow_empty: bool = False):
    """An argparse type: a comma-separated list of names from ``known``."""

    def parse(value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not (names or allow_empty):
            given = ", ".join(map(repr, unknown)) or "(none given)"
            raise argparse.ArgumentTypeError(f"unknown {what} {given}; choose from {', '.join(known)}")
        return names

    return parse


def _detector_list(value: str) -> list[str]:
    return _name_list(EVAL_DETECTORS, "detector(s)")(value)


def _shared_names(value: str) -> list[str]:
    from ohd_guard.datasets import SHARED_SETS

    return _name_list(SHARED_SETS, "shared set(s)", allow_empty=True)(value)


def _attack_names(value: str) -> list[str]:
    from ohd_guard.attacks import ATTACKS

    return _name_list(ATTACKS, "attack(s)")(value)


def _bounded_int(low: int, what: str):
    """An argparse type: an integer >= ``low``."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n

    return parse


_positive_int = _bounded_int(1, "a positive integer")
_non_negative_int = _bounded_int(0, "an integer >= 0")


def _round_robin(sets: list[list], n: int) -> list:
    out: list = []
    i = 0
    while len(out) < n and any(i < len(s) for s in sets):
        out += [s[i] for s in sets if i < len(s)][: n - len(out)]
        i += 1
    return out


def _describe(det) -> str:
    """One line on what a fitted or loaded detector chose."""
    profile = getattr(det, "profile", None)
    if profile is not None:
        return (f"head {profile.heads[0]}, mask positions {profile.mask.positions}, {profile.calibration.search}, "
                f"threshold {profile.threshold.value:.4g} deg ({profile.threshold.method})")
    s = getattr(det, "state", None)
    if s is None:
        return f"threshold {det.threshold:.4g}"
    return _describe_state(s)


def _describe_state(s) -> str:
    if s.kind == "fused":
        return (f"logistic on {', '.join(s.features)} (weights {', '.join(f'{c:.2f}' for c in s.coef)}), "
                f"SAHs {len(s.sahs.heads)} heads, mask {s.mask.positions}, CV AUROC {s.cv_auroc:.3f}")
    if s.kind == "sahs":
        return f"{len(s.heads)} heads (best {', '.join(map(str, s.heads[:4]))}), L2 {s.l2:g}, CV AUROC {s.cv_auroc:.3f}"
    if s.kind == "hiddendetect":
        return (f"band layers {s.band[0]}-{s.band[1]}, calibration AUROC {s.band_auroc:.3f}, "
                f"threshold {s.threshold:.4g} ({s.threshold_method})")
    return f"greedy {s.max_new_tokens} tokens, {len(s.markers)} refusal phrases"


class _Renamed:
    """A detector under another report name (two detectors of one kind in a run need distinct names)."""

    def __init__(self, inner, name: str):
        self.inner, self.name = inner, name

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


def _unique_names(entries: list[tuple[object, str]]) -> list:
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


def cmd_eval(args) -> int:
    import contextlib
    import time

    from ohd_guard.datasets import load_calibration_prompts, load_labelled_file, load_shared_set, per_class, stratified

    parser = args.parser
    shared = [n for group in args.shared for n in group]
    if not args.files and not shared and not args.project_heldout:
        parser.error("no sets to evaluate: give labelled CSV/JSONL files and/or --shared NAMES")
    names = [n for group in (args.detectors or []) for n in group]
    if args.detectors is None and not args.detector_file and not args.shipped:
        names = ["ohd"]
    names = list(dict.fromkeys(names))
    if not 0.0 < args.max_fpr < 1.0:
        parser.error(f"--max-fpr must be strictly between 0 and 1, got {args.max_fpr}")
    if args.roc:
        from ohd_guard.plot import require_matplotlib

        try:
            require_matplotlib()
        except ImportError:
            parser.error("--roc needs matplotlib: pip install 'ohd-guard[plot]' (or leave out --roc)")
    quiet = args.quiet
    log_out = sys.stderr

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=log_out, flush=True)

    # the sets first: a typo in a file name should not cost a model load
    sets: dict[str, list] = {}
    for f in args.files:
        key = Path(f).name if Path(f).name not in sets else str(f)
        sets[key] = per_class(load_labelled_file(f), args.limit)
    if args.project_heldout:
        held = load_calibration_prompts("heldout")
        sets["project heldout"] = held  # whole: it is what the profiles' held-out numbers are measured on
        sets["project look-alike pairs"] = [p for p in held if p.category.startswith("contrast_")]
    for name in shared:
        sets[name] = load_shared_set(name, limit=args.limit if name == "figstep_images" else None)
    if args.dedupe_fit:  # numbers only on items the shipped (or --fit-data) detectors were not fitted on
        from ohd_guard.datasets import dedupe_against, shipped_fit_items

        fit = shipped_fit_items()[0] + (load_labelled_file(args.fit_data) if args.fit_data else [])
        for name in list(sets):
            if not name.startswith("project "):  # the project's held-out split is disjoint by construction
                kept = dedupe_against(sets[name], fit)
                say(f"[eval] {name}: {len(sets[name]) - len(kept)} items dropped (duplicates of fit data or within the set)")
                sets[name] = kept
    for name in shared:
        if name != "figstep_images":
            sets[name] = per_class(sets[name], args.limit)
    attacks, seeds = None, []
    if args.attacks:
        from ohd_guard.attacks import ATTACKS, make_attacks
        from ohd_guard.errors import InvalidInputError

        pools = [[p for p in items if p.label == 1 and p.image is None and p.text.strip()] for items in sets.values()]
        seeds = _round_robin(pools, args.attack_seeds)
        if not seeds:
            raise InvalidInputError("--attacks: the sets hold no text-only unsafe items to build the attacks from")
        attacks = make_attacks(seeds, attacks=args.attack_names or ATTACKS)

    from ohd_guard.detectors import (
        HiddenDetect, LargestEffectHead, OneHeadDefense, SAHs, SelfRefusal, load_detector, shared_prefill,
    )
    from ohd_guard.evaluation import evaluate
    from ohd_guard.profile import Profile

    model, processor = _load(args)
    bs = args.batch_size
    entries: list[tuple[object, str]] = []
    notes: list[str] = []
    profile = None
    if "ohd" in names or {"ohd-fast", "ohd-exact"} & set(names):
        profile_path = args.profile or _shipped(args).get("ohd", OHD_PROFILE)
        loaded = Profile.load(profile_path, allow_edited=args.allow_edited)
        if args.profile is not None or "ohd" in names:
            loaded.verify(model, processor)  # ProfileMismatchError: exit 2 with the reason
            profile = loaded
        else:  # only the head is wanted, and the shipped profile need not fit a user's model
            from ohd_guard.errors import ProfileMismatchError

            try:
                loaded.verify(model, processor)
                profile = loaded
            except ProfileMismatchError:
                say("[eval] the shipped profile is for another model: "
                    "One-head Defense searches its head (fast strategy)")
        if "ohd" in names:
            det = OneHeadDefense.from_profile(profile, model, processor, batch_size=bs)
            entries.append((det, "profile"))
            notes.append(f"{det.name} from profile {profile_path}: {_describe(det)}")
    detector_files = list(args.detector_file)
    if args.shipped:
        detector_files += [p for k, p in _shipped(args).items() if not (k == "ohd" and "ohd" in names)]
    for path in detector_files:
        det = load_detector(path, model, processor, allow_edited=args.allow_edited)
        if hasattr(det, "batch_size"):
            det.batch_size = bs
        entries.append((det, Path(path).name))
        notes.append(f"{det.name} loaded from {path}: {_describe(det)}")

    # the profile's head, mask target and score layer; only the position mode and the threshold change
    same = {} if profile is None else {"head": profile.heads[0], "mask": profile.mask, "score_layer": profile.score_layer}
    factories = {
        "ohd-fast": lambda: OneHeadDefense("fast", strategy="fast", batch_size=bs, **same),
        "ohd-exact": lambda: OneHeadDefense("exact", strategy="fast", batch_size=bs, **same),
        "largest-effect": lambda: LargestEffectHead("exact", top_k=4, search_per_class=16, batch_size=bs),
        "sahs": lambda: SAHs(top_k=16, batch_size=bs),
        "hiddendetect": lambda: HiddenDetect(batch_size=bs),
        "self-refusal": lambda: SelfRefusal(max_new_tokens=args.max_new_tokens, batch_size=bs),
    }
    to_fit = [n for n in names if n in factories]
    if to_fit:
        if args.fit_data:
            fit_items, fit_src = load_labelled_file(args.fit_data), str(args.fit_data)
        else:
            fit_items, fit_src = load_calibration_prompts("calib"), "the project's calibration split"
        unsafe = stratified([p for p in fit_items if p.label == 1], args.fit_per_class)
        safe = stratified([p for p in fit_items if p.label == 0], args.fit_per_class)
        with shared_prefill():  # SAHs and HiddenDetect read the same prefill
            for n in to_fit:
                t0 = time.perf_counter()
                det = factories[n]().fit(model, processor, unsafe, safe)
                say(f"[fit] {det.name}: {time.perf_counter() - t0:.1f} s, {_describe(det)}")
                entries.append((det, "fitted"))
                notes.append(f"{det.name} fitted on {len(unsafe)} unsafe + {len(safe)} safe prompts of {fit_src}: "
                             f"{_describe(det)}")
                if args.save_fitted:
                    saved = det.save(args.save_fitted / f"{n}.json")
                    say(f"[fit] {det.name} saved to {saved}")
    detectors = _unique_names(entries)

    redirect = contextlib.redirect_stdout(log_out)  # evaluate's progress lines: stderr; the table: stdout
    with redirect:
        report = evaluate(detectors, sets, attacks=attacks, max_fpr=args.max_fpr,
                          latency_prompts=args.latency_prompts, progress=not quiet)
    if attacks:
        notes.append(f"attacks built from {len(seeds)} unsafe text items of the sets (round-robin over the sets)")
    report.notes.extend(notes)
    markdown = report.to_markdown()
    print(markdown, end="")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
        say(f"[eval] markdown written to {args.markdown}")
    if args.json:
        report.save_json(args.json)
        say(f"[eval] JSON report written to {args.json}")
    if args.roc:
        report.plot_roc(args.roc)
        say(f"[eval] ROC curves written to {args.roc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ohd-guard", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log at INFO and show transformers' warnings and weight-loading progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default=None,
                        help="an embedded model's name (qwen2.5-coder-0.5b-instruct, the default; qwen2.5-coder-1.5b-instruct; "
                             "gemma3-270m: each picks its shipped profiles), a local HF folder or a .gguf file")
        sp.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1, mps, ...")
        sp.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
        sp.add_argument("--batch-size", type=int, default=8, help="conversations per batched prefill (default 8)")

    c = sub.add_parser("calibrate", help="fit a detector (One-head Defense: search the head) and write its profile")
    model_args(c)
    c.add_argument("--detector", choices=["ohd", "sahs", "hiddendetect", "fused"], default="ohd",
                   help="ohd (One-head Defense, default), sahs (probe on the top heads), hiddendetect (logit-lens "
                        "refusal cosine) or fused (logistic on OhD angles and the SAHs log-odds)")
    c.add_argument("--data", type=Path, help="labelled CSV/JSONL (default: the project's calibration prompts)")
    c.add_argument("--fit-shared", action="append", default=[], metavar="NAME[:N]",
                   help="also fit on N items (all without :N), evenly spread, of a shared set (repeatable)")
    c.add_argument("--output", "-o", type=Path, required=True, help="where the profile JSON is written")
    c.add_argument("--heads", type=_positive_int, default=16, help="sahs/fused: heads in the probe (default 16)")
    c.add_argument("--angles", type=_positive_int, default=1,
                   help="fused: selective heads whose angles are features (default 1: one-pass screening)")
    c.add_argument("--ohd-profile", type=Path, default=None,
                   help="fused: the One-head Defense profile giving mask, score layer and heads (default: shipped)")
    c.add_argument("--allow-edited", action="store_true", help="fused: accept an --ohd-profile edited after calibration")
    c.add_argument("--strategy", choices=["two-stage", "exact", "fast"], default="two-stage",
                   help="ohd head search: fast mask on all heads then exact on the top k (default), or one mode only")
    c.add_argument("--target", choices=["query", "output"], default="query",
                   help="ohd: mask the head's query (paper, default) or its output")
    c.add_argument("--positions", choices=["all", "last"], default="last",
                   help="last (default: fast, and better held-out AUROC on the embedded model) or all (paper-exact)")
    c.add_argument("--alpha", type=float, default=1e-5, help="ohd: soft mask scale (default 1e-5)")
    c.add_argument("--score-layer", type=int, default=None, help="read the angle after this decoder layer (default: last, after the final norm)")
    c.add_argument("--score-layers", default=None, metavar="FIRST-LAST|all",
                   help="search the score layer with the head among these (e.g. 8-24); one replay serves them all")
    c.add_argument("--head", type=int, nargs=2, metavar=("LAYER", "HEAD"), help="fix the head, skip the search")
    c.add_argument("--top-k", type=int, default=8, help="ohd: heads re-scored in the second search stage")
    c.add_argument("--percentile", type=float, default=80.0,
                   help="ohd selectivity rule: keep heads whose safe angle is below this percentile over all heads")
    c.add_argument("--rank-by", choices=["gap", "auroc"], default="auroc",
                   help="rank selective heads by AUROC (default; picked better heads on held-out prompts) or mean-angle gap (paper)")
    c.add_argument("--target-fpr", type=float, default=None, help="threshold for this FPR instead of the KDE crossing")
    c.add_argument("--limit", type=int, default=None, help="use at most N unsafe and N safe prompts, spread evenly over categories")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    c.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("screen", help="screen one prompt (and images); prints the verdict as JSON")
    model_args(s)
    s.add_argument("text")
    s.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    s.add_argument("--profile", type=Path, default=None, help="profile JSON of any detector (default: the shipped one of --detector)")
    s.add_argument("--detector", choices=list(KINDS), default=DEFAULT_DETECTOR,
                   help=f"which shipped profile screens when --profile is not given (default: {DEFAULT_DETECTOR})")
    s.add_argument("--allow-edited", action="store_true", help="load a profile edited after calibration, or written before profiles had a digest (logs a warning)")
    s.set_defaults(func=cmd_screen, parser=s)

    i = sub.add_parser("inspect", help="show a profile")
    i.add_argument("profile", type=Path, nargs="?", default=None, help="profile JSON of any detector (default: the shipped default)")
    i.add_argument("--json", action="store_true", help="print the whole profile as JSON")
    i.add_argument("--allow-edited", action="store_true", help="load a profile edited after calibration, or written before profiles had a digest (logs a warning)")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser(
        "eval", help="DR, FPR, AUROC, TPR@5%%FPR, per-category rates and latency of detectors on labelled sets",
        description="Evaluate the guard's detectors (shipped or fitted here) and peer baselines on labelled files\n"
                    "and shared sets;\n"
                    "prints a markdown report (see docs/cli.md and docs/evaluation.md).",
        epilog="detectors:\n" + "\n".join(f"  {k:<15} {v}" for k, v in EVAL_DETECTORS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_args(e)
    e.add_argument("files", nargs="*", type=Path, help="labelled CSV/JSONL files (text,label[,category,image])")
    e.add_argument("--shared", nargs="*", type=_shared_names, default=[], metavar="NAME",
                   help="sets of the shared datasets folder, space- or comma-separated (docs/evaluation.md lists them)")
    e.add_argument("--project-heldout", action="store_true",
                   help="also evaluate the project's held-out split, and its look-alike/harmful-twin pairs on their own")
    e.add_argument("--dedupe-fit", action="store_true",
                   help="drop items of the sets that duplicate the shipped profiles' fit data (and --fit-data)")
    e.add_argument("--shipped", action="store_true",
                   help="evaluate every profile shipped for --model (an embedded model; ohd, sahs, hiddendetect, fused)")
    e.add_argument("--profile", type=Path, default=None,
                   help="profile for 'ohd' (and the head of ohd-fast/ohd-exact); default: the shipped one")
    e.add_argument("--allow-edited", action="store_true", help="load a profile edited after calibration, or written before profiles had a digest (logs a warning)")
    e.add_argument("--detectors", type=_detector_list, action="append", default=None, metavar="NAMES",
                   help="comma-separated, from: " + ", ".join(EVAL_DETECTORS) + " (default: ohd; "
                        "none when --detector-file is given)")
    e.add_argument("--detector-file", type=Path, action="append", default=[], metavar="PATH",
                   help="a saved detector (profile or detector state JSON) to evaluate as well (repeatable)")
    e.add_argument("--fit-data", type=Path, default=None,
                   help="labelled CSV/JSONL the detectors named in --detectors are fitted on "
                        "(default: the project's calibration split)")
    e.add_argument("--fit-per-class", type=_positive_int, default=None, metavar="N",
                   help="fit on at most N unsafe and N safe prompts, spread over categories")
    e.add_argument("--save-fitted", type=Path, default=None, metavar="DIR",
                   help="save every detector fitted in this run to DIR/<name>.json (reload with --detector-file)")
    e.add_argument("--max-new-tokens", type=_positive_int, default=24, help="answer length of self-refusal")
    e.add_argument("--attacks", action="store_true",
                   help="also evaluate the adaptive-attack suite built from the unsafe text items of the sets")
    e.add_argument("--attack-seeds", type=_positive_int, default=10, metavar="N",
                   help="unsafe items the attacks are built from (round-robin over the sets; default 10)")
    e.add_argument("--attack-names", type=_attack_names, default=None, metavar="NAMES",
                   help="comma-separated subset of the attacks (default: all)")
    e.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="at most N unsafe and N safe items per set, evenly spread through it")
    e.add_argument("--max-fpr", type=float, default=0.05, help="FPR budget of the TPR@FPR column (default 0.05)")
    e.add_argument("--latency-prompts", type=_non_negative_int, default=8, metavar="N",
                   help="prompts timed one at a time against an unguarded prefill (0: skip; default 8)")
    e.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="also write the markdown report here")
    e.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the full report (every score) as JSON (ohd_guard.evaluation.EvalReport)")
    e.add_argument("--roc", type=Path, default=None, metavar="PATH", help="ROC curves as PNG (needs matplotlib)")
    e.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    e.set_defaults(func=cmd_eval, parser=e)
    from ohd_guard.serve.cli import add_parser as add_serve_parser  # FastAPI/Ray are imported only when serving

    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ohd_guard.hf_internals import quiet_transformers

    quiet_transformers(not args.verbose)
    try:
        return args.func(args)
    except OhdGuardError as e:
        print(f"ohd-guard: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
