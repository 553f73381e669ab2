"""Benchmark gradient attribution of every MLP neuron against a plain forward pass over the same prompts.

    .venv/bin/python benchmarks/bench_attribution.py --out bench-attribution.json     # ~2-4 min on 2 cores
    .venv/bin/python benchmarks/bench_attribution.py --prompts 16 --repeats 1          # quicker

The culture study's identification step on the embedded model: built-in multiple-choice culture
questions (with the study's one-example format prefix), target = the gold option letter. Timed in
interleaved rounds after a warm-up, same batches (size ``--batch``), in one run:

* ``forward``: the teacher-forced forward that scores the target (``target_logprobs``, no gradient);
* ``attribution``: ``stats.attribution.attribute`` (one forward with the site hooks + one backward to
  every layer's activation, max over positions, for all 30 x 1536 neurons).

The ratio attribution / forward is the figure; one forward + one backward costs about 3 forwards
(the backward computes two products per matrix multiply where the forward computes one), hence the
target <= 3x.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import interleaved, machine, median, write_json  # noqa: E402

from neuronatlas.data.culture import CONTROL, build_culture_questions  # noqa: E402
from neuronatlas.evaluate import target_logprobs  # noqa: E402
from neuronatlas.models import load_model  # noqa: E402
from neuronatlas.stats.attribution import attribute  # noqa: E402
from neuronatlas.studies.culture import FORMAT_DEMO  # noqa: E402

TARGET_RATIO = 3.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("default")
    rows = [r for r in build_culture_questions(seed=0) if r["culture"] != CONTROL][: args.prompts]
    prompts = [FORMAT_DEMO + r["text"] for r in rows]
    targets = [r["target"] for r in rows]
    n_tokens = sum(len(x) for x in lm.tokenizer(prompts)["input_ids"])

    def forward() -> None:
        target_logprobs(lm, prompts, targets, batch_size=args.batch)

    def attribution() -> None:
        attribute(lm, prompts, targets, batch_size=args.batch)

    forward()
    attribution()                                                     # warm-up
    times = interleaved({"forward": forward, "attribution": attribution}, args.repeats)
    f, a = median(times["forward"]), median(times["attribution"])
    result = {"machine": machine(), "prompts": len(prompts), "prompt_tokens": n_tokens, "batch": args.batch,
              "repeats": args.repeats, "seconds": times, "forward_s": f, "attribution_s": a, "ratio": a / f,
              "target_ratio": TARGET_RATIO, "met": a / f <= TARGET_RATIO,
              "attribution_tokens_per_s": n_tokens / a, "forward_tokens_per_s": n_tokens / f}
    print(f"{len(prompts)} prompts ({n_tokens} tokens), batch {args.batch}: forward {f:.2f} s, attribution {a:.2f} s "
          f"-> ratio {a / f:.2f}x (target <= {TARGET_RATIO}x: {'met' if a / f <= TARGET_RATIO else 'not met'})")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
