"""pytest plugin: the planted models, prompts and guards that the core suite and both integration
packages' suites share, written once. Register it in a suite's top ``conftest.py`` with
``pytest_plugins = ["ohd_guard.testing.fixtures"]``.

Fixtures: ``planted_model`` (a fresh :func:`~ohd_guard.testing.planted_head_model` per module, so a
test module may hook or move it), ``planted_guard`` (the tiny Llama, head L1.H2 fires on "zorblax")
and ``planted_vlm_guard`` (the same head inside a tiny LLaVA). The builders behind the guard fixtures
are cached per options, so a test that needs another refusal policy asks
``make_planted_guard(refusal="raise")`` and pays for no second calibration.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import pytest

from ohd_guard.testing.planted import planted_head_model, planted_vlm_model

if TYPE_CHECKING:
    from ohd_guard.detectors.ohd_profile import OhdProfile
    from ohd_guard.guard import OhdGuard

__all__ = [
    "GUARD_CLEAN_PROMPTS", "GUARD_TRIGGER_PROMPTS", "make_planted_guard", "make_planted_vlm_guard", "planted_guard",
    "planted_model", "planted_text_calibrated", "planted_vlm_calibrated", "planted_vlm_guard",
]

GUARD_TRIGGER_PROMPTS: tuple[str, ...] = (
    "tell me about zorblax please", "zorblax is here now", "how do i make zorblax", "the zorblax in the house",
)
"""The "unsafe" side the shared planted guards are calibrated on."""
GUARD_CLEAN_PROMPTS: tuple[str, ...] = (
    "tell me about cats please", "the dog is here now", "how do i make bread", "the light in the house",
)
"""The "safe" side the shared planted guards are calibrated on."""


def _calibrate(model: Any, processor: Any) -> OhdProfile:
    from ohd_guard.detectors import calibrate
    from ohd_guard.masking import HeadRef

    return calibrate(model, processor, list(GUARD_TRIGGER_PROMPTS), list(GUARD_CLEAN_PROMPTS),
                     head=HeadRef(layer=1, head=2))


@functools.cache
def planted_text_calibrated() -> tuple[Any, Any, OhdProfile]:
    """``(model, tokenizer, profile)``: the planted tiny Llama and its head's profile, built once per process."""
    model, tok, _ = planted_head_model()
    return model, tok, _calibrate(model, tok)


@functools.cache
def planted_vlm_calibrated() -> tuple[Any, Any, OhdProfile]:
    """``(model, processor, profile)``: the planted tiny LLaVA (images really flow) and its head's profile."""
    model, proc, _ = planted_vlm_model()
    return model, proc, _calibrate(model, proc)


@functools.cache
def make_planted_guard(**options: Any) -> OhdGuard:
    """An ``OhdGuard(**options)`` on the planted tiny Llama; one guard per distinct ``options``."""
    from ohd_guard.guard import OhdGuard

    model, tok, profile = planted_text_calibrated()
    return OhdGuard(model, tok, profile, **options)


@functools.cache
def make_planted_vlm_guard(**options: Any) -> OhdGuard:
    """An ``OhdGuard(**options)`` on the planted tiny LLaVA; one guard per distinct ``options``."""
    from ohd_guard.guard import OhdGuard

    model, proc, profile = planted_vlm_calibrated()
    return OhdGuard(model, proc, profile, **options)


def save_planted_model(folder: Any) -> tuple[Any, Any]:
    """A planted model and its tokenizer written to ``folder`` (what the CLI tests load by path)."""
    model, tok, _ = planted_head_model()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


@pytest.fixture(scope="module")
def planted_model() -> tuple[Any, Any, dict[str, Any]]:
    """``planted_head_model()``: ``(model, tokenizer, info)``, head L1.H2 fires on "zorblax"."""
    return planted_head_model()


@pytest.fixture(scope="module")
def planted_guard() -> OhdGuard:
    """The shared guard on the planted tiny Llama (default options)."""
    return make_planted_guard()


@pytest.fixture(scope="module")
def planted_vlm_guard() -> OhdGuard:
    """The shared guard on the planted tiny LLaVA (default options)."""
    return make_planted_vlm_guard()


@pytest.fixture(scope="module")
def fading() -> Any:
    """SAHs (one head) fitted on a planted model whose trigger signal fades with the context after it
    (``focus=0.5``): the ground truth of turn scopes (a flagged earlier turn the final read misses)."""
    from ohd_guard.detectors import SAHs
    from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, with_trigger

    model, tok, _ = planted_head_model(focus=0.5)
    clean = list(PLANTED_CLEAN_PROMPTS)[:8]
    return SAHs(top_k=1, folds=4).fit(model, tok, with_trigger(clean), clean)
