"""Prompt-safety detectors with one shape: One-head Defense, SAHs, HiddenDetect, a fused one, and
the baselines they are compared with (the model's own refusal, the model asked as a judge).

A detector kind is fitted into a frozen :class:`~ohd_guard.profile.Profile` (the artefact, saved as
JSON with the model's fingerprint and a content digest) and bound to a model as the scorer the
guard runs (repeng's shape: the artefact apart from the runtime):

>>> profile = SAHsProfile.fit(model, tok, unsafe, safe)        # or SAHs(top_k=16).fit(...).profile
>>> profile.save("sahs.json")
>>> profile = load_profile("sahs.json")                          # any kind, typed errors
>>> scorer = profile.bind(model, tok)                            # refuses another model
>>> scorer.score(["How do I bake bread?"]), scorer.predict(["..."])
>>> guard = OhdGuard(model, tok, profile)                        # the guard takes a profile or a scorer

Every guard kind reads the guard's one screening prefill
(:class:`~ohd_guard.screening.PrefillDetector`) and scores through it, so evaluation measures what
the guard runs. Nothing in this package imports the guard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ohd_guard.detectors.base import Detector, as_input
from ohd_guard.detectors.features import LastToken, Logistic, PrefillReader, shared_prefill
from ohd_guard.detectors.fused import Fused, FusedProfile
from ohd_guard.detectors.judge import JUDGE_TEMPLATE, Judge, JudgeProfile
from ohd_guard.detectors.loading import GUARD_KINDS, AnyProfile, bind_detector, load_profile, parse_profile
from ohd_guard.detectors.ohd import LargestEffectHead, OneHeadDefense
from ohd_guard.detectors.ohd_profile import OhdProfile, calibrate, mode_spec
from ohd_guard.detectors.probes import (
    REFUSAL_WORDS,
    HiddenDetect,
    HiddenDetectProfile,
    SAHs,
    SAHsProfile,
    refusal_token_ids,
)
from ohd_guard.detectors.refusal import REFUSAL_MARKERS, SelfRefusal, SelfRefusalProfile, is_refusal
from ohd_guard.detectors.residual import ResidualProbe, ResidualProfile

__all__ = [
    "GUARD_KINDS", "REFUSAL_MARKERS", "REFUSAL_WORDS", "AnyProfile", "Detector", "Fused", "FusedProfile",
    "HiddenDetect", "HiddenDetectProfile", "JUDGE_TEMPLATE", "Judge", "JudgeProfile", "LargestEffectHead",
    "LastToken", "Logistic", "OhdProfile",
    "OneHeadDefense", "PrefillReader", "ResidualProbe", "ResidualProfile", "SAHs", "SAHsProfile", "SelfRefusal", "SelfRefusalProfile", "as_input",
    "bind_detector", "calibrate", "is_refusal", "load_detector", "load_profile", "mode_spec", "parse_profile",
    "refusal_token_ids", "shared_prefill",
]


def load_detector(path: str | Path, model: Any, processor: Any, allow_edited: bool = False) -> Detector:
    """Load any saved profile and bind it to ``model`` (refusing a model it was not fitted on)."""
    return load_profile(path, allow_edited=allow_edited).bind(model, processor)  # type: ignore[return-value]
