"""``neuronatlas study ...``: every study runs through :func:`run_study_cli` (load the model, run the
study with one progress bar per phase, print its findings with their verdicts, or ``--json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from neuronatlas.cli.common import (
    DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit, load_model_cli, out_dir, phase_progress,
)

__all__ = ["register", "run_study_cli"]


def _clamp_value(text: str) -> str:
    """``--value``: a finite number or a multiple of the recorded max, checked before any work."""
    from neuronatlas.intervene.parse import parse_value

    parse_value(text, kind="clamp", context=f"--value {text}")
    return text

NRandomOpt = Annotated[int, typer.Option("--n-random", min=0, help="matched random neuron sets per condition")]


def run_study_cli(config: Any, out: Path, *, model: str, dtype: str, device: str, as_json: bool,
                  atlas: Optional[Path] = None, **inputs: Any) -> Any:
    """The one CLI pattern: load, run with progress, print findings (or JSON); returns the result."""
    from neuronatlas.studies import run

    lm = load_model_cli(model, dtype, device, quiet=as_json)
    with phase_progress(enabled=not as_json) as tick:
        result = run(lm, config, out, atlas=atlas, progress=tick, **inputs)
    summary = {"study": result.study, "out": str(out), "report": str(out / "report.html"),
               "results": str(out / "results.json"), "seconds": result.results["timing"]["seconds"],
               "findings": [f.to_json() for f in result.report.findings]}

    def render(d: dict[str, Any]) -> None:
        for f in result.report.findings:
            mark = {True: "[green]holds[/green]", False: "[yellow]does not hold[/yellow]", None: "[dim]descriptive[/dim]"}
            console.print(f"[bold]{f.title}[/bold] ({mark[f.holds]}): {f.text}")
        console.print(f"\n[green]report:[/green] {d['report']}  ({d['seconds']:.0f} s)")

    emit(summary, as_json, render)
    return result


def relations_study_cmd(
    out: Annotated[Path, typer.Option(parser=out_dir, help="output directory (results.json, plots, report.html, atlas/)")],
    model: ModelOpt = "default",
    facts: Annotated[Optional[Path], typer.Option(help="your own facts JSONL (same format as `data relations`)")] = None,
    relations: Annotated[str, typer.Option(help="comma-separated relations (default: all)")] = "",
    langs: Annotated[str, typer.Option(help="languages for neuron identification (default: those in --facts, "
                                            "else en,de,fr,es)")] = "",
    eval_lang: Annotated[str, typer.Option(help="language whose held-out facts are evaluated")] = "en",
    test_template: Annotated[int, typer.Option(min=0, help="template of the evaluated facts; identification never uses it")] = 0,
    share_templates: Annotated[bool, typer.Option(help="let identification use the test template too")] = False,
    few_shot: Annotated[int, typer.Option(min=0, max=32, help="demonstrations prefixed to evaluation prompts (0: zero-shot)")] = 0,
    scorer: Annotated[str, typer.Option(help="ap (average precision), smd (Cohen's d + FDR), lape (activation-probability "
                                          "entropy) or attribution (activation x gradient of p(target), CULNIG)")] = "ap",
    select_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="neurons selected per relation, as a fraction of all")] = 0.01,
    select_n: Annotated[int, typer.Option(min=0, help="neurons selected per relation, as a count (overrides the fraction)")] = 0,
    tails: Annotated[str, typer.Option(help="top, or both (also the n/2 most negatively tuned)")] = "top",
    mode: Annotated[str, typer.Option(help="deactivate to zero, or to the median positive response")] = "zero",
    grid: Annotated[str, typer.Option(help="cumulativity fractions (1.0 is always added)")] = "0.05,0.1,0.25,0.5,1.0",
    n_random: NRandomOpt = 20,
    max_identify_facts: Annotated[int, typer.Option(min=2, help="facts per relation and language used to find neurons")] = 40,
    max_test_facts: Annotated[int, typer.Option(min=1, help="held-out facts evaluated per relation")] = 50,
    min_known: Annotated[int, typer.Option(min=0, help="relations with fewer known test facts are not evaluated")] = 5,
    site: Annotated[str, typer.Option(help="mlp or gate")] = "mlp",
    pool: Annotated[str, typer.Option(help="mean, last or max")] = "mean",
    atlas: Annotated[Optional[Path], typer.Option(help="atlas to record into (default OUT/atlas)")] = None,
    neuron_stats: Annotated[bool, typer.Option(help="also keep activation histograms and GLU quadrants for the "
                                                    "viewer's neuron pages (the record takes ~1.8x longer)")] = False,
    seed: int = 0,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Find relation-specific neurons and test cumulativity, specificity, interference and versatility."""
    from neuronatlas.errors import DatasetError
    from neuronatlas.studies.relations import RelationStudyConfig, facts_languages, load_facts

    user_facts = load_facts(facts) if facts else None
    if langs:
        chosen = tuple(x.strip() for x in langs.split(",") if x.strip())
    else:
        chosen = facts_languages(user_facts) if user_facts else ("en", "de", "fr", "es")
    for name, value, allowed in (("--scorer", scorer, ("ap", "smd", "lape", "attribution")), ("--tails", tails, ("top", "both")),
                                 ("--mode", mode, ("zero", "median")), ("--site", site, ("mlp", "gate")),
                                 ("--pool", pool, ("mean", "last", "max"))):
        if value not in allowed:
            raise DatasetError(f"{name} {value!r} is not one of {', '.join(allowed)}")
    try:
        fractions = tuple(float(g) for g in grid.split(","))
    except ValueError:
        raise DatasetError(f"--grid {grid!r} is not a comma-separated list of fractions such as 0.1,0.5,1.0") from None
    cfg = RelationStudyConfig(
        relations=tuple(relations.split(",")) if relations else None, langs=chosen, eval_lang=eval_lang,
        test_template=test_template, share_templates=share_templates,
        few_shot=few_shot, scorer=scorer, select_fraction=select_fraction, select_n=select_n or None,  # type: ignore[arg-type]
        tails=tails, mode=mode, grid=fractions, n_random=n_random,  # type: ignore[arg-type]
        max_identify_facts=max_identify_facts, max_test_facts=max_test_facts, min_known=min_known,
        site=site, pool=pool, neuron_stats=neuron_stats, seed=seed)  # type: ignore[arg-type]
    run_study_cli(cfg, out, model=model, dtype=dtype, device=device, as_json=as_json, atlas=atlas, facts=user_facts)


def clamp_study_cmd(
    concept: Annotated[str, typer.Option(help="the concept word, e.g. dog")],
    out: Annotated[Path, typer.Option(parser=out_dir, help="study output directory")],
    model: ModelOpt = "default",
    neurons: Annotated[int, typer.Option("--neurons", min=1, help="how many decoded neurons to clamp")] = 10,
    value: Annotated[str, typer.Option(parser=_clamp_value, help="clamp value: a number (10) or a multiple of the recorded max (3xmax)")] = "3xmax",
    n_random: NRandomOpt = 20,
    side: Annotated[str, typer.Option(help="decoded side used to pick neurons: out_normed or out")] = "out_normed",
    atlas: Annotated[Optional[Path], typer.Option(help="atlas to record into and add selections to (default OUT/atlas)")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=512, help="tokens generated per prompt")] = 24,
    n_prompts: Annotated[int, typer.Option(min=1, help="how many of the built-in neutral prompts to use")] = 20,
    n_texts: Annotated[int, typer.Option(min=2, help="corpus sentences per group (concept / other) for activations")] = 60,
    layers: Annotated[str, typer.Option(help="restrict the search to layers, e.g. 10-29 (default all)")] = "",
    seed: int = 0,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Find a concept's neurons by decoding, clamp them in generation, test against matched random neurons."""
    from neuronatlas.cli.decode import _layers
    from neuronatlas.studies.clamp import ClampConfig

    config = ClampConfig(concept=concept, n_neurons=neurons, value=value, n_random=max(1, n_random), side=side,
                         max_new_tokens=max_new_tokens, n_prompts=n_prompts, n_texts=n_texts,
                         layers=tuple(_layers(layers) or ()), seed=seed)
    run_study_cli(config, out, model=model, dtype=dtype, device=device, as_json=as_json, atlas=atlas)


def culture_study_cmd(
    out: Annotated[Path, typer.Option(parser=out_dir, help="output directory (results.json, plots, report.html, atlas/)")],
    model: ModelOpt = "default",
    questions: Annotated[Optional[Path], typer.Option(help="your own questions JSONL (text, target, culture, split; "
                                                           "culture 'control' for non-cultural ones)")] = None,
    cultures: Annotated[str, typer.Option(help="comma-separated country codes of the built-in questions")] = "US,BR,FR,DE,JP,CN,IN,EG",
    objective: Annotated[str, typer.Option(help="prob (CULNIG: max_t a*dp/da times p) or logprob (attribution patching)")] = "prob",
    select_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="neurons per set, as a fraction of all")] = 0.01,
    name_threshold: Annotated[float, typer.Option(help="exclude neurons whose |Cohen's d| on country names vs neutral words reaches this")] = 0.8,
    max_test: Annotated[int, typer.Option(min=1, help="held-out questions evaluated per culture")] = 12,
    n_texts: Annotated[int, typer.Option(min=1, help="English texts for the perplexity check")] = 16,
    n_random: NRandomOpt = 20,
    atlas: Annotated[Optional[Path], typer.Option(help="atlas to record into (default OUT/atlas)")] = None,
    seed: int = 0,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Find culture-general and culture-specific neurons by gradient attribution; suppress them."""
    from neuronatlas.data.culture import CULTURES, load_questions
    from neuronatlas.errors import DatasetError
    from neuronatlas.studies.culture import CultureStudyConfig

    rows = load_questions(questions) if questions else None
    codes = tuple(c.strip().upper() for c in cultures.split(",") if c.strip())
    bad = [c for c in codes if c not in CULTURES]
    if rows is None and (bad or len(codes) < 2):
        raise DatasetError(f"--cultures {cultures!r}: give at least two of {', '.join(CULTURES)}")
    if objective not in ("prob", "logprob"):
        raise DatasetError(f"--objective {objective!r} is not one of prob, logprob")
    if name_threshold <= 0 or select_fraction <= 0:
        raise DatasetError("--name-threshold and --select-fraction must be > 0")
    cfg = CultureStudyConfig(cultures=codes, objective=objective, select_fraction=select_fraction,  # type: ignore[arg-type]
                             name_threshold=name_threshold, max_test=max_test, n_texts=n_texts, n_random=n_random,
                             seed=seed)
    run_study_cli(cfg, out, model=model, dtype=dtype, device=device, as_json=as_json, atlas=atlas, questions=rows)


def emotions_study_cmd(
    out: Annotated[Path, typer.Option(parser=out_dir, help="output directory (results.json, plots, report.html, atlas/)")],
    model: ModelOpt = "default",
    emotions: Annotated[str, typer.Option(help="comma-separated emotions (anger,disgust,fear,joy,sadness,surprise)")] = "",
    neurons: Annotated[int, typer.Option(min=1, help="top neurons per emotion by contribution to its direction")] = 200,
    heads: Annotated[int, typer.Option(min=1, help="top attention heads per emotion")] = 20,
    amplify: Annotated[float, typer.Option(help="factor the neurons / heads are scaled by on neutral prompts (> 1)")] = 4.0,
    n_prompts: Annotated[int, typer.Option(min=1, max=64, help="held-out scenario prompts per emotion (and neutral)")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per continuation")] = 10,
    frames: Annotated[int, typer.Option(min=1, max=8, help="frames per scenario event recorded (8: all)")] = 8,
    steer_layers: Annotated[str, typer.Option(help="layers of the steering sweep, e.g. 6,12,18 (default: 4 spread)")] = "",
    steer_alphas: Annotated[str, typer.Option(help="steering strengths, multiples of the layer's mean resid norm")] = "0.5,1,2",
    steer_alpha: Annotated[float, typer.Option(help="the strength of the direction arm compared with neurons/heads")] = 1.0,
    n_facts: Annotated[int, typer.Option(min=1, help="relation facts the stimuli are prefixed to")] = 48,
    stimulus_neurons: Annotated[int, typer.Option(min=1, help="neurons a stimulus moves most, ablated under it")] = 50,
    n_random: NRandomOpt = 20,
    atlas: Annotated[Optional[Path], typer.Option(help="atlas to record into (default OUT/atlas)")] = None,
    seed: int = 0,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Emotion directions, the neurons and heads writing them, their control of continuations; emotional stimuli."""
    from neuronatlas.data.emotions import EMOTIONS
    from neuronatlas.errors import DatasetError
    from neuronatlas.studies.emotions import EmotionStudyConfig

    def numbers(text: str, flag: str, kind: type) -> tuple[Any, ...]:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise DatasetError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} 6,12") from None

    chosen = tuple(e.strip().lower() for e in emotions.split(",") if e.strip()) or EMOTIONS
    cfg = EmotionStudyConfig(emotions=chosen, n_neurons=neurons, n_heads=heads, amplify=amplify, n_prompts=n_prompts,
                             max_new_tokens=max_new_tokens, n_frames=frames, steer_layers=numbers(steer_layers, "--steer-layers", int),
                             steer_alphas=numbers(steer_alphas, "--steer-alphas", float), steer_alpha=steer_alpha,
                             n_facts=n_facts, n_stimulus_neurons=stimulus_neurons, n_random=n_random, seed=seed)
    run_study_cli(cfg, out, model=model, dtype=dtype, device=device, as_json=as_json, atlas=atlas)


def register(study_app: typer.Typer) -> None:
    study_app.command("clamp")(clamp_study_cmd)
    study_app.command("culture")(culture_study_cmd)
    study_app.command("emotions")(emotions_study_cmd)
    study_app.command("relations")(relations_study_cmd)
