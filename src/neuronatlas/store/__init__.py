"""The on-disk atlas (a leaf: anything may use it; it imports no torch)."""

from neuronatlas.store.atlas import SCHEMA_VERSION, Atlas, atomic_path, write_json_atomic

__all__ = ["Atlas", "SCHEMA_VERSION", "atomic_path", "write_json_atomic"]
