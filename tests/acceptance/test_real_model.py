"""The method on the real embedded model (Qwen2.5-Coder-0.5B-Instruct): the signal must be there.

Measured (docs/method.md): the shipped profile (head and score layer searched on the calib split)
reaches held-out AUROC ~0.63 on the project's prompts, which are balanced on length and on sentence
form (questions vs imperatives) and a quarter of whose safe ones are look-alikes; chance is 0.5.
The bars below fail if the signal is lost, not if it is merely as weak as measured.
"""

from __future__ import annotations

import numpy as np
import pytest

from ohd_guard.detectors import calibrate
from ohd_guard.detectors.base import evaluate_scores
from ohd_guard.cli import OHD_PROFILE
from ohd_guard.datasets import load_calibration_prompts
from ohd_guard.profile import Profile
from ohd_guard.scoring import DeflectionScorer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped(real_model):
    model, tok = real_model
    profile = Profile.load(OHD_PROFILE)
    profile.verify(model, tok)
    # the held-out prompts the profile was measured on (before the look-alike/twin pairs were added)
    held = [p for p in load_calibration_prompts("heldout") if not p.category.startswith("contrast_")]
    scorer = DeflectionScorer(model, tok, spec=profile.mask, score_layer=profile.score_layer)
    unsafe = scorer.angles([p.text for p in held if p.label == 1], [profile.heads[0]], batch_size=12)[:, 0]
    safe = scorer.angles([p.text for p in held if p.label == 0], [profile.heads[0]], batch_size=12)[:, 0]
    return profile, unsafe, safe, held


def test_shipped_profile_matches_the_model_and_holds_on_heldout_prompts(shipped):
    profile, unsafe, safe, _ = shipped
    m = evaluate_scores("heldout", unsafe, safe, profile.threshold)
    reported = next(x for x in profile.metrics if x.split == "heldout")
    assert np.isclose(m.auroc, reported.auroc, atol=1e-3), "angles drifted since the profile was written"
    assert m.auroc >= 0.6


def test_shipped_head_does_not_read_sentence_form(shipped):
    """Harmful questions against benign imperatives: a head that reads "imperative = unsafe" is
    inverted here (the previous profile, searched on form-confounded data, scored AUROC 0.10 on the
    form-balancing prompts)."""
    profile, unsafe, safe, held = shipped
    asks = np.array([p.text.rstrip().endswith("?") for p in held if p.label == 1])
    tells = np.array([not p.text.rstrip().endswith("?") for p in held if p.label == 0])
    m = evaluate_scores("heldout", unsafe[asks], safe[tells], profile.threshold)
    assert m.auroc >= 0.55, m


def test_calibrating_on_a_subset_gives_a_threshold_that_transfers(real_model, shipped):
    """calibrate() end to end on real prompts (head fixed): its threshold must work on unseen prompts."""
    model, tok = real_model
    profile, unsafe, safe, _ = shipped
    calib = load_calibration_prompts("calib")
    u = [p for p in calib if p.label == 1][::3]
    s = [p for p in calib if p.label == 0][::3]
    quick = calibrate(model, tok, u, s, spec=profile.mask, score_layer=profile.score_layer, head=profile.heads[0],
                      batch_size=12)
    assert quick.model == profile.model and quick.search == "manual"
    m = evaluate_scores("heldout", unsafe, safe, quick.threshold)
    assert m.balanced_accuracy >= 0.55, m
