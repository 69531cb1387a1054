"""Detectors fitted on one calibration subsample, side by side on the real embedded model.

Writes ``/tmp/ohd_bench/results.md`` (the shipped profiles' comparison in docs/results.md comes
from ``benchmarks/fit_shipped.py`` and ``ohd-guard eval --shipped``; see there).

    python benchmarks/bench_detectors.py                      # defaults below, ~25 min on 2 CPU cores
    python benchmarks/bench_detectors.py --calib-per-class 8 --heldout 4 --per-set 4 --attack-seeds 2  # smoke

Every detector is fitted on the same stratified subsample of the project's calibration split
(``load_calibration_prompts("calib")``) and evaluated on the held-out split, on public sets from
the shared datasets folder (evenly subsampled) and on an adaptive-attack suite built from held-out
harmful prompts. One-head Defense takes its head from the shipped profile when there is one (its
search ran on the whole calibration split) and refits its threshold on the subsample in each mode;
without a profile it searches with the fast strategy on the subsample.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ohd_guard.cli.common import describe
from ohd_guard.attacks import make_attacks
from ohd_guard.datasets import evenly, load_calibration_prompts, load_shared_set, stratified
from ohd_guard.detectors import HiddenDetect, LargestEffectHead, OneHeadDefense, SAHs, SelfRefusal, shared_prefill
from ohd_guard.evaluation import evaluate
from ohd_guard.loading import load_model
from ohd_guard.profile import Profile

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "ohd_guard" / "profiles" / "qwen2.5-coder-0.5b-instruct.json"
KEEP = "<!-- Notes below this line are written by hand and kept when the benchmark rewrites the file. -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-per-class", type=int, default=40, help="calibration prompts per class (of 220/230)")
    ap.add_argument("--heldout", type=int, default=0, help="held-out project prompts per class (0: all 88 + 98)")
    ap.add_argument("--per-set", type=int, default=24, help="items per public set")
    ap.add_argument("--attack-seeds", type=int, default=10, help="held-out harmful prompts the attacks are built from")
    ap.add_argument("--search-per-class", type=int, default=16, help="prompts per class of LargestEffect's all-heads pass")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="SelfRefusal answer length")
    ap.add_argument("--latency-prompts", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per forward (generation: twice that)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is faster on a loaded machine)")
    ap.add_argument("--profile", type=Path, default=PROFILE)
    ap.add_argument("--out", type=Path, default=Path("/tmp/ohd_bench/results.md"))
    ap.add_argument("--json", type=Path, default=Path("/tmp/ohd_bench/report.json"))
    ap.add_argument("--roc", type=Path, default=Path("/tmp/ohd_bench/roc.png"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model()
    calib = load_calibration_prompts("calib")
    unsafe = stratified([p for p in calib if p.label == 1], args.calib_per_class, seed=0)
    safe = stratified([p for p in calib if p.label == 0], args.calib_per_class, seed=0)

    head, same = None, {}
    if args.profile.is_file():
        profile = Profile.load(args.profile)
        profile.verify(model, tok)
        head = profile.heads[0]
        same = {"mask": profile.mask, "score_layer": profile.score_layer}
    bs = args.batch_size
    exact = OneHeadDefense("exact", head=head, strategy="fast", batch_size=bs, **same)
    detectors = [exact, None, LargestEffectHead("exact", top_k=4, search_per_class=args.search_per_class, batch_size=bs),
                 SAHs(top_k=16, batch_size=bs), HiddenDetect(batch_size=bs),
                 # decode steps are memory-bound on a CPU: a larger batch costs almost nothing more per step
                 SelfRefusal(max_new_tokens=args.max_new_tokens, batch_size=2 * bs)]
    fit_rows = []
    with shared_prefill():  # SAHs and HiddenDetect read the same prefill
        for i, det in enumerate(detectors):
            if det is None:  # fast mode reuses the head the exact one uses (searched or shipped)
                det = detectors[i] = OneHeadDefense("fast", head=exact.profile.heads[0], batch_size=bs,
                                                      mask=exact.profile.mask, score_layer=exact.profile.score_layer)
            t0 = time.perf_counter()
            det.fit(model, tok, unsafe, safe)
            fit_rows.append((det.name, time.perf_counter() - t0, describe(det)))
            print(f"[fit] {det.name}: {fit_rows[-1][1]:.0f} s, {fit_rows[-1][2]}", flush=True)

    held = load_calibration_prompts("heldout")
    if args.heldout:
        held = stratified([p for p in held if p.label == 1], args.heldout, seed=0) + stratified([p for p in held if p.label == 0], args.heldout, seed=0)
    datasets = {"project heldout": held}
    for name in ("advbench", "jbb", "figstep", "alpaca_seed", "refusal_direction_harmless"):
        datasets[name] = evenly(load_shared_set(name), args.per_set)
    datasets["figstep_images"] = load_shared_set("figstep_images", limit=4)
    refs = [n for n in datasets if n != "figstep_images"]
    seeds = stratified([p for p in held if p.label == 1], args.attack_seeds, seed=1)
    attacks = make_attacks(seeds, padding_words=120, image_size=336)
    report = evaluate(detectors, datasets, attacks=attacks, reference_sets=refs,
                      latency_prompts=args.latency_prompts, progress=True)
    report.notes.append(f"total benchmark time {time.perf_counter() - t_start:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report.save_json(args.json)
    try:
        report.plot_roc(args.roc, sets=refs)
    except ImportError as e:
        print(f"[bench] no ROC plot: {e}")

    cmd = "python benchmarks/bench_detectors.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "# Detector comparison on the embedded model",
        "",
        "Generated by `benchmarks/bench_detectors.py`; reproduce with",
        "",
        f"    {cmd.strip()}",
        "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"model Qwen2.5-Coder-0.5B-Instruct (embedded, {next(model.parameters()).dtype}), "
        f"{time.perf_counter() - t_start:.0f} s in total. How the numbers are computed: `docs/evaluation.md`.",
        "",
        f"Calibration: {len(unsafe)} unsafe + {len(safe)} safe prompts, stratified over the categories of the "
        f"project's calibration split; every detector is fitted on exactly these (SAHs and HiddenDetect share one prefill). "
        + (f"One-head Defense's head comes from the shipped profile (searched on the whole calibration split: "
           f"{profile.search}); its threshold is refitted here in each mode." if head is not None else
           "No profile was found, so One-head Defense searched its head (fast strategy) on the subsample."),
        f"Evaluation: the project's held-out split ({len(held)} prompts), {args.per_set} items evenly spread through each "
        f"public set, and {len(seeds)} held-out harmful prompts under each attack (`direct`: the seeds unchanged).",
        "",
        "### Fitted detectors",
        "",
        "| detector | fit s | what was chosen |",
        "|---|---:|---|",
        *[f"| {n} | {s:.0f} | {d} |" for n, s, d in fit_rows],
        "",
        report.to_markdown(),
    ]
    kept = ""
    if args.out.is_file() and KEEP in args.out.read_text():
        kept = args.out.read_text().split(KEEP, 1)[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n" + KEEP + (kept or "\n"))
    print(f"[bench] wrote {args.out}, {args.json}, {args.roc} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
