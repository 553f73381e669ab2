"""Every atlas table's schema, in one place: writers build tables with these, the viewer reads names here.

:func:`schema_for` maps an atlas-relative path to its :class:`TableSchema`; :meth:`Atlas.write_table
<neuronatlas.store.atlas.Atlas.write_table>` passes every known table through :func:`conform`, which
reorders columns, casts integers and floats to the declared widths and refuses missing, unknown or
wrongly typed columns. String columns may be stored dictionary-encoded (their encoding is kept).
Columns are documented in docs/atlas-format.md.

    >>> from neuronatlas.store.schemas import SELECTIONS, conform, schema_for
    >>> SELECTIONS.names
    ('study', 'concept', 'method', 'site', 'layer', 'neuron', 'score', 'rank')
    >>> schema_for("records/facts/stats.parquet").name
    'stats'
    >>> table = conform("selections.parquet", {"rank": [0], "study": ["relations"], "concept": ["capital"],
    ...                 "method": ["ap"], "site": ["mlp"], "layer": [12], "neuron": [345], "score": [0.9]})
    >>> table.column_names == list(SELECTIONS.names)     # a pa.Table in schema order
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from neuronatlas.errors import AtlasError

__all__ = ["TableSchema", "STATS", "PROMPTS", "EXEMPLARS", "DECODED", "SELECTIONS", "EXPLANATIONS", "CORPUS_DOCS",
           "CORPUS_EXEMPLARS", "HISTOGRAMS", "GLU_SIGNS", "GLU_EXEMPLARS", "TABLES", "schema_for", "conform"]


@dataclass(frozen=True)
class TableSchema:
    """One table: its view name in SQL, file name, Arrow schema and what the table holds."""

    name: str
    file: str
    schema: pa.Schema
    doc: str
    per_record: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.schema.names)

    @property
    def relpath(self) -> str:
        """The atlas-relative path (``records/<name>/`` is prefixed for per-record tables)."""
        return f"records/<name>/{self.file}" if self.per_record else self.file


_s, _i32, _i64, _f32, _f64 = pa.string(), pa.int32(), pa.int64(), pa.float32(), pa.float64()

PROMPTS = TableSchema("prompts", "prompts.parquet", pa.schema([
    ("record", _s), ("prompt_id", _i64), ("text", _s), ("label", _s), ("target", _s), ("subject", _s),
    ("lang", _s), ("split", _s), ("n_tokens", _i64), ("tokens", pa.list_(_s))]),
    "One row per recorded prompt: record name, prompt_id (row in the dataset), the prompt fields "
    "(text, label, target, subject, lang, split; null when the dataset lacks them), n_tokens and the "
    "tokenizer's tokens.", per_record=True)
STATS = TableSchema("stats", "stats.parquet", pa.schema([
    ("record", _s), ("site", _s), ("label", _s), ("layer", _i32), ("neuron", _i32), ("n_tokens", _i64),
    ("n_prompts", _i64), ("mean", _f32), ("var", _f32), ("max", _f32), ("act_prob", _f32)]),
    "Per-label activation statistics of every neuron (label '__all__' covers all prompts): token and "
    "prompt counts, mean, variance, max and the probability of a positive activation.", per_record=True)
EXEMPLARS = TableSchema("exemplars", "exemplars.parquet", pa.schema([
    ("record", _s), ("layer", _i32), ("neuron", _i32), ("rank", _i32), ("prompt_id", _i64), ("position", _i32),
    ("activation", _f32), ("token", _s)]),
    "Top-k prompt tokens of every neuron in a record: rank 0 is the largest activation; prompt_id and "
    "position locate the token, token spells it.", per_record=True)
DECODED = TableSchema("decoded", "decoded.parquet", pa.schema([
    ("layer", _i32), ("neuron", _i32), ("side", _s), ("direction", _s), ("rank", _i32), ("token_id", _i32),
    ("token", _s), ("score", _f32)]),
    "Weight-based decoding through the unembedding: per neuron, side (out, out_normed, in_up, in_gate, in) "
    "and direction (top, bottom), the ranked token ids, their spellings and scores.")
SELECTIONS = TableSchema("selections", "selections.parquet", pa.schema([
    ("study", _s), ("concept", _s), ("method", _s), ("site", _s), ("layer", _i32), ("neuron", _i32),
    ("score", _f64), ("rank", _i32)]),
    "Neurons selected for concepts: the study and scorer method that chose them, the site, the score and "
    "the neuron's rank within (study, concept, method), 0 best.")
EXPLANATIONS = TableSchema("explanations", "explanations.parquet", pa.schema([
    ("layer", _i32), ("neuron", _i32), ("site", _s), ("explanation", _s), ("explainer", _s), ("score", _f64),
    ("baseline_score", _f64), ("pmi", _f64), ("candidates", pa.list_(_s)), ("causal_delta_exemplars", _f64),
    ("causal_delta_random", _f64)]),
    "One natural-language explanation per neuron: the explainer, the simulation score and the score of "
    "another neuron's explanation (baseline), the PMI of the chosen candidate, all candidates, and the "
    "mean change in log-probability when ablating on top and random exemplars.")
CORPUS_DOCS = TableSchema("corpus_docs", "corpus_docs.parquet", pa.schema([
    ("doc_id", _s), ("source", _s), ("text", _s), ("tokens", pa.list_(_s))]),
    "The corpus documents corpus_exemplars refers to: doc_id (unique), source, text and tokens.")
CORPUS_EXEMPLARS = TableSchema("corpus_exemplars", "corpus_exemplars.parquet", pa.schema([
    ("layer", _i32), ("neuron", _i32), ("kind", _s), ("rank", _i32), ("doc_id", _s), ("position", _i32),
    ("activation", _f32), ("window_start", _i32), ("window_tokens", pa.list_(_s)), ("window_acts", pa.list_(_f32))]),
    "Corpus exemplars of every neuron: kind 'top' (ranked by activation) or 'random' (a seeded uniform "
    "sample), the document and token position, and the activations on a token window starting at "
    "window_start.")

HISTOGRAMS = TableSchema("histograms", "histograms.parquet", pa.schema([
    ("record", _s), ("site", _s), ("label", _s), ("layer", _i32), ("neuron", _i32), ("n_tokens", _i64),
    ("abs_max", _f32), ("counts", pa.list_(_i64))]),
    "Activation histogram of every neuron per label (label '__all__' covers all prompts): exact token counts "
    "in 51 signed log-spaced bins of |activation| (edges in the manifest's records.<name>.histogram; the "
    "middle bin holds |a| < 1e-3) and the exact max |activation|.", per_record=True)
GLU_SIGNS = TableSchema("glu_signs", "glu_signs.parquet", pa.schema([
    ("record", _s), ("site", _s), ("layer", _i32), ("neuron", _i32), ("quadrant", _s), ("n_tokens", _i64)]),
    "Gated MLPs: tokens per (gate sign, up sign) combination of every neuron; quadrant g+u+, g+u-, g-u+ or g-u- "
    "(zero counts as +).", per_record=True)
GLU_EXEMPLARS = TableSchema("glu_exemplars", "glu_exemplars.parquet", pa.schema([
    ("record", _s), ("layer", _i32), ("neuron", _i32), ("quadrant", _s), ("rank", _i32), ("prompt_id", _i64),
    ("position", _i32), ("activation", _f32), ("token", _s)]),
    "Gated MLPs: the top-k prompt tokens of every neuron within each (gate sign, up sign) quadrant, ranked by "
    "|activation| (rank 0 largest).", per_record=True)

TABLES: dict[str, TableSchema] = {t.name: t for t in (PROMPTS, STATS, EXEMPLARS, DECODED, SELECTIONS, EXPLANATIONS,
                                                      CORPUS_DOCS, CORPUS_EXEMPLARS, HISTOGRAMS, GLU_SIGNS,
                                                      GLU_EXEMPLARS)}
_BY_PATH = {t.file: t for t in TABLES.values() if not t.per_record}
_PER_RECORD = {t.file: t for t in TABLES.values() if t.per_record}


def schema_for(relpath: str) -> TableSchema | None:
    """The schema of the table at atlas-relative ``relpath`` (None for tables this module does not own)."""
    parts = relpath.replace("\\", "/").strip("/").split("/")
    if len(parts) == 1:
        return _BY_PATH.get(parts[0])
    if len(parts) == 3 and parts[0] == "records":
        return _PER_RECORD.get(parts[2])
    return None


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_kind(t.value_type)}>"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def _conform_column(ts: TableSchema, field: pa.Field, column: Any) -> Any:
    have, want = column.type, field.type
    if have == want:
        return column
    hk, wk = _kind(have), _kind(want)
    keep_encoding = hk == wk and wk in ("string", "list<string>")
    if keep_encoding or hk == "null" or (hk == wk and wk in ("int", "float", "list<float>")) \
            or (hk, wk) == ("int", "float") or (hk, wk) == ("list<int>", "list<float>"):
        if keep_encoding and not (pa.types.is_large_string(have) or pa.types.is_large_list(have)):
            return column
        try:
            return column.cast(want)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise AtlasError(f"table {ts.name!r}: column {field.name!r} ({have}) does not fit {want}: "
                             f"{str(exc).splitlines()[0]}") from None
    raise AtlasError(f"table {ts.name!r}: column {field.name!r} has type {have}; the schema wants {want} "
                     "(see neuronatlas.store.schemas and docs/atlas-format.md)")


def conform(relpath: str, table: pa.Table | dict[str, Any]) -> pa.Table:
    """``table`` in the registered schema of ``relpath`` (columns in schema order, integer and float widths
    cast; schema metadata kept); tables without a registered schema pass unchanged.

    Raises :class:`AtlasError` naming the table and the missing, unknown or wrongly typed columns.
    """
    if isinstance(table, dict):
        table = pa.table(table)
    ts = schema_for(relpath)
    if ts is None:
        return table
    missing = [c for c in ts.names if c not in table.column_names]
    unknown = [c for c in table.column_names if c not in ts.names]
    if missing or unknown:
        what = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                     f"unknown {', '.join(unknown)}" if unknown else "") if x)
        raise AtlasError(f"table {ts.name!r} ({relpath}) does not match its schema ({what}); its columns are "
                         f"{', '.join(ts.names)} (neuronatlas.store.schemas.{ts.name.upper()})")
    columns = [_conform_column(ts, field, table.column(field.name)) for field in ts.schema]
    out = pa.Table.from_arrays(columns, names=list(ts.names))
    return out.replace_schema_metadata(table.schema.metadata) if table.schema.metadata else out
