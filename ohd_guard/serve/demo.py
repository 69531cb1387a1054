"""A guard on a tiny planted model, for tests, the benchmark's quick run and trying the server
without a real model: ``ohd-guard serve --factory ohd_guard.serve.demo:planted_guard``.

The model is :func:`~ohd_guard.testing.planted_vlm_model`: a tiny LLaVA whose one head fires on the
word :data:`TRIGGER`, so a client knows which requests must come back refused; images go through the
real processor and vision tower. Answers are gibberish.
"""

from __future__ import annotations

from typing import Any

TRIGGER = "zorblax"


def planted_guard(**options: Any) -> Any:
    """The planted VLM, calibrated on the planted prompts, guarded with ``options`` (OhdGuard's)."""
    from ohd_guard.detectors import calibrate
    from ohd_guard.guard import OhdGuard
    from ohd_guard.masking import HeadRef
    from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, planted_vlm_model, with_trigger

    model, processor, info = planted_vlm_model(trigger=TRIGGER)
    clean = list(PLANTED_CLEAN_PROMPTS)
    profile = calibrate(model, processor, with_trigger(clean, TRIGGER), clean,
                        head=HeadRef(layer=info["layer"], head=info["head"]))
    return OhdGuard(model, processor, profile, **options)
