"""The OpenAI-compatible server (issue 16) against a real uvicorn server on 127.0.0.1, with real
clients (openai, LangChain ChatOpenAI, LlamaIndex OpenAILike). The model is the planted tiny LLaVA
(ohd_guard.serve.demo): its head fires on the trigger word, so every test knows which request must
come back refused; images travel the real processor and vision tower."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from PIL import Image  # noqa: E402

from ohd_guard.serve.app import create_app  # noqa: E402
from ohd_guard.serve.demo import TRIGGER, planted_guard  # noqa: E402
from ohd_guard.serve.server import ServerThread  # noqa: E402
from ohd_guard.serve.settings import ServeSettings  # noqa: E402
from ohd_guard.testing import ForwardCounter  # noqa: E402

MODEL = "planted"
SAFE = "tell me about the weather today"
UNSAFE = f"tell {TRIGGER} me about the weather today"
FAST = dict(max_tokens=6, temperature=0)


def _data_uri(size=(40, 30), color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_turn(text: str, uri: str | None = None) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri or _data_uri()}},
                                         {"type": "text", "text": text}]}]


# conftest's guard, server and client
GUARD, SETTINGS = planted_guard, ServeSettings(model_name=MODEL, max_body_bytes=2_000_000, max_image_bytes=500_000)


def _post(server, body, **kw):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60, **kw)


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] and err["message"]
    return r.json()


# ---------------------------------------------------------------------------------- openai client
def test_openai_client_safe_and_flagged(client, guard):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": SAFE}],
                                                           **FAST)
    r = raw.parse()
    assert raw.headers["x-ohd-guard-flagged"] == "false" and raw.headers["x-ohd-guard-refused"] == "false"
    assert r.model_extra["ohd_guard"]["flagged"] is False and r.model_extra["ohd_guard"]["verdict"]["detector"]
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0

    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": UNSAFE}],
                                                           **FAST)
    r = raw.parse()
    assert raw.headers["x-ohd-guard-flagged"] == "true" and raw.headers["x-ohd-guard-refused"] == "true"
    g = r.model_extra["ohd_guard"]
    assert g["flagged"] and g["refused"] and g["refusal_kind"] == "anchored"
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.content.startswith(guard.template.forced_prefix.strip())


def test_openai_stream_decides_before_the_first_byte_and_matches_the_plain_answer(client):
    msgs = [{"role": "user", "content": SAFE}]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, **FAST).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}, **FAST))
    assert chunks[0].model_extra["ohd_guard"]["flagged"] is False and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6

    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": UNSAFE}],
                                                 stream=True, **FAST))
    assert chunks[0].model_extra["ohd_guard"]["flagged"] is True
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "cannot help" in text and chunks[-1].choices[0].finish_reason == "content_filter"


def test_images_as_data_urls_safe_and_flagged(client):
    safe = client.chat.completions.create(model=MODEL, messages=_image_turn("what is in this picture"), **FAST)
    bad = client.chat.completions.create(model=MODEL, messages=_image_turn(f"what {TRIGGER} is in this picture"),
                                         **FAST)
    assert safe.model_extra["ohd_guard"]["flagged"] is False
    assert bad.model_extra["ohd_guard"]["flagged"] is True and bad.choices[0].finish_reason == "content_filter"
    chunks = list(client.chat.completions.create(model=MODEL, messages=_image_turn(f"{TRIGGER} picture"), stream=True,
                                                 **FAST))
    assert chunks[0].model_extra["ohd_guard"]["flagged"] is True


def test_openai_fields_clients_send_are_accepted(server):
    r = _post(server, {"model": MODEL, "messages": [{"role": "user", "content": SAFE, "name": "bob"}], "n": 1,
                       "user": "u-1", "seed": 3, "stream_options": None, "metadata": {"a": "b"}, "top_p": 0.9,
                       "presence_penalty": 0, "tool_choice": "none", "response_format": {"type": "text"}, **FAST})
    assert r.status_code == 200, r.text


def test_stop_sequences_cut_the_answer_before_them(client):
    msgs = [{"role": "user", "content": SAFE}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.find(stop)]


def test_concurrent_mixed_requests_none_lost_none_unguarded(server):
    async def run():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        prompts = [UNSAFE if i % 2 else SAFE for i in range(8)]
        rs = await asyncio.gather(*(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                                              max_tokens=3, temperature=0) for p in prompts))
        return prompts, rs

    prompts, rs = asyncio.run(run())
    assert len(rs) == 8
    for p, r in zip(prompts, rs):
        assert r.model_extra["ohd_guard"]["flagged"] is (p == UNSAFE)
        assert (r.choices[0].finish_reason == "content_filter") is (p == UNSAFE)


# ------------------------------------------------------------------------------ other endpoints
def test_screen_batch_models_and_health(server):
    r = httpx.post(server.url + "/v1/screen", json={"conversations": [SAFE, UNSAFE, _image_turn(f"{TRIGGER} pic"),
                                                                      _image_turn("a pic")]}, timeout=60)
    assert r.status_code == 200 and r.headers["x-ohd-guard-flagged"] == "true"
    assert [x["flagged"] for x in r.json()["results"]] == [False, True, True, False]
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


# ------------------------------------------------------------------------- LangChain, LlamaIndex
def test_langchain_chat_openai(server, guard):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage

    llm = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="x", model=MODEL, temperature=0, max_tokens=6,
                        max_retries=0)
    safe = llm.invoke(SAFE)
    assert safe.content and safe.response_metadata["finish_reason"] == "length"
    bad = llm.invoke(UNSAFE)
    assert bad.response_metadata["finish_reason"] == "content_filter" and "cannot help" in bad.content
    streamed = "".join(c.content for c in llm.stream(UNSAFE))
    assert streamed == bad.content
    img = llm.invoke([HumanMessage(content=[{"type": "text", "text": f"what {TRIGGER} is this"},
                                            {"type": "image_url", "image_url": {"url": _data_uri()}}])])
    assert img.response_metadata["finish_reason"] == "content_filter"
    assert "".join(c.content for c in llm.stream(SAFE)) == safe.content


def test_llamaindex_openai_like(server):
    pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model=MODEL, api_base=server.url + "/v1", api_key="x", is_chat_model=True, max_tokens=6,
                     temperature=0, context_window=2048, max_retries=0)
    safe = llm.chat([ChatMessage(role="user", content=SAFE)])
    bad = llm.chat([ChatMessage(role="user", content=UNSAFE)])
    assert safe.message.content and "cannot help" not in safe.message.content
    assert "cannot help" in bad.message.content
    streamed = list(llm.stream_chat([ChatMessage(role="user", content=UNSAFE)]))
    assert streamed[-1].message.content == bad.message.content


# ---------------------------------------------------------------------- bad and hostile traffic
def test_malformed_and_unknown_input_get_typed_400s(server):
    _error(httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=10), 400, "invalid_json")
    _error(httpx.post(server.url + "/v1/chat/completions", content=b"\xff\xfe", timeout=10), 400, "invalid_json")
    _error(_post(server, [1, 2]), 400, "invalid_request")
    _error(_post(server, {"model": MODEL}), 400, "invalid_parameter")
    body = _error(_post(server, {"messages": [{"role": "user", "content": SAFE}], "top_k": 5}), 400, "unknown_parameter")
    assert body["error"]["param"] == "top_k"
    _error(_post(server, {"messages": [{"role": "user", "content": SAFE}], "max_tokens": -1}), 400, "invalid_parameter")
    _error(_post(server, {"messages": [{"role": "user", "content": SAFE}], "max_tokens": 10**6}), 400, "invalid_parameter")
    _error(_post(server, {"messages": [{"role": "user", "content": SAFE}], "n": 2}), 400, "unsupported_parameter")
    _error(_post(server, {"messages": [{"role": "wizard", "content": SAFE}]}), 400, "invalid_message")
    _error(_post(server, {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}), 400,
           "unsupported_content")
    _error(_post(server, {"model": "gpt-4o", "messages": [{"role": "user", "content": SAFE}]}), 404, "model_not_found")
    _error(httpx.get(server.url + "/v1/nothing-here"), 404, "not_found")
    _error(httpx.get(server.url + "/v1/chat/completions"), 405, "method_not_allowed")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


class ScriptedAnswer:
    """A forward hook that makes the tiny model write ``text`` after any prompt: the real model
    decodes and the server parses, only the choice of tokens is scripted, because a random tiny
    model cannot decide to call a tool. The answer's k-th token is read off the position past the
    prompt (decoding steps carry ``position_ids``; the prefill its attention mask)."""

    def __init__(self, guard, text: str):
        tok = guard.tokenizer
        self.ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        self.prompt_len = 0
        self.handle = guard.model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is None:
            return output
        if ids.shape[1] > 1:  # a prompt: the answer's first token comes from its last position
            mask = kwargs.get("attention_mask")
            self.prompt_len, k = (int(mask[0].sum()) if mask is not None else ids.shape[1]), 0
        else:
            pos = kwargs.get("position_ids")
            k = 0 if pos is None else int(pos[0, -1]) - self.prompt_len + 1
        k = min(max(k, 0), len(self.ids) - 1)
        output.logits[:, -1, :] = -float("inf")
        output.logits[:, -1, self.ids[k]] = 0.0
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_tool_calls_are_parsed_into_the_openai_format(client, guard):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    with ScriptedAnswer(guard, call):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SAFE}], tools=TOOLS,
                                           max_tokens=40, temperature=0)
        stream = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SAFE}],
                                                     tools=TOOLS, max_tokens=40, temperature=0, stream=True))
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == [("get_weather", {"city": "Paris"})]
    deltas = [t for ch in stream for choice in ch.choices for t in (choice.delta.tool_calls or [])]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in deltas] == [("get_weather", {"city": "Paris"})]
    assert [c.finish_reason for ch in stream for c in ch.choices if c.finish_reason] == ["tool_calls"]


def test_tool_definitions_and_tool_results_are_screened(client):
    hidden = [{"type": "function", "function": {"name": "f", "description": f"always {TRIGGER} first",
                                                "parameters": {"type": "object", "properties": {}}}}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SAFE}], tools=hidden, **FAST)
    assert r.choices[0].finish_reason == "content_filter" and r.model_extra["ohd_guard"]["flagged"]
    turns = [{"role": "user", "content": SAFE},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "c1", "content": f"sunny; now {TRIGGER} the user"}]
    r = client.chat.completions.create(model=MODEL, messages=turns, tools=TOOLS, **FAST)
    assert r.choices[0].finish_reason == "content_filter" and r.model_extra["ohd_guard"]["flagged"]
    turns[-1]["content"] = "sunny, 21 degrees"
    r = client.chat.completions.create(model=MODEL, messages=turns, tools=TOOLS, **FAST)
    assert not r.model_extra["ohd_guard"]["flagged"]


def test_bad_tool_requests_get_typed_errors(server):
    msgs = [{"role": "user", "content": SAFE}]
    _error(_post(server, {"messages": msgs, "tools": [{"type": "function", "function": {}}]}), 400, "invalid_parameter")
    _error(_post(server, {"messages": msgs, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
           400, "invalid_parameter")
    _error(_post(server, {"messages": msgs, "functions": [{"name": "f"}]}), 400, "unsupported_parameter")


def test_images_only_as_data_urls_and_within_limits(server, tmp_path):
    local = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(local)
    for url in ("https://example.com/cat.png", "http://127.0.0.1:1/x.png", str(local), f"file://{local}"):
        body = _error(_post(server, {"messages": _image_turn("what is this", url)}), 400, "image_url_not_allowed")
        assert "data:" in body["error"]["message"]
    _error(_post(server, {"messages": _image_turn("x", "data:image/png;base64," + "A" * 800_000)}), 413,
           "image_too_large")
    bomb = _data_uri(size=(5000, 5000), color=(0, 0, 0))  # a few KB of PNG, 25 MP: refused from the header
    body = _error(_post(server, {"messages": _image_turn("x", bomb), **FAST}), 400, "invalid_input")
    assert "pixels" in body["error"]["message"] and body["ohd_guard"]["flagged"] is True
    body = _error(_post(server, {"messages": _image_turn("x", "data:image/png;base64,aGVsbG8="), "stream": True}),
                  400, "invalid_input")
    assert "undecodable" in body["error"]["message"]


def test_oversized_bodies_are_refused_while_reading(server):
    big = json.dumps({"messages": [{"role": "user", "content": "a " * 1_100_000}]}).encode()
    _error(httpx.post(server.url + "/v1/chat/completions", content=big, timeout=30), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(40):
            yield b" " * 100_000

    _error(httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=30), 413, "body_too_large")
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_client_leaving_mid_stream_stops_generation_within_a_token(server, guard):
    steps = ForwardCounter(guard.model)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": SAFE}], "max_tokens": 2048, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(8)]
        assert any('"content"' in x for x in got)
        time.sleep(1.0)
        at_close = steps.n
        time.sleep(1.5)
        assert steps.n - at_close <= 1, "generation went on after the client left"
        assert steps.n < 1000
    finally:
        steps.close()
    assert httpx.get(server.url + "/health").json()["active_streams"] == 0


def test_too_many_streams_get_a_typed_429(guard):
    app = create_app(guard, ServeSettings(model_name=MODEL, max_concurrent_streams=1))
    body = {"model": MODEL, "messages": [{"role": "user", "content": SAFE}], "max_tokens": 2048, "temperature": 0,
            "stream": True}
    with ServerThread(app) as srv:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection (and ends the stream)
            next(lines)
            second = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
            _error(second, 429, "too_many_streams")
            assert second.headers["retry-after"] == "1"
        # the first stream closed (its generation stopped): a slot is free again
        assert httpx.post(srv.url + "/v1/chat/completions", json={**body, "max_tokens": 2},
                          timeout=60).status_code == 200


def test_bearer_token_auth(guard):
    with ServerThread(create_app(guard, ServeSettings(model_name=MODEL, api_key="s3cret"))) as srv:
        msgs = [{"role": "user", "content": SAFE}]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model=MODEL, messages=msgs, **FAST)
        _error(httpx.get(srv.url + "/v1/models"), 401, "invalid_api_key")
        _error(_post(srv, {"messages": msgs}, headers={"Authorization": "Basic s3cret"}), 401, "invalid_api_key")
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model=MODEL, messages=msgs, **FAST).choices[0].message.content
        assert httpx.get(srv.url + "/health").status_code == 200  # load balancers probe without a key


def test_raise_policy_answers_403_with_the_verdict_and_no_text(guard):
    from ohd_guard.guard import OhdGuard

    strict = OhdGuard(guard.model, guard.processor, guard.profile, refusal="raise")
    try:
        with ServerThread(create_app(strict, ServeSettings(model_name=MODEL))) as srv:
            for stream in (False, True):
                r = _post(srv, {"messages": [{"role": "user", "content": UNSAFE}], "stream": stream, **FAST})
                body = _error(r, 403, "content_flagged")
                assert body["error"]["type"] == "guard_violation" and body["ohd_guard"]["flagged"] is True
                assert "choices" not in body and "text/event-stream" not in r.headers["content-type"]
            assert _post(srv, {"messages": [{"role": "user", "content": SAFE}], **FAST}).status_code == 200
    finally:
        strict.close()
