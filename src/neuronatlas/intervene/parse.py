"""Parse CLI intervention flags such as ``--clamp L12:345=8``, ``--clamp L3:1-4=3xmax``,
``--scale L3:10=0`` and ``--ablate L5:1-20`` into typed interventions.

    >>> from neuronatlas.intervene.parse import parse_intervention
    >>> parse_intervention("clamp", "L1:2=3xmax", max_lookup=lambda ns: [1.5] * len(ns))
    Clamp(neurons=..., value=(4.5,), position='all')
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from neuronatlas.errors import SelectionError
from neuronatlas.intervene.interventions import Ablate, Clamp, Intervention, Position, Scale
from neuronatlas.intervene.neurons import NeuronSet

__all__ = ["parse_intervention", "MaxLookup"]

MaxLookup = Callable[[NeuronSet], Sequence[float]]
_VALUE_RE = re.compile(r"^(-?\d+(?:\.\d*)?(?:e-?\d+)?)(xmax)?$")


def parse_intervention(kind: str, text: str, *, component: str = "mlp", position: Position = "all",
                       n_neurons: int | None = None, max_lookup: MaxLookup | None = None) -> Intervention:
    """``kind`` is ``clamp``, ``scale`` or ``ablate``; ``text`` is ``SELECTOR[=VALUE]``."""
    if kind == "ablate":
        if "=" in text:
            raise SelectionError(f"--ablate takes a selector without a value, got {text!r}; e.g. --ablate L5:1-20")
        return Ablate(NeuronSet.parse(text, component, n_neurons), position=position)
    if "=" not in text:
        raise SelectionError(f"--{kind} needs SELECTOR=VALUE, got {text!r}; e.g. --{kind} L12:345=8")
    selector, value_text = text.rsplit("=", 1)
    neurons = NeuronSet.parse(selector, component, n_neurons)
    match = _VALUE_RE.match(value_text.strip())
    if not match:
        raise SelectionError(f"cannot parse value {value_text!r} in {text!r}; write a number such as 8, -1.5 or 3xmax")
    number = float(match.group(1))
    if kind == "scale":
        if match.group(2):
            raise SelectionError(f"--scale takes a plain factor, got {value_text!r}; e.g. --scale L3:10=0")
        return Scale(neurons, number, position=position)
    if kind != "clamp":
        raise SelectionError(f"unknown intervention kind {kind!r}; choose clamp, scale or ablate")
    if match.group(2):
        if max_lookup is None:
            raise SelectionError(f"{text!r} uses xmax, which needs recorded maxima; pass --atlas with a recorded dataset")
        maxima = list(max_lookup(neurons))
        return Clamp(neurons, tuple(number * m for m in maxima), position=position)
    return Clamp(neurons, number, position=position)
