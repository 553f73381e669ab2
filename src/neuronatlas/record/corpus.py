"""The corpus exemplar stream: per-layer top-k and random exemplars of every neuron, in one forward pass.

:class:`ExemplarStream` hooks every layer of a model and updates a
:class:`~neuronatlas.record.exemplar_stats.WindowTopK` and a
:class:`~neuronatlas.record.exemplar_stats.Reservoir` per layer and batch, inside the forward pass,
with one seeded ``torch.Generator``; it is the corpus counterpart of the prompt recorder
(:mod:`neuronatlas.record.recorder`).

    >>> from neuronatlas.record.corpus import ExemplarStream
    >>> stream = ExemplarStream(lm, top_k=20, n_random=5, before=32, after=8, seed=0)
    >>> stream.update([[12, 87, 4], [55, 9]], doc_index=[0, 1])     # token ids of two documents
    >>> stream.top[1].top.values.shape       # layer 1: (neurons, 20)
    >>> stream.top[1].windows.shape          # (neurons, 20, 32 + 1 + 8), NaN outside the document
    >>> stream.random[1].top.position        # (neurons, 5) positions of the random sample
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record.batching import forward_through, pad_ids
from neuronatlas.record.exemplar_stats import Reservoir, WindowTopK
from neuronatlas.record.hooks import site_hooks

__all__ = ["ExemplarStream"]


class ExemplarStream:
    """Per-layer top-k and random exemplars of every neuron of ``lm``, updated batch by batch.

    ``skip_ids``: token ids never counted as exemplars (by default the tokenizer's special tokens,
    such as BOS, whose activations are outliers); they still appear inside windows.
    """

    def __init__(self, lm: LoadedModel, *, top_k: int = 20, n_random: int = 5, before: int = 32,
                 after: int = 8, seed: int = 0, component: Component | str = Component.MLP,
                 skip_ids: Sequence[int] | None = None) -> None:
        self.lm = lm
        self.component = lm.spec.check_component(component)
        self.before, self.after = before, after
        device = lm.device
        n, layers = lm.n_neurons, lm.n_layers
        self.top = [WindowTopK.empty(n, top_k, before, after, device) for _ in range(layers)]
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.reservoirs = [Reservoir(n, n_random, before, after, self.generator, device)
                           for _ in range(layers)] if n_random else []
        ids = lm.tokenizer.all_special_ids if skip_ids is None else skip_ids
        self.skip_ids = torch.tensor(sorted({int(i) for i in ids}), dtype=torch.long)
        self.tokens_seen = 0

    def update(self, ids: Sequence[Sequence[int]], doc_index: Sequence[int]) -> None:
        """Run one batch of documents (token id lists, each non-empty) and update every layer."""
        lm = self.lm
        batch = pad_ids(lm, ids, "right")
        device = lm.device
        mask = batch["attention_mask"].bool()
        if len(self.skip_ids):
            mask &= ~torch.isin(batch["input_ids"], self.skip_ids)
        counted = mask.reshape(-1).to(device)
        counted_index = counted.nonzero()[:, 0]
        lengths = batch["attention_mask"].sum(1).to(device)
        doc = torch.as_tensor(list(doc_index), dtype=torch.int32, device=device)
        start = self.tokens_seen

        def observe(layer: int, h: torch.Tensor) -> None:
            self.top[layer].update(h, counted, doc, lengths)
            if self.reservoirs:
                self.reservoirs[layer].update(start, h, counted_index, doc, lengths)

        with site_hooks(lm, self.component, observe=observe, batch_size=len(ids)):
            forward_through(lm, batch)             # nothing after the last layer is needed
        self.tokens_seen += int(counted_index.numel())

    def merge(self, other: "ExemplarStream") -> "ExemplarStream":
        """Fold in a finished stream over a *later* part of the corpus (a shard; same model and settings).

        Top-k entries merge exactly (ties keep this stream's, earlier, entries, as one pass would);
        the random samples merge by key, which keeps a uniform sample of both parts' tokens (with
        each shard's own generator, so not the draw of one pass). The merged stream is final: its
        generator is not meant to continue.
        """
        for mine, theirs in zip(self.top, other.top):
            mine.merge(theirs)
        for res, theirs_res in zip(self.reservoirs, other.reservoirs):
            res.sample.merge(theirs_res.sample)
        self.tokens_seen += other.tokens_seen
        return self

    @property
    def random(self) -> list[WindowTopK]:
        """Per layer, the random sample (values are the sampling keys, not activations)."""
        return [r.sample for r in self.reservoirs]

    def referenced_docs(self) -> set[int]:
        """Indices of every document some entry points to."""
        out: set[int] = set()
        for part in (*self.top, *self.random):
            docs = part.top.prompt[torch.isfinite(part.top.values)]
            out.update(int(d) for d in torch.unique(docs).tolist())
        return out

    # --- checkpointing ---------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for kind, parts in (("top", self.top), ("random", self.random)):
            if not parts:
                continue
            states = [p.state() for p in parts]
            for key in states[0]:
                out[f"{kind}.{key}"] = np.stack([s[key] for s in states])
        if self.reservoirs:
            out["random.next_at"] = torch.stack([r.next_at for r in self.reservoirs]).cpu().numpy()
        out["generator"] = self.generator.get_state().numpy()
        out["tokens_seen"] = np.array([self.tokens_seen], dtype=np.int64)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        device = self.lm.device
        for kind in ("top", "random"):
            if f"{kind}.values" not in state:
                continue
            parts = [WindowTopK.from_state({k: state[f"{kind}.{k}"][layer] for k in
                                            ("values", "prompt", "position", "windows")},
                                           self.before, self.after, device)
                     for layer in range(state[f"{kind}.values"].shape[0])]
            if kind == "top":
                self.top = parts
            else:
                for layer, (res, part) in enumerate(zip(self.reservoirs, parts)):
                    res.sample = part
                    res.next_at = torch.from_numpy(np.array(state["random.next_at"][layer])).to(device)
        self.generator.set_state(torch.from_numpy(np.array(state["generator"])))
        self.tokens_seen = int(state["tokens_seen"][0])
