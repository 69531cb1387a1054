"""The cookbook scripts run end to end (in-process, on the tiny models), so they cannot rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

COOKBOOK = Path(__file__).resolve().parents[1] / "cookbook"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"cookbook_{name}", COOKBOOK / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["agent_chain", "async_multimodal_rag", "calibrate_your_model"])
def test_every_recipe_is_a_documented_script(name):
    text = (COOKBOOK / f"{name}.py").read_text()
    assert text.startswith('"""') and 'if __name__ == "__main__":\n    main()' in text
    assert "python cookbook/" in text, "the docstring says how to run it"


def test_agent_chain_tiny(capsys):
    res = _load("agent_chain").main(["--tiny", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert "planted-head tiny Llama" in out
    assert not res["chain_safe"].startswith("I cannot") and res["chain_harmful"].startswith("I cannot")
    assert res["agent_safe"].response_metadata["ohd_guard"]["refused"] is False
    assert res["agent_harmful"].response_metadata["ohd_guard"]["verdict"]["flagged"]
    kinds = [type(m).__name__ for m in res["injection"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert res["injection"][-1].response_metadata["ohd_guard"]["refused"]


def test_async_multimodal_rag(capsys):
    res = _load("async_multimodal_rag").main(["--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "tiny planted LLaVA" in out
    for engine in ("local", "remote"):
        refused = [a.startswith("I cannot") for _, a in res[engine]]
        assert refused == [False, False, True, False], (engine, res[engine])
        assert [v.flagged for v in res[f"{engine}_verdicts"]].count(True) == 1
    assert res["remote_calls"] == 3, "the flagged query must not reach the remote model"
    assert all("2 image(s)" in a for _, a in res["remote"] if a.startswith("[remote model]"))
    assert res["upload"].additional_kwargs["ohd_guard"]["refused"]


def test_calibrate_your_model_tiny(tmp_path, capsys):
    from ohd_guard.masking import HeadRef
    from ohd_guard.profile import Profile

    res = _load("calibrate_your_model").main(["--tiny", "--out", str(tmp_path)])
    assert res["head"] == HeadRef(layer=1, head=2), "the search must recover the planted head"
    png = Path(res["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert Profile.load(res["profile_path"]) == res["profile"]
    assert [v.flagged for v in res["verdicts"]] == [True, False]
    assert res["unsafe_angles"].min() > res["profile"].threshold.value > res["safe_angles"].max()
    assert "heldout" in capsys.readouterr().out
