"""Attributions from the decomposition: per input token, per head / MLP block / MLP neuron.

A component is named in the project's vocabulary: ``L12:345`` (MLP neuron), ``L12.head:3``
(attention head), ``L12.mlp`` (a whole MLP block). Each attribution is the rel part of the target
when that component alone is the source.

    >>> from neuronatlas.decompose import trace_prompt, LogitTarget
    >>> from neuronatlas.decompose.attribution import token_attribution, component_attribution
    >>> tr = trace_prompt(lm, "The capital of France is")
    >>> target = LogitTarget(lm.tokenizer.encode(" Paris")[0])
    >>> tokens = token_attribution(lm, tr, target)
    >>> len(tokens.rel) == tr.n_tokens
    True
    >>> comps = component_attribution(lm, tr, target, neuron_layers=(1,))
    >>> sorted({c.kind for c in comps})
    ['head', 'mlp', 'neuron']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neuronatlas.decompose.arch import decomp_arch
from neuronatlas.decompose.core import LogitTarget, Source, Target, Trace, propagate
from neuronatlas.errors import SelectionError
from neuronatlas.ids import NeuronId
from neuronatlas.models.loading import LoadedModel

__all__ = ["TokenAttribution", "ComponentScore", "token_attribution", "component_attribution",
           "component_source", "parse_component", "sources_for", "after_first", "run_sources", "UNSTABLE_RATIO"]

# |rel| + |irrel| above this multiple of |total| marks a decomposition whose parts cancel (docs/decompose.md)
UNSTABLE_RATIO = 100.0


@dataclass
class TokenAttribution:
    """Per input token: ``rel`` (the target's part when that token alone is the source) and
    ``irrel``; ``total`` is the target's value; ``stable`` is False where the parts cancel."""

    tokens: list[str]
    rel: list[float]
    irrel: list[float]
    total: float
    stable: list[bool]

    @property
    def interaction(self) -> float | None:
        """What the single-token parts leave unexplained, ``total - sum(rel)`` (None when a part is unstable)."""
        return self.total - sum(self.rel) if all(self.stable) else None


@dataclass(frozen=True)
class ComponentScore:
    name: str
    kind: str          # "head", "mlp" or "neuron"
    layer: int
    index: int         # head or neuron index; -1 for a whole MLP block
    rel: float
    stable: bool


def target_value(lm: LoadedModel, trace: Trace, target: Target) -> float:
    """The target's value in the clean forward: the logit (difference), or the downstream neuron's
    activation (the irrel part of the empty source, which is all of it)."""
    if isinstance(target, LogitTarget):
        logits = trace.logits[target.position]
        return float(logits[target.token] - (logits[target.foil] if target.foil is not None else 0.0))
    return float(propagate(lm, trace, [Source()], target=target).irrel[0])


def _stable(rel: float, irrel: float, total: float) -> bool:
    """False where the parts cancel (or overflowed to inf/nan): docs/decompose.md, "Unstable parts"."""
    size = abs(rel) + abs(irrel)
    return math.isfinite(size) and size <= UNSTABLE_RATIO * max(abs(total), 1e-6)


def _chunks(items: list[Source], size: int) -> list[list[Source]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_sources(lm: LoadedModel, trace: Trace, sources: list[Source], target: Target,
                batch: int = 128, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """rel and irrel of ``target`` for each source, in batches of ``batch`` sources (``fast``:
    see :func:`~neuronatlas.decompose.core.propagate`)."""
    rels, irrels = [], []
    for chunk in _chunks(sources, batch):
        out = propagate(lm, trace, chunk, target=target, fast=fast)
        rels.append(out.rel.cpu())
        irrels.append(out.irrel.cpu())
    if not rels:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(rels), torch.cat(irrels)


def token_attribution(lm: LoadedModel, trace: Trace, target: Target) -> TokenAttribution:
    T = trace.n_tokens
    rel, irrel = run_sources(lm, trace, [Source(tokens=(t,)) for t in range(T)], target)
    total = target_value(lm, trace, target)
    tokens = lm.tokenizer.convert_ids_to_tokens(trace.input_ids.tolist())
    r, i = rel.tolist(), irrel.tolist()
    return TokenAttribution(tokens=[str(t) for t in tokens], rel=r, irrel=i, total=total,
                            stable=[_stable(a, b, total) for a, b in zip(r, i)])


def component_source(lm: LoadedModel, name: str, positions: tuple[int, ...] | None = None) -> Source:
    kind, layer, index = parse_component(name)
    if kind == "head":
        return Source(heads=((layer, index),), positions=positions)
    if kind == "mlp":
        return Source(mlps=(layer,), positions=positions)
    return Source(neurons=((layer, index),), positions=positions)


def after_first(n_tokens: int) -> tuple[int, ...] | None:
    """Every position but the first (None, i.e. all, for a one-token prompt); see ``first_position``."""
    return tuple(range(1, n_tokens)) if n_tokens > 1 else None


def parse_component(name: str) -> tuple[str, int, int]:
    """``L3.head:5`` -> ("head", 3, 5); ``L3.mlp`` -> ("mlp", 3, -1); ``L3:17`` -> ("neuron", 3, 17)."""
    text = name.strip()
    if text.endswith(".mlp") and text[:1] in "Ll" and text[1:-4].isdigit():
        return "mlp", int(text[1:-4]), -1
    if ".head:" in text:
        left, _, right = text.partition(".head:")
        if left[:1] in "Ll" and left[1:].isdigit() and right.isdigit():
            return "head", int(left[1:]), int(right)
    try:
        nid = NeuronId.parse(text)
    except SelectionError:
        raise SelectionError(f"cannot parse component {name!r}; write L<layer>:<neuron>, "
                             "L<layer>.head:<head> or L<layer>.mlp") from None
    return "neuron", nid.layer, nid.index


def sources_for(lm: LoadedModel, names: Sequence[str], positions: tuple[int, ...] | None = None) -> Source:
    """One source made of several components (a circuit), at ``positions`` (None: all)."""
    heads: list[tuple[int, int]] = []
    neurons: list[tuple[int, int]] = []
    mlps: list[int] = []
    for name in names:
        src = component_source(lm, name)
        heads.extend(src.heads)
        neurons.extend(src.neurons)
        mlps.extend(src.mlps)
    return Source(heads=tuple(heads), neurons=tuple(neurons), mlps=tuple(mlps), positions=positions)


def component_attribution(lm: LoadedModel, trace: Trace, target: Target, *, heads: bool = True,
                          mlps: bool = True, neuron_layers: Sequence[int] = (), batch: int = 128,
                          max_layer: int | None = None, first_position: bool = False,
                          fast: bool = True) -> list[ComponentScore]:
    """Every head and MLP block (and every neuron of ``neuron_layers``) as a source on its own,
    sorted by rel, largest first. ``max_layer`` limits components to layers < it (for a
    downstream-neuron target, components at or after its layer cannot reach it).

    By default a component is a source at every position but the first: the first position sees
    only the first token (the same for every prompt that starts alike) and is the model's attention
    sink, and taking its activations out of irrel sends irrel off the model's distribution (the
    parts then cancel at ~1e6x the total; docs/decompose.md). ``first_position=True`` includes it."""
    arch = decomp_arch(lm)
    n_layers = lm.n_layers if max_layer is None else max_layer
    names: list[tuple[str, str, int, int]] = []
    if heads:
        names += [(f"L{l}.head:{h}", "head", l, h) for l in range(n_layers) for h in range(arch.n_heads(lm.config))]
    if mlps:
        names += [(f"L{l}.mlp", "mlp", l, -1) for l in range(n_layers)]
    for layer in neuron_layers:
        if not 0 <= layer < n_layers:
            raise SelectionError(f"neuron layer {layer} is out of range; use 0-{n_layers - 1}")
        names += [(str(NeuronId(layer, j)), "neuron", layer, j) for j in range(lm.n_neurons)]
    positions = None if first_position else after_first(trace.n_tokens)
    sources = [component_source(lm, n, positions) for n, _, _, _ in names]
    # sources of one layer share a start layer: group them so each batch starts as late as it can
    order = sorted(range(len(sources)), key=lambda i: names[i][2])
    rel = torch.zeros(len(sources))
    irrel = torch.zeros(len(sources))
    for layer in sorted({names[i][2] for i in order}):
        idx = [i for i in order if names[i][2] == layer]
        r, ir = run_sources(lm, trace, [sources[i] for i in idx], target, batch, fast)
        rel[idx], irrel[idx] = r, ir
    total = target_value(lm, trace, target)
    scores = [ComponentScore(n, k, l, i, float(rel[j]), _stable(float(rel[j]), float(irrel[j]), total))
              for j, (n, k, l, i) in enumerate(names)]
    return sorted(scores, key=lambda s: -s.rel)
