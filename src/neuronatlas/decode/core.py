"""Read every neuron's weight vectors through the unembedding (Davies 2025, arXiv 2501.02688).

A neuron's vectors are treated as residual-stream states and read through the LM head ``W_U``:

* ``out``: ``W_U @ down_proj[:, j]``, what neuron j writes, read raw;
* ``out_normed``: the same vector with the final norm folded in (multiplied by the norm's scale,
  Gemma's ``1 + weight`` included; LayerNorm families are also mean-centred, as LayerNorm centres
  the residual; the norm's bias is a constant shift shared by all neurons and is left out). This is
  what the model's logits actually see, and the default side of ``neuronatlas find``;
* ``in_up`` / ``in_gate``: ``W_U @ up_proj[j]`` and ``W_U @ gate_proj[j]`` (gated MLPs), what
  neuron j reads; ``in``: the input row of non-gated MLPs.

Rows of all requested sides and layers form one stream that is cut into chunks of ``chunk`` rows,
so memory is bounded by ``chunk x vocab`` scores whatever the number of neurons; each chunk is one
float32 matmul against ``W_U`` followed by ``topk`` for the highest and lowest scores.

    >>> from neuronatlas.decode import decode_neurons, write_decoded
    >>> table = decode_neurons(lm, k=20, chunk=512)        # pyarrow.Table, decoded.parquet columns
    >>> write_decoded("my-atlas", table, lm)               # atlas/decoded.parquet + manifest entry
    >>> arrays = decode_arrays(lm, k=1, sides=["out"])     # numpy arrays, for comparisons

Token ids are restricted to the tokenizer's vocabulary (padding rows of a larger LM head are
skipped); ``token`` is the token as the tokenizer spells it (``Ġdog``), see
:func:`neuronatlas.decode.find.normalize_token` for its text form.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from neuronatlas.decode.find import DEFAULT_SIDE
from neuronatlas.errors import SiteError, UnsupportedModelError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.specs import get_module
from neuronatlas.store.atlas import Atlas

__all__ = [
    "DEFAULT_SIDE",
    "METADATA_KEY",
    "SIDES",
    "SIDE_DOC",
    "DecodedArrays",
    "ProgressFn",
    "Side",
    "arrays_to_table",
    "available_sides",
    "check_sides",
    "decode_arrays",
    "decode_info",
    "decode_neurons",
    "fold_final_norm",
    "n_vocab",
    "norm_kind",
    "scan_scores",
    "side_matrix",
    "token_ranks",
    "unembedding_matrix",
    "vocabulary",
    "write_decoded",
]

Side = Literal["out", "out_normed", "in_up", "in_gate", "in"]
SIDES: tuple[str, ...] = ("out", "out_normed", "in_up", "in_gate", "in")
METADATA_KEY = b"neuronatlas.decode"
ProgressFn = Callable[..., None]
SIDE_DOC = {
    "out": "W_U @ down-proj column (raw)",
    "out_normed": "W_U @ (final-norm scale * down-proj column)",
    "in_up": "W_U @ up-proj row",
    "in_gate": "W_U @ gate-proj row",
    "in": "W_U @ input row (non-gated MLP)",
}


def available_sides(lm: LoadedModel) -> tuple[str, ...]:
    """The sides a model has: ``in_up``/``in_gate`` for gated MLPs, ``in`` otherwise."""
    return ("out", "out_normed", "in_up", "in_gate") if lm.spec.gated else ("out", "out_normed", "in")


def check_sides(lm: LoadedModel, sides: Sequence[str] | str | None) -> tuple[str, ...]:
    """Validate requested sides (a list or a comma-separated string); ``None`` means all."""
    have = available_sides(lm)
    if sides is None:
        return have
    wanted = [s.strip() for s in sides.split(",")] if isinstance(sides, str) else list(sides)
    wanted = [s for s in wanted if s]
    if not wanted or wanted == ["all"]:
        return have
    for side in wanted:
        if side not in have:
            kind = "gated" if lm.spec.gated else "non-gated"
            raise SiteError(f"decode side {side!r} is not available for {lm.spec.family} ({kind} MLP); "
                            f"choose from: {', '.join(have)}")
    return tuple(dict.fromkeys(wanted))


def side_matrix(lm: LoadedModel, side: str, layer: int) -> torch.Tensor:
    """The (n_neurons, d_model) vectors of one side and layer, unfolded (``out_normed`` = ``out``)."""
    if side in ("out", "out_normed"):
        return lm.spec.output_vectors(lm.model, layer)
    key = {"in_up": "up", "in_gate": "gate", "in": "in"}[side]
    vectors = lm.spec.input_vectors(lm.model, layer)
    if key not in vectors:
        raise SiteError(f"decode side {side!r} is not available for {lm.spec.family}; "
                        f"choose from: {', '.join(available_sides(lm))}")
    return vectors[key]


def _norm_module(lm: LoadedModel) -> Any:
    try:
        return get_module(lm.model, lm.spec.final_norm)
    except AttributeError:
        return None


def norm_kind(lm: LoadedModel) -> str:
    """``layernorm`` (centres and scales), ``rmsnorm`` (scales) or ``none``."""
    module = _norm_module(lm)
    if module is None:
        return "none"
    return "layernorm" if isinstance(module, torch.nn.LayerNorm) else "rmsnorm"


def fold_final_norm(lm: LoadedModel, vectors: torch.Tensor, scale: torch.Tensor | None = None, *,
                    center: bool | None = None) -> torch.Tensor:
    """``vectors`` (rows) as the final norm passes them on: centred for LayerNorm, times its scale."""
    out = vectors
    if center if center is not None else norm_kind(lm) == "layernorm":
        out = out - out.mean(dim=-1, keepdim=True)
    if scale is None:
        raw = lm.spec.final_norm_scale(lm.model)
        scale = None if raw is None else raw.detach().to(out.device, out.dtype)
    return out if scale is None else out * scale


def vocabulary(lm: LoadedModel) -> list[str]:
    """Token strings for ids ``0..n-1`` (the tokenizer's spelling; ``""`` where it has none)."""
    n = n_vocab(lm)
    return [t if isinstance(t, str) else "" for t in lm.tokenizer.convert_ids_to_tokens(list(range(n)))]


def _unembedding_weight(lm: LoadedModel) -> torch.Tensor:
    """The spec's unembedding, else HF's ``get_output_embeddings()`` (module names move between versions)."""
    try:
        return lm.spec.unembedding(lm.model)
    except AttributeError:
        head = lm.model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise UnsupportedModelError(f"cannot find the unembedding of this {lm.spec.family} model "
                                        f"(spec path {lm.spec.unembed!r})") from None
        return head.weight


def n_vocab(lm: LoadedModel) -> int:
    rows = int(_unembedding_weight(lm).shape[0])
    return min(rows, len(lm.tokenizer)) if lm.tokenizer is not None else rows


def unembedding_matrix(lm: LoadedModel, device: torch.device | str | None = None) -> torch.Tensor:
    """``W_U`` as float32 (vocab, d_model), restricted to the tokenizer's vocabulary."""
    w = _unembedding_weight(lm).detach()[: n_vocab(lm)]
    return w.to(device or w.device, torch.float32)


@dataclass
class _Stream:
    """Rows of (side, layer, neuron) in side-major, then layer, then neuron order, gathered lazily."""

    lm: LoadedModel
    sides: tuple[str, ...]
    layers: tuple[int, ...]
    device: torch.device
    scale: torch.Tensor | None
    center: bool

    @property
    def n(self) -> int:
        return self.lm.n_neurons

    @property
    def total(self) -> int:
        return len(self.sides) * len(self.layers) * self.n

    def segment(self, index: int) -> tuple[str, int]:
        return self.sides[index // len(self.layers)], self.layers[index % len(self.layers)]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        parts = []
        pos = start
        while pos < stop:
            seg, offset = divmod(pos, self.n)
            end = min(stop, (seg + 1) * self.n)
            side, layer = self.segment(seg)
            block = side_matrix(self.lm, side, layer).detach()[offset: offset + end - pos]
            block = block.to(self.device, torch.float32)
            if side == "out_normed":
                block = fold_final_norm(self.lm, block, self.scale, center=self.center)
            parts.append(block)
            pos = end
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


def _resolve_layers(lm: LoadedModel, layers: Sequence[int] | None) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(lm.n_layers))
    chosen = tuple(dict.fromkeys(int(x) for x in layers))
    bad = [x for x in chosen if not 0 <= x < lm.n_layers]
    if bad or not chosen:
        raise SiteError(f"layer {bad[0] if bad else '(none)'} is out of range; the model has layers 0-{lm.n_layers - 1}")
    return chosen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scan_scores(lm: LoadedModel, consume: Callable[[int, int, torch.Tensor], None], *,
                sides: Sequence[str] | str | None = None, layers: Sequence[int] | None = None, chunk: int = 512,
                device: str | torch.device | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Call ``consume(start, stop, scores)`` for every chunk of rows; ``scores`` is (rows, vocab) float32.

    Rows are numbered side-major, then layer, then neuron (see :class:`DecodedArrays`). Returns the
    plan and timings (``matmul_s``: the matmuls alone, ``total_s``: everything).
    """
    if chunk < 1:
        raise SiteError(f"chunk must be at least 1, got {chunk}")
    side_list = check_sides(lm, sides)
    layer_list = _resolve_layers(lm, layers)
    dev = torch.device(device) if device is not None else lm.device
    t_start = time.perf_counter()
    w_u = unembedding_matrix(lm, dev)
    raw_scale = lm.spec.final_norm_scale(lm.model)
    scale = None if raw_scale is None else raw_scale.detach().to(dev, torch.float32)
    stream = _Stream(lm, side_list, layer_list, dev, scale, norm_kind(lm) == "layernorm")
    d_model = side_matrix(lm, side_list[0], layer_list[0]).shape[1]
    if w_u.shape[1] != d_model:
        raise UnsupportedModelError(
            f"{lm.spec.family}: the unembedding has width {w_u.shape[1]} but neurons write {d_model}-dim vectors "
            "(a projection sits between them); decoding this model is not supported")
    matmul_s = 0.0
    total = stream.total
    if progress:
        progress(0, total)
    with torch.inference_mode():
        for start in range(0, total, chunk):
            stop = min(total, start + chunk)
            rows = stream.rows(start, stop)
            _sync(dev)
            t0 = time.perf_counter()
            scores = rows @ w_u.T
            _sync(dev)
            matmul_s += time.perf_counter() - t0
            consume(start, stop, scores)
            del scores
            if progress:
                progress(stop, total)
    _sync(dev)
    return {"sides": list(side_list), "layers": list(layer_list), "n_neurons": lm.n_neurons, "rows": total,
            "vocab": int(w_u.shape[0]), "d_model": int(d_model), "chunk": chunk, "device": str(dev),
            "norm": norm_kind(lm), "norm_offset": lm.spec.norm_offset, "matmul_s": matmul_s,
            "total_s": time.perf_counter() - t_start,
            "flops": 2.0 * total * int(d_model) * int(w_u.shape[0])}


@dataclass
class DecodedArrays:
    """Top/bottom-k token ids and scores, shape (rows, k); row r is (side, layer, neuron) in stream order."""

    sides: list[str]
    layers: list[int]
    n_neurons: int
    k: int
    top_ids: np.ndarray
    top_scores: np.ndarray
    bottom_ids: np.ndarray
    bottom_scores: np.ndarray
    info: dict[str, Any]

    def index(self, side: str, layer: int, neuron: int) -> int:
        return (self.sides.index(side) * len(self.layers) + self.layers.index(layer)) * self.n_neurons + neuron

    def row_keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-row (side index, layer, neuron) arrays."""
        n_rows = self.top_ids.shape[0]
        seg = np.arange(n_rows) // self.n_neurons
        side_idx = (seg // len(self.layers)).astype(np.int32)
        layer = np.asarray(self.layers, dtype=np.int32)[seg % len(self.layers)]
        neuron = (np.arange(n_rows) % self.n_neurons).astype(np.int32)
        return side_idx, layer, neuron

    def top1(self, side: str) -> np.ndarray:
        """(layers, neurons) top-1 token id of ``side``."""
        s = self.sides.index(side)
        block = self.top_ids[s * len(self.layers) * self.n_neurons:(s + 1) * len(self.layers) * self.n_neurons, 0]
        return block.reshape(len(self.layers), self.n_neurons)


def decode_arrays(lm: LoadedModel, k: int = 20, *, sides: Sequence[str] | str | None = None,
                  layers: Sequence[int] | None = None, chunk: int = 512, device: str | torch.device | None = None,
                  progress: ProgressFn | None = None) -> DecodedArrays:
    """Top and bottom ``k`` tokens of every (side, layer, neuron), as numpy arrays."""
    vocab = n_vocab(lm)
    if not 1 <= k <= vocab:
        raise SiteError(f"top-k must be between 1 and the vocabulary size {vocab}, got {k}")
    side_list = check_sides(lm, sides)
    n_rows = len(side_list) * len(_resolve_layers(lm, layers)) * lm.n_neurons
    out: dict[str, torch.Tensor] = {}          # results stay on the scan's device, copied to the host once
    topk_s = [0.0]

    def consume(start: int, stop: int, scores: torch.Tensor) -> None:
        t0 = time.perf_counter()
        if not out:
            for name, dtype in (("top_ids", torch.int32), ("top_scores", torch.float32),
                                ("bottom_ids", torch.int32), ("bottom_scores", torch.float32)):
                out[name] = torch.empty((n_rows, k), dtype=dtype, device=scores.device)
        top = scores.topk(k, dim=1)
        bottom = scores.topk(k, dim=1, largest=False)
        out["top_ids"][start:stop] = top.indices
        out["top_scores"][start:stop] = top.values
        out["bottom_ids"][start:stop] = bottom.indices
        out["bottom_scores"][start:stop] = bottom.values
        topk_s[0] += time.perf_counter() - t0

    info = scan_scores(lm, consume, sides=side_list, layers=layers, chunk=chunk, device=device, progress=progress)
    info.update(k=k, topk_s=topk_s[0])
    host = {name: t.cpu().numpy() for name, t in out.items()}
    return DecodedArrays(list(side_list), info["layers"], lm.n_neurons, k, host["top_ids"], host["top_scores"],
                         host["bottom_ids"], host["bottom_scores"], info)


def token_ranks(lm: LoadedModel, token_ids: Sequence[int], *, side: str = DEFAULT_SIDE,
                layers: Sequence[int] | None = None, chunk: int = 512, device: str | torch.device | None = None,
                progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """For every neuron of ``side``: the best rank any of ``token_ids`` reaches in its decoding.

    Returns ``(rank, score, token_id)``, each of shape (layers, neurons): ``rank`` = how many
    vocabulary tokens score strictly higher than the best of ``token_ids`` (0 = it is the top token),
    ``score`` its score, ``token_id`` which of ``token_ids`` it is; plus the scan info.
    """
    ids = sorted({int(t) for t in token_ids})
    vocab = n_vocab(lm)
    if not ids or ids[0] < 0 or ids[-1] >= vocab:
        raise SiteError(f"token ids must be non-empty and in 0-{vocab - 1}, got {ids[:5]}")
    layer_list = _resolve_layers(lm, layers)
    n_rows = len(layer_list) * lm.n_neurons
    out: dict[str, torch.Tensor] = {}          # results stay on the scan's device, copied to the host once

    def consume(start: int, stop: int, scores: torch.Tensor) -> None:
        if not out:
            out["ids"] = torch.tensor(ids, device=scores.device)
            out["rank"] = torch.empty(n_rows, dtype=torch.int64, device=scores.device)
            out["score"] = torch.empty(n_rows, dtype=torch.float32, device=scores.device)
            out["which"] = torch.empty(n_rows, dtype=torch.int64, device=scores.device)
        best = scores[:, out["ids"]].max(dim=1)
        out["rank"][start:stop] = (scores > best.values[:, None]).sum(dim=1)
        out["score"][start:stop] = best.values
        out["which"][start:stop] = out["ids"][best.indices]

    info = scan_scores(lm, consume, sides=[side], layers=layer_list, chunk=chunk, device=device, progress=progress)
    shape = (len(layer_list), lm.n_neurons)
    rank, score, which = (out[name].cpu().numpy().reshape(shape) for name in ("rank", "score", "which"))
    return rank, score, which, info


def arrays_to_table(arrays: DecodedArrays, vocab: Sequence[str]) -> pa.Table:
    """The decoded.parquet table: one row per (layer, neuron, side, direction, rank)."""
    k = arrays.k
    n_rows = arrays.top_ids.shape[0]
    side_idx, layer, neuron = arrays.row_keys()
    per = 2 * k
    ids = np.concatenate([arrays.top_ids, arrays.bottom_ids], axis=1).reshape(-1)
    scores = np.concatenate([arrays.top_scores, arrays.bottom_scores], axis=1).reshape(-1)
    direction = np.tile(np.repeat(np.array([0, 1], dtype=np.int8), k), n_rows)
    rank = np.tile(np.concatenate([np.arange(k), np.arange(k)]).astype(np.int32), n_rows)
    dictionary = pa.array(list(vocab), type=pa.string())
    table = pa.table({
        "layer": np.repeat(layer, per),
        "neuron": np.repeat(neuron, per),
        "side": pa.DictionaryArray.from_arrays(pa.array(np.repeat(side_idx, per)), pa.array(arrays.sides)),
        "direction": pa.DictionaryArray.from_arrays(pa.array(direction), pa.array(["top", "bottom"])),
        "rank": rank,
        "token_id": ids,
        "token": pa.DictionaryArray.from_arrays(pa.array(ids), dictionary),
        "score": scores,
    })
    meta = {k2: v for k2, v in arrays.info.items()}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, default=str).encode()})


def decode_neurons(lm: LoadedModel, k: int = 20, sides: Sequence[str] | str | None = None, chunk: int = 512,
                   progress: ProgressFn | None = None, *, layers: Sequence[int] | None = None,
                   device: str | torch.device | None = None) -> pa.Table:
    """Decode every neuron (of ``layers``, default all) on ``sides`` (default all the model has).

    Returns the ``decoded.parquet`` table (columns ``layer, neuron, side, direction, rank,
    token_id, token, score``); plan and timings are in the schema metadata under
    :data:`METADATA_KEY` (read them with :func:`decode_info`). ``progress(done, total)`` is called
    after each chunk with row counts.
    """
    arrays = decode_arrays(lm, k, sides=sides, layers=layers, chunk=chunk, device=device, progress=progress)
    return arrays_to_table(arrays, vocabulary(lm))


def decode_info(table: pa.Table) -> dict[str, Any]:
    """The plan and timings :func:`decode_neurons` stored in the table's metadata (``{}`` if none)."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def write_decoded(atlas: Atlas | str | Path, table: pa.Table, lm: LoadedModel) -> Path:
    """Write ``table`` as ``ATLAS/decoded.parquet`` (atomically) and register it in the manifest.

    The atlas is created if missing; an atlas of another model is refused. An existing decoded
    table is replaced.
    """
    store = atlas if isinstance(atlas, Atlas) else Atlas.create(atlas, model=lm.provenance)
    info = decode_info(table)
    sides = ", ".join(info.get("sides", []))
    describe = (f"weight-based decoding through the unembedding: top/bottom {info.get('k', '?')} tokens of "
                f"{len(info.get('layers', []))} layers x {info.get('n_neurons', '?')} neurons on sides {sides} "
                f"(find's default side: {DEFAULT_SIDE}; final norm: {info.get('norm', '?')})")
    return store.write_table("decoded.parquet", table, describe=describe)

