"""Prompt-safety detectors with one interface: One-head Defense and the baselines it is compared with.

>>> det = OneHeadDefense("fast").fit(model, tok, unsafe, safe)
>>> det.score(["How do I bake bread?"]), det.predict(["..."]), det.save("ohd.json")
>>> same = load_detector("ohd.json", model, tok)   # refuses another model
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ohd_guard.detectors.base import Detector, DetectorState, StateDetector, as_input, check_fingerprint, read_json
from ohd_guard.detectors.features import LastToken, Logistic, PrefillReader, shared_prefill
from ohd_guard.detectors.ohd import LargestEffectHead, OneHeadDefense, mode_spec
from ohd_guard.detectors.probes import REFUSAL_WORDS, SAHs, HiddenDetect, refusal_token_ids
from ohd_guard.detectors.refusal import REFUSAL_MARKERS, SelfRefusal, is_refusal
from ohd_guard.errors import ProfileFormatError
from ohd_guard.profile import Profile

__all__ = [
    "Detector", "DetectorState", "HiddenDetect", "LargestEffectHead", "LastToken", "Logistic", "OneHeadDefense",
    "PrefillReader", "REFUSAL_MARKERS", "REFUSAL_WORDS", "SAHs", "SelfRefusal", "StateDetector", "as_input",
    "check_fingerprint", "is_refusal", "load_detector", "mode_spec", "refusal_token_ids", "shared_prefill",
]

_BY_KIND: dict[str, type[StateDetector]] = {"sahs": SAHs, "hiddendetect": HiddenDetect, "self_refusal": SelfRefusal}


def load_detector(path: str | Path, model: Any, processor: Any) -> Detector:
    """Load any saved detector onto ``model`` (a profile becomes One-head Defense or LargestEffect)."""
    raw = read_json(path)
    kind = raw.get("kind")
    if kind is None:
        profile = Profile.load(path)
        cls = LargestEffectHead if profile.calibration.search.startswith(LargestEffectHead.SEARCH_TAG) else OneHeadDefense
        return cls.from_profile(profile, model, processor)
    if kind not in _BY_KIND:
        raise ProfileFormatError(f"{path}: unknown detector kind {kind!r}; known: {', '.join(_BY_KIND)}")
    return _BY_KIND[kind].load(path, model, processor)
