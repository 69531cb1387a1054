"""``ohd-guard screen``: screen prompts (and images) with one model load; one JSON verdict per line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ohd_guard.cli.common import load_model, model_args, shipped
from ohd_guard.shipped import DEFAULT_DETECTOR, KINDS


def _read_lines(lines, where: str) -> list:
    """Prompts from text lines: a JSON object line is ``{"text": ...}`` or ``{"messages": [...]}``, a
    JSON string line is that string, any other line is the prompt itself; empty lines are skipped."""
    from ohd_guard.errors import InvalidInputError

    out = []
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        value = line
        if line.lstrip()[:1] in '{"':
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"{where}:{n}: not valid JSON: {e}") from None
        if isinstance(value, dict):
            if isinstance(value.get("messages"), list):
                value = value["messages"]
            elif isinstance(value.get("text"), str):
                value = value["text"]
            else:
                raise InvalidInputError(f"{where}:{n}: a JSON object needs a 'text' string or a 'messages' list")
        elif not isinstance(value, str):
            raise InvalidInputError(f"{where}:{n}: expected a prompt, a JSON string or a JSON object")
        out.append(value)
    return out


def _inputs(args) -> list:
    """Every prompt to screen, in order: the positional texts (``-`` reads stdin), then ``--file``."""
    items: list = []
    for text in args.text:
        items += _read_lines(sys.stdin, "<stdin>") if text == "-" else [text]
    for f in args.file:
        with open(f, encoding="utf-8") as fh:
            items += _read_lines(fh, str(f))
    if args.image:
        if len(items) != 1 or not isinstance(items[0], str):
            args.parser.error("--image goes with exactly one text prompt")
        content = [{"type": "image_url", "image_url": {"url": str(Path(p).resolve())}} for p in args.image]
        items = [[{"role": "user", "content": content + [{"type": "text", "text": items[0]}]}]]
    return items


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
    """Exit 2 when any prompt could not be screened, else 1 with ``--fail-on-flag`` and a flag, else 0."""
    from ohd_guard.detectors import load_profile
    from ohd_guard.guard import OhdGuard

    for p in [*args.image, *args.file]:
        if not Path(p).is_file():
            args.parser.error(f"no such file: {p}")
    if not args.text and not args.file:
        args.parser.error("nothing to screen: give prompts, --file PATH, or - for stdin")
    if args.text.count("-") > 1:
        args.parser.error("'-' (stdin) may be given once")
    if args.profile is None and args.detector not in shipped(args):
        args.parser.error(f"no {args.detector} profile ships for {args.model or 'the default model'}: pass --profile")
    items = _inputs(args)  # before the model loads: a bad file costs nothing
    if not items:
        args.parser.error("nothing to screen: the input has no prompts")
    profile = load_profile(args.profile or shipped(args)[args.detector], allow_edited=args.allow_edited)
    model, processor = load_model(args)
    # the guard's own screening path (one-pass/two-pass, length limits, fail closed, blank input refused);
    # the user's own image files are theirs to read
    guard = OhdGuard(model, processor, profile, allow_local_files=True, max_batch_size=args.batch_size)
    verdicts = guard.screen_batch(items)
    for v in verdicts:
        print(json.dumps(screen_json(v)), flush=True)
    if any(v.error is not None for v in verdicts):
        return 2
    return 1 if args.fail_on_flag and any(v.flagged for v in verdicts) else 0


def add_parser(sub) -> None:
    s = sub.add_parser("screen", help="screen prompts (and images) with one model load; one JSON verdict per line")
    model_args(s)
    s.add_argument("text", nargs="*", help="prompts to screen; '-' reads prompts from stdin, one per line "
                   "(plain text, a JSON string, or a JSON object with 'text' or 'messages')")
    s.add_argument("--file", type=Path, action="append", default=[],
                   help="prompts from a file, one per line, read as stdin is (repeatable)")
    s.add_argument("--image", action="append", default=[], help="image file (repeatable; with one text prompt)")
    s.add_argument("--fail-on-flag", action="store_true", help="exit 1 when any prompt is flagged")
    s.add_argument("--profile", type=Path, default=None, help="profile JSON of any detector (default: the shipped one of --detector)")
    s.add_argument("--detector", choices=list(KINDS), default=DEFAULT_DETECTOR,
                   help=f"which shipped profile screens when --profile is not given (default: {DEFAULT_DETECTOR})")
    s.add_argument("--allow-edited", action="store_true", help="load a profile edited after calibration, or written before profiles had a digest (logs a warning)")
    s.set_defaults(func=cmd_screen, parser=s)
