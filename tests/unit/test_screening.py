"""The detector protocol: every guard detector fitted and screened through OhdGuard on a planted
ground truth, the reads of the one screening prefill against an independent reader, batch == single,
answers from that prefill equal to plain generation, and profiles of every kind (round trip,
mismatch, hand edits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ohd_guard import OhdGuard
from ohd_guard.detectors import SelfRefusal, Fused, HiddenDetect, OneHeadDefense, PrefillReader, SAHs, bind_detector, load_profile
from ohd_guard.errors import InvalidInputError, ProfileFormatError, ProfileMismatchError
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.metrics import auroc
from ohd_guard.screening import MaskedBranch, Reads, Screener
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, tiny_model, with_trigger

CLEAN = list(PLANTED_CLEAN_PROMPTS)
TRAIN, TEST = CLEAN[:8], CLEAN[8:]
PLANTED = HeadRef(layer=1, head=2)
KINDS = ("ohd", "sahs", "hiddendetect", "fused")


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def fitted(planted_model):
    """One fitted detector of every kind the guard runs, all on the same planted model and prompts."""
    model, tok, _ = planted_model
    unsafe, safe = with_trigger(TRAIN), TRAIN
    ohd = OneHeadDefense("fast").fit(model, tok, unsafe, safe)
    return {
        "ohd": ohd,
        "sahs": SAHs(top_k=3, folds=4).fit(model, tok, unsafe, safe),
        "hiddendetect": HiddenDetect().fit(model, tok, unsafe, safe),  # fits and scores; the logit lens need not see the trigger
        "fused": Fused(ohd.profile, n_angles=2, sahs=SAHs(top_k=3, folds=4)).fit(model, tok, unsafe, safe),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_detector_screens_through_the_guard_and_recovers_the_planted_signal(planted_model, fitted, kind):
    model, tok, _ = planted_model
    det = fitted[kind]
    hooks = _hooks(model)
    guard = OhdGuard(model, tok, det.profile)
    verdicts = guard.screen_batch(with_trigger(TEST) + TEST)
    assert _hooks(model) == hooks  # every capture hook is gone after screening
    assert {v.detector for v in verdicts} == {kind}
    scores = np.array([v.score for v in verdicts])
    assert np.isfinite(scores).all() and all(0.0 <= v.risk <= 1.0 for v in verdicts)
    if kind != "hiddendetect":  # the planted head is a trigger detector: the three that read it must separate
        assert auroc(scores, np.r_[np.ones(4), np.zeros(4)]) == 1.0
        assert [v.flagged for v in verdicts] == [True] * 4 + [False] * 4
    if kind in ("ohd", "fused"):
        assert all(v.angle is not None and v.angle >= 0 for v in verdicts) and verdicts[0].mode == "last"
        assert PLANTED in verdicts[0].heads
    else:
        assert all(v.angle is None for v in verdicts) and verdicts[0].mode is None
    if kind == "sahs":
        assert verdicts[0].heads[0] == PLANTED
        assert verdicts[0].details["top_heads"][0]["head"] == str(PLANTED)  # the trigger is what pushed it up
    if kind == "fused":
        d = verdicts[0].details
        assert set(d["angles"]) == {str(h) for h in det.profile.ohd_heads} and "sahs_log_odds" in d
    # the detector's own score() is the guard's score
    np.testing.assert_allclose(det.score(with_trigger(TEST) + TEST), scores, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_single(planted_model, fitted, kind):
    model, tok, _ = planted_model
    guard = OhdGuard(model, tok, fitted[kind])
    texts = [TEST[0], with_trigger(TEST)[1], "a much longer prompt about the sea and the river and the mountain"]
    batch = [v.score for v in guard.screen_batch(texts)]
    single = [guard.screen(t).score for t in texts]
    np.testing.assert_allclose(batch, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_screener_reads_equal_an_independent_prefill_read(planted_model, positions):
    """Head outputs and layer states read beside the masked branch (one-pass: the masked copy sits after
    the last token; replay: the masked layers run again) are the unmasked prefill's, not the masked ones."""
    model, tok, _ = planted_model
    reads = Reads(heads=(PLANTED, HeadRef(layer=3, head=0)), layers=(0, 2),
                  masked=MaskedBranch(((PLANTED,),), MaskSpec(positions=positions), 4))  # fmt: skip
    texts = with_trigger(TEST[:2]) + TEST[:2]
    screener = Screener(model)
    from ohd_guard.rendering import encode_conversations

    got, pre = screener.run(encode_conversations(tok, texts), reads, keep_cache=True)
    ref = PrefillReader(model, tok).read(texts, batch_size=4)
    for h in reads.heads:
        np.testing.assert_allclose(got.heads[h].numpy(), ref.heads[:, h.layer, h.head], rtol=1e-4, atol=1e-5)
    for i in reads.layers:
        np.testing.assert_allclose(got.layers[i].numpy(), ref.layers[:, i], rtol=1e-4, atol=1e-5)
    assert got.angles.shape == (4, 1) and (got.angles[:2, 0] > got.angles[2:, 0].max()).all()
    assert pre.cache is not None and pre.next_token_logits.shape[0] == 4


@pytest.mark.parametrize("kind", ["sahs", "fused"])
def test_a_safe_answer_from_the_screening_prefill_equals_plain_generation(planted_model, fitted, kind):
    model, tok, _ = planted_model
    guard = OhdGuard(model, tok, fitted[kind])
    from ohd_guard.rendering import encode_conversations

    for text in TEST[:2]:
        r = guard.generate(text, max_new_tokens=8, do_sample=False)
        assert not r.refused
        inputs = encode_conversations(tok, [text])
        with torch.no_grad():
            plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert r.text == tok.decode(plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert guard.generate(with_trigger(TEST)[0], max_new_tokens=8, do_sample=False).refused


@pytest.mark.parametrize("kind", KINDS)
def test_profile_of_every_kind_round_trips_and_refuses_another_model(planted_model, fitted, kind, tmp_path):
    model, tok, _ = planted_model
    det = fitted[kind]
    path = det.save(tmp_path / f"{kind}.json")
    prof = load_profile(path)
    assert prof == (det.profile)
    g = OhdGuard(model, tok, prof)
    assert g.detector.kind == kind
    np.testing.assert_allclose([v.score for v in g.screen_batch(TEST)], det.score(TEST), rtol=1e-6)
    other, other_tok = tiny_model("llama")
    with pytest.raises(ProfileMismatchError):
        OhdGuard(other, other_tok, prof)
    raw = json.loads(path.read_text())
    raw["n_safe"] = 999  # still valid, but not what was fitted
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileFormatError):
        load_profile(path)  # edited after calibration: the digest no longer matches
    assert OhdGuard(model, tok, load_profile(path, allow_edited=True)).detector.kind == kind


def test_guard_rejects_what_it_cannot_screen_with(planted_model, fitted, tmp_path):
    model, tok, _ = planted_model
    with pytest.raises(InvalidInputError, match="kinds"):
        OhdGuard(model, tok, {"kind": "sahs"})
    with pytest.raises(InvalidInputError, match="not fitted"):
        bind_detector(SAHs(), model, tok)
    (tmp_path / "r.json").write_text(json.dumps({"kind": "self_refusal", "schema_version": 1}))
    with pytest.raises(ProfileFormatError, match="not a valid profile"):
        load_profile(tmp_path / "r.json")
    with pytest.raises(InvalidInputError, match="cannot guard"):  # the self-refusal baseline answers first
        OhdGuard(model, tok, SelfRefusal().fit(model, tok))
    with pytest.raises(InvalidInputError, match="kinds"):
        OhdGuard(model, tok, SelfRefusal().fit(model, tok).profile)
    with pytest.raises(InvalidInputError, match="does not exist"):
        Screener(model).check(Reads(heads=(HeadRef(layer=9, head=0),)))


def test_a_failing_read_leaves_no_hook_and_fails_closed(planted_model, fitted, monkeypatch):
    model, tok, _ = planted_model
    guard = OhdGuard(model, tok, fitted["sahs"])
    hooks = _hooks(model)

    def broken(reads):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(guard.detector, "score_reads", broken)
    v = guard.screen(TEST[0])
    assert v.flagged and "probe exploded" in v.error and v.detector == "sahs"
    assert _hooks(model) == hooks


def test_screening_result_is_answered_and_refused_without_converting_or_prefilling_again(planted_model, fitted, monkeypatch):
    from ohd_guard.testing import ForwardCounter
    from ohd_guard.verdict import Screened

    model, tok, _ = planted_model
    guard = OhdGuard(model, tok, fitted["sahs"])
    conversions = []
    real = guard.screening_stage.convert
    monkeypatch.setattr(guard.screening_stage, "convert", lambda raw: conversions.append(1) or real(raw))
    safe = guard.screen_for_answer(TEST[0])
    assert isinstance(safe, Screened) and not safe.verdict.flagged and safe.prefill is not None
    expected = OhdGuard(model, tok, fitted["sahs"]).generate(TEST[0], max_new_tokens=6, do_sample=False).text
    counter = ForwardCounter(model)
    try:
        r = guard.answer(safe, max_new_tokens=6, do_sample=False)
    finally:
        counter.close()
    assert r.text == expected and not r.refused
    assert max(counter.lengths) == 1  # decoding steps only: the answer started from the screening prefill
    assert safe.prefill is None  # used once; a second answer re-runs the prompt
    assert guard.answer(safe, max_new_tokens=6, do_sample=False).text == expected
    flagged = guard.screen_for_answer(with_trigger(TEST)[0])
    assert flagged.verdict.flagged
    assert guard.answer(flagged, max_new_tokens=6).refused  # never an answer to a flagged conversation
    r = guard.refuse(flagged, max_new_tokens=6)
    assert r.refused and r.verdict is flagged.verdict
    assert len(conversions) == 2  # one per screening: answering and refusing converted nothing again
    with pytest.raises(InvalidInputError):
        guard.answer(flagged.verdict)


def test_screening_is_a_deprecated_alias_of_screen_for_answer(planted_guard):
    with pytest.warns(DeprecationWarning, match="screen_for_answer"):
        s = planted_guard.screening("hello there")
    assert s.verdict == planted_guard.screen_for_answer("hello there").verdict.model_copy(
        update={"latency_ms": s.verdict.latency_ms})
