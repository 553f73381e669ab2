"""Reading and writing the explain tables of an atlas, without torch.

``corpus_docs.parquet`` and ``corpus_exemplars.parquet`` are written by :mod:`.exemplars`;
``explanations.parquet`` by :mod:`.pipeline` through :func:`upsert_explanations`, one neuron at a
time, so a failure on a later neuron never loses a finished one. The column sets are exactly those
of docs/atlas-format.md; how the tables were made (site, window, corpus, timings) is kept in the
Parquet schema metadata under the key ``neuronatlas`` (read it with :func:`table_meta`).

    >>> from neuronatlas.explain.tables import read_exemplars, read_explanations
    >>> ex = read_exemplars("my-atlas", layer=1, neuron=3)
    >>> ex.top[0].tokens[ex.top[0].center], ex.max_activation
    >>> read_explanations("my-atlas")            # list of row dicts
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neuronatlas.errors import AtlasError
from neuronatlas.ids import NeuronId
from neuronatlas.store.atlas import Atlas
from neuronatlas.store.schemas import EXPLANATIONS

__all__ = [
    "DOCS_TABLE",
    "EXEMPLARS_TABLE",
    "EXPLANATIONS_TABLE",
    "EXPLANATION_COLUMNS",
    "Excerpt",
    "NeuronExemplars",
    "explanation_schema",
    "open_atlas",
    "read_exemplars",
    "read_explanations",
    "table_meta",
    "upsert_explanations",
]

DOCS_TABLE = "corpus_docs.parquet"
EXEMPLARS_TABLE = "corpus_exemplars.parquet"
EXPLANATIONS_TABLE = "explanations.parquet"
META_KEY = b"neuronatlas"

EXPLANATION_COLUMNS = EXPLANATIONS.names


def explanation_schema() -> pa.Schema:
    """The explanations table's schema (owned by :mod:`neuronatlas.store.schemas`)."""
    return EXPLANATIONS.schema


def open_atlas(atlas: Atlas | str | Path) -> Atlas:
    return atlas if isinstance(atlas, Atlas) else Atlas.open(atlas)


@dataclass
class Excerpt:
    """One exemplar: a token of a document and the neuron's activations on a window around it."""

    kind: str                 # "top" or "random"
    rank: int
    doc_id: str
    position: int             # the exemplar token's index in the document
    activation: float
    window_start: int         # document index of tokens[0]
    tokens: list[str]
    acts: np.ndarray          # (len(tokens),) float32

    @property
    def center(self) -> int:
        """Index of the exemplar token inside ``tokens``/``acts``."""
        return self.position - self.window_start


@dataclass
class NeuronExemplars:
    layer: int
    neuron: int
    top: list[Excerpt] = field(default_factory=list)
    random: list[Excerpt] = field(default_factory=list)

    @property
    def max_activation(self) -> float:
        """The neuron's largest activation over the corpus (its rank-0 top exemplar)."""
        return max((e.activation for e in self.top), default=0.0)

    def distinct_top(self, n: int) -> list[Excerpt]:
        """The ``n`` best top exemplars from distinct documents (overlapping windows add little)."""
        out, seen = [], set()
        for e in self.top:
            if e.doc_id not in seen:
                out.append(e)
                seen.add(e.doc_id)
            if len(out) == n:
                break
        return out


def table_meta(atlas: Atlas | str | Path, relpath: str = EXEMPLARS_TABLE) -> dict[str, Any]:
    """The ``neuronatlas`` schema metadata of a table ({} if the table or the key is missing)."""
    store = open_atlas(atlas)
    path = store.file(relpath)
    if not path.exists():
        return {}
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}


def _require(store: Atlas, relpath: str, fix: str) -> None:
    if not store.has(relpath):
        raise AtlasError(f"atlas {str(store.path)!r} has no {relpath}; {fix}")


def read_exemplars(atlas: Atlas | str | Path, layer: int, neuron: int) -> NeuronExemplars:
    """Top and random exemplars of one neuron, each sorted by rank."""
    store = open_atlas(atlas)
    _require(store, EXEMPLARS_TABLE, "run `neuronatlas exemplars --out ATLAS` first")
    rows = store.query("SELECT kind, rank, doc_id, position, activation, window_start, window_tokens, window_acts "
                       "FROM corpus_exemplars WHERE layer = ? AND neuron = ? ORDER BY kind DESC, rank",
                       [int(layer), int(neuron)]).to_pylist()
    if not rows:
        raise AtlasError(f"no exemplars for {NeuronId(layer, neuron)} in {str(store.path)!r}; check the neuron index or "
                         "rerun `neuronatlas exemplars` on this model")
    out = NeuronExemplars(int(layer), int(neuron))
    for r in rows:
        ex = Excerpt(r["kind"], int(r["rank"]), str(r["doc_id"]), int(r["position"]), float(r["activation"]),
                     int(r["window_start"]), list(r["window_tokens"]), np.asarray(r["window_acts"], dtype=np.float32))
        (out.top if ex.kind == "top" else out.random).append(ex)
    return out


def read_explanations(atlas: Atlas | str | Path) -> list[dict[str, Any]]:
    store = open_atlas(atlas)
    if not store.has(EXPLANATIONS_TABLE):
        return []
    return store.read_table(EXPLANATIONS_TABLE).to_pylist()


def upsert_explanations(atlas: Atlas | str | Path, rows: Sequence[dict[str, Any]]) -> int:
    """Replace or add rows keyed by (layer, neuron), written atomically; returns the table's row count."""
    store = open_atlas(atlas)
    schema = explanation_schema()
    new = {(int(r["layer"]), int(r["neuron"])): {c: r.get(c) for c in EXPLANATION_COLUMNS} for r in rows}
    kept = [r for r in read_explanations(store) if (int(r["layer"]), int(r["neuron"])) not in new]
    merged = sorted(kept + list(new.values()), key=lambda r: (int(r["layer"]), int(r["neuron"])))
    table = pa.Table.from_pylist(merged, schema=schema)
    store.write_table(EXPLANATIONS_TABLE, table, describe="natural-language explanations, simulation scores, "
                      "PMI and causal checks (neuronatlas explain)")
    return table.num_rows
