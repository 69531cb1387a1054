"""Fit the shipped profiles of an embedded model for SAHs, HiddenDetect and the fused detector.

All three are fitted on the same data, read once: the project's calibration split plus parts of
public sets of the shared folder (read at run time, never copied), listed in
``ohd_guard.datasets.SHIPPED_FIT_SHARED``. One
prefill per prompt serves SAHs (every head's output) and HiddenDetect (every layer's state); the
fused detector adds the shipped One-head Defense head's angle on a stratified subset and combines
it with SAHs' out-of-fold log-odds there. Each profile records its sources and, measured through
the guard, its metrics on the project's held-out split.

    python benchmarks/fit_shipped.py                      # writes ohd_guard/profiles/<model>.{sahs,hiddendetect,fused}.json
    python benchmarks/fit_shipped.py --out /tmp/profiles  # anywhere else
    python benchmarks/fit_shipped.py --model qwen2.5-coder-1.5b-instruct   # another embedded model (its
        # One-head Defense profile first: ohd-guard calibrate --model ... --detector ohd, see docs/results.md)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="embedded model name (default: the embedded default)")
    ap.add_argument("--ohd-profile", type=Path, default=None,
                    help="the model's One-head Defense profile for the fused detector (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "ohd_guard" / "profiles")
    ap.add_argument("--fused-per-class", type=int, default=150, help="prompts per class the fused combination is fitted on")
    ap.add_argument("--hiddendetect-per-class", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-fused", action="store_true",
                    help="fit SAHs and HiddenDetect only (Gemma 3: the fused detector's one-pass angle cannot crop a "
                         "full sliding-window cache yet, see docs/results.md)")
    args = ap.parse_args(argv)

    from ohd_guard.detectors.base import evaluate_scores
    from ohd_guard.datasets import load_calibration_prompts, shipped_fit_items, stratified
    from ohd_guard.detectors import Fused, HiddenDetect, SAHs, shared_prefill
    from ohd_guard.evaluation import joint_scores
    from ohd_guard.loading import embedded_model, load_model
    from ohd_guard.shipped import shipped_profiles
    from ohd_guard.profile import Profile

    def say(msg: str) -> None:
        print(f"[fit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    embedded = embedded_model(args.model)
    if embedded is None:
        ap.error(f"--model: not an embedded model: {args.model!r}")
    name = embedded.name
    ohd_path = args.ohd_profile or shipped_profiles(args.model).get("ohd")
    if ohd_path is None:
        ap.error(f"no One-head Defense profile ships for {name}: pass --ohd-profile")
    ohd_profile = Profile.load(ohd_path)
    model, tok = load_model(args.model)
    ohd_profile.verify(model, tok)
    say(f"model {name}; One-head Defense profile {ohd_path}")
    items, sources = shipped_fit_items()
    unsafe = [p for p in items if p.label == 1]
    safe = [p for p in items if p.label == 0]
    say(f"fit data: {len(unsafe)} unsafe + {len(safe)} safe ({'; '.join(sources)})")
    bs = args.batch_size
    t0 = time.perf_counter()
    with shared_prefill():  # one prefill per prompt for SAHs and HiddenDetect
        sahs = SAHs(top_k=16, batch_size=bs).fit(model, tok, unsafe, safe)
        say(f"SAHs: {time.perf_counter() - t0:.0f} s, heads {', '.join(map(str, sahs.profile.heads[:6]))}, ..., "
            f"CV AUROC {sahs.profile.cv_auroc:.3f}")
        hu, hs = stratified(unsafe, args.hiddendetect_per_class, seed=0), stratified(safe, args.hiddendetect_per_class, seed=0)
        hd = HiddenDetect(batch_size=bs).fit(model, tok, hu, hs)
        say(f"HiddenDetect: band {hd.profile.band}, calibration AUROC {hd.profile.band_auroc:.3f}")
    fitted = [(sahs, "sahs"), (hd, "hiddendetect")]
    if not args.no_fused:
        oof = dict(zip(map(id, unsafe + safe), sahs.oof_))
        fu, fs = stratified(unsafe, args.fused_per_class, seed=0), stratified(safe, args.fused_per_class, seed=0)
        t1 = time.perf_counter()
        fused = Fused(ohd_profile, n_angles=1, sahs=sahs, batch_size=bs).fit(
            model, tok, fu, fs, sahs_oof=np.array([oof[id(x)] for x in fu + fs]))
        say(f"Fused: {time.perf_counter() - t1:.0f} s, {', '.join(f'{n} {c:+.2f}' for n, c in zip(fused.profile.features, fused.profile.coef))}, "
            f"CV AUROC {fused.profile.cv_auroc:.3f}")
        fitted.append((fused, "fused"))

    held = load_calibration_prompts("heldout")
    hu_, hs_ = [p for p in held if p.label == 1], [p for p in held if p.label == 0]
    scores = joint_scores([det for det, _ in fitted], hu_ + hs_, bs)  # one guard screening per batch for all
    n = len(hu_)
    for k, (det, kind) in enumerate(fitted):
        m = evaluate_scores("heldout", scores[:n, k], scores[n:, k], det.profile.threshold)
        state = det.profile.model_copy(update={"sources": sources, "metrics": [*det.profile.metrics, m]})
        path = state.save(args.out / f"{name}.{kind}.json")
        say(f"{kind}: held-out AUROC {m.auroc:.3f}, DR {m.detection_rate:.3f}, FPR {m.false_positive_rate:.3f} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
