"""The statistics a recorder folds each batch into, all on the model's device.

A recorder keeps an ordered ``dict`` of *folds*, each a mergeable statistic with a key (its prefix
in checkpoints and in ``moments.safetensors``). Per batch it builds one :class:`TokenBatch` (index
tensors on the device) and calls ``observe(layer, acts, batch)`` for every layer, with ``acts`` the
layer's real tokens as a (tokens, neurons) float32 tensor on the device, then ``commit(batch)`` once.
``state()`` is the only place a fold copies to the host. Adding a statistic means adding one class
with this protocol and one line to :func:`default_folds`.

    >>> from neuronatlas.record.statistics import default_folds
    >>> folds = default_folds(n_labels=3, n_layers=30, n_neurons=1536, top_k=20, device=lm.device)
    >>> folds["m"].value.mean.device           # the model's device
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from neuronatlas.stats.running import LabelMoments, TopK

__all__ = ["Fold", "MomentsFold", "TokenBatch", "TopKFold", "default_folds", "folds_from_state", "folds_state",
           "merge_folds"]


@dataclass(frozen=True)
class TokenBatch:
    """One batch's bookkeeping, on the model's device; ``tokens`` = the batch's real tokens, row-major.

    ``index``: (tokens,) flat indices (row * width + position) of the real tokens; ``prompt``,
    ``position``, ``labels``: (tokens,) each token's prompt id, position and label index; ``rows``:
    (B,) the prompt id of each row; ``mask``: (B, width) real tokens.
    """

    rows: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor
    prompt: torch.Tensor
    position: torch.Tensor
    labels: torch.Tensor


@runtime_checkable
class Fold(Protocol):
    """A mergeable statistic the recorder updates per layer and batch (see the module docstring)."""

    key: str

    def observe(self, layer: int, acts: torch.Tensor, batch: TokenBatch) -> None: ...

    def commit(self, batch: TokenBatch) -> None: ...

    def merge(self, other: "Fold") -> "Fold": ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...


class MomentsFold:
    """Per-label count, mean, variance, max and activation probability (:class:`LabelMoments`)."""

    key = "m"

    def __init__(self, n_labels: int, shape: tuple[int, int], device: torch.device | str) -> None:
        self.value = LabelMoments(n_labels, shape, device=device)

    def observe(self, layer: int, acts: torch.Tensor, batch: TokenBatch) -> None:
        self.value.update(acts, batch.labels, at=layer)

    def commit(self, batch: TokenBatch) -> None:
        self.value.commit(batch.labels)

    def merge(self, other: Fold) -> "MomentsFold":
        assert isinstance(other, MomentsFold)
        self.value.merge(other.value)
        return self

    def state(self) -> dict[str, np.ndarray]:
        return self.value.state()

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.value = LabelMoments.from_state(dict(state), device=self.value.device)


class TopKFold:
    """The top-k (value, prompt id, position) of every neuron (:class:`TopK`)."""

    key = "t"

    def __init__(self, shape: tuple[int, int], k: int, device: torch.device | str) -> None:
        self.value = TopK.empty(shape, k, device=device)

    def observe(self, layer: int, acts: torch.Tensor, batch: TokenBatch) -> None:
        self.value.update(acts, batch.prompt, batch.position, at=layer)

    def commit(self, batch: TokenBatch) -> None:
        pass

    def merge(self, other: Fold) -> "TopKFold":
        assert isinstance(other, TopKFold)
        self.value.merge(other.value)
        return self

    def state(self) -> dict[str, np.ndarray]:
        return self.value.state()

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.value = TopK.from_state(dict(state), device=self.value.device)


def default_folds(n_labels: int, n_layers: int, n_neurons: int, top_k: int,
                  device: torch.device | str) -> dict[str, Fold]:
    """The recorder's statistics, in merge and storage order."""
    shape = (n_layers, n_neurons)
    folds: list[Fold] = [MomentsFold(n_labels, shape, device), TopKFold(shape, top_k, device)]
    return {f.key: f for f in folds}


def folds_state(folds: Mapping[str, Fold]) -> dict[str, np.ndarray]:
    """Every fold's host state in one flat dict, keys prefixed ``<fold key>.``."""
    return {f"{key}.{name}": value for key, fold in folds.items() for name, value in fold.state().items()}


def folds_from_state(folds: Mapping[str, Fold], state: Mapping[str, np.ndarray]) -> None:
    """Load a flat state written by :func:`folds_state` into ``folds`` (in place)."""
    for key, fold in folds.items():
        fold.load_state({k[len(key) + 1:]: v for k, v in state.items() if k.startswith(f"{key}.")})


def merge_folds(into: Mapping[str, Fold], other: Mapping[str, Fold]) -> None:
    """Fold a later shard's statistics into ``into`` (same keys; earlier shard first)."""
    for key, fold in into.items():
        fold.merge(other[key])
