"""``ohd-guard serve``: the OpenAI-compatible server, in one process (uvicorn) or on Ray Serve."""

from __future__ import annotations

import argparse
import sys

from ohd_guard.serve.settings import API_KEY_ENV, ENV_PREFIX, GuardSpec, ServeSettings

_DEFAULTS = ServeSettings()
_SETTING_FLAGS: dict[str, type] = {
    "max_body_bytes": int, "max_image_bytes": int, "max_image_pixels": int, "max_concurrent_requests": int,
    "max_concurrent_streams": int, "default_max_tokens": int, "max_tokens_limit": int, "max_json_depth": int,
    "max_screen_batch": int, "disconnect_poll_s": float,
}
"""The limits with a flag each (``--max-body-bytes``...); every one also reads ``OHD_GUARD_<NAME>``."""


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
    g.add_argument("--scope", choices=["conversation", "latest"], default="conversation",
                   help="conversation (default): an earlier user/tool message read over the threshold still flags; "
                        "latest: only the final read decides, so a thread recovers (docs/guard.md)")
    g.add_argument("--allow-edited", action="store_true", help="accept a profile edited after calibration")
    h = s.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 to expose it)")
    h.add_argument("--port", type=int, default=8000)
    h.add_argument("--model-name", default=None, help=f"the model id clients send (default {_DEFAULTS.model_name})")
    h.add_argument("--api-key", default=None, help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV} if set)")
    for name, kind in _SETTING_FLAGS.items():
        h.add_argument("--" + name.replace("_", "-"), type=kind, default=None, dest=name,
                       help=f"default {getattr(_DEFAULTS, name)}; or ${ENV_PREFIX}{name.upper()}")
    g.add_argument("--check-output", action="store_const", const=True, default=None, dest="check_output",
                   help="check every answer before it is sent; a flagged one is refused, streams are held back "
                        f"until checked (or ${ENV_PREFIX}CHECK_OUTPUT=1)")
    g.add_argument("--answer-profile", default=None, dest="answer_profile", metavar="PATH",
                   help="the output check's profile (default: the one shipped for the model)")
    g.add_argument("--max-batch-size", type=int, default=16, help="conversations per batched prefill (default 16)")
    g.add_argument("--max-decode-batch", type=int, default=16,
                   help="answers decoding together, one batched forward per token (default 16); more wait, "
                        "up to --max-concurrent-requests, then 429")
    g.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the micro-batcher waits for more requests (default 5 ms)")
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
    """Flags given on the command line over ``OHD_GUARD_*`` environment variables over the defaults."""
    names = ["model_name", "api_key", "check_output", "answer_profile", *_SETTING_FLAGS]
    return ServeSettings.from_env(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})


def _spec(args: argparse.Namespace) -> GuardSpec:
    return GuardSpec(model=args.model, profile=args.profile, factory=args.factory, refusal=args.refusal,
                     on_error=args.on_error, scope=args.scope, device=args.device, dtype=args.dtype, allow_edited=args.allow_edited,
                     max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                     max_decode_batch=args.max_decode_batch)


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
