"""Every profile kind refuses what would stop it detecting (with or without ``allow_edited``), and every
way a path can fail to be a profile is a typed ProfileFormatError (issue #23 items 2, 4, 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ohd_guard.detectors import Fused, HiddenDetect, OneHeadDefense, SAHs, load_profile
from ohd_guard.errors import InvalidInputError, ProfileFormatError
from ohd_guard.guard import OhdGuard
from ohd_guard.testing import PLANTED_CLEAN_PROMPTS, tiny_model, with_trigger

CLEAN = list(PLANTED_CLEAN_PROMPTS)[:8]


@pytest.fixture(scope="module")
def fitted(planted_model):
    model, tok, _ = planted_model
    unsafe, safe = with_trigger(CLEAN), CLEAN
    ohd = OneHeadDefense("fast").fit(model, tok, unsafe, safe)
    dets = {
        "sahs": SAHs(top_k=3, folds=4).fit(model, tok, unsafe, safe),
        "hiddendetect": HiddenDetect().fit(model, tok, unsafe, safe),
        "fused": Fused(ohd.profile, n_angles=2, sahs=SAHs(top_k=3, folds=4)).fit(model, tok, unsafe, safe),
    }
    return model, tok, dets


def _edited(det, tmp_path, fn):
    path = det.save(tmp_path / "p.json")
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))
    return path


EDITS = {  # each loaded with a WARNING and then missed every trigger before (issue #23 item 4)
    "sahs threshold 1e300": ("sahs", lambda r: r.update(threshold=1e300), "outside the calibrated score range"),
    "sahs zero coef": ("sahs", lambda r: r.update(coef=[0.0] * len(r["coef"])), "all zero"),
    "sahs scale 1e300": ("sahs", lambda r: r.update(scale=[1e300] * len(r["scale"])), "scales"),
    "sahs head outside the model": ("sahs", lambda r: r["heads"][0].update(layer=99), "outside"),
    "sahs repeated heads": ("sahs", lambda r: r["heads"].__setitem__(1, r["heads"][0]), "repeat"),
    "fused zero coef": ("fused", lambda r: r.update(coef=[0.0] * len(r["coef"])), "all zero"),
    "fused alpha 1.0": ("fused", lambda r: r["mask"].update(alpha=1.0), "alpha"),
    "fused nested sahs of another model": ("fused", lambda r: r["sahs"]["model"].update(weights_hash="0" * 64),
                                           "another model"),
    "hiddendetect negative token id": ("hiddendetect", lambda r: r.update(refusal_token_ids=[-5]), "token ids"),
    "hiddendetect band outside": ("hiddendetect", lambda r: r.update(band=[0, 99]), "band"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_that_disables_a_detector_is_refused_even_with_allow_edited(fitted, tmp_path, edit):
    _, _, dets = fitted
    kind, fn, message = EDITS[edit]
    path = _edited(dets[kind], tmp_path, fn)
    for allow in (False, True):
        with pytest.raises(ProfileFormatError, match=message):
            load_profile(path, allow_edited=allow)


def test_a_refusal_token_outside_the_vocabulary_is_refused_at_binding(fitted, tmp_path):
    model, tok, dets = fitted
    vocab = model.get_output_embeddings().weight.shape[0]
    path = _edited(dets["hiddendetect"], tmp_path, lambda r: r.update(refusal_token_ids=[vocab + 10]))
    profile = load_profile(path, allow_edited=True)
    with pytest.raises(InvalidInputError, match="vocabulary"):
        OhdGuard(model, tok, profile)


def test_harmless_edits_still_load_with_allow_edited_and_keep_detecting(fitted, tmp_path):
    model, tok, dets = fitted
    path = _edited(dets["sahs"], tmp_path, lambda r: r.update(n_safe=999))
    with pytest.raises(ProfileFormatError, match="digest"):
        load_profile(path)
    guard = OhdGuard(model, tok, load_profile(path, allow_edited=True))
    assert all(v.flagged for v in guard.screen_batch(with_trigger(CLEAN[:3])))


def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("case", ["directory", "deep array", "deep extra key", "symlink loop", "device", "huge"])
def test_every_bad_path_is_a_profile_format_error(fitted, tmp_path, case):
    _, _, dets = fitted
    path = tmp_path / "p.json"
    if case == "directory":
        path = tmp_path
    elif case == "deep array":
        path.write_text(_deep(200000))
    elif case == "deep extra key":
        raw = json.loads(dets["sahs"].save(path).read_text())
        path.write_text(json.dumps(raw)[:-1] + ', "extra": ' + _deep(5000) + "}")
    elif case == "symlink loop":
        os.symlink(tmp_path / "b.json", path)
        os.symlink(path, tmp_path / "b.json")
    elif case == "device":
        if not os.path.exists("/proc/self/mem"):
            pytest.skip("no /proc here")
        path = "/proc/self/mem"
    else:
        path.write_bytes(b" " * (64 * 2**20 + 10))
    with pytest.raises(ProfileFormatError):
        load_profile(path)


def test_the_cli_exits_2_with_a_profile_format_error_not_a_traceback(tmp_path):
    (tmp_path / "deep.json").write_text(_deep(200000))
    for bad in (tmp_path, tmp_path / "deep.json"):
        r = subprocess.run([sys.executable, "-m", "ohd_guard.cli", "inspect", str(bad)], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "profile" in r.stderr.lower()


def test_a_profile_of_another_kind_is_refused_by_a_kind_loader(fitted, tmp_path):
    _, _, dets = fitted
    from ohd_guard.detectors import HiddenDetectProfile

    path = dets["sahs"].save(tmp_path / "s.json")
    with pytest.raises(ProfileFormatError, match="'sahs' profile"):
        HiddenDetectProfile.load(path)
    other, other_tok = tiny_model("llama")
    with pytest.raises(Exception, match="does not match"):
        load_profile(path).bind(other, other_tok)
