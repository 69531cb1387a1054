"""A user's own labelled prompts (.csv or .jsonl) for evaluation and calibration."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from PIL import Image

from ohd_guard.datasets.files import read_csv, read_jsonl
from ohd_guard.datasets.prompts import LabelledPrompt, parse_label
from ohd_guard.errors import InvalidInputError


def _row_to_prompt(row: dict[str, Any], path: Path, where: str) -> LabelledPrompt:
    text = row.get("text")
    if text is None:
        text = row.get("prompt")
    if text is None:
        raise InvalidInputError(f"{where}: missing 'text' (or 'prompt') column")
    if not isinstance(text, str):
        raise InvalidInputError(f"{where}: text must be a string, not {type(text).__name__}")
    if "label" not in row or row["label"] is None:
        raise InvalidInputError(f"{where}: missing 'label' column")
    label = parse_label(row["label"], where)
    image = None
    image_ref = row.get("image")
    if image_ref:
        image_path = (path.parent / str(image_ref)).resolve()
        try:
            with Image.open(image_path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"{where}: cannot read image {image_path}: {e}") from e
    if not text.strip() and image is None:
        raise InvalidInputError(f"{where}: empty text and no image")
    category = row.get("category") or ""
    return LabelledPrompt(text, label, str(category), path.name, image)


def _csv_prompts(path: Path) -> list[LabelledPrompt]:
    fields, rows = read_csv(path)
    if not ({"text", "prompt"} & set(fields)):
        raise InvalidInputError(f"{path}, line 1: missing 'text' (or 'prompt') column")
    if "label" not in fields:
        raise InvalidInputError(f"{path}, line 1: missing 'label' column")
    return [
        _row_to_prompt(row, path, f"{path}, line {line}")
        for line, row in rows
        if any((v or "").strip() for v in row.values() if isinstance(v, str))  # skip blank lines
    ]


def _jsonl_prompts(path: Path) -> list[LabelledPrompt]:
    out = []
    for line, row in read_jsonl(path):
        where = f"{path}, line {line}"
        if not isinstance(row, dict):
            raise InvalidInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        out.append(_row_to_prompt(row, path, where))
    return out


def load_labelled_file(path: str | os.PathLike[str]) -> list[LabelledPrompt]:
    """Read a user's labelled prompts (.csv or .jsonl) for evaluation, failing loudly on any bad row.

    Columns/keys: ``text`` (or ``prompt``), ``label`` and optionally ``category`` and ``image`` (a
    path relative to the file). A silently skipped row would skew the reported rates, hence errors
    that name the file, the line and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    readers = {".csv": _csv_prompts, ".jsonl": _jsonl_prompts}
    if suffix not in readers:
        raise InvalidInputError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv or .jsonl")
    try:
        out = readers[suffix](path)
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{path}: not UTF-8 text ({e.reason})") from e
    except csv.Error as e:
        raise InvalidInputError(f"{path}: malformed CSV ({e})") from e
    if not out:
        raise InvalidInputError(f"{path}: no prompts found")
    return out
