"""Writing and reading SNMF features in an atlas (a site of their own: ``feature`` ids, not neurons).

Files (see docs/atlas-format.md, "SNMF features")::

    features.safetensors        components (layers, k, neurons) float32; out_dirs (layers, k, d_model); scale (layers,)
    features.json               the run: config, corpus, tokens, timings, per-layer FVU and L0
    feature_layers.parquet      layer, k, fvu, relative_error, l0, dead, tokens
    features.parquet            layer, feature, freq, mean, max, out_norm, top_token
    feature_decoded.parquet     layer, feature, direction (top/bottom), rank, token_id, token, score
    feature_exemplars.parquet   layer, feature, kind, rank, doc_id, position, activation, window_*
    feature_docs.parquet        the documents the exemplars point to

    >>> from neuronatlas.data.corpus import default_corpus
    >>> from neuronatlas.features import FeatureConfig, fit_features, write_features, read_components
    >>> docs, config = default_corpus(n_docs=20, seed=0), FeatureConfig(k=4, top_k=3, max_length=32)
    >>> run = fit_features(lm, docs, config)
    >>> info = write_features("my-atlas", lm, run, docs, config=config, corpus_name="default_corpus(n_docs=20, seed=0)")
    >>> read_components("my-atlas", layer=1).shape     # (k, neurons)
    torch.Size([4, 32])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from neuronatlas.decode.core import fold_final_norm, unembedding_matrix, vocabulary
from neuronatlas.errors import AtlasError
from neuronatlas.explain.exemplars import write_exemplar_docs
from neuronatlas.explain.tables import Excerpt, NeuronExemplars
from neuronatlas.features.core import FeatureConfig, FeatureRun
from neuronatlas.models.loading import LoadedModel
from neuronatlas.store.atlas import Atlas

__all__ = ["ARRAYS", "output_directions", "write_features", "read_components", "read_feature_exemplars",
           "features_info", "FEATURE_TABLES"]

ARRAYS = "features.safetensors"
INFO = "features.json"
FEATURE_TABLES = ("feature_layers.parquet", "features.parquet", "feature_decoded.parquet",
                  "feature_exemplars.parquet", "feature_docs.parquet")


def output_directions(lm: LoadedModel, components: torch.Tensor) -> torch.Tensor:
    """(layers, k, d_model): what each feature writes to the residual stream, ``W[f] @ W_down^T``."""
    out = []
    for layer in range(components.shape[0]):
        down = lm.spec.output_vectors(lm.model, layer).detach().float().cpu()     # (neurons, d_model)
        out.append(components[layer].float() @ down)
    return torch.stack(out)


def _decoded(lm: LoadedModel, dirs: torch.Tensor, n: int) -> tuple[pa.Table, list[str]]:
    wu = unembedding_matrix(lm, "cpu")
    vocab = vocabulary(lm)
    rows: dict[str, list[Any]] = {k: [] for k in ("layer", "feature", "direction", "rank", "token_id", "token", "score")}
    tops = []
    for layer in range(dirs.shape[0]):
        scores = fold_final_norm(lm, dirs[layer]) @ wu.T                              # (k, vocab)
        for direction, (vals, ids) in (("top", scores.topk(n, dim=1)), ("bottom", (-scores).topk(n, dim=1))):
            vals = vals if direction == "top" else -vals
            for f in range(scores.shape[0]):
                for r in range(n):
                    tid = int(ids[f, r])
                    for key, v in zip(rows, (layer, f, direction, r, tid, vocab[tid], float(vals[f, r]))):
                        rows[key].append(v)
                if direction == "top":
                    tops.append(vocab[int(ids[f, 0])])
    table = pa.table({**{k: rows[k] for k in ("direction", "token")},
                      "layer": pa.array(rows["layer"], pa.int32()), "feature": pa.array(rows["feature"], pa.int32()),
                      "rank": pa.array(rows["rank"], pa.int32()), "token_id": pa.array(rows["token_id"], pa.int32()),
                      "score": pa.array(rows["score"], pa.float32())})
    table = table.select(["layer", "feature", "direction", "rank", "token_id", "token", "score"])
    return table, tops


def _docs_and_exemplars(store: Atlas, lm: LoadedModel, corpus: Iterable[dict] | Callable[[], Iterable[dict]],
                        run: FeatureRun, config: FeatureConfig, max_docs: int | None) -> int:
    wanted_set: set[int] = set()
    for part in (*run.top, *run.random):
        docs_t = part.top.prompt[torch.isfinite(part.top.values)]
        wanted_set.update(int(d) for d in torch.unique(docs_t).tolist())
    wanted = sorted(wanted_set)
    kinds = [("top", run.top)] + ([("random", run.random)] if run.random else [])
    table = write_exemplar_docs(store, lm, corpus, max_docs, wanted, kinds, max_length=config.max_length,
                                docs_table="feature_docs.parquet",
                                describe="documents referenced by feature_exemplars (neuronatlas features)")
    table = table.rename_columns(["feature" if c == "neuron" else c for c in table.column_names])
    store.write_table("feature_exemplars.parquet", table,
                      describe="top exemplars of every SNMF feature with per-token code windows (neuronatlas features)")
    return len(wanted)


def write_features(atlas: Atlas | str | Path, lm: LoadedModel, run: FeatureRun,
                   corpus: Iterable[dict] | Callable[[], Iterable[dict]], *, config: FeatureConfig = FeatureConfig(),
                   corpus_name: str = "<memory>", max_docs: int | None = None, n_decoded: int = 10,
                   force: bool = False) -> dict[str, Any]:
    """Write every feature file of the module docstring into ``atlas``; returns the run summary."""
    store = atlas if isinstance(atlas, Atlas) else Atlas.create(atlas, model=lm.provenance, force=force)
    store.file("feature_explanations.parquet").unlink(missing_ok=True)     # explanations of replaced features
    dirs = output_directions(lm, run.components)
    store.write_arrays(ARRAYS, {"components": run.components.numpy(), "out_dirs": dirs.numpy(),
                                "scale": run.scale.numpy()})
    layers = pa.table({
        "layer": pa.array(range(len(run.layer_stats)), pa.int32()),
        "k": pa.array([run.components.shape[1]] * len(run.layer_stats), pa.int32()),
        **{key: pa.array([s[key] for s in run.layer_stats], pa.float64()) for key in ("fvu", "relative_error", "l0")},
        "dead": pa.array([s["dead"] for s in run.layer_stats], pa.int32()),
        "tokens": pa.array([s["tokens"] for s in run.layer_stats], pa.int64())})
    store.write_table("feature_layers.parquet", layers,
                      describe="per-layer reconstruction error (FVU) and sparsity (L0) of the SNMF features")
    decoded, tops = _decoded(lm, dirs, n_decoded)
    store.write_table("feature_decoded.parquet", decoded,
                      describe="each SNMF feature's output direction read through the unembedding")
    n_layers, k = run.components.shape[:2]
    store.write_table("features.parquet", pa.table({
        "layer": pa.array(np.repeat(np.arange(n_layers), k), pa.int32()),
        "feature": pa.array(np.tile(np.arange(k), n_layers), pa.int32()),
        **{key: pa.array(torch.cat([s[key] for s in run.feature_stats]).numpy().astype(np.float32))
           for key in ("freq", "mean", "max")},
        "out_norm": pa.array(dirs.norm(dim=-1).reshape(-1).numpy().astype(np.float32)),
        "top_token": tops}), describe="SNMF features per layer: activity frequency, mean and max code, top token")
    n_docs = _docs_and_exemplars(store, lm, corpus, run, config, max_docs)
    info = {"model": lm.name, "site": config.component.value, "n_layers": n_layers, "k": k,
            "n_neurons": int(run.components.shape[2]), "config": config.as_json(), "corpus": corpus_name,
            "docs": run.docs, "tokens": run.tokens, "docs_stored": n_docs, "seconds": run.seconds,
            "layers": run.layer_stats,
            "mean_fvu": float(np.mean([s["fvu"] for s in run.layer_stats])),
            "mean_l0": float(np.mean([s["l0"] for s in run.layer_stats]))}
    store.write_json(INFO, info)
    return info


def _open(atlas: Atlas | str | Path) -> Atlas:
    store = atlas if isinstance(atlas, Atlas) else Atlas.open(atlas)
    if not store.has(ARRAYS):
        raise AtlasError(f"atlas {str(store.path)!r} has no SNMF features; run `neuronatlas features --out ATLAS` first")
    return store


def features_info(atlas: Atlas | str | Path) -> dict[str, Any]:
    info: dict[str, Any] = _open(atlas).read_json(INFO)
    return info


def read_components(atlas: Atlas | str | Path, layer: int | None = None, key: str = "components") -> torch.Tensor:
    """``components`` (layers, k, neurons) or ``out_dirs`` (layers, k, d_model); one layer with ``layer``."""
    arrays = _open(atlas).read_arrays(ARRAYS)
    out = torch.from_numpy(np.array(arrays[key]))
    if layer is None:
        return out
    if not 0 <= layer < out.shape[0]:
        raise AtlasError(f"layer {layer} is out of range: the features cover layers 0..{out.shape[0] - 1}")
    return out[layer]


def read_feature_exemplars(atlas: Atlas | str | Path, layer: int, feature: int) -> NeuronExemplars:
    """A feature's top and random exemplars in the explain pipeline's form (``neuron`` holds the feature index)."""
    store = _open(atlas)
    rows = store.query("SELECT kind, rank, doc_id, position, activation, window_start, window_tokens, window_acts "
                       "FROM feature_exemplars WHERE layer = ? AND feature = ? ORDER BY kind DESC, rank",
                       [int(layer), int(feature)]).to_pylist()
    if not rows:
        raise AtlasError(f"no exemplars for feature L{layer}/f{feature}; check the layer and the feature index (< k)")
    out = NeuronExemplars(int(layer), int(feature))
    for r in rows:
        ex = Excerpt(r["kind"], int(r["rank"]), str(r["doc_id"]), int(r["position"]), float(r["activation"]),
                     int(r["window_start"]), list(r["window_tokens"]), np.asarray(r["window_acts"], dtype=np.float32))
        (out.top if ex.kind == "top" else out.random).append(ex)
    return out
