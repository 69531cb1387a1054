"""ohd_guard.plot: the figures are drawn (PNG files checked) and carry the expected lines and labels."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ohd_guard import plot
from ohd_guard.errors import InvalidInputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_ok(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    from PIL import Image

    img = Image.open(path).convert("L")
    assert np.asarray(img).std() > 5, "not a blank image"


def test_score_distributions_draws_both_classes_and_the_threshold(tmp_path):
    rng = np.random.default_rng(0)
    fig = plot.score_distributions(rng.normal(40, 5, 50), rng.normal(5, 3, 60), 20.0, path=tmp_path / "d.png",
                                   title="angles", xlabel="deflection (deg)")
    _png_ok(tmp_path / "d.png")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(labels) == ["safe (n=60)", "threshold 20", "unsafe (n=50)"]
    assert ax.lines[0].get_xdata()[0] == 20.0 and ax.get_xlabel() == "deflection (deg)"
    with pytest.raises(InvalidInputError):
        plot.score_distributions([], [1.0])


def test_roc_curves_one_line_per_detector_with_its_auroc(tmp_path):
    y = np.r_[np.ones(20), np.zeros(20)]
    perfect, chance = np.r_[np.full(20, 2.0), np.full(20, 1.0)], np.random.default_rng(1).random(40)
    fig = plot.roc_curves({"ohd": (perfect, y), "random": (chance, y)}, path=tmp_path / "r.png")
    _png_ok(tmp_path / "r.png")
    ax = fig.axes[0]
    assert len(ax.lines) == 3, "two detectors and the chance diagonal"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "ohd (1.00)" and labels[1].startswith("random (")
    with pytest.raises(InvalidInputError, match="both classes"):
        plot.roc_curves({"x": ([1.0, 2.0], [1, 1])})


def test_report_roc_is_what_eval_report_plot_roc_draws(tmp_path):
    from ohd_guard.evaluation import EvalReport

    report = EvalReport(max_fpr=0.05, detectors=["a", "b"], thresholds={"a": 1.5, "b": 1.5}, datasets={"set": 4},
                        reference_sets=["set"],
                        scores={"a": {"set": [3.0, 2.0, 1.0, 0.0]}, "b": {"set": [0.0, 2.0, 1.0, 3.0]}},
                        labels={"set": [1, 1, 0, 0]})
    path = report.plot_roc(tmp_path / "roc.png")
    _png_ok(path)
    fig = plot.report_roc(report)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a (1.00)", "b (0.25)"]
    assert fig.axes[0].get_title() == "set: own"


def test_missing_matplotlib_names_the_install():
    code = ("import sys; sys.modules['matplotlib'] = None\nfrom ohd_guard import plot\n"
            "try:\n    plot.roc_curves({'a': ([1.0, 0.0], [1, 0])})\nexcept ImportError as e:\n    print(e)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "plots need matplotlib: pip install 'ohd-guard[plot]'"
