"""The method on the real embedded model (Qwen2.5-Coder-0.5B-Instruct): the signal must be there."""

from __future__ import annotations

import numpy as np
import pytest

from ohd_guard.calibrate import calibrate, evaluate_angles
from ohd_guard.cli import DEFAULT_PROFILE
from ohd_guard.datasets import load_calibration_prompts
from ohd_guard.masking import MaskSpec
from ohd_guard.profile import Profile
from ohd_guard.scoring import DeflectionScorer

pytestmark = pytest.mark.slow


def _split(prompts, n=None):
    u = [p for p in prompts if p.label == 1][:n]
    s = [p for p in prompts if p.label == 0][:n]
    return u, s


def test_quick_calibration_generalises_to_heldout_prompts(real_model):
    """A fast search on 24+24 calibration prompts must find a head that works on unseen prompts."""
    model, tok = real_model
    calib = load_calibration_prompts("calib", seed=1)
    u, s = _split(calib[::2], 24)  # a spread of categories, not the first ones only
    profile = calibrate(model, tok, u, s, spec=MaskSpec(positions="last"), strategy="fast", batch_size=12)
    hu, hs = _split(load_calibration_prompts("heldout", seed=1), 30)
    scorer = DeflectionScorer(model, tok, spec=profile.mask, score_layer=profile.score_layer)
    au = scorer.angles([p.text for p in hu], [profile.heads[0]], batch_size=12)[:, 0]
    as_ = scorer.angles([p.text for p in hs], [profile.heads[0]], batch_size=12)[:, 0]
    m = evaluate_angles("heldout", au, as_, profile.threshold.value)
    # Measured: the best single head of this model reaches ~0.7-0.78 held-out AUROC on the project's
    # prompts (a third of the safe ones are look-alikes); chance is 0.5. The bar fails if the signal is lost.
    assert m.auroc >= 0.6, f"held-out AUROC {m.auroc:.3f} for head {profile.heads[0]}"


def test_shipped_profile_matches_the_model_and_holds_on_heldout_prompts(real_model):
    model, tok = real_model
    profile = Profile.load(DEFAULT_PROFILE)
    profile.verify(model, tok)
    hu, hs = _split(load_calibration_prompts("heldout"))
    scorer = DeflectionScorer(model, tok, spec=profile.mask, score_layer=profile.score_layer)
    au = scorer.angles([p.text for p in hu], [profile.heads[0]], batch_size=12)[:, 0]
    as_ = scorer.angles([p.text for p in hs], [profile.heads[0]], batch_size=12)[:, 0]
    m = evaluate_angles("heldout", au, as_, profile.threshold.value)
    reported = next(x for x in profile.metrics if x.split == "heldout")
    assert np.isclose(m.auroc, reported.auroc, atol=1e-3), "angles drifted since the profile was written"
    assert m.auroc >= 0.65
