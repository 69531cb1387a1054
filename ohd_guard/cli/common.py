"""What the ``ohd-guard`` subcommands share: the shipped profiles, model loading, argument types, tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from ohd_guard.shipped import default_profile, shipped_profiles

SHIPPED_PROFILES: dict[str, Path] = shipped_profiles()
"""Profiles shipped for the embedded default model, one per guard detector (``ohd-guard calibrate``);
other embedded models' profiles: :func:`ohd_guard.shipped.shipped_profiles`."""
OHD_PROFILE = SHIPPED_PROFILES["ohd"]
DEFAULT_PROFILE = default_profile()
METRIC_COLUMNS = ["split", "n_unsafe", "n_safe", "auroc", "detection_rate", "false_positive_rate"]
"""The columns of a profile's metrics table."""


def shipped(args) -> dict[str, Path]:
    """The shipped profiles of ``--model`` (an embedded model's name; the default model otherwise)."""
    return shipped_profiles(getattr(args, "model", None))


def load_model(args):
    """The model and processor of ``--model``/``--device``/``--dtype`` (transformers is imported only here)."""
    from ohd_guard.loading import load_model as load

    return load(args.model, device=args.device, dtype=args.dtype)


def table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of ``rows`` (floats to 4 decimals)."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def model_args(sp: argparse.ArgumentParser) -> None:
    """The options of every subcommand that loads a model."""
    sp.add_argument("--model", default=None,
                    help="an embedded model's name (qwen2.5-coder-0.5b-instruct, the default; qwen2.5-coder-1.5b-instruct; "
                         "gemma3-270m: each picks its shipped profiles), a local HF folder or a .gguf file")
    sp.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1, mps, ...")
    sp.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    sp.add_argument("--batch-size", type=int, default=8, help="conversations per batched prefill (default 8)")


def name_list(known, what: str, allow_empty: bool = False):
    """An argparse type: a comma-separated list of names from ``known``."""

    def parse(value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not (names or allow_empty):
            given = ", ".join(map(repr, unknown)) or "(none given)"
            raise argparse.ArgumentTypeError(f"unknown {what} {given}; choose from {', '.join(known)}")
        return names

    return parse


def bounded_int(low: int, what: str):
    """An argparse type: an integer >= ``low``."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n

    return parse


positive_int = bounded_int(1, "a positive integer")
non_negative_int = bounded_int(0, "an integer >= 0")


def describe(det) -> str:
    """One line on what a fitted or loaded detector chose."""
    profile = getattr(det, "profile", None)
    return describe_profile(profile) if profile is not None else f"threshold {det.threshold:.4g}"


def describe_profile(s) -> str:
    """One line on what a profile of any kind holds."""
    if s.kind == "ohd":
        return (f"head {s.heads[0]}, mask positions {s.mask.positions}, {s.search}, "
                f"threshold {s.threshold:.4g} deg ({s.threshold_method})")
    if s.kind == "fused":
        return (f"logistic on {', '.join(s.features)} (weights {', '.join(f'{c:.2f}' for c in s.coef)}), "
                f"SAHs {len(s.sahs.heads)} heads, mask {s.mask.positions}, CV AUROC {s.cv_auroc:.3f}")
    if s.kind == "sahs":
        return f"{len(s.heads)} heads (best {', '.join(map(str, s.heads[:4]))}), L2 {s.l2:g}, CV AUROC {s.cv_auroc:.3f}"
    if s.kind == "residual":
        return f"{s.pool} residual states of layers {', '.join(map(str, s.layers))}, L2 {s.l2:g}, CV AUROC {s.cv_auroc:.3f}"
    if s.kind == "judge":
        return f"the model asked as a judge, threshold {s.threshold:.4g} ({s.threshold_method})"
    if s.kind == "hiddendetect":
        return (f"band layers {s.band[0]}-{s.band[1]}, calibration AUROC {s.band_auroc:.3f}, "
                f"threshold {s.threshold:.4g} ({s.threshold_method})")
    return f"greedy {s.max_new_tokens} tokens, {len(s.markers)} refusal phrases"
