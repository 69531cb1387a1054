"""``ohd-guard inspect``: show a profile of any detector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ohd_guard.cli.common import DEFAULT_PROFILE, METRIC_COLUMNS, describe_profile, table


def cmd_inspect(args) -> int:
    from ohd_guard.detectors import load_profile

    p: Any = load_profile(args.profile or DEFAULT_PROFILE, allow_edited=args.allow_edited)  # an OhdProfile past the kind check
    if args.json:
        print(p.model_dump_json(indent=2))
        return 0
    if p.kind != "ohd":
        m = p.model
        print(f"detector   {p.kind}")
        print(f"model      {m.architecture} ({m.model_type}, {m.num_layers} layers x {m.num_heads} heads, {m.dtype}) "
              f"weights {m.weights_hash[:12]}")
        print(f"fitted     {describe_profile(p)}")
        print(f"threshold  {p.threshold:.4f} ({p.threshold_method})")
        print(f"calibrated {p.n_unsafe}+{p.n_safe} prompts in {p.seconds:.0f} s, library {p.library_version}, {p.created_at}")
        for src in p.sources:
            print(f"  source   {src}")
        print(table([x.model_dump() for x in p.metrics], METRIC_COLUMNS))
        return 0
    print(f"model      {p.model.architecture} ({p.model.model_type}, {p.model.num_layers} layers x "
          f"{p.model.num_heads} heads, {p.model.dtype}) weights {p.model.weights_hash[:12]}")
    print(f"heads      {', '.join(map(str, p.heads))}   mask {p.mask.target}/{p.mask.positions} alpha={p.mask.alpha:g}"
          f"   score layer {p.score_layer}")
    print(f"threshold  {p.threshold:.4f} deg ({p.threshold_method}), risk 0.5 at "
          f"{p.risk.angle_at_risk(0.5):.4f} deg")
    print(f"calibrated {p.n_unsafe}+{p.n_safe} prompts, {p.search}, "
          f"library {p.library_version}, {p.created_at}")
    print(table([m.model_dump() for m in p.metrics], METRIC_COLUMNS))
    return 0


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="show a profile")
    i.add_argument("profile", type=Path, nargs="?", default=None, help="profile JSON of any detector (default: the shipped default)")
    i.add_argument("--json", action="store_true", help="print the whole profile as JSON")
    i.add_argument("--allow-edited", action="store_true", help="load a profile edited after calibration, or written before profiles had a digest (logs a warning)")
    i.set_defaults(func=cmd_inspect)
