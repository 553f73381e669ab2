"""Activation spaces of the residual stream: where directions live and steering adds.

Per decoder layer ``L``:

- ``resid``: the output of decoder layer ``L`` (the residual stream after block ``L``);
- ``attn_out``: the output of layer ``L``'s attention module (before any post-attention norm, as
  in Gemma), what the heads together write;
- ``mlp_out``: the output of layer ``L``'s MLP down-projection, what the neurons together write.

Each is a ``d_model``-wide vector per token. :func:`stream_hooks` hooks one space the way
:func:`neuronatlas.record.hooks.site_hooks` hooks neuron sites: ``edit`` may return a changed
activation, ``observe`` reads it, and every handle is removed on exit.

    >>> from neuronatlas.directions.spaces import Space, stream_hooks
    >>> seen = {}
    >>> with stream_hooks(lm, "resid", observe=lambda layer, h: seen.__setitem__(layer, h.clone())):
    ...     lm.model(**batch)                                                      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import nn

from neuronatlas.errors import SiteError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.hooks import EditFn, ObserveFn, edit_then_observe

__all__ = ["Space", "stream_hooks", "space_module"]


class Space(str, Enum):
    RESID = "resid"
    ATTN_OUT = "attn_out"
    MLP_OUT = "mlp_out"

    @classmethod
    def parse(cls, value: "str | Space") -> "Space":
        if isinstance(value, Space):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(s.value for s in cls)
            raise SiteError(f"unknown activation space {value!r}; choose from: {choices}") from None


def space_module(lm: LoadedModel, space: Space | str, layer: int) -> nn.Module:
    """The module whose output is ``space`` at ``layer``."""
    sp = Space.parse(space)
    if sp is Space.RESID:
        return lm.spec.layer_modules(lm.model)[layer]
    if sp is Space.ATTN_OUT:
        return lm.spec.attn_module(lm.model, layer)
    return lm.spec.down_module(lm.model, layer)


def check_layers(lm: LoadedModel, layers: Sequence[int]) -> list[int]:
    out = [int(x) for x in layers]
    for layer in out:
        if not 0 <= layer < lm.n_layers:
            raise SiteError(f"layer {layer} is out of range; {lm.config.model_type} has layers 0..{lm.n_layers - 1}")
    return out


@contextmanager
def stream_hooks(lm: LoadedModel, space: Space | str, *, edit: EditFn | None = None,
                 observe: ObserveFn | None = None, layers: Sequence[int] | None = None,
                 batch_size: int | None = None) -> Iterator[None]:
    """Hook ``space`` at every layer (or at ``layers``) for the duration of the block.

    Activations are passed as ``(batch, tokens, d_model)``; ``batch_size`` is needed only for
    families that flatten tokens inside the MLP (OPT, ``mlp_out``).
    """
    sp = Space.parse(space)
    chosen = range(lm.n_layers) if layers is None else check_layers(lm, layers)
    handles: list[Any] = []

    def process(layer: int, output: Any) -> Any:
        is_tuple = isinstance(output, tuple)
        new = edit_then_observe(layer, output[0] if is_tuple else output, edit, observe, batch_size)
        if new is None:
            return None
        return (new, *output[1:]) if is_tuple else new

    try:
        for layer in chosen:
            module = space_module(lm, sp, layer)

            def hook(_m: Any, _args: Any, output: Any, _layer: int = layer) -> Any:
                return process(_layer, output)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
