"""Shared by every tier (unit, integration, acceptance): the planted models and guards come from the
ohd_guard.testing.fixtures plugin; the real embedded model is loaded once per session (slow tests only)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

pytest_plugins = ["ohd_guard.testing.fixtures"]


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer) of the embedded Qwen2.5-Coder-0.5B-Instruct (built once into the cache)."""
    from ohd_guard.loading import load_model

    return load_model()
