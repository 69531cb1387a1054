"""The core output check (ohd_guard.output_check) on the planted tiny Llama: the answer is read at its
last token through the guard's screening path, sync, async and batched; it fails closed; the shipped
answer profile is found by the guard's model fingerprint."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from ohd_guard.detectors import load_profile
from ohd_guard.errors import InvalidInputError
from ohd_guard.output_check import AnswerCheck, AnswerRendering, answer_conversation, shipped_answer_profile
from ohd_guard.shipped import answer_profile, default_profile
from ohd_guard.testing.fixtures import make_planted_guard

CONV = [{"role": "user", "content": "tell me about cats"}]


@pytest.fixture(scope="module")
def check(planted_guard):
    return AnswerCheck(planted_guard)


def test_the_answer_is_read_at_its_own_last_token(planted_guard, check):
    rendered = AnswerRendering(planted_guard.tokenizer).apply_chat_template(
        [answer_conversation(CONV, "the cat sat")], tokenize=False)
    assert rendered[0].endswith("the cat sat"), "no generation prompt after the answer"
    assert check.check(CONV, "the zorblax is here").flagged
    assert not check.check(CONV, "the cats are here").flagged
    assert not planted_guard.screen(CONV).flagged, "the conversation alone passes: the answer decides"


def test_output_verdicts_say_they_are_output_verdicts_and_reach_the_checks_listeners(check):
    got: list = []
    check.add_listener(got.append)
    try:
        v = check.check("tell me about cats", "a zorblax")
    finally:
        check.remove_listener(got.append)
    assert v.details["stage"] == "output" and got == [v]


def test_async_checks_run_on_the_guards_worker_thread(planted_guard, check):
    threads: list[str] = []

    def seen(v):
        threads.append(threading.current_thread().name)

    async def run():
        return await asyncio.gather(check.acheck(CONV, "the zorblax is here"), check.acheck(CONV, "the cats are here"))

    check.add_listener(seen)
    try:
        flagged, clean = asyncio.run(run())
    finally:
        check.remove_listener(seen)
    assert flagged.flagged and not clean.flagged
    assert threads and all(t != threading.main_thread().name for t in threads)


def test_a_batch_is_checked_at_once_and_a_bad_pair_fails_closed_alone(check):
    verdicts = check.check_batch([(CONV, "a zorblax"), (CONV, "a cat"), (CONV, 5), (CONV, "  ")])
    assert [v.flagged for v in verdicts] == [True, False, True, True]
    assert verdicts[2].error.startswith("InvalidInputError") and "assistant message" in verdicts[2].error
    assert "blank answer" in verdicts[3].error


def test_an_answer_that_cannot_be_checked_is_flagged_even_when_the_guard_lets_input_through():
    guard = make_planted_guard(on_error="allow")
    v = AnswerCheck(guard).check([{"role": "user", "content": ""}], "the cats are here")
    assert v.flagged and v.error, "on_error='allow' of the guard does not reach the output check"


def test_with_on_error_raise_a_bad_answer_is_a_typed_error():
    check = AnswerCheck(make_planted_guard(on_error="raise"))
    with pytest.raises(InvalidInputError, match="blank answer"):
        check.check(CONV, "")


def test_tool_calls_in_the_answer_are_read():
    check = AnswerCheck(make_planted_guard())
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "zorblax", "arguments": "{}"}}]}
    assert check.check(CONV, call).flagged


def test_without_an_answer_profile_the_prompt_profile_is_borrowed_with_a_warning(planted_guard, caplog):
    with caplog.at_level(logging.WARNING, logger="ohd_guard.guard"):
        check = AnswerCheck(planted_guard)
    assert "not calibrated for answers" in caplog.text
    assert check.profile == planted_guard.profile


def test_the_shipped_answer_profile_is_found_by_the_models_fingerprint():
    prompt = load_profile(default_profile())
    found = shipped_answer_profile(prompt)
    assert found is not None and found == load_profile(answer_profile())
    assert shipped_answer_profile(make_planted_guard().profile) is None


def test_the_guard_checks_answers_itself():
    guard = make_planted_guard(max_wait_ms=4.0)
    assert guard.check_answer(CONV, "the zorblax is here").flagged
    assert not guard.check_answer(CONV, "the cats are here").flagged
    assert guard._answer_check() is guard._answer_check()  # built once
    v = asyncio.run(guard.acheck_answer(CONV, "the zorblax is here"))
    assert v.flagged and v.details["stage"] == "output"
