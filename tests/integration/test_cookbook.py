"""The cookbook notebooks run end to end on the tiny models (OHD_COOKBOOK_TINY=1, nbclient and a
real Jupyter kernel), so they cannot rot; the committed notebooks carry no outputs. Slow tier: each
notebook starts a kernel and imports the whole stack. A notebook whose output file a test checks
writes it under the test's ``tmp_path`` (the kernel's TMPDIR), so no file left by an earlier run can
satisfy the test."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

COOKBOOK = Path(__file__).resolve().parents[2] / "cookbook"
pytestmark = pytest.mark.slow

NAMES = ["agent_chain", "async_multimodal_rag", "calibrate_your_model"]


def _run(name: str, tmp_path: Path, tmpdir: Path | None = None) -> nbformat.NotebookNode:
    """Execute notebook ``name`` in ``tmp_path``; with ``tmpdir``, the kernel's temporary files go there.

    Only a test that reads a notebook's file back passes ``tmpdir``: the RAG notebook puts its temporary
    folder's path into the prompts, and the planted tiny model's scores move with the prompt length."""
    from nbclient import NotebookClient

    nb = nbformat.read(COOKBOOK / f"{name}.ipynb", as_version=4)
    saved = {k: os.environ.get(k) for k in ("OHD_COOKBOOK_TINY", "TMPDIR")}
    os.environ["OHD_COOKBOOK_TINY"] = "1"  # the kernel inherits it (and TMPDIR)
    if tmpdir is not None:
        os.environ["TMPDIR"] = str(tmpdir)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_committed_without_outputs_and_say_which_cells_use_the_real_model(name):
    nb = nbformat.read(COOKBOOK / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"
    assert "OHD_COOKBOOK_TINY" in nb.cells[0].source and "**real model**" in "".join(c.source for c in nb.cells)


def test_agent_chain_notebook(tmp_path):
    text = _text(_run("agent_chain", tmp_path))
    assert "planted-head tiny Llama" in text
    assert "agent_safe: refused=False" in text and "agent_harmful: refused=True" in text
    assert "['HumanMessage', 'AIMessage', 'ToolMessage', 'AIMessage']" in text


def test_async_multimodal_rag_notebook(tmp_path):
    text = _text(_run("async_multimodal_rag", tmp_path))
    assert "tiny planted LLaVA" in text
    assert "[local] 'how do i zorblax the lake house' -> 'I cannot" in text
    assert "[remote] 'how do i zorblax the lake house' -> 'I cannot" in text
    assert text.rstrip().endswith("3"), "the flagged query must not reach the remote model"


def test_calibrate_your_model_notebook_draws_its_plots(tmp_path):
    nb = _run("calibrate_your_model", tmp_path, tmpdir=tmp_path)
    assert "HeadRef(layer=1, head=2)" in _text(nb), "the search must recover the planted head"
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the distribution and ROC figures are shown"
    pngs = list(tmp_path.glob("ohd-calibration-*/distributions.png"))  # this run's, never a leftover
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
