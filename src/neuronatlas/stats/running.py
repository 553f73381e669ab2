"""Streaming, mergeable statistics of neuron activations.

Each statistic has ``update``, ``merge`` and a serialisable ``state`` (a dict of numpy arrays), so
recording can checkpoint, resume and shard across workers.

    >>> from neuronatlas.stats.running import LabelMoments, TopK
    >>> m = LabelMoments(n_labels=2, shape=(lm.n_layers, lm.n_neurons))
    >>> m.update(acts, token_labels)        # acts: (tokens, layers, neurons); token_labels: (tokens,)
    >>> m.mean, m.var, m.max, m.act_prob    # each (labels, layers, neurons)
    >>> m.merge(other_shard)

Means and sums of squared deviations are combined with Chan et al.'s parallel update in float64;
each batch's own sums (of x and x**2, per label) are float32 matrix products, turned into the batch
mean and squared deviations in float64.
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

    def update(self, x: torch.Tensor, labels: torch.Tensor, *, at: int | None = None) -> None:
        """Add tokens ``x`` of shape (tokens, *shape) whose labels are ``labels`` (tokens,).

        With ``at=i``, ``x`` has shape (tokens, *shape[1:]) and only slice ``i`` (e.g. one layer) is
        updated, so a recorder can fold each layer in while its activations are still in cache; the
        token counts are then left alone until :meth:`commit` is called once for the batch.

        The batch's per-label sums (of x, x**2 and x > 0) are one-hot matrix products in float32 and
        its maxima one scatter, so the cost does not grow with the number of labels in the batch.
        """
        if x.shape[0] == 0:
            return
        x = x.float().reshape(x.shape[0], -1)
        present, inv = torch.unique(labels, return_inverse=True)
        onehot = torch.nn.functional.one_hot(inv, len(present)).T.to(x.dtype)      # (labels in batch, tokens)
        n_b = onehot.sum(1).double()[:, None]
        s1 = (onehot @ x).double()
        s2 = (onehot @ (x * x)).double()
        act = onehot @ x.clamp_min(0).sign_()
        mx = torch.full((len(present), x.shape[1]), float("-inf")).scatter_reduce_(
            0, inv[:, None].expand(-1, x.shape[1]), x, "amax")
        mean_b = s1 / n_b
        m2_b = (s2 - s1 * mean_b).clamp_min(0.0)
        views = [t.reshape(self.n_labels, -1) if at is None else t[:, at]
                 for t in (self.mean, self.m2, self.max, self.active)]
        mean, m2, mxv, active = views
        n_a = self.count[present][:, None]
        total = n_a + n_b
        delta = mean_b - mean[present]
        mean[present] = mean[present] + delta * (n_b / total)
        m2[present] = m2[present] + m2_b + delta**2 * (n_a * n_b / total)
        mxv[present] = torch.maximum(mxv[present], mx)
        active[present] = active[present] + act.double()
        if at is None:
            self.count[present] += n_b[:, 0]

    def commit(self, labels: torch.Tensor) -> None:
        """Count a batch's tokens after every slice was added with ``update(..., at=i)``."""
        self.count += torch.bincount(labels, minlength=self.n_labels).double()

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

    def update(self, x: torch.Tensor, prompt: torch.Tensor, position: torch.Tensor, *, at: int | None = None) -> None:
        """``x``: (tokens, *shape); ``prompt``/``position``: (tokens,) ids of each token.

        With ``at=i``, ``x`` is (tokens, units) and only row ``i`` of a (rows, units, k) top-k is
        updated. Once every list is full, only (token, unit) pairs strictly above the unit's current
        k-th value can enter: they are listed with one comparison, ranked per unit with two stable
        sorts, and merged with the lists of the units concerned only.
        """
        if at is None:
            kk = min(self.k, x.shape[0])
            vals, idx = x.float().topk(kk, dim=0)                  # (kk, *shape)
            self._merge(vals.movedim(0, -1), prompt.to(torch.int32)[idx.movedim(0, -1)],
                        position.to(torch.int32)[idx.movedim(0, -1)])
            return
        x = x.float()
        kth = self.values[at, :, -1]
        if bool(torch.isneginf(kth).any()):                        # lists not full yet: plain top-k
            kk = min(self.k, x.shape[0])
            vals, idx = x.topk(kk, dim=0)                          # (kk, units)
            merged = self._merged(self.values[at], self.prompt[at], self.position[at], vals.T,
                                  prompt.to(torch.int32)[idx.T], position.to(torch.int32)[idx.T])
            self.values[at], self.prompt[at], self.position[at] = merged
            return
        # only tokens strictly above a unit's k-th value can enter (a tie keeps the older entry)
        tok, unit = (x > kth).nonzero(as_tuple=True)
        if tok.numel() == 0:
            return
        k = self.k
        val = x[tok, unit]
        # candidates grouped by unit, best first (two stable sorts), and ranked within their unit
        order = torch.sort(val, descending=True, stable=True).indices
        order = order[torch.sort(unit[order], stable=True).indices]
        units, counts = torch.unique_consecutive(unit[order], return_counts=True)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order)) - torch.repeat_interleave(start, counts)
        keep = rank < k
        order, rank = order[keep], rank[keep]
        row = torch.repeat_interleave(torch.arange(len(units)), counts)[keep]
        new_v = torch.full((len(units), k), float("-inf"))
        new_p = torch.full((len(units), k), -1, dtype=torch.int32)
        new_pos = torch.full((len(units), k), -1, dtype=torch.int32)
        new_v[row, rank] = val[order]
        new_p[row, rank] = prompt.to(torch.int32)[tok[order]]
        new_pos[row, rank] = position.to(torch.int32)[tok[order]]
        merged = self._merged(self.values[at, units], self.prompt[at, units], self.position[at, units],
                              new_v, new_p, new_pos)
        self.values[at, units], self.prompt[at, units], self.position[at, units] = merged

    def _merged(self, old_v: torch.Tensor, old_p: torch.Tensor, old_pos: torch.Tensor, vals: torch.Tensor,
                prompt: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        all_vals = torch.cat([old_v, vals], dim=-1)
        all_prompt = torch.cat([old_p, prompt], dim=-1)
        all_pos = torch.cat([old_pos, position], dim=-1)
        # stable sort: on ties the earlier (already kept, lower prompt id) entry wins
        order = torch.sort(all_vals, dim=-1, descending=True, stable=True).indices[..., : self.k]
        return all_vals.gather(-1, order), all_prompt.gather(-1, order), all_pos.gather(-1, order)

    def _merge(self, vals: torch.Tensor, prompt: torch.Tensor, position: torch.Tensor) -> None:
        self.values, self.prompt, self.position = self._merged(self.values, self.prompt, self.position,
                                                               vals, prompt, position)

    def merge(self, other: "TopK") -> "TopK":
        self._merge(other.values, other.prompt, other.position)
        return self

    def state(self) -> dict[str, np.ndarray]:
        return {"values": self.values.numpy(), "prompt": self.prompt.numpy(), "position": self.position.numpy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "TopK":
        return cls(torch.from_numpy(np.array(state["values"])), torch.from_numpy(np.array(state["prompt"])),
                   torch.from_numpy(np.array(state["position"])))
