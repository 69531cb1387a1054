"""Hostile request bodies against a real uvicorn on 127.0.0.1 (issue 23, items 3, 6 and 7): each
must cost the client a typed 4xx and the server one log line at most, never a 500, a traceback in
the log or a render of a million empty parts. The guard is the planted tiny LLaVA of test_serve."""

from __future__ import annotations

import logging
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from ohd_guard.serve.app import create_app  # noqa: E402
from ohd_guard.serve.demo import planted_guard  # noqa: E402
from ohd_guard.serve.server import ServerThread  # noqa: E402
from ohd_guard.serve.settings import ServeSettings  # noqa: E402

MODEL = "planted"
SAFE = "tell me about the weather today"
GUARD, SETTINGS = planted_guard, ServeSettings(model_name=MODEL, max_body_bytes=4_000_000)  # conftest's guard, server


class Records(logging.Handler):
    """Collects records of the server's loggers (uvicorn's do not propagate to the root logger)."""

    NAMES = ("uvicorn.error", "uvicorn", "ohd_guard.serve", "")  # a record reaching two of them counts once

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not any(r is record for r in self.records):
            self.records.append(record)

    def __enter__(self) -> Records:
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)
        logging.getLogger("ohd_guard.serve").setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)


def _post(server, body, **kw):
    return httpx.post(server.url + "/v1/chat/completions", timeout=60, **({"json": body} if not isinstance(body, bytes)
                                                                          else {"content": body}), **kw)


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    return r.json()["error"]


def test_deeply_nested_bodies_are_400_invalid_json(server):
    """#23.3: 100k nested brackets made json.loads raise RecursionError (a 500 and a traceback);
    500 levels parsed, then sat in the request (ignored metadata, tool schemas) for any later
    recursive code to trip on. Both are refused while parsing, naming the depth limit."""
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with Records() as logs:
        err = _error(_post(server, deep), 400, "invalid_json")
    assert not [r for r in logs.records if r.levelno >= logging.ERROR], "a deep body logged an error"
    nested = {"x": None}
    for _ in range(500):
        nested = {"x": nested}
    err = _error(_post(server, {"messages": [{"role": "user", "content": SAFE}], "metadata": nested, "max_tokens": 2}),
                 400, "invalid_json")
    assert "deep" in err["message"]
    assert _post(server, {"messages": [{"role": "user", "content": SAFE}], "max_tokens": 2}).status_code == 200


def test_a_client_leaving_mid_body_logs_one_quiet_line(server):
    """#23.6: ClientDisconnect escaped the body reader as a ~60-line ERROR traceback per request."""
    with Records() as logs:
        with socket.create_connection((server.host, server.port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n" + b'{"messages": [' + b" " * 1000)
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any("disconnect" in r.getMessage() for r in logs.records):
            time.sleep(0.05)
    quiet = [r for r in logs.records if "disconnect" in r.getMessage()]
    assert len(quiet) == 1 and quiet[0].levelno <= logging.INFO and quiet[0].exc_info is None, logs.records
    assert not [r for r in logs.records if r.levelno >= logging.WARNING], [r.getMessage() for r in logs.records]
    assert httpx.get(server.url + "/health").json()["active_requests"] == 0


@pytest.mark.parametrize("field,value", [("max_tokens", True), ("max_tokens", "5"), ("max_tokens", 5.0),
                                         ("max_completion_tokens", "5"), ("n", True), ("stream", "true"),
                                         ("temperature", "0")])
def test_numbers_and_flags_are_strict_like_openai(server, field, value):
    """#23.6: ``"max_tokens": true`` and ``"5"`` were coerced and accepted; OpenAI answers 400."""
    err = _error(_post(server, {"messages": [{"role": "user", "content": SAFE}], field: value}), 400, "invalid_parameter")
    assert err["param"] == field


def test_max_tokens_limit_below_the_default_clamps_the_default(guard):
    """#23.6: ``--max-tokens-limit 64`` made every request without ``max_tokens`` a 400 (the default
    256 was over it). The default is clamped to the limit; a default set explicitly above it is an
    error at start-up."""
    assert ServeSettings(max_tokens_limit=64).default_max_tokens == 64
    assert ServeSettings(default_max_tokens=32, max_tokens_limit=64).default_max_tokens == 32
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServeSettings(default_max_tokens=128, max_tokens_limit=64)
    import argparse

    from ohd_guard.serve.cli import _settings, add_parser, cmd_serve

    cli = argparse.ArgumentParser()
    add_parser(cli.add_subparsers())
    assert _settings(cli.parse_args(["serve", "--max-tokens-limit", "64"])).default_max_tokens == 64
    with pytest.raises(SystemExit) as e:  # a bad limit is a usage error before any model is loaded
        cmd_serve(cli.parse_args(["serve", "--max-tokens-limit", "0"]))
    assert e.value.code == 2
    with ServerThread(create_app(guard, ServeSettings(model_name=MODEL, max_tokens_limit=3))) as srv:
        r = _post(srv, {"messages": [{"role": "user", "content": SAFE}], "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 3
        _error(_post(srv, {"messages": [{"role": "user", "content": SAFE}], "max_tokens": 4}), 400, "invalid_parameter")


def test_a_flood_of_empty_parts_is_refused_before_rendering(server):
    """#23.7: 600k empty text parts were accepted and rendered (5.7 s). The conversation limit on
    parts per message (the core's ConversationLimits) answers 400 naming it, quickly."""
    parts = [{"type": "text", "text": ""}] * 100_000  # 2.5 MB of JSON
    t0 = time.perf_counter()
    err = _error(_post(server, {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}), 400, "invalid_input")
    assert "max_parts_per_message" in err["message"] and time.perf_counter() - t0 < 5
    many = [{"role": "user", "content": [{"type": "text", "text": "hi"}] * 200} for _ in range(8)]
    err = _error(_post(server, {"messages": many, "max_tokens": 2}), 400, "invalid_input")
    assert "max_parts" in err["message"]
