"""Readers for CSV / TSV / JSON / JSONL files, with column checks that name the culprit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import DataError

__all__ = ["read_table", "pick_column", "TEXT_COLUMN_GUESSES"]

TEXT_COLUMN_GUESSES = ("prompt", "goal", "forbidden_prompt", "behavior", "instruction",
                       "question", "text", "sentence")


def read_table(path: Path) -> list[dict]:
    """Rows of a .csv/.tsv/.json/.jsonl file as dicts (header excluded)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"data": [...]} or column-oriented {"col": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) == 1 and lists[0] and isinstance(lists[0][0], dict):
                    data = lists[0]
                elif lists and all(isinstance(v, list) for v in data.values()):
                    n = len(lists[0])
                    data = [{k: v[i] for k, v in data.items()} for i in range(n)]
            if not isinstance(data, list) or (data and not isinstance(data[0], dict)):
                raise DataError(f"{path}: expected a JSON list of objects")
            return data
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot parse {path}: {e}") from e
    raise DataError(f"unsupported data file type {suffix!r} for {path}; use .csv, .tsv, .json or .jsonl")


def pick_column(rows: list[dict], path: Path | str, column: str | None,
                case_insensitive: bool = False) -> str:
    """The column to read text from: ``column`` if given (must exist), else a common text column."""
    if not rows:
        raise DataError(f"{path} has no rows")
    cols = list(rows[0].keys())
    if column is not None:
        if column in cols:
            return column
        if case_insensitive:
            for c in cols:
                if c.lower() == column.lower():
                    return c
        raise DataError(f"{path} has no column {column!r} (columns: {', '.join(cols)})")
    lower = {c.lower(): c for c in cols}
    for guess in TEXT_COLUMN_GUESSES:
        if guess in lower:
            return lower[guess]
    raise DataError(f"{path}: no text column found among {', '.join(cols)}; name one with PATH@COLUMN")
