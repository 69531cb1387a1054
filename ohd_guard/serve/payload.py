"""The verdict as it travels with every answer: the ``ohd_guard`` field of JSON bodies and of the
first SSE chunk, and the ``X-OHD-Guard-*`` headers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

FIELD = "ohd_guard"


def guard_payload(verdict: Any, *, refused: bool, refusal_kind: str | None) -> dict[str, Any]:
    """``{"flagged", "refused", "refusal_kind", "verdict": Verdict.model_dump(mode="json")}``."""
    return {"flagged": bool(verdict.flagged), "refused": bool(refused), "refusal_kind": refusal_kind,
            "verdict": verdict.model_dump(mode="json")}


def guard_headers(verdict: Any, *, refused: bool) -> dict[str, str]:
    h = {"X-OHD-Guard-Flagged": str(bool(verdict.flagged)).lower(), "X-OHD-Guard-Refused": str(bool(refused)).lower(),
         "X-OHD-Guard-Detector": str(verdict.detector)}
    if verdict.score is not None:
        h["X-OHD-Guard-Score"] = f"{float(verdict.score):.6g}"
    if verdict.error:
        h["X-OHD-Guard-Error"] = verdict.error.split(":", 1)[0]
    return h


def is_bad_input(verdict: Any) -> bool:
    """A verdict whose screening failed on the client's input (undecodable image, prompt too long...):
    the server answers it 400 invalid_input, whatever the refusal policy (it is refused either way)."""
    return bool(verdict.error) and verdict.error.startswith("InvalidInputError")


async def screen_all(guard: Any, items: list[Any], where: Callable[[int], str]) -> list[Any]:
    """Screen ``items`` concurrently on the guard's worker (micro-batched) and return their verdicts; an
    item the guard could not screen because of the input itself (blank text, an undecodable image) is
    the client's 400 ``invalid_input`` naming ``where(i)``, any other failure a typed 5xx."""
    from ohd_guard.serve.errors import APIError, from_guard_error

    try:
        verdicts = await asyncio.gather(*(guard.ascreen(c) for c in items))
    except Exception as e:
        raise from_guard_error(e) from e
    for i, v in enumerate(verdicts):
        if is_bad_input(v):
            raise APIError(400, "invalid_input", f"{where(i)}: the input cannot be screened: {v.error}", param=where(i),
                           extra={FIELD: guard_payload(v, refused=True, refusal_kind=None)})
    return list(verdicts)
