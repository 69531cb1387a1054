"""Run only :data:`REAL_MODEL_TESTS` of the real-model class (each costs real generations)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: uses a real embedded model")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from .test_chat_models_real import REAL_MODEL_TESTS, TestChatOhdGuardRealModel

    keep, drop = [], []
    for item in items:
        cls = getattr(item, "cls", None)
        name = getattr(item, "originalname", item.name)
        (drop if cls is TestChatOhdGuardRealModel and name not in REAL_MODEL_TESTS else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
