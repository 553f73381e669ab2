"""Task-specific data selection by monosemantic activation patterns (MoNA, arXiv 2503.15573).

Each document is embedded by its sparse activation pattern: per token, the non-negative part of
the MLP neurons' activations (``representation="neurons"``) or the SNMF codes of an atlas's features
(``"features"``; codes are non-negative by construction), averaged over the document's tokens, of
the chosen layers, concatenated; only the ``top`` largest entries are kept (the rest set to 0).
A pool document's score is its generalised Jaccard similarity to the task exemplars,
``J(x, y) = sum_i min(x_i, y_i) / sum_i max(x_i, y_i)``, averaged over the exemplars
(``aggregate="mean"``, a prototype) or its best exemplar (``"max"``); the ``k`` best are selected.

Baselines: ``method="embedding"`` scores by cosine similarity of the mean last-layer hidden state
(the usual embedding-similarity selection); ``method="random"`` draws ``k`` documents with ``seed``.

    >>> from neuronatlas.features.select import SelectConfig, select_documents
    >>> pool = ["the cat sat on the mat", "1 2 3 4 5", "the dog ran home", "6 7 8 9"]
    >>> exemplars = ["3 4 5 6 7"]
    >>> picked = select_documents(lm, exemplars, pool, k=2, config=SelectConfig(method="jaccard", top=16))
    >>> picked[0]          # (pool index, score), best first
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from neuronatlas.errors import DatasetError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import encode_ids, forward, forward_through, pad_ids
from neuronatlas.record.hooks import site_hooks
from neuronatlas.stats.snmf import SNMF

__all__ = ["SelectConfig", "activation_patterns", "hidden_embeddings", "generalized_jaccard", "select_documents"]

Method = Literal["jaccard", "embedding", "random"]
Representation = Literal["neurons", "features"]


@dataclass(frozen=True)
class SelectConfig:
    """``layers``: layers whose patterns are concatenated (default: the middle layer); ``top``:
    entries kept per document; ``atlas``: the atlas with SNMF features (``representation="features"``)."""

    method: Method = "jaccard"
    representation: Representation = "neurons"
    layers: tuple[int, ...] | None = None
    top: int = 64
    aggregate: Literal["mean", "max"] = "mean"
    atlas: str | Path | None = None
    max_length: int = 128
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("jaccard", "embedding", "random"):
            raise DatasetError(f"unknown selection method {self.method!r}; choose jaccard, embedding or random")
        if self.representation not in ("neurons", "features"):
            raise DatasetError(f"unknown representation {self.representation!r}; choose neurons or features")
        if self.aggregate not in ("mean", "max"):
            raise DatasetError(f"unknown aggregate {self.aggregate!r}; choose mean or max")
        if self.top < 1 or self.batch_size < 1 or self.max_length < 1:
            raise DatasetError("top, batch_size and max_length must be at least 1")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise DatasetError(f"layers {list(self.layers)} must be distinct and not empty, e.g. 10,15,20")
        if self.representation == "features" and self.method == "jaccard" and self.atlas is None:
            raise DatasetError("representation 'features' needs the atlas written by `neuronatlas features` (--atlas)")


def _batches(lm: LoadedModel, texts: Sequence[str], config: SelectConfig) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    ids = encode_ids(lm, texts, max_length=config.max_length)
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise DatasetError(f"document {empty[0]} has no tokens; remove empty texts")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = []
    for start in range(0, len(order), config.batch_size):
        rows = order[start:start + config.batch_size]
        out.append((rows, pad_ids(lm, [ids[i] for i in rows], "right")))
    return out


def _feature_models(atlas: str | Path, layers: Sequence[int]) -> dict[int, SNMF]:
    from neuronatlas.features.store import ARRAYS, _open

    store = _open(atlas)
    arrays = store.read_arrays(ARRAYS)
    comps, scale = torch.from_numpy(arrays["components"].copy()), arrays["scale"]
    out = {}
    for layer in layers:
        if not 0 <= layer < comps.shape[0]:
            raise DatasetError(f"layer {layer} is not among the atlas's feature layers 0..{comps.shape[0] - 1}")
        model = SNMF(k=int(comps.shape[1]), l1=float(store.read_json("features.json")["config"]["l1"]))
        model.components_, model.scale_ = comps[layer], float(scale[layer])
        out[layer] = model
    return out


def activation_patterns(lm: LoadedModel, texts: Sequence[str], config: SelectConfig = SelectConfig()) -> torch.Tensor:
    """(documents, layers x units) sparse non-negative patterns (units = neurons or features)."""
    layers = list(config.layers if config.layers is not None else [lm.n_layers // 2])
    bad = [x for x in layers if not 0 <= x < lm.n_layers]
    if bad:
        raise DatasetError(f"layer {bad[0]} is out of range; the model has layers 0..{lm.n_layers - 1}")
    models = _feature_models(config.atlas, layers) if config.representation == "features" and config.atlas else {}
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    rows_all: list[int] = []
    for rows, batch in _batches(lm, texts, config):
        mask = batch["attention_mask"].bool().to(lm.device)
        denom = mask.sum(1, keepdim=True).clamp(min=1).float()

        def observe(layer: int, h: torch.Tensor) -> None:
            b, t, n = h.shape
            if layer in models:
                units = models[layer].transform(h.reshape(-1, n).float()).view(b, t, -1)
            else:
                units = h.float().clamp(min=0)
            parts[layer].append((units * mask[..., None]).sum(1) / denom)

        with site_hooks(lm, "mlp", observe=observe, layers=layers, batch_size=len(rows)):
            forward_through(lm, batch, max(layers))
        rows_all.extend(rows)
    dense = torch.cat([torch.cat(parts[layer]) for layer in layers], dim=1)
    out = torch.zeros_like(dense)
    out[torch.tensor(rows_all)] = dense
    keep = min(config.top, out.shape[1])
    vals, idx = out.topk(keep, dim=1)
    return torch.zeros_like(out).scatter_(1, idx, vals)


def hidden_embeddings(lm: LoadedModel, texts: Sequence[str], config: SelectConfig = SelectConfig()) -> torch.Tensor:
    """(documents, d_model): the last layer's hidden state averaged over each document's tokens."""
    out = torch.zeros(len(texts), int(lm.config.hidden_size))
    for rows, batch in _batches(lm, texts, config):
        hs = forward(lm, batch, output_hidden_states=True).hidden_states[-1].float().cpu()
        mask = batch["attention_mask"][..., None].float()
        out[torch.tensor(rows)] = (hs * mask).sum(1) / mask.sum(1).clamp(min=1)
    return out


def generalized_jaccard(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, m) generalised Jaccard similarity of the rows of non-negative ``x`` (n, D) and ``y`` (m, D)."""
    out = torch.empty(x.shape[0], y.shape[0])
    for j in range(y.shape[0]):
        lo = torch.minimum(x, y[j]).sum(1)
        hi = torch.maximum(x, y[j]).sum(1)
        out[:, j] = torch.where(hi > 0, lo / hi.clamp(min=1e-30), torch.zeros_like(hi))
    return out


def select_documents(lm: LoadedModel, exemplars: Sequence[str], pool: Sequence[str], k: int,
                     config: SelectConfig = SelectConfig()) -> list[tuple[int, float]]:
    """The ``k`` pool documents most similar to ``exemplars``: (pool index, score), best first."""
    if not exemplars:
        raise DatasetError("no task exemplars; give at least one exemplar text")
    if not 1 <= k <= len(pool):
        raise DatasetError(f"k={k} but the pool has {len(pool)} documents; choose 1 <= k <= {len(pool)}")
    if config.method == "random":
        picked = random.Random(config.seed).sample(range(len(pool)), k)
        return [(i, float("nan")) for i in picked]
    if config.method == "jaccard":
        ex, po = activation_patterns(lm, exemplars, config), activation_patterns(lm, pool, config)
        sims = generalized_jaccard(po, ex)
    else:
        ex, po = hidden_embeddings(lm, exemplars, config), hidden_embeddings(lm, pool, config)
        sims = torch.nn.functional.normalize(po, dim=1) @ torch.nn.functional.normalize(ex, dim=1).T
    score = sims.mean(1) if config.aggregate == "mean" else sims.max(1).values
    order = sorted(range(len(pool)), key=lambda i: (-float(score[i]), i))[:k]
    return [(i, float(score[i])) for i in order]
