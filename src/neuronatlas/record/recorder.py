"""Streaming recorder: per-label neuron statistics, pooled responses and top-k exemplars.

The full (prompts x tokens x neurons) activation tensor is never held: each batch updates
mergeable statistics and is dropped. Padding never counts. Every ``checkpoint_every`` batches the
state is written atomically; an interrupted run resumes from it and ends bit-identical to an
uninterrupted one. A finished record is reused as is.

    >>> from neuronatlas.record import record, RecordConfig
    >>> result = record(lm, prompts, "my-atlas", name="facts", config=RecordConfig(pool="mean"))
    >>> result.moments.mean.shape        # (labels, layers, neurons)
    >>> result.pooled.shape              # (prompts, layers, neurons), float16
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from neuronatlas.data.prompts import PromptSet
from neuronatlas.errors import DatasetError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record.batching import encode_ids, forward_through, pad_ids
from neuronatlas.record.hooks import site_hooks
from neuronatlas.record.neuron_stats import NeuronStats  # issue 21: histograms, GLU sign quadrants
from neuronatlas.stats.running import LabelMoments, TopK
from neuronatlas.store.atlas import Atlas

__all__ = ["RecordConfig", "RecordResult", "record", "load_record", "Pool"]

Pool = Literal["mean", "last", "max"]
ALL_LABEL = "__all__"


@dataclass(frozen=True)
class RecordConfig:
    component: Component = Component.MLP
    pool: Pool = "mean"
    top_k: int = 20
    batch_size: int = 16
    max_length: int = 128
    checkpoint_every: int = 20
    padding_side: Literal["left", "right"] = "right"
    keep_pooled: bool = True
    neuron_stats: bool = True      # activation histograms and GLU sign quadrants (record/neuron_stats.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "component", Component.parse(self.component))
        if self.pool not in ("mean", "last", "max"):
            raise DatasetError(f"unknown pooling {self.pool!r}; choose mean, last or max")
        if self.top_k < 1 or self.batch_size < 1:
            raise DatasetError("top_k and batch_size must be at least 1")

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["component"] = self.component.value
        return d


@dataclass
class RecordResult:
    name: str
    labels: list[str]
    moments: LabelMoments                 # (labels, layers, neurons)
    topk: TopK                            # (layers, neurons, k)
    pooled: np.ndarray | None             # (prompts, layers, neurons) float16
    prompt_labels: np.ndarray             # (prompts,) label index
    config: RecordConfig
    info: dict[str, Any] = field(default_factory=dict)


def _fingerprint(lm: LoadedModel, prompts: PromptSet, config: RecordConfig) -> str:
    payload = json.dumps({"model": lm.provenance.get("file_sha256") or lm.name, "dataset": prompts.content_hash,
                          "config": config.as_json()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def record(lm: LoadedModel, prompts: PromptSet, atlas: Atlas | str | Path, *, name: str = "default",
           config: RecordConfig = RecordConfig(), progress: Callable[[int, int], None] | None = None,
           on_batch: Callable[[int], None] | None = None, force: bool = False) -> RecordResult:
    """Record ``prompts`` through ``lm`` into ``atlas/records/<name>``; see the module docstring.

    ``progress(done, total)`` is called after each batch; ``on_batch(i)`` too (tests use it to
    simulate a crash). ``force`` discards a finished record or a checkpoint.
    """
    if len(prompts) == 0:
        raise DatasetError("the dataset is empty; nothing to record")
    lm.spec.check_component(config.component)
    store = atlas if isinstance(atlas, Atlas) else Atlas.create(atlas, model=lm.provenance, force=force)
    rdir = store.record_dir(name)
    fp = _fingerprint(lm, prompts, config)
    meta_path = rdir / "record.json"
    if not force and meta_path.exists() and store.read_json(str(meta_path.relative_to(store.path))).get("fingerprint") == fp:
        return load_record(store, name)
    ckpt = rdir / ".checkpoint"
    if force:
        shutil.rmtree(rdir, ignore_errors=True)

    labels = prompts.labels
    label_index = {lab: i for i, lab in enumerate(labels)}
    prompt_labels = np.array([label_index[p.label] for p in prompts], dtype=np.int64)
    ids = encode_ids(lm, [p.text for p in prompts], max_length=config.max_length)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))  # length-sorted: less padding
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    L, N = lm.n_layers, lm.n_neurons

    moments = LabelMoments(len(labels), (L, N))
    topk = TopK.empty((L, N), config.top_k)
    pooled = np.zeros((len(prompts), L, N), dtype=np.float16) if config.keep_pooled else None
    start_batch = 0
    state_file = ckpt / "state.safetensors"
    if state_file.exists():
        meta = store.read_json(str((ckpt / "state.json").relative_to(store.path)))
        if meta.get("fingerprint") == fp:
            state = store.read_arrays(str(state_file.relative_to(store.path)))
            moments = LabelMoments.from_state({k[2:]: v for k, v in state.items() if k.startswith("m.")})
            topk = TopK.from_state({k[2:]: v for k, v in state.items() if k.startswith("t.")})
            if pooled is not None:
                for shard in sorted(ckpt.glob("pooled-*.safetensors")):
                    part = store.read_arrays(str(shard.relative_to(store.path)))
                    pooled[part["prompt_ids"]] = part["pooled"]
            start_batch = int(meta["batches_done"])
        else:
            shutil.rmtree(ckpt)
    # issue 21: histograms and GLU sign quadrants (resumed with the checkpoint)
    nstats = NeuronStats.start(lm, len(labels), k=config.top_k, enabled=config.neuron_stats,
                               component=config.component, store=store,
                               checkpoint=ckpt if start_batch else None)

    t0 = time.perf_counter()
    n_tokens_seen = 0
    pending: list[int] = []
    labels_t = torch.from_numpy(prompt_labels)

    def observe(layer: int, h: torch.Tensor) -> None:
        # fold this layer into the statistics while its activations are still in cache; the full
        # (tokens, layers, neurons) tensor never exists. mask, rows and tok_* are the current batch's.
        hl = h.detach().float().cpu()                                             # (B, T, N)
        flat = hl[mask]                                                           # (tokens, N)
        moments.update(flat, tok_labels, at=layer)
        topk.update(flat, tok_prompt, tok_pos, at=layer)
        nstats.update(layer, flat, mask, tok_labels, tok_prompt, tok_pos)     # issue 21
        if pooled is not None:
            pooled[rows, layer] = _pool(hl, mask, config.pool).numpy().astype(np.float16)

    for b in range(start_batch, len(batches)):
        rows = batches[b]
        batch = pad_ids(lm, [ids[i] for i in rows], config.padding_side)
        mask = batch["attention_mask"].bool().cpu()
        row_of_token = torch.arange(len(rows))[:, None].expand_as(mask)[mask]
        tok_prompt = torch.tensor(rows)[row_of_token]
        tok_labels = labels_t[tok_prompt]
        tok_pos = batch["position_ids"].cpu()[mask]
        with site_hooks(lm, config.component, observe=observe, batch_size=len(rows)), nstats.hooks(lm):
            forward_through(lm, batch)            # nothing after the last layer is needed
        moments.commit(tok_labels)
        n_tokens_seen += int(mask.sum())
        if pooled is not None:
            pending.extend(rows)
        done = b + 1
        if done % config.checkpoint_every == 0 and done < len(batches):
            nstats.save(store, ckpt)                                          # issue 21
            _checkpoint(store, ckpt, fp, done, moments, topk, pooled, pending)
            pending = []
        if progress:
            progress(sum(len(x) for x in batches[:done]), len(prompts))
        if on_batch:
            on_batch(done)

    info = {"fingerprint": fp, "n_prompts": len(prompts), "labels": labels, "config": config.as_json(),
            "dataset": {"source": prompts.source, "sha256": prompts.content_hash},
            "n_batches": len(batches), "resumed_from_batch": start_batch,
            "record_seconds": round(time.perf_counter() - t0, 3), "n_layers": L, "n_neurons": N}
    result = RecordResult(name, labels, moments, topk, pooled, prompt_labels, config, info)
    _write_final(store, lm, prompts, ids, result)
    nstats.write(store, lm, ids, name, labels, config.component.value, ALL_LABEL)    # issue 21
    shutil.rmtree(ckpt, ignore_errors=True)
    return result


def _pool(acts: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, T, N) activations of one layer -> (B, N) pooled over each row's real tokens."""
    m = mask[:, :, None].to(acts.dtype)
    if pool == "mean":
        return (acts * m).sum(1) / m.sum(1).clamp(min=1)
    if pool == "max":
        return acts.masked_fill(~mask[:, :, None], float("-inf")).max(1).values
    last = mask.long().cumsum(1).argmax(1)  # index of the last real token
    return acts[torch.arange(acts.shape[0]), last]


def _checkpoint(store: Atlas, ckpt: Path, fp: str, done: int, moments: LabelMoments, topk: TopK,
                pooled: np.ndarray | None, pending: list[int]) -> None:
    rel = ckpt.relative_to(store.path)
    if pooled is not None and pending:
        ids = np.array(sorted(pending), dtype=np.int64)
        store.write_arrays(f"{rel}/pooled-{done:08d}.safetensors", {"prompt_ids": ids, "pooled": pooled[ids]})
    arrays = {f"m.{k}": v for k, v in moments.state().items()} | {f"t.{k}": v for k, v in topk.state().items()}
    store.write_arrays(f"{rel}/state.safetensors", arrays)
    store.write_json(f"{rel}/state.json", {"fingerprint": fp, "batches_done": done})


def _write_final(store: Atlas, lm: LoadedModel, prompts: PromptSet, ids: list[list[int]], r: RecordResult) -> None:
    rel = f"records/{r.name}"
    L, N = lm.n_layers, lm.n_neurons
    tok = lm.tokenizer
    store.write_table(f"{rel}/prompts.parquet", pa.table({
        "record": [r.name] * len(prompts),
        "prompt_id": np.arange(len(prompts), dtype=np.int64),
        **{k: [getattr(p, k) for p in prompts] for k in ("text", "label", "target", "subject", "lang", "split")},
        "n_tokens": [len(x) for x in ids],
        "tokens": [tok.convert_ids_to_tokens(x) for x in ids],
    }))
    total = r.moments.total()
    labels = r.labels + [ALL_LABEL]
    mean = torch.cat([r.moments.mean, total.mean]).numpy()
    var = torch.cat([r.moments.var, total.var]).numpy()
    mx = torch.cat([r.moments.max, total.max]).numpy()
    ap = torch.cat([r.moments.act_prob, total.act_prob]).numpy()
    count = torch.cat([r.moments.count, total.count]).numpy()
    n_prompts = np.bincount(r.prompt_labels, minlength=len(r.labels)).tolist() + [len(prompts)]
    K = len(labels)
    layer = np.tile(np.repeat(np.arange(L, dtype=np.int32), N), K)
    neuron = np.tile(np.arange(N, dtype=np.int32), K * L)
    store.write_table(f"{rel}/stats.parquet", pa.table({
        "record": pa.array([r.name] * (K * L * N)).dictionary_encode(),
        "site": pa.array([r.config.component.value] * (K * L * N)).dictionary_encode(),
        "label": pa.array(np.repeat(labels, L * N)).dictionary_encode(),
        "layer": layer, "neuron": neuron,
        "n_tokens": np.repeat(count, L * N).astype(np.int64),
        "n_prompts": np.repeat(np.array(n_prompts), L * N).astype(np.int64),
        "mean": mean.reshape(-1).astype(np.float32), "var": var.reshape(-1).astype(np.float32),
        "max": mx.reshape(-1), "act_prob": ap.reshape(-1).astype(np.float32),
    }))
    k = r.topk.k
    vals = r.topk.values.numpy().reshape(-1)
    keep = np.isfinite(vals)
    p_ids = r.topk.prompt.numpy().reshape(-1)
    positions = r.topk.position.numpy().reshape(-1)
    vocab = np.array(tok.convert_ids_to_tokens(list(range(len(tok)))), dtype=object)
    id_matrix = np.zeros((len(ids), max(len(x) for x in ids)), dtype=np.int64)
    for i, row in enumerate(ids):
        id_matrix[i, : len(row)] = row
    token_str = np.where(keep, vocab[np.minimum(id_matrix[p_ids.clip(0), positions.clip(0)], len(vocab) - 1)], "")
    store.write_table(f"{rel}/exemplars.parquet", pa.table({
        "record": pa.array([r.name] * int(keep.sum())).dictionary_encode(),
        "layer": np.repeat(np.arange(L, dtype=np.int32), N * k)[keep],
        "neuron": np.tile(np.repeat(np.arange(N, dtype=np.int32), k), L)[keep],
        "rank": np.tile(np.arange(k, dtype=np.int32), L * N)[keep],
        "prompt_id": p_ids[keep].astype(np.int64), "position": positions[keep],
        "activation": vals[keep], "token": token_str[keep],
    }))
    if r.pooled is not None:
        store.write_arrays(f"{rel}/pooled.safetensors", {"pooled": r.pooled, "labels": r.prompt_labels})
    # moments kept exactly, for merging and for scorers
    store.write_arrays(f"{rel}/moments.safetensors", {f"m.{k2}": v for k2, v in r.moments.state().items()}
                       | {f"t.{k2}": v for k2, v in r.topk.state().items()} | {"prompt_labels": r.prompt_labels})
    store.write_json(f"{rel}/record.json", r.info)
    store.update_manifest(lambda m: m.setdefault("records", {}).__setitem__(r.name, {
        "site": r.config.component.value, "pool": r.config.pool, "dataset": r.info["dataset"],
        "n_prompts": len(prompts), "labels": r.labels, "top_k": k,
    }))


def load_record(atlas: Atlas | str | Path, name: str = "default") -> RecordResult:
    """Read a finished record back (statistics exactly, pooled responses as float16)."""
    store = atlas if isinstance(atlas, Atlas) else Atlas.open(atlas)
    rel = f"records/{name}"
    info = store.read_json(f"{rel}/record.json")
    state = store.read_arrays(f"{rel}/moments.safetensors")
    moments = LabelMoments.from_state({k[2:]: v for k, v in state.items() if k.startswith("m.")})
    topk = TopK.from_state({k[2:]: v for k, v in state.items() if k.startswith("t.")})
    prompt_labels = state["prompt_labels"]
    pooled = None
    if store.has(f"{rel}/pooled.safetensors"):
        pooled = store.read_arrays(f"{rel}/pooled.safetensors")["pooled"]
    cfg = dict(info["config"])
    config = RecordConfig(**cfg)
    return RecordResult(name, list(info["labels"]), moments, topk, pooled, prompt_labels, config, info)
