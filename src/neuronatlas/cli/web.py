"""Viewer commands: ``serve`` (local read-only web app) and ``export-html`` (static site)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from neuronatlas.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    console,
    emit,
    err_console,
    load_model_cli,
    out_dir,
    progress_bar,
)

__all__ = ["register"]

AtlasesArg = Annotated[list[Path], typer.Argument(help="one or more atlas directories", show_default=False)]


def serve_cmd(
    atlases: AtlasesArg,
    host: Annotated[str, typer.Option(help="interface to bind; anything but 127.0.0.1/localhost exposes the atlases "
                                           "to the network")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1-65535)")] = 8765,
    memory_mb: Annotated[int, typer.Option(help="memory per atlas for sorted in-memory copies of its tables (fast "
                                                "pages); tables beyond it are read from Parquet (0: none)")] = 1024,
    model: Annotated[str | None, typer.Option(help="also load this model (the atlas's own, e.g. default) for the "
                                                   "neuron pages' 'try your own text' box; loopback hosts only")] = None,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu",
) -> None:
    """Browse atlases in a local, read-only web app (loads a model only with --model)."""
    from neuronatlas.web import BadRequest, Library
    from neuronatlas.web.app import is_loopback, serve

    if not 1 <= port <= 65535:
        raise BadRequest(f"port {port} is out of range; use 1-65535 (default 8765)")
    if memory_mb < 0:
        raise BadRequest(f"--memory-mb {memory_mb} is negative; use 0 or more")
    if model is not None and not is_loopback(host):
        raise BadRequest(f"--model needs a loopback --host (127.0.0.1 or localhost), not {host!r}: the live box "
                         "runs the model for whoever can reach the server")
    library = Library(atlases, memory_mb=memory_mb)
    live = None
    if model is not None:
        from neuronatlas.web.live import LiveModel

        live = LiveModel(load_model_cli(model, dtype, device))
        for view in library:
            live.check_atlas(view)
    if not is_loopback(host):
        err_console.print(f"[bold yellow]warning:[/bold yellow] binding {host}:{port} makes every served atlas "
                          "readable by anyone who can reach this machine (no authentication, plain HTTP). "
                          "Use the default --host 127.0.0.1 unless that is what you want.", soft_wrap=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    for view in library:
        err_console.print(f"serving [bold]{view.atlas.path}[/bold] at http://{shown}:{port}/a/{view.slug}",
                          highlight=False, soft_wrap=True)
    err_console.print(f"loading tables; then open http://{shown}:{port}/ (Ctrl-C stops)", highlight=False)
    serve(library, host=host, port=port, live=live)


def export_cmd(
    atlases: AtlasesArg,
    out: Annotated[Path, typer.Option(parser=out_dir, help="output directory (new, empty, or an earlier export)")],
    all_neurons: Annotated[bool, typer.Option("--all-neurons", help="write a page for every neuron (slow on big "
                                              "models); default: neurons in selections, explanations and --token "
                                              "searches")] = False,
    token: Annotated[list[str] | None, typer.Option("--token", help="also export the decoded-token search for this "
                                                    "token and its neurons (repeatable)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the viewer's pages as a static site with relative links (open OUT/index.html)."""
    from neuronatlas.web.export import export_site

    with progress_bar("neuron pages", None, enabled=not as_json) as update:
        summary = export_site(atlases, out, all_neurons=all_neurons, tokens=token or [], progress=update)
    data = {"out": str(summary.out), "index": str(summary.out / "index.html"), "pages": summary.pages,
            "neuron_pages": summary.neurons, "study_files": summary.files, "seconds": summary.seconds}

    def render(d: dict[str, object]) -> None:
        table = Table("property", "value", show_header=False, title="static export")
        for k, v in d.items():
            table.add_row(k, str(v))
        console.print(table)

    emit(data, as_json, render)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("export-html")(export_cmd)
