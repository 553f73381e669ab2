"""Recording overhead on the embedded model: bare HF forward vs NeuronAtlas streaming record vs
keeping all activations (and nnsight / TransformerLens when importable), batched multi-condition
evaluation vs sequential runs, and peak memory when the corpus grows 10x.

    python benchmarks/bench_record.py --out out/benchmarks/record.json [--prompts 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import interleaved, machine, median, run_child, write_json  # noqa: E402

from neuronatlas.data.corpus import default_corpus
from neuronatlas.data.prompts import PromptSet
from neuronatlas.evaluate import target_logprobs
from neuronatlas.intervene import Ablate, NeuronSet
from neuronatlas.models import load_model
from neuronatlas.record import RecordConfig, record
from neuronatlas.record.batching import encode_ids, forward, forward_through, pad_ids
from neuronatlas.record.hooks import site_hooks

MEMORY_CHILD = """
import json, resource, shutil, tempfile
from neuronatlas.data.corpus import default_corpus
from neuronatlas.data.prompts import PromptSet
from neuronatlas.models import load_model
from neuronatlas.record import RecordConfig, record
lm = load_model("default")
docs = default_corpus(n_docs={n}, seed=0)
ps = PromptSet.from_rows([{{"text": d["text"], "label": d["source"].split(":")[0]}} for d in docs])

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

# loading the model peaks far above what recording needs: reset the high-water mark (Linux) so the
# peak measured is the recording's own
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss_mb()
tmp = tempfile.mkdtemp()
record(lm, ps, tmp + "/a", config=RecordConfig(batch_size=16, max_length=64, keep_pooled=False, checkpoint_every=10**9))
shutil.rmtree(tmp)
print(json.dumps({{"docs": {n}, "peak_mb": hwm_mb(), "before_record_mb": base, "peak_above_start_mb": hwm_mb() - base}}))
"""


def _no_sharing(fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` with forward_conditions' shared prefix switched off (the plain repeated pass)."""
    import neuronatlas.evaluate.core as core

    original = core.forward_conditions
    core.forward_conditions = lambda *a, **k: original(*a, share_prefix=False, **k)
    try:
        return fn()
    finally:
        core.forward_conditions = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-docs", type=int, default=100, help="N for the N vs 10N memory check")
    ap.add_argument("--out", default=None)
    ap.add_argument("--peer-python", default=None, help="python of a venv with nnsight installed beside torch 2.13.0")
    args = ap.parse_args()

    lm = load_model("default")
    docs = default_corpus(n_docs=args.prompts, seed=0)
    prompts = PromptSet.from_rows([{"text": d["text"], "label": d["source"].split(":")[0]} for d in docs])
    ids = encode_ids(lm, [p.text for p in prompts], max_length=args.max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [pad_ids(lm, [ids[i] for i in order[j:j + 16]]) for j in range(0, len(order), 16)]
    n_tokens = sum(len(x) for x in ids)
    tmp = Path(tempfile.mkdtemp())

    def bare() -> None:
        for b in batches:
            forward(lm, b)

    def bare_layers_only() -> None:  # the tightest baseline: layers only, no final norm or unembedding
        for b in batches:
            forward_through(lm, b)

    def streaming() -> None:
        record(lm, prompts, tmp / "atlas", config=RecordConfig(batch_size=16, max_length=args.max_length, top_k=20),
               force=True)

    def keep_all() -> None:
        kept: list[torch.Tensor] = []
        with site_hooks(lm, "mlp", observe=lambda layer, h: kept.append(h.detach().clone())):
            for b in batches:
                forward(lm, b)
        kept.clear()

    fns = {"bare_forward": bare, "bare_forward_layers_only": bare_layers_only, "streaming_record": streaming,
           "keep_all_activations": keep_all}
    peers: dict[str, object] = {}
    if args.peer_python:  # nnsight lives in its own venv (it pins other transformers versions)
        batches_file = tmp / "batches.json"
        batches_file.write_text(json.dumps([{k: v.tolist() for k, v in b.items()} for b in batches]))
        proc = subprocess.run([args.peer_python, str(Path(__file__).parent / "peers.py"),
                               lm.provenance["converted_cache"], str(batches_file), str(args.repeats)],
                              capture_output=True, text=True)
        peers = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                 else {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr else str(proc.returncode)})
    else:
        peers = {"note": "not measured: pass --peer-python with a venv holding nnsight / transformer_lens beside torch 2.13.0"}
    forward(lm, batches[0])  # warm-up
    times = interleaved(fns, args.repeats)
    med = {k: median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["bare_forward"] for k in med}
    ratios_layers = {k: med[k] / med["bare_forward_layers_only"] for k in med}

    # batched 8-condition evaluation vs 8 sequential runs
    facts = [d["text"][:80] for d in docs[:32]]
    targets = [" the"] * len(facts)
    conds = [(Ablate(NeuronSet.of([(layer, j) for layer in range(10, 20) for j in range(c * 10, c * 10 + 10)])),)
             for c in range(8)]
    # batched: defaults (8 facts x 8 conditions = 64 rows per pass, layers below the first intervened
    # one shared), the same without the shared prefix, and one 256-row pass; sequential: each condition
    # alone at 8 and at 32 facts per pass (the faster of the two is the baseline)
    cond_times = interleaved({
        "batched_8": lambda: target_logprobs(lm, facts, targets, conditions=conds),
        "batched_8_no_shared_prefix": lambda: _no_sharing(lambda: target_logprobs(lm, facts, targets, conditions=conds)),
        "batched_8_one_256_row_pass": lambda: target_logprobs(lm, facts, targets, conditions=conds, batch_size=32,
                                                              max_rows=256),
        "sequential_8_b8": lambda: [target_logprobs(lm, facts, targets, conditions=[c]) for c in conds],
        "sequential_8_b32": lambda: [target_logprobs(lm, facts, targets, conditions=[c], batch_size=32) for c in conds],
    }, args.repeats)
    cond_med = {k: median(v) for k, v in cond_times.items()}
    best_seq = min(cond_med["sequential_8_b8"], cond_med["sequential_8_b32"])

    mem = [run_child(MEMORY_CHILD.format(n=n)) for n in (args.memory_docs, 10 * args.memory_docs)]
    growth = (mem[1]["peak_above_start_mb"] - mem[0]["peak_above_start_mb"]) / mem[0]["peak_above_start_mb"]
    shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "machine": machine(), "prompts": len(prompts), "tokens": n_tokens, "repeats": args.repeats,
        "median_seconds": med, "ratio_vs_bare_forward": ratios, "ratio_vs_bare_layers_only": ratios_layers, "tokens_per_second_bare": n_tokens / med["bare_forward"],
        "peers": peers,
        "conditions": {"median_seconds": cond_med, "speedup_batched_vs_best_sequential": best_seq / cond_med["batched_8"],
                       "speedup_of_shared_prefix": cond_med["batched_8_no_shared_prefix"] / cond_med["batched_8"]},
        "memory": {"runs": mem, "peak_growth_10x_corpus": growth},
        "targets": {"streaming_record_le_1.15x": ratios["streaming_record"] <= 1.15,
                    "streaming_record_le_1.15x_vs_layers_only": ratios_layers["streaming_record"] <= 1.15, "memory_growth_lt_10pct": growth < 0.10,
                    "batched_faster": cond_med["batched_8"] < best_seq},
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
