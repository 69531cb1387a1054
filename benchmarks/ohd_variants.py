"""One-head Defense given its best chance on the embedded model: variants side by side, held-out AUROC.

    python -u benchmarks/ohd_variants.py [--per-class 100]

Variants, each chosen on ``--per-class`` unsafe + safe prompts of the project's calibration split
(stratified) and judged on the whole held-out split (366 prompts, look-alike twins included):

* the shipped profile (query mask, last position, L1.H5 read after the final norm);
* **output masking**: every head's output scaled by 1e-5 at the last position, every score layer
  read from one replay; the best selective head (safe angle below the 80th percentile) per score
  layer by calibration AUROC, then the best layer;
* **several angles**: the shipped profile's top selective heads (query mask), their log-angles as
  features of a class-balanced logistic regression fitted on the same prompts.

Prints a markdown table; SAHs (the shipped default) is listed for reference from its profile.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--angles", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from ohd_guard.cli import OHD_PROFILE, SHIPPED_PROFILES
    from ohd_guard.datasets import load_calibration_prompts, stratified
    from ohd_guard.detectors import load_profile
    from ohd_guard.detectors.features import Logistic
    from ohd_guard.detectors.fused import selective_heads
    from ohd_guard.loading import load_model
    from ohd_guard.masking import HeadRef, MaskSpec
    from ohd_guard.metrics import auroc
    from ohd_guard.profile import Profile
    from ohd_guard.scoring import DeflectionScorer, all_heads

    model, tok = load_model()
    calib = load_calibration_prompts("calib")
    cu = stratified([p for p in calib if p.label == 1], args.per_class, seed=0)
    cs = stratified([p for p in calib if p.label == 0], args.per_class, seed=0)
    held = load_calibration_prompts("heldout")
    c_txt, c_y = [p.text for p in cu + cs], np.r_[np.ones(len(cu)), np.zeros(len(cs))]
    h_txt, h_y = [p.text for p in held], np.array([p.label for p in held])
    bs = args.batch_size
    rows = []
    shipped = Profile.load(OHD_PROFILE)

    t0 = time.perf_counter()
    sc = DeflectionScorer(model, tok, spec=shipped.mask, score_layer=shipped.score_layer)
    h = sc.angles(h_txt, [shipped.heads[0]], batch_size=bs)[:, 0]
    rows.append(("shipped: query mask, last position", f"{shipped.heads[0]} @ layer {shipped.score_layer}",
                 auroc(sc.angles(c_txt, [shipped.heads[0]], batch_size=bs)[:, 0], c_y), auroc(h, h_y),
                 time.perf_counter() - t0))

    t0 = time.perf_counter()
    out = DeflectionScorer(model, tok, spec=MaskSpec(target="output", positions="last"))
    heads = all_heads(out.adapter)
    L = out.adapter.num_layers
    a = out.angles(c_txt, heads, batch_size=bs, sites=list(range(1, L + 1)))  # [N, K, L]
    best = None
    for layer in range(L):
        x = a[:, :, layer]
        safe_mean = x[c_y == 0].mean(0)
        ok = (safe_mean <= np.percentile(safe_mean, 80)) & np.array([h.layer < layer + 1 for h in heads])
        scores = [auroc(x[:, k], c_y) if ok[k] and x[:, k].std() > 0 else 0.0 for k in range(len(heads))]
        k = int(np.argmax(scores))
        if best is None or scores[k] > best[0]:
            best = (scores[k], heads[k], layer + 1)
    assert best is not None
    ho = DeflectionScorer(model, tok, spec=MaskSpec(target="output", positions="last"), score_layer=best[2])
    rows.append(("output mask, last position, joint head/score-layer search", f"{best[1]} @ layer {best[2]}",
                 best[0], auroc(ho.angles(h_txt, [best[1]], batch_size=bs)[:, 0], h_y), time.perf_counter() - t0))

    t0 = time.perf_counter()
    several: list[HeadRef] = selective_heads(shipped, args.angles)
    feats_c = np.log(sc.angles(c_txt, several, batch_size=bs) + 1e-3)
    feats_h = np.log(sc.angles(h_txt, several, batch_size=bs) + 1e-3)
    probe = Logistic.fit(feats_c, c_y.astype(int), l2=0.1)
    rows.append((f"{len(several)} selective heads' log-angles, logistic (query mask)", "+".join(map(str, several)),
                 auroc(probe.decision(feats_c), c_y), auroc(probe.decision(feats_h), h_y), time.perf_counter() - t0))

    sahs = load_profile(SHIPPED_PROFILES["sahs"])
    m = next(x for x in sahs.metrics if x.split == "heldout")
    rows.append(("SAHs (shipped default), for reference", f"{len(sahs.heads)} heads", float("nan"), m.auroc, float("nan")))

    print(f"\nchosen on {len(cu)} + {len(cs)} calibration prompts, judged on the held-out split ({len(held)})\n")
    print("| variant | heads | calibration AUROC | held-out AUROC | seconds |")
    print("|---|---|---:|---:|---:|")
    for name, what, ca, ha, sec in rows:
        print(f"| {name} | {what} | {ca:.3f} | {ha:.3f} | {sec:.0f} |")


if __name__ == "__main__":
    main()
