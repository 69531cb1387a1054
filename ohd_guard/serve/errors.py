"""Typed HTTP errors in the OpenAI shape, ``{"error": {"message", "type", "param", "code"}}``, and how
the guard's own errors map onto them. Nothing here ever carries an unguarded answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ohd_guard.errors import GuardViolation, InvalidInputError, OhdGuardError, ScreeningError

if TYPE_CHECKING:
    from ohd_guard.guard import OhdGuard
    from ohd_guard.types import Verdict

log = logging.getLogger("ohd_guard.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "guard_violation", 404: "not_found_error",
          405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error", 500: "server_error",
          503: "server_error"}


class APIError(Exception):
    """An HTTP error with an OpenAI-style typed body; ``extra`` adds top-level fields (the verdict)."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.extra, self.headers = extra or {}, headers or {}

    def body(self) -> dict[str, Any]:
        err = {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"), "param": self.param,
               "code": self.code}
        return {"error": err, **self.extra}


def from_guard_error(exc: BaseException, verdict_payload: dict[str, Any] | None = None) -> APIError:
    """The HTTP error for an exception out of the guard: its policy refused (403), the input cannot be
    screened (400), screening failed (500). Unknown exceptions are logged and become a bare 500."""
    extra = {"ohd_guard": verdict_payload} if verdict_payload else None
    if isinstance(exc, GuardViolation):
        from ohd_guard.serve.payload import guard_payload

        return APIError(403, "content_flagged", f"the guard flagged this conversation: {exc}",
                        extra={"ohd_guard": guard_payload(exc.verdict, refused=True, refusal_kind=None)})
    if isinstance(exc, InvalidInputError):
        return APIError(400, "invalid_input", str(exc), param="messages", extra=extra)
    if isinstance(exc, ScreeningError):
        log.warning("screening failed: %s", exc)
        return APIError(500, "screening_error", "screening failed; nothing was generated", extra=extra)
    if isinstance(exc, OhdGuardError):
        log.warning("guard error: %s: %s", type(exc).__name__, exc)
        return APIError(500, "guard_error", f"{type(exc).__name__}: {exc}", extra=extra)
    log.error("internal error while serving", exc_info=exc)
    return APIError(500, "internal_error", "internal error; nothing was generated")


async def screen_all(guard: OhdGuard, items: list[Any], where: Callable[[int], str]) -> list[Verdict]:
    """Screen ``items`` concurrently on the guard's worker (micro-batched) and return their verdicts; an
    item the guard could not screen because of the input itself (blank text, an undecodable image) is
    the client's 400 ``invalid_input`` naming ``where(i)``, any other failure a typed 5xx."""
    from ohd_guard.serve.payload import FIELD, guard_payload, is_bad_input

    try:
        verdicts = await asyncio.gather(*(guard.ascreen(c) for c in items))
    except Exception as e:
        raise from_guard_error(e) from e
    for i, v in enumerate(verdicts):
        if is_bad_input(v):
            raise APIError(400, "invalid_input", f"{where(i)}: the input cannot be screened: {v.error}", param=where(i),
                           extra={FIELD: guard_payload(v, refused=True, refusal_kind=None)})
    return list(verdicts)
