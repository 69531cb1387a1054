"""Calibrate One-head Defense for your own model: search the head, look at the angle distributions,
fit the threshold, save the profile and load it back into a guard.

    python cookbook/calibrate_your_model.py --tiny      # seconds: the planted-head tiny Llama (used by the tests)
    python cookbook/calibrate_your_model.py             # the embedded Qwen2.5-Coder-0.5B-Instruct (minutes on CPU)
    python cookbook/calibrate_your_model.py --model Qwen/Qwen2.5-1.5B-Instruct --out my_calibration

``--tiny`` runs on ``ohd_guard.testing.planted_head_model``: a 4-layer random Llama whose head L1.H2
was wired by hand to react to the word "zorblax", so the search has a known right answer and the
"unsafe" prompts are simply prompts containing that word. Without ``--tiny`` the bundled calibration
prompts (harmful requests vs. benign look-alikes) are used, split into calibration and held-out parts.

Writes ``<out>/angles.png`` (safe/unsafe angle histograms, their KDEs and the threshold at the KDE
crossing) and ``<out>/profile.json``, which ``OhdGuard.load(model, "<out>/profile.json")`` accepts.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_TRIGGER = "zorblax"
_SUBJECTS = ["the house", "my friend", "the school", "a small dog", "the old car", "this city", "the red book",
             "our garden"]  # fmt: skip
_FRAMES = ["tell me about {x} please", "write a story about {x}"]


def tiny_prompts() -> tuple[list[str], list[str], list[str], list[str]]:
    """(unsafe, safe, held-out unsafe, held-out safe): the same sentences with and without the trigger."""
    safe = [f.format(x=s) for f in _FRAMES for s in _SUBJECTS]
    unsafe = [f.format(x=f"{TINY_TRIGGER} and {s}") for f in _FRAMES for s in _SUBJECTS]
    return unsafe[::2], safe[::2], unsafe[1::2], safe[1::2]


def real_prompts(n: int) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    from ohd_guard.datasets import load_calibration_prompts

    def split(items: list[Any]) -> tuple[list[Any], list[Any]]:
        return [p for p in items if p.label == 1][:n], [p for p in items if p.label == 0][:n]

    u, s = split(load_calibration_prompts("calib", seed=1))
    hu, hs = split(load_calibration_prompts("heldout", seed=1))
    return u, s, hu, hs


def plot_angles(unsafe: Any, safe: Any, threshold: float, title: str, path: Path) -> Path:
    """Histograms of the two angle sets, their Gaussian KDEs, and the threshold, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.stats import gaussian_kde

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    both = np.r_[unsafe, safe]
    lo, hi = float(both.min()), float(both.max())
    pad = 0.1 * (hi - lo or 1.0)
    grid = np.linspace(lo - pad, hi + pad, 512)
    bins = np.linspace(lo - pad, hi + pad, 30)
    for angles, name, color in ((safe, "safe", "tab:blue"), (unsafe, "unsafe", "tab:red")):
        ax.hist(angles, bins=bins, density=True, alpha=0.35, color=color, label=f"{name} (n={len(angles)})")
        if np.ptp(angles) > 0:
            ax.plot(grid, gaussian_kde(angles)(grid), color=color, lw=2, label=f"{name} KDE")
    ax.axvline(threshold, color="k", ls="--", lw=1.5, label=f"threshold {threshold:.3g} deg")
    ax.set_xlabel("deflection angle (degrees)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="use the planted-head tiny model (seconds)")
    ap.add_argument("--model", default=None, help="model reference for ohd_guard.load_model (default: embedded)")
    ap.add_argument("--out", default="calibration_out", help="output folder (profile.json, angles.png)")
    ap.add_argument("--per-class", type=int, default=24, help="calibration prompts per class (real model)")
    ap.add_argument("--top-k", type=int, default=None, help="heads re-scored exactly in the two-stage search "
                    "(default 8; 3 with --tiny)")
    args = ap.parse_args(argv)

    from ohd_guard.calibrate import as_conversation, calibrate
    from ohd_guard.guard import OhdGuard
    from ohd_guard.masking import MaskSpec
    from ohd_guard.profile import Profile
    from ohd_guard.scoring import DeflectionScorer

    out = Path(args.out)
    t0 = time.perf_counter()
    if args.tiny:
        from ohd_guard.testing import planted_head_model

        model, processor, info = planted_head_model(TINY_TRIGGER)
        unsafe, safe, hu, hs = tiny_prompts()
        name = f"planted-head tiny Llama (planted head L{info['layer']}.H{info['head']})"
        spec = MaskSpec()
    else:
        from ohd_guard.loading import load_model

        model, processor = load_model(args.model)
        unsafe, safe, hu, hs = real_prompts(args.per_class)
        name = args.model or "embedded Qwen2.5-Coder-0.5B-Instruct"
        spec = MaskSpec(positions="last")  # the fast mode: one extra decode step per prompt
    print(f"model: {name}  ({len(unsafe)} unsafe / {len(safe)} safe calibration prompts)")

    # 1. head search + threshold: calibrate() ranks every head with a fast pass, re-scores the best
    #    top_k exactly, keeps the most selective one and fits the threshold where the KDEs cross.
    top_k = args.top_k or (3 if args.tiny else 8)
    profile = calibrate(model, processor, unsafe, safe, spec=spec, top_k=top_k, heldout=(hu, hs),
                        sources=["cookbook/calibrate_your_model.py"])  # fmt: skip
    head = profile.heads[0]
    print(f"search: {profile.calibration.search} in {profile.calibration.seconds:.1f}s -> head {head}")
    for row in profile.top_heads[:5]:
        print(f"  {row.head}: unsafe {row.unsafe_mean:7.3f}  safe {row.safe_mean:7.3f}  auroc {row.auroc:.3f}"
              f"{'' if row.eligible else '  (not selective)'}")
    for m in profile.metrics:
        print(f"  {m.split:11s}: AUROC {m.auroc:.3f}  detection {m.detection_rate:.2f}  "
              f"false positives {m.false_positive_rate:.2f}  balanced accuracy {m.balanced_accuracy:.2f}")

    # 2. the angle distributions of the chosen head, with the KDEs and the threshold
    scorer = DeflectionScorer(model, processor, spec=profile.mask, score_layer=profile.score_layer)
    ua = scorer.angles([as_conversation(p) for p in unsafe], [head])[:, 0]
    sa = scorer.angles([as_conversation(p) for p in safe], [head])[:, 0]
    png = plot_angles(ua, sa, profile.threshold.value, f"{name}: head {head}", out / "angles.png")
    print(f"threshold: {profile.threshold.value:.4g} deg ({profile.threshold.method}); plot: {png}")

    # 3. save, reload (schema-checked, fingerprint-verified against the model) and guard with it
    path = profile.save(out / "profile.json")
    loaded = Profile.load(path)
    guard = OhdGuard(model, processor, loaded)  # verifies the profile matches this model
    probes = [f"tell me about {TINY_TRIGGER} please", "tell me about the sea please"] if args.tiny else \
        [hu[0].text, hs[0].text]  # fmt: skip
    verdicts = [guard.screen(p) for p in probes]
    for p, v in zip(probes, verdicts):
        print(f"  {'FLAGGED' if v.flagged else 'passed '}  {v.angle:8.3f} deg  {p[:70]!r}")
    print(f"profile: {path}  ({time.perf_counter() - t0:.1f}s in all)")
    return {"profile": loaded, "profile_path": path, "plot": png, "head": head, "verdicts": verdicts,
            "unsafe_angles": ua, "safe_angles": sa}  # fmt: skip


if __name__ == "__main__":
    main()
