"""LangChain integration: the screening Runnable (verdicts, batching, custom events) and ``guarded()``
chains (safe input passes unchanged, flagged input is refused without reaching the chain, one verdict
per call, what is forwarded is what is screened)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_ohd_guard import EVENT_NAME, GuardedRunnable, OhdGuardRunnable, guarded
from ohd_guard.errors import GuardViolation, InvalidInputError
from ohd_guard.testing.fixtures import make_planted_guard

from .support import Events, make_agent, one_verdict_per_call, reasoning_message, spy


@pytest.fixture(scope="module")
def guard(planted_guard):
    return planted_guard


# --------------------------------------------------------------------------------- screening runnable
def test_runnable_returns_verdicts_for_every_input_shape(guard):
    from ohd_guard.guard import Verdict

    r = OhdGuardRunnable(guard)
    prompt = ChatPromptTemplate.from_messages([("human", "{q}")])
    inputs = ["hello there friend", prompt.invoke({"q": "the zorblax"}), [HumanMessage("a cat")],
              {"messages": [HumanMessage("zorblax now")]}]  # fmt: skip
    verdicts = [r.invoke(x) for x in inputs]
    assert all(isinstance(v, Verdict) for v in verdicts)
    assert [v.flagged for v in verdicts] == [False, True, False, True]
    assert [list(r.stream(x))[0].flagged for x in inputs[:2]] == [False, True]


def test_runnable_batch_shares_one_prefill_and_abatch_micro_batches(guard):
    r = OhdGuardRunnable(guard)
    before = guard.stats.batches
    assert [v.flagged for v in r.batch(["a cat", "the zorblax", "hello"])] == [False, True, False]
    assert guard.stats.batches == before + 1
    assert [v.flagged for v in asyncio.run(r.abatch(["a cat", "the zorblax", "hello"]))] == [False, True, False]


def test_verdicts_are_custom_events_in_callbacks_and_astream_events(guard):
    r = OhdGuardRunnable(guard)
    cb = Events()
    r.invoke("the zorblax", config={"callbacks": [cb]})
    assert cb.events[0][0] == EVENT_NAME and cb.events[0][1]["flagged"] is True

    async def collect():
        return [e async for e in r.astream_events("a cat", version="v2") if e["event"] == "on_custom_event"]

    events = asyncio.run(collect())
    assert len(events) == 1 and events[0]["name"] == EVENT_NAME and events[0]["data"]["flagged"] is False


# -------------------------------------------------------------------------------------- guarded()
def test_guarded_chat_chain_passes_safe_input_unchanged_and_refuses_flagged(guard):
    answerer = spy("safe answer")
    chain = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "{q}")]) | answerer
    g = guarded(chain, guard)
    assert isinstance(g, GuardedRunnable)
    out = g.invoke({"q": "tell me about cats"})
    assert isinstance(out, AIMessage) and out.content == "safe answer" and answerer.calls == 1
    out = g.invoke({"q": "tell me about zorblax"})
    assert isinstance(out, AIMessage) and answerer.calls == 1, "a flagged input must never reach the chain"
    meta = out.response_metadata["ohd_guard"]
    assert meta["refused"] and meta["refusal_kind"] == "anchored" and meta["verdict"]["flagged"]
    assert out.content.startswith("I cannot")


def test_guarded_string_chain_refuses_with_a_string_and_streams(guard):
    answerer = spy("safe answer")
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | answerer | StrOutputParser()
    g = guarded(chain, guard, refusal_max_new_tokens=6)
    assert g.invoke({"q": "cats"}) == "safe answer"
    refusal = g.invoke({"q": "zorblax"})
    assert isinstance(refusal, str) and refusal.startswith("I cannot")
    assert "".join(g.stream({"q": "cats"})) == "safe answer"
    assert "".join(g.stream({"q": "zorblax"})).startswith("I cannot")

    async def run():
        chunks = [c async for c in g.astream({"q": "zorblax"})]
        return await g.ainvoke({"q": "cats"}), chunks

    safe, chunks = asyncio.run(run())
    assert safe == "safe answer" and "".join(chunks).startswith("I cannot")
    assert answerer.calls == 3


def test_guarded_chat_model_and_raise_policy(guard):
    answerer = spy("hi")
    g = guarded(answerer, guard, on_flag="raise")
    assert g.invoke([HumanMessage("hello")]).content == "hi"
    with pytest.raises(GuardViolation) as e:
        g.invoke([HumanMessage("zorblax")])
    assert e.value.verdict.flagged and answerer.calls == 1
    with pytest.raises(GuardViolation):
        asyncio.run(g.ainvoke("zorblax"))
    in_a_pipeline = ChatPromptTemplate.from_messages([("human", "{q}")]) | guarded(answerer, guard)
    assert in_a_pipeline.invoke({"q": "zorblax"}).content.startswith("I cannot") and answerer.calls == 1
    chunks = list(guarded(answerer, guard).stream("zorblax"))
    assert len(chunks) == 1 and isinstance(chunks[0], AIMessageChunk) and chunks[0].chunk_position == "last"


def test_guarded_dict_input_needs_a_prompt_or_input_key(guard):
    from langchain_core.runnables import RunnableLambda

    echo = RunnableLambda(lambda d: f"answered {d['question']}")
    with pytest.raises(InvalidInputError, match="input_key"):
        guarded(echo, guard).invoke({"question": "cats"})
    g = guarded(echo, guard, input_key="question", output="str")
    assert g.invoke({"question": "cats"}) == "answered cats"
    assert g.invoke({"question": "zorblax"}).startswith("I cannot")


def test_guarded_uses_the_guards_static_refusal_policy():
    g = guarded(spy("x"), make_planted_guard(refusal="static"))
    out = g.invoke("zorblax")
    assert out.content == "I cannot help with that request."
    assert out.response_metadata["ohd_guard"]["refusal_kind"] == "static"


def test_guarded_emits_the_verdict_event(guard):
    cb = Events()
    guarded(spy("x"), guard).invoke("zorblax", config={"callbacks": [cb]})
    assert [name for name, _ in cb.events] == [EVENT_NAME]


def test_guarded_emits_exactly_one_verdict_per_flagged_call(guard):
    """The refusal is written from the verdict (OhdGuard.refuse / arefuse), never by screening again."""
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | spy("x") | StrOutputParser()
    g = guarded(chain, guard, refusal_max_new_tokens=4)
    q = {"q": "tell me about zorblax"}

    async def astream(cfg):
        return [c async for c in g.astream(q, cfg)]

    one_verdict_per_call(guard, {
        "invoke": lambda cfg: g.invoke(q, cfg),
        "stream": lambda cfg: list(g.stream(q, cfg)),
        "ainvoke": lambda cfg: asyncio.run(g.ainvoke(q, cfg)),
        "astream": lambda cfg: asyncio.run(astream(cfg)),
    })  # fmt: skip


@pytest.mark.parametrize("where", ["reasoning", "name"])
def test_guarded_screens_what_it_forwards_reasoning_and_names(guard, where):
    """#23.8: a trigger only in an AIMessage reasoning block or only in ``HumanMessage(name=...)`` was
    not screened, and the chain's model (which gets the messages as they are: providers send both
    on) received it. Both are screened now; a clean name or reasoning passes."""
    def turns(word: str) -> list[Any]:
        if where == "name":
            return [HumanMessage("tell me about cats please", name=word)]
        return [HumanMessage("hi"), reasoning_message(f"the {word} plan"), HumanMessage("tell me about cats please")]

    answerer = spy("cats are nice")
    g = guarded(answerer, guard, refusal_max_new_tokens=4)
    out = g.invoke(turns("zorblax"))
    assert answerer.calls == 0 and out.response_metadata["ohd_guard"]["refused"], "forwarded unscreened"
    assert OhdGuardRunnable(guard).invoke(turns("zorblax")).flagged
    assert g.invoke(turns("alice")).content == "cats are nice" and answerer.calls == 1
    agent = make_agent(spy("hi"), guard)  # the middleware screens through the same converter
    assert agent.invoke({"messages": turns("zorblax")})["messages"][-1].response_metadata["ohd_guard"]["refused"]


# ------------------------------------------------------------- verdicts on every response (safe too)
def test_safe_responses_carry_their_verdict(guard):
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | spy("fine")
    out = guarded(chain, guard).invoke({"q": "tell me about cats"})
    assert out.response_metadata["ohd_guard"]["refused"] is False
    assert out.response_metadata["ohd_guard"]["verdict"]["flagged"] is False
    chunks = list(guarded(spy("two words"), guard).stream("cats"))
    assert "ohd_guard" not in chunks[0].response_metadata and len(chunks) > 1
    assert chunks[-1].response_metadata["ohd_guard"]["verdict"]["flagged"] is False
    agent_out = make_agent(spy("hi there"), guard).invoke({"messages": [("human", "hello")]})["messages"][-1]
    assert agent_out.content == "hi there" and agent_out.response_metadata["ohd_guard"]["input_verdict"]["flagged"] is False
