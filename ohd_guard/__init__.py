"""ohd-guard: One-head Defense for local (vision-)language models."""

from ohd_guard.errors import (
    CalibrationError,
    GuardViolation,
    InvalidInputError,
    ModelLoadError,
    OhdGuardError,
    ProfileFormatError,
    ProfileMismatchError,
    ScreeningError,
    UnsupportedModelError,
)

__version__ = "0.1.0"
