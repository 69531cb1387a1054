"""Serving the guarded model over HTTP: an OpenAI-compatible API (FastAPI + uvicorn) and a Ray Serve
deployment that scales it out, one guarded model per replica. See docs/serving.md.

The HTTP stack is an optional extra: ``import ohd_guard`` never imports FastAPI, uvicorn or Ray;
this package imports them only when an app is built (:func:`create_app`), a server is run, or the Ray
deployment is made, and a missing package fails with a one-line install hint.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ohd_guard.serve.settings import GuardSpec, ServeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ohd_guard.guard import OhdGuard

__all__ = ["GuardSpec", "ServeSettings", "create_app", "require"]

_HINTS = {"fastapi": "serve", "uvicorn": "serve", "ray": "ray"}


def require(module: str) -> Any:
    """Import ``module`` or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = _HINTS.get(module.split(".")[0], "serve")
        raise ImportError(f"ohd-guard serving needs {module.split('.')[0]!r}: pip install 'ohd-guard[{extra}]'") from e


def create_app(guard: OhdGuard, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``guard`` (see :func:`ohd_guard.serve.app.create_app`)."""
    require("fastapi")
    from ohd_guard.serve.app import create_app as _create

    return _create(guard, settings)
