"""Static export: the viewer's pages as plain HTML files with relative links (no server needed).

Which neuron pages are written (all 46,080 of a 30 x 1,536 model would take long and rarely help):
every neuron in ``selections.parquet``, every neuron in ``explanations.parquet``, and every neuron
in the decoded-token search results for each ``tokens`` entry (whole-token match, as the server's
default search). ``all_neurons=True`` writes every neuron of the atlas. Links to neurons that were
not written are shown as plain text.

    >>> from neuronatlas.web.export import export_site
    >>> summary = export_site(["my-atlas"], "site", tokens=["Paris"])
    >>> summary.pages, summary.neurons          # then open site/index.html in a browser
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronatlas.errors import AtlasError
from neuronatlas.web.data import AtlasView, Library, NotFound
from neuronatlas.web.neuron import neuron_context
from neuronatlas.web.pages import (
    atlas_context,
    concept_context,
    heatmap_context,
    home_context,
    search_context,
    study_context,
)
from neuronatlas.web.render import STATIC, StaticLinker, render, static_path

__all__ = ["export_site", "ExportSummary", "export_neurons", "MARKER"]

MARKER = ".neuronatlas-export"


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    pages: int
    neurons: int
    files: int
    seconds: float


def export_neurons(view: AtlasView, *, all_neurons: bool = False,
                   tokens: Sequence[str] = ()) -> set[tuple[int, int]]:
    """The (layer, neuron) pairs whose pages an export writes (see the module docstring)."""
    if all_neurons:
        dims = view.dims()
        return {(lay, n) for lay in range(dims[0]) for n in range(dims[1])} if dims else set()
    found: set[tuple[int, int]] = set()
    for table in ("selections", "explanations"):
        if view.has(table, "layer", "neuron"):
            found |= {(int(r["layer"]), int(r["neuron"]))
                      for r in view.rows(f'SELECT DISTINCT layer, neuron FROM "{table}"')}
    if view.has("decoded", "layer", "neuron", "token"):
        for token in tokens:
            base = token.strip().lower()
            found |= {(int(r["layer"]), int(r["neuron"])) for r in view.rows(
                "SELECT DISTINCT layer, neuron FROM decoded WHERE lower(token) IN (?, ?, ?, ?)",
                [base, "ġ" + base, "▁" + base, " " + base])}
    dims = view.dims()
    return {(lay, n) for lay, n in found if dims and 0 <= lay < dims[0] and 0 <= n < dims[1]}


class _Writer:
    def __init__(self, out: Path, neurons: dict[str, set[tuple[int, int]]], searches: dict[str, list[str]]) -> None:
        self.out, self.neurons, self.searches, self.pages = out, neurons, searches, 0

    def page(self, rel: str, template: str, ctx: dict[str, Any]) -> None:
        html = render(template, ctx, StaticLinker(rel, self.neurons, self.searches))
        target = self.out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(html, encoding="utf-8")
        self.pages += 1


def _check_out(out: Path, library: Library) -> None:
    resolved = out.resolve()
    for view in library:
        root = view.atlas.path.resolve()
        if resolved == root or root in resolved.parents:
            raise AtlasError(f"--out {str(out)!r} is inside atlas {str(view.atlas.path)!r}; the viewer never "
                             "writes into an atlas, choose a directory outside it")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise AtlasError(f"--out {str(out)!r} exists and is not an empty directory or an earlier export; "
                         "choose a new directory")


def _export_atlas(view: AtlasView, w: _Writer, tokens: Sequence[str], workers: int,
                  progress: Callable[[int, int], None] | None) -> int:
    slug, copied = view.slug, 0
    w.page(static_path("atlas", slug), "atlas.html", atlas_context(view) | {"exported_searches": list(tokens)})
    if view.has("selections", "concept", "layer", "neuron"):
        first = heatmap_context(view, page=1)
        for page in range(1, first["pages"] + 1):
            w.page(static_path("heatmap", slug, page=page), "heatmap.html",
                   first if page == 1 else heatmap_context(view, page=page))
    for key in view.concepts():
        rel = static_path("concept", slug, key=key)
        ctx = concept_context(view, key, linker=StaticLinker(rel, w.neurons, w.searches))
        layers = [None, *sorted(int(x) for x in _layers_of(view, ctx["concept"]))]
        for layer in layers:
            page, pages = 1, 1
            while page <= pages:
                rel = static_path("concept", slug, key=key, layer=layer, page=page)
                c = concept_context(view, key, page=page, layer=layer, linker=StaticLinker(rel, w.neurons, w.searches))
                pages = c["pages"]
                w.page(rel, "concept.html", c)
                page += 1
    for study in view.studies():
        w.page(static_path("study", slug, study=study), "study.html", study_context(view, study))
        for name in view.study_files(study):
            target = w.out / static_path("study_file", slug, study=study, name=name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(view.study_file(study, name), target)
            copied += 1
    for token in tokens:
        page, pages = 1, 1
        while page <= pages:
            ctx = search_context(view, q=token, kind="token", page=page)
            pages = ctx["pages"]
            w.page(static_path("search", slug, q=token, page=page), "search.html", ctx)
            page += 1
    todo = sorted(w.neurons.get(slug, set()))
    done = 0

    def one(ln: tuple[int, int]) -> None:
        rel = static_path("neuron", slug, layer=ln[0], neuron=ln[1])
        w.page(rel, "neuron.html", neuron_context(view, *ln))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(one, todo):
            done += 1
            if progress is not None and (done % 50 == 0 or done == len(todo)):
                progress(done, len(todo))
    return copied


def _layers_of(view: AtlasView, concept: str) -> list[int]:
    return [r["layer"] for r in view.rows("SELECT DISTINCT layer FROM selections WHERE concept = ? ORDER BY layer",
                                          [concept])] if view.has("selections", "concept", "layer") else []


def export_site(paths: Sequence[str | Path], out: str | Path, *, all_neurons: bool = False,
                tokens: Sequence[str] = (), workers: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """Write the pages of the atlases at ``paths`` under ``out`` (see the module docstring)."""
    start = time.perf_counter()
    library = Library(paths)
    out = Path(out)
    _check_out(out, library)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by neuronatlas export-html; safe to delete\n")
    shutil.copytree(STATIC, out / "static", dirs_exist_ok=True)
    tokens = [t for t in dict.fromkeys(t.strip() for t in tokens) if t]
    neurons = {v.slug: export_neurons(v, all_neurons=all_neurons, tokens=tokens) for v in library}
    searches = {v.slug: [t for t in tokens if v.has("decoded", "token")] for v in library}
    w = _Writer(out, neurons, searches)
    w.page(static_path("home"), "home.html", home_context(library))
    copied = 0
    for view in library:
        try:
            copied += _export_atlas(view, w, searches[view.slug], workers or min(4, os.cpu_count() or 1), progress)
        except NotFound as exc:  # a table changed under us; the pages written so far stay valid
            raise AtlasError(f"export of {view.slug!r} failed: {exc}") from None
    return ExportSummary(out, w.pages, sum(len(s) for s in neurons.values()), copied,
                         round(time.perf_counter() - start, 2))
