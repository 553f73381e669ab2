"""Causal steering with an SNMF feature, a difference-in-means direction and top single neurons, at matched norm.

For a concept given as positive and negative texts and one layer ``L``, three unit vectors in the
residual stream after layer ``L`` (what layer ``L``'s MLP writes to):

* ``feature``: the output direction ``W_down @ w_f`` of the SNMF feature whose mean code
  separates the classes best (standardised mean difference of per-text mean codes);
* ``mean_diff``: the difference-in-means direction of the pooled residual stream
  (:func:`neuronatlas.directions.fit_direction`);
* ``neurons``: the ``n_neurons`` neurons of layer ``L`` with the largest standardised mean
  difference, their down-projection columns summed with weights = their mean difference.

Each becomes a :class:`~neuronatlas.directions.DirectionSet` with the same ``mean_norm`` (the
mean-diff set's), so :func:`~neuronatlas.directions.steering_sweep` adds ``alpha x mean norm`` of
each, and concept expression and fluency are measured on the same prompts and grid.

    >>> from neuronatlas.data.corpus import default_corpus
    >>> from neuronatlas.features import FeatureConfig, fit_features, write_features
    >>> from neuronatlas.features.steer import concept_directions
    >>> docs, config = default_corpus(n_docs=12, seed=0), FeatureConfig(k=3, top_k=2, max_length=24)
    >>> info = write_features("my-atlas", lm, fit_features(lm, docs, config), docs, config=config)
    >>> french, english = ["le chat est noir", "il fait beau"], ["the cat is black", "it is nice"]
    >>> sets = concept_directions(lm, "my-atlas", french, english, layer=1, concept="fr", n_neurons=3)
    >>> sets["feature"].extra["feature"], sets["neurons"].extra["neurons"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from neuronatlas.directions import DirectionSet, capture, fit_direction
from neuronatlas.errors import DatasetError
from neuronatlas.features.select import SelectConfig, activation_patterns
from neuronatlas.features.store import read_components
from neuronatlas.models.loading import LoadedModel

__all__ = ["concept_directions", "standardised_difference"]


def standardised_difference(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(units,) (mean(pos) - mean(neg)) / pooled standard deviation, per column."""
    var = (pos.var(0, unbiased=True) + neg.var(0, unbiased=True)) / 2
    return (pos.mean(0) - neg.mean(0)) / var.sqrt().clamp(min=1e-6)


def _mean_site(lm: LoadedModel, texts: Sequence[str], layer: int, max_length: int) -> torch.Tensor:
    """(texts, neurons) the site activations averaged over each text's tokens (signed)."""
    from neuronatlas.record.batching import encode_ids, forward_through, pad_ids
    from neuronatlas.record.hooks import site_hooks

    ids = encode_ids(lm, texts, max_length=max_length)
    out = torch.zeros(len(texts), lm.n_neurons)
    for start in range(0, len(ids), 8):
        rows = ids[start:start + 8]
        batch = pad_ids(lm, rows, "right")
        mask = batch["attention_mask"].float().to(lm.device)[..., None]

        def observe(_layer: int, h: torch.Tensor) -> None:
            out[start:start + len(rows)] = ((h.float() * mask).sum(1) / mask.sum(1)).cpu()

        with site_hooks(lm, "mlp", observe=observe, layers=[layer], batch_size=len(rows)):
            forward_through(lm, batch, layer)
    return out


def concept_directions(lm: LoadedModel, atlas: str | Path, pos: Sequence[str], neg: Sequence[str], *, layer: int,
                       concept: str = "concept", n_neurons: int = 8, max_length: int = 128) -> dict[str, DirectionSet]:
    """The three steering directions of the module docstring, as one-layer DirectionSets."""
    if len(pos) < 2 or len(neg) < 2:
        raise DatasetError("give at least 2 positive and 2 negative texts to choose directions")
    acts = capture(lm, list(pos) + list(neg), space="resid", layers=[layer], pool="mean", max_length=max_length)
    md = fit_direction(acts[: len(pos)], acts[len(pos):], method="mean_diff", layers=[layer], concept=concept)
    comps = read_components(atlas, layer)                                  # (k, neurons)
    cfg = SelectConfig(representation="features", atlas=atlas, layers=(layer,), top=int(comps.shape[0]),
                       max_length=max_length)
    codes = activation_patterns(lm, list(pos) + list(neg), cfg)            # (texts, k) mean codes
    d_feat = standardised_difference(codes[: len(pos)], codes[len(pos):])
    best = int(d_feat.argmax())
    out_dirs = read_components(atlas, layer, key="out_dirs")
    v_feat = out_dirs[best] / out_dirs[best].norm().clamp(min=1e-12)
    site = _mean_site(lm, list(pos) + list(neg), layer, max_length)
    d_neur = standardised_difference(site[: len(pos)], site[len(pos):])
    top = d_neur.abs().topk(n_neurons).indices
    down = lm.spec.output_vectors(lm.model, layer).detach().float().cpu()   # (neurons, d_model)
    diff = site[: len(pos)].mean(0) - site[len(pos):].mean(0)
    v_neur = (diff[top, None] * down[top]).sum(0)
    v_neur = v_neur / v_neur.norm().clamp(min=1e-12)

    def as_set(v: torch.Tensor, method: str, extra: dict) -> DirectionSet:
        proj = acts[:, 0] @ v
        sep = float(proj[: len(pos)].mean() - proj[len(pos):].mean())
        return replace(md, vectors=v[None].float(), separation=[sep],
                       threshold=[float((proj[: len(pos)].mean() + proj[len(pos):].mean()) / 2)],
                       accuracy=[float("nan")], train_accuracy=[float("nan")], method=method, extra=extra)

    return {"feature": as_set(v_feat, "snmf_feature", {"feature": best, "effect": float(d_feat[best])}),
            "mean_diff": md,
            "neurons": as_set(v_neur, "top_neurons", {"neurons": [int(j) for j in top],
                                                      "effects": [float(d_neur[j]) for j in top]})}
