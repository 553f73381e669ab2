"""Plots for study reports (matplotlib, Agg backend, PNG). Readers only read: no torch here.

    >>> from neuronatlas.report.plots import line_with_bands, heatmap, layer_histogram
    >>> line_with_bands("cum.png", [1, 5, 10], {"relation": ([0.9, 0.5, 0.2], None, None)},
    ...                 xlabel="% deactivated", ylabel="accuracy", title="Cumulativity")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["line_with_bands", "heatmap", "layer_histogram", "bars", "scatter"]

Series = tuple[Sequence[float], Sequence[float] | None, Sequence[float] | None]


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:  # type: ignore[no-untyped-def]
    from neuronatlas.store.atlas import atomic_path

    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return target


def line_with_bands(path: str | Path, x: Sequence[float], series: Mapping[str, Series], *, xlabel: str,
                    ylabel: str, title: str, logx: bool = False, dashed: Sequence[str] = (), paired: bool = False) -> Path:
    """One line per series with an optional (lo, hi) band; names in ``dashed`` are drawn dashed.
    ``paired``: a dashed series takes the colour of the solid series with the same first word
    (``"pc1 shuffled"`` that of ``"pc1 (5% var)"``), so a control sits beside its condition."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors: dict[str, str] = {}
    for name in series:
        if not (paired and name in dashed):
            colors[name] = f"C{len(colors) % 10}"
    by_word = {n.split()[0]: c for n, c in colors.items() if n.split()}
    for i, (name, (mean, lo, hi)) in enumerate(series.items()):
        color = colors.get(name) or by_word.get(name.split()[0] if name.split() else "", f"C{i % 10}")
        ax.plot(x, mean, marker="o", ms=3, label=name, color=color, ls="--" if name in dashed else "-")
        if lo is not None and hi is not None:
            ax.fill_between(x, lo, hi, alpha=0.2, color=color)
    finite = any(np.isfinite(np.asarray(m, dtype=float)).any() for m, _, _ in series.values())
    if not finite:
        ax.text(0.5, 0.5, "no data (no known facts to evaluate)", ha="center", va="center", transform=ax.transAxes)
    elif logx and min(x) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    return _save(fig, path)


def heatmap(path: str | Path, matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str,
            cmap: str = "viridis", center: float | None = None, fmt: str = "{:.2f}", xlabel: str = "",
            ylabel: str = "") -> Path:
    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * max(4, len(cols)), 1.0 + 0.45 * max(4, len(rows))))
    kwargs = {}
    if center is not None:
        span = np.nanmax(np.abs(m - center)) if np.isfinite(m).any() else 1.0
        kwargs = {"vmin": center - span, "vmax": center + span}
    im = ax.imshow(m, cmap=cmap, aspect="auto", **kwargs)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6, color="w" if kwargs else "k")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def layer_histogram(path: str | Path, counts: Mapping[str, Sequence[int]], *, title: str,
                    ylabel: str = "selected neurons") -> Path:
    """Stacked bars: per layer, how many selected neurons each concept has."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    bottom: np.ndarray | None = None
    for i, (name, c) in enumerate(counts.items()):
        arr = np.asarray(c, dtype=float)
        ax.bar(np.arange(len(arr)), arr, bottom=bottom, label=name, color=f"C{i % 10}" if i < 10 else None)
        bottom = arr if bottom is None else bottom + arr
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def bars(path: str | Path, labels: Sequence[str], values: Mapping[str, Sequence[float]], *, title: str,
         ylabel: str, errors: Mapping[str, Sequence[float]] | None = None) -> Path:
    """Grouped bars: one group per label, one bar per series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(labels) * max(1, len(values)) / 2, 3.8))
    width = 0.8 / max(1, len(values))
    for i, (name, vals) in enumerate(values.items()):
        err = None if errors is None else errors.get(name)
        ax.bar(np.arange(len(labels)) + i * width, vals, width, yerr=err, label=name, capsize=2)
    ax.set_xticks(np.arange(len(labels)) + width * (len(values) - 1) / 2, labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def scatter(path: str | Path, x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *, title: str, xlabel: str, ylabel: str,
            groups: Sequence[str] | None = None, diagonal: bool = True) -> Path:
    """A scatter of ``y`` against ``x`` (coloured by ``groups`` when given), with the y = x line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    names = list(dict.fromkeys(groups)) if groups is not None else [""]
    for i, name in enumerate(names):
        m = np.array([g == name for g in groups]) if groups is not None else np.ones(xs.size, dtype=bool)
        ax.scatter(xs[m], ys[m], s=14, alpha=0.75, color=f"C{i % 10}", label=name or None)
    if diagonal and xs.size:
        lo, hi = float(np.nanmin([xs.min(), ys.min()])), float(np.nanmax([xs.max(), ys.max()]))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if groups is not None and len(names) <= 12:
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)
