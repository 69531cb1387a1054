"""The guard of the package's tests: ``planted_head_model`` (a tiny Llama whose head L1.H2 fires on
"zorblax"), calibrated in a second on CPU. No test downloads anything."""

from __future__ import annotations

import functools
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TRIGGER = ["tell me about zorblax please", "zorblax is here now", "how do i make zorblax", "the zorblax in the house"]
CLEAN = ["tell me about cats please", "the dog is here now", "how do i make bread", "the light in the house"]


@functools.lru_cache(maxsize=None)
def planted_guard(**options: Any):
    from ohd_guard.detectors import calibrate
    from ohd_guard.guard import OhdGuard
    from ohd_guard.masking import HeadRef
    from ohd_guard.testing import planted_head_model

    model, tok, _ = planted_head_model()
    return OhdGuard(model, tok, calibrate(model, tok, TRIGGER, CLEAN, head=HeadRef(layer=1, head=2)), **options)
