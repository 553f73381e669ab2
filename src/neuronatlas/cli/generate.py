"""``neuronatlas generate``: baseline and intervened continuations side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from neuronatlas.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit, load_model_cli, positive_float

__all__ = ["register", "recorded_max_lookup"]


def recorded_max_lookup(atlas: Path, record: str | None = None):  # type: ignore[no-untyped-def]
    """A function giving each neuron's recorded max activation (over all labels) from an atlas."""
    from neuronatlas.errors import SelectionError
    from neuronatlas.store import Atlas

    store = Atlas.open(atlas)

    def lookup(neurons):  # type: ignore[no-untyped-def]
        where = "AND record = ?" if record else ""
        params = [neurons.component.value] + ([record] if record else [])
        table = store.query(f"SELECT layer, neuron, max(max) AS m FROM stats WHERE label = '__all__' AND site = ? {where} "
                            "GROUP BY layer, neuron", params)
        found = {(r["layer"], r["neuron"]): r["m"] for r in table.to_pylist()}
        missing = [p for p in neurons.pairs if p not in found]
        if missing:
            raise SelectionError(f"no recorded max for L{missing[0][0]}:{missing[0][1]} in {str(atlas)!r}; "
                                 "record a dataset on this site first")
        return [found[p] for p in neurons.pairs]

    return lookup


def generate_cmd(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt text (repeatable)")],
    model: ModelOpt = "default",
    clamp: Annotated[Optional[list[str]], typer.Option(help="SELECTOR=VALUE, e.g. L12:345=8 or L3:1-4=3xmax")] = None,
    scale: Annotated[Optional[list[str]], typer.Option(help="SELECTOR=FACTOR, e.g. L3:10=0")] = None,
    ablate: Annotated[Optional[list[str]], typer.Option(help="SELECTOR, e.g. L5:1-20 or @neurons.jsonl")] = None,
    steer: Annotated[Optional[list[str]], typer.Option(help="FILE.npz@L12:ALPHA or FILE.npz@L12:0.5xnorm: add a "
                                                       "direction from `directions fit` (docs/directions.md)")] = None,
    site: Annotated[str, typer.Option(help="mlp or gate")] = "mlp",
    position: Annotated[str, typer.Option(help="all or last")] = "all",
    atlas: Annotated[Optional[Path], typer.Option(help="atlas with recorded maxima, for =NxMAX clamp values")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per prompt")] = 30,
    sample: Annotated[bool, typer.Option(help="sample instead of greedy decoding")] = False,
    temperature: Annotated[float, typer.Option(parser=positive_float, help="sampling temperature, above 0 (greedy: "
                                                "leave out --sample)")] = 1.0,
    seed: int = 0,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Generate with and without interventions on neurons, side by side."""
    from neuronatlas.evaluate import generate
    from neuronatlas.intervene.parse import parse_intervention

    lm = load_model_cli(model, dtype, device, quiet=as_json)
    lookup = recorded_max_lookup(atlas) if atlas else None
    ivs = [parse_intervention(kind, text, component=site, position=position, n_neurons=lm.n_neurons,  # type: ignore[arg-type]
                              max_lookup=lookup)
           for kind, texts in (("clamp", clamp), ("scale", scale), ("ablate", ablate)) for text in texts or []]
    ivs += [_steer(text, position) for text in steer or []]
    conditions = [(), tuple(ivs)] if ivs else [()]
    outs = generate(lm, prompt, conditions=conditions, max_new_tokens=max_new_tokens, do_sample=sample,
                    temperature=temperature, seed=seed)
    rows = [{"prompt": p, "baseline": outs[0][i], **({"intervened": outs[1][i]} if ivs else {})}
            for i, p in enumerate(prompt)]
    data = {"interventions": [repr(iv) for iv in ivs], "results": rows}

    def render(d: dict[str, object]) -> None:
        table = Table("prompt", "baseline", *(["intervened"] if ivs else []), show_lines=True)
        for r in rows:
            table.add_row(*[str(v) for v in r.values()])
        console.print(table)

    emit(data, as_json, render)


def _steer(text: str, position: str):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from neuronatlas.cli.directions import parse_steer

    return replace(parse_steer(text), position=position)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
