"""Where is the One-head Defense signal on a model? A sweep over heads x score layers x mask target.

    python benchmarks/explore_signal.py --out /tmp/ohd/explore.npz            # angles, ~15 min per target
    python benchmarks/explore_signal.py --report /tmp/ohd/explore.npz         # tables only

For every head (fast, last-position mask) the scorer replays the decoder once per prompt batch and
reads the last prompt token's state after *every* layer (``sites=``), so one pass yields the angle
of each (head, score layer) pair (residual stream; the last layer after the final norm). Heads and
score layers are then chosen on the project's ``calib`` split with the selectivity rule and judged on the ``heldout`` split and on
public sets (one-class sets are paired: AdvBench/JBB harmful against Alpaca seed tasks).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ohd_guard.datasets import load_calibration_prompts, load_shared_set
from ohd_guard.loading import load_model
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.metrics import auroc
from ohd_guard.scoring import DeflectionScorer, all_heads


def layer_angles(scorer: DeflectionScorer, texts: list[str], heads: list[HeadRef], batch_size: int = 8):
    """Angles [N, K, L] of K heads at every score layer 1..L, from one replay per prompt batch."""
    L = scorer.adapter.num_layers
    out = []
    for s in range(0, len(texts), batch_size):
        out.append(scorer.angles(texts[s : s + batch_size], heads, batch_size=batch_size, sites=range(1, L + 1)))
        print(f"  {s + len(out[-1])}/{len(texts)} prompts", flush=True)
    return np.concatenate(out)


def collect(args):
    model, tok = load_model()
    calib = load_calibration_prompts("calib")
    held = load_calibration_prompts("heldout")
    adv = load_shared_set("advbench")[:: 10][: args.per_set]
    alp = load_shared_set("alpaca_seed")[:: 3][: args.per_set]
    sets = {"calib": calib, "heldout": held, "advbench": adv, "alpaca": alp}
    data = {}
    for target in args.targets:
        scorer = DeflectionScorer(model, tok, spec=MaskSpec(target=target, positions="last"))
        heads = all_heads(scorer.adapter)
        for name, items in sets.items():
            t0 = time.perf_counter()
            print(f"{target} {name} ({len(items)})", flush=True)
            data[f"{target}/{name}"] = layer_angles(scorer, [p.text for p in items], heads).astype(np.float32)
            data[f"{name}/labels"] = np.array([p.label for p in items])
            print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
            np.savez(args.out, **data)


def report(path: str, percentile: float = 80.0):
    d = dict(np.load(path))
    targets = sorted({k.split("/")[0] for k in d if not k.endswith("labels") and "/" in k and k.split("/")[0] in ("query", "output")})
    lab = {k.split("/")[0]: v for k, v in d.items() if k.endswith("/labels")}
    print("| mask | score layer | norm | head | calib AUROC | heldout AUROC | advbench vs alpaca AUROC |")
    print("|---|---|---|---|---|---|---|")
    for k, v in list(d.items()):
        if v.ndim == 3:  # [N, K, L] (this script) -> [N, K, L, 1]
            d[k] = v[..., None]
    for t in targets:
        c = d[f"{t}/calib"]  # [N, K, L, variants]
        N, K, L, n_var = c.shape
        yc = lab["calib"]
        for layer in range(L):
            for norm in range(n_var):
                a = c[:, :, layer, norm]
                safe_mean = a[yc == 0].mean(0)
                elig = safe_mean <= np.percentile(safe_mean, percentile)
                aucs = np.array([auroc(a[:, k], yc) if elig[k] and a[:, k].std() > 0 else 0 for k in range(K)])
                k = int(aucs.argmax())
                h = d[f"{t}/heldout"][:, k, layer, norm]
                ha = auroc(h, lab["heldout"])
                if f"{t}/alpaca" in d:
                    pa = auroc(np.r_[d[f"{t}/advbench"][:, k, layer, norm], d[f"{t}/alpaca"][:, k, layer, norm]],
                               np.r_[np.ones(len(d[f"{t}/advbench"])), np.zeros(len(d[f"{t}/alpaca"]))])
                else:
                    pa = float("nan")
                print(f"| {t} | {layer + 1} | {'final-norm' if norm else 'as scored'} | L{k // 14}.H{k % 14} | "
                      f"{aucs[k]:.3f} | {ha:.3f} | {pa:.3f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/ohd/explore.npz")
    ap.add_argument("--targets", nargs="+", default=["query", "output"])
    ap.add_argument("--per-set", type=int, default=52)
    ap.add_argument("--report")
    a = ap.parse_args()
    if a.report:
        report(a.report)
    else:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        collect(a)
