"""ChatOhdGuard's tool calling and structured output on the planted tiny model, its answers scripted
(:class:`ohd_guard.testing.scripted.Scripted`): calls in the forms real models emit, earlier calls and
results in the chat template's own tool format, ``with_structured_output`` for every method."""

from __future__ import annotations

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.tools import tool
from pydantic import BaseModel
from typing_extensions import TypedDict

from langchain_ohd_guard import ChatOhdGuard
from ohd_guard.testing.scripted import Scripted


@pytest.fixture(scope="module")
def guard(planted_guard):
    return planted_guard


def scripted(guard, *texts: str, **kw) -> ChatOhdGuard:
    return ChatOhdGuard(guard=guard, max_tokens=80,
                        generation_kwargs={"logits_processor": [Scripted(guard.tokenizer, *texts)]}, **kw)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.mark.parametrize("answer", [
    '{"name": "add", "arguments": {"a": 17, "b": 25}}',
    '```json\n{"name": "add", "parameters": {"a": 17, "b": 25}}\n```',
    '[{"name": "add", "arguments": {"a": 17, "b": 25}}]',
])
def test_bound_tools_are_called_in_every_form(guard, answer):
    out = scripted(guard, answer).bind_tools([add]).invoke("what is 17 + 25?")
    assert [(c["name"], c["args"]) for c in out.tool_calls] == [("add", {"a": 17, "b": 25})]
    assert out.content == "" and out.response_metadata["ohd_guard"]["refused"] is False


def test_json_naming_an_unbound_tool_stays_text(guard):
    answer = '{"name": "delete_all", "arguments": {}}'
    out = scripted(guard, answer).bind_tools([add]).invoke("what is 17 + 25?")
    assert out.tool_calls == [] and out.content == answer
    assert scripted(guard, answer).invoke("hi").content == answer  # no tools bound: nothing is parsed


# ------------------------------------------------------------ earlier calls in the template's own format
@pytest.fixture(scope="module")
def qwen_guard():
    """The planted head over a copy of its tokenizer that carries Qwen2.5's chat template (tool
    branch), calibrated on that template (a profile is bound to the template it was fitted on)."""
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
    return OhdGuard(model, tok, profile)


def _history(result: str):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    return [HumanMessage("what is 17 + 25?"),
            AIMessage("", tool_calls=[{"name": "add", "args": {"a": 17, "b": 25}, "id": "c1"}]),
            ToolMessage(result, tool_call_id="c1", name="add")]


def test_calls_and_results_are_shown_in_the_templates_tool_format(qwen_guard):
    chat = scripted(qwen_guard, "The sum is 42.")
    out = chat.invoke(_history("42"))
    assert out.content == "The sum is 42." and out.response_metadata["ohd_guard"]["refused"] is False
    tok = qwen_guard.tokenizer
    native = [{"role": "user", "content": "what is 17 + 25?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "add", "arguments": {"a": 17, "b": 25}}}]},
              {"role": "tool", "content": "42"}]
    want = tok.apply_chat_template(native, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    prompt = chat.generation_kwargs["logits_processor"][0].prompts[0]
    assert prompt[-len(want):] == list(want), tok.decode(prompt)  # the model answered from the template's rendering
    assert "<tool_response>\n42\n</tool_response>" in tok.decode(prompt) and "[tool" not in tok.decode(prompt)


def test_a_flagged_tool_result_is_screened_in_the_same_rendering(qwen_guard):
    out = scripted(qwen_guard, "never said").invoke(_history("the zorblax page"))
    assert out.response_metadata["ohd_guard"]["refused"] and out.content != "never said"


def test_templates_without_a_tool_branch_keep_the_text_format(guard):
    chat = scripted(guard, "The sum is 42.")
    chat.invoke(_history("42"))
    prompt = guard.tokenizer.decode(chat.generation_kwargs["logits_processor"][0].prompts[0])
    assert "[tool call] add(" in prompt and "[tool result: add] 42" in prompt and "<tool_response>" not in prompt


# ---------------------------------------------------------------------------- with_structured_output
class Person(BaseModel):
    """A person."""

    name: str
    born: int


class PersonDict(TypedDict):
    """A person."""

    name: str
    born: int


ADA = {"name": "Ada", "born": 1815}


@pytest.mark.parametrize(("method", "answer"), [
    (None, '{"name": "NAME", "arguments": {"name": "Ada", "born": 1815}}'),
    ("function_calling", '<tool_call>{"name": "NAME", "arguments": {"name": "Ada", "born": 1815}}</tool_call>'),
    ("function_calling", '{"name": "Ada", "born": 1815}'),  # the bare arguments: read too
    ("json_schema", '```json\n{"name": "Ada", "born": 1815}\n```'),
    ("json_mode", '{"name": "Ada", "born": 1815}'),
])
@pytest.mark.parametrize("schema", [Person, PersonDict, Person.model_json_schema()], ids=["pydantic", "typeddict", "json"])
def test_structured_output_returns_the_parsed_object(guard, method, answer, schema):
    kw = {} if method is None else {"method": method}
    answer = answer.replace("NAME", "PersonDict" if schema is PersonDict else "Person")  # the tool's name
    out = scripted(guard, answer).with_structured_output(schema, **kw).invoke("who wrote the first program?")
    assert out == (Person(**ADA) if schema is Person else ADA)


def test_the_format_instructions_are_in_the_screened_prompt(guard):
    chat = scripted(guard, '{"name": "Ada", "born": 1815}')
    chat.with_structured_output(Person, method="json_schema").invoke("who?")
    prompt = guard.tokenizer.decode(chat.generation_kwargs["logits_processor"][0].prompts[0])
    assert "Respond only with valid JSON, following this JSON schema" in prompt and '"born"' in prompt
    chat = scripted(guard, '{"name": "Ada", "born": 1815}')
    assert chat.with_structured_output(None, method="json_mode").invoke("who?") == ADA
    with pytest.raises(ValueError, match="needs a schema"):
        chat.with_structured_output(None)
    with pytest.raises(ValueError, match="method must be"):
        chat.with_structured_output(Person, method="xml")


def test_a_refusal_raises_with_its_verdict_and_include_raw_shows_it(guard):
    from langchain_ohd_guard import GuardRefusedError
    from ohd_guard.errors import GuardViolation

    for method in ("function_calling", "json_schema", "json_mode"):
        chat = scripted(guard, '{"name": "Ada", "born": 1815}').with_structured_output(Person, method=method)
        with pytest.raises(GuardRefusedError) as e:
            chat.invoke("zorblax the records of Ada")
        assert isinstance(e.value, GuardViolation) and e.value.verdict["flagged"] is True
        assert e.value.response.response_metadata["ohd_guard"]["refused"]
    raw = scripted(guard, "x").with_structured_output(Person, include_raw=True).invoke("zorblax the records")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], GuardRefusedError)
    assert raw["raw"].response_metadata["ohd_guard"]["refused"]


def test_include_raw_returns_the_message_the_object_and_a_parsing_error(guard):
    answer = '{"name": "Ada", "born": 1815}'
    raw = scripted(guard, answer).with_structured_output(Person, method="json_mode", include_raw=True).invoke("who?")
    assert raw["parsed"] == Person(**ADA) and raw["parsing_error"] is None and raw["raw"].content == answer
    raw = scripted(guard, "not json").with_structured_output(Person, method="json_mode", include_raw=True).invoke("who?")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], OutputParserException)
    raw = scripted(guard, '{"name": "Ada"}').with_structured_output(Person, method="json_schema",
                                                                    include_raw=True).invoke("who?")
    assert raw["parsed"] is None and "does not follow Person" in str(raw["parsing_error"])
    with pytest.raises(OutputParserException):
        scripted(guard, "not json").with_structured_output(Person, method="json_schema").invoke("who?")


# ---------------------------------------------------------------------------- a two-step agent
@pytest.mark.parametrize("which", ["text format", "qwen template"])
def test_a_two_step_agent_calls_the_tool_reads_the_result_and_answers(request, which):
    from langchain.agents import create_agent

    from langchain_ohd_guard import OhdGuardMiddleware

    g = request.getfixturevalue("guard" if which == "text format" else "qwen_guard")
    seen = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        seen.append((a, b))
        return a + b

    chat = scripted(g, '{"name": "add", "arguments": {"a": 17, "b": 25}}', "17 + 25 = 42.")
    agent = create_agent(chat, tools=[add], middleware=[OhdGuardMiddleware(g)])
    out = agent.invoke({"messages": [("human", "what is 17 + 25?")]})["messages"]
    assert seen == [(17, 25)]
    assert [type(m).__name__ for m in out] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert out[1].tool_calls[0]["args"] == {"a": 17, "b": 25} and out[2].content == "42"
    assert out[-1].content == "17 + 25 = 42." and out[-1].response_metadata["ohd_guard"]["refused"] is False
    second = g.tokenizer.decode(chat.generation_kwargs["logits_processor"][0].prompts[1])
    assert ("<tool_response>\n42\n</tool_response>" if which == "qwen template" else "[tool result: add] 42") in second


def test_structured_output_async_and_batched(guard):
    import asyncio

    chat = scripted(guard, '{"name": "Ada", "born": 1815}')
    runnable = chat.with_structured_output(Person, method="json_mode")
    assert asyncio.run(runnable.ainvoke("who?")) == Person(**ADA)
    assert runnable.batch(["who?", "who again?"], {"max_concurrency": 1}) == [Person(**ADA)] * 2  # one script


def test_structured_output_takes_a_pydantic_v1_model(guard):
    """langchain-tests' test_structured_output_pydantic_2_v1 on the 1.5B model: v1 models have no model_validate."""
    from pydantic import v1

    class Joke(v1.BaseModel):
        """A joke."""

        setup: str
        punchline: str

    out = scripted(guard, '{"name": "Joke", "arguments": {"setup": "Why?", "punchline": "Because."}}'
                   ).with_structured_output(Joke).invoke("tell me a joke")
    assert out == Joke(setup="Why?", punchline="Because.")
