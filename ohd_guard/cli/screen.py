"""``ohd-guard screen``: screen one prompt (and images) and print the verdict as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ohd_guard.cli.common import load_model, model_args, shipped
from ohd_guard.shipped import DEFAULT_DETECTOR, KINDS


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
    if args.profile is None and args.detector not in shipped(args):
        args.parser.error(f"no {args.detector} profile ships for {args.model or 'the default model'}: pass --profile")
    profile = load_profile(args.profile or shipped(args)[args.detector], allow_edited=args.allow_edited)
    model, processor = load_model(args)
    # the guard's own screening path (one-pass/two-pass, length limits, fail closed); the user's own
    # image files are theirs to read
    guard = OhdGuard(model, processor, profile, allow_local_files=True)
    verdict = guard.screen(_screen_input(args))
    print(json.dumps(screen_json(verdict), indent=2))
    return 2 if verdict.error is not None else 0


def add_parser(sub) -> None:
    s = sub.add_parser("screen", help="screen one prompt (and images); prints the verdict as JSON")
    model_args(s)
    s.add_argument("text")
    s.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    s.add_argument("--profile", type=Path, default=None, help="profile JSON of any detector (default: the shipped one of --detector)")
    s.add_argument("--detector", choices=list(KINDS), default=DEFAULT_DETECTOR,
                   help=f"which shipped profile screens when --profile is not given (default: {DEFAULT_DETECTOR})")
    s.add_argument("--allow-edited", action="store_true", help="load a profile edited after calibration, or written before profiles had a digest (logs a warning)")
    s.set_defaults(func=cmd_screen, parser=s)
