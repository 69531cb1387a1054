"""The attack suite and evaluate() end to end on the planted-head model (markdown, JSON, PNG)."""

from __future__ import annotations

import numpy as np
import pytest

from ohd_guard.attacks import ATTACKS, LabelledConversation, make_attacks
from ohd_guard.datasets import TYPOGRAPHIC_INSTRUCTION, LabelledPrompt
from ohd_guard.detectors import HiddenDetect, OneHeadDefense, SAHs, SelfRefusal
from ohd_guard.errors import InvalidInputError
from ohd_guard.evaluation import EvalReport, evaluate
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, with_trigger

CLEAN = list(PLANTED_CLEAN_PROMPTS)


trig = with_trigger


SEEDS = [LabelledPrompt(t, 1, "trigger", "seed") for t in trig(CLEAN[8:11])]


def test_make_attacks_keeps_request_and_label():
    atk = make_attacks(SEEDS, padding_words=120, image_size=128)
    assert list(atk) == ["direct", *ATTACKS]
    for name, items in atk.items():
        assert len(items) == len(SEEDS) and all(x.label == 1 and x.category == "trigger" for x in items)
    for name in ("roleplay", "hypothetical", "prefix_injection", "refusal_hijack", "benign_padding"):
        assert all(s.text in x.text for s, x in zip(SEEDS, atk[name]))
        assert all(x.source == f"attack/{name}" for x in atk[name])
    assert "Sure, here is" in atk["prefix_injection"][0].text
    assert len(atk["benign_padding"][0].text.split()) >= 120
    conv = atk["multi_turn"][0]
    assert isinstance(conv, LabelledConversation)
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user"]
    first, second = conv.messages[0]["content"], conv.messages[2]["content"]
    words = SEEDS[0].text.split()
    assert " ".join(words[: len(words) // 2]) in first and " ".join(words[len(words) // 2 :]) in second
    typo = atk["typographic"][0]
    assert typo.text == TYPOGRAPHIC_INSTRUCTION and typo.image.size == (128, 128)
    with pytest.raises(InvalidInputError):
        make_attacks(SEEDS, attacks=["nope"])
    with pytest.raises(InvalidInputError):
        make_attacks([])


@pytest.fixture(scope="module")
def fitted(planted_model):
    model, tok, _ = planted_model
    train = CLEAN[:8]
    dets = [OneHeadDefense("fast", top_k=4), SAHs(top_k=2, folds=4), HiddenDetect(), SelfRefusal(max_new_tokens=2)]
    return [d.fit(model, tok, trig(train), train) for d in dets]


def test_evaluate_end_to_end(fitted, tmp_path):
    test = CLEAN[8:]
    datasets = {
        "mixed": [LabelledPrompt(t, 1, "trig") for t in trig(test)] + [LabelledPrompt(t, 0, "clean") for t in test],
        "harmful_only": [LabelledPrompt(t, 1) for t in trig(CLEAN[:6])],
        "harmless_only": [LabelledPrompt(t, 0) for t in CLEAN],
    }
    attacks = make_attacks(SEEDS, attacks=["roleplay", "multi_turn", "typographic"], padding_words=40, image_size=96)
    report = evaluate(fitted, datasets, attacks=attacks, latency_prompts=2)
    ohd = report.result("OhD (fast)", "mixed")
    assert (ohd.detection_rate, ohd.false_positive_rate, ohd.auroc, ohd.paired_with) == (1.0, 0.0, 1.0, "own")
    harm = report.result("SAHs", "harmful_only")
    assert harm.paired_with == "pooled safe (16)" and harm.auroc > 0.9 and harm.false_positive_rate is None
    harmless = report.result("HiddenDetect", "harmless_only")
    assert harmless.paired_with == "pooled unsafe (10)" and harmless.detection_rate is None
    assert report.result("OhD (fast)", "multi_turn").detection_rate == 1.0
    assert report.result("SAHs", "typographic").skipped.startswith("conversation has 1 image")  # text-only model
    assert report.result("SelfRefusal", "mixed").auroc == 0.5  # a random model never refuses
    assert {c.category for c in report.categories} == {"trig", "clean", "trigger"}
    assert [l.detector for l in report.latency] == report.detectors and all(l.ratio > 0 for l in report.latency)

    md = report.to_markdown()
    for title in ("### Flag rate", "### AUROC", "### Detection rate at 5% FPR", "### Adaptive attacks",
                  "### Screening latency", "### Per category"):
        assert title in md
    assert "| mixed | 8 | DR 1.000 / FPR 0.000 |" in md and "skipped" in md
    again = EvalReport.model_validate_json(report.to_json())
    assert again.result("OhD (fast)", "mixed") == ohd
    assert again.scores == report.scores
    png = report.plot_roc(tmp_path / "roc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pairing_uses_reference_sets_only():
    report = EvalReport(
        max_fpr=0.05, detectors=["d"], thresholds={"d": 0.5}, datasets={"h": 2, "s": 2, "s2": 1},
        reference_sets=["s"], scores={"d": {"h": [0.9, 0.8], "s": [0.1, 0.95], "s2": [0.0]}},
        labels={"h": [1, 1], "s": [0, 0], "s2": [0]},
    )
    scores, labels, how = report.paired("d", "h")
    assert how == "pooled safe (2)" and scores.tolist() == [0.9, 0.8, 0.1, 0.95] and labels.tolist() == [1, 1, 0, 0]
    assert report.paired("d", "s") is None  # no unsafe items in the reference sets


def test_evaluate_refuses_bad_input(fitted):
    with pytest.raises(InvalidInputError, match="not fitted"):
        evaluate([SAHs()], {"a": [LabelledPrompt("x", 1)]})
    with pytest.raises(InvalidInputError, match="unique"):
        evaluate([fitted[1], fitted[1]], {"a": [LabelledPrompt("x", 1)]})
    with pytest.raises(InvalidInputError, match="label"):
        evaluate(fitted[1:2], {"a": ["plain string"]}, latency_prompts=0)
    with pytest.raises(InvalidInputError, match="both"):
        evaluate(fitted[1:2], {"a": [LabelledPrompt("x", 1)]}, attacks={"a": [LabelledPrompt("y", 1)]})
    r = evaluate(fitted[1:2], {"a": [LabelledPrompt("hello there", 1)]}, latency_prompts=0)
    assert r.latency == [] and r.result("SAHs", "a").auroc is None and np.isfinite(r.scores["SAHs"]["a"]).all()
