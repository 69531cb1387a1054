"""``ohd-guard eval``: DR, FPR, AUROC, per-category rates and latency of detectors on labelled sets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ohd_guard.cli.common import (
    OHD_PROFILE, describe, load_model, model_args, name_list, non_negative_int, positive_int, shipped,
)
from ohd_guard.shipped import DEFAULT_DETECTOR


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


def _detector_list(value: str) -> list[str]:
    return name_list(EVAL_DETECTORS, "detector(s)")(value)


def _shared_names(value: str) -> list[str]:
    from ohd_guard.datasets import SHARED_SETS

    return name_list(SHARED_SETS, "shared set(s)", allow_empty=True)(value)


def _attack_names(value: str) -> list[str]:
    from ohd_guard.attacks import ATTACKS

    return name_list(ATTACKS, "attack(s)")(value)


def _context_names(value: str) -> list[str]:
    from ohd_guard.contexts import CONTEXT_KINDS

    return name_list(CONTEXT_KINDS, "context(s)")(value)


def _round_robin(sets: list[list], n: int) -> list:
    out: list = []
    i = 0
    while len(out) < n and any(i < len(s) for s in sets):
        out += [s[i] for s in sets if i < len(s)][: n - len(out)]
        i += 1
    return out


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
    default_file = None  # nothing named: the --profile given (any kind), else the shipped default kind's
    if args.detectors is None and not args.detector_file and not args.shipped:
        if args.profile is not None:
            from ohd_guard.detectors import load_profile

            if load_profile(args.profile, allow_edited=args.allow_edited).kind == "ohd":
                names = ["ohd"]
            else:
                default_file = args.profile
        else:
            default_file = shipped(args).get(DEFAULT_DETECTOR)
            if default_file is None:
                names = [DEFAULT_DETECTOR]
    names = list(dict.fromkeys(names))
    if args.context_limit is not None and not args.contexts:
        parser.error("--context-limit needs --contexts")
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
    placed: dict = {}
    if args.contexts:  # each set's items in every context, bare first; attacks stay as built above
        from ohd_guard.evaluation_contexts import context_sets, set_name

        if args.project_heldout:  # a subset of the held-out split, which is placed whole
            sets.pop("project look-alike pairs")
        placed, context_notes = context_sets(sets, [k for group in args.contexts for k in group],
                                             per_class=args.context_limit)
        for n in context_notes:
            say(f"[eval] {n}")
        sets = {set_name(*k): v for k, v in placed.items()}

    from ohd_guard.detectors import (
        HiddenDetect, LargestEffectHead, OneHeadDefense, SAHs, SelfRefusal, load_detector, shared_prefill,
    )
    from ohd_guard.evaluation import evaluate
    from ohd_guard.detectors import OhdProfile

    model, processor = load_model(args)
    bs = args.batch_size
    entries: list[tuple[object, str]] = []
    notes: list[str] = []
    profile = None
    if "ohd" in names or {"ohd-fast", "ohd-exact"} & set(names):
        profile_path = args.profile or shipped(args).get("ohd", OHD_PROFILE)
        loaded = OhdProfile.load(profile_path, allow_edited=args.allow_edited)
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
            det = OneHeadDefense.from_profile(profile, model, processor)
            det.batch_size = bs
            entries.append((det, "profile"))
            notes.append(f"{det.name} from profile {profile_path}: {describe(det)}")
    detector_files = list(args.detector_file)
    if args.shipped:
        detector_files += [p for k, p in shipped(args).items() if not (k == "ohd" and "ohd" in names)]
    if default_file is not None:
        from ohd_guard.errors import ProfileMismatchError

        try:
            det = load_detector(default_file, model, processor, allow_edited=args.allow_edited)
            detector_files.append(default_file)
        except ProfileMismatchError as e:
            if default_file == args.profile:
                raise
            say(f"[eval] the shipped {DEFAULT_DETECTOR} profile is for another model ({e}): "
                f"fitting {DEFAULT_DETECTOR} on the fit data instead")
            names = [DEFAULT_DETECTOR]
    for path in detector_files:
        det = load_detector(path, model, processor, allow_edited=args.allow_edited)
        if hasattr(det, "batch_size"):
            det.batch_size = bs
        entries.append((det, Path(path).name))
        notes.append(f"{det.name} loaded from {path}: {describe(det)}")

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
                say(f"[fit] {det.name}: {time.perf_counter() - t0:.1f} s, {describe(det)}")
                entries.append((det, "fitted"))
                notes.append(f"{det.name} fitted on {len(unsafe)} unsafe + {len(safe)} safe prompts of {fit_src}: "
                             f"{describe(det)}")
                if args.save_fitted:
                    saved = det.save(args.save_fitted / f"{n}.json")
                    say(f"[fit] {det.name} saved to {saved}")
    detectors = _unique_names(entries)

    redirect = contextlib.redirect_stdout(log_out)  # evaluate's progress lines: stderr; the table: stdout
    with redirect:
        report = evaluate(detectors, sets, attacks=attacks, max_fpr=args.max_fpr,
                          latency_prompts=args.latency_prompts, progress=not quiet)
    if placed:
        notes.extend(context_notes)
    if attacks:
        notes.append(f"attacks built from {len(seeds)} unsafe text items of the sets (round-robin over the sets)")
    report.notes.extend(notes)
    markdown = report.to_markdown()
    if placed:  # the per-context tables first: they are what --contexts asks for
        from ohd_guard.evaluation_contexts import context_markdown

        markdown = context_markdown(report, placed) + "\n" + markdown
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


def add_parser(sub) -> None:
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
                   help="comma-separated, from: " + ", ".join(EVAL_DETECTORS) + " (default: the --profile given, "
                        f"else the shipped {DEFAULT_DETECTOR} profile of --model, the guard's default kind, fitted "
                        "on the fit data when the model has none; none when --detector-file is given)")
    e.add_argument("--detector-file", type=Path, action="append", default=[], metavar="PATH",
                   help="a saved detector (profile or detector state JSON) to evaluate as well (repeatable)")
    e.add_argument("--fit-data", type=Path, default=None,
                   help="labelled CSV/JSONL the detectors named in --detectors are fitted on "
                        "(default: the project's calibration split)")
    e.add_argument("--fit-per-class", type=positive_int, default=None, metavar="N",
                   help="fit on at most N unsafe and N safe prompts, spread over categories")
    e.add_argument("--save-fitted", type=Path, default=None, metavar="DIR",
                   help="save every detector fitted in this run to DIR/<name>.json (reload with --detector-file)")
    e.add_argument("--max-new-tokens", type=positive_int, default=24, help="answer length of self-refusal")
    e.add_argument("--attacks", action="store_true",
                   help="also evaluate the adaptive-attack suite built from the unsafe text items of the sets")
    e.add_argument("--attack-seeds", type=positive_int, default=10, metavar="N",
                   help="unsafe items the attacks are built from (round-robin over the sets; default 10)")
    e.add_argument("--attack-names", type=_attack_names, default=None, metavar="NAMES",
                   help="comma-separated subset of the attacks (default: all)")
    e.add_argument("--contexts", type=_context_names, action="append", default=None, metavar="NAMES",
                   help="evaluate every set's text items placed in these contexts instead (comma-separated, from: "
                        "bare, tools, rag, history, operator, jailbreak, padding; bare is always added) with "
                        "held-out context material: DR/FPR/AUROC per context and the change from bare")
    e.add_argument("--context-limit", type=positive_int, default=None, metavar="N",
                   help="with --contexts: place at most N unsafe and N safe items of each set, evenly spread through it "
                        "(also the project's held-out split, which --limit leaves whole)")
    e.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="at most N unsafe and N safe items per set, evenly spread through it")
    e.add_argument("--max-fpr", type=float, default=0.05, help="FPR budget of the TPR@FPR column (default 0.05)")
    e.add_argument("--latency-prompts", type=non_negative_int, default=8, metavar="N",
                   help="prompts timed one at a time against an unguarded prefill (0: skip; default 8)")
    e.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="also write the markdown report here")
    e.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the full report (every score) as JSON (ohd_guard.evaluation.EvalReport)")
    e.add_argument("--roc", type=Path, default=None, metavar="PATH", help="ROC curves as PNG (needs matplotlib)")
    e.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    e.set_defaults(func=cmd_eval, parser=e)
