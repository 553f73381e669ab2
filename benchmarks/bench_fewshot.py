"""Benchmark few-shot evaluation with a shared-prefix KV cache against the uncached computation.

    .venv/bin/python benchmarks/bench_fewshot.py --out bench-fewshot.json      # ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_fewshot.py --per-relation 8 --repeats 1  # quicker
    .venv/bin/python benchmarks/bench_fewshot.py --threads 1                   # on a shared, loaded machine

The relation study's evaluation, on the embedded model: held-out facts of a few relations (test
template 0), each prompt preceded by the same 3 demonstrations of its relation (identify-split facts
rendered ``text + target + ".\\n"``, one fixed set per relation and template), scored under the
baseline and 8 ablation conditions of 50 random neurons each (all positions, as the study ablates:
the worst case for the cache, whose prefix must then be recomputed under every condition).

Timed in interleaved rounds after a warm-up, in one run (the last round's scores are compared):

* ``cached``: ``target_logprobs(..., prefixes=demos)`` (prefix once per condition, batches continue it);
* ``uncached``: the same call with ``prefix_cache=False`` (the same token ids, whole prompts);
* ``zero_shot``: the test prompts alone (what few-shot costs on top of zero-shot).

Also checks that cached and uncached scores agree (max |difference| of the summed log-probabilities,
identical first-token correctness) and reports the accuracy gained by the demonstrations.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import interleaved, machine, median, write_json  # noqa: E402

from neuronatlas.data.relations import build_relation_facts  # noqa: E402
from neuronatlas.evaluate import target_logprobs  # noqa: E402
from neuronatlas.intervene import Ablate, NeuronSet  # noqa: E402
from neuronatlas.models import load_model  # noqa: E402

TARGET_SPEEDUP = 2.5
RELATIONS = ("country_capital", "element_symbol", "country_continent")


def fewshot_prompts(relations: tuple[str, ...], per_relation: int, shots: int, seed: int
                    ) -> tuple[list[str], list[str], list[str]]:
    """(prompts, targets, prefixes): ``per_relation`` test facts of each relation, template 0, each
    with the relation's one fixed set of ``shots`` demonstrations."""
    rows = build_relation_facts(list(relations), seed=seed)
    prompts: list[str] = []
    targets: list[str] = []
    prefixes: list[str] = []
    for rel in relations:
        mine = [r for r in rows if r["relation"] == rel and r["template_id"] == 0]
        pool = sorted((r for r in mine if r["split"] == "identify"), key=lambda r: r["fact_id"])
        demos = random.Random(f"{seed}:{rel}").sample(pool, shots)
        prefix = "".join(f"{d['text']}{d['target']}.\n" for d in demos)
        for r in [r for r in mine if r["split"] == "test"][:per_relation]:
            prompts.append(r["text"])
            targets.append(r["target"])
            prefixes.append(prefix)
    return prompts, targets, prefixes


def ablations(n_layers: int, n_neurons: int, count: int, size: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    conds: list[tuple] = [()]
    for _ in range(count):
        flat = rng.sample(range(n_layers * n_neurons), size)
        conds.append((Ablate(NeuronSet.of([(j // n_neurons, j % n_neurons) for j in flat])),))
    return conds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--per-relation", type=int, default=12, help="test facts per relation")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--conditions", type=int, default=8, help="ablation conditions besides the baseline")
    ap.add_argument("--neurons", type=int, default=50, help="neurons per ablation")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 keeps a shared, overloaded machine from spinning")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    prompts, targets, prefixes = fewshot_prompts(RELATIONS, args.per_relation, args.shots, args.seed)
    conds = ablations(lm.n_layers, lm.n_neurons, args.conditions, args.neurons, args.seed)
    tok = lm.tokenizer
    prefix_tokens = sorted({len(tok(p)["input_ids"]) for p in prefixes})
    prompt_tokens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    load_start = os.getloadavg()[0]

    last: dict[str, Any] = {}

    def run(name: str, cache: bool, shots: bool = True) -> Callable[[], None]:
        def go() -> None:
            last[name] = target_logprobs(lm, prompts, targets, conditions=conds, batch_size=args.batch_size,
                                         prefixes=prefixes if shots else None, prefix_cache=cache)
        return go

    # warm-up on a slice (first calls pay one-off allocations)
    target_logprobs(lm, prompts[:4], targets[:4], conditions=conds[:2], prefixes=prefixes[:4])
    target_logprobs(lm, prompts[:4], targets[:4], conditions=conds[:2], prefixes=prefixes[:4], prefix_cache=False)
    times = interleaved({"cached": run("cached", True), "uncached": run("uncached", False),
                         "zero_shot": run("zero_shot", True, shots=False)}, args.repeats)
    cached, uncached, zero = last["cached"], last["uncached"], last["zero_shot"]
    max_diff = float((cached.logprob - uncached.logprob).abs().max())
    same_correct = bool(torch.equal(cached.first_correct, uncached.first_correct))
    med = {k: median(v) for k, v in times.items()}
    speedup = med["uncached"] / med["cached"]
    result = {
        "machine": machine(), "load_average": [load_start, os.getloadavg()[0]],
        "setup": {"model": lm.name, "relations": list(RELATIONS), "prompts": len(prompts), "shots": args.shots,
                  "conditions": len(conds), "neurons_per_ablation": args.neurons, "batch_size": args.batch_size,
                  "prefix_tokens": prefix_tokens, "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
                  "repeats": args.repeats},
        "seconds": times, "median_seconds": med,
        "speedup_cached_vs_uncached": speedup, "target_speedup": TARGET_SPEEDUP,
        "cached_over_zero_shot": med["cached"] / med["zero_shot"],
        "uncached_over_zero_shot": med["uncached"] / med["zero_shot"],
        "agreement": {"max_abs_logprob_diff": max_diff, "same_first_correct": same_correct},
        "baseline_accuracy": {"zero_shot": float(zero.first_correct[0].float().mean()),
                              f"{args.shots}_shot": float(cached.first_correct[0].float().mean())},
    }
    write_json(args.out, result)
    print(f"{len(prompts)} prompts x {len(conds)} conditions, {args.shots}-shot (prefix {prefix_tokens} tokens, "
          f"prompts {result['setup']['mean_prompt_tokens']:.1f} tokens on average)")
    print(f"median s: cached {med['cached']:.1f}  uncached {med['uncached']:.1f}  zero-shot {med['zero_shot']:.1f}")
    print(f"speed-up cached vs uncached: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: "
          f"{'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); cached / zero-shot: "
          f"{result['cached_over_zero_shot']:.2f}x; uncached / zero-shot: {result['uncached_over_zero_shot']:.2f}x")
    print(f"agreement: max |d logprob| {max_diff:.2e}, same first-token correctness: {same_correct}; "
          f"baseline accuracy zero-shot {result['baseline_accuracy']['zero_shot']:.2f}, "
          f"{args.shots}-shot {result['baseline_accuracy'][f'{args.shots}_shot']:.2f}")


if __name__ == "__main__":
    main()
