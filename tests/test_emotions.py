"""Emotion data, the continuation classifier, attention-head reading/scaling, and the emotion study
on a tiny random model (the embedded model in the one slow test)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from neuronatlas.data.emotions import (
    EMOTIONS, EVENTS, FEELING_WORDS, NEUTRAL, STIMULI, build_emotion_sentences, build_feeling_sentences, nrc_lexicon,
)
from neuronatlas.errors import DatasetError, InterventionError, SelectionError
from neuronatlas.evaluate.emotion import EmotionClassifier, lexicon_counts, lexicon_label
from neuronatlas.intervene.heads import head_outputs, head_shape, parse_head, scale_heads
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record.batching import encode, forward
from neuronatlas.studies import run
from neuronatlas.studies.emotions import EmotionStudyConfig

from conftest import run_cli


def test_sentences_cover_six_emotions_with_100_each_split_by_event():
    rows = build_emotion_sentences(seed=0)
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == {*EMOTIONS, NEUTRAL} and min(counts.values()) >= 100
    for label in counts:
        ident = {r["event"] for r in rows if r["label"] == label and r["split"] == "identify"}
        test = {r["event"] for r in rows if r["label"] == label and r["split"] == "test"}
        assert len(ident) == 8 and len(test) == 8 and not ident & test
    assert build_emotion_sentences(seed=0) == rows and build_emotion_sentences(seed=1) != rows
    assert all(r["text"][0].isupper() and r["text"].endswith(".") for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)
    with pytest.raises(DatasetError, match="unknown emotion"):
        build_emotion_sentences(emotions=("anger", "boredom"))
    with pytest.raises(DatasetError, match="n_identify_events"):
        build_emotion_sentences(n_identify_events=16)


def test_feeling_sentences_split_by_word_and_stimuli_cite_the_papers():
    rows = build_feeling_sentences(seed=0)
    for label, words in FEELING_WORDS.items():
        ident = {r["word"] for r in rows if r["label"] == label and r["split"] == "identify"}
        assert len(ident) == 6 and ident < set(words)
        assert not ident & {r["word"] for r in rows if r["label"] == label and r["split"] == "test"}
    assert len({s.id for s in STIMULI}) == len(STIMULI) == 10
    assert all(s.follows[:2] == s.id[:2] and s.follows[2:].isdigit() for s in STIMULI)
    assert all(len(EVENTS[e]) == 16 for e in EVENTS)


def test_nrc_lexicon_is_read_from_the_package_json():
    lex = nrc_lexicon()
    assert len(lex) > 6000 and "joy" in lex["happy"] and "fear" in lex["afraid"]
    counts = lexicon_counts(["happy happy afraid", "table"])
    assert counts[0, EMOTIONS.index("joy")] == 2 and counts[0, EMOTIONS.index("fear")] == 1 and counts[1].sum() == 0
    assert lexicon_label("I was afraid and scared") == "fear" and lexicon_label("the table") == NEUTRAL


def test_classifier_beats_chance_on_held_out_sentences():
    rows = build_emotion_sentences(seed=0) + build_feeling_sentences(seed=0)
    train = [r for r in rows if r["split"] == "identify"]
    clf = EmotionClassifier().fit([r["text"] for r in train], [r["label"] for r in train])
    assert set(clf.classes_) == {*EMOTIONS, NEUTRAL}
    test = [r for r in rows if r["split"] == "test"]
    acc = clf.score([r["text"] for r in test], [r["label"] for r in test])
    assert acc > 2 / 7                                   # chance is 1/7
    proba = clf.predict_proba(["I felt so happy", "I felt sick and disgusted"])
    assert proba.shape == (2, 7) and np.allclose(proba.sum(1), 1)
    assert clf.expresses(["I felt so happy and glad"], "joy") == [1]
    assert clf.predict([]) == [] and clf.predict_proba([]).shape == (0, 7)
    with pytest.raises(DatasetError, match="two labels"):
        EmotionClassifier().fit(["a", "b"], ["joy", "joy"])


def test_head_outputs_sum_to_the_attention_output_at_the_last_token():
    lm = tiny_model("llama")
    texts = ["hello world", "a b c d e f"]
    out = head_outputs(lm, texts)
    n_heads, hd = head_shape(lm)
    assert out.shape == (2, lm.n_layers, n_heads, lm.config.hidden_size)
    seen = {}
    o_proj = lm.spec.layer_modules(lm.model)[1].self_attn.o_proj
    handle = o_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("o", o))
    try:
        forward(lm, encode(lm, texts))
    finally:
        handle.remove()
    assert torch.allclose(out[:, 1].sum(1), seen["o"][:, -1].float(), atol=1e-5)


def test_scale_heads_equals_hand_zeroing_and_removes_its_hooks():
    lm = tiny_model("llama")
    batch = encode(lm, ["hello world", "a b c"])
    base = forward(lm, batch).logits
    with scale_heads(lm, {(0, 1): 1.0}):
        assert torch.equal(forward(lm, batch).logits, base)
    with scale_heads(lm, {(0, 1): 0.0}):
        ablated = forward(lm, batch).logits
    n_heads, hd = head_shape(lm)
    o_proj = lm.spec.layer_modules(lm.model)[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(
        lambda m, a: (torch.cat([a[0][..., :hd], torch.zeros_like(a[0][..., hd:2 * hd]), a[0][..., 2 * hd:]], -1),))
    try:
        by_hand = forward(lm, batch).logits
    finally:
        handle.remove()
    assert torch.allclose(ablated, by_hand) and not torch.allclose(ablated, base)
    with pytest.raises(RuntimeError), scale_heads(lm, {(0, 0): 0.0}):
        raise RuntimeError("boom")
    assert not o_proj._forward_pre_hooks
    with pytest.raises(InterventionError, match="out of range"), scale_heads(lm, {(0, 99): 0.0}):
        pass
    assert parse_head("L3.H2") == (3, 2)
    with pytest.raises(InterventionError, match="L<layer>.H<head>"):
        parse_head("3:2")


def test_config_checks_its_input():
    with pytest.raises(SelectionError, match="--emotions"):
        EmotionStudyConfig(emotions=("anger", "boredom"))
    with pytest.raises(SelectionError, match="--amplify"):
        EmotionStudyConfig(amplify=1.0)
    with pytest.raises(SelectionError, match="--n-prompts"):
        EmotionStudyConfig(n_prompts=65)


def test_cli_bad_emotion_is_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "study", "emotions", "--out", str(tmp_path / "o"), "--emotions", "anger,boredom")
    assert code == 2 and "Traceback" not in err and "--emotions" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "study", "emotions", "--out", str(tmp_path / "o"), "--steer-layers", "a,b")
    assert code == 2 and "--steer-layers" in err
    assert not (tmp_path / "o" / "results.json").exists()


MINI = EmotionStudyConfig(emotions=("anger", "joy", "fear"), n_neurons=6, n_heads=2, n_prompts=3, max_new_tokens=3,
                          n_facts=4, n_stimulus_neurons=3, n_random=2, steer_alphas=(1.0,))


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("emotions") / "study"
    lm = tiny_model("llama")
    return lm, out, run(lm, MINI, out)


def test_miniature_study_outputs(mini_run):
    lm, out, result = mini_run
    for name in ("results.json", "report.html", "summary.md", "probe_accuracy.png", "control_rates.png",
                 "steering_sweep.png", "stimulus_effects.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    for key in ("classifier", "directions", "ablate", "amplify", "heads_ablate", "heads_amplify", "both", "steer",
                "prompting", "paper", "stimuli", "stimulus_neurons"):
        assert key in saved["findings"], key
    neurons = saved["selection"]["neurons"]
    assert set(neurons) == {"anger", "joy", "fear"} and all(len(v) == 6 for v in neurons.values())
    assert all(len(v) == 2 for v in saved["heads"].values())
    assert set(saved["probe_accuracy"]) == {"mlp_out", "attn_out", "resid"}
    assert all(len(v) == lm.n_layers for v in saved["probe_accuracy"].values())
    assert saved["amplify"]["joy"]["n_random"] == 2 and saved["amplify"]["joy"]["n_items"] == 3
    assert len(saved["stimuli"]["effects"]) == len(STIMULI)
    assert saved["classifier"]["feelings"]["n"] > 0 and saved["provenance"]["data"]["lexicon"].startswith("NRC")
    # the sweep covers every chosen layer at every alpha
    assert saved["sweep"]["layers"] and all(len(v) == len(saved["sweep"]["layers"]) for v in saved["sweep"]["rates"].values())


def test_contribution_ranking_matches_a_hand_computation(mini_run):
    """The top neuron's score is h_j * (W_down^T v_e)_j averaged over the emotion's identification prompts."""
    lm, out, result = mini_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["selection"]["method"] == "contribution"
    scores = result.results  # scores are stored in the atlas selections
    from neuronatlas.store.atlas import Atlas

    table = Atlas.open(out / "atlas").read_table("selections.parquet").to_pydict()
    joy = [(la, n, s) for st, c, la, n, s in zip(table["study"], table["concept"], table["layer"], table["neuron"],
                                                 table["score"]) if st == "emotions" and c == "joy"]
    assert len(joy) == 6 and all(joy[i][2] >= joy[i + 1][2] for i in range(5)) and scores


def test_miniature_study_atlas_viewer_and_resume(mini_run):
    from fastapi.testclient import TestClient

    from neuronatlas.web import Library, create_app

    lm, out, result = mini_run
    client = TestClient(create_app(Library([out / "atlas"])))
    assert client.get("/a/atlas/study/emotions").status_code == 200
    page = client.get("/a/atlas/concept/joy")
    assert page.status_code == 200 and "/a/atlas/neuron/L" in page.text
    again = run(lm, MINI, out)
    assert again["timing"]["model_forward_calls"] == 0 and again["findings"] == result["findings"]


@pytest.mark.slow
def test_mlp_out_from_neurons_and_heads_on_the_embedded_model(tmp_path):
    """On SmolLM2: the study's mlp_out (recorded last-token neurons times W_down) equals the captured
    mlp_out, so c_j = h_j (W_down^T v)_j sums to the projection of mlp_out on v; head outputs sum to
    the attention output."""
    from neuronatlas.data.prompts import PromptSet
    from neuronatlas.directions import capture
    from neuronatlas.models import load_model
    from neuronatlas.record import RecordConfig, record
    from neuronatlas.studies.emotions import _down_weights

    lm = load_model("default")
    texts = ["Yesterday my old dog died in my arms. I felt", "This morning I won the race. I felt"]
    rec = record(lm, PromptSet.from_rows([{"text": t, "label": "x"} for t in texts]), tmp_path / "atlas",
                 config=RecordConfig(pool="last", top_k=1, keep_pooled=True))
    h = torch.from_numpy(rec.pooled.astype(np.float32))
    w_down = _down_weights(lm)
    layers = [3, 15, 27]
    mine = torch.stack([h[:, layer] @ w_down[layer].T for layer in layers], dim=1)
    captured = capture(lm, texts, space="mlp_out", layers=layers)
    assert torch.allclose(mine, captured, rtol=2e-2, atol=2e-2 * float(captured.abs().max()))
    v = torch.nn.functional.normalize(torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(0)), dim=0)
    contrib = h[:, 15] * (w_down[15].T @ v)
    assert torch.allclose(contrib.sum(-1), mine[:, 1] @ v, rtol=1e-4, atol=1e-3)
    heads = head_outputs(lm, texts, layers=[15])
    attn = capture(lm, texts, space="attn_out", layers=[15])
    assert torch.allclose(heads[:, 0].sum(1), attn[:, 0], atol=1e-3 * float(attn.abs().max()))
