"""In-memory DuckDB copies of the per-neuron tables, sorted for fast point lookups, plus a token index.

Parquet files written by the store hold up to a million rows per row group, so a lookup of one
neuron scans the whole file (10+ ms per table on a 30 x 1536 model). The viewer therefore copies
the tables it reads per neuron into the in-memory DuckDB database of its connection, sorted by
(layer, neuron), where DuckDB's zone maps skip all but one block. The copies replace the views of
the same name, so every query stays the same. Tables are copied while their estimated memory
(``estimate_bytes``) fits ``budget_bytes``; the rest are read from Parquet as before.

``decoded`` gets a compact copy (side/direction as ENUMs, tokens as ids into ``_tokens``) sorted
by neuron, a second one sorted by token (``_decoded_by_token``) for search, and ``_tokens(tid,
token, norm)``, where ``norm`` is the token lower-cased without a leading 'Ġ'/'▁'/space and ids are
assigned in ``norm`` order, so a whole-token search is one id range.

    >>> from neuronatlas.store import Atlas
    >>> con = Atlas.open("my-atlas").connect()
    >>> materialize(con, Atlas.open("my-atlas"), budget_bytes=256 << 20)   # ['stats', 'decoded', ...]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from neuronatlas.store import Atlas

__all__ = ["materialize", "estimate_bytes", "normalize_token", "TOKEN_INDEX", "TOKEN_TABLE", "DECODED_COPY"]

TOKEN_TABLE = "_tokens"
TOKEN_INDEX = "_decoded_by_token"
DECODED_COPY = "_decoded_by_neuron"
# Copied in this order while the budget lasts (decoded is handled separately).
_SORTED = (("stats", ("layer", "neuron")), ("exemplars", ("layer", "neuron")), ("decoded", ("layer", "neuron")),
           ("corpus_exemplars", ("layer", "neuron")), ("prompts", ("prompt_id",)),
           ("explanations", ("layer", "neuron")), ("selections", ("layer", "neuron")),
           ("glu_signs", ("layer", "neuron")), ("glu_exemplars", ("layer", "neuron")), ("histograms", ("layer", "neuron")))
_RECORD_TABLES = ("stats", "exemplars", "prompts", "histograms", "glu_signs", "glu_exemplars")
_LEADING_MARKERS = re.compile(r"^(Ġ|▁| )+")


def normalize_token(text: str) -> str:
    """The ``norm`` form of a token or search text (the same rule as the SQL in ``_tokens``)."""
    return _LEADING_MARKERS.sub("", text).lower()


def _files(atlas: Atlas, table: str) -> list[Path]:
    if table in _RECORD_TABLES:
        return sorted(atlas.path.glob(f"records/*/{table}.parquet"))
    path = atlas.path / f"{table}.parquet"
    return [path] if path.exists() else []


def _columns(con: Any, table: str) -> list[str]:
    return [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = ? "
                                      "ORDER BY column_index", [table]).fetchall()]


def _quote_list(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def _decoded(con: Any, copy: bool) -> None:
    """Build ``_tokens``; with ``copy`` also the compact sorted copies and a ``decoded`` view over them."""
    con.execute(f"""CREATE TABLE {TOKEN_TABLE} AS
        SELECT (row_number() OVER (ORDER BY norm, token) - 1)::INTEGER AS tid, token, norm FROM (
          SELECT DISTINCT token, lower(regexp_replace(token, '^(Ġ|▁| )+', '')) AS norm
          FROM decoded WHERE token IS NOT NULL)""")
    if not copy:
        return
    sides = [r[0] for r in con.execute("SELECT DISTINCT side FROM decoded WHERE side IS NOT NULL ORDER BY 1").fetchall()]
    dirs = [r[0] for r in con.execute("SELECT DISTINCT direction FROM decoded WHERE direction IS NOT NULL "
                                      "ORDER BY 1").fetchall()]
    side_t = f"ENUM({_quote_list([str(s) for s in sides])})" if sides else "VARCHAR"
    dir_t = f"ENUM({_quote_list([str(d) for d in dirs])})" if dirs else "VARCHAR"
    have = set(_columns(con, "decoded"))
    rank = "d.rank::SMALLINT" if "rank" in have else "NULL::SMALLINT"
    score = "d.score::FLOAT" if "score" in have else "NULL::FLOAT"
    con.execute(f"""CREATE TABLE {DECODED_COPY} AS
        SELECT d.layer::INTEGER AS layer, d.neuron::INTEGER AS neuron, d.side::{side_t} AS side,
               d.direction::{dir_t} AS direction, {rank} AS rank, t.tid, {score} AS score
        FROM decoded d JOIN {TOKEN_TABLE} t ON t.token = d.token
        ORDER BY layer, neuron, side, direction, rank""")
    con.execute(f"CREATE TABLE {TOKEN_INDEX} AS SELECT * FROM {DECODED_COPY} ORDER BY tid, rank, layer, neuron")
    con.execute("DROP VIEW decoded")
    con.execute(f"""CREATE VIEW decoded AS
        SELECT d.layer, d.neuron, d.side::VARCHAR AS side, d.direction::VARCHAR AS direction,
               d.rank::INTEGER AS rank, t.tid AS token_tid, t.token, d.score
        FROM {DECODED_COPY} d JOIN {TOKEN_TABLE} t ON t.tid = d.tid""")


def estimate_bytes(atlas: Atlas, table: str) -> int:
    """Rough in-memory size of a table's copy: 2 x 24 bytes a row for decoded, else 1.5 x its uncompressed size."""
    import pyarrow.parquet as pq

    total = 0
    for f in _files(atlas, table):
        meta = pq.ParquetFile(f).metadata
        if table == "decoded":
            total += 48 * meta.num_rows
        else:
            total += int(1.5 * sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)))
    return total


def materialize(con: Any, atlas: Atlas, budget_bytes: int) -> list[str]:
    """Copy the per-neuron tables of ``atlas`` into ``con`` (see the module docstring); the copied names.

    Tables are taken in a fixed order while their estimated memory fits ``budget_bytes``.
    """
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    used, copied = 0, []
    for table, keys in _SORTED:
        if table not in views:
            continue
        cols = set(_columns(con, table))
        if not all(k in cols for k in keys):
            continue
        size = estimate_bytes(atlas, table)
        fits = used + size <= budget_bytes
        if table == "decoded":
            if {"token", "side", "direction"} <= cols:
                _decoded(con, copy=fits)
                if fits:
                    used += size
                    copied.append(table)
            continue
        if not fits:
            continue
        order = ", ".join(f'"{k}"' for k in keys)
        con.execute(f'CREATE TABLE "_m_{table}" AS SELECT * FROM "{table}" ORDER BY {order}')
        con.execute(f'DROP VIEW "{table}"')
        con.execute(f'ALTER TABLE "_m_{table}" RENAME TO "{table}"')
        used += size
        copied.append(table)
    return copied
