"""Explain neurons end to end: explain -> PMI rerank -> simulate and score -> baseline -> causal check.

For each selected neuron, from the exemplars stored in the atlas:

1. the explainer (:mod:`.backends`) sees the top ``n_top`` exemplars from distinct documents,
   normalised to 0..10, and proposes ``candidates`` explanations (seeded sampling; the seed is
   derived from ``seed``, layer and neuron, so it does not depend on which other neurons run);
2. the scorer LM reranks them by PMI (:mod:`.pmi`) and the best is kept;
3. the simulator (the scorer LM, :mod:`.simulate`) scores it on ``n_top`` top + ``n_random`` random
   excerpts; the baseline is the score, on the same excerpts, of another neuron's explanation
   (drawn with a seeded RNG among every other explained neuron of the atlas; filled in at the end
   of the run when the first neuron has no other explanation to borrow yet);
4. the subject model (the atlas's model) is run with the neuron zero-ablated (:mod:`.causal`):
   mean change of the next token's log-prob at the scored top and random exemplars.

Each finished neuron is upserted into ``explanations.parquet`` at once, so a failure on a later
neuron never loses an earlier one.

    >>> from neuronatlas.explain import LocalExplainer, explain_neurons, ExplainConfig
    >>> from neuronatlas.intervene import NeuronSet
    >>> lm = load_model("default")  # doctest: +SKIP
    >>> run = explain_neurons("my-atlas", NeuronSet.parse("L1:3 L0:5"), explainer=LocalExplainer(lm),
    ...                       scorer=lm, subject=lm, config=ExplainConfig(candidates=3, seed=0))
    >>> run.results[0].explanation, run.results[0].score, run.results[0].baseline_score
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuronatlas.errors import AtlasError, DatasetError, NeuronAtlasError
from neuronatlas.explain.backends import Explainer, LocalExplainer
from neuronatlas.explain.causal import causal_effect
from neuronatlas.explain.pmi import DEFAULT_LAMBDA, PMIScore, pmi_rerank
from neuronatlas.explain.prompts import explain_prompt, normalise
from neuronatlas.explain.simulate import Simulator
from neuronatlas.explain.tables import (
    EXPLANATION_COLUMNS,
    Excerpt,
    NeuronExemplars,
    open_atlas,
    read_exemplars,
    read_explanations,
    table_meta,
    upsert_explanations,
)
from neuronatlas.ids import NeuronId
from neuronatlas.intervene.neurons import NeuronSet
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import encode_ids
from neuronatlas.store.atlas import Atlas

__all__ = ["ExplainConfig", "ExplainRun", "NeuronExplanation", "explain_neuron", "explain_neurons", "neuron_seed"]


@dataclass(frozen=True)
class ExplainConfig:
    candidates: int = 3
    seed: int = 0
    n_top: int = 5
    n_random: int = 5
    pmi_lambda: float = DEFAULT_LAMBDA
    causal: bool = True
    sim_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.n_top < 1 or self.n_random < 0:
            raise DatasetError("candidates and n_top must be at least 1 and n_random not negative")


@dataclass
class NeuronExplanation:
    layer: int
    neuron: int
    site: str
    explanation: str
    explainer: str
    score: float
    pmi: float
    candidates: list[str]
    candidate_scores: list[PMIScore]
    baseline_score: float = math.nan
    baseline_from: str | None = None
    causal_delta_exemplars: float = math.nan
    causal_delta_random: float = math.nan
    seconds: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The explanations.parquet row (NaN stored as null)."""
        d = {c: getattr(self, c) for c in EXPLANATION_COLUMNS}
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    def as_json(self) -> dict[str, Any]:
        return {**self.row(), "baseline_from": self.baseline_from, "seconds": self.seconds,
                "candidate_scores": [vars(s) for s in self.candidate_scores]}


@dataclass
class ExplainRun:
    results: list[NeuronExplanation]
    seconds: float


def neuron_seed(seed: int, layer: int, neuron: int) -> int:
    return int(hashlib.sha256(f"{seed}:{layer}:{neuron}".encode()).hexdigest()[:8], 16) % (2**31)


def _doc_ids(store: Atlas, lm: LoadedModel, doc_ids: set[str], max_length: int) -> dict[str, list[int]]:
    if not doc_ids:
        return {}
    wanted = sorted(doc_ids)
    rows = store.query(f"SELECT doc_id, text FROM corpus_docs WHERE doc_id IN ({', '.join('?' * len(wanted))})",
                       wanted).to_pylist()
    texts = {r["doc_id"]: r["text"] for r in rows}
    missing = [d for d in wanted if d not in texts]
    if missing:
        raise AtlasError(f"corpus_docs has no document {missing[0]!r}; rerun `neuronatlas exemplars`")
    encoded = encode_ids(lm, [texts[d] for d in wanted], max_length=max_length)
    return dict(zip(wanted, encoded))


def _scored(ex: NeuronExemplars, config: ExplainConfig) -> tuple[list[Excerpt], list[Excerpt]]:
    return ex.distinct_top(config.n_top), ex.random[: config.n_random]


def explain_neuron(ex: NeuronExemplars, *, explainer: Explainer, scorer: LoadedModel, simulator: Simulator,
                   subject: LoadedModel | None, docs: dict[str, list[int]], site: str,
                   config: ExplainConfig = ExplainConfig()) -> NeuronExplanation:
    """Steps 1-4 of the module docstring for one neuron, except the baseline."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    top, rand = _scored(ex, config)
    max_act = ex.max_activation
    prompt = explain_prompt([(e.tokens, normalise(e.acts, max_act)) for e in top])
    candidates = explainer.explain(prompt, n=config.candidates, seed=neuron_seed(config.seed, ex.layer, ex.neuron))
    seconds["explain"] = time.perf_counter() - t
    t = time.perf_counter()
    shared = explainer.last_prefix if isinstance(explainer, LocalExplainer) and explainer.lm is scorer else None
    best, pmi = pmi_rerank(scorer, prompt, candidates, lam=config.pmi_lambda, prefix=shared)
    seconds["pmi"] = time.perf_counter() - t
    t = time.perf_counter()
    score = simulator.score(candidates[best], top + rand, max_act)
    seconds["simulate"] = time.perf_counter() - t
    out = NeuronExplanation(ex.layer, ex.neuron, site, candidates[best], explainer.name, score, pmi[best].pmi,
                            candidates, pmi, seconds=seconds)
    if subject is not None and config.causal:
        t = time.perf_counter()
        for e in top + rand:
            if e.position >= len(docs[e.doc_id]):
                raise AtlasError(f"document {e.doc_id!r} is shorter than its exemplar position {e.position} once "
                                 "tokenised by the subject model; rerun `neuronatlas exemplars` with this model")
        out.causal_delta_exemplars = causal_effect(subject, docs, [(e.doc_id, e.position) for e in top],
                                                   ex.layer, ex.neuron, component=site).mean
        out.causal_delta_random = causal_effect(subject, docs, [(e.doc_id, e.position) for e in rand],
                                                ex.layer, ex.neuron, component=site).mean
        seconds["causal"] = time.perf_counter() - t
    return out


def _check_subject(store: Atlas, subject: LoadedModel) -> None:
    stored = store.manifest().get("model", {})
    ident = ("file_sha256", "revision", "model")
    key = next((k for k in ident if stored.get(k) is not None and subject.provenance.get(k) is not None), None)
    if key is not None and stored[key] != subject.provenance[key]:
        raise AtlasError(f"atlas {str(store.path)!r} describes model {stored.get('model')!r}, but the subject model "
                         f"is {subject.name!r}; pass the atlas's model with --model")


def _baseline(simulator: Simulator, res: NeuronExplanation, ex: NeuronExemplars, pool: dict[tuple[int, int], str],
              config: ExplainConfig) -> None:
    others = sorted(k for k in pool if k != (res.layer, res.neuron))
    if not others:
        return
    t = time.perf_counter()
    pick = random.Random(f"{config.seed}:{res.layer}:{res.neuron}:baseline").choice(others)
    top, rand = _scored(ex, config)
    res.baseline_score = simulator.score(pool[pick], top + rand, ex.max_activation)
    res.baseline_from = str(NeuronId(*pick))
    res.seconds["baseline"] = time.perf_counter() - t


def explain_neurons(atlas: Atlas | str | Path, neurons: NeuronSet, *, explainer: Explainer, scorer: LoadedModel,
                    subject: LoadedModel | None = None, config: ExplainConfig = ExplainConfig(),
                    progress: Callable[[int], None] | None = None) -> ExplainRun:
    """Explain, score and check every neuron of ``neurons``; see the module docstring.

    ``scorer``: the local LM for PMI and simulation; ``subject``: the atlas's model for the causal
    check (skipped when ``None``). ``progress(done)`` counts finished neurons.
    """
    t_run = time.perf_counter()
    store = open_atlas(atlas)
    meta = table_meta(store)
    if not meta:
        raise AtlasError(f"atlas {str(store.path)!r} has no exemplars; run `neuronatlas exemplars --out "
                         f"{store.path}` first")
    site, max_length = meta["site"], int(meta["config"]["max_length"])
    if subject is not None:
        _check_subject(store, subject)
        neurons.validate(subject.n_layers, subject.n_neurons)
    simulator = Simulator(scorer, batch_size=config.sim_batch_size)
    pool = {(int(r["layer"]), int(r["neuron"])): r["explanation"] for r in read_explanations(store) if r["explanation"]}
    results: list[NeuronExplanation] = []
    waiting: dict[tuple[int, int], NeuronExemplars] = {}
    for layer, neuron in neurons.pairs:
        try:
            ex = read_exemplars(store, layer, neuron)
            top, rand = _scored(ex, config)
            docs = _doc_ids(store, subject, {e.doc_id for e in top + rand}, max_length) if subject else {}
            res = explain_neuron(ex, explainer=explainer, scorer=scorer, simulator=simulator, subject=subject,
                                 docs=docs, site=site, config=config)
            _baseline(simulator, res, ex, pool, config)
        except NeuronAtlasError as exc:
            saved = f"; {len(results)} finished explanation(s) saved" if results else ""
            raise type(exc)(f"{NeuronId(layer, neuron)}: {exc}{saved}") from exc
        upsert_explanations(store, [res.row()])
        pool[(layer, neuron)] = res.explanation
        if res.baseline_from is None:        # no other explanation existed yet: baseline at the end
            waiting[(layer, neuron)] = ex
        results.append(res)
        if progress:
            progress(len(results))
    late = [r for r in results if r.baseline_from is None]
    for res in late:
        _baseline(simulator, res, waiting[(res.layer, res.neuron)], pool, config)
    if any(r.baseline_from for r in late):
        upsert_explanations(store, [r.row() for r in late])
    return ExplainRun(results, time.perf_counter() - t_run)
