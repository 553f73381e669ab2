"""Render time of the study, neuron and heatmap pages against reading their rows with DuckDB alone.

For each page kind, interleaved repetitions (same run, so machine load hits both alike):

- ``render``: the viewer's page context plus its Jinja template (``study_context`` / ``neuron_context`` /
  ``heatmap_context`` -> ``render``), with the page cache bypassed and the viewer's small query cache
  cleared before every page (so every query runs), its in-memory table copies kept, as served;
- ``rows``: the same rows read by plain DuckDB over the atlas's Parquet files (``AtlasSource`` for the
  neuron card's sections, the heatmap's GROUP BY over selections.parquet) or, for the study page, which
  has no table rows, ``json.loads`` of its results.json.

It also measures what the neuron page's new statistics cost the recorder: ``record()`` with
``neuron_stats=True`` (histograms and, for gated MLPs, the gate/up sign quadrants from hooks in the same
forward pass) against ``neuron_stats=False``, on the embedded model when it is installed.

    python benchmarks/bench_pages.py --out artifacts/bench_pages.json              # builds bench_web's atlas
    python benchmarks/bench_pages.py --atlas out/relations/atlas --repeats 50
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _util import interleaved, machine, write_json  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def add_report_study(atlas_path: Path) -> str:
    """A study whose results.json carries a typed report of realistic size (5 findings, 4 sections,
    tables of 60 rows with neuron ids and concepts) and its figures (copied from the relations study)."""
    import numpy as np

    from neuronatlas.report.model import Finding, Section, StudyReport, Table
    from neuronatlas.store import Atlas

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atlas = Atlas.open(atlas_path)
    study = atlas.path / "studies" / "bench-report"
    study.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    try:
        concepts = [str(c) for c in atlas.query("SELECT DISTINCT concept FROM selections ORDER BY 1").column(0).to_pylist()]
    except Exception:
        concepts = []
    concepts = concepts or ["capital"]
    figures = [f"figure_{i}.png" for i in range(4)]
    for name in figures:
        fig, ax = plt.subplots(figsize=(4, 2.6))
        ax.plot([0, 0.1, 0.25, 0.5, 1.0], np.sort(g.uniform(0, 1, 5))[::-1])
        fig.savefig(study / name, dpi=80)
        plt.close(fig)
    findings = [Finding(f"f{i}", f"Finding {i}", f"Sentence {i} of the report, produced from the numbers.",
                        rule="p < 0.05 and effect > 0", holds=bool(i % 2), numbers={"p": 0.01 * i, "effect": 0.3})
                for i in range(5)]

    def table(n: int) -> Table:
        rows = [[concepts[i % len(concepts)], f"L{int(g.integers(30))}:{int(g.integers(1536))}", float(g.normal()),
                 float(g.uniform()), int(g.integers(100))] for i in range(n)]
        return Table(["concept", "neuron", "effect", "p", "n"], rows, caption="bench table", concept_columns=["concept"])

    sections = [Section(f"Section {i}", f"f{i}", figures=figures[i:i + 1], tables=[table(60)]) for i in range(4)]
    report = StudyReport("bench-report", "Benchmark report", intro="A typed report for the page benchmark.",
                         setup={"model": "bench", "seeds": 3}, findings=findings, sections=sections)
    (study / "results.json").write_text(json.dumps({"report": report.to_json()}))
    atlas.update_manifest(lambda m: m.setdefault("studies", {}).__setitem__("bench-report", {
        "kind": "bench-report", "path": "studies/bench-report", "concepts": concepts}))
    return "bench-report"


def bench_pages(atlas_path: Path, study: str, repeats: int, seed: int = 0) -> dict[str, Any]:
    from neuronatlas.explain.card import AtlasSource, neuron_sections
    from neuronatlas.store import Atlas
    from neuronatlas.web.data import Library
    from neuronatlas.web.neuron import neuron_context
    from neuronatlas.web.pages import heatmap_context
    from neuronatlas.web.render import ServerLinker, render
    from neuronatlas.web.study import study_context

    view = next(iter(Library([atlas_path])))
    view.warm()
    dims = view.dims()
    assert dims is not None
    rng = random.Random(seed)
    neurons = [(rng.randrange(dims[0]), rng.randrange(dims[1])) for _ in range(repeats)]
    src = AtlasSource(Atlas.open(atlas_path))
    con = Atlas.open(atlas_path).connect()
    linker = ServerLinker()
    state = {"i": 0}
    results_json = view.study_dir(study) / "results.json"

    def fresh() -> None:
        view._cache.clear()          # the viewer's query cache: every page below runs all its queries

    def neuron_render() -> None:
        fresh()
        layer, n = neurons[state["i"] % len(neurons)]
        render("neuron.html", neuron_context(view, layer, n), linker)

    def neuron_rows() -> None:
        layer, n = neurons[state["i"] % len(neurons)]
        neuron_sections(src, layer, n)
        state["i"] += 1

    def heatmap_render() -> None:
        fresh()
        render("heatmap.html", heatmap_context(view, page=1), linker)

    def heatmap_rows() -> None:
        con.execute("SELECT concept, layer, count(DISTINCT neuron) AS n FROM selections WHERE concept IS NOT NULL "
                    "GROUP BY concept, layer").fetchall()

    def study_render() -> None:
        fresh()
        render("study.html", study_context(view, study), linker)

    def study_rows() -> None:
        json.loads(results_json.read_text())

    fns = {"neuron.render": neuron_render, "neuron.rows": neuron_rows, "heatmap.render": heatmap_render,
           "heatmap.rows": heatmap_rows, "study.render": study_render, "study.rows": study_rows}
    for fn in fns.values():          # warm-up: templates compiled, files in the page cache
        fn()
    times = interleaved(fns, repeats)
    out: dict[str, Any] = {}
    for page in ("study", "neuron", "heatmap"):
        r, b = times[f"{page}.render"], times[f"{page}.rows"]
        out[page] = {"render_p50_ms": 1e3 * statistics.median(r), "render_p99_ms": 1e3 * _pct(r, 99),
                     "rows_p50_ms": 1e3 * statistics.median(b), "rows_p99_ms": 1e3 * _pct(b, 99),
                     "ratio_p50": statistics.median(r) / statistics.median(b)}
    src.close()
    con.close()
    return out


def bench_record_cost(model: str, n_prompts: int, repeats: int) -> dict[str, Any]:
    """record() with and without the neuron statistics (histograms + GLU quadrants), interleaved."""
    from neuronatlas.data.prompts import PromptSet
    from neuronatlas.models import load_model
    from neuronatlas.record import RecordConfig, record

    lm = load_model(model)
    words = ["The capital of", "France", "is Paris", "and the language of", "Japan", "is Japanese;", "gold has the",
             "symbol Au", "while a dog says", "woof"]
    rng = random.Random(0)
    prompts = PromptSet.from_rows([{"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))),
                                    "label": f"c{i % 8}"} for i in range(n_prompts)], source="bench")
    tmp = Path(tempfile.mkdtemp(prefix="bench-pages-"))
    runs = {"count": 0}

    def run(stats: bool) -> None:
        runs["count"] += 1
        record(lm, prompts, tmp / f"a{runs['count']}", config=RecordConfig(batch_size=16, neuron_stats=stats,
                                                                           keep_pooled=False), force=True)

    times = interleaved({"with": lambda: run(True), "without": lambda: run(False)}, repeats)
    w, wo = statistics.median(times["with"]), statistics.median(times["without"])
    return {"model": model, "n_layers": lm.n_layers, "n_neurons": lm.n_neurons, "gated": lm.spec.gated,
            "prompts": n_prompts, "with_s": w, "without_s": wo, "ratio": w / wo}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", type=Path, default=None, help="atlas to serve (default: build bench_web's 30x1536 atlas)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build/keep the default atlas")
    ap.add_argument("--study", default=None, help="study page to time (default: a typed-report study added here)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--model", default="default", help="model for the recorder cost ('' skips it)")
    ap.add_argument("--record-prompts", type=int, default=64)
    ap.add_argument("--record-repeats", type=int, default=3)
    ap.add_argument("--skip-pages", action="store_true", help="only the recorder cost")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    atlas = args.atlas
    data: dict[str, Any] = {"machine": machine(), "repeats": args.repeats}
    t0 = time.perf_counter()
    if args.skip_pages:
        pass
    elif atlas is None:
        from bench_web import build_atlas

        atlas = build_atlas(args.workdir or Path(tempfile.mkdtemp(prefix="bench-pages-")))
    if not args.skip_pages:
        assert atlas is not None
        study = args.study or add_report_study(atlas)
        data.update(atlas=str(atlas), study=study, pages=bench_pages(atlas, study, args.repeats))
    for page, r in data.get("pages", {}).items():
        print(f"{page:8s} render p50 {r['render_p50_ms']:8.2f} ms  p99 {r['render_p99_ms']:8.2f} ms | "
              f"rows alone p50 {r['rows_p50_ms']:8.2f} ms  p99 {r['rows_p99_ms']:8.2f} ms | x{r['ratio_p50']:.2f}")
    if args.model:
        try:
            cost = bench_record_cost(args.model, args.record_prompts, args.record_repeats)
        except Exception as exc:  # the embedded model is optional here
            cost = {"skipped": f"{type(exc).__name__}: {exc}"}
        data["record_cost"] = cost
        if "ratio" in cost:
            print(f"record() with histograms + GLU quadrants {cost['with_s']:.2f} s vs without {cost['without_s']:.2f} s "
                  f"(x{cost['ratio']:.3f}; {cost['prompts']} prompts, {cost['n_layers']}x{cost['n_neurons']})")
        else:
            print(f"record cost skipped: {cost['skipped']}")
    data["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.out, data)


if __name__ == "__main__":
    main()
