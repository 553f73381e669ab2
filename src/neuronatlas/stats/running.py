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

Both statistics live on a device (``device=``; the model's, so a recorder never copies activations
to the host): every update is device arithmetic, and only :meth:`state` copies to the host. Inputs
of any floating dtype (bfloat16 models included) are folded in float32; accumulators are float64
(float32 on MPS, which has no float64).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["LabelMoments", "TopK", "accumulator_dtype", "stable_topk"]


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values of each row of ``x`` (rows, n) and their indices, best first, ties in
    index order: the first ``k`` of a stable descending sort, at about the cost of ``topk`` (rows
    where a value tied with the k-th one was left out are redone with the stable sort)."""
    vals, idx = x.topk(k, dim=1)
    idx, perm = idx.sort(dim=1)                                      # picks in index order ...
    vals = vals.gather(1, perm)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices   # ... then by value, stably
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    if k:
        tied = ((x >= vals[:, -1:]).sum(1) > k).nonzero()[:, 0]      # a k-th value shared with a left-out one
        if tied.numel():
            v2, i2 = torch.sort(x.index_select(0, tied), dim=1, descending=True, stable=True)
            vals[tied], idx[tied] = v2[:, :k], i2[:, :k]
    return vals, idx


def accumulator_dtype(device: torch.device | str) -> torch.dtype:
    """float64 wherever the device has it (MPS has not: float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class LabelMoments:
    """Per-label token count, mean, variance, max and activation probability (fraction > 0)."""

    def __init__(self, n_labels: int, shape: tuple[int, ...], *, device: torch.device | str = "cpu") -> None:
        self.n_labels, self.shape = n_labels, tuple(shape)
        acc = accumulator_dtype(device)
        self.count = torch.zeros(n_labels, dtype=acc, device=device)
        self.mean = torch.zeros(n_labels, *shape, dtype=acc, device=device)
        self.m2 = torch.zeros(n_labels, *shape, dtype=acc, device=device)
        self.max = torch.full((n_labels, *shape), float("-inf"), dtype=torch.float32, device=device)
        self.active = torch.zeros(n_labels, *shape, dtype=acc, device=device)

    @property
    def device(self) -> torch.device:
        return self.mean.device

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
        acc = self.mean.dtype
        present, inv = torch.unique(labels, return_inverse=True)
        onehot = torch.nn.functional.one_hot(inv, len(present)).T.to(x.dtype)      # (labels in batch, tokens)
        n_b = onehot.sum(1).to(acc)[:, None]
        s1 = (onehot @ x).to(acc)
        s2 = (onehot @ (x * x)).to(acc)
        act = onehot @ x.clamp_min(0).sign_()
        mx = torch.full((len(present), x.shape[1]), float("-inf"), device=x.device).scatter_reduce_(
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
        active[present] = active[present] + act.to(acc)
        if at is None:
            self.count[present] += n_b[:, 0]

    def commit(self, labels: torch.Tensor) -> None:
        """Count a batch's tokens after every slice was added with ``update(..., at=i)``."""
        self.count += torch.bincount(labels, minlength=self.n_labels).to(self.count.dtype)

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
        """Fold another shard's statistics (same labels and shape) into this one (on this one's device).

        Counts, maxima and active counts merge exactly; means and squared deviations with Chan's
        update, equal to a sequential pass up to float64 rounding (see ``docs/distributed.md``).
        """
        other = other.to(self.device)
        for k in range(self.n_labels):
            self._combine(k, float(other.count[k]), other.mean[k], other.m2[k])
        self.max = torch.maximum(self.max, other.max)
        self.active += other.active
        return self

    def to(self, device: torch.device | str) -> "LabelMoments":
        """These statistics on ``device`` (``self`` when already there)."""
        if torch.device(device) == self.device:
            return self
        out = LabelMoments.__new__(LabelMoments)
        out.n_labels, out.shape = self.n_labels, self.shape
        for name in ("count", "mean", "m2", "max", "active"):
            setattr(out, name, getattr(self, name).to(device))
        return out

    def total(self) -> "LabelMoments":
        """All labels merged into one."""
        out = LabelMoments(1, self.shape, device=self.device)
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
        """Host copies of the accumulators (the only place they leave the device)."""
        return {name: getattr(self, name).cpu().numpy() for name in ("count", "mean", "m2", "max", "active")}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], *, device: torch.device | str = "cpu") -> "LabelMoments":
        n_labels, *shape = state["mean"].shape
        out = cls.__new__(cls)
        out.n_labels, out.shape = n_labels, tuple(shape)
        for name in ("count", "mean", "m2", "max", "active"):
            setattr(out, name, torch.from_numpy(np.array(state[name])).to(device))
        return out


@dataclass
class TopK:
    """Streaming top-k (value, prompt id, position) per unit; arrays of shape (*shape, k)."""

    values: torch.Tensor
    prompt: torch.Tensor
    position: torch.Tensor
    # rows (``at``) known to be full; lists never empty again, so the check syncs a device only once
    _full: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    @classmethod
    def empty(cls, shape: tuple[int, ...], k: int, *, device: torch.device | str = "cpu") -> "TopK":
        return cls(torch.full((*shape, k), float("-inf"), device=device),
                   torch.full((*shape, k), -1, dtype=torch.int32, device=device),
                   torch.full((*shape, k), -1, dtype=torch.int32, device=device))

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: torch.device | str) -> "TopK":
        if torch.device(device) == self.device:
            return self
        return TopK(self.values.to(device), self.prompt.to(device), self.position.to(device))

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
        if at not in self._full and bool(torch.isneginf(kth).any()):    # lists not full yet: plain top-k
            kk = min(self.k, x.shape[0])
            # tied tokens rank in batch order, as on the path below, so the lists are the top-k under
            # (value desc, token order) however the batches are sharded
            vals, idx = stable_topk(x.T, kk)                        # (units, kk)
            merged = self._merged(self.values[at], self.prompt[at], self.position[at], vals,
                                  prompt.to(torch.int32)[idx], position.to(torch.int32)[idx])
            self.values[at], self.prompt[at], self.position[at] = merged
            return
        self._full.add(at)
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
        dev = x.device
        rank = torch.arange(len(order), device=dev) - torch.repeat_interleave(start, counts)
        keep = rank < k
        order, rank = order[keep], rank[keep]
        row = torch.repeat_interleave(torch.arange(len(units), device=dev), counts)[keep]
        new_v = torch.full((len(units), k), float("-inf"), device=dev)
        new_p = torch.full((len(units), k), -1, dtype=torch.int32, device=dev)
        new_pos = torch.full((len(units), k), -1, dtype=torch.int32, device=dev)
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
        """Fold in a later shard's lists: on ties this one's (earlier) entries win, as in one pass."""
        other = other.to(self.device)
        self._merge(other.values, other.prompt, other.position)
        self._full.clear()
        return self

    def state(self) -> dict[str, np.ndarray]:
        """Host copies of the lists (the only place they leave the device)."""
        return {"values": self.values.cpu().numpy(), "prompt": self.prompt.cpu().numpy(),
                "position": self.position.cpu().numpy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], *, device: torch.device | str = "cpu") -> "TopK":
        return cls(*(torch.from_numpy(np.array(state[name])).to(device) for name in ("values", "prompt", "position")))
