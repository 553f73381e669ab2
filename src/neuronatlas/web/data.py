"""Read-only data access for the viewer: one DuckDB connection per atlas, parameterised queries only.

Every value that comes from a URL reaches DuckDB as a bound parameter; the only identifiers ever
formatted into SQL are view and column names from the constants in this module. Missing tables or
columns (atlases made by older or partial pipelines) make a section disappear, never an error.

    >>> from neuronatlas.web.data import Library
    >>> lib = Library(["my-atlas"])                    # slugs from directory names
    >>> view = lib.get("my-atlas")
    >>> view.has("selections"), view.dims()            # (True, (30, 1536))
    >>> view.rows("SELECT layer, neuron FROM selections WHERE concept = ? LIMIT 5", ["capital"])

This module never imports torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from neuronatlas.errors import AtlasError, NeuronAtlasError, SelectionError
from neuronatlas.ids import NeuronId
from neuronatlas.store import Atlas
from neuronatlas.store.sql import check_read_only

__all__ = ["Library", "AtlasView", "NotFound", "BadRequest", "concept_key", "slugify", "neuron_from_url",
           "PAGE_SIZE", "MAX_PAGE", "STUDY_FILE_EXTS", "page_count", "MAX_LIVE_CHARS", "MAX_LIVE_TOKENS"]

PAGE_SIZE = 50
MAX_PAGE = 100_000
MAX_QUERY_CHARS = 200
MAX_LIVE_CHARS = 2000    # the "try your own text" box (serve --model): characters per request
MAX_LIVE_TOKENS = 256    # ... and tokens read (longer texts are cut)
STUDY_FILE_EXTS = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                   ".html": "text/html; charset=utf-8", ".json": "application/json"}
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.~-]{0,99}$")
_STUDY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,150}$")
_REFRESH_SECONDS = 2.0
_CACHE_ENTRIES = 4096
_PAGE_CACHE_ENTRIES = 256
_MAX_RESULTS_JSON = 20 * 1024 * 1024


class NotFound(NeuronAtlasError):
    """An atlas, neuron, concept, study, file or page that does not exist (HTTP 404)."""


class BadRequest(NeuronAtlasError):
    """A malformed URL or query parameter (HTTP 400)."""


def slugify(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower()[:60]
    return slug or "atlas"


def concept_key(concept: str) -> str:
    """A URL- and file-safe key for a concept name (the name itself when it is already safe)."""
    if _PLAIN_KEY.match(concept):
        return concept
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", concept).strip("._-")[:60] or "concept"
    return f"{safe}~{hashlib.sha1(concept.encode()).hexdigest()[:8]}"


def neuron_from_url(layer: str, neuron: str) -> NeuronId:
    """Parse the URL parts ``L12`` and ``345`` through :class:`NeuronId`; :class:`BadRequest` on anything else."""
    try:
        nid = NeuronId.from_url(layer, neuron)
    except SelectionError:
        nid = None
    if nid is None or nid.component is not None or nid.layer > 9999 or nid.index > 9_999_999:
        raise BadRequest(f"malformed neuron id {layer!r}/{neuron!r}; use /neuron/L<layer>/<neuron>, e.g. /neuron/L3/17")
    return nid


def page_count(total: int, size: int = PAGE_SIZE) -> int:
    return max(1, -(-total // size))


def check_page(page: int, total: int, size: int = PAGE_SIZE) -> int:
    """The row offset of ``page`` (1-based); pages past the last one are :class:`NotFound`."""
    if page < 1 or page > MAX_PAGE:
        raise BadRequest(f"page {page} is out of range; pages start at 1")
    last = page_count(total, size)
    if page > last:
        raise NotFound(f"page {page} is past the last page ({last})")
    return (page - 1) * size


def like_pattern(text: str) -> str:
    """An ILIKE pattern that matches ``text`` literally anywhere (escape character: backslash)."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"


def check_query(q: str) -> str:
    q = q.strip()
    if len(q) > MAX_QUERY_CHARS:
        raise BadRequest(f"search text is {len(q)} characters long; the limit is {MAX_QUERY_CHARS}")
    return q


@functools.lru_cache(maxsize=512)
def _check_sql(sql: str) -> None:
    """The viewer's SQL passes the same read-only check as `neuronatlas query` (once per distinct text)."""
    check_read_only(sql)


class AtlasView:
    """One served atlas: a cached DuckDB connection (rebuilt when files change) and small caches.

    ``memory_bytes`` bounds the estimated memory of the tables copied into DuckDB for fast lookups
    (see ``cache.py``).
    """

    def __init__(self, atlas: Atlas, slug: str, memory_bytes: int = 1 << 30) -> None:
        self.atlas = atlas
        self.slug = slug
        self.memory_bytes = memory_bytes
        self.in_memory: list[str] = []
        self.tokens: list[str] | None = None  # decoded-token spellings by id, when decoded is in memory
        self._pages: OrderedDict[Any, str] = OrderedDict()
        self._pages_lock = threading.Lock()
        self._lock = threading.Lock()
        self._con: Any = None
        self._signature: tuple[Any, ...] = ()
        self._checked = 0.0
        self._cache: dict[Any, Any] = {}

    # --- connection ---------------------------------------------------------------------------
    def _files_signature(self) -> tuple[Any, ...]:
        root = self.atlas.path
        files = [root / "manifest.json", *root.glob("*.parquet"), *root.glob("records/*/*.parquet"),
                 *root.glob("studies/*/results.json")]
        sig = []
        for f in sorted(files):
            try:
                st = f.stat()
            except OSError:
                continue
            sig.append((str(f), st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def _open(self) -> Any:
        from neuronatlas.web.cache import TOKEN_TABLE, materialize

        from neuronatlas.store.sql import sandbox

        con = self.atlas.connect(sandboxed=False)
        self.in_memory = materialize(con, self.atlas, self.memory_bytes)
        self.tokens = ([r[0] for r in con.execute(f"SELECT token FROM {TOKEN_TABLE} ORDER BY tid").fetchall()]
                       if "decoded" in self.in_memory else None)
        # Pages run many tiny queries side by side; threads inside one query only add overhead.
        con.execute("SET threads = 1")
        sandbox(con, self.atlas.path)  # the same confinement as `neuronatlas query`, then locked
        return con

    def _connection(self) -> Any:
        """The atlas connection; rebuilt (caches cleared) when the atlas files changed on disk.

        While one thread rebuilds, the others keep answering from the previous connection.
        """
        if self._con is not None and time.monotonic() - self._checked <= _REFRESH_SECONDS:
            return self._con
        if not self._lock.acquire(blocking=self._con is None):
            return self._con
        try:
            if self._con is None or time.monotonic() - self._checked > _REFRESH_SECONDS:
                sig = self._files_signature()
                if self._con is None or sig != self._signature:
                    con = self._open()
                    self._con, self._signature, self._cache = con, sig, {}
                    with self._pages_lock:
                        self._pages.clear()
                self._checked = time.monotonic()
            return self._con
        finally:
            self._lock.release()

    def warm(self) -> None:
        """Open the connection (and copy tables into memory) now rather than on the first request."""
        self._connection()
        self.dims()
        self.concepts()
        for view, column in (("decoded", "side"), ("decoded", "direction"), ("selections", "study"),
                             ("selections", "method")):
            self.distinct(view, column)

    def page(self, key: Any, build: Callable[[], str]) -> str:
        """A rendered page from a small LRU cache (cleared when the atlas changes), else ``build()``."""
        self._connection()
        with self._pages_lock:
            if key in self._pages:
                self._pages.move_to_end(key)
                return self._pages[key]
        html = build()
        with self._pages_lock:
            self._pages[key] = html
            while len(self._pages) > _PAGE_CACHE_ENTRIES:
                self._pages.popitem(last=False)
        return html

    def cursor(self) -> Any:
        """A DuckDB cursor (thread-safe duplicate of the atlas connection) with one view per table."""
        return self._connection().cursor()

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run ``sql`` with bound ``params``; rows as dicts."""
        import duckdb

        _check_sql(sql)
        cur = self.cursor()
        try:
            cur.execute(sql, list(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
        except duckdb.Error as exc:
            raise AtlasError(f"atlas {self.slug!r}: query failed: {str(exc).splitlines()[0]}") from None
        finally:
            cur.close()

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self.rows(sql, params)
        return next(iter(rows[0].values())) if rows else None

    def cached(self, key: Any, fn: Any) -> Any:
        self._connection()  # refreshes (and clears the cache) when the atlas changed on disk
        cache = self._cache
        if key not in cache:
            value = fn()
            if len(cache) >= _CACHE_ENTRIES:
                cache.pop(next(iter(cache)), None)
            cache[key] = value
        return cache[key]

    # --- metadata -----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return self.cached("manifest", self.atlas.manifest)  # type: ignore[no-any-return]

    def columns(self, view: str) -> set[str]:
        """Column names of ``view`` (empty when the atlas has no such table)."""
        def load() -> set[str]:
            rows = self.rows("SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND NOT internal", [view])
            return {r["column_name"] for r in rows}
        return self.cached(("columns", view), load)  # type: ignore[no-any-return]

    def has(self, view: str, *cols: str) -> bool:
        have = self.columns(view)
        return bool(have) and all(c in have for c in cols)

    def select(self, view: str, wanted: Sequence[str], alias: str = "") -> str:
        """A column list of the ``wanted`` columns, NULL for those the table lacks (names are constants)."""
        have = self.columns(view)
        prefix = f"{alias}." if alias else ""
        return ", ".join(f'{prefix}"{c}"' if c in have else f'NULL AS "{c}"' for c in wanted)

    def _physical(self, view: str) -> str:
        """The table to scan for whole-table aggregates (the compact copy of decoded when there is one)."""
        from neuronatlas.web.cache import DECODED_COPY

        return DECODED_COPY if view == "decoded" and "decoded" in self.in_memory else view

    def count(self, view: str) -> int:
        return int(self.cached(("count", view), lambda: self.scalar(
            f'SELECT count(*) FROM "{self._physical(view)}"')) or 0)

    def dims(self) -> tuple[int, int] | None:
        """(layers, neurons per layer) as seen in the tables, or None when no table names neurons."""
        def load() -> tuple[int, int] | None:
            best: tuple[int, int] | None = None
            for view in ("stats", "decoded", "exemplars", "selections", "explanations", "corpus_exemplars"):
                if self.has(view, "layer", "neuron"):
                    r = self.rows(f'SELECT max(layer) AS l, max(neuron) AS n FROM "{self._physical(view)}"')[0]
                    if r["l"] is not None:
                        cur = (int(r["l"]) + 1, int(r["n"]) + 1)
                        best = cur if best is None else (max(best[0], cur[0]), max(best[1], cur[1]))
                    if view == "stats" and best is not None:
                        break  # stats cover every neuron
            return best
        return self.cached("dims", load)  # type: ignore[no-any-return]

    def check_neuron(self, layer: int, neuron: int) -> None:
        dims = self.dims()
        if dims is None or layer >= dims[0] or neuron >= dims[1]:
            shape = f"{dims[0]} layers x {dims[1]} neurons" if dims else "no neurons"
            raise NotFound(f"neuron {NeuronId(layer, neuron)} is not in atlas {self.slug!r} ({shape})")

    def concepts(self) -> dict[str, str]:
        """Concept key -> concept name, from selections and the studies in the manifest."""
        def load() -> dict[str, str]:
            names: set[str] = set()
            if self.has("selections", "concept"):
                names |= {r["concept"] for r in self.rows("SELECT DISTINCT concept FROM selections")
                          if r["concept"] is not None}
            for study in self.manifest().get("studies", {}).values():
                if isinstance(study, dict):
                    names |= {str(c) for c in study.get("concepts") or [] if isinstance(c, (str, int))}
            return {concept_key(c): c for c in sorted(names)}
        return self.cached("concepts", load)  # type: ignore[no-any-return]

    def concept(self, key: str) -> str:
        if not _KEY.match(key) or key not in self.concepts():
            raise NotFound(f"concept {key!r} is not in atlas {self.slug!r}")
        return self.concepts()[key]

    def distinct(self, view: str, column: str) -> list[str]:
        """Distinct non-null values of a (constant) column, for filter menus and validation."""
        if not self.has(view, column):
            return []
        return self.cached(("distinct", view, column), lambda: sorted(  # type: ignore[no-any-return]
            str(r["v"]) for r in self.rows(f'SELECT DISTINCT "{column}"::VARCHAR AS v FROM "{self._physical(view)}"')
            if r["v"] is not None))

    def check_choice(self, value: str | None, view: str, column: str) -> str | None:
        if value in (None, ""):
            return None
        if value not in self.distinct(view, column):
            raise BadRequest(f"unknown {column} {value!r}; choose from: {', '.join(self.distinct(view, column))}")
        return value

    # --- studies ------------------------------------------------------------------------------
    def studies(self) -> list[str]:
        def load() -> list[str]:
            names = {s for s in self.manifest().get("studies", {}) if _STUDY.match(s)}
            root = self.atlas.path / "studies"
            if root.is_dir():
                names |= {p.name for p in root.iterdir() if p.is_dir() and _STUDY.match(p.name)}
            return sorted(names)
        return self.cached("studies", load)  # type: ignore[no-any-return]

    def study_dir(self, study: str) -> Path:
        if not _STUDY.match(study) or study not in self.studies():
            raise NotFound(f"study {study!r} is not in atlas {self.slug!r}")
        return self.atlas.path / "studies" / study

    def study_files(self, study: str) -> list[str]:
        """Servable files of a study (known extensions, plain files inside the study directory)."""
        d = self.study_dir(study)
        if not d.is_dir():
            return []
        root = d.resolve()
        out = []
        for p in sorted(d.iterdir()):
            if _FILE.match(p.name) and p.suffix.lower() in STUDY_FILE_EXTS and p.is_file() \
                    and p.resolve().parent == root:
                out.append(p.name)
        return out

    def study_file(self, study: str, name: str) -> Path:
        """The path of a study file after validating name, extension and location (else NotFound)."""
        if not _FILE.match(name) or Path(name).suffix.lower() not in STUDY_FILE_EXTS:
            raise NotFound(f"no servable file {name!r} in study {study!r}")
        d = self.study_dir(study).resolve()
        path = (d / name).resolve()
        atlas_root = self.atlas.path.resolve()
        if path.parent != d or atlas_root not in path.parents or not path.is_file():
            raise NotFound(f"no servable file {name!r} in study {study!r}")
        return path

    def study_results(self, study: str) -> Any:
        """Parsed ``results.json`` of a study (None when absent, unreadable or over 20 MB)."""
        def load() -> Any:
            path = self.study_dir(study) / "results.json"
            try:
                if not path.is_file() or path.stat().st_size > _MAX_RESULTS_JSON:
                    return None
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return None
        return self.cached(("results", study), load)


class Library:
    """The atlases one server (or one export) shows, by slug."""

    def __init__(self, paths: Sequence[str | Path], *, memory_mb: int = 1024) -> None:
        if not paths:
            raise AtlasError("no atlas given; pass at least one atlas directory")
        self.views: dict[str, AtlasView] = {}
        for path in paths:
            atlas = Atlas.open(path)
            base = slugify(Path(path).resolve().name)
            slug, i = base, 2
            while slug in self.views:
                slug, i = f"{base}-{i}", i + 1
            self.views[slug] = AtlasView(atlas, slug, memory_bytes=memory_mb << 20)

    def get(self, slug: str) -> AtlasView:
        if slug not in self.views:
            raise NotFound(f"no atlas {slug!r} is served here; served: {', '.join(self.views)}")
        return self.views[slug]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.views.values())
