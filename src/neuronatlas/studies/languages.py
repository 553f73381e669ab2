"""Language-specific neurons (LAPE, Tang et al. 2024; entropy-max variant, Zhang et al. 2025), on the
study framework.

    >>> from neuronatlas.studies import run
    >>> from neuronatlas.studies.languages import LanguagesConfig
    >>> res = run(lm, LanguagesConfig(langs=("en", "fr", "de"), n_per_lang=40), "out/languages")  # doctest: +SKIP
    >>> res["ppl"]["change"]["fr"]["fr"], res.findings["own_ppl"]                                 # doctest: +SKIP

``select``: parallel verses (``neuronatlas.data.languages``) are split into identify/test; the identify
verses are recorded at the gate site (``record``), whose per-language ``act_prob`` is LAPE's p; LAPE
selects each language's neurons (the entropy-max variant is fitted beside it). ``conditions``: each
language's neurons zeroed (gate site, every position) while the NLL of every language's held-out
verses is measured, against ``n_random`` sets matched on layer and magnitude decile and outside every
language's set (on the language's own verses); greedy continuations of the first words of held-out
verses with no intervention, each language's neurons zeroed (with its random sets), and each
language's neurons clamped to their recorded maximum on that language's tokens. ``findings``: paired
tests against the unmodified model and empirical ranks among the random sets, by the rules of
:mod:`neuronatlas.studies.rules`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from neuronatlas.data.prompts import PromptSet
from neuronatlas.errors import DatasetError
from neuronatlas.evaluate import generate
from neuronatlas.evaluate.perplexity import text_nll
from neuronatlas.intervene import Ablate, Clamp, NeuronSet
from neuronatlas.intervene.interventions import Condition
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record import RecordConfig, record
from neuronatlas.stats.inference import magnitude_bins
from neuronatlas.stats.lape import EntropyMaxScorer, LanguageWarning, LAPEScorer
from neuronatlas.studies.framework import (
    Arm, Context, Grid, Measured, Outcome, ProgressFn, Selection, Study, StudyConfig, StudyResult, register_study, run,
)

__all__ = ["LanguagesConfig", "LanguagesStudy", "run_languages_study", "STUDY"]

STUDY = "languages"
_DEFAULT_LANGS = ("en", "fr", "de", "es", "it", "pt", "ru", "ar")


@dataclass(frozen=True)
class LanguagesConfig(StudyConfig):
    """Every knob of the study; the defaults are the documented default run."""

    langs: tuple[str, ...] = _DEFAULT_LANGS
    n_per_lang: int = 80             # verses per language; ``heldout`` of them are test verses
    heldout: float = 0.25
    data_seed: int = 0
    top_rate: float = 0.01
    filter_rate: float = 0.95
    activation_bar_ratio: float = 0.95
    lambda_: float | None = None     # variant's lambda; None sweeps
    batch_size: int = 8              # texts per forward (times the conditions sharing it)
    max_tokens: int = 4096           # rows x width cap per forward (bounds the logits tensor)
    max_length: int = 128
    n_gen: int = 8                   # generation prompts per language
    prompt_words: int = 6
    max_new_tokens: int = 16
    clamp_scale: float = 1.0         # clamp value = clamp_scale x the language's recorded max
    random_scope: Literal["diagonal", "all"] = "diagonal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "langs", tuple(self.langs))
        if len(self.langs) < 2 or len(set(self.langs)) != len(self.langs):
            raise DatasetError(f"give at least two distinct languages, got {list(self.langs)}")
        if self.random_scope not in ("diagonal", "all"):
            raise DatasetError(f"random_scope must be 'diagonal' or 'all', got {self.random_scope!r}")
        if self.n_random < 1 or self.n_gen < 1:
            raise DatasetError("n_random and n_gen must be at least 1")


def zero(neurons: NeuronSet) -> Condition:
    """Deactivation: the neurons set to 0 at every position."""
    return (Ablate(neurons),)


def _mean(values: Sequence[Any]) -> float:
    """Mean of the finite values (None and NaN skipped); NaN when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _load_rows(config: LanguagesConfig, rows: Sequence[dict[str, Any]] | None) -> tuple[PromptSet, dict[str, Any]]:
    from neuronatlas.data import languages as langdata

    if rows is None:
        try:
            rows = langdata.build_language_texts(list(config.langs), config.n_per_lang, config.heldout, config.data_seed)
            prov = langdata.provenance(verse_counts=False)
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
    else:
        prov = {"source": "rows given by the caller"}
    kept = [r for r in rows if r.get("label") in config.langs]
    prompts = PromptSet.from_rows(kept, source="languages")
    for lang in config.langs:
        for split in ("identify", "test"):
            if not any(p.label == lang and p.split == split for p in prompts):
                raise DatasetError(f"language {lang!r} has no {split!r} rows; build the data with "
                                   "`neuronatlas data languages` or pick languages from available_languages()")
    return prompts, prov


@register_study
class LanguagesStudy(Study[LanguagesConfig]):
    name = STUDY
    title = "Language-specific neurons (LAPE)"
    intro = ("Neurons whose activation probability singles out one language (Tang et al. 2024), tested by "
             "zeroing and clamping them, against random neurons matched on layer and magnitude.")
    config_class = LanguagesConfig
    pass_arms = 5

    def data_fingerprint(self) -> str:
        import hashlib
        import json

        rows = self.inputs.get("rows")
        return hashlib.sha256((json.dumps(rows, sort_keys=True) if rows is not None else "builtin").encode()).hexdigest()[:12]

    def select(self, ctx: Context[LanguagesConfig]) -> Selection:
        cfg, lm = ctx.config, ctx.lm
        prompts, prov = _load_rows(cfg, self.inputs.get("rows"))
        langs = list(cfg.langs)
        identify, test = prompts.filter(split="identify"), prompts.filter(split="test")
        with ctx.phase("record"):
            rec = record(lm, identify, ctx.store, name=STUDY, progress=lambda d, t: ctx.tick("record", d, t),
                         config=RecordConfig(component=Component.GATE, pool="mean", batch_size=16,
                                             max_length=cfg.max_length, keep_pooled=False))
        order = [rec.labels.index(lang) for lang in langs]
        act_prob, counts = rec.moments.act_prob.numpy()[order], rec.moments.count.numpy()[order]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LanguageWarning)
            lape = LAPEScorer(cfg.top_rate, cfg.filter_rate, cfg.activation_bar_ratio).fit(act_prob, counts, langs)
            emax = EntropyMaxScorer(cfg.lambda_, top_rate=cfg.top_rate, filter_rate=cfg.filter_rate,
                                    activation_bar_ratio=cfg.activation_bar_ratio).fit(act_prob, counts, langs)
        total = rec.moments.total()
        ctx.bins = magnitude_bins(np.abs(total.mean[0].numpy()))
        gen_prompts = {lang: [" ".join(p.text.split()[: cfg.prompt_words]) for p in test if p.label == lang][: cfg.n_gen]
                       for lang in langs}
        ctx.data.update(provenance={"data": prov, "record": rec.info}, lape=lape, emax=emax, test=test,
                        maxima=rec.moments.max.numpy()[order], warnings=[str(w.message) for w in caught],
                        identify_tokens=dict(zip(langs, counts.astype(int).tolist())),
                        verses={lang: [i for i, p in enumerate(test) if p.label == lang] for lang in langs},
                        gen_prompts=[t for lang in langs for t in gen_prompts[lang]],
                        gen_langs=[lang for lang in langs for _ in gen_prompts[lang]])
        sel = Selection("lape", "gate")
        for lang in langs:
            sel.add(lang, lape.neurons_.get(lang, []), lape.neuron_scores_.get(lang, []))
        return sel

    def conditions(self, ctx: Context[LanguagesConfig], selection: Selection) -> Grid:
        cfg, langs = ctx.config, list(ctx.config.langs)
        union = NeuronSet.of([p for c in selection.concepts for p, _ in selection.ranked[c]], "gate")
        grid = Grid(ctx)
        grid.baseline("ppl")
        grid.baseline("gen")
        gen_idx = {k: [i for i, lang in enumerate(ctx.data["gen_langs"]) if lang == k] for k in langs}
        for k, lang in enumerate(langs):
            ns = selection.neurons(lang)
            if not len(ns):
                continue
            grid.selected(f"deact:{lang}", ns, zero, "ppl", concept=lang, random=False)
            scope = ctx.data["verses"][lang] if cfg.random_scope == "diagonal" else None
            for arm in grid.random_arms(f"deact:{lang}", ns, zero, "ppl", random_tag=lang, concept=lang, subset=scope,
                                        exclude=union):
                grid.add(arm)
            grid.selected(f"gen:deact:{lang}", ns, zero, "gen", concept=lang, random=False)
            for arm in grid.random_arms(f"gen:deact:{lang}", ns, zero, "gen", random_tag=lang, concept=lang,
                                        subset=gen_idx[lang], exclude=union):
                grid.add(arm)
            values = tuple(float(ctx.data["maxima"][k, a, b]) * cfg.clamp_scale for a, b in ns.pairs)

            def clamp(n: NeuronSet, v: tuple[float, ...] = values) -> Condition:
                return (Clamp(n, v),)
            grid.selected(f"gen:clamp:{lang}", ns, clamp, "gen", concept=lang, random=False)
        return grid

    def measure(self, ctx: Context[LanguagesConfig], items: str, arms: Sequence[Arm]) -> dict[str, dict[str, Any]]:
        cfg = ctx.config
        conds: list[Condition] = [a.condition for a in arms]
        if items == "ppl":
            texts = [p.text for p in ctx.data["test"]]
            idx = list(arms[0].subset) if arms[0].subset is not None else list(range(len(texts)))
            r = text_nll(ctx.lm, [texts[i] for i in idx], conditions=conds, batch_size=cfg.batch_size,
                         max_tokens=cfg.max_tokens, max_length=cfg.max_length)
            tok = r.n_tokens.tolist()
            return {a.key: {"nll": r.nll[g].tolist(), "tokens": tok,
                            "nll_per_token": [x / max(1, t) for x, t in zip(r.nll[g].tolist(), tok)]}
                    for g, a in enumerate(arms)}
        from neuronatlas.data.languages import detect_language

        prompts, plang = ctx.data["gen_prompts"], ctx.data["gen_langs"]
        idx = list(arms[0].subset) if arms[0].subset is not None else list(range(len(prompts)))
        outs = generate(ctx.lm, [prompts[i] for i in idx], conditions=conds, max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.batch_size)
        got: dict[str, dict[str, Any]] = {}
        for g, a in enumerate(arms):
            det = detect_language(outs[g])
            got[a.key] = {"text": outs[g], "detected": det,
                          "switch": [int(d != plang[i]) for d, i in zip(det, idx)]}
        return got

    def findings(self, ctx: Context[LanguagesConfig], selection: Selection, grid: Grid, measured: Measured) -> Outcome:
        from neuronatlas.studies.languages_report import languages_outcome

        return languages_outcome(ctx, selection, grid, measured)


def run_languages_study(lm: LoadedModel, out: str | Path, config: LanguagesConfig = LanguagesConfig(), *,
                        atlas: str | Path | None = None, rows: Sequence[dict[str, Any]] | None = None,
                        progress: ProgressFn | None = None) -> StudyResult:
    """``run(lm, config, out, rows=rows)``: kept for callers of the earlier script."""
    return run(lm, config, out, atlas=atlas, progress=progress, rows=rows)
