"""The Neuron Atlas viewer: a local, read-only web app and a static-site export over atlases.

    $ neuronatlas serve my-atlas other-atlas --port 8765      # http://127.0.0.1:8765/
    $ neuronatlas export-html my-atlas --out site/            # open site/index.html

    >>> from neuronatlas.web import Library, create_app, export_site
    >>> app = create_app(Library(["my-atlas"]))               # an ASGI app (FastAPI)
    >>> export_site(["my-atlas"], "site")                     # ExportSummary(pages=..., neurons=...)

Reads atlases through DuckDB only; never imports torch or loads a model. ``create_app`` and
``serve`` need the ``web`` extra (fastapi, uvicorn); the export needs only jinja2.
"""

from __future__ import annotations

from typing import Any

from neuronatlas.web.data import AtlasView, BadRequest, Library, NotFound
from neuronatlas.web.export import ExportSummary, export_site

__all__ = ["Library", "AtlasView", "NotFound", "BadRequest", "create_app", "serve", "is_loopback", "export_site",
           "ExportSummary"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve", "is_loopback"):
        from neuronatlas.web import app

        return getattr(app, name)
    raise AttributeError(f"module 'neuronatlas.web' has no attribute {name!r}")
