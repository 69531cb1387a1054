"""OhdGuardMiddleware ``exit_behavior="replace"`` on the input: the replacement is one the guard passes,
and the flagged turn is replaced in the agent state, so a checkpointed thread goes on."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage

from langchain_ohd_guard import OhdGuardMiddleware
from langchain_ohd_guard.middleware import INPUT_REPLACEMENTS


@pytest.fixture(scope="module")
def guard(planted_guard):
    return planted_guard


class Seen(GenericFakeChatModel):
    """Answers in turn and keeps what each call was given."""

    seen: list = []

    def _generate(self, messages, stop=None, run_manager=None, **kw):
        self.seen.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kw)


def _agent(guard, answerer, **kw):
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    mw = OhdGuardMiddleware(guard, exit_behavior="replace", refusal_max_new_tokens=4, **kw)
    return create_agent(answerer, tools=[], middleware=[mw], checkpointer=InMemorySaver())


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_checkpointed_thread_goes_on_after_a_replaced_turn(guard, asynchronous):
    answerer = Seen(messages=iter([AIMessage("first answer"), AIMessage("cats purr")]), seen=[])
    agent, cfg = _agent(guard, answerer), {"configurable": {"thread_id": "t1"}}

    def invoke(text):
        if asynchronous:
            return asyncio.run(agent.ainvoke({"messages": [("human", text)]}, cfg))
        return agent.invoke({"messages": [("human", text)]}, cfg)

    first = invoke("zorblax now")["messages"]
    assert first[-1].content == "first answer"
    humans = [m for m in first if isinstance(m, HumanMessage)]
    assert [m.content for m in humans] == [INPUT_REPLACEMENTS[0]], "the flagged turn is replaced in the state"
    assert humans[0].response_metadata["ohd_guard"]["replaced"] is True
    second = invoke("tell me about cats")["messages"]
    assert second[-1].content == "cats purr"
    assert second[-1].response_metadata["ohd_guard"]["input_verdict"]["flagged"] is False
    assert not any("zorblax" in str(m.content) for m in second)
    assert not any("zorblax" in str(m.content) for call in answerer.seen for m in call)


def test_a_replacement_the_guard_flags_is_not_used(guard):
    answerer = Seen(messages=iter([AIMessage("answered")]), seen=[])
    agent = _agent(guard, answerer, violation_message="zorblax was removed")  # flagged itself when re-screened
    out = agent.invoke({"messages": [("human", "zorblax now")]}, {"configurable": {"thread_id": "t2"}})["messages"]
    assert out[-1].content == "answered"
    assert [m.content for m in out if isinstance(m, HumanMessage)] == [INPUT_REPLACEMENTS[0]]
    assert answerer.seen[0][-1].content == INPUT_REPLACEMENTS[0]


def test_a_given_replacement_the_guard_passes_is_used(guard):
    answerer = Seen(messages=iter([AIMessage("answered")]), seen=[])
    agent = _agent(guard, answerer, violation_message="[removed: {stage}]")
    out = agent.invoke({"messages": [("human", "zorblax now")]}, {"configurable": {"thread_id": "t3"}})["messages"]
    assert [m.content for m in out if isinstance(m, HumanMessage)] == ["[removed: request]"]
