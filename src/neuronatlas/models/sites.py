"""Sites: the one vocabulary for where neurons live.

A :class:`Site` is a layer and a component; its string form (``L12.mlp``) is the only key used in
storage, CLI flags, URLs and plots. Neurons are addressed as ``L12:345`` (layer 12, index 345).

    >>> from neuronatlas.models.sites import Site, Component
    >>> Site.parse("L12.gate")
    Site(layer=12, component=<Component.GATE: 'gate'>)
    >>> str(Site(3, Component.MLP))
    'L3.mlp'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from neuronatlas.errors import SiteError

__all__ = ["Component", "Site"]


class Component(str, Enum):
    """Which activation of an MLP block is "the neuron".

    ``MLP``: the input of the down-projection (``act(gate(x)) * up(x)`` for gated MLPs, the
    activation output for GPT-2 style MLPs). ``GATE``: ``act(gate(x))`` alone (gated MLPs only).
    """

    MLP = "mlp"
    GATE = "gate"

    @classmethod
    def parse(cls, value: "str | Component") -> "Component":
        if isinstance(value, Component):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(c.value for c in cls)
            raise SiteError(f"unknown site component {value!r}; choose from: {choices}") from None


_SITE_RE = re.compile(r"^L(\d+)\.(\w+)$")


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    component: Component = Component.MLP

    def __str__(self) -> str:
        return f"L{self.layer}.{self.component.value}"

    @classmethod
    def parse(cls, text: str) -> "Site":
        match = _SITE_RE.match(text.strip())
        if not match:
            raise SiteError(f"cannot parse site {text!r}; write it as L<layer>.<component>, e.g. L12.mlp")
        return cls(int(match.group(1)), Component.parse(match.group(2)))
