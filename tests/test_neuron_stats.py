"""Activation histograms and GLU sign quadrants: exact against numpy on a tiny model, mergeable, resumable."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from neuronatlas.models.specs import get_module
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record import RecordConfig, record
from neuronatlas.record.batching import encode_ids, forward, pad_ids
from neuronatlas.record.hooks import count_hooks
from neuronatlas.record.neuron_stats import (
    CENTER,
    EDGES,
    N_BINS,
    QUADRANTS,
    ActivationHistogram,
    GluQuadrants,
    capture_gate_up,
)
from neuronatlas.web.neuron import abs_percentiles


@torch.no_grad()
def _tokens_by_hand(lm, prompts):
    """Per prompt: site activations (down-projection input), gate and up projections, each (tokens, layers,
    neurons), read by plain PyTorch hooks of this test, one prompt at a time."""
    out = []
    for p in prompts:
        batch = pad_ids(lm, encode_ids(lm, [p.text]))
        seen: dict[tuple[str, int], torch.Tensor] = {}

        def keep(name, layer):
            return lambda _m, args, out=None: seen.__setitem__((name, layer), (args[0] if out is None else out)[0].clone())

        handles = []
        for layer in range(lm.n_layers):
            mlp = lm.spec.mlp_module(lm.model, layer)
            handles.append(get_module(mlp, lm.spec.down).register_forward_pre_hook(keep("act", layer)))
            if lm.spec.gate_up:
                handles.append(get_module(mlp, lm.spec.gate_up).register_forward_hook(keep("gate_up", layer)))
            else:
                handles.append(get_module(mlp, lm.spec.gate).register_forward_hook(keep("gate", layer)))
                handles.append(get_module(mlp, lm.spec.up).register_forward_hook(keep("up", layer)))
        try:
            forward(lm, batch)
        finally:
            for h in handles:
                h.remove()
        if lm.spec.gate_up:
            for layer in range(lm.n_layers):
                seen["gate", layer], seen["up", layer] = seen.pop(("gate_up", layer)).chunk(2, dim=-1)
        out.append(tuple(torch.stack([seen[name, layer] for layer in range(lm.n_layers)], dim=1)
                         for name in ("act", "gate", "up")))
    return out


def _numpy_hist(a: np.ndarray) -> np.ndarray:
    """Signed log-bin counts of a 1-D float32 array, with numpy only."""
    m = np.searchsorted(EDGES, np.abs(a), side="right")
    idx = np.where(a < 0, CENTER - m, CENTER + m)
    return np.bincount(idx, minlength=N_BINS)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_histogram_and_quadrants_equal_numpy(tmp_path, prompts, family):
    lm = tiny_model(family)
    res = record(lm, prompts, tmp_path / "atlas", name="r", config=RecordConfig(batch_size=1, top_k=3))
    assert count_hooks(lm.model) == 0
    per_prompt = _tokens_by_hand(lm, prompts)
    acts = [a for a, _, _ in per_prompt]
    # the same forward computations as the recorder's (one prompt per batch): its top-1 agrees exactly
    every = torch.cat(acts)
    assert torch.equal(every.max(0).values, res.topk.values[..., 0])

    hist = pq.read_table(tmp_path / "atlas/records/r/histograms.parquet").to_pandas()
    labels = res.labels + ["__all__"]
    assert len(hist) == len(labels) * lm.n_layers * lm.n_neurons
    for label in labels:
        x = torch.cat([a for a, p in zip(acts, prompts) if label == "__all__" or p.label == label]).numpy()
        sub = hist[hist.label == label]
        for layer, n in [(0, 0), (1, 5), (1, lm.n_neurons - 1), (0, 17)]:
            row = sub[(sub.layer == layer) & (sub.neuron == n)].iloc[0]
            a = x[:, layer, n].astype(np.float32)
            assert np.array_equal(np.asarray(row["counts"]), _numpy_hist(a)), (label, layer, n)
            assert row["n_tokens"] == len(a)
            assert row["abs_max"] == np.abs(a).max()
    # every neuron, all labels together: one vectorised comparison
    allx = every.numpy()
    full = np.stack(hist[hist.label == "__all__"].sort_values(["layer", "neuron"])["counts"].map(np.asarray).to_list())
    expect = np.stack([_numpy_hist(allx[:, layer, n]) for layer in range(lm.n_layers) for n in range(lm.n_neurons)])
    assert np.array_equal(full, expect)
    manifest = json.loads((tmp_path / "atlas/manifest.json").read_text())
    assert manifest["records"]["r"]["histogram"]["edges"] == [float(e) for e in EDGES]

    # GLU quadrants: counts per (gate sign, up sign) and the top-|a| tokens of each
    gates = torch.cat([g for _, g, _ in per_prompt]).numpy()
    ups = torch.cat([u for _, _, u in per_prompt]).numpy()
    q = (gates < 0) * 2 + (ups < 0)
    signs = pq.read_table(tmp_path / "atlas/records/r/glu_signs.parquet").to_pandas()
    assert len(signs) == lm.n_layers * lm.n_neurons * 4
    got = signs.pivot_table(index=["layer", "neuron"], columns="quadrant", values="n_tokens", observed=True)
    for i, name in enumerate(QUADRANTS):
        expect_q = (q == i).sum(0).reshape(-1)
        assert np.array_equal(got[name].to_numpy(), expect_q), name
    ex = pq.read_table(tmp_path / "atlas/records/r/glu_exemplars.parquet").to_pandas()
    for layer, n in [(0, 3), (1, 9)]:
        for i, name in enumerate(QUADRANTS):
            mine = ex[(ex.layer == layer) & (ex.neuron == n) & (ex.quadrant == name)].sort_values("rank")
            vals = np.sort(np.abs(allx[:, layer, n][q[:, layer, n] == i]))[::-1][:3]
            assert np.allclose(np.abs(mine["activation"].to_numpy()), vals, atol=1e-6), (layer, n, name)
            for _, r in mine.iterrows():        # each exemplar's token really is in its quadrant
                g = per_prompt[int(r.prompt_id)][1][int(r.position), layer, n]
                u = per_prompt[int(r.prompt_id)][2][int(r.position), layer, n]
                assert QUADRANTS[int(g < 0) * 2 + int(u < 0)] == name


def test_gpt2_has_histograms_but_no_quadrants(tmp_path, prompts):
    lm = tiny_model("gpt2")
    record(lm, prompts, tmp_path / "a", config=RecordConfig(batch_size=4))
    assert (tmp_path / "a/records/default/histograms.parquet").exists()
    assert not (tmp_path / "a/records/default/glu_signs.parquet").exists()


def test_disabled_writes_nothing(tmp_path, prompts):
    record(tiny_model("llama"), prompts, tmp_path / "a", config=RecordConfig(neuron_stats=False))
    assert not (tmp_path / "a/records/default/histograms.parquet").exists()


def test_merge_of_shards_equals_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g) * torch.logspace(-4, 3.5, 16)
    labels = torch.randint(0, 3, (200,), generator=g)
    gate, up = torch.randn(200, 16, generator=g) >= 0, torch.randn(200, 16, generator=g) >= 0
    prompt, pos = torch.arange(200) // 10, torch.arange(200) % 10
    whole, a, b = ActivationHistogram(3, 2, 16), ActivationHistogram(3, 2, 16), ActivationHistogram(3, 2, 16)
    qw, qa, qb = GluQuadrants(2, 16, 4), GluQuadrants(2, 16, 4), GluQuadrants(2, 16, 4)
    for layer in range(2):
        whole.update(x, labels, layer=layer)
        qw.update(x, gate, up, prompt, pos, layer=layer)
        a.update(x[:90], labels[:90], layer=layer)
        b.update(x[90:], labels[90:], layer=layer)
        qa.update(x[:90], gate[:90], up[:90], prompt[:90], pos[:90], layer=layer)
        qb.update(x[90:], gate[90:], up[90:], prompt[90:], pos[90:], layer=layer)
    merged = ActivationHistogram.from_state(a.state()).merge(b)
    assert torch.equal(merged.counts, whole.counts) and torch.equal(merged.absmax, whole.absmax)
    assert int(whole.counts.sum()) == 2 * 16 * 200          # every (layer, neuron, token) once
    qm = GluQuadrants.from_state(qa.state()).merge(qb)
    assert torch.equal(qm.counts, qw.counts) and torch.equal(qm.values, qw.values)
    assert torch.equal(qm.prompt, qw.prompt) and torch.equal(qm.act, qw.act)


def test_percentiles_bracket_numpy():
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(5000) * rng.lognormal(0, 2, 5000)).astype(np.float32)
    counts = _numpy_hist(a)
    est = abs_percentiles(counts.tolist(), [float(e) for e in EDGES], float(np.abs(a).max()))
    for p, row in est.items():
        true = np.percentile(np.abs(a), p, method="inverted_cdf") if p < 100 else np.abs(a).max()
        assert row["lo"] <= true <= row["hi"], (p, row, true)
        assert row["lo"] <= row["value"] <= row["hi"]
    assert est[100.0]["value"] == np.abs(a).max()


def test_capture_hooks_are_removed_after_an_error():
    lm = tiny_model("llama")
    signs: dict = {}
    with pytest.raises(RuntimeError):
        with capture_gate_up(lm, signs):
            assert count_hooks(lm.model) == 2 * lm.n_layers
            raise RuntimeError("boom")
    assert count_hooks(lm.model) == 0


def test_resume_keeps_histograms_exact(tmp_path, prompts):
    lm = tiny_model("llama")
    cfg = RecordConfig(batch_size=2, checkpoint_every=2)
    record(lm, prompts, tmp_path / "full", config=cfg)

    def crash(done):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record(lm, prompts, tmp_path / "crash", config=cfg, on_batch=crash)
    record(lm, prompts, tmp_path / "crash", config=cfg)
    for table in ("histograms", "glu_signs", "glu_exemplars"):
        full = pq.read_table(tmp_path / f"full/records/default/{table}.parquet")
        resumed = pq.read_table(tmp_path / f"crash/records/default/{table}.parquet")
        assert full.equals(resumed), table


def test_counts_widen_before_int32_could_overflow():
    h = ActivationHistogram(2, 1, 4)
    h.update(torch.ones(3, 4), torch.tensor([0, 0, 1]), layer=0)
    assert h.counts.dtype == torch.int32
    h.tokens[0, 0] = 2**31 - 2                      # as if label 0 had seen that many tokens already
    h.update(torch.ones(3, 4), torch.tensor([0, 0, 1]), layer=0)
    assert h.counts.dtype == torch.int64 and int(h.counts[0, 0, 0].sum()) == 4   # label 0, layer 0, neuron 0: 2 + 2 tokens
