"""Print the markdown tables of docs/results.md's issue-17 section from the experiments' JSON.

    python docs/experiments/features_tables.py --features ATLAS/features.json --select out/select_data.json \
        --steer out/steer_features.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _f(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.2e}"


def features_table(info: dict) -> str:
    lines = ["| layer | FVU | relative error | L0 (active codes / token) | dead |", "|---|---|---|---|---|"]
    for i, s in enumerate(info["layers"]):
        lines.append(f"| {i} | {s['fvu']:.3f} | {s['relative_error']:.3f} | {s['l0']:.1f} | {s['dead']} |")
    return "\n".join(lines)


def select_table(data: dict) -> str:
    out = []
    for task, res in data["tasks"].items():
        meta = res["_"]
        out.append(f"Task `{task}`: {meta['pool_task_docs']} of the {data['pool']} pool documents come from it; "
                   f"{meta['exemplars']} exemplars, {meta['heldout']} held-out documents, k = {data['k']}.\n")
        out.append("| method | precision (share of the selection from the task) | held-out PPL before | after LoRA | change |")
        out.append("|---|---|---|---|---|")
        for name, r in res.items():
            if name == "_":
                continue
            change = (r["ppl_after"] / r["ppl_before"] - 1) * 100 if "ppl_after" in r else None
            out.append(f"| {name} | {r['precision']:.2f} | {_f(r.get('ppl_before'))} | {_f(r.get('ppl_after'))} | "
                       f"{_f(change, 1) + ' %' if change is not None else '–'} |")
        out.append("")
    return "\n".join(out)


def steer_table(data: dict) -> str:
    alphas = data["alphas_x_token_norm"]
    head = "| concept | layer | method | " + " | ".join(f"x{a:g}: rate / PPL" for a in alphas) + " |"
    lines = [head, "|---" * (3 + len(alphas)) + "|"]
    for r in data["results"]:
        label = r["method"] + (f" (feature {r['extra']['feature']})" if "feature" in r["extra"] else "")
        cells = " | ".join(f"{c['rate']:.2f} / {_f(c['ppl'], 1)}" for c in r["cells"])
        lines.append(f"| {r['concept']} | {r['layer']} | {label} | {cells} |")
    base = data["results"][0]["baseline"] if data["results"] else None
    if base:
        lines.append(f"\nUnsteered: rate {base['rate']:.2f}, PPL {_f(base['ppl'], 1)}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features")
    ap.add_argument("--select")
    ap.add_argument("--steer")
    args = ap.parse_args()
    if args.features:
        print(features_table(json.loads(Path(args.features).read_text())), "\n")
    if args.select:
        print(select_table(json.loads(Path(args.select).read_text())), "\n")
    if args.steer:
        print(steer_table(json.loads(Path(args.steer).read_text())))


if __name__ == "__main__":
    main()
