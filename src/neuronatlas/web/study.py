"""The study page: a study's typed report (findings with their rules, figures, tables), never a key dump.

Every study writes ``"report": StudyReport.to_json()`` into its ``results.json``
(:mod:`neuronatlas.report.model`); this module turns it into the page's context: table cells that
are exactly a neuron id (``L12:345``) become links to the neuron page, cells of a table's
``concept_columns`` links to the concept page, figures are served from the study folder. A
``results.json`` without a report (atlases from before the typed report) shows its ``findings``
only, beside the downloads.

    >>> from neuronatlas.web.data import Library
    >>> from neuronatlas.web.study import study_context
    >>> ctx = study_context(Library(["out/relations/atlas"]).get("atlas"), "relations")  # doctest: +SKIP
    >>> [f["title"] for f in ctx["report"]["findings"]]                                # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from neuronatlas.errors import SelectionError
from neuronatlas.ids import NeuronId
from neuronatlas.report.model import Finding, Section, StudyReport, Table
from neuronatlas.web.data import AtlasView, concept_key

__all__ = ["study_context", "study_info", "cell", "report_concept_numbers", "PLOT_EXTS"]

PLOT_EXTS = (".png", ".svg", ".jpg", ".jpeg")
_NEURON_CELL = re.compile(r"^[Ll]\d{1,6}(?:\.[a-z]+)?:\d{1,9}$")
_MAX_ROWS = 500            # rows shown per table (the full table stays in results.json)
_MAX_SETUP = 40


def study_info(view: AtlasView, study: str) -> dict[str, Any]:
    """A study's manifest entry and servable files (plots, report.html, results.json)."""
    meta = view.manifest().get("studies", {}).get(study) or {}
    files = view.study_files(study)
    return {"name": study, "kind": meta.get("kind") if isinstance(meta, dict) else None,
            "created": meta.get("created") if isinstance(meta, dict) else None,
            "concepts": [str(c) for c in (meta.get("concepts") or [])] if isinstance(meta, dict) else [],
            "files": files, "plots": [f for f in files if f.lower().endswith(PLOT_EXTS)],
            "report": "report.html" if "report.html" in files else None,
            "results": "results.json" if "results.json" in files else None}


def cell(value: Any, *, concept_column: bool, dims: tuple[int, int] | None, concepts: Mapping[str, str]) -> dict[str, Any]:
    """One table cell for the template: ``{value, neuron: (layer, n) | None, concept: key | None}``."""
    out: dict[str, Any] = {"value": value, "neuron": None, "concept": None,
                           "num": isinstance(value, (int, float)) and not isinstance(value, bool)}
    if isinstance(value, str):
        if _NEURON_CELL.match(value.strip()):
            try:
                layer, n = NeuronId.parse(value).pair
            except SelectionError:
                return out
            if dims is not None and layer < dims[0] and n < dims[1]:
                out["neuron"] = (layer, n)
        elif concept_column and concept_key(value) in concepts:
            out["concept"] = concept_key(value)
    return out


def _short(v: Any) -> Any:
    """A setup or finding number as shown: scalars as they are, short lists joined, the rest summarised."""
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, str):
        return v if len(v) <= 200 else v[:197] + "..."
    if isinstance(v, (list, tuple)):
        if len(v) <= 12 and all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v):
            return ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v)
        return f"{len(v)} items"
    if isinstance(v, dict):
        return f"{len(v)} entries"
    return str(v)


def _finding(f: Finding) -> dict[str, Any]:
    return {"key": f.key, "title": f.title, "text": f.text, "rule": f.rule, "holds": f.holds,
            "numbers": [(k, _short(v)) for k, v in f.numbers.items()]}


def _table(t: Table, dims: tuple[int, int] | None, concepts: Mapping[str, str]) -> dict[str, Any]:
    concept_idx = {i for i, c in enumerate(t.columns) if c in t.concept_columns}
    rows = [[cell(v, concept_column=i in concept_idx, dims=dims, concepts=concepts) for i, v in enumerate(r)]
            for r in t.rows[:_MAX_ROWS]]
    numeric = [bool(rows) and all(r[i]["num"] or r[i]["value"] is None for r in rows if i < len(r))
               for i in range(len(t.columns))]
    for r in rows:
        for i, c in enumerate(r):
            c["num"] = c["num"] or (i < len(numeric) and numeric[i])
    return {"columns": list(t.columns), "numeric": numeric, "rows": rows, "caption": t.caption,
            "more": max(0, len(t.rows) - _MAX_ROWS)}


def _section(rep: StudyReport, s: Section, files: list[str], dims: tuple[int, int] | None,
             concepts: Mapping[str, str]) -> dict[str, Any]:
    figures = [{"name": f, "servable": f in files, "image": f.lower().endswith(PLOT_EXTS)} for f in s.figures]
    finding = rep.finding(s.finding)
    return {"title": s.title, "text": rep.section_text(s), "finding_key": finding.key if finding else None,
            "figures": figures, "tables": [_table(t, dims, concepts) for t in s.tables], "notes": s.notes}


def _report(results: Any, files: list[str], dims: tuple[int, int] | None,
            concepts: Mapping[str, str]) -> dict[str, Any] | None:
    if not isinstance(results, dict) or not isinstance(results.get("report"), dict):
        return None
    try:
        rep = StudyReport.from_json(results["report"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    setup = [(str(k), _short(v)) for k, v in list(rep.setup.items())[:_MAX_SETUP]]
    return {"title": rep.title, "intro": rep.intro, "setup": setup, "findings": [_finding(f) for f in rep.findings],
            "sections": [_section(rep, s, files, dims, concepts) for s in rep.sections]}


def _plain_findings(results: Any) -> list[dict[str, Any]]:
    """The ``findings`` of a results.json without a typed report: a {key: text} dict or a list."""
    found = results.get("findings") if isinstance(results, dict) else None
    out: list[dict[str, Any]] = []
    if isinstance(found, dict):
        out = [{"title": str(k), "text": _short(v) if not isinstance(v, str) else v} for k, v in found.items()]
    elif isinstance(found, list):
        for i, f in enumerate(found):
            if isinstance(f, dict):
                out.append({"title": str(f.get("title") or f.get("key") or i + 1), "text": str(f.get("text", _short(f)))})
            else:
                out.append({"title": str(i + 1), "text": str(f)})
    return out[:100]


def report_concept_numbers(results: Any, concept: str, limit: int = 200) -> list[tuple[str, Any]]:
    """(``section · caption · column``, value) for every cell of the report-table rows whose concept
    column holds ``concept`` (the concept page shows them)."""
    if not isinstance(results, dict) or not isinstance(results.get("report"), dict):
        return []
    try:
        rep = StudyReport.from_json(results["report"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return []
    out: list[tuple[str, Any]] = []
    for sec in rep.sections:
        for t in sec.tables:
            idx = [i for i, c in enumerate(t.columns) if c in t.concept_columns]
            for r in t.rows:
                if any(i < len(r) and str(r[i]) == concept for i in idx):
                    where = " · ".join(x for x in (sec.title, t.caption) if x)
                    out.extend((f"{where} · {c}", _short(v)) for i, (c, v) in enumerate(zip(t.columns, r))
                               if i not in idx)
                if len(out) >= limit:
                    return out[:limit]
    return out


def study_context(view: AtlasView, study: str) -> dict[str, Any]:
    """The study page: the typed report when results.json has one, else its plain findings and plots."""
    info = study_info(view, study)
    results = view.study_results(study)
    report = _report(results, info["files"], view.dims(), view.concepts())
    return {"title": f"{view.slug}: study {study}", "slug": view.slug, "study": info, "report": report,
            "findings": _plain_findings(results) if report is None else [], "has_results": results is not None,
            "concept_keys": set(view.concepts())}
