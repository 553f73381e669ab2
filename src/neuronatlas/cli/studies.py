"""``neuronatlas study relations``: the flagship relation-neuron study."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuronatlas.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit, load_model_cli, progress_bar

__all__ = ["register"]


def relations_study_cmd(
    out: Annotated[Path, typer.Option(help="output directory (results.json, plots, report.html, atlas/)")],
    model: ModelOpt = "default",
    facts: Annotated[Optional[Path], typer.Option(help="your own facts JSONL (same format as `data relations`)")] = None,
    relations: Annotated[str, typer.Option(help="comma-separated relations (default: all)")] = "",
    langs: Annotated[str, typer.Option(help="languages for neuron identification (default: those in --facts, "
                                            "else en,de,fr,es)")] = "",
    eval_lang: Annotated[str, typer.Option(help="language whose held-out facts are evaluated")] = "en",
    test_template: Annotated[int, typer.Option(min=0, help="template of the evaluated facts; identification never uses it")] = 0,
    share_templates: Annotated[bool, typer.Option(help="let identification use the test template too")] = False,
    few_shot: Annotated[int, typer.Option(help="demonstrations prefixed to evaluation prompts (0: zero-shot)")] = 0,
    scorer: Annotated[str, typer.Option(help="ap (average precision), smd (Cohen's d + FDR) or lape (activation-probability entropy)")] = "ap",
    select_fraction: Annotated[float, typer.Option(help="neurons selected per relation, as a fraction of all")] = 0.01,
    select_n: Annotated[int, typer.Option(help="neurons selected per relation, as a count (overrides the fraction)")] = 0,
    tails: Annotated[str, typer.Option(help="top, or both (also the n/2 most negatively tuned)")] = "top",
    mode: Annotated[str, typer.Option(help="deactivate to zero, or to the median positive response")] = "zero",
    grid: Annotated[str, typer.Option(help="cumulativity fractions")] = "0.01,0.02,0.05,0.1,0.2,0.5,1.0",
    seeds: Annotated[int, typer.Option(help="random-neuron baselines per condition")] = 3,
    max_identify_facts: int = 40, max_test_facts: int = 50, min_known: int = 5,
    site: Annotated[str, typer.Option(help="mlp or gate")] = "mlp",
    pool: Annotated[str, typer.Option(help="mean, last or max")] = "mean",
    atlas: Annotated[Optional[Path], typer.Option(help="atlas to record into (default OUT/atlas)")] = None,
    seed: int = 0,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Find relation-specific neurons and test cumulativity, versatility and interference."""
    from neuronatlas.errors import DatasetError
    from neuronatlas.studies.relations import RelationStudyConfig, facts_languages, load_facts, run_relation_study

    user_facts = load_facts(facts) if facts else None
    if langs:
        chosen = tuple(x.strip() for x in langs.split(",") if x.strip())
    else:
        chosen = facts_languages(user_facts) if user_facts else ("en", "de", "fr", "es")
    try:
        cfg = RelationStudyConfig(
            relations=tuple(relations.split(",")) if relations else None, langs=chosen, eval_lang=eval_lang,
            test_template=test_template, share_templates=share_templates,
            few_shot=few_shot, scorer=scorer, select_fraction=select_fraction, select_n=select_n or None,  # type: ignore[arg-type]
            tails=tails, mode=mode, grid=tuple(float(g) for g in grid.split(",")), seeds=seeds,  # type: ignore[arg-type]
            max_identify_facts=max_identify_facts, max_test_facts=max_test_facts, min_known=min_known,
            site=site, pool=pool, seed=seed)  # type: ignore[arg-type]
    except ValueError as exc:
        raise DatasetError(f"bad study option: {exc}") from None
    lm = load_model_cli(model, dtype, device, quiet=as_json)

    def factory(description: str, total: int):  # type: ignore[no-untyped-def]
        return progress_bar(description, total, enabled=not as_json)

    res = run_relation_study(lm, out, cfg, facts=user_facts, atlas=atlas, progress=factory)
    summary = {"out": str(out), "report": str(out / "report.html"), "results": str(out / "results.json"),
               "findings": res["findings"], "seconds": res["timing"]["seconds"]}

    def render(d: dict[str, object]) -> None:
        for title, text in d["findings"].items():  # type: ignore[attr-defined]
            console.print(f"[bold]{title}[/bold]: {text}")
        console.print(f"\n[green]report:[/green] {d['report']}")

    emit(summary, as_json, render)


def register(study_app: typer.Typer) -> None:
    study_app.command("relations")(relations_study_cmd)
