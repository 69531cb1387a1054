"""Where is the One-head Defense signal on a model? A sweep over heads x score layers x mask target.

    python benchmarks/explore_signal.py --out /tmp/ohd/explore.npz            # angles, ~15 min per target
    python benchmarks/explore_signal.py --report /tmp/ohd/explore.npz         # tables only

For every head (fast, last-position mask) it replays the decoder once and records the last prompt
token's state after *every* layer, so one pass yields the angle of each (head, score layer) pair,
raw residual stream and passed through the final norm. Heads and score layers are then chosen on
the project's ``calib`` split with the selectivity rule and judged on the ``heldout`` split and on
public sets (one-class sets are paired: AdvBench/JBB harmful against Alpaca seed tasks).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from ohd_guard.datasets import load_calibration_prompts, load_shared_set
from ohd_guard.loading import load_model
from ohd_guard.masking import HeadRef, MaskSpec, head_mask
from ohd_guard.metrics import auroc
from ohd_guard.scoring import DeflectionScorer, _first, _select, all_heads, angle_degrees


@torch.no_grad()
def layer_angles(scorer: DeflectionScorer, texts: list[str], heads: list[HeadRef], batch_size: int = 8):
    """Angles [N, K, L, 2] of K heads at every score layer 1..L (raw residual, final-normed)."""
    ad = scorer.adapter
    L = ad.num_layers
    out = np.zeros((len(texts), len(heads), L, 2))
    for s in range(0, len(texts), batch_size):
        pre = scorer.prefill(scorer.encode(texts[s : s + batch_size]), from_layer=0)
        B = pre.batch_size
        # unmasked state after each decoder layer: inputs of the next layer, and the last layer's output
        base = [pre.calls[i].hidden[:, -1] for i in range(1, L)] + [_last_raw(scorer, pre)]
        order = sorted(range(len(heads)), key=lambda k: heads[k].layer)
        cols = [heads[k] for k in order]
        starts = [h.layer for h in cols]
        K = len(cols)
        row_prompt = torch.arange(B).repeat(K)
        row_start = torch.tensor(starts).repeat_interleave(B)
        cache = copy.copy(pre.prefix_cache)
        cache.layers = [copy.copy(layer) for layer in pre.prefix_cache.layers]
        h = None
        rec = torch.zeros(K * B, L, base[0].shape[-1], dtype=torch.float64)
        rows = [(c,) for c in cols for _ in range(B)]
        with head_mask(ad, rows, scorer.spec, prefix_rows=True):
            for i in range(starts[0], L):
                n_active = int((row_start <= i).sum())
                call = pre.calls[i]
                n_old = 0 if h is None else h.shape[0]
                if n_active > n_old:
                    new = _select(call.hidden, row_prompt[n_old:n_active], B, force=True)
                    h = new if h is None else torch.cat([h, new])
                idx = row_prompt[:n_active]
                kwargs = _select(call.kwargs, idx, B)
                cache.layers[i].batch_select_indices(idx)
                kwargs["past_key_values"] = cache
                h = _first(ad.layers[i](h, *_select(call.args, idx, B), **kwargs))
                rec[:n_active, i] = h[:, -1].double()
        rec = rec.reshape(K, B, L, -1)
        dtype = pre.base_states.dtype
        for j, k in enumerate(order):
            for layer in range(starts[j], L):  # below its own layer a head moves nothing: angle 0
                b, m = base[layer].double(), rec[j, :, layer]
                out[s : s + B, k, layer, 0] = angle_degrees(b, m)
                norm = lambda x: ad.final_norm(x.to(dtype)).double()
                out[s : s + B, k, layer, 1] = angle_degrees(norm(b), norm(m))
        print(f"  {s + B}/{len(texts)} prompts", flush=True)
    return out


def _last_raw(scorer: DeflectionScorer, pre) -> torch.Tensor:
    """Unmasked output of the last decoder layer at the last position (before the final norm)."""
    ad = scorer.adapter
    call = pre.calls[ad.num_layers - 1]
    cache = copy.copy(pre.prefix_cache)
    cache.layers = [copy.copy(layer) for layer in pre.prefix_cache.layers]
    kwargs = dict(call.kwargs, past_key_values=cache)
    return _first(ad.layers[-1](call.hidden, *call.args, **kwargs))[:, -1]


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
    for t in targets:
        c = d[f"{t}/calib"]  # [N, K, L, 2]
        N, K, L, _ = c.shape
        yc = lab["calib"]
        for layer in range(L):
            for norm in (0, 1):
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
                print(f"| {t} | {layer + 1} | {'final-norm' if norm else 'raw'} | L{k // 14}.H{k % 14} | "
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
