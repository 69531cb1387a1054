"""The package's tests run on the planted guards of the ``ohd_guard.testing.fixtures`` plugin (a tiny
Llama whose head L1.H2 fires on "zorblax", calibrated in a second on CPU). No test downloads anything."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

pytest_plugins = ["ohd_guard.testing.fixtures"]


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: uses a real embedded model")
