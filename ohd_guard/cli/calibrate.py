"""``ohd-guard calibrate``: fit a detector on labelled prompts and write its profile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ohd_guard.cli.common import (
    METRIC_COLUMNS,
    describe,
    load_model,
    model_args,
    name_list,
    non_negative_int,
    positive_int,
    shipped,
    table,
)
from ohd_guard.shipped import DEFAULT_DETECTOR

CV_SPLIT = "calibration (out-of-fold)"
"""The metrics row every kind prints: scores of prompts the fit did not see."""


def _layer_range(value: str | None, model) -> list[int] | None:
    """``"8-24"``, ``"12,18,24"`` or ``"all"`` -> score layers (1-based, as ``hidden_states`` indices)."""
    if value is None:
        return None
    from ohd_guard.adapters import get_adapter
    from ohd_guard.errors import InvalidInputError

    L = get_adapter(model).num_layers
    try:
        if value == "all":
            return list(range(1, L + 1))
        if "-" in value:
            a, b = (int(x) for x in value.split("-", 1))
            return list(range(a, b + 1))
        return [int(x) for x in value.split(",")]
    except ValueError:
        raise InvalidInputError(f"--score-layers: expected FIRST-LAST, a comma list or 'all', got {value!r}") from None


def _fit_items(args) -> tuple[list, list, list[str]]:
    """(fit items, held-out items, sources) for ``calibrate``: the project's calibration split (or
    ``--data``) plus ``--fit-shared`` sets read from the shared datasets folder at run time."""
    from ohd_guard.datasets import load_calibration_prompts, load_labelled_file, load_shared_parts, stratified

    if args.data:
        items, heldout_items, sources = load_labelled_file(args.data), [], [str(args.data)]
    else:
        items, heldout_items = load_calibration_prompts("calib"), load_calibration_prompts("heldout")
        sources = ["ohd_guard/data (calib split)"]
    extra, extra_sources = load_shared_parts(args.fit_shared or [])
    items, sources = items + extra, sources + extra_sources
    if args.limit:
        # spread over categories (seeded): the first N of a file are one source or one form
        items = stratified([p for p in items if p.label == 1], args.limit, seed=0) + stratified(
            [p for p in items if p.label == 0], args.limit, seed=0)
    return items, heldout_items, sources


def _in_contexts(args, items: list, sources: list[str], model, processor) -> tuple[list, list[str]]:
    """The fit items as the shipped profiles are fitted: each once bare and once placed in one of
    ``--contexts`` (``ohd_guard.contexts.fit_mix``), with ``tools`` also the requests addressed to a
    bound tool (``tool_use``), with ``structured`` the requests a response schema is for
    (``structured_use``), with ``jailbreak`` past-tense rewrites (``past_tense_use``); unchanged with
    ``--contexts none``. A placed prompt longer than the model's context window is left out (said on
    stderr)."""
    if not args.contexts:
        return items, sources
    from ohd_guard.adapters import get_adapter
    from ohd_guard.contexts import fit_mix
    from ohd_guard.conversation import to_conversation
    from ohd_guard.rendering import encode_conversations
    from ohd_guard.screening import as_input

    window = getattr(get_adapter(model).text_config, "max_position_embeddings", None)  # as the guard reads it
    placed = fit_mix(items, args.contexts)[len(items):]
    fits = [x for x in placed if window is None or encode_conversations(
        processor, [to_conversation(as_input(x), allow_local_files=True)])["input_ids"].shape[1] <= window]
    if len(fits) < len(placed):
        print(f"note: {len(placed) - len(fits)} of {len(placed)} prompts placed in a context are longer than the "
              f"model's context window ({window} tokens) and left out", file=sys.stderr, flush=True)
    extra = [text for kind, text in (("tools", "the requests addressed to a bound tool (tool_use)"),
                                     ("structured", "the requests in a response schema made for them (structured_use)"),
                                     ("jailbreak", "a share of the prompts rewritten to the past tense (past_tense_use)"))
             if kind in args.contexts]
    return [*items, *fits], [*sources, f"each once in a context ({', '.join(args.contexts)}) of ohd_guard.contexts "
                                       f"(fit material){''.join(' and ' + t for t in extra)}"]


AUTO_HEADS: tuple[int, ...] = (8, 16, 24, 32, 48, 64)
"""The head counts ``--heads auto`` chooses from."""


def _heads(value: str) -> tuple[int, ...]:
    """``--heads``: one count, ``auto`` (:data:`AUTO_HEADS`) or a comma list of counts to choose from."""
    if value.strip() == "auto":
        return AUTO_HEADS
    try:
        counts = tuple(int(v) for v in value.split(","))
    except ValueError:
        counts = ()
    if not counts or any(k < 1 for k in counts):
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'auto' or a comma list of them, not {value!r}")
    return counts


def _contexts(value: str) -> tuple[str, ...]:
    """``--contexts``: ``none``, ``all`` or a comma list of context kinds other than bare."""
    from ohd_guard.contexts import FIT_CONTEXTS

    if value in ("none", "all"):
        return () if value == "none" else FIT_CONTEXTS
    return tuple(name_list(FIT_CONTEXTS, "context(s)")(value))


def _fpr(value: str) -> float:
    """``--target-fpr``: a false-positive rate in [0, 1)."""
    import argparse

    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {value!r}") from None
    if not 0.0 <= f < 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {value!r}")
    return f


def _note_resolution(args, n_safe: int) -> None:
    """With N benign prompts a rate moves in steps of 1/N: say when the target is finer than that."""
    if args.target_fpr and args.target_fpr * n_safe < 1:
        print(f"note: --target-fpr {args.target_fpr:g} on {n_safe} benign prompts allows none above the threshold "
              f"(steps of {1 / n_safe:.3g}): it is the highest benign score; add benign prompts for a finer "
              "target", file=sys.stderr, flush=True)


def _warn_surface(processor, unsafe: list, safe: list) -> None:
    """Say on stderr (not only in the log) when prompt length or a trailing "?" alone separates the
    classes: any kind may learn that instead of the content, and fail where it goes the other way."""
    from ohd_guard.detectors.ohd_profile import SURFACE_FEATURES, surface_aurocs, warn_surface

    surface = surface_aurocs(processor, unsafe, safe)
    warn_surface(surface)
    for name, value in surface.items():
        if abs(value - 0.5) > 0.15:
            print(f"warning: {SURFACE_FEATURES[name]} alone separates unsafe from safe in the calibration data "
                  f"(AUROC {value:.2f}); the detector may learn it and fail where it goes the other way: balance "
                  "the sets on it", file=sys.stderr, flush=True)


def _cross_validate(args, fit, unsafe: list, safe: list) -> Any:
    """Out-of-fold calibration metrics for a kind whose fit has none: ``fit(u, s)`` on K-1 stratified
    folds (seeded), the held-out fold scored as its margin over that fold's threshold, so the rates
    are each fold's own decisions and the AUROC pools comparable margins. None when K < 2."""
    import numpy as np

    from ohd_guard.detectors.base import evaluate_scores

    k = min(args.cv_folds, len(unsafe), len(safe))
    if k < 2:
        if args.cv_folds:
            print(f"note: no out-of-fold metrics: {k} fold(s) possible", file=sys.stderr)
        return None
    rng = np.random.default_rng(0)
    folds = [np.arange(len(x))[rng.permutation(len(x))] % k for x in (unsafe, safe)]
    margins: list[list[float]] = [[], []]
    for f in range(k):
        if not args.quiet:
            print(f"[calibrate] cross-validation fold {f + 1}/{k}", file=sys.stderr, flush=True)
        train = [[x for x, g in zip(xs, fs) if g != f] for xs, fs in zip((unsafe, safe), folds)]
        test = [[x for x, g in zip(xs, fs) if g == f] for xs, fs in zip((unsafe, safe), folds)]
        det = fit(*train)
        scores = np.asarray(det.score(test[0] + test[1]), dtype=float) - float(det.threshold)
        margins[0] += scores[: len(test[0])].tolist()
        margins[1] += scores[len(test[0]):].tolist()
    return evaluate_scores(CV_SPLIT, np.asarray(margins[0]), np.asarray(margins[1]), 0.0)


def cmd_calibrate(args) -> int:
    if len(args.heads) > 1 and args.detector != "sahs":  # before the data and the model are loaded
        from ohd_guard.errors import InvalidInputError

        raise InvalidInputError(f"--heads {','.join(map(str, args.heads))} chooses a count for --detector sahs only; "
                                f"give {args.detector} one count")
    bare, heldout_items, sources = _fit_items(args)
    model, processor = load_model(args)
    items, sources = _in_contexts(args, bare, sources, model, processor)
    unsafe = [p for p in items if p.label == 1]
    safe = [p for p in items if p.label == 0]
    _warn_surface(processor, [p for p in bare if p.label == 1], [p for p in bare if p.label == 0])
    if args.detector != "ohd":
        return _calibrate_probe(args, model, processor, unsafe, safe, heldout_items, sources)
    from ohd_guard.detectors import calibrate
    from ohd_guard.masking import HeadRef, MaskSpec

    _note_resolution(args, len(safe))
    head = HeadRef(layer=args.head[0], head=args.head[1]) if args.head else None
    threshold: Any = "kde" if args.target_fpr is None else args.target_fpr

    def fit(u: list, s: list, heldout: Any = None, progress: bool = False) -> Any:
        return calibrate(
            model, processor, u, s,
            spec=MaskSpec(target=args.target, positions=args.positions, alpha=args.alpha),
            score_layer=args.score_layer, score_layers=_layer_range(args.score_layers, model), head=head,
            strategy=args.strategy, top_k=args.top_k, percentile=args.percentile, rank_by=args.rank_by,
            threshold=threshold, batch_size=args.batch_size, progress=progress, heldout=heldout, sources=sources,
        )

    def bound(u: list, s: list) -> Any:
        from ohd_guard.detectors import OneHeadDefense

        det = OneHeadDefense.from_profile(fit(u, s), model, processor)
        det.batch_size = args.batch_size
        return det

    profile = fit(unsafe, safe, progress=not args.quiet, heldout=(
        [p for p in heldout_items if p.label == 1], [p for p in heldout_items if p.label == 0]
    ) if heldout_items else None)
    if cv := _cross_validate(args, bound, unsafe, safe):
        profile = profile.model_copy(update={"metrics": [*profile.metrics, cv]})
    profile.save(args.output)
    print(f"head {profile.heads[0]}  score layer {profile.score_layer}  "
          f"threshold {profile.threshold:.4f} deg ({profile.threshold_method})  "
          f"search {profile.search} in {profile.seconds:.0f} s")
    print(table([m.model_dump() for m in profile.metrics], METRIC_COLUMNS))
    print(table([{"head": str(h.head), **h.model_dump(exclude={"head"})} for h in profile.top_heads[:10]],
                 ["head", "unsafe_mean", "safe_mean", "gap", "auroc", "eligible"]))
    print(f"profile written to {args.output}")
    return 0


def _calibrate_probe(args, model, processor, unsafe: list, safe: list, heldout_items: list,
                     sources: list[str]) -> int:
    """``calibrate --detector sahs|residual|hiddendetect|fused``: fit, measure on the held-out split, save."""
    import time

    import numpy as np

    from ohd_guard.detectors import Fused, HiddenDetect, OhdProfile, ResidualProbe, SAHs
    from ohd_guard.detectors.base import evaluate_scores

    _note_resolution(args, len(safe))
    bs = args.batch_size
    rule: Any = {} if args.target_fpr is None else {"threshold": args.target_fpr}  # else the kind's default rule
    if args.detector == "sahs":
        choose = {"select_top_k": args.heads} if len(args.heads) > 1 else {}
        det: SAHs | ResidualProbe | HiddenDetect | Fused = SAHs(top_k=args.heads[0], batch_size=bs, **choose, **rule)
    elif args.detector == "residual":
        det = ResidualProbe(pool=args.pool, top_k=args.layers, batch_size=bs, **rule)
    elif args.detector == "hiddendetect":
        det = HiddenDetect(batch_size=bs, **rule)
    else:
        ohd = OhdProfile.load(args.ohd_profile or shipped(args)["ohd"], allow_edited=args.allow_edited)
        det = Fused(ohd, n_angles=args.angles, sahs=SAHs(top_k=args.heads[0], batch_size=bs), batch_size=bs, **rule)
    t0 = time.perf_counter()
    if not args.quiet:
        print(f"[calibrate] fitting {det.name} on {len(unsafe)} unsafe + {len(safe)} safe prompts", file=sys.stderr, flush=True)
    det.fit(model, processor, unsafe, safe)
    state = det.profile.model_copy(update={"sources": sources, "seconds": round(time.perf_counter() - t0, 2)})
    if isinstance(det, SAHs) and det.selection_ and det.dev_mask_ is not None:
        print(table([{k: r[k] for k in ("heads", "l2", "dev_log_loss")} for r in det.selection_],
                    ["heads", "l2", "dev_log_loss"]))
        print(f"heads chosen on a dev split of the fit items ({int(det.dev_mask_.sum())} of {len(det.dev_mask_)}): "
              f"{det.top_k}")
    if args.detector == "hiddendetect" and (cv := _cross_validate(
            args, lambda u, s: HiddenDetect(batch_size=bs, **rule).fit(model, processor, u, s), unsafe, safe)):
        state = state.model_copy(update={"metrics": [*state.metrics, cv]})
    if heldout_items:
        u = [p for p in heldout_items if p.label == 1]
        s = [p for p in heldout_items if p.label == 0]
        scores = det.score(u + s)
        state = state.model_copy(update={"metrics": [*state.metrics, evaluate_scores(
            "heldout", np.asarray(scores[: len(u)]), np.asarray(scores[len(u):]), state.threshold)]})  # fmt: skip
    state.save(args.output)
    line = describe(det)
    if "threshold" not in line:
        line += f", threshold {state.threshold:.4g} ({state.threshold_method})"
    print(f"{det.name}: {line}  in {state.seconds:.0f} s")
    print(table([m.model_dump() for m in state.metrics], METRIC_COLUMNS))
    print(f"profile written to {args.output}")
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="fit a detector (default: the guard's default kind) and write its profile")
    model_args(c)
    c.add_argument("--detector", choices=["ohd", "sahs", "residual", "hiddendetect", "fused"],
                   default=DEFAULT_DETECTOR,
                   help=f"sahs (probe on the top heads), residual (probe on a few layers' residual states), ohd "
                        f"(One-head Defense), hiddendetect (logit-lens refusal cosine) or fused (logistic on OhD angles and the SAHs log-odds); default: {DEFAULT_DETECTOR}, "
                        "the kind the guard loads by default")
    c.add_argument("--cv-folds", type=non_negative_int, default=5, metavar="K",
                   help="ohd/hiddendetect: refit on K-1 folds and score the held-out fold, for out-of-fold calibration "
                        "metrics (K times the fit; 0 skips). sahs/fused are cross-validated by their own fit")
    c.add_argument("--data", type=Path, help="labelled CSV/JSONL (default: the project's calibration prompts)")
    c.add_argument("--fit-shared", action="append", default=[], metavar="NAME[:N]",
                   help="also fit on N items (all without :N), evenly spread, of a shared set (repeatable)")
    c.add_argument("--output", "-o", type=Path, required=True, help="where the profile JSON is written")
    c.add_argument("--contexts", type=_contexts, default="all", metavar="all|none|KIND,...",
                   help="also fit on each prompt placed once in one of these contexts (tools, rag, history, operator, "
                        "structured, jailbreak, padding; ohd_guard.contexts; tools also adds requests addressed to a "
                        "bound tool), as the shipped profiles are (default: all); none fits on the bare prompts only")
    c.add_argument("--heads", type=_heads, default=(16,), metavar="N|auto|K,K,...",
                   help="sahs/fused: heads in the probe (default 16); for sahs, 'auto' or a comma list chooses the count on a dev "
                        "split of the fit items (a quarter of the requests; lowest dev log-loss, fewer heads on a "
                        f"tie; auto: {','.join(map(str, AUTO_HEADS))}), as the shipped 0.5B profile's 24 were chosen")
    c.add_argument("--pool", choices=["last", "mean", "max", "content-mean", "content-max"], default="mean",
                   help="residual: read the last prompt token, the mean / max over every prompt position, or over "
                        "the user and tool-result text only (content-mean / content-max) (default mean)")
    c.add_argument("--layers", type=positive_int, default=2, help="residual: layers in the probe (default 2)")
    c.add_argument("--angles", type=positive_int, default=1,
                   help="fused: selective heads whose angles are features (default 1: one-pass screening)")
    c.add_argument("--ohd-profile", type=Path, default=None,
                   help="fused: the One-head Defense profile giving mask, score layer and heads (default: shipped)")
    c.add_argument("--allow-edited", action="store_true", help="fused: accept an --ohd-profile edited after calibration")
    c.add_argument("--strategy", choices=["two-stage", "exact", "fast"], default="two-stage",
                   help="ohd head search: fast mask on all heads then exact on the top k (default), or one mode only")
    c.add_argument("--target", choices=["query", "output"], default="query",
                   help="ohd: mask the head's query (paper, default) or its output")
    c.add_argument("--positions", choices=["all", "last"], default="last",
                   help="last (default: fast, and better held-out AUROC on the embedded model) or all (paper-exact)")
    c.add_argument("--alpha", type=float, default=1e-5, help="ohd: soft mask scale (default 1e-5)")
    c.add_argument("--score-layer", type=int, default=None, help="read the angle after this decoder layer (default: last, after the final norm)")
    c.add_argument("--score-layers", default=None, metavar="FIRST-LAST|all",
                   help="search the score layer with the head among these (e.g. 8-24); one replay serves them all")
    c.add_argument("--head", type=int, nargs=2, metavar=("LAYER", "HEAD"), help="fix the head, skip the search")
    c.add_argument("--top-k", type=int, default=8, help="ohd: heads re-scored in the second search stage")
    c.add_argument("--percentile", type=float, default=80.0,
                   help="ohd selectivity rule: keep heads whose safe angle is below this percentile over all heads")
    c.add_argument("--rank-by", choices=["gap", "auroc"], default="auroc",
                   help="rank selective heads by AUROC (default; picked better heads on held-out prompts) or mean-angle gap (paper)")
    c.add_argument("--target-fpr", type=_fpr, default=None, metavar="F",
                   help="every kind: the threshold that flags at most this share of the benign calibration prompts "
                        "(out-of-fold scores for the probes) instead of the kind's default rule (KDE crossing or "
                        "probability 0.5); recorded as threshold_method 'target_fpr=F on N benign prompts'")
    c.add_argument("--limit", type=int, default=None, help="use at most N unsafe and N safe prompts, spread evenly over categories")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    c.set_defaults(func=cmd_calibrate)
