"""Rendering helpers: jinja2 templates, links for the server and the static export, SVG, token colours.

Pages link through a *linker*, so one template serves both the live server (absolute URLs with
query strings) and the static export (relative ``.html`` paths; a link to a page that was not
exported comes back as ``None`` and the template prints plain text instead).

    >>> from neuronatlas.web.render import ServerLinker, render
    >>> html = render("error.html", {"title": "404 Not Found", "status": 404, "reason": "Not Found",
    ...                               "message": "no such neuron"}, ServerLinker())
    >>> bar_chart_svg([("capital", 0.8), ("animal", -0.1)])      # an inline <svg> (markupsafe.Markup)
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from markupsafe import Markup, escape

from neuronatlas.ids import NeuronId
from neuronatlas.web.data import concept_key

__all__ = ["ServerLinker", "StaticLinker", "render", "bar_chart_svg", "layer_chart_svg", "histogram_svg", "display_token",
           "act_style", "fmt", "static_path", "TEMPLATES", "STATIC"]

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


# --- links ------------------------------------------------------------------------------------------
class ServerLinker:
    """Absolute URLs of the live server."""

    static = False

    def _q(self, path: str, **params: Any) -> str:
        params = {k: v for k, v in params.items() if v is not None and v != "" and not (k == "page" and v == 1)}
        return path + ("?" + urlencode(params) if params else "")

    def home(self) -> str:
        return "/"

    def asset(self, name: str) -> str:
        return f"/static/{name}"

    def atlas(self, slug: str) -> str:
        return f"/a/{slug}"

    def heatmap(self, slug: str, page: int = 1, study: str | None = None, method: str | None = None) -> str | None:
        return self._q(f"/a/{slug}/heatmap", study=study, method=method, page=page)

    def concept(self, slug: str, key: str, page: int = 1, layer: int | None = None,
                study: str | None = None, method: str | None = None) -> str | None:
        return self._q(f"/a/{slug}/concept/{quote(key)}", layer=layer, study=study, method=method, page=page)

    def neuron(self, slug: str, layer: int, neuron: int) -> str | None:
        return f"/a/{slug}/neuron/{NeuronId(layer, neuron).url_path()}"

    def search(self, slug: str, q: str = "", kind: str = "token", page: int = 1, **filters: Any) -> str | None:
        return self._q(f"/a/{slug}/search", q=q, kind=kind, page=page, **filters)

    def study(self, slug: str, study: str) -> str | None:
        return f"/a/{slug}/study/{study}"

    def study_file(self, slug: str, study: str, name: str) -> str | None:
        return f"/a/{slug}/study/{study}/files/{quote(name)}"

    def live(self, slug: str, layer: int, neuron: int) -> str | None:
        return f"/a/{slug}/neuron/{NeuronId(layer, neuron).url_path()}/live"

    def features(self, slug: str, layer: int | None = None) -> str | None:
        return self._q(f"/a/{slug}/features", layer=layer)

    def feature(self, slug: str, layer: int, feature: int) -> str | None:
        return f"/a/{slug}/feature/L{int(layer)}/{int(feature)}"


def static_path(kind: str, slug: str = "", **p: Any) -> str:
    """The file path (relative to the export root) of one exported page."""
    if kind == "home":
        return "index.html"
    if kind == "asset":
        return f"static/{p['name']}"
    base = f"a/{slug}"
    if kind == "atlas":
        return f"{base}/index.html"
    if kind == "heatmap":
        return f"{base}/heatmap.html" if p.get("page", 1) == 1 else f"{base}/heatmap+p{p['page']}.html"
    if kind == "concept":
        name = p["key"] + (f"+L{p['layer']}" if p.get("layer") is not None else "")
        name += f"+p{p['page']}" if p.get("page", 1) != 1 else ""
        return f"{base}/concept/{name}.html"
    if kind == "neuron":
        return f"{base}/neuron/{NeuronId(p['layer'], p['neuron']).url_path()}.html"
    if kind == "study":
        return f"{base}/study/{p['study']}/index.html"
    if kind == "study_file":
        return f"{base}/study/{p['study']}/files/{p['name']}"
    if kind == "search":  # exported token searches only
        key = concept_key(str(p["q"]).strip().lower() or "empty")
        return f"{base}/search/token-{key}" + (f"+p{p['page']}" if p.get("page", 1) != 1 else "") + ".html"
    raise ValueError(f"unknown page kind {kind!r}")


class StaticLinker:
    """Relative links between the files of a static export; ``None`` for pages that were not exported.

    ``neurons`` maps slug -> set of exported (layer, neuron); None means every neuron was exported.
    ``searches`` maps slug -> the decoded-token searches that were exported.
    """

    static = True

    def __init__(self, here: str, neurons: dict[str, set[tuple[int, int]]] | None = None,
                 searches: dict[str, list[str]] | None = None) -> None:
        self.here = here
        self.neurons = neurons
        self.searches = searches or {}

    def _rel(self, target: str) -> str:
        return quote(posixpath.relpath(target, posixpath.dirname(self.here) or "."), safe="/+~")

    def home(self) -> str:
        return self._rel(static_path("home"))

    def asset(self, name: str) -> str:
        return self._rel(static_path("asset", name=name))

    def atlas(self, slug: str) -> str:
        return self._rel(static_path("atlas", slug))

    def heatmap(self, slug: str, page: int = 1, study: str | None = None, method: str | None = None) -> str | None:
        return None if study or method else self._rel(static_path("heatmap", slug, page=page))

    def concept(self, slug: str, key: str, page: int = 1, layer: int | None = None,
                study: str | None = None, method: str | None = None) -> str | None:
        if study or method:
            return None
        return self._rel(static_path("concept", slug, key=key, page=page, layer=layer))

    def neuron(self, slug: str, layer: int, neuron: int) -> str | None:
        if self.neurons is not None and (layer, neuron) not in self.neurons.get(slug, set()):
            return None
        return self._rel(static_path("neuron", slug, layer=layer, neuron=neuron))

    def search(self, slug: str, q: str = "", kind: str = "token", page: int = 1, **filters: Any) -> str | None:
        plain = all(v in (None, "") or (k == "match" and v == "exact") for k, v in filters.items())
        if kind == "token" and plain and q in self.searches.get(slug, []):
            return self._rel(static_path("search", slug, q=q, page=page))
        return None

    def study(self, slug: str, study: str) -> str | None:
        return self._rel(static_path("study", slug, study=study))

    def study_file(self, slug: str, study: str, name: str) -> str | None:
        return self._rel(static_path("study_file", slug, study=study, name=name))

    def live(self, slug: str, layer: int, neuron: int) -> str | None:
        return None  # a static export has no model

    def features(self, slug: str, layer: int | None = None) -> str | None:
        return None  # feature pages are served only (not exported)

    def feature(self, slug: str, layer: int, feature: int) -> str | None:
        return None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# --- formatting -------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-unicode table (byte-level BPE token spelling)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def display_token(token: Any) -> str:
    """A tokenizer's spelling of a token as readable text (byte-level 'Ġ' and SentencePiece '▁' undone).

    Partial UTF-8 bytes and control characters are shown as escapes (``\\xe2``), newlines as '↵'.
    """
    if token is None:
        return ""
    tok = str(token)
    dec = _byte_decoder()
    if tok and all(ch in dec for ch in tok):
        raw = bytes(dec[ch] for ch in tok)
        try:
            tok = raw.decode("utf-8")
        except UnicodeDecodeError:
            if any(ord(ch) >= 256 for ch in tok):
                tok = raw.decode("utf-8", errors="backslashreplace")
    tok = tok.replace("▁", " ").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", tok)


def token_chip(token: Any) -> str:
    """A token for lists: leading/trailing spaces made visible as '·'."""
    text = display_token(token)
    stripped = text.strip(" ")
    if not stripped:
        return "·" * len(text) if text else "∅"
    lead = len(text) - len(text.lstrip(" "))
    trail = len(text) - len(text.rstrip(" "))
    return "·" * lead + stripped + "·" * trail


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` significant digits; None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return f"{value:.{digits}g}"
    return str(value)


def act_style(value: Any, scale: Any) -> str:
    """Inline CSS colouring an activation relative to ``scale`` (orange positive, blue negative)."""
    try:
        v, s = float(value), float(scale)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(v) or not math.isfinite(s) or s <= 0:
        return ""
    a = min(1.0, abs(v) / s)
    if a < 0.02:
        return ""
    rgb = "255,122,0" if v > 0 else "40,110,255"
    return f"background-color: rgba({rgb},{0.08 + 0.77 * a:.2f})"


# --- SVG charts -------------------------------------------------------------------------------------
def bar_chart_svg(items: Sequence[tuple[str, float | None]], width: int = 440, title: str = "") -> Markup:
    """A horizontal bar chart of (label, value) with a zero line; negative values go left."""
    vals = [float(v) for _, v in items if v is not None and math.isfinite(float(v))]
    if not vals:
        return Markup("")
    row, label_w, value_w = 18, 120, 70
    plot_w = width - label_w - value_w
    lo, hi = min(0.0, *vals), max(0.0, *vals)
    span = (hi - lo) or 1.0
    x0 = label_w + plot_w * (-lo / span)
    height = row * len(items) + 8
    parts = [(f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
              f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>')]
    for i, (label, v) in enumerate(items):
        y = 4 + i * row
        text = escape(str(label)[:18])
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" class="lbl">{text}</text>')
        if v is None or not math.isfinite(float(v)):
            continue
        w = abs(float(v)) / span * plot_w
        x = x0 if v >= 0 else x0 - w
        cls = "pos" if v >= 0 else "neg"
        parts.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{max(w, 0.5):.1f}" height="{row - 5}" class="{cls}">'
                     f'<title>{text}: {escape(fmt(float(v)))}</title></rect>')
        parts.append(f'<text x="{label_w + plot_w + 6}" y="{y + 13}" class="val">{escape(fmt(float(v), 3))}</text>')
    parts.append(f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="2" y2="{height - 2}" class="axis"/></svg>')
    return Markup("".join(parts))


def layer_chart_svg(counts: dict[int, int], n_layers: int, links: dict[int, str | None] | None = None,
                    width: int = 520, height: int = 110) -> Markup:
    """Vertical bars: how many neurons per layer (each bar a link when ``links`` gives one)."""
    if n_layers <= 0 or not counts:
        return Markup("")
    top = max(counts.values()) or 1
    bw = min((width - 30) / n_layers, 36.0)
    parts = [(f'<svg class="chart" role="img" width="{width}" height="{height + 18}" viewBox="0 0 {width} '
              f'{height + 18}" xmlns="http://www.w3.org/2000/svg"><title>neurons per layer</title>')]
    for layer in range(n_layers):
        c = counts.get(layer, 0)
        h = (height - 10) * c / top
        x = 25 + layer * bw
        bar = (f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}" class="pos">'
               f'<title>layer {layer}: {c} neurons</title></rect>')
        url = (links or {}).get(layer)
        parts.append(f'<a href="{escape(url)}">{bar}</a>' if url and c else bar)
        if n_layers <= 40 or layer % 5 == 0:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{height + 13}" text-anchor="middle" class="tick">{layer}</text>')
    parts.append(f'<text x="0" y="12" class="tick">{top}</text>'
                 f'<line x1="24" x2="{width}" y1="{height}" y2="{height}" class="axis"/></svg>')
    return Markup("".join(parts))


def _sci(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def histogram_svg(counts: Sequence[int], edges: Sequence[float], width: int = 560, height: int = 120,
                  title: str = "") -> Markup:
    """Bars of a signed log-bin histogram (negative bins left, |a| < edges[0] in the middle); bar height
    is log10(1 + count), each bar's tooltip gives its range and exact count."""
    m = len(edges)
    n_bins = 2 * m + 1
    if len(counts) != n_bins or not any(counts):
        return Markup("")
    top = math.log10(1 + max(counts))
    bw = (width - 20) / n_bins
    parts = [(f'<svg class="chart hist" role="img" width="{width}" height="{height + 30}" viewBox="0 0 {width} '
              f'{height + 30}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>')]
    for j, c in enumerate(counts):
        if c <= 0:
            continue
        k = j - m
        a = abs(k)
        lo = 0.0 if a == 0 else float(edges[a - 1])
        hi = float(edges[a]) if a < m else math.inf
        if k == 0:
            rng, cls = f"|a| < {_sci(edges[0])}", "zero"
        else:
            mag = f"[{_sci(lo)}, {_sci(hi)})" if math.isfinite(hi) else f"≥ {_sci(lo)}"
            rng, cls = (f"a in {mag}" if k > 0 else f"-a in {mag}"), ("pos" if k > 0 else "neg")
        h = (height - 6) * math.log10(1 + c) / top if top > 0 else 0
        x = 10 + j * bw
        parts.append(f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}" '
                     f'class="{cls}"><title>{escape(rng)}: {c:,} tokens</title></rect>')
    for a_tick in range(0, m + 1, 4):
        for sign in ((1, -1) if a_tick else (1,)):
            j = m + sign * a_tick
            x = 10 + (j + 0.5) * bw
            label = "0" if a_tick == 0 else ("" if sign > 0 else "-") + _sci(float(edges[a_tick - 1]))
            parts.append(f'<text x="{x:.1f}" y="{height + 13}" text-anchor="middle" class="tick">{label}</text>')
    parts.append(f'<text x="{width / 2:.0f}" y="{height + 27}" text-anchor="middle" class="tick">activation '
                 f'(log-spaced bins of |a|, sign kept; bar height: log count)</text>'
                 f'<line x1="10" x2="{width - 10}" y1="{height}" y2="{height}" class="axis"/></svg>')
    return Markup("".join(parts))


def page_window(page: int, pages: int, radius: int = 2) -> list[int | None]:
    """Page numbers to show in a pager: first, last and ``radius`` around ``page``; None marks a gap."""
    keep = sorted({1, pages, *range(max(1, page - radius), min(pages, page + radius) + 1)})
    out: list[int | None] = []
    for p in keep:
        if out and p - (out[-1] or 0) > 1:
            out.append(None)
        out.append(p)
    return out


# --- templates --------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _env() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, tok=display_token, chip=token_chip, act=act_style)
    env.globals.update(page_window=page_window, concept_key=concept_key)
    return env


def render(template: str, context: dict[str, Any], linker: ServerLinker | StaticLinker) -> str:
    """Render ``template`` with ``context`` plus the ``link`` helper."""
    return str(_env().get_template(template).render(**context, link=linker))
