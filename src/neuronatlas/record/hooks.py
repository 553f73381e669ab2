"""Scoped PyTorch hooks on neuron sites: the only place NeuronAtlas touches a model's forward.

:func:`site_hooks` registers one hook per layer on the site's module (a forward pre-hook on the
down-projection for the ``mlp`` site, a forward hook on the activation module for ``gate``), calls
``edit`` (may return a modified activation) and then ``observe`` (reads it), and removes every handle
on exit, also after an exception. Activations are passed as ``(batch, tokens, neurons)``.

    >>> from neuronatlas.record.hooks import site_hooks
    >>> seen = {}
    >>> with site_hooks(lm, "mlp", observe=lambda layer, h: seen.__setitem__(layer, h.clone())):
    ...     lm.model(**batch)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component

__all__ = ["site_hooks", "EditFn", "ObserveFn", "count_hooks", "edit_then_observe"]

EditFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]
ObserveFn = Callable[[int, torch.Tensor], None]


def _as_3d(h: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """OPT flattens (batch, tokens) before its MLP; view such a tensor as 3-D again."""
    if h.dim() == 3:
        return h
    if batch_size is None:
        return h.unsqueeze(0)
    return h.view(batch_size, -1, h.shape[-1])


def edit_then_observe(layer: int, h: torch.Tensor, edit: EditFn | None, observe: ObserveFn | None,
                      batch_size: int | None) -> torch.Tensor | None:
    """What every hook does with an activation: view it as (batch, tokens, width), let ``edit``
    replace it, let ``observe`` read the result; the replacement in ``h``'s own shape, or None."""
    h3 = _as_3d(h, batch_size)
    changed = None
    if edit is not None:
        changed = edit(layer, h3)
        if changed is not None:
            h3 = changed
    if observe is not None:
        observe(layer, h3)
    return None if changed is None else changed.reshape(h.shape)


@contextmanager
def site_hooks(lm: LoadedModel, component: Component | str = Component.MLP, *,
               edit: EditFn | None = None, observe: ObserveFn | None = None,
               layers: Sequence[int] | None = None, batch_size: int | None = None) -> Iterator[None]:
    """Hook the neuron site of every layer (or of ``layers``) for the duration of the block.

    ``batch_size`` is needed only for families that flatten tokens before the MLP (OPT).
    """
    comp = lm.spec.check_component(component)
    chosen = range(lm.n_layers) if layers is None else layers
    handles: list[Any] = []

    def process(layer: int, h: torch.Tensor) -> torch.Tensor | None:
        return edit_then_observe(layer, h, edit, observe, batch_size)

    try:
        for layer in chosen:
            module = lm.spec.hook_module(lm.model, layer, comp)
            if comp is Component.MLP:
                def pre_hook(_m: Any, args: tuple[Any, ...], _layer: int = layer) -> Any:
                    out = process(_layer, args[0])
                    return None if out is None else (out, *args[1:])

                handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                def fwd_hook(_m: Any, _args: Any, output: torch.Tensor, _layer: int = layer) -> Any:
                    return process(_layer, output)

                handles.append(module.register_forward_hook(fwd_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: torch.nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere in ``model`` (tests assert it is 0)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
