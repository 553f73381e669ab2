"""``neuronatlas directions fit|sweep`` and ``generate --steer`` (docs/directions.md).

    neuronatlas directions fit --model default --data emotions.jsonl --positive joy --out joy.npz
    neuronatlas directions sweep --model default --directions joy.npz -p "Today I" --layers 8,14 --alphas 0,4,8
    neuronatlas generate -p "Today I" --steer joy.npz@L14:6
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from neuronatlas.cli.common import (
    DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit, load_model_cli, out_dir, out_file, phase_progress,
)

__all__ = ["register", "parse_steer", "parse_layers"]

_STEER_RE = re.compile(r"^(?P<file>.+)@L(?P<layer>\d+):(?P<alpha>[-+0-9.eE]+)(?P<norm>xnorm)?$")


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``all``, ``12`` or ``4,8,12`` or ``4-12`` (a range, inclusive)."""
    from neuronatlas.errors import SiteError

    text = text.strip().replace(" ", "")
    if text == "all":
        return list(range(n_layers))
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise SiteError(f"cannot parse layers {text!r}; write all, 12, 4,8,12 or 4-12") from None
    bad = [x for x in out if not 0 <= x < n_layers]
    if not out or bad:
        raise SiteError(f"layers {text!r} are not in 0..{n_layers - 1}; pick layers the model has")
    return sorted(set(out))


def parse_steer(text: str) -> Any:
    """``FILE@L12:8`` (alpha in activation units) or ``FILE@L12:0.5xnorm`` (times the layer's mean
    activation norm, recorded when the direction was fitted) -> a SteerVector."""
    from neuronatlas.directions import load_directions
    from neuronatlas.errors import InterventionError

    match = _STEER_RE.match(text.strip())
    if not match:
        raise InterventionError(f"cannot parse --steer {text!r}; write FILE.npz@L12:8 or FILE.npz@L12:0.5xnorm")
    ds = load_directions(match["file"])
    layer = int(match["layer"])
    try:
        alpha = float(match["alpha"])
    except ValueError:
        raise InterventionError(f"cannot parse the alpha of --steer {text!r}; write a number such as 8 or 0.5xnorm") from None
    if match["norm"]:
        alpha *= ds.mean_norm[ds._index(layer)]
    return ds.steer(layer, alpha)


def _split(prompts: Any, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows of the identify and test splits: the file's own ``split`` column when it has both,
    else a seeded random hold-out of ``holdout`` of each label's rows."""
    import random

    from neuronatlas.data.prompts import SPLIT_NAMES

    named = [SPLIT_NAMES.get(p.split or "", None) for p in prompts]
    if "identify" in named and "test" in named:
        return ([i for i, s in enumerate(named) if s == "identify"], [i for i, s in enumerate(named) if s == "test"])
    rng = random.Random(seed)
    train, test = [], []
    for label in prompts.labels:
        rows = [i for i, p in enumerate(prompts) if p.label == label]
        rng.shuffle(rows)
        k = int(round(len(rows) * holdout))
        test.extend(rows[:k])
        train.extend(rows[k:])
    return sorted(train), sorted(test)


def fit_cmd(
    data: Annotated[Path, typer.Option(help="labelled texts: .jsonl, .csv or .parquet with text and label columns")],
    out: Annotated[Path, typer.Option(parser=out_file, help="with --positive: the .npz file; without: a folder "
                                      "receiving one LABEL.npz per label (each against the rest)")],
    model: ModelOpt = "default",
    positive: Annotated[Optional[str], typer.Option(help="the concept's label (the rest is the other side)")] = None,
    text_field: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_field: Annotated[str, typer.Option(help="column holding the label")] = "label",
    space: Annotated[str, typer.Option(help="resid, attn_out or mlp_out")] = "resid",
    pool: Annotated[str, typer.Option(help="last (last token) or mean (mean over tokens)")] = "last",
    method: Annotated[str, typer.Option(help="mean_diff, pca or logistic")] = "mean_diff",
    layers: Annotated[str, typer.Option(help="all, 12, 4,8,12 or 4-12")] = "all",
    holdout: Annotated[float, typer.Option(min=0.0, max=0.9, help="share of each label held out for accuracy when the "
                                           "file has no identify/test split column")] = 0.25,
    seed: int = 0,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Fit a concept direction per layer and report its held-out accuracy."""
    from neuronatlas.data.prompts import load_prompts
    from neuronatlas.directions import Space, capture, fit_direction, fit_one_vs_rest
    from neuronatlas.directions.fit import METHODS
    from neuronatlas.errors import DatasetError

    Space.parse(space)
    if method not in METHODS:
        raise DatasetError(f"unknown --method {method!r}; choose from: {', '.join(METHODS)}")
    if pool not in ("last", "mean"):
        raise DatasetError(f"unknown --pool {pool!r}; choose last or mean")
    prompts = load_prompts(data, text_field=text_field, label_field=label_field)
    if positive is not None and positive not in prompts.labels:
        raise DatasetError(f"label {positive!r} is not in {str(data)!r}; its labels are: {', '.join(prompts.labels[:20])}")
    if len(prompts.labels) < 2:
        raise DatasetError(f"{str(data)!r} has one label ({prompts.labels[0]!r}); a direction needs texts of at least two")
    lm = load_model_cli(model, dtype, device, quiet=as_json)
    chosen = parse_layers(layers, lm.n_layers)
    train, test = _split(prompts, holdout, seed)
    with phase_progress(enabled=not as_json) as tick:
        acts = capture(lm, [p.text for p in prompts], space=space, layers=chosen, pool=pool,  # type: ignore[arg-type]
                       progress=tick)
    labels = [p.label for p in prompts]
    common: dict[str, Any] = dict(method=method, layers=chosen, space=space, pool=pool, model=model, seed=seed)
    if positive is not None:
        is_pos = [labels[i] == positive for i in range(len(labels))]
        pick = lambda rows, want: acts[[i for i in rows if is_pos[i] == want]]  # noqa: E731
        sets = {positive: fit_direction(pick(train, True), pick(train, False), test_pos=pick(test, True),
                                        test_neg=pick(test, False), concept=positive, **common)}
        paths = {positive: out}
    else:
        sets = fit_one_vs_rest(acts[train], [labels[i] for i in train], test_acts=acts[test] if test else None,
                               test_labels=[labels[i] for i in test] if test else None, **common)
        folder = out_dir(out)
        paths = {name: folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.npz" for name in sets}
    for name, ds in sets.items():
        ds.extra.update({"data": str(data), "n_train": len(train), "n_test": len(test)})
        ds.save(paths[name])
    result = {name: {"file": str(paths[name]), "best_layer": ds.best_layer(), "layers": ds.summary()}
              for name, ds in sets.items()}

    def render(_: Any) -> None:
        table = Table("concept", "best layer", "held-out accuracy", "train accuracy", "file")
        for name, ds in sets.items():
            k = ds.layers.index(ds.best_layer())
            table.add_row(name, str(ds.best_layer()), f"{ds.accuracy[k]:.3f}", f"{ds.train_accuracy[k]:.3f}",
                          str(paths[name]))
        console.print(table)

    emit(result, as_json, render)


def sweep_cmd(
    directions: Annotated[Path, typer.Option(help="a direction file from `directions fit`")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt to continue (repeatable)")],
    model: ModelOpt = "default",
    layers: Annotated[str, typer.Option(help="layers to steer at: 12, 4,8,12 or 4-12")] = "",
    alphas: Annotated[str, typer.Option(help="comma-separated multiples of each layer's mean activation norm")] = "0,0.25,0.5,1",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 20,
    out: Annotated[Optional[Path], typer.Option(parser=out_dir, help="folder for sweep.json and sweep.png")] = None,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Steer along a direction at several layers and strengths; score concept expression (the
    direction's own probe, reading the continuation unsteered) and fluency (perplexity)."""
    from neuronatlas.directions import load_directions, plot_sweep, probe_scorer, steering_sweep
    from neuronatlas.errors import InterventionError
    from neuronatlas.store.atlas import write_json_atomic

    ds = load_directions(directions)
    try:
        rel = [float(a) for a in alphas.split(",") if a.strip()]
    except ValueError:
        raise InterventionError(f"cannot parse --alphas {alphas!r}; write numbers such as 0,0.5,1") from None
    lm = load_model_cli(model, dtype, device, quiet=as_json)
    chosen = parse_layers(layers, lm.n_layers) if layers else [ds.best_layer()]
    missing = [x for x in chosen if x not in ds.layers]
    if missing:
        raise InterventionError(f"{str(directions)!r} has no direction at layer {missing[0]}; fit it with --layers")
    with phase_progress(enabled=not as_json) as tick:
        result = steering_sweep(lm, prompt, ds, layers=chosen, alphas=rel, alpha_unit="norm", score=probe_scorer(lm, ds),
                                max_new_tokens=max_new_tokens, progress=tick)
    data = result.as_dict()
    if out is not None:
        write_json_atomic(out / "sweep.json", data)
        plot_sweep(result, out / "sweep.png")

    def render(_: Any) -> None:
        table = Table("layer", "alpha (x norm)", "concept rate", "perplexity", "example")
        table.add_row("-", "0", f"{result.baseline.concept_rate:.2f}", f"{result.baseline.perplexity:.1f}",
                      (result.baseline.examples or [""])[0])
        for c in result.cells:
            table.add_row(str(c.layer), f"{c.alpha:g}", f"{c.concept_rate:.2f}", f"{c.perplexity:.1f}",
                          (c.examples or [""])[0])
        console.print(table)

    emit(data, as_json, render)


def register(app: typer.Typer) -> None:
    directions_app = typer.Typer(help="Concept directions in the residual stream: fit, sweep (docs/directions.md).",
                                 no_args_is_help=True)
    directions_app.command("fit")(fit_cmd)
    directions_app.command("sweep")(sweep_cmd)
    app.add_typer(directions_app, name="directions")
