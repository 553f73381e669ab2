"""Relation-specific neurons (Liu et al. 2025), reproduced with baselines and significance tests.

Pipeline: facts -> record pooled responses on identification prompts -> score neurons per relation
(AP by default) -> evaluate held-out facts under deactivation, every condition in batched passes ->
cumulativity, versatility (overlap, cross-deactivation, cross-lingual), interference, layer
distribution -> results.json, PNG plots, report.html.

    >>> from neuronatlas.models import load_model
    >>> from neuronatlas.studies.relations import RelationStudyConfig, run_relation_study
    >>> results = run_relation_study(load_model("default"), "out/relations", RelationStudyConfig())
    >>> results["cumulativity"]["country_capital"]["selected"]   # accuracy per deactivated fraction

Reruns reuse the recorded activations and every finished evaluation (``state.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from neuronatlas.data.prompts import PromptSet
from neuronatlas.errors import DatasetError
from neuronatlas.evaluate.core import target_logprobs
from neuronatlas.intervene import Ablate, Clamp, NeuronSet
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record import RecordConfig, record
from neuronatlas.record.batching import ForwardCount, count_forwards
from neuronatlas.stats.inference import magnitude_bins
from neuronatlas.stats.scorers import scorer
from neuronatlas.store import Atlas
from neuronatlas.studies.common import (
    StudyState, concept_seed, copy_into_atlas, jaccard, random_like, replace_selections, study_provenance,
)

__all__ = ["RelationStudyConfig", "run_relation_study", "concept_name", "load_facts", "facts_languages", "SPLIT_NAMES"]

ProgressFactory = Callable[[str, int], Any]


@dataclass(frozen=True)
class RelationStudyConfig:
    relations: tuple[str, ...] | None = None     # None: every relation in the facts
    langs: tuple[str, ...] = ("en", "de", "fr", "es")   # identification languages (cross-lingual comparison)
    eval_lang: str = "en"                        # language whose held-out facts are evaluated
    max_identify_facts: int = 40                 # facts per relation and language used to find neurons
    max_test_facts: int = 50                     # held-out facts evaluated per relation
    n_test: int = 50                             # held-out facts per relation in the split
    few_shot: int = 0                            # demonstrations prefixed to evaluation prompts
    test_template: int = 0                       # template of the evaluated facts; identification never uses it
    share_templates: bool = False                # True: identification also uses the test template (old behaviour)
    site: Literal["mlp", "gate"] = "mlp"
    pool: Literal["mean", "last", "max"] = "mean"
    scorer: Literal["ap", "smd", "lape"] = "ap"
    select_fraction: float = 0.01                # of all neurons, per relation
    select_n: int | None = None                  # overrides select_fraction
    tails: Literal["top", "both"] = "top"
    mode: Literal["zero", "median"] = "zero"     # deactivation: 0, or the relation's median positive response
    grid: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    seeds: int = 3                               # random-neuron baselines per condition
    min_known: int = 5                           # relations with fewer known test facts are not evaluated
    cumulativity_on: Literal["known", "all"] = "known"   # facts cumulativity accuracy is measured on
    batch_size: int = 8                          # facts per pass (x up to 8 conditions: 64 rows on a CPU)
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def concept_name(relation: str, lang: str) -> str:
    return relation if lang == "en" else f"{relation}@{lang}"


def load_facts(path: str | Path) -> list[dict[str, Any]]:
    """Read user facts (JSONL rows with text, target, relation, lang, split, fact_id, template_id)."""
    rows = []
    p = Path(path)
    if not p.exists():
        raise DatasetError("facts file not found; check --facts", path=str(p))
    for line_no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"bad JSON ({exc.msg})", path=str(p), line=line_no) from None
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


SPLIT_NAMES = {"identify": "identify", "train": "identify", "test": "test", "dev": "test"}


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


def _with_demos(test: dict[str, list[dict]], demo_rows: list[dict], k: int, seed: int) -> dict[str, list[str]]:
    """Evaluation prompts; with ``k`` > 0 each gets k demonstrations of its relation (same template)."""
    out: dict[str, list[str]] = {}
    pool: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in demo_rows:
        pool[(r["relation"], int(r.get("template_id", 0)))].append(r)
    for rel, rows in test.items():
        rng = random.Random(f"{seed}:{rel}")
        prompts = []
        for r in rows:
            cands = sorted(pool[(rel, int(r.get("template_id", 0)))], key=lambda d: d["fact_id"])
            demos = rng.sample(cands, min(k, len(cands))) if k else []
            prompts.append("".join(f"{d['text']}{d['target']}.\n" for d in demos) + r["text"])
        out[rel] = prompts
    return out


def _neuron_set(flat: Sequence[int], n_neurons: int, component: str) -> NeuronSet:
    return NeuronSet.of([(int(j) // n_neurons, int(j) % n_neurons) for j in flat], component)


def run_relation_study(lm: LoadedModel, out_dir: str | Path, config: RelationStudyConfig = RelationStudyConfig(), *,
                       facts: list[dict[str, Any]] | None = None, atlas: str | Path | None = None,
                       progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Run the whole study; see the module docstring. Returns the results dictionary."""
    with count_forwards(lm) as forwards:
        return _run(lm, out_dir, config, facts, atlas, progress, forwards)


def _run(lm: LoadedModel, out_dir: str | Path, config: RelationStudyConfig, facts: list[dict[str, Any]] | None,
         atlas: str | Path | None, progress: ProgressFactory | None, forwards: ForwardCount) -> dict[str, Any]:
    from neuronatlas.data.relations import build_relation_facts, provenance as facts_provenance
    from neuronatlas.studies.relations_report import HEADLINE, write_outputs

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm.spec.check_component(config.site)
    if facts is None:
        facts = build_relation_facts(list(config.relations) if config.relations else None,
                                     langs=list(config.langs), n_test=config.n_test, seed=config.seed)
        data_source = {"builder": "neuronatlas data relations", "packages": facts_provenance()}
    else:
        data_source = {"builder": "user facts"}
    facts_hash = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    ident_rows, test_rows, demo_rows = _split_facts(facts, config)
    concepts = sorted({concept_name(r["relation"], r["lang"]) for r in ident_rows})
    store = Atlas.create(atlas or out / "atlas", model=lm.provenance)
    state = StudyState(out / "state.json", f"{config.fingerprint()}:{facts_hash[:12]}:{lm.provenance.get('file_sha256') or lm.name}")
    counter = {"forward_rows": 0, "forward_calls": 0}

    # 1. record pooled responses on the identification prompts
    prompts = PromptSet.from_rows([{"text": r["text"], "label": concept_name(r["relation"], r["lang"]),
                                    "target": r["target"], "subject": r.get("subject"), "lang": r["lang"],
                                    "split": "identify"} for r in ident_rows], source="relation facts")
    rec_cfg = RecordConfig(component=config.site, pool=config.pool, batch_size=32, top_k=10)
    bar = progress("recording identification prompts", len(prompts)) if progress else None
    rows_before = forwards.rows
    with (bar if bar is not None else _null()) as update:
        rec = record(lm, prompts, store, name="relations", config=rec_cfg,
                     progress=(lambda done, total: update(done)) if update else None)
    recorded_rows = forwards.rows - rows_before
    assert rec.pooled is not None
    L, N = lm.n_layers, lm.n_neurons
    responses = rec.pooled.reshape(len(prompts), L * N)

    # 2. score and select neurons per concept (scored within each language)
    n_select = config.select_n or max(1, round(config.select_fraction * L * N))
    selected: dict[str, NeuronSet] = {}
    scores: dict[str, np.ndarray] = {}
    alt: dict[str, dict[str, Any]] = {}
    for lang in config.langs:
        idx = [i for i, lab in enumerate(rec.prompt_labels) if _lang_of(rec.labels[lab]) == lang]
        local_labels = sorted({rec.labels[rec.prompt_labels[i]] for i in idx})
        if len(local_labels) < 2:
            continue
        lab_idx = np.array([local_labels.index(rec.labels[rec.prompt_labels[i]]) for i in idx])
        compare = lang == config.eval_lang
        # one scorer interface: the configured scorer selects; on the evaluation language the other
        # two are fitted as well, to report how far the scorers agree
        names = [config.scorer] + ([n for n in ("ap", "smd", "lape") if n != config.scorer] if compare else [])
        fitted = {n: scorer(n).fit_record(rec, local_labels) for n in names}
        main = fitted[config.scorer]
        for c, concept in enumerate(local_labels):
            selected[concept] = main.select(concept, n_select, config.tails)
            scores[concept] = np.asarray(main.scores_[c], dtype=np.float64)
            if compare:
                chosen = {n: set(f.top_indices(concept, n_select).tolist()) for n, f in fitted.items()}
                ap, smd, lape = fitted["ap"], fitted["smd"], fitted["lape"]
                alt[concept] = {"smd_significant": int(smd.significant_[c].sum()),  # type: ignore[attr-defined]
                                "ap_smd_jaccard": jaccard(chosen["ap"], chosen["smd"]),
                                "lape_assigned": int(np.isfinite(lape.scores_[c]).sum()),
                                "ap_lape_jaccard": jaccard(chosen["ap"], chosen["lape"]),
                                "ap_max": float(ap.scores_[c].max()),
                                "ap_base_rate": float(ap.base_rate_[c])}  # type: ignore[attr-defined]
    unscored = [c for c in concepts if c not in selected]  # a language with a single relation has no negatives
    concepts = sorted(selected)
    _write_selections(store, selected, scores, config, N)

    # 3. baseline on held-out facts, then every deactivation condition in batched passes
    eval_prompts = _with_demos(test_rows, demo_rows, config.few_shot, config.seed)
    medians = _median_positive(rec, selected) if config.mode == "median" else {}

    def deactivate(ns: NeuronSet, key: str) -> Ablate | Clamp:
        if config.mode == "median":
            return Clamp(ns, tuple(medians.get(key, {}).get(p, 0.0) for p in ns.pairs))
        return Ablate(ns)

    def evaluate(rel: str, conds: dict[str, Any], idx: list[int] | None = None) -> dict[str, dict[str, list]]:
        """Evaluate conditions on test facts ``idx`` of ``rel`` (default all); finished ones come from the state."""
        idx = list(range(len(eval_prompts[rel]))) if idx is None else idx
        todo = {k: v for k, v in conds.items() if f"{rel}|{k}" not in state}
        if todo and idx:
            keys = list(todo)
            scores_ = target_logprobs(lm, [eval_prompts[rel][i] for i in idx], [test_rows[rel][i]["target"] for i in idx],
                                      conditions=[todo[k] for k in keys], batch_size=config.batch_size)
            counter["forward_rows"] += len(keys) * len(idx)
            for i, k in enumerate(keys):
                state.put(f"{rel}|{k}", {"idx": idx, "correct": scores_.first_correct[i].int().tolist(),
                                         "exact": scores_.exact[i].int().tolist(),
                                         "logprob": [round(v, 5) for v in scores_.logprob[i].tolist()]})
        return {k: state.get(f"{rel}|{k}") or {"idx": [], "correct": [], "exact": [], "logprob": []} for k in conds}

    bar = progress("baseline recall", len(test_rows)) if progress else None
    baseline: dict[str, dict[str, list]] = {}
    with (bar if bar is not None else _null()) as update:
        for i, rel in enumerate(sorted(test_rows)):
            baseline[rel] = evaluate(rel, {"baseline": ()})["baseline"]
            if update:
                update(i + 1)
    # a fact is known when greedy decoding yields its whole object (not just a leading token)
    eval_rels = [r for r in sorted(test_rows) if sum(baseline[r][HEADLINE]) >= config.min_known and r in selected]
    # random sets: per relation, matched on layer and on the decile of mean |response| within the layer
    bins = magnitude_bins(np.abs(rec.pooled.astype(np.float32)).mean(axis=0))

    def randoms(ns: NeuronSet, r: str, tag: str) -> list[NeuronSet]:
        return [random_like(ns, N, seed=concept_seed(config.seed, f"{r}:{tag}", s), bins=bins)
                for s in range(config.seeds)]

    conditions: dict[str, dict[str, Any]] = {}
    for r in eval_rels:
        full = selected[r]
        conditions[f"deact:{r}"] = (deactivate(full, r),)
        for s, ns in enumerate(randoms(full, r, "full")):
            conditions[f"rand:{r}:{s}"] = (deactivate(ns, r),)
    per_rel: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}   # (on all test facts, cumulativity)
    for r in eval_rels:
        conds = dict(conditions)
        cum: dict[str, Any] = {}
        order = [selected[r].pairs[i] for i in _rank_order(selected[r], scores[r], N)]
        for frac in config.grid:
            n = max(1, math.ceil(frac * len(order)))
            if n >= len(order):  # the full set is already evaluated as deact:r / rand:r:s
                continue
            sub = NeuronSet.of(order[:n], config.site)
            cum[f"cum:{frac}"] = (deactivate(sub, r),)
            for s, ns in enumerate(randoms(sub, r, str(frac))):
                cum[f"cumrand:{frac}:{s}"] = (deactivate(ns, r),)
        for other in sorted(selected):  # the same relation's neurons found in other languages
            if other.startswith(f"{r}@"):
                conds[f"deact:{other}"] = (deactivate(selected[other], other),)
        per_rel[r] = (conds, cum)
    total = sum(len(a) + len(b) for a, b in per_rel.values())
    bar = progress("deactivation conditions", total) if progress else None
    results_by_rel: dict[str, dict[str, dict[str, list]]] = {}
    with (bar if bar is not None else _null()) as update:
        done = 0
        for r in eval_rels:
            conds, cum = per_rel[r]
            results_by_rel[r] = {"baseline": baseline[r], **evaluate(r, conds)}
            cum_idx = [i for i, c in enumerate(baseline[r][HEADLINE]) if c] if config.cumulativity_on == "known" else None
            results_by_rel[r].update(evaluate(r, cum, cum_idx))
            done += len(conds) + len(cum)
            if update:
                update(done)

    results = {
        "study": "relations",
        "config": asdict(config),
        "prompting": f"{config.few_shot}-shot" if config.few_shot else "zero-shot templates",
        "provenance": study_provenance(lm, seed=config.seed, dataset_sha256=facts_hash,
                                       extra={"data": data_source, "record_fingerprint": rec.info.get("fingerprint")}),
        "n_selected": n_select, "n_neurons_total": L * N, "n_layers": L,
        "concepts": concepts, "unscored_concepts": unscored, "evaluated_relations": eval_rels,
        "identify_prompts": len(prompts),
        "scorer_comparison": alt,
        "selected": {c: [list(p) for p in ns.pairs] for c, ns in selected.items()},
        "baseline": baseline, "raw": results_by_rel,
        "timing": {"seconds": round(time.perf_counter() - t_start, 1), "forward_rows": counter["forward_rows"],
                   "record_seconds": rec.info.get("record_seconds"), "model_forward_calls": forwards.forwards,
                   "model_forward_rows": forwards.rows, "model_forward_tokens": forwards.tokens,
                   # the minimum: every identification prompt recorded this run, and every (condition, fact) pair, once
                   "minimum_rows": counter["forward_rows"] + recorded_rows},
    }
    summary = write_outputs(out, results, selected, config, lm)
    _mirror_into_atlas(store, out, summary)
    return summary


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _rank_order(ns: NeuronSet, score: np.ndarray, n_neurons: int) -> list[int]:
    """Positions in ``ns.pairs`` sorted by descending score (the selection's own ranking)."""
    flat = [layer * n_neurons + j for layer, j in ns.pairs]
    return sorted(range(len(flat)), key=lambda i: (-float(score[flat[i]]), flat[i]))


def _median_positive(rec: Any, selected: dict[str, NeuronSet]) -> dict[str, dict[tuple[int, int], float]]:
    """Per concept, each selected neuron's median positive pooled response on that concept's prompts."""
    out: dict[str, dict[tuple[int, int], float]] = {}
    pooled = rec.pooled.astype(np.float32)
    for concept, ns in selected.items():
        rows = pooled[np.asarray(rec.prompt_labels) == rec.labels.index(concept)]
        vals = {}
        for layer, j in ns.pairs:
            col = rows[:, layer, j]
            pos = col[col > 0]
            vals[(layer, j)] = float(np.median(pos)) if pos.size else 0.0
        out[concept] = vals
    return out


def _lang_of(concept: str) -> str:
    return concept.split("@", 1)[1] if "@" in concept else "en"


def _write_selections(store: Atlas, selected: dict[str, NeuronSet], scores: dict[str, np.ndarray],
                      cfg: RelationStudyConfig, n_neurons: int) -> None:
    """Replace this study's rows of the atlas's selections table (best neuron first per concept)."""
    import pyarrow as pa

    rows: dict[str, list[Any]] = defaultdict(list)
    for concept, ns in selected.items():
        flat = scores[concept]
        for rank, i in enumerate(_rank_order(ns, flat, n_neurons)):
            layer, j = ns.pairs[i]
            rows["study"].append("relations")
            rows["concept"].append(concept)
            rows["method"].append(cfg.scorer)
            rows["site"].append(cfg.site)
            rows["layer"].append(layer)
            rows["neuron"].append(j)
            rows["score"].append(float(flat[layer * n_neurons + j]))
            rows["rank"].append(rank)
    new = pa.table({k: pa.array(v, type=pa.int32() if k in ("layer", "neuron", "rank") else None)
                    for k, v in rows.items()})
    replace_selections(store, new, study="relations")


def _mirror_into_atlas(store: Atlas, out: Path, summary: dict[str, Any]) -> None:
    copy_into_atlas(store, "relations", [f for f in sorted(out.iterdir())
                                         if f.suffix in (".json", ".png", ".html") and f.name != "state.json"])
    store.update_manifest(lambda m: m.setdefault("studies", {}).__setitem__("relations", {
        "kind": "relations", "path": "studies/relations", "created": summary["provenance"]["created"],
        "concepts": summary["concepts"]}))
