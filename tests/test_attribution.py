"""Gradient attribution (stats/attribution.py) on tiny random models: against finite differences,
against zero-ablation, one forward + one backward per batch, and the scorer interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronatlas.errors import DatasetError
from neuronatlas.intervene import Ablate, NeuronSet
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record.batching import count_forwards, encode_ids
from neuronatlas.record.hooks import count_hooks, site_hooks
from neuronatlas.stats.attribution import AttributionScorer, attribute, attribution_batch
from neuronatlas.stats.scorers import MODEL_SCORERS, scorer

PROMPTS = ["The capital of France is", "Iron has the symbol", "My favourite animal is a", "Madrid is in"]
TARGETS = [" Paris", " Fe", " dog", " Spain"]


def _objective(lm, prompt: str, target: str, shift: dict[tuple[int, int, int], float] | None = None) -> float:
    """log p(target | prompt), with ``shift`` added to activation (layer, position, neuron)."""
    p = encode_ids(lm, [prompt])[0]
    t = encode_ids(lm, [target], add_special_tokens=False)[0]
    ids = torch.tensor([p + t])

    def edit(layer, h):
        if not shift:
            return None
        h = h.clone()
        for (lay, pos, j), d in shift.items():
            if lay == layer:
                h[0, pos, j] = h[0, pos, j] + d
        return h

    with torch.no_grad(), site_hooks(lm, "mlp", edit=edit, batch_size=1):
        logits = lm.model(input_ids=ids, use_cache=False).logits.double()
    logp = logits[0].log_softmax(-1)
    return float(sum(logp[len(p) - 1 + k, tok] for k, tok in enumerate(t)))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_attribution_equals_finite_difference(family):
    """a * dlogp/da equals a * (f(a + d) - f(a - d)) / (2 d), d = 1e-2, in float64 weights (eager
    attention still takes its softmax in float32, hence d is not tiny): |diff| <= 1e-8 + 1e-3 |value|."""
    lm = tiny_model(family)
    lm.model.double()
    prompt, target = PROMPTS[0], TARGETS[0]
    p = encode_ids(lm, [prompt])[0]
    t = encode_ids(lm, [target], add_special_tokens=False)[0]
    b = attribution_batch(lm, [p], [t])
    width = len(p) + len(t)
    rng = np.random.default_rng(0)
    d = 1e-2
    checked = 0
    for _ in range(12):
        layer = int(rng.integers(lm.n_layers))
        pos = int(rng.integers(width - 1))
        j = int(rng.integers(lm.n_neurons))
        up = _objective(lm, prompt, target, {(layer, pos, j): d})
        down = _objective(lm, prompt, target, {(layer, pos, j): -d})
        fd = float(b.activation[layer, 0, pos, j]) * (up - down) / (2 * d)
        got = float(b.product[layer, 0, pos, j])
        assert abs(got - fd) <= 1e-8 + 1e-3 * abs(fd), (layer, pos, j, got, fd)
        checked += 1
    assert checked == 12
    # the objective is the same log-probability the plain forward gives
    assert float(b.logprob[0]) == pytest.approx(_objective(lm, prompt, target), abs=1e-9)
    # the last token predicts nothing: it is no valid position, and its attribution is 0
    assert not bool(b.valid[0, width - 1])
    assert float(b.product[:, 0, width - 1].abs().max()) == 0.0


def test_prob_objective_is_p_times_dp():
    """objective='prob': max_t(a * dp/da) * p, checked against the finite difference of p itself."""
    lm = tiny_model("llama")
    lm.model.double()
    res = attribute(lm, PROMPTS[:1], TARGETS[:1], objective="prob", reduce="max")
    plain = attribute(lm, PROMPTS[:1], TARGETS[:1], objective="logprob", reduce="max")
    p = float(res.prob[0])
    assert p == pytest.approx(np.exp(_objective(lm, PROMPTS[0], TARGETS[0])), rel=1e-9)
    np.testing.assert_allclose(res.scores, plain.scores * p * p, rtol=1e-5, atol=1e-12)
    # one neuron, one position: a * dp/da by finite differences of p
    pi = encode_ids(lm, [PROMPTS[0]])[0]
    layer, pos, j, d = 1, len(pi) - 1, 5, 1e-2
    t = encode_ids(lm, [TARGETS[0]], add_special_tokens=False)[0]
    b = attribution_batch(lm, [pi], [t])
    fd = float(b.activation[layer, 0, pos, j]) * (
        np.exp(_objective(lm, PROMPTS[0], TARGETS[0], {(layer, pos, j): d}))
        - np.exp(_objective(lm, PROMPTS[0], TARGETS[0], {(layer, pos, j): -d}))) / (2 * d)
    assert float(b.product[layer, 0, pos, j]) * p == pytest.approx(fd, rel=1e-3, abs=1e-10)


def test_zero_ablation_effects_correlate_with_attributions():
    """Zeroing a neuron everywhere changes log p by about minus its summed attribution: over every
    neuron of a tiny model the Spearman correlation is above 0.8."""
    from scipy import stats

    lm = tiny_model("llama")
    res = attribute(lm, PROMPTS[:1], TARGETS[:1], objective="logprob", reduce="sum")
    from neuronatlas.evaluate import target_logprobs

    pairs = [(layer, j) for layer in range(lm.n_layers) for j in range(lm.n_neurons)]
    conds = [()] + [(Ablate(NeuronSet.of([pair], "mlp")),) for pair in pairs]
    got = target_logprobs(lm, PROMPTS[:1], TARGETS[:1], conditions=conds)
    effect = (got.logprob[1:, 0] - got.logprob[0, 0]).numpy()
    linear = np.array([-res.scores[0, layer, j] for layer, j in pairs])
    rho = stats.spearmanr(effect, linear).statistic
    assert rho > 0.8, rho


def test_one_forward_per_batch_and_padding_invariance():
    lm = tiny_model("qwen2")
    with count_forwards(lm) as calls:
        res = attribute(lm, PROMPTS, TARGETS, batch_size=4)
    assert calls.forwards == 1 and calls.rows == 4
    alone = np.stack([attribute(lm, [p], [t]).scores[0] for p, t in zip(PROMPTS, TARGETS)])
    np.testing.assert_allclose(res.scores, alone, rtol=1e-4, atol=1e-7)
    assert res.scores.shape == (4, lm.n_layers, lm.n_neurons) and res.magnitude.shape == (lm.n_layers, lm.n_neurons)
    assert count_hooks(lm.model) == 0
    # no parameter gradient is left behind
    assert all(p.grad is None for p in lm.model.parameters())


def test_scorer_interface_and_registry():
    lm = tiny_model("llama")
    assert "attribution" in MODEL_SCORERS
    sc = scorer("attribution", lm=lm).fit_prompts(PROMPTS, TARGETS, [0, 0, 1, 1])
    assert sc.scores_.shape == (2, lm.n_layers * lm.n_neurons)
    chosen = sc.select(0, 5)
    assert len(chosen) == 5 and chosen.component == "mlp"
    flat = sc.top_indices(0, 5)
    assert np.all(np.diff(sc.scores_[0][flat]) <= 0)
    # against a control set: concept mean minus control mean
    res = attribute(lm, PROMPTS, TARGETS)
    ctrl = attribute(lm, PROMPTS[:2], TARGETS[:2]).scores
    fitted = AttributionScorer().fit(res.scores, [0, 0, 1, 1], control=ctrl)
    np.testing.assert_allclose(fitted.scores_[1], (res.scores[2:].mean(0) - ctrl.mean(0)).ravel(), rtol=1e-5, atol=1e-8)
    assert len(fitted.select(1, 4, tails="both")) == 6


def test_bad_inputs_are_one_line_errors():
    lm = tiny_model("llama")
    with pytest.raises(DatasetError, match="one target per prompt"):
        attribute(lm, PROMPTS, TARGETS[:2])
    with pytest.raises(DatasetError, match="non-empty target"):
        attribute(lm, PROMPTS[:1], [""])
    with pytest.raises(DatasetError, match="needs the model"):
        AttributionScorer().fit_prompts(PROMPTS, TARGETS, [0, 0, 1, 1])
    with pytest.raises(DatasetError, match="not a record"):
        AttributionScorer(lm).fit_record(object())
    with pytest.raises(DatasetError, match="choose objective"):
        attribute(lm, PROMPTS, TARGETS, objective="nope")  # type: ignore[arg-type]


def test_attribution_scorer_in_the_relation_study(tmp_path):
    """`--scorer attribution` in another study: the relation study selects by attribution on its
    identification prompts and their gold objects."""
    from neuronatlas.data.relations import build_relation_facts
    from neuronatlas.studies.relations import RelationStudyConfig, _split_facts, concept_name, run_relation_study

    lm = tiny_model("llama")
    cfg = RelationStudyConfig(relations=("country_capital", "country_language"), langs=("en",), scorer="attribution",
                              max_identify_facts=5, max_test_facts=3, n_random=1, grid=(0.5,), min_known=0,
                              select_n=6, batch_size=8)
    res = run_relation_study(lm, tmp_path / "study", cfg)
    assert res["selection"]["method"] == "attribution"
    facts = build_relation_facts(["country_capital", "country_language"], langs=["en"], n_test=50, seed=0)
    ident, _, _ = _split_facts(facts, cfg)
    concepts = ["country_capital", "country_language"]
    want = AttributionScorer(lm).fit_prompts([r["text"] for r in ident], [r["target"] for r in ident],
                                             [concepts.index(concept_name(r["relation"], r["lang"])) for r in ident])
    for k, c in enumerate(concepts):
        got = res["selection"]["neurons"][c]
        assert got == [f"L{a}:{b}" for a, b in (divmod(int(f), lm.n_neurons) for f in want.top_indices(k, 6))]
