"""``neuronatlas study neurofeedback`` and ``neuronatlas study self-report``: the introspection
studies (docs/introspection.md), run through :func:`neuronatlas.cli.studies.run_study_cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuronatlas.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, out_dir
from neuronatlas.cli.studies import run_study_cli

__all__ = ["register"]


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from neuronatlas.errors import SelectionError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SelectionError(f"{flag} {text!r} is not a comma-separated list of integers such as 0,4,16,64") from None


def neurofeedback_cmd(
    out: Annotated[Path, typer.Option(parser=out_dir, help="output directory (results.json, plots, report.html, atlas/)")],
    model: ModelOpt = "default",
    layer: Annotated[int, typer.Option(help="layer whose activations define the axes (-1: the middle layer)")] = -1,
    space: Annotated[str, typer.Option(help="mlp (MLP neurons) or a residual-stream space: resid, attn_out, mlp_out")] = "mlp",
    shots: Annotated[str, typer.Option(help="numbers of labelled examples in context (even)")] = "0,4,16,64",
    pcs: Annotated[str, typer.Option(help="principal components used as axes, 1-based (empty: none)")] = "1,8,64",
    concept_axis: Annotated[bool, typer.Option(help="add the logistic-regression direction of sentiment")] = True,
    neuron_axis: Annotated[bool, typer.Option(help="add the single neuron of largest variance")] = True,
    n_sentences: Annotated[int, typer.Option(min=8, help="review snippets: examples and axis fitting plus test")] = 288,
    n_test: Annotated[int, typer.Option(min=4, help="held-out sentences whose labels are reported")] = 48,
    control_shots: Annotated[int, typer.Option(min=2, help="labelled examples before the control tasks (even)")] = 8,
    n_control: Annotated[int, typer.Option(min=2, help="given sentences in the implicit control task")] = 24,
    n_generate: Annotated[int, typer.Option(min=2, help="written sentences per label in the explicit control task")] = 4,
    atlas: Annotated[Optional[Path], typer.Option(help="atlas to register the study in (default OUT/atlas)")] = None,
    seed: int = 0,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Can the model report and control the projection of its activations on an axis (arXiv 2505.13763)?"""
    from neuronatlas.studies.neurofeedback import NeurofeedbackConfig

    cfg = NeurofeedbackConfig(layer=layer, space=space, shots=_ints(shots, "--shots"), pcs=_ints(pcs, "--pcs"),
                              concept_axis=concept_axis, neuron_axis=neuron_axis, n_sentences=n_sentences,
                              n_test=n_test, control_shots=control_shots, n_control=n_control, n_generate=n_generate,
                              seed=seed)
    run_study_cli(cfg, out, model=model, dtype=dtype, device=device, as_json=as_json, atlas=atlas)


def self_report_cmd(
    out: Annotated[Path, typer.Option(parser=out_dir, help="output directory (results.json, plots, report.html, atlas/)")],
    model: ModelOpt = "default",
    layer: Annotated[int, typer.Option(help="layer of the probe and the steering (-1: the middle layer)")] = -1,
    space: Annotated[str, typer.Option(help="probe and steering space: mlp (neurons) or resid, attn_out, mlp_out")] = "mlp",
    n_agents: Annotated[int, typer.Option(min=2, help="agents (a domain and random weights) whose reports are scored")] = 12,
    n_choices: Annotated[int, typer.Option(min=2, help="choices per agent")] = 16,
    n_probe: Annotated[int, typer.Option(min=4, help="further agents whose choice prompts train the probe")] = 120,
    steer_agents: Annotated[int, typer.Option(min=1, help="agents whose reports are steered")] = 6,
    steer_norm: Annotated[float, typer.Option(help="steering strength, as a multiple of the mean activation norm")] = 0.5,
    n_random: Annotated[int, typer.Option("--n-random", min=1, help="random directions per steered slot")] = 19,
    train_steps: Annotated[int, typer.Option(min=0, help="LoRA fine-tune steps on choices made by hidden weights "
                                                          "(0: off; needs the 'train' extra, peft)")] = 0,
    train_differ: Annotated[int, typer.Option(min=0, max=5, help="training options differ in only this many "
                                                                  "attributes (0: all drawn; 1-2 are easier to learn)")] = 0,
    introspect_steps: Annotated[int, typer.Option(min=0, help="introspection training steps after the fine-tune: half "
                                                               "the agents' reports are trained, the rest scored (0: off)")] = 0,
    atlas: Annotated[Optional[Path], typer.Option(help="atlas to register the study in (default OUT/atlas)")] = None,
    seed: int = 0,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Can the model report the attribute weights behind its choices (arXiv 2505.17120)?"""
    from neuronatlas.studies.self_report import SelfReportConfig

    cfg = SelfReportConfig(layer=layer, space=space, n_agents=n_agents, n_choices=n_choices, n_probe=n_probe,
                           steer_agents=steer_agents, steer_norm=steer_norm, n_random=n_random, train_steps=train_steps,
                           train_differ=train_differ, introspect_steps=introspect_steps, seed=seed)
    run_study_cli(cfg, out, model=model, dtype=dtype, device=device, as_json=as_json, atlas=atlas)


def register(study_app: typer.Typer) -> None:
    study_app.command("neurofeedback")(neurofeedback_cmd)
    study_app.command("self-report")(self_report_cmd)
