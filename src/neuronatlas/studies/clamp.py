"""Clamp study: find a concept's neurons by decoding their weights, clamp them, and check the effect.
Written on :mod:`neuronatlas.studies.framework`, it is the template for new studies.

1. ``select``: the ``n_neurons`` neurons whose decoded ``side`` (default ``out_normed``) ranks a
   concept token (`` dog``, ``Dogs``...) highest; corpus sentences with and without the concept are
   recorded for per-neuron maxima (``3xmax`` clamp values) and magnitude-matched random sets.
2. ``conditions``: no intervention; the decoded neurons clamped; ``n_random`` random sets clamped by
   the same rule, matched on layer and magnitude decile.
3. ``measure``: the share of greedy continuations of neutral prompts that mention the concept, and
   log p(concept tokens) at the next position.
4. ``findings``: each arm against the random sets (empirical rank) and the unmodified model (exact
   McNemar / sign-flip permutation); whether the decoded neurons are more active on concept texts.

    >>> from neuronatlas.studies import run
    >>> from neuronatlas.studies.clamp import ClampConfig
    >>> result = run(lm, ClampConfig(concept="dog", n_neurons=10), "runs/dog", atlas="my-atlas")  # doctest: +SKIP
    >>> result.findings["mention"]                                                                 # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuronatlas.decode.find import concept_token_ids, mention_pattern, normalize_token, word_forms
from neuronatlas.decode.select import ENGLISH_SOURCES, concept_texts, select_concept_neurons
from neuronatlas.errors import SelectionError
from neuronatlas.evaluate import generate, next_token_logprobs
from neuronatlas.ids import neuron_str
from neuronatlas.intervene import Clamp, NeuronSet
from neuronatlas.intervene.interventions import Condition
from neuronatlas.intervene.parse import parse_value
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record import RecordConfig, record
from neuronatlas.report import Finding, Section, Table, plots
from neuronatlas.stats.inference import magnitude_bins
from neuronatlas.studies import rules
from neuronatlas.studies.common import random_like
from neuronatlas.studies.framework import (
    Arm, Context, Grid, Measured, Outcome, ProgressFn, Selection, Study, StudyConfig, StudyResult, register_study, run,
)

__all__ = ["ENGLISH_SOURCES", "NEUTRAL_PROMPTS", "ClampConfig", "ClampStudy", "concept_texts", "parse_value",
           "run_clamp_study", "select_concept_neurons"]

NEUTRAL_PROMPTS = (
    "My favourite animal is", "Today I saw a", "The best thing about the weekend is", "Let me tell you about",
    "Yesterday my neighbour bought a", "In the picture there is a", "She pointed at the", "The story is about a",
    "When I opened the door, I saw", "The first thing I noticed was", "He could not stop thinking about",
    "At the park this morning there was", "My friend has always wanted a", "The children were excited about the",
    "Here is a short poem:", "Write one sentence about anything:", "The most interesting thing in the world is",
    "I have never understood why people like", "On my way home I met", "The word I am thinking of is",
)


@dataclass(frozen=True)
class ClampConfig(StudyConfig):
    concept: str = ""
    n_neurons: int = 10
    value: str = "3xmax"
    side: str = "out_normed"
    max_new_tokens: int = 24
    n_prompts: int = 20
    n_texts: int = 60
    layers: tuple[int, ...] = ()
    n_permutations: int = 1000
    batch_size: int = 16
    chunk: int = 512
    sources: tuple[str, ...] = ENGLISH_SOURCES

    def __post_init__(self) -> None:
        if not self.concept.strip():
            raise SelectionError("give the concept word, e.g. --concept dog")
        parse_value(self.value)
        if self.side not in ("out", "out_normed"):
            raise SelectionError(f"the clamp study selects on an output side; choose out_normed or out, not {self.side!r}")
        if self.n_neurons < 1 or self.n_random < 1 or self.n_prompts < 1 or self.n_texts < 2:
            raise SelectionError("--neurons, --n-random and --n-prompts must be >= 1 and --n-texts >= 2")
        if self.n_prompts > len(NEUTRAL_PROMPTS):
            raise SelectionError(f"there are {len(NEUTRAL_PROMPTS)} built-in prompts; --n-prompts {self.n_prompts} is too many")


def _cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def _set_scores(pooled: np.ndarray, labels: np.ndarray, pairs: list[tuple[int, int]], *,
                with_p: bool = True) -> tuple[float, float]:
    """(Cohen's d, one-sided Mann-Whitney p) of the set's mean activation, concept vs other texts.

    ``pooled``: (texts, layers, neurons) mean-pooled activations; ``labels``: 1 = concept text.
    """
    from scipy import stats

    acts = np.mean([pooled[:, layer, j] for layer, j in pairs], axis=0)
    a, b = acts[labels == 1], acts[labels == 0]
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    p = float(stats.mannwhitneyu(a, b, alternative="greater").pvalue) if with_p else float("nan")
    return _cohens_d(a, b), p


def _activation_analysis(pooled: np.ndarray, labels: np.ndarray, chosen: NeuronSet, n_neurons: int,
                         config: ClampConfig) -> dict[str, Any]:
    d, p_mwu = _set_scores(pooled, labels, list(chosen.pairs))
    per_neuron = {neuron_str(layer, j): _cohens_d(pooled[labels == 1, layer, j], pooled[labels == 0, layer, j])
                  for layer, j in chosen.pairs}
    null = np.array([_set_scores(pooled, labels, list(random_like(chosen, n_neurons, seed=100_000 + s).pairs),
                                 with_p=False)[0] for s in range(config.n_permutations)])
    null = null[np.isfinite(null)]
    p_perm = float((1 + (null >= d).sum()) / (1 + len(null))) if np.isfinite(d) and len(null) else float("nan")
    return {"cohens_d": d, "mannwhitney_p": p_mwu, "per_neuron_d": per_neuron, "random_d_mean": float(null.mean())
            if len(null) else float("nan"), "random_d_95": [float(x) for x in np.percentile(null, [2.5, 97.5])]
            if len(null) else [float("nan")] * 2, "permutation_p": p_perm, "n_permutations": len(null)}


@register_study
class ClampStudy(Study[ClampConfig]):
    """The framework's worked example: select by decoding, clamp, compare with matched random sets."""

    name = "clamp"
    title = "Clamp study"
    intro = ("Neurons chosen by reading their output weights through the unembedding are clamped during generation "
             "and compared with random neurons matched on layer and activation magnitude.")
    config_class = ClampConfig
    replace_all_selections = False

    def instance(self) -> str:
        return "clamp-" + (re.sub(r"[^A-Za-z0-9_.-]", "_", self.config.concept)[:60] or "concept")

    def select(self, ctx: Context[ClampConfig]) -> Selection:
        cfg, lm = ctx.config, ctx.lm
        tokens = concept_token_ids(lm.tokenizer, cfg.concept)
        if not tokens:
            raise SelectionError(f"no token of this tokenizer spells {cfg.concept!r} or a variant "
                                 f"({', '.join(repr(v) for v in word_forms(cfg.concept)[:4])}...); choose a more common word")
        found = ctx.cached("selection", lambda: select_concept_neurons(
            lm, tokens, cfg.n_neurons, side=cfg.side, layers=cfg.layers, chunk=cfg.chunk,
            progress=lambda done, total=None: ctx.tick("decode", done, total or 1)))
        texts, info = concept_texts(cfg.concept, cfg.n_texts, cfg.seed, cfg.sources)
        rec = record(lm, texts, ctx.store, name=self.instance(), progress=lambda d, t: ctx.tick("record", d, t),
                     config=RecordConfig(pool="mean", top_k=1, batch_size=cfg.batch_size, max_length=64))
        assert rec.pooled is not None
        pooled = rec.pooled.astype(np.float32)
        ctx.bins = magnitude_bins(np.abs(pooled).mean(axis=0))
        ctx.data.update(tokens=tokens, found=found, texts=info, pooled=pooled, maxima=rec.moments.total().max[0].numpy(),
                        labels=np.array([1 if p.label == "concept" else 0 for p in texts]),
                        provenance={"texts_sha256": texts.content_hash, "corpus": info["licences"]})
        sel = Selection("decode", "mlp")
        sel.add(cfg.concept, [(n["layer"], n["neuron"]) for n in found["neurons"]], [n["score"] for n in found["neurons"]])
        return sel

    def conditions(self, ctx: Context[ClampConfig], selection: Selection) -> Grid:
        multiple, relative = parse_value(ctx.config.value)
        maxima = ctx.data["maxima"]

        def clamp(ns: NeuronSet) -> Condition:
            return (Clamp(ns, tuple(multiple * float(maxima[a, b]) if relative else multiple for a, b in ns.pairs)),)
        grid = Grid(ctx)
        grid.baseline("prompts")
        grid.selected("clamp", selection.neurons(ctx.config.concept), clamp, "prompts", concept=ctx.config.concept)
        return grid

    def measure(self, ctx: Context[ClampConfig], items: str, arms: Sequence[Arm]) -> dict[str, dict[str, Any]]:
        cfg, prompts = ctx.config, list(NEUTRAL_PROMPTS[: ctx.config.n_prompts])
        conds = [a.condition for a in arms]
        gens = generate(ctx.lm, prompts, conditions=conds, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        logp = next_token_logprobs(ctx.lm, prompts, conditions=conds, batch_size=cfg.batch_size)
        lp = torch.logsumexp(logp[:, :, sorted(ctx.data["tokens"])], dim=-1)
        pattern = mention_pattern(cfg.concept)
        return {a.key: {"mention": [int(bool(pattern.search(t))) for t in gens[k]], "logprob": lp[k].tolist(),
                        "text": list(gens[k])} for k, a in enumerate(arms)}

    def findings(self, ctx: Context[ClampConfig], selection: Selection, grid: Grid, measured: Measured) -> Outcome:
        cfg, c = ctx.config, ctx.config.concept
        mention = measured.compare("clamp", "mention", baseline="baseline|prompts", alternative="greater")
        shift = measured.compare("clamp", "logprob", baseline="baseline|prompts", alternative="greater", binary=False)
        found, info = ctx.data["found"], ctx.data["texts"]
        f = [Finding("selection", "Neurons found by decoding",
                     f"{len(found['neurons'])} neurons selected on side {found['side']}: concept-token ranks "
                     f"{min(n['rank'] for n in found['neurons'])}-{max(n['rank'] for n in found['neurons'])}; "
                     f"{found['neurons_with_concept_top1']} neurons in the searched layers have a {c!r} token as top-1.",
                     rule="descriptive"),
             rules.selected_vs_random("mention", "Clamping in generation", {c: mention}, alpha=cfg.alpha,
                                      what=f"Clamping them to {cfg.value}", metric_name=f"the share of continuations "
                                      f"mentioning {c!r}", unit="concept", direction="raise"),
             rules.selected_vs_random("logprob", "Next-token probability", {c: shift}, alpha=cfg.alpha,
                                      what=f"Clamping them to {cfg.value}", metric_name=f"log p({c!r} tokens)",
                                      unit="concept", direction="raise", as_percent=False)]
        act = None
        if ctx.data["labels"].sum() >= 2:
            act = _activation_analysis(ctx.data["pooled"], ctx.data["labels"], selection.neurons(c), ctx.lm.n_neurons, cfg)
            holds = bool(act["permutation_p"] <= cfg.alpha and act["cohens_d"] > 0)
            f.append(Finding("activation", "Weights vs activations",
                             f"On {info['concept_texts']} corpus sentences mentioning {c!r} vs {info['other_texts']} others, "
                             f"the decoded neurons' mean activation differs by Cohen's d = {act['cohens_d']:+.2f}; random "
                             f"layer-matched sets reach d = {act['random_d_mean']:+.2f}, permutation p = "
                             f"{act['permutation_p']:.3g}" + (" (the concept is rare in the corpus: a weak test)." if info["rare"] else "."),
                             rule=f"permutation p over {act['n_permutations']} random layer-matched sets <= {cfg.alpha} and d > 0",
                             holds=holds, numbers={"d": act["cohens_d"], "p": act["permutation_p"]}))
        labels = ["baseline", "decoded clamp", "random clamp (mean)"]
        plots.bars(ctx.out / "mention_rate.png", labels, {"mention rate": [mention.baseline, mention.selected, mention.random_mean]},
                   title=f"Continuations mentioning {c!r}", ylabel="share of prompts")
        plots.bars(ctx.out / "logprob_shift.png", ["decoded clamp", "random clamp (mean)"],
                   {"shift": [shift.delta, shift.random_mean - shift.baseline]},
                   title=f"Change in log p({c!r}) at the next token", ylabel="nats vs no clamp")
        texts = {k: measured.values[k]["text"] for k in ("baseline|prompts", "clamp", "clamp|rand0") if k in measured.values}
        sections = [
            Section("Neurons found by decoding", "selection", tables=[Table(
                ["neuron", "rank", "score", "token", "top tokens"],
                [[n["id"], n["rank"], n["score"], repr(n["token"]), " ".join(repr(t) for t in n["top_tokens"])]
                 for n in found["neurons"]])]),
            Section("Clamping in generation", "mention", figures=["mention_rate.png"], tables=[Table(
                ["prompt", "baseline", "decoded clamp", "random clamp (set 0)"],
                [[p, *(texts[k][i] if k in texts else "" for k in ("baseline|prompts", "clamp", "clamp|rand0"))]
                 for i, p in enumerate(NEUTRAL_PROMPTS[: cfg.n_prompts])])]),
            Section("Next-token probability", "logprob", figures=["logprob_shift.png"]),
            Section("Weights vs activations", "activation" if act else "", tables=[Table(
                ["source", "sentences mentioning the concept"], sorted(info["concept_by_source"].items()))])]
        setup = {"model": ctx.lm.provenance.get("model"), "concept": c, "neurons": cfg.n_neurons, "clamp value": cfg.value,
                 "prompts": cfg.n_prompts, "max new tokens": cfg.max_new_tokens, "side": cfg.side}
        numbers = {"concept_token_text": sorted({normalize_token(t) for t in ctx.data["tokens"].values()}),
                   "decoded": found, "texts": info, "mention": mention.to_json(), "logprob": shift.to_json(),
                   "activation": act, "generations": texts}
        return Outcome(f, sections, numbers, setup, ["mention_rate.png", "logprob_shift.png"])


def run_clamp_study(lm: LoadedModel, config: ClampConfig, out_dir: str | Path, *, atlas: str | Path | None = None,
                    progress: ProgressFn | None = None) -> StudyResult:
    """``run(lm, config, out_dir)``: kept for callers of the earlier script."""
    return run(lm, config, out_dir, atlas=atlas, progress=progress)
