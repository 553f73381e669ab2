"""HTML study reports rendered with jinja2: setup, then sections with a finding, figures and tables.

    >>> from neuronatlas.report.html import Section, Table, write_report
    >>> write_report("out/report.html", title="Relation neurons", setup={"model": "default"},
    ...              sections=[Section("Cumulativity", "Accuracy falls from 0.9 to 0.1 ...",
    ...                                figures=["cumulativity.png"], tables=[Table(["a"], [[1]])])])

Findings are sentences computed from the numbers by the study, never fixed text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Section", "Table", "write_report", "fmt"]


@dataclass
class Table:
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass
class Section:
    title: str
    finding: str
    figures: Sequence[str] = field(default_factory=list)   # paths relative to the report
    tables: Sequence[Table] = field(default_factory=list)
    notes: str = ""


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "–"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_report(path: str | Path, *, title: str, setup: Mapping[str, Any], sections: Sequence[Section],
                 intro: str = "") -> Path:
    from jinja2 import Environment, PackageLoader, select_autoescape

    from neuronatlas.store.atlas import atomic_path

    env = Environment(loader=PackageLoader("neuronatlas.report", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = fmt
    html = env.get_template("report.html").render(title=title, setup=setup, sections=sections, intro=intro)
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return target
