"""Exemplars for every neuron of a model: one streaming forward pass over a corpus.

For each neuron the pass keeps the ``top_k`` (document, token) pairs with the largest activation and
a seeded uniformly random sample of ``n_random`` (document, token) pairs, each with the neuron's
activations on a window of ``context`` tokens before and ``after`` tokens after it (the stream is
:mod:`neuronatlas.record.corpus`). Memory is bounded by ``layers x neurons x (top_k + n_random) x window``
floats plus one batch, whatever the corpus length: documents are read in chunks of ``chunk_docs``, sorted by
length inside a chunk (less padding), and dropped after their batch.

After the pass a second, text-only pass re-reads the corpus (no forward) and re-tokenises just the
documents some exemplar points to; they go to ``corpus_docs.parquet``, the exemplars with their
windows to ``corpus_exemplars.parquet``. Special tokens (BOS...) are never exemplars. Every
``checkpoint_every`` chunks the exact state (including the random generator) is written to
``ATLAS/.exemplars-checkpoint/``; a rerun with the same model, corpus and settings resumes there and
ends bit-identical to an uninterrupted run. A finished pass with the same fingerprint is reused.

    >>> from neuronatlas.data.corpus import default_corpus
    >>> from neuronatlas.explain.exemplars import ExemplarConfig, collect_exemplars
    >>> docs = default_corpus(n_docs=50, seed=0)
    >>> info = collect_exemplars(lm, docs, "my-atlas", config=ExemplarConfig(top_k=20, context=32),
    ...                          corpus_name="default_corpus(50, seed=0)")
    >>> info["tokens"], info["stream_seconds"]
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from neuronatlas.errors import DatasetError
from neuronatlas.record.corpus import ExemplarStream
from neuronatlas.record.exemplar_stats import WindowTopK
from neuronatlas.explain.tables import DOCS_TABLE, EXEMPLARS_TABLE, META_KEY, table_meta
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record.batching import encode_ids
from neuronatlas.store.atlas import Atlas

__all__ = [
    "CHECKPOINT_DIR",
    "Corpus",
    "DocBatch",
    "ExemplarConfig",
    "collect_exemplars",
    "decoded_vocab",
    "doc_batches",
    "stream_exemplars",
    "write_exemplar_docs",
]

CHECKPOINT_DIR = ".exemplars-checkpoint"
Corpus = Sequence[dict] | Callable[[], Iterable[dict]]


@dataclass(frozen=True)
class ExemplarConfig:
    """``context``: tokens kept before each exemplar token; ``after``: tokens after it (default
    ``context // 4``: a neuron only sees the left context, a few following tokens show what comes next)."""

    component: Component = Component.MLP
    top_k: int = 20
    n_random: int = 5
    context: int = 32
    after: int | None = None
    batch_size: int = 8
    max_length: int = 256
    chunk_docs: int = 256
    checkpoint_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "component", Component.parse(self.component))
        for name in ("top_k", "batch_size", "max_length", "chunk_docs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DatasetError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_random < 0 or self.context < 0 or (self.after is not None and self.after < 0):
            raise DatasetError("n_random, context and after must not be negative")

    @property
    def after_tokens(self) -> int:
        return self.context // 4 if self.after is None else self.after

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "component": self.component.value, "after": self.after_tokens}


@dataclass
class DocBatch:
    indices: list[int]              # document indices in corpus order
    ids: list[list[int]]            # token ids, each non-empty
    docs_done: int                  # documents consumed once this batch is processed (chunk-aligned at chunk ends)
    chunk_end: bool


def _iter_docs(corpus: Iterable[dict] | Callable[[], Iterable[dict]], max_docs: int | None) -> Iterator[dict]:
    docs = corpus() if callable(corpus) else corpus
    return islice(iter(docs), max_docs) if max_docs is not None else iter(docs)


def doc_batches(lm: LoadedModel, docs: Iterator[dict], config: ExemplarConfig, start: int = 0) -> Iterator[DocBatch]:
    """Chunks of ``chunk_docs`` documents, tokenised, length-sorted and cut into batches.

    ``start`` (a multiple of ``chunk_docs``) skips documents already processed by a resumed run.
    """
    for _ in islice(docs, start):
        pass
    index = start
    while True:
        chunk = list(islice(docs, config.chunk_docs))
        if not chunk:
            return
        texts = []
        for i, doc in enumerate(chunk):
            text = doc.get("text") if isinstance(doc, dict) else None
            if not isinstance(text, str):
                raise DatasetError(f"corpus document {index + i} has no string 'text' field; give dicts with "
                                   "'doc_id', 'text' and 'source'")
            texts.append(text)
        ids = encode_ids(lm, texts, max_length=config.max_length)
        order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: (len(ids[i]), i))
        groups = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        for g, group in enumerate(groups):
            last = g == len(groups) - 1
            yield DocBatch([index + i for i in group], [ids[i] for i in group],
                           index + (len(chunk) if last else 0), last)
        if not groups:
            yield DocBatch([], [], index + len(chunk), True)
        index += len(chunk)


def stream_exemplars(lm: LoadedModel, corpus: Corpus, config: ExemplarConfig = ExemplarConfig(), *,
                     max_docs: int | None = None, stream: ExemplarStream | None = None, start: int = 0,
                     progress: Callable[[int], None] | None = None,
                     on_chunk: Callable[[ExemplarStream, int], None] | None = None) -> tuple[ExemplarStream, int]:
    """The streaming pass alone (no atlas): returns the filled stream and the documents consumed."""
    if stream is None:
        stream = ExemplarStream(lm, top_k=config.top_k, n_random=config.n_random, before=config.context,
                                after=config.after_tokens, seed=config.seed, component=config.component)
    done = start
    for batch in doc_batches(lm, _iter_docs(corpus, max_docs), config, start):
        if batch.ids:
            stream.update(batch.ids, batch.indices)
        if progress:
            progress(len(batch.indices))
        if batch.chunk_end:
            done = batch.docs_done
            if on_chunk:
                on_chunk(stream, done)
    return stream, done


def _fingerprint(lm: LoadedModel, corpus_name: str, max_docs: int | None, config: ExemplarConfig) -> str:
    payload = json.dumps({"model": lm.provenance.get("file_sha256") or lm.provenance.get("revision") or lm.name,
                          "corpus": corpus_name, "max_docs": max_docs, "config": config.as_json()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def collect_exemplars(lm: LoadedModel, corpus: Corpus, atlas: Atlas | str | Path, *,
                      config: ExemplarConfig = ExemplarConfig(), max_docs: int | None = None,
                      corpus_name: str = "<memory>", corpus_meta: dict[str, Any] | None = None,
                      progress: Callable[[int, int | None], None] | None = None,
                      on_chunk: Callable[[int], None] | None = None, force: bool = False) -> dict[str, Any]:
    """Stream ``corpus`` through ``lm`` and write the exemplar tables; returns the pass's summary.

    ``corpus``: a list of ``{"doc_id", "text", "source"}`` dicts or a function returning a fresh
    iterable of them (read twice: the forward pass, then the text-only pass). ``corpus_name`` names
    the corpus in the fingerprint (a changed name restarts instead of resuming). ``progress(done,
    total)`` counts documents; ``on_chunk(docs_done)`` runs after each checkpoint (tests use it to
    simulate a crash).
    """
    lm.spec.check_component(config.component)
    store = atlas if isinstance(atlas, Atlas) else Atlas.create(atlas, model=lm.provenance, force=force)
    fp = _fingerprint(lm, corpus_name, max_docs, config)
    ckpt = store.path / CHECKPOINT_DIR
    if force:
        shutil.rmtree(ckpt, ignore_errors=True)
    elif store.has(EXEMPLARS_TABLE) and table_meta(store).get("fingerprint") == fp:
        return {**table_meta(store), "reused": True}
    stream = ExemplarStream(lm, top_k=config.top_k, n_random=config.n_random, before=config.context,
                            after=config.after_tokens, seed=config.seed, component=config.component)
    start = 0
    if (ckpt / "state.json").exists():
        meta = store.read_json(f"{CHECKPOINT_DIR}/state.json")
        if meta.get("fingerprint") == fp:
            stream.load_state(store.read_arrays(f"{CHECKPOINT_DIR}/state.safetensors"))
            start = int(meta["docs_done"])
        else:
            shutil.rmtree(ckpt)
    total = None
    if not callable(corpus):
        total = len(corpus) if max_docs is None else min(len(corpus), max_docs)
    elif max_docs is not None:
        total = max_docs
    counted = [start]
    chunks = [0]

    def step(n: int) -> None:
        counted[0] += n
        if progress:
            progress(counted[0], total)

    def checkpoint(s: ExemplarStream, done: int) -> None:
        counted[0] = done
        chunks[0] += 1
        if chunks[0] % config.checkpoint_every == 0:
            store.write_arrays(f"{CHECKPOINT_DIR}/state.safetensors", s.state())
            store.write_json(f"{CHECKPOINT_DIR}/state.json", {"fingerprint": fp, "docs_done": done})
        if on_chunk:
            on_chunk(done)

    t0 = time.perf_counter()
    stream, n_docs = stream_exemplars(lm, corpus, config, max_docs=max_docs, stream=stream, start=start,
                                      progress=step, on_chunk=checkpoint)
    stream_seconds = time.perf_counter() - t0
    if stream.tokens_seen == 0:
        raise DatasetError(f"corpus {corpus_name!r} has no tokens to record; give at least one non-empty document")
    t1 = time.perf_counter()
    info = {"fingerprint": fp, "model": lm.name, "site": config.component.value,
            "n_layers": lm.n_layers, "n_neurons": lm.n_neurons, "config": config.as_json(),
            "corpus": corpus_name, "corpus_meta": corpus_meta or {}, "max_docs": max_docs, "docs": n_docs,
            "tokens": stream.tokens_seen, "resumed_from_doc": start,
            "stream_seconds": round(stream_seconds, 3)}
    n_ref = _write_tables(store, lm, corpus, max_docs, stream, config, info, t1)
    shutil.rmtree(ckpt, ignore_errors=True)
    return {**info, "docs_stored": n_ref, "write_seconds": round(time.perf_counter() - t1, 3), "reused": False}


def decoded_vocab(tokenizer: Any) -> list[str]:
    """Every token id decoded on its own (how windows and documents spell their tokens)."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def _write_tables(store: Atlas, lm: LoadedModel, corpus: Corpus, max_docs: int | None, stream: ExemplarStream,
                  config: ExemplarConfig, info: dict[str, Any], t_start: float) -> int:
    wanted = sorted(stream.referenced_docs())
    kinds = [("top", stream.top)] + ([("random", stream.random)] if stream.random else [])
    table = write_exemplar_docs(store, lm, corpus, max_docs, wanted, kinds, max_length=config.max_length,
                                docs_table=DOCS_TABLE,
                                describe="documents referenced by corpus_exemplars (neuronatlas exemplars)")
    meta = {**info, "write_seconds": round(time.perf_counter() - t_start, 3)}
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    store.write_table(EXEMPLARS_TABLE, table, describe="top-k and random exemplars of every neuron with "
                      "per-token activation windows (neuronatlas exemplars)")
    return len(wanted)


def write_exemplar_docs(store: Atlas, lm: LoadedModel, corpus: Iterable[dict] | Callable[[], Iterable[dict]],
                        max_docs: int | None, wanted: list[int],
                        kinds: list[tuple[str, Any]], *, max_length: int, docs_table: str, describe: str) -> pa.Table:
    """Read the corpus once more for the documents ``wanted`` (sorted indices) that exemplars
    point to, write them to ``docs_table`` (doc ids made unique, tokens decoded), and return the
    exemplar table of ``kinds`` = [(kind, per-layer top-k)], ordered by layer, unit, kind, rank,
    with per-token windows (not written: the caller names and annotates it)."""
    wanted_set = set(wanted)
    docs: dict[int, dict] = {}
    for index, doc in enumerate(_iter_docs(corpus, max_docs)):
        if index in wanted_set:
            docs[index] = doc
    missing = wanted_set - set(docs)
    if missing:
        raise DatasetError(f"the corpus yielded fewer documents on the second read ({len(missing)} missing); "
                           "pass a list or a function returning the same documents every time")
    ids = encode_ids(lm, [docs[i]["text"] for i in wanted], max_length=max_length)
    vocab = decoded_vocab(lm.tokenizer)
    seen: set[str] = set()
    doc_ids = []
    for i in wanted:
        did = str(docs[i].get("doc_id", i))
        doc_ids.append(f"{did}#{i}" if did in seen else did)  # duplicated ids become unique
        seen.add(did)
    vocab_arr = np.array(vocab, dtype=object)
    store.write_table(docs_table, pa.table({
        "doc_id": doc_ids,
        "source": [str(docs[i].get("source", "")) for i in wanted],
        "text": [docs[i]["text"] for i in wanted],
        "tokens": [vocab_arr[np.asarray(x, dtype=np.int64)].tolist() for x in ids],
    }), describe=describe)

    width = max((len(x) for x in ids), default=1)
    id_matrix = np.zeros((max(len(ids), 1), width), dtype=np.int32)
    for row, x in enumerate(ids):
        id_matrix[row, : len(x)] = x
    lookup = _Lookup(np.array(wanted, dtype=np.int64), id_matrix, pa.array(doc_ids, pa.string()),
                     pa.array(vocab, pa.string()))
    # rows come out ordered by layer, unit, kind (top first), rank: no sort needed
    return pa.concat_tables([_layer_table(layer, kinds, lookup) for layer in range(len(kinds[0][1]))])


@dataclass
class _Lookup:
    wanted: np.ndarray          # sorted document indices of corpus_docs rows
    id_matrix: np.ndarray       # (docs, max tokens) token ids of those documents
    doc_ids: pa.Array           # their doc_id strings
    vocab: pa.Array             # decoded string of every token id


def _layer_table(layer: int, kinds: list[tuple[str, list[WindowTopK]]], lk: _Lookup) -> pa.Table:
    """One layer's rows: per neuron, its top entries then its random ones, each by rank."""
    parts = [p[layer] for _, p in kinds]
    values = np.concatenate([p.top.values.cpu().numpy() for p in parts], axis=1)          # (N, k + r)
    doc = np.concatenate([p.top.prompt.cpu().numpy() for p in parts], axis=1).astype(np.int64)
    pos = np.concatenate([p.top.position.cpu().numpy() for p in parts], axis=1).astype(np.int64)
    windows = np.concatenate([p.windows.cpu().numpy() for p in parts], axis=1)            # (N, k + r, W)
    kind = np.concatenate([np.full(p.k, i, dtype=np.int8) for i, p in enumerate(parts)])
    rank = np.concatenate([np.arange(p.k, dtype=np.int32) for p in parts])
    n_units = values.shape[0]
    before = parts[0].before
    keep = np.isfinite(values) & (doc >= 0)
    neuron = np.broadcast_to(np.arange(n_units, dtype=np.int32)[:, None], values.shape)[keep]
    kind, rank = np.broadcast_to(kind, values.shape)[keep], np.broadcast_to(rank, values.shape)[keep]
    doc, pos, win = doc[keep], pos[keep], windows[keep]                     # (E,), (E,), (E, W)
    row = np.searchsorted(lk.wanted, doc)
    valid = ~np.isnan(win)                                                  # contiguous per entry
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32))
    span = np.clip(pos[:, None] - before + np.arange(win.shape[1]), 0, lk.id_matrix.shape[1] - 1)
    token_ids = lk.id_matrix[row[:, None], span][valid]
    names = pa.array(["top", "random"], pa.string())
    return pa.table({
        "layer": np.full(len(neuron), layer, dtype=np.int32), "neuron": neuron,
        "kind": names.take(pa.array(kind)), "rank": rank,
        "doc_id": lk.doc_ids.take(pa.array(row)),
        "position": pos.astype(np.int32),
        "activation": win[:, before].astype(np.float32),
        "window_start": (pos - before + valid.argmax(1)).astype(np.int32),
        "window_tokens": pa.ListArray.from_arrays(offsets, pa.DictionaryArray.from_arrays(     # strings, stored
            pa.array(token_ids.astype(np.int32)), lk.vocab)),                                 # once per vocab entry
        "window_acts": pa.ListArray.from_arrays(offsets, pa.array(win[valid].astype(np.float32))),
    })
