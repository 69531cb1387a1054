"""The verdict as it travels with every answer: the ``ohd_guard`` field of JSON bodies and of the
first SSE chunk, and the ``X-OHD-Guard-*`` headers."""

from __future__ import annotations

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

