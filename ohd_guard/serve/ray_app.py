"""Scale-out on Ray Serve: one guarded model per replica, behind Ray's HTTP proxy.

Each replica builds its own :class:`~ohd_guard.guard.OhdGuard` from a :class:`GuardSpec` (plain data,
so replicas on other nodes build theirs too) and serves the same FastAPI app as ``ohd-guard serve``
(:func:`ohd_guard.serve.app.create_app`), wired in with ``serve.ingress`` and built at replica start
(``__serve_build_asgi_app__``). Ray routes each request to one replica; the replica's guard worker
micro-batches what it gets. A GPU per replica: ``ray_actor_options={"num_gpus": 1}``. See
docs/serving.md (multi-node clusters, autoscaling, GPUs).

Use from Python::

    from ohd_guard.serve.ray_app import guard_app, run
    run(guard_app(GuardSpec(), ServeSettings(), num_replicas=2), port=8000)

or with Ray's own CLI: ``serve run ohd_guard.serve.ray_app:app_builder replicas=2`` (typed, strict
arguments: :class:`~ohd_guard.serve.ray_args.AppArgs`).
"""

# No ``from __future__ import annotations`` here: Ray reads app_builder's parameter annotation as a
# class (``inspect.signature``) to validate its arguments, and a string annotation would skip that.

import asyncio
import logging
import time
from typing import Any

from ohd_guard.serve import require
from ohd_guard.serve.ray_args import AppArgs
from ohd_guard.serve.settings import GuardSpec, ServeSettings

serve = require("ray.serve")
log = logging.getLogger("ohd_guard.serve")

DEPLOYMENT_NAME = "OhdGuard"
APP_NAME = "ohd-guard"
HEALTH_TIMEOUT_S = 10.0


@serve.ingress()
class GuardReplica:
    """One replica: a guarded model and the app serving it."""

    def __init__(self, spec: dict[str, Any], settings: dict[str, Any]):
        self.settings = ServeSettings.model_validate(settings)
        self.guard = GuardSpec.model_validate(spec).build(self.settings)

    def __serve_build_asgi_app__(self) -> Any:
        from ohd_guard.serve.app import create_app

        self.guard_app = create_app(self.guard, self.settings)
        return self.guard_app

    async def check_health(self) -> None:
        """Ray's health check: an idle replica proves its guard's worker thread answers (a no-op job);
        a busy one is answering requests already. Raising marks the replica unhealthy (Ray replaces it)."""
        requests, _ = self.guard_app.state.gates
        if requests.active:
            return
        await asyncio.wait_for(self.guard.worker.submit("call", fn=lambda: None), HEALTH_TIMEOUT_S)


def guard_app(spec: GuardSpec, settings: ServeSettings, *, num_replicas: int = 1,
              autoscaling: dict[str, Any] | None = None, ray_actor_options: dict[str, Any] | None = None,
              max_queued_requests: int = -1, health_check_period_s: float = 10.0,
              health_check_timeout_s: float = 30.0) -> Any:
    """The Ray Serve application: ``num_replicas`` fixed replicas, or ``autoscaling`` bounds such as
    ``{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}``. Each replica takes
    ``ray_actor_options`` (default one CPU; ``{"num_gpus": 1}`` for a GPU each) and at most
    ``settings.max_concurrent_requests`` requests; Ray queues the rest (at most ``max_queued_requests``,
    -1: no bound; past it the proxy answers 503)."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME, "ray_actor_options": ray_actor_options or {"num_cpus": 1},
        "max_ongoing_requests": settings.max_concurrent_requests, "max_queued_requests": max_queued_requests,
        "health_check_period_s": health_check_period_s, "health_check_timeout_s": health_check_timeout_s,
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = num_replicas
    return serve.deployment(GuardReplica, **options).bind(spec.model_dump(), settings.model_dump())


def app_builder(args: AppArgs) -> Any:
    """For ``serve run ohd_guard.serve.ray_app:app_builder key=value ...``: Ray validates the
    ``key=value`` pairs against :class:`~ohd_guard.serve.ray_args.AppArgs` (the keys of
    :class:`GuardSpec` and :class:`ServeSettings`, plus ``replicas``, ``min_replicas``/``max_replicas``,
    ``num_gpus``, ``num_cpus``; a wrong key or value is an error naming it). A plain dict is
    validated the same way when called from Python."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    return guard_app(args.spec(), args.settings(), num_replicas=args.replicas, autoscaling=args.autoscaling(),
                     ray_actor_options=args.actor_options())


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, *, blocking: bool = False) -> Any:
    """Start Serve's HTTP proxy on ``host:port`` and deploy ``app`` (Ray must be initialised, or it is
    started locally); returns the deployment handle, or blocks until interrupted."""
    ray = require("ray")
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(app, name=APP_NAME, route_prefix="/")
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return handle
