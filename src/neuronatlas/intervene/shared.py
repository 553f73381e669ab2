"""One forward pass under several conditions, computing the layers no condition touches only once.

Every condition of a sweep sees the same input; up to the first layer any condition intervenes on,
their activations are identical. :func:`forward_conditions` therefore runs the batch once (``B``
rows) up to that layer, then runs the remaining layers on the batch repeated once per condition
(``C x B`` rows, condition-major, as :func:`neuronatlas.intervene.intervene` expects), with the
layers already computed replaced, for that second pass only, by modules that hand back their
stored output. For C conditions whose first intervened layer is k of L, the layer work falls from
``C x L`` to ``k + C x (L - k)`` row-blocks; the result equals the plain repeated pass up to float
rounding (matrix products on B rather than C x B rows).

    >>> from neuronatlas.intervene.shared import forward_conditions
    >>> from neuronatlas.intervene import Ablate, Clamp, NeuronSet
    >>> conds = [(), (Ablate(NeuronSet.parse("L1:1-20")),), (Clamp(NeuronSet.parse("L1:7"), 5.0),)]
    >>> out = forward_conditions(lm, batch, conds, logits_to_keep=1)   # logits of 3 x B rows; layer 0 runs once

``past`` continues every row from cached keys/values of a shared prefix (see
:mod:`neuronatlas.evaluate.prefix`): the shared pass continues the clean prefix (variant 0), which
every condition shares below its first intervened layer; the full pass continues, for condition c,
the prefix variant ``past_variants[c]`` (the prefix as computed under c's all-position interventions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from neuronatlas.intervene.interventions import (
    Condition, Intervention, Steer, SteerVector, intervene, normalize_conditions,
)
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import forward, forward_through, repeat_batch

__all__ = ["first_intervened_layer", "forward_conditions", "PastSource"]


class PastSource(Protocol):
    """Cached keys/values of a prefix, one stored row per prefix variant (row 0: the unmodified model)."""

    def model_kwargs(self, variants: Sequence[int], rows: int) -> dict[str, Any]:
        """Model arguments (a fresh cache) for ``len(variants)`` blocks of ``rows`` rows, block b
        continuing variant ``variants[b]``."""
        ...


def first_intervened_layer(conditions: Sequence[Condition], n_layers: int) -> int:
    """The lowest layer any intervention of ``conditions`` acts on (``n_layers`` when none does)."""
    layers = [iv.layer if isinstance(iv, (Steer, SteerVector)) else min(iv.neurons.layers, default=n_layers)
              for cond in conditions for iv in cond]
    return min(layers, default=n_layers)


class _Replay(nn.Module):
    """Stands in for an already computed layer: returns the stored output, ignores its input.

    Attribute reads the model's layer loop may do (e.g. Gemma 3's ``attention_type``) go to the
    original layer."""

    def __init__(self, original: nn.Module, output: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_output", output)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._output

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


def _repeat(obj: Any, rows: int, times: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.repeat(times, *([1] * (obj.dim() - 1))) if obj.dim() and obj.shape[0] == rows else obj
    if isinstance(obj, tuple):
        return tuple(_repeat(o, rows, times) for o in obj)
    if isinstance(obj, list):
        return [_repeat(o, rows, times) for o in obj]
    return obj


def forward_conditions(lm: LoadedModel, batch: dict[str, torch.Tensor],
                       conditions: Sequence[Intervention | Sequence[Intervention]], *,
                       last_index: torch.Tensor | None = None, share_prefix: bool = True,
                       past: PastSource | None = None, past_variants: Sequence[int] | None = None,
                       **kwargs: Any) -> Any:
    """The model's output on ``batch`` repeated once per condition (rows condition-major), each block
    under its condition; ``kwargs`` go to the model (e.g. ``logits_to_keep``). ``share_prefix=False``
    runs the plain repeated pass. ``past``: continue from a cached prefix (``batch``'s attention mask
    then covers prefix and new tokens); ``past_variants``: the prefix variant of each condition
    (default: 0, the clean prefix, for all)."""
    conds = normalize_conditions(conditions)
    rows = batch["input_ids"].shape[0]
    first = min(first_intervened_layer(conds, lm.n_layers), lm.n_layers - 1)
    variants = list(past_variants) if past_variants is not None else [0] * len(conds)

    def full_pass() -> Any:
        extra = past.model_kwargs(variants, rows) if past is not None else {}
        return forward(lm, repeat_batch(batch, len(conds)), **extra, **kwargs)

    with intervene(lm, conds, rows_per_condition=rows, last_index=last_index):
        if not share_prefix or len(conds) == 1 or first == 0:
            return full_pass()
        module_list = lm.spec.layer_container(lm.model)
        # below `first` no condition acts, so every condition's prefix keys/values equal the clean ones
        output = forward_through(lm, batch, first - 1, **(past.model_kwargs([0], rows) if past is not None else {}))
        if output is None:         # the model never reached the layer: fall back to the plain pass
            return full_pass()
        shared = _repeat(output, rows, len(conds))
        originals = [module_list[i] for i in range(first)]
        try:
            for i in range(first):
                module_list[i] = _Replay(originals[i], shared)
            return full_pass()
        finally:
            for i, original in enumerate(originals):
                module_list[i] = original
