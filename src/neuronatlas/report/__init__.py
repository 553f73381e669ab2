"""Reports: plots and HTML pages of study results."""

from neuronatlas.report.html import Section, Table, fmt, write_report

__all__ = ["Section", "Table", "fmt", "write_report"]
