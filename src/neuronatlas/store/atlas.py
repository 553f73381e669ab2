"""The on-disk atlas: one directory per model, owned by this module alone.

Layout (documented in docs/atlas-format.md)::

    ATLAS/manifest.json                 schema version, model provenance, records, studies
    ATLAS/records/<name>/record.json    how a recording was made (site, pooling, dataset hash)
    ATLAS/records/<name>/*.parquet      prompts, per-label neuron statistics, top-k exemplars
    ATLAS/records/<name>/pooled.safetensors   prompts x layers x neurons pooled responses (float16)
    ATLAS/*.parquet                     atlas-wide tables (decoded tokens, selections, explanations)

Every write goes to a temporary file in the same directory and is renamed into place, so a crash
never leaves a half-written file. This module never imports torch.

    >>> from neuronatlas.store import Atlas
    >>> atlas = Atlas.create("new-atlas", model={"model": "default", "family": "llama"})
    >>> Atlas.open("my-atlas").query("SELECT count(*) FROM stats")   # DuckDB over the Parquet tables
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neuronatlas.errors import AtlasError
from neuronatlas.store.schemas import conform

__all__ = ["Atlas", "SCHEMA_VERSION", "atomic_path", "write_json_atomic"]

SCHEMA_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Tables that live once per record; `Atlas.query` exposes each as one view over all records.
RECORD_TABLES = ("prompts", "stats", "exemplars", "histograms", "glu_signs", "glu_exemplars")


def _package_version() -> str:
    from neuronatlas import __version__

    return __version__


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync it, rename it onto ``target``
    and fsync the directory, so ``target`` is always the old or the new file, never a part.

    An OSError (full disk, file size limit, read-only file system) becomes one AtlasError line and
    leaves ``target`` as it was.
    """
    from neuronatlas.store.output import check_write_target

    check_write_target(target)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; atlases are as readable as any other file
        os.close(fd)
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent, directory=True)
    except OSError as exc:
        from neuronatlas.store.output import os_error_message

        raise AtlasError(os_error_message(exc, target)) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _sweep_temporaries(folder: Path) -> None:
    """Remove the temporary files of :func:`atomic_path` (``.<name>.<random>.tmp``) that a killed
    writer left in ``folder``; the files they were to replace are intact. Called when a writer
    reopens an atlas (one writer per atlas at a time)."""
    for tmp in folder.rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        from neuronatlas.store.output import os_error_message

        raise AtlasError(os_error_message(exc, path, "read")) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        first = str(exc).splitlines()[0] if str(exc) else "empty file"
        raise AtlasError(f"{what} {str(path)!r} does not parse ({first}); the atlas is damaged: rebuild it with --force "
                         "or into a new --out directory (nothing was overwritten)") from None


def _identity(model: dict[str, Any]) -> str:
    return str(model.get("file_sha256") or f"{model.get('model')}@{model.get('revision')}")


def check_name(name: str, what: str = "name") -> str:
    if not _NAME_RE.match(name):
        raise AtlasError(f"invalid {what} {name!r}; use letters, digits, '_', '-', '.' (max 100 chars)")
    return name


class Atlas:
    """A directory holding everything NeuronAtlas learned about one model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # --- creation and manifest ------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, model: dict[str, Any], force: bool = False) -> "Atlas":
        """Open ``path`` as an atlas of ``model``, creating it if needed.

        An existing atlas of another model is refused (its file hash or name differs); a manifest
        that does not parse is refused too, unless ``force`` rebuilds it.
        """
        from neuronatlas.store.output import check_out_dir

        check_out_dir(path)
        atlas = cls(path)
        damaged = False
        if atlas.manifest_path.exists() and force:
            try:
                atlas.manifest()
            except AtlasError:
                damaged = True
        if atlas.manifest_path.exists() and not damaged:
            existing = atlas.manifest().get("model", {})
            if _identity(existing) != _identity(model):
                raise AtlasError(
                    f"atlas {str(path)!r} belongs to model {existing.get('model')!r} "
                    f"({_identity(existing)}); choose another --out directory"
                )
            _sweep_temporaries(atlas.path)
            return atlas
        try:
            atlas.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from neuronatlas.store.output import os_error_message

            raise AtlasError(os_error_message(exc, atlas.path, "create")) from None
        write_json_atomic(atlas.manifest_path, {
            "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "neuronatlas_version": _package_version(),
            "model": model,
            "records": {},
            "tables": {},
            "studies": {},
        })
        return atlas

    @classmethod
    def open(cls, path: str | Path) -> "Atlas":
        atlas = cls(path)
        if not atlas.manifest_path.exists():
            raise AtlasError(f"{str(path)!r} is not an atlas (no manifest.json); create one with "
                             "`neuronatlas record` or `neuronatlas decode`")
        version = atlas.manifest().get("schema_version")
        if version != SCHEMA_VERSION:
            raise AtlasError(f"atlas {str(path)!r} has schema version {version}; this NeuronAtlas "
                             f"reads version {SCHEMA_VERSION}")
        return atlas

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        """The parsed manifest; an unreadable one is an AtlasError (never silently replaced)."""
        data = _read_json(self.manifest_path, "the manifest")
        if not isinstance(data, dict):
            raise AtlasError(f"{str(self.manifest_path)!r} is not a JSON object; the atlas is damaged: rebuild it with "
                             "--force or into a new --out directory")
        return data

    def update_manifest(self, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        manifest = self.manifest()
        fn(manifest)
        write_json_atomic(self.manifest_path, manifest)
        return manifest

    # --- files ------------------------------------------------------------------------------
    def file(self, relpath: str) -> Path:
        path = (self.path / relpath).resolve()
        if self.path.resolve() not in path.parents:
            raise AtlasError(f"path {relpath!r} leaves the atlas directory")
        return path

    def record_dir(self, name: str) -> Path:
        return self.path / "records" / check_name(name, "record name")

    def records(self) -> list[str]:
        return sorted(self.manifest().get("records", {}))

    def write_table(self, relpath: str, table: pa.Table | dict[str, Any],
                    *, describe: str | None = None) -> Path:
        """Write ``table`` atomically; tables with a schema in :mod:`.schemas` are checked and cast to it."""
        table = conform(relpath, table)
        target = self.file(relpath)
        with atomic_path(target) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        if describe is not None:
            self.update_manifest(lambda m: m.setdefault("tables", {}).__setitem__(relpath, describe))
        return target

    def read_table(self, relpath: str, columns: list[str] | None = None) -> pa.Table:
        target = self.file(relpath)
        if not target.exists():
            raise AtlasError(f"atlas {str(self.path)!r} has no table {relpath!r}")
        try:
            return pq.read_table(target, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise AtlasError(f"table {str(target)!r} is unreadable ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                             "the atlas is damaged: rebuild it with the command that wrote it and --force") from None

    def has(self, relpath: str) -> bool:
        return self.file(relpath).exists()

    def write_arrays(self, relpath: str, arrays: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> Path:
        from safetensors.numpy import save_file

        target = self.file(relpath)
        with atomic_path(target) as tmp:
            try:
                save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
            except Exception as exc:  # safetensors reports a failed write (EFBIG, ENOSPC) as SafetensorError
                code = re.search(r"os error (\d+)", str(exc))
                if isinstance(exc, OSError) or code is None:
                    raise
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(target)) from exc
        return target

    def read_arrays(self, relpath: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        target = self.file(relpath)
        if not target.exists():
            raise AtlasError(f"atlas {str(self.path)!r} has no array file {relpath!r}")
        try:
            return load_file(str(target))
        except Exception as exc:  # safetensors raises its own SafetensorError on a damaged file
            raise AtlasError(f"array file {str(target)!r} is unreadable ({str(exc).splitlines()[0]}); rebuild it with "
                             "the command that wrote it and --force") from None

    def write_json(self, relpath: str, data: Any) -> Path:
        target = self.file(relpath)
        write_json_atomic(target, data)
        return target

    def read_json(self, relpath: str) -> Any:
        target = self.file(relpath)
        if not target.exists():
            raise AtlasError(f"atlas {str(self.path)!r} has no file {relpath!r}")
        return _read_json(target, f"the atlas file {relpath!r}")

    # --- SQL ----------------------------------------------------------------------------------
    def connect(self, *, sandboxed: bool = True) -> Any:
        """An in-memory DuckDB connection with one view per table (record tables unioned over records).

        ``sandboxed`` (the default) confines it to reading files inside the atlas and locks its
        configuration (``store.sql.sandbox``); the viewer opens it unsandboxed, builds its in-memory
        copies, then sandboxes it.
        """
        import duckdb

        from neuronatlas.store.sql import sandbox

        root = self.path.resolve()
        con = duckdb.connect(":memory:")
        try:
            for table in RECORD_TABLES:
                files = sorted(root.glob(f"records/*/{table}.parquet"))
                if files:
                    paths = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
                    con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{paths}], union_by_name=true)")
            for file in sorted(root.glob("*.parquet")):
                view = re.sub(r"\W", "_", file.stem)
                path = str(file).replace("'", "''")
                con.execute(f'CREATE VIEW "{view}" AS SELECT * FROM read_parquet(\'{path}\')')
            if sandboxed:
                sandbox(con, root)
        except duckdb.Error as exc:
            con.close()
            raise AtlasError(f"atlas {str(self.path)!r} has an unreadable table: {str(exc).strip().splitlines()[0]}; "
                             "rebuild it with the command that wrote it (--force)") from None
        return con

    def views(self) -> list[str]:
        con = self.connect()
        try:
            return _views(con)
        finally:
            con.close()

    def query(self, sql: str, params: list[Any] | None = None, *, timeout: float | None = None,
              max_rows: int | None = None) -> pa.Table:
        """Run read-only ``sql`` (SELECT/EXPLAIN, checked by DuckDB's parser) on a sandboxed connection.

        ``timeout`` seconds (None: no limit) and ``max_rows`` bound the work; see ``store.sql``.
        """
        from neuronatlas.store.sql import run_read_query

        con = self.connect()
        try:
            return run_read_query(con, sql, params, timeout=timeout, max_rows=max_rows,
                                  tables=", ".join(_views(con)))
        finally:
            con.close()


def _views(con: Any) -> list[str]:
    return sorted(r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall())
