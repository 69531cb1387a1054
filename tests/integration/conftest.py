"""The server tests' shared fixtures, module-scoped: ``guard`` (built by the module's ``GUARD``, closed
after its tests), ``server`` (a real uvicorn on 127.0.0.1 serving it with the module's ``SETTINGS``,
a ``ServeSettings``) and ``client`` (an openai client of that server). A module that defines its own
fixture of the same name uses that one. Imports are lazy: modules skip when fastapi/uvicorn/openai
are missing, and the other integration tests never need them."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="module")
def guard(request: pytest.FixtureRequest) -> Any:
    g = request.module.GUARD()
    yield g
    g.close()


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, guard: Any) -> Any:
    from ohd_guard.serve.app import create_app
    from ohd_guard.serve.server import ServerThread

    with ServerThread(create_app(guard, request.module.SETTINGS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
