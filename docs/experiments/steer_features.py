"""The steering comparison of docs/results.md: SNMF feature vs difference-in-means vs top neurons.

    python docs/experiments/steer_features.py --atlas out/features --out out/steer_features.json

Concepts from the language study: French and Spanish (parallel Bible verses, ``build_language_texts``;
positives = the language's verses, negatives = the same verses in English). For each concept and
layer, the three directions of :mod:`neuronatlas.features.steer` steer the continuations of
English prompts at the same alphas (multiples of the layer's mean residual norm, so all three add
vectors of the same length). Concept expression: share of continuations that ``langdetect`` (an
independent classifier) detects as the target language; fluency: perplexity of the continuation
under the unsteered model (``steering_sweep``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from neuronatlas.data.languages import build_language_texts, detect_language
from neuronatlas.directions import steering_sweep
from neuronatlas.features.steer import concept_directions
from neuronatlas.models import load_model

PROMPTS = ["The weather today is", "My favourite food is", "Yesterday I went to the", "The best way to learn is",
           "In the morning, she always", "The old man looked at the", "We decided to build a",
           "The children played in the", "He opened the door and", "This book is about",
           "The city at night is", "After dinner, they"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--concepts", default="fr,es")
    ap.add_argument("--layers", default="12,18")
    ap.add_argument("--alphas", default="0.25,0.5,1.0")
    ap.add_argument("--n-texts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    lm = load_model("default")
    concepts = args.concepts.split(",")
    rows = build_language_texts(["en", *concepts], n_per_lang=args.n_texts, heldout=0.0)
    by_lang = {lang: [r["text"] for r in rows if r["lang"] == lang] for lang in ["en", *concepts]}
    alphas = [float(a) for a in args.alphas.split(",")]
    out: dict[str, object] = {"prompts": PROMPTS, "alphas_x_mean_norm": alphas, "results": []}
    for concept in concepts:
        def score(texts: list[str], target: str = concept) -> list[float]:
            return [1.0 if lang == target else 0.0 for lang in detect_language(texts)]

        for layer in (int(x) for x in args.layers.split(",")):
            t = time.perf_counter()
            sets = concept_directions(lm, args.atlas, by_lang[concept], by_lang["en"], layer=layer, concept=concept)
            for method, ds in sets.items():
                res = steering_sweep(lm, PROMPTS, ds, layers=[layer], alphas=alphas, score=score, alpha_unit="norm",
                                     max_new_tokens=args.max_new_tokens, n_examples=2)
                entry = {"concept": concept, "layer": layer, "method": method, "extra": ds.extra,
                         "separation": ds.separation[0], "mean_norm": ds.mean_norm[0],
                         "baseline": {"rate": res.baseline.concept_rate, "ppl": res.baseline.perplexity},
                         "cells": [{"alpha": c.alpha, "rate": c.concept_rate, "ppl": c.perplexity,
                                    "examples": c.examples} for c in res.cells]}
                out["results"].append(entry)  # type: ignore[union-attr]
                print(concept, layer, method, ds.extra.get("feature", ""),
                      [(c.alpha, round(c.concept_rate, 2), round(c.perplexity, 1)) for c in res.cells],
                      f"{time.perf_counter() - t:.0f}s", flush=True)
                Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
