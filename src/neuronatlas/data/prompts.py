"""Labelled prompt sets from JSONL, CSV or Parquet.

Columns: ``text`` (required), ``label`` (the concept or group), and optional ``target`` (expected
continuation), ``subject``, ``lang``, ``split``. Extra columns are kept in ``Prompt.extra``.

    >>> from neuronatlas.data import load_prompts
    >>> prompts = load_prompts("facts.jsonl")                 # raises DatasetError on bad rows
    >>> prompts = load_prompts("facts.csv", skip_bad=True)    # skips them, counts in .skipped
    >>> prompts.labels, len(prompts), prompts.content_hash
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuronatlas.errors import DatasetError

__all__ = ["Prompt", "PromptSet", "load_prompts", "OPTIONAL_FIELDS", "read_jsonl_objects", "SPLIT_NAMES"]

# users' split names -> the two a study uses (neurons found on "identify", effects measured on "test")
SPLIT_NAMES = {"identify": "identify", "train": "identify", "test": "test", "dev": "test"}

OPTIONAL_FIELDS = ("target", "subject", "lang", "split")


@dataclass(frozen=True)
class Prompt:
    text: str
    label: str
    target: str | None = None
    subject: str | None = None
    lang: str | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def as_row(self) -> dict[str, Any]:
        return {"text": self.text, "label": self.label, "target": self.target, "subject": self.subject,
                "lang": self.lang, "split": self.split}


@dataclass
class PromptSet:
    """An ordered list of prompts plus where they came from."""

    prompts: list[Prompt]
    source: str = "<memory>"
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    @property
    def labels(self) -> list[str]:
        """Distinct labels in order of first appearance."""
        return list(dict.fromkeys(p.label for p in self.prompts))

    @property
    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for p in self.prompts:
            digest.update(json.dumps(p.as_row(), sort_keys=True).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def filter(self, *, split: str | None = None, labels: Iterable[str] | None = None,
               lang: str | None = None) -> "PromptSet":
        wanted = set(labels) if labels is not None else None
        kept = [p for p in self.prompts
                if (split is None or p.split == split) and (wanted is None or p.label in wanted)
                and (lang is None or p.lang == lang)]
        return PromptSet(kept, source=self.source)

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]], *, source: str = "<memory>",
                  text_field: str = "text", label_field: str = "label", skip_bad: bool = False,
                  line_numbers: Sequence[int] | None = None) -> "PromptSet":
        prompts: list[Prompt] = []
        skipped: list[tuple[int, str]] = []
        if not rows:
            raise DatasetError("the dataset is empty; give at least one row with a 'text' field", path=source)
        if label_field != "label" and isinstance(rows[0], dict) and label_field not in rows[0]:
            raise DatasetError(f"unknown label column {label_field!r}; columns are: {', '.join(rows[0])}",
                               path=source, line=1, field=label_field)
        numbers = line_numbers if line_numbers is not None else range(1, len(rows) + 1)
        for line, row in zip(numbers, rows):
            try:
                prompts.append(_to_prompt(row, text_field, label_field, source, line))
            except DatasetError as exc:
                if not skip_bad:
                    raise
                skipped.append((line, str(exc)))
        if not prompts:
            raise DatasetError("no valid rows left after skipping bad ones", path=source)
        return cls(prompts, source=source, skipped=skipped)


def _to_prompt(row: Any, text_field: str, label_field: str, source: str, line: int) -> Prompt:
    if not isinstance(row, dict):
        raise DatasetError("row is not an object; each line must be a JSON object", path=source, line=line)
    text = row.get(text_field)
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"missing or empty text; every row needs a non-empty {text_field!r} string",
                           path=source, line=line, field=text_field)
    label = row.get(label_field, "all") if label_field == "label" else row.get(label_field)
    if label is None or (isinstance(label, float) and label != label):
        raise DatasetError(f"missing label; add a {label_field!r} value", path=source, line=line, field=label_field)
    values: dict[str, str | None] = {}
    for name in OPTIONAL_FIELDS:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            if isinstance(value, float) and value != value:  # NaN from CSV/Parquet
                value = None
            else:
                raise DatasetError(f"{name} must be a string, got {type(value).__name__}",
                                   path=source, line=line, field=name)
        values[name] = value if name == "target" else (value or None)
    extra = {k: v for k, v in row.items() if k not in {text_field, label_field, *OPTIONAL_FIELDS}}
    return Prompt(text=text, label=str(label), extra=extra, **values)  # type: ignore[arg-type]


def _read_rows(path: Path, bad_json: list[tuple[int, str]] | None = None) -> tuple[list[Any], list[int]]:
    """Rows of a file and their line numbers (CSV: counting the header as line 1).

    Bad JSONL lines (not UTF-8, not JSON) raise, or are appended to ``bad_json`` when it is given.
    Unreadable files (a folder, a damaged Parquet file, a CSV that is not UTF-8) raise DatasetError."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path, bad_json)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except pa.ArrowException as exc:
                raise DatasetError(f"not a readable Parquet file ({_first_line(exc)}); rewrite it with pandas/pyarrow "
                                   "or convert it to .jsonl", path=str(path)) from None
            return rows, list(range(1, len(rows) + 1))
    except OSError as exc:
        raise DatasetError(f"cannot read the file ({exc.strerror or _first_line(exc)}); check the path",
                           path=str(path)) from None
    raise DatasetError(f"unsupported file type {suffix!r}; use .jsonl, .csv or .parquet", path=str(path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_jsonl_objects(path: str | Path, fields: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file. A line that is not UTF-8, not
    JSON, or not a JSON object raises a one-line :class:`DatasetError` naming the file and line;
    ``fields`` names what a row holds, for that message (e.g. "text, target, relation, split")."""
    rows, numbers = _read_jsonl(Path(path), None, skip_flag=False)
    for line_no, row in zip(numbers, rows):
        if not isinstance(row, dict):
            raise DatasetError(f"each line must be a JSON object with {fields}", path=str(path), line=line_no)
    return list(zip(numbers, rows))


def _read_jsonl(path: Path, bad_json: list[tuple[int, str]] | None, skip_flag: bool = True
                ) -> tuple[list[Any], list[int]]:
    skip = " or pass --skip-bad" if skip_flag else ""
    rows: list[Any] = []
    numbers: list[int] = []
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                rows.append(json.loads(line))
                numbers.append(line_no)
            except UnicodeDecodeError as exc:
                problem = (f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                           f"re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8){skip}")
            except ValueError as exc:  # JSONDecodeError, or a number too large to convert
                problem = (f"bad JSON ({getattr(exc, 'msg', None) or _first_line(exc)})", f"fix the line{skip}")
            else:
                continue
            if bad_json is None:
                raise DatasetError("; ".join(problem), path=str(path), line=line_no)
            bad_json.append((line_no, problem[0]))
    return rows, numbers


def _read_csv(path: Path) -> tuple[list[Any], list[int]]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(fh)]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not UTF-8 (byte 0x{exc.object[exc.start]:02x}); re-save the file "
                           "as UTF-8 (e.g. iconv -f latin1 -t utf-8)", path=str(path)) from None
    except csv.Error as exc:
        raise DatasetError(f"not a readable CSV file ({_first_line(exc)}); fix the file or convert it to .jsonl",
                           path=str(path)) from None
    return rows, list(range(2, len(rows) + 2))


def load_prompts(path: str | Path, *, text_field: str = "text", label_field: str = "label",
                 skip_bad: bool = False) -> PromptSet:
    """Read a labelled prompt set; see the module docstring."""
    p = Path(path)
    if not p.exists():
        raise DatasetError("file not found; check the path", path=str(path))
    if not p.is_file():
        raise DatasetError("is not a file; give a .jsonl, .csv or .parquet file", path=str(path))
    bad_json: list[tuple[int, str]] = []
    rows, numbers = _read_rows(p, bad_json if skip_bad else None)
    prompts = PromptSet.from_rows(rows, source=str(p), text_field=text_field, label_field=label_field,
                                  skip_bad=skip_bad, line_numbers=numbers)
    prompts.skipped = sorted(bad_json + prompts.skipped)
    return prompts
