"""Labelled items (a prompt, a conversation) and the project's own bundled calibration prompts.

The bundled calibration set (``data/calibration_prompts.jsonl``) is original text written for this
project, so a profile can be calibrated without any external download. Its two classes are matched
in surface length (short imperatives and long, context-rich requests on both sides; prompt length
alone separates them no better than chance), so that a detector calibrated on it cannot pick heads
that merely react to length.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from PIL import Image

from ohd_guard.datasets.files import parse_jsonl
from ohd_guard.errors import InvalidInputError


@dataclass(frozen=True)
class LabelledPrompt:
    """One prompt with its ground truth; ``image`` is ignored by ``==``/``hash`` (images are not hashable)."""

    text: str
    label: int  # 1 unsafe, 0 safe
    category: str = ""
    source: str = ""
    image: Image.Image | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class LabelledConversation:
    """A labelled multi-turn conversation: ``messages`` are ``{"role", "content"}`` dicts ending with a user turn.

    Detectors take it as its message list (``.label`` + ``.messages``, see ``detectors.as_input``).
    ``text`` is the last user turn (what a single-prompt report shows); ``image`` is always ``None``
    so that code written for :class:`LabelledPrompt` can filter on it.
    """

    messages: list[dict[str, Any]]
    label: int  # 1 unsafe, 0 safe
    category: str = ""
    source: str = ""

    def __hash__(self) -> int:
        return hash((tuple((m.get("role"), str(m.get("content"))) for m in self.messages), self.label, self.category, self.source))

    @property
    def text(self) -> str:
        for m in reversed(self.messages):
            if m.get("role") == "user":
                return str(m.get("content", ""))
        return ""

    @property
    def image(self) -> None:
        return None


LABEL_WORDS = {
    "1": 1, "unsafe": 1, "harmful": 1, "true": 1,
    "0": 0, "safe": 0, "harmless": 0, "false": 0,
}
"""The label spellings read from files (lower-cased): 1 unsafe, 0 safe."""


def parse_label(value: Any, where: str) -> int:
    """``value`` as 1 (unsafe) or 0 (safe); anything else raises, naming ``where`` (a silently guessed
    label would skew every rate reported on the file)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise InvalidInputError(
        f"{where}: bad label {value!r} (use 1/0, unsafe/safe, harmful/harmless or true/false)"
    )


_CALIBRATION_FILES = ("calibration_prompts.jsonl", "contrast_prompts.jsonl")
"""The project's own prompts: the first set, then look-alike/harmful-twin pairs (``pair`` field)."""


def _read_calibration_rows() -> list[dict[str, Any]]:
    rows = []
    for name in _CALIBRATION_FILES:
        text = resources.files("ohd_guard").joinpath("data").joinpath(name).read_text(encoding="utf-8")
        rows += [row for _, row in parse_jsonl(text, f"ohd_guard/data/{name}")]
    return rows


def load_calibration_prompts(
    split: Literal["all", "calib", "heldout"] = "all",
    heldout_fraction: float = 0.3,
    seed: int = 0,
) -> list[LabelledPrompt]:
    """The bundled calibration prompts, optionally split into calibration and held-out parts.

    The split is stratified per (label, category) so that both parts contain every category (a
    threshold tuned without, say, any look-alikes would be optimistic), and deterministic for a
    given ``seed`` so that reported numbers can be reproduced. A look-alike and its harmful twin
    (same ``pair``) always land on the same side: fitting on one twin and testing on the other would
    flatter the detector.
    """
    if split not in ("all", "calib", "heldout"):
        raise InvalidInputError(f"split must be 'all', 'calib' or 'heldout', not {split!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise InvalidInputError(f"heldout_fraction must be strictly between 0 and 1, not {heldout_fraction!r}")

    rows = _read_calibration_rows()
    prompts = [
        LabelledPrompt(text=r["text"], label=parse_label(r["label"], "calibration prompts"), category=r["category"],
                       source="calibration")
        for r in rows
    ]
    if split == "all":
        return prompts

    # units of the split: a single prompt, or both prompts of a pair; stratified per (label, category)
    units: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        units[r.get("pair") or f"#{i}"].append(i)
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key, idx in units.items():
        first = prompts[idx[0]]
        label = "pair" if len(idx) > 1 else str(first.label)
        groups[(label, first.category)].append(key)
    heldout: set[int] = set()
    for (label, category), keys in sorted(groups.items()):
        rng = random.Random(f"{seed}:{label if label == 'pair' else int(label)}:{category}")  # str seeds hash deterministically
        shuffled = keys[:]
        rng.shuffle(shuffled)
        n = round(len(shuffled) * heldout_fraction)
        if len(shuffled) >= 2:
            n = min(max(n, 1), len(shuffled) - 1)  # every category on both sides
        for key in shuffled[:n]:
            heldout.update(units[key])
    keep_heldout = split == "heldout"
    return [p for i, p in enumerate(prompts) if (i in heldout) == keep_heldout]
