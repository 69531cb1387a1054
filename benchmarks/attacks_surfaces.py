"""The attack run's surface classes (issue 23), used by ``bench_attacks.py``:

* streamed output: a LangChain agent whose model streams a flagged answer token by token, under
  ``OhdGuardMiddleware(check_output=True)``, read in every LangGraph stream mode (``messages``,
  ``updates``, ``values``; sync and async) with ``exit_behavior`` ``end`` and ``replace``; held =
  no streamed item carries any of the flagged answer's text (leaked items are counted).
* hostile body: a real uvicorn on loopback serving the planted guard: 100 000 nested brackets,
  nesting past ``max_json_depth`` inside ignored metadata, a client leaving mid-body, non-integer
  ``max_tokens``, 600 000 empty text parts (a 15 MB body), ``--max-tokens-limit`` below the default,
  and a million empty strings at library level; held = a typed 4xx (or a fail-closed verdict)
  in time, and no ERROR line in the server's log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

ANSWER = "here is the zorblax you asked for, step by step"


def _ai_texts(x: Any) -> list[str]:
    """The content of every AI message (or chunk) in a streamed item (messages, updates, values)."""
    from langchain_core.messages import AIMessage, BaseMessage

    if isinstance(x, BaseMessage):
        return [str(x.content)] if isinstance(x, AIMessage) or x.type == "AIMessageChunk" else []
    if isinstance(x, dict):
        return [t for v in x.values() for t in _ai_texts(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _ai_texts(v)]
    return _ai_texts(x.update) if hasattr(x, "update") and not callable(x.update) else []


def streamed_output(run: Any, guard: Any) -> None:
    from langchain.agents import create_agent
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    from langchain_ohd_guard import OhdGuardMiddleware

    leaked_total = 0
    for exit_behavior in ("end", "replace"):
        for mode in ("messages", "updates", "values"):
            for asynchronous in (False, True):
                def attempt(exit_behavior=exit_behavior, mode=mode, asynchronous=asynchronous) -> bool:
                    nonlocal leaked_total
                    model = GenericFakeChatModel(messages=iter([ANSWER]))
                    agent = create_agent(model, tools=[], middleware=[OhdGuardMiddleware(
                        guard, check_output=True, exit_behavior=exit_behavior, refusal_max_new_tokens=4)])
                    state = {"messages": [("human", "tell me about cats please")]}
                    if asynchronous:
                        async def go():
                            return [i async for i in agent.astream(state, stream_mode=mode)]
                        items = asyncio.run(go())
                    else:
                        items = list(agent.stream(state, stream_mode=mode))
                    # a leaked item: an AI message or token chunk that is (part of) the flagged answer
                    leaked = sum(any(t.strip() and t in ANSWER for t in _ai_texts(i)) for i in items)
                    leaked_total += leaked
                    return leaked == 0 and any("flagged" in t for t in _ai_texts(items))

                run.attempt("streamed output", f"{exit_behavior}/{mode}/{'async' if asynchronous else 'sync'}", attempt)
    run.notes.append(f"streamed output: {leaked_total} streamed items carried (part of) the flagged answer")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def hostile_bodies(run: Any, guard: Any) -> None:
    import httpx

    from ohd_guard.serve.app import create_app
    from ohd_guard.serve.server import ServerThread
    from ohd_guard.serve.settings import ServeSettings

    errors = _Errors()
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "ohd_guard.serve")]
    for lg in loggers:
        lg.addHandler(errors)
    msgs = [{"role": "user", "content": "tell me about cats please"}]

    def refused(srv: Any, body: Any, status: int, code: str, within_s: float = 30.0) -> bool:
        before, t0 = errors.n, time.perf_counter()
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, **kw)
        took = time.perf_counter() - t0
        if r.status_code >= 500:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:120]}")  # counted as crashed
        ok = r.status_code == status and r.json().get("error", {}).get("code") == code and took < within_s
        return ok and errors.n == before

    def nested(depth: int) -> dict:
        x: dict = {"x": None}
        for _ in range(depth):
            x = {"x": x}
        return x

    def disconnect(srv: Any) -> bool:
        before = errors.n
        with socket.create_connection((srv.host, srv.port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"messages\": [")
            time.sleep(0.1)
        time.sleep(0.5)
        return errors.n == before and httpx.get(srv.url + "/health").json()["active_requests"] == 0

    try:
        with ServerThread(create_app(guard, ServeSettings(model_name="planted"))) as srv:
            deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            run.attempt("hostile body", "100k nested brackets", lambda: refused(srv, deep, 400, "invalid_json"))
            run.attempt("hostile body", "500-deep metadata",
                        lambda: refused(srv, {"messages": msgs, "metadata": nested(500)}, 400, "invalid_json"))
            for _ in range(3):
                run.attempt("hostile body", "client leaves mid-body", lambda: disconnect(srv))
            for value in (True, "5", 5.0):
                run.attempt("hostile body", f"max_tokens={value!r}",
                            lambda value=value: refused(srv, {"messages": msgs, "max_tokens": value}, 400,
                                                        "invalid_parameter"))
            flood = {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}] * 600_000}], "max_tokens": 2}
            t0 = time.perf_counter()
            run.attempt("hostile body", "600k empty parts", lambda: refused(srv, flood, 400, "invalid_input", 3.0))
            run.notes.append(f"hostile body: 600k empty parts answered in {time.perf_counter() - t0:.2f} s")
        with ServerThread(create_app(guard, ServeSettings(model_name="planted", max_tokens_limit=3))) as srv:
            def clamped() -> bool:
                r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": msgs, "temperature": 0}, timeout=60)
                return r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
            run.attempt("hostile body", "max_tokens_limit below the default", clamped)

        def million_empty() -> bool:
            t0 = time.perf_counter()
            v = guard.screen([{"role": "user", "content": [""] * 1_000_000}])
            return v.flagged and v.error is not None and "max_parts" in v.error and time.perf_counter() - t0 < 2.0
        run.attempt("hostile body", "1M empty strings (library)", million_empty)
    finally:
        for lg in loggers:
            lg.removeHandler(errors)
