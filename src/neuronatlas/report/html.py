"""HTML study reports rendered with jinja2: setup, then sections with a finding, figures and tables.

    >>> from neuronatlas.report.html import Section, Table, write_report
    >>> write_report("out/report.html", title="Relation neurons", setup={"model": "default"},
    ...              sections=[Section("Cumulativity", "Accuracy falls from 0.9 to 0.1 ...",
    ...                                figures=["cumulativity.png"], tables=[Table(["a"], [[1]])])])

Findings are sentences computed from the numbers by the study, never fixed text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neuronatlas.report.model import Finding, Section, StudyReport, Table

__all__ = ["Section", "Table", "write_report", "write_study_report", "fmt"]


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:
            return "–"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_report(path: str | Path, *, title: str, setup: Mapping[str, Any], sections: Sequence[Section],
                 intro: str = "", findings: Sequence[Finding] = ()) -> Path:
    """Render a report; each section's ``finding`` is a key of ``findings`` or a sentence."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    from neuronatlas.store.atlas import atomic_path

    env = Environment(loader=PackageLoader("neuronatlas.report", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = fmt
    by_key = {f.key: f for f in findings}
    shown = [{"title": sec.title, "finding": by_key[sec.finding].text if sec.finding in by_key else sec.finding,
              "figures": sec.figures, "tables": sec.tables, "notes": sec.notes} for sec in sections]
    html = env.get_template("report.html").render(title=title, setup=setup, sections=shown, intro=intro,
                                                  findings=findings)
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return target


def write_study_report(path: str | Path, report: StudyReport) -> Path:
    """Render a :class:`~neuronatlas.report.model.StudyReport` as a self-contained HTML page."""
    return write_report(path, title=report.title, setup=report.setup, sections=report.sections, intro=report.intro,
                        findings=report.findings)
