"""Does a profile hold in another dtype? The shipped profile's verdicts in float32 and bfloat16, paired.

A profile is fitted in one dtype (the shipped ones in float32, on the CPU); ``load_model(dtype="auto")``
runs bfloat16 on an accelerator, and bfloat16 is also what makes a CPU with AMX fast (a prefill about
4.6x quicker than float32 on this project's 2-core CI machine). This measures what running a profile
in the other dtype does (the guard logs it at INFO for this pair, quoting these numbers): the guard screens the same held-out conversations
(bare and in context) once per dtype, and the table gives each dtype's time per screening, DR / FPR at
the profile's threshold and AUROC, then the paired shift of the score (log-odds) and how many verdicts
flip.

    python benchmarks/bench_dtype.py                      # 20 + 20 held-out prompts x 4 contexts
    python benchmarks/bench_dtype.py --model qwen2.5-coder-1.5b-instruct --per-class 10
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="embedded model name (default: the embedded default)")
    ap.add_argument("--profile", default=None, help="profile file (default: the model's shipped default)")
    ap.add_argument("--per-class", type=int, default=20, help="held-out prompts per class, per context")
    ap.add_argument("--contexts", default="bare,tools,rag,history")
    args = ap.parse_args(argv)

    import torch

    from ohd_guard import OhdGuard
    from ohd_guard.contexts import in_contexts
    from ohd_guard.datasets import load_calibration_prompts, stratified
    from ohd_guard.detectors import load_profile
    from ohd_guard.loading import embedded_model, load_model
    from ohd_guard.metrics import auroc
    from ohd_guard.screening import as_input
    from ohd_guard.shipped import default_profile

    embedded = embedded_model(args.model)
    if embedded is None:
        ap.error(f"--model: not an embedded model: {args.model!r}")
    profile = load_profile(args.profile or default_profile(embedded.name))
    held = load_calibration_prompts("heldout")
    base = stratified([p for p in held if p.label == 1], args.per_class, seed=1)
    base += stratified([p for p in held if p.label == 0], args.per_class, seed=1)
    contexts = [c.strip() for c in args.contexts.split(",") if c.strip()]
    items = [x for c in contexts for x in (base if c == "bare" else in_contexts(base, kinds=(c,), seed=1, split="heldout"))]
    ctx = np.array([getattr(x, "context", "bare") or "bare" for x in items])
    y = np.array([x.label for x in items])

    scores, secs = {}, {}
    for dtype in ("float32", "bfloat16"):
        model, proc = load_model(embedded.name, dtype=dtype)
        guard = OhdGuard(model, proc, profile)
        guard.screen(as_input(items[0]))  # warm-up, not timed
        t0 = time.perf_counter()
        scores[dtype] = np.array([guard.screen(as_input(x)).score for x in items])
        secs[dtype] = (time.perf_counter() - t0) / len(items)
        guard.close()
        del guard, model
    print(f"{embedded.name}, profile {profile.kind} ({len(profile.heads)} heads, fitted in {profile.model.dtype}), "
          f"{len(items)} held-out screenings ({args.per_class} + {args.per_class} per context), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| dtype | s per screening | DR | FPR | AUROC |")
    print("|---|---:|---:|---:|---:|")
    for dtype, s in scores.items():
        flag = s > profile.threshold
        print(f"| {dtype} | {secs[dtype]:.2f} | {flag[y == 1].mean():.3f} | {flag[y == 0].mean():.3f} | {auroc(s, y):.3f} |")
    print(f"\nbfloat16 / float32 time: {secs['bfloat16'] / secs['float32']:.2f}x\n")
    print("| context | n | mean abs shift (log-odds) | max abs shift | verdicts flipped |")
    print("|---|---:|---:|---:|---:|")
    a, b = scores["float32"], scores["bfloat16"]
    for c in [*contexts, "all"]:
        m = np.ones(len(items), bool) if c == "all" else ctx == c
        d = np.abs(a[m] - b[m])
        flips = int(((a[m] > profile.threshold) != (b[m] > profile.threshold)).sum())
        print(f"| {c} | {int(m.sum())} | {d.mean():.3f} | {d.max():.3f} | {flips} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
