"""Causal check of a neuron: how much does zero-ablating it change the next-token log-prob?

For each (document, position) the model reads the document up to ``position`` and predicts the
document's next token; the effect is ``log p_ablated(next) - log p_clean(next)``, the neuron
zero-ablated at every position (:class:`~neuronatlas.intervene.Ablate`). Clean and ablated runs share
one batched forward (two conditions). Comparing the mean effect at the neuron's top exemplars with
the mean at random positions tells whether the neuron matters where it fires.

    >>> from neuronatlas.explain.causal import causal_effect
    >>> docs = {"d1": [12, 87, 4, 99]}
    >>> causal_effect(lm, docs, [("d1", 1), ("d1", 2)], layer=1, neuron=17).mean
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from neuronatlas.intervene import Ablate, NeuronSet, forward_conditions
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record.batching import pad_ids

__all__ = ["CausalResult", "causal_effect"]


@dataclass(frozen=True)
class CausalResult:
    deltas: tuple[float, ...]           # one per usable position (a next token exists)

    @property
    def mean(self) -> float:
        return sum(self.deltas) / len(self.deltas) if self.deltas else math.nan


def causal_effect(lm: LoadedModel, docs: Mapping[str, Sequence[int]], positions: Sequence[tuple[str, int]],
                  layer: int, neuron: int, *, component: Component | str = Component.MLP,
                  batch_size: int = 2) -> CausalResult:
    """Mean change of the next token's log-prob at ``positions`` when neuron ``layer:neuron`` is ablated."""
    by_doc: dict[str, list[int]] = {}
    for doc_id, pos in positions:
        if 0 <= pos < len(docs[doc_id]) - 1:
            by_doc.setdefault(doc_id, []).append(pos)
    ablate = Ablate(NeuronSet.of([(layer, neuron)], component))
    deltas: list[float] = []
    items = list(by_doc.items())
    for start in range(0, len(items), batch_size):
        group = items[start:start + batch_size]
        ids = [list(docs[d][: max(ps) + 2]) for d, ps in group]      # nothing after the last needed token
        batch = pad_ids(lm, ids, "right")
        logits = forward_conditions(lm, batch, [(), (ablate,)]).logits
        for row, (_d, ps) in enumerate(group):
            at_pos = torch.tensor(ps, device=logits.device)
            nxt = torch.tensor([ids[row][p + 1] for p in ps], device=logits.device)
            at = torch.arange(len(ps), device=logits.device)
            clean = logits[row, at_pos].double().log_softmax(-1)[at, nxt]
            ablated = logits[len(group) + row, at_pos].double().log_softmax(-1)[at, nxt]
            deltas.extend((ablated - clean).tolist())
    return CausalResult(tuple(deltas))
