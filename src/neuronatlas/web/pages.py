"""Page contexts for every viewer page except the neuron page (see ``neuron.py``).

Each ``*_context`` function validates its parameters (raising ``BadRequest`` / ``NotFound`` from
``neuronatlas.web.data``), runs a few parameterised queries and returns the template context. The
server and the static export both call these functions, so both show the same pages.

    >>> from neuronatlas.web.data import Library
    >>> from neuronatlas.web.pages import heatmap_context
    >>> view = Library(["my-atlas"]).get("my-atlas")
    >>> ctx = heatmap_context(view, page=1)
    >>> ctx["concepts"][0]["cells"][1]           # neurons of the first concept in layer 1
"""

from __future__ import annotations

import re
from typing import Any

from neuronatlas.ids import NeuronId
from neuronatlas.web.cache import TOKEN_INDEX, TOKEN_TABLE, normalize_token
from neuronatlas.web.data import (
    PAGE_SIZE,
    AtlasView,
    BadRequest,
    Library,
    NotFound,
    check_page,
    check_query,
    concept_key,
    like_pattern,
    page_count,
)
from neuronatlas.web.features import has_features
from neuronatlas.web.render import layer_chart_svg
from neuronatlas.web.study import PLOT_EXTS, report_concept_numbers, study_context, study_info

__all__ = ["home_context", "atlas_context", "heatmap_context", "concept_context", "search_context",
           "study_context", "flatten_scalars", "concept_results", "HEATMAP_ROWS", "SEARCH_KINDS"]

HEATMAP_ROWS = 60
SEARCH_KINDS = ("token", "explanation", "concept")
_MAX_NUMBERS = 200


# --- study results (generic: results.json is free-form) ---------------------------------------------
def _scalar(v: Any) -> Any:
    if isinstance(v, (bool, int, float)) or v is None:
        return v
    if isinstance(v, str):
        return v if len(v) <= 120 else v[:117] + "..."
    if isinstance(v, list) and len(v) <= 12 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return "[" + ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v) + "]"
    return None


def flatten_scalars(obj: Any, prefix: str = "", depth: int = 3, limit: int = _MAX_NUMBERS) -> list[tuple[str, Any]]:
    """(dotted key, value) for the numbers, short strings and short number lists in ``obj``."""
    out: list[tuple[str, Any]] = []

    def walk(o: Any, path: str, d: int) -> None:
        if len(out) >= limit:
            return
        if isinstance(o, dict):
            for k, v in o.items():
                key = f"{path}.{k}" if path else str(k)
                s = _scalar(v)
                if s is not None or v is None:
                    out.append((key, s))
                elif d > 0:
                    walk(v, key, d - 1)
                if len(out) >= limit:
                    return
        elif isinstance(o, list) and d > 0:
            for i, v in enumerate(o[:20]):
                walk(v, f"{path}[{i}]", d - 1)
        elif (s := _scalar(o)) is not None:
            out.append((path or "value", s))

    walk(obj, prefix, depth)
    return out


def concept_results(results: Any, concept: str, depth: int = 3) -> list[tuple[str, Any]]:
    """Numbers of ``results`` that belong to ``concept``: a dict entry keyed by it, or list items naming it."""
    found: list[tuple[str, Any]] = []

    def walk(o: Any, path: str, d: int) -> None:
        if d < 0 or len(found) >= _MAX_NUMBERS:
            return
        if isinstance(o, dict):
            for k, v in o.items():
                key = f"{path}.{k}" if path else str(k)
                if str(k) == concept and isinstance(v, (dict, list, int, float)):
                    found.extend(flatten_scalars(v, key, depth=2) if isinstance(v, (dict, list)) else [(key, v)])
                elif isinstance(v, (dict, list)):
                    walk(v, key, d - 1)
        elif isinstance(o, list):
            for i, v in enumerate(o[:2000]):
                if isinstance(v, dict) and any(isinstance(x, str) and x == concept for x in v.values()):
                    found.extend(flatten_scalars(v, f"{path}[{i}]", depth=1))
                elif isinstance(v, (dict, list)) and i < 50:
                    walk(v, f"{path}[{i}]", d - 1)

    walk(results, "", depth)
    return found[:_MAX_NUMBERS]


def _concept_plots(files: list[str], concept: str) -> list[str]:
    names = {concept.lower(), concept_key(concept).lower()}
    pats = [re.compile(r"(^|[^a-z0-9])" + re.escape(n) + r"([^a-z0-9]|$)") for n in names if len(n) >= 2]
    return [f for f in files if f.lower().endswith(PLOT_EXTS) and any(p.search(f.lower().rsplit(".", 1)[0])
                                                                      for p in pats)]


# --- pages ------------------------------------------------------------------------------------------
def home_context(lib: Library) -> dict[str, Any]:
    atlases = []
    for view in lib:
        m = view.manifest()
        atlases.append({"slug": view.slug, "model": m.get("model", {}), "dims": view.dims(),
                        "records": list(m.get("records", {})), "studies": view.studies(),
                        "concepts": len(view.concepts()), "created": m.get("created")})
    return {"title": "Neuron Atlas", "atlases": atlases}


def atlas_context(view: AtlasView) -> dict[str, Any]:
    m = view.manifest()
    descriptions = m.get("tables", {})
    tables = [{"name": name, "rows": view.count(name), "about": descriptions.get(f"{name}.parquet", "")}
              for name in ("stats", "exemplars", "prompts", "decoded", "selections", "corpus_docs",
                           "corpus_exemplars", "explanations", "feature_layers", "features", "feature_decoded",
                           "feature_exemplars", "feature_docs", "feature_explanations") if view.has(name)]
    concepts = []
    if view.has("selections", "concept", "layer", "neuron"):
        counts = {r["concept"]: r["n"] for r in view.rows(
            "SELECT concept, count(DISTINCT (layer, neuron)) AS n FROM selections GROUP BY concept")}
        concepts = [{"key": k, "name": c, "n": counts.get(c, 0)} for k, c in view.concepts().items()]
    best = []
    if view.has("explanations", "layer", "neuron", "explanation", "score"):
        best = view.rows("SELECT layer, neuron, explanation, score FROM explanations WHERE score IS NOT NULL "
                         "ORDER BY score DESC, layer, neuron LIMIT 10")
    return {"title": view.slug, "slug": view.slug, "manifest": m, "model": m.get("model", {}), "dims": view.dims(),
            "records": m.get("records", {}), "tables": tables, "concepts": concepts[:300],
            "more_concepts": max(0, len(concepts) - 300), "studies": [study_info(view, s) for s in view.studies()],
            "best": best, "has_heatmap": view.has("selections", "concept", "layer", "neuron"),
            "has_features": has_features(view)}


def heatmap_context(view: AtlasView, page: int = 1, study: str | None = None,
                    method: str | None = None) -> dict[str, Any]:
    """Selected neurons per concept (rows, paginated) and layer (columns)."""
    if not view.has("selections", "concept", "layer", "neuron"):
        raise NotFound(f"atlas {view.slug!r} has no selections.parquet, so there is no heatmap")
    study = view.check_choice(study, "selections", "study")
    method = view.check_choice(method, "selections", "method")
    where, params = ["concept IS NOT NULL"], []
    if study:
        where.append("study = ?")
        params.append(study)
    if method:
        where.append("method = ?")
        params.append(method)
    rows = view.cached(("heatmap", study, method), lambda: view.rows(
        f"SELECT concept, layer, count(DISTINCT neuron) AS n FROM selections WHERE {' AND '.join(where)} "
        "GROUP BY concept, layer", params))
    matrix: dict[str, dict[int, int]] = {}
    for r in rows:
        matrix.setdefault(str(r["concept"]), {})[int(r["layer"])] = int(r["n"])
    names = sorted(matrix)
    offset = check_page(page, len(names), HEATMAP_ROWS)
    dims = view.dims()
    n_layers = dims[0] if dims else (max((max(c) for c in matrix.values()), default=-1) + 1)
    top = max((n for c in matrix.values() for n in c.values()), default=0)
    concepts = [{"name": c, "key": concept_key(c), "cells": matrix[c], "total": sum(matrix[c].values())}
                for c in names[offset:offset + HEATMAP_ROWS]]
    layer_totals = [sum(matrix[c].get(layer, 0) for c in names) for layer in range(n_layers)]
    return {"title": f"{view.slug}: layers x concepts", "slug": view.slug, "concepts": concepts,
            "n_layers": n_layers, "max": top, "layer_totals": layer_totals, "page": page,
            "pages": page_count(len(names), HEATMAP_ROWS), "n_concepts": len(names), "study": study,
            "method": method, "studies": view.distinct("selections", "study"),
            "methods": view.distinct("selections", "method")}


def _explanation_lookup(view: AtlasView, neurons: list[tuple[int, int]]) -> dict[tuple[int, int], dict[str, Any]]:
    if not neurons or not view.has("explanations", "layer", "neuron", "explanation"):
        return {}
    ids = sorted({int(layer) * 10_000_000 + int(n) for layer, n in neurons})
    rows = view.rows(f"SELECT {view.select('explanations', ['layer', 'neuron', 'explanation', 'score'])} "
                     "FROM explanations WHERE list_contains(?::BIGINT[], layer::BIGINT * 10000000 + neuron)", [ids])
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for r in rows:
        key = (int(r["layer"]), int(r["neuron"]))
        if key not in out or (r["score"] or float("-inf")) > (out[key]["score"] or float("-inf")):
            out[key] = r
    return out


def concept_context(view: AtlasView, key: str, page: int = 1, layer: int | None = None, study: str | None = None,
                    method: str | None = None, linker: Any = None) -> dict[str, Any]:
    """A concept's selected neurons (paginated, optionally one layer / study / method) and its study results.

    ``linker`` (a ``ServerLinker`` or ``StaticLinker``) makes the per-layer chart's bars into links.
    """
    concept = view.concept(key)
    dims = view.dims()
    if layer is not None and (layer < 0 or (dims is not None and layer >= dims[0])):
        raise BadRequest(f"layer {layer} is out of range; the atlas has {dims[0] if dims else 0} layers")
    rows: list[dict[str, Any]] = []
    total, per_layer = 0, {}
    has_sel = view.has("selections", "concept", "layer", "neuron")
    if has_sel:
        study = view.check_choice(study, "selections", "study")
        method = view.check_choice(method, "selections", "method")
        norm = f"(SELECT {view.select('selections', ['concept', 'layer', 'neuron', 'study', 'method', 'site', 'score', 'rank'])} FROM selections)"
        where: list[str] = ["concept = ?"]
        params: list[Any] = [concept]
        for col, val in (("study", study), ("method", method)):
            if val:
                where.append(f"{col} = ?")
                params.append(val)
        by_layer = f"SELECT layer, count(DISTINCT neuron) AS n FROM {norm} WHERE {' AND '.join(where)} GROUP BY layer"
        counts = view.cached(("per-layer", concept, study, method), lambda: view.rows(by_layer, params))
        per_layer = {int(r["layer"]): int(r["n"]) for r in counts}
        if layer is not None:
            where.append("layer = ?")
            params.append(layer)
        count_sql = f"SELECT count(*) FROM {norm} WHERE {' AND '.join(where)}"
        total = int(view.cached(("concept-count", concept, study, method, layer),
                                lambda: view.scalar(count_sql, params)) or 0)
        offset = check_page(page, total)
        rows = view.rows(f"SELECT layer, neuron, study, method, site, score, rank FROM {norm} WHERE {' AND '.join(where)} "
                         "ORDER BY rank NULLS LAST, study, method, layer, neuron LIMIT ? OFFSET ?",
                         [*params, PAGE_SIZE, offset])
        expl = _explanation_lookup(view, [(r["layer"], r["neuron"]) for r in rows])
        for r in rows:
            r["explanation"] = (expl.get((int(r["layer"]), int(r["neuron"]))) or {}).get("explanation")
    elif page != 1:
        raise NotFound(f"page {page} is past the last page (1)")
    studies = []
    for s in view.studies():
        info = study_info(view, s)
        results = view.study_results(s)
        numbers = report_concept_numbers(results, concept) + concept_results(results, concept)
        plots = _concept_plots(info["plots"], concept)
        listed = concept in info["concepts"]
        if numbers or plots or listed:
            info["numbers"] = numbers
            info["concept_plots"] = plots or (info["plots"][:4] if listed else [])
            studies.append(info)
    n_layers = dims[0] if dims else (max(per_layer, default=-1) + 1)
    links = {lay: linker.concept(view.slug, key, layer=lay, study=study, method=method) if linker else None
             for lay in per_layer}
    return {"title": f"{view.slug}: {concept}", "slug": view.slug, "concept": concept, "key": key, "rows": rows,
            "total": total, "page": page, "pages": page_count(total), "layer": layer, "study": study,
            "method": method, "studies": studies, "has_selections": has_sel,
            "chart": layer_chart_svg(per_layer, n_layers, links), "all_studies": view.distinct("selections", "study"),
            "all_methods": view.distinct("selections", "method")}


def search_context(view: AtlasView, q: str = "", kind: str = "token", page: int = 1, side: str | None = None,
                   direction: str | None = None, match: str = "exact") -> dict[str, Any]:
    """Search decoded tokens, explanation text or concept names; results are neurons, paginated."""
    if kind not in SEARCH_KINDS:
        raise BadRequest(f"unknown search kind {kind!r}; choose from: {', '.join(SEARCH_KINDS)}")
    if match not in ("exact", "contains"):
        raise BadRequest(f"unknown match {match!r}; choose exact or contains")
    q = check_query(q)
    ctx: dict[str, Any] = {"title": f"{view.slug}: search", "slug": view.slug, "q": q, "kind": kind, "page": page,
                           "side": side, "direction": direction, "match": match, "rows": [], "total": 0, "pages": 1,
                           "concepts": [], "jump": None, "available": {
                               "token": view.has("decoded", "token", "layer", "neuron"),
                               "explanation": view.has("explanations", "explanation", "layer", "neuron"),
                               "concept": view.has("selections", "concept", "layer", "neuron")},
                           "sides": view.distinct("decoded", "side"),
                           "directions": view.distinct("decoded", "direction")}
    ctx["side"] = side = view.check_choice(side, "decoded", "side")
    ctx["direction"] = direction = view.check_choice(direction, "decoded", "direction")
    if (nid := NeuronId.find(q)) is not None:
        dims = view.dims()
        lay, n = nid.pair
        if dims and lay < dims[0] and n < dims[1]:
            ctx["jump"] = (lay, n)
    if not q or not ctx["available"][kind]:
        if page != 1:
            raise NotFound(f"page {page} is past the last page (1)")
        return ctx
    if kind == "token":
        sql_from, params = _token_search(view, q, match, side, direction)
        order = "ORDER BY rank NULLS LAST, abs(score) DESC NULLS LAST, layer, neuron, side, direction"
        cols = "layer, neuron, side, direction, rank, token, score"
    elif kind == "explanation":
        norm = f"(SELECT {view.select('explanations', ['layer', 'neuron', 'explanation', 'explainer', 'score'])} FROM explanations)"
        sql_from = f"FROM {norm} WHERE explanation ILIKE ? ESCAPE '\\'"
        params = [like_pattern(q)]
        order = "ORDER BY score DESC NULLS LAST, layer, neuron"
        cols = "layer, neuron, explanation, explainer, score"
    else:
        names = [c for c in view.concepts().values() if q.lower() in c.lower()][:1000]
        ctx["concepts"] = [{"name": c, "key": concept_key(c)} for c in names[:50]]
        norm = f"(SELECT {view.select('selections', ['concept', 'layer', 'neuron', 'study', 'method', 'score', 'rank'])} FROM selections)"
        sql_from = f"FROM {norm} WHERE list_contains(?::VARCHAR[], concept)"
        params = [names]
        order = "ORDER BY concept, rank NULLS LAST, layer, neuron"
        cols = "layer, neuron, concept, study, method, score, rank"
    total = int(view.cached(("count", sql_from, tuple(map(str, params))),
                            lambda: view.scalar(f"SELECT count(*) {sql_from}", params)) or 0)
    offset = check_page(page, total)
    rows = view.rows(f"SELECT {cols} {sql_from} {order} LIMIT ? OFFSET ?", [*params, PAGE_SIZE, offset])
    spell = view.tokens if kind == "token" and view.has(TOKEN_INDEX, "tid") else None
    for r in rows:
        if "concept" in r:
            r["key"] = concept_key(str(r["concept"]))
        if spell is not None:
            r["token"] = spell[r["token"]]
    ctx.update(rows=rows, total=total, pages=page_count(total))
    return ctx


def _token_search(view: AtlasView, q: str, match: str, side: str | None,
                  direction: str | None) -> tuple[str, list[Any]]:
    """The FROM/WHERE clause (and its parameters) of a decoded-token search.

    Whole-token matching ignores case and a leading 'Ġ'/'▁'/space; with the in-memory token index it
    is one id range (and the ``token`` column holds token ids, spelled later), otherwise a scan of
    decoded.parquet.
    """
    params: list[Any] = []
    if match == "exact":
        norm = normalize_token(q)
        if view.has(TOKEN_INDEX, "tid"):
            rng = view.cached(("tid-range", norm), lambda: view.rows(
                f"SELECT min(tid) AS lo, max(tid) AS hi FROM {TOKEN_TABLE} WHERE norm = ?", [norm])[0])
            cond, params = "d.tid BETWEEN ? AND ?", [rng["lo"], rng["hi"]]
        elif view.has(TOKEN_TABLE):
            cond, params = f"token IN (SELECT token FROM {TOKEN_TABLE} WHERE norm = ?)", [norm]
        else:
            cond, params = "lower(token) = ?", [norm]
    elif view.has(TOKEN_INDEX, "tid"):
        cond, params = f"d.tid IN (SELECT tid FROM {TOKEN_TABLE} WHERE token ILIKE ? ESCAPE '\\')", [like_pattern(q)]
    else:
        cond, params = "token ILIKE ? ESCAPE '\\'", [like_pattern(q)]
    where: list[str] = []
    if view.has(TOKEN_INDEX, "tid"):  # no join: tokens are spelled from view.tokens after paging
        source = (f"(SELECT d.layer, d.neuron, d.side::VARCHAR AS side, d.direction::VARCHAR AS direction, "
                  f"d.rank::INTEGER AS rank, d.tid AS token, d.score FROM {TOKEN_INDEX} d WHERE {cond})")
    else:
        cols = ["layer", "neuron", "side", "direction", "rank", "token", "score"]
        source = f"(SELECT {view.select('decoded', cols)} FROM decoded)"
        where.append(cond)
    for col, val in (("side", side), ("direction", direction)):
        if val:
            where.append(f"{col} = ?")
            params.append(val)
    return f"FROM {source} AS s" + (f" WHERE {' AND '.join(where)}" if where else ""), params
