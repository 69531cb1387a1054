"""Plots of detector scores: the two classes' score distributions with the threshold, and ROC curves.

matplotlib is imported on first use (``pip install 'ohd-guard[plot]'``), and only its
object-oriented API is used (``Figure`` + the Agg canvas): no global pyplot state, no display
needed. Each function returns the ``Figure``; with ``path`` it is also written as a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ohd_guard.errors import InvalidInputError

__all__ = ["INSTALL_HINT", "report_roc", "require_matplotlib", "roc_curves", "score_distributions"]

INSTALL_HINT = "plots need matplotlib: pip install 'ohd-guard[plot]'"


def require_matplotlib() -> None:
    """Raise ImportError with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e


def _figure(size: tuple[float, float]) -> Any:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)


def score_distributions(unsafe: Sequence[float], safe: Sequence[float], threshold: float | None = None, *,
                        path: str | Path | None = None, ax: Any = None, title: str | None = None,
                        xlabel: str = "score", bins: int = 30) -> Any:
    """Histograms of the unsafe and safe scores (one shared binning) with the threshold as a
    vertical line: how far apart the classes are, and what the threshold cuts off."""
    u, s = np.asarray(unsafe, dtype=float), np.asarray(safe, dtype=float)
    if not u.size or not s.size:
        raise InvalidInputError("score_distributions needs scores of both classes")
    fig = ax.figure if ax is not None else _figure((6.0, 3.6))
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    edges = np.histogram_bin_edges(np.r_[u, s], bins=bins)
    ax.hist(s, bins=edges, alpha=0.6, label=f"safe (n={s.size})", color="tab:blue")
    ax.hist(u, bins=edges, alpha=0.6, label=f"unsafe (n={u.size})", color="tab:red")
    if threshold is not None:
        ax.axvline(float(threshold), color="black", ls="--", lw=1.2, label=f"threshold {threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return fig


def roc_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[int]]], *, path: str | Path | None = None,
               ax: Any = None, title: str | None = None) -> Any:
    """ROC curves of several detectors on one set: ``{name: (scores, labels)}`` (label 1 = unsafe,
    higher score = more unsafe); the legend gives each AUROC."""
    from ohd_guard.metrics import auroc, roc_curve

    if not curves:
        raise InvalidInputError("roc_curves needs at least one (scores, labels) pair")
    fig = ax.figure if ax is not None else _figure((4.6, 4.2))
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    for name, (scores, labels) in curves.items():
        s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
        if not ((y == 1).any() and (y == 0).any()):
            raise InvalidInputError(f"{name}: a ROC curve needs labels of both classes")
        fpr, tpr, _ = roc_curve(s, y)
        ax.plot(fpr, tpr, label=f"{name} ({auroc(s, y):.2f})", lw=1.4)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    ax.set_xlabel("FPR")
    ax.set_ylabel("TPR")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    return fig


def report_roc(report: Any, path: str | Path | None = None, sets: Sequence[str] | None = None) -> Any:
    """One ROC panel per set of an :class:`~ohd_guard.evaluation.EvalReport` (paired as in its
    tables), one curve per detector (what ``ohd-guard eval --roc`` draws)."""
    names = list(sets) if sets is not None else list(report.datasets) + list(report.attacks)
    panels = [(n, {d: p for d in report.detectors if (p := report.paired(d, n)) is not None}) for n in names]
    panels = [(n, c) for n, c in panels if c]
    if not panels:
        raise InvalidInputError("no set has scores of both classes to draw")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = _figure((4.2 * cols, 4.0 * rows))
    for i, (name, curves) in enumerate(panels):
        pairing = next(iter(curves.values()))[2]
        roc_curves({d: (s, y) for d, (s, y, _) in curves.items()}, ax=fig.add_subplot(rows, cols, i + 1),
                   title=f"{name}: {pairing}")
    fig.tight_layout()
    _save(fig, path)
    return fig
