"""SNMF fitting throughput (tokens/s) against one forward pass over the same tokens.

    .venv/bin/python benchmarks/bench_snmf.py --out out/benchmarks/snmf.json [--docs 32 --max-length 64 --k 64]

On the embedded model (30 layers x 1,536 neurons), over the same length-sorted batches of the default
corpus, interleaved repetitions of:

* the bare forward through the layers (``forward_through``, no hooks): the baseline;
* ``SNMF.partial_fit`` of every layer on those batches' activations (pass 1 of ``neuronatlas features``,
  activations captured beforehand, so this is the solver alone);
* ``SNMF.transform`` of every layer (the codes of pass 2);
* scikit-learn's ``MiniBatchDictionaryLearning(positive_code=True)`` ``partial_fit`` on one layer
  (the closest library solver: non-negative codes, signed dictionary), extrapolated to every layer.

Ratios are against the forward measured in the same run (the machine may be shared; the load
averages at start and end are recorded).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _util import interleaved, machine, median, write_json

from neuronatlas.data.corpus import default_corpus
from neuronatlas.features import FeatureConfig, token_mask
from neuronatlas.explain.exemplars import doc_batches
from neuronatlas.models import load_model
from neuronatlas.record.batching import forward_through, pad_ids
from neuronatlas.record.hooks import site_hooks
from neuronatlas.stats.snmf import SNMF


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    lm = load_model("default")
    config = FeatureConfig(k=args.k, max_length=args.max_length)
    docs = default_corpus(n_docs=args.docs, seed=0)
    batches = []
    for b in doc_batches(lm, iter(docs), config.exemplar_config()):
        if b.ids:
            padded = pad_ids(lm, b.ids, "right")
            batches.append((padded, token_mask(lm, padded)))
    acts: list[list[torch.Tensor]] = [[] for _ in batches]
    for i, (padded, mask) in enumerate(batches):
        captured: dict[int, torch.Tensor] = {}
        with site_hooks(lm, "mlp", observe=lambda layer, h: captured.__setitem__(layer, h[mask].clone()),
                        batch_size=int(padded["input_ids"].shape[0])):
            forward_through(lm, padded)
        acts[i] = [captured[layer] for layer in range(lm.n_layers)]
    tokens = sum(int(m.sum()) for _, m in batches)
    padded_tokens = sum(int(p["input_ids"].numel()) for p, _ in batches)
    fitted: list[SNMF] = []

    def forward() -> None:
        for padded, _ in batches:
            forward_through(lm, padded)

    def fit() -> None:
        models = [config.snmf() for _ in range(lm.n_layers)]
        for per_layer in acts:
            for layer, a in enumerate(per_layer):
                models[layer].partial_fit(a)
        fitted[:] = models

    def encode() -> None:
        for per_layer in acts:
            for layer, a in enumerate(per_layer):
                fitted[layer].transform(a)

    fit()
    times = interleaved({"forward": forward, "snmf_fit": fit, "snmf_encode": encode}, args.repeats)
    med = {k: median(v) for k, v in times.items()}
    result = {"machine": machine(), "load_start": load_start, "docs": args.docs, "tokens": tokens,
              "padded_tokens": padded_tokens, "k": args.k, "layers": lm.n_layers, "batches": len(batches),
              "seconds": times, "median_seconds": med,
              "tokens_per_s": {k: tokens / v for k, v in med.items()},
              "fit_over_forward": med["snmf_fit"] / med["forward"],
              "encode_over_forward": med["snmf_encode"] / med["forward"]}
    try:
        from sklearn.decomposition import MiniBatchDictionaryLearning

        layer = lm.n_layers // 2
        sk = MiniBatchDictionaryLearning(n_components=args.k, alpha=config.l1 * fitted[layer].scale_, positive_code=True,
                                         batch_size=256, random_state=0, fit_algorithm="cd",
                                         transform_algorithm="lasso_cd")
        t = time.perf_counter()
        for per_layer in acts:
            sk.partial_fit(per_layer[layer].numpy())
        one = time.perf_counter() - t
        result["sklearn_one_layer_seconds"] = one
        result["sklearn_all_layers_estimate_over_forward"] = one * lm.n_layers / med["forward"]
    except ImportError:
        result["sklearn_one_layer_seconds"] = None
    result["load_end"] = os.getloadavg()
    print(f"{tokens} tokens, {lm.n_layers} layers, k={args.k}: forward {med['forward']:.2f} s "
          f"({tokens / med['forward']:.0f} tok/s); SNMF fit {med['snmf_fit']:.2f} s ({tokens / med['snmf_fit']:.0f} tok/s, "
          f"x{result['fit_over_forward']:.2f} the forward); encode {med['snmf_encode']:.2f} s "
          f"(x{result['encode_over_forward']:.2f})")
    if result.get("sklearn_one_layer_seconds"):
        print(f"scikit-learn MiniBatchDictionaryLearning(positive_code=True), one layer: "
              f"{result['sklearn_one_layer_seconds']:.2f} s -> all layers ~x{result['sklearn_all_layers_estimate_over_forward']:.1f} the forward")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
