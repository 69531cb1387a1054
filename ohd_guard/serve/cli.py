"""``ohd-guard serve``: the OpenAI-compatible server, in one process (uvicorn) or on Ray Serve."""

from __future__ import annotations

import argparse
import sys

from ohd_guard.serve.settings import API_KEY_ENV, GuardSpec, ServeSettings

_DEFAULTS = ServeSettings()


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serve the guarded model over an OpenAI-compatible HTTP API (docs/serving.md)")
    g = s.add_argument_group("guard")
    g.add_argument("--model", default=None, help="embedded model name, local HF folder or .gguf (default: the embedded default)")
    g.add_argument("--profile", default=None, help="profile JSON of any detector (default: the model's shipped one)")
    g.add_argument("--factory", default=None, metavar="MODULE:FUNCTION",
                   help="build the guard with this function instead (it gets OhdGuard's options), e.g. "
                        "ohd_guard.serve.demo:planted_guard for a tiny demo model")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--refusal", choices=["anchored", "static", "raise"], default="anchored",
                   help="flagged requests: anchored/static refusal (HTTP 200, finish_reason content_filter) or raise (HTTP 403)")
    g.add_argument("--on-error", choices=["refuse", "raise", "allow"], default="refuse")
    g.add_argument("--allow-edited", action="store_true", help="accept a profile edited after calibration")
    h = s.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 to expose it)")
    h.add_argument("--port", type=int, default=8000)
    h.add_argument("--model-name", default=_DEFAULTS.model_name, help="the model id clients send (default %(default)s)")
    h.add_argument("--api-key", default=None, help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV} if set)")
    h.add_argument("--max-body-bytes", type=int, default=_DEFAULTS.max_body_bytes)
    h.add_argument("--max-image-bytes", type=int, default=_DEFAULTS.max_image_bytes)
    h.add_argument("--max-image-pixels", type=int, default=_DEFAULTS.max_image_pixels)
    h.add_argument("--max-concurrent-requests", type=int, default=_DEFAULTS.max_concurrent_requests)
    h.add_argument("--max-concurrent-streams", type=int, default=_DEFAULTS.max_concurrent_streams)
    h.add_argument("--max-tokens-limit", type=int, default=_DEFAULTS.max_tokens_limit)
    h.add_argument("--log-level", default="info")
    r = s.add_argument_group("Ray Serve")
    r.add_argument("--ray", action="store_true", help="serve on Ray Serve, one guarded model per replica")
    r.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscale between --min-replicas and --max-replicas")
    r.add_argument("--max-replicas", type=int, default=None)
    r.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (ray_actor_options num_gpus)")
    r.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica (default 1)")
    r.add_argument("--ray-address", default=None, help="an existing Ray cluster (e.g. auto); default: start one locally")
    s.set_defaults(func=cmd_serve, parser=s)
    return s


def _settings(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(model_name=args.model_name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                         max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                         max_concurrent_requests=args.max_concurrent_requests,
                         max_concurrent_streams=args.max_concurrent_streams, max_tokens_limit=args.max_tokens_limit)


def _spec(args: argparse.Namespace) -> GuardSpec:
    return GuardSpec(model=args.model, profile=args.profile, factory=args.factory, refusal=args.refusal,
                     on_error=args.on_error, device=args.device, dtype=args.dtype, allow_edited=args.allow_edited)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
        args.parser.error("--min-replicas must not exceed --max-replicas")
    try:
        settings, spec = _settings(args), _spec(args)
    except ValueError as e:  # pydantic's ValidationError: a limit out of range, said before any model loads
        args.parser.error(str(e))
    try:
        if args.ray:
            import ray

            from ohd_guard.serve.ray_app import guard_app, run

            auto = None
            if args.min_replicas is not None or args.max_replicas is not None:
                lo = args.min_replicas or 1
                auto = {"min_replicas": lo, "max_replicas": args.max_replicas or lo}
            actor = {"num_cpus": args.num_cpus, **({"num_gpus": args.num_gpus} if args.num_gpus else {})}
            ray.init(address=args.ray_address)
            run(guard_app(spec, settings, num_replicas=args.replicas, autoscaling=auto, ray_actor_options=actor),
                host=args.host, port=args.port, blocking=True)
            return 0
        from ohd_guard.serve import require

        require("fastapi"), require("uvicorn")  # before loading a model that could not be served
        from ohd_guard.serve.server import run as run_uvicorn

        run_uvicorn(spec.build(settings), settings, host=args.host, port=args.port, log_level=args.log_level)
        return 0
    except ImportError as e:
        hint = str(e) if "pip install" in str(e) else f"{e}: pip install 'ohd-guard[{'ray' if args.ray else 'serve'}]'"
        print(f"ohd-guard: error: {hint}", file=sys.stderr)
        return 2
