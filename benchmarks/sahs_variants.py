"""Compare SAHs probe settings on ONE set of reads: is a refit's instability the data or the probe?

Issue #22: two refits of the 0.5B default (same recipe, context material changed a little) moved single
verdicts by several log-odds and traded held-out AUROC for ToxicChat AUROC. This script reads every
head's last-token output once, for the fit items and every evaluation set of ``fit_in_context.py``
(same sizes, same items; ``build_items``), saves the reads (``--reads``; reused when the items are the
same), then fits each variant from them in seconds to minutes and prints ``fit_in_context``'s tables:

* ``k8``, ``k16`` (the shipped recipe), ``k32``, ``k64``: heads in the probe;
* ``k16 l2<=100``: the L2 grid extended to 10 and 100 (stronger shrinkage);
* ``bag k16``: the mean log-odds of ``--bags`` probes, each fitted (heads ranked, probe) on a seeded
  80 % subsample of each class; a linear model on the union of their heads, so it can ship as a profile;
* ``shipped``: today's profile scored from the same reads (a check: it must match fit_in_context's
  reference rows), and ``shipped + k16``, the two probes' log-odds averaged.

Scores are the final read (what ``joint_scores`` and a guard under ``scope="latest"`` give), the
threshold is each probe's own (probability 0.5), fixed at fit time.

    python benchmarks/sahs_variants.py --reads /tmp/reads.npz --per-class 250 --traffic 200 \\
        --eval-per-class 40 --toxicchat-dev 400 --extra-per-set 30
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from fit_in_context import build_items, summary


def _digest(sets: dict[str, list]) -> str:
    h = hashlib.sha256()
    for name, items in sets.items():
        h.update(name.encode())
        for x in items:
            h.update(repr(getattr(x, "messages", None) or getattr(x, "text", x)).encode())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=Path, required=True, help="npz of the reads (written once, reused when it matches)")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--traffic", type=int, default=120)
    ap.add_argument("--eval-per-class", type=int, default=30)
    ap.add_argument("--toxicchat-dev", type=int, default=150)
    ap.add_argument("--extra-per-set", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bags", type=int, default=10)
    ap.add_argument("--variants", default="shipped,k8,k16,k32,k64,k16 l2<=100,bag k16,shipped + k16")
    args = ap.parse_args(argv)

    from ohd_guard.app_cases import app_cases
    from ohd_guard.detectors import PrefillReader, SAHs, load_profile
    from ohd_guard.loading import load_model
    from ohd_guard.metrics import auroc, average_precision, f1_at_threshold, tpr_at_fpr
    from ohd_guard.shipped import default_profile

    def say(msg: str) -> None:
        print(f"[variants {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    model, tok = load_model(None)
    d = build_items(args.per_class, args.traffic, args.eval_per_class, args.toxicchat_dev, args.extra_per_set)
    unsafe = [x for x in d["fit_all"] if x.label == 1]
    safe = [x for x in d["fit_all"] if x.label == 0]
    tc = d["tc"]
    sets: dict[str, list] = {"fit": unsafe + safe}
    sets.update({f"held-out @ {c}": v for c, v in d["evals"].items()})
    sets[f"ToxicChat dev ({sum(p.label for p in tc)}/{len(tc)} toxic)"] = tc
    sets.update(d["extra"])
    sets["app cases (right verdicts)"] = app_cases()
    digest = _digest(sets)
    reads: dict[str, np.ndarray] = {}
    if args.reads.exists():
        with np.load(args.reads) as z:
            if str(z["digest"]) == digest:
                reads = {name: z[f"set{k}"] for k, name in enumerate(sets)}
                say(f"reads loaded from {args.reads}")
            else:
                say(f"{args.reads} holds other items: reading again")
    if not reads:
        reader = PrefillReader(model, tok)
        t0 = time.perf_counter()
        for name, items in sets.items():
            reads[name] = reader.read(items, args.batch_size).heads.astype(np.float32)
            say(f"read {name}: {len(items)} items ({time.perf_counter() - t0:.0f} s so far)")
        np.savez(args.reads, digest=np.array(digest), **{f"set{k}": reads[n] for k, n in enumerate(sets)})
        say(f"reads saved to {args.reads}")

    F = reads["fit"]
    y_fit = np.r_[np.ones(len(unsafe), int), np.zeros(len(safe), int)]

    def scorer(profile: Any):
        lg, heads = profile.logistic(), list(profile.heads)
        return lambda feats: lg.decision(SAHs._design(feats, heads))

    def fit(k: int, idx: np.ndarray | None = None, l2_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)) -> Any:
        idx = np.arange(len(y_fit)) if idx is None else idx
        u = [sets["fit"][i] for i in idx if y_fit[i] == 1]
        s = [sets["fit"][i] for i in idx if y_fit[i] == 0]
        order = np.r_[idx[y_fit[idx] == 1], idx[y_fit[idx] == 0]]
        return SAHs(top_k=k, l2_grid=l2_grid).fit_heads(model, tok, F[order], u, s).profile

    shipped = load_profile(default_profile())
    scorers: dict[str, Any] = {}
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in wanted:
        t0 = time.perf_counter()
        if v == "shipped":
            scorers[v] = scorer(shipped)
        elif v == "shipped + k16":
            a, b = scorer(shipped), scorers.get("k16") or scorer(fit(16))
            scorers[v] = lambda f, a=a, b=b: (a(f) + b(f)) / 2
        elif v == "k16 l2<=100":
            scorers[v] = scorer(fit(16, l2_grid=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)))
        elif v.startswith("bag k"):
            k = int(v.split("k")[1])
            rng = np.random.default_rng(0)
            parts = []
            for _ in range(args.bags):
                idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y_fit == c), int(0.8 * (y_fit == c).sum()),
                                                         replace=False) for c in (1, 0)]))
                parts.append(scorer(fit(k, idx)))
            scorers[v] = lambda f, parts=parts: np.mean([p(f) for p in parts], axis=0)
        elif v.startswith("k") and v[1:].isdigit():
            scorers[v] = scorer(fit(int(v[1:])))
        else:
            ap.error(f"unknown variant {v!r}")
        say(f"{v}: ready ({time.perf_counter() - t0:.0f} s)")

    rows = []
    cases = sets["app cases (right verdicts)"]
    print("| app case (expected) | " + " | ".join(scorers) + " |")
    print("|---|" + "---:|" * len(scorers))
    case_scores = {v: sc(reads["app cases (right verdicts)"]) for v, sc in scorers.items()}
    for i, c in enumerate(cases):
        cells = [f"{s[i]:+.2f}{'' if (s[i] > 0) == bool(c.label) else ' (wrong)'}" for s in case_scores.values()]
        print(f"| {c.variant} ({'flag' if c.label else 'pass'}) | " + " | ".join(cells) + " |")
    for name, items in sets.items():
        if name == "fit":
            continue
        y = np.array([x.label for x in items])
        for v, sc in scorers.items():
            s = sc(reads[name])
            if name.startswith("app cases"):
                rows.append(dict(detector=v, set=name, n=len(y), dr=float(np.mean((s > 0) == (y == 1)))))
                continue
            r = dict(detector=v, set=name, n=len(y))
            r.update({k: float(np.mean(s[y == c] > 0)) for k, c in (("dr", 1), ("fpr", 0)) if (y == c).any()})
            if (y == 1).any() and (y == 0).any():
                r.update(auroc=auroc(s, y), tpr1=tpr_at_fpr(s, y, 0.01))
                if name.startswith("ToxicChat"):
                    r.update(f1=f1_at_threshold(s, y, 0.0), auprc=average_precision(s, y))
            rows.append(r)
    print("\n| variant | set | n | DR | FPR | AUROC | F1 | AUPRC |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f = lambda k, r=r: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        print(f"| {r['detector']} | {r['set']} | {r['n']} | {f('dr')} | {f('fpr')} | {f('auroc')} | {f('f1')} | {f('auprc')} |")
    print("\n" + summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
