"""Compare SAHs probe settings on ONE set of reads: is a refit's instability the data or the probe?

Issue #22: two refits of the 0.5B default (same recipe, context material changed a little) moved single
verdicts by several log-odds and traded held-out AUROC for ToxicChat AUROC. This script reads every
head's last-token output once, for the fit items and every evaluation set of ``fit_in_context.py``
(same sizes, same items; ``build_items``), saves the reads (``--reads``, cached per item), then fits each variant from them in seconds to minutes and prints ``fit_in_context``'s tables:

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

Reads are cached per item (key: the item's messages), so a run with more items reads only the new ones,
and saved every ``--save-every`` items, so a read stopped part way (the 1.5B model reads 4-7 s per
item on 2 CPU cores) goes on from there; ``--model`` names the model (one reads file per model).
``--select-heads 16,32,48,64`` first picks the number of heads on a dev split of the *fit* items (never
the evaluation sets); with ``--gate-app-cases``, the lowest dev log-loss count whose profile is right on
every app case; ``--write kN PATH`` saves that variant's profile with its held-out metrics. The shipped
0.5B profile (2026-12-05, later):

    python benchmarks/sahs_variants.py --reads /tmp/reads.npz --per-class 250 --traffic 200 \
        --eval-per-class 40 --toxicchat-dev 400 --extra-per-set 30 --select-heads 16,24,32,48,64 \
        --gate-app-cases --write selected ohd_guard/profiles/qwen2.5-coder-0.5b-instruct.sahs.json
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from fit_in_context import build_items, class_counts, summary


def _key(x: Any) -> str:
    """An item's cache key: its messages (or text) and image bytes; the same conversation in two sets, or in
    two runs with other sizes, is read once."""
    h = hashlib.sha256(repr(getattr(x, "messages", None) or getattr(x, "text", x)).encode())
    if (img := getattr(x, "image", None)) is not None:
        h.update(img.tobytes() if hasattr(img, "tobytes") else repr(img).encode())
    return h.hexdigest()[:32]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=Path, required=True,
                    help="npz of the reads, cached per item and saved every --save-every items (one file per model)")
    ap.add_argument("--model", default=None, help="embedded model name (default: the embedded default)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the dtype the model reads in (a reads file holds one dtype; bfloat16 reads about 4.6x faster "
                         "on a CPU with AMX, and its profile records that it was fitted in bfloat16)")
    ap.add_argument("--save-every", type=int, default=128, help="items read between saves of --reads (a long read "
                    "that is stopped keeps what it read)")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--traffic", type=int, default=120)
    ap.add_argument("--eval-per-class", type=int, default=30)
    ap.add_argument("--toxicchat-fit", type=class_counts, default=None, metavar="TOXIC,NONTOXIC",
                    help="ToxicChat fit prompts per class instead of --traffic's half each (its fit split holds 267 "
                         "toxic of 1,978): real traffic's own mix of requests, most of them benign")
    ap.add_argument("--toxicchat-dev", type=int, default=150)
    ap.add_argument("--extra-per-set", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bags", type=int, default=10)
    ap.add_argument("--variants", default="shipped,k8,k16,k32,k64,k16 l2<=100,bag k16,shipped + k16")
    ap.add_argument("--select-heads", default=None, metavar="K,K,...",
                    help="first choose the number of heads on a dev split of the FIT items (a quarter of the requests, "
                         "bare and placed copies together): fit on the rest, print dev log-loss/AUROC per context, "
                         "and pick the lowest dev log-loss (within 0.005: fewer heads); adds that kN to --variants")
    ap.add_argument("--gate-app-cases", action="store_true",
                    help="with --select-heads: take the lowest dev log-loss count whose profile (fitted on all fit items) "
                         "is right on every app case (ohd_guard.app_cases; they then stop being an independent check)")
    ap.add_argument("--write", nargs=2, default=None, metavar=("VARIANT", "PATH"),
                    help="save a kN variant's profile ('selected': the one --select-heads chose), fitted on all fit "
                         "items, with the fit's sources and its metrics on the whole held-out calibration split, bare")
    args = ap.parse_args(argv)
    if args.gate_app_cases and not args.select_heads:
        ap.error("--gate-app-cases gates the --select-heads choice: name the counts with --select-heads")
    if args.write and not ((args.write[0] == "selected" and args.select_heads)
                           or (args.write[0].startswith("k") and args.write[0][1:].isdigit())):
        ap.error(f"--write: only a kN variant (or 'selected' with --select-heads) has one profile, not {args.write[0]!r}")

    from ohd_guard.app_cases import app_cases
    from ohd_guard.datasets import load_calibration_prompts
    from ohd_guard.detectors import PrefillReader, SAHs, load_profile
    from ohd_guard.detectors.base import evaluate_scores
    from ohd_guard.loading import embedded_model, load_model
    from ohd_guard.metrics import auroc, average_precision, f1_at_threshold, tpr_at_fpr
    from ohd_guard.shipped import default_profile

    def say(msg: str) -> None:
        print(f"[variants {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    embedded = embedded_model(args.model)
    if embedded is None:
        ap.error(f"--model: not an embedded model: {args.model!r}")
    model, tok = load_model(embedded.name, dtype=args.dtype)
    d = build_items(args.per_class, args.traffic, args.eval_per_class, args.toxicchat_dev, args.extra_per_set,
                    args.toxicchat_fit)
    unsafe = [x for x in d["fit_all"] if x.label == 1]
    safe = [x for x in d["fit_all"] if x.label == 0]
    tc = d["tc"]
    sets: dict[str, list] = {"fit": unsafe + safe}
    sets.update({f"held-out @ {c}": v for c, v in d["evals"].items()})
    sets[f"ToxicChat dev ({sum(p.label for p in tc)}/{len(tc)} toxic)"] = tc
    sets.update(d["extra"])
    sets["app cases (right verdicts)"] = app_cases()
    if args.write:  # the profile records its metrics on the whole held-out split, as every shipped profile does
        sets["held-out split (all, bare)"] = load_calibration_prompts("heldout")
    cache: dict[str, np.ndarray] = {}
    if args.reads.exists():
        with np.load(args.reads) as z:
            # files written before --model existed hold the default model's reads
            owner = str(z["model"]) if "model" in z.files else embedded_model(None).name
            if owner != embedded.name:
                ap.error(f"--reads {args.reads} holds {owner}'s reads, not {embedded.name}'s: name another file")
            read_dtype = str(z["dtype"]) if "dtype" in z.files else "float32"  # older files: float32 reads
            if read_dtype != args.dtype:
                ap.error(f"--reads {args.reads} holds {read_dtype} reads, not {args.dtype}: name another file")
            cache = dict(zip(z["keys"].tolist(), z["heads"]))
    keys = {name: [_key(x) for x in items] for name, items in sets.items()}
    todo = {k: x for name, items in sets.items() for k, x in zip(keys[name], items) if k not in cache}
    say(f"{len(cache)} reads cached in {args.reads}, {len(todo)} items to read")
    reader, pending, t0 = PrefillReader(model, tok), list(todo.items()), time.perf_counter()
    for i in range(0, len(pending), args.save_every):  # fit items come first, evaluation sets after them
        chunk = pending[i:i + args.save_every]
        fresh = reader.read([x for _, x in chunk], args.batch_size).heads.astype(np.float32)
        cache.update(zip((k for k, _ in chunk), fresh))
        tmp = args.reads.with_name(args.reads.name + ".part.npz")  # written whole, then renamed: never half a file
        np.savez(tmp, keys=np.array(list(cache)), heads=np.stack(list(cache.values())), model=embedded.name,
                 dtype=args.dtype)
        tmp.replace(args.reads)
        say(f"read {i + len(chunk)} of {len(pending)} items in {time.perf_counter() - t0:.0f} s; saved to {args.reads}")
    reads = {name: np.stack([cache[k] for k in keys[name]]) for name in sets}

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

    shipped = load_profile(default_profile(embedded.name))
    scorers: dict[str, Any] = {}
    profiles: dict[str, Any] = {}  # the kN variants' profiles, for --write
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.select_heads:  # the same choice as ohd-guard calibrate --heads auto|K,K,...
        sel = SAHs(select_top_k=[int(v) for v in args.select_heads.split(",")])
        chosen = sel.select_heads(F, y_fit, sets["fit"])
        dev = sel.dev_mask_
        ctx = np.array([getattr(x, "context", "bare") for x in sets["fit"]])
        kinds = [c for c in dict.fromkeys(ctx[dev]) if len(set(y_fit[dev & (ctx == c)])) == 2]
        print(f"| heads (dev: {int(dev.sum())} of {len(dev)} fit items, {int(y_fit[dev].sum())} unsafe) | L2 | "
              "dev log-loss | dev AUROC | " + " | ".join(kinds) + " |")
        print("|---:|" + "---:|" * (3 + len(kinds)))
        y = y_fit[dev]
        for r in sel.selection_:
            z = r["dev_scores"]
            per = [auroc(z[ctx[dev] == c], y[ctx[dev] == c]) for c in kinds]
            print(f"| {r['heads']} | {r['l2']:g} | {r['dev_log_loss']:.4f} | {auroc(z, y):.3f} | "
                  + " | ".join(f"{a:.3f}" for a in per) + " |")
        print(f"\nchosen on the dev split: {chosen} heads\n")
        if args.gate_app_cases:  # a default that refuses "What's the weather in Paris?" with its tool does not ship
            y_case = np.array([c.label for c in sets["app cases (right verdicts)"]])
            for r in sorted(sel.selection_, key=lambda r: r["dev_log_loss"]):
                prof = profiles[f"k{r['heads']}"] = fit(r["heads"])  # kept: a kN variant reuses it
                wrong = int(((scorer(prof)(reads["app cases (right verdicts)"]) > 0) != (y_case == 1)).sum())
                print(f"app-case gate: {r['heads']} heads (dev log-loss {r['dev_log_loss']:.4f}): {wrong} app cases wrong")
                if not wrong:
                    chosen = r["heads"]
                    break
            else:
                ap.error("--gate-app-cases: no head count gets every app case right")
            print(f"\nchosen on the dev split and the app-case gate: {chosen} heads\n")
        say(f"chose k{chosen}")
        if f"k{chosen}" not in wanted:
            wanted.append(f"k{chosen}")
        if args.write and args.write[0] == "selected":
            args.write[0] = f"k{chosen}"
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
            if v not in profiles:
                profiles[v] = fit(int(v[1:]))
            scorers[v] = scorer(profiles[v])
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
    if args.write:
        v, path = args.write
        prof = profiles.get(v) or fit(int(v[1:]))
        held = sets["held-out split (all, bare)"]
        z, y = scorer(prof)(reads["held-out split (all, bare)"]), np.array([x.label for x in held])
        m = evaluate_scores("heldout", z[y == 1], z[y == 0], prof.threshold)
        prof.model_copy(update={"sources": d["sources"], "metrics": [*prof.metrics, m]}).save(path)
        say(f"wrote {v} to {path}: held-out AUROC {m.auroc:.3f}, DR {m.detection_rate:.3f}, "
            f"FPR {m.false_positive_rate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
