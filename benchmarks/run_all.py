"""Run every benchmark in this folder, each writing its JSON under --out.

    python benchmarks/run_all.py --out out/benchmarks [--only record,decode] [--peer-python PATH]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/benchmarks")
    ap.add_argument("--only", default="", help="comma-separated names (record, decode, explain, languages, web, fewshot, cdt, attribution, snmf, steering, introspection)")
    ap.add_argument("--peer-python", default=None, help="interpreter with nnsight/transformer_lens, for bench_record")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(filter(None, args.only.split(",")))
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        name = script.stem.removeprefix("bench_")
        if wanted and name not in wanted:
            continue
        cmd = [sys.executable, str(script), "--out", str(out / f"{name}.json")]
        if name == "record" and args.peer_python:
            cmd += ["--peer-python", args.peer_python]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
