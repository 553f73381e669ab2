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

__all__ = ["parse_intervention", "parse_value", "MaxLookup", "MAX_MAGNITUDE"]

MaxLookup = Callable[[NeuronSet], Sequence[float]]
_VALUE_RE = re.compile(r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?)(xmax)?$", re.IGNORECASE)
# Clamp values and scale factors beyond this magnitude are refused: they overflow half-precision
# activations (float16 max 65504) and drive the logits to inf/NaN instead of steering the model.
MAX_MAGNITUDE = 1e4


def parse_value(value_text: str, *, kind: str = "clamp", context: str | None = None) -> tuple[float, bool]:
    """``8`` -> (8.0, False); ``3xmax`` -> (3.0, True). Finite numbers within +-MAX_MAGNITUDE only."""
    where = f" in {context!r}" if context else ""
    match = _VALUE_RE.match(value_text.strip())
    if not match:
        try:
            number = float(value_text)
        except ValueError:
            raise SelectionError(f"cannot parse value {value_text!r}{where}; write a number such as 8, -1.5 or "
                                 "3xmax") from None
    else:
        number = float(match.group(1))
    if not abs(number) <= MAX_MAGNITUDE:
        hint = ", or a multiple of the recorded max such as 3xmax" if kind == "clamp" else ""
        raise SelectionError(f"{kind} value {value_text!r}{where} is out of range; use a finite number within "
                             f"+-{MAX_MAGNITUDE:g} (larger values overflow the activations to inf/NaN){hint}")
    return number, bool(match is not None and match.group(2))


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
    number, relative = parse_value(value_text, kind=kind, context=text)
    if kind == "scale":
        if relative:
            raise SelectionError(f"--scale takes a plain factor, got {value_text!r}; e.g. --scale L3:10=0")
        return Scale(neurons, number, position=position)
    if kind != "clamp":
        raise SelectionError(f"unknown intervention kind {kind!r}; choose clamp, scale or ablate")
    if relative:
        if max_lookup is None:
            raise SelectionError(f"{text!r} uses xmax, which needs recorded maxima; pass --atlas with a recorded dataset")
        values = tuple(number * float(m) for m in max_lookup(neurons))
        if not all(abs(v) <= MAX_MAGNITUDE for v in values):
            raise SelectionError(f"{text!r} gives clamp values beyond +-{MAX_MAGNITUDE:g} (recorded maxima times "
                                 f"{number:g}); use a smaller multiple")
        return Clamp(neurons, values, position=position)
    return Clamp(neurons, number, position=position)
