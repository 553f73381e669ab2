"""``neuronatlas exemplars``, ``neuronatlas explain`` and ``neuronatlas show``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from neuronatlas.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    console,
    emit,
    finite_float,
    load_model_cli,
    out_dir,
    positive_float,
    progress_bar,
)
from neuronatlas.cli.core import RayOpt, WorkersOpt, cluster_from_cli
from neuronatlas.errors import DatasetError, ExplainerError, SelectionError
from neuronatlas.ids import NeuronId

__all__ = ["ExplainerKind", "register"]


class ExplainerKind(str, Enum):
    local = "local"
    openai = "openai"


def _corpus(paths: list[Path] | None, max_docs: int | None, seed: int, text_field: str) -> tuple[Any, str, dict]:
    """The corpus argument of collect_exemplars, its fingerprint name and provenance."""
    from neuronatlas.data.corpus import corpus_provenance, default_corpus, read_corpus

    if not paths:
        n = max_docs or 2000
        try:
            docs = default_corpus(n_docs=n, seed=seed)
            prov = corpus_provenance()
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
        return docs, f"default_corpus(n_docs={n}, seed={seed})", {"default_corpus": prov}

    def read() -> Iterator[dict]:
        try:
            yield from read_corpus([str(p) for p in paths], text_field=text_field)
        except UnicodeDecodeError as exc:
            bad = next((p for p in paths if p.suffix.lower() != ".parquet" and not _is_utf8(p)), None)
            raise DatasetError(f"not UTF-8 (byte 0x{exc.object[exc.start]:02x}); re-save the file as UTF-8 (e.g. "
                               "iconv -f latin1 -t utf-8)", path=str(bad) if bad else None) from None
        except ValueError as exc:
            raise DatasetError(str(exc)) from None

    for p in paths:
        if not p.is_file():
            raise DatasetError(f"corpus file {str(p)!r} not found; check the --corpus path")
    files = [{"path": str(p), "bytes": p.stat().st_size, "mtime": int(p.stat().st_mtime)} for p in paths]
    return read, json.dumps({"files": files, "text_field": text_field}, sort_keys=True), {"files": files}


def _is_utf8(path: Path) -> bool:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except (UnicodeDecodeError, OSError):
        return False
    return True


def exemplars_cmd(
    out: Annotated[Path, typer.Option(parser=out_dir, help="atlas directory (created if missing)")],
    model: ModelOpt = "default",
    corpus: Annotated[list[Path] | None, typer.Option(help=".txt/.jsonl/.parquet file (repeatable); default: "
                                                         "the built-in offline corpus")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="top-activating tokens kept per neuron")] = 20,
    context: Annotated[int, typer.Option(min=0, help="tokens kept before each exemplar token")] = 32,
    after: Annotated[int | None, typer.Option(min=0, help="tokens kept after it (default: context // 4)")] = None,
    random: Annotated[int, typer.Option("--random", min=0, help="random (doc, token) samples per neuron, for scoring")] = 5,
    max_docs: Annotated[int | None, typer.Option(min=1, help="read at most N documents (default corpus: 2000)")] = None,
    site: Annotated[str, typer.Option(help="mlp (down-projection input) or gate")] = "mlp",
    batch_size: Annotated[int, typer.Option(min=1, help="documents per forward pass")] = 8,
    max_length: Annotated[int, typer.Option(min=1, help="tokens per document, longer ones are cut")] = 256,
    chunk_docs: Annotated[int, typer.Option(min=1, help="documents read ahead and length-sorted; one checkpoint per chunk")] = 256,
    seed: Annotated[int, typer.Option(help="seed of the random samples and of the default corpus")] = 0,
    text_field: str = "text",
    force: Annotated[bool, typer.Option(help="discard a finished pass or a checkpoint")] = False,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
    workers: WorkersOpt = 1, ray_address: RayOpt = None,
) -> None:
    """Top-k and random exemplars of every neuron over a corpus, in one streaming pass (resumable)."""
    from neuronatlas.explain.exemplars import ExemplarConfig, collect_exemplars

    config = ExemplarConfig(component=site, top_k=top_k, n_random=random, context=context, after=after,  # type: ignore[arg-type]
                            batch_size=batch_size, max_length=max_length, chunk_docs=chunk_docs, seed=seed)
    docs, name, meta = _corpus(corpus, max_docs, seed, text_field)
    cluster = cluster_from_cli(workers, ray_address, device)
    lm = load_model_cli(model, dtype, "cpu" if cluster else device, quiet=as_json)
    with progress_bar("exemplars (docs)", None, enabled=not as_json) as update:
        if cluster is None:
            info = collect_exemplars(lm, docs, out, config=config, max_docs=max_docs, corpus_name=name,
                                     corpus_meta=meta, progress=update, force=force)
        else:
            from neuronatlas.distributed import Cluster, ModelSource, collect_exemplars_distributed

            assert isinstance(cluster, Cluster)
            info = collect_exemplars_distributed(lm, docs, out, load=ModelSource(model, dtype, device), config=config,
                                                 max_docs=max_docs, corpus_name=name, corpus_meta=meta,
                                                 cluster=cluster, progress=update, force=force)
    info = {k: v for k, v in info.items() if k != "corpus_meta"} | {"atlas": str(out)}

    def render(d: dict[str, Any]) -> None:
        verb = "reused" if d.get("reused") else "collected"
        console.print(f"{verb} exemplars of {d['n_layers']} x {d['n_neurons']} neurons ({d['site']} site) from "
                      f"{d['docs']} documents / {d['tokens']} tokens into {d['atlas']} "
                      f"(stream {d['stream_seconds']} s, write {d.get('write_seconds')} s)")

    emit(info, as_json, render)


def explain_cmd(
    atlas: Annotated[Path, typer.Option(help="atlas with exemplars (neuronatlas exemplars)")],
    neurons: Annotated[str, typer.Option(help="selector: L12:345, L3:1-4, L7:*, or @file")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="the atlas's model, for the causal check "
                                                 "(default: the model the atlas was made with)")] = None,
    explainer: Annotated[ExplainerKind, typer.Option(help="local HF chat model or OpenAI-compatible endpoint")] = ExplainerKind.local,
    explainer_model: Annotated[str, typer.Option(help="local explainer and simulator/PMI model")] = "default",
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")] = None,
    openai_model: Annotated[str | None, typer.Option(help="model name sent to the endpoint")] = None,
    api_key_env: Annotated[str, typer.Option(help="environment variable holding the API key")] = "OPENAI_API_KEY",
    timeout: Annotated[float, typer.Option(parser=positive_float, help="seconds per HTTP request")] = 30.0,
    candidates: Annotated[int, typer.Option(min=1, help="candidate explanations per neuron")] = 3,
    seed: int = 0,
    pmi_lambda: Annotated[float, typer.Option("--lambda", parser=finite_float, help="MILAN's lambda in log p(d|x) - lambda log p(d)")] = 0.2,
    n_top: Annotated[int, typer.Option(min=1, help="top exemplars shown and scored")] = 5,
    n_random: Annotated[int, typer.Option(min=0, help="random exemplars scored")] = 5,
    causal: Annotated[bool, typer.Option(help="run the ablation check on the atlas's model")] = True,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Explain neurons in natural language, score the explanations by simulation, check them causally."""
    from neuronatlas.explain.backends import Explainer, LocalExplainer, OpenAIExplainer
    from neuronatlas.explain.pipeline import ExplainConfig, explain_neurons
    from neuronatlas.explain.tables import open_atlas, table_meta
    from neuronatlas.intervene.neurons import NeuronSet

    store = open_atlas(atlas)
    meta = table_meta(store)
    if not meta:
        raise DatasetError(f"atlas {str(atlas)!r} has no exemplars; run `neuronatlas exemplars --out {atlas}` first")
    selection = NeuronSet.parse(neurons, meta["site"], n_neurons=meta["n_neurons"]).validate(meta["n_layers"], meta["n_neurons"])
    if explainer is ExplainerKind.openai and not (base_url and openai_model):
        raise ExplainerError("--explainer openai needs --base-url (e.g. http://127.0.0.1:8000/v1) and --openai-model")
    config = ExplainConfig(candidates=candidates, seed=seed, n_top=n_top, n_random=n_random, pmi_lambda=pmi_lambda,
                           causal=causal)
    scorer = load_model_cli(explainer_model, dtype, device, quiet=as_json)
    subject = None
    if causal:
        subject_name = model or store.manifest()["model"].get("model")
        subject = scorer if subject_name == explainer_model else load_model_cli(subject_name, dtype, device, quiet=as_json)
    backend: Explainer = (LocalExplainer(scorer) if explainer is ExplainerKind.local else
                          OpenAIExplainer(base_url or "", openai_model or "", api_key_env, timeout=timeout))
    with progress_bar("explaining (neurons)", len(selection), enabled=not as_json) as update:
        run = explain_neurons(store, selection, explainer=backend, scorer=scorer, subject=subject, config=config,
                              progress=update)
    data = {"atlas": str(atlas), "seconds": round(run.seconds, 2), "results": [r.as_json() for r in run.results]}

    def render(d: dict[str, Any]) -> None:
        table = Table("neuron", "explanation", "score", "baseline", "PMI", "Δlogp top", "Δlogp random",
                      title=f"explanations written to {d['atlas']}/explanations.parquet")
        for r in d["results"]:
            table.add_row(str(NeuronId(r["layer"], r["neuron"])), r["explanation"], _num(r["score"]), _num(r["baseline_score"]),
                          _num(r["pmi"], 2), _num(r["causal_delta_exemplars"], 4), _num(r["causal_delta_random"], 4))
        console.print(table)

    emit(data, as_json, render)


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _excerpt_text(ex: dict[str, Any], max_act: float) -> Text:
    text = Text()
    for i, (tok, act) in enumerate(zip(ex["tokens"], ex["acts"])):
        shown = tok.replace("\n", "↵").replace("\t", "⇥")
        level = max(0.0, min(1.0, act / max_act)) if max_act > 0 else 0.0
        style = f"on rgb({int(255 - 155 * level)},{255},{int(255 - 155 * level)})" if level > 0.05 else ""
        if i == ex["center"]:
            style = "bold reverse"
        text.append(shown, style=style)
    return text


def _render_card(card: dict[str, Any]) -> None:
    title = f"{card['neuron']}  {card.get('site') or ''}  [dim]{card.get('model') or ''}[/dim]"
    exp = card.get("explanation")
    if exp:
        lines = Table.grid(padding=(0, 2))
        lines.add_row("[bold]explanation[/bold]", f"the main thing this neuron does is find [bold]{exp['explanation']}[/bold]")
        lines.add_row("score (sim. r)", f"{_num(exp['score'])}   baseline {_num(exp['baseline_score'])}   "
                      f"PMI {_num(exp['pmi'], 2)}   [dim]{exp['explainer']}[/dim]")
        lines.add_row("causal Δlogp", f"top exemplars {_num(exp['causal_delta_exemplars'], 4)}   "
                      f"random {_num(exp['causal_delta_random'], 4)}")
        others = [c for c in exp.get("candidates") or [] if c != exp["explanation"]]
        if others:
            lines.add_row("[dim]other candidates[/dim]", "[dim]" + " | ".join(others) + "[/dim]")
        console.print(Panel(lines, title=title, title_align="left"))
    else:
        console.print(Panel("[dim]not explained yet (neuronatlas explain)[/dim]", title=title, title_align="left"))
    if "decoded" in card:
        table = Table("side", "direction", "tokens", title="decoded through the unembedding")
        for side, dirs in card["decoded"].items():
            for direction, toks in dirs.items():
                table.add_row(side, direction, "  ".join(repr(t) for t in toks))
        console.print(table)
    if "stats" in card:
        table = Table("record", "label", "tokens", "mean", "max", "P(act>0)", title="per-label statistics")
        for r in card["stats"][:16]:
            table.add_row(r["record"], r["label"], str(r["n_tokens"]), _num(r["mean"], 4), _num(r["max"], 4),
                          _num(r["act_prob"]))
        console.print(table)
    if "exemplars" in card:
        ex = card["exemplars"]
        max_act = ex["max_activation"]
        console.print(f"[bold]top exemplars[/bold] (max activation {max_act:.4g})")
        for e in ex["top"]:
            console.print(Text(f"#{e['rank']:<2} {e['activation']:>8.4g}  {e['doc_id']}@{e['position']}  ", style="dim"),
                          _excerpt_text(e, max_act))
        if ex["random"]:
            console.print("[bold]random exemplars[/bold]")
            for e in ex["random"]:
                console.print(Text(f"#{e['rank']:<2} {e['activation']:>8.4g}  {e['doc_id']}@{e['position']}  ",
                                   style="dim"), _excerpt_text(e, max_act))


def show_cmd(
    neuron: Annotated[str, typer.Argument(help="one neuron, e.g. L12:345")],
    atlas: Annotated[Path, typer.Option(help="atlas directory")],
    top: Annotated[int, typer.Option(min=1, help="top exemplars shown")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Print a neuron's card: explanation, scores, causal effect, decoded tokens, statistics, exemplars."""
    from neuronatlas.explain.card import neuron_card

    try:
        nid = NeuronId.parse(neuron)
    except SelectionError:
        raise SelectionError(f"show takes one neuron, got {neuron!r}; write e.g. L12:345") from None
    card = neuron_card(atlas, nid.layer, nid.index, n_top=top)
    emit(card, as_json, _render_card)


def register(app: typer.Typer) -> None:
    app.command("exemplars")(exemplars_cmd)
    app.command("explain")(explain_cmd)
    app.command("show")(show_cmd)
