"""Which profile kinds exist and can guard, and binding a profile (or a scorer) for the guard. The one load
path for every kind is :meth:`ohd_guard.profile.Profile.load`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field

from ohd_guard.detectors.fused import FusedProfile
from ohd_guard.detectors.judge import JudgeProfile
from ohd_guard.detectors.ohd_profile import OhdProfile
from ohd_guard.detectors.probes import HiddenDetectProfile, SAHsProfile
from ohd_guard.detectors.refusal import SelfRefusalProfile
from ohd_guard.detectors.residual import ResidualProfile
from ohd_guard.errors import InvalidInputError
from ohd_guard.profile import Profile, parse_profile
from ohd_guard.screening import PrefillDetector

__all__ = ["GUARD_KINDS", "AnyProfile", "bind_detector", "load_profile", "parse_profile"]

GUARD_KINDS = ("ohd", "sahs", "hiddendetect", "fused", "residual")
"""Detector kinds the guard can screen with (the self-refusal baseline answers first and the judge needs a
prefill of its own, so neither can)."""

AnyProfile = Annotated[
    Union[OhdProfile, SAHsProfile, HiddenDetectProfile, FusedProfile, ResidualProfile, SelfRefusalProfile,  # noqa: UP007
          JudgeProfile],
    Field(discriminator="kind"),
]
"""A saved profile of any kind, told apart by its ``kind`` (what :func:`load_profile` validates against)."""


def load_profile(path: str | Path, allow_edited: bool = False) -> Profile:
    """Read a saved profile of any kind (:class:`~ohd_guard.errors.ProfileFormatError` for anything that
    is not one); bind it to a model with ``profile.bind(model, processor)``."""
    return Profile.load(path, allow_edited=allow_edited)


def bind_detector(profile: Any, model: Any, processor: Any, verify: bool = True) -> PrefillDetector:
    """What the guard screens with: a profile of a guard kind bound to ``model``, or an already bound
    detector (its fingerprint checked unless ``verify=False``: :class:`~ohd_guard.errors.ProfileMismatchError`)."""
    if isinstance(profile, PrefillDetector):
        if not getattr(profile, "fitted", True):
            raise InvalidInputError(f"{type(profile).__name__} is not fitted")
        profile_ = getattr(profile, "profile", None)
        if profile_ is None:  # a scorer of the user's own, implementing the protocol
            return profile
        if profile_.kind not in GUARD_KINDS:
            raise InvalidInputError(f"a {profile_.kind!r} detector cannot guard; the guard runs {', '.join(GUARD_KINDS)}")
        if verify:
            profile_.verify(model, processor)
        return profile
    if isinstance(profile, Profile) and profile.kind in GUARD_KINDS:
        return profile.bind(model, processor, verify=verify)
    raise InvalidInputError(
        f"the guard needs a profile of one of the kinds {', '.join(GUARD_KINDS)} (a Profile or a fitted detector), "
        f"not {type(profile).__name__}"
    )
