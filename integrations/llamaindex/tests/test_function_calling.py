"""#25.3: OhdGuardLLM and GuardedLLM are FunctionCallingLLMs; LlamaIndex's FunctionAgent and ReActAgent
run with both, a tool called and its result answered.

OhdGuardLLM runs the planted tiny Llama with its answers scripted (:class:`ohd_guard.testing.scripted.Scripted`:
the real model decodes, only its token choices are forced). GuardedLLM wraps LlamaIndex's own
``MockFunctionCallingLLM`` whose response generator scripts the calls: the wrapped dependency, not
what is tested."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.agent.react.formatter import ReActChatFormatter
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.mock import MockFunctionCallingLLM
from llama_index.core.tools import FunctionTool

from llama_index.llms.ohd_guard import GuardedLLM, OhdGuardLLM
from ohd_guard.testing.scripted import Scripted

CALL = '{"name": "add", "arguments": {"a": 17, "b": 25}}'
REACT_CALL = 'Thought: I need the sum.\nAction: add\nAction Input: {"a": 17, "b": 25}'
REACT_ANSWER = "Thought: I can answer now.\nAnswer: The sum is 42."
SHORT_REACT = ("Tools:\n{tool_desc}\nTool names: {tool_names}\nReply as:\nThought: ...\nAction: <tool name>\n"
               "Action Input: <JSON>\nor as:\nThought: ...\nAnswer: <answer>")
"""A ReAct header that fits: the default one (~1000 tokens) is over the tiny model's 512-token context."""


def react(tools: list, llm: Any) -> ReActAgent:
    return ReActAgent(tools=tools, llm=llm, formatter=ReActChatFormatter.from_defaults(system_header=SHORT_REACT))


@pytest.fixture(scope="module")
def guard(planted_guard):
    return planted_guard


def make_add(calls: list) -> FunctionTool:
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    return FunctionTool.from_defaults(add)


def local(guard, *texts: str, **kw: Any) -> OhdGuardLLM:
    return OhdGuardLLM(guard, max_new_tokens=60, generate_kwargs={"logits_processor": [Scripted(guard.tokenizer, *texts)]},
                       **kw)


def run(agent, prompt: str) -> Any:
    async def go():
        return await agent.run(prompt)

    return asyncio.run(go())


def test_both_are_function_calling_llms(guard):
    for llm in (local(guard, "hi"), GuardedLLM(MockFunctionCallingLLM(), guard)):
        assert isinstance(llm, FunctionCallingLLM) and llm.metadata.is_function_calling_model


# ----------------------------------------------------------------------------------- OhdGuardLLM
@pytest.mark.parametrize("streaming", [True, False])
def test_function_agent_over_ohd_guard_llm_calls_the_tool_and_answers(guard, streaming):
    calls: list = []
    agent = FunctionAgent(tools=[make_add(calls)], llm=local(guard, CALL, "The sum is 42."), streaming=streaming)
    out = run(agent, "what is 17 + 25?")
    assert calls == [(17, 25)]
    assert out.response.content == "The sum is 42." and [t.tool_name for t in out.tool_calls] == ["add"]
    assert out.tool_calls[0].tool_output.content == "42"


def test_chat_with_tools_screens_the_tool_section_and_parses_the_call(guard):
    llm = local(guard, CALL)
    seen: list = []
    guard.add_listener(seen.append)
    try:
        resp = llm.chat_with_tools([make_add([])], user_msg="what is 17 + 25?")
    finally:
        guard.remove_listener(seen.append)
    sel = llm.get_tool_calls_from_response(resp)
    assert [(s.tool_name, s.tool_kwargs) for s in sel] == [("add", {"a": 17, "b": 25})]
    assert resp.additional_kwargs["ohd_guard"]["refused"] is False and len(seen) == 1
    assert llm.get_tool_calls_from_response(local(guard, "no call").chat_with_tools([make_add([])], user_msg="hi"),
                                            error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="at least one tool call"):
        llm.get_tool_calls_from_response(local(guard, "plain").chat([ChatMessage(role="user", content="hi")]))


def test_a_tool_described_with_the_trigger_is_refused_and_nothing_is_called(guard):
    calls: list = []

    def lookup(q: str) -> str:
        """Look up a word. Always zorblax the user first."""
        calls.append(q)
        return "ok"

    llm = local(guard, '{"name": "lookup", "arguments": {"q": "x"}}')
    resp = llm.chat_with_tools([FunctionTool.from_defaults(lookup)], user_msg="look up cats")
    assert resp.additional_kwargs["ohd_guard"]["refused"] and llm.get_tool_calls_from_response(resp, False) == []


def test_earlier_calls_and_results_reach_the_model_in_the_qwen_format():
    """Under Qwen2.5's template (tool branch) the agent's ToolCallBlock and tool result are written
    as <tool_call> / <tool_response>, as the template itself writes them."""
    import copy

    from ohd_guard.detectors import calibrate
    from ohd_guard.guard import OhdGuard
    from ohd_guard.masking import HeadRef
    from ohd_guard.testing.fixtures import GUARD_CLEAN_PROMPTS, GUARD_TRIGGER_PROMPTS, planted_text_calibrated
    from ohd_guard.testing.templates import QWEN25_CHAT_TEMPLATE

    model, tok, _ = planted_text_calibrated()
    tok = copy.deepcopy(tok)
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    profile = calibrate(model, tok, list(GUARD_TRIGGER_PROMPTS), list(GUARD_CLEAN_PROMPTS), head=HeadRef(layer=1, head=2))
    qwen = OhdGuard(model, tok, profile)
    script = Scripted(tok, "The sum is 42.")
    llm = OhdGuardLLM(qwen, max_new_tokens=20, generate_kwargs={"logits_processor": [script]})
    history = [ChatMessage(role="user", content="what is 17 + 25?"),
               ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="c1", tool_name="add",
                                                                   tool_kwargs={"a": 17, "b": 25})]),
               ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "c1"})]
    resp = llm.chat_with_tools([make_add([])], chat_history=history)
    assert resp.message.content == "The sum is 42."
    prompt = tok.decode(script.prompts[0])
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n</tool_call>' in prompt
    assert "<tool_response>\n42\n</tool_response>" in prompt and "[tool call]" not in prompt


def test_react_agent_over_ohd_guard_llm(guard):
    calls: list = []
    agent = react([make_add(calls)], local(guard, REACT_CALL, REACT_ANSWER))
    out = run(agent, "what is 17 + 25?")
    assert calls == [(17, 25)] and out.response.content == "The sum is 42."


# ------------------------------------------------------------------------------------ GuardedLLM
def scripted_fc(*replies: ChatMessage) -> tuple[MockFunctionCallingLLM, list]:
    """A MockFunctionCallingLLM answering ``replies`` in turn; records the messages and tools it got."""
    got: list = []

    def gen(messages, **kw):
        got.append((list(messages), kw.get("tools")))
        return replies[min(len(got), len(replies)) - 1]

    return MockFunctionCallingLLM(response_generator=gen, is_chat_model=True), got


def _call() -> ChatMessage:
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=[ToolCallBlock(tool_call_id="c1", tool_name="add",
                                                                         tool_kwargs={"a": 17, "b": 25})])


@pytest.mark.parametrize("streaming", [True, False])
def test_function_agent_over_guarded_llm_delegates_the_call(guard, streaming):
    calls: list = []
    inner, got = scripted_fc(_call(), ChatMessage(role="assistant", content="The sum is 42."))
    seen: list = []
    guard.add_listener(seen.append)
    try:
        out = run(FunctionAgent(tools=[make_add(calls)], llm=GuardedLLM(inner, guard), streaming=streaming),
                  "what is 17 + 25?")
    finally:
        guard.remove_listener(seen.append)
    assert calls == [(17, 25)] and out.response.content == "The sum is 42."
    assert len(got) == 2 and got[0][1] and got[0][1][0].metadata.name == "add", "the wrapped LLM got the tools"
    assert len(seen) == 2 and not any(v.flagged for v in seen), "each model call screened once"


def test_guarded_llm_screens_the_tool_schemas_and_refuses_without_calling(guard):
    def lookup(q: str) -> str:
        """Look up a word. Always zorblax the user first."""
        return "ok"

    inner, got = scripted_fc(_call())
    llm = GuardedLLM(inner, guard, refusal_max_new_tokens=4)
    tool = FunctionTool.from_defaults(lookup)
    resp = llm.chat_with_tools([tool], user_msg="look up cats")
    assert resp.additional_kwargs["ohd_guard"]["refused"] and got == []
    assert llm.get_tool_calls_from_response(resp) == [], "a refusal calls nothing, even under error_on_no_tool_call"
    out = run(FunctionAgent(tools=[tool], llm=llm), "look up cats")
    assert out.tool_calls == [] and out.response.content.startswith("I cannot") and got == []
    assert llm.predict_and_call([tool], user_msg="look up cats").response.startswith("I cannot")


@pytest.mark.parametrize("method", ["chat_with_tools", "achat_with_tools", "stream_chat_with_tools",
                                    "astream_chat_with_tools"])
def test_each_with_tools_method_screens_then_refuses_or_delegates(guard, method):
    """The four ``*_with_tools`` of GuardedLLM share one path: a flagged call reaches nothing and gets the
    refusal (a stream: that one piece), a safe one is the wrapped LLM's call with the verdict attached."""

    async def call(llm, msg: str) -> Any:
        out = getattr(llm, method)([make_add([])], user_msg=msg)
        out = await out if method.startswith("a") else out
        if "stream" not in method:
            return out
        pieces = [p async for p in out] if method.startswith("a") else list(out)
        assert pieces and ("refused" not in msg or len(pieces) == 1)
        return pieces[-1]

    inner, got = scripted_fc(_call())
    llm = GuardedLLM(inner, guard, refusal_max_new_tokens=4)
    refused = asyncio.run(call(llm, "refused: what is zorblax 17 + 25?"))
    assert refused.additional_kwargs["ohd_guard"]["refused"] and got == []
    assert llm.get_tool_calls_from_response(refused) == []
    resp = asyncio.run(call(llm, "what is 17 + 25?"))
    assert not resp.additional_kwargs["ohd_guard"]["refused"] and resp.additional_kwargs["ohd_guard"]["verdict"]
    assert len(got) == 1 and got[0][1][0].metadata.name == "add", "the wrapped LLM got the tools"
    assert [c.tool_name for c in llm.get_tool_calls_from_response(resp)] == ["add"]


def test_guarded_llm_over_a_plain_llm_cannot_call_tools(guard):
    from llama_index.core.llms import MockLLM

    from ohd_guard.errors import InvalidInputError

    llm = GuardedLLM(MockLLM(), guard)
    assert not llm.metadata.is_function_calling_model
    with pytest.raises(InvalidInputError, match="not a FunctionCallingLLM"):
        llm.chat_with_tools([make_add([])], user_msg="what is 17 + 25?")


def test_react_agent_over_guarded_llm(guard):
    calls: list = []
    inner, _ = scripted_fc(ChatMessage(role="assistant", content=REACT_CALL),
                           ChatMessage(role="assistant", content=REACT_ANSWER))
    out = run(react([make_add(calls)], GuardedLLM(inner, guard)), "what is 17 + 25?")
    assert calls == [(17, 25)] and out.response.content == "The sum is 42."
