"""Neuron ids: the one string form of a neuron, used in storage, CLI flags, URLs, plots and JSON.

A :class:`NeuronId` is a layer and an index, optionally on a site component (``mlp``, ``gate``).
Its canonical string is ``L12:345``; :meth:`NeuronId.parse` also accepts what users type
(``l12:345``, ``12:345``, the viewer's URL form ``L12/345``) and, with a component, ``L12.gate:345``.
This module is a leaf (no torch, no other neuronatlas module but errors), so every layer may use it.

    >>> from neuronatlas.ids import NeuronId
    >>> str(NeuronId(12, 345))
    'L12:345'
    >>> NeuronId.parse("l12/345")
    NeuronId(layer=12, index=345, component=None)
    >>> NeuronId(3, 17).url_path()
    'L3/17'
    >>> NeuronId.find("12 345")              # lenient, for search boxes; None when no neuron is named
    NeuronId(layer=12, index=345, component=None)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from neuronatlas.errors import SelectionError

__all__ = ["NeuronId", "ACCEPTED_FORMS", "neuron_str"]

ACCEPTED_FORMS = "L<layer>:<index> (e.g. L12:345; also l12:345, 12:345, L12/345 or L12.gate:345)"
_ID_RE = re.compile(r"^[Ll]?(\d{1,6})(?:\.([a-z]+))?[:/](\d{1,9})$")
# what a search box may hold: any one of / : . , or spaces between layer and index
_LOOSE_RE = re.compile(r"^\s*[Ll]?(\d{1,4})\s*[/:.,\s]\s*(\d{1,7})\s*$")


@dataclass(frozen=True, order=True)
class NeuronId:
    """One neuron: ``layer``, ``index`` within the layer, and the site ``component`` when it matters."""

    layer: int
    index: int
    component: str | None = None

    def __post_init__(self) -> None:
        if int(self.layer) < 0 or int(self.index) < 0:
            raise SelectionError(f"neuron id L{self.layer}:{self.index} has a negative part; layers and "
                                 "indices start at 0")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "index", int(self.index))

    def __str__(self) -> str:
        site = f".{self.component}" if self.component else ""
        return f"L{self.layer}{site}:{self.index}"

    def url_path(self) -> str:
        """The viewer's path segment ``L12/345`` (the component is not part of viewer URLs)."""
        return f"L{self.layer}/{self.index}"

    @property
    def pair(self) -> tuple[int, int]:
        return self.layer, self.index

    @classmethod
    def parse(cls, text: str) -> "NeuronId":
        """Parse one neuron id; raise :class:`SelectionError` naming ``text`` and the accepted forms."""
        match = _ID_RE.match(str(text).strip())
        if not match:
            raise SelectionError(f"cannot parse neuron id {text!r}; write {ACCEPTED_FORMS}")
        return cls(int(match.group(1)), int(match.group(3)), match.group(2))

    @classmethod
    def find(cls, text: str) -> "NeuronId | None":
        """The neuron a search box's ``text`` names (``L12:345``, ``l12/345``, ``12 345``, ``12,345``), else None."""
        match = _LOOSE_RE.match(text)
        return cls(int(match.group(1)), int(match.group(2))) if match else None

    @classmethod
    def from_url(cls, layer: str, index: str) -> "NeuronId":
        """Parse the two URL segments of ``/neuron/L12/345``."""
        return cls.parse(f"{layer}/{index}")


def neuron_str(layer: int, index: int) -> str:
    """The canonical string of neuron ``index`` in ``layer`` (``L12:345``), for table and JSON cells."""
    return str(NeuronId(layer, index))
