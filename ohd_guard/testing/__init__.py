"""Tiny models for tests and the cookbook, built from the *real* transformers classes, fully offline.

- :mod:`~ohd_guard.testing.tiny`: tiny, randomly initialised models and processors of every supported
  architecture family (the plumbing: layers, projections, templates, image tokens, padding);
- :mod:`~ohd_guard.testing.planted`: models whose weights are set by hand so that one known head reacts
  to one trigger word (the ground truth for head search and screening), and a forward-pass counter.
"""

from ohd_guard.testing.planted import (
    PLANTED_CLEAN_PROMPTS,
    ForwardCounter,
    planted_head_model,
    planted_vlm_model,
    with_trigger,
)
from ohd_guard.testing.tiny import TINY_ARCHS, tiny_model, tiny_tokenizer

__all__ = [
    "ForwardCounter", "PLANTED_CLEAN_PROMPTS", "TINY_ARCHS", "planted_head_model", "planted_vlm_model", "tiny_model",
    "tiny_tokenizer", "with_trigger",
]
