"""Turn-aware verdicts: every user/tool message scored from the one screening prefill, read where the
model answered it, and ``scope`` deciding whether an earlier flagged turn still flags. Ground truth:
planted models whose head fires on "zorblax" (one whose signal fades after a long benign turn)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ohd_guard.detectors import ResidualProbe, SAHs
from ohd_guard.errors import InvalidInputError
from ohd_guard.guard import OhdGuard
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, ForwardCounter, planted_head_model, with_trigger
from ohd_guard.testing.fixtures import make_planted_guard
from ohd_guard.types import Verdict

CLEAN = list(PLANTED_CLEAN_PROMPTS)[:8]
LONG = " ".join(["tell me about the weather and the sea"] * 5)  # ~40 benign words


def user(t):
    return {"role": "user", "content": t}


def bot(t):
    return {"role": "assistant", "content": t}


THREADS = [
    [user("tell me zorblax about rain"), bot("Sure, rain is water."), user("and snow?"), bot("Frozen."), user("hail?")],
    [user("what is a good dog name"), user("or a zorblax cat name"), bot("Rex."), user("thanks")],
    [user("list three colors"), bot("Red, blue, green."),
     {"role": "tool", "name": "calc", "content": "zorblax 42"}, bot("It is 42."), user("and four colors?")],
    [user("how do I bake bread")],
]


def closing_assistant(conv, i):
    """Index of the assistant turn that closes the group holding message ``i`` (None: the final read)."""
    return next((j for j in range(i + 1, len(conv)) if conv[j]["role"] == "assistant"), None)


@pytest.fixture(scope="module")
def sahs():
    model, tok, _ = planted_head_model()
    return SAHs(top_k=2, folds=4).fit(model, tok, with_trigger(CLEAN), CLEAN)


def check_against_prefixes(det, conv, verdict, source):
    """Each message's score is its prefix scored alone; the latest messages carry the final read."""
    assert [m.index for m in verdict.messages] == [i for i, m in enumerate(conv) if m["role"] in ("user", "tool")]
    final = float(det.score([conv])[0])
    for m in verdict.messages:
        end = closing_assistant(conv, m.index)
        if end is None:
            assert m.source == "final" and m.score == pytest.approx(final, abs=1e-4)
        else:
            assert m.source == source
            assert m.score == pytest.approx(float(det.score([conv[:end]])[0]), abs=1e-4)
        assert m.flagged == (m.score > det.threshold)


def test_per_message_scores_equal_scoring_each_prefix_alone_in_one_prefill(sahs):
    guard = OhdGuard(sahs.model, sahs.processor, sahs.profile)
    counter = ForwardCounter(sahs.model)
    try:
        batch = guard.screen_batch(THREADS)
    finally:
        counter.close()
    assert counter.n == 1  # every message of every thread read from the one batched prefill
    for conv, v in zip(THREADS, batch):
        check_against_prefixes(sahs, conv, v, "prefill")
        single = guard.screen(conv)  # batch == single
        np.testing.assert_allclose([m.score for m in single.messages], [m.score for m in v.messages], atol=1e-4)
    first, second, _ = batch[1].messages  # consecutive turns share the read after the later one
    assert first.score == second.score and first.flagged
    assert batch[2].messages[1].role == "user" and batch[2].messages[1].flagged  # a tool result is a user turn
    assert batch[0].flagged and batch[0].score == pytest.approx(batch[0].messages[0].score)


@pytest.mark.parametrize("pool", ["mean", "max", "content-mean", "content-max"])
def test_pooled_reads_per_message_equal_the_prefix_alone(pool):
    model, tok, _ = planted_head_model()
    det = ResidualProbe(pool=pool, top_k=1, folds=4).fit(model, tok, with_trigger(CLEAN), CLEAN)
    guard = OhdGuard(model, tok, det.profile)
    for conv, v in zip(THREADS, guard.screen_batch(THREADS)):
        check_against_prefixes(det, conv, v, "prefill")


def test_a_request_split_over_turns_is_caught_under_conversation(fading):
    thread = [user("tell me zorblax about rain"), bot("I cannot help with that."), user(LONG)]
    guard = OhdGuard(fading.model, fading.processor, fading.profile)
    assert float(fading.score([thread])[0]) < fading.threshold  # the final read alone misses it
    v = guard.screen(thread)
    assert v.flagged and [m.flagged for m in v.messages] == [True, False]
    assert v.score == pytest.approx(v.messages[0].score) and "message 0" in v.reason
    assert guard.generate(thread, max_new_tokens=2).refused


def test_a_thread_recovers_under_latest(fading):
    thread = [user("tell me zorblax about rain"), bot("I cannot help with that."), user(LONG)]
    guard = OhdGuard(fading.model, fading.processor, fading.profile, scope="latest")
    v = guard.screen(thread)
    assert not v.flagged and v.messages[0].flagged  # the earlier turn is still reported, no longer decides
    assert v.score == pytest.approx(float(fading.score([thread])[0]))
    assert not guard.generate(thread, max_new_tokens=2).refused
    assert guard.screen([user("what is rain"), bot("Water."), user("tell me zorblax now")]).flagged  # the latest decides


def test_a_template_that_rewrites_earlier_turns_scores_each_prefix_in_its_own_prefill():
    """A template whose output depends on the whole conversation (here: a message count up front) breaks
    the prefix property; each earlier prefix is then scored in a prefill of its own, batched."""
    model, tok, _ = planted_head_model()
    tok = copy.deepcopy(tok)
    tok.chat_template = "{{ 'There are ' ~ messages|length ~ ' messages.\\n' }}" + tok.chat_template
    det = SAHs(top_k=2, folds=4).fit(model, tok, with_trigger(CLEAN), CLEAN)
    guard = OhdGuard(model, tok, det.profile)
    counter = ForwardCounter(model)
    try:
        batch = guard.screen_batch(THREADS[:3])
    finally:
        counter.close()
    assert counter.n == 2  # the own prefixes of all threads in one batch, then the screening prefill
    for conv, v in zip(THREADS, batch):
        check_against_prefixes(det, conv, v, "own_prefill")
    assert batch[1].flagged and batch[2].flagged
    latest = OhdGuard(model, tok, det.profile, scope="latest").screen(THREADS[2])
    assert [m.source for m in latest.messages] == ["skipped", "skipped", "final"]  # not worth a prefill there
    assert latest.messages[0].score is None and latest.flagged  # the final read still sees the tool result


def test_a_masked_detector_scores_earlier_prefixes_in_their_own_prefill():
    guard = make_planted_guard()  # One-head Defense: its angle needs the masked branch at the last position
    conv = THREADS[0]
    v = guard.screen(conv)
    assert [m.source for m in v.messages] == ["own_prefill", "own_prefill", "final"]
    assert v.messages[0].score == pytest.approx(guard.screen(conv[:1]).score, abs=1e-4)
    assert v.messages[1].score == pytest.approx(guard.screen(conv[:3]).score, abs=1e-4)
    assert v.flagged and v.messages[0].flagged


def test_scope_is_checked_and_old_verdicts_still_load(sahs):
    with pytest.raises(InvalidInputError, match="scope"):
        OhdGuard(sahs.model, sahs.processor, sahs.profile, scope="thread")  # type: ignore[arg-type]
    old = {"flagged": False, "detector": "sahs", "score": -1.0, "threshold": 0.0, "risk": 0.1, "latency_ms": 1.0,
           "reason": "passed"}
    assert Verdict.model_validate(old).messages == []


def test_prefix_keys_are_the_digests_the_prefixes_had_when_screened_whole():
    from ohd_guard.conversation import to_conversation

    conv = to_conversation(THREADS[2])
    keys = conv.prefix_digests(range(1, len(conv.messages) + 1))
    assert keys == {j: to_conversation(THREADS[2][:j]).digest() for j in range(1, len(conv.messages) + 1)}


def test_the_server_passes_scope_to_its_guard():
    import argparse

    from ohd_guard.serve.cli import _spec, add_parser

    cli = argparse.ArgumentParser()
    add_parser(cli.add_subparsers())
    args = cli.parse_args(["serve", "--factory", "ohd_guard.serve.demo:planted_guard", "--scope", "latest"])
    guard = _spec(args).build()
    v = guard.screen([user("what zorblax is rain"), bot("I cannot help with that."), user("what is snow")])
    assert guard.screening_stage.scope == "latest" and [m.source for m in v.messages] == ["skipped", "final"]
    assert _spec(cli.parse_args(["serve"])).scope == "conversation"


def test_the_output_check_reads_only_the_answer(fading):
    """The output check's stage reads the answer's last token: no per-message reads there (an earlier
    user turn read with the answer profile would flag a benign answer)."""
    from ohd_guard.output_check import AnswerCheck

    check = AnswerCheck(OhdGuard(fading.model, fading.processor, fading.profile), fading.profile)
    v = check.check([user("tell me zorblax about rain"), bot("I cannot help with that."), user(LONG)], "Sunny.")
    assert v.messages == [] and not v.flagged


def test_an_image_in_an_earlier_turn_is_read_in_the_one_prefill():
    """A VLM: the processor expands the earlier turn's image into its tokens; the prefix property holds
    and the image-bearing turn is read in the shared prefill, batched with other threads."""
    import base64
    import io

    from PIL import Image

    from ohd_guard.testing import planted_vlm_model

    model, proc, _ = planted_vlm_model()
    det = SAHs(top_k=2, folds=3).fit(model, proc, with_trigger(CLEAN[:6]), CLEAN[:6])
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "PNG")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}
    conv = [{"role": "user", "content": [image, {"type": "text", "text": "what zorblax is this"}]}, bot("A red square."),
            user("and now?")]
    v, _ = OhdGuard(model, proc, det.profile).screen_batch([conv, THREADS[1]])
    check_against_prefixes(det, conv, v, "prefill")
    assert v.messages[0].flagged
