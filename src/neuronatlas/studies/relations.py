"""Relation-specific neurons (Liu et al. 2025), on the study framework.

Pipeline: facts -> record pooled responses on identification prompts (templates the test never
uses) -> score neurons per relation and language (AP by default; any :class:`ConceptScorer`) ->
evaluate held-out facts, every arm batched: baseline; each relation's neurons deactivated, on its
own facts and every other relation's, with ``n_random`` sets matched on layer and magnitude decile;
a dose-response grid on known facts; the other languages' neurons -> tests and findings by the
rules of :mod:`neuronatlas.studies.rules` -> results.json, plots, report.html, summary.md.

    >>> from neuronatlas.models import load_model
    >>> from neuronatlas.studies import run
    >>> from neuronatlas.studies.relations import RelationStudyConfig
    >>> result = run(load_model("default"), RelationStudyConfig(), "out/relations")   # doctest: +SKIP
    >>> result["cumulativity"]["country_capital"][0]["acc_selected"]                   # doctest: +SKIP

Reruns reuse the recorded activations and every finished arm (``state.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from neuronatlas.data.prompts import SPLIT_NAMES, PromptSet, read_jsonl_objects
from neuronatlas.errors import DatasetError
from neuronatlas.evaluate.core import target_logprobs
from neuronatlas.intervene import Ablate, Clamp, NeuronSet
from neuronatlas.intervene.interventions import Condition
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record import RecordConfig, record
from neuronatlas.stats.inference import magnitude_bins
from neuronatlas.stats.scorers import MODEL_SCORERS, scorer
from neuronatlas.studies.common import jaccard
from neuronatlas.studies.framework import (
    Arm, Context, Grid, Measured, Outcome, ProgressFn, Selection, Study, StudyConfig, StudyResult, register_study, run,
)

__all__ = ["RelationStudyConfig", "RelationStudy", "run_relation_study", "concept_name", "load_facts",
           "facts_languages", "SPLIT_NAMES", "HEADLINE", "interference_candidate"]

HEADLINE = "exact"   # a fact counts as recalled when greedy decoding yields the whole object


@dataclass(frozen=True)
class RelationStudyConfig(StudyConfig):
    relations: tuple[str, ...] | None = None     # None: every relation in the facts
    langs: tuple[str, ...] = ("en", "de", "fr", "es")   # identification languages (cross-lingual comparison)
    eval_lang: str = "en"                        # language whose held-out facts are evaluated
    max_identify_facts: int = 40                 # facts per relation and language used to find neurons
    max_test_facts: int = 50                     # held-out facts evaluated per relation
    n_test: int = 50                             # held-out facts per relation in the split
    few_shot: int = 0                            # demonstrations prefixed to evaluation prompts
    test_template: int = 0                       # template of the evaluated facts; identification never uses it
    share_templates: bool = False                # True: identification also uses the test template
    site: Literal["mlp", "gate"] = "mlp"
    pool: Literal["mean", "last", "max"] = "mean"
    scorer: Literal["ap", "smd", "lape", "attribution"] = "ap"   # attribution: gradient x activation on the targets
    select_fraction: float = 0.01                # of all neurons, per relation
    select_n: int | None = None                  # overrides select_fraction
    tails: Literal["top", "both"] = "top"
    mode: Literal["zero", "median"] = "zero"     # deactivation: 0, or the relation's median positive response
    grid: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0)
    min_known: int = 5                           # relations with fewer known test facts are not evaluated
    batch_size: int = 8                          # facts per pass (x up to 8 arms: 64 rows on a CPU)
    neuron_stats: bool = False                   # also keep the viewer's histograms (makes the record ~1.8x slower)

    def __post_init__(self) -> None:
        if not self.grid or any(not 0 < g <= 1 for g in self.grid) or list(self.grid) != sorted(set(self.grid)):
            raise DatasetError(f"grid {list(self.grid)} must be increasing fractions in (0, 1]; e.g. 0.1,0.25,0.5,1.0")
        if self.grid[-1] != 1.0:
            object.__setattr__(self, "grid", (*self.grid, 1.0))
        if self.n_random < 0 or self.select_fraction <= 0 or (self.select_n is not None and self.select_n < 1):
            raise DatasetError("n_random must be >= 0, select_fraction > 0 and select_n >= 1")


def concept_name(relation: str, lang: str) -> str:
    return relation if lang == "en" else f"{relation}@{lang}"


def load_facts(path: str | Path) -> list[dict[str, Any]]:
    """Read user facts (JSONL rows with text, target, relation, lang, split, fact_id, template_id)."""
    rows = []
    p = Path(path)
    if not p.exists():
        raise DatasetError("facts file not found; check --facts", path=str(p))
    for line_no, row in read_jsonl_objects(p, "text, target, relation, split"):
        for name in ("text", "target", "relation", "split"):
            if not isinstance(row.get(name), str):
                raise DatasetError(f"missing {name!r}; facts need text, target, relation, split", path=str(p),
                                   line=line_no, field=name)
        row.setdefault("lang", "en")
        row.setdefault("template_id", 0)
        row.setdefault("fact_id", f"{row['relation']}:{row['lang']}:{row.get('subject', line_no)}")
        rows.append(row)
    return rows


def _sample_facts(rows: list[dict[str, Any]], limit: int, seed: int) -> list[dict[str, Any]]:
    """All template rows of at most ``limit`` facts, picked with a seeded RNG over sorted fact ids."""
    ids = sorted({r["fact_id"] for r in rows})
    keep = set(random.Random(seed).sample(ids, min(limit, len(ids))))
    return [r for r in rows if r["fact_id"] in keep]




def _split_facts(facts: list[dict[str, Any]], cfg: RelationStudyConfig
                 ) -> tuple[list[dict], dict[str, list[dict]], list[dict]]:
    """(identification rows, test rows per relation, demonstration pool). Identification rows never
    use the test template unless ``share_templates``; demonstrations are identify-split facts
    rendered with the test template (used only to build few-shot evaluation prompts)."""
    wanted = set(cfg.relations) if cfg.relations else None
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in facts:
        split = SPLIT_NAMES.get(str(r["split"]).lower())
        if (wanted is None or r["relation"] in wanted) and r["lang"] in cfg.langs and split:
            groups[(r["relation"], r["lang"], split)].append(r)
    ident: list[dict[str, Any]] = []
    demos: list[dict[str, Any]] = []
    test: dict[str, list[dict[str, Any]]] = {}
    for (rel, lang, split), rows in sorted(groups.items()):
        if split == "identify":
            use = rows
            if lang == cfg.eval_lang:
                demos.extend(r for r in rows if int(r.get("template_id", 0)) == cfg.test_template)
                if not cfg.share_templates:
                    use = [r for r in rows if int(r.get("template_id", 0)) != cfg.test_template]
            ident.extend(_sample_facts(use, cfg.max_identify_facts, cfg.seed))
        elif split == "test" and lang == cfg.eval_lang:
            rows0 = [r for r in rows if int(r.get("template_id", 0)) == cfg.test_template]
            test[rel] = sorted(_sample_facts(rows0, cfg.max_test_facts, cfg.seed), key=lambda r: r["fact_id"])
    if not ident or not test:
        splits = sorted({str(r["split"]) for r in facts})
        langs = sorted({str(r["lang"]) for r in facts})
        templates = sorted({int(r.get("template_id", 0)) for r in facts})
        raise DatasetError(f"no {'identification' if not ident else 'test'} facts for relations "
                           f"{', '.join(cfg.relations) if cfg.relations else 'all'} in languages {', '.join(cfg.langs)} "
                           f"(evaluation language {cfg.eval_lang}, test template {cfg.test_template}); the facts have "
                           f"splits {splits}, languages {langs} and templates {templates}: use splits identify/train and "
                           f"test/dev, and fix --langs/--eval-lang/--test-template (a single template needs "
                           f"--share-templates)")
    return ident, test, demos


def facts_languages(facts: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The languages present in ``facts``, English first (the default evaluation language)."""
    langs = sorted({str(r.get("lang", "en")) for r in facts})
    return tuple(sorted(langs, key=lambda x: (x != "en", x)))


def _with_demos(test: dict[str, list[dict]], demo_rows: list[dict], k: int, seed: int
                ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(prompts, prefixes) per relation. With ``k`` > 0 every test prompt of a (relation, template)
    gets the same k demonstrations of that relation rendered with that template (so their keys and
    values are computed once: see :mod:`neuronatlas.evaluate.prefix`); the prefix is empty otherwise."""
    pool: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in demo_rows:
        pool[(r["relation"], int(r.get("template_id", 0)))].append(r)
    prompts: dict[str, list[str]] = {}
    prefixes: dict[str, list[str]] = {}
    for rel, rows in test.items():
        fixed: dict[int, str] = {}
        for r in rows:
            tid = int(r.get("template_id", 0))
            if tid not in fixed:
                cands = sorted(pool[(rel, tid)], key=lambda d: d["fact_id"])
                demos = random.Random(f"{seed}:{rel}:{tid}").sample(cands, min(k, len(cands))) if k else []
                fixed[tid] = "".join(f"{d['text']}{d['target']}.\n" for d in demos)
        prompts[rel] = [r["text"] for r in rows]
        prefixes[rel] = [fixed[int(r.get("template_id", 0))] for r in rows]
    return prompts, prefixes


def _flat_order(ns: NeuronSet, score: np.ndarray, n_neurons: int) -> list[tuple[int, int]]:
    """The pairs of ``ns`` by descending score (ties by position): the selection's own ranking."""
    return sorted(ns.pairs, key=lambda p: (-float(score[p[0] * n_neurons + p[1]]), p))


@register_study
class RelationStudy(Study[RelationStudyConfig]):
    name = "relations"
    title = "Relation-specific neurons"
    intro = ("Which MLP neurons carry a relation, and what happens to factual recall when they are switched off "
             "(after Liu et al. 2025), with matched random baselines and paired tests against the unmodified model.")
    config_class = RelationStudyConfig

    def data_fingerprint(self) -> str:
        facts = self.inputs.get("facts")
        blob = json.dumps(facts, sort_keys=True) if facts is not None else "builtin"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    # --- select --------------------------------------------------------------------------------------------
    def select(self, ctx: Context[RelationStudyConfig]) -> Selection:
        from neuronatlas.data.relations import build_relation_facts, provenance as facts_provenance

        cfg, lm = ctx.config, ctx.lm
        lm.spec.check_component(cfg.site)
        facts = self.inputs.get("facts")
        if facts is None:
            facts = build_relation_facts(list(cfg.relations) if cfg.relations else None, langs=list(cfg.langs),
                                         n_test=cfg.n_test, seed=cfg.seed)
            ctx.data["provenance"] = {"builder": "neuronatlas data relations", "packages": facts_provenance()}
        else:
            ctx.data["provenance"] = {"builder": "user facts"}
        ident, test, demos = _split_facts(facts, cfg)
        prompts = PromptSet.from_rows([{"text": r["text"], "label": concept_name(r["relation"], r["lang"]),
                                        "target": r["target"], "subject": r.get("subject"), "lang": r["lang"],
                                        "split": "identify"} for r in ident], source="relation facts")
        facts_of = [r["fact_id"] for r in ident]
        with ctx.phase("record"):
            rec = record(lm, prompts, ctx.store, name="relations",
                         config=RecordConfig(component=Component(cfg.site), pool=cfg.pool, batch_size=32, top_k=10,
                                             neuron_stats=cfg.neuron_stats),
                         progress=lambda done, total: ctx.tick("record", done, total))
        assert rec.pooled is not None
        L, N = lm.n_layers, lm.n_neurons
        n_select = cfg.select_n or max(1, round(cfg.select_fraction * L * N))
        sel = Selection(cfg.scorer, cfg.site)
        scores: dict[str, np.ndarray] = {}
        agreement: dict[str, dict[str, Any]] = {}
        for lang in cfg.langs:
            idx = [i for i, lab in enumerate(rec.prompt_labels) if _lang_of(rec.labels[lab]) == lang]
            local = sorted({rec.labels[rec.prompt_labels[i]] for i in idx})
            if len(local) < 2:
                continue        # a language with a single relation has no negatives
            compare = lang == cfg.eval_lang
            names = [cfg.scorer] + ([n for n in ("ap", "smd", "lape") if n != cfg.scorer] if compare else [])
            # templates of one fact are pseudo-replicates: scorers that test (SMD) average them per fact
            fitted = {n: _fit(n, lm, rec, local, facts_of, ident, cfg) for n in names}
            main = fitted[cfg.scorer]
            for c, concept in enumerate(local):
                flat = np.asarray(main.scores_[c], dtype=np.float64)
                order = _flat_order(main.select(concept, n_select, cfg.tails), flat, N)
                sel.add(concept, order, [float(flat[a * N + b]) for a, b in order])
                scores[concept] = flat
                if compare:
                    chosen = {n: set(f.top_indices(concept, n_select).tolist()) for n, f in fitted.items()}
                    agreement[concept] = {
                        "smd_significant": int(fitted["smd"].significant_[c].sum()),  # type: ignore[attr-defined]
                        "ap_smd_jaccard": jaccard(chosen["ap"], chosen["smd"]),
                        "lape_assigned": int(np.isfinite(fitted["lape"].scores_[c]).sum()),
                        "ap_lape_jaccard": jaccard(chosen["ap"], chosen["lape"]),
                        "ap_max": float(fitted["ap"].scores_[c].max()),
                        "ap_base_rate": float(fitted["ap"].base_rate_[c])}  # type: ignore[attr-defined]
        ctx.bins = magnitude_bins(np.abs(rec.pooled.astype(np.float32)).mean(axis=0))
        prompts_, prefixes = _with_demos(test, demos, cfg.few_shot, cfg.seed)
        ctx.data.update(test=test, prompts=prompts_, prefixes=prefixes, agreement=agreement,
                        n_select=n_select, identify_prompts=len(prompts), record=rec,
                        unscored=sorted({concept_name(r["relation"], r["lang"]) for r in ident} - set(sel.ranked)),
                        medians=_median_positive(rec, sel) if cfg.mode == "median" else {})
        return sel

    def _make(self, ctx: Context[RelationStudyConfig], concept: str) -> Any:
        medians = ctx.data["medians"].get(concept, {})

        def make(ns: NeuronSet) -> Condition:
            if ctx.config.mode == "median":
                return (Clamp(ns, tuple(medians.get(p, 0.0) for p in ns.pairs)),)
            return (Ablate(ns),)
        return make

    # --- conditions: baselines first; the rest depends on which facts the model knows ----------------------
    def conditions(self, ctx: Context[RelationStudyConfig], selection: Selection) -> Grid:
        grid = Grid(ctx)
        for rel in sorted(ctx.data["test"]):
            grid.baseline(rel)
        ctx.data["selection"] = selection
        return grid

    def more_arms(self, ctx: Context[RelationStudyConfig], grid: Grid, measured: Measured) -> list[Arm]:
        cfg, sel = ctx.config, ctx.data["selection"]
        known = {r: [i for i, v in enumerate(measured.get(f"baseline|{r}", HEADLINE)) if v]
                 for r in ctx.data["test"]}
        rels = [r for r in sorted(known) if len(known[r]) >= cfg.min_known and r in sel.ranked]
        ctx.data.update(known=known, evaluated=rels)
        stage = Grid(ctx)

        def with_random(key: str, ns: NeuronSet, make: Any, r: str, tag: str) -> None:
            # the selected arm on all held-out facts (specificity, all-facts columns); its matched random
            # sets on the known facts only, where the test against them is made
            stage.selected(key, ns, make, r, concept=r, random=False)
            for arm in stage.random_arms(key, ns, make, r, random_tag=tag, concept=r, subset=known[r]):
                stage.add(arm)

        for r in rels:
            make = self._make(ctx, r)
            with_random(f"deact:{r}@{r}", sel.neurons(r), make, r, f"{r}:full")
            for r2 in rels:
                if r2 != r:
                    stage.selected(f"deact:{r}@{r2}", sel.neurons(r), make, r2, concept=r, random=False)
            size = len(sel.ranked[r])
            for frac in cfg.grid:
                n = max(1, math.ceil(frac * size))
                if n < size:
                    with_random(f"cum:{r}:{frac}", sel.top(r, n), make, r, f"{r}:{frac}")
            for other in sel.concepts:
                if other.startswith(f"{r}@"):
                    stage.selected(f"deact:{other}@{r}", sel.neurons(other), self._make(ctx, other), r,
                                   concept=other, random=False)
        arms = list(stage)
        if any(a.key not in measured.values for a in arms):
            return arms
        # interference: matched random sets only for the pairs that gain accuracy with a one-sided McNemar
        # p < alpha before correction; BH only raises p, so no other pair can be called interference
        # (the rule of studies.rules.interference). The same random sets as on the relation's own facts.
        extra: list[Arm] = []
        for r in rels:
            for r2 in rels:
                key = f"deact:{r}@{r2}"
                if r2 != r and interference_candidate(measured, key, f"baseline|{r2}", cfg.alpha):
                    extra += grid.random_arms(key, sel.neurons(r), self._make(ctx, r), r2, random_tag=f"{r}:full",
                                              concept=r)
        return extra

    # --- measure ---------------------------------------------------------------------------------------------
    def measure(self, ctx: Context[RelationStudyConfig], items: str, arms: Sequence[Arm]) -> dict[str, dict[str, Any]]:
        rows = ctx.data["test"][items]
        prompts = ctx.data["prompts"][items]
        idx = list(arms[0].subset) if arms[0].subset is not None else list(range(len(rows)))
        if not idx:
            return {a.key: {"first": [], "exact": [], "logprob": []} for a in arms}
        prefixes = ctx.data["prefixes"][items] if ctx.config.few_shot else None
        got = target_logprobs(ctx.lm, [prompts[i] for i in idx], [rows[i]["target"] for i in idx],
                              conditions=[a.condition for a in arms], batch_size=ctx.config.batch_size,
                              prefixes=[prefixes[i] for i in idx] if prefixes is not None else None)
        return {a.key: {"first": got.first_correct[k].int().tolist(), "exact": got.exact[k].int().tolist(),
                        "logprob": [round(v, 5) for v in got.logprob[k].tolist()]} for k, a in enumerate(arms)}

    # --- findings ---------------------------------------------------------------------------------------------
    def findings(self, ctx: Context[RelationStudyConfig], selection: Selection, grid: Grid,
                 measured: Measured) -> Outcome:
        from neuronatlas.studies.relations_report import relation_outcome

        return relation_outcome(ctx, selection, grid, measured)


def run_relation_study(lm: LoadedModel, out_dir: str | Path, config: RelationStudyConfig = RelationStudyConfig(), *,
                       facts: list[dict[str, Any]] | None = None, atlas: str | Path | None = None,
                       progress: ProgressFn | None = None) -> StudyResult:
    """``run(lm, config, out_dir, facts=facts)``: kept for callers of the earlier script."""
    return run(lm, config, out_dir, atlas=atlas, progress=progress, facts=facts)


def interference_candidate(measured: Measured, key: str, baseline: str, alpha: float) -> bool:
    """Whether arm ``key`` raises recall over ``baseline`` with an uncorrected one-sided exact McNemar
    p < ``alpha``: the pairs that can still pass the interference rule and so get random sets."""
    c = measured.compare(key, HEADLINE, baseline=baseline, alternative="greater")
    return c.delta > 0 and c.p_vs_unmodified < alpha


def _fit(name: str, lm: LoadedModel, rec: Any, concepts: list[str], groups: list[Any], ident: list[dict[str, Any]],
         cfg: RelationStudyConfig) -> Any:
    """Fit scorer ``name`` on the identification prompts of ``concepts``: from the record, or, for a
    scorer that runs the model (gradient attribution), on the prompts and their gold targets."""
    if name not in MODEL_SCORERS:
        return scorer(name).fit_record(rec, concepts, groups=groups)
    rows = [r for r in ident if concept_name(r["relation"], r["lang"]) in concepts]
    fitted = scorer(name, lm=lm, component=cfg.site)
    fitted.fit_prompts([r["text"] for r in rows], [r["target"] for r in rows],  # type: ignore[attr-defined]
                       [concepts.index(concept_name(r["relation"], r["lang"])) for r in rows])
    fitted.concepts_ = list(concepts)
    return fitted


def _median_positive(rec: Any, selection: Selection) -> dict[str, dict[tuple[int, int], float]]:
    """Per concept, each selected neuron's median positive pooled response on that concept's prompts."""
    out: dict[str, dict[tuple[int, int], float]] = {}
    pooled = rec.pooled.astype(np.float32)
    for concept in selection.concepts:
        rows = pooled[np.asarray(rec.prompt_labels) == rec.labels.index(concept)]
        vals = {}
        for layer, j in selection.neurons(concept).pairs:
            col = rows[:, layer, j]
            pos = col[col > 0]
            vals[(layer, j)] = float(np.median(pos)) if pos.size else 0.0
        out[concept] = vals
    return out


def _lang_of(concept: str) -> str:
    return concept.split("@", 1)[1] if "@" in concept else "en"
