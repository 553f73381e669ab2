"""Read-only, confined SQL over an atlas (what ``neuronatlas query`` and the viewer run).

Two locks, both DuckDB's own (see docs/safety.md):

* :func:`check_read_only` accepts only read statements (``SELECT`` and ``EXPLAIN`` of a ``SELECT``),
  decided by DuckDB's parser (``duckdb.extract_statements`` and each statement's ``type``), so
  ``COPY``, ``ATTACH``, ``INSTALL``, ``SET``, ``CREATE``... are refused before they run.
* :func:`sandbox` confines a connection: file access only below the atlas directory
  (``allowed_directories`` + ``enable_external_access = false``), no extension install or load,
  and ``lock_configuration = true`` so no statement can undo it.

:func:`run_read_query` adds a time limit (the connection is interrupted) and a row limit.

    >>> from neuronatlas.store.sql import check_read_only
    >>> check_read_only("SELECT * FROM read_csv('/etc/passwd')")        # passes: the sandbox refuses it
    >>> check_read_only("COPY stats TO 'stats.parquet'")
    Traceback (most recent call last):
    neuronatlas.errors.AtlasError: query refused: COPY statement ... is not read-only; ...
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from neuronatlas.errors import AtlasError

__all__ = ["check_read_only", "sandbox", "run_read_query", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 30.0


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _explained_type(statement_sql: str) -> Any:
    """The type of the statement an ``EXPLAIN [ANALYZE] [(options)]`` wraps, found by the parser.

    The first suffix, starting at a keyword after ``EXPLAIN``, that DuckDB parses as one statement
    is the explained statement (``ANALYZE SELECT ...`` and ``(FORMAT ...) ...`` do not parse).
    """
    import duckdb

    for position, kind in duckdb.tokenize(statement_sql)[1:]:
        if kind != duckdb.token_type.keyword:
            continue
        try:
            inner = duckdb.extract_statements(statement_sql[position:])
        except duckdb.Error:
            continue
        if len(inner) == 1:
            return inner[0].type
    return None


def check_read_only(sql: str) -> None:
    """Refuse ``sql`` (AtlasError, one line) unless every statement in it only reads."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise AtlasError(f"query does not parse: {_first_line(exc)}") from None
    if not statements:
        raise AtlasError("query is empty; pass one SELECT statement, e.g. \"SELECT count(*) FROM stats\"")
    for statement in statements:
        kind = statement.type
        if kind == duckdb.StatementType.EXPLAIN:
            inner = _explained_type(statement.query)
            if inner != duckdb.StatementType.SELECT:
                name = inner.name if inner is not None else "an unknown statement"
                raise AtlasError(f"query refused: EXPLAIN of {name} is not read-only; `query` runs SELECT and "
                                 "EXPLAIN SELECT only (export results with --out FILE.csv|.parquet|.json)")
        elif kind != duckdb.StatementType.SELECT:
            text = " ".join(statement.query.split())[:60]
            raise AtlasError(f"query refused: {kind.name} statement {text!r} is not read-only; `query` runs SELECT "
                             "and EXPLAIN only (export results with --out FILE.csv|.parquet|.json)")


def sandbox(con: Any, root: Path) -> None:
    """Confine ``con`` to reading files below ``root`` and lock its configuration."""
    allowed = str(root.resolve()).rstrip("/") + "/"
    con.execute(f"SET allowed_directories = [{_quote(allowed)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def run_read_query(con: Any, sql: str, params: Sequence[Any] | None = None, *, timeout: float | None = DEFAULT_TIMEOUT,
                   max_rows: int | None = None, tables: str = "") -> pa.Table:
    """Check ``sql`` and run it on ``con`` within ``timeout`` seconds; at most ``max_rows`` rows.

    ``tables`` (the atlas's table names) is quoted in error messages.
    """
    import duckdb

    check_read_only(sql)
    if timeout is not None and not timeout > 0:
        raise AtlasError(f"query timeout {timeout} must be above 0 seconds (default {DEFAULT_TIMEOUT:g})")
    timer = threading.Timer(timeout, con.interrupt) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        rel = con.sql(sql, params=list(params) if params else None)
        if rel is None:
            return pa.table({})
        if max_rows is None:
            return rel.to_arrow_table()
        reader = rel.to_arrow_reader(max(1, min(max_rows, 100_000)))
        batches, n = [], 0
        try:
            for batch in reader:
                batches.append(batch)
                n += batch.num_rows
                if n >= max_rows:
                    break
        finally:
            reader.close()
        table = pa.Table.from_batches(batches, schema=reader.schema)
        return table.slice(0, max_rows)
    except duckdb.InterruptException:
        raise AtlasError(f"query stopped after {timeout:g} s (the time limit); narrow it (WHERE, LIMIT) or raise "
                         "--timeout") from None
    except duckdb.PermissionException as exc:
        raise AtlasError(f"query refused: {_first_line(exc).removeprefix('Permission Error: ')}; queries read only "
                         f"the atlas's own tables ({tables or 'none'})") from None
    except duckdb.Error as exc:
        raise AtlasError(f"query failed: {_first_line(exc)} (tables: {tables or 'none'})") from None
    finally:
        if timer is not None:
            timer.cancel()
