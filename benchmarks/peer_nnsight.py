"""Peer measurement run in an interpreter that has nnsight (and torch 2.13.0) installed:
bare HF forward vs nnsight tracing that saves every MLP down-projection input, interleaved, on the
same converted model directory and token batches as bench_record.py.

    /path/to/peer-venv/bin/python benchmarks/peer_nnsight.py MODEL_DIR BATCHES.json REPEATS
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, batches_path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    raw = json.loads(open(batches_path).read())
    batches = [{k: torch.tensor(v) for k, v in b.items()} for b in raw]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    from nnsight import NNsight

    wrapped = NNsight(model)

    def bare() -> None:
        with torch.inference_mode():
            for b in batches:
                model(**b, use_cache=False)

    def traced() -> None:
        with torch.inference_mode():
            for b in batches:
                with wrapped.trace(b["input_ids"], attention_mask=b["attention_mask"],
                                   position_ids=b["position_ids"], use_cache=False):
                    saved = [layer.mlp.down_proj.input.save() for layer in wrapped.model.layers]  # noqa: F841

    bare()
    times: dict[str, list[float]] = {"bare_forward": [], "nnsight_save_all": []}
    for _ in range(repeats):
        for name, fn in (("bare_forward", bare), ("nnsight_save_all", traced)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    import nnsight

    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"nnsight_version": nnsight.__version__, "median_seconds": med,
                      "ratio_vs_bare_forward": med["nnsight_save_all"] / med["bare_forward"]}))


if __name__ == "__main__":
    main()
