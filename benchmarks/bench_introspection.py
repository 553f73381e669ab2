"""Benchmark the two costly steps of the introspection studies (docs/introspection.md).

    .venv/bin/python benchmarks/bench_introspection.py --out bench-introspection.json    # ~3 min on 2 cores

On the embedded model:

* **64-shot reports** (``study neurofeedback``): the report margin of ``--test`` held-out review
  snippets after the same 64 labelled examples (about 1,900 tokens), read by ``choice_margin``
  with the examples as a shared prefix (run once, its keys/values continued by every test
  sentence: the study's path) against the whole prompt run for every test sentence (what a plain
  loop costs). Checks that both give the same margins.
* **LoRA step** (``study self-report --train-steps``): seconds per AdamW step of 8 choice prompts
  with the adapter on the upper half of the layers (the study's default: the backward pass stops
  halfway down) against every layer.

Timed in interleaved rounds after a warm-up; prints the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import interleaved, machine, median, write_json  # noqa: E402

from neuronatlas.data.choices import make_agents  # noqa: E402
from neuronatlas.models import load_model  # noqa: E402
from neuronatlas.studies.introspection import choice_margin, review_sentences  # noqa: E402
from neuronatlas.studies.neurofeedback import INSTRUCTION  # noqa: E402
from neuronatlas.studies.self_report_train import lora_finetune, training_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--shots", type=int, default=64)
    ap.add_argument("--test", type=int, default=16)
    ap.add_argument("--lora-steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    texts, _ = review_sentences(args.shots + args.test, seed=0, max_words=20)
    prefix = INSTRUCTION + "".join(f"Sentence: {t}\nLabel: {i % 2}\n\n" for i, t in enumerate(texts[: args.shots]))
    queries = [f"Sentence: {t}\nLabel:" for t in texts[args.shots:]]
    prefix_tokens = len(lm.tokenizer(prefix).input_ids)
    got: dict[str, np.ndarray] = {}

    def cached() -> None:
        got["cached"] = choice_margin(lm, queries, (" 0", " 1"), prefixes=[prefix] * len(queries))[0]

    def whole() -> None:
        got["whole"] = choice_margin(lm, [prefix + q for q in queries], (" 0", " 1"))[0]

    cached()
    whole()                                                   # warm-up
    report_times = interleaved({"prefix_cache": cached, "whole_prompt": whole}, args.repeats)
    diff = float(np.abs((got["cached"][:, 1] - got["cached"][:, 0]) - (got["whole"][:, 1] - got["whole"][:, 0])).max())

    rows = training_rows(make_agents(12, 0), 8, seed=0)
    lora: dict[str, Any] = {}

    def step_time(share: float) -> float:
        t0 = time.perf_counter()
        _, info = lora_finetune(lm, rows, steps=args.lora_steps, top_layers=share)
        lora[str(share)] = info
        return (time.perf_counter() - t0) / args.lora_steps

    step_time(0.5)                                            # warm-up (peft import, first allocation)
    steps = {"upper_half": [], "every_layer": []}
    for _ in range(args.repeats):
        steps["upper_half"].append(step_time(0.5))
        steps["every_layer"].append(step_time(1.0))
    report = {
        "benchmark": "introspection: 64-shot reports through the prefix cache; LoRA step, upper half vs every layer",
        "machine": machine(), "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "model": lm.name, "shots": args.shots, "prefix_tokens": prefix_tokens, "test_sentences": len(queries),
        "report_seconds": {k: median(v) for k, v in report_times.items()}, "report_all_seconds": report_times,
        "report_speedup": median(report_times["whole_prompt"]) / median(report_times["prefix_cache"]),
        "max_margin_difference": diff,
        "lora_seconds_per_step": {k: median(v) for k, v in steps.items()}, "lora_all": steps,
        "lora_speedup": median(steps["every_layer"]) / median(steps["upper_half"]),
    }
    print(f"{args.shots}-shot reports ({prefix_tokens} prefix tokens) x {len(queries)} test sentences: prefix cache "
          f"{report['report_seconds']['prefix_cache']:.2f} s, whole prompt {report['report_seconds']['whole_prompt']:.2f} s, "
          f"ratio {report['report_speedup']:.2f}x; largest margin difference {diff:.2e}")
    print(f"LoRA step (8 choices): upper half {report['lora_seconds_per_step']['upper_half']:.2f} s, every layer "
          f"{report['lora_seconds_per_step']['every_layer']:.2f} s, ratio {report['lora_speedup']:.2f}x")
    write_json(args.out, report)


if __name__ == "__main__":
    main()
