"""The steering comparison of docs/results.md: SNMF feature vs difference-in-means vs top neurons.

    python docs/experiments/steer_features.py --atlas out/features --out out/steer_features.json

Concepts from the language study: French and Spanish (parallel Bible verses, ``build_language_texts``;
positives = the language's verses, negatives = the same verses in English; judged by ``langdetect``
on continuations of English prompts). Concepts from the emotion study (``--concepts joy,anger``):
positives = the emotion's identification scenarios, negatives = the neutral ones
(:mod:`neuronatlas.data.emotions`); prompts = held-out neutral scenarios followed by " I felt";
judged by the emotion study's classifier (TF-IDF + NRC lexicon logistic probe fitted on the
identification scenarios and feeling statements, not the model). For each concept and
layer, the three directions of :mod:`neuronatlas.features.steer` steer the continuations of
English prompts at the same alphas, so all three add vectors of the same length: multiples of the
layer's median residual-stream norm over the English texts' tokens, BOS excluded (the mean pooled
norm was dominated by the first token's massive activation, ~30x a typical token's, before
``capture`` learned to skip that token; the token median keeps the runs comparable). Concept expression: share of continuations that ``langdetect`` (an
independent classifier) detects as the target language; fluency: perplexity of the continuation
under the unsteered model (``steering_sweep``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from neuronatlas.data.emotions import EMOTIONS, NEUTRAL, build_emotion_sentences, build_feeling_sentences, feeling_prompt
from neuronatlas.data.languages import build_language_texts, detect_language
from neuronatlas.directions import steering_sweep
from neuronatlas.evaluate.emotion import EmotionClassifier
from neuronatlas.features.steer import concept_directions
from neuronatlas.models import load_model

PROMPTS = ["The weather today is", "My favourite food is", "Yesterday I went to the", "The best way to learn is",
           "In the morning, she always", "The old man looked at the", "We decided to build a",
           "The children played in the", "He opened the door and", "This book is about",
           "The city at night is", "After dinner, they"]


def token_norm(lm: object, texts: list[str], layer: int) -> float:
    """Median norm of the residual stream after ``layer`` over the texts' tokens, special tokens excluded."""
    from neuronatlas.features import token_mask
    from neuronatlas.record.batching import encode, forward

    batch = encode(lm, texts, padding_side="right", max_length=64)  # type: ignore[arg-type]
    hidden = forward(lm, batch, output_hidden_states=True).hidden_states[layer + 1]  # type: ignore[arg-type]
    mask = token_mask(lm, batch)  # type: ignore[arg-type]
    return float(hidden[mask].norm(dim=-1).median())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--concepts", default="fr,es")
    ap.add_argument("--layers", default="12,18")
    ap.add_argument("--alphas", default="0.5,1,2,4")
    ap.add_argument("--n-texts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    lm = load_model("default")
    concepts = args.concepts.split(",")
    langs = [c for c in concepts if c not in EMOTIONS]
    rows = build_language_texts(["en", *langs], n_per_lang=args.n_texts, heldout=0.0)
    by_lang = {lang: [r["text"] for r in rows if r["lang"] == lang] for lang in ["en", *langs]}
    alphas = [float(a) for a in args.alphas.split(",")]
    results: list[dict[str, object]] = []
    out: dict[str, object] = {"prompts": PROMPTS, "alphas_x_token_norm": alphas, "results": results}
    emo_rows = build_emotion_sentences(seed=0)
    judge = None
    for concept in concepts:
        prompts = PROMPTS
        pos_texts, neg_texts = by_lang.get(concept, []), by_lang["en"]
        if concept in EMOTIONS:
            ident = [r for r in emo_rows if r["split"] == "identify"]
            if judge is None:
                train = ident + [r for r in build_feeling_sentences(seed=0) if r["split"] == "identify"]
                judge = EmotionClassifier(seed=0).fit([r["text"] for r in train], [r["label"] for r in train])
            pos_texts = [r["text"] for r in ident if r["label"] == concept][: args.n_texts]
            neg_texts = [r["text"] for r in ident if r["label"] == NEUTRAL][: args.n_texts]
            prompts = [feeling_prompt(r["text"]) for r in emo_rows
                       if r["label"] == NEUTRAL and r["split"] == "test" and r["frame"] == 0][: len(PROMPTS)]

            def score(texts: list[str], target: str = concept) -> list[float]:
                assert judge is not None
                return [float(x) for x in judge.expresses(texts, target)]
        else:
            def score(texts: list[str], target: str = concept) -> list[float]:
                return [1.0 if lang == target else 0.0 for lang in detect_language(texts)]

        for layer in (int(x) for x in args.layers.split(",")):
            t = time.perf_counter()
            norm = token_norm(lm, neg_texts[:32], layer)
            sets = concept_directions(lm, args.atlas, pos_texts, neg_texts, layer=layer, concept=concept)
            for method, ds in sets.items():
                res = steering_sweep(lm, prompts, ds, layers=[layer], alphas=[a * norm for a in alphas], score=score,
                                     alpha_unit="raw", max_new_tokens=args.max_new_tokens, n_examples=2)
                entry = {"concept": concept, "prompts": prompts, "layer": layer, "method": method, "extra": ds.extra,
                         "separation": ds.separation[0], "mean_norm": ds.mean_norm[0], "token_norm": norm,
                         "baseline": {"rate": res.baseline.concept_rate, "ppl": res.baseline.perplexity},
                         "cells": [{"alpha": c.alpha, "x_token_norm": c.alpha / norm, "rate": c.concept_rate,
                                    "ppl": c.perplexity,
                                    "examples": c.examples} for c in res.cells]}
                results.append(entry)
                print(concept, layer, method, ds.extra.get("feature", ""),
                      [(round(c.alpha / norm, 2), round(c.concept_rate, 2), round(c.perplexity, 1)) for c in res.cells],
                      f"{time.perf_counter() - t:.0f}s", flush=True)
                Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
