"""SNMF features: the solver (properties, planted data), the two-pass fit on tiny models, the atlas
files, the CLI, and one run on the embedded model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuronatlas.data.corpus import default_corpus
from neuronatlas.features import (
    FeatureConfig,
    features_info,
    fit_features,
    output_directions,
    read_components,
    read_feature_exemplars,
    write_features,
)
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record.batching import forward_through, pad_ids
from neuronatlas.record.hooks import site_hooks
from neuronatlas.stats.snmf import SNMF, SNMFError, objective
from neuronatlas.store.atlas import Atlas
from tests.conftest import run_cli


def _planted(n: int, d: int, k: int, density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, d, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    z = torch.rand(n, k, generator=g) * 3 * (torch.rand(n, k, generator=g) < density)
    return z @ w, z, w


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(5, 60), d=st.integers(2, 24), k=st.integers(1, 8), l1=st.sampled_from([0.0, 0.01, 0.2]),
       seed=st.integers(0, 10_000))
def test_objective_never_increases_and_codes_stay_nonnegative(n, d, k, l1, seed):
    acts = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3
    snmf = SNMF(k=k, l1=l1, code_iters=5, seed=seed)
    snmf._init(acts)
    codes = snmf.transform(acts)
    assert (codes >= 0).all()
    values = [objective(acts, codes, snmf.components_, snmf.penalty)]
    for _ in range(6):
        codes = snmf.refine(acts, codes)
        assert (codes >= 0).all() and torch.isfinite(codes).all()
        assert (snmf.components_.norm(dim=1) <= 1 + 1e-5).all()
        values.append(objective(acts, codes, snmf.components_, snmf.penalty))
    for before, after in zip(values, values[1:]):
        assert after <= before * (1 + 1e-5) + 1e-6


def test_planted_features_are_recovered_in_batch_and_streaming():
    acts, _, w_true = _planted(2000, 64, 8, 0.2, seed=0)
    var = ((acts - acts.mean(0)) ** 2).sum()
    batch = SNMF(k=8, l1=0.001, seed=0).fit(acts, epochs=60)
    codes = batch.transform(acts)
    assert float(((acts - batch.reconstruct(codes)) ** 2).sum() / var) < 0.01
    match = (batch.components_ @ w_true.T).max(dim=0).values           # best cosine per true feature
    assert (match > 0.85).sum() >= 7

    stream = SNMF(k=8, l1=0.001, seed=0, batch_iters=3)
    for _ in range(5):
        for chunk in acts[torch.randperm(2000, generator=torch.Generator().manual_seed(1))].split(200):
            stream.partial_fit(chunk)
    codes = stream.transform(acts)
    assert float(((acts - stream.reconstruct(codes)) ** 2).sum() / var) < 0.05
    assert stream.n_seen_ == 10_000


def test_l1_makes_codes_sparser():
    acts, _, _ = _planted(500, 32, 6, 0.3, seed=3)
    l0 = []
    for l1 in (0.0, 0.3):
        snmf = SNMF(k=12, l1=l1, seed=0).fit(acts, epochs=20)
        l0.append(float((snmf.transform(acts) > 0.01 * snmf.scale_).float().sum(1).mean()))
    assert l0[1] < l0[0]


def test_bad_parameters_and_inputs_are_refused():
    for kwargs in ({"k": 0}, {"l1": -1.0}, {"forget": 0.0}, {"code_iters": 0}, {"l1": float("nan")}):
        with pytest.raises(SNMFError):
            SNMF(**kwargs)
    snmf = SNMF(k=2)
    with pytest.raises(SNMFError, match="not fitted"):
        snmf.transform(torch.zeros(3, 4))
    with pytest.raises(SNMFError, match="non-empty"):
        snmf.partial_fit(torch.zeros(0, 4))
    snmf.partial_fit(torch.randn(10, 4))
    with pytest.raises(SNMFError, match="one SNMF per layer"):
        snmf.partial_fit(torch.randn(10, 5))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fit_features_streams_and_measures(family, tmp_path):
    lm = tiny_model(family)
    docs = default_corpus(n_docs=24, seed=0)
    config = FeatureConfig(k=4, top_k=3, max_length=24, batch_size=4)
    run = fit_features(lm, docs, config)
    assert run.components.shape == (lm.n_layers, 4, lm.n_neurons)
    assert (run.components.norm(dim=-1) <= 1 + 1e-5).all()
    assert run.docs == 24 and run.tokens > 0
    # the streamed FVU equals the FVU of the full activation matrix under the fitted dictionaries
    layer_acts: dict[int, list[torch.Tensor]] = {i: [] for i in range(lm.n_layers)}
    from neuronatlas.features import token_mask
    from neuronatlas.record.batching import encode_ids

    ids = [x for x in encode_ids(lm, [d["text"] for d in docs], max_length=24) if x]
    for start in range(0, len(ids), 4):
        batch = pad_ids(lm, ids[start:start + 4], "right")
        mask = token_mask(lm, batch)
        with site_hooks(lm, "mlp", observe=lambda layer, h: layer_acts[layer].append(h[mask].clone()),
                        batch_size=len(ids[start:start + 4])):
            forward_through(lm, batch)
    for layer, model in enumerate(run.models):
        acts = torch.cat(layer_acts[layer])
        assert acts.shape[0] == run.layer_stats[layer]["tokens"] == run.tokens
        codes = model.transform(acts)
        fvu = float(((acts - codes @ model.components_) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum())
        assert run.layer_stats[layer]["fvu"] == pytest.approx(fvu, rel=1e-3)
        assert run.feature_stats[layer]["max"].numpy() == pytest.approx(codes.max(0).values.numpy(), rel=1e-4)
        assert float(run.top[layer].top.values[:, 0].max()) == pytest.approx(float(codes.max()), rel=1e-4)


def test_write_features_tables_and_readers(llama, tmp_path):
    docs = default_corpus(n_docs=16, seed=1)
    config = FeatureConfig(k=3, top_k=2, max_length=20)
    run = fit_features(llama, docs, config)
    info = write_features(tmp_path / "atlas", llama, run, docs, config=config, corpus_name="test")
    store = Atlas.open(tmp_path / "atlas")
    assert info["k"] == 3 and len(info["layers"]) == llama.n_layers
    assert features_info(store)["tokens"] == run.tokens
    comps = read_components(store)
    assert torch.equal(comps, run.components)
    dirs = read_components(store, key="out_dirs")
    assert torch.allclose(dirs, output_directions(llama, run.components))
    # the output direction is the down-projection of the feature's neuron combination
    down = llama.model.model.layers[1].mlp.down_proj.weight.detach()
    assert torch.allclose(dirs[1, 2], down @ run.components[1, 2], atol=1e-5)
    feats = store.query("SELECT * FROM features ORDER BY layer, feature").to_pylist()
    assert len(feats) == llama.n_layers * 3 and {"freq", "mean", "max", "top_token"} <= set(feats[0])
    dec = store.query("SELECT * FROM feature_decoded WHERE layer = 0 AND feature = 1 AND direction = 'top' "
                      "ORDER BY rank").to_pylist()
    assert [r["rank"] for r in dec] == list(range(10)) and dec[0]["score"] >= dec[-1]["score"]
    ex = read_feature_exemplars(store, 1, 2)
    assert ex.neuron == 2 and len(ex.top) == 2 and len(ex.random) == 5
    assert all(e.activation <= ex.top[0].activation for e in ex.random)
    assert ex.top[0].activation == pytest.approx(float(run.top[1].top.values[2, 0]), rel=1e-5)
    assert ex.top[0].acts[ex.top[0].center] == pytest.approx(ex.top[0].activation, rel=1e-5)
    docs_rows = store.query("SELECT doc_id FROM feature_docs").to_pylist()
    assert {r["doc_id"] for r in docs_rows} >= {e.doc_id for e in ex.top}


def test_viewer_feature_pages(llama, tmp_path):
    from fastapi.testclient import TestClient

    from neuronatlas.web import Library, create_app

    docs = default_corpus(n_docs=12, seed=2)
    config = FeatureConfig(k=3, top_k=2, max_length=20)
    run = fit_features(llama, docs, config)
    write_features(tmp_path / "feats", llama, run, docs, config=config)
    client = TestClient(create_app(Library([tmp_path / "feats"])))
    html = client.get("/a/feats").text
    assert "/a/feats/features" in html and "feature_exemplars" in html
    r = client.get("/a/feats/features?layer=1")
    assert r.status_code == 200 and "/a/feats/feature/L1/2" in r.text and "FVU" in r.text
    r = client.get("/a/feats/feature/L1/2")
    assert r.status_code == 200
    best = int(np.argmax(np.abs(run.components[1, 2].numpy())))
    assert f"/a/feats/neuron/L1/{best}" in r.text                 # strongest neuron links to its page
    store = Atlas.open(tmp_path / "feats")
    top_token = store.query("SELECT token FROM feature_decoded WHERE layer = 1 AND feature = 2 AND direction = 'top' "
                            "AND rank = 0").to_pylist()[0]["token"]
    assert "Logits" in r.text and "/a/feats/feature/L1/1" in r.text and "/a/feats/feature/L2/0" not in r.text
    from neuronatlas.web.render import token_chip

    assert str(token_chip(top_token)) in r.text
    assert client.get("/a/feats/feature/L1/3").status_code == 404
    assert client.get("/a/feats/feature/L9/0").status_code == 404
    assert client.get("/a/feats/feature/x1/0").status_code == 400
    assert client.get("/a/feats/features?layer=7").status_code == 404


def test_features_cli_and_errors(capsys, model_dir, tmp_path, write_jsonl):
    corpus = write_jsonl([{"text": f"The {w} sat on the mat and looked at the {w}."} for w in
                          ("cat", "dog", "bird", "fish", "horse", "mouse")])
    code, out, err = run_cli(capsys, "features", "--model", str(model_dir), "--corpus", str(corpus), "--k", "3",
                             "--top-k", "2", "--out", str(tmp_path / "a"), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["k"] == 3 and info["docs"] == 6 and len(info["layers"]) == 2
    assert all(0 <= layer["fvu"] and layer["l0"] >= 0 for layer in info["layers"])
    code, out, err = run_cli(capsys, "explain-features", "--atlas", str(tmp_path / "a"), "--features", "L1:0-1",
                             "--explainer-model", str(model_dir), "--candidates", "2", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["layer"], r["feature"]) for r in rows] == [(1, 0), (1, 1)]
    assert all(r["explanation"] and -1 <= r["score"] <= 1 for r in rows)
    assert rows[0]["baseline_from"] == "L1:1"                   # the other feature's explanation
    stored = Atlas.open(tmp_path / "a").query("SELECT layer, feature FROM feature_explanations").to_pylist()
    assert len(stored) == 2
    code, _, err = run_cli(capsys, "explain-features", "--atlas", str(tmp_path / "a"), "--features", "L1:7",
                           "--explainer-model", str(model_dir))
    assert code == 2 and "L1:7" in err.replace("\n", "")
    code, _, err = run_cli(capsys, "features", "--model", str(model_dir), "--corpus", str(corpus), "--k", "2",
                           "--top-k", "2", "--out", str(tmp_path / "a"), "--json")
    assert code == 0 and not (tmp_path / "a" / "feature_explanations.parquet").exists()   # stale ones removed
    code, _, err = run_cli(capsys, "features", "--model", str(model_dir), "--corpus", str(tmp_path / "nope.jsonl"),
                           "--out", str(tmp_path / "b"))
    assert code == 2 and "not found" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "features", "--model", str(model_dir), "--k", "0", "--out", str(tmp_path / "c"))
    assert code == 2 and "--k" in err
    code, _, err = run_cli(capsys, "features", "--model", str(model_dir), "--corpus", "default", "--corpus", str(corpus),
                           "--out", str(tmp_path / "d"))
    assert code == 2 and "cannot be mixed" in err


@pytest.mark.slow
def test_embedded_model_features(tmp_path):
    from neuronatlas.models import load_model

    lm = load_model("default")
    docs = default_corpus(n_docs=6, seed=0)
    config = FeatureConfig(k=16, top_k=3, max_length=32, code_iters=20)
    run = fit_features(lm, docs, config)
    assert run.components.shape == (30, 16, 1536)
    fvu = np.array([s["fvu"] for s in run.layer_stats])
    rel = np.array([s["relative_error"] for s in run.layer_stats])
    assert np.isfinite(fvu).all() and (rel < 1.0).all()           # better than reconstructing nothing
    assert np.median(fvu) < 0.9                                   # and mostly better than the mean
    l0 = np.array([s["l0"] for s in run.layer_stats])
    assert (l0 < 16).all()                                         # not every feature on every token
    info = write_features(tmp_path / "atlas", lm, run, docs, config=config)
    assert info["tokens"] == run.tokens


def test_generalized_jaccard_matches_hand_computation():
    from neuronatlas.features.select import generalized_jaccard

    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 2.0]])
    sims = generalized_jaccard(x, y)
    assert sims[0, 0] == pytest.approx((1 + 0 + 1) / (1 + 1 + 2))
    assert sims[0, 1] == pytest.approx(1.0)
    assert sims[1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_select_documents_methods(family, tmp_path):
    from neuronatlas.features.select import SelectConfig, activation_patterns, select_documents

    lm = tiny_model(family)
    pool = [f"the {w} and the {w} again" for w in ("cat", "dog", "sun", "moon")] + ["1 2 3 4 5", "6 7 8 9 0"]
    exemplars = ["3 4 5 6 7", "8 9 1 2"]
    patterns = activation_patterns(lm, pool, SelectConfig(top=5, layers=(0, 1)))
    assert patterns.shape == (6, 2 * lm.n_neurons) and ((patterns > 0).sum(1) <= 5).all() and (patterns >= 0).all()
    # an exemplar identical to a pool document is that document's best match
    picked = select_documents(lm, [pool[2]], pool, 1, SelectConfig(top=8, aggregate="max"))
    assert picked[0][0] == 2 and picked[0][1] == pytest.approx(1.0)
    emb = select_documents(lm, [pool[3]], pool, 2, SelectConfig(method="embedding"))
    assert emb[0][0] == 3 and emb[0][1] == pytest.approx(1.0, abs=1e-5) and emb[1][1] <= emb[0][1]
    rnd = select_documents(lm, exemplars, pool, 3, SelectConfig(method="random", seed=1))
    again = select_documents(lm, exemplars, pool, 3, SelectConfig(method="random", seed=1))
    assert len({i for i, _ in rnd}) == 3 and [i for i, _ in rnd] == [i for i, _ in again]
    # features representation: codes of the atlas's SNMF features
    docs = default_corpus(n_docs=10, seed=0)
    config = FeatureConfig(k=4, top_k=2, max_length=24)
    write_features(tmp_path / "f", lm, fit_features(lm, docs, config), docs, config=config)
    fpat = activation_patterns(lm, pool, SelectConfig(representation="features", atlas=tmp_path / "f", top=3))
    assert fpat.shape == (6, 4) and ((fpat > 0).sum(1) <= 3).all()
    with pytest.raises(Exception, match="k=9"):
        select_documents(lm, exemplars, pool, 9)


def test_select_data_cli(capsys, model_dir, tmp_path, write_jsonl):
    pool = write_jsonl([{"text": t, "doc_id": f"d{i}"} for i, t in enumerate(
        ["a cat sat", "a dog ran", "1 2 3 4", "5 6 7 8", "the sun rose"])], "pool.jsonl")
    ex = write_jsonl([{"text": "9 8 7 6"}], "ex.jsonl")
    out = tmp_path / "sel.jsonl"
    code, stdout, err = run_cli(capsys, "select-data", "--model", str(model_dir), "--exemplars", str(ex), "--pool",
                                str(pool), "--k", "2", "--out", str(out), "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rank"] for r in rows] == [0, 1] and rows[0]["score"] >= rows[1]["score"]
    assert {"doc_id", "text", "pool_index"} <= set(rows[0])
    code, _, err = run_cli(capsys, "select-data", "--model", str(model_dir), "--exemplars", str(ex), "--pool",
                           str(pool), "--k", "9", "--out", str(out))
    assert code == 2 and "k=9" in err
    code, _, err = run_cli(capsys, "select-data", "--model", str(model_dir), "--exemplars", str(ex), "--pool",
                           str(pool), "--k", "2", "--out", str(out), "--representation", "features")
    assert code == 2 and "--atlas" in err
    code, _, err = run_cli(capsys, "select-data", "--model", str(model_dir), "--exemplars", str(ex), "--pool",
                           str(pool), "--k", "2", "--out", str(out), "--layers", "1,1")
    assert code == 2 and "distinct" in err
    code, _, err = run_cli(capsys, "select-data", "--model", str(model_dir), "--exemplars", str(tmp_path / "no.jsonl"),
                           "--pool", str(pool), "--k", "2", "--out", str(out))
    assert code == 2 and "not found" in err


def test_lora_proxy_lowers_training_perplexity_and_restores_the_model(llama):
    pytest.importorskip("peft")
    from neuronatlas.features.finetune import LoraConfig, lora_perplexity
    from neuronatlas.record.batching import encode, forward

    batch = encode(llama, ["the cat sat on the mat"])
    logits_before = forward(llama, batch).logits.clone()
    texts = ["a b c d e f g h"] * 4
    result = lora_perplexity(llama, texts, texts, LoraConfig(steps=30, lr=1e-2, max_length=16))
    assert result["ppl_after"] < result["ppl_before"] and result["last_loss"] < result["first_loss"]
    assert "q_proj" in result["targets"]
    assert torch.equal(forward(llama, batch).logits, logits_before)          # adapters removed
    assert not any("lora" in n for n, _ in llama.model.named_modules())


def test_concept_directions_for_the_steering_comparison(llama, tmp_path):
    from neuronatlas.directions import steering_sweep
    from neuronatlas.features.select import SelectConfig, activation_patterns
    from neuronatlas.features.steer import concept_directions, standardised_difference

    docs = default_corpus(n_docs=12, seed=0)
    config = FeatureConfig(k=4, top_k=2, max_length=24)
    write_features(tmp_path / "f", llama, fit_features(llama, docs, config), docs, config=config)
    pos = ["le chat est noir", "la maison est grande", "il fait beau ce matin"]
    neg = ["the cat is black", "the house is big", "it is nice this morning"]
    sets = concept_directions(llama, tmp_path / "f", pos, neg, layer=1, concept="fr", n_neurons=3)
    assert set(sets) == {"feature", "mean_diff", "neurons"}
    for ds in sets.values():
        assert ds.layers == [1] and float(ds.vectors[0].norm()) == pytest.approx(1.0, abs=1e-5)
        assert ds.mean_norm == sets["mean_diff"].mean_norm                 # matched steering norm
    codes = activation_patterns(llama, pos + neg, SelectConfig(representation="features", atlas=tmp_path / "f",
                                                               layers=(1,), top=4))
    best = int(standardised_difference(codes[:3], codes[3:]).argmax())
    assert sets["feature"].extra["feature"] == best
    out_dir = read_components(tmp_path / "f", 1, key="out_dirs")[best]
    assert torch.allclose(sets["feature"].vectors[0], out_dir / out_dir.norm(), atol=1e-6)
    assert len(sets["neurons"].extra["neurons"]) == 3
    res = steering_sweep(llama, ["The weather is"], sets["feature"], layers=[1], alphas=[2.0],
                         score=lambda texts: [0.0] * len(texts), alpha_unit="norm", max_new_tokens=3)
    assert len(res.cells) == 1 and res.cells[0].alpha == 2.0
