"""The on-disk atlas (a leaf: anything may use it; it imports no torch)."""

from neuronatlas.store.atlas import SCHEMA_VERSION, Atlas, atomic_path, write_json_atomic
from neuronatlas.store.schemas import TABLES, TableSchema, conform, schema_for

__all__ = ["Atlas", "SCHEMA_VERSION", "TABLES", "TableSchema", "atomic_path", "conform", "schema_for",
           "write_json_atomic"]
