"""Reading dataset files: one CSV reader, one JSON/JSONL reader, and a shared set's folder.

Every loader reads through these, so a BOM, a bad JSON line or a missing file is handled (and named)
the same way everywhere. :class:`SetFolder` applies the one rule every shared set obeys: rows listed
in the folder's ``EXCLUDE_rows.tsv`` (file, 0-based row index, row id) are dropped as the file is read,
before any loader sees them (they duplicate prompts of evaluation-only sets, so fitting on them would
leak the evaluation).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ohd_guard.errors import InvalidInputError

EXCLUDE_FILE = "EXCLUDE_rows.tsv"
"""The file of a shared set's folder listing rows every loader must drop."""


def need(path: Path) -> Path:
    """``path`` if it is a file; ``FileNotFoundError`` naming it otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"shared dataset file missing: {path}")
    return path


def parse_jsonl(text: str, where: str) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of JSONL ``text``; a bad line raises naming ``where``."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{where}, line {lineno}: invalid JSON ({e.msg})") from e
    return out


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a UTF-8 JSONL file."""
    return parse_jsonl(need(path).read_text(encoding="utf-8"), str(path))


def read_json(path: Path) -> Any:
    """A UTF-8 JSON file's document."""
    try:
        return json.loads(need(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from e


def read_csv(path: Path, delimiter: str = ",") -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and (line number, row) pairs of a UTF-8 CSV file (a leading BOM is dropped: MultiJail
    has one). The line number is that of the row's last line, as ``csv`` counts it."""
    with need(path).open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = list(reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader]
    return fields, rows


class SetFolder:
    """One shared set's folder; reading a file through it drops the rows its ``EXCLUDE_rows.tsv`` lists.

    A row index counts data rows from 0: CSV rows after the header, JSONL lines that hold a value,
    text lines, or the items of a JSON document's row list (:meth:`json_rows`). A listed row id must
    appear among the row's values, so an exclusion list that no longer fits its file fails loudly
    instead of dropping the wrong rows. A file with exclusions can only be read row by row.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.excluded: dict[str, dict[int, str]] = {}
        tsv = self.path / EXCLUDE_FILE
        if tsv.is_file():
            _, rows = read_csv(tsv, delimiter="\t")
            for line, r in rows:
                try:
                    self.excluded.setdefault(r["file"], {})[int(r["row_index_0based"])] = (r.get("row_id") or "").strip()
                except (KeyError, TypeError, ValueError):
                    raise InvalidInputError(f"{tsv}, line {line}: expected file, row_index_0based, row_id") from None

    def __repr__(self) -> str:
        return f"SetFolder({str(self.path)!r}, {sum(map(len, self.excluded.values()))} excluded rows)"

    def file(self, name: str) -> Path:
        """The path of ``name`` (relative to the folder); only for files without excluded rows."""
        if name in self.excluded:
            raise InvalidInputError(f"{self.path / name} has rows listed in {EXCLUDE_FILE}: read it row by row")
        return need(self.path / name)

    def files(self, pattern: str) -> list[str]:
        """The names (relative to the folder) of the files matching ``pattern``, sorted: one order on every machine."""
        found = sorted(p.relative_to(self.path).as_posix() for p in self.path.glob(pattern)) if self.path.is_dir() else []
        if not found:
            raise FileNotFoundError(f"shared dataset files missing: no {pattern} in {self.path}")
        return found

    def _keep(self, name: str, rows: list[Any]) -> list[Any]:
        """``rows`` without those listed for ``name``, after checking each listed row's id."""
        drop = self.excluded.get(name)
        if not drop:
            return rows
        for index, row_id in drop.items():
            if index >= len(rows):
                raise InvalidInputError(f"{self.path / EXCLUDE_FILE}: {name} has no row {index} ({len(rows)} rows)")
            values = rows[index].values() if isinstance(rows[index], dict) else [rows[index]]
            if row_id and row_id not in {str(v) for v in values}:
                raise InvalidInputError(
                    f"{self.path / EXCLUDE_FILE}: row {index} of {name} does not hold id {row_id!r} (the file changed?)")
        return [r for i, r in enumerate(rows) if i not in drop]

    def csv(self, name: str) -> list[dict[str, str]]:
        """The rows of a CSV file, excluded ones dropped."""
        return self._keep(name, [row for _, row in read_csv(self.path / name)[1]])

    def jsonl(self, name: str) -> list[Any]:
        """The values of a JSONL file, excluded ones dropped."""
        return self._keep(name, [value for _, value in read_jsonl(self.path / name)])

    def lines(self, name: str) -> list[str]:
        """The lines of a text file, excluded ones dropped."""
        return self._keep(name, need(self.path / name).read_text(encoding="utf-8").splitlines())

    def json(self, name: str) -> Any:
        """The whole document of a JSON file without excluded rows (otherwise use :meth:`json_rows`)."""
        self.file(name)
        return read_json(self.path / name)

    def json_rows(self, name: str, key: str | None = None) -> list[Any]:
        """The row list of a JSON file (the document, or its ``key`` item), excluded rows dropped."""
        doc = read_json(self.path / name)
        rows = doc if key is None else doc.get(key) if isinstance(doc, dict) else None
        if not isinstance(rows, list):
            raise InvalidInputError(f"{self.path / name}: expected a list of rows{f' under {key!r}' if key else ''}")
        return self._keep(name, rows)
