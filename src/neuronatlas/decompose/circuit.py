"""Circuits from the decomposition, and their checks against ablation.

:func:`discover_circuit` ranks every attention head and MLP block by its decomposed contribution to
the logit difference (object minus a foil object) averaged over facts, then grows the circuit along
that ranking until the circuit, taken as one source, carries a stated share of the logit difference.
:func:`faithfulness` switches off everything outside a circuit (mean ablation over the facts' tokens)
and compares the logit difference kept with random circuits of the same size.
:func:`validate_neurons` compares CD-T's neuron ranking in one layer with zero-ablation effects.

    >>> from neuronatlas.decompose.circuit import discover_circuit, fact_rows
    >>> facts = fact_rows(lm, [{"text": "The capital of France is", "target": " Paris"},
    ...                        {"text": "The capital of Japan is", "target": " Tokyo"}])
    >>> result = discover_circuit(lm, facts, share=0.5, n_random=3)
    >>> result.explained_share >= 0.5 or not result.reached
    True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from neuronatlas.decompose.ablation import component_means, logit_diffs
from neuronatlas.decompose.arch import decomp_arch
from neuronatlas.decompose.attribution import (UNSTABLE_RATIO, after_first, component_attribution, run_sources,
                                                sources_for)
from neuronatlas.decompose.core import LogitTarget, Source, trace_ids
from neuronatlas.errors import DatasetError
from neuronatlas.models.loading import LoadedModel

__all__ = ["Fact", "CircuitResult", "NeuronValidation", "fact_rows", "discover_circuit", "faithfulness",
           "validate_neurons", "all_components"]


@dataclass(frozen=True)
class Fact:
    """A prompt, the first token of its object, and the first token of a foil object."""

    text: str
    target: int
    foil: int
    object: str
    foil_object: str


@dataclass
class CircuitResult:
    components: list[str]
    scores: dict[str, float]              # mean decomposed contribution of each component (all of them)
    share: float                          # the share asked for
    explained_share: float                # the circuit's own share of the logit difference
    reached: bool
    curve: list[tuple[int, float]]        # (size, share) along the ranking
    clean_logit_diff: float               # mean over facts
    facts: list[dict[str, Any]]
    faithfulness: float | None = None
    random_faithfulness: list[float] = field(default_factory=list)
    empty_faithfulness: float | None = None
    ablation: str = "mean"
    unstable: list[str] = field(default_factory=list)   # left out of the ranking: parts cancel on some fact
    necessity: float | None = None                      # kept when only the circuit is ablated
    random_necessity: list[float] = field(default_factory=list)

    @property
    def random_p(self) -> float | None:
        """Share of random circuits at least as faithful as this one (with the +1 correction)."""
        if self.faithfulness is None or not self.random_faithfulness:
            return None
        hits = sum(r >= self.faithfulness for r in self.random_faithfulness)
        return (hits + 1) / (len(self.random_faithfulness) + 1)

    @property
    def necessity_p(self) -> float | None:
        """Share of random circuits whose ablation hurts at least as much (with the +1 correction)."""
        if self.necessity is None or not self.random_necessity:
            return None
        hits = sum(r <= self.necessity for r in self.random_necessity)
        return (hits + 1) / (len(self.random_necessity) + 1)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["random_p"] = self.random_p
        out["necessity_p"] = self.necessity_p
        out["curve"] = [list(c) for c in self.curve]
        return out


def _first_token(lm: LoadedModel, text: str) -> int:
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise DatasetError(f"target {text!r} encodes to no tokens; give a non-empty target")
    return int(ids[0])


def fact_rows(lm: LoadedModel, rows: Sequence[dict[str, Any]]) -> list[Fact]:
    """Facts from rows with ``text`` and ``target``; each fact's foil is the next fact's object
    (cyclically) whose first token differs from its own."""
    if len(rows) < 2:
        raise DatasetError(f"a circuit needs at least 2 facts (got {len(rows)}): the foil of each fact is "
                           "another fact's object; pass more facts")
    for i, row in enumerate(rows):
        if not row.get("text") or not row.get("target"):
            raise DatasetError("every fact needs non-empty 'text' and 'target' fields", line=i + 1)
    targets = [_first_token(lm, str(r["target"])) for r in rows]
    facts = []
    for i, row in enumerate(rows):
        for step in range(1, len(rows)):
            j = (i + step) % len(rows)
            if targets[j] != targets[i]:
                facts.append(Fact(str(row["text"]), targets[i], targets[j], str(row["target"]), str(rows[j]["target"])))
                break
    if len(facts) < 2:
        raise DatasetError("the facts' objects all start with the same token, so no foil can be chosen; "
                           "pass facts with different objects")
    return facts


def all_components(lm: LoadedModel) -> list[str]:
    n_heads = decomp_arch(lm).n_heads(lm.config)
    return [f"L{l}.head:{h}" for l in range(lm.n_layers) for h in range(n_heads)] + \
        [f"L{l}.mlp" for l in range(lm.n_layers)]


def _ids(lm: LoadedModel, text: str) -> torch.Tensor:
    return torch.tensor(lm.tokenizer(text)["input_ids"])


def discover_circuit(lm: LoadedModel, facts: Sequence[Fact], *, share: float = 0.8, max_size: int | None = None,
                     n_random: int = 20, seed: int = 0, ablation: str = "mean") -> CircuitResult:
    """Rank heads and MLP blocks by mean CD-T contribution, grow the circuit along the ranking until
    it carries ``share`` of the logit difference, then measure its faithfulness (``n_random``
    random circuits of the same size as the baseline; 0 skips the ablations)."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}; pass e.g. 0.8")
    names = all_components(lm)
    traces = [trace_ids(lm, _ids(lm, f.text)) for f in facts]
    targets = [LogitTarget(f.target, f.foil) for f in facts]
    totals = torch.tensor([float(tr.logits[-1, f.target] - tr.logits[-1, f.foil]) for tr, f in zip(traces, facts)])
    sums = dict.fromkeys(names, 0.0)
    unstable: set[str] = set()
    for tr, tg in zip(traces, targets):
        for score in component_attribution(lm, tr, tg):
            sums[score.name] += score.rel
            if not score.stable:
                unstable.add(score.name)
    scores = {n: s / len(facts) for n, s in sums.items()}
    # a component whose parts cancel on some fact has no meaningful rank: it is left out
    ranked = sorted((n for n in names if scores[n] > 0 and n not in unstable), key=lambda n: -scores[n])
    ranked = ranked[:max_size] if max_size else ranked
    denom = float(totals.sum())

    def shares_of(sizes: list[int]) -> list[tuple[int, float]]:
        """The share carried by each prefix size; every prefix is one source, one batch per fact."""
        if not sizes:
            return []
        carried = torch.zeros(len(sizes))
        for tr, tg in zip(traces, targets):
            prefixes = [sources_for(lm, ranked[:k], after_first(tr.n_tokens)) for k in sizes]
            rel, _ = run_sources(lm, tr, prefixes, tg, batch=64)
            carried += rel
        return [(k, float(c) / denom if denom else 0.0) for k, c in zip(sizes, carried)]

    # a coarse grid of prefix sizes (1..10, then +15% steps), then every size inside the first gap
    # that reaches the share, so the circuit is the smallest prefix that does
    grid = sorted({k for k in range(1, 11)} | {int(round(10 * 1.15 ** i)) for i in range(1, 60)})
    grid = [k for k in grid if k < len(ranked)] + ([len(ranked)] if ranked else [])
    curve = shares_of(grid)
    hit = next((k for k, s in curve if s >= share), None)
    if hit is not None:
        below = max((k for k, _ in curve if k < hit), default=0)
        curve = sorted(curve + shares_of(list(range(below + 1, hit))))
        hit = next(k for k, s in curve if s >= share)
    reached = hit is not None
    size = hit if hit is not None else (max(curve, key=lambda c: c[1])[0] if curve else 0)
    shares = dict(curve)
    result = CircuitResult(
        components=ranked[:size], scores=scores, share=share, unstable=sorted(unstable),
        explained_share=shares[size] if size else 0.0, reached=reached, curve=curve,
        clean_logit_diff=float(totals.mean()),
        facts=[{"text": f.text, "object": f.object, "foil": f.foil_object} for f in facts], ablation=ablation)
    if n_random > 0:
        faithfulness(lm, facts, result, n_random=n_random, seed=seed, ablation=ablation)
    return result


def faithfulness(lm: LoadedModel, facts: Sequence[Fact], result: CircuitResult, *, n_random: int = 20,
                 seed: int = 0, ablation: str = "mean") -> CircuitResult:
    """Fill ``result``'s faithfulness: the summed logit difference with everything outside the circuit
    ablated, over the clean one; the same for ``n_random`` random circuits and for the empty circuit.
    Also its necessity: the share kept when only the circuit is ablated (and for the random circuits)."""
    if ablation not in ("mean", "zero"):
        raise ValueError(f"unknown ablation {ablation!r}; choose 'mean' or 'zero'")
    names = all_components(lm)
    prompts = [f.text for f in facts]
    means = component_means(lm, prompts, names) if ablation == "mean" else None
    rng = random.Random(seed)
    size = len(result.components)
    circuits = [result.components] + [rng.sample(names, size) for _ in range(n_random)] + [[]]
    # everything outside each circuit ablated (sufficiency), then each circuit alone ablated (necessity)
    rows: list[list[str]] = [[]] + [[n for n in names if n not in set(c)] for c in circuits] + \
        [list(c) for c in circuits[:-1]]
    ld = logit_diffs(lm, prompts, [f.target for f in facts], [f.foil for f in facts], rows, means=means)
    clean = float(ld[0].sum())
    kept = [float(r.sum()) / clean if clean else 0.0 for r in ld[1:]]
    n = len(circuits)
    result.faithfulness = kept[0]
    result.random_faithfulness = kept[1:n - 1]
    result.empty_faithfulness = kept[n - 1]
    result.necessity = kept[n]
    result.random_necessity = kept[n + 1:]
    result.ablation = ablation
    return result


@dataclass
class NeuronValidation:
    layer: int
    n_facts: int
    spearman: float
    overlap: dict[int, float]                 # k -> |top-k CD ∩ top-k ablation| / min(k, neurons)
    cd_top: list[str]
    ablation_top: list[str]
    unstable: int = 0                         # neurons left out: their parts cancel on some fact


def validate_neurons(lm: LoadedModel, facts: Sequence[Fact], layer: int, *, ks: Sequence[int] = (10, 50),
                     batch: int = 256) -> NeuronValidation:
    """Every neuron of ``layer``: CD-T contribution to the logit difference (as a source after the
    first position) vs the drop of the logit difference when the neuron alone is zero-ablated (all
    positions), each averaged over ``facts``; neurons unstable on some fact are left out."""
    from scipy.stats import spearmanr

    from neuronatlas.decompose.ablation import ablated_logits

    n = lm.n_neurons
    cd = torch.zeros(n)
    effect = torch.zeros(n)
    stable = torch.ones(n, dtype=torch.bool)
    rows = [[f"L{layer}:{j}"] for j in range(n)]
    for f in facts:
        tr = trace_ids(lm, _ids(lm, f.text))
        rel, irrel = run_sources(lm, tr, [Source(neurons=((layer, j),), positions=after_first(tr.n_tokens))
                                          for j in range(n)], LogitTarget(f.target, f.foil), batch=batch)
        clean = float(tr.logits[-1, f.target] - tr.logits[-1, f.foil])
        size = rel.abs() + irrel.abs()
        stable &= torch.isfinite(size) & (size <= UNSTABLE_RATIO * max(abs(clean), 1e-6))
        cd += torch.nan_to_num(rel)
        lg = ablated_logits(lm, f.text, rows, batch=batch)
        effect += clean - (lg[:, f.target] - lg[:, f.foil])
    keep = stable.nonzero().flatten()
    cd, effect = (cd / len(facts))[keep], (effect / len(facts))[keep]
    rho = float(spearmanr(cd.numpy(), effect.numpy()).statistic)
    order_cd = keep[np.argsort(-cd.numpy())].tolist()
    order_ab = keep[np.argsort(-effect.numpy())].tolist()
    m = len(keep)
    overlap = {k: len(set(order_cd[:k]) & set(order_ab[:k])) / min(k, m) for k in ks}
    return NeuronValidation(layer=layer, n_facts=len(facts), spearman=rho, overlap=overlap,
                            cd_top=[f"L{layer}:{j}" for j in order_cd[:10]],
                            ablation_top=[f"L{layer}:{j}" for j in order_ab[:10]], unstable=n - m)
