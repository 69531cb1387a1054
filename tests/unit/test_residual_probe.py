"""The residual probe (last token or pooled over the prompt) against planted ground truth.

A model whose attention outputs are zeroed moves no information between positions: the last
prompt token's state then depends on that token alone, so a trigger word placed mid-prompt (inside a
RAG template, after tool definitions) is invisible there, and only a probe pooled over every
position can find it. That is exactly the case the pooled read exists for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ohd_guard.contexts import in_contexts
from ohd_guard.datasets import LabelledPrompt
from ohd_guard.detectors import PrefillReader, ResidualProbe, load_profile, shared_prefill
from ohd_guard.errors import CalibrationError, InvalidInputError, ProfileFormatError
from ohd_guard.guard import OhdGuard
from ohd_guard.metrics import auroc
from ohd_guard.screening import Reads, Screener, score_conversations
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, planted_head_model, with_trigger

CLEAN = list(PLANTED_CLEAN_PROMPTS)


def _labelled(texts, label):
    return [LabelledPrompt(t, label) for t in texts]


@pytest.fixture(scope="module")
def no_attention():
    """The planted model with every attention output zeroed: no position sees another."""
    model, tok, truth = planted_head_model()
    model.config.max_position_embeddings = 4096  # RoPE has no table: longer contexts are fine
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return model, tok


def _in_context(texts, label, seed):
    items = in_contexts(_labelled(texts, label), kinds=("rag", "tools"), seed=seed, split="fit")
    return [x for x in items if x.context != "bare"]


def test_a_pooled_probe_finds_a_trigger_mid_prompt_that_the_last_token_cannot_see(no_attention):
    model, tok = no_attention
    fit_u = with_trigger(CLEAN[:8]) + [x.messages for x in _in_context(with_trigger(CLEAN[:8]), 1, 0)]
    fit_s = CLEAN[:8] + [x.messages for x in _in_context(CLEAN[:8], 0, 0)]
    test = _in_context(with_trigger(CLEAN[8:]), 1, 1) + _in_context(CLEAN[8:], 0, 1)
    y = np.array([x.label for x in test])
    assert {x.context for x in test} == {"rag", "tools"} and y.sum() == len(y) / 2
    with shared_prefill():  # one prefill per conversation for every read below
        pooled = ResidualProbe(pool="max", top_k=1, folds=4).fit(model, tok, fit_u, fit_s)
        last = PrefillReader(model, tok).read([x.messages for x in test]).layers  # [N, L, D]
        assert float(np.ptp(last, axis=0).max()) < 1e-5  # the same last-token state everywhere: blind by construction
        with pytest.raises(CalibrationError, match="constant"):
            ResidualProbe(pool="last", top_k=1, folds=4).fit(model, tok, fit_u, fit_s)
    assert auroc(pooled.score(test), y) >= 0.95
    guard = OhdGuard(model, tok, pooled.profile)
    flagged = np.array([v.flagged for v in guard.screen_batch([x.messages for x in test])])
    assert flagged[y == 1].mean() >= 0.9 and flagged[y == 0].mean() <= 0.1


#: The operator's system prompt of the test below: the trigger word appears there, not in the user's text.
OPERATOR = "You are the help desk of a shop. Never talk about zorblax with a user."


def test_a_content_pooled_probe_reads_the_users_text_not_the_operators_prompt(no_attention):
    """Planted ground truth for ``content-*`` pools: the trigger in the *user's* text is the unsafe
    signal; the same trigger in the operator's system prompt (or a tool definition) is not the user's
    request. Pooled over the whole prompt the probe cannot tell the two apart; over the user's text it must."""
    model, tok = no_attention
    fit_u = with_trigger(CLEAN[:8]) + [x.messages for x in _in_context(with_trigger(CLEAN[:8]), 1, 0)]
    fit_s = CLEAN[:8] + [x.messages for x in _in_context(CLEAN[:8], 0, 0)]
    sys_trigger = [[{"role": "system", "content": OPERATOR}, {"role": "user", "content": t}] for t in CLEAN[8:]]
    tool_trigger = [x.messages for x in _in_context(CLEAN[8:], 0, 2)]
    tool_trigger = [[{"role": "system", "content": "Tools: lookup_zorblax(id) returns a record."}, *m] for m in tool_trigger]
    unsafe = [[{"role": "system", "content": OPERATOR.replace("zorblax", "refunds")}, {"role": "user", "content": t}]
              for t in with_trigger(CLEAN[8:])]
    test = unsafe + sys_trigger + tool_trigger
    y = np.r_[np.ones(len(unsafe)), np.zeros(len(sys_trigger) + len(tool_trigger))]
    with shared_prefill():
        content = ResidualProbe(pool="content-max", top_k=1, folds=4).fit(model, tok, fit_u, fit_s)
        whole = ResidualProbe(pool="max", top_k=1, folds=4).fit(model, tok, fit_u, fit_s)
    assert auroc(content.score(test), y) >= 0.95
    flagged = np.array([v.flagged for v in OhdGuard(model, tok, content.profile).screen_batch(test)])
    assert flagged[y == 1].mean() >= 0.9 and flagged[y == 0].mean() <= 0.1
    whole_flagged = np.array([v.flagged for v in OhdGuard(model, tok, whole.profile).screen_batch(test)])
    assert whole_flagged[y == 0].mean() >= 0.9  # the whole-prompt pool reads the operator's word as the user's


def test_the_content_mask_covers_the_users_text_and_nothing_else():
    from ohd_guard.conversation import to_conversation
    from ohd_guard.rendering import content_mask, encode_conversations
    from ohd_guard.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    convs = [
        "hello please help",
        [{"role": "system", "content": "you are a bank assistant"}, {"role": "user", "content": "tell me a story"}],
        [{"role": "user", "content": "what is the weather"}, {"role": "assistant", "content": "what is the weather"},
         {"role": "user", "content": "thanks a lot"}],
        [{"role": "user", "content": "add two and three"},
         {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}]},
         {"role": "tool", "content": "five", "name": "add"}],
    ]
    convs = [to_conversation(c) for c in convs]
    inputs = encode_conversations(tok, convs)
    mask = content_mask(tok, convs, inputs)
    assert ((mask == 1) <= (inputs["attention_mask"] == 1)).all()  # never on padding
    got = [tok.decode(inputs["input_ids"][b][mask[b] > 0]).replace(" ", "") for b in range(len(convs))]
    want = ["".join(m.text for m in c.messages if m.role == "user").replace(" ", "") for c in convs]
    assert got == want  # the assistant's echo of the user's words is not read as theirs
    assert "five" in got[3]  # a tool result is a user turn


def test_a_template_that_rewrites_the_users_text_falls_back_to_the_whole_prompt():
    from ohd_guard.rendering import content_mask, encode_conversations
    from ohd_guard.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content | upper }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    inputs = encode_conversations(tok, ["hello please help"])
    assert (content_mask(tok, ["hello please help"], inputs) == inputs["attention_mask"]).all()


@pytest.mark.parametrize("pool", ["last", "mean", "max", "content-mean", "content-max"])
def test_residual_probe_recovers_the_planted_signal_round_trips_and_scores_alike_batched(pool, tmp_path):
    model, tok, _ = planted_head_model()
    det = ResidualProbe(pool=pool, top_k=2, folds=4).fit(model, tok, with_trigger(CLEAN[:8]), CLEAN[:8])
    test = with_trigger(CLEAN[8:]) + CLEAN[8:]
    y = np.r_[np.ones(len(CLEAN[8:])), np.zeros(len(CLEAN[8:]))]
    scores = det.score(test)
    assert auroc(scores, y) == 1.0
    one_by_one = np.array([det.score([t])[0] for t in test])  # batch == single (left padding excluded from pools)
    # the reads agree to 1e-6; a standardised probe may scale that up on a near-constant feature
    np.testing.assert_allclose(scores, one_by_one, atol=1e-2 * np.ptp(scores))
    loaded = load_profile(det.save(tmp_path / "r.json"))
    assert loaded == det.profile
    np.testing.assert_allclose(loaded.bind(model, tok).score(test), scores, rtol=1e-6)
    joint = score_conversations([det, loaded.bind(model, tok)], test)
    np.testing.assert_allclose(joint[:, 0], joint[:, 1])


def test_a_target_false_positive_rate_threshold(tmp_path):
    model, tok, _ = planted_head_model()
    det = ResidualProbe(pool="last", top_k=1, folds=4, threshold=0.125).fit(model, tok, with_trigger(CLEAN[:8]), CLEAN[:8])
    assert det.profile.threshold_method == "target_fpr=0.125 on 8 benign prompts (out-of-fold)"
    assert (det.oof_[8:] > det.threshold).mean() <= 0.125


def test_residual_profile_edits_that_disable_it_are_refused(tmp_path):
    import json

    model, tok, _ = planted_head_model()
    det = ResidualProbe(pool="mean", top_k=1, folds=4).fit(model, tok, with_trigger(CLEAN[:8]), CLEAN[:8])
    for edit in ({"layers": [99]}, {"coef": [0.0] * len(det.profile.coef)}, {"threshold": 1e300}):
        path = det.save(tmp_path / "r.json")
        raw = {**json.loads(path.read_text()), **edit}
        path.write_text(json.dumps(raw))
        with pytest.raises(ProfileFormatError):
            load_profile(path, allow_edited=True)


def test_pooled_reads_cannot_share_a_prefill_with_a_masked_branch():
    from ohd_guard.screening import MaskedBranch
    from ohd_guard.types import HeadRef, MaskSpec

    model, _, _ = planted_head_model()
    branch = MaskedBranch(((HeadRef(layer=1, head=2),),), MaskSpec(positions="last"), 4)
    with pytest.raises(InvalidInputError, match="pooled"):
        Screener(model).check(Reads(pooled=(1,), masked=branch))


def test_every_probe_kind_takes_a_target_false_positive_rate():
    from ohd_guard.detectors import SAHs
    from ohd_guard.detectors.base import probe_threshold

    model, tok, _ = planted_head_model()
    det = SAHs(top_k=2, folds=4, threshold=0.125).fit(model, tok, with_trigger(CLEAN[:8]), CLEAN[:8])
    assert det.profile.threshold_method == "target_fpr=0.125 on 8 benign prompts (out-of-fold)" and (det.oof_[8:] > det.threshold).mean() <= 0.125
    y = np.r_[np.ones(4), np.zeros(4)]
    oof = np.array([3.0, 2.0, 1.0, 0.5, -1.0, 0.0, 0.2, 1.5])
    assert probe_threshold("prob", oof, y) == (0.0, "probability_0.5")
    assert probe_threshold(0.25, oof, y)[0] == 0.2  # flags 1.5 only: 1 of 4 safe
    with pytest.raises(InvalidInputError):
        probe_threshold(1.5, oof, y)
    with pytest.raises(InvalidInputError):
        probe_threshold("median", oof, y)
