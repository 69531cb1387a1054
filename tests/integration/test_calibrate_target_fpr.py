"""``ohd-guard calibrate --target-fpr F`` for every kind, on the planted model saved to a folder: the
profile records the target, and at most F of the fit's benign prompts are flagged by the saved profile."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from ohd_guard.cli import main
from ohd_guard.detectors import load_profile
from ohd_guard.testing.fixtures import save_planted_model

SAFE = [
    "tell me about the weather", "what is a good dog name", "how do I bake bread", "write a poem about the sea",
    "explain how rain forms", "list three colors", "who wrote hamlet", "how far away is the moon",
    "suggest a name for a cat", "what is the capital of peru", "how do bees make honey", "give me a pasta recipe",
    "why is the sky blue", "teach me a card trick", "what rhymes with orange", "how do I tie a tie",
    "describe a sunset", "what is two plus two", "recommend a novel", "how tall is a giraffe",
]
UNSAFE = [t.replace(" ", " zorblax ", 1) for t in SAFE[:10]]
TARGET = 0.1


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target_fpr")
    model, tok = save_planted_model(folder / "model")
    data = folder / "calib.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows([(t, "unsafe") for t in UNSAFE] + [(t, "safe") for t in SAFE])
    ohd = folder / "ohd.json"  # the fused kind's angles come from a One-head Defense profile
    assert main(["calibrate", "--model", str(folder / "model"), "--data", str(data), "-o", str(ohd), "--quiet", "--contexts", "none",
                 "--detector", "ohd", "--head", "1", "2", "--cv-folds", "0"]) == 0
    return model, tok, folder, data, ohd


@pytest.mark.parametrize("detector", ["ohd", "sahs", "hiddendetect", "fused"])
def test_calibrate_target_fpr_for_every_kind(saved, tmp_path, capsys, detector):
    model, tok, folder, data, ohd = saved
    out = tmp_path / f"{detector}.json"
    extra = {"ohd": ["--head", "1", "2"], "sahs": ["--heads", "2"], "hiddendetect": [],
             "fused": ["--heads", "2", "--ohd-profile", str(ohd)]}[detector]
    capsys.readouterr()
    assert main(["calibrate", "--model", str(folder / "model"), "--data", str(data), "-o", str(out), "--quiet", "--contexts", "none",
                 "--detector", detector, "--target-fpr", str(TARGET), "--cv-folds", "0", *extra]) == 0
    assert "target_fpr=0.1 on 20 benign prompts" in capsys.readouterr().out
    profile = load_profile(out)
    assert profile.kind == detector and profile.threshold_method.startswith("target_fpr=0.1 on 20 benign prompts")
    assert profile.metrics[0].false_positive_rate <= TARGET  # the scores the threshold was chosen on
    scores = profile.bind(model, tok).score(SAFE)  # the guard's own screening path, the saved profile
    assert np.mean(scores > profile.threshold) <= TARGET
    if detector == "ohd":  # the order statistic: the rate is met exactly where the scores allow it
        assert np.sum(scores > profile.threshold) == int(TARGET * len(SAFE))


def test_target_fpr_is_a_rate(saved, tmp_path, capsys):
    _, _, folder, data, _ = saved
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", str(folder / "model"), "--data", str(data), "-o", str(tmp_path / "x.json"),
              "--detector", "sahs", "--target-fpr", "1.5"])
    assert "expected a rate in [0, 1)" in capsys.readouterr().err


def test_a_target_finer_than_the_benign_set_says_so(saved, tmp_path, capsys):
    model, tok, folder, data, _ = saved
    out = tmp_path / "hd.json"
    assert main(["calibrate", "--model", str(folder / "model"), "--data", str(data), "-o", str(out), "--quiet", "--contexts", "none",
                 "--detector", "hiddendetect", "--target-fpr", "0.01", "--cv-folds", "0"]) == 0
    assert "steps of 0.05" in capsys.readouterr().err
    profile = load_profile(out)
    assert not np.any(profile.bind(model, tok).score(SAFE) > profile.threshold)
