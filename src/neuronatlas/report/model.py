"""The typed result of a study, as written under ``"report"`` in every ``results.json``.

One shape serves every study: the HTML report (``report.html``), the Markdown summary and the web
viewer's study page all render a :class:`StudyReport`, so a new study gets all three for free.

    >>> from neuronatlas.report.model import Finding, StudyReport, Section, Table
    >>> f = Finding("cumulativity", "Cumulativity", "Accuracy falls with the share deactivated.",
    ...             rule="p_trend < 0.05 and slope < 0", holds=True, numbers={"p_trend": 0.01})
    >>> rep = StudyReport("relations", "Relation-specific neurons", findings=[f],
    ...                   sections=[Section("Cumulativity", "cumulativity", tables=[Table(["a"], [[1]])])])
    >>> StudyReport.from_json(rep.to_json()) == rep
    True

Conventions the viewer relies on: a table cell that is exactly a neuron id (``L12:345``, see
:mod:`neuronatlas.ids`) is shown as a link to that neuron's page; a cell in a column listed in
``Table.concept_columns`` is a link to that concept's page; figures are file names relative to the
study folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Finding", "Table", "Section", "StudyReport"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):     # numpy scalars
        return _jsonable(value.item())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Finding:
    """One sentence of a report, produced from the numbers by a stated rule.

    ``rule`` is the test in words (thresholds included); ``holds`` says whether the claim the rule
    checks came out true (None: the rule could not be applied, e.g. too few facts); ``numbers`` are
    the values the sentence quotes."""

    key: str
    title: str
    text: str
    rule: str = ""
    holds: bool | None = None
    numbers: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "text": self.text, "rule": self.rule, "holds": self.holds,
                "numbers": _jsonable(dict(self.numbers))}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Finding:
        return cls(str(d["key"]), str(d.get("title", d["key"])), str(d["text"]), str(d.get("rule", "")),
                   d.get("holds"), dict(d.get("numbers") or {}))


@dataclass(frozen=True)
class Table:
    """A table: ``columns`` names and ``rows`` of cells (numbers, strings, None for missing)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    concept_columns: Sequence[str] = ()     # columns whose cells are concept names (linked by the viewer)

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "rows", tuple(tuple(r) for r in self.rows))
        object.__setattr__(self, "concept_columns", tuple(self.concept_columns))

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "rows": _jsonable([list(r) for r in self.rows]), "caption": self.caption,
                "concept_columns": list(self.concept_columns)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Table:
        return cls(tuple(d["columns"]), tuple(tuple(r) for r in d["rows"]), str(d.get("caption", "")),
                   tuple(d.get("concept_columns") or ()))


@dataclass(frozen=True)
class Section:
    """A part of the report: the finding it illustrates (by key, or free text), figures and tables."""

    title: str
    finding: str = ""                       # a Finding.key of the same report, or a sentence
    figures: Sequence[str] = ()             # file names relative to the study folder
    tables: Sequence[Table] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "figures", tuple(self.figures))
        object.__setattr__(self, "tables", tuple(self.tables))

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "finding": self.finding, "figures": list(self.figures),
                "tables": [t.to_json() for t in self.tables], "notes": self.notes}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Section:
        return cls(str(d["title"]), str(d.get("finding", "")), tuple(d.get("figures") or ()),
                   tuple(Table.from_json(t) for t in d.get("tables") or ()), str(d.get("notes", "")))


@dataclass(frozen=True)
class StudyReport:
    """Everything a reader sees of a study: setup, findings (in order) and sections."""

    study: str
    title: str
    intro: str = ""
    setup: Mapping[str, Any] = field(default_factory=dict)
    findings: Sequence[Finding] = ()
    sections: Sequence[Section] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "findings", tuple(self.findings))
        object.__setattr__(self, "sections", tuple(self.sections))

    def finding(self, key: str) -> Finding | None:
        return next((f for f in self.findings if f.key == key), None)

    def section_text(self, section: Section) -> str:
        """The sentence shown under a section's title: its finding's text when it names one."""
        f = self.finding(section.finding)
        return f.text if f is not None else section.finding

    def to_json(self) -> dict[str, Any]:
        return {"study": self.study, "title": self.title, "intro": self.intro, "setup": _jsonable(dict(self.setup)),
                "findings": [f.to_json() for f in self.findings], "sections": [s.to_json() for s in self.sections]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StudyReport:
        return cls(str(d["study"]), str(d["title"]), str(d.get("intro", "")), dict(d.get("setup") or {}),
                   tuple(Finding.from_json(f) for f in d.get("findings") or ()),
                   tuple(Section.from_json(s) for s in d.get("sections") or ()))

    def findings_dict(self) -> dict[str, str]:
        return {f.key: f.text for f in self.findings}
