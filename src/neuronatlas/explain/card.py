"""A neuron's card: everything an atlas knows about one neuron, as plain data (no torch, no model).

Sections appear when their table exists: ``decoded`` (decoded.parquet: top tokens through the
unembedding), ``stats`` (per-label statistics of every record), ``exemplars`` (top and random
corpus exemplars with their activation windows), ``explanation`` (explanations.parquet).

    >>> from neuronatlas.explain.card import neuron_card
    >>> card = neuron_card("my-atlas", 12, 345, n_top=5)
    >>> card["explanation"]["explanation"], card["exemplars"]["top"][0]["tokens"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuronatlas.errors import AtlasError, SelectionError
from neuronatlas.explain.tables import (
    EXEMPLARS_TABLE,
    EXPLANATIONS_TABLE,
    open_atlas,
    read_exemplars,
    table_meta,
)
from neuronatlas.ids import NeuronId
from neuronatlas.store.atlas import Atlas

__all__ = ["neuron_card"]


def _decoded(store: Atlas, layer: int, neuron: int, n_tokens: int) -> dict[str, dict[str, list[str]]]:
    rows = store.query("SELECT side, direction, rank, token FROM decoded WHERE layer = ? AND neuron = ? AND rank < ? "
                       "ORDER BY side, direction DESC, rank", [layer, neuron, n_tokens]).to_pylist()
    out: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        out.setdefault(r["side"], {}).setdefault(r["direction"], []).append(r["token"])
    return out


def _stats(store: Atlas, layer: int, neuron: int) -> list[dict[str, Any]]:
    return store.query("SELECT record, site, label, n_tokens, mean, max, act_prob FROM stats "
                       "WHERE layer = ? AND neuron = ? ORDER BY record, site, label = '__all__' DESC, mean DESC",
                       [layer, neuron]).to_pylist()


def neuron_card(atlas: Atlas | str | Path, layer: int, neuron: int, *, n_top: int = 5,
                n_decoded: int = 8) -> dict[str, Any]:
    """Card data for ``L{layer}:{neuron}``; raises :class:`AtlasError` if the atlas knows nothing about it."""
    store = open_atlas(atlas)
    views = set(store.views())
    card: dict[str, Any] = {"neuron": str(NeuronId(layer, neuron)), "layer": layer, "neuron_index": neuron,
                            "model": store.manifest().get("model", {}).get("model")}
    if "decoded" in views:
        decoded = _decoded(store, layer, neuron, n_decoded)
        if decoded:
            card["decoded"] = decoded
    if "stats" in views:
        stats = _stats(store, layer, neuron)
        if stats:
            card["stats"] = stats
    if store.has(EXEMPLARS_TABLE):
        meta = table_meta(store)
        n_layers, n_neurons = meta.get("n_layers"), meta.get("n_neurons")
        if n_layers is not None and n_neurons is not None and not (0 <= layer < n_layers and 0 <= neuron < n_neurons):
            raise SelectionError(f"{NeuronId(layer, neuron)} is outside the model (layers 0-{n_layers - 1}, neurons "
                                 f"0-{n_neurons - 1})")
        card["site"] = meta.get("site")
        try:
            ex = read_exemplars(store, layer, neuron)
        except AtlasError:
            ex = None
        if ex is not None:
            def one(e: Any) -> dict[str, Any]:
                return {"rank": e.rank, "doc_id": e.doc_id, "position": e.position, "activation": e.activation,
                        "window_start": e.window_start, "center": e.center, "tokens": e.tokens,
                        "acts": [float(a) for a in e.acts]}

            card["exemplars"] = {"max_activation": ex.max_activation, "corpus": meta.get("corpus"),
                                 "top": [one(e) for e in ex.top[:n_top]], "random": [one(e) for e in ex.random]}
    if store.has(EXPLANATIONS_TABLE):
        rows = store.query("SELECT * FROM explanations WHERE layer = ? AND neuron = ?", [layer, neuron]).to_pylist()
        if rows:
            card["explanation"] = rows[0]
    if not any(k in card for k in ("decoded", "stats", "exemplars", "explanation")):
        raise AtlasError(f"atlas {str(store.path)!r} has nothing on {NeuronId(layer, neuron)}; run `neuronatlas exemplars`, "
                         "`neuronatlas explain`, `neuronatlas record` or `neuronatlas decode` first")
    return card
