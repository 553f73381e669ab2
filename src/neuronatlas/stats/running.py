"""Streaming, mergeable statistics of neuron activations.

Each statistic has ``update``, ``merge`` and a serialisable ``state`` (a dict of numpy arrays), so
recording can checkpoint, resume and shard across workers.

    >>> from neuronatlas.stats.running import LabelMoments, TopK
    >>> m = LabelMoments(n_labels=2, shape=(30, 1536))
    >>> m.update(acts, token_labels)        # acts: (tokens, layers, neurons); token_labels: (tokens,)
    >>> m.mean, m.var, m.max, m.act_prob    # each (labels, layers, neurons)
    >>> m.merge(other_shard)

Means and sums of squared deviations are combined with Chan et al.'s parallel update in float64;
each batch's own moments are computed in the activations' dtype (float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LabelMoments", "TopK"]


class LabelMoments:
    """Per-label token count, mean, variance, max and activation probability (fraction > 0)."""

    def __init__(self, n_labels: int, shape: tuple[int, ...]) -> None:
        self.n_labels, self.shape = n_labels, tuple(shape)
        self.count = torch.zeros(n_labels, dtype=torch.float64)
        self.mean = torch.zeros(n_labels, *shape, dtype=torch.float64)
        self.m2 = torch.zeros(n_labels, *shape, dtype=torch.float64)
        self.max = torch.full((n_labels, *shape), float("-inf"), dtype=torch.float32)
        self.active = torch.zeros(n_labels, *shape, dtype=torch.float64)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Add tokens ``x`` of shape (tokens, *shape) whose labels are ``labels`` (tokens,)."""
        x = x.float()
        for k in torch.unique(labels).tolist():
            xk = x[labels == k]
            n_b = xk.shape[0]
            mean_b = xk.mean(0)
            m2_b = ((xk - mean_b) ** 2).sum(0)
            self._combine(k, float(n_b), mean_b.double(), m2_b.double())
            self.max[k] = torch.maximum(self.max[k], xk.max(0).values)
            self.active[k] += (xk > 0).sum(0).double()

    def _combine(self, k: int, n_b: float, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a = float(self.count[k])
        total = n_a + n_b
        if total == 0:
            return
        delta = mean_b - self.mean[k]
        self.mean[k] += delta * (n_b / total)
        self.m2[k] += m2_b + delta**2 * (n_a * n_b / total)
        self.count[k] = total

    def merge(self, other: "LabelMoments") -> "LabelMoments":
        """Fold another shard's statistics (same labels and shape) into this one."""
        for k in range(self.n_labels):
            self._combine(k, float(other.count[k]), other.mean[k], other.m2[k])
        self.max = torch.maximum(self.max, other.max)
        self.active += other.active
        return self

    def total(self) -> "LabelMoments":
        """All labels merged into one."""
        out = LabelMoments(1, self.shape)
        for k in range(self.n_labels):
            out._combine(0, float(self.count[k]), self.mean[k], self.m2[k])
        out.max[0] = self.max.max(0).values
        out.active[0] = self.active.sum(0)
        return out

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance (NaN where a label has fewer than 2 tokens)."""
        denom = (self.count - 1).clamp(min=0).view(-1, *[1] * len(self.shape))
        return torch.where(denom > 0, self.m2 / denom.clamp(min=1), torch.full_like(self.m2, float("nan")))

    @property
    def act_prob(self) -> torch.Tensor:
        return self.active / self.count.clamp(min=1).view(-1, *[1] * len(self.shape))

    def state(self) -> dict[str, np.ndarray]:
        return {"count": self.count.numpy(), "mean": self.mean.numpy(), "m2": self.m2.numpy(),
                "max": self.max.numpy(), "active": self.active.numpy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "LabelMoments":
        n_labels, *shape = state["mean"].shape
        out = cls(n_labels, tuple(shape))
        for name in ("count", "mean", "m2", "max", "active"):
            setattr(out, name, torch.from_numpy(np.array(state[name])))
        return out


@dataclass
class TopK:
    """Streaming top-k (value, prompt id, position) per unit; arrays of shape (*shape, k)."""

    values: torch.Tensor
    prompt: torch.Tensor
    position: torch.Tensor

    @classmethod
    def empty(cls, shape: tuple[int, ...], k: int) -> "TopK":
        return cls(torch.full((*shape, k), float("-inf")), torch.full((*shape, k), -1, dtype=torch.int32),
                   torch.full((*shape, k), -1, dtype=torch.int32))

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def update(self, x: torch.Tensor, prompt: torch.Tensor, position: torch.Tensor) -> None:
        """``x``: (tokens, *shape); ``prompt``/``position``: (tokens,) ids of each token."""
        kk = min(self.k, x.shape[0])
        vals, idx = x.float().topk(kk, dim=0)                  # (kk, *shape)
        vals = vals.movedim(0, -1)
        idx = idx.movedim(0, -1)
        self._merge(vals, prompt.to(torch.int32)[idx], position.to(torch.int32)[idx])

    def _merge(self, vals: torch.Tensor, prompt: torch.Tensor, position: torch.Tensor) -> None:
        all_vals = torch.cat([self.values, vals], dim=-1)
        all_prompt = torch.cat([self.prompt, prompt], dim=-1)
        all_pos = torch.cat([self.position, position], dim=-1)
        # stable sort: on ties the earlier (already kept, lower prompt id) entry wins
        order = torch.sort(all_vals, dim=-1, descending=True, stable=True).indices[..., : self.k]
        self.values = all_vals.gather(-1, order)
        self.prompt = all_prompt.gather(-1, order)
        self.position = all_pos.gather(-1, order)

    def merge(self, other: "TopK") -> "TopK":
        self._merge(other.values, other.prompt, other.position)
        return self

    def state(self) -> dict[str, np.ndarray]:
        return {"values": self.values.numpy(), "prompt": self.prompt.numpy(), "position": self.position.numpy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "TopK":
        return cls(torch.from_numpy(np.array(state["values"])), torch.from_numpy(np.array(state["prompt"])),
                   torch.from_numpy(np.array(state["position"])))
