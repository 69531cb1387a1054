"""Core-engine benchmark on the real embedded model. Prints markdown tables.

    python -u benchmarks/bench_core.py [--per-set 60] [--cost-prompts 20] [--search-prompts 100] [--sections 1,2,3]

1. Detection: the shipped profile's head, paper-exact (all positions) vs fast (last position) mode,
   on the project's held-out prompts and the public sets in ../shared/datasets: AUROC, DR, FPR,
   and the rank correlation of the two modes' angles.
2. Cost: screening (unmasked prefill + masked branch) / an unguarded prefill of the same prompt,
   per mode, measured one prompt at a time in the same run.
3. Head search: naive (two full passes per head and prompt, the paper's code) vs optimised
   (prefix replay, staircase batching, two-stage), time and chosen head.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from ohd_guard.detectors.base import evaluate_scores
from ohd_guard.cli import OHD_PROFILE
from ohd_guard.datasets import load_calibration_prompts, load_shared_set, stratified
from ohd_guard.loading import load_model
from ohd_guard.profile import Profile
from ohd_guard.scoring import DeflectionScorer, naive_angles
from ohd_guard.search import HeadScores, search_heads
from ohd_guard.threshold import kde_threshold


def table(rows, cols):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def detection(args, scorers, angles, calib, held, head):
    """AUROC / DR / FPR of the profile's head per mode, thresholds refitted on the calib split."""
    thresholds = {}
    for mode in scorers:
        cu = angles(mode, [p for p in calib if p.label == 1])
        cs = angles(mode, [p for p in calib if p.label == 0])
        thresholds[mode] = kde_threshold(cu, cs).value
    sets = {"project heldout": held}
    for name in ("advbench", "jbb", "figstep", "alpaca_seed", "refusal_direction_harmless"):
        sets[name] = load_shared_set(name)[:: max(1, len(load_shared_set(name)) // args.per_set)][: args.per_set]
    harmless = sets["alpaca_seed"] + sets["refusal_direction_harmless"]
    pooled = {}  # the opposite class a one-class set is ranked against, scored once per mode
    rows = []
    for name, items in sets.items():
        res = {m: angles(m, items) for m in scorers}
        labels = np.array([p.label for p in items])
        row = {"set": name, "n": len(items), "rho(exact,fast)": float(spearmanr(res["exact"], res["fast"])[0])}
        for m in scorers:
            a = res[m]
            if labels.min() == labels.max():  # one-class set: AUROC against the harmless sets (or held-out unsafe)
                key = (m, int(labels[0]))
                if key not in pooled:
                    pooled[key] = angles(m, harmless if labels[0] == 1 else [p for p in held if p.label == 1])
                oa = pooled[key]
                u, s = (a, oa) if labels[0] == 1 else (oa, a)
            else:
                u, s = a[labels == 1], a[labels == 0]
            met = evaluate_scores(name, u, s, thresholds[m])
            row[f"AUROC {m}"] = met.auroc
            row[f"DR {m}"] = float(np.mean(a[labels == 1] > thresholds[m])) if (labels == 1).any() else "-"
            row[f"FPR {m}"] = float(np.mean(a[labels == 0] > thresholds[m])) if (labels == 0).any() else "-"
        rows.append(row)
    print(f"## Detection, head {head}, thresholds exact {thresholds['exact']:.3f} / fast {thresholds['fast']:.3f} deg\n")
    print(table(rows, ["set", "n", "AUROC exact", "AUROC fast", "DR exact", "DR fast", "FPR exact", "FPR fast",
                       "rho(exact,fast)"]), flush=True)



def cost(args, model, scorers, held, head):
    """Screening (prefill + masked branch) / an unguarded prefill, one prompt at a time."""
    prompts = [p.text for p in held[: args.cost_prompts]]
    t = {"prefill": 0.0, "exact": 0.0, "fast": 0.0}
    for text in prompts:
        inputs = scorers["exact"].encode([text])
        with torch.no_grad():
            t0 = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            t["prefill"] += time.perf_counter() - t0
        for m, sc in scorers.items():
            t0 = time.perf_counter()
            pre = sc.prefill(inputs, from_layer=head.layer, keep_cache=True)
            sc.head_angles(pre, [(head,)])
            t[m] += time.perf_counter() - t0
    print(f"\n## Screening cost, {len(prompts)} prompts one by one\n")
    print(table([{"mode": m, "ms/prompt": 1000 * t[m] / len(prompts), "x prefill": t[m] / t["prefill"]}
                 for m in ("prefill", "exact", "fast")], ["mode", "ms/prompt", "x prefill"]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-set", type=int, default=60)
    ap.add_argument("--cost-prompts", type=int, default=20)
    ap.add_argument("--search-prompts", type=int, default=100, help="per class, for the naive-vs-optimised search")
    ap.add_argument("--naive-prompts", type=int, default=20, help="per class, timed with the naive search")
    ap.add_argument("--sections", default="1,2,3", help="which sections to run, e.g. 3")
    args = ap.parse_args()
    model, tok = load_model()
    profile = Profile.load(OHD_PROFILE)
    head = profile.heads[0]
    scorers = {
        "exact": DeflectionScorer(model, tok, spec=profile.mask.model_copy(update={"positions": "all"}), score_layer=profile.score_layer),
        "fast": DeflectionScorer(model, tok, spec=profile.mask.model_copy(update={"positions": "last"}), score_layer=profile.score_layer),
    }

    def angles(mode, items):
        return scorers[mode].angles([p.text for p in items], [head], batch_size=8)[:, 0]

    calib = load_calibration_prompts("calib")
    held = load_calibration_prompts("heldout")
    # -- 1. detection per mode ----------------------------------------------------------------
    if "1" in args.sections:
        detection(args, scorers, angles, calib, held, head)
    # -- 2. cost per mode ---------------------------------------------------------------------
    if "2" in args.sections:
        cost(args, model, scorers, held, head)

    # -- 3. head search -----------------------------------------------------------------------
    if "3" not in args.sections:
        return
    n = args.search_prompts
    # stratified over categories (file order would over-represent the older prompts)
    u = [p.text for p in stratified([p for p in calib if p.label == 1], n, seed=0)]
    s = [p.text for p in stratified([p for p in calib if p.label == 0], n, seed=0)]
    spec = profile.mask  # the shipped configuration
    r = search_heads(model, tok, u, s, spec=spec, score_layer=profile.score_layer, strategy="two-stage",
                     batch_size=8, progress=True)
    ranked = [row.head for row in r.ranking if row.eligible]
    # Naive = the paper's code: two full forward passes per head and prompt. All heads on all prompts
    # would take hours here, so it runs on the optimised search's top 4 plus 4 random eligible heads
    # and the first --naive-prompts prompts per class (its time extrapolated to all heads and
    # prompts), and must give the same angles and pick the same head among them.
    rng = np.random.default_rng(0)
    sample = ranked[:4] + [ranked[i] for i in rng.choice(np.arange(4, len(ranked)), 4, replace=False)]
    m = args.naive_prompts
    enc = scorers["exact"].encode
    t0 = time.perf_counter()
    nu = np.concatenate([naive_angles(model, enc([t]), sample, spec, score_layer=profile.score_layer) for t in u[:m]])
    ns = np.concatenate([naive_angles(model, enc([t]), sample, spec, score_layer=profile.score_layer) for t in s[:m]])
    naive_s = (time.perf_counter() - t0) * (len(u) + len(s)) / (2 * m)  # for all prompts, these heads
    naive_best = HeadScores(sample, nu, ns, spec).stats(100.0, rank_by="auroc")[0].head
    opt = HeadScores(sample, *(r.scores.unsafe[:m, [r.scores.heads.index(h) for h in sample]],
                               r.scores.safe[:m, [r.scores.heads.index(h) for h in sample]]), spec)
    diff = float(np.abs(np.r_[nu.ravel(), ns.ravel()] - np.r_[opt.unsafe.ravel(), opt.safe.ravel()]).max())
    n_heads = len(r.scores.heads)
    rows = [
        {"search": f"optimised ({r.strategy}, {spec.positions} positions), all {n_heads} heads",
         "seconds": r.seconds, "head": str(r.best)},
        {"search": f"naive, {len(sample)} heads ({m}+{m} prompts measured, extrapolated to {len(u)}+{len(s)})",
         "seconds": naive_s, "head": str(naive_best)},
        {"search": f"naive, all {n_heads} heads (extrapolated)", "seconds": naive_s * n_heads / len(sample), "head": "-"},
    ]
    print(f"\n## Head search, {len(u)}+{len(s)} prompts\n")
    print(table(rows, ["search", "seconds", "head"]))
    print(f"\nnaive vs optimised angles on the {len(sample)} sampled heads x {2 * m} prompts: max |diff| {diff:.2e} deg; "
          f"same best head among them: {naive_best == opt.stats(100.0, rank_by='auroc')[0].head}", flush=True)


if __name__ == "__main__":
    main()
