"""HTML for the decomposition: a prompt's tokens shaded by contribution, a circuit as a layered SVG graph.

Pure rendering (no torch), so the web viewer can use it on stored JSON.

    >>> from neuronatlas.report.decompose_html import token_spans, circuit_svg
    >>> "background" in token_spans(["The", " cat"], [0.5, -1.0])
    True
    >>> circuit_svg({"components": ["L0.head:1", "L1.mlp"], "scores": {"L0.head:1": 1.0, "L1.mlp": 2.0}}).startswith("<svg")
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

__all__ = ["token_spans", "circuit_svg", "circuit_findings", "write_decompose_html", "write_circuit_html"]

_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
          ".tok{padding:2px 1px;border-radius:3px;font-family:monospace;font-size:1.2em;white-space:pre}"
          "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}"
          ".note{color:#666}")


def _shade(value: float, scale: float) -> str:
    a = 0.0 if scale <= 0 else min(abs(value) / scale, 1.0)
    rgb = "220,50,47" if value < 0 else "38,139,210"
    return f"rgba({rgb},{a:.3f})"


def _show(token: str) -> str:
    return token.replace("Ġ", " ").replace("Ċ", "\\n").replace("▁", " ")


def token_spans(tokens: Sequence[str], values: Sequence[float], stable: Sequence[bool] | None = None) -> str:
    """Each token in a span shaded blue (positive) or red (negative) by |value| / max |value|."""
    ok = list(stable) if stable is not None else [True] * len(tokens)
    scale = max((abs(v) for v, s in zip(values, ok) if s), default=0.0)
    spans = []
    for tok, value, good in zip(tokens, values, ok):
        title = f"{value:+.4g}" if good else f"{value:+.4g} (unstable: rel and irrel cancel)"
        style = f"background:{_shade(value, scale)}" if good else "background:#eee;text-decoration:line-through"
        spans.append(f'<span class="tok" style="{style}" title="{escape(title)}">{escape(_show(tok))}</span>')
    return "".join(spans)


def _layer_of(name: str) -> int:
    return int(name[1:].split(".")[0].split(":")[0])


def circuit_svg(circuit: Mapping[str, Any], *, width: int = 900) -> str:
    """Components as nodes in rows by layer (input at the bottom, logits at the top); each node's
    area follows its contribution; edges join every node to the nodes of the next occupied layer."""
    comps: list[str] = list(circuit.get("components", []))
    scores: Mapping[str, float] = circuit.get("scores", {})
    layers = sorted({_layer_of(c) for c in comps})
    row_h, top = 56, 40
    height = top * 2 + row_h * (len(layers) + 1)
    y_of = {layer: height - top - row_h * (i + 1) for i, layer in enumerate(layers)}
    biggest = max((abs(scores.get(c, 0.0)) for c in comps), default=1.0) or 1.0
    pos: dict[str, tuple[float, float]] = {}
    for layer in layers:
        row = [c for c in comps if _layer_of(c) == layer]
        for i, c in enumerate(row):
            pos[c] = (120 + (width - 160) * (i + 0.5) / len(row), y_of[layer])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">']
    logit_y, embed_y = top / 2 + 4, height - top / 2
    parts.append(f'<text x="{width / 2}" y="{logit_y}" text-anchor="middle" font-weight="bold">logit difference</text>')
    parts.append(f'<text x="{width / 2}" y="{embed_y}" text-anchor="middle" font-weight="bold">input tokens</text>')
    for i, layer in enumerate(layers):
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        for a in (c for c in comps if _layer_of(c) == layer):
            x1, y1 = pos[a]
            targets = [pos[b] for b in comps if nxt is not None and _layer_of(b) == nxt] or [(width / 2, logit_y + 6)]
            for x2, y2 in targets:
                parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#bbb" stroke-width="0.7"/>')
    for layer in layers:
        parts.append(f'<text x="8" y="{y_of[layer] + 4}" fill="#666">L{layer}</text>')
    for c in comps:
        x, y = pos[c]
        s = scores.get(c, 0.0)
        r = 5 + 13 * (abs(s) / biggest) ** 0.5
        fill = "#268bd2" if ".head" in c else "#2aa198"
        parts.append(f'<g><title>{escape(c)}: {s:+.4g}</title><circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" '
                     f'fill="{fill}" fill-opacity="0.8"/><text x="{x:.1f}" y="{y + r + 11:.1f}" '
                     f'text-anchor="middle">{escape(c)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>")


def _write(path: str | Path, text: str) -> Path:
    from neuronatlas.store.atlas import atomic_path

    target = Path(path)
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return target


def write_decompose_html(path: str | Path, result: Mapping[str, Any]) -> Path:
    """The ``neuronatlas decompose`` result as a page: shaded prompt, token and component tables."""
    tok = result["tokens"]
    rows = "".join(f"<tr><td>{escape(_show(t['token']))}</td><td>{t['rel']:+.4g}</td><td>{t['share']:+.3f}</td><td></td></tr>"
                   if t["stable"] else f"<tr><td>{escape(_show(t['token']))}</td><td>–</td><td>–</td>"
                   "<td>unstable: rel and irrel cancel</td></tr>" for t in tok)
    comp_rows = "".join(f"<tr><td>{escape(c['name'])}</td><td>{c['rel']:+.4g}</td><td>{c['share']:+.3f}</td></tr>"
                        for c in result["components"])
    what = ("the neuron's activation" if result.get("target_kind") == "neuron" else
            f"the target's logit{' minus the foil' if result.get('foil') else ''}")
    body = (f"<p>Target {escape(repr(result['target']))} at the last token; value {result['total']:+.4g} "
            f"({escape(what)}). Blue tokens raise it, red tokens lower it; hover for the number.</p>"
            f"<p>{token_spans([t['token'] for t in tok], [t['rel'] for t in tok], [t['stable'] for t in tok])}</p>"
            f"<p class='note'>Interaction (total minus the sum of single-token parts): "
            f"{'n/a (a token is unstable)' if result['interaction'] is None else format(result['interaction'], '+.4g')}.</p>"
            f"<h2>Tokens</h2><table><tr><th>token</th><th>rel</th><th>share</th><th></th></tr>{rows}</table>"
            f"<h2>Top components</h2><table><tr><th>component</th><th>rel</th><th>share</th></tr>{comp_rows}</table>")
    return _write(path, _page(f"Contextual decomposition: {result['prompt']}", body))


def write_circuit_html(path: str | Path, circuit: Mapping[str, Any]) -> Path:
    return _write(path, _page(f"Circuit: {circuit.get('name', '')}", circuit_summary_html(circuit) + circuit_svg(circuit)))


def _p(value: Any) -> str:
    return "–" if value is None else f"{float(value):.3f}"


def circuit_findings(circuit: Mapping[str, Any]) -> dict[str, str]:
    """The circuit's results as sentences computed from its numbers (the viewer shows them)."""
    rand = circuit.get("random_faithfulness") or []
    mean_rand = sum(rand) / len(rand) if rand else None
    faith = circuit.get("faithfulness")
    out = {"circuit": f"{len(circuit.get('components', []))} components carry {circuit.get('explained_share', 0):.3f} of "
                      f"the logit difference (asked: {circuit.get('share', 0):.2f}; reached: {circuit.get('reached')}): "
                      + ", ".join(circuit.get("components", []))}
    if faith is not None:
        out["sufficiency"] = (f"faithfulness ({circuit.get('ablation')} ablation of everything else): {faith:.3f}; "
                              f"random circuits of the same size: {'–' if mean_rand is None else f'{mean_rand:.3f}'} "
                              f"(n={len(rand)}, p={_p(circuit.get('random_p'))}); empty circuit: "
                              f"{circuit.get('empty_faithfulness', 0):.3f}")
    if circuit.get("necessity") is not None:
        rn = circuit.get("random_necessity") or []
        out["necessity"] = (f"the circuit alone ablated keeps {circuit['necessity']:.3f} of the logit difference; "
                            f"random circuits: {sum(rn) / len(rn) if rn else float('nan'):.3f} "
                            f"(p={_p(circuit.get('necessity_p'))})")
    out["facts"] = (f"{len(circuit.get('facts', []))} facts; mean clean logit difference "
                    f"{circuit.get('clean_logit_diff', 0):.3f}")
    if circuit.get("unstable"):
        out["unstable"] = "left out of the ranking (rel and irrel cancel): " + ", ".join(circuit["unstable"])
    return out


def circuit_summary_html(circuit: Mapping[str, Any]) -> str:
    return "<ul>" + "".join(f"<li>{escape(v)}</li>" for v in circuit_findings(circuit).values()) + "</ul>"
