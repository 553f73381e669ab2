"""Core commands: models, inspect, record, query, generate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from neuronatlas.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    console,
    emit,
    load_model_cli,
    out_dir,
    positive_float,
    progress_bar,
)

__all__ = ["RayOpt", "WorkersOpt", "cluster_from_cli", "register"]

WorkersOpt = Annotated[int, typer.Option(min=1, help="Ray workers (actors, each loads the model once); above 1, the "
                                         "work is sharded over a local Ray cluster or --ray's (needs the distributed extra)")]
RayOpt = Annotated[Optional[str], typer.Option("--ray", help="address of a running Ray cluster (e.g. 10.0.0.1:6379 or "
                                               "auto), see docs/distributed.md; implies sharding over --workers")]


def cluster_from_cli(workers: int, ray_address: str | None, device: str) -> object | None:
    """The :class:`~neuronatlas.distributed.Cluster` for ``--workers``/``--ray``; ``None`` = one process."""
    if workers <= 1 and not ray_address:
        return None
    from neuronatlas.distributed import Cluster

    return Cluster(workers=workers, address=ray_address, gpus=1.0 if device.startswith("cuda") else 0.0)


def models_cmd(as_json: JsonOpt = False) -> None:
    """List the supported model families and their neuron sites."""
    from neuronatlas.models.specs import SPECS

    rows = [{"model_type": name, "gated": s.gated, "sites": [c.value for c in s.components], "layers": s.layers,
             "mlp": ".".join(x for x in (s.mlp, s.down) if x)} for name, s in sorted(SPECS.items())]

    def render(data: list[dict[str, object]]) -> None:
        table = Table("model_type", "gated MLP", "sites", "layers at", "neuron site (down-proj input)")
        for r in data:
            table.add_row(str(r["model_type"]), "yes" if r["gated"] else "no", ", ".join(r["sites"]),  # type: ignore[arg-type]
                          str(r["layers"]), str(r["mlp"]))
        console.print(table)

    emit(rows, as_json, render)


def inspect_cmd(model: ModelOpt = "default", dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu",
                as_json: JsonOpt = False) -> None:
    """Print layers, neurons per layer, total neurons and sites of a model."""
    lm = load_model_cli(model, dtype, device)

    def render(data: dict[str, object]) -> None:
        table = Table("property", "value", show_header=False)
        for k, v in data.items():
            table.add_row(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
        console.print(table)

    emit(lm.summary(), as_json, render)


def record_cmd(
    data: Annotated[Path, typer.Option(help="labelled prompts: .jsonl, .csv or .parquet")],
    out: Annotated[Path, typer.Option(parser=out_dir, help="atlas directory (created if missing)")],
    model: ModelOpt = "default",
    site: Annotated[str, typer.Option(help="mlp (down-projection input) or gate (act(gate) alone)")] = "mlp",
    pool: Annotated[str, typer.Option(help="how prompt responses are pooled: mean, last or max")] = "mean",
    top_k: Annotated[int, typer.Option(min=1, help="exemplars kept per neuron")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per forward pass")] = 16,
    max_length: Annotated[int, typer.Option(min=1, help="tokens per prompt; longer prompts are cut")] = 128,
    name: Annotated[str, typer.Option(help="record name inside the atlas")] = "default",
    label_field: str = "label",
    text_field: str = "text",
    skip_bad: Annotated[bool, typer.Option(help="skip malformed rows (and report how many) instead of failing")] = False,
    force: Annotated[bool, typer.Option(help="discard an existing record or checkpoint of this name")] = False,
    pooled: Annotated[bool, typer.Option(help="keep per-prompt pooled responses (prompts x neurons, needed by AP "
                                          "scorers); --no-pooled keeps memory independent of corpus length")] = True,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
    workers: WorkersOpt = 1, ray_address: RayOpt = None,
) -> None:
    """Record per-label neuron statistics, pooled responses and top-k exemplars into an atlas (resumable)."""
    from neuronatlas.data.prompts import load_prompts
    from neuronatlas.record import RecordConfig, record

    prompts = load_prompts(data, text_field=text_field, label_field=label_field, skip_bad=skip_bad)
    cluster = cluster_from_cli(workers, ray_address, device)
    # sharded: the driver's copy (tokenizer, provenance) stays on the CPU, the workers use --device
    lm = load_model_cli(model, dtype, "cpu" if cluster else device, quiet=as_json)
    config = RecordConfig(component=site, pool=pool, top_k=top_k, batch_size=batch_size,  # type: ignore[arg-type]
                          max_length=max_length, keep_pooled=pooled)
    with progress_bar("recording", len(prompts), enabled=not as_json) as update:
        if cluster is None:
            result = record(lm, prompts, out, name=name, config=config, progress=update, force=force)
        else:
            from neuronatlas.distributed import Cluster, ModelSource, record_distributed

            assert isinstance(cluster, Cluster)
            result = record_distributed(lm, prompts, out, load=ModelSource(model, dtype, device), name=name,
                                        config=config, cluster=cluster, progress=update, force=force)
    counts = result.moments.count.tolist()
    summary = {"atlas": str(out), "record": name, "prompts": len(prompts), "skipped_rows": len(prompts.skipped),
               "labels": {lab: int(c) for lab, c in zip(result.labels, counts)}, "tokens": int(sum(counts)),
               "site": config.component.value, "pool": pool, "seconds": result.info.get("record_seconds"),
               "resumed_from_batch": result.info.get("resumed_from_batch")}
    if "distributed" in result.info:
        summary["distributed"] = result.info["distributed"]

    def render(d: dict[str, object]) -> None:
        table = Table("label", "tokens", title=f"recorded {d['prompts']} prompts into {d['atlas']} ({d['site']} site)")
        for lab, c in d["labels"].items():  # type: ignore[attr-defined]
            table.add_row(lab, str(c))
        console.print(table)
        if d["skipped_rows"]:
            console.print(f"[yellow]skipped {d['skipped_rows']} malformed rows[/yellow]")

    emit(summary, as_json, render)


def query_cmd(atlas: Annotated[Path, typer.Argument(help="atlas directory")],
              sql: Annotated[str, typer.Argument(help="one read-only statement (SELECT, EXPLAIN) over the atlas "
                                                      "tables (stats, exemplars, prompts, ...)")],
              as_json: JsonOpt = False,
              limit: Annotated[int, typer.Option(min=1, help="rows shown (the query stops reading after them)")] = 50,
              timeout: Annotated[float, typer.Option(parser=positive_float, help="seconds (above 0) before the query is "
                                                     "interrupted")] = 30.0,
              out: Annotated[Optional[Path], typer.Option(help="write every row to FILE.csv, .parquet or .json "
                                                               "(atomically; never inside an atlas)")] = None) -> None:
    """Run one read-only DuckDB statement over an atlas's tables (confined to the atlas; see docs/safety.md)."""
    from neuronatlas.store import Atlas
    from neuronatlas.store.output import check_export_path, write_export

    if out is not None:
        check_export_path(out)
    store = Atlas.open(atlas)
    table = store.query(sql, timeout=timeout, max_rows=None if out is not None else limit + 1)
    if out is not None:
        write_export(table, out)
        emit({"out": str(out), "rows": table.num_rows, "columns": table.column_names}, as_json,
             lambda d: console.print(f"wrote {d['rows']} rows to {d['out']}", highlight=False))
        return
    rows = table.slice(0, limit).to_pylist()

    def render(data: list[dict[str, object]]) -> None:
        t = Table(*table.column_names)
        for r in data:
            t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()])
        console.print(t)
        if table.num_rows > limit:
            console.print(f"[dim]more rows not shown (raise --limit, or export them all with --out FILE.csv)[/dim]")

    emit(rows, as_json, render)


def register(app: typer.Typer) -> None:
    app.command("models")(models_cmd)
    app.command("inspect")(inspect_cmd)
    app.command("record")(record_cmd)
    app.command("query")(query_cmd)
