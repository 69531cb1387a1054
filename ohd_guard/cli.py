"""The ``ohd-guard`` command: calibrate, screen, inspect, eval."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ohd_guard.errors import OhdGuardError

DEFAULT_PROFILE = Path(__file__).parent / "profiles" / "qwen2.5-coder-0.5b-instruct.json"
"""Profile shipped for the embedded default model (written by ``ohd-guard calibrate``)."""


def _load(args):
    from ohd_guard.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def cmd_calibrate(args) -> int:
    from ohd_guard.calibrate import calibrate
    from ohd_guard.datasets import load_calibration_prompts, load_labelled_file
    from ohd_guard.masking import HeadRef, MaskSpec

    if args.data:
        items = load_labelled_file(args.data)
        heldout_items: list = []
        sources = [str(args.data)]
    else:
        items = load_calibration_prompts("calib")
        heldout_items = load_calibration_prompts("heldout")
        sources = ["ohd_guard/data/calibration_prompts.jsonl (calib split)"]
    if args.limit:
        items = [p for p in items if p.label == 1][: args.limit] + [p for p in items if p.label == 0][: args.limit]
    unsafe = [p for p in items if p.label == 1]
    safe = [p for p in items if p.label == 0]
    model, processor = _load(args)
    head = HeadRef(layer=args.head[0], head=args.head[1]) if args.head else None
    threshold = "kde" if args.target_fpr is None else args.target_fpr
    profile = calibrate(
        model, processor, unsafe, safe,
        spec=MaskSpec(target=args.target, positions=args.positions, alpha=args.alpha),
        score_layer=args.score_layer, head=head, strategy=args.strategy, top_k=args.top_k,
        percentile=args.percentile, rank_by=args.rank_by, threshold=threshold, batch_size=args.batch_size, progress=not args.quiet,
        heldout=(
            [p for p in heldout_items if p.label == 1], [p for p in heldout_items if p.label == 0]
        ) if heldout_items else None,
        sources=sources,
    )
    profile.save(args.output)
    print(f"head {profile.heads[0]}  threshold {profile.threshold.value:.4f} deg ({profile.threshold.method})  "
          f"search {profile.calibration.search} in {profile.calibration.seconds:.0f} s")
    print(_table([m.model_dump() for m in profile.metrics],
                 ["split", "n_unsafe", "n_safe", "auroc", "detection_rate", "false_positive_rate"]))
    print(_table([{"head": str(h.head), **h.model_dump(exclude={"head"})} for h in profile.top_heads[:10]],
                 ["head", "unsafe_mean", "safe_mean", "gap", "auroc", "eligible"]))
    print(f"profile written to {args.output}")
    return 0


def _screen_input(args):
    if not args.image:
        return args.text
    content = [{"type": "image_url", "image_url": {"url": str(Path(p).resolve())}} for p in args.image]
    return [{"role": "user", "content": content + [{"type": "text", "text": args.text}]}]


def cmd_screen(args) -> int:
    from ohd_guard.conversation import to_conversation
    from ohd_guard.profile import Profile
    from ohd_guard.scoring import DeflectionScorer

    profile = Profile.load(args.profile or DEFAULT_PROFILE)
    model, processor = _load(args)
    profile.verify(model, processor)
    conv = to_conversation(_screen_input(args))
    scorer = DeflectionScorer(model, processor, spec=profile.mask, score_layer=profile.score_layer)
    angle = float(scorer.angles([conv], [tuple(profile.heads)])[0, 0])
    flagged = angle > profile.threshold.value
    print(json.dumps({
        "flagged": flagged, "angle": round(angle, 6), "threshold": round(profile.threshold.value, 6),
        "risk": round(float(profile.risk.risk(angle)), 6), "heads": [str(h) for h in profile.heads],
        "mode": profile.mask.positions,
    }, indent=2))
    return 0


def cmd_inspect(args) -> int:
    from ohd_guard.profile import Profile

    p = Profile.load(args.profile or DEFAULT_PROFILE)
    if args.json:
        print(p.model_dump_json(indent=2))
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


def cmd_eval(args) -> int:
    import numpy as np

    from ohd_guard.calibrate import as_conversation, evaluate_angles
    from ohd_guard.datasets import load_labelled_file, load_shared_set
    from ohd_guard.metrics import tpr_at_fpr
    from ohd_guard.profile import Profile
    from ohd_guard.scoring import DeflectionScorer

    profile = Profile.load(args.profile or DEFAULT_PROFILE)
    model, processor = _load(args)
    profile.verify(model, processor)
    scorer = DeflectionScorer(model, processor, spec=profile.mask, score_layer=profile.score_layer)
    sets = {Path(f).name: load_labelled_file(f) for f in args.files}
    sets.update({name: load_shared_set(name, limit=args.limit) for name in args.shared})
    if not sets:
        raise SystemExit("give labelled files and/or --shared set names")
    angles = {
        name: scorer.angles([as_conversation(p) for p in items], [tuple(profile.heads)], batch_size=args.batch_size)[:, 0]
        for name, items in sets.items()
    }
    labels = {name: np.array([p.label for p in items]) for name, items in sets.items()}
    all_a, all_l = np.concatenate(list(angles.values())), np.concatenate(list(labels.values()))
    rows = []
    for name in list(sets) + ["all"]:
        a, lab = (all_a, all_l) if name == "all" else (angles[name], labels[name])
        row = {"set": name, "n": len(a), "DR": float(np.mean(a[lab == 1] > profile.threshold.value)) if (lab == 1).any() else "",
               "FPR": float(np.mean(a[lab == 0] > profile.threshold.value)) if (lab == 0).any() else ""}
        if (lab == 1).any() and (lab == 0).any():
            m = evaluate_angles(name, a[lab == 1], a[lab == 0], profile.threshold.value)
            row["AUROC"] = m.auroc
            row["TPR@5%FPR"] = tpr_at_fpr(a, lab, 0.05)
        rows.append(row)
    print(_table(rows, ["set", "n", "DR", "FPR", "AUROC", "TPR@5%FPR"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ohd-guard", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default=None, help="local HF folder or .gguf file (default: embedded Qwen2.5-Coder-0.5B)")
        sp.add_argument("--device", default="auto")
        sp.add_argument("--dtype", default="auto")
        sp.add_argument("--batch-size", type=int, default=8)

    c = sub.add_parser("calibrate", help="search the head, fit the threshold, write a profile")
    model_args(c)
    c.add_argument("--data", type=Path, help="labelled CSV/JSONL (default: the project's calibration prompts)")
    c.add_argument("--output", "-o", type=Path, required=True)
    c.add_argument("--strategy", choices=["two-stage", "exact", "fast"], default="two-stage")
    c.add_argument("--target", choices=["query", "output"], default="query")
    c.add_argument("--positions", choices=["all", "last"], default="last",
                   help="last (default: fast, and better held-out AUROC on the embedded model) or all (paper-exact)")
    c.add_argument("--alpha", type=float, default=1e-5)
    c.add_argument("--score-layer", type=int, default=None)
    c.add_argument("--head", type=int, nargs=2, metavar=("LAYER", "HEAD"), help="fix the head, skip the search")
    c.add_argument("--top-k", type=int, default=8)
    c.add_argument("--percentile", type=float, default=80.0)
    c.add_argument("--rank-by", choices=["gap", "auroc"], default="auroc",
                   help="rank selective heads by AUROC (default; picked better heads on held-out prompts) or mean-angle gap (paper)")
    c.add_argument("--target-fpr", type=float, default=None, help="threshold for this FPR instead of the KDE crossing")
    c.add_argument("--limit", type=int, default=None, help="use at most N unsafe and N safe prompts")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("screen", help="screen one prompt (and images); prints the verdict as JSON")
    model_args(s)
    s.add_argument("text")
    s.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    s.add_argument("--profile", type=Path, default=None)
    s.set_defaults(func=cmd_screen)

    i = sub.add_parser("inspect", help="show a profile")
    i.add_argument("profile", type=Path, nargs="?", default=None)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="DR, FPR, AUROC of a profile on labelled files / shared sets")
    model_args(e)
    e.add_argument("files", nargs="*", help="labelled CSV/JSONL files (text,label[,category,image])")
    e.add_argument("--profile", type=Path, default=None)
    e.add_argument("--shared", nargs="*", default=[], help="names of ../shared/datasets sets (advbench, jbb, ...)")
    e.add_argument("--limit", type=int, default=None)
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except OhdGuardError as e:
        print(f"ohd-guard: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
