"""Neuron sets and the selector syntax shared by the CLI and the library.

Selectors: ``L12:345`` (one neuron), ``L5:1-20`` (a range, inclusive), ``L3:4,9,17`` (a list),
``L7:*`` (a whole layer), several joined by ``;`` or whitespace, or ``@file`` naming a JSON/JSONL/CSV
file with ``layer`` and ``neuron`` columns (what ``neuronatlas`` commands write).

    >>> from neuronatlas.intervene import NeuronSet
    >>> NeuronSet.parse("L12:345 L5:1-3").pairs
    ((5, 1), (5, 2), (5, 3), (12, 345))
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from neuronatlas.errors import SelectionError
from neuronatlas.ids import NeuronId
from neuronatlas.models.sites import Component

__all__ = ["NeuronSet", "parse_neuron"]

_PART_RE = re.compile(r"^[Ll]?(\d+):(\*|\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")


@dataclass(frozen=True)
class NeuronSet:
    """A sorted, duplicate-free set of (layer, neuron) pairs on one site component."""

    pairs: tuple[tuple[int, int], ...]
    component: Component = Component.MLP

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", tuple(sorted(set((int(a), int(b)) for a, b in self.pairs))))
        object.__setattr__(self, "component", Component.parse(self.component))

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.pairs)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.pairs})

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, neuron in self.pairs:
            out.setdefault(layer, []).append(neuron)
        return out

    def validate(self, n_layers: int, n_neurons: int) -> "NeuronSet":
        for layer, neuron in self.pairs:
            if not 0 <= layer < n_layers:
                raise SelectionError(f"layer {layer} in {NeuronId(layer, neuron)} is out of range; the model has layers 0-{n_layers - 1}")
            if not 0 <= neuron < n_neurons:
                raise SelectionError(f"neuron index {neuron} in {NeuronId(layer, neuron)} is out of range; layers have neurons 0-{n_neurons - 1}")
        return self

    def ids(self) -> list[NeuronId]:
        """The neurons as :class:`~neuronatlas.ids.NeuronId` (in ``pairs`` order)."""
        return [NeuronId(layer, neuron) for layer, neuron in self.pairs]

    def __str__(self) -> str:
        """The selector form: ``L12:345`` per single neuron, ``L5:1,2,3`` for several in one layer."""
        return " ".join(str(NeuronId(layer, ns[0])) if len(ns) == 1 else f"{NeuronId(layer, ns[0])},{','.join(map(str, ns[1:]))}"
                        for layer, ns in self.by_layer().items())

    @classmethod
    def of(cls, pairs: Iterable[tuple[int, int]], component: Component | str = Component.MLP) -> "NeuronSet":
        return cls(tuple(pairs), Component.parse(component))

    @classmethod
    def parse(cls, selector: str, component: Component | str = Component.MLP,
              n_neurons: int | None = None) -> "NeuronSet":
        """Parse the selector syntax of the module docstring; ``L7:*`` needs ``n_neurons``."""
        text = selector.strip()
        if not text:
            raise SelectionError("empty neuron selector; write e.g. L12:345 or L5:1-20")
        pairs: list[tuple[int, int]] = []
        for part in re.split(r"[;\s]+", text):
            if not part:
                continue
            if part.startswith("@"):
                pairs.extend(_read_selection_file(Path(part[1:])))
                continue
            pairs.extend(parse_neuron(part, n_neurons))
        return cls(tuple(pairs), Component.parse(component))


def parse_neuron(part: str, n_neurons: int | None = None) -> list[tuple[int, int]]:
    """One selector part as (layer, neuron) pairs; single ids go through :meth:`NeuronId.parse`."""
    if "-" not in part and "," not in part and "*" not in part:
        try:
            return [NeuronId.parse(part).pair]
        except SelectionError:
            pass  # reported below with the whole selector syntax
    match = _PART_RE.match(part)
    if not match:
        raise SelectionError(f"cannot parse neuron selector {part!r}; write L<layer>:<index>, "
                             "L<layer>:<a>-<b>, L<layer>:<i>,<j> or L<layer>:*")
    layer, spec = int(match.group(1)), match.group(2)
    if spec == "*":
        if n_neurons is None:
            raise SelectionError(f"selector {part!r} needs the model's width; pass n_neurons")
        return [(layer, j) for j in range(n_neurons)]
    out: list[tuple[int, int]] = []
    for item in spec.split(","):
        if "-" in item:
            lo, hi = (int(x) for x in item.split("-"))
            if hi < lo:
                raise SelectionError(f"range {item!r} in {part!r} runs backwards; write {NeuronId(layer, hi)}-{lo}")
            out.extend((layer, j) for j in range(lo, hi + 1))
        else:
            out.append((layer, int(item)))
    return out


def _read_selection_file(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        raise SelectionError(f"selection file {str(path)!r} not found; check the path after '@'")
    suffix = path.suffix.lower()
    rows: list[dict[str, object]]
    if suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        text = path.read_text()
        try:
            data = json.loads(text)
            if isinstance(data, dict) and "layer" in data and "neuron" in data:
                rows = [data]  # a JSONL file with a single selection line
            else:
                rows = data if isinstance(data, list) else data.get("neurons", [])
        except json.JSONDecodeError:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        return [(int(r["layer"]), int(r["neuron"])) for r in rows]  # type: ignore[call-overload, arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise SelectionError(f"selection file {str(path)!r} needs integer 'layer' and 'neuron' columns ({exc})") from None
