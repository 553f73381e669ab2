"""Benchmark contextual decomposition (CD-T) against activation patching on the embedded model.

    .venv/bin/python benchmarks/bench_cdt.py --out bench-cdt.json          # ~3 min on 2 loaded cores
    .venv/bin/python benchmarks/bench_cdt.py --validate 10                 # + neuron ranking vs ablation

One prompt ("The capital of France is" -> " Paris"), one run, both methods on the same components:

* heads, whole sweep: CD-T's contribution (fast mode; the two-part run is timed too) of each of the 270 attention heads to the target logit
  (each head its own source, batched) vs zero-ablating each head in turn (batched rows, full forward);
* MLP neurons, timed sample: 128 neurons in each of 4 evenly spaced layers, CD-T vs zero-ablation;
  the full sweep over every neuron (30 x 1536) is *estimated* from the sample: per layer, the sampled
  time x 1536/128, averaged over the 4 layers, x 30 layers (CD-T's cost falls with the layer, as it
  starts at the source; patching runs the whole model every time).
* agreement on the sample: Spearman correlation of CD-T contributions and ablation effects;
* memory: in a fresh process, the peak RSS above the loaded model's (Linux ``clear_refs`` resets
  the peak) of a plain forward and of the head sweep (rel and irrel double each activation, and a
  batch of sources multiplies it).

``--validate N``: for N country_capital facts, every neuron of one layer (default: the MLP block
with the largest mean contribution) ranked by CD-T and by zero-ablation of the logit difference
(object minus a foil object): Spearman and overlap of the top 10 / top 50.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import machine, run_child, write_json  # noqa: E402

from neuronatlas.decompose import LogitTarget, Source, trace_prompt  # noqa: E402
from neuronatlas.decompose.ablation import ablated_logits  # noqa: E402
from neuronatlas.decompose.attribution import component_attribution, run_sources  # noqa: E402
from neuronatlas.models import load_model  # noqa: E402

PROMPT, TARGET = "The capital of France is", " Paris"
SAMPLE_LAYERS = (3, 11, 19, 27)
PER_LAYER = 128

_MEM_CHILD = """
import json, torch
from pathlib import Path
from neuronatlas.models import load_model
from neuronatlas.decompose import trace_prompt, LogitTarget
from neuronatlas.decompose.attribution import component_attribution

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024

def reset_peak():  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
    Path("/proc/self/clear_refs").write_text("5")

lm = load_model("default")
ids = lm.tokenizer("{prompt}", return_tensors="pt")
with torch.no_grad():
    lm.model(**ids)
reset_peak()
base = status("VmRSS")
with torch.no_grad():
    lm.model(**ids)
plain = status("VmHWM") - base
reset_peak()
base = status("VmRSS")
tr = trace_prompt(lm, "{prompt}")
component_attribution(lm, tr, LogitTarget(lm.tokenizer.encode("{target}")[0]), mlps=False, batch={batch})
cdt = status("VmHWM") - base
print(json.dumps({{"plain_forward_mb": plain, "cdt_heads_mb": cdt, "rss_mb": status("VmRSS")}}))
"""

def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman correlation over the pairs where the CD-T part is finite and not beyond 1e4 in size
    (an unstable part: docs/decompose.md)."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and abs(x) < 1e4]
    return float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128, help="sources (CD-T) / rows (patching) per forward")
    ap.add_argument("--validate", type=int, default=0, help="facts for the neuron-ranking validation (0: skip)")
    ap.add_argument("--validate-layer", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--validate-only", action="store_true", help="skip the timings and the memory figure")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("default")
    n_heads = lm.config.num_attention_heads
    res: dict[str, Any] = {"machine": machine(), "model": lm.name, "prompt": PROMPT, "target": TARGET,
                           "layers": lm.n_layers, "neurons_per_layer": lm.n_neurons, "heads_per_layer": n_heads}
    if not args.validate_only:
        _timings(lm, args, res)
    if args.validate:
        _validate(lm, args, res)
    write_json(args.out, res)


def _timings(lm: Any, args: argparse.Namespace, res: dict[str, Any]) -> None:
    t_id = lm.tokenizer.encode(TARGET)[0]
    target = LogitTarget(t_id)
    n_heads = lm.config.num_attention_heads
    # warm-up (allocator, lazy imports) outside the timings
    tr = trace_prompt(lm, PROMPT)
    run_sources(lm, tr, [Source(heads=((lm.n_layers - 1, 0),))], target)
    ablated_logits(lm, PROMPT, [[]])

    # heads: the whole sweep, both ways
    t = time.perf_counter()
    tr = trace_prompt(lm, PROMPT)
    heads_cd = component_attribution(lm, tr, target, mlps=False, batch=args.batch)
    cd_heads_s = time.perf_counter() - t
    t = time.perf_counter()
    component_attribution(lm, tr, target, mlps=False, batch=args.batch, fast=False)
    cd_heads_exact_s = time.perf_counter() - t
    names = [f"L{l}.head:{h}" for l in range(lm.n_layers) for h in range(n_heads)]
    t = time.perf_counter()
    logits = ablated_logits(lm, PROMPT, [[]] + [[n] for n in names], batch=args.batch)
    patch_heads_s = time.perf_counter() - t
    effect = (logits[0, t_id] - logits[1:, t_id]).tolist()
    cd_by_name = {s.name: s.rel for s in heads_cd}
    stable = {s.name for s in heads_cd if s.stable}
    keep = [i for i, n in enumerate(names) if n in stable]
    res["heads"] = {"components": len(names), "cdt_s": cd_heads_s, "cdt_two_part_s": cd_heads_exact_s,
                    "patching_s": patch_heads_s,
                    "patching_over_cdt": patch_heads_s / cd_heads_s,
                    "unstable": sorted(set(names) - stable),
                    "spearman": _spearman([cd_by_name[names[i]] for i in keep], [effect[i] for i in keep])}
    print(f"heads ({len(names)}): CD-T {cd_heads_s:.1f} s (two-part run {cd_heads_exact_s:.1f} s), patching {patch_heads_s:.1f} s, "
          f"ratio {patch_heads_s / cd_heads_s:.2f}, spearman {res['heads']['spearman']:.3f}", flush=True)

    # neurons: a timed sample per layer, extrapolated to the full sweep
    rng = random.Random(0)
    per_layer = []
    cd_all: list[float] = []
    ab_all: list[float] = []
    for layer in SAMPLE_LAYERS:
        idx = sorted(rng.sample(range(lm.n_neurons), PER_LAYER))
        t = time.perf_counter()
        rel, _ = run_sources(lm, tr, [Source(neurons=((layer, j),)) for j in idx], target, batch=args.batch)
        cd_s = time.perf_counter() - t
        t = time.perf_counter()
        lg = ablated_logits(lm, PROMPT, [[f"L{layer}:{j}"] for j in idx], batch=args.batch)
        patch_s = time.perf_counter() - t
        cd_all += rel.tolist()
        ab_all += (logits[0, t_id] - lg[:, t_id]).tolist()
        per_layer.append({"layer": layer, "neurons": PER_LAYER, "cdt_s": cd_s, "patching_s": patch_s})
        print(f"neurons L{layer} x{PER_LAYER}: CD-T {cd_s:.1f} s, patching {patch_s:.1f} s", flush=True)
    scale = lm.n_neurons / PER_LAYER * lm.n_layers / len(SAMPLE_LAYERS)
    est_cd = sum(p["cdt_s"] for p in per_layer) * scale
    est_patch = sum(p["patching_s"] for p in per_layer) * scale
    res["neurons"] = {"sample": per_layer, "estimated": True, "full_components": lm.n_layers * lm.n_neurons,
                      "cdt_full_s_est": est_cd, "patching_full_s_est": est_patch,
                      "patching_over_cdt": est_patch / est_cd, "spearman_sample": _spearman(cd_all, ab_all)}
    total_cd, total_patch = est_cd + cd_heads_s, est_patch + patch_heads_s
    res["all_components"] = {"cdt_s_est": total_cd, "patching_s_est": total_patch,
                             "patching_over_cdt": total_patch / total_cd}
    print(f"every neuron + head (estimated from the sample): CD-T {total_cd / 60:.1f} min, "
          f"patching {total_patch / 60:.1f} min, ratio {total_patch / total_cd:.2f}", flush=True)

    if not args.no_memory:
        mem = run_child(_MEM_CHILD.format(prompt=PROMPT, target=TARGET, batch=args.batch))
        res["memory"] = {**mem, "batch": args.batch}
        print(f"peak RSS above the loaded model: plain forward {mem['plain_forward_mb']:.1f} MB, CD-T head sweep "
              f"(batch {args.batch}) {mem['cdt_heads_mb']:.1f} MB; process RSS {mem['rss_mb']:.0f} MB", flush=True)



def _validate(lm: Any, args: argparse.Namespace, res: dict[str, Any]) -> None:
    if args.validate:
        from neuronatlas.decompose.api import relation_facts
        from neuronatlas.decompose.circuit import fact_rows, validate_neurons

        facts = fact_rows(lm, relation_facts("country_capital", None, args.validate))
        layer = args.validate_layer
        if layer is None:  # the MLP block with the largest mean contribution over the facts
            sums = torch.zeros(lm.n_layers)
            for f in facts:
                trf = trace_prompt(lm, f.text)
                for s in component_attribution(lm, trf, LogitTarget(f.target, f.foil), heads=False):
                    sums[s.layer] += s.rel if s.stable else float("-inf")
            layer = int(sums.argmax())
        t = time.perf_counter()
        v = validate_neurons(lm, facts, layer, batch=args.batch)
        res["validation"] = {"facts": len(facts), "layer": layer, "spearman": v.spearman, "unstable": v.unstable,
                             "overlap": v.overlap, "cd_top": v.cd_top, "ablation_top": v.ablation_top,
                             "seconds": time.perf_counter() - t}
        print(f"validation L{layer}, {len(facts)} facts: spearman {v.spearman:.3f}, overlap {v.overlap}", flush=True)


if __name__ == "__main__":
    main()
