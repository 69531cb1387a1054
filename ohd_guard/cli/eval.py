"""``ohd-guard eval``: DR, FPR, AUROC, per-category rates and latency of detectors on labelled sets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ohd_guard.cli.common import describe, load_model, model_args, name_list, non_negative_int, positive_int
from ohd_guard.eval_run import EVAL_DETECTORS
from ohd_guard.shipped import DEFAULT_DETECTOR


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


def cmd_eval(args) -> int:
    import contextlib

    from ohd_guard.eval_run import EvalPlan, build_detectors, default_detectors, load_sets

    parser = args.parser
    shared = [n for group in args.shared for n in group]
    if not args.files and not shared and not args.project_heldout:
        parser.error("no sets to evaluate: give labelled CSV/JSONL files and/or --shared NAMES")
    names = [n for group in (args.detectors or []) for n in group]
    default_file = None  # nothing named: the --profile given (any kind), else the shipped default kind's
    if args.detectors is None and not args.detector_file and not args.shipped:
        names, default_file = default_detectors(args.profile, args.model, allow_edited=args.allow_edited)
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
    sets = load_sets(args.files, shared, project_heldout=args.project_heldout, dedupe_fit=args.dedupe_fit,
                     fit_data=args.fit_data, limit=args.limit, attacks=args.attacks, attack_seeds=args.attack_seeds,
                     attack_names=args.attack_names,
                     contexts=[k for group in args.contexts for k in group] if args.contexts else None,
                     context_limit=args.context_limit, say=say)
    model, processor = load_model(args)
    detectors, notes = build_detectors(
        model, processor, names, profile=args.profile, model_name=args.model, detector_files=args.detector_file,
        use_shipped=args.shipped, default_file=default_file, allow_edited=args.allow_edited, fit_data=args.fit_data,
        fit_per_class=args.fit_per_class, save_fitted=args.save_fitted, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, describe=describe, say=say)
    plan = EvalPlan(sets, detectors, notes, max_fpr=args.max_fpr, latency_prompts=args.latency_prompts)
    with contextlib.redirect_stdout(log_out):  # evaluate's progress lines: stderr; the table: stdout
        report = plan.run(progress=not quiet)
    markdown = plan.markdown(report)
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
                        "bare, tools, rag, history, operator, structured, jailbreak, padding; bare is always added) with "
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
