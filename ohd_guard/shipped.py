"""Profiles shipped with the library: one per detector for each embedded model (``ohd_guard/profiles``).

File names are ``<model name>.json`` (One-head Defense) and ``<model name>.<kind>.json`` for the
other detectors; :data:`DEFAULT_DETECTOR` is the one the guard loads when no profile is given.
A model that is not embedded (a local folder, a GGUF file, a pair you pass) gets the default
model's profiles, which its fingerprint then refuses: calibrate one with ``ohd-guard calibrate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ohd_guard.loading import EMBEDDED_MODELS, embedded_model

PROFILES_DIR = Path(__file__).parent / "profiles"
KINDS = ("ohd", "sahs", "hiddendetect", "fused")
DEFAULT_DETECTOR = "sahs"
"""The detector the guard loads by default: the one that wins on held-out data (docs/results.md)."""


def _name(model: Any) -> str:
    """The embedded model ``model`` names; the default for anything else (its fingerprint decides later)."""
    m = embedded_model(model) or embedded_model(None)
    assert m is not None
    return m.name


def shipped_profiles(model: Any = None) -> dict[str, Path]:
    """``{kind: path}`` of the profiles shipped for an embedded model (``None``: the default model)."""
    name = _name(model)
    out = {}
    for kind in KINDS:
        path = PROFILES_DIR / (f"{name}.json" if kind == "ohd" else f"{name}.{kind}.json")
        if path.is_file():
            out[kind] = path
    return out


def default_profile(model: Any = None) -> Path:
    """The profile the guard loads for ``model`` when none is given: its :data:`DEFAULT_DETECTOR` one."""
    return shipped_profiles(model)[DEFAULT_DETECTOR]


def answer_profile(model: Any = None) -> Path | None:
    """The output-check profile shipped for an embedded model (its answers read at their last token by
    :class:`ohd_guard.output_check.AnswerCheck`, behind :meth:`OhdGuard.check_answer
    <ohd_guard.guard.OhdGuard.check_answer>`; calibrated with ``python -m ohd_guard.output_check``),
    or ``None`` where none ships."""
    path = PROFILES_DIR / f"{_name(model)}.answers.{DEFAULT_DETECTOR}.json"
    return path if path.is_file() else None


def models_with_profiles() -> list[str]:
    """Embedded models that ship a default profile."""
    return [name for name in EMBEDDED_MODELS if DEFAULT_DETECTOR in shipped_profiles(name)]
