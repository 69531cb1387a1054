"""Shared by every tier (unit, integration, acceptance): the planted models and guards come from the
ohd_guard.testing.fixtures plugin; the real embedded models are loaded once per session (slow tests only)."""

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


@pytest.fixture(scope="session")
def embedded_model_named(request):
    """``load(name)``: (model, tokenizer) of an embedded model, loaded once per session (the default is
    ``real_model``); skips, naming the extra to install, where its packages are missing."""
    import importlib.util

    from ohd_guard.loading import embedded_model, load_model

    loaded: dict[str, tuple] = {}

    def load(name: str) -> tuple:
        m = embedded_model(name)
        if m.name == embedded_model(None).name:
            return request.getfixturevalue("real_model")
        missing = [p for p in m.packages if importlib.util.find_spec(p) is None]
        if missing:
            pytest.skip(f"{m.name} needs pip install 'ohd-guard[{m.extra}]' ({missing[0]} is not installed)")
        if m.name not in loaded:
            loaded[m.name] = load_model(m.name)
        return loaded[m.name]

    return load
