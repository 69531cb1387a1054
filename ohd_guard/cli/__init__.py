"""The ``ohd-guard`` command: calibrate, screen, inspect, eval."""

from __future__ import annotations

import argparse
import logging
import sys

from ohd_guard.cli import calibrate, eval, inspect, screen
from ohd_guard.cli.common import DEFAULT_PROFILE, OHD_PROFILE, SHIPPED_PROFILES
from ohd_guard.cli.eval import EVAL_DETECTORS
from ohd_guard.cli.screen import screen_json
from ohd_guard.errors import OhdGuardError

__all__ = ["DEFAULT_PROFILE", "EVAL_DETECTORS", "OHD_PROFILE", "SHIPPED_PROFILES", "build_parser", "main", "screen_json"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ohd-guard", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log at INFO and show transformers' warnings and weight-loading progress bars")
    sub = p.add_subparsers(dest="command", required=True)
    for command in (calibrate, screen, inspect, eval):
        command.add_parser(sub)
    from ohd_guard.serve.cli import add_parser as add_serve_parser  # FastAPI/Ray are imported only when serving

    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ohd_guard.hf_internals import quiet_transformers

    quiet_transformers(not args.verbose)
    try:
        return args.func(args)
    except OhdGuardError as e:
        print(f"ohd-guard: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
