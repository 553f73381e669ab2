"""Checks on ``--out`` paths and the atomic export of query results (``neuronatlas query --out``).

An atlas ``--out`` must be a directory (or not exist yet) on a writable file system, outside the
kernel's pseudo file systems; an export file must have a known extension and lie outside every
atlas, so that no query result can overwrite an atlas table.

    >>> check_out_dir(Path("/dev/null"))
    Traceback (most recent call last):
    neuronatlas.errors.AtlasError: --out '/dev/null' is inside /dev, a kernel pseudo file system; ...
    >>> write_export(table, Path("rows.csv"))  # temporary file + fsync + rename
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyarrow as pa

from neuronatlas.errors import AtlasError

__all__ = ["check_out_dir", "check_out_file", "check_export_path", "write_export", "EXPORT_FORMATS", "os_error_message",
           "check_write_target"]

EXPORT_FORMATS = (".csv", ".parquet", ".json")
_PSEUDO = (Path("/proc"), Path("/sys"), Path("/dev"))


def os_error_message(exc: OSError, path: Path | str, action: str = "write") -> str:
    """One line for an OSError of ``action`` on ``path``, with the fix."""
    reason = exc.strerror or type(exc).__name__
    fix = {errno.ENOSPC: "free some space or choose another --out",
           errno.EFBIG: "the file size limit was reached; free space, raise the limit (ulimit -f) or choose another --out",
           errno.EROFS: "the file system is read-only; choose another --out",
           errno.EACCES: "choose a directory you can write to",
           errno.EPERM: "choose a directory you can write to",
           errno.ENOTDIR: "a part of the path is a file; choose another --out"}.get(exc.errno or 0, "check the path")
    return f"could not {action} {str(path)!r}: {reason}; {fix}"


def _pseudo(path: Path) -> bool:
    return any(path == p or p in path.parents for p in _PSEUDO)


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path("/")


def check_out_dir(path: Path | str, what: str = "--out") -> Path:
    """Refuse an output directory that is a file, a device, under /proc, /sys or /dev, or not writable."""
    path = Path(path)
    resolved = path.expanduser().resolve()
    if _pseudo(resolved):
        raise AtlasError(f"{what} {str(path)!r} is inside /{resolved.parts[1]}, a kernel pseudo file system; "
                         "choose a directory on a disk")
    base = _existing_ancestor(resolved)
    if not base.is_dir():
        kind = "a file" if base.is_file() else "not a regular directory"
        where = "" if base == resolved else f" (its parent {str(base)!r} is {kind})"
        raise AtlasError(f"{what} {str(path)!r} must be a directory{where or ', but it is ' + kind}; choose a new "
                         "or existing directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise AtlasError(f"{what} {str(path)!r} cannot be written ({str(base)!r} is read-only or not yours); choose "
                         "a directory you can write to")
    return path


def check_out_file(path: Path | str, what: str = "--out") -> Path:
    """Refuse an output file that exists but is not a regular file, lies under /proc, /sys or /dev,
    or sits in a folder that cannot be written."""
    path = Path(path)
    resolved = path.expanduser().resolve()
    if _pseudo(resolved):
        raise AtlasError(f"{what} {str(path)!r} is in a kernel pseudo file system; choose a file on a disk")
    if resolved.exists() and not resolved.is_file():
        raise AtlasError(f"{what} {str(path)!r} exists and is not a regular file; choose a file name")
    check_out_dir(resolved.parent, what=f"the folder of {what} {str(path)!r}")
    return path


def check_write_target(target: Path) -> None:
    """The last guard of every atomic write: never rename over a device, a folder or a pseudo file."""
    resolved = target.resolve()
    if _pseudo(resolved):
        raise AtlasError(f"refusing to write {str(target)!r}: it is in a kernel pseudo file system; choose a path on "
                         "a disk")
    if resolved.exists() and not resolved.is_file():
        raise AtlasError(f"refusing to write {str(target)!r}: it exists and is not a regular file; choose another path")


def _inside_atlas(path: Path) -> Path | None:
    for parent in path.parents:
        if (parent / "manifest.json").is_file():
            return parent
    return None


def check_export_path(path: Path | str) -> Path:
    """Refuse an export file with an unknown extension, inside an atlas, or at a non-file location."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise AtlasError(f"--out {str(path)!r} has an unknown format {suffix or '(no extension)'!r}; end it in "
                         f"{', '.join(EXPORT_FORMATS)}")
    resolved = path.expanduser().resolve()
    atlas = _inside_atlas(resolved)
    if atlas is not None:
        raise AtlasError(f"--out {str(path)!r} is inside the atlas {str(atlas)!r}; exports never write into an "
                         "atlas, choose a path outside it")
    return check_out_file(path)


def write_export(table: pa.Table, path: Path) -> None:
    """Write ``table`` as CSV, Parquet or JSON (a list of row objects), atomically."""
    import json

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from neuronatlas.store.atlas import atomic_path

    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            pcsv.write_csv(table, tmp)
        elif suffix == ".parquet":
            pq.write_table(table, tmp, compression="zstd")
        else:
            tmp.write_text(json.dumps(table.to_pylist(), default=str, indent=1) + "\n")
