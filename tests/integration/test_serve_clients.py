"""#25.8/#25.1 on the server, against a real uvicorn on 127.0.0.1: only the request's own tools are
parsed as calls, and LangChain's ``ChatOpenAI(include_response_headers=True)`` surfaces the
``X-OHD-Guard-*`` verdict headers (the docs/serving.md example, run as written). The guarded model is
the planted tiny Llama with scripted answers (:class:`~ohd_guard.testing.scripted_guard.ScriptedGuard`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from ohd_guard.serve.app import create_app  # noqa: E402
from ohd_guard.serve.server import ServerThread  # noqa: E402
from ohd_guard.serve.settings import ServeSettings  # noqa: E402
from ohd_guard.testing.scripted_guard import scripted_planted_guard  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
ASK = [{"role": "user", "content": "what is 17 + 25?"}]
GUARD, SETTINGS = scripted_planted_guard, ServeSettings(model_name="ohd-guard")  # conftest's guard, server, client


@pytest.mark.parametrize("stream", [False, True])
def test_only_the_requests_tools_are_parsed_as_calls(client, guard, stream):
    def ask(says: str):
        guard.says = says
        if not stream:
            c = client.chat.completions.create(model="ohd-guard", messages=ASK, tools=[ADD], max_tokens=40).choices[0]
            return c.message.content, c.message.tool_calls, c.finish_reason
        chunks = list(client.chat.completions.create(model="ohd-guard", messages=ASK, tools=[ADD], max_tokens=40,
                                                     stream=True))
        text = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
        calls = [t for ch in chunks for c in ch.choices for t in (c.delta.tool_calls or [])] or None
        return text, calls, next(c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason)

    undeclared = '{"name": "delete_all", "arguments": {}}'
    assert ask(undeclared) == (undeclared, None, "stop"), "JSON naming an undeclared tool is the answer's text"
    _, calls, finish = ask('{"name": "add", "arguments": {"a": 17, "b": 25}}')
    assert [c.function.name for c in calls] == ["add"] and finish == "tool_calls"


def _docs_example() -> str:
    """The ChatOpenAI block of docs/serving.md, as written."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    block = next(b for b in blocks if "include_response_headers=True" in b)
    assert 'base_url="http://127.0.0.1:8000/v1"' in block
    return block


def test_chat_openai_include_response_headers_surfaces_the_verdict(server, guard, capsys):
    pytest.importorskip("langchain_openai")
    guard.says = "Use reversed() or slicing."
    code = _docs_example().replace("http://127.0.0.1:8000/v1", server.url + "/v1")
    scope: dict = {}
    exec(compile(code, str(DOCS), "exec"), scope)  # noqa: S102 - the documented example, run as written
    flagged, refused, score = capsys.readouterr().out.split()
    assert (flagged, refused) == ("false", "false") and float(score) >= 0
    assert scope["msg"].content == "Use reversed() or slicing."

    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="ohd-guard", include_response_headers=True)
    refused_msg = llm.invoke("tell me about zorblax please")
    assert refused_msg.response_metadata["headers"]["x-ohd-guard-flagged"] == "true"
    assert refused_msg.response_metadata["headers"]["x-ohd-guard-refused"] == "true"
    first = next(iter(llm.stream("tell me about zorblax please")))
    assert first.response_metadata["headers"]["x-ohd-guard-flagged"] == "true"


def test_earlier_calls_and_results_reach_the_model_in_the_templates_format():
    """Under Qwen2.5's chat template an assistant's ``tool_calls`` and the ``tool`` result are written
    as the template writes them (``<tool_call>`` / ``<tool_response>``), not as ``[tool call]`` text."""
    import copy

    from ohd_guard.detectors import calibrate
    from ohd_guard.masking import HeadRef
    from ohd_guard.testing.fixtures import GUARD_CLEAN_PROMPTS, GUARD_TRIGGER_PROMPTS, planted_text_calibrated
    from ohd_guard.testing.scripted_guard import ScriptedGuard
    from ohd_guard.testing.templates import QWEN25_CHAT_TEMPLATE

    model, tok, _ = planted_text_calibrated()
    tok = copy.deepcopy(tok)
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    profile = calibrate(model, tok, list(GUARD_TRIGGER_PROMPTS), list(GUARD_CLEAN_PROMPTS), head=HeadRef(layer=1, head=2))
    guard = ScriptedGuard(model, tok, profile)
    guard.says = "The sum is 42."
    turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 17, "b": 25}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    with ServerThread(create_app(guard, ServeSettings(model_name="q"))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="q", messages=turns, tools=[ADD], max_tokens=20)
    guard.close()
    assert r.choices[0].message.content == "The sum is 42."
    prompt = tok.decode(guard.last.prompts[0])
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n</tool_call>' in prompt
    assert "<tool_response>\n42\n</tool_response>" in prompt and "[tool call]" not in prompt
