"""The data-selection comparison of docs/results.md ("SNMF features and monosemantic data selection").

    python docs/experiments/select_data.py --atlas out/features --out out/select_data.json

Pool: ``default_corpus(n_docs=POOL, seed=1)`` (reviews, plot summaries, speeches, debates, Bible,
Hamlet, mixed). For each task (a corpus source): 5 exemplars and HELDOUT held-out documents of that
source that are not in the pool. Each method selects K pool documents; we report the share of the
selection that comes from the task's source (precision) and the held-out task perplexity of the
embedded model after a short LoRA fine-tune on the selection (``neuronatlas.features.finetune``),
against the same fine-tune on random selections (several seeds) and the model before fine-tuning.
Pool representations are computed once and shared by every task.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from neuronatlas.data.corpus import default_corpus
from neuronatlas.features.finetune import LoraConfig, lora_perplexity
from neuronatlas.features.select import SelectConfig, activation_patterns, generalized_jaccard, hidden_embeddings
from neuronatlas.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--atlas", required=True, help="atlas with SNMF features of the default model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", default="plots,debates_2016")
    ap.add_argument("--pool", type=int, default=200)
    ap.add_argument("--k", type=int, default=24)
    ap.add_argument("--heldout", type=int, default=30)
    ap.add_argument("--layers", default="10,15,20")
    ap.add_argument("--top", type=int, default=64)
    ap.add_argument("--lora-tasks", default="plots", help="tasks that get the (slow) LoRA proxy; all get precision")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--random-seeds", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated methods to fine-tune (default: all)")
    ap.add_argument("--max-length", type=int, default=48)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model("default")
    layers = tuple(int(x) for x in args.layers.split(","))
    pool_docs = default_corpus(n_docs=args.pool, seed=1)
    pool = [d["text"] for d in pool_docs]
    in_pool = {d["doc_id"] for d in pool_docs}
    base = dict(layers=layers, top=args.top, max_length=args.max_length)
    t0 = time.perf_counter()
    reps = {"jaccard_neurons": SelectConfig(representation="neurons", **base),  # type: ignore[arg-type]
            "jaccard_features": SelectConfig(representation="features", atlas=args.atlas, **base)}  # type: ignore[arg-type]
    pool_rep = {name: activation_patterns(lm, pool, cfg) for name, cfg in reps.items()}
    pool_emb = hidden_embeddings(lm, pool, SelectConfig(max_length=args.max_length))
    rep_seconds = time.perf_counter() - t0
    lora = LoraConfig(steps=args.steps, max_length=args.max_length, lr=args.lr)
    results: dict[str, object] = {"pool": args.pool, "k": args.k, "layers": layers, "top": args.top,
                                  "lora": asdict(lora),
                                  "pool_sources": {}, "representation_seconds": round(rep_seconds, 1), "tasks": {}}
    for d in pool_docs:
        key = d["doc_id"].split(":")[0]
        results["pool_sources"][key] = results["pool_sources"].get(key, 0) + 1  # type: ignore[index]
    for task in args.tasks.split(","):
        outside = [d for d in default_corpus(n_docs=None, seed=2, sources=[task]) if d["doc_id"] not in in_pool]
        random.Random(f"task:{task}").shuffle(outside)
        exemplars = [d["text"] for d in outside[:5]]
        heldout = [d["text"] for d in outside[5:5 + args.heldout]]
        is_task = [d["doc_id"].startswith(task + ":") for d in pool_docs]
        picks: dict[str, list[int]] = {}
        for name, cfg in reps.items():
            sims = generalized_jaccard(pool_rep[name], activation_patterns(lm, exemplars, cfg)).mean(1)
            picks[name] = sorted(range(len(pool)), key=lambda i: (-float(sims[i]), i))[:args.k]
        emb = torch.nn.functional.normalize(pool_emb, dim=1) @ torch.nn.functional.normalize(
            hidden_embeddings(lm, exemplars, SelectConfig(max_length=args.max_length)), dim=1).T
        picks["embedding"] = sorted(range(len(pool)), key=lambda i: (-float(emb[i].mean()), i))[:args.k]
        for s in range(args.random_seeds):
            picks[f"random_{s}"] = random.Random(s).sample(range(len(pool)), args.k)
        task_out: dict[str, dict] = {"_": {"pool_task_docs": sum(is_task), "exemplars": 5, "heldout": len(heldout)}}
        for name, chosen in picks.items():
            task_out[name] = {"precision": sum(is_task[i] for i in chosen) / len(chosen)}
            print(task, name, task_out[name], flush=True)
        results["tasks"][task] = task_out  # type: ignore[index]
        Path(args.out).write_text(json.dumps(results, indent=2))
        if task not in args.lora_tasks.split(","):
            continue
        for name, chosen in picks.items():
            if args.only and name not in args.only.split(","):
                continue
            t = time.perf_counter()
            r = lora_perplexity(lm, [pool[i] for i in chosen], heldout, lora)
            task_out[name].update({"ppl_before": r["ppl_before"], "ppl_after": r["ppl_after"],
                                   "first_loss": r["first_loss"], "last_loss": r["last_loss"],
                                   "seconds": round(time.perf_counter() - t, 1)})
            print(task, name, task_out[name], flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
