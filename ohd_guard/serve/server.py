"""Running the app: :func:`run` (the ``ohd-guard serve`` process) and :class:`ServerThread`, a real
uvicorn server on a free loopback port in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from ohd_guard.serve import require
from ohd_guard.serve.settings import ServeSettings


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _config(app: Any, host: str, port: int, log_level: str) -> Any:
    uvicorn = require("uvicorn")
    # one process, one event loop: the guard's worker thread owns the model; scale out with --ray
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1, timeout_graceful_shutdown=5,
                          h11_max_incomplete_event_size=64 * 1024)


def run(guard: Any, settings: ServeSettings | None = None, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "info") -> None:
    """Serve ``guard`` until interrupted."""
    from ohd_guard.serve.app import create_app

    require("uvicorn").Server(_config(create_app(guard, settings), host, port, log_level)).run()


class ServerThread:
    """``with ServerThread(create_app(guard)) as srv: srv.url``: uvicorn on 127.0.0.1, stopped on exit."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        self.host, self.port = host, port or free_port(host)
        self.server = require("uvicorn").Server(_config(app, self.host, self.port, log_level))
        self.thread = threading.Thread(target=self.server.run, name="ohd-guard-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
