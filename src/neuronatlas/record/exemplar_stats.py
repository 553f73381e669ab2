"""Mergeable per-unit exemplar statistics with token windows: top-k and a seeded uniform sample.

:class:`WindowTopK` is a :class:`~neuronatlas.stats.running.TopK` (value, document index, position
per unit) whose entries also carry the unit's activations on a window of tokens around the selected
token, copied out of the batch when the entry is selected. Nothing but the k entries per unit is kept,
so memory is independent of corpus length. Per batch, only tokens above a unit's current k-th value
are looked at (a compare and a ``nonzero`` over the batch); windows are gathered for entering entries
only. :class:`Reservoir` keeps a uniformly random sample of k tokens per unit (bottom-k sampling with
exponential keys, skipping ahead geometrically, so it draws random numbers per entrant, not per token).
:class:`~neuronatlas.record.corpus.ExemplarStream` updates both inside a model's forward pass.

    >>> from neuronatlas.record.exemplar_stats import Reservoir, WindowTopK
    >>> top = WindowTopK.empty(n_units=64, k=20, before=32, after=8)
    >>> top.windows.shape                    # (64, 20, 32 + 1 + 8), NaN outside the document
    >>> sample = Reservoir(64, 5, 32, 8, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from neuronatlas.stats.running import TopK, stable_topk

__all__ = ["Reservoir", "WindowTopK"]


def _descending_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2**32) whose ascending order is the descending order of float32 ``x`` (IEEE bits)."""
    u = x.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    ascending = torch.where(u >= 2**31, 0xFFFFFFFF - u, u + 2**31)
    return 0xFFFFFFFF - ascending


class WindowTopK:
    """Top-k entries per unit, ranked by a score, each with the unit's activations on a token window.

    ``top``: a :class:`TopK` whose arrays are ``(units, k)`` (``prompt`` holds document indices);
    :attr:`windows`: ``(units, k, before + 1 + after)`` float32, NaN where the window leaves the
    document, in rank order. The entry's token sits at window offset ``before``. Windows are stored
    unsorted (``store``) and addressed through ``slot`` (rank -> storage row), so a merge only moves
    small index arrays and writes the windows of entering entries into the slots they free.
    """

    def __init__(self, top: TopK, windows: torch.Tensor, before: int, after: int,
                 slot: torch.Tensor | None = None) -> None:
        self.top, self.store, self.before, self.after = top, windows, before, after
        n_units, k = top.values.shape
        self.slot = slot if slot is not None else torch.arange(k, device=windows.device).repeat(n_units, 1)

    @property
    def windows(self) -> torch.Tensor:
        """(units, k, W) windows in rank order."""
        return self.store.gather(1, self.slot[..., None].expand(-1, -1, self.store.shape[-1]))

    @classmethod
    def empty(cls, n_units: int, k: int, before: int, after: int, device: torch.device | str = "cpu") -> WindowTopK:
        top = TopK.empty((n_units,), k)
        top = TopK(top.values.to(device), top.prompt.to(device), top.position.to(device))
        windows = torch.full((n_units, k, before + 1 + after), float("nan"), device=device)
        return cls(top, windows, before, after)

    @property
    def k(self) -> int:
        return self.top.k

    @property
    def width(self) -> int:
        return self.before + 1 + self.after

    @property
    def activation(self) -> torch.Tensor:
        """(units, k) activation at each entry's own token (its window centre)."""
        return self.windows[..., self.before]

    def update(self, h: torch.Tensor, counted: torch.Tensor, doc: torch.Tensor, lengths: torch.Tensor) -> None:
        """Offer every counted token of a batch, ranked by activation.

        ``h``: (B, T, units) activations of a right-padded batch; ``counted``: (B*T,) bool, the
        tokens that may become exemplars (real, non-special); ``doc``: (B,) document index of each
        row; ``lengths``: (B,) tokens per row (windows never leave a document).
        """
        flat = h.reshape(-1, h.shape[-1])
        threshold = self.top.values[:, -1]
        if bool(torch.isneginf(threshold).any()):                       # not full yet: most tokens enter
            self.offer_dense(flat, counted, h, doc, lengths)
            return
        # Only tokens above a unit's current k-th value can enter. List those (token, unit) pairs,
        # sort them by unit and decreasing value, keep each unit's best k (after warm-up: few pairs).
        tok_i, unit_i = (flat > threshold).nonzero(as_tuple=True)
        n_units = flat.shape[1]
        keep = counted[tok_i]
        tok_i, unit_i = tok_i[keep], unit_i[keep]
        if tok_i.numel() == 0:
            return
        score = flat.reshape(-1).take(tok_i * n_units + unit_i).float()
        perm = torch.argsort(unit_i * 2**32 + _descending_bits(score + 0.0), stable=True)   # by unit, then value desc (-0 = +0)
        tok_i, unit_i, score = tok_i[perm], unit_i[perm], score[perm]
        counts = torch.bincount(unit_i, minlength=n_units)
        rank = torch.arange(unit_i.numel(), device=flat.device) - (counts.cumsum(0) - counts)[unit_i]
        keep = rank < self.k
        units = (counts > 0).nonzero()[:, 0]
        row_of = torch.full((n_units,), -1, dtype=torch.long, device=flat.device)
        row_of[units] = torch.arange(units.numel(), device=flat.device)
        kk = int(min(int(counts.max()), self.k))
        vals = torch.full((units.numel(), kk), float("-inf"), device=flat.device)
        sel = torch.zeros((units.numel(), kk), dtype=torch.long, device=flat.device)
        r, c = row_of[unit_i[keep]], rank[keep]
        vals[r, c] = score[keep].float()
        sel[r, c] = tok_i[keep]
        self.offer(units, vals, sel, h, doc, lengths)

    def offer_dense(self, scores: torch.Tensor, counted: torch.Tensor, h: torch.Tensor, doc: torch.Tensor,
                    lengths: torch.Tensor) -> None:
        """Offer every unit its best ``k`` counted tokens by ``scores`` (B*T, units) (one top-k per unit)."""
        index = counted.nonzero()[:, 0]
        if index.numel() == 0:
            return
        # tied tokens rank in batch order (as in ``update``), so sharded passes keep one pass's entries
        vals, pick = stable_topk(scores.index_select(0, index).t().contiguous(), min(self.k, index.numel()))
        units = torch.arange(scores.shape[1], device=scores.device)
        self.offer(units, vals, index[pick], h, doc, lengths)

    def offer(self, units: torch.Tensor, vals: torch.Tensor, sel: torch.Tensor, h: torch.Tensor, doc: torch.Tensor,
              lengths: torch.Tensor) -> None:
        """Merge candidates: ``vals``/``sel`` (U', c) are the scores and flat token indices (b * T + t)
        of candidates for ``units``; windows are gathered from ``h`` only for candidates that enter."""
        width, n_units = h.shape[1], h.shape[2]
        b, t = sel // width, sel % width
        offsets = torch.arange(-self.before, self.after + 1, device=h.device)
        values = h.reshape(-1)                                           # (B*T*units,)

        def windows(ui: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
            """Windows (E, W) of candidates ``cand`` of rows ``ui``; NaN outside the document."""
            tt = t[ui, cand]
            base = sel[ui, cand] * n_units + units[ui]                   # the candidate's own cell
            cell = (base[:, None] + offsets * n_units).clamp_(0, values.numel() - 1)
            outside = (offsets < -tt[:, None]) | (offsets >= (lengths[b[ui, cand]] - tt)[:, None])
            return values.take(cell).float().masked_fill_(outside, float("nan"))

        self._merge(units, vals.float(), doc[b].to(torch.int32), t.to(torch.int32), windows)

    def _merge(self, units: torch.Tensor, vals: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor,
               windows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Merge candidates (U', c) of ``units`` with the kept entries; ``windows(ui, cand)`` gives the
        windows of the candidates that enter, so no other window is ever gathered.

        Same rule as ``TopK._merge``: a stable descending sort, so on ties the entry kept earlier wins.
        """
        k = self.k
        all_vals = torch.cat([self.top.values.index_select(0, units), vals], dim=-1)
        order = torch.sort(all_vals, dim=-1, descending=True, stable=True).indices[..., :k]
        self.top.values.index_copy_(0, units, all_vals.gather(-1, order))
        for name, new in (("prompt", doc), ("position", pos)):
            kept = getattr(self.top, name)
            kept.index_copy_(0, units, torch.cat([kept.index_select(0, units), new], dim=-1).gather(-1, order))
        old_slot = self.slot.index_select(0, units)
        new_slot = old_slot.gather(1, order.clamp(max=k - 1))
        ui, rank = (order >= k).nonzero(as_tuple=True)                    # entering, grouped by unit
        if ui.numel():
            survived = torch.zeros(all_vals.shape, dtype=torch.bool, device=all_vals.device)
            survived.scatter_(1, order, True)
            freed = old_slot[~survived[:, :k]]                            # evicted, grouped by unit, same counts
            new_slot[ui, rank] = freed
            self.store[units[ui], freed] = windows(ui, order[ui, rank] - k)
        self.slot.index_copy_(0, units, new_slot)

    def merge(self, other: WindowTopK) -> WindowTopK:
        """Fold another shard's entries (same units, k and window) into this one."""
        units = torch.arange(self.top.values.shape[0], device=self.top.values.device)
        theirs = other.windows
        self._merge(units, other.top.values, other.top.prompt, other.top.position, lambda ui, cand: theirs[ui, cand])
        return self

    def state(self) -> dict[str, np.ndarray]:
        return {**{k: v for k, v in TopK(self.top.values.cpu(), self.top.prompt.cpu(),
                                            self.top.position.cpu()).state().items()},
                "windows": self.windows.cpu().numpy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], before: int, after: int,
                   device: torch.device | str = "cpu") -> WindowTopK:
        top = TopK.from_state(state)
        top = TopK(top.values.to(device), top.prompt.to(device), top.position.to(device))
        return cls(top, torch.from_numpy(np.array(state["windows"])).to(device), before, after)


class Reservoir:
    """A seeded uniform random sample of k counted tokens per unit, with windows, in O(entrants) work.

    Equivalent in distribution to giving every (token, unit) an independent Exp(1) key and keeping
    each unit's k largest keys (bottom-k / reservoir sampling), without drawing a key per token:
    given a unit's current k-th largest key ``e``, the number of tokens until the next one beats it
    is geometric with success probability ``exp(-e)``, and the winner's key is ``e + Exp(1)``
    (memorylessness). Exponential keys keep full float32 precision however long the corpus is.
    Early in the stream, when a batch is expected to bring more than 20 entrants per unit (a rule
    that depends only on token counts), every token of the batch gets its key directly instead.
    """

    def __init__(self, n_units: int, k: int, before: int, after: int, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> None:
        self.sample = WindowTopK.empty(n_units, k, before, after, device)
        self.next_at = torch.zeros(n_units, dtype=torch.long, device=device)   # global index of the next entrant
        self.generator = generator

    def _skip(self, threshold: torch.Tensor) -> torch.Tensor:
        """Geometric number of tokens passed over before the next entrant (0 while not full)."""
        u = torch.rand(threshold.shape, generator=self.generator, device=threshold.device, dtype=torch.float64)
        p_fail = -torch.expm1(-threshold.double().clamp(min=0))          # 1 - exp(-e): P(a token does not enter)
        skip = torch.floor(torch.log1p(-u) / torch.log(p_fail))
        return torch.where(p_fail > 0, skip.clamp(max=2.0**62), torch.zeros_like(skip)).long()

    def update(self, start: int, h: torch.Tensor, counted_index: torch.Tensor, doc: torch.Tensor,
               lengths: torch.Tensor) -> None:
        """Offer the batch's M counted tokens (flat indices ``counted_index`` into (B*T,)), whose
        global indices are ``start .. start + M - 1``."""
        end = start + counted_index.numel()
        k = self.sample.k
        if counted_index.numel() and (start < k or k * math.log(end / start) > 20):
            # many entrants expected (early in the stream): draw every token's key at once
            keys = torch.empty((self.next_at.numel(), counted_index.numel()), device=h.device)
            vals, pick = keys.exponential_(generator=self.generator).topk(min(k, keys.shape[1]), dim=1)
            units = torch.arange(keys.shape[0], device=h.device)
            self.sample.offer(units, vals, counted_index[pick], h, doc, lengths)
            self.next_at = end + self._skip(self.sample.top.values[:, -1])
            return
        while True:
            units = (self.next_at < end).nonzero()[:, 0]
            if units.numel() == 0:
                return
            threshold = self.sample.top.values[units, -1].clamp(min=0)     # -inf (not full) -> every token enters
            key = threshold + torch.empty(units.shape, device=units.device).exponential_(generator=self.generator)
            sel = counted_index[self.next_at[units] - start][:, None]
            self.sample.offer(units, key[:, None], sel, h, doc, lengths)
            self.next_at[units] += 1 + self._skip(self.sample.top.values[units, -1])
