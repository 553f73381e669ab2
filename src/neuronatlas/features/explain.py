"""Explanations of SNMF features through the explain pipeline (explain -> PMI rerank -> simulate -> score).

A feature's top exemplars (codes on token windows) go to the same explainer, PMI reranker and
simulator as a neuron's (:func:`neuronatlas.explain.pipeline.explain_neuron`); the score is the
Pearson r of simulated vs true codes on the top + random excerpts, and the baseline is the score,
on the same excerpts, of another explained feature's explanation. The neuron pipeline's causal
check (zero-ablating one neuron) does not apply to a feature; its causal test is steering
(:mod:`neuronatlas.features.steer`). Rows go to ``feature_explanations.parquet``, upserted one
feature at a time.

    >>> from neuronatlas.data.corpus import default_corpus
    >>> from neuronatlas.explain import LocalExplainer, ExplainConfig
    >>> from neuronatlas.features import FeatureConfig, fit_features, write_features
    >>> from neuronatlas.features.explain import explain_features
    >>> docs, config = default_corpus(n_docs=12, seed=0), FeatureConfig(k=3, top_k=3, max_length=24)
    >>> info = write_features("my-atlas", lm, fit_features(lm, docs, config), docs, config=config)
    >>> rows = explain_features("my-atlas", [(1, 0), (1, 2)], explainer=LocalExplainer(lm, max_new_tokens=6),
    ...                         scorer=lm, config=ExplainConfig(candidates=2))
    >>> rows[0]["explanation"], rows[0]["score"], rows[0]["baseline_score"]
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from neuronatlas.errors import AtlasError
from neuronatlas.explain.backends import Explainer
from neuronatlas.explain.pipeline import ExplainConfig, explain_neuron
from neuronatlas.explain.simulate import Simulator
from neuronatlas.features.store import features_info, read_feature_exemplars
from neuronatlas.models.loading import LoadedModel
from neuronatlas.store.atlas import Atlas

__all__ = ["EXPLANATIONS", "explain_features", "read_feature_explanations"]

EXPLANATIONS = "feature_explanations.parquet"
_SCHEMA = pa.schema([("layer", pa.int32()), ("feature", pa.int32()), ("explanation", pa.string()),
                     ("explainer", pa.string()), ("score", pa.float64()), ("baseline_score", pa.float64()),
                     ("baseline_from", pa.string()), ("pmi", pa.float64()), ("candidates", pa.list_(pa.string()))])


def read_feature_explanations(atlas: Atlas | str | Path) -> list[dict[str, Any]]:
    store = atlas if isinstance(atlas, Atlas) else Atlas.open(atlas)
    return store.read_table(EXPLANATIONS).to_pylist() if store.has(EXPLANATIONS) else []


def _upsert(store: Atlas, rows: Sequence[dict[str, Any]]) -> None:
    new = {(r["layer"], r["feature"]): r for r in rows}
    kept = [r for r in read_feature_explanations(store) if (r["layer"], r["feature"]) not in new]
    merged = sorted(kept + list(new.values()), key=lambda r: (r["layer"], r["feature"]))
    store.write_table(EXPLANATIONS, pa.Table.from_pylist(merged, schema=_SCHEMA),
                      describe="explanations of SNMF features, simulation scores and baselines (neuronatlas features)")


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def explain_features(atlas: Atlas | str | Path, features: Sequence[tuple[int, int]], *, explainer: Explainer,
                     scorer: LoadedModel, config: ExplainConfig = ExplainConfig(),
                     progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Explain and score each ``(layer, feature)``; returns the rows written."""
    store = atlas if isinstance(atlas, Atlas) else Atlas.open(atlas)
    info = features_info(store)
    for layer, f in features:
        if not (0 <= layer < info["n_layers"] and 0 <= f < info["k"]):
            raise AtlasError(f"feature L{layer}:{f} is not in the atlas ({info['n_layers']} layers x {info['k']} "
                             "features); give features as L<layer>:<feature>")
    simulator = Simulator(scorer, batch_size=config.sim_batch_size)
    pool = {(r["layer"], r["feature"]): r["explanation"] for r in read_feature_explanations(store)}
    done: list[tuple[dict[str, Any], Any]] = []
    for layer, f in features:
        ex = read_feature_exemplars(store, layer, f)
        res = explain_neuron(ex, explainer=explainer, scorer=scorer, simulator=simulator, subject=None, docs={},
                             site=info["site"], config=config)
        row = {"layer": layer, "feature": f, "explanation": res.explanation, "explainer": res.explainer,
               "score": _nan_none(res.score), "baseline_score": None, "baseline_from": None,
               "pmi": _nan_none(res.pmi), "candidates": res.candidates}
        pool[(layer, f)] = res.explanation
        done.append((row, ex))
        _upsert(store, [row])
        if progress:
            progress(len(done))
    for row, ex in done:         # baselines once every explanation of this run exists
        others = sorted(k for k in pool if k != (row["layer"], row["feature"]))
        if others:
            pick = random.Random(f"{config.seed}:{row['layer']}:{row['feature']}:baseline").choice(others)
            scored = ex.distinct_top(config.n_top) + ex.random[: config.n_random]
            row["baseline_score"] = _nan_none(simulator.score(pool[pick], scored, ex.max_activation))
            row["baseline_from"] = f"L{pick[0]}:{pick[1]}"
    if done:
        _upsert(store, [row for row, _ in done])
    return [row for row, _ in done]
