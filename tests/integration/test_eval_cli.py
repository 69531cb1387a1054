"""``ohd-guard eval`` end to end on a planted-head model saved to disk: several detectors, files out."""

from __future__ import annotations

import json
import sys

import pytest

from ohd_guard.cli import main
from ohd_guard.detectors import calibrate
from ohd_guard.evaluation import EvalReport
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, planted_head_model, with_trigger
from ohd_guard.testing.fixtures import save_planted_model

CLEAN = list(PLANTED_CLEAN_PROMPTS)


trig = with_trigger


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(dict(zip(("text", "label", "category"), r))) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The planted model and tokenizer in a folder, a profile for its head, and three labelled files."""
    root = tmp_path_factory.mktemp("evalcli")
    model, tok = save_planted_model(root / "model")
    fit = CLEAN[:6]
    profile = calibrate(model, tok, trig(fit), fit, spec=MaskSpec(positions="last"), head=HeadRef(layer=1, head=2))
    profile.save(root / "profile.json")
    test = CLEAN[6:]
    return {
        "root": root,
        "model": str(root / "model"),
        "profile": str(root / "profile.json"),
        "fit": str(write_jsonl(root / "fit.jsonl", [(t, 1, "trigger") for t in trig(fit)] + [(t, 0, "clean") for t in fit])),
        "mixed": str(write_jsonl(root / "mixed.jsonl", [(t, "unsafe", "trigger") for t in trig(test[:4])]
                                 + [(t, "safe", "clean") for t in test[:4]] + [(t, "safe", "weather") for t in test[4:]])),
        "harmful": str(write_jsonl(root / "harmful.jsonl", [(t, 1, "") for t in trig(CLEAN[::2])])),
    }


def test_eval_cli_several_detectors_writes_markdown_json_png(saved, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", saved["model"], "--profile", saved["profile"], saved["mixed"], saved["harmful"],
            "--detectors", "ohd,sahs", "--detectors", "hiddendetect", "--fit-data", saved["fit"],
            "--attacks", "--attack-seeds", "3", "--attack-names", "roleplay,multi_turn", "--latency-prompts", "2",
            "--markdown", str(out / "report.md"), "--json", str(out / "report.json"), "--roc", str(out / "roc.png"),
            "--save-fitted", str(out / "fitted")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    md = (out / "report.md").read_text()
    assert captured.out == md  # the table goes to stdout, progress lines to stderr
    assert "[fit] SAHs" in captured.err and "[eval]" in captured.err

    report = EvalReport.model_validate_json((out / "report.json").read_text())
    assert report.detectors == ["OhD (fast)", "SAHs", "HiddenDetect"]
    assert report.datasets == {"mixed.jsonl": 10, "harmful.jsonl": 6}
    assert report.attacks == {"direct": 3, "roleplay": 3, "multi_turn": 3}
    assert len(report.results) == 3 * 5 and not any(r.skipped for r in report.results)
    for r in report.results:
        for v in (r.detection_rate, r.false_positive_rate, r.auroc, r.tpr_at_fpr):
            assert v is None or 0.0 <= v <= 1.0
    ohd = report.result("OhD (fast)", "mixed.jsonl")
    assert (ohd.detection_rate, ohd.false_positive_rate, ohd.auroc, ohd.paired_with) == (1.0, 0.0, 1.0, "own")
    harm = report.result("SAHs", "harmful.jsonl")
    assert harm.paired_with == "pooled safe (6)" and harm.false_positive_rate is None
    assert report.result("OhD (fast)", "multi_turn").detection_rate == 1.0
    assert {(c.dataset, c.category) for c in report.categories} >= {
        ("mixed.jsonl", "trigger"), ("mixed.jsonl", "clean"), ("mixed.jsonl", "weather")}
    assert [l.detector for l in report.latency] == report.detectors and all(l.ratio > 0 for l in report.latency)
    assert any("fitted on 6 unsafe + 6 safe prompts" in n for n in report.notes)
    assert any("from profile" in n and "L1.H2" in n for n in report.notes)

    for det in report.detectors:
        assert det in md
    for title in ("### Flag rate", "### AUROC", "### Adaptive attacks", "### Screening latency", "### Per category"):
        assert title in md
    assert "| mixed.jsonl | 10 | DR 1.000 / FPR 0.000 |" in md and "| harmful.jsonl | 6 |" in md
    assert "| mixed.jsonl / weather | 0 | 2 |" in md
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "fitted").iterdir()) == ["hiddendetect.json", "sahs.json"]


def test_eval_cli_detector_files_and_name_clash(saved, tmp_path, capsys):
    """A saved detector is reloaded by path; the profile's OhD and a refitted one get distinct names."""
    fitted = tmp_path / "fitted"
    base = ["eval", "--model", saved["model"], "--profile", saved["profile"], saved["mixed"], "--fit-data", saved["fit"],
            "--latency-prompts", "0", "--quiet"]
    assert main([*base, "--detectors", "sahs", "--save-fitted", str(fitted), "--json", str(tmp_path / "fit.json")]) == 0
    capsys.readouterr()
    assert main([*base, "--detectors", "ohd,ohd-fast", "--detector-file", str(fitted / "sahs.json"),
                 "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "[eval]" not in captured.err and "[fit]" not in captured.err  # --quiet
    report = EvalReport.model_validate_json((tmp_path / "r.json").read_text())
    assert report.detectors == ["OhD (fast) [profile]", "SAHs", "OhD (fast)"]
    assert all(d in captured.out for d in report.detectors) and report.latency == []
    fresh = EvalReport.model_validate_json((tmp_path / "fit.json").read_text())
    # the reloaded probe scores as it did when fitted
    assert report.scores["SAHs"]["mixed.jsonl"] == pytest.approx(fresh.scores["SAHs"]["mixed.jsonl"])
    assert report.result("OhD (fast)", "mixed.jsonl").auroc == 1.0  # same head, threshold refitted on fit.jsonl
    assert any("loaded from" in n and "sahs.json" in n for n in report.notes)


@pytest.mark.parametrize(
    "args, message",
    [
        (["x.jsonl", "--detectors", "ohd,nope"], "unknown detector(s) 'nope'"),
        (["--shared", "advbench", "nosuchset"], "unknown shared set(s) 'nosuchset'"),
        (["x.jsonl", "--attacks", "--attack-names", "roleplay,bogus"], "unknown attack(s) 'bogus'"),
        (["x.jsonl", "--limit", "0"], "positive integer"),
        ([], "no sets to evaluate"),
        (["--detectors", "sahs"], "no sets to evaluate"),
    ],
)
def test_eval_cli_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_cli_roc_without_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as exc:
        main(["eval", "x.jsonl", "--roc", "roc.png"])
    assert exc.value.code == 2 and "--roc needs matplotlib" in capsys.readouterr().err


def test_eval_cli_typed_errors_exit_cleanly(saved, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.jsonl")]) == 2
    assert "InvalidInputError" in capsys.readouterr().err
    safe_only = write_jsonl(tmp_path / "safe.jsonl", [(t, 0, "") for t in CLEAN[:3]])
    assert main(["eval", "--model", saved["model"], str(safe_only), "--attacks", "--detectors", "sahs",
                 "--fit-data", saved["fit"]]) == 2
    assert "no text-only unsafe items" in capsys.readouterr().err


CONTEXTS = ["bare", "tools", "rag", "history", "operator"]


@pytest.fixture(scope="module")
def long_model(saved):
    """The same planted model (and a profile for it) with a 4096-token window: tool definitions and
    RAG passages exceed 512."""
    model, tok, _ = planted_head_model()
    model.config.max_position_embeddings = 4096
    path = saved["root"] / "model_long"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    fit = CLEAN[:6]
    profile = calibrate(model, tok, trig(fit), fit, spec=MaskSpec(positions="last"), head=HeadRef(layer=1, head=2))
    return {"model": str(path), "profile": str(profile.save(saved["root"] / "profile_long.json"))}


def test_eval_cli_contexts_rows_labels_and_bare_unchanged(saved, long_model, tmp_path, capsys):
    """--contexts: every set in every context (bare added first), labels kept, bare scored as without contexts."""
    base = ["eval", "--model", long_model["model"], "--profile", long_model["profile"], saved["mixed"], saved["harmful"],
            "--latency-prompts", "0", "--quiet"]
    assert main([*base, "--json", str(tmp_path / "plain.json")]) == 0
    capsys.readouterr()
    assert main([*base, "--contexts", "tools,rag", "--contexts", "history,operator,tools",
                 "--json", str(tmp_path / "ctx.json")]) == 0
    out = capsys.readouterr().out
    plain = EvalReport.model_validate_json((tmp_path / "plain.json").read_text())
    report = EvalReport.model_validate_json((tmp_path / "ctx.json").read_text())
    sets = {"mixed.jsonl": 10, "harmful.jsonl": 6}
    assert report.datasets == {f"{s} @ {k}": n for s, n in sets.items() for k in CONTEXTS}
    for s in sets:
        for k in CONTEXTS:  # labels preserved, item for item, in every context
            assert report.labels[f"{s} @ {k}"] == plain.labels[s]
        assert report.scores["OhD (fast)"][f"{s} @ bare"] == pytest.approx(plain.scores["OhD (fast)"][s])
        # the contexts really changed what was screened
        assert report.scores["OhD (fast)"][f"{s} @ rag"] != pytest.approx(plain.scores["OhD (fast)"][s])

    assert "### In context: DR / FPR at the calibrated threshold, AUROC, and the change from bare" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| OhD (fast) | ") and " @ " not in line]
    table = {(r[1], r[2]): r for r in rows if len(r) == 11}
    assert set(table) == {(s, k) for s in sets for k in CONTEXTS}
    bare = table[("mixed.jsonl", "bare")]
    assert bare[3:8] == ["4", "6", "1.000", "0.000", "1.000"] and bare[8:] == ["-", "-", "- |"]
    tools = table[("mixed.jsonl", "tools")]
    assert float(tools[8]) == pytest.approx(float(tools[5]) - 1.0)  # delta DR vs bare
    assert float(tools[9]) == pytest.approx(float(tools[6]) - 0.0)
    harm = table[("harmful.jsonl", "rag")]
    assert harm[3:5] == ["6", "0"] and harm[6] == "-"  # no safe items: no FPR
    assert "tools/" in out and "rag/" in out and "history/" in out  # per-variant table


def test_eval_cli_contexts_paired_within_the_context(saved, long_model, tmp_path):
    """A one-class set's AUROC in a context ranks it against the other sets' opposite class in that context."""
    from ohd_guard.evaluation_contexts import context_results, set_name

    argv = ["eval", "--model", long_model["model"], "--profile", long_model["profile"], saved["mixed"], saved["harmful"],
            "--contexts", "rag", "--latency-prompts", "0", "--quiet", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    report = EvalReport.model_validate_json((tmp_path / "r.json").read_text())
    keys = [(s, k) for s in ("mixed.jsonl", "harmful.jsonl") for k in ("bare", "rag")]
    rows = {(r.dataset, r.context): r for r in context_results(report, keys)}
    from ohd_guard.metrics import auroc

    s = report.scores["OhD (fast)"]
    y_mixed = report.labels[set_name("mixed.jsonl", "rag")]
    safe = [v for v, y in zip(s[set_name("mixed.jsonl", "rag")], y_mixed) if y == 0]
    harm = s[set_name("harmful.jsonl", "rag")]
    assert rows[("harmful.jsonl", "rag")].paired_with == "pooled safe (6)"
    assert rows[("harmful.jsonl", "rag")].auroc == pytest.approx(auroc(harm + safe, [1] * len(harm) + [0] * len(safe)))
    assert rows[("mixed.jsonl", "rag")].paired_with == "own"
    assert rows[("mixed.jsonl", "bare")].d_auroc is None


def test_eval_cli_context_over_the_window_is_a_skipped_row(saved, capsys):
    """Tool definitions exceed the 512-token planted model: that context is reported skipped, with the reason."""
    argv = ["eval", "--model", saved["model"], "--profile", saved["profile"], saved["mixed"],
            "--contexts", "tools,operator", "--latency-prompts", "0", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| OhD (fast) | mixed.jsonl | tools | 4 | 6 | skipped: prompt too long:" in out
    assert "| OhD (fast) | mixed.jsonl | operator | 4 | 6 | 1.000 | 0.000 | 1.000 | +0.000 | +0.000 | +0.000 |" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["x.jsonl", "--contexts", "tools,chat"], "unknown context(s) 'chat'"),
        (["x.jsonl", "--contexts", ""], "unknown context(s) (none given)"),
        (["x.jsonl", "--context-limit", "5"], "--context-limit needs --contexts"),
    ],
)
def test_eval_cli_context_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_context_sets_leave_out_images_and_fail_closed():
    from PIL import Image

    from ohd_guard.datasets import LabelledPrompt
    from ohd_guard.errors import InvalidInputError
    from ohd_guard.evaluation_contexts import context_sets

    img = Image.new("RGB", (4, 4))
    mixed = [LabelledPrompt(t, 1, "x") for t in trig(CLEAN[:3])] + [LabelledPrompt(CLEAN[3], 0, "y", image=img)]
    placed, notes = context_sets({"m": mixed, "images": [LabelledPrompt("look", 0, image=img)]}, ["operator"])
    assert list(placed) == [("m", "bare"), ("m", "operator")]
    assert [x.label for x in placed[("m", "operator")]] == [1, 1, 1]
    assert all(x.context == "operator" and x.messages[0]["role"] == "system" for x in placed[("m", "operator")])
    assert notes == ["m: 1 of 4 items left out of the contexts (images or multi-turn conversations)",
                     "images: 1 of 1 items left out of the contexts (images or multi-turn conversations)"]
    assert context_sets({"m": mixed}, ["tools"], per_class=2)[0][("m", "tools")].__len__() == 2
    assert context_sets({"m": mixed}, ["rag"])[0] == context_sets({"m": mixed}, ["rag"])[0]  # fixed seed
    with pytest.raises(InvalidInputError, match="no set holds text-only prompts"):
        context_sets({"images": [LabelledPrompt("look", 0, image=img)]}, ["tools"])
    with pytest.raises(InvalidInputError, match="unknown context"):
        context_sets({"m": mixed}, ["chat"])
