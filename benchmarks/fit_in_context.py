"""Fit detector candidates on prompts placed in the contexts users run, and compare them in context.

Issue #22: a probe fitted on bare single-turn prompts reads their surface form, so tools bound, RAG
templates, chat history and operator prompts move its scores. This script fits every candidate on
ONE set of reads (one prefill per item, shared by all of them):

* fit data: the shipped fit prompts (the project's calibration split and parts of public sets) and
  real user traffic (ToxicChat train, a WildGuardMix/Aegis training sample; their dev splits held
  back, EXCLUDE_rows dropped), each once bare and once placed in a context drawn from the *fit*
  half of the context material (tools, rag, history, operator, jailbreak, padding);
* candidates: SAHs (last-token heads, today's default kind) and residual-stream probes read at the
  last token, averaged over the prompt or max-pooled; each also as "bare-fitted" (today's data only)
  for the comparison; with ``--judge``, also the baseline a user without a guard model would pick:
  the same model asked as a judge (:class:`~ohd_guard.detectors.Judge`, one extra prefill of a
  classification prompt; its threshold picked on a sample of the fit items), with its scoring time
  per set as a ratio of the probes' (all candidates read from one prefill) on the same items;
* evaluation, threshold fixed at fit time: the project's held-out split bare and in the held-out
  half of the context material (tools, rag, history, operator), and ToxicChat's dev split at its
  real class ratio (F1, AUPRC beside AUROC), deduplicated against the fit data.

    python benchmarks/fit_in_context.py                        # prints the table, writes nothing
    python benchmarks/fit_in_context.py --write residual       # also writes the chosen kind's profile
    python benchmarks/fit_in_context.py --per-class 150 --traffic 120 --eval-per-class 30   # the sizes used
    python benchmarks/fit_in_context.py --judge                # adds the model-as-judge baseline and its cost
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

EVAL_CONTEXTS = ("bare", "tools", "rag", "history", "operator", "structured")


def summary(rows: list[dict]) -> str:
    """One line per candidate against the issue's targets: DR/FPR per context (and the worst gap to
    bare), ToxicChat F1/AUPRC/AUROC, the look-alike FPR and the harmful/attack DR ranges."""
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["detector"], {})[r["set"]] = r
    out = ["| candidate | bare DR / FPR | tools | rag | history | operator | structured | worst context: DR drop / "
           "FPR rise | requests to a bound tool DR / FPR | requests in a schema DR / FPR | ToxicChat F1 / AUPRC / AUROC | look-alike FPR (own, oktest, "
           "phtest, coconot, orbench) | public harmful DR (min-max) | attacks DR (min-max) | app cases right |",
           "|---" * 15 + "|"]
    for det, sets in by.items():
        ctx = {c: sets.get(f"held-out @ {c}") for c in EVAL_CONTEXTS}
        cell = {c: f"{r['dr']:.2f} / {r['fpr']:.2f}" if r else "-" for c, r in ctx.items()}
        bare = ctx["bare"]
        gaps = [(bare["dr"] - r["dr"], r["fpr"] - bare["fpr"]) for c, r in ctx.items() if r and bare and c != "bare"]
        worst = f"{max(g[0] for g in gaps):+.2f} / {max(g[1] for g in gaps):+.2f}" if gaps else "-"
        tc = next((r for k, r in sets.items() if k.startswith("ToxicChat")), None)
        tcs = f"{tc['f1']:.3f} / {tc['auprc']:.3f} / {tc['auroc']:.3f}" if tc else "-"
        look = [sets.get(k, {}).get("fpr") for k in ("own look-alike pairs", "oktest", "phtest_harmless",
                                                      "coconot_contrast", "orbench_hard")]
        looks = ", ".join("-" if v is None else f"{v:.2f}" for v in look)

        def span(keys: list[str], sets=sets) -> str:
            v = [sets[k]["dr"] for k in keys if k in sets and "dr" in sets[k]]
            return f"{min(v):.2f}-{max(v):.2f}" if v else "-"

        harm = span(["advbench", "harmfulqa", "catqa", "do_not_answer", "past_tense"])
        att = span([k for k in sets if k.startswith("attack: ")])
        tu = sets.get("held-out tool use")
        tus = f"{tu['dr']:.2f} / {tu['fpr']:.2f}" if tu else "-"
        su = sets.get("held-out structured use")
        sus = f"{su['dr']:.2f} / {su['fpr']:.2f}" if su else "-"
        app = sets.get("app cases (right verdicts)")
        apps = f"{round(app['dr'] * app['n'])}/{app['n']}" if app else "-"
        out.append(f"| {det} | {cell['bare']} | {cell['tools']} | {cell['rag']} | {cell['history']} | "
                   f"{cell['operator']} | {cell['structured']} | {worst} | {tus} | {sus} | {tcs} | {looks} | {harm} | {att} | {apps} |")
    return "\n".join(out)


def class_counts(text: str) -> tuple[int, int]:
    """``--toxicchat-fit`` as argparse reads it: "TOXIC,NONTOXIC", two counts."""
    try:
        toxic, nontoxic = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOXIC,NONTOXIC (two integers), not {text!r}") from None
    return toxic, nontoxic


def build_items(per_class: int, traffic_n: int, eval_per_class: int, toxicchat_dev: int,
                extra_per_set: int, toxicchat_fit: tuple[int, int] | None = None) -> dict[str, Any]:
    """The fit items (bare, then in context, then tool and structured use and past-tense rewrites), the evaluation sets and the fit's sources, as
    ``fit_bare``, ``fit_all``, ``sources``, ``evals`` (held-out split per context), ``tc`` (ToxicChat
    dev) and ``extra`` (held-out tool use, look-alikes, public harmful sets, attacks). Deterministic:
    every script comparing candidates on these sizes sees the same items. ``toxicchat_fit``
    (toxic, non-toxic) replaces ``traffic_n // 2`` of each for ToxicChat's fit split only (it holds 267
    toxic prompts of 1,978); the larger of two counts is a superset of the smaller (the same seeded
    order), so a bigger ToxicChat share adds reads rather than replacing them."""
    from ohd_guard.attacks import make_attacks
    from ohd_guard.contexts import fit_mix, in_contexts, structured_use, tool_use
    from ohd_guard.datasets import (
        dedupe_against,
        load_calibration_prompts,
        load_shared_set,
        shipped_fit_items,
        split_dev,
        stratified,
    )

    items, sources = shipped_fit_items()
    bare = stratified([p for p in items if p.label == 1], per_class, seed=0)
    bare += stratified([p for p in items if p.label == 0], per_class, seed=0)
    tc_fit, tc_dev = split_dev(load_shared_set("toxicchat_train_human"), 0.25, seed=0)
    gr_fit, _ = split_dev(load_shared_set("guardreasonertrain_prompts_5k"), 0.25, seed=0)
    n = traffic_n // 2
    tc_n = toxicchat_fit or (n, n)
    tc_u, tc_s = (stratified([p for p in tc_fit if p.label == label], k, seed=0) for label, k in zip((1, 0), tc_n))
    gr = [x for label in (1, 0) for x in stratified([p for p in gr_fit if p.label == label], n, seed=0)]
    # ToxicChat beyond n per class goes last: fit_mix draws contexts in list order, so the items of the
    # plain recipe keep their placements (and cached reads) when ToxicChat's share grows
    traffic = tc_u[:n] + tc_s[:n] + gr + tc_u[n:] + tc_s[n:]
    fit_bare = bare + traffic
    fit_all = fit_mix(fit_bare)  # each once bare, once in a context of the fit material, then tool and structured use, past tense
    sources = [*sources, f"of the above, a seeded stratified sample of {per_class} unsafe + {per_class} safe "
               "(benchmarks/fit_in_context.py, build_items)",
               f"toxicchat_train_human (fit split, {len(tc_u)} + {len(tc_s)})",
               f"guardreasonertrain_prompts_5k (fit split, {n} + {n})",
               f"each of the {len(fit_bare)} once more in a context of ohd_guard.contexts (fit material, contexts.fit_mix), "
               "then the requests addressed to a bound tool (tool_use) and in a response schema made for them "
               "(structured_use), and a share of them rewritten to the past tense (past_tense_use)"]
    # evaluation items are deduplicated against the whole fit splits of the traffic sets, not only the
    # sampled fit items, so they stay the same whatever share of a set the fit takes
    seen = bare + tc_fit + gr_fit
    held = dedupe_against(load_calibration_prompts("heldout"), seen)
    hu = stratified([p for p in held if p.label == 1], eval_per_class, seed=1)
    hs = stratified([p for p in held if p.label == 0], eval_per_class, seed=1)
    evals = {c: in_contexts(hu + hs, kinds=(c,), seed=1, split="heldout") for c in EVAL_CONTEXTS}
    tc = dedupe_against(tc_dev, seen)
    if len(tc) > toxicchat_dev:  # a seeded random sample keeps the set's real class ratio (about 13 % toxic)
        tc = random.Random(2).sample(tc, toxicchat_dev)
    extra: dict[str, list] = {"held-out tool use": tool_use("heldout"),  # requests addressed to held-out tools
                              "held-out structured use": structured_use("heldout")}  # and to held-out schemas
    if extra_per_set:  # bare look-alikes, public harmful sets and adaptive attacks, none fitted on
        k = extra_per_set
        extra["own look-alike pairs"] = [p for p in held if p.category.startswith("contrast_")]
        for name in ("oktest", "phtest_harmless", "coconot_contrast", "orbench_hard", "advbench", "harmfulqa",
                     "catqa", "do_not_answer", "past_tense"):
            extra[name] = stratified(dedupe_against(load_shared_set(name), seen), k, seed=4)
        seeds = stratified([p for p in held if p.label == 1 and not p.category.startswith("contrast_")], k, seed=5)
        attacks = make_attacks(seeds, ("instruction_suffix", "benign_padding", "past_tense", "jailbreak_wrapper",
                                       "multi_turn", "split_turns"), include_direct=False)
        extra.update({f"attack: {a}": v for a, v in attacks.items()})
    return dict(fit_bare=fit_bare, fit_all=fit_all, sources=sources, evals=evals, tc=tc, extra=extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="embedded model name (default: the embedded default); a local "
                    "model folder also works, without --write")
    ap.add_argument("--per-class", type=int, default=150, help="shipped fit prompts per class")
    ap.add_argument("--traffic", type=int, default=120, help="real-traffic fit prompts per class")
    ap.add_argument("--eval-per-class", type=int, default=30, help="held-out prompts per class, per context")
    ap.add_argument("--toxicchat-fit", type=class_counts, default=None, metavar="TOXIC,NONTOXIC",
                    help="ToxicChat fit prompts per class instead of --traffic's half each (its fit split holds 267 "
                         "toxic of 1,978): real traffic's own mix of requests, most of them benign")
    ap.add_argument("--toxicchat-dev", type=int, default=150, help="ToxicChat dev prompts (at their real ratio)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--target-fpr", type=float, default=None, help="threshold for this FPR on the benign fit items")
    ap.add_argument("--write", default=None, help="write this candidate's profile into ohd_guard/profiles")
    ap.add_argument("--judge", action="store_true", help="also score the model asked as a judge, and its time")
    ap.add_argument("--judge-fit-per-class", type=int, default=60,
                    help="fit items per class (bare and in context) the judge's threshold is picked on")
    ap.add_argument("--save-dir", type=Path, default=None,
                    help="save every in-context candidate's profile and the result rows (JSON) here, to choose later")
    ap.add_argument("--extra-per-set", type=int, default=30,
                    help="items per look-alike / harmful / attack set in the extra bare evaluation (0: none)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "ohd_guard" / "profiles")
    ap.add_argument("--candidates", default="sahs,residual-last,residual-mean,residual-max,residual-content-mean,"
                    "residual-content-max", help="comma-separated candidates to fit (sahs, residual-<pool>)")
    ap.add_argument("--summarize", type=Path, default=None, metavar="ROWS_JSON",
                    help="print the summary table of a saved rows.json (--save-dir) and exit; loads no model")
    args = ap.parse_args(argv)
    if args.summarize:
        import json

        print(summary(json.loads(args.summarize.read_text())))
        return 0

    from ohd_guard.app_cases import app_cases
    from ohd_guard.datasets import stratified
    from ohd_guard.detectors import Judge, ResidualProbe, SAHs, shared_prefill
    from ohd_guard.detectors.base import probe_threshold
    from ohd_guard.evaluation import joint_scores
    from ohd_guard.loading import embedded_model, load_model
    from ohd_guard.metrics import auroc, average_precision, f1_at_threshold, tpr_at_fpr

    def say(msg: str) -> None:
        print(f"[fit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    embedded = embedded_model(args.model)
    if embedded is None and (args.write or not Path(str(args.model)).is_dir()):
        ap.error(f"--model: not an embedded model{' (--write needs one)' if args.write else ''}: {args.model!r}")
    model, tok = load_model(args.model)

    # -- data ----------------------------------------------------------------------------------
    data = build_items(args.per_class, args.traffic, args.eval_per_class, args.toxicchat_dev, args.extra_per_set,
                       args.toxicchat_fit)
    fit_bare, fit_all, sources, evals, tc, extra = (data[k] for k in ("fit_bare", "fit_all", "sources", "evals", "tc",
                                                                     "extra"))
    fit_ctx = fit_all[len(fit_bare):]
    y_all = np.array([x.label for x in fit_all])
    hu = [x for x in evals["bare"] if x.label == 1]
    hs = [x for x in evals["bare"] if x.label == 0]
    say(f"fit: {len(fit_bare)} bare ({int(y_all[:len(fit_bare)].sum())} unsafe) + {len(fit_ctx)} in context "
        f"({int(y_all[len(fit_bare):].sum())} unsafe); "
        f"eval: {len(hu)}+{len(hs)} held-out x {len(EVAL_CONTEXTS)} contexts, ToxicChat dev {len(tc)} "
        f"({sum(p.label for p in tc)} toxic)")

    # -- candidates, fitted on one set of reads --------------------------------------------------
    bs = args.batch_size
    rule = args.target_fpr if args.target_fpr is not None else "prob"
    def residual(pool: str) -> Any:
        return lambda: ResidualProbe(pool=pool, top_k=2, batch_size=bs, threshold=rule)  # type: ignore[arg-type]

    makers = {"sahs": lambda: SAHs(top_k=16, batch_size=bs)}
    makers.update({f"residual-{p}": residual(p) for p in ("last", "mean", "max", "content-mean", "content-max")})
    wanted = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if unknown := [c for c in wanted if c not in makers]:
        ap.error(f"--candidates: unknown {unknown}; choose from {list(makers)}")
    makers = {k: makers[k] for k in wanted}
    fitted = {}
    t0 = time.perf_counter()
    with shared_prefill():
        for name, make in makers.items():
            u = [x for x in fit_all if x.label == 1]
            s_ = [x for x in fit_all if x.label == 0]
            fitted[f"{name} (in context)"] = make().fit(model, tok, u, s_)
            fitted[f"{name} (bare)"] = make().fit(model, tok, [x for x in fit_bare if x.label == 1],
                                                  [x for x in fit_bare if x.label == 0])
            say(f"{name}: fitted ({time.perf_counter() - t0:.0f} s so far)")

    judge = None
    if args.judge:  # nothing learnt: only its threshold is picked, on a sample of the same fit items
        rule_j = args.target_fpr if args.target_fpr is not None else "midpoint"
        ju = stratified([x for x in fit_all if x.label == 1], args.judge_fit_per_class, seed=3)
        js = stratified([x for x in fit_all if x.label == 0], args.judge_fit_per_class, seed=3)
        judge = Judge(threshold=rule_j, batch_size=bs).fit(model, tok, ju, js)
        say(f"judge: threshold {judge.threshold:+.3f} ({judge.profile.threshold_method}) on {len(ju)}+{len(js)} fit items")

    # -- evaluation ------------------------------------------------------------------------------
    if embedded is not None:  # today's shipped default (fitted on bare prompts) scored beside them, as the reference
        from ohd_guard.detectors import load_profile
        from ohd_guard.shipped import default_profile

        ref = load_profile(default_profile(embedded.name)).bind(model, tok)
        fitted[f"shipped {ref.profile.kind} (reference)"] = ref
    dets = list(fitted.values())
    y_ctx = np.r_[np.ones(int(y_all.sum()), int), np.zeros(int((y_all == 0).sum()), int)]  # the order fit() saw
    # each in-context candidate also at the threshold that keeps 5 % of the benign fit items (out of fold)
    variants = [(n, k, d.threshold) for k, (n, d) in enumerate(fitted.items())]
    variants += [(f"{n} @5%FPR", k, probe_threshold(0.05, d.oof_, y_ctx)[0])
                 for k, (n, d) in enumerate(fitted.items()) if "(in context)" in n]
    # SAHs (last token) combined with each content-pooled probe and the last-token residual probe: a logistic regression on their two
    # out-of-fold log-odds (the fused detector's recipe), threshold at probability 0.5
    from ohd_guard.detectors.features import Logistic

    names = list(fitted)
    stacks = []
    for other in ("residual-content-mean", "residual-content-max", "residual-last"):
        a, b = "sahs (in context)", f"{other} (in context)"
        if a in fitted and b in fitted:
            comb = Logistic.fit(np.c_[fitted[a].oof_, fitted[b].oof_], y_ctx, 1.0)
            stacks.append((f"sahs + {other} (in context)", names.index(a), names.index(b), comb))
    rows, costs = [], []

    def scored(conv: list) -> list[tuple[str, np.ndarray, float]]:
        """(name, scores, threshold) of every candidate on ``conv``; with the judge, its time over the probes'."""
        t0 = time.perf_counter()
        sc = joint_scores(dets, conv, bs)
        out = [(n, sc[:, k], t) for n, k, t in variants]
        out += [(n, comb.decision(np.c_[sc[:, a], sc[:, b]]), 0.0) for n, a, b, comb in stacks]
        if judge is not None:
            t1 = time.perf_counter()
            out.append(("judge (same model)", judge.score(conv), judge.threshold))
            t2 = time.perf_counter()
            costs.append((len(conv), t1 - t0, t2 - t1))
        return out

    for c, conv in evals.items():
        y = np.array([x.label for x in conv])
        for n, s_, t in scored(conv):
            rows.append(dict(detector=n, set=f"held-out @ {c}", n=len(y), dr=float(np.mean(s_[y == 1] > t)),
                             fpr=float(np.mean(s_[y == 0] > t)), auroc=auroc(s_, y), tpr1=tpr_at_fpr(s_, y, 0.01)))
        say(f"scored {c}")
    if tc:
        y = np.array([p.label for p in tc])
        for n, s_, t in scored(tc):
            rows.append(dict(detector=n, set=f"ToxicChat dev ({int(y.sum())}/{len(y)} toxic)", n=len(y),
                             dr=float(np.mean(s_[y == 1] > t)), fpr=float(np.mean(s_[y == 0] > t)),
                             auroc=auroc(s_, y), f1=f1_at_threshold(s_, y, t), auprc=average_precision(s_, y)))
    for name, items_ in extra.items():
        if not items_:
            continue
        y = np.array([x.label for x in items_])
        for n, s_, t in scored(items_):
            rates = {k: float(np.mean(s_[y == v] > t)) for k, v in (("dr", 1), ("fpr", 0)) if (y == v).any()}
            rows.append(dict(detector=n, set=name, n=len(y), **rates))
        say(f"scored {name}")
    cases = app_cases()  # single conversations from real apps, by name: a refit must not break one of them
    case_scores = scored(cases)
    say("scored the app cases")
    print("| app case (expected) | " + " | ".join(n for n, _, _ in case_scores) + " |")
    print("|---|" + "---:|" * len(case_scores))
    for i, c in enumerate(cases):
        cells = [f"{sc[i]:+.2f}{'' if (sc[i] > t) == bool(c.label) else ' (wrong)'}" for _, sc, t in case_scores]
        print(f"| {c.variant} ({'flag' if c.label else 'pass'}) | " + " | ".join(cells) + " |")
    for n, sc, t in case_scores:
        y = np.array([c.label for c in cases])
        rows.append(dict(detector=n, set="app cases (right verdicts)", n=len(cases), dr=float(np.mean((sc > t) == (y == 1)))))
    print()
    print("| detector | set | n | DR | FPR | AUROC | TPR@1%FPR | F1 | AUPRC |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f = lambda k, r=r: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        print(f"| {r['detector']} | {r['set']} | {r['n']} | {f('dr')} | {f('fpr')} | {f('auroc')} | {f('tpr1')} | "
              f"{f('f1')} | {f('auprc')} |")
    print("\n" + summary(rows))
    if costs:
        n_items, probes_s, judge_s = (sum(col) for col in zip(*costs))
        print(f"\njudge cost: {judge_s:.1f} s for {n_items} items ({1000 * judge_s / n_items:.0f} ms each) vs "
              f"{probes_s:.1f} s for every probe candidate from one prefill each: {judge_s / probes_s:.2f}x "
              f"(per set: {', '.join(f'{j / p:.2f}x' for _, p, j in costs)})")
    if args.save_dir:
        import json

        args.save_dir.mkdir(parents=True, exist_ok=True)
        for n, d in fitted.items():
            if "(in context)" in n:  # the profile, and its out-of-fold scores for a later target-FPR threshold
                d.profile.model_copy(update={"sources": sources}).save(args.save_dir / f"{n.split()[0]}.json")
                np.savez(args.save_dir / f"{n.split()[0]}.oof.npz", oof=d.oof_, y=y_ctx)
        (args.save_dir / "rows.json").write_text(json.dumps(rows, indent=1))
        say(f"saved the in-context candidates' profiles and rows.json in {args.save_dir}")
    if args.write:
        det = fitted[f"{args.write} (in context)"]
        kind = det.profile.kind
        path = det.profile.model_copy(update={"sources": sources}).save(args.out / f"{embedded.name}.{kind}.json")
        say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
