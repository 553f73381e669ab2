"""Benchmark of the language-neuron pipeline: recording, LAPE, and batched vs sequential perplexity.

    $ .venv/bin/python benchmarks/bench_languages.py --out artifacts/bench_languages.json
    $ .venv/bin/python benchmarks/bench_languages.py --out b.json --langs en,fr,ru --n-per-lang 40
    $ .venv/bin/python benchmarks/bench_languages.py --out b.json --study-out out/languages   # + the full study

Measured in one run on one model: loading, building the verses, recording the gate site on the
identify verses (forward passes counted), fitting LAPE and the variant, then the L x L perplexity
matrix (baseline + one deactivation per language, on every language's test verses) evaluated twice:
all conditions sharing each forward pass (``text_nll`` with every condition) and one condition at a
time (``text_nll`` per condition). Both give the same numbers (the largest difference is reported);
the JSON holds wall times, CPU times, forward passes and rows, and the speed-up. ``--study-out`` also
runs (or resumes) the default ``study languages`` and records its timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Timer:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), _cpu()

    def done(self) -> dict[str, float]:
        return {"wall_s": round(time.perf_counter() - self.wall, 3), "cpu_s": round(_cpu() - self.cpu, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--model", default="default")
    parser.add_argument("--langs", default="en,fr,de,es,it,pt,ru,ar")
    parser.add_argument("--n-per-lang", type=int, default=80, help="verses per language (a quarter held out)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (per condition)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="rows x width cap per forward (as the study)")
    parser.add_argument("--study-out", default=None, help="also run the default study into this directory")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = idle cores (as the CLI)")
    args = parser.parse_args()

    import torch

    from neuronatlas.cli.languages import auto_threads
    from neuronatlas.data.prompts import PromptSet
    from neuronatlas.evaluate.perplexity import count_forwards, text_nll
    from neuronatlas.intervene import Ablate, NeuronSet
    from neuronatlas.models import load_model
    from neuronatlas.record import RecordConfig, record
    from neuronatlas.stats.lape import EntropyMaxScorer, LAPEScorer

    langs = [x for x in args.langs.split(",") if x]
    torch.set_num_threads(auto_threads(args.threads))
    report: dict[str, Any] = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                          "load_average_at_start": os.getloadavg()},
                              "args": vars(args)}
    t_all = _Timer()
    t = _Timer()
    lm = load_model(args.model)
    report["load_model"] = t.done()

    from neuronatlas.data.languages import build_language_texts

    t = _Timer()
    rows = build_language_texts(langs, args.n_per_lang, 0.25, 0)
    prompts = PromptSet.from_rows(rows, source="bench")
    identify, test = prompts.filter(split="identify"), prompts.filter(split="test")
    report["build_data"] = {**t.done(), "identify_verses": len(identify), "test_verses": len(test)}

    with tempfile.TemporaryDirectory() as tmp:
        t = _Timer()
        with count_forwards(lm) as calls:
            rec = record(lm, identify, Path(tmp) / "atlas", name="bench",
                         config=RecordConfig(component="gate", keep_pooled=False))
        report["record"] = {**t.done(), "forward_passes": calls.forwards, "rows": calls.rows,
                            "tokens_incl_padding": calls.tokens, "tokens": int(rec.moments.count.sum())}
    t = _Timer()
    lape = LAPEScorer().fit(rec.moments.act_prob, rec.moments.count, rec.labels)
    emax = EntropyMaxScorer().fit(rec.moments.act_prob, rec.moments.count, rec.labels)
    report["scoring"] = {**t.done(), "lape_selected": len(lape.selected_), "lape_counts": lape.counts_,
                         "variant_lambda": emax.lambda_chosen_, "variant_categories": emax.category_counts_}

    texts = [p.text for p in test]
    conds = [()] + [(Ablate(NeuronSet.of(lape.neurons_[k], "gate")),) for k in rec.labels if lape.neurons_[k]]
    big = args.max_tokens
    t = _Timer()
    with count_forwards(lm) as calls:
        batched = text_nll(lm, texts, conditions=conds, batch_size=args.batch_size, max_tokens=big)
    b_time = t.done()
    report["ppl_batched"] = {**b_time, "conditions": len(conds), "texts": len(texts),
                             "forward_passes": calls.forwards, "rows": calls.rows,
                             "tokens_incl_padding": calls.tokens}
    t = _Timer()
    with count_forwards(lm) as calls:
        single = [text_nll(lm, texts, conditions=[c], batch_size=args.batch_size, max_tokens=big) for c in conds]
    s_time = t.done()
    report["ppl_sequential"] = {**s_time, "forward_passes": calls.forwards, "rows": calls.rows,
                                "tokens_incl_padding": calls.tokens}
    diff = max(float((batched.nll[i] - s.nll[0]).abs().max()) for i, s in enumerate(single))
    total_tokens = int(batched.n_tokens.sum())
    report["ppl_comparison"] = {
        "speedup_wall": round(s_time["wall_s"] / b_time["wall_s"], 3),
        "speedup_cpu": round(s_time["cpu_s"] / b_time["cpu_s"], 3),
        "max_abs_nll_difference": diff,
        "scored_tokens_per_condition": total_tokens,
        "batched_tokens_per_s": round(total_tokens * len(conds) / b_time["wall_s"], 1),
        "sequential_tokens_per_s": round(total_tokens * len(conds) / s_time["wall_s"], 1),
    }
    if args.study_out:
        from neuronatlas.studies.languages import LanguagesConfig, run_languages_study

        t = _Timer()
        res = run_languages_study(lm, args.study_out, LanguagesConfig(langs=tuple(langs), n_per_lang=args.n_per_lang))
        report["study"] = {**t.done(), "timings_s": res["timing"]["phases"],
                           "forward_passes_this_run": res["timing"]["model_forward_calls"]}
    report["total"] = t_all.done()
    report["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    cmp_ = report["ppl_comparison"]
    print(f"wall time {report['total']['wall_s']:.1f} s (cpu {report['total']['cpu_s']:.1f} s); "
          f"record {report['record']['wall_s']:.1f} s in {report['record']['forward_passes']} forward passes")
    print(f"PPL matrix, {len(conds)} conditions x {len(texts)} texts: batched {b_time['wall_s']:.1f} s in "
          f"{report['ppl_batched']['forward_passes']} passes, sequential {s_time['wall_s']:.1f} s in "
          f"{report['ppl_sequential']['forward_passes']} passes -> speed-up x{cmp_['speedup_wall']:.2f} "
          f"(max NLL difference {diff:.2e})")
    if "study" in report:
        print(f"study languages: {report['study']['wall_s']:.1f} s, forward passes {report['study']['forward_passes_this_run']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
