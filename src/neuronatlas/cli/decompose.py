"""``neuronatlas decompose`` and ``neuronatlas circuit`` (contextual decomposition, docs/decompose.md).

    neuronatlas decompose --model default --prompt "The capital of France is" --target " Paris"
    neuronatlas circuit --model default --relation country_capital --out atlas/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from neuronatlas.cli.common import DeviceOpt, JsonOpt, ModelOpt, console, emit, err_console, load_model_cli, out_dir, out_file

__all__ = ["register"]


def _layers(text: str) -> list[int] | None:
    from neuronatlas.errors import SiteError

    if not text.strip():
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise SiteError(f"cannot parse --neuron-layers {text!r}; write layer numbers such as 12,20") from None


def _check_file(path: Path | None) -> Path | None:
    from neuronatlas.errors import DatasetError

    if path is not None and not path.is_file():
        raise DatasetError("file not found; check --facts", path=str(path))
    return path


def decompose_cmd(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="the prompt")],
    target: Annotated[str | None, typer.Option("--target", "-t", help="the next token to explain, e.g. ' Paris' (its first token)")] = None,
    to_neuron: Annotated[str | None, typer.Option("--to-neuron", help="explain this MLP neuron's activation at the last "
                                                  "token instead, e.g. L20:345")] = None,
    model: ModelOpt = "default",
    foil: Annotated[str | None, typer.Option(help="explain logit(target) - logit(foil) instead of the target's logit")] = None,
    top: Annotated[int, typer.Option(min=1, help="components listed")] = 20,
    neuron_layers: Annotated[str, typer.Option("--neuron-layers", help="layers whose every MLP neuron is scored, e.g. 12,20 "
                                               "(default: the MLP block with the largest contribution)")] = "",
    html: Annotated[Path | None, typer.Option(parser=out_file, help="HTML view of the prompt's tokens shaded by contribution "
                                              "(default decompose.html)")] = None,
    device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Split the forward into rel + irrel: each input token's and each component's part of the target logit
    (or of a downstream neuron's activation)."""
    from neuronatlas.decompose.api import decompose_prompt
    from neuronatlas.report.decompose_html import write_decompose_html

    if target is None and to_neuron is None:
        from neuronatlas.errors import SelectionError

        raise SelectionError("nothing to explain; pass --target ' Paris' or --to-neuron L20:345")
    if to_neuron is not None:
        from neuronatlas.ids import NeuronId

        NeuronId.parse(to_neuron)
    layers = _layers(neuron_layers)
    html_path = html or out_file(Path("decompose.html"))
    lm = load_model_cli(model, "float32", device, quiet=as_json)
    if layers is not None:
        bad = [x for x in layers if not 0 <= x < lm.n_layers]
        if bad:
            from neuronatlas.errors import SiteError

            raise SiteError(f"--neuron-layers {bad[0]} is out of range; the model has layers 0-{lm.n_layers - 1}")
    if not as_json:
        err_console.print("[dim]decomposing (every token, head and MLP block as a source)...[/dim]")
    result = decompose_prompt(lm, prompt, target, foil=foil, top=top, neuron_layers=layers, to_neuron=to_neuron)
    result["html"] = str(write_decompose_html(html_path, result))

    def render(d: dict[str, Any]) -> None:
        what = f"logit({d['target']!r})" + (f" - logit({d['foil']!r})" if d["foil"] else "")
        if d["target_kind"] == "neuron":
            what = f"neuron {d['target']} at the last token"
        tokens = Table("pos", "token", "rel", "share", title=f"{what} = {d['total']:+.4g}: per input token")
        for t in d["tokens"]:
            tokens.add_row(str(t["position"]), repr(t["token"]), f"{t['rel']:+.4g}" if t["stable"] else "unstable",
                           f"{t['share']:+.3f}" if t["stable"] else "–")
        console.print(tokens)
        inter = d["interaction"]
        console.print("interaction (total - sum of token parts): "
                      + ("n/a (a token's parts cancel)" if inter is None else f"{inter:+.4g}"))
        comps = Table("component", "rel", "share", title=f"top {len(d['components'])} components "
                      f"(heads, MLP blocks, neurons of layers {d['neuron_layers']})")
        for c in d["components"]:
            comps.add_row(c["name"], f"{c['rel']:+.4g}", f"{c['share']:+.3f}")
        console.print(comps)
        if d["unstable_components"]:
            console.print(f"left out, rel and irrel cancel (docs/decompose.md): {', '.join(d['unstable_components'])}")
        console.print(f"HTML view: {d['html']}")

    emit(result, as_json, render)


def circuit_cmd(
    out: Annotated[Path, typer.Option(parser=out_dir, help="atlas directory (created if missing); the circuit is "
                                      "registered as study circuit-RELATION")],
    relation: Annotated[str, typer.Option(help="relation name, e.g. country_capital")] = "country_capital",
    model: ModelOpt = "default",
    facts: Annotated[Path | None, typer.Option(help="facts JSONL/CSV (from `neuronatlas data relations`); "
                                               "default: the built-in relation facts")] = None,
    n_facts: Annotated[int, typer.Option("--n-facts", min=2, help="facts used (distinct subjects)")] = 10,
    share: Annotated[float, typer.Option(min=0.01, max=1.0, help="share of the logit difference the circuit must carry")] = 0.8,
    n_random: Annotated[int, typer.Option("--n-random", min=0, help="random circuits of the same size")] = 20,
    ablation: Annotated[str, typer.Option(help="mean or zero: how components outside the circuit are switched off")] = "mean",
    seed: Annotated[int, typer.Option(help="seed of the fact sample and the random circuits")] = 0,
    device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Find the heads and MLP blocks that carry a relation's logit difference; check them by ablation."""
    from neuronatlas.decompose.api import run_circuit
    from neuronatlas.errors import InterventionError

    if ablation not in ("mean", "zero"):
        raise InterventionError(f"unknown --ablation {ablation!r}; choose mean or zero")
    _check_file(facts)
    lm = load_model_cli(model, "float32", device, quiet=as_json)
    if not as_json:
        err_console.print(f"[dim]decomposing {n_facts} facts of {relation} and ablating {n_random} random circuits...[/dim]")
    result, folder = run_circuit(lm, relation, out, facts_path=facts, n_facts=n_facts, share=share,
                                 n_random=n_random, seed=seed, ablation=ablation)
    rand = result.random_faithfulness
    data = {"relation": relation, "study": folder.name, "atlas": str(out), "components": result.components,
            "size": len(result.components), "explained_share": result.explained_share, "share": share,
            "reached": result.reached, "faithfulness": result.faithfulness, "ablation": ablation,
            "random_faithfulness_mean": sum(rand) / len(rand) if rand else None, "random_p": result.random_p,
            "empty_faithfulness": result.empty_faithfulness, "n_facts": len(result.facts),
            "necessity": result.necessity,
            "random_necessity_mean": (sum(result.random_necessity) / len(result.random_necessity)
                                      if result.random_necessity else None),
            "necessity_p": result.necessity_p, "unstable": result.unstable,
            "clean_logit_diff": result.clean_logit_diff}

    def render(d: dict[str, Any]) -> None:
        table = Table("component", "mean rel", title=f"circuit for {relation}: {d['size']} components carry "
                      f"{d['explained_share']:.3f} of the logit difference (asked {share})")
        for c in result.components:
            table.add_row(c, f"{result.scores[c]:+.4g}")
        console.print(table)
        if d["faithfulness"] is not None:
            rm = "–" if d["random_faithfulness_mean"] is None else f"{d['random_faithfulness_mean']:.3f}"
            p = "–" if d["random_p"] is None else f"{d['random_p']:.3f}"
            console.print(f"faithfulness ({ablation} ablation of everything else, {d['n_facts']} facts): "
                          f"{d['faithfulness']:.3f}; random circuits of the same size: {rm} (p={p}); "
                          f"empty circuit: {d['empty_faithfulness']:.3f}")
            rn = d["random_necessity_mean"]
            console.print(f"necessity (the circuit alone ablated): {d['necessity']:.3f} of the logit difference kept; "
                          f"random circuits of the same size: {'–' if rn is None else f'{rn:.3f}'} "
                          f"(p={'–' if d['necessity_p'] is None else format(d['necessity_p'], '.3f')})")
        if d["unstable"]:
            console.print(f"left out of the ranking (rel and irrel cancel on some fact): {', '.join(d['unstable'])}")
        console.print(f"registered in {d['atlas']} as study {d['study']} (neuronatlas serve {d['atlas']})")

    emit(data, as_json, render)


def register(app: typer.Typer) -> None:
    app.command("decompose")(decompose_cmd)
    app.command("circuit")(circuit_cmd)
