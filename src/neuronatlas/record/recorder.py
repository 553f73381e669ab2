"""Streaming recorder: per-label neuron statistics, pooled responses and top-k exemplars.

The full (prompts x tokens x neurons) activation tensor is never held: each batch updates
mergeable statistics and is dropped. The statistics live on the model's device (float32 arithmetic,
float64 accumulators, whatever the model's dtype): nothing is copied to the host per batch, only at
checkpoints and at the end. Padding never counts. Every ``checkpoint_every`` batches the
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
from contextlib import nullcontext
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
from neuronatlas.record.neuron_stats import NeuronStats  # histograms, GLU sign quadrants (viewer)
from neuronatlas.record.statistics import TokenBatch, default_folds, folds_from_state, folds_state
from neuronatlas.stats.running import LabelMoments, TopK
from neuronatlas.store.atlas import Atlas

__all__ = ["BatchRecorder", "Pool", "RecordConfig", "RecordPlan", "RecordResult", "load_record", "plan_record", "record"]

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
    extra: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # other folds' states, by key


def _fingerprint(lm: LoadedModel, prompts: PromptSet, config: RecordConfig) -> str:
    payload = json.dumps({"model": lm.provenance.get("file_sha256") or lm.name, "dataset": prompts.content_hash,
                          "config": config.as_json()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RecordPlan:
    """What a record will do: tokenised prompts cut into length-sorted batches (the unit of sharding)."""

    labels: list[str]
    prompt_labels: np.ndarray             # (prompts,) label index
    ids: list[list[int]]                  # token ids per prompt
    batches: list[list[int]]              # prompt ids of each batch, in processing order
    fingerprint: str


def plan_record(lm: LoadedModel, prompts: PromptSet, config: RecordConfig) -> RecordPlan:
    """Tokenise and batch ``prompts`` exactly as :func:`record` does."""
    if len(prompts) == 0:
        raise DatasetError("the dataset is empty; nothing to record")
    labels = prompts.labels
    label_index = {lab: i for i, lab in enumerate(labels)}
    prompt_labels = np.array([label_index[p.label] for p in prompts], dtype=np.int64)
    ids = encode_ids(lm, [p.text for p in prompts], max_length=config.max_length)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))  # length-sorted: less padding
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    return RecordPlan(labels, prompt_labels, ids, batches, _fingerprint(lm, prompts, config))


class BatchRecorder:
    """Records batches ``lo .. hi - 1`` of a plan into its folds and pooled rows, all on ``lm.device``.

    Nothing leaves the device per batch: :meth:`take_pooled` and :func:`folds_state` (called at
    checkpoints and at the end) are the only copies to the host. A shard of a distributed record is
    one ``BatchRecorder`` over a range of batches.
    """

    def __init__(self, lm: LoadedModel, plan: RecordPlan, config: RecordConfig, lo: int = 0,
                 hi: int | None = None) -> None:
        self.lm, self.plan, self.config = lm, plan, config
        self.lo, self.hi = lo, len(plan.batches) if hi is None else hi
        self.done = lo
        self.device = lm.device
        self.folds = default_folds(len(plan.labels), lm.n_layers, lm.n_neurons, config.top_k, self.device)
        self._labels = torch.tensor(plan.prompt_labels)
        self._pending: list[tuple[list[int], torch.Tensor]] = []     # (prompt ids, (B, L, N) float16 on device)
        self.nstats: NeuronStats | None = None     # set by record(): the viewer's histograms and GLU quadrants

    def resume(self, state: dict[str, np.ndarray], done: int) -> None:
        """Continue from a checkpoint's fold state after ``done`` batches."""
        folds_from_state(self.folds, state)
        self.done = done

    @property
    def finished(self) -> bool:
        return self.done >= self.hi

    def _token_batch(self, rows: list[int], mask: torch.Tensor, position_ids: torch.Tensor) -> TokenBatch:
        # built from the host-side batch (inputs, not activations) and moved once
        index = mask.reshape(-1).nonzero()[:, 0]
        rows_t = torch.tensor(rows, dtype=torch.long)
        prompt = rows_t[index // mask.shape[1]]
        dev = self.device
        return TokenBatch(rows_t.to(dev), mask.to(dev), index.to(dev), prompt.to(dev),
                          position_ids.reshape(-1)[index].to(dev), self._labels[prompt].to(dev))

    def step(self) -> None:
        """Record the next batch."""
        lm, config = self.lm, self.config
        rows = self.plan.batches[self.done]
        batch = pad_ids(lm, [self.plan.ids[i] for i in rows], config.padding_side)
        tb = self._token_batch(rows, batch["attention_mask"].bool(), batch["position_ids"])
        folds = list(self.folds.values())
        pooled = (torch.empty((len(rows), lm.n_layers, lm.n_neurons), dtype=torch.float16, device=self.device)
                  if config.keep_pooled else None)

        def observe(layer: int, h: torch.Tensor) -> None:
            # fold this layer in while its activations are still in cache, on their device; the
            # (tokens, layers, neurons) tensor never exists and nothing is copied to the host
            h = h.detach()
            flat = h.reshape(-1, h.shape[-1]).index_select(0, tb.index).float()    # (tokens, N)
            for fold in folds:
                fold.observe(layer, flat, tb)
            if nstats is not None:
                nstats.update(layer, flat, tb.mask, tb.labels, tb.prompt, tb.position)
            if pooled is not None:
                pooled[:, layer] = _pool(h.float(), tb.mask, config.pool).to(torch.float16)

        nstats = self.nstats
        with site_hooks(lm, config.component, observe=observe, batch_size=len(rows)), \
                (nstats.hooks(lm) if nstats is not None else nullcontext()):
            forward_through(lm, batch)            # nothing after the last layer is needed
        for fold in folds:
            fold.commit(tb)
        if pooled is not None:
            self._pending.append((rows, pooled))
        self.done += 1

    def take_pooled(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The pooled rows recorded since the last call, copied to the host: (prompt ids sorted, rows)."""
        if not self._pending:
            return None
        ids = torch.tensor([i for rows, _ in self._pending for i in rows], dtype=torch.long)
        rows_dev = torch.cat([p for _, p in self._pending])
        self._pending = []
        order = torch.argsort(ids)
        return ids[order].numpy(), rows_dev[order.to(rows_dev.device)].cpu().numpy()


def record(lm: LoadedModel, prompts: PromptSet, atlas: Atlas | str | Path, *, name: str = "default",
           config: RecordConfig = RecordConfig(), progress: Callable[[int, int], None] | None = None,
           on_batch: Callable[[int], None] | None = None, force: bool = False) -> RecordResult:
    """Record ``prompts`` through ``lm`` into ``atlas/records/<name>``; see the module docstring.

    ``progress(done, total)`` is called after each batch; ``on_batch(i)`` too (tests use it to
    simulate a crash). ``force`` discards a finished record or a checkpoint. For a record sharded
    over several workers see :func:`neuronatlas.distributed.record_distributed`.
    """
    plan = plan_record(lm, prompts, config)
    lm.spec.check_component(config.component)
    store = atlas if isinstance(atlas, Atlas) else Atlas.create(atlas, model=lm.provenance, force=force)
    rdir = store.record_dir(name)
    fp = plan.fingerprint
    meta_path = rdir / "record.json"
    if not force and meta_path.exists() and store.read_json(str(meta_path.relative_to(store.path))).get("fingerprint") == fp:
        return load_record(store, name)
    ckpt = rdir / ".checkpoint"
    if force:
        shutil.rmtree(rdir, ignore_errors=True)

    L, N = lm.n_layers, lm.n_neurons
    rec = BatchRecorder(lm, plan, config)
    pooled = np.zeros((len(prompts), L, N), dtype=np.float16) if config.keep_pooled else None
    start_batch = read_checkpoint(store, ckpt, fp, rec, pooled)
    # histograms and GLU sign quadrants, folded in the same forward pass (resumed with the checkpoint)
    rec.nstats = NeuronStats.start(lm, len(plan.labels), k=config.top_k, enabled=config.neuron_stats,
                                   component=config.component, store=store,
                                   checkpoint=ckpt if start_batch else None)

    t0 = time.perf_counter()
    batches = plan.batches
    while not rec.finished:
        rec.step()
        done = rec.done
        if done % config.checkpoint_every == 0 and done < len(batches):
            rec.nstats.save(store, ckpt)
            write_checkpoint(store, ckpt, fp, rec, pooled)
        if progress:
            progress(sum(len(x) for x in batches[:done]), len(prompts))
        if on_batch:
            on_batch(done)
    state = folds_state(rec.folds)                 # the one copy of the statistics to the host
    _store_pooled(rec, pooled)
    info = record_info(plan, prompts, config, L, N) | {
        "resumed_from_batch": start_batch, "record_seconds": round(time.perf_counter() - t0, 3)}
    result = result_from_state(name, plan, config, state, pooled, info)
    _write_final(store, lm, prompts, plan.ids, result)
    rec.nstats.write(store, lm, plan.ids, name, plan.labels, config.component.value, ALL_LABEL)
    shutil.rmtree(ckpt, ignore_errors=True)
    return result


def record_info(plan: RecordPlan, prompts: PromptSet, config: RecordConfig, n_layers: int, n_neurons: int) -> dict[str, Any]:
    return {"fingerprint": plan.fingerprint, "n_prompts": len(prompts), "labels": plan.labels,
            "config": config.as_json(), "dataset": {"source": prompts.source, "sha256": prompts.content_hash},
            "n_batches": len(plan.batches), "n_layers": n_layers, "n_neurons": n_neurons}


def _unpack_state(state: dict[str, np.ndarray]) -> tuple[LabelMoments, TopK, dict[str, dict[str, np.ndarray]]]:
    """Split a flat ``prefix.key`` state into the moments (``m``), the top-k (``t``) and other folds' parts."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        parts.setdefault(prefix, {})[rest] = value
    return LabelMoments.from_state(parts.pop("m")), TopK.from_state(parts.pop("t")), parts


def result_from_state(name: str, plan: RecordPlan, config: RecordConfig, state: dict[str, np.ndarray],
                      pooled: np.ndarray | None, info: dict[str, Any]) -> RecordResult:
    """A host-side result from the folds' flat state (``m.*``, ``t.*`` and any other fold's keys)."""
    moments, topk, parts = _unpack_state(state)
    return RecordResult(name, plan.labels, moments, topk, pooled, plan.prompt_labels, config, info, parts)


def _store_pooled(rec: BatchRecorder, pooled: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    part = rec.take_pooled()
    if part is not None and pooled is not None:
        pooled[part[0]] = part[1]
    return part


def read_checkpoint(store: Atlas, ckpt: Path, fp: str, rec: BatchRecorder, pooled: np.ndarray | None) -> int:
    """Resume ``rec`` (and fill ``pooled``) from ``ckpt`` if it holds this fingerprint; returns the
    batches already done (``rec.lo`` when there is nothing to resume). A stale checkpoint is removed."""
    state_file = ckpt / "state.safetensors"
    if not state_file.exists():
        return rec.lo
    meta = store.read_json(str((ckpt / "state.json").relative_to(store.path)))
    if meta.get("fingerprint") != fp:
        shutil.rmtree(ckpt)
        return rec.lo
    rec.resume(store.read_arrays(str(state_file.relative_to(store.path))), int(meta["batches_done"]))
    if pooled is not None:
        for shard in sorted(ckpt.glob("pooled-*.safetensors")):
            part = store.read_arrays(str(shard.relative_to(store.path)))
            pooled[part["prompt_ids"]] = part["pooled"]
    return rec.done


def write_checkpoint(store: Atlas, ckpt: Path, fp: str, rec: BatchRecorder, pooled: np.ndarray | None) -> None:
    """Write ``rec``'s state after ``rec.done`` batches (pooled rows since the last checkpoint as a new part)."""
    rel = ckpt.relative_to(store.path)
    part = _store_pooled(rec, pooled)
    if part is not None:
        store.write_arrays(f"{rel}/pooled-{rec.done:08d}.safetensors", {"prompt_ids": part[0], "pooled": part[1]})
    store.write_arrays(f"{rel}/state.safetensors", folds_state(rec.folds))
    store.write_json(f"{rel}/state.json", {"fingerprint": fp, "batches_done": rec.done})


def _pool(acts: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, T, N) activations of one layer -> (B, N) pooled over each row's real tokens."""
    m = mask[:, :, None].to(acts.dtype)
    if pool == "mean":
        return (acts * m).sum(1) / m.sum(1).clamp(min=1)
    if pool == "max":
        return acts.masked_fill(~mask[:, :, None], float("-inf")).max(1).values
    last = mask.long().cumsum(1).argmax(1)  # index of the last real token
    return acts[torch.arange(acts.shape[0], device=acts.device), last]


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
    # statistics kept exactly, for merging and for scorers (every fold under its key)
    extra = {f"{key}.{k2}": v for key, part in r.extra.items() for k2, v in part.items()}
    store.write_arrays(f"{rel}/moments.safetensors", {f"m.{k2}": v for k2, v in r.moments.state().items()}
                       | {f"t.{k2}": v for k2, v in r.topk.state().items()} | extra | {"prompt_labels": r.prompt_labels})
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
    prompt_labels = state.pop("prompt_labels")
    moments, topk, parts = _unpack_state(state)
    pooled = None
    if store.has(f"{rel}/pooled.safetensors"):
        pooled = store.read_arrays(f"{rel}/pooled.safetensors")["pooled"]
    cfg = dict(info["config"])
    config = RecordConfig(**cfg)
    return RecordResult(name, list(info["labels"]), moments, topk, pooled, prompt_labels, config, info, parts)
