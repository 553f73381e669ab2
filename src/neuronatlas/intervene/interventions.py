"""Interventions: small typed values, applied in a scope that always removes its hooks.

    >>> from neuronatlas.intervene import Ablate, Clamp, Scale, Steer, NeuronSet, intervene
    >>> from neuronatlas.record.batching import encode, repeat_batch
    >>> texts = ["The capital of France is", "My favourite animal is"]
    >>> batch = encode(lm, texts)
    >>> ns = NeuronSet.parse("L1:10-20")
    >>> with intervene(lm, [Ablate(ns)]):            # one condition
    ...     logits = lm.model(**batch).logits
    >>> # several conditions in ONE forward: the batch is repeated once per condition
    >>> conds = [(), (Ablate(ns),), (Clamp(ns, 5.0),)]
    >>> with intervene(lm, conds, rows_per_condition=len(texts)):
    ...     logits = lm.model(**repeat_batch(batch, len(conds))).logits

``position="last"`` acts only on each row's last position (the last prompt token in evaluation
helpers, the newest token during generation); ``"all"`` acts at every position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal, Union

import torch

from neuronatlas.errors import InterventionError
from neuronatlas.intervene.neurons import NeuronSet
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record.hooks import site_hooks

__all__ = ["Ablate", "Clamp", "Scale", "Steer", "SteerVector", "Intervention", "Condition", "intervene",
           "normalize_conditions", "Position"]

Position = Literal["all", "last"]


def _check_position(position: str) -> None:
    if position not in ("all", "last"):
        raise InterventionError(f"unknown position {position!r}; choose 'all' or 'last'")


def _per_neuron(value: float | Sequence[float], n: int, what: str) -> tuple[float, ...] | float:
    if isinstance(value, (int, float)):
        return float(value)
    values = tuple(float(v) for v in value)
    if len(values) != n:
        raise InterventionError(f"{what} has {len(values)} values for {n} neurons; give one per neuron or a scalar")
    return values


@dataclass(frozen=True)
class Ablate:
    """Set neurons to 0 (``mode='zero'``) or to given per-neuron means (``mode='mean'``)."""

    neurons: NeuronSet
    mode: Literal["zero", "mean"] = "zero"
    values: tuple[float, ...] | None = None
    position: Position = "all"

    def __post_init__(self) -> None:
        _check_position(self.position)
        if self.mode not in ("zero", "mean"):
            raise InterventionError(f"unknown ablation mode {self.mode!r}; choose 'zero' or 'mean'")
        if self.mode == "mean":
            if self.values is None:
                raise InterventionError("mean ablation needs per-neuron mean values; record a dataset "
                                        "first or use mode='zero'")
            object.__setattr__(self, "values", _per_neuron(self.values, len(self.neurons), "Ablate.values"))

    @property
    def component(self) -> Component:
        return self.neurons.component


@dataclass(frozen=True)
class Clamp:
    """Force neurons to a value (one scalar, or one value per neuron in ``neurons.pairs`` order)."""

    neurons: NeuronSet
    value: float | tuple[float, ...]
    position: Position = "all"

    def __post_init__(self) -> None:
        _check_position(self.position)
        object.__setattr__(self, "value", _per_neuron(self.value, len(self.neurons), "Clamp.value"))

    @property
    def component(self) -> Component:
        return self.neurons.component


@dataclass(frozen=True)
class Scale:
    """Multiply neurons by ``factor`` (0 ablates, 2 doubles)."""

    neurons: NeuronSet
    factor: float
    position: Position = "all"

    def __post_init__(self) -> None:
        _check_position(self.position)

    @property
    def component(self) -> Component:
        return self.neurons.component


@dataclass(frozen=True)
class Steer:
    """Add ``alpha * direction`` to the whole neuron vector of one layer (``direction``: one value per neuron)."""

    layer: int
    direction: tuple[float, ...]
    alpha: float = 1.0
    component: Component = Component.MLP
    position: Position = "all"

    def __post_init__(self) -> None:
        _check_position(self.position)
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        object.__setattr__(self, "component", Component.parse(self.component))


@dataclass(frozen=True)
class SteerVector:
    """Add ``alpha * vector`` to a residual-stream space of one layer (``vector``: ``d_model`` values).

    ``space``: ``resid`` (the decoder layer's output), ``attn_out`` or ``mlp_out`` (see
    :mod:`neuronatlas.directions.spaces`). Directions fitted by :mod:`neuronatlas.directions` are
    unit vectors, so ``alpha`` is the length added, in activation units.
    """

    layer: int
    vector: tuple[float, ...]
    alpha: float = 1.0
    space: str = "resid"
    position: Position = "all"

    def __post_init__(self) -> None:
        from neuronatlas.directions.spaces import Space

        _check_position(self.position)
        object.__setattr__(self, "vector", tuple(float(v) for v in self.vector))
        object.__setattr__(self, "space", Space.parse(self.space).value)
        if not all(math.isfinite(v) for v in self.vector) or not math.isfinite(self.alpha):
            raise InterventionError(f"SteerVector at layer {self.layer} has a non-finite value; give finite "
                                    "vector entries and alpha")

    def __repr__(self) -> str:  # the vector is long: name it by its norm
        norm = math.sqrt(sum(v * v for v in self.vector))
        return (f"SteerVector(layer={self.layer}, space={self.space!r}, alpha={self.alpha:g}, "
                f"|vector|={norm:.3g}, position={self.position!r})")


Intervention = Union[Ablate, Clamp, Scale, Steer, SteerVector]
Condition = tuple[Intervention, ...]
_KINDS = (Ablate, Clamp, Scale, Steer, SteerVector)


def normalize_conditions(conditions: Sequence[Intervention | Sequence[Intervention]]) -> list[Condition]:
    """Accept a list of conditions, each an intervention or a sequence of them; () is the baseline."""
    out: list[Condition] = []
    for cond in conditions:
        if isinstance(cond, _KINDS):
            out.append((cond,))
        else:
            items = tuple(cond)
            for item in items:
                if not isinstance(item, _KINDS):
                    raise InterventionError(f"{item!r} is not an intervention; use Ablate, Clamp, Scale, Steer "
                                            "or SteerVector")
            out.append(items)
    return out


@dataclass
class _Op:
    kind: str                      # "set", "scale", "add"
    idx: torch.Tensor | None       # neuron indices (None: all neurons)
    value: torch.Tensor            # broadcast over the selected neurons
    last: bool


def _ops_for(iv: Ablate | Clamp | Scale | Steer, layer: int, n_neurons: int, device: torch.device | None = None) -> _Op | None:
    """The op ``iv`` applies at ``layer``, its tensors built once on ``device`` (the model's), so no
    forward pass copies them again."""
    if isinstance(iv, Steer):
        if iv.layer != layer:
            return None
        if len(iv.direction) != n_neurons:
            raise InterventionError(f"Steer direction has {len(iv.direction)} values; layer {layer} has {n_neurons} neurons")
        return _Op("add", None, iv.alpha * torch.tensor(iv.direction, device=device), iv.position == "last")
    per_layer = iv.neurons.by_layer()
    if layer not in per_layer:
        return None
    wanted = per_layer[layer]
    if max(wanted) >= n_neurons:
        raise InterventionError(f"neuron L{layer}:{max(wanted)} is out of range; layers have {n_neurons} neurons")
    idx = torch.tensor(wanted, dtype=torch.long, device=device)
    # positions of this layer's neurons in the set's order, for per-neuron values
    order = [i for i, (lay, _) in enumerate(iv.neurons.pairs) if lay == layer]
    last = iv.position == "last"
    if isinstance(iv, Ablate):
        vals = (torch.zeros(len(wanted), device=device) if iv.mode == "zero"
                else torch.tensor([iv.values[i] for i in order], device=device))  # type: ignore[index]
        return _Op("set", idx, vals, last)
    if isinstance(iv, Clamp):
        value = iv.value
        vals = (torch.full((len(wanted),), value, device=device) if isinstance(value, float)
                else torch.tensor([value[i] for i in order], device=device))
        return _Op("set", idx, vals, last)
    return _Op("scale", idx, torch.tensor(float(iv.factor), device=device), last)


def _apply(op: _Op, hs: torch.Tensor, last_index: torch.Tensor | None) -> None:
    """Apply ``op`` in place to ``hs`` (rows of one condition, shape (B, T, N))."""
    value = op.value.to(hs.dtype).to(hs.device)
    if op.last:
        rows = torch.arange(hs.shape[0], device=hs.device)
        pos = torch.full_like(rows, hs.shape[1] - 1) if last_index is None or hs.shape[1] == 1 else last_index.to(hs.device)
        target = hs[rows, pos]  # (B, N) copy
        _update(op, target, value)
        hs[rows, pos] = target
    else:
        _update(op, hs, value)


def _update(op: _Op, t: torch.Tensor, value: torch.Tensor) -> None:
    if op.idx is None:
        t += value
        return
    idx = op.idx.to(t.device)
    if op.kind == "set":
        t[..., idx] = value
    elif op.kind == "scale":
        t[..., idx] = t[..., idx] * value


@contextmanager
def intervene(lm: LoadedModel, conditions: Sequence[Intervention | Sequence[Intervention]], *,
              rows_per_condition: int | None = None, last_index: torch.Tensor | None = None) -> Iterator[None]:
    """Apply conditions inside the block; condition c acts on batch rows ``[c*R, (c+1)*R)``.

    With one condition ``rows_per_condition`` may be omitted (it acts on every row). ``last_index``:
    per-row index (shape ``(R,)``) of the position ``position='last'`` acts on; default the final one.
    """
    conds = normalize_conditions(conditions)
    if len(conds) > 1 and rows_per_condition is None:
        raise InterventionError("several conditions need rows_per_condition (the batch size of one condition)")
    n = lm.n_neurons
    for cond in conds:
        for iv in cond:
            if isinstance(iv, SteerVector):
                _check_vector(lm, iv)
                continue
            if not isinstance(iv, Steer):
                iv.neurons.validate(lm.n_layers, n)
            lm.spec.check_component(iv.component)
    batch_size = (rows_per_condition or 0) * len(conds) or None
    with ExitStack() as stack:
        _enter_vector_hooks(stack, lm, conds, rows_per_condition, last_index, batch_size)
        for component in lm.spec.components:
            plan: dict[int, list[tuple[int, _Op]]] = {}
            for c, cond in enumerate(conds):
                for iv in cond:
                    if isinstance(iv, SteerVector) or iv.component is not component:
                        continue
                    layers = [iv.layer] if isinstance(iv, Steer) else iv.neurons.layers
                    for layer in layers:
                        op = _ops_for(iv, layer, n, lm.device)
                        if op is not None:
                            plan.setdefault(layer, []).append((c, op))
            if not plan:
                continue

            stack.enter_context(site_hooks(lm, component, edit=_edit_fn(plan, rows_per_condition, last_index),
                                           layers=sorted(plan), batch_size=batch_size))
        yield


def _check_vector(lm: LoadedModel, iv: SteerVector) -> None:
    width = int(lm.config.hidden_size)
    if not 0 <= iv.layer < lm.n_layers:
        raise InterventionError(f"SteerVector layer {iv.layer} is out of range; the model has layers 0..{lm.n_layers - 1}")
    if len(iv.vector) != width:
        raise InterventionError(f"SteerVector has {len(iv.vector)} values; this model's {iv.space} has {width}: "
                                "fit the direction on this model")


def _edit_fn(plan: dict[int, list[tuple[int, _Op]]], rows_per_condition: int | None,
             last_index: torch.Tensor | None) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
    def edit(layer: int, h: torch.Tensor) -> torch.Tensor | None:
        ops = plan.get(layer)
        if not ops:
            return None
        h = h.clone()
        rows = rows_per_condition or h.shape[0]
        for c, op in ops:
            _apply(op, h[c * rows:(c + 1) * rows], last_index)
        return h

    return edit


def _enter_vector_hooks(stack: ExitStack, lm: LoadedModel, conds: list[Condition], rows_per_condition: int | None,
                        last_index: torch.Tensor | None, batch_size: int | None) -> None:
    """Register one hook per (space, layer) that the conditions' SteerVectors add to."""
    from neuronatlas.directions.spaces import stream_hooks

    plans: dict[str, dict[int, list[tuple[int, _Op]]]] = {}
    for c, cond in enumerate(conds):
        for iv in cond:
            if isinstance(iv, SteerVector):
                value = iv.alpha * torch.tensor(iv.vector, device=lm.device)
                plans.setdefault(iv.space, {}).setdefault(iv.layer, []).append(
                    (c, _Op("add", None, value, iv.position == "last")))
    for space, plan in plans.items():
        stack.enter_context(stream_hooks(lm, space, edit=_edit_fn(plan, rows_per_condition, last_index),
                                         layers=sorted(plan), batch_size=batch_size))
