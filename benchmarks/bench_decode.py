"""Benchmark ``decode_neurons`` on the embedded model against baselines measured in the same run.

    .venv/bin/python benchmarks/bench_decode.py --out bench-decode.json           # everything (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_decode.py --out quick.json --layers 0-5 --skip-compare

Measures, on one machine in one run:

* the full decode of every neuron on every side (46,080 neurons x 4 sides of SmolLM2-135M);
* the per-neuron loop of the papers (one ``W_U @ v`` and two ``topk`` per neuron vector), timed on a
  random sample and extrapolated; its results are checked against the decode's;
* a plain float32 matmul of the decode's shapes (``chunk x d_model`` by ``d_model x vocab``), for the
  fraction of the machine's matmul throughput the decode reaches (matmul part and overall), and the
  ceiling a batched float32 decode can reach over the loop (loop time / plain matmul time per row);
* peak resident memory of the decode in a fresh subprocess for two chunk sizes and for a run over
  two layers only (the peak follows the chunk, not the neuron count);
* top-1 agreement between the model in float32 and in bfloat16 (a sanity check of compare-decode;
  the base-vs-instruct figure of the paper needs Llama-3.1-8B weights, which are not available offline).

The machine may be shared: load averages at start and end are recorded, and every ratio uses numbers
from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuronatlas.decode.compare import compare_decoding
from neuronatlas.decode.core import (
    check_sides,
    decode_arrays,
    fold_final_norm,
    side_matrix,
    unembedding_matrix,
)
from neuronatlas.models import load_model

TARGET_SPEEDUP = 20.0
TARGET_FRACTION = 0.5


def _layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def matmul_gflops(rows: int, d_model: int, vocab: int, repeats: int = 5) -> dict[str, float]:
    """Best and median GFLOP/s of a plain float32 (rows, d) @ (d, vocab) matmul."""
    a, b = torch.randn(rows, d_model), torch.randn(vocab, d_model)
    _ = a @ b.T
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ = a @ b.T
        times.append(time.perf_counter() - t0)
    flops = 2.0 * rows * d_model * vocab
    return {"best_gflops": flops / min(times) / 1e9, "median_gflops": flops / float(np.median(times)) / 1e9,
            "seconds_per_row": min(times) / rows}


def sample_vectors(lm: Any, sides: list[str], layers: list[int], n: int, seed: int = 0) -> list[tuple[str, int, int]]:
    rng = np.random.default_rng(seed)
    return [(sides[rng.integers(len(sides))], layers[rng.integers(len(layers))], int(rng.integers(lm.n_neurons)))
            for _ in range(n)]


def per_neuron_loop(lm: Any, vectors: list[tuple[str, int, int]], k: int) -> dict[str, Any]:
    """The papers' loop: per (side, layer, neuron), fetch the vector, one ``W_U @ v``, top and bottom ``topk``."""
    w_u = unembedding_matrix(lm)
    results = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for side, layer, neuron in vectors:
            v = side_matrix(lm, side, layer).detach()[neuron].float()
            if side == "out_normed":
                v = fold_final_norm(lm, v[None])[0]
            scores = w_u @ v
            top, bottom = scores.topk(k), scores.topk(k, largest=False)
            results.append((top.indices.tolist(), bottom.indices.tolist(), top.values.tolist(), bottom.values.tolist()))
    seconds = time.perf_counter() - t0
    return {"vectors": len(vectors), "seconds": seconds, "seconds_per_row": seconds / max(1, len(vectors)),
            "results": results}


def check_loop(arrays: Any, vectors: list[tuple[str, int, int]], results: list[Any]) -> int:
    """How many sampled vectors' top/bottom ids differ between the loop and the decode."""
    differing = 0
    for (side, layer, neuron), (top, bottom, _, _) in zip(vectors, results):
        r = arrays.index(side, layer, neuron)
        differing += top != arrays.top_ids[r].tolist() or bottom != arrays.bottom_ids[r].tolist()
    return differing


def _child_memory(args: argparse.Namespace) -> None:
    """Run in a subprocess: peak RSS growth of one decode after the model is loaded."""
    lm = load_model(args.model)
    with torch.inference_mode():                 # page in mmapped weights: they belong to the model, not the decode
        for param in lm.model.parameters():
            param.sum()
    rss = _status_kb("VmRSS")
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")            # resets VmHWM (peak RSS) to the current RSS
        reset = True
    except OSError:
        pass
    t0 = time.perf_counter()
    arrays = decode_arrays(lm, args.top_k, sides=["out"], layers=_layers(args.layers), chunk=args.chunk)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"chunk": args.chunk, "rows": int(arrays.top_ids.shape[0]), "rss_after_load_mb": rss / 1024,
                      "peak_mb": peak / 1024, "peak_growth_mb": (peak - rss) / 1024, "peak_reset": reset,
                      "seconds": seconds, "scores_chunk_mb": args.chunk * arrays.info["vocab"] * 4 / 2**20,
                      "output_arrays_mb": 4 * arrays.top_ids.nbytes / 2**20}))


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_runs(model: str, top_k: int, configs: list[tuple[int, str]]) -> list[dict[str, Any]]:
    out = []
    for chunk, layers in configs:
        cmd = [sys.executable, __file__, "--child-memory", "--model", model, "--chunk", str(chunk),
               "--top-k", str(top_k), "--layers", layers]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["layers"] = layers or "all"
        out.append(result)
        print(f"  memory: chunk {chunk:5d}, layers {result['layers']:>4}: peak +{result['peak_growth_mb']:.0f} MB "
              f"over the loaded model ({result['rows']:,} rows; one chunk of scores = {result['scores_chunk_mb']:.0f} MB)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-decode.json"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--sample", type=int, default=300, help="neuron vectors timed in the per-neuron loop")
    parser.add_argument("--layers", default="", help="e.g. 0-5 (default all) for a quick run")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        _child_memory(args)
        return

    load_start = os.getloadavg()
    lm = load_model(args.model)
    d_model, vocab = side_matrix(lm, "out", 0).shape[1], unembedding_matrix(lm).shape[0]
    print(f"model {args.model}: {lm.n_layers} layers x {lm.n_neurons} neurons, d_model {d_model}, vocab {vocab}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_start[0]:.1f}")
    sides, layers = list(check_sides(lm, None)), _layers(args.layers) or list(range(lm.n_layers))
    vectors = sample_vectors(lm, sides, layers, args.sample)
    half = len(vectors) // 2
    mm_before = matmul_gflops(args.chunk, d_model, vocab)
    loop_before = per_neuron_loop(lm, vectors[:half], args.top_k)       # the machine may be shared:
    arrays = decode_arrays(lm, args.top_k, layers=layers, chunk=args.chunk)   # baselines before and after
    info = arrays.info
    loop_after = per_neuron_loop(lm, vectors[half:], args.top_k)
    mm_after = matmul_gflops(args.chunk, d_model, vocab)
    plain = max(mm_before["best_gflops"], mm_after["best_gflops"])
    plain_row_s = min(mm_before["seconds_per_row"], mm_after["seconds_per_row"])
    decode_gflops = info["flops"] / info["total_s"] / 1e9
    matmul_part_gflops = info["flops"] / info["matmul_s"] / 1e9
    print(f"decode: {info['rows']:,} neuron vectors ({len(info['sides'])} sides) in {info['total_s']:.1f} s "
          f"(matmuls {info['matmul_s']:.1f} s, topk {info['topk_s']:.1f} s): {decode_gflops:.1f} GFLOP/s overall, "
          f"{matmul_part_gflops:.1f} GFLOP/s in the matmuls; plain float32 matmul {plain:.1f} GFLOP/s "
          f"(before {mm_before['best_gflops']:.1f}, after {mm_after['best_gflops']:.1f})")
    loop_s = loop_before["seconds"] + loop_after["seconds"]
    loop = {"vectors": len(vectors), "seconds": loop_s, "seconds_per_row": loop_s / len(vectors),
            "ms_per_row_before": 1e3 * loop_before["seconds_per_row"], "ms_per_row_after": 1e3 * loop_after["seconds_per_row"],
            "rows_differing_from_decode": check_loop(arrays, vectors, loop_before["results"] + loop_after["results"])}
    loop_total = loop["seconds_per_row"] * info["rows"]
    speedup = loop_total / info["total_s"]
    ceiling = loop["seconds_per_row"] / plain_row_s
    print(f"per-neuron loop: {loop['seconds_per_row'] * 1e3:.2f} ms per vector on {loop['vectors']} vectors "
          f"(before {loop['ms_per_row_before']:.2f}, after {loop['ms_per_row_after']:.2f}) "
          f"-> {loop_total:.0f} s extrapolated; decode is {speedup:.1f}x faster (target {TARGET_SPEEDUP:.0f}x; a "
          f"batched float32 decode on this machine is capped at {ceiling:.1f}x = loop time / plain matmul time "
          f"per vector); {loop['rows_differing_from_decode']} sampled vectors differ from the decode")
    fraction = decode_gflops / plain
    print(f"fraction of measured matmul throughput: overall {fraction:.0%}, matmul part "
          f"{matmul_part_gflops / plain:.0%} (target {TARGET_FRACTION:.0%})")
    memory = [] if args.skip_memory else memory_runs(args.model, args.top_k,
                                                     [(256, args.layers), (1024, args.layers), (1024, "0-1")])
    comparison = None
    if not args.skip_compare and not args.layers:
        lm_b = load_model(args.model, dtype="bfloat16")
        comparison = compare_decoding(lm, lm_b, chunk=args.chunk, decoded_a=arrays)
        print("compare-decode float32 vs bfloat16 weights (top-1 agreement): " + ", ".join(
            f"{side} {r['overall']:.3f}" for side, r in comparison["sides"].items()))
    load_end = os.getloadavg()
    result = {
        "model": lm.provenance, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                            "processor": platform.processor() or platform.machine(),
                                            "load_average_start": load_start, "load_average_end": load_end},
        "decode": {k: info[k] for k in ("rows", "sides", "chunk", "k", "vocab", "d_model", "total_s", "matmul_s",
                                        "topk_s", "flops")} | {"layers": len(info["layers"]),
                                                                "gflops_overall": decode_gflops,
                                                                "gflops_matmul_part": matmul_part_gflops},
        "plain_matmul": {"before": mm_before, "after": mm_after, "best_gflops": plain},
        "per_neuron_loop": loop | {"extrapolated_seconds": loop_total},
        "speedup_vs_loop": speedup, "speedup_ceiling_float32": ceiling,
        "fraction_of_matmul_overall": fraction, "fraction_of_matmul_matmul_part": matmul_part_gflops / plain,
        "targets": {"speedup": TARGET_SPEEDUP, "fraction": TARGET_FRACTION, "speedup_met": speedup >= TARGET_SPEEDUP,
                    "fraction_met": fraction >= TARGET_FRACTION},
        "memory": memory,
        "compare_float32_vs_bfloat16": None if comparison is None else {
            side: {"overall": r["overall"], "min_layer": min(r["per_layer"]), "max_layer": max(r["per_layer"])}
            for side, r in comparison["sides"].items()},
        "not_reproducible_offline": "Davies 2025's base-vs-instruct agreement (Llama-3.1-8B, >75% of up-projection "
                                    "neurons keep their top token) needs weights that are not available offline",
    }
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
