"""The neuron page: statistics per label, decoded tokens, exemplars, explanation, selections.

The rows come from the one card builder, :func:`neuronatlas.explain.card.neuron_sections` (the same
that serves ``neuronatlas show``); this module adds what the page draws (charts, z-scores, token spans).
Each section appears only when the atlas has the table and rows for this neuron.

    >>> from neuronatlas.web.data import Library
    >>> from neuronatlas.web.neuron import neuron_context
    >>> ctx = neuron_context(Library(["my-atlas"]).get("my-atlas"), layer=1, neuron=3)
    >>> sorted(k for k, v in ctx["sections"].items() if v)       # ['decoded', 'stats', ...]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from neuronatlas.explain.card import SECTIONS, neuron_sections
from neuronatlas.ids import NeuronId
from neuronatlas.web.data import MAX_LIVE_CHARS, AtlasView, concept_key
from neuronatlas.web.render import bar_chart_svg, histogram_svg

__all__ = ["neuron_context", "token_spans", "abs_percentiles", "PERCENTILES"]

ALL_LABEL = "__all__"
_SIDE_ORDER = ["out", "out_normed", "in_up", "in_gate", "in"]
_SIDE_NAMES = {"out": "output (W_U · down-proj column)", "out_normed": "output, final norm folded in",
               "in_up": "input (W_U · up-proj row)", "in_gate": "input (W_U · gate-proj row)",
               "in": "input (W_U · input row)"}
QUADRANT_MEANING = {
    "g+u+": "gate open, up positive: positive output, up to the full act(gate) * up",
    "g+u-": "gate open, up negative: negative output (writes minus its output direction)",
    "g-u+": "gate closed, up positive: negative output, at most 0.28 x up (SiLU; 0.17 x up for GELU)",
    "g-u-": "gate closed, up negative: positive output, at most 0.28 x |up| (SiLU; 0.17 x |up| for GELU)",
}
LOGIT_SIDES = ("out_normed", "out")
N_LOGITS = 10
MAX_DECODED_RANK = 20
MAX_EXEMPLARS = 20
WINDOW_BEFORE, WINDOW_AFTER = 24, 8


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


PERCENTILES = (50.0, 90.0, 99.0, 99.9, 100.0)


def abs_percentiles(counts: Sequence[int], edges: Sequence[float], abs_max: float | None,
                    qs: Sequence[float] = PERCENTILES) -> dict[float, dict[str, float]]:
    """Percentiles of ``|activation|`` from a signed log-bin histogram (``counts``: 2 * len(edges) + 1 bins).

    For each ``q`` (nearest rank: the smallest value with at least q% of tokens at or below it) the
    result gives the bin that holds it, ``lo`` <= true value <= ``hi`` (exact), and ``value``, a
    log-linear interpolation inside that bin; ``q = 100`` is the exact ``abs_max``.
    """
    m_bins = len(edges)
    c = list(counts)
    mag = [c[m_bins]] + [c[m_bins + m] + c[m_bins - m] for m in range(1, m_bins + 1)]
    n = sum(mag)
    top = float(abs_max) if abs_max is not None and math.isfinite(float(abs_max)) else None
    out: dict[float, dict[str, float]] = {}
    if n == 0:
        return out
    for q in qs:
        if q >= 100.0 and top is not None:
            out[q] = {"value": top, "lo": top, "hi": top}
            continue
        rank = max(1, math.ceil(q / 100.0 * n - 1e-9))
        cum = 0
        for m, k in enumerate(mag):
            if cum + k >= rank:
                break
            cum += k
        lo = 0.0 if m == 0 else float(edges[m - 1])
        hi = float(edges[m]) if m < m_bins else (top if top is not None else float("inf"))
        if top is not None:
            hi, lo = min(hi, top), min(lo, top)
        frac = (rank - cum) / k if k else 1.0
        if lo > 0 and math.isfinite(hi):
            value = lo * (hi / lo) ** frac
        else:
            value = lo + frac * (hi - lo) if math.isfinite(hi) else lo
        out[q] = {"value": value, "lo": lo, "hi": hi}
    return out


def token_spans(tokens: Sequence[Any], acts: Sequence[Any] | None = None, *, focus: int | None = None,
                focus_act: Any = None) -> list[dict[str, Any]]:
    """Tokens as dicts ``{text, act, focus}`` for the ``tokens`` template macro.

    With ``acts`` every token carries its activation; otherwise only the ``focus`` token does.
    Long sequences are cut to a window around ``focus`` (marked by ``{"gap": True}`` items).
    """
    n = len(tokens)
    lo, hi = 0, n
    if focus is not None and n > WINDOW_BEFORE + WINDOW_AFTER + 1:
        lo, hi = max(0, focus - WINDOW_BEFORE), min(n, focus + WINDOW_AFTER + 1)
    out: list[dict[str, Any]] = [{"gap": True}] if lo > 0 else []
    for i in range(lo, hi):
        act = _finite(acts[i]) if acts is not None and i < len(acts) else (_finite(focus_act) if i == focus else None)
        out.append({"text": tokens[i], "act": act, "focus": i == focus, "gap": False})
    if hi < n:
        out.append({"gap": True})
    return out


def _stats(view: AtlasView, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records = view.manifest().get("records", {})
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["record"]), str(r["site"])), []).append(r)
    out = []
    for (rec, site), items in sorted(groups.items()):
        order = {lab: i for i, lab in enumerate((records.get(rec) or {}).get("labels") or [])}
        items.sort(key=lambda r: (r["label"] == ALL_LABEL, order.get(r["label"], len(order)), str(r["label"])))
        total = next((r for r in items if r["label"] == ALL_LABEL), None)
        base_mean = _finite(total["mean"]) if total else None
        base_std = math.sqrt(max(_finite(total["var"]) or 0.0, 0.0)) if total else 0.0
        for r in items:
            var = _finite(r["var"])
            r["std"] = math.sqrt(var) if var is not None and var >= 0 else None
            mean = _finite(r["mean"])
            r["z"] = ((mean - base_mean) / base_std if mean is not None and base_mean is not None and base_std > 0
                      and r["label"] != ALL_LABEL else None)
        chart = bar_chart_svg([("all tokens" if r["label"] == ALL_LABEL else str(r["label"]), _finite(r["mean"]))
                               for r in items], title=f"mean activation per label ({rec}, {site})")
        out.append({"record": rec, "site": site, "rows": items, "chart": chart})
    return out


def _fast_decoded(view: AtlasView) -> Any:
    """Decoded rows from the viewer's in-memory copy (token ids spelled from the cached vocabulary), if any."""
    tokens = view.tokens
    if tokens is None:
        return None

    def rows(layer: int, neuron: int, n_ranks: int) -> list[dict[str, Any]]:
        out = view.rows("SELECT side::VARCHAR AS side, direction::VARCHAR AS direction, rank, tid, score "
                        "FROM _decoded_by_neuron WHERE layer = ? AND neuron = ? AND rank < ? "
                        "ORDER BY side, direction, rank", [layer, neuron, n_ranks])
        for r in out:
            r["token"] = tokens[r.pop("tid")]
        return out
    return rows


def _decoded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sides: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        lst = sides.setdefault(str(r["side"]), {"top": [], "bottom": []}).setdefault(str(r["direction"]), [])
        if len(lst) < MAX_DECODED_RANK:
            lst.append(r)
    order = {s: i for i, s in enumerate(_SIDE_ORDER)}
    return [{"side": s, "name": _SIDE_NAMES.get(s, s), "top": d.get("top", []), "bottom": d.get("bottom", [])}
            for s, d in sorted(sides.items(), key=lambda kv: (order.get(kv[0], 99), kv[0]))]


def _record_exemplars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r["record"]), []).append(r)
    out = []
    for rec, items in groups.items():
        scale = max((abs(v) for v in (_finite(r["activation"]) for r in items) if v is not None), default=0.0)
        for r in items:
            p: dict[str, Any] | None = r["prompt"]
            tokens = list(p["tokens"]) if p and p.get("tokens") is not None else [r["token"]]
            pos = int(r["position"]) if p and p.get("tokens") is not None else 0
            r["label"] = p.get("label") if p else None
            r["spans"] = token_spans(tokens, focus=pos if 0 <= pos < len(tokens) else None,
                                     focus_act=r["activation"])
        out.append({"record": rec, "scale": scale, "rows": items})
    return out


def _corpus_exemplars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    scale = 0.0
    for r in rows:
        for a in list(r["window_acts"] or []) + [r["activation"]]:
            v = _finite(a)
            if v is not None:
                scale = max(scale, abs(v))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        tokens = list(r["window_tokens"] or [])
        start = r["window_start"] if r["window_start"] is not None else 0
        focus = int(r["position"]) - int(start) if r["position"] is not None else None
        r["spans"] = token_spans(tokens, list(r["window_acts"] or []),
                                 focus=focus if focus is not None and 0 <= focus < len(tokens) else None)
        groups.setdefault(str(r["kind"]), []).append(r)
    return [{"kind": k, "rows": groups[k], "scale": scale} for k in sorted(groups, key=lambda k: (k != "top", k))]


def _histograms(view: AtlasView, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per record: the all-token histogram chart, and percentiles of |a| and a small chart per label."""
    records = view.manifest().get("records", {})
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["record"]), str(r["site"])), []).append(r)
    out = []
    for (rec, site), items in sorted(groups.items()):
        meta = (records.get(rec) or {}).get("histogram") or {}
        edges = [float(e) for e in meta.get("edges") or []]
        if not edges:
            continue
        order = {lab: i for i, lab in enumerate((records.get(rec) or {}).get("labels") or [])}
        items.sort(key=lambda r: (r["label"] != ALL_LABEL, order.get(r["label"], len(order)), str(r["label"])))
        labels = []
        for r in items:
            counts = [int(c) for c in (r["counts"] or [])]
            if len(counts) != 2 * len(edges) + 1:
                continue
            pct = abs_percentiles(counts, edges, _finite(r["abs_max"]))
            n = sum(counts)
            name = "all tokens" if r["label"] == ALL_LABEL else str(r["label"])
            labels.append({"label": name, "total": r["label"] == ALL_LABEL, "n": n, "pct": pct,
                           "near_zero": counts[len(edges)] / n if n else None,
                           "chart": histogram_svg(counts, edges, width=560 if r["label"] == ALL_LABEL else 300,
                                                  height=110 if r["label"] == ALL_LABEL else 60,
                                                  title=f"activation histogram: {name}")})
        if labels:
            out.append({"record": rec, "site": site, "labels": labels, "percentiles": PERCENTILES,
                        "bin_factor": edges[1] / edges[0] if len(edges) > 1 else None})
    return out


def _glu(signs: list[dict[str, Any]], exemplars: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per record: tokens and share of each (gate sign, up sign) quadrant, with its top exemplars."""
    ex = {(q["record"], q["quadrant"]): q["rows"] for g in _record_exemplars_by_quadrant(exemplars) for q in g}
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in signs:
        groups.setdefault(str(r["record"]), []).append(r)
    out = []
    for rec, items in sorted(groups.items()):
        total = sum(int(r["n_tokens"] or 0) for r in items)
        quads = []
        for r in sorted(items, key=lambda r: list(QUADRANT_MEANING).index(r["quadrant"])
                        if r["quadrant"] in QUADRANT_MEANING else 9):
            rows = ex.get((rec, str(r["quadrant"])), [])
            quads.append({"quadrant": r["quadrant"], "meaning": QUADRANT_MEANING.get(str(r["quadrant"]), ""),
                          "n": int(r["n_tokens"] or 0), "share": int(r["n_tokens"] or 0) / total if total else None,
                          "rows": rows})
        scale = max((abs(_finite(x["activation"]) or 0.0) for q in quads for x in q["rows"]), default=0.0)
        out.append({"record": rec, "total": total, "quadrants": quads, "scale": scale})
    return out


def _record_exemplars_by_quadrant(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """glu_exemplars rows as token spans, grouped by record then quadrant."""
    by: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for g in _record_exemplars(rows):
        for r in g["rows"]:
            by.setdefault(g["record"], {}).setdefault(str(r["quadrant"]), []).append(r)
    return [[{"record": rec, "quadrant": q, "rows": rs} for q, rs in qs.items()] for rec, qs in by.items()]


def _logits(decoded: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The top and bottom logits of the neuron's output direction (final norm folded in when decoded so)."""
    for side in LOGIT_SIDES:
        d = next((x for x in decoded if x["side"] == side), None)
        if d is not None and (d["top"] or d["bottom"]):
            return {"side": side, "name": d["name"], "top": d["top"][:N_LOGITS], "bottom": d["bottom"][:N_LOGITS]}
    return None


def _selections(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows:
        r["key"] = concept_key(str(r["concept"]))
    return rows


def neuron_context(view: AtlasView, layer: int, neuron: int, *, live: bool = False) -> dict[str, Any]:
    """Everything the neuron page shows (raises NotFound for a neuron outside the atlas).

    ``live``: the server has a model, so the page gets the "try your own text" box."""
    view.check_neuron(layer, neuron)
    dims = view.dims() or (0, 0)
    raw = neuron_sections(view, layer, neuron, n_decoded=MAX_DECODED_RANK, n_exemplars=MAX_EXEMPLARS,
                          decoded_rows=_fast_decoded(view))
    decoded = _decoded(raw["decoded"])
    sections = {
        "stats": _stats(view, raw["stats"]),
        "histograms": _histograms(view, raw["histograms"]),
        "glu": _glu(raw["glu_signs"], raw["glu_exemplars"]),
        "decoded": decoded,
        "exemplars": _record_exemplars(raw["exemplars"]),
        "corpus": _corpus_exemplars(raw["corpus"]),
        "explanations": raw["explanations"],
        "selections": _selections(raw["selections"]),
    }
    prev = (layer, neuron - 1) if neuron > 0 else ((layer - 1, dims[1] - 1) if layer > 0 else None)
    nxt = (layer, neuron + 1) if neuron + 1 < dims[1] else ((layer + 1, 0) if layer + 1 < dims[0] else None)
    missing = [name for name, key in (("statistics", "stats"), ("activation histograms", "histograms"),
                                      ("decoded tokens", "decoded"),
                                      ("record exemplars", "exemplars"), ("corpus exemplars", "corpus"),
                                      ("explanations", "explanations"), ("selections", "selections"))
               if not view.has(SECTIONS[key].name)]
    return {"atlas": view, "slug": view.slug, "layer": layer, "neuron": neuron, "dims": dims, "sections": sections,
            "logits": _logits(decoded), "live": live, "live_max_chars": MAX_LIVE_CHARS,
            "prev": prev, "next": nxt, "missing": missing, "title": NeuronId(layer, neuron).url_path(),
            "empty": not any(sections.values())}
