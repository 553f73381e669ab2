"""Recorder: streamed statistics equal full-tensor statistics; padding-invariant; resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neuronatlas.data.prompts import PromptSet, load_prompts
from neuronatlas.errors import AtlasError, DatasetError, SiteError
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record import RecordConfig, load_record, record
from neuronatlas.record.batching import encode_ids, forward, pad_ids
from neuronatlas.record.hooks import site_hooks
from neuronatlas.store import Atlas


def _full_activations(lm, prompts, component="mlp"):
    """Per prompt: (tokens, layers, neurons) activations, one prompt at a time (no padding at all)."""
    out = []
    for p in prompts:
        ids = encode_ids(lm, [p.text])
        batch = pad_ids(lm, ids)
        seen = {}
        with site_hooks(lm, component, observe=lambda layer, h: seen.__setitem__(layer, h[0].clone()), batch_size=1):
            forward(lm, batch)
        out.append(torch.stack([seen[i] for i in range(lm.n_layers)], dim=1))
    return out


@pytest.mark.parametrize("component", ["mlp", "gate"])
def test_streamed_stats_equal_full_tensor(tmp_path, prompts, component):
    lm = tiny_model("qwen2")
    res = record(lm, prompts, tmp_path / "atlas", config=RecordConfig(component=component, batch_size=3, top_k=4))
    acts = _full_activations(lm, prompts, component)
    for k, label in enumerate(res.labels):
        x = torch.cat([a for a, p in zip(acts, prompts) if p.label == label]).double()
        assert res.moments.count[k] == x.shape[0]
        assert torch.allclose(res.moments.mean[k], x.mean(0), atol=1e-6)
        assert torch.allclose(res.moments.var[k], x.var(0), atol=1e-6)
        assert torch.allclose(res.moments.max[k].double(), x.max(0).values, atol=1e-6)
        assert torch.allclose(res.moments.act_prob[k], (x > 0).double().mean(0))
    # pooled responses: mean over each prompt's tokens
    for i, a in enumerate(acts):
        assert np.allclose(res.pooled[i].astype(np.float32), a.mean(0).numpy(), atol=2e-3)
    # top-k: the k largest activations of each neuron over all tokens
    every = torch.cat(acts)  # (tokens, L, N)
    expected = every.topk(4, dim=0).values.movedim(0, -1)
    assert torch.allclose(res.topk.values, expected, atol=1e-6)
    p, q = int(res.topk.prompt[1, 5, 0]), int(res.topk.position[1, 5, 0])
    assert torch.isclose(acts[p][q, 1, 5], res.topk.values[1, 5, 0])


def test_gpt2_record_and_gate_error(tmp_path, prompts):
    lm = tiny_model("gpt2")
    res = record(lm, prompts, tmp_path / "a", config=RecordConfig(batch_size=4))
    assert res.moments.mean.shape == (3, 2, 32)
    with pytest.raises(SiteError, match="gate"):
        record(lm, prompts, tmp_path / "b", config=RecordConfig(component="gate"))


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_left_and_right_padding_identical(tmp_path, prompts, family):
    lm = tiny_model(family)
    left = record(lm, prompts, tmp_path / "l", config=RecordConfig(padding_side="left", batch_size=5))
    right = record(lm, prompts, tmp_path / "r", config=RecordConfig(padding_side="right", batch_size=5))
    assert torch.equal(left.moments.count, right.moments.count)
    assert torch.allclose(left.moments.mean, right.moments.mean, atol=1e-6)
    assert torch.allclose(left.moments.var, right.moments.var, atol=1e-5)
    assert torch.allclose(left.topk.values, right.topk.values, atol=1e-5)
    assert torch.equal(left.topk.position, right.topk.position)
    assert np.allclose(left.pooled.astype(np.float32), right.pooled.astype(np.float32), atol=1e-3)


def test_resume_after_crash_equals_uninterrupted(tmp_path, prompts):
    lm = tiny_model("llama")
    cfg = RecordConfig(batch_size=2, checkpoint_every=2)
    full = record(lm, prompts, tmp_path / "full", config=cfg)

    def crash(done):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record(lm, prompts, tmp_path / "crash", config=cfg, on_batch=crash)
    state = json.loads((tmp_path / "crash/records/default/.checkpoint/state.json").read_text())
    assert state["batches_done"] == 4
    resumed = record(lm, prompts, tmp_path / "crash", config=cfg)
    assert resumed.info["resumed_from_batch"] == 4
    for name in ("count", "mean", "m2", "max", "active"):
        assert torch.equal(getattr(full.moments, name), getattr(resumed.moments, name)), name
    assert torch.equal(full.topk.values, resumed.topk.values)
    assert np.array_equal(full.pooled, resumed.pooled)
    assert not (tmp_path / "crash/records/default/.checkpoint").exists()


def test_finished_record_is_reused_and_loaded(tmp_path, prompts):
    lm = tiny_model("llama")
    first = record(lm, prompts, tmp_path / "a")
    again = record(lm, prompts, tmp_path / "a")
    assert "resumed_from_batch" in again.info and torch.equal(first.moments.mean, again.moments.mean)
    loaded = load_record(tmp_path / "a")
    assert loaded.labels == first.labels and np.array_equal(loaded.pooled, first.pooled)
    atlas = Atlas.open(tmp_path / "a")
    n = atlas.query("SELECT count(*) AS n FROM stats WHERE label = '__all__'").column("n")[0].as_py()
    assert n == lm.n_layers * lm.n_neurons
    top = atlas.query("SELECT activation, token FROM exemplars WHERE layer = 1 AND neuron = 3 ORDER BY rank").to_pylist()
    assert len(top) == 20 and top[0]["activation"] >= top[-1]["activation"] and top[0]["token"]
    manifest = atlas.manifest()
    assert manifest["records"]["default"]["dataset"]["sha256"] == prompts.content_hash
    assert manifest["model"]["model"] == "tiny-llama"


def test_atlas_refuses_another_model_and_bad_sql(tmp_path, prompts):
    record(tiny_model("llama"), prompts, tmp_path / "a")
    with pytest.raises(AtlasError, match="belongs to model"):
        record(tiny_model("gpt2"), prompts, tmp_path / "a")
    with pytest.raises(AtlasError, match="query failed"):
        Atlas.open(tmp_path / "a").query("SELECT nope FROM stats")
    with pytest.raises(AtlasError, match="not an atlas"):
        Atlas.open(tmp_path / "missing")


def test_dataset_formats_and_errors(tmp_path, write_jsonl):
    path = write_jsonl([{"text": "a b", "label": "x", "target": " c"}, {"text": "d", "label": "y", "lang": "en"}])
    ps = load_prompts(path)
    assert ps.labels == ["x", "y"] and ps[0].target == " c" and ps[1].lang == "en"
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label,split\nhello,a,test\nworld,b,\n")
    ps = load_prompts(csv_path)
    assert ps[0].split == "test" and ps[1].split is None
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["x y"], "label": ["z"]}), tmp_path / "d.parquet")
    assert load_prompts(tmp_path / "d.parquet")[0].label == "z"

    with pytest.raises(DatasetError, match="file not found"):
        load_prompts(tmp_path / "nope.jsonl")
    bad = write_jsonl(['{"text": "ok", "label": "a"}', "{not json", '{"text": "x"}'], "bad.jsonl")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: bad JSON"):
        load_prompts(bad)
    skipped = load_prompts(bad, skip_bad=True)
    assert len(skipped) == 2 and skipped.skipped[0][0] == 2
    missing_text = write_jsonl([{"label": "a"}], "m.jsonl")
    with pytest.raises(DatasetError, match=r"m.jsonl:1 \(field 'text'\)"):
        load_prompts(missing_text)
    with pytest.raises(DatasetError, match="unknown label column 'concept'"):
        load_prompts(path, label_field="concept")
    empty = write_jsonl([], "e.jsonl")
    with pytest.raises(DatasetError, match="empty"):
        load_prompts(empty)
    with pytest.raises(DatasetError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("hi")
        load_prompts(tmp_path / "x.txt")
    with pytest.raises(DatasetError, match="target must be a string"):
        load_prompts(write_jsonl([{"text": "a", "target": 3}], "t.jsonl"))


def test_empty_prompt_set_refused(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        PromptSet.from_rows([], source="x")


@pytest.mark.parametrize("seed", [0, 1])
def test_sliced_topk_and_moments_equal_whole_tensor(seed):
    """The per-layer update path (threshold, candidate merge, plain top-k while lists fill up) keeps
    exactly the top-k of all tokens seen, and per-layer moments equal the all-layers update."""
    from neuronatlas.stats.running import LabelMoments, TopK

    g = torch.Generator().manual_seed(seed)
    layers, units, k = 3, 40, 5
    sliced, whole = TopK.empty((layers, units), k), TopK.empty((layers, units), k)
    m_sliced, m_whole = LabelMoments(3, (layers, units)), LabelMoments(3, (layers, units))
    xs, prompts, positions = [], [], []
    for b in range(30):                                   # many small batches: the candidate path runs
        n = int(torch.randint(1, 12, (1,), generator=g))
        x = torch.randn(n, layers, units, generator=g)   # continuous values: no ties
        prompt = torch.full((n,), b, dtype=torch.long)
        pos = torch.arange(n)
        labels = torch.randint(0, 3, (n,), generator=g)
        for layer in range(layers):
            sliced.update(x[:, layer], prompt, pos, at=layer)
            m_sliced.update(x[:, layer], labels, at=layer)
        m_sliced.commit(labels)
        whole.update(x, prompt, pos)
        m_whole.update(x, labels)
        xs.append(x), prompts.append(prompt), positions.append(pos)
    full = torch.cat(xs)
    ref_vals, ref_idx = full.topk(k, dim=0)
    torch.testing.assert_close(sliced.values, ref_vals.movedim(0, -1))
    assert torch.equal(sliced.prompt.long(), torch.cat(prompts)[ref_idx].movedim(0, -1))
    assert torch.equal(sliced.position.long(), torch.cat(positions)[ref_idx].movedim(0, -1))
    assert torch.equal(sliced.values, whole.values) and torch.equal(sliced.prompt, whole.prompt)
    for name in ("count", "mean", "m2", "max", "active"):
        torch.testing.assert_close(getattr(m_sliced, name), getattr(m_whole, name))


def test_sliced_topk_keeps_the_older_entry_on_ties():
    from neuronatlas.stats.running import TopK

    t = TopK.empty((1, 2), 2)
    t.update(torch.tensor([[3.0, 1.0], [2.0, 1.0]]), torch.tensor([0, 0]), torch.tensor([0, 1]), at=0)
    t.update(torch.tensor([[2.0, 5.0]]), torch.tensor([1]), torch.tensor([0]), at=0)   # ties unit 0's 2.0
    assert t.values[0].tolist() == [[3.0, 2.0], [5.0, 1.0]]
    assert t.prompt[0].tolist() == [[0, 0], [1, 0]]
