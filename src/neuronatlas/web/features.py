"""The viewer's SNMF feature pages: the per-layer overview and one page per feature.

Reads ``feature_layers``, ``features``, ``feature_decoded``, ``feature_exemplars``,
``feature_explanations`` (when present) and ``features.safetensors`` (the feature's neuron weights,
read with safetensors' NumPy loader; no torch). Nothing here writes to the atlas.

    >>> from neuronatlas.data.corpus import default_corpus
    >>> from neuronatlas.features import FeatureConfig, fit_features, write_features
    >>> from neuronatlas.web.data import Library
    >>> from neuronatlas.web.features import features_context, feature_context
    >>> docs, config = default_corpus(n_docs=12, seed=0), FeatureConfig(k=3, top_k=2, max_length=24)
    >>> info = write_features("my-atlas", lm, fit_features(lm, docs, config), docs, config=config)
    >>> view = Library(["my-atlas"]).get("my-atlas")
    >>> ctx = feature_context(view, layer=1, feature=2)
    >>> ctx["decoded"]["top"][0]["token"], ctx["neurons"][0]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neuronatlas.web.data import AtlasView, NotFound
from neuronatlas.web.neuron import _corpus_exemplars

__all__ = ["features_context", "feature_context", "has_features"]

N_NEURONS = 12


def has_features(view: AtlasView) -> bool:
    return view.has("feature_layers", "layer", "fvu") and view.has("features", "layer", "feature")


def _require(view: AtlasView) -> None:
    if not has_features(view):
        raise NotFound(f"atlas {view.slug!r} has no SNMF features; run `neuronatlas features --out ATLAS`")


def _components(view: AtlasView) -> Any:
    def load() -> Any:
        from safetensors.numpy import load_file

        path = view.atlas.file("features.safetensors")
        if not path.exists():
            return None
        return load_file(str(path))["components"]

    return view.cached(("feature_components",), load)


def features_context(view: AtlasView, layer: int | None = None) -> dict[str, Any]:
    """Per-layer FVU and L0, and the features of ``layer`` (default: the first) with their top tokens."""
    _require(view)
    layers = view.rows("SELECT layer, k, fvu, relative_error, l0, dead, tokens FROM feature_layers ORDER BY layer")
    chosen = layers[0]["layer"] if layer is None and layers else layer
    if chosen is None or not any(r["layer"] == chosen for r in layers):
        raise NotFound(f"layer {layer} has no features in atlas {view.slug!r} (layers 0..{len(layers) - 1})")
    feats = view.rows("SELECT feature, freq, mean, max, out_norm, top_token FROM features WHERE layer = ? "
                      "ORDER BY freq DESC, feature", [chosen])
    explained = {}
    if view.has("feature_explanations", "layer", "feature", "explanation"):
        explained = {r["feature"]: r for r in view.rows(
            "SELECT feature, explanation, score FROM feature_explanations WHERE layer = ?", [chosen])}
    for f in feats:
        f["explanation"] = explained.get(f["feature"])
    return {"title": f"{view.slug}: SNMF features", "slug": view.slug, "layers": layers, "layer": chosen,
            "features": feats, "n_layers": len(layers)}


def feature_context(view: AtlasView, layer: int, feature: int) -> dict[str, Any]:
    """Statistics, decoded tokens, exemplars, explanation and strongest neurons of one feature."""
    _require(view)
    rows = view.rows("SELECT feature, freq, mean, max, out_norm, top_token FROM features WHERE layer = ? AND feature = ?",
                     [layer, feature])
    if not rows:
        raise NotFound(f"feature L{layer}/f{feature} is not in atlas {view.slug!r}")
    k = int(view.scalar("SELECT max(feature) + 1 FROM features WHERE layer = ?", [layer]))
    n_layers = int(view.scalar("SELECT count(*) FROM feature_layers"))
    layer_row = view.rows("SELECT fvu, l0, tokens FROM feature_layers WHERE layer = ?", [layer])[0]
    decoded = {d: view.rows("SELECT rank, token, score FROM feature_decoded WHERE layer = ? AND feature = ? "
                            "AND direction = ? ORDER BY rank", [layer, feature, d]) for d in ("top", "bottom")}
    exemplars = _corpus_exemplars(view.rows(
        "SELECT kind, rank, doc_id, position, activation, window_start, window_tokens, window_acts "
        "FROM feature_exemplars WHERE layer = ? AND feature = ? AND kind = 'top' ORDER BY rank", [layer, feature]))
    explanation = None
    if view.has("feature_explanations", "layer", "feature", "explanation"):
        found = view.rows("SELECT * FROM feature_explanations WHERE layer = ? AND feature = ?", [layer, feature])
        explanation = found[0] if found else None
    neurons = []
    comps = _components(view)
    if comps is not None:
        w = np.asarray(comps[layer, feature])
        order = np.argsort(-np.abs(w))[:N_NEURONS]
        neurons = [{"neuron": int(j), "weight": float(w[j])} for j in order]
    prev = (layer, feature - 1) if feature > 0 else ((layer - 1, k - 1) if layer > 0 else None)
    nxt = (layer, feature + 1) if feature + 1 < k else ((layer + 1, 0) if layer + 1 < n_layers else None)
    return {"title": f"{view.slug}: feature L{layer}/f{feature}", "slug": view.slug, "layer": layer,
            "feature": feature, "k": k, "n_layers": n_layers, "stats": rows[0], "layer_stats": layer_row,
            "decoded": decoded, "exemplars": exemplars, "explanation": explanation, "neurons": neurons,
            "prev": prev, "next": nxt}
