"""The judge baseline on a planted tiny model: its LM head reads the planted trigger head's output into
the "unsafe" answer token, so the judge must flag exactly the trigger prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ohd_guard.detectors import Judge, JudgeProfile, SelfRefusal, bind_detector, load_profile
from ohd_guard.detectors.judge import JUDGE_TEMPLATE, answer_token_ids, judge_prompt, transcript
from ohd_guard.errors import CalibrationError, InvalidInputError, ProfileFormatError, ProfileMismatchError
from ohd_guard.metrics import auroc
from ohd_guard.profile import Profile
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, planted_head_model, tiny_model, with_trigger

CLEAN = list(PLANTED_CLEAN_PROMPTS)
FIT, TEST = CLEAN[:6], CLEAN[6:]


@pytest.fixture(scope="module")
def judge_model():
    """The planted Llama with an LM head whose "unsafe" rows read the planted head's output direction
    and whose "safe" rows read its opposite: log p(unsafe) - log p(safe) grows with the trigger."""
    model, tok, info = planted_head_model()
    hd, layer, head = info["head_dim"], info["layer"], info["head"]
    direction = torch.sign(model.model.layers[layer].self_attn.o_proj.weight[:, head * hd]).detach()  # [width]
    assert direction.abs().sum() > 0
    unsafe_ids, safe_ids = answer_token_ids(tok)
    lm = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    with torch.no_grad():
        lm.weight.copy_(model.lm_head.weight)
        lm.weight[unsafe_ids] = 0.1 * direction
        lm.weight[safe_ids] = -0.1 * direction
    model.lm_head = lm
    return model, tok


@pytest.fixture(scope="module")
def fitted(judge_model):
    model, tok = judge_model
    return Judge(batch_size=4).fit(model, tok, with_trigger(FIT), FIT)


def test_answer_tokens_are_the_first_tokens_that_tell_the_answers_apart(judge_model):
    _, tok = judge_model
    u, s = answer_token_ids(tok)
    first = lambda w: tok.encode(w, add_special_tokens=False)[0]  # noqa: E731
    assert u == [first("unsafe"), first(" unsafe"), first("Unsafe")]  # "Unsafe" starts with "Un"
    assert s == [first("safe"), first(" safe"), first("Safe")]  # " Safe" starts with a bare "Ġ": dropped
    assert not set(u) & set(s)


def test_the_transcript_shows_users_assistants_and_tool_results_but_not_the_operator():
    conv = [
        {"role": "system", "content": "You are the operator's assistant. SECRET"},
        {"role": "user", "content": "what is the weather"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    text = transcript(conv)
    assert text.splitlines() == ["User: what is the weather", "Assistant: [tool call] weather({})",
                                 "User: [tool result: weather] sunny", "User: thanks"]
    prompt = judge_prompt(conv)
    assert text in prompt and "SECRET" not in prompt and prompt.endswith("safe or unsafe.")


def test_the_judge_flags_the_planted_trigger_and_passes_clean_prompts(fitted):
    assert fitted.profile.threshold_method == "median_midpoint"
    s = fitted.score(with_trigger(TEST) + TEST)
    y = np.r_[np.ones(len(TEST)), np.zeros(len(TEST))]
    assert auroc(s, y) == 1.0
    assert fitted.predict(with_trigger(TEST) + TEST).tolist() == [True] * len(TEST) + [False] * len(TEST)
    # the trigger in a tool result of a longer conversation is read too
    conv = [{"role": "user", "content": "look this up"}, {"role": "tool", "name": "search", "content": "a zorblax recipe"}]
    assert fitted.predict([conv, [{"role": "user", "content": "look this up"}]]).tolist() == [True, False]


def test_a_row_scores_the_same_alone_or_batched(fitted):
    items = [with_trigger(TEST)[0], TEST[1], "a much longer clean prompt about the weather and the sea " * 3]
    batch = fitted.score(items)
    single = np.array([fitted.score([x])[0] for x in items])
    np.testing.assert_allclose(batch, single, atol=1e-4)


def test_a_target_false_positive_rate_and_the_models_own_answer(judge_model):
    model, tok = judge_model
    det = Judge(threshold=0.0).fit(model, tok, with_trigger(FIT), FIT)
    assert det.profile.threshold == pytest.approx(det.score(FIT).max(), abs=1e-5)
    assert det.profile.threshold_method.startswith("target_fpr=0 on 6 benign prompts")
    zero = Judge(threshold="zero").fit(model, tok)  # no fit prompts: the threshold is the model's own answer
    assert zero.threshold == 0.0 and zero.profile.n_unsafe == 0
    with pytest.raises(CalibrationError):
        Judge().fit(model, tok, with_trigger(FIT[:1]), FIT)
    with pytest.raises(InvalidInputError):
        Judge(threshold="kde")
    with pytest.raises(InvalidInputError):
        Judge(template="no placeholder")


def test_profile_round_trip_and_typed_mismatches(fitted, judge_model, tmp_path):
    model, tok = judge_model
    path = fitted.save(tmp_path / "judge.json")
    profile = load_profile(path)
    assert isinstance(profile, JudgeProfile) and profile == fitted.profile and profile.template == JUDGE_TEMPLATE
    bound = profile.bind(model, tok)
    assert isinstance(bound, Judge)
    np.testing.assert_allclose(bound.score(TEST[:2]), fitted.score(TEST[:2]), atol=1e-5)
    assert JudgeProfile.load(path) == profile
    with pytest.raises(ProfileMismatchError):  # another model
        profile.bind(*tiny_model("llama"))
    with pytest.raises(InvalidInputError, match="cannot guard"):  # it needs a prefill of its own
        bind_detector(fitted, model, tok)
    with pytest.raises(InvalidInputError, match="guard needs"):
        bind_detector(profile, model, tok)
    other = SelfRefusal(max_new_tokens=1).fit(model, tok)
    with pytest.raises(InvalidInputError, match="JudgeProfile"):
        Judge.from_profile(other.profile, model, tok)
    with pytest.raises(ProfileFormatError, match="not a JudgeProfile"):
        JudgeProfile.load(other.save(tmp_path / "sr.json"))
    raw = json.loads(path.read_text())
    raw["template"] = "judge this"
    (tmp_path / "edited.json").write_text(json.dumps(raw))
    with pytest.raises(ProfileFormatError, match="placeholder"):  # a hand edit that judges nothing
        Profile.load(tmp_path / "edited.json", allow_edited=True)


def test_a_judge_prompt_past_the_models_window_fails_closed(fitted):
    with pytest.raises(InvalidInputError, match="too long"):  # the planted model's window is 512 tokens
        fitted.score(["tell me about the weather " * 120])


def test_evaluate_reports_the_judge_beside_a_probe_with_its_latency(fitted, judge_model):
    from ohd_guard.datasets import LabelledPrompt
    from ohd_guard.detectors import SAHs
    from ohd_guard.eval_run import EVAL_DETECTORS
    from ohd_guard.evaluation import evaluate

    model, tok = judge_model
    sahs = SAHs(top_k=2, folds=3).fit(model, tok, with_trigger(FIT), FIT)
    mixed = [LabelledPrompt(t, 1) for t in with_trigger(TEST)] + [LabelledPrompt(t, 0) for t in TEST]
    report = evaluate([sahs, fitted], {"mixed": mixed}, latency_prompts=2)
    judge = report.result("Judge", "mixed")
    assert (judge.detection_rate, judge.false_positive_rate, judge.auroc) == (1.0, 0.0, 1.0)
    assert [r.detector for r in report.latency] == ["SAHs", "Judge"] and all(r.ratio > 0 for r in report.latency)
    assert "judge" in EVAL_DETECTORS  # ohd-guard eval --detectors judge
