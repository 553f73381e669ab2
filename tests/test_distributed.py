"""Recording and exemplar collection sharded over Ray equal a single-process run.

A local Ray cluster (2 CPUs, no dashboard) is started once for the module and shut down after it;
each test's workers are real Ray actors (separate processes) that load a tiny model.

Identity: shards are contiguous and merged in order, so counts, maxima, activation probabilities,
top-k lists (values, prompt ids, positions) and pooled responses are bit-identical. Means and sums of
squared deviations go through one more Chan merge than in a sequential pass, a different float64
rounding order: they agree to a relative 1e-12 (observed: 1e-18 absolute on the tiny model).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

ray = pytest.importorskip("ray", reason="the [distributed] extra (ray) is not installed")

from neuronatlas.data.prompts import PromptSet  # noqa: E402
from neuronatlas.distributed import (  # noqa: E402
    Cluster,
    DistributedError,
    collect_exemplars_distributed,
    record_distributed,
    shard_ranges,
)
from neuronatlas.explain.exemplars import ExemplarConfig, collect_exemplars  # noqa: E402
from neuronatlas.explain.tables import EXEMPLARS_TABLE  # noqa: E402
from neuronatlas.models.tiny import tiny_model  # noqa: E402
from neuronatlas.record import RecordConfig, record  # noqa: E402

from conftest import TEXTS  # noqa: E402

RTOL = 1e-12

pytestmark = pytest.mark.slow          # real worker processes: about 30 s a test on 2 shared cores


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    # worker processes cannot import this test module: ship its hook class by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def many_prompts() -> PromptSet:
    # every text three times: exact ties across shards, so the tie rule is exercised
    rows = [{"text": t, "label": lab} for lab, texts in TEXTS.items() for t in texts] * 3
    return PromptSet.from_rows(rows, source="tests")


class DieOnce:
    """Worker hook: the worker process of ``shard`` exits when it reaches ``at``, the first time only."""

    def __init__(self, marker: Path, shard: int, at: int) -> None:
        self.marker, self.shard, self.at = marker, shard, at

    def __call__(self, shard: int, done: int) -> None:
        if shard == self.shard and done == self.at and not self.marker.exists():
            self.marker.touch()
            os._exit(1)


def assert_same_record(ref, res):
    for name in ("count", "max", "active"):
        assert torch.equal(getattr(ref.moments, name), getattr(res.moments, name)), name
    for name in ("mean", "m2"):
        torch.testing.assert_close(getattr(res.moments, name), getattr(ref.moments, name), rtol=RTOL, atol=RTOL)
    for name in ("values", "prompt", "position"):
        assert torch.equal(getattr(ref.topk, name), getattr(res.topk, name)), name
    assert np.array_equal(ref.pooled, res.pooled)


def test_shard_ranges_cover_everything_in_order():
    assert shard_ranges(14, 2) == [(0, 7), (7, 14)]
    assert shard_ranges(3, 5) == [(0, 1), (1, 2), (2, 3)]
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(DistributedError, match="workers"):
        Cluster(workers=0)


def test_two_workers_record_equals_one_process(tmp_path, many_prompts):
    lm = tiny_model("llama")
    config = RecordConfig(batch_size=3, top_k=4, checkpoint_every=2)
    ref = record(lm, many_prompts, tmp_path / "one", config=config)
    res = record_distributed(lm, many_prompts, tmp_path / "two", load=functools.partial(tiny_model, "llama"),
                             config=config, cluster=Cluster(workers=2))
    assert res.info["distributed"]["shards"] == [(0, 7), (7, 14)]
    assert_same_record(ref, res)
    # the written tables too: exemplars exactly, statistics as float32 within the tolerance
    one, two = tmp_path / "one/records/default", tmp_path / "two/records/default"
    assert pq.read_table(one / "exemplars.parquet").equals(pq.read_table(two / "exemplars.parquet"))
    s1, s2 = pq.read_table(one / "stats.parquet").to_pandas(), pq.read_table(two / "stats.parquet").to_pandas()
    for col in ("n_tokens", "max", "act_prob"):
        assert s1[col].equals(s2[col])
    np.testing.assert_allclose(s2["mean"], s1["mean"], rtol=1e-6, atol=1e-9)


def test_a_killed_worker_s_shard_is_redone(tmp_path, many_prompts):
    lm = tiny_model("qwen2")
    config = RecordConfig(batch_size=3, top_k=4, checkpoint_every=2)
    ref = record(lm, many_prompts, tmp_path / "one", config=config)
    # one worker, two shards: shard 1 covers batches 7..13; its worker process dies after batch 10
    # (last checkpoint: 9) and a fresh actor redoes the shard from there
    res = record_distributed(lm, many_prompts, tmp_path / "two", load=functools.partial(tiny_model, "qwen2"),
                             config=config, cluster=Cluster(workers=1, shards=2),
                             worker_hook=DieOnce(tmp_path / "died", shard=1, at=10))
    assert (tmp_path / "died").exists() and res.info["distributed"]["restarts"] == [0, 1]
    assert_same_record(ref, res)


def test_a_killed_driver_resumes_every_shard(tmp_path, many_prompts):
    lm = tiny_model("qwen2")
    load = functools.partial(tiny_model, "qwen2")
    config = RecordConfig(batch_size=3, top_k=4, checkpoint_every=2)
    ref = record(lm, many_prompts, tmp_path / "one", config=config)
    seen = []

    def crash(done, total):                       # the driver dies after its third checkpoint
        seen.append(done)
        if len(seen) == 4:
            raise KeyboardInterrupt

    cluster = Cluster(workers=1, shards=2)
    with pytest.raises(KeyboardInterrupt):
        record_distributed(lm, many_prompts, tmp_path / "two", load=load, config=config, cluster=cluster,
                           progress=crash)
    assert len(list((tmp_path / "two/records/default/.checkpoint").glob("shard-*/state.json"))) >= 1
    res = record_distributed(lm, many_prompts, tmp_path / "two", load=load, config=config, cluster=cluster)
    assert res.info["resumed_from_batch"] == 6
    assert_same_record(ref, res)
    assert not (tmp_path / "two/records/default/.checkpoint").exists()


def test_two_workers_exemplars_keep_the_same_top_exemplars(tmp_path):
    docs = [{"doc_id": str(i), "text": t, "source": "x"}
            for i, t in enumerate([t for ts in TEXTS.values() for t in ts] * 6)]
    lm = tiny_model("gpt2")
    config = ExemplarConfig(top_k=3, n_random=2, context=4, batch_size=4, chunk_docs=16)
    ref = collect_exemplars(lm, docs, tmp_path / "one", config=config)
    res = collect_exemplars_distributed(lm, docs, tmp_path / "two", load=functools.partial(tiny_model, "gpt2"),
                                        config=config, cluster=Cluster(workers=2))
    assert res["distributed"]["shards"] == [(0, 48), (48, 84)] and res["tokens"] == ref["tokens"]
    one = pq.read_table(tmp_path / "one" / EXEMPLARS_TABLE).to_pandas()
    two = pq.read_table(tmp_path / "two" / EXEMPLARS_TABLE).to_pandas()
    top1, top2 = (t[t.kind == "top"].reset_index(drop=True) for t in (one, two))
    assert len(top1) == 2 * 32 * 3
    for col in top1.columns:
        assert top1[col].astype(str).equals(top2[col].astype(str)), col
    # random exemplars: a uniform sample per shard, as many as one process keeps
    assert (one.kind == "random").sum() == (two.kind == "random").sum() == 2 * 32 * 2
