"""Helpers every study shares: layer-matched random baselines, intervals, resumable state, provenance.

    >>> from neuronatlas.studies.common import random_like, mean_ci, StudyState
    >>> control = random_like(selected, n_neurons=1536, seed=0)    # same count per layer, random indices
    >>> mean_ci([0.4, 0.5, 0.45])                                  # (mean, lo, hi), 95% t-interval
    >>> state = StudyState(out_dir / "state.json", fingerprint="config-hash")
    >>> state.get("cond-key") or state.put("cond-key", value)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from neuronatlas.intervene.neurons import NeuronSet
from neuronatlas.store.atlas import Atlas, atomic_path, write_json_atomic

__all__ = ["random_like", "concept_seed", "mean_ci", "StudyState", "study_provenance", "jaccard", "replace_selections",
           "copy_into_atlas"]


def random_like(selected: NeuronSet, n_neurons: int, seed: int, exclude: NeuronSet | None = None,
                bins: np.ndarray | None = None) -> NeuronSet:
    """Random neurons with the same count per layer as ``selected``, avoiding ``exclude`` (default:
    ``selected``). With ``bins`` ((layers, neurons) ints, e.g. :func:`~neuronatlas.stats.inference.magnitude_bins`
    of mean |response|), each selected neuron is matched by one from its layer *and* its bin; a bin
    with too few candidates borrows from the nearest bins of that layer."""
    rng = np.random.default_rng(seed)
    avoid = exclude if exclude is not None else selected
    avoid_by_layer = avoid.by_layer()
    pairs: list[tuple[int, int]] = []
    for layer, neurons in selected.by_layer().items():
        pool = np.setdiff1d(np.arange(n_neurons), np.array(avoid_by_layer.get(layer, []), dtype=int))
        if len(pool) < len(neurons):  # the layer is (almost) fully selected: allow overlap
            pool = np.arange(n_neurons)
        if bins is None:
            chosen = rng.choice(pool, size=len(neurons), replace=False)
            pairs.extend((layer, int(j)) for j in chosen)
            continue
        free = np.zeros(n_neurons, dtype=bool)
        free[pool] = True
        layer_bins = np.asarray(bins[layer], dtype=np.int64)
        for j in neurons:
            gap = np.abs(layer_bins - int(layer_bins[j]))
            gap = np.where(free, gap, np.iinfo(np.int64).max)
            cands = np.flatnonzero(gap == gap.min())
            pick = int(rng.choice(cands))
            free[pick] = False
            pairs.append((layer, pick))
    return NeuronSet(tuple(pairs), selected.component)


def concept_seed(seed: int, concept: str, draw: int) -> int:
    """A seed for random set ``draw`` of ``concept``: different concepts get different sets."""
    digest = hashlib.sha256(f"{seed}:{concept}:{draw}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a Student-t confidence interval (degenerate for fewer than 2 values)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(arr.mean())
    if arr.size < 2:
        return (mean, mean, mean)
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return (mean, mean - half, mean + half)


def jaccard(a: NeuronSet | set[Any], b: NeuronSet | set[Any]) -> float:
    """Jaccard index of two neuron sets (``NeuronSet`` or plain sets of neuron ids); NaN when both are empty."""
    sa = set(a.pairs) if isinstance(a, NeuronSet) else set(a)
    sb = set(b.pairs) if isinstance(b, NeuronSet) else set(b)
    union = len(sa | sb)
    return len(sa & sb) / union if union else math.nan


class StudyState:
    """A JSON dictionary of finished work, rewritten atomically after every ``put``: reruns skip it."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.data: dict[str, Any] = {}
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("fingerprint") == fingerprint:
                self.data = stored.get("data", {})

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "data": self.data})
        return value

    def update(self, values: dict[str, Any]) -> None:
        """Store several keys with one atomic rewrite."""
        self.data.update(values)
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "data": self.data})

    def __contains__(self, key: str) -> bool:
        return key in self.data


def study_provenance(lm: Any, *, seed: int, dataset_sha256: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from neuronatlas import __version__

    import torch
    import transformers

    return {
        "model": lm.provenance,
        "dataset_sha256": dataset_sha256,
        "seed": seed,
        "neuronatlas_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''} ({__import__('os').cpu_count()} cores)".strip(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def replace_selections(store: Atlas, new: pa.Table, *, study: str, concept: str | None = None,
                       concepts: Sequence[str] | None = None) -> Path:
    """Write ``new`` into the atlas's ``selections.parquet`` in place of the rows of ``study`` (only
    its ``concept`` / ``concepts`` rows when given); other studies' rows are kept, cast to the stored
    schema when they fit. Atomic, like every atlas write."""
    if concept is not None:
        concepts = [concept]
    table = new
    if store.has("selections.parquet"):
        old = store.read_table("selections.parquet")
        if "study" in old.column_names:
            drop = pc.equal(old["study"], study)
            if concepts is not None:
                drop = pc.and_(drop, pc.is_in(old["concept"], value_set=pa.array(list(concepts), pa.string())))
            old = old.filter(pc.invert(pc.fill_null(drop, False)))
        if old.num_rows:
            try:
                table = pa.concat_tables([old, new.select(old.column_names).cast(old.schema)])
            except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError):
                table = pa.concat_tables([old, new], promote_options="permissive")
    return store.write_table("selections.parquet", table, describe="neurons selected for concepts by studies and scorers")


def copy_into_atlas(store: Atlas, study: str, files: Sequence[Path]) -> None:
    """Copy a study's output files into ``ATLAS/studies/<study>/`` (each atomically) for the viewer;
    nothing to do when they already live there."""
    for path in files:
        target = store.file(f"studies/{study}/{path.name}")
        if target == path.resolve():
            continue
        with atomic_path(target) as tmp:
            tmp.write_bytes(path.read_bytes())
