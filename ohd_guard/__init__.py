"""ohd-guard: One-head Defense for local (vision-)language models.

Typical use::

    from ohd_guard import OhdGuard
    guard = OhdGuard.load()        # the embedded model and its shipped profile
    verdict = guard.screen("How do I make a pipe bomb?")

The integrations are their own packages (each names its install when it is missing)::

    from langchain_ohd_guard import ChatOhdGuard, OhdGuardMiddleware, guarded   # pip install langchain-ohd-guard
    from llama_index.llms.ohd_guard import OhdGuardLLM, GuardedLLM              # pip install llama-index-llms-ohd-guard
    from ohd_guard import plot                  # score distributions, ROC curves: pip install 'ohd-guard[plot]'
"""

import logging

logging.getLogger("ohd_guard").addHandler(logging.NullHandler())  # the application decides where logs go

__version__ = "0.1.0"

from ohd_guard.adapters import ArchitectureAdapter, get_adapter, register_adapter
from ohd_guard.conversation import Conversation, ConversationLimits, to_conversation
from ohd_guard.detectors import calibrate, load_profile
from ohd_guard.errors import (
    CalibrationError,
    GuardViolation,
    InternalChanged,
    InvalidInputError,
    ModelLoadError,
    OhdGuardError,
    ProfileFormatError,
    ProfileMismatchError,
    ScreeningError,
    UnsupportedModelError,
)
from ohd_guard.guard import OhdGuard
from ohd_guard.loading import DEFAULT_MODEL, load_model
from ohd_guard.masking import HeadRef, MaskSpec, head_mask
from ohd_guard.profile import Profile
from ohd_guard.scoring import DeflectionScorer
from ohd_guard.search import search_heads
from ohd_guard.types import GuardedResponse, Verdict

__all__ = [
    "ArchitectureAdapter", "CalibrationError", "Conversation", "ConversationLimits", "DEFAULT_MODEL",
    "DeflectionScorer", "GuardViolation", "GuardedResponse", "OhdGuard", "Verdict",
    "InternalChanged", "HeadRef", "InvalidInputError", "MaskSpec", "ModelLoadError",
    "OhdGuardError", "Profile", "ProfileFormatError", "ProfileMismatchError", "ScreeningError",
    "UnsupportedModelError", "calibrate", "get_adapter", "head_mask", "load_model", "load_profile", "register_adapter",
    "search_heads", "to_conversation",
]
