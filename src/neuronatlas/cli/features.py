"""``neuronatlas features`` (SNMF features of every layer) and ``neuronatlas select-data``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from neuronatlas.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    console,
    emit,
    load_model_cli,
    out_dir,
    out_file,
    phase_progress,
)
from neuronatlas.cli.explain import _corpus

__all__ = ["register"]


def _corpus_arg(corpus: list[str] | None, max_docs: int | None, seed: int, text_field: str) -> tuple[Any, str, dict]:
    paths = [Path(c) for c in corpus or [] if c != "default"]
    if corpus and "default" in corpus and paths:
        from neuronatlas.errors import DatasetError

        raise DatasetError("--corpus default cannot be mixed with files; give either 'default' or file paths")
    return _corpus(paths or None, max_docs, seed, text_field)


def features_cmd(
    out: Annotated[Path, typer.Option(parser=out_dir, help="atlas directory (created if missing)")],
    model: ModelOpt = "default",
    corpus: Annotated[list[str] | None, typer.Option(help="'default' (the built-in offline corpus) or .txt/.jsonl/"
                                                        ".parquet files (repeatable)")] = None,
    k: Annotated[int, typer.Option(min=1, help="features per layer")] = 64,
    l1: Annotated[float, typer.Option(min=0.0, help="L1 weight on the codes, relative to the mean token norm")] = 0.02,
    max_docs: Annotated[int | None, typer.Option(min=1, help="read at most N documents (default corpus: 400)")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="top exemplars kept per feature")] = 20,
    site: Annotated[str, typer.Option(help="mlp (down-projection input) or gate")] = "mlp",
    batch_size: Annotated[int, typer.Option(min=1, help="documents per forward pass")] = 8,
    max_length: Annotated[int, typer.Option(min=1, help="tokens per document, longer ones are cut")] = 128,
    seed: Annotated[int, typer.Option(help="seed of the initial features and of the default corpus")] = 0,
    text_field: str = "text",
    force: Annotated[bool, typer.Option(help="rebuild a damaged atlas manifest")] = False,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """SNMF features of every layer's MLP activations: two streaming passes (fit, then encode), with
    reconstruction error and sparsity per layer, exemplars and decoded tokens per feature."""
    from neuronatlas.features import FeatureConfig, fit_features, write_features

    config = FeatureConfig(k=k, l1=l1, component=site, top_k=top_k, batch_size=batch_size,  # type: ignore[arg-type]
                           max_length=max_length, seed=seed)
    docs, name, meta = _corpus_arg(corpus, max_docs or (400 if not corpus or corpus == ["default"] else None),
                                   seed, text_field)
    lm = load_model_cli(model, dtype, device, quiet=as_json)
    t0 = time.perf_counter()
    total = len(docs) if isinstance(docs, list) else 0
    with phase_progress(enabled=not as_json) as tick:
        done: dict[str, int] = {}

        def progress(phase: str, n: int) -> None:
            done[phase] = done.get(phase, 0) + n
            tick(f"{phase} (docs)", done[phase], total or done[phase])

        run = fit_features(lm, docs, config, max_docs=max_docs, progress=progress)
    info = write_features(out, lm, run, docs, config=config, corpus_name=name, max_docs=max_docs, force=force)
    info |= {"atlas": str(out), "seconds_total": round(time.perf_counter() - t0, 3), "corpus_meta": meta}

    def render(d: dict[str, Any]) -> None:
        table = Table(title=f"SNMF features: {d['k']} per layer, {d['tokens']} tokens from {d['docs']} documents")
        for col in ("layer", "FVU", "rel. error", "L0 (active/token)", "dead"):
            table.add_column(col, justify="right")
        for layer, s in enumerate(d["layers"]):
            table.add_row(str(layer), f"{s['fvu']:.3f}", f"{s['relative_error']:.3f}", f"{s['l0']:.1f}", str(s["dead"]))
        console.print(table)
        console.print(f"mean FVU {d['mean_fvu']:.3f}, mean L0 {d['mean_l0']:.1f}; fit {d['seconds']['fit']} s, "
                      f"encode {d['seconds']['encode']} s, total {d['seconds_total']} s; written to {d['atlas']}")

    emit({k_: v for k_, v in info.items() if k_ != "corpus_meta"}, as_json, render)


def explain_features_cmd(
    atlas: Annotated[Path, typer.Option(help="atlas with SNMF features (neuronatlas features)")],
    features: Annotated[str, typer.Option(help="selector as for neurons, indices being features: L12:3, L3:0-4, L7:*")],
    explainer_model: Annotated[str, typer.Option(help="local explainer and simulator/PMI model")] = "default",
    candidates: Annotated[int, typer.Option(min=1, help="candidate explanations per feature")] = 3,
    seed: int = 0,
    n_top: Annotated[int, typer.Option(min=1, help="top exemplars shown and scored")] = 5,
    n_random: Annotated[int, typer.Option(min=0, help="random exemplars scored")] = 5,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Explain SNMF features with the explain pipeline (explain, PMI rerank, simulate and score, baseline)."""
    from neuronatlas.cli.common import progress_bar
    from neuronatlas.explain.backends import LocalExplainer
    from neuronatlas.explain.pipeline import ExplainConfig
    from neuronatlas.features import features_info
    from neuronatlas.features.explain import explain_features
    from neuronatlas.intervene.neurons import NeuronSet

    info = features_info(atlas)
    pairs = NeuronSet.parse(features, info["site"], n_neurons=info["k"]).validate(info["n_layers"], info["k"]).pairs
    scorer = load_model_cli(explainer_model, dtype, device, quiet=as_json)
    config = ExplainConfig(candidates=candidates, seed=seed, n_top=n_top, n_random=n_random, causal=False)
    with progress_bar("explaining (features)", len(pairs), enabled=not as_json) as update:
        rows = explain_features(atlas, [(int(a), int(b)) for a, b in pairs], explainer=LocalExplainer(scorer),
                                scorer=scorer, config=config, progress=update)

    def render(d: list[dict[str, Any]]) -> None:
        table = Table(title="SNMF feature explanations")
        for col in ("feature", "explanation", "score", "baseline"):
            table.add_column(col)
        for r in d:
            table.add_row(f"L{r['layer']}:{r['feature']}", r["explanation"], f"{r['score']:.3f}" if r["score"] is not None
                          else "-", f"{r['baseline_score']:.3f}" if r["baseline_score"] is not None else "-")
        console.print(table)

    emit(rows, as_json, render)


def _read_texts(path: Path, text_field: str, what: str) -> list[dict]:
    from neuronatlas.data.corpus import read_corpus
    from neuronatlas.errors import DatasetError

    if not path.is_file():
        raise DatasetError(f"{what} file {str(path)!r} not found; check the {what} path")
    try:
        docs = list(read_corpus([path], text_field=text_field))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{what} {str(path)!r}: {str(exc).splitlines()[0]}") from None
    if not docs:
        raise DatasetError(f"{what} {str(path)!r} has no texts; give a .jsonl/.txt/.parquet with a {text_field!r} field")
    return docs


def select_data_cmd(
    exemplars: Annotated[Path, typer.Option(help="a handful of task exemplars (.jsonl/.txt/.parquet)")],
    pool: Annotated[Path, typer.Option(help="the candidate pool (.jsonl/.txt/.parquet)")],
    k: Annotated[int, typer.Option(min=1, help="documents to select")],
    out: Annotated[Path, typer.Option(parser=out_file, help="the selected documents, best first (.jsonl)")],
    model: ModelOpt = "default",
    method: Annotated[str, typer.Option(help="jaccard (MoNA), embedding (mean hidden-state cosine) or random")] = "jaccard",
    representation: Annotated[str, typer.Option(help="neurons or features (SNMF codes; needs --atlas)")] = "neurons",
    atlas: Annotated[Path | None, typer.Option(help="atlas with SNMF features (neuronatlas features)")] = None,
    layers: Annotated[str | None, typer.Option(help="comma-separated layers (default: the middle layer)")] = None,
    top: Annotated[int, typer.Option(min=1, help="largest pattern entries kept per document")] = 64,
    aggregate: Annotated[str, typer.Option(help="mean (prototype) or max (nearest exemplar) over exemplars")] = "mean",
    max_length: Annotated[int, typer.Option(min=1, help="tokens per document, longer ones are cut")] = 128,
    seed: Annotated[int, typer.Option(help="seed of --method random")] = 0,
    text_field: str = "text",
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Select the pool documents most similar to task exemplars by their sparse activation patterns
    (generalised Jaccard, MoNA), or by embedding similarity, or at random."""
    import json

    from neuronatlas.errors import DatasetError
    from neuronatlas.features.select import SelectConfig, select_documents
    from neuronatlas.store.atlas import atomic_path

    try:
        chosen = tuple(int(x) for x in layers.split(",")) if layers else None
    except ValueError:
        raise DatasetError(f"--layers {layers!r} is not a comma-separated list of integers, e.g. 10,15") from None
    config = SelectConfig(method=method, representation=representation, layers=chosen, top=top,  # type: ignore[arg-type]
                          aggregate=aggregate, atlas=atlas, max_length=max_length, seed=seed)  # type: ignore[arg-type]
    ex_docs, pool_docs = _read_texts(exemplars, text_field, "--exemplars"), _read_texts(pool, text_field, "--pool")
    lm = load_model_cli(model, dtype, device, quiet=as_json)
    t0 = time.perf_counter()
    picked = select_documents(lm, [d["text"] for d in ex_docs], [d["text"] for d in pool_docs], k, config)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rank, (i, score) in enumerate(picked):
            row = {**pool_docs[i], "pool_index": i, "rank": rank, "score": None if score != score else score}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    info = {"out": str(out), "selected": len(picked), "pool": len(pool_docs), "exemplars": len(ex_docs),
            "method": method, "representation": representation, "seconds": round(time.perf_counter() - t0, 3),
            "top": [{"pool_index": i, "score": s, "doc_id": pool_docs[i].get("doc_id")} for i, s in picked[:5]]}

    def render(d: dict[str, Any]) -> None:
        console.print(f"selected {d['selected']} of {d['pool']} documents ({d['method']}, {d['representation']}) "
                      f"into {d['out']} in {d['seconds']} s")

    emit(info, as_json, render)


def register(app: typer.Typer) -> None:
    app.command("features")(features_cmd)
    app.command("explain-features")(explain_features_cmd)
    app.command("select-data")(select_data_cmd)
