"""Recording and exemplar collection over Ray: 1 vs 2 local workers on the embedded model.

The same prompts (and the same corpus for exemplars) are recorded in one process (baseline, torch
with 1 thread, like each Ray worker) and over a local Ray cluster with 1 and 2 workers. Reported:
wall time of each (Ray start, actor start and model loading included), the ratio to the one-process
run, and the merge's share of the sharded run (merging the shards' states on the driver), the
driver's checkpoint writes' share, and whether the sharded statistics equal the one-process ones.

    python benchmarks/bench_distributed.py --out out/benchmarks/distributed.json [--prompts 128] [--docs 128]
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, write_json  # noqa: E402

from neuronatlas.data.corpus import default_corpus
from neuronatlas.data.prompts import PromptSet
from neuronatlas.distributed import Cluster, ModelSource, collect_exemplars_distributed, record_distributed
from neuronatlas.explain.exemplars import ExemplarConfig, collect_exemplars
from neuronatlas.models import load_model
from neuronatlas.record import RecordConfig, record


def _timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--docs", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)                      # as each Ray worker (num_cpus=1 -> 1 thread)

    lm = load_model("default")
    load = ModelSource("default")
    docs = default_corpus(n_docs=max(args.prompts, args.docs), seed=0)
    prompts = PromptSet.from_rows([{"text": d["text"], "label": d["source"].split(":")[0]} for d in docs[:args.prompts]])
    rcfg = RecordConfig(batch_size=16, max_length=args.max_length, top_k=20, checkpoint_every=2)
    ecfg = ExemplarConfig(batch_size=16, max_length=args.max_length, chunk_docs=32)
    corpus = docs[:args.docs]
    tmp = Path(tempfile.mkdtemp())
    out: dict[str, Any] = {"machine": machine(), "prompts": len(prompts), "docs": len(corpus),
                           "max_length": args.max_length, "record": {}, "exemplars": {}}

    t_one, ref = _timed(lambda: record(lm, prompts, tmp / "r1", config=rcfg))
    out["record"]["one_process_s"] = t_one
    out["record"]["one_process_loop_s"] = ref.info["record_seconds"]
    for workers in (1, 2):
        t, res = _timed(lambda: record_distributed(lm, prompts, tmp / f"rw{workers}", load=load, config=rcfg,
                                                   cluster=Cluster(workers=workers)))
        d = res.info["distributed"]
        same = {n: bool(torch.equal(getattr(ref.topk, n), getattr(res.topk, n))) for n in ("values", "prompt", "position")}
        out["record"][f"workers_{workers}"] = {
            "seconds": t, "ratio_vs_one_process": t / t_one, "merge_s": d["merge_seconds"],
            "merge_share": d["merge_seconds"] / t, "checkpoint_write_s": d["checkpoint_write_seconds"],
            "checkpoint_write_share": d["checkpoint_write_seconds"] / t, "shards": d["shards"],
            "ray_start_s": d.get("ray_start_seconds"), "model_load_s": d.get("model_load_seconds"),
            "worker_compute_s": d.get("compute_seconds"),
            "topk_identical": same, "counts_identical": bool(torch.equal(ref.moments.count, res.moments.count)),
            "max_identical": bool(torch.equal(ref.moments.max, res.moments.max)),
            "pooled_identical": bool(np.array_equal(ref.pooled, res.pooled)),
            "mean_max_abs_diff": float((ref.moments.mean - res.moments.mean).abs().max()),
        }

    t_one, ref_ex = _timed(lambda: collect_exemplars(lm, corpus, tmp / "e1", config=ecfg))
    out["exemplars"]["one_process_s"] = t_one
    out["exemplars"]["one_process_stream_s"] = ref_ex["stream_seconds"]
    for workers in (1, 2):
        t, info = _timed(lambda: collect_exemplars_distributed(lm, corpus, tmp / f"ew{workers}", load=load,
                                                               config=ecfg, cluster=Cluster(workers=workers)))
        d = info["distributed"]
        out["exemplars"][f"workers_{workers}"] = {
            "seconds": t, "ratio_vs_one_process": t / t_one, "merge_s": d["merge_seconds"],
            "merge_share": d["merge_seconds"] / t, "checkpoint_write_s": d["checkpoint_write_seconds"],
            "checkpoint_write_share": d["checkpoint_write_seconds"] / t, "shards": d["shards"],
            "ray_start_s": d.get("ray_start_seconds"), "model_load_s": d.get("model_load_seconds"),
            "worker_compute_s": d.get("compute_seconds"),
            "tokens": info["tokens"], "tokens_one_process": ref_ex["tokens"],
        }
    shutil.rmtree(tmp, ignore_errors=True)
    import json

    print(json.dumps(out, indent=2))
    write_json(args.out, out)


if __name__ == "__main__":
    main()
