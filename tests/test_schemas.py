"""store.schemas: every table's schema in one module, checked and cast on write."""

from __future__ import annotations

import pyarrow as pa
import pytest

from neuronatlas.errors import AtlasError
from neuronatlas.store import Atlas
from neuronatlas.store.schemas import CORPUS_EXEMPLARS, SELECTIONS, STATS, TABLES, conform, schema_for

ROW = {"study": ["relations"], "concept": ["capital"], "method": ["ap"], "site": ["mlp"], "layer": [1],
       "neuron": [2], "score": [0.5], "rank": [0]}


def test_paths_map_to_schemas():
    assert schema_for("selections.parquet") is SELECTIONS
    assert schema_for("records/facts/stats.parquet") is STATS
    assert schema_for("corpus_exemplars.parquet") is CORPUS_EXEMPLARS
    assert schema_for("notes.parquet") is None and schema_for("records/x/other.parquet") is None
    assert set(TABLES) == {"prompts", "stats", "exemplars", "decoded", "selections", "explanations",
                           "corpus_docs", "corpus_exemplars", "histograms", "glu_signs", "glu_exemplars"}
    assert all(t.doc and t.names for t in TABLES.values())


def test_write_casts_to_the_schema_and_orders_columns(tmp_path):
    atlas = Atlas.create(tmp_path / "a", model={"model": "m"})
    shuffled = dict(reversed(list(ROW.items())))
    atlas.write_table("selections.parquet", pa.table(shuffled))
    table = atlas.read_table("selections.parquet")
    assert table.schema.equals(SELECTIONS.schema) and table.to_pylist()[0]["neuron"] == 2
    # dictionary-encoded strings keep their encoding
    enc = pa.table({**ROW, "study": pa.array(["relations"]).dictionary_encode()})
    assert pa.types.is_dictionary(conform("selections.parquet", enc)["study"].type)


def test_wrong_type_missing_and_unknown_columns_are_refused(tmp_path):
    atlas = Atlas.create(tmp_path / "a", model={"model": "m"})
    with pytest.raises(AtlasError, match=r"column 'layer' has type string; the schema wants int32"):
        atlas.write_table("selections.parquet", {**ROW, "layer": ["one"]})
    with pytest.raises(AtlasError, match=r"missing rank.*unknown extra"):
        atlas.write_table("selections.parquet", {**{k: v for k, v in ROW.items() if k != "rank"}, "extra": [1]})
    with pytest.raises(AtlasError, match="does not fit int32"):
        atlas.write_table("selections.parquet", {**ROW, "neuron": [2**40]})
    assert not atlas.has("selections.parquet")
    atlas.write_table("free.parquet", {"anything": ["goes"]})  # tables without a schema pass unchanged
