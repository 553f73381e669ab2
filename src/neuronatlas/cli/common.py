"""Shared CLI plumbing: options, progress bars, JSON output, one-line errors."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["console", "err_console", "ModelOpt", "DtypeOpt", "DeviceOpt", "JsonOpt", "progress_bar", "phase_progress", "emit",
           "load_model_cli", "parse_device", "positive_float", "finite_float", "out_dir", "out_file"]

console = Console()
err_console = Console(stderr=True)



def parse_device(value: str) -> str:
    """The one ``--device`` parser: a known device that this machine has (DeviceError otherwise)."""
    if value.strip().lower() == "cpu":
        return "cpu"
    from neuronatlas.models.loading import check_device

    return check_device(value)


def positive_float(value: str | float) -> float:
    """A finite number above 0 (``--temperature``, ``--timeout``); ValueError names the value."""
    number = finite_float(value)
    if number <= 0:
        raise ValueError(f"{value} is not above 0; give a number such as 0.7")
    return number


def finite_float(value: str | float) -> float:
    """A finite number (no inf or nan)."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{value} is not a finite number")
    return number


def out_dir(value: str | Path) -> Path:
    """An atlas or study ``--out`` directory, checked before any work (store.output.check_out_dir)."""
    from neuronatlas.store.output import check_out_dir

    return check_out_dir(Path(value))


def out_file(value: str | Path) -> Path:
    """An output file (JSON, JSONL), checked before any work (store.output.check_out_file)."""
    from neuronatlas.store.output import check_out_file

    return check_out_file(Path(value))


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'default' (embedded SmolLM2-135M), a HF directory, a .gguf file, "
                                       "gemma3-270m, qwen2.5-coder-0.5b, or a hub id in the local HF cache")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")]
DeviceOpt = Annotated[str, typer.Option(parser=parse_device, help="cpu, cuda, cuda:N, mps or auto (accelerate device_map)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of tables")]


@contextmanager
def progress_bar(description: str, total: int | None = None, *, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``update(done, total=None)``; draws a rich bar on stderr unless disabled or not a TTY."""
    if not enabled:
        yield lambda done, total=None: None
        return
    with _progress() as prog:
        task = prog.add_task(description, total=total)

        def update(done: int, new_total: int | None = None) -> None:
            prog.update(task, completed=done, total=new_total if new_total is not None else prog.tasks[task].total)

        yield update


@contextmanager
def phase_progress(*, enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yield ``tick(phase, done, total)``: one bar per phase, added when the phase first ticks."""
    if not enabled:
        yield lambda phase, done, total: None
        return
    with _progress() as prog:
        tasks: dict[str, Any] = {}

        def tick(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = prog.add_task(phase, total=total)
            prog.update(tasks[phase], completed=done, total=total)

        yield tick


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err_console, transient=False)


def emit(data: Any, as_json: bool, render: Callable[[Any], None] | None = None) -> None:
    """Print ``data`` as JSON (``--json``) or through ``render`` (rich tables)."""
    if as_json or render is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        render(data)


def load_model_cli(model: str, dtype: str = "float32", device: str = "cpu", quiet: bool = False) -> Any:
    from transformers.utils import logging as hf_logging

    from neuronatlas.models import load_model

    hf_logging.disable_progress_bar()  # HF's per-tensor loading bars; ours show the real work
    if not quiet:
        err_console.print(f"[dim]loading model {model!r}...[/dim]")
    return load_model(model, dtype=dtype, device=device)  # type: ignore[arg-type]
