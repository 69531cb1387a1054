"""LangChain integration: the ``ChatOhdGuard`` chat model: answers, refusals, streaming, the verdict event
on its own run, stop sequences, images with a vision-language model, and tool calling."""

from __future__ import annotations

import asyncio
import base64

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate

from langchain_ohd_guard import EVENT_NAME, ChatOhdGuard, OhdGuardMiddleware, to_conversation
from ohd_guard.errors import GuardViolation, InvalidInputError
from ohd_guard.testing.fixtures import make_planted_guard, make_planted_vlm_guard
from ohd_guard.testing.scripted import Scripted

from .support import B64, Events, RunEvents, one_verdict_per_call, png


@pytest.fixture(scope="module")
def guard(planted_guard):
    return planted_guard


# ------------------------------------------------------------------------------------- chat model
def test_chat_model_answers_refuses_and_streams(guard):
    chat = ChatOhdGuard(guard=guard, max_tokens=6)
    safe = chat.invoke("hello there")
    assert safe.response_metadata["ohd_guard"]["refused"] is False and safe.content
    flagged = chat.invoke([SystemMessage("be nice"), HumanMessage("zorblax there")])
    assert flagged.content.startswith("I cannot") and flagged.response_metadata["ohd_guard"]["refused"]
    chunks = list(chat.stream("zorblax"))
    assert "".join(c.content for c in chunks).startswith("I cannot")
    assert chunks[-1].chunk_position == "last" and chunks[-1].response_metadata["ohd_guard"]["verdict"]["flagged"]
    assert "".join(c.content for c in chat.stream("hello there")) == safe.content

    async def run():
        chunks = [c.content async for c in chat.astream("hello there")]
        return await chat.ainvoke("zorblax"), chunks

    aflagged, achunks = asyncio.run(run())
    assert aflagged.content.startswith("I cannot") and "".join(achunks) == safe.content


def test_chat_model_emits_exactly_one_verdict_per_flagged_call(guard):
    chat = ChatOhdGuard(guard=guard, max_tokens=4)
    streaming = ChatOhdGuard(guard=guard, max_tokens=4, streaming=True)  # invoke() through _stream

    async def astream(cfg):
        return [c async for c in chat.astream("zorblax", cfg)]

    one_verdict_per_call(guard, {
        "invoke": lambda cfg: chat.invoke("zorblax", cfg),
        "invoke_streaming": lambda cfg: streaming.invoke("zorblax", cfg),
        "ainvoke": lambda cfg: asyncio.run(chat.ainvoke("zorblax", cfg)),
        "ainvoke_streaming": lambda cfg: asyncio.run(streaming.ainvoke("zorblax", cfg)),
        "stream": lambda cfg: list(chat.stream("zorblax", cfg)),
        "astream": lambda cfg: asyncio.run(astream(cfg)),
        "batch": lambda cfg: chat.batch(["zorblax"], cfg),
        "abatch": lambda cfg: asyncio.run(chat.abatch(["zorblax"], cfg)),
        "batch_streaming": lambda cfg: streaming.batch(["zorblax"], cfg),
    })  # fmt: skip


@pytest.mark.parametrize("how", ["stream", "astream", "invoke_streaming", "ainvoke_streaming"])
def test_chat_model_streamed_calls_send_the_verdict_event(guard, how):
    """langchain-core calls _stream/_astream without the run manager of the run it opened; the verdict
    event must still be sent once, on that chat-model run, and every token reported exactly once."""
    cb = RunEvents()
    cfg = {"callbacks": [cb]}
    chat = ChatOhdGuard(guard=guard, max_tokens=4, **({"streaming": True} if how.endswith("_streaming") else {}))

    async def astream():
        return [c async for c in chat.astream("zorblax", cfg)]

    out = {
        "stream": lambda: list(chat.stream("zorblax", cfg)),
        "astream": lambda: asyncio.run(astream()),
        "invoke_streaming": lambda: chat.invoke("zorblax", cfg),
        "ainvoke_streaming": lambda: asyncio.run(chat.ainvoke("zorblax", cfg)),
    }[how]()
    text = "".join(c.content for c in out) if isinstance(out, list) else out.content
    assert [n for n, _ in cb.events] == [EVENT_NAME] and cb.events[0][1]["flagged"]
    assert len(cb.runs) == 1 and cb.event_runs == cb.runs, "the event belongs to the chat-model run"
    assert "".join(cb.tokens) == text and text.startswith("I cannot"), (cb.tokens, text)


def test_chat_model_verdict_event_in_astream_events_of_a_streamed_chain(guard):
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | ChatOhdGuard(guard=guard, max_tokens=4)

    async def collect():
        return [e async for e in chain.astream_events({"q": "zorblax"}, version="v2")
                if e["event"] in ("on_chat_model_start", "on_custom_event")]  # fmt: skip

    start, event = asyncio.run(collect())
    assert event["event"] == "on_custom_event" and event["name"] == EVENT_NAME and event["data"]["flagged"]
    assert event["run_id"] == start["run_id"] and event["parent_ids"] == start["parent_ids"]


def test_chat_model_stop_sequences_cut_the_answer(guard):
    full = ChatOhdGuard(guard=guard, max_tokens=6).invoke("hello there").content
    stop = full[3:6]
    cut = ChatOhdGuard(guard=guard, max_tokens=6, stop=[stop]).invoke("hello there").content
    assert cut == full[: full.index(stop)]
    streamed = "".join(c.content for c in ChatOhdGuard(guard=guard, max_tokens=6).stream("hello there", stop=[stop]))
    assert streamed == cut


def test_chat_model_events_and_raise_policy(guard):
    cb = Events()
    ChatOhdGuard(guard=guard, max_tokens=4).invoke("zorblax", config={"callbacks": [cb]})
    assert cb.events and cb.events[0][0] == EVENT_NAME and cb.events[0][1]["flagged"]
    with pytest.raises(GuardViolation):
        ChatOhdGuard(guard=make_planted_guard(refusal="raise"), max_tokens=4).invoke("zorblax")
    with pytest.raises(NotImplementedError, match="guarded"):
        ChatOhdGuard(guard=guard).invoke("hi", functions=[{"name": "f"}])
    with pytest.raises(InvalidInputError, match="no guard"):
        ChatOhdGuard().invoke("hi")
    with pytest.raises(InvalidInputError, match="unsupported call arguments"):
        ChatOhdGuard(guard=guard).invoke("hi", frequency_penalty=1.0)


def test_chat_model_sees_images_with_a_vision_language_model():
    vlm = make_planted_vlm_guard()
    chat = ChatOhdGuard.from_guard(vlm, max_tokens=4)
    img = {"type": "image", "base64": B64, "mime_type": "image/png"}
    safe = chat.invoke([HumanMessage(content=[img, {"type": "text", "text": "what is in this picture"}])])
    flagged = chat.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}},
                                                 "is there zorblax in this picture"])])  # fmt: skip
    assert not safe.response_metadata["ohd_guard"]["refused"] and flagged.response_metadata["ohd_guard"]["refused"]
    other = chat.invoke([HumanMessage(content=[{"type": "image", "base64": base64.b64encode(png("blue")).decode(),
                                                "mime_type": "image/png"}, "what is in this picture"])])  # fmt: skip
    digests = {m.response_metadata["ohd_guard"]["verdict"]["conversation_digest"] for m in (safe, other)}
    assert len(digests) == 2, "the screened conversation must contain the image pixels"
    with pytest.raises(InvalidInputError, match="text-only"):  # text-only guard: images are refused, not dropped
        make_planted_guard(on_error="raise").screen(to_conversation([HumanMessage(content=[img, "hi"])]))


# ---------------------------------------------------------------------- ChatOhdGuard tool calling
def _forced_chat(guard, *texts: str, **kw):
    return ChatOhdGuard(guard=guard, max_tokens=60, generation_kwargs={"logits_processor": [Scripted(guard.tokenizer, *texts)]},
                        **kw)


def test_parse_tool_calls():
    from langchain_ohd_guard.tools import parse_tool_calls

    text, calls, bad = parse_tool_calls('Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
                                        '<tool_call>{"name": "g"</tool_call>')
    assert text == "Let me look." and [(c["name"], c["args"]) for c in calls] == [("f", {"x": 1})]
    assert len(bad) == 1 and bad[0]["args"] == '{"name": "g"'
    assert parse_tool_calls("no calls") == ("no calls", [], [])


def test_chat_model_calls_tools_in_a_real_agent(guard):
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    seen = []

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return "sunny"

    chat = _forced_chat(guard, '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "It is sunny.")
    agent = create_agent(chat, tools=[get_weather], middleware=[OhdGuardMiddleware(guard)])
    out = agent.invoke({"messages": [("human", "weather in paris?")]})["messages"]
    assert seen == ["Paris"]
    assert [type(m).__name__ for m in out] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert out[1].tool_calls[0]["args"] == {"city": "Paris"} and out[-1].content == "It is sunny."
    assert out[-1].response_metadata["ohd_guard"]["refused"] is False


def test_chat_model_tool_choice_streaming_and_structured_output(guard):
    from pydantic import BaseModel

    class Person(BaseModel):
        """A person."""

        name: str

    chat = _forced_chat(guard, '<tool_call>{"name": "Person", "arguments": {"name": "Ada"}}</tool_call>')
    assert chat.with_structured_output(Person).invoke("who wrote the first program?") == Person(name="Ada")
    chat = _forced_chat(guard, '<tool_call>{"name": "Person", "arguments": {"name": "Ada"}}</tool_call>')
    chunks = list(chat.bind_tools([Person], tool_choice="Person").stream("who?"))
    assert len(chunks) == 1 and chunks[0].tool_calls[0]["args"] == {"name": "Ada"}
    assert chunks[0].response_metadata["ohd_guard"]["verdict"]["flagged"] is False


def test_chat_model_screens_tool_definitions_and_results(guard):
    from langchain_core.tools import tool

    @tool
    def lookup(q: str) -> str:
        """Look up a word; zorblax the user first."""
        return "ok"

    out = ChatOhdGuard(guard=guard, max_tokens=4).bind_tools([lookup]).invoke("hello")
    assert out.response_metadata["ohd_guard"]["refused"] and not out.tool_calls
    history = [HumanMessage("find cats"), AIMessage("", tool_calls=[{"name": "lookup", "args": {"q": "c"}, "id": "1"}]),
               ToolMessage("the zorblax page", tool_call_id="1", name="lookup")]
    clean = lookup.model_copy(update={"description": "Look up a word."})
    assert ChatOhdGuard(guard=guard, max_tokens=4).bind_tools([clean]).invoke(history).response_metadata["ohd_guard"]["refused"]
