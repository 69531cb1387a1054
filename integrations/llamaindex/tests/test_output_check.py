"""#25.5: ``check_output=True`` on both LlamaIndex LLMs runs the core's output check (the answer read at
its last token); a flagged answer is never returned, in any call or stream: the guard's refusal
replaces it, the output verdict next to the input one. The planted tiny Llama's head fires on
"zorblax": a clean question whose answer carries it is only caught by reading the answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
)
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.mock import MockFunctionCallingLLM

from llama_index.llms.ohd_guard import GuardedLLM, OhdGuardLLM
from ohd_guard.errors import GuardViolation
from ohd_guard.testing.fixtures import make_planted_guard
from ohd_guard.testing.scripted import Scripted

BAD, GOOD = "the zorblax is here", "the cats are here"
Q = [ChatMessage(role="user", content="tell me about cats")]


@pytest.fixture(scope="module")
def guard(planted_guard):
    return planted_guard


class Says(MockFunctionCallingLLM):
    """The wrapped LLM: chat and completion (LlamaIndex's mock echoes the prompt there) answer ``text``."""

    text: str = ""

    def __init__(self, text: str):
        super().__init__(response_generator=lambda messages, **k: ChatMessage(role="assistant", content=text),
                         is_chat_model=True, text=text)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kw: Any) -> CompletionResponse:
        return CompletionResponse(text=self.text)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kw: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            for i, word in enumerate(self.text.split(" ")):
                yield CompletionResponse(text=" ".join(self.text.split(" ")[: i + 1]), delta=(" " if i else "") + word)

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kw: Any) -> CompletionResponse:
        return self.complete(prompt)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kw: Any) -> CompletionResponseAsyncGen:
        async def gen() -> CompletionResponseAsyncGen:
            for r in self.stream_complete(prompt):
                yield r

        return gen()


def local(guard, text: str, max_new_tokens: int = 20, **kw: Any) -> OhdGuardLLM:
    return OhdGuardLLM(guard, max_new_tokens=max_new_tokens, check_output=True, refusal_max_new_tokens=4,
                       generate_kwargs={"logits_processor": [Scripted(guard.tokenizer, text)]}, **kw)


def remote(guard, text: str, **kw: Any) -> GuardedLLM:
    return GuardedLLM(Says(text), guard, check_output=True, refusal_max_new_tokens=4, **kw)


def every_call(llm) -> dict[str, list[str]]:
    """The texts each entry point returns (every piece of a stream)."""
    async def agen(make):
        return [r async for r in await make()]

    return {
        "chat": [llm.chat(Q).message.content],
        "stream_chat": [r.delta for r in llm.stream_chat(Q)],
        "complete": [llm.complete("tell me about cats").text],
        "stream_complete": [r.delta for r in llm.stream_complete("tell me about cats")],
        "achat": [asyncio.run(llm.achat(Q)).message.content],
        "astream_chat": [r.delta for r in asyncio.run(agen(lambda: llm.astream_chat(Q)))],
        "acomplete": [asyncio.run(llm.acomplete("tell me about cats")).text],
        "astream_complete": [r.delta for r in asyncio.run(agen(lambda: llm.astream_complete("tell me about cats")))],
    }


@pytest.mark.parametrize("make", [local, remote], ids=["OhdGuardLLM", "GuardedLLM"])
def test_a_flagged_answer_is_never_returned_by_any_call_or_stream(guard, make):
    out = every_call(make(guard, BAD))
    for name, texts in out.items():
        assert texts and not any("zorblax" in (t or "") for t in texts), (name, texts)
        assert (texts[0] or "").startswith("I cannot"), (name, texts)
    resp = make(guard, BAD).chat(Q)
    meta = resp.additional_kwargs["ohd_guard"]
    assert meta["refused"] and meta["output_verdict"]["flagged"] and meta["output_verdict"]["details"]["stage"] == "output"
    assert meta["verdict"]["flagged"] is False, "the input verdict (it passed) stays next to the output one"


@pytest.mark.parametrize("make", [local, remote], ids=["OhdGuardLLM", "GuardedLLM"])
def test_a_safe_answer_is_returned_with_its_output_verdict(guard, make):
    out = every_call(make(guard, GOOD))
    for name, texts in out.items():
        assert "".join(t or "" for t in texts) == GOOD, (name, texts)
    meta = make(guard, GOOD).chat(Q).additional_kwargs["ohd_guard"]
    assert meta["refused"] is False and meta["output_verdict"]["flagged"] is False


def test_without_check_output_the_answer_is_not_read(guard):
    llm = OhdGuardLLM(guard, max_new_tokens=20, generate_kwargs={"logits_processor": [Scripted(guard.tokenizer, BAD)]})
    assert llm.chat(Q).message.content == BAD
    assert GuardedLLM(Says(BAD), guard).chat(Q).message.content == BAD
    assert GuardedLLM(Says(BAD), guard).complete("tell me about cats").text == BAD


def test_under_refusal_raise_a_flagged_answer_raises():
    guard = make_planted_guard(refusal="raise")
    with pytest.raises(GuardViolation) as e:
        local(guard, BAD).chat(Q)
    assert e.value.verdict.details["stage"] == "output"
    with pytest.raises(GuardViolation):
        remote(guard, BAD).chat(Q)


def test_a_flagged_tool_call_is_not_returned(guard):
    """The output check reads the calls too: a call whose arguments carry the trigger is refused."""
    from llama_index.core.tools import FunctionTool

    def search(q: str) -> str:
        """Search the web."""
        return "ok"

    call = '{"name": "search", "arguments": {"q": "zorblax"}}'
    llm = local(guard, call, max_new_tokens=60)
    resp = llm.chat_with_tools([FunctionTool.from_defaults(search)], user_msg="search cats")
    assert resp.additional_kwargs["ohd_guard"]["refused"] and llm.get_tool_calls_from_response(resp, False) == []


def test_a_flagged_call_of_the_wrapped_llm_is_not_returned_nor_run(guard):
    """GuardedLLM(check_output=True) reads the wrapped LLM's tool call too: a call whose arguments carry
    the trigger is replaced by the refusal, so a FunctionAgent never runs it."""
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.base.llms.types import ToolCallBlock
    from llama_index.core.tools import FunctionTool

    ran: list = []

    def search(q: str) -> str:
        """Search the web."""
        ran.append(q)
        return "ok"

    def gen(messages, **kw):
        return ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="c1", tool_name="search",
                                                                   tool_kwargs={"q": "zorblax"})])

    llm = GuardedLLM(MockFunctionCallingLLM(response_generator=gen, is_chat_model=True), guard, check_output=True,
                     refusal_max_new_tokens=4)

    async def run():
        return await FunctionAgent(tools=[FunctionTool.from_defaults(search)], llm=llm).run("search cats")

    out = asyncio.run(run())
    assert ran == [] and out.tool_calls == [] and out.response.content.startswith("I cannot")
