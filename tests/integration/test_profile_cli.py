"""Profiles (fingerprint, round trip, typed errors) and the CLI end to end on a saved tiny model."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch

from ohd_guard.detectors import calibrate
from ohd_guard.cli import main
from ohd_guard.errors import ProfileFormatError, ProfileMismatchError
from ohd_guard.masking import HeadRef
from ohd_guard.profile import ModelFingerprint, Profile
from ohd_guard.testing import planted_head_model, tiny_model

CLEAN = ["tell me about the weather", "what is a good dog name", "how do I bake bread", "write a poem about the sea",
         "explain how rain forms", "list three colors"]
TRIGGER = [t.replace(" ", " zorblax ", 1) for t in CLEAN]


@pytest.fixture(scope="module")
def planted(planted_model):
    model, tok, _ = planted_model
    profile = calibrate(model, tok, TRIGGER, CLEAN, head=HeadRef(layer=1, head=2))
    return model, tok, profile


def test_profile_round_trip_and_verify(planted, tmp_path):
    model, tok, profile = planted
    path = profile.save(tmp_path / "p.json")
    loaded = Profile.load(path)
    assert loaded == profile
    loaded.verify(model, tok)
    assert loaded.search == "manual" and loaded.heads == (HeadRef(layer=1, head=2),)


def test_fingerprint_ignores_dtype_but_not_weights(planted, caplog):
    model, tok, profile = planted
    half = planted_head_model()[0].to(torch.bfloat16)
    assert ModelFingerprint.of(half, tok).weights_hash == profile.model.weights_hash
    with caplog.at_level(logging.INFO, logger="ohd_guard.profile"):
        profile.verify(half, tok)  # same weights in another dtype: not an error
        fp16 = profile.model_copy(update={"model": profile.model.model_copy(update={"dtype": "float16"})})
        fp16.verify(model, tok)  # a profile fitted in float16, run in float32
    levels = {r.getMessage().split("fitted in ")[1].split(";")[0]: r.levelno for r in caplog.records
              if "dtype" in r.getMessage()}
    # float32 <-> bfloat16 is the measured pair (benchmarks/bench_dtype.py): a note; any other pair warns
    assert levels == {"float32, model runs in bfloat16": logging.INFO, "float16, model runs in float32": logging.WARNING}
    with pytest.raises(ProfileMismatchError, match="dtype"):
        profile.verify(half, tok, strict_dtype=True)
    other = planted_head_model(seed=1)[0]
    with pytest.raises(ProfileMismatchError, match="weights_hash"):
        profile.verify(other, tok)
    llama, llama_tok = tiny_model("qwen2")
    with pytest.raises(ProfileMismatchError, match="architecture"):
        profile.verify(llama, llama_tok)


def test_chat_template_change_is_a_mismatch(planted):
    model, tok, profile = planted
    original = tok.chat_template
    try:
        tok.chat_template = original + "{# edited #}"
        with pytest.raises(ProfileMismatchError, match="chat_template"):
            profile.verify(model, tok)
    finally:
        tok.chat_template = original


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: {**d, "schema_version": 99}, "schema_version 99"),
        (lambda d: {**d, "threshold": "abc"}, "threshold"),
        (lambda d: {**d, "heads": [{"layer": 40, "head": 0}]}, "outside"),
        (lambda d: {**d, "heads": []}, "heads"),
        (lambda d: {**d, "mask": {**d["mask"], "alpha": 5}}, "mask.alpha"),
        (lambda d: {**d, "surprise": 1}, "surprise"),
        (lambda d: [1, 2], "JSON object"),
    ],
)
def test_corrupt_or_invalid_profiles_raise_clear_errors(planted, tmp_path, edit, message):
    data = json.loads(planted[2].model_dump_json())
    edited = edit(data)
    path = tmp_path / "bad.json"
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ProfileFormatError, match=message):
        Profile.load(path)


def test_missing_profile_file(tmp_path):
    with pytest.raises(ProfileFormatError, match="not found"):
        Profile.load(tmp_path / "nope.json")


def _saved_planted(tmp_path):
    """The planted model saved to disk (read back by path like a user's local model) and its calibration CSV."""
    model, tok, _ = planted_head_model()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "calib.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label", "category"])
        w.writerows([(t, "unsafe", "trigger") for t in TRIGGER] + [(t, "safe", "clean") for t in CLEAN])
    return model_dir, data


def test_cli_calibrate_inspect_screen_eval(tmp_path, capsys):
    """The CLI on a planted model saved to disk, read back by path like a user's local model."""
    model_dir, data = _saved_planted(tmp_path)
    out = tmp_path / "profile.json"
    assert main(["calibrate", "--model", str(model_dir), "--data", str(data), "-o", str(out), "--quiet",
                 "--detector", "ohd", "--top-k", "3"]) == 0
    assert "L1.H2" in capsys.readouterr().out
    assert Profile.load(out).heads == (HeadRef(layer=1, head=2),)

    assert main(["inspect", str(out)]) == 0
    assert "L1.H2" in capsys.readouterr().out

    joint = tmp_path / "joint.json"
    assert main(["calibrate", "--model", str(model_dir), "--data", str(data), "-o", str(joint), "--quiet",
                 "--detector", "ohd", "--score-layers", "2-3", "--strategy", "fast"]) == 0
    assert Profile.load(joint).heads == (HeadRef(layer=1, head=2),) and Profile.load(joint).score_layer in (2, 3)
    capsys.readouterr()
    assert main(["calibrate", "--model", str(model_dir), "--data", str(data), "-o", str(joint), "--quiet",
                 "--detector", "ohd", "--score-layers", "two-3"]) == 2

    assert main(["screen", "--model", str(model_dir), "--profile", str(out), "what zorblax is rain"]) == 0
    flagged = json.loads(capsys.readouterr().out)
    assert main(["screen", "--model", str(model_dir), "--profile", str(out), "what is rain"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert flagged["flagged"] and not clean["flagged"] and flagged["angle"] > clean["angle"]

    assert main(["eval", "--model", str(model_dir), "--profile", str(out), str(data), "--latency-prompts", "0"]) == 0
    table = capsys.readouterr().out  # the profile's One-head Defense by default; more in tests/test_eval_cli.py
    assert "| set | n | OhD (fast) |" in table and "| calib.csv | 12 | DR 1.000 / FPR 0.000 |" in table
    assert "| calib.csv | 12 | 1.000 |" in table  # AUROC

    other, other_tok = tiny_model("llama")
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    other_tok.save_pretrained(other_dir)
    assert main(["screen", "--model", str(other_dir), "--profile", str(out), "hi"]) == 2
    assert "ProfileMismatchError" in capsys.readouterr().err


@pytest.mark.parametrize("detector", ["sahs", "hiddendetect", "fused"])
def test_cli_calibrate_screen_inspect_eval_for_every_detector_kind(tmp_path, capsys, detector):
    """calibrate --detector writes a profile of that kind; screen/inspect/eval take it like an OhD profile."""
    model_dir, data = _saved_planted(tmp_path)
    extra = []
    if detector == "fused":
        ohd = tmp_path / "ohd.json"
        assert main(["calibrate", "--model", str(model_dir), "--data", str(data), "-o", str(ohd), "--quiet",
                     "--detector", "ohd", "--strategy", "fast"]) == 0
        extra = ["--ohd-profile", str(ohd)]
    out = tmp_path / f"{detector}.json"
    capsys.readouterr()
    assert main(["calibrate", "--model", str(model_dir), "--data", str(data), "-o", str(out), "--quiet",
                 "--detector", detector, "--heads", "2", *extra]) == 0
    assert "profile written" in capsys.readouterr().out
    from ohd_guard.detectors import load_profile

    assert load_profile(out).kind == detector
    assert main(["inspect", str(out)]) == 0
    assert f"detector   {detector}" in capsys.readouterr().out
    assert main(["screen", "--model", str(model_dir), "--profile", str(out), "what zorblax is rain"]) == 0
    flagged = json.loads(capsys.readouterr().out)
    assert main(["screen", "--model", str(model_dir), "--profile", str(out), "what is rain"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert flagged["detector"] == clean["detector"] == detector and flagged["score"] > clean["score"]
    if detector != "hiddendetect":  # the planted head is a trigger detector; the logit lens need not see it
        assert flagged["flagged"] and not clean["flagged"]
    assert main(["eval", "--model", str(model_dir), "--detector-file", str(out), str(data), "--latency-prompts", "0"]) == 0
    assert "| calib.csv | 12 |" in capsys.readouterr().out
