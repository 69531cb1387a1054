"""#25.5: the server's ``--check-output`` against a real uvicorn on 127.0.0.1 with the openai client. The
guarded model is the planted tiny Llama (its head fires on "zorblax") with its answers scripted
(:class:`ohd_guard.testing.scripted.Scripted`, the real model decoding): a clean question whose
answer carries the trigger can only be caught by reading the answer. A flagged answer is never
sent, whole or streamed: the refusal is. (:class:`~ohd_guard.testing.scripted_guard.ScriptedGuard`
scripts only the answer; screening, checking and refusing are the guard's own.)"""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from ohd_guard.serve.app import create_app  # noqa: E402
from ohd_guard.serve.server import ServerThread  # noqa: E402
from ohd_guard.serve.settings import ServeSettings  # noqa: E402
from ohd_guard.testing.scripted_guard import ScriptedGuard, scripted_planted_guard  # noqa: E402

BAD, GOOD = "the zorblax is here", "the cats are here"
ASK = [{"role": "user", "content": "tell me about cats"}]


def _guard(**options: Any) -> ScriptedGuard:
    return scripted_planted_guard(**options)


GUARD, SETTINGS = _guard, ServeSettings(model_name="m", check_output=True)  # conftest's guard, server, client


def _ask(client, guard, says: str, **kw: Any) -> Any:
    guard.says = says
    return client.chat.completions.with_raw_response.create(model="m", messages=ASK, max_tokens=20, **kw)


def test_a_flagged_answer_is_replaced_by_the_refusal(client, guard):
    raw = _ask(client, guard, BAD)
    r, meta = raw.parse(), raw.parse().model_extra["ohd_guard"]
    assert "zorblax" not in r.choices[0].message.content and r.choices[0].finish_reason == "content_filter"
    assert meta["refused"] and meta["output_verdict"]["flagged"] and meta["output_verdict"]["details"]["stage"] == "output"
    assert meta["flagged"] is False, "the input passed; the answer did not"
    assert raw.headers["x-ohd-guard-output-flagged"] == "true" and raw.headers["x-ohd-guard-refused"] == "true"


def test_a_safe_answer_is_sent_with_its_output_verdict(client, guard):
    raw = _ask(client, guard, GOOD)
    r = raw.parse()
    assert r.choices[0].message.content == GOOD and r.choices[0].finish_reason == "stop"
    assert r.model_extra["ohd_guard"]["output_verdict"]["flagged"] is False
    assert raw.headers["x-ohd-guard-output-flagged"] == "false" and raw.headers["x-ohd-guard-refused"] == "false"


@pytest.mark.parametrize("says", [BAD, GOOD])
def test_a_stream_is_held_until_the_answer_was_checked(server, guard, says):
    guard.says = says
    body = {"model": "m", "messages": ASK, "max_tokens": 20, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-ohd-guard-output-check"] == "held"
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    final = next(e for e in events if e.get("choices") and e["choices"][0]["finish_reason"])
    assert not any("zorblax" in json.dumps(e.get("choices")) for e in events)
    if says == BAD:
        assert text and final["choices"][0]["finish_reason"] == "content_filter"
        assert final["ohd_guard"]["refused"] and final["ohd_guard"]["output_verdict"]["flagged"]
    else:
        assert text == GOOD and final["ohd_guard"]["output_verdict"]["flagged"] is False


def test_a_flagged_tool_call_is_not_sent(client, guard):
    tool = {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                             "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    guard.says = '{"name": "search", "arguments": {"q": "zorblax"}}'
    r = client.chat.completions.create(model="m", messages=ASK, max_tokens=40, tools=[tool])
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "content_filter"
    guard.says = '{"name": "search", "arguments": {"q": "cats"}}'
    r = client.chat.completions.create(model="m", messages=ASK, max_tokens=40, tools=[tool])
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["search"]


def test_under_refusal_raise_a_flagged_answer_is_a_403():
    g = _guard(refusal="raise")
    g.says = BAD
    with ServerThread(create_app(g, ServeSettings(model_name="m", check_output=True))) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "m", "messages": ASK, "max_tokens": 20}, timeout=60)
    g.close()
    assert r.status_code == 403 and "zorblax" not in r.text
    assert r.json()["ohd_guard"]["verdict"]["details"]["stage"] == "output"


def test_without_check_output_the_answer_is_not_read():
    g = _guard()
    g.says = BAD
    with ServerThread(create_app(g, ServeSettings(model_name="m"))) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "m", "messages": ASK, "max_tokens": 20}, timeout=60)
    g.close()
    assert r.json()["choices"][0]["message"]["content"] == BAD and "output_verdict" not in r.json()["ohd_guard"]


def test_check_output_from_a_flag_or_the_environment(monkeypatch):
    from ohd_guard.serve.cli import _settings, add_parser

    assert ServeSettings.from_env({"OHD_GUARD_CHECK_OUTPUT": "1"}).check_output is True
    assert ServeSettings.from_env({}).check_output is False
    cli = argparse.ArgumentParser()
    add_parser(cli.add_subparsers())
    monkeypatch.delenv("OHD_GUARD_CHECK_OUTPUT", raising=False)
    assert _settings(cli.parse_args(["serve"])).check_output is False
    args = cli.parse_args(["serve", "--check-output", "--answer-profile", "a.json"])
    assert (_settings(args).check_output, _settings(args).answer_profile) == (True, "a.json")
    monkeypatch.setenv("OHD_GUARD_CHECK_OUTPUT", "true")
    assert _settings(cli.parse_args(["serve"])).check_output is True
