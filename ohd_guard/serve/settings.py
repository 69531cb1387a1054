"""What a server is configured with: its limits (:class:`ServeSettings`) and which guard it serves
(:class:`GuardSpec`, a plain description a Ray replica can rebuild the guard from)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "OHD_GUARD_"
"""Every :class:`ServeSettings` field can come from ``OHD_GUARD_<FIELD>`` (:meth:`ServeSettings.from_env`)."""
API_KEY_ENV = "OHD_GUARD_API_KEY"
"""Environment variable holding the bearer token when ``--api-key`` is not given."""


class ServeSettings(BaseModel):
    """Limits and identity of one server. Every limit exists so that hostile traffic costs a typed 4xx,
    never memory, a hung worker or an unguarded answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model_name: str = "ohd-guard"
    """The model id clients send (``GET /v1/models`` lists it); other ids get 404 model_not_found."""
    api_key: str | None = None
    """Bearer token required on every route but ``/health`` (None: no auth)."""
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_image_bytes: int = Field(8 * 1024 * 1024, gt=0)
    """Per image, decoded (checked on the base64 length before decoding)."""
    max_image_pixels: int = Field(4096 * 4096, gt=0)
    """Per image, from the image header before decoding (the guard's ConversationLimits)."""
    max_concurrent_requests: int = Field(64, gt=0)
    """Requests in flight at once (streams included); more get 429 too_many_requests."""
    max_concurrent_streams: int = Field(16, gt=0)
    """Open SSE streams at once; more get 429 too_many_streams."""
    default_max_tokens: int = Field(256, gt=0)
    """``max_tokens`` of a request that sends none; left unset, it is clamped to ``max_tokens_limit``."""
    max_tokens_limit: int = Field(2048, gt=0)
    """Largest ``max_tokens`` accepted (400 above it)."""
    max_json_depth: int = Field(64, gt=0, le=512)
    """Nesting depth of a request body (400 ``invalid_json`` deeper): a deep body would otherwise reach
    recursive code (the JSON parser itself, then schema and template code) as a RecursionError."""
    max_screen_batch: int = Field(64, gt=0)
    """Conversations per ``POST /v1/screen``."""
    disconnect_poll_s: float = Field(0.2, gt=0)
    """How often a non-streamed request checks that its client is still there."""
    check_output: bool = False
    """Check every answer before it is sent (:mod:`ohd_guard.serve.output`): a flagged one is replaced
    by the refusal; streams are held back until the whole answer was checked."""
    answer_profile: str | None = None
    """The output check's profile (a path; default: the one shipped for the served model)."""

    @model_validator(mode="before")
    @classmethod
    def _clamp_default_max_tokens(cls, data: Any) -> Any:
        """``--max-tokens-limit 64`` alone must not make every request without ``max_tokens`` a 400."""
        limit = data.get("max_tokens_limit") if isinstance(data, dict) else None
        if isinstance(limit, str) and limit.strip().isdigit():  # from an OHD_GUARD_* variable
            limit = int(limit)
        if isinstance(limit, int) and "default_max_tokens" not in data:
            default = cls.model_fields["default_max_tokens"].default
            data = {**data, "default_max_tokens": max(1, min(default, limit))}
        return data

    @model_validator(mode="after")
    def _default_within_limit(self) -> ServeSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} is over max_tokens_limit="
                             f"{self.max_tokens_limit}: every request without max_tokens would be refused")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Settings from ``OHD_GUARD_<FIELD>`` environment variables (``OHD_GUARD_MAX_TOKENS_LIMIT=512``,
        ``OHD_GUARD_MODEL_NAME=...``), then ``overrides`` (the flags a user gave) on top. Values are
        validated as flags are: a bad one is a ValueError naming the variable. Other ``OHD_GUARD_*``
        variables (``OHD_GUARD_CACHE``, ...) belong to other parts and are left alone.
        (pydantic-settings would do this; it is not a dependency.)"""
        env = os.environ if environ is None else environ
        known = {ENV_PREFIX + name.upper(): name for name in cls.model_fields}
        data: dict[str, Any] = {known[k]: v for k, v in env.items() if k in known and v != ""}
        try:
            return cls(**{**data, **overrides})
        except ValidationError as e:
            loc = str(e.errors()[0]["loc"][0]) if e.errors() and e.errors()[0]["loc"] else ""
            where = f"{ENV_PREFIX}{loc.upper()} or --{loc.replace('_', '-')}" if loc else "settings"
            raise ValueError(f"{where}: {e.errors()[0]['msg']}") from None

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None


class GuardSpec(BaseModel):
    """How to build the served guard: a model reference and profile (as ``OhdGuard.load`` takes them),
    or ``factory="module:function"`` returning an :class:`~ohd_guard.guard.OhdGuard`. Plain data, so a
    Ray replica on another node builds its own guard from it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str | None = None
    profile: str | None = None
    factory: str | None = None
    refusal: Literal["anchored", "static", "raise"] = "anchored"
    on_error: Literal["refuse", "raise", "allow"] = "refuse"
    scope: Literal["conversation", "latest"] = "conversation"
    """``OhdGuard(scope=...)``: whether an earlier flagged user/tool message still flags (docs/guard.md)."""
    device: str = "auto"
    dtype: str = "auto"
    allow_edited: bool = False
    max_batch_size: int = Field(16, gt=0)
    max_wait_ms: float = Field(5.0, ge=0)
    max_decode_batch: int = Field(16, gt=0)
    """Answers decoding together (one batched forward per token); more requests wait in the guard's
    queue, up to ``max_concurrent_requests`` in all, past which the server answers 429."""
    options: dict[str, Any] = {}
    """Extra keyword arguments for the factory."""

    def build(self, settings: ServeSettings | None = None) -> Any:
        """Build the guard. Never with ``allow_local_files``: clients must not name server files."""
        from ohd_guard.conversation import ConversationLimits
        from ohd_guard.guard import OhdGuard

        settings = settings or ServeSettings()
        limits = ConversationLimits(max_image_bytes=settings.max_image_bytes, max_image_pixels=settings.max_image_pixels,
                                    max_total_pixels=max(settings.max_image_pixels, 2 * 4096 * 4096))
        opts = dict(refusal=self.refusal, on_error=self.on_error, scope=self.scope, limits=limits,
                    max_batch_size=self.max_batch_size,
                    max_wait_ms=self.max_wait_ms, max_decode_batch=self.max_decode_batch, allow_local_files=False)
        if self.factory:
            mod, _, attr = self.factory.partition(":")
            if not mod or not attr:
                raise ValueError(f"factory must be 'module:function', not {self.factory!r}")
            return getattr(importlib.import_module(mod), attr)(**opts, **self.options)
        return OhdGuard.load(self.model, self.profile, device=self.device, dtype=self.dtype,
                             allow_edited=self.allow_edited, **opts)
