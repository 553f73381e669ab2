"""Reports: the typed study report (:mod:`neuronatlas.report.model`), plots and HTML pages."""

from neuronatlas.report.html import fmt, write_report, write_study_report
from neuronatlas.report.model import Finding, Section, StudyReport, Table

__all__ = ["Finding", "Section", "StudyReport", "Table", "fmt", "write_report", "write_study_report"]
