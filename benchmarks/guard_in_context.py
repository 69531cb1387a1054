"""What a user of the guard sees in context: the guard's own verdicts (not a detector's final read) on
held-out prompts placed in the contexts apps run, and on real user traffic, under both scopes.

``scope="conversation"`` (the default) flags a conversation when any user/tool message, read where
the model would have answered it, or the final read is over the threshold; ``scope="latest"`` only
the final read. Both come from one screening per conversation (``Verdict.messages``). Sets, none
fitted on by the shipped fits: the project's held-out split, bare and in the *held-out* half of the
context material (tools, rag, history, operator); ToxicChat's dev split (the shipped fits use the
other 75 %) and ConvAbuse (never fitted on), each a seeded sample at its real class ratio (F1 and
AUPRC beside AUROC); the threshold is the profile's, fixed before any of this.

    python benchmarks/guard_in_context.py                                  # the default model and profile
    python benchmarks/guard_in_context.py --profile some.json --per-class 40 --traffic 400
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

CONTEXTS = ("bare", "tools", "rag", "history", "operator")


def ranked(metric, scores: np.ndarray, y: np.ndarray) -> str:
    """A ranking metric, or "-" when the sample holds one class only."""
    return f"{metric(scores, y):.3f}" if 0 < y.sum() < len(y) else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="embedded model name (default: the embedded default)")
    ap.add_argument("--profile", type=Path, default=None, help="profile JSON (default: the model's shipped default)")
    ap.add_argument("--per-class", type=int, default=40, help="held-out prompts per class, per context")
    ap.add_argument("--traffic", type=int, default=400, help="items per real-traffic set (at its real ratio)")
    args = ap.parse_args(argv)

    from ohd_guard.contexts import in_contexts
    from ohd_guard.datasets import load_calibration_prompts, load_shared_set, split_dev, stratified
    from ohd_guard.detectors import load_profile
    from ohd_guard.guard import OhdGuard
    from ohd_guard.loading import embedded_model, load_model
    from ohd_guard.metrics import auroc, average_precision
    from ohd_guard.shipped import default_profile

    model, tok = load_model(args.model)
    profile = load_profile(args.profile or default_profile(args.model))
    guard = OhdGuard(model, tok, profile, scope="conversation", on_error="raise")
    held = load_calibration_prompts("heldout")
    sets = {}
    for c in CONTEXTS:
        u = stratified([p for p in held if p.label == 1], args.per_class, seed=1)
        s = stratified([p for p in held if p.label == 0], args.per_class, seed=1)
        sets[f"held-out @ {c}"] = in_contexts(u + s, kinds=(c,), seed=1, split="heldout")
    _, tc_dev = split_dev(load_shared_set("toxicchat_train_human"), 0.25, seed=0)
    for name, items in (("ToxicChat dev", tc_dev), ("ConvAbuse", load_shared_set("convabuse"))):
        if len(items) > args.traffic:
            items = random.Random(2).sample(items, args.traffic)
        sets[f"{name} ({sum(p.label for p in items)}/{len(items)})"] = items

    print(f"# {profile.kind} profile on {embedded_model(args.model).name if embedded_model(args.model) else args.model}, "
          f"threshold {profile.threshold:+.3f}\n")
    print("| set | n | DR conversation / latest | FPR conversation / latest | F1 conversation / latest | "
          "AUROC (final read) | AUPRC (final read) | s per item |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, items in sets.items():
        t0 = time.perf_counter()
        convs = [x.messages if hasattr(x, "messages") else x.text for x in items]
        verdicts = guard.screen_batch(convs)
        dt = (time.perf_counter() - t0) / len(items)
        y = np.array([x.label for x in items])
        conv = np.array([v.flagged for v in verdicts])
        final = np.array([next((m.score for m in v.messages if m.source == "final"), v.score) for v in verdicts])
        latest = final > profile.threshold

        def rates(f: np.ndarray, y=y) -> tuple[float, float, float]:
            tp, fp, fn = int((f & (y == 1)).sum()), int((f & (y == 0)).sum()), int((~f & (y == 1)).sum())
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
            return (float(f[y == 1].mean()) if (y == 1).any() else float("nan"),
                    float(f[y == 0].mean()) if (y == 0).any() else float("nan"), f1)

        (dc, fc, f1c), (dl, fl, f1l) = rates(conv), rates(latest)
        print(f"| {name} | {len(y)} | {dc:.3f} / {dl:.3f} | {fc:.3f} / {fl:.3f} | {f1c:.3f} / {f1l:.3f} | "
              f"{ranked(auroc, final, y)} | {ranked(average_precision, final, y)} | {dt:.2f} |", flush=True)
    guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
