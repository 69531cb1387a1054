"""Typed errors. Every failure the library can name has its own class, so callers (and the
guard's fail-closed policy) can tell a bad input from a broken model from a mismatched profile."""

from __future__ import annotations


class OhdGuardError(Exception):
    """Base class of every error raised on purpose by ohd-guard."""


class InvalidInputError(OhdGuardError, ValueError):
    """The conversation, prompt, image or argument given cannot be screened as it is."""


class UnsupportedModelError(OhdGuardError):
    """No architecture adapter can find the parts of the model the method needs."""


class ModelLoadError(OhdGuardError):
    """A model reference could not be resolved or loaded (missing file, bad checksum, ...)."""


class ProfileFormatError(OhdGuardError, ValueError):
    """A profile file is corrupt, hand-edited into an invalid state, or of an unknown schema."""


class ProfileMismatchError(OhdGuardError):
    """A profile was calibrated for a different model (architecture, weights, dtype or template)."""


class CalibrationError(OhdGuardError):
    """Calibration data or statistics do not allow a head or threshold to be chosen."""


class ScreeningError(OhdGuardError):
    """Screening failed (hook failure, out of memory, ...); the guard treats it as unsafe."""


class GuardViolation(OhdGuardError):
    """Raised by the guard's ``raise`` refusal policy; carries the verdict that flagged the input."""

    def __init__(self, verdict, message: str | None = None):
        self.verdict = verdict
        super().__init__(message or getattr(verdict, "reason", "input flagged as unsafe"))


class InternalChanged(OhdGuardError, RuntimeError):
    """A transformers internal the guard relies on no longer behaves as expected; the message names
    the transformers version and the internal (see ``ohd_guard.hf_internals``)."""
