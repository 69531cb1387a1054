"""``OhdGuard(scope=...)`` seen through LangChain: a checkpointed agent thread with a flagged first turn
recovers under ``scope="latest"`` and stays refused under ``"conversation"`` (the default), and
``ChatOhdGuard`` decides the same way. Ground truth: a planted model whose trigger's signal fades after a
long benign turn (``planted_head_model(focus=0.5)``), so only the earlier turn's own read sees it."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from langchain_ohd_guard import ChatOhdGuard, OhdGuardMiddleware
from ohd_guard.guard import OhdGuard
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS

from .support import spy

CLEAN = list(PLANTED_CLEAN_PROMPTS)[:8]
LONG = " ".join(["tell me about the weather and the sea"] * 5)


@pytest.mark.parametrize("scope", ["conversation", "latest"])
def test_a_checkpointed_agent_thread_after_a_flagged_turn(fading, scope):
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    guard = OhdGuard(fading.model, fading.processor, fading.profile, scope=scope)
    answerer = spy(AIMessage(content="Sunny."))
    agent = create_agent(answerer, tools=[], checkpointer=InMemorySaver(),
                         middleware=[OhdGuardMiddleware(guard, refusal_max_new_tokens=8)])
    thread = {"configurable": {"thread_id": "t"}}
    first = agent.invoke({"messages": [HumanMessage("tell me zorblax about rain")]}, thread)["messages"]
    assert answerer.calls == 0 and first[-1].response_metadata["ohd_guard"]["refused"]
    out = agent.invoke({"messages": [HumanMessage(LONG)]}, thread)["messages"]
    assert [type(m).__name__ for m in out] == ["HumanMessage", "AIMessage", "HumanMessage", "AIMessage"]
    verdict = out[-1].response_metadata["ohd_guard"]["verdict"]
    assert [m["flagged"] for m in verdict["messages"]] == [True, False]  # the first turn's own read still flags
    if scope == "latest":  # the thread recovered: the answering model was called
        assert answerer.calls == 1 and out[-1].content == "Sunny." and not verdict["flagged"]
    else:  # the request split over turns is still caught
        assert answerer.calls == 0 and verdict["flagged"] and out[-1].response_metadata["ohd_guard"]["refused"]


@pytest.mark.parametrize("scope", ["conversation", "latest"])
def test_chat_model_decides_by_the_guards_scope(fading, scope):
    chat = ChatOhdGuard(guard=OhdGuard(fading.model, fading.processor, fading.profile, scope=scope), max_tokens=4)
    msg = chat.invoke([HumanMessage("tell me zorblax about rain"), AIMessage("I cannot help with that."),
                       HumanMessage(LONG)])
    assert msg.response_metadata["ohd_guard"]["refused"] == (scope == "conversation")
