"""The CLI's defaults and batch screening (issue 25) on the planted model saved to disk: ``calibrate``
and ``eval`` use the guard's default detector kind, every kind prints out-of-fold calibration
metrics and a surface-feature warning, ``screen`` reads many prompts with one model load."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter

import pytest

from ohd_guard.cli import main
from ohd_guard.contexts import past_tense_use
from ohd_guard.datasets import LabelledPrompt
from ohd_guard.detectors import load_profile
from ohd_guard.shipped import DEFAULT_DETECTOR
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, with_trigger
from ohd_guard.testing.fixtures import save_planted_model

CLEAN = list(PLANTED_CLEAN_PROMPTS)[:8]
TRIGGER = with_trigger(CLEAN)


def _csv(path, unsafe, safe):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows([(t, "unsafe") for t in unsafe] + [(t, "safe") for t in safe])
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("clidefaults")
    model, tok = save_planted_model(root / "model")
    return {"root": root, "model": str(root / "model"), "data": str(_csv(root / "calib.csv", TRIGGER, CLEAN)),
            "question": str(_csv(root / "question.csv", TRIGGER, [t.rstrip("?. ") + "?" for t in CLEAN]))}


@pytest.fixture(scope="module")
def default_profile(saved):
    out = saved["root"] / "default.json"
    assert main(["calibrate", "--model", saved["model"], "--data", saved["data"], "-o", str(out), "--quiet",
                 "--heads", "2"]) == 0
    return out


def test_calibrate_defaults_to_the_guards_default_kind(default_profile):
    assert DEFAULT_DETECTOR != "ohd" and load_profile(default_profile).kind == DEFAULT_DETECTOR


@pytest.mark.parametrize("detector", ["ohd", "sahs", "hiddendetect"])
def test_calibrate_prints_out_of_fold_metrics_for_every_kind(saved, tmp_path, capsys, detector):
    out = tmp_path / "p.json"
    assert main(["calibrate", "--model", saved["model"], "--data", saved["data"], "-o", str(out), "--quiet",
                 "--detector", detector, "--heads", "2", "--cv-folds", "2", "--strategy", "fast",
                 "--contexts", "operator,jailbreak"]) == 0  # short contexts: all fit the tiny model's 512-token window
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| calibration (out-of-fold) |"))
    # every calibration prompt scored once, by a fit that did not see it: bare, once in a context, and
    # (jailbreak) a share of them rewritten to the past tense
    past = Counter(x.label for x in past_tense_use([LabelledPrompt(t, 1) for t in TRIGGER]
                                                   + [LabelledPrompt(t, 0) for t in CLEAN]))
    assert row.split(" | ")[1:3] == [str(16 + past[1]), str(16 + past[0])]
    profile = load_profile(out)
    assert any(m.split == "calibration (out-of-fold)" for m in profile.metrics)
    assert any("in a context" in s for s in profile.sources)


@pytest.mark.parametrize("contexts, n", [("none", "8"), ("operator", "16")])
def test_calibrate_contexts_choose_what_the_prompts_are_placed_in(saved, tmp_path, capsys, contexts, n):
    out = tmp_path / "p.json"
    assert main(["calibrate", "--model", saved["model"], "--data", saved["data"], "-o", str(out), "--quiet",
                 "--detector", "residual", "--pool", "max", "--layers", "1", "--contexts", contexts]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| calibration (out-of-fold)"))
    assert row.split(" | ")[1:3] == [n, n]
    profile = load_profile(out)
    assert profile.kind == "residual" and profile.pool == "max" and len(profile.layers) == 1
    assert any("(operator)" in s for s in profile.sources) == (contexts != "none")


def test_placed_prompts_longer_than_the_window_are_left_out_and_said(default_profile, saved, capsys):
    """The default places prompts in every context and adds the requests addressed to a bound tool
    (30 harmful, 50 benign), the requests in a schema made for them (15 and 15) and past-tense rewrites of
    a share of the prompts; the tiny model's 512-token window cannot hold the longest placements
    (RAG, padding, several tools), which are dropped with a note instead of failing the fit."""
    from ohd_guard.contexts import FIT_CONTEXTS, structured_use, tool_use

    profile = load_profile(default_profile)
    assert any(f"in a context ({', '.join(FIT_CONTEXTS)})" in s and "tool_use" in s and "structured_use" in s
               and "past_tense_use" in s for s in profile.sources)
    extra = tool_use("fit") + structured_use("fit") + past_tense_use([LabelledPrompt(t, 1) for t in TRIGGER]
                                                                     + [LabelledPrompt(t, 0) for t in CLEAN])
    n_tool = {label: sum(x.label == label for x in extra) for label in (0, 1)}
    assert 8 < profile.n_unsafe < 16 + n_tool[1] and 8 < profile.n_safe < 16 + n_tool[0]


def test_calibrate_refuses_an_unknown_context(saved, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", saved["model"], "--data", saved["data"], "-o", str(tmp_path / "p.json"),
              "--contexts", "bare"])
    assert "unknown context(s) 'bare'" in capsys.readouterr().err


def test_calibrate_warns_when_a_trailing_question_mark_separates_the_classes(saved, tmp_path, capsys):
    out = tmp_path / "q.json"
    assert main(["calibrate", "--model", saved["model"], "--data", saved["question"], "-o", str(out), "--quiet",
                 "--heads", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: ending the request with a question mark alone separates" in err and "AUROC 0.00" in err
    assert main(["calibrate", "--model", saved["model"], "--data", saved["data"], "-o", str(out), "--quiet",
                 "--heads", "2"]) == 0
    assert "question mark" not in capsys.readouterr().err  # balanced: no warning


def test_calibrate_chooses_the_number_of_heads_on_a_dev_split(saved, tmp_path, capsys):
    """``--heads 1,2,4`` (``auto``: AUTO_HEADS) prints each count's dev log-loss and fits with the chosen one."""
    out = tmp_path / "h.json"
    assert main(["calibrate", "--model", saved["model"], "--data", saved["data"], "-o", str(out), "--quiet",
                 "--heads", "1,2,4", "--contexts", "none"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| ") and "dev_log_loss" not in line]
    losses = {int(r[0].strip("| ")): float(r[2].strip(" |")) for r in rows if r[0].strip("| ").isdigit()}
    assert sorted(losses) == [1, 2, 4]
    chosen = int(re.search(r"heads chosen on a dev split of the fit items \(\d+ of \d+\): (\d+)", printed).group(1))
    assert chosen == min(k for k, v in losses.items() if v <= min(losses.values()) + 0.005)
    assert len(load_profile(out).heads) == chosen
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", saved["model"], "--data", saved["data"], "-o", str(out), "--heads", "two"])
    assert "comma list" in capsys.readouterr().err
    assert main(["calibrate", "--model", saved["model"], "--data", saved["data"], "-o", str(out), "--heads", "1,2",
                 "--detector", "hiddendetect"]) == 2
    assert "for --detector sahs only" in capsys.readouterr().err


def test_eval_defaults_to_the_default_kind(saved, default_profile, capsys):
    """No --detectors: the --profile given (of any kind), else the shipped default kind, which for a
    model it was not made for is fitted on the fit data (said on stderr)."""
    assert main(["eval", "--model", saved["model"], "--profile", str(default_profile), saved["data"],
                 "--latency-prompts", "0"]) == 0
    assert "| set | n | SAHs |" in capsys.readouterr().out
    assert main(["eval", "--model", saved["model"], saved["data"], "--fit-data", saved["data"],
                 "--latency-prompts", "0"]) == 0
    cap = capsys.readouterr()
    assert f"the shipped {DEFAULT_DETECTOR} profile is for another model" in cap.err
    assert "| set | n | SAHs |" in cap.out and "OhD" not in cap.out


def test_screen_many_prompts_one_load_jsonl_and_fail_on_flag(saved, default_profile, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": TRIGGER[1]}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": CLEAN[2]}]}) + "\n" + CLEAN[3] + "\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(TRIGGER[4]) + "\n"))
    base = ["screen", "--model", saved["model"], "--profile", str(default_profile)]
    assert main([*base, CLEAN[0], TRIGGER[0], "-", "--file", str(prompts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["flagged"] for x in lines] == [False, True, True, True, False, False]
    assert main([*base, "--fail-on-flag", CLEAN[0], TRIGGER[0]]) == 1
    capsys.readouterr()
    assert main([*base, "--fail-on-flag", CLEAN[0], CLEAN[1]]) == 0
    capsys.readouterr()


def test_screen_blank_prompt_is_invalid_input(saved, default_profile, capsys):
    assert main(["screen", "--model", saved["model"], "--profile", str(default_profile), CLEAN[0], "  "]) == 2
    ok, blank = (json.loads(x) for x in capsys.readouterr().out.splitlines())
    assert "error" not in ok and blank["error"].startswith("InvalidInputError") and "blank" in blank["error"]


def test_screen_without_prompts_is_a_usage_error(saved, capsys):
    with pytest.raises(SystemExit) as e:
        main(["screen", "--model", saved["model"]])
    assert e.value.code == 2 and "nothing to screen" in capsys.readouterr().err
