"""Labelled prompts for calibration and evaluation.

- :mod:`~ohd_guard.datasets.prompts`: the labelled item types and the project's own calibration prompts
  (original text, bundled, so a profile can be calibrated without any download);
- :mod:`~ohd_guard.datasets.typographic`: the same requests moved into FigStep-style images;
- :mod:`~ohd_guard.datasets.shared`: public sets read at run time from a shared datasets folder (never
  copied into the package), one registry from set name to reader (:mod:`~ohd_guard.datasets.sets`);
- :mod:`~ohd_guard.datasets.user_files`: a user's own labelled CSV/JSONL files;
- :mod:`~ohd_guard.datasets.sampling`: deterministic subsamples, deduplication and dev splits;
- :mod:`~ohd_guard.datasets.files`: the one CSV and JSON/JSONL reader under all of them.
"""

from ohd_guard.datasets.prompts import LabelledConversation, LabelledPrompt, load_calibration_prompts
from ohd_guard.datasets.sampling import dedupe_against, evenly, per_class, split_dev, stratified
from ohd_guard.datasets.shared import (
    BENIGN_SETS,
    HARMFUL_SETS,
    JAILBREAK_SETS,
    OVER_REFUSAL_SETS,
    SHARED_SETS,
    SHIPPED_FIT_SHARED,
    TRAFFIC_SETS,
    load_shared_parts,
    load_shared_set,
    shared_datasets_dir,
    shipped_fit_items,
)
from ohd_guard.datasets.typographic import TYPOGRAPHIC_INSTRUCTION, render_typographic, to_typographic
from ohd_guard.datasets.user_files import load_labelled_file

__all__ = [
    "BENIGN_SETS",
    "HARMFUL_SETS",
    "JAILBREAK_SETS",
    "LabelledConversation",
    "LabelledPrompt",
    "OVER_REFUSAL_SETS",
    "SHARED_SETS",
    "SHIPPED_FIT_SHARED",
    "TRAFFIC_SETS",
    "TYPOGRAPHIC_INSTRUCTION",
    "dedupe_against",
    "evenly",
    "load_calibration_prompts",
    "load_labelled_file",
    "load_shared_parts",
    "load_shared_set",
    "per_class",
    "render_typographic",
    "shared_datasets_dir",
    "shipped_fit_items",
    "split_dev",
    "stratified",
    "to_typographic",
]
