"""Per-neuron activation histograms and GLU sign quadrants, kept by the recorder beside the moments.

Two mergeable statistics (``update`` / ``merge`` / ``state`` / ``from_state``; tensors live on the
device of the activations they are fed) and the bundle the recorder drives:

- :class:`ActivationHistogram`: exact integer counts per (label, layer, neuron, bin) on fixed
  log-spaced bins of ``|activation|`` with the sign kept (:data:`EDGES`: 4 bins per decade from 1e-3
  to 1e3; one middle bin for ``|a| < 1e-3``, an overflow bin per sign for ``|a| >= 1e3``), and the
  exact ``max |activation|``. Percentiles of ``|a|`` read from it are exact to one bin (a factor
  10**0.25 = 1.78 wide).
- :class:`GluQuadrants`: for gated MLPs (``act(gate(x)) * up(x)``), the number of tokens in each of
  the four (gate sign, up sign) combinations and the top-k tokens of each combination by
  ``|activation|``; the gate and up signs come from forward hooks on the gate and up projections
  (:func:`capture_gate_up`) in the same forward pass as the recording.
- :class:`NeuronStats`: both, for :func:`neuronatlas.record.record` (checkpoint, resume, final tables
  ``histograms``, ``glu_signs`` and ``glu_exemplars`` under ``records/<name>/``).

    >>> import torch
    >>> from neuronatlas.record.neuron_stats import ActivationHistogram, EDGES
    >>> h = ActivationHistogram(n_labels=2, n_layers=1, n_neurons=3)
    >>> acts = torch.tensor([[0.5, -2.0, 0.0], [10.0, 0.01, -0.2]])     # (tokens, neurons)
    >>> h.update(acts, torch.tensor([0, 1]), layer=0)                   # token labels: (tokens,)
    >>> tuple(h.counts.shape), int(h.counts.sum())                      # (layers, labels, neurons, bins)
    ((1, 2, 3, 51), 6)
    >>> other = ActivationHistogram(n_labels=2, n_layers=1, n_neurons=3)
    >>> other.update(acts, torch.tensor([1, 1]), layer=0)
    >>> int(h.merge(other).counts.sum())                                # a shard merged: counts add
    12
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import pyarrow as pa
import torch

from neuronatlas.errors import AtlasError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.models.specs import get_module

__all__ = ["EDGES", "N_BINS", "CENTER", "QUADRANTS", "ActivationHistogram", "GluQuadrants", "NeuronStats",
           "capture_gate_up", "bin_of"]

PER_DECADE = 4
EDGES = (10.0 ** (np.arange(-3 * PER_DECADE, 3 * PER_DECADE + 1) / PER_DECADE)).astype(np.float32)  # 1e-3 .. 1e3
CENTER = len(EDGES)              # index of the |a| < 1e-3 bin; bin CENTER + m holds a >= 0 with magnitude class m
N_BINS = 2 * len(EDGES) + 1      # 51: [-overflow, ..., -1e-3), (-1e-3, 1e-3), [1e-3, ...), [.., +overflow]
QUADRANTS = ("g+u+", "g+u-", "g-u+", "g-u-")   # (gate >= 0, up >= 0) combinations, in index order
_I32_LIMIT = 2**31 - 1
GLU_TOP_K = 5                    # exemplars kept per quadrant (at most the record's top_k)


def bin_of(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Signed bin index of every value: ``CENTER ± m``, ``m`` = number of edges <= ``|x|`` (0 below 1e-3)."""
    m = torch.bucketize(x.abs(), edges, right=True)
    center = len(edges)
    return torch.where(x < 0, center - m, center + m)


class ActivationHistogram:
    """Exact counts of activations per (layer, label, neuron, signed log-spaced bin) and ``max |a|``.

    ``counts`` is (layers, labels, neurons, 51) so that one layer's update is one ``scatter_add_`` into
    a contiguous block; ``absmax`` is (labels, layers, neurons). Counts are int32 while every label has
    fewer than 2**31 tokens and int64 after (exact either way); memory: labels x layers x neurons x 51
    x 4 bytes.
    """

    def __init__(self, n_labels: int, n_layers: int, n_neurons: int, device: torch.device | str = "cpu") -> None:
        self.counts = torch.zeros(n_layers, n_labels, n_neurons, N_BINS, dtype=torch.int32, device=device)
        self.absmax = torch.zeros(n_labels, n_layers, n_neurons, dtype=torch.float32, device=device)
        self.tokens = np.zeros((n_labels, n_layers), dtype=np.int64)   # tokens seen per (label, layer): int32 guard
        self._edges: torch.Tensor | None = None

    def _on(self, device: torch.device) -> torch.Tensor:
        if self.counts.device != device:
            self.counts, self.absmax = self.counts.to(device), self.absmax.to(device)
        if self._edges is None or self._edges.device != device:
            self._edges = torch.from_numpy(EDGES).to(device)
        return self._edges

    def update(self, x: torch.Tensor, labels: torch.Tensor, *, layer: int) -> None:
        """Add one layer's activations ``x`` (tokens, neurons) of tokens labelled ``labels`` (tokens,)."""
        if x.shape[0] == 0:
            return
        x = x.float()
        edges = self._on(x.device)
        labels = labels.to(x.device)
        present, inv = torch.unique(labels, return_inverse=True)
        n_tok = torch.bincount(inv, minlength=len(present)).cpu().numpy()
        pres = present.cpu().numpy()
        if self.counts.dtype == torch.int32 and int((self.tokens[pres, layer] + n_tok).max()) >= _I32_LIMIT:
            self.counts = self.counts.long()
        self.tokens[pres, layer] += n_tok
        n = x.shape[1]
        dev = x.device
        index = (labels[:, None] * n + torch.arange(n, device=dev)[None, :]) * N_BINS + bin_of(x, edges)
        flat = self.counts[layer].view(-1)                       # contiguous (labels * neurons * bins)
        flat.scatter_add_(0, index.reshape(-1), torch.ones(1, dtype=flat.dtype, device=dev).expand(index.numel()))
        mag = x.abs()
        if len(present) == 1:
            amax = mag.amax(0, keepdim=True)
        else:
            amax = torch.zeros(len(present), n, device=dev).scatter_reduce_(0, inv[:, None].expand(-1, n), mag, "amax")
        self.absmax[present, layer] = torch.maximum(self.absmax[present, layer], amax)

    def merge(self, other: ActivationHistogram) -> ActivationHistogram:
        """Add ``other`` (another shard of the same labels and neurons) into this one."""
        if other.counts.shape != self.counts.shape:
            raise AtlasError(f"cannot merge histograms of shapes {tuple(other.counts.shape)} and {tuple(self.counts.shape)}")
        dtype = torch.int64 if torch.int64 in (self.counts.dtype, other.counts.dtype) \
            or int((self.tokens + other.tokens).max(initial=0)) >= _I32_LIMIT else torch.int32
        self.counts = self.counts.to(dtype) + other.counts.to(self.counts.device, dtype)
        self.absmax = torch.maximum(self.absmax, other.absmax.to(self.absmax.device))
        self.tokens = self.tokens + other.tokens
        return self

    def state(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts.cpu().numpy(), "absmax": self.absmax.cpu().numpy(), "tokens": self.tokens.copy(),
                "edges": EDGES.copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ActivationHistogram:
        if not np.array_equal(state["edges"], EDGES):
            raise AtlasError("this histogram state has other bin edges than neuronatlas.record.neuron_stats.EDGES")
        layers, k, n, _ = state["counts"].shape
        h = cls(k, layers, n)
        h.counts = torch.from_numpy(np.ascontiguousarray(state["counts"]))
        h.absmax = torch.from_numpy(np.ascontiguousarray(state["absmax"]))
        h.tokens = np.asarray(state["tokens"], dtype=np.int64).copy()
        return h


def _merge_topk(values: torch.Tensor, prompt: torch.Tensor, position: torch.Tensor, act: torch.Tensor,
                c_values: torch.Tensor, c_prompt: torch.Tensor, c_position: torch.Tensor,
                c_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Best ``k`` of current lists (units, k) and candidates (units, c) by value."""
    k = values.shape[-1]
    v = torch.cat([values, c_values], -1)
    order = v.topk(k, dim=-1).indices          # empty slots are identical (-inf, -1, -1, 0): their order is moot
    return (v.gather(-1, order), torch.cat([prompt, c_prompt], -1).gather(-1, order),
            torch.cat([position, c_position], -1).gather(-1, order), torch.cat([act, c_act], -1).gather(-1, order))


class GluQuadrants:
    """Tokens per (layer, neuron, gate sign, up sign) and the top-k tokens of each combination by ``|a|``.

    Quadrant ``q`` = 2 * (gate < 0) + (up < 0), named by :data:`QUADRANTS`; zero counts as positive.
    Arrays: ``counts`` (layers, neurons, 4) int64; ``values`` (|a|), ``act`` (a), ``prompt``,
    ``position`` (layers, neurons, 4, k), value -inf / id -1 for empty slots.
    """

    def __init__(self, n_layers: int, n_neurons: int, k: int, device: torch.device | str = "cpu") -> None:
        shape = (n_layers, n_neurons, 4, k)
        self.counts = torch.zeros(n_layers, n_neurons, 4, dtype=torch.int64, device=device)
        self.values = torch.full(shape, float("-inf"), device=device)
        self.act = torch.zeros(shape, device=device)
        self.prompt = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.position = torch.full(shape, -1, dtype=torch.int32, device=device)

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    def _to(self, device: torch.device) -> None:
        if self.counts.device != device:
            for name in ("counts", "values", "act", "prompt", "position"):
                setattr(self, name, getattr(self, name).to(device))

    def update(self, x: torch.Tensor, gate_pos: torch.Tensor, up_pos: torch.Tensor, prompt: torch.Tensor,
               position: torch.Tensor, *, layer: int) -> None:
        """One layer: activations ``x`` (tokens, neurons), signs ``gate >= 0`` and ``up >= 0`` (tokens, neurons)."""
        if x.shape[0] == 0:
            return
        x = x.float()
        dev = x.device
        self._to(dev)
        gt, ut = gate_pos.to(dev).T.contiguous(), up_pos.to(dev).T.contiguous()  # (neurons, tokens) bool
        masks = (gt & ut, gt & ~ut, ~gt & ut, ~(gt | ut))                           # QUADRANTS order
        n_g, n_u, n_gu = gt.sum(1), ut.sum(1), masks[0].sum(1)                    # three sums give all four
        self.counts[layer] += torch.stack([n_gu, n_g - n_gu, n_u - n_gu, x.shape[0] - n_g - n_u + n_gu], dim=1)
        kk = min(self.k, x.shape[0])
        xt = x.T.contiguous()                                                       # (neurons, tokens)
        mag = xt.abs()
        p32, pos32 = prompt.to(dev, torch.int32), position.to(dev, torch.int32)
        for qi in range(4):
            vals, idx = torch.where(masks[qi], mag, float("-inf")).topk(kk, dim=1)   # (neurons, kk)
            empty = torch.isinf(vals)
            merged = _merge_topk(self.values[layer, :, qi], self.prompt[layer, :, qi], self.position[layer, :, qi],
                                 self.act[layer, :, qi], vals, torch.where(empty, -1, p32[idx]),
                                 torch.where(empty, -1, pos32[idx]), torch.where(empty, 0.0, xt.gather(1, idx)))
            (self.values[layer, :, qi], self.prompt[layer, :, qi], self.position[layer, :, qi],
             self.act[layer, :, qi]) = merged

    def merge(self, other: GluQuadrants) -> GluQuadrants:
        if other.values.shape != self.values.shape:
            raise AtlasError(f"cannot merge GLU quadrants of shapes {tuple(other.values.shape)} and {tuple(self.values.shape)}")
        dev = self.counts.device
        self.counts = self.counts + other.counts.to(dev)
        self.values, self.prompt, self.position, self.act = _merge_topk(
            self.values, self.prompt, self.position, self.act, other.values.to(dev), other.prompt.to(dev),
            other.position.to(dev), other.act.to(dev))
        return self

    def state(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).cpu().numpy() for name in ("counts", "values", "act", "prompt", "position")}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> GluQuadrants:
        layers, n, _, k = state["values"].shape
        g = cls(layers, n, k)
        for name in ("counts", "values", "act", "prompt", "position"):
            setattr(g, name, torch.from_numpy(np.ascontiguousarray(state[name])))
        return g


@contextmanager
def capture_gate_up(lm: LoadedModel, signs: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Forward hooks on every layer's gate and up projections (or the fused ``gate_up``) that store
    ``signs[layer] = (gate >= 0, up >= 0)``, each (batch, tokens, neurons) bool; removed on exit."""
    spec = lm.spec
    handles: list[Any] = []
    pending: dict[int, torch.Tensor] = {}

    def keep(layer: int, part: str, out: torch.Tensor) -> None:
        pos = out.detach() >= 0
        if part == "gate_up":
            gate, up = pos.chunk(2, dim=-1)
            signs[layer] = (gate, up)
        elif part == "gate":
            pending[layer] = pos
        else:
            signs[layer] = (pending.pop(layer), pos)

    try:
        for layer in range(lm.n_layers):
            mlp = spec.mlp_module(lm.model, layer)
            parts = [("gate_up", spec.gate_up)] if spec.gate_up else [("gate", spec.gate), ("up", spec.up)]
            for part, path in parts:
                assert path is not None
                module = get_module(mlp, path)
                handles.append(module.register_forward_hook(
                    lambda _m, _a, out, _layer=layer, _part=part: keep(_layer, _part, out)))
        yield
    finally:
        for h in handles:
            h.remove()


class NeuronStats:
    """The histogram (always) and the GLU quadrants (gated MLPs) of one recording; ``enabled=False``: no-ops."""

    def __init__(self, n_labels: int, n_layers: int, n_neurons: int, *, gated: bool, k: int,
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.hist = ActivationHistogram(n_labels, n_layers, n_neurons) if enabled else None
        self.glu = GluQuadrants(n_layers, n_neurons, k) if enabled and gated else None
        self._signs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def start(cls, lm: LoadedModel, n_labels: int, *, k: int, enabled: bool, component: Component = Component.MLP,
              store: Any = None, checkpoint: Path | None = None) -> NeuronStats:
        """New statistics, or those saved with ``checkpoint`` (a recorder checkpoint being resumed).

        The quadrants are kept for the ``mlp`` site of gated models (the ``gate`` site is read before
        the up projection runs, and is not the product the quadrants split)."""
        ns = cls(n_labels, lm.n_layers, lm.n_neurons, gated=lm.spec.gated and component is Component.MLP,
                 k=min(k, GLU_TOP_K), enabled=enabled)
        if enabled and checkpoint is not None:
            rel = str((checkpoint / "neuron_stats.safetensors").relative_to(store.path))
            state = store.read_arrays(rel)
            ns.hist = ActivationHistogram.from_state({k2[2:]: v for k2, v in state.items() if k2.startswith("h.")})
            if ns.glu is not None:
                ns.glu = GluQuadrants.from_state({k2[2:]: v for k2, v in state.items() if k2.startswith("g.")})
        return ns

    def hooks(self, lm: LoadedModel) -> ContextManager[None]:
        """The gate/up hooks for one forward pass (nothing when not gated or disabled)."""
        return capture_gate_up(lm, self._signs) if self.glu is not None else nullcontext()

    def update(self, layer: int, flat: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, prompt: torch.Tensor,
               position: torch.Tensor) -> None:
        """One layer of the current batch: ``flat`` (tokens, neurons) = the site activations at ``mask`` (batch, tokens)."""
        if self.hist is None:
            return
        self.hist.update(flat, labels, layer=layer)
        if self.glu is not None:
            gate, up = self._signs.pop(layer)
            m = mask.to(gate.device)
            self.glu.update(flat, gate[m], up[m], prompt, position, layer=layer)

    def merge(self, other: NeuronStats) -> NeuronStats:
        if self.hist is not None and other.hist is not None:
            self.hist.merge(other.hist)
        if self.glu is not None and other.glu is not None:
            self.glu.merge(other.glu)
        return self

    def state(self) -> dict[str, np.ndarray]:
        out = {f"h.{k}": v for k, v in self.hist.state().items()} if self.hist is not None else {}
        if self.glu is not None:
            out |= {f"g.{k}": v for k, v in self.glu.state().items()}
        return out

    def save(self, store: Any, checkpoint: Path) -> None:
        """Write the state beside a recorder checkpoint (atomically)."""
        if self.enabled:
            store.write_arrays(str((checkpoint / "neuron_stats.safetensors").relative_to(store.path)), self.state())

    def write(self, store: Any, lm: LoadedModel, ids: Sequence[Sequence[int]], name: str, labels: Sequence[str],
              site: str, all_label: str) -> None:
        """The final tables ``records/<name>/histograms.parquet`` (and ``glu_signs`` / ``glu_exemplars``)."""
        if self.hist is None:
            return
        rel = f"records/{name}"
        counts = self.hist.counts.cpu().numpy().astype(np.int64)                   # (L, K, N, B)
        counts = np.concatenate([counts, counts.sum(1, keepdims=True)], axis=1)
        absmax = self.hist.absmax.cpu().numpy()
        absmax = np.concatenate([absmax, absmax.max(0, keepdims=True)])
        L, K, N, B = counts.shape
        rows = K * L * N
        # rows ordered by (layer, neuron, label): one neuron's rows are adjacent (the viewer reads them together)
        flat = np.ascontiguousarray(counts.transpose(0, 2, 1, 3)).reshape(rows, B)
        all_labels = list(labels) + [all_label]
        store.write_table(f"{rel}/histograms.parquet", pa.table({
            "record": pa.array([name] * rows).dictionary_encode(),
            "site": pa.array([site] * rows).dictionary_encode(),
            "label": pa.array(np.tile(np.array(all_labels, dtype=object), L * N)).dictionary_encode(),
            "layer": np.repeat(np.arange(L, dtype=np.int32), N * K),
            "neuron": np.tile(np.repeat(np.arange(N, dtype=np.int32), K), L),
            "n_tokens": flat.sum(1), "abs_max": absmax.transpose(1, 2, 0).reshape(-1),
            "counts": pa.ListArray.from_arrays(pa.array(np.arange(0, rows * B + 1, B, dtype=np.int32)),
                                               pa.array(flat.reshape(-1))),
        }))
        store.update_manifest(lambda m: m.setdefault("records", {}).setdefault(name, {}).__setitem__(
            "histogram", {"edges": [float(e) for e in EDGES], "bins": N_BINS, "center": CENTER}))
        if self.glu is None:
            return
        g = self.glu
        gc = g.counts.cpu().numpy()
        store.write_table(f"{rel}/glu_signs.parquet", pa.table({
            "record": pa.array([name] * (L * N * 4)).dictionary_encode(),
            "site": pa.array([site] * (L * N * 4)).dictionary_encode(),
            "layer": np.repeat(np.arange(L, dtype=np.int32), N * 4),
            "neuron": np.tile(np.repeat(np.arange(N, dtype=np.int32), 4), L),
            "quadrant": pa.array(np.tile(QUADRANTS, L * N)).dictionary_encode(),
            "n_tokens": gc.reshape(-1)}))
        k = g.k
        vals = g.values.cpu().numpy().reshape(-1)
        keep = np.isfinite(vals)
        p_ids = g.prompt.cpu().numpy().reshape(-1)
        positions = g.position.cpu().numpy().reshape(-1)
        tok = lm.tokenizer
        vocab = np.array(tok.convert_ids_to_tokens(list(range(len(tok)))), dtype=object)
        id_matrix = np.zeros((len(ids), max(len(x) for x in ids)), dtype=np.int64)
        for i, row in enumerate(ids):
            id_matrix[i, : len(row)] = row
        token = vocab[np.minimum(id_matrix[p_ids[keep].clip(0), positions[keep].clip(0)], len(vocab) - 1)]
        store.write_table(f"{rel}/glu_exemplars.parquet", pa.table({
            "record": pa.array([name] * int(keep.sum())).dictionary_encode(),
            "layer": np.repeat(np.arange(L, dtype=np.int32), N * 4 * k)[keep],
            "neuron": np.tile(np.repeat(np.arange(N, dtype=np.int32), 4 * k), L)[keep],
            "quadrant": pa.array(np.tile(np.repeat(QUADRANTS, k), L * N)[keep]).dictionary_encode(),
            "rank": np.tile(np.arange(k, dtype=np.int32), L * N * 4)[keep],
            "prompt_id": p_ids[keep].astype(np.int64), "position": positions[keep],
            "activation": g.act.cpu().numpy().reshape(-1)[keep], "token": token.astype(str)}))
