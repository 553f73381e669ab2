"""``neuronatlas decode``, ``find``, ``compare-decode`` and ``study clamp``.

    neuronatlas decode --model default --out atlas/                 # every neuron, every side
    neuronatlas find --atlas atlas/ --text dog --limit 10 --save dog.jsonl
    neuronatlas generate -p "Today I saw a" --clamp @dog.jsonl=8
    neuronatlas compare-decode --model base/ --model-b instruct/
    neuronatlas study clamp --model default --concept dog --out runs/dog --atlas atlas/
"""

from __future__ import annotations

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
    progress_bar,
)

__all__ = ["register"]

SidesOpt = Annotated[str, typer.Option(help="comma-separated sides: out, out_normed, in_up, in_gate (gated MLPs), "
                                            "in (non-gated); default all the model has")]
ChunkOpt = Annotated[int, typer.Option(min=1, help="rows (neuron vectors) per matmul; memory ~ chunk x vocab x 4 bytes")]


def _layers(text: str | None) -> list[int] | None:
    from neuronatlas.errors import SiteError

    if not text:
        return None
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise SiteError(f"cannot parse layers {part!r} in {text!r}; write e.g. 0-5,12") from None
    return out


def decode_cmd(
    out: Annotated[Path, typer.Option(parser=out_dir, help="atlas directory (created if missing)")],
    model: ModelOpt = "default",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="top and bottom tokens kept per neuron and side")] = 20,
    chunk: ChunkOpt = 512,
    sides: SidesOpt = "",
    layers: Annotated[str, typer.Option(help="layers to decode, e.g. 0-5,12 (default all)")] = "",
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Read every neuron through the unembedding: top/bottom tokens per side into ATLAS/decoded.parquet."""
    from neuronatlas.decode.core import (
        arrays_to_table,
        decode_arrays,
        vocabulary,
        write_decoded,
    )

    lm = load_model_cli(model, dtype, device, quiet=as_json)
    with progress_bar("decoding neuron vectors", enabled=not as_json) as update:
        arrays = decode_arrays(lm, top_k, sides=sides or None, layers=_layers(layers), chunk=chunk,
                               device=None if device == "auto" else device, progress=update)
    table = arrays_to_table(arrays, vocabulary(lm))
    path = write_decoded(out, table, lm)
    info = arrays.info
    summary = {"atlas": str(out), "file": str(path), "rows": table.num_rows, "neurons": info["rows"],
               "sides": info["sides"], "layers": len(info["layers"]), "top_k": top_k, "chunk": chunk,
               "vocab": info["vocab"], "seconds": round(info["total_s"], 2), "matmul_seconds": round(info["matmul_s"], 2),
               "gflops": round(info["flops"] / max(info["total_s"], 1e-9) / 1e9, 1)}

    def render(d: dict[str, Any]) -> None:
        console.print(f"decoded {d['neurons']:,} neuron vectors ({d['layers']} layers, sides {', '.join(d['sides'])}) "
                      f"in {d['seconds']} s ({d['gflops']} GFLOP/s) -> {d['file']} ({d['rows']:,} rows)")

    emit(summary, as_json, render)


def find_cmd(
    atlas: Annotated[Path, typer.Option(help="atlas with decoded.parquet (from `neuronatlas decode`)")],
    token: Annotated[str | None, typer.Option(help="one exact token, e.g. ' dog' (leading space = word start)")] = None,
    text: Annotated[str | None, typer.Option(help="a word: matches all its token variants (space, case, plural)")] = None,
    side: Annotated[str, typer.Option(help="out_normed (default), out, in_up, in_gate, in, or all")] = "out_normed",
    direction: Annotated[str, typer.Option(help="top (promoted tokens) or bottom (suppressed)")] = "top",
    limit: Annotated[int, typer.Option(min=1, help="neurons listed")] = 20,
    record: Annotated[str | None, typer.Option(help="record for activation evidence (default: the first)")] = None,
    save: Annotated[Path | None, typer.Option(parser=out_file, help="write the hits as a JSONL selection file for @FILE")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Neurons whose decoded tokens contain a token or word, with recorded activation evidence."""
    from neuronatlas.decode.find import find_neurons, save_selection

    hits = find_neurons(atlas, token=token, text=text, side=side, direction=direction, limit=limit, record=record)
    if save is not None:
        save_selection(hits, save)

    def render(rows: list[dict[str, Any]]) -> None:
        if not rows:
            console.print(f"[yellow]no neuron has {token or text!r} among its {direction} decoded tokens on side {side}"
                          "[/yellow]")
            return
        have_acts = any(r["act_max"] is not None for r in rows)
        table = Table("neuron", "side", "rank", "score", "token", "top tokens",
                      *(["act mean", "act max", "act prob"] if have_acts else []),
                      title=f"neurons decoding to {token or text!r} ({direction})")
        for r in rows:
            acts = [f"{r[k]:.3g}" if r[k] is not None else "–" for k in ("act_mean", "act_max", "act_prob")]
            table.add_row(r["id"], r["side"], str(r["rank"]), f"{r['score']:.3g}", repr(r["token"]),
                          " ".join(repr(t) for t in r["top_tokens"]), *(acts if have_acts else []))
        console.print(table)
        if save is not None:
            console.print(f"saved {len(rows)} neurons to {save} (use @{save} as a selector)")

    emit(hits, as_json, render)


def compare_decode_cmd(
    model: ModelOpt = "default",
    model_b: Annotated[str, typer.Option("--model-b", help="the second checkpoint (same architecture)")] = "default",
    dtype: DtypeOpt = "float32",
    dtype_b: Annotated[str, typer.Option("--dtype-b", help="dtype of --model-b")] = "float32",
    sides: SidesOpt = "",
    chunk: ChunkOpt = 512,
    out: Annotated[Path | None, typer.Option(parser=out_file, help="also write the result as JSON here")] = None,
    device: DeviceOpt = "cpu", as_json: JsonOpt = False,
) -> None:
    """Fraction of neurons whose top decoded token agrees between two checkpoints, per side and layer."""
    from neuronatlas.decode.compare import compare_decoding
    from neuronatlas.store import write_json_atomic

    lm_a = load_model_cli(model, dtype, device, quiet=as_json)
    lm_b = load_model_cli(model_b, dtype_b, device, quiet=as_json)
    with progress_bar("decoding both models", enabled=not as_json) as update:
        result = compare_decoding(lm_a, lm_b, sides=sides or None, chunk=chunk,
                                  device=None if device == "auto" else device, progress=update)
    if out is not None:
        write_json_atomic(out, result)

    def render(d: dict[str, Any]) -> None:
        table = Table("side", "top-1 agreement", "agreeing / neurons", "lowest layer", "highest layer",
                      title=f"{model} ({dtype}) vs {model_b} ({dtype_b})")
        for side, r in d["sides"].items():
            per = r["per_layer"]
            lo, hi = min(range(len(per)), key=per.__getitem__), max(range(len(per)), key=per.__getitem__)
            table.add_row(side, f"{r['overall']:.3f}", f"{r['agreeing']:,} / {r['neurons']:,}",
                          f"L{lo}: {per[lo]:.3f}", f"L{hi}: {per[hi]:.3f}")
        console.print(table)

    emit(result, as_json, render)


def register(app: typer.Typer) -> None:
    app.command("decode")(decode_cmd)
    app.command("find")(find_cmd)
    app.command("compare-decode")(compare_decode_cmd)


