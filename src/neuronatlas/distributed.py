"""Recording and exemplar collection sharded over Ray (the optional ``[distributed]`` extra).

The work is cut into contiguous shards (batches of a record, chunks of a corpus); one Ray actor per
worker loads the model once and records shard after shard into a partial state; the driver writes
each shard's checkpoint, and at the end merges the partial states in shard order and writes the same
atlas tables as a single-process run. Shards are contiguous and merged in order, so ties break as in
one pass: top-k lists, counts, maxima, activation probabilities and pooled responses are
bit-identical to :func:`~neuronatlas.record.record`; means and variances equal it up to float64
rounding of Chan's merge (relative 1e-12). Random exemplars are a uniform sample drawn with one
generator per shard (shard 0 uses ``seed``), so they differ from the single-process draw.

The driver owns every checkpoint (workers send their state back every ``checkpoint_every`` batches
or chunks), so workers need no shared filesystem. A worker that dies has its shard redone from the
shard's last checkpoint by a fresh actor; a rerun of a killed driver resumes every shard.

    >>> from functools import partial
    >>> from neuronatlas.distributed import Cluster, record_distributed
    >>> from neuronatlas.models import load_model
    >>> lm = load_model("default")                      # the driver's copy: tokenizer and provenance
    >>> res = record_distributed(lm, prompts, "ray-atlas", load=partial(load_model, "default"),
    ...                          cluster=Cluster(workers=2))   # doctest: +SKIP

See ``docs/distributed.md`` for running on a real cluster (``ray start --head``, ``--ray ADDRESS``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from neuronatlas.data.prompts import PromptSet
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.models.loading import DType, LoadedModel
from neuronatlas.record.recorder import (
    BatchRecorder,
    RecordConfig,
    RecordPlan,
    RecordResult,
    _write_final,
    load_record,
    plan_record,
    record_info,
    result_from_state,
)
from neuronatlas.record.statistics import default_folds, folds_from_state, folds_state, merge_folds
from neuronatlas.store.atlas import Atlas

__all__ = ["Cluster", "DistributedError", "ModelSource", "collect_exemplars_distributed", "ray_session", "record_distributed",
           "shard_ranges", "shard_seed"]

Loader = Callable[[], LoadedModel]
WorkerHook = Callable[[int, int], None]


class DistributedError(NeuronAtlasError):
    """Ray is missing or unreachable, or a shard failed more often than allowed."""


@dataclass(frozen=True)
class Cluster:
    """Where and how to run: ``workers`` actors on the Ray cluster at ``address`` (``None``: a local
    one started for the run), each reserving ``cpus`` CPUs and ``gpus`` GPUs; ``shards`` (default:
    one per worker) pieces of work; a shard whose worker dies is redone up to ``retries`` times."""

    workers: int = 2
    address: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    shards: int | None = None
    retries: int = 3

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise DistributedError(f"workers must be at least 1, got {self.workers}")
        if self.shards is not None and self.shards < 1:
            raise DistributedError(f"shards must be at least 1, got {self.shards}")

    @property
    def n_shards(self) -> int:
        return self.shards or self.workers


@dataclass(frozen=True)
class ModelSource:
    """A picklable model loader for workers: ``load_model(model, dtype=..., device=...)``."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"

    def __call__(self) -> LoadedModel:
        from neuronatlas.models import load_model

        return load_model(self.model, dtype=cast(DType, self.dtype), device=self.device)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DistributedError("--workers/--ray need Ray: pip install 'neuronatlas[distributed]' (or pip install ray)") from None
    return ray


@contextmanager
def ray_session(cluster: Cluster) -> Iterator[Any]:
    """Yield the ``ray`` module, initialised: reuse a running session, else connect to
    ``cluster.address`` or start a local cluster sized for the workers, and shut down what was started."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        if cluster.address:
            ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(num_cpus=max(1, int(np.ceil(cluster.workers * cluster.cpus))), num_gpus=None,
                     include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot reach the Ray cluster at {cluster.address!r}: {exc}; start it with "
                               "`ray start --head` or leave --ray out for a local one") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def shard_ranges(n_items: int, n_shards: int) -> list[tuple[int, int]]:
    """``n_items`` cut into at most ``n_shards`` contiguous, non-empty, near-equal ranges."""
    n = max(1, min(n_shards, n_items))
    bounds = [round(i * n_items / n) for i in range(n + 1)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


# --- shard checkpoints (written by the driver) ---------------------------------------------------

def _read_shard(store: Atlas, sdir: Path, fp: str) -> tuple[dict[str, np.ndarray] | None, int | None]:
    if not (sdir / "state.json").exists():
        return None, None
    meta = store.read_json(str((sdir / "state.json").relative_to(store.path)))
    if meta.get("fingerprint") != fp:
        return None, None
    return store.read_arrays(str((sdir / "state.safetensors").relative_to(store.path))), int(meta["done"])


def _write_shard(store: Atlas, sdir: Path, fp: str, done: int, state: dict[str, np.ndarray],
                 pooled: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    rel = sdir.relative_to(store.path)
    if pooled is not None:
        store.write_arrays(f"{rel}/pooled-{done:08d}.safetensors", {"prompt_ids": pooled[0], "pooled": pooled[1]})
    store.write_arrays(f"{rel}/state.safetensors", state)
    store.write_json(f"{rel}/state.json", {"fingerprint": fp, "done": done})


def _prepare_checkpoints(store: Atlas, ckpt: Path, plan_meta: dict[str, Any], force: bool) -> None:
    """Keep ``ckpt`` only if it belongs to the same sharded run."""
    if force:
        shutil.rmtree(ckpt, ignore_errors=True)
    meta_file = ckpt / "shards.json"
    plan_meta = json.loads(json.dumps(plan_meta))
    if meta_file.exists() and json.loads(meta_file.read_text()) != plan_meta:
        shutil.rmtree(ckpt, ignore_errors=True)
    if ckpt.exists() and not meta_file.exists():
        shutil.rmtree(ckpt, ignore_errors=True)          # a single-process checkpoint: start the shards afresh
    store.write_json(str(meta_file.relative_to(store.path)), plan_meta)


def _dead_actor_errors(ray: Any) -> tuple[type[BaseException], ...]:
    ex = ray.exceptions
    return tuple(getattr(ex, name) for name in ("RayActorError", "ActorDiedError", "WorkerCrashedError",
                                                 "ActorUnavailableError") if hasattr(ex, name))


def _run_shards(ray: Any, make_actor: Callable[[], Any], ranges: list[tuple[int, int]], resume: list[tuple[Any, int]],
                cluster: Cluster, step: int, on_result: Callable[[int, int, Any], None]) -> dict[str, Any]:
    """Drive shards over actors until every shard is done; ``resume[i]`` = (state or None, done).

    ``on_result(shard, done, payload)`` is called (on the driver) after each ``advance`` call.
    Returns per-shard restarts and compute seconds, and each fresh actor's model-load seconds.
    """
    dead = _dead_actor_errors(ray)
    todo = [i for i, (lo, hi) in enumerate(ranges) if resume[i][1] < hi]
    restarts = [0] * len(ranges)
    compute = [0.0] * len(ranges)
    loads: list[float] = []
    fresh: set[Any] = set()
    idle = [make_actor() for _ in range(min(cluster.workers, len(todo)))]
    fresh.update(idle)
    running: dict[Any, tuple[Any, int]] = {}

    def submit(actor: Any, shard: int, start: tuple[Any, ...] | None) -> None:
        running[actor.advance.remote(shard, step, start)] = (actor, shard)

    def start_args(shard: int) -> tuple[Any, ...]:
        lo, hi = ranges[shard]
        state, done = resume[shard]
        return (lo, hi, state, done)

    while todo and idle:
        shard = todo.pop(0)
        submit(idle.pop(), shard, start_args(shard))
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        actor, shard = running.pop(ready[0])
        try:
            done, payload = ray.get(ready[0])
        except dead as exc:
            restarts[shard] += 1
            if restarts[shard] > cluster.retries:
                cause = " ".join(str(exc).split())[:300]
                raise DistributedError(f"shard {shard} failed {restarts[shard]} times, its worker died each time "
                                       f"(last: {cause}); check that every node can import neuronatlas and has "
                                       "the memory, then rerun to resume") from None
            actor = make_actor()
            fresh.add(actor)
            submit(actor, shard, start_args(shard))   # a fresh actor redoes it from its last checkpoint
            continue
        compute[shard] += payload.pop("seconds")
        load_s = payload.pop("load_seconds")
        if actor in fresh:
            fresh.discard(actor)
            loads.append(load_s)
        if done < ranges[shard][1]:
            submit(actor, shard, None)                    # keep the worker busy while the driver writes
        elif todo:
            nxt = todo.pop(0)
            submit(actor, nxt, start_args(nxt))
        else:
            ray.kill(actor)
        on_result(shard, done, payload)
        resume[shard] = (payload["state"], done)
    return {"restarts": restarts, "compute_seconds": [round(c, 3) for c in compute],
            "model_load_seconds": [round(x, 3) for x in loads]}


# --- recording -----------------------------------------------------------------------------------

class _RecordWorker:
    """One Ray actor: loads the model once, records shard after shard (see :class:`BatchRecorder`)."""

    def __init__(self, load: Loader, plan: RecordPlan, config: RecordConfig, hook: WorkerHook | None) -> None:
        t = time.perf_counter()
        self.lm, self.plan, self.config, self.hook = load(), plan, config, hook
        self.load_seconds = time.perf_counter() - t
        self.rec: BatchRecorder | None = None

    def advance(self, shard: int, n: int, start: tuple[int, int, dict[str, np.ndarray] | None, int] | None) -> Any:
        if start is not None:
            lo, hi, state, done = start
            self.rec = BatchRecorder(self.lm, self.plan, self.config, lo, hi)
            if state is not None:
                self.rec.resume(state, done)
        rec = self.rec
        assert rec is not None
        t = time.perf_counter()
        for _ in range(n):
            if rec.finished:
                break
            rec.step()
            if self.hook:
                self.hook(shard, rec.done)
        seconds = time.perf_counter() - t
        return rec.done, {"state": folds_state(rec.folds), "pooled": rec.take_pooled(), "seconds": seconds,
                          "load_seconds": self.load_seconds}


def record_distributed(lm: LoadedModel, prompts: PromptSet, atlas: Atlas | str | Path, *, load: Loader,
                       name: str = "default", config: RecordConfig = RecordConfig(), cluster: Cluster = Cluster(),
                       progress: Callable[[int, int], None] | None = None, force: bool = False,
                       worker_hook: WorkerHook | None = None) -> RecordResult:
    """:func:`~neuronatlas.record.record` with the batches sharded over Ray workers (see the module docstring).

    ``lm`` is the driver's copy of the model (tokenizer, provenance, shapes; it runs no batch);
    ``load()`` loads it in each worker (picklable: :class:`ModelSource` or ``functools.partial``).
    ``worker_hook(shard, batches_done)`` runs in the worker after each batch (tests use it to kill one).
    """
    plan = plan_record(lm, prompts, config)
    lm.spec.check_component(config.component)
    store = atlas if isinstance(atlas, Atlas) else Atlas.create(atlas, model=lm.provenance, force=force)
    rdir = store.record_dir(name)
    fp = plan.fingerprint
    meta_path = rdir / "record.json"
    if not force and meta_path.exists() and store.read_json(str(meta_path.relative_to(store.path))).get("fingerprint") == fp:
        return load_record(store, name)
    if force:
        shutil.rmtree(rdir, ignore_errors=True)
    ranges = shard_ranges(len(plan.batches), cluster.n_shards)
    ckpt = rdir / ".checkpoint"
    _prepare_checkpoints(store, ckpt, {"fingerprint": fp, "shards": ranges}, force=False)
    sdirs = [ckpt / f"shard-{i:03d}" for i in range(len(ranges))]
    resume: list[tuple[Any, int]] = []
    for sdir, (lo, _) in zip(sdirs, ranges):
        state, done = _read_shard(store, sdir, fp)
        resume.append((state, lo if done is None else done))
    resumed_from = [done for _, done in resume]
    initial_done = list(resumed_from)
    sizes = [len(b) for b in plan.batches]
    prefix = np.concatenate([[0], np.cumsum(sizes)])

    def report() -> None:
        if progress:
            progress(int(sum(prefix[d] - prefix[lo] for d, (lo, _) in zip(resumed_from, ranges))), len(prompts))

    report()
    t0 = time.perf_counter()
    timing = {"write": 0.0}

    def on_result(shard: int, done: int, payload: dict[str, Any]) -> None:
        t = time.perf_counter()
        _write_shard(store, sdirs[shard], fp, done, payload["state"], payload["pooled"])
        timing["write"] += time.perf_counter() - t
        resumed_from[shard] = done
        report()

    book: dict[str, Any] = {"restarts": [0] * len(ranges)}
    if any(done < hi for (_, done), (_, hi) in zip(resume, ranges)):
        with ray_session(cluster) as ray:
            book["ray_start_seconds"] = round(time.perf_counter() - t0, 3)
            actor_cls = ray.remote(num_cpus=cluster.cpus, num_gpus=cluster.gpus)(_RecordWorker)
            plan_ref = ray.put(plan)
            book |= _run_shards(ray, lambda: actor_cls.remote(load, plan_ref, config, worker_hook), ranges, resume,
                                cluster, config.checkpoint_every, on_result)
    shards_seconds = time.perf_counter() - t0

    # merge on the host, in shard order (the earlier shard wins ties, as in one pass)
    t1 = time.perf_counter()
    L, N = lm.n_layers, lm.n_neurons
    merged = default_folds(len(plan.labels), L, N, config.top_k, "cpu")
    pooled = np.zeros((len(prompts), L, N), dtype=np.float16) if config.keep_pooled else None
    for i, sdir in enumerate(sdirs):
        state, _ = _read_shard(store, sdir, fp)
        assert state is not None
        part = default_folds(len(plan.labels), L, N, config.top_k, "cpu")
        folds_from_state(part, state)
        if i == 0:
            merged = part
        else:
            merge_folds(merged, part)
        if pooled is not None:
            for f in sorted(sdir.glob("pooled-*.safetensors")):
                arrays = store.read_arrays(str(f.relative_to(store.path)))
                pooled[arrays["prompt_ids"]] = arrays["pooled"]
    merge_seconds = time.perf_counter() - t1
    info = record_info(plan, prompts, config, L, N) | {
        "resumed_from_batch": int(sum(d - lo for d, (lo, _) in zip(initial_done, ranges))),
        "record_seconds": round(shards_seconds + merge_seconds, 3),
        "distributed": {"workers": cluster.workers, "shards": ranges, "address": cluster.address,
                        **book, "shards_seconds": round(shards_seconds, 3),
                        "checkpoint_write_seconds": round(timing["write"], 3),
                        "merge_seconds": round(merge_seconds, 3)}}
    result = result_from_state(name, plan, config, folds_state(merged), pooled, info)
    _write_final(store, lm, prompts, plan.ids, result)
    shutil.rmtree(ckpt, ignore_errors=True)
    return result


# --- corpus exemplars ----------------------------------------------------------------------------

def shard_seed(seed: int, shard: int) -> int:
    """The random-sample seed of a shard: ``seed`` itself for shard 0 (one worker = one process's draw)."""
    return seed if shard == 0 else int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


class _ExemplarWorker:
    """One Ray actor: loads the model once, streams corpus chunk ranges into an ExemplarStream."""

    def __init__(self, load: Loader, corpus: Any, config: Any, hook: WorkerHook | None) -> None:
        t = time.perf_counter()
        self.lm, self.corpus, self.config, self.hook = load(), corpus, config, hook
        self.load_seconds = time.perf_counter() - t
        self.stream: Any = None
        self.batches: Iterator[Any] | None = None
        self.done = 0

    def advance(self, shard: int, n: int, start: tuple[int, int, dict[str, np.ndarray] | None, int] | None) -> Any:
        from neuronatlas.explain.exemplars import _iter_docs, doc_batches
        from neuronatlas.record.corpus import ExemplarStream

        cfg = self.config
        if start is not None:
            lo, hi, state, done = start
            self.stream = ExemplarStream(self.lm, top_k=cfg.top_k, n_random=cfg.n_random, before=cfg.context,
                                         after=cfg.after_tokens, seed=shard_seed(cfg.seed, shard), component=cfg.component)
            if state is not None:
                self.stream.load_state(state)
            self.done = done
            self.batches = doc_batches(self.lm, _iter_docs(self.corpus, hi), cfg, done)
        assert self.batches is not None
        t = time.perf_counter()
        chunks = 0
        for batch in self.batches:
            if batch.ids:
                self.stream.update(batch.ids, batch.indices)
            if batch.chunk_end:
                self.done = batch.docs_done
                chunks += 1
                if self.hook:
                    self.hook(shard, self.done)
                if chunks == n:
                    break
        return self.done, {"state": self.stream.state(), "seconds": time.perf_counter() - t,
                           "load_seconds": self.load_seconds}


def _count_docs(corpus: Any, max_docs: int | None) -> int:
    from neuronatlas.explain.exemplars import _iter_docs

    if not callable(corpus):
        return len(corpus) if max_docs is None else min(len(corpus), max_docs)
    return sum(1 for _ in _iter_docs(corpus, max_docs))


def collect_exemplars_distributed(lm: LoadedModel, corpus: Any, atlas: Atlas | str | Path, *, load: Loader,
                                  config: Any = None, max_docs: int | None = None, corpus_name: str = "<memory>",
                                  corpus_meta: dict[str, Any] | None = None, cluster: Cluster = Cluster(),
                                  progress: Callable[[int, int | None], None] | None = None, force: bool = False,
                                  worker_hook: WorkerHook | None = None) -> dict[str, Any]:
    """:func:`~neuronatlas.explain.exemplars.collect_exemplars` with corpus chunks sharded over Ray workers.

    Shards are whole ``chunk_docs`` chunks, so batches are the single-process batches; top-k
    exemplars are identical to one process, random exemplars are drawn per shard (module docstring).
    The corpus (a list, or a function re-reading files that every worker can reach) is sent to
    each worker. ``worker_hook(shard, docs_done)`` runs in the worker after each chunk.
    """
    from neuronatlas.explain.exemplars import CHECKPOINT_DIR, ExemplarConfig, _fingerprint, _write_tables
    from neuronatlas.explain.tables import EXEMPLARS_TABLE, table_meta
    from neuronatlas.record.corpus import ExemplarStream

    config = config or ExemplarConfig()
    lm.spec.check_component(config.component)
    store = atlas if isinstance(atlas, Atlas) else Atlas.create(atlas, model=lm.provenance, force=force)
    fp = _fingerprint(lm, corpus_name, max_docs, config)
    if not force and store.has(EXEMPLARS_TABLE) and table_meta(store).get("fingerprint") == fp:
        return {**table_meta(store), "reused": True}
    n_docs = _count_docs(corpus, max_docs)
    n_chunks = -(-n_docs // config.chunk_docs)
    ranges = [(lo * config.chunk_docs, min(n_docs, hi * config.chunk_docs))
              for lo, hi in shard_ranges(n_chunks, cluster.n_shards)]
    ckpt = store.path / CHECKPOINT_DIR
    _prepare_checkpoints(store, ckpt, {"fingerprint": fp, "shards": ranges, "kind": "exemplars"}, force)
    sdirs = [ckpt / f"shard-{i:03d}" for i in range(len(ranges))]
    resume: list[tuple[Any, int]] = []
    for sdir, (lo, _) in zip(sdirs, ranges):
        state, done = _read_shard(store, sdir, fp)
        resume.append((state, lo if done is None else done))
    position = [done for _, done in resume]
    initial = sum(d - lo for d, (lo, _) in zip(position, ranges))

    def report() -> None:
        if progress:
            progress(int(sum(d - lo for d, (lo, _) in zip(position, ranges))), n_docs)

    report()
    timing = {"write": 0.0}

    def on_result(shard: int, done: int, payload: dict[str, Any]) -> None:
        t = time.perf_counter()
        _write_shard(store, sdirs[shard], fp, done, payload["state"])
        timing["write"] += time.perf_counter() - t
        position[shard] = done
        report()

    t0 = time.perf_counter()
    book: dict[str, Any] = {"restarts": [0] * len(ranges)}
    if any(done < hi for (_, done), (_, hi) in zip(resume, ranges)):
        with ray_session(cluster) as ray:
            book["ray_start_seconds"] = round(time.perf_counter() - t0, 3)
            actor_cls = ray.remote(num_cpus=cluster.cpus, num_gpus=cluster.gpus)(_ExemplarWorker)
            corpus_ref = ray.put(corpus)
            book |= _run_shards(ray, lambda: actor_cls.remote(load, corpus_ref, config, worker_hook), ranges, resume,
                                cluster, config.checkpoint_every, on_result)
    stream_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    merged: ExemplarStream | None = None
    for shard, sdir in enumerate(sdirs):
        state, _ = _read_shard(store, sdir, fp)
        assert state is not None
        part = ExemplarStream(lm, top_k=config.top_k, n_random=config.n_random, before=config.context,
                              after=config.after_tokens, seed=shard_seed(config.seed, shard), component=config.component)
        part.load_state(state)
        merged = part if merged is None else merged.merge(part)
    assert merged is not None
    merge_seconds = time.perf_counter() - t1
    if merged.tokens_seen == 0:
        from neuronatlas.errors import DatasetError

        raise DatasetError(f"corpus {corpus_name!r} has no tokens to record; give at least one non-empty document")
    t2 = time.perf_counter()
    info = {"fingerprint": fp, "model": lm.name, "site": config.component.value,
            "n_layers": lm.n_layers, "n_neurons": lm.n_neurons, "config": config.as_json(),
            "corpus": corpus_name, "corpus_meta": corpus_meta or {}, "max_docs": max_docs, "docs": n_docs,
            "tokens": merged.tokens_seen, "resumed_from_doc": int(initial),
            "stream_seconds": round(stream_seconds + merge_seconds, 3),
            "distributed": {"workers": cluster.workers, "shards": ranges, "address": cluster.address,
                            **book, "shards_seconds": round(stream_seconds, 3),
                            "checkpoint_write_seconds": round(timing["write"], 3),
                            "merge_seconds": round(merge_seconds, 3),
                            "random_seeds": [shard_seed(config.seed, i) for i in range(len(ranges))]}}
    n_ref = _write_tables(store, lm, corpus, max_docs, merged, config, info, t2)
    shutil.rmtree(ckpt, ignore_errors=True)
    return {**info, "docs_stored": n_ref, "write_seconds": round(time.perf_counter() - t2, 3), "reused": False}
