"""``POST /v1/moderations`` in OpenAI's shape, so moderation clients (``openai.moderations.create``,
LangChain's ``OpenAIModerationMiddleware``, gateways) can put the local guard in front of any model.

The guard has one signal, "unsafe": it does not tell categories apart. Every OpenAI category key is
present (clients index them), and the verdict goes to one umbrella category, ``illicit``
(``categories.illicit`` is the verdict's ``flagged``, ``category_scores.illicit`` its ``risk``);
every other category is ``false`` with score ``0.0``. ``flagged`` is the verdict's ``flagged``, so
a client that reads ``flagged`` (the middleware does) sees exactly what the guard decided, and the
``ohd_guard`` field of each result carries the whole verdict. A verdict without a risk (screening
failed and ``on_error`` decided) scores 1.0 when flagged, 0.0 when not.

Any ``model`` id is accepted (clients send ``omni-moderation-latest``) and echoed back. Items are
screened concurrently through ``guard.ascreen``, so they share the guard's micro-batched prefills.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ohd_guard.serve.errors import APIError, screen_all
from ohd_guard.serve.payload import FIELD, guard_payload
from ohd_guard.serve.schema import check_messages, parse
from ohd_guard.serve.settings import ServeSettings
from ohd_guard.types import Verdict

if TYPE_CHECKING:
    from ohd_guard.guard import OhdGuard

CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
              "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
              "violence/graphic")
"""OpenAI's moderation category keys (``openai.types.Moderation``), all present in every result."""
UMBRELLA = "illicit"
"""The category that carries the guard's one verdict."""


class ModerationRequest(BaseModel):
    """OpenAI's body: ``input`` is a string, a list of strings (one result each), or a list of
    ``text``/``image_url`` parts (one multimodal input, one result)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    input: str | list[Any] = Field(...)
    model: str | None = None


def _items(req: ModerationRequest, settings: ServeSettings) -> list[Any]:
    """The conversations to screen; empty or blank text is 400 ``invalid_input`` naming the item."""
    def blank(where: str) -> APIError:
        return APIError(400, "invalid_input", f"{where}: empty or blank text; there is nothing to moderate", param=where)

    if isinstance(req.input, str):
        if not req.input.strip():
            raise blank("input")
        return [req.input]
    if not req.input:
        raise APIError(400, "invalid_input", "input: an empty list; there is nothing to moderate", param="input")
    if all(isinstance(x, dict) for x in req.input):  # one multimodal input
        if len(req.input) > settings.max_screen_batch:
            raise APIError(400, "batch_too_large", f"input: at most max_screen_batch={settings.max_screen_batch} "
                           "parts", param="input")
        msgs = check_messages([{"role": "user", "content": req.input}], settings, "input")
        texts = [p.get("text", "") for p in req.input if p.get("type") == "text"]
        if all(not t.strip() for t in texts) and not any(p.get("type") == "image_url" for p in req.input):
            raise blank("input")
        return [msgs]
    if not all(isinstance(x, str) for x in req.input):
        raise APIError(400, "invalid_parameter", "input: a string, a list of strings, or a list of text/image_url "
                       "parts", param="input")
    if len(req.input) > settings.max_screen_batch:
        raise APIError(400, "batch_too_large", f"input: at most max_screen_batch={settings.max_screen_batch} strings "
                       "per request", param="input")
    for i, s in enumerate(req.input):
        if not s.strip():
            raise blank(f"input[{i}]")
    return list(req.input)


def moderation_result(verdict: Verdict) -> dict[str, Any]:
    """One ``results`` entry for a verdict (see the module docstring for the category mapping)."""
    flagged = bool(verdict.flagged)
    risk = verdict.risk if verdict.risk is not None else (1.0 if flagged else 0.0)
    return {"flagged": flagged,
            "categories": {k: (flagged if k == UMBRELLA else False) for k in CATEGORIES},
            "category_scores": {k: (float(risk) if k == UMBRELLA else 0.0) for k in CATEGORIES},
            "category_applied_input_types": {k: ["text"] for k in CATEGORIES},
            FIELD: guard_payload(verdict, refused=flagged, refusal_kind=None)}


def add_moderations(app: FastAPI, *, guard: OhdGuard, settings: ServeSettings, gate: Any,
                    authorize: Callable[[Request], None], read_json: Callable[[Request], Awaitable[Any]]) -> None:
    """Add the route to ``app``, under the same auth, body limits and request gate as the others."""

    @app.post("/v1/moderations")
    async def moderations(request: Request) -> JSONResponse:
        authorize(request)
        req = parse(ModerationRequest, await read_json(request))
        items = _items(req, settings)
        with gate.slot():
            verdicts = await screen_all(guard, items, lambda i: "input" if len(items) == 1 else f"input[{i}]")
        return JSONResponse({"id": f"modr-{uuid.uuid4().hex}", "model": req.model or settings.model_name,
                             "results": [moderation_result(v) for v in verdicts]},
                            headers={"X-OHD-Guard-Flagged": str(any(v.flagged for v in verdicts)).lower()})
