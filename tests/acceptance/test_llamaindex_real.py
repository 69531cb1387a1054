"""LlamaIndex function calling and the output check on the real embedded model (greedy, shipped
default and answer profiles): what the scripted tiny-model tests cannot show, that the model's own
call becomes a ToolSelection and a FunctionAgent runs the tool. Measured 2026-12-04 on
Qwen2.5-Coder-0.5B-Instruct: the model calls add(17, 25), the agent runs it (42), and the next turn,
which holds the tool result, is refused by the input screen: the shipped detector's known false
positive in tool contexts (docs/langchain.md, docs/results.md), not a failure of the integration."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.llms.ohd_guard")

pytestmark = pytest.mark.slow


def test_function_agent_over_ohd_guard_llm_calls_the_models_own_tool_call(real_model):
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    from llama_index.llms.ohd_guard import OhdGuardLLM
    from ohd_guard.detectors import load_profile
    from ohd_guard.guard import OhdGuard
    from ohd_guard.shipped import answer_profile, default_profile

    model, tok = real_model
    guard = OhdGuard(model, tok, load_profile(default_profile()))
    calls: list = []

    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((int(a), int(b)))  # the model writes the numbers as ints or as strings
        return int(a) + int(b)

    tool = FunctionTool.from_defaults(add)
    llm = OhdGuardLLM(guard, max_new_tokens=64, check_output=True)
    assert llm._output.check.profile == load_profile(answer_profile()), "the shipped answer profile, by fingerprint"
    r = llm.chat_with_tools([tool], user_msg="Use the add tool: what is 17 + 25?")
    sel = llm.get_tool_calls_from_response(r)
    assert [(s.tool_name, {k: int(v) for k, v in s.tool_kwargs.items()}) for s in sel] == [("add", {"a": 17, "b": 25})], \
        r.raw.text
    assert r.additional_kwargs["ohd_guard"]["output_verdict"]["flagged"] is False, "the model's own call passes"

    async def run_agent():
        return await FunctionAgent(tools=[tool], llm=llm).run("Use the add tool: what is 17 + 25?")

    verdicts: list = []
    guard.add_listener(verdicts.append)
    try:
        out = asyncio.run(run_agent())
    finally:
        guard.remove_listener(verdicts.append)
    assert calls == [(17, 25)]
    # the answer after the tool result: 42, or (today) the refusal of the flagged tool-result turn
    answered = "42" in (out.response.content or "")
    assert answered or (out.response.content.startswith("I cannot") and verdicts[-1].flagged), out.response.content
