"""The FastAPI app: an OpenAI-compatible chat-completions API for one guarded model.

Routes: ``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models``, ``POST /v1/screen`` (verdicts
only), ``POST /v1/moderations`` (OpenAI's moderation shape, :mod:`ohd_guard.serve.moderations`) and
``GET /health``. Every request goes through the guard's async API (``agenerate``,
``astream``, ``ascreen``), so concurrent requests share its micro-batching worker. A stream is
decided before its first byte: the server waits for the verdict (and the first chunk) and only then
starts the SSE response, so a refusal policy of ``"raise"`` or bad input still gets a plain 4xx.
Request bodies are read by the server itself (byte limit, JSON and schema errors as typed 400s),
and every failure is a typed error: nothing leaves the server unscreened.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ohd_guard.serve.errors import APIError, from_guard_error, screen_all
from ohd_guard.generation import StopTrimmer, cut_at_stops
from ohd_guard.serve.generation import Generation, TokenCounter, generation_for, sampling_defaults
from ohd_guard.serve.moderations import add_moderations
from ohd_guard.serve.output import OutputGate, Reviewed
from ohd_guard.serve.payload import FIELD, guard_headers, guard_payload, is_bad_input
from ohd_guard.serve.schema import (
    ChatCompletionRequest, ScreenRequest, check_messages, check_model, check_supported, parse, screen_items, tool_setup,
)
from ohd_guard.tools import parse_tool_calls, tool_turns, with_tools
from ohd_guard.serve.settings import ServeSettings

log = logging.getLogger("ohd_guard.serve")


class _Gate:
    """Counts what is in flight; over the limit is an immediate 429, never a queue without end."""

    def __init__(self, limit: int, code: str, what: str):
        self.limit, self.code, self.what, self.active = limit, code, what, 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise APIError(429, self.code, f"too many {self.what} at once (limit {self.limit}); retry later",
                           headers={"Retry-After": "1"})
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    @contextmanager
    def slot(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


class _ClientGone(Exception):
    """The client disconnected before its answer was ready; the work was cancelled."""


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _check_depth(body: Any, limit: int) -> None:
    """Refuse containers nested deeper than ``limit`` (walked level by level, never recursively)."""
    level, depth = [body] if isinstance(body, (dict, list)) else [], 0
    while level:
        depth += 1
        if depth > limit:
            raise APIError(400, "invalid_json", f"the request body is nested too deep: over max_json_depth={limit}")
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, (dict, list))]


async def _read_json(request: Request, limit: int, max_depth: int) -> Any:
    """The body as JSON, refusing more than ``limit`` bytes while reading (a lying Content-Length too)
    and more than ``max_depth`` levels of nesting. A client that leaves mid-body costs one INFO line."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, "body_too_large", f"request body over max_body_bytes={limit}")
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise APIError(413, "body_too_large", f"request body over max_body_bytes={limit}")
    except ClientDisconnect:
        log.info("client disconnected while sending its request body (%d bytes read); nothing was screened",
                 len(buf))
        raise APIError(499, "client_disconnected", "the client disconnected before its request body ended") from None
    try:
        body = json.loads(buf)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, "invalid_json", f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # the C parser's own depth guard: thousands of nested brackets
        raise APIError(400, "invalid_json",
                       f"the request body is nested too deep: over max_json_depth={max_depth}") from None
    _check_depth(body, max_depth)
    return body


async def _until_disconnect(request: Request, work: Awaitable[Any], poll_s: float) -> Any:
    """Await ``work``, cancelling it (the guard then stops decoding within a token) if the client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise _ClientGone()
    except asyncio.CancelledError:
        task.cancel()
        raise


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _max_model_len(guard: Any) -> int | None:
    """The model's context window in tokens (``max_position_embeddings``, as vLLM's ``max_model_len``);
    None when the model does not say."""
    try:
        ctx = guard.screening_stage.screener.adapter.text_config.max_position_embeddings
    except AttributeError:
        return None
    return int(ctx) if ctx else None


def create_app(guard: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving ``guard`` (an :class:`~ohd_guard.guard.OhdGuard`) under ``settings``."""
    settings = settings or ServeSettings()
    if getattr(guard.screening_stage, "allow_local_files", False):
        log.warning("the served guard has allow_local_files=True; the server still accepts images only as data: URLs")
    api_key = settings.resolved_api_key()
    requests, streams = (_Gate(settings.max_concurrent_requests, "too_many_requests", "requests"),
                         _Gate(settings.max_concurrent_streams, "too_many_streams", "open streams"))
    app = FastAPI(title="ohd-guard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.guard, app.state.settings, app.state.gates = guard, settings, (requests, streams)
    tokenizer = guard.tokenizer
    sampling = sampling_defaults(getattr(getattr(guard, "model", None), "generation_config", None))
    max_model_len = _max_model_len(guard)
    output = OutputGate(guard, settings.answer_profile) if settings.check_output else None
    template = getattr(guard.processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error(APIError(e.status_code, code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(APIError(400, "invalid_parameter", str(e.errors()[:1])))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        return _error(from_guard_error(e))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid_api_key", "missing or wrong API key (Authorization: Bearer <key>)",
                           headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "detector": getattr(guard.detector, "name", None),
                "refusal": guard.refusal, "on_error": guard.on_error, "active_requests": requests.active,
                "active_streams": streams.active}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "ohd-guard", "max_model_len": max_model_len}]}

    @app.post("/v1/screen")
    async def screen(request: Request) -> JSONResponse:
        authorize(request)
        req = parse(ScreenRequest, await _read_json(request, settings.max_body_bytes, settings.max_json_depth))
        check_model(req.model, settings)
        items = screen_items(req, settings)
        with requests.slot():
            verdicts = await screen_all(guard, items, lambda i: f"conversations[{i}]")
        return JSONResponse({"object": "ohd_guard.screen", "model": settings.model_name,
                             "results": [guard_payload(v, refused=v.flagged, refusal_kind=None) for v in verdicts]},
                            headers={"X-OHD-Guard-Flagged": str(any(v.flagged for v in verdicts)).lower()})

    add_moderations(app, guard=guard, settings=settings, gate=requests, authorize=authorize,
                    read_json=lambda r: _read_json(r, settings.max_body_bytes, settings.max_json_depth))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        authorize(request)
        req = parse(ChatCompletionRequest, await _read_json(request, settings.max_body_bytes, settings.max_json_depth))
        check_model(req.model, settings)
        check_supported(req)
        messages = check_messages(req.messages, settings)
        schemas, choice = tool_setup(req)
        # earlier calls and tool results in the chat template's own tool format where the core reproduces
        # it (Qwen2.5's); the tool definitions in the system message: screened with the conversation
        messages = with_tools(tool_turns(messages, template), schemas, choice)
        names = [s["function"]["name"] for s in schemas]  # only these are parsed as calls
        gen = generation_for(req, settings, sampling)
        if req.stream:
            return await _stream(request, req, messages, gen, tools=names)
        kwargs, counter = gen.guard_kwargs(tokenizer)
        poll = settings.disconnect_poll_s
        with requests.slot():
            try:
                r = await _until_disconnect(request, guard.agenerate(messages, **kwargs), poll)
                reviewed = None
                if output is not None and not r.refused and not is_bad_input(r.verdict):
                    message = _answer(_text(r, gen)[0], False, names)[0]
                    reviewed = await _until_disconnect(request, output.review(messages, message, gen.max_tokens), poll)
            except _ClientGone:
                return JSONResponse({}, status_code=499)
            except Exception as e:
                raise from_guard_error(e) from e
        return _completion(r, gen, counter, tools=names, reviewed=reviewed)

    # --------------------------------------------------------------------------------- answers
    def _meta() -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}

    def _bad_input(verdict: Any) -> APIError:
        return APIError(400, "invalid_input", f"the input cannot be screened: {verdict.error}", param="messages",
                        extra={FIELD: guard_payload(verdict, refused=True, refusal_kind=None)})

    def _answer(text: str, refused: bool, tools: list[str] | None) -> tuple[dict[str, Any], bool]:
        """The assistant message of an answer, and whether it calls tools: calls to the request's
        ``tools`` (their names) are parsed in every form the core reads; JSON naming another is text."""
        if not tools or refused:
            return {"role": "assistant", "content": text}, False
        content, calls, invalid = parse_tool_calls(text, tools)
        if not calls:
            return {"role": "assistant", "content": text}, False
        if invalid:
            log.info("dropped %d unparseable tool call(s)", len(invalid))
        return {"role": "assistant", "content": content or None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in calls]}, True

    def _text(r: Any, gen: Generation) -> tuple[str, bool]:
        """The answer's text as sent (cut before a stop sequence) and whether a stop sequence ended it."""
        return (r.text, False) if r.refused else cut_at_stops(r.text, gen.stops)

    def _completion(r: Any, gen: Generation, counter: TokenCounter, tools: list[str] | None = None,
                    reviewed: Reviewed | None = None) -> JSONResponse:
        v = r.verdict
        if is_bad_input(v):
            raise _bad_input(v)
        if v.flagged and not r.refused:  # the guard never does this; the server would not send it if it did
            raise APIError(500, "internal_error", "a flagged conversation was not refused; nothing was sent")
        text, stopped = _text(r, gen)
        message, calls = _answer(text, r.refused, tools)
        refused, kind, finish = r.refused, r.refusal_kind, "tool_calls" if calls else gen.finish(r.refused, stopped, counter)
        if reviewed is not None and reviewed.flagged:  # the answer is never sent: the refusal is
            message, refused, kind, finish = ({"role": "assistant", "content": reviewed.refusal.text}, True,
                                              reviewed.refusal.refusal_kind, "content_filter")
        body = {**_meta(), "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": counter.usage(),
                FIELD: {**guard_payload(v, refused=refused, refusal_kind=kind), **(reviewed.payload() if reviewed else {})}}
        return JSONResponse(body, headers={**guard_headers(v, refused=refused), **(reviewed.headers() if reviewed else {})})

    async def _stream(request: Request, req: ChatCompletionRequest, messages: list[Any], gen: Generation,
                      tools: list[str] | None = None) -> Any:
        requests.acquire()
        try:
            streams.acquire()
        except APIError:
            requests.release()
            raise
        kwargs, counter = gen.guard_kwargs(tokenizer)
        stream = guard.astream(messages, **kwargs)
        try:  # decide before the first byte: the verdict comes with the first chunk
            first = await _until_disconnect(request, _first(stream), settings.disconnect_poll_s)
            v = stream.verdict
            if v is None:
                raise APIError(500, "internal_error", "the stream ended without a verdict; nothing was sent")
            if is_bad_input(v):
                raise _bad_input(v)
        except BaseException as e:
            await stream.aclose()
            streams.release()
            requests.release()
            if isinstance(e, _ClientGone):
                return JSONResponse({}, status_code=499)
            if isinstance(e, (APIError, asyncio.CancelledError)) or not isinstance(e, Exception):
                raise
            raise from_guard_error(e) from e
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        body = _events(stream, first, v, gen, counter, include_usage, tools, messages)
        held = {"X-OHD-Guard-Output-Check": "held"} if output is not None else {}
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={**guard_headers(v, refused=v.flagged), **held, "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def _first(stream: Any) -> str | None:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    async def _events(stream: Any, first: str | None, v: Any, gen: Generation, counter: TokenCounter,
                      include_usage: bool, tools: list[str] | None = None, messages: Any = None) -> AsyncIterator[str]:
        meta, refused = _meta(), bool(v.flagged)
        chunk = lambda delta, finish=None: {**meta, "object": "chat.completion.chunk",  # noqa: E731
                                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        trimmer = StopTrimmer([] if refused else gen.stops)
        try:
            yield _sse({**chunk({"role": "assistant", "content": ""}),
                        FIELD: guard_payload(v, refused=refused, refusal_kind=None)})
            pieces = [] if first is None else [first]
            held: list[str] = []  # sent whole with tools (a call is only known at its end) or once checked
            buffering = (tools or output is not None) and not refused
            while True:
                for piece in pieces:
                    if out := trimmer.feed(piece):
                        if buffering:
                            held.append(out)
                        else:
                            yield _sse(chunk({"content": out}))
                if trimmer.stopped:
                    break
                try:
                    pieces = [await stream.__anext__()]
                except StopAsyncIteration:
                    break
            if out := trimmer.flush():
                if buffering:
                    held.append(out)
                else:
                    yield _sse(chunk({"content": out}))
            calls, reviewed = False, None
            if held:
                message, calls = _answer("".join(held), refused, tools)
                if output is not None:
                    reviewed = await output.review(messages, message, gen.max_tokens)
                    if reviewed.flagged:  # the answer is never sent: the refusal is
                        message, calls = {"role": "assistant", "content": reviewed.refusal.text}, False
                delta = {"content": message["content"]} if not calls else {
                    "content": message["content"],
                    "tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}
                yield _sse(chunk(delta))
            r = stream.response
            finish = gen.finish(refused, trimmer.stopped, counter)
            if reviewed is not None and reviewed.flagged:
                finish = "content_filter"
            final = chunk({}, "tool_calls" if calls else finish)
            if r is not None:
                refused_now, kind = r.refused, r.refusal_kind
                if reviewed is not None and reviewed.flagged:
                    refused_now, kind = True, reviewed.refusal.refusal_kind
                final[FIELD] = guard_payload(r.verdict, refused=refused_now, refusal_kind=kind)
                if reviewed is not None:
                    final[FIELD].update(reviewed.payload())
            yield _sse(final)
            if include_usage:
                yield _sse({**meta, "object": "chat.completion.chunk", "choices": [],
                            "usage": counter.usage()})
            yield "data: [DONE]\n\n"
        except Exception as e:  # after the first byte an error can only be an event: the answer stops here
            yield _sse(from_guard_error(e).body())
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()
            streams.release()
            requests.release()

    return app
