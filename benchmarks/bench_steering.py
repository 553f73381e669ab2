"""Benchmark a layers x alpha steering sweep batched as conditions against one condition at a time.

    .venv/bin/python benchmarks/bench_steering.py --out bench-steering.json     # ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_steering.py --threads 1 --repeats 1       # on a shared, loaded machine

On the embedded model: a ``joy`` direction (mean difference, last token, ``resid``) fitted on the
emotion study's identification scenarios (:mod:`neuronatlas.data.emotions`), then greedy
continuations of neutral scenario prompts under the unsteered model and every (layer, alpha) of the
sweep, each a :class:`~neuronatlas.intervene.SteerVector` condition:

* ``batched``: one ``generate(..., conditions=[(), *sweep])`` call (conditions share each forward);
* ``one_by_one``: one ``generate`` call per condition (what a loop over the sweep costs).

Timed in interleaved rounds after a warm-up; prints the ratio and checks that both give the same
continuations (greedy decoding; batching changes only how rows are grouped).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import interleaved, machine, median, write_json  # noqa: E402

from neuronatlas.data.emotions import EMOTIONS, NEUTRAL, build_emotion_sentences, feeling_prompt  # noqa: E402
from neuronatlas.directions import capture, fit_direction  # noqa: E402
from neuronatlas.evaluate import generate  # noqa: E402
from neuronatlas.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", default="6,12,18,24")
    ap.add_argument("--alphas", default="0.5,1,2", help="multiples of the layer's mean resid norm")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 keeps a shared, overloaded machine from spinning")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    alphas = [float(x) for x in args.alphas.split(",")]
    rows = build_emotion_sentences(seed=0)
    ident = [r for r in rows if r["split"] == "identify" and r["label"] in EMOTIONS]
    texts = [feeling_prompt(r["text"]) for r in ident]
    acts = capture(lm, texts, space="resid", layers=layers)
    is_joy = torch.tensor([r["label"] == "joy" for r in ident])
    ds = fit_direction(acts[is_joy], acts[~is_joy], method="mean_diff", layers=layers, concept="joy")
    prompts = [feeling_prompt(r["text"]) for r in rows if r["label"] == NEUTRAL and r["split"] == "test"][: args.prompts]
    sweep = [(ds.steer(layer, a * ds.mean_norm[i]),) for i, layer in enumerate(layers) for a in alphas]
    conds: list[Any] = [(), *sweep]
    kw = {"max_new_tokens": args.max_new_tokens, "batch_size": len(prompts)}
    results: dict[str, Any] = {}

    def batched() -> None:
        results["batched"] = generate(lm, prompts, conditions=conds, max_rows=len(prompts) * len(conds), **kw)

    def one_by_one() -> None:
        results["one_by_one"] = [generate(lm, prompts, conditions=[c], **kw)[0] for c in conds]

    batched()
    one_by_one()                                              # warm-up
    times = interleaved({"batched": batched, "one_by_one": one_by_one}, args.repeats)
    same = sum(a == b for x, y in zip(results["batched"], results["one_by_one"]) for a, b in zip(x, y))
    total = len(conds) * len(prompts)
    report = {
        "benchmark": "steering sweep: batched conditions vs one at a time", "machine": machine(),
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "model": lm.name, "layers": layers, "alphas": alphas, "conditions": len(conds), "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "seconds": {k: median(v) for k, v in times.items()},
        "all_seconds": times, "speedup": median(times["one_by_one"]) / median(times["batched"]),
        "identical_continuations": f"{same}/{total}",
    }
    print(f"sweep of {len(conds)} conditions x {len(prompts)} prompts x {args.max_new_tokens} tokens: batched "
          f"{report['seconds']['batched']:.2f} s, one by one {report['seconds']['one_by_one']:.2f} s, "
          f"ratio {report['speedup']:.2f}x; identical continuations {same}/{total}")
    write_json(args.out, report)


if __name__ == "__main__":
    main()
