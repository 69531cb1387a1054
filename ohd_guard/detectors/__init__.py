"""Prompt-safety detectors with one interface: One-head Defense, SAHs, HiddenDetect, a fused one,
and the baselines they are compared with.

>>> det = SAHs().fit(model, tok, unsafe, safe)
>>> det.score(["How do I bake bread?"]), det.predict(["..."]), det.save("sahs.json")
>>> same = load_detector("sahs.json", model, tok)   # refuses another model
>>> guard = OhdGuard(model, tok, same)               # the guard screens with it

Every detector but SelfRefusal reads the guard's one screening prefill
(:class:`~ohd_guard.screening.PrefillDetector`) and scores through it, so evaluation measures what
the guard runs. Saved profiles of every kind share one schema line: a ``kind`` (absent in One-head
Defense profiles, which are :class:`~ohd_guard.profile.Profile`), the model fingerprint, a
threshold, a risk calibration, the calibration summary and a content digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ohd_guard.detectors.base import (
    Detector, DetectorState, GuardScored, StateDetector, as_input, check_fingerprint, read_json, save_state,
)
from ohd_guard.detectors.fused import Fused, FusedState
from ohd_guard.detectors.features import LastToken, Logistic, PrefillReader, shared_prefill
from ohd_guard.detectors.ohd import LargestEffectHead, OneHeadDefense, mode_spec
from ohd_guard.detectors.probes import REFUSAL_WORDS, HiddenDetect, HiddenDetectState, SAHs, SAHsState, refusal_token_ids
from ohd_guard.detectors.refusal import REFUSAL_MARKERS, SelfRefusal, is_refusal
from ohd_guard.errors import InvalidInputError, ProfileFormatError
from ohd_guard.profile import Profile
from ohd_guard.screening import PrefillDetector

__all__ = [
    "Detector", "DetectorState", "Fused", "FusedState", "GuardProfile", "GuardScored", "HiddenDetect",
    "HiddenDetectState", "SAHsState", "bind_detector", "load_profile", "save_state", "LargestEffectHead", "LastToken", "Logistic", "OneHeadDefense",
    "PrefillReader", "REFUSAL_MARKERS", "REFUSAL_WORDS", "SAHs", "SelfRefusal", "StateDetector", "as_input",
    "check_fingerprint", "is_refusal", "load_detector", "mode_spec", "refusal_token_ids", "shared_prefill",
]

_BY_KIND: dict[str, type[StateDetector]] = {
    "sahs": SAHs, "hiddendetect": HiddenDetect, "fused": Fused, "self_refusal": SelfRefusal,
}
GUARD_KINDS = ("ohd", "sahs", "hiddendetect", "fused")
"""Detector kinds the guard can screen with (SelfRefusal answers first, so it cannot)."""

GuardProfile = Profile | SAHsState | HiddenDetectState | FusedState
"""A profile the guard loads: One-head Defense's :class:`Profile` or another detector's state."""


def load_profile(path: str | Path, allow_edited: bool = False) -> GuardProfile:
    """Read a saved profile of any guard detector kind (One-head Defense profiles have no ``kind``).

    Checked like :meth:`Profile.load`: schema, every field, and the content digest (a hand-edited
    file is refused unless ``allow_edited=True``)."""
    raw = read_json(path)
    kind = raw.get("kind", "ohd")
    if kind == "ohd":
        return Profile.load(path, allow_edited=allow_edited)
    if kind not in GUARD_KINDS:
        raise ProfileFormatError(f"{path}: detector kind {kind!r} cannot guard; the guard runs {', '.join(GUARD_KINDS)}")
    return _BY_KIND[kind].read_state(path, allow_edited)  # type: ignore[return-value]


def bind_detector(profile: Any, model: Any, processor: Any, verify: bool = True) -> PrefillDetector:
    """The guard-side detector for ``profile`` on ``model``: a :class:`Profile` becomes One-head
    Defense, a detector state its detector; a fitted :class:`PrefillDetector` is used as it is.
    ``verify`` checks the model fingerprint (:class:`~ohd_guard.errors.ProfileMismatchError`)."""
    if isinstance(profile, PrefillDetector):
        if not profile.fitted:  # type: ignore[attr-defined]
            raise InvalidInputError(f"{type(profile).__name__} is not fitted")
        if verify:
            (getattr(profile, "profile", None) or getattr(profile, "state")).verify(model, processor)
        return profile
    if isinstance(profile, Profile):
        return OneHeadDefense.from_profile(profile, model, processor, verify=verify)
    if isinstance(profile, DetectorState) and profile.kind in GUARD_KINDS:
        cls = _BY_KIND[profile.kind]
        if verify:
            profile.verify(model, processor)
        det = cls._from_state(profile)
        det._bind(model, processor, profile)
        return det  # type: ignore[return-value]
    raise InvalidInputError(
        f"the guard needs a profile of one of the kinds {', '.join(GUARD_KINDS)} (Profile, a detector state or a "
        f"fitted detector), not {type(profile).__name__}"
    )


def load_detector(path: str | Path, model: Any, processor: Any, allow_edited: bool = False) -> Detector:
    """Load any saved detector onto ``model`` (a profile becomes One-head Defense or LargestEffect)."""
    raw = read_json(path)
    kind = raw.get("kind")
    if kind is None:
        profile = Profile.load(path, allow_edited=allow_edited)
        cls = LargestEffectHead if profile.calibration.search.startswith(LargestEffectHead.SEARCH_TAG) else OneHeadDefense
        return cls.from_profile(profile, model, processor)
    if kind not in _BY_KIND:
        raise ProfileFormatError(f"{path}: unknown detector kind {kind!r}; known: {', '.join(_BY_KIND)}")
    return _BY_KIND[kind].load(path, model, processor, allow_edited=allow_edited)
