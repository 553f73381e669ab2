"""A steering sweep: generate under every (layer, alpha) at once and score each cell for the
concept and for fluency.

    >>> from neuronatlas.directions import load_directions, steering_sweep, probe_scorer
    >>> ds = load_directions("joy.npz")                                          # doctest: +SKIP
    >>> result = steering_sweep(lm, prompts, ds, layers=[6, 12], alphas=[0, 4, 8],
    ...                         score=probe_scorer(lm, ds))                      # doctest: +SKIP
    >>> result.cells[0]                                                         # doctest: +SKIP

Every (layer, alpha) is one condition of one batched generation (the baseline, alpha 0, is
generated once). Concept expression: ``score(texts)`` gives each continuation a score in [0, 1]
(any classifier that is not the steered run itself: :func:`probe_scorer` reads the continuation
with the unsteered model and applies the direction's probe); a continuation expresses the concept
when its score exceeds ``threshold``. Fluency: perplexity of the continuation under the unsteered
model given its prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from neuronatlas.directions.capture import capture
from neuronatlas.directions.fit import DirectionSet
from neuronatlas.errors import DatasetError
from neuronatlas.intervene.interventions import Condition
from neuronatlas.models.loading import LoadedModel

__all__ = ["SweepCell", "SweepResult", "steering_sweep", "probe_scorer", "continuation_perplexity",
           "plot_sweep"]

Scorer = Callable[[list[str]], Sequence[float]]


@dataclass
class SweepCell:
    layer: int | None          # None: the unsteered baseline
    alpha: float
    concept_rate: float        # share of continuations whose score exceeds the threshold
    concept_score: float       # mean score
    perplexity: float          # of the continuations under the unsteered model
    examples: list[str] = field(default_factory=list)


@dataclass
class SweepResult:
    concept: str
    space: str
    alpha_unit: str
    baseline: SweepCell
    cells: list[SweepCell]
    continuations: dict[str, list[str]]      # "L12@8" -> one continuation per prompt

    def as_dict(self) -> dict[str, Any]:
        return {"concept": self.concept, "space": self.space, "alpha_unit": self.alpha_unit,
                "baseline": asdict(self.baseline),
                "cells": [asdict(c) for c in self.cells], "continuations": self.continuations}


def probe_scorer(lm: LoadedModel, ds: DirectionSet, layer: int | None = None) -> Scorer:
    """Score texts by the direction's own probe at ``layer`` (default its best held-out layer),
    reading each text with the unsteered model: 1 above the threshold, 0 below."""
    chosen = ds.best_layer() if layer is None else int(layer)
    k = ds.layers.index(chosen)

    def score(texts: list[str]) -> list[float]:
        keep = [i for i, t in enumerate(texts) if t.strip()]
        out = [0.0] * len(texts)
        if keep:
            acts = capture(lm, [texts[i] for i in keep], space=ds.space, layers=[chosen], pool=ds.pool)  # type: ignore[arg-type]
            proj = acts[:, 0] @ ds.vectors[k]
            for i, p in zip(keep, proj.tolist()):
                out[i] = 1.0 if p > ds.threshold[k] else 0.0
        return out

    return score


def continuation_perplexity(lm: LoadedModel, prompts: Sequence[str], continuations: Sequence[str]) -> float:
    """exp(mean NLL per token) of the continuations given their prompts, unsteered; NaN if all are empty."""
    from neuronatlas.evaluate import target_logprobs

    keep = [i for i, c in enumerate(continuations) if c.strip()]
    if not keep:
        return math.nan
    scores = target_logprobs(lm, [prompts[i] for i in keep], [continuations[i] for i in keep])
    tokens = float(scores.n_tokens.sum())
    return math.exp(-float(scores.logprob[0].sum()) / tokens) if tokens else math.nan


def steering_sweep(lm: LoadedModel, prompts: Sequence[str], ds: DirectionSet, *, layers: Sequence[int],
                   alphas: Sequence[float], score: Scorer, alpha_unit: str = "raw", threshold: float = 0.5,
                   max_new_tokens: int = 20,
                   position: str = "all", batched: bool = True, batch_size: int = 16, max_rows: int = 128,
                   n_examples: int = 3, progress: Callable[[str, int, int], None] | None = None) -> SweepResult:
    """Generate under every (layer, alpha) and the baseline; see the module docstring.

    ``alpha_unit``: ``raw`` (activation units along the unit vector) or ``norm`` (multiples of each
    layer's mean activation norm, so one grid means the same relative strength at every layer);
    the cells report alphas in that unit. ``batched=False`` generates one condition at a time (the
    same texts; the benchmark's baseline).
    """
    from neuronatlas.evaluate import generate

    if not prompts:
        raise DatasetError("a steering sweep needs at least one prompt")
    if not layers or not alphas:
        raise DatasetError("give at least one layer and one alpha to sweep")
    if alpha_unit not in ("raw", "norm"):
        raise DatasetError(f"unknown alpha unit {alpha_unit!r}; choose raw or norm")
    unit = {int(layer): ds.mean_norm[ds._index(layer)] if alpha_unit == "norm" else 1.0 for layer in layers}
    grid = [(int(layer), float(alpha)) for layer in layers for alpha in alphas if alpha != 0]
    conds: list[Condition] = [()]
    conds += [(ds.steer(layer, alpha * unit[layer], position=position),) for layer, alpha in grid]  # type: ignore[arg-type]
    if batched:
        texts = generate(lm, prompts, conditions=conds, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         max_rows=max_rows)
    else:
        texts = []
        for i, cond in enumerate(conds):
            texts.append(generate(lm, prompts, conditions=[cond], max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)[0])
            if progress:
                progress("generate", i + 1, len(conds))
    cells: list[SweepCell] = []
    for c, conts in enumerate(texts):
        scores = [float(s) for s in score(list(conts))]
        layer, alpha = (None, 0.0) if c == 0 else grid[c - 1]
        cells.append(SweepCell(layer=layer, alpha=alpha, concept_rate=sum(s > threshold for s in scores) / len(scores),
                               concept_score=sum(scores) / len(scores),
                               perplexity=continuation_perplexity(lm, prompts, conts), examples=list(conts[:n_examples])))
        if progress:
            progress("score", c + 1, len(texts))
    by_cell = {key: cell for key, cell in zip(grid, cells[1:])}
    # alpha 0 at any layer is the baseline itself
    full = [replace(cells[0], layer=int(layer)) if alpha == 0 else by_cell[(int(layer), float(alpha))]
            for layer in layers for alpha in alphas]
    names = ["baseline"] + [f"L{layer}@{alpha:g}" for layer, alpha in grid]
    return SweepResult(concept=ds.concept, space=ds.space, alpha_unit=alpha_unit, baseline=cells[0], cells=full,
                       continuations=dict(zip(names, [list(t) for t in texts])))


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Concept rate and perplexity against alpha, one line per layer."""
    from neuronatlas.report.plots import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    layers = sorted({c.layer for c in result.cells if c.layer is not None})
    for layer in layers:
        cells = sorted((c for c in result.cells if c.layer == layer), key=lambda c: c.alpha)
        xs = [c.alpha for c in cells]
        axes[0].plot(xs, [c.concept_rate for c in cells], marker="o", label=f"L{layer}")
        axes[1].plot(xs, [c.perplexity for c in cells], marker="o", label=f"L{layer}")
    axes[0].axhline(result.baseline.concept_rate, color="grey", ls="--", lw=1, label="unsteered")
    axes[1].axhline(result.baseline.perplexity, color="grey", ls="--", lw=1)
    xlabel = "alpha (x layer norm)" if result.alpha_unit == "norm" else "alpha"
    axes[0].set(xlabel=xlabel, ylabel=f"'{result.concept}' rate", title="concept expression", ylim=(-0.02, 1.02))
    axes[1].set(xlabel=xlabel, ylabel="perplexity (unsteered model)", title="fluency", yscale="log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Steering along '{result.concept}' ({result.space})")
    return _save(fig, path)
