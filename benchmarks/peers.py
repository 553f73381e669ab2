"""Peer measurement run in an interpreter that has nnsight and/or TransformerLens (>= 4, the
TransformerBridge) installed beside torch 2.13.0: bare HF forward vs each peer saving every MLP
down-projection input, interleaved, on the same converted model directory and token batches as
bench_record.py. Each ratio uses the bare forward timed in the same process.

    /path/to/peer-venv/bin/python benchmarks/peers.py MODEL_DIR BATCHES.json REPEATS
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
    versions: dict[str, str] = {}
    try:
        import nnsight
        from nnsight import NNsight

        wrapped = NNsight(model)
        versions["nnsight"] = nnsight.__version__
    except ImportError:
        wrapped = None
    try:
        from importlib.metadata import version

        from transformers import AutoTokenizer
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(model_dir, hf_model=model, tokenizer=AutoTokenizer.from_pretrained(model_dir))
        versions["transformer_lens"] = version("transformer_lens")
    except ImportError:
        bridge = None

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

    def tl_cache() -> None:
        with torch.inference_mode():
            for b in batches:
                bridge.run_with_cache(b["input_ids"], attention_mask=b["attention_mask"],
                                      names_filter=lambda name: name.endswith("mlp.out.hook_in"))

    runs = [("bare_forward", bare)]
    if wrapped is not None:
        runs.append(("nnsight_save_all", traced))
    if bridge is not None:
        runs.append(("transformer_lens_run_with_cache", tl_cache))
    bare()
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _ in range(repeats):
        for name, fn in runs:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"versions": versions, "median_seconds": med,
                      "ratio_vs_bare_forward": {k: v / med["bare_forward"] for k, v in med.items()}}))


if __name__ == "__main__":
    main()
