"""LangChain integration: the middleware's output check (``check_output=True``): it reads the answer, it is
the core's, it holds every stream mode until the answer passed; and ``calibrate_answers``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import BaseMessage as BaseMessageT

from langchain_ohd_guard import OhdGuardMiddleware
from ohd_guard.errors import GuardViolation

from .support import make_agent, spy


@pytest.fixture(scope="module")
def guard(planted_guard):
    return planted_guard


@pytest.mark.parametrize("exit_behavior", ["end", "replace"])
def test_output_check_reads_the_answer(guard, exit_behavior):
    """The user turn is clean: only the answer carries the trigger, so only an output check that
    reads the answer can flag it; the flagged answer does not stay in the returned state."""
    answerer = spy("the zorblax is here")
    out = make_agent(answerer, guard, check_output=True, exit_behavior=exit_behavior).invoke(
        {"messages": [("human", "tell me about cats")]})["messages"]
    assert answerer.calls == 1 and [type(m).__name__ for m in out] == ["HumanMessage", "AIMessage"]
    meta = out[-1].response_metadata["ohd_guard"]
    assert meta["stage"] == "output" and meta["output_verdict"]["flagged"] and "answer was flagged" in out[-1].content
    assert not any("zorblax" in str(m.content) for m in out)
    safe = make_agent(spy("cats are nice"), guard, check_output=True).invoke({"messages": [("human", "cats")]})["messages"]
    assert safe[-1].content == "cats are nice"
    assert safe[-1].response_metadata["ohd_guard"]["output_verdict"]["flagged"] is False
    assert safe[-1].response_metadata["ohd_guard"]["input_verdict"]["flagged"] is False


def test_output_check_is_the_cores(guard):
    """#25.5: the middleware runs the core's output check (ohd_guard.output_check), whose verdicts
    say they are output verdicts; a blank answer is not checked (there is nothing to read)."""
    from ohd_guard.output_check import AnswerCheck

    mw = OhdGuardMiddleware(guard, check_output=True)
    assert type(mw.answer_check) is AnswerCheck
    from langchain.agents import create_agent

    out = create_agent(spy("the cats are here"), tools=[], middleware=[mw]).invoke(
        {"messages": [("human", "tell me about cats")]})["messages"]
    meta = out[-1].response_metadata["ohd_guard"]
    assert meta["output_verdict"]["details"]["stage"] == "output" and "stage" not in meta["input_verdict"]["details"]
    blank = create_agent(spy("  "), tools=[], middleware=[OhdGuardMiddleware(guard, check_output=True)]).invoke(
        {"messages": [("human", "tell me about cats")]})["messages"]
    assert "output_verdict" not in blank[-1].response_metadata.get("ohd_guard", {})


def test_output_check_error_and_async(guard):
    with pytest.raises(GuardViolation) as e:
        make_agent(spy("zorblax"), guard, check_output=True, exit_behavior="error").invoke({"messages": [("human", "hi")]})
    assert e.value.stage == "output"

    async def run():
        agent = make_agent(spy("the zorblax is here"), guard, check_output=True)
        events = [ev async for ev in agent.astream_events({"messages": [("human", "cats")]}, version="v2")
                  if ev["event"] == "on_custom_event"]  # fmt: skip
        return events

    events = asyncio.run(run())
    assert [ev["data"]["flagged"] for ev in events] == [False, True], "input passed, output flagged"


def test_output_check_reads_at_the_answers_last_token(guard):
    from langchain_ohd_guard.answers import AnswerCheck, AnswerRendering

    rendered = AnswerRendering(guard.tokenizer).apply_chat_template(
        [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat sat"}]], tokenize=False)
    assert rendered[0].endswith("assistant\nthe cat sat")
    check = AnswerCheck(guard)
    conv = [{"role": "user", "content": "tell me about cats"}]
    assert check.screen([*conv, {"role": "assistant", "content": "the zorblax is here"}]).flagged
    assert not check.screen([*conv, {"role": "assistant", "content": "the cats are here"}]).flagged


def test_calibrate_answers_fits_a_profile_the_output_check_uses(guard, tmp_path):
    import json

    from langchain_ohd_guard.answers import AnswerCheck, answer_items, calibrate_answers
    from ohd_guard.masking import HeadRef
    from ohd_guard.testing import with_trigger

    shipped_unsafe, shipped_safe = answer_items()
    assert len(shipped_unsafe) == 40 and len(shipped_safe) == 40
    answers = ["the cats sleep all day", "the dog is here now", "the bread is in the oven", "the light is on now"]
    rows = [{"prompt": "tell me", "answer": a, "label": "unsafe"} for a in with_trigger(answers)]
    rows += [{"prompt": "tell me", "answer": a, "label": "safe"} for a in answers]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = guard.model, guard.tokenizer
    profile = calibrate_answers(model, tok, path, detector="ohd", head=HeadRef(layer=1, head=2))
    check = AnswerCheck(guard, profile)
    assert check.screen([{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "a zorblax"}]).flagged


def _streamed(agent, mode: str, asynchronous: bool, text: str = "tell me about cats") -> list[Any]:
    """Everything ``agent`` streams in ``mode`` for one human turn (sync or async)."""
    state = {"messages": [("human", text)]}
    if not asynchronous:
        return list(agent.stream(state, stream_mode=mode))

    async def run():
        return [item async for item in agent.astream(state, stream_mode=mode)]

    return asyncio.run(run())


def _streamed_text(items: list[Any]) -> str:
    """The text of every message in streamed items (``messages``: (message, metadata); ``updates``
    and ``values``: dicts of state), concatenated: what a client that renders the stream has read."""
    out: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, BaseMessageT):
            out.append(str(x.content) + str(getattr(x, "additional_kwargs", "")))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "update"):  # a Command
            walk(getattr(x, "update"))

    walk(items)
    return "\n".join(out)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("mode", ["messages", "updates", "values"])
@pytest.mark.parametrize("exit_behavior", ["end", "replace"])
def test_output_check_holds_the_stream_until_the_answer_passed(guard, exit_behavior, mode, asynchronous):
    """Issue #23.1: with ``check_output=True`` no chunk of a flagged answer reaches any stream mode
    (the fake model streams it token by token, as LangGraph's ``messages`` mode sees a real one);
    the replacement does, and a safe answer still arrives whole."""
    flagged = make_agent(GenericFakeChatModel(messages=iter(["the zorblax is here now"])), guard, check_output=True,
                     exit_behavior=exit_behavior)
    items = _streamed(flagged, mode, asynchronous)
    text = _streamed_text(items)
    assert "zorblax" not in text, f"the flagged answer leaked into stream_mode={mode!r}"
    assert "answer was flagged" in text
    safe = make_agent(GenericFakeChatModel(messages=iter(["cats are nice pets"])), guard, check_output=True,
                  exit_behavior=exit_behavior)
    assert "cats are nice pets" in _streamed_text(_streamed(safe, mode, asynchronous)).replace("\n", "")
