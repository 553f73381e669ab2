"""Slow tests on the embedded SmolLM2-135M-Instruct model (run in CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neuronatlas.data.prompts import PromptSet
from neuronatlas.models import load_model
from neuronatlas.record import RecordConfig, record
from neuronatlas.record.batching import encode, forward
from neuronatlas.studies.relations import RelationStudyConfig, run_relation_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_model("default")


def test_embedded_model_shape_and_plain_logits(smollm):
    assert (smollm.spec.family, smollm.n_layers, smollm.n_neurons) == ("llama", 30, 1536)
    assert smollm.provenance["file_sha256"]
    batch = encode(smollm, ["The capital of France is"])
    ours = forward(smollm, batch).logits
    plain = smollm.model(input_ids=batch["input_ids"]).logits
    assert torch.equal(ours, plain)
    assert smollm.tokenizer.decode(ours[0, -1].argmax()) == " Paris"


def test_record_small_dataset_on_embedded_model(smollm, tmp_path):
    prompts = PromptSet.from_rows([
        {"text": "The capital of France is Paris.", "label": "geo"},
        {"text": "Berlin is the capital of Germany.", "label": "geo"},
        {"text": "My dog likes to play in the garden.", "label": "animal"},
        {"text": "The cat slept on the sofa all day.", "label": "animal"},
    ])
    res = record(smollm, prompts, tmp_path / "atlas", config=RecordConfig(batch_size=2, top_k=3))
    assert res.moments.mean.shape == (2, 30, 1536)
    assert res.pooled.shape == (4, 30, 1536) and np.isfinite(res.pooled.astype(np.float32)).all()
    assert 0 < float(res.moments.act_prob.mean()) < 1


def test_miniature_relation_study_on_embedded_model(smollm, tmp_path):
    cfg = RelationStudyConfig(relations=("country_capital", "element_symbol"), langs=("en",), max_identify_facts=8,
                              max_test_facts=10, n_random=2, grid=(0.1, 1.0), min_known=2, select_n=200)
    res = run_relation_study(smollm, tmp_path / "study", cfg)
    out = tmp_path / "study"
    saved = json.loads((out / "results.json").read_text())
    for name in ("report.html", "overlap.png", "layers.png"):
        assert (out / name).stat().st_size > 1000
    bt = saved["baseline_table"]
    state = json.loads((out / "state.json").read_text())["data"]
    for rel, row in bt.items():  # the table is consistent with the per-fact results
        base = state[f"arm|baseline|{rel}"]
        assert row["first_token_acc"] == pytest.approx(np.mean(base["first"]))
        assert row["known"] == sum(base["exact"]) and row["known"] <= sum(base["first"])
    assert bt["country_capital"]["known"] >= 2, "the model should know a few capitals"
    for rel in saved["evaluated_relations"]:
        rows = saved["cumulativity"][rel]
        assert [r["n_neurons"] for r in rows] == [20, 200]
        assert all(0.0 <= r["acc_selected"] <= 1.0 for r in rows)
        assert (out / f"cumulativity_{rel}.png").exists()
    assert all(len(v) == 200 for v in saved["selection"]["neurons"].values())
    html = (out / "report.html").read_text()
    assert saved["findings"]["baseline"] in html
