"""Language-specific neurons (LAPE, Tang et al. 2024; entropy-max variant, Zhang et al. 2025), end to end.

    >>> from neuronatlas.models import load_model
    >>> from neuronatlas.studies.languages import LanguagesConfig, run_languages_study
    >>> lm = load_model("default")
    >>> res = run_languages_study(lm, "out/languages", LanguagesConfig(langs=("en", "fr", "de"), n_per_lang=40))
    >>> res["ppl"]["change"]["fr"]["fr"], res["ppl"]["random"]["fr"]["fr"]   # own-language PPL change vs random
    >>> res["generation"]["deactivate"]["fr"]["switch_rate"], res["generation"]["clamp"]["fr"]["rate_other"]

Steps: parallel verses (``neuronatlas.data.languages``) are split into identify/test; the identify
verses are recorded at the gate site with the standard recorder (``record``), whose per-language
``act_prob`` is LAPE's p; LAPE and the variant select neurons; each language's LAPE neurons are zeroed
(gate site, every position) while the perplexity of every language's held-out verses is measured (an
L x L matrix, all conditions batched per forward), against layer-matched random neurons (``seeds``
seeds, outside every language's set). Greedy continuations of the first words of held-out verses are
generated with no intervention, with each language's neurons zeroed, and with each language's neurons
clamped to their recorded maximum on that language's tokens; ``detect_language`` labels them.
Everything lands in ``out/results.json``, PNG plots and ``out/report.html``; the LAPE neurons go to the
atlas's ``selections.parquet``. Finished conditions are kept in ``out/state.json`` and reused by a rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from neuronatlas.data.prompts import PromptSet
from neuronatlas.ids import neuron_str
from neuronatlas.errors import DatasetError
from neuronatlas.evaluate.perplexity import count_forwards, perplexity, text_nll
from neuronatlas.intervene import Ablate, Clamp, NeuronSet, intervene
from neuronatlas.intervene.interventions import Condition
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record import RecordConfig, record
from neuronatlas.record.batching import encode
from neuronatlas.report import Section, Table, write_report
from neuronatlas.stats.lape import CATEGORIES, EntropyMaxScorer, LanguageWarning, LAPEScorer
from neuronatlas.store import Atlas, write_json_atomic
from neuronatlas.studies.common import (
    StudyState, copy_into_atlas, jaccard, mean_ci, random_like, replace_selections, study_provenance,
)

__all__ = ["LanguagesConfig", "run_languages_study", "write_language_selections", "STUDY"]

STUDY = "languages"
Progress = Callable[[str, int, int], None]
_DEFAULT_LANGS = ("en", "fr", "de", "es", "it", "pt", "ru", "ar")


@dataclass(frozen=True)
class LanguagesConfig:
    """Every knob of the study; the defaults are the documented default run."""

    langs: tuple[str, ...] = _DEFAULT_LANGS
    n_per_lang: int = 80             # verses per language; ``heldout`` of them are test verses
    heldout: float = 0.25
    data_seed: int = 0
    seeds: int = 3                   # random-neuron baselines
    seed: int = 0
    top_rate: float = 0.01
    filter_rate: float = 0.95
    activation_bar_ratio: float = 0.95
    lambda_: float | None = None     # variant's lambda; None sweeps
    batch_size: int = 8              # texts per forward (times the conditions sharing it)
    max_tokens: int = 4096           # rows x width cap per forward (bounds the logits tensor)
    pass_conditions: int = 5         # conditions evaluated together (also the resume granularity)
    max_length: int = 128
    n_gen: int = 8                   # generation prompts per language
    prompt_words: int = 6
    max_new_tokens: int = 16
    max_gen_rows: int = 576          # rows (prompts x conditions) per generate call
    clamp_scale: float = 1.0         # clamp value = clamp_scale x the language's recorded max
    random_scope: Literal["diagonal", "all"] = "diagonal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "langs", tuple(self.langs))
        if len(self.langs) < 2 or len(set(self.langs)) != len(self.langs):
            raise DatasetError(f"give at least two distinct languages, got {list(self.langs)}")
        if self.random_scope not in ("diagonal", "all"):
            raise DatasetError(f"random_scope must be 'diagonal' or 'all', got {self.random_scope!r}")
        if self.seeds < 1 or self.n_gen < 1 or self.pass_conditions < 1:
            raise DatasetError("seeds, n_gen and pass_conditions must be at least 1")


def _mean(values: Sequence[Any]) -> float:
    """Mean of the finite values (None and NaN skipped); NaN when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


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


def write_language_selections(store: Atlas, scorer: LAPEScorer, *, study: str = STUDY, method: str = "lape") -> int:
    """Replace ``study``'s rows of the atlas's ``selections.parquet`` with ``scorer``'s neurons (atomic)."""
    schema = pa.schema([("study", pa.string()), ("concept", pa.string()), ("method", pa.string()),
                        ("site", pa.string()), ("layer", pa.int32()), ("neuron", pa.int32()),
                        ("score", pa.float64()), ("rank", pa.int32())])
    new = pa.Table.from_pylist(scorer.selection_rows(study=study, method=method, site="gate"), schema=schema)
    replace_selections(store, new, study=study)
    return len(scorer.selected_)


def run_languages_study(lm: LoadedModel, out: str | Path, config: LanguagesConfig = LanguagesConfig(), *,
                        atlas: str | Path | None = None, rows: Sequence[dict[str, Any]] | None = None,
                        progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; returns what ``out/results.json`` holds."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = Atlas.create(atlas if atlas is not None else out / "atlas", model=lm.provenance)
    prompts, data_prov = _load_rows(config, rows)
    langs = list(config.langs)
    identify, test = prompts.filter(split="identify"), prompts.filter(split="test")
    tick = progress or (lambda phase, done, total: None)
    timings: dict[str, float] = {}
    forwards: dict[str, int] = {}

    # 1. record the gate site on the identify verses (resumable, reused when finished)
    t0 = time.perf_counter()
    rec_cfg = RecordConfig(component=Component.GATE, pool="mean", batch_size=16, max_length=config.max_length,
                           keep_pooled=False)
    with count_forwards(lm) as calls:
        rec = record(lm, identify, store, name=STUDY, config=rec_cfg,
                     progress=lambda done, total: tick("record", done, total))
    timings["record"], forwards["record"] = time.perf_counter() - t0, calls.forwards
    order = [rec.labels.index(lang) for lang in langs]
    act_prob = rec.moments.act_prob.numpy()[order]
    counts = rec.moments.count.numpy()[order]
    maxima = rec.moments.max.numpy()[order]

    # 2. select
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LanguageWarning)
        lape = LAPEScorer(config.top_rate, config.filter_rate, config.activation_bar_ratio).fit(act_prob, counts, langs)
        emax = EntropyMaxScorer(config.lambda_, top_rate=config.top_rate, filter_rate=config.filter_rate,
                                activation_bar_ratio=config.activation_bar_ratio).fit(act_prob, counts, langs)
    sets = {lang: NeuronSet.of(lape.neurons_.get(lang, []), "gate") for lang in langs}
    union = NeuronSet.of([p for s in sets.values() for p in s.pairs], "gate")
    rand = {lang: [random_like(sets[lang], lm.n_neurons, seed=config.seed * 100_003 + 1_009 * i + s, exclude=union)
                   for s in range(config.seeds)] for i, lang in enumerate(langs)}
    write_language_selections(store, lape)

    fingerprint = _hash({"record": rec.info.get("fingerprint"), "test": test.content_hash, "config": asdict(config)})
    state = StudyState(out / "state.json", fingerprint)

    # 3. perplexity of every language's test verses under every deactivation
    t0 = time.perf_counter()
    with count_forwards(lm) as calls:
        ppl = _ppl_phase(lm, state, config, langs, test, sets, rand, tick)
    timings["perplexity"], forwards["perplexity"] = time.perf_counter() - t0, calls.forwards

    # 4. greedy generation: baseline, deactivation, clamping, random deactivation
    t0 = time.perf_counter()
    with count_forwards(lm) as calls:
        gen = _generation_phase(lm, state, config, langs, test, sets, rand, maxima, tick)
    timings["generation"], forwards["generation"] = time.perf_counter() - t0, calls.forwards

    timings["total"] = time.perf_counter() - t_start
    selection = {"lape": lape.summary(), "entropy_max": emax.summary(),
                 "overlap_lape_vs_variant": {lang: jaccard(sets[lang], NeuronSet.of(emax.neurons_[lang], "gate"))
                                             for lang in langs},
                 "neurons": {lang: [neuron_str(a, b) for a, b in lape.neurons_[lang]] for lang in langs}}
    results = _clean({
        "study": STUDY, "config": asdict(config), "languages": langs,
        "provenance": study_provenance(lm, seed=config.seed, dataset_sha256=prompts.content_hash,
                                       extra={"data": data_prov, "record": rec.info, "atlas": str(store.path),
                                              "torch_threads": torch.get_num_threads()}),
        "data": {"identify_verses": {lang: sum(p.label == lang for p in identify) for lang in langs},
                 "test_verses": {lang: sum(p.label == lang for p in test) for lang in langs},
                 "identify_tokens": dict(zip(langs, counts.astype(int).tolist()))},
        "selection": selection, "ppl": ppl, "generation": gen,
        "warnings": [str(w.message) for w in caught], "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "forward_passes_this_run": forwards,
    })
    write_json_atomic(out / "results.json", results)
    written = _report(out, results)
    copy_into_atlas(store, STUDY, [out / "results.json", *written])      # a copy inside the atlas, for the viewer
    store.update_manifest(lambda m: m.setdefault("studies", {}).__setitem__(STUDY, {
        "kind": STUDY, "path": str(out.resolve()), "created": results["provenance"]["created"], "concepts": langs}))
    return results


def _ppl_phase(lm: LoadedModel, state: StudyState, config: LanguagesConfig, langs: list[str], test: PromptSet,
               sets: dict[str, NeuronSet], rand: dict[str, list[NeuronSet]], tick: Progress) -> dict[str, Any]:
    texts = [p.text for p in test]
    idx = {lang: [i for i, p in enumerate(test) if p.label == lang] for lang in langs}
    jobs: list[tuple[str, Condition, list[int]]] = [("base", (), list(range(len(texts))))]
    jobs += [(f"deact:{lang}", (Ablate(sets[lang]),), list(range(len(texts)))) for lang in langs if len(sets[lang])]
    for lang in langs:
        scope = idx[lang] if config.random_scope == "diagonal" else list(range(len(texts)))
        jobs += [(f"rand:{lang}:{s}", (Ablate(r),), scope) for s, r in enumerate(rand[lang]) if len(r)]
    todo = [j for j in jobs if f"ppl:{j[0]}" not in state]
    total, done = sum(len(j[2]) for j in todo), 0
    by_scope: dict[tuple[int, ...], list[tuple[str, Condition, list[int]]]] = {}
    for job in todo:
        by_scope.setdefault(tuple(job[2]), []).append(job)
    for scope_key, group in by_scope.items():
        scope = list(scope_key)
        for c0 in range(0, len(group), config.pass_conditions):
            chunk = group[c0:c0 + config.pass_conditions]
            def step(n: int, _k: int = len(chunk)) -> None:
                nonlocal done
                done += n * _k
                tick("perplexity", done, total)
            r = text_nll(lm, [texts[i] for i in scope], conditions=[c for _, c, _ in chunk],
                         batch_size=config.batch_size, max_tokens=config.max_tokens, max_length=config.max_length,
                         progress=step)
            for g, (key, _, _) in enumerate(chunk):
                state.put(f"ppl:{key}", {"texts": list(scope), "nll": r.nll[g].tolist(), "n_tokens": r.n_tokens.tolist()})

    def lang_ppl(key: str, lang: str) -> float:
        got = state.get(f"ppl:{key}")
        if got is None:
            return math.nan
        pos = {t: n for n, t in enumerate(got["texts"])}
        rows = [pos[i] for i in idx[lang] if i in pos]
        return perplexity(sum(got["nll"][n] for n in rows), sum(got["n_tokens"][n] for n in rows))

    base = {lang: lang_ppl("base", lang) for lang in langs}
    change = {k: {j: lang_ppl(f"deact:{k}", j) / base[j] - 1 for j in langs} for k in langs}
    random: dict[str, dict[str, Any]] = {}
    for k in langs:
        targets = [k] if config.random_scope == "diagonal" else langs
        random[k] = {}
        for j in targets:
            vals = [lang_ppl(f"rand:{k}:{s}", j) / base[j] - 1 for s in range(config.seeds)]
            m, lo, hi = mean_ci([v for v in vals if math.isfinite(v)])
            random[k][j] = {"mean": m, "lo": lo, "hi": hi, "seeds": vals}
    tokens = {lang: sum(state.get("ppl:base")["n_tokens"][i] for i in idx[lang]) for lang in langs}
    return {"baseline": base, "change": change, "random": random, "scored_tokens": tokens,
            "n_neurons": {lang: len(sets[lang]) for lang in langs}, "random_scope": config.random_scope}


def _generation_phase(lm: LoadedModel, state: StudyState, config: LanguagesConfig, langs: list[str],
                      test: PromptSet, sets: dict[str, NeuronSet], rand: dict[str, list[NeuronSet]],
                      maxima: np.ndarray, tick: Progress) -> dict[str, Any]:
    from neuronatlas.data.languages import detect_language

    prompt_of = {lang: [" ".join(p.text.split()[: config.prompt_words]) for p in test if p.label == lang][: config.n_gen]
                 for lang in langs}
    prompts = [t for lang in langs for t in prompt_of[lang]]
    plang = [lang for lang in langs for _ in prompt_of[lang]]

    def clamp(k: int, lang: str) -> Clamp:
        values = tuple(float(maxima[k, a, b]) * config.clamp_scale for a, b in sets[lang].pairs)
        return Clamp(sets[lang], values)

    everyone = (prompts, plang)
    jobs: list[tuple[str, Condition, tuple[list[str], list[str]]]] = [("base", (), everyone)]
    jobs += [(f"deact:{lang}", (Ablate(sets[lang]),), everyone) for lang in langs if len(sets[lang])]
    jobs += [(f"clamp:{lang}", (clamp(k, lang),), everyone) for k, lang in enumerate(langs) if len(sets[lang])]
    jobs += [(f"rand:{lang}:{s}", (Ablate(r),), (prompt_of[lang], [lang] * len(prompt_of[lang])))
             for lang in langs for s, r in enumerate(rand[lang]) if len(r)]
    todo = [j for j in jobs if f"gen:{j[0]}" not in state]
    by_size: dict[int, list[tuple[str, Condition, tuple[list[str], list[str]]]]] = {}
    for job in todo:                                   # one call per block size: each condition its own prompts
        by_size.setdefault(len(job[2][0]), []).append(job)
    total, done = sum(len(j[2][0]) for j in todo), 0
    for size, group in by_size.items():
        n_calls = math.ceil(len(group) * size / max(config.max_gen_rows, size))
        for part in np.array_split(np.arange(len(group)), n_calls):
            chunk = [group[i] for i in part]
            outs = _generate_blocks(lm, [(job[2][0], job[1]) for job in chunk], config.max_new_tokens)
            for (key, _, (_, of)), gen_texts in zip(chunk, outs):
                state.put(f"gen:{key}", {"langs": of, "texts": gen_texts, "detected": detect_language(gen_texts)})
            done += size * len(chunk)
            tick("generation", done, total)

    def rates(key: str, of: list[str], target: str | None = None) -> dict[str, Any]:
        got = state.get(f"gen:{key}")
        if got is None:
            return {}
        det, pl = got["detected"], got["langs"]
        keep = [i for i, p in enumerate(pl) if p in of]
        n = len(keep)
        same = sum(det[i] == pl[i] for i in keep) / n if n else math.nan
        out = {"n": n, "same_rate": same, "switch_rate": 1 - same,
               "undetected_rate": sum(det[i] is None for i in keep) / n if n else math.nan}
        if target is not None:
            out["target_rate"] = sum(det[i] == target for i in keep) / n if n else math.nan
        return out

    base = {lang: rates("base", [lang]) for lang in langs}
    deact = {k: {**rates(f"deact:{k}", [k]), "others": rates(f"deact:{k}", [j for j in langs if j != k])}
             for k in langs}
    rnd = {}
    for k in langs:
        vals = [rates(f"rand:{k}:{s}", [k]).get("switch_rate", math.nan) for s in range(config.seeds)]
        m, lo, hi = mean_ci([v for v in vals if math.isfinite(v)])
        rnd[k] = {"mean": m, "lo": lo, "hi": hi, "seeds": vals}
    clamp_m = {k: {j: rates(f"clamp:{k}", [j], target=k).get("target_rate", math.nan) for j in langs} for k in langs}
    base_m = {k: {j: rates("base", [j], target=k)["target_rate"] for j in langs} for k in langs}
    clamp_s = {k: {"rate_other": _mean([clamp_m[k][j] for j in langs if j != k]),
                   "baseline_other": _mean([base_m[k][j] for j in langs if j != k])} for k in langs}
    examples = {key: [{"prompt": prompts[i], "lang": plang[i], "text": state.get(f"gen:{key}")["texts"][i],
                       "detected": state.get(f"gen:{key}")["detected"][i]} for i in range(0, len(prompts), config.n_gen)]
                for key in ["base"] + [f"{kind}:{lang}" for kind in ("deact", "clamp") for lang in langs]
                if state.get(f"gen:{key}") is not None}
    return {"prompts": prompt_of, "baseline": base, "deactivate": deact, "random_switch": rnd,
            "clamp": {k: {**clamp_s[k], "by_prompt_language": clamp_m[k]} for k in langs},
            "baseline_detected_as": base_m, "clamp_value": f"{config.clamp_scale} x recorded max on the language's tokens",
            "examples": examples}


def _generate_blocks(lm: LoadedModel, blocks: Sequence[tuple[list[str], Condition]],
                     max_new_tokens: int) -> list[list[str]]:
    """Greedy continuations of several (prompts, condition) blocks of equal size in one ``generate`` call.

    Like ``evaluate.generate``, but each condition has its own prompts (rows ``[c*R, (c+1)*R)``), so the
    random-neuron controls of every language share forward passes."""
    size = len(blocks[0][0])
    batch = encode(lm, [t for texts, _ in blocks for t in texts], padding_side="left")
    batch.pop("position_ids")                        # generate derives positions from the attention mask
    width = batch["input_ids"].shape[1]
    with intervene(lm, [c for _, c in blocks], rows_per_condition=size), torch.inference_mode():
        out = lm.model.generate(**{k: v.to(lm.device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=lm.tokenizer.pad_token_id)
    texts = lm.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [texts[c * size:(c + 1) * size] for c in range(len(blocks))]


def _pct(x: Any) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def _rate(x: Any) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def _findings(res: dict[str, Any]) -> list[str]:
    """One sentence per report section, computed from the numbers."""
    langs, sel, ppl, gen = res["languages"], res["selection"]["lape"], res["ppl"], res["generation"]
    total = res["provenance"]["record"]["n_layers"] * res["provenance"]["record"]["n_neurons"]
    per_layer = np.sum([sel["layer_counts"][k] for k in langs], axis=0)
    top = sorted(np.argsort(-per_layer, kind="stable")[:3].tolist())
    median = int(np.searchsorted(np.cumsum(per_layer), per_layer.sum() / 2))
    s1 = (f"LAPE selected {sel['n_selected']} of {total:,} gate neurons ({100 * sel['n_selected'] / total:.2f}%); "
          "per language: " + ", ".join(f"{k} {sel['counts'][k]}" for k in langs) + f"; {sel['n_shared']} belong to several "
          f"languages. The busiest layers are {', '.join(map(str, top))} (median layer {median}).")
    own = {k: _num(ppl["change"][k][k]) for k in langs}
    rnd = {k: ppl["random"][k][k] for k in langs}
    valid = [k for k in langs if math.isfinite(own[k]) and math.isfinite(_num(rnd[k]["mean"]))]
    if valid:
        beats = [k for k in valid if own[k] > _num(rnd[k]["hi"] if rnd[k]["hi"] is not None else rnd[k]["mean"])]
        best = max(valid, key=lambda k: own[k])
        off = _mean([ppl["change"][k][j] for k in valid for j in langs if j != k])
        s2 = (f"Zeroing a language's neurons raises its own PPL by {_pct(_mean([own[k] for k in valid]))} on average "
              f"(other languages: {_pct(off)}; random neurons of the same layers: "
              f"{_pct(_mean([rnd[k]['mean'] for k in valid]))}); the rise exceeds the random baseline's 95% CI for "
              f"{len(beats)} of {len(valid)} languages. Largest: deactivating {best} neurons raises {best} PPL by "
              f"{_pct(own[best])} vs {_pct(_num(rnd[best]['mean']))} for random neurons.")
    else:
        s2 = "No language had selected neurons, so nothing was deactivated."
    s3 = (f"With no intervention {_rate(_mean([gen['baseline'][k]['switch_rate'] for k in langs]))} of continuations "
          f"leave the prompt's language; zeroing the prompt language's neurons raises that to "
          f"{_rate(_mean([gen['deactivate'][k].get('switch_rate') for k in langs]))} (random neurons: "
          f"{_rate(_mean([gen['random_switch'][k]['mean'] for k in langs]))}).")
    s4 = ("Clamping a language's neurons to their recorded maximum while prompting in the other languages turns "
          f"{_rate(_mean([gen['clamp'][k]['rate_other'] for k in langs]))} of continuations into the clamped language "
          f"(no intervention: {_rate(_mean([gen['clamp'][k]['baseline_other'] for k in langs]))}); per language: "
          + ", ".join(f"{k} {_rate(_num(gen['clamp'][k]['rate_other']))}" for k in langs) + ".")
    em = res["selection"]["entropy_max"]
    overlap = res["selection"]["overlap_lape_vs_variant"]
    s5 = (f"The entropy-max variant (lambda = {em['lambda']}) selects {em['n_selected']} neurons: "
          f"{em['categories']['specific']} language-specific and {em['categories']['related']} language-related; "
          f"all other neurons are language-agnostic. Jaccard overlap with LAPE: "
          + ", ".join(f"{k} {_num(overlap[k]):.2f}" for k in langs) + ".")
    return [s1, s2, s3, s4, s5]


def _report(out: Path, res: dict[str, Any]) -> list[Path]:
    """Plots and report.html from the numbers in ``res``."""
    from neuronatlas.report import plots

    langs, sel, ppl, gen = res["languages"], res["selection"]["lape"], res["ppl"], res["generation"]
    rnd = {k: ppl["random"][k][k] for k in langs}
    figs = [plots.layer_histogram(out / "neurons_per_layer.png", sel["layer_counts"],
                                  title="LAPE neurons per layer and language")]
    change = 100 * np.array([[_num(ppl["change"][k][j]) for j in langs] for k in langs])
    figs.append(plots.heatmap(out / "ppl_change.png", change, langs, langs, cmap="Reds", fmt="{:.0f}",
                              title="PPL change (%) when a language's neurons are zeroed",
                              xlabel="evaluated language", ylabel="deactivated language"))
    figs.append(plots.bars(out / "ppl_vs_random.png", langs,
                           {"language neurons": [100 * _num(ppl["change"][k][k]) for k in langs],
                            "random neurons": [100 * _num(rnd[k]["mean"]) for k in langs]},
                           errors={"random neurons": [50 * (_num(rnd[k]["hi"]) - _num(rnd[k]["lo"])) for k in langs]},
                           title="Own-language PPL change", ylabel="PPL change (%)"))
    figs.append(plots.bars(out / "switch_rates.png", langs,
                           {"no intervention": [_num(gen["baseline"][k]["switch_rate"]) for k in langs],
                            "language neurons off": [_num(gen["deactivate"][k].get("switch_rate")) for k in langs],
                            "random neurons off": [_num(gen["random_switch"][k]["mean"]) for k in langs]},
                           title="Continuations not in the prompt's language", ylabel="switch rate"))
    clamp = np.array([[_num(gen["clamp"][k]["by_prompt_language"][j]) for j in langs] for k in langs])
    figs.append(plots.heatmap(out / "clamp_rates.png", clamp, langs, langs, cmap="Greens", fmt="{:.2f}",
                              title="Share of continuations detected as the clamped language",
                              xlabel="prompt language", ylabel="clamped language"))
    s1, s2, s3, s4, s5 = _findings(res)
    em = res["selection"]["entropy_max"]
    sections = [
        Section("Selected neurons", s1, ["neurons_per_layer.png"], [Table(
            ["language", "LAPE neurons", "variant neurons", "identify tokens"],
            [[k, sel["counts"][k], em["counts"][k], res["data"]["identify_tokens"][k]] for k in langs])]),
        Section("Perplexity under deactivation", s2, ["ppl_change.png", "ppl_vs_random.png"], [Table(
            ["language", "baseline PPL", "own change %", "random mean %", "random 95% CI %", "other languages %"],
            [[k, _num(ppl["baseline"][k]), 100 * _num(ppl["change"][k][k]), 100 * _num(rnd[k]["mean"]),
              f"[{100 * _num(rnd[k]['lo']):.1f}, {100 * _num(rnd[k]['hi']):.1f}]",
              100 * _mean([ppl["change"][k][j] for j in langs if j != k])] for k in langs])]),
        Section("Generation under deactivation", s3, ["switch_rates.png"], [Table(
            ["language", "switch: none", "switch: own neurons off", "switch: random off", "undetected: own off"],
            [[k, _num(gen["baseline"][k]["switch_rate"]), _num(gen["deactivate"][k].get("switch_rate")),
              _num(gen["random_switch"][k]["mean"]), _num(gen["deactivate"][k].get("undetected_rate"))]
             for k in langs])],
            notes="Switch rate: share of greedy continuations whose detected language (langdetect) is not the "
                  "prompt's language, undetectable text included."),
        Section("Clamping language neurons", s4, ["clamp_rates.png"], [Table(
            ["clamped language", "other-language prompts continued in it", "same, no intervention"],
            [[k, _num(gen["clamp"][k]["rate_other"]), _num(gen["clamp"][k]["baseline_other"])] for k in langs])]),
        Section("Entropy-max variant", s5, [], [Table(["category", "neurons"],
                                                      [[c, em["categories"][c]] for c in CATEGORIES])]),
    ]
    cfg, data = res["config"], res["data"]
    setup = {"model": res["provenance"]["model"].get("model"), "languages": ", ".join(langs),
             "verses per language (identify / test)": f"{data['identify_verses'][langs[0]]} / "
                                                      f"{data['test_verses'][langs[0]]}",
             "site": "gate: act(gate_proj(x)), active means > 0", "top rate": cfg["top_rate"],
             "percentiles (filter / bar)": f"{cfg['filter_rate']} / {cfg['activation_bar_ratio']}",
             "random seeds": cfg["seeds"], "clamp value": res["generation"]["clamp_value"],
             "wall time of this run (s)": res["timings_s"]["total"],
             "dataset sha256": res["provenance"]["dataset_sha256"][:16]}
    report = write_report(out / "report.html", title="Language-specific neurons (LAPE)", setup=setup, sections=sections)
    return [*figs, report]
