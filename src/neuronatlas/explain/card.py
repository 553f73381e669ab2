"""A neuron's card: everything an atlas knows about one neuron, as plain data (no torch, no model).

One builder, :func:`neuron_sections`, reads every section with one parameterised query each from a
:class:`CardSource` (an :class:`AtlasSource` over an atlas directory, or the viewer's
:class:`~neuronatlas.web.data.AtlasView`) and serves both ``neuronatlas show`` (:func:`neuron_card`)
and the viewer's neuron page (:func:`neuron_context <neuronatlas.web.neuron.neuron_context>`).
Sections are empty when their table (or the neuron's rows) is missing: ``stats`` (per-label statistics
of every record), ``decoded`` (top tokens through the unembedding), ``exemplars`` (record top-k prompt
tokens, with their prompts), ``corpus`` (top and random corpus exemplars with activation windows),
``explanations``, ``selections``, ``histograms`` (activation histograms per record and label),
``glu_signs`` and ``glu_exemplars`` (gate/up sign quadrants of gated MLPs). Column names come from :mod:`neuronatlas.store.schemas`.

    >>> from neuronatlas.explain.card import AtlasSource, neuron_card, neuron_sections
    >>> card = neuron_card("my-atlas", 1, 3, n_top=5)
    >>> card["explanation"]["explanation"], card["exemplars"]["top"][0]["tokens"]
    >>> neuron_sections(AtlasSource("my-atlas"), 1, 3)["stats"][0]["label"]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from neuronatlas.errors import AtlasError, SelectionError
from neuronatlas.explain.tables import EXEMPLARS_TABLE, open_atlas, table_meta
from neuronatlas.ids import NeuronId
from neuronatlas.store.atlas import Atlas
from neuronatlas.store.schemas import (
    CORPUS_EXEMPLARS,
    DECODED,
    EXEMPLARS,
    EXPLANATIONS,
    GLU_EXEMPLARS,
    GLU_SIGNS,
    HISTOGRAMS,
    SELECTIONS,
    STATS,
    TableSchema,
)

__all__ = ["AtlasSource", "CardSource", "SECTIONS", "neuron_card", "neuron_sections"]

ALL_LABEL = "__all__"
# section name -> the table it reads
SECTIONS = {"stats": STATS, "decoded": DECODED, "exemplars": EXEMPLARS, "corpus": CORPUS_EXEMPLARS,
            "explanations": EXPLANATIONS, "selections": SELECTIONS, "histograms": HISTOGRAMS, "glu_signs": GLU_SIGNS,
            "glu_exemplars": GLU_EXEMPLARS}
DecodedRows = Callable[[int, int, int], list[dict[str, Any]]]


class CardSource(Protocol):
    """Read access the card builder needs: column checks and parameterised queries over the atlas views."""

    def has(self, view: str, *cols: str) -> bool: ...

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    def select(self, view: str, wanted: Sequence[str], alias: str = "") -> str: ...


class AtlasSource:
    """A :class:`CardSource` over an atlas directory (one DuckDB connection, opened on first use)."""

    def __init__(self, atlas: Atlas | str | Path) -> None:
        self.atlas = open_atlas(atlas)
        self._con: Any = None
        self._columns: dict[str, set[str]] = {}

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        import duckdb

        if self._con is None:
            self._con = self.atlas.connect()
        try:
            cur = self._con.execute(sql, list(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
        except duckdb.Error as exc:
            raise AtlasError(f"atlas {str(self.atlas.path)!r}: query failed: {str(exc).splitlines()[0]}") from None

    def columns(self, view: str) -> set[str]:
        if view not in self._columns:
            self._columns[view] = {r["column_name"] for r in self.rows(
                "SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND NOT internal", [view])}
        return self._columns[view]

    def has(self, view: str, *cols: str) -> bool:
        have = self.columns(view)
        return bool(have) and all(c in have for c in cols)

    def select(self, view: str, wanted: Sequence[str], alias: str = "") -> str:
        have = self.columns(view)
        prefix = f"{alias}." if alias else ""
        return ", ".join(f'{prefix}"{c}"' if c in have else f'NULL AS "{c}"' for c in wanted)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


def _cols(table: TableSchema, *drop: str) -> list[str]:
    return [c for c in table.names if c not in ("layer", "neuron", *drop)]


def _stats(src: CardSource, layer: int, neuron: int) -> list[dict[str, Any]]:
    if not src.has("stats", "label", "layer", "neuron"):
        return []
    return src.rows(f"SELECT {src.select('stats', _cols(STATS))} FROM stats WHERE layer = ? AND neuron = ? "
                    "ORDER BY record, site", [layer, neuron])


def _decoded(src: CardSource, layer: int, neuron: int, n_ranks: int) -> list[dict[str, Any]]:
    if not src.has("decoded", "layer", "neuron", "side", "direction", "token"):
        return []
    return src.rows(f"SELECT {src.select('decoded', ['side', 'direction', 'rank', 'token', 'score'])} FROM decoded "
                    "WHERE layer = ? AND neuron = ? AND coalesce(rank, 0) < ? ORDER BY side, direction DESC, rank, "
                    "score DESC", [layer, neuron, n_ranks])


def _record_exemplars(src: CardSource, layer: int, neuron: int, n: int, table: TableSchema = EXEMPLARS,
                      order: str = "record, rank, activation DESC") -> list[dict[str, Any]]:
    if not src.has(table.name, "layer", "neuron", "prompt_id", "position"):
        return []
    rows = src.rows(f"SELECT {src.select(table.name, _cols(table))} FROM {table.name} WHERE layer = ? AND neuron = ? "
                    f"AND coalesce(rank, 0) < ? ORDER BY {order}", [layer, neuron, n])
    prompts: dict[tuple[str, int], dict[str, Any]] = {}
    if rows and src.has("prompts", "prompt_id", "tokens"):
        ids = sorted({int(r["prompt_id"]) for r in rows})
        for p in src.rows(f"SELECT {src.select('prompts', ['record', 'prompt_id', 'label', 'tokens', 'text'])} "
                          "FROM prompts WHERE list_contains(?::BIGINT[], prompt_id)", [ids]):
            prompts[(str(p["record"]), int(p["prompt_id"]))] = p
    for r in rows:
        r["prompt"] = prompts.get((str(r["record"]), int(r["prompt_id"])))
    return rows


def _corpus(src: CardSource, layer: int, neuron: int, n: int) -> list[dict[str, Any]]:
    if not src.has("corpus_exemplars", "layer", "neuron", "window_tokens"):
        return []
    return src.rows(f"SELECT {src.select('corpus_exemplars', _cols(CORPUS_EXEMPLARS))} FROM corpus_exemplars "
                    "WHERE layer = ? AND neuron = ? AND coalesce(rank, 0) < ? ORDER BY kind DESC, rank",
                    [layer, neuron, n])


def _explanations(src: CardSource, layer: int, neuron: int) -> list[dict[str, Any]]:
    if not src.has("explanations", "layer", "neuron", "explanation"):
        return []
    return src.rows(f"SELECT {src.select('explanations', list(EXPLANATIONS.names))} FROM explanations "
                    "WHERE layer = ? AND neuron = ? ORDER BY score DESC NULLS LAST", [layer, neuron])


def _histograms(src: CardSource, layer: int, neuron: int) -> list[dict[str, Any]]:
    if not src.has("histograms", "layer", "neuron", "counts"):
        return []
    return src.rows(f"SELECT {src.select('histograms', _cols(HISTOGRAMS))} FROM histograms WHERE layer = ? "
                    "AND neuron = ? ORDER BY record, site", [layer, neuron])


def _glu_signs(src: CardSource, layer: int, neuron: int) -> list[dict[str, Any]]:
    if not src.has("glu_signs", "layer", "neuron", "quadrant"):
        return []
    return src.rows(f"SELECT {src.select('glu_signs', _cols(GLU_SIGNS))} FROM glu_signs WHERE layer = ? "
                    "AND neuron = ? ORDER BY record, site, quadrant", [layer, neuron])


def _selections(src: CardSource, layer: int, neuron: int) -> list[dict[str, Any]]:
    if not src.has("selections", "layer", "neuron", "concept"):
        return []
    return src.rows(f"SELECT {src.select('selections', _cols(SELECTIONS))} FROM selections WHERE layer = ? "
                    "AND neuron = ? ORDER BY study, concept, method", [layer, neuron])


def neuron_sections(src: CardSource, layer: int, neuron: int, *, n_decoded: int = 20, n_exemplars: int = 20,
                    decoded_rows: DecodedRows | None = None, n_glu: int = 5) -> dict[str, list[dict[str, Any]]]:
    """Every section's rows for one neuron (see the module docstring), one query per section.

    ``decoded`` rows (side, direction, rank, token, score) have rank < ``n_decoded`` ("top" before
    "bottom"); exemplar sections keep ranks < ``n_exemplars``; record exemplars carry their ``prompt``
    row (or None); ``histograms`` (per record and label), ``glu_signs`` (tokens per gate/up sign quadrant)
    and ``glu_exemplars`` (ranks < ``n_glu`` per quadrant, with their prompts). ``decoded_rows(layer, neuron, n_decoded)`` replaces the decoded query (the viewer
    answers it from an in-memory copy).
    """
    decoded = decoded_rows(layer, neuron, n_decoded) if decoded_rows is not None else _decoded(src, layer, neuron,
                                                                                                n_decoded)
    return {"stats": _stats(src, layer, neuron), "decoded": decoded,
            "exemplars": _record_exemplars(src, layer, neuron, n_exemplars),
            "corpus": _corpus(src, layer, neuron, n_exemplars),
            "explanations": _explanations(src, layer, neuron), "selections": _selections(src, layer, neuron),
            "histograms": _histograms(src, layer, neuron), "glu_signs": _glu_signs(src, layer, neuron),
            "glu_exemplars": _record_exemplars(src, layer, neuron, n_glu, GLU_EXEMPLARS, "record, quadrant, rank")}


def _excerpt(r: dict[str, Any]) -> dict[str, Any]:
    return {"rank": r["rank"], "doc_id": r["doc_id"], "position": r["position"], "activation": r["activation"],
            "window_start": r["window_start"], "center": int(r["position"]) - int(r["window_start"]),
            "tokens": list(r["window_tokens"]), "acts": [float(a) for a in r["window_acts"]]}


def neuron_card(atlas: Atlas | str | Path, layer: int, neuron: int, *, n_top: int = 5,
                n_decoded: int = 8) -> dict[str, Any]:
    """Card data for one neuron (``neuronatlas show``); raises :class:`AtlasError` if the atlas knows nothing about it."""
    store = open_atlas(atlas)
    nid = NeuronId(layer, neuron)
    card: dict[str, Any] = {"neuron": str(nid), "layer": layer, "neuron_index": neuron,
                            "model": store.manifest().get("model", {}).get("model")}
    if store.has(EXEMPLARS_TABLE):
        meta = table_meta(store)
        n_layers, n_neurons = meta.get("n_layers"), meta.get("n_neurons")
        if n_layers is not None and n_neurons is not None and not (0 <= layer < n_layers and 0 <= neuron < n_neurons):
            raise SelectionError(f"{nid} is outside the model (layers 0-{n_layers - 1}, neurons 0-{n_neurons - 1})")
        card["site"] = meta.get("site")
    src = AtlasSource(store)
    try:
        sec = neuron_sections(src, layer, neuron, n_decoded=n_decoded, n_exemplars=max(n_top, 20))
    finally:
        src.close()
    decoded: dict[str, dict[str, list[str]]] = {}
    for r in sec["decoded"]:
        decoded.setdefault(r["side"], {}).setdefault(r["direction"], []).append(r["token"])
    if decoded:
        card["decoded"] = decoded
    if sec["stats"]:
        card["stats"] = sorted(sec["stats"], key=lambda r: (
            str(r["record"]), str(r["site"]), r["label"] != ALL_LABEL,
            -r["mean"] if r["mean"] is not None else float("inf")))
    if sec["corpus"]:
        top = [_excerpt(r) for r in sec["corpus"] if r["kind"] == "top"]
        card["exemplars"] = {"max_activation": max((e["activation"] for e in top), default=0.0),
                             "corpus": table_meta(store).get("corpus"), "top": top[:n_top],
                             "random": [_excerpt(r) for r in sec["corpus"] if r["kind"] != "top"]}
    if sec["explanations"]:
        card["explanation"] = sec["explanations"][0]
    if sec["selections"]:
        card["selections"] = sec["selections"]
    if not any(k in card for k in ("decoded", "stats", "exemplars", "explanation")):
        raise AtlasError(f"atlas {str(store.path)!r} has nothing on {nid}; run `neuronatlas exemplars`, "
                         "`neuronatlas explain`, `neuronatlas record` or `neuronatlas decode` first")
    return card
