"""Concept directions per layer: difference of means, first principal component of paired
differences, or a logistic-regression probe, each with its held-out accuracy.

    >>> from neuronatlas.directions import capture, fit_direction
    >>> pos = capture(lm, joyful, layers=range(lm.n_layers))                  # doctest: +SKIP
    >>> neg = capture(lm, neutral, layers=range(lm.n_layers))                 # doctest: +SKIP
    >>> ds = fit_direction(pos[:80], neg[:80], method="mean_diff", layers=list(range(lm.n_layers)),
    ...                    test_pos=pos[80:], test_neg=neg[80:], concept="joy")   # doctest: +SKIP
    >>> ds.accuracy[12], ds.save("joy.npz")                                   # doctest: +SKIP

Every vector is unit length and oriented so the concept's texts project higher. A text is
classified as the concept when its projection exceeds ``threshold``: the midpoint of the two class
means for ``mean_diff`` and ``pca``, the probe's own decision boundary for ``logistic``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from neuronatlas.directions.spaces import Space
from neuronatlas.errors import DatasetError
from neuronatlas.store.atlas import atomic_path

__all__ = ["DirectionSet", "Method", "METHODS", "fit_direction", "fit_one_vs_rest", "load_directions"]

Method = Literal["mean_diff", "pca", "logistic"]
METHODS: tuple[str, ...] = ("mean_diff", "pca", "logistic")
_FORMAT = "neuronatlas-directions/1"


@dataclass
class DirectionSet:
    """One unit direction per layer for one concept, with how well each separates the concept."""

    layers: list[int]
    vectors: torch.Tensor              # (len(layers), d_model), unit norm
    separation: list[float]            # mean projection(concept) - mean projection(rest), training sets
    threshold: list[float]             # projection above which a text counts as the concept
    accuracy: list[float]              # held-out balanced accuracy (NaN without a test set)
    train_accuracy: list[float]
    mean_norm: list[float]             # mean activation norm at each layer (a scale for alpha)
    space: str = Space.RESID.value
    pool: str = "last"
    method: str = "mean_diff"
    concept: str = "concept"
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def _index(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            have = ", ".join(str(x) for x in self.layers)
            raise DatasetError(f"direction {self.concept!r} has no layer {layer}; it has layers {have}") from None

    def vector(self, layer: int) -> torch.Tensor:
        return self.vectors[self._index(layer)]

    def project(self, acts: torch.Tensor) -> torch.Tensor:
        """Projections ``(n, len(layers))`` of activations ``(n, len(layers), d_model)``."""
        return torch.einsum("nld,ld->nl", acts.float(), self.vectors.float())

    def classify(self, acts: torch.Tensor) -> torch.Tensor:
        return self.project(acts) > torch.tensor(self.threshold)

    def best_layer(self) -> int:
        """The layer with the highest held-out accuracy (training accuracy without a test set)."""
        scores = [a if not math.isnan(a) else t for a, t in zip(self.accuracy, self.train_accuracy)]
        return self.layers[int(np.nanargmax(scores))]

    def steer(self, layer: int, alpha: float, position: Literal["all", "last"] = "all") -> Any:
        """A :class:`~neuronatlas.intervene.SteerVector` adding ``alpha`` times this unit vector."""
        from neuronatlas.intervene.interventions import SteerVector

        return SteerVector(layer=int(layer), vector=tuple(self.vector(layer).tolist()), alpha=float(alpha),
                           space=self.space, position=position)

    def summary(self) -> list[dict[str, Any]]:
        return [{"layer": lay, "accuracy": acc, "train_accuracy": tr, "separation": sep, "mean_norm": nrm}
                for lay, acc, tr, sep, nrm in zip(self.layers, self.accuracy, self.train_accuracy,
                                                   self.separation, self.mean_norm)]

    def save(self, path: str | Path) -> Path:
        target = Path(path)
        meta = {"format": _FORMAT, "space": self.space, "pool": self.pool, "method": self.method,
                "concept": self.concept, "model": self.model, "extra": self.extra}
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, vectors=self.vectors.float().numpy(), layers=np.asarray(self.layers, dtype=np.int64),
                     separation=np.asarray(self.separation), threshold=np.asarray(self.threshold),
                     accuracy=np.asarray(self.accuracy), train_accuracy=np.asarray(self.train_accuracy),
                     mean_norm=np.asarray(self.mean_norm), meta=np.asarray(json.dumps(meta)))
        return target


def load_directions(path: str | Path) -> DirectionSet:
    """Read a file written by :meth:`DirectionSet.save`."""
    source = Path(path)
    if not source.is_file():
        raise DatasetError(f"direction file {str(source)!r} does not exist; write one with "
                           "`neuronatlas directions fit ... --out FILE.npz`")
    try:
        with np.load(source, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            return DirectionSet(
                layers=[int(x) for x in z["layers"]], vectors=torch.from_numpy(z["vectors"].astype(np.float32)),
                separation=z["separation"].tolist(), threshold=z["threshold"].tolist(),
                accuracy=z["accuracy"].tolist(), train_accuracy=z["train_accuracy"].tolist(),
                mean_norm=z["mean_norm"].tolist(), space=meta["space"], pool=meta["pool"], method=meta["method"],
                concept=meta["concept"], model=meta.get("model", ""), extra=meta.get("extra", {}))
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"{str(source)!r} is not a NeuronAtlas direction file ({exc}); write one with "
                           "`neuronatlas directions fit`") from None


def _check(name: str, acts: torch.Tensor, n_layers: int | None) -> torch.Tensor:
    if acts.dim() != 3:
        raise DatasetError(f"{name} has shape {tuple(acts.shape)}; expected (texts, layers, d_model) from capture()")
    if n_layers is not None and acts.shape[1] != n_layers:
        raise DatasetError(f"{name} has {acts.shape[1]} layers but {n_layers} layer ids were given; "
                           "pass the layers capture() was called with")
    return acts.float()


def _balanced_accuracy(proj_pos: torch.Tensor, proj_neg: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Mean of the two classes' hit rates, per layer."""
    return 0.5 * ((proj_pos > threshold).float().mean(0) + (proj_neg <= threshold).float().mean(0))


def _pca_vectors(pos: torch.Tensor, neg: torch.Tensor, seed: int) -> torch.Tensor:
    """First principal component of randomly paired, randomly signed differences, per layer."""
    gen = torch.Generator().manual_seed(seed)
    k = min(len(pos), len(neg))
    p = pos[torch.randperm(len(pos), generator=gen)[:k]]
    q = neg[torch.randperm(len(neg), generator=gen)[:k]]
    signs = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0)[:, None, None]
    diffs = (p - q) * signs                                   # (k, L, d): the concept axis carries the variance
    diffs = diffs - diffs.mean(0, keepdim=True)
    out = []
    for layer in range(diffs.shape[1]):
        _, _, vh = torch.linalg.svd(diffs[:, layer].double(), full_matrices=False)
        out.append(vh[0].float())
    return torch.stack(out)


def _logistic(pos: torch.Tensor, neg: torch.Tensor, seed: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: the probe's weight vector in raw activation units (unit norm) and its boundary
    expressed as a projection threshold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_all = torch.cat([pos, neg]).double().numpy()
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    vectors, thresholds = [], []
    for layer in range(x_all.shape[1]):
        x = x_all[:, layer]
        scaler = StandardScaler().fit(x)
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        probe = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit((x - scaler.mean_) / scale, y)
        w = probe.coef_[0] / scale                             # raw-space weights
        b = float(probe.intercept_[0] - np.dot(probe.coef_[0], scaler.mean_ / scale))
        norm = float(np.linalg.norm(w)) or 1.0
        vectors.append(torch.from_numpy(w / norm).float())
        thresholds.append(-b / norm)
    return torch.stack(vectors), torch.tensor(thresholds)


def fit_direction(pos: torch.Tensor, neg: torch.Tensor, *, method: Method = "mean_diff",
                  layers: Sequence[int] | None = None, test_pos: torch.Tensor | None = None,
                  test_neg: torch.Tensor | None = None, concept: str = "concept", space: str = Space.RESID.value,
                  pool: str = "last", model: str = "", seed: int = 0, c: float = 1.0) -> DirectionSet:
    """Fit one direction per layer separating ``pos`` (the concept) from ``neg`` (the rest).

    ``pos``/``neg``: ``(n, len(layers), d_model)`` from :func:`~neuronatlas.directions.capture`.
    ``c``: inverse L2 strength of the logistic probe (scikit-learn's ``C``).
    """
    if method not in METHODS:
        raise DatasetError(f"unknown direction method {method!r}; choose from: {', '.join(METHODS)}")
    n_layers = None if layers is None else len(layers)
    pos, neg = _check("pos", pos, n_layers), _check("neg", neg, n_layers)
    if len(pos) < 2 or len(neg) < 2:
        raise DatasetError(f"a direction needs at least 2 texts per side; got {len(pos)} concept and {len(neg)} "
                           "other texts: label more texts")
    layer_ids = list(range(pos.shape[1])) if layers is None else [int(x) for x in layers]
    if method == "mean_diff":
        vectors = pos.mean(0) - neg.mean(0)
    elif method == "pca":
        vectors = _pca_vectors(pos, neg, seed)
    else:
        vectors, boundary = _logistic(pos, neg, seed, c)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj_pos = torch.einsum("nld,ld->nl", pos, vectors)
    proj_neg = torch.einsum("nld,ld->nl", neg, vectors)
    flip = proj_pos.mean(0) < proj_neg.mean(0)                # orient: the concept projects higher
    sign = torch.where(flip, -1.0, 1.0)
    vectors, proj_pos, proj_neg = vectors * sign[:, None], proj_pos * sign, proj_neg * sign
    if method == "logistic":
        threshold = boundary * sign
    else:
        threshold = 0.5 * (proj_pos.mean(0) + proj_neg.mean(0))
    train_acc = _balanced_accuracy(proj_pos, proj_neg, threshold)
    if test_pos is not None and test_neg is not None and len(test_pos) and len(test_neg):
        tp, tn = _check("test_pos", test_pos, n_layers), _check("test_neg", test_neg, n_layers)
        acc = _balanced_accuracy(torch.einsum("nld,ld->nl", tp, vectors), torch.einsum("nld,ld->nl", tn, vectors),
                                 threshold).tolist()
    else:
        acc = [math.nan] * len(layer_ids)
    mean_norm = torch.cat([pos, neg]).norm(dim=-1).mean(0)
    return DirectionSet(layers=layer_ids, vectors=vectors.contiguous(),
                        separation=(proj_pos.mean(0) - proj_neg.mean(0)).tolist(), threshold=threshold.tolist(),
                        accuracy=acc, train_accuracy=train_acc.tolist(), mean_norm=mean_norm.tolist(),
                        space=str(Space.parse(space).value), pool=pool, method=method, concept=concept, model=model)


def fit_one_vs_rest(acts: torch.Tensor, labels: Sequence[str], *, method: Method = "mean_diff",
                    layers: Sequence[int] | None = None, test_acts: torch.Tensor | None = None,
                    test_labels: Sequence[str] | None = None, **kw: Any) -> dict[str, DirectionSet]:
    """One :class:`DirectionSet` per label, each label's texts against all the others."""
    if len(labels) != len(acts):
        raise DatasetError(f"{len(labels)} labels for {len(acts)} activation rows; give one label per text")
    if (test_acts is None) != (test_labels is None):
        raise DatasetError("give test_acts and test_labels together (or neither)")
    if test_acts is not None and test_labels is not None and len(test_labels) != len(test_acts):
        raise DatasetError(f"{len(test_labels)} test labels for {len(test_acts)} test rows; give one label per text")
    names = sorted(set(labels))
    if len(names) < 2:
        raise DatasetError(f"one-vs-rest needs at least 2 labels; got {names}")
    lab = np.asarray(labels)
    out = {}
    for name in names:
        kwargs: dict[str, Any] = dict(kw)
        if test_acts is not None and test_labels is not None:
            tl = np.asarray(test_labels)
            kwargs["test_pos"], kwargs["test_neg"] = test_acts[tl == name], test_acts[tl != name]
        out[name] = fit_direction(acts[lab == name], acts[lab != name], method=method, layers=layers,
                                  concept=name, **kwargs)
    return out
