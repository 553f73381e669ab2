"""The study framework: comparisons against hand computations, matched random arms, resume, and a
planted effect on a tiny model (neurons made causal by construction are found and pass the tests;
random neurons do not)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from scipy import stats

from neuronatlas.intervene import Ablate, NeuronSet
from neuronatlas.models.tiny import tiny_model
from neuronatlas.report.model import Finding, Section, StudyReport, Table
from neuronatlas.studies import run
from neuronatlas.studies.framework import Arm, Grid, Measured, StudyConfig, json_safe
from neuronatlas.studies.relations import RelationStudyConfig


class _Ctx:
    """The two attributes a Grid needs (random sets are not drawn here)."""

    def __init__(self) -> None:
        self.config = StudyConfig(n_random=3)


def _measured() -> Measured:
    grid = Grid(_Ctx())  # type: ignore[arg-type]
    grid.add(Arm("base", (), "x", "baseline"))
    grid.add(Arm("sel", (), "x", "selected"))
    for s in range(3):
        grid.add(Arm(f"sel|rand{s}", (), "x", "random", of="sel"))
    grid.add(Arm("sub", (), "x", "selected", subset=(1, 3, 5)))
    values = {"base": {"ok": [1, 1, 1, 1, 0, 1], "lp": [-1.0, -1.0, -2.0, -1.5, -3.0, -1.0]},
              "sel": {"ok": [0, 0, 1, 0, 0, 1], "lp": [-4.0, -3.0, -2.5, -4.0, -3.0, -1.5]},
              "sel|rand0": {"ok": [1, 1, 1, 1, 0, 1], "lp": [-1.0] * 6},
              "sel|rand1": {"ok": [1, 0, 1, 1, 0, 1], "lp": [-1.0] * 6},
              "sel|rand2": {"ok": [1, 1, 0, 1, 1, 1], "lp": [-1.0] * 6},
              "sub": {"ok": [0, 1, 0], "lp": [-9.0, -9.0, -9.0]}}
    return Measured(grid, values)


def test_compare_against_hand_computations() -> None:
    m = _measured()
    c = m.compare("sel", "ok", baseline="base", alternative="less")
    assert c.selected == pytest.approx(2 / 6) and c.baseline == pytest.approx(5 / 6)
    rand = [5 / 6, 4 / 6, 5 / 6]
    assert c.random_mean == pytest.approx(np.mean(rand)) and c.n_random == 3
    assert c.p_vs_random == pytest.approx(1 / 4)                 # below all 3 random sets: (1 + 0) / (3 + 1)
    # McNemar: 3 facts lost (0, 1, 3), none gained -> one-sided binomial p = 0.5 ** 3
    assert c.p_vs_unmodified == pytest.approx(stats.binomtest(0, 3, 0.5, alternative="less").pvalue)
    assert c.delta == pytest.approx(2 / 6 - 5 / 6)
    # a subset arm is compared on its own items, the baseline restricted to the same items
    s = m.compare("sub", "ok", baseline="base", alternative="less")
    assert s.n_items == 3 and s.selected == pytest.approx(1 / 3) and s.baseline == 1.0
    np.testing.assert_array_equal(m.on("base", "ok", [1, 3, 5]), [1, 1, 1])
    # continuous metric: sign-flip permutation, exact for 6 pairs
    lp = m.compare("sel", "lp", baseline="base", alternative="less", binary=False)
    d = np.array(m.values["sel"]["lp"]) - np.array(m.values["base"]["lp"])
    signs = np.array(np.meshgrid(*[[1, -1]] * 6)).reshape(6, -1).T
    null = (signs * d).mean(axis=1)
    assert lp.p_vs_unmodified == pytest.approx(float((null <= d.mean() + 1e-12).mean()))
    assert json.dumps(c.to_json())                                # JSON-ready, NaN-free


def test_random_arms_measured_on_a_subset_count_only_on_those_items() -> None:
    m = _measured()
    m.grid.add(Arm("known|rand0", (), "x", "random", of="sel", subset=(0, 2)))
    m.values = {**m.values, "known|rand0": {"ok": [0, 0], "lp": [-5.0, -5.0]}}   # type: ignore[misc]
    on_known = m.compare("sel", "ok", baseline="base", subset=[0, 2])
    assert on_known.n_random == 4 and on_known.random_mean == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    # on all items the subset arm cannot be compared: it is left out, not averaged over 2 of 6 items
    on_all = m.compare("sel", "ok", baseline="base")
    assert on_all.n_random == 3 and on_all.random_mean == pytest.approx(np.mean([5 / 6, 4 / 6, 5 / 6]))


def test_interference_candidates_are_every_pair_the_rule_can_pass() -> None:
    """Random sets are spent only on pairs with an uncorrected McNemar p < alpha: BH never lowers a
    p-value, so a pair outside that set is never flagged, whatever the other pairs' p-values."""
    from neuronatlas.stats.inference import benjamini_hochberg
    from neuronatlas.studies.relations import interference_candidate

    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.uniform(0, 0.2, size=int(rng.integers(1, 12))) ** rng.uniform(0.5, 3)
        flagged = benjamini_hochberg(p, 0.05)
        assert not np.any(flagged & (p >= 0.05))
    m = _measured()
    m.grid.add(Arm("gain", (), "y", "selected"))
    m.grid.add(Arm("base_y", (), "y", "baseline"))
    # a loss is never a candidate; a clear gain over 8 facts is (one-sided p = 0.5 ** 8)
    m.values = {**m.values, "gain": {"exact": [0] * 8}, "base_y": {"exact": [1] * 8}}   # type: ignore[misc]
    assert not interference_candidate(m, "gain", "base_y", 0.05)
    m.values = {**m.values, "gain": {"exact": [1] * 8}, "base_y": {"exact": [0] * 8}}   # type: ignore[misc]
    assert interference_candidate(m, "gain", "base_y", 0.05)
    m.values = {**m.values, "gain": {"exact": [1, 1, 0, 0, 0, 0, 0, 0]}}   # type: ignore[misc]
    assert not interference_candidate(m, "gain", "base_y", 0.05)          # p = 0.25: cannot survive BH


def test_report_round_trip_and_json_safety() -> None:
    rep = StudyReport("s", "S", setup={"x": float("nan")}, findings=[Finding("k", "K", "text", "rule", True, {"v": 1})],
                      sections=[Section("A", "k", figures=["a.png"], tables=[Table(["c"], [[np.float32(1.5)], [None]])])])
    again = StudyReport.from_json(json.loads(json.dumps(rep.to_json())))
    assert again.findings == rep.findings and again.section_text(again.sections[0]) == "text"
    assert again.setup == {"x": None} and again.sections[0].tables[0].rows == ((1.5,), (None,))
    assert json_safe({"a": np.int64(3), "b": (np.nan, 1)}) == {"a": 3, "b": [None, 1]}


# --- a planted effect -----------------------------------------------------------------------------------------
PLANTED = (3, 9, 17, 26)          # neurons of layer 1 made to write " Paris" after " capital"
_WORDS = ["the", "of", "is", "in", "a", "and", "Japan", "France", "Germany", "Spain", "Italy", "dog", "cat", "bird",
          "gold", "iron", "black", "brown", "big", "today", "saw", "my", "animal", "favourite"]


def _planted_facts() -> list[dict]:
    rng = random.Random(0)
    rows = []
    for rel, end, target in (("a", " capital", " Paris"), ("b", " symbol", " Au")):
        for i in range(24):
            words = " ".join(rng.choice(_WORDS) for _ in range(4)).capitalize()
            for t, mid in ((0, " is the"), (1, " has the")):
                rows.append({"text": f"{words}{mid}{end}", "target": target, "relation": rel, "lang": "en",
                             "split": "test" if i < 12 else "identify", "template_id": t, "fact_id": f"{rel}:{i}"})
    return rows


def _planted_model():  # type: ignore[no-untyped-def]
    """A tiny llama whose PLANTED neurons fire on the token ' capital' and write ' Paris' there."""
    lm = tiny_model("llama")
    tok = lm.tokenizer
    trigger = tok.encode(" capital", add_special_tokens=False)[0]
    answer = tok.encode(" Paris", add_special_tokens=False)[0]
    mlp = lm.model.model.layers[1].mlp
    seen: list[torch.Tensor] = []
    hook = mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    enc = tok(["Japan is the capital", "my dog has the capital"], return_tensors="pt", padding=True)
    with torch.no_grad():
        lm.model(**enc)
    hook.remove()
    v = seen[0][enc["input_ids"] == trigger].mean(0)              # the MLP input where ' capital' stands
    w_u = lm.model.lm_head.weight.detach()
    d = torch.linalg.pinv(w_u) @ torch.nn.functional.one_hot(torch.tensor(answer), w_u.shape[0]).float()
    with torch.no_grad():
        for j in PLANTED:
            mlp.gate_proj.weight[j] = 3 * v / v.dot(v)
            mlp.up_proj.weight[j] = 3 * v / v.dot(v)
            mlp.down_proj.weight[:, j] = 40 * d / d.norm() / len(PLANTED)
    return lm


def test_planted_neurons_are_found_pass_the_tests_and_random_ones_do_not(tmp_path) -> None:
    from neuronatlas.evaluate import target_logprobs

    lm, facts = _planted_model(), _planted_facts()
    test = [r for r in facts if r["split"] == "test" and r["template_id"] == 0]
    planted = NeuronSet.of([(1, j) for j in PLANTED])
    before = target_logprobs(lm, [r["text"] for r in test], [r["target"] for r in test],
                             conditions=[(), (Ablate(planted),)]).exact
    assert before[0][: 12].all() and not before[1].any()         # the construction works: causal by design
    cfg = RelationStudyConfig(langs=("en",), select_n=4, n_random=19, grid=(0.5, 1.0), min_known=3,
                              max_identify_facts=12, max_test_facts=12)
    res = run(lm, cfg, tmp_path / "study", facts=facts)
    assert res["selection"]["neurons"]["a"] == [f"L1:{j}" for j in PLANTED]     # found
    own = res["own_effect"]["a"]
    assert own["selected"] == 0.0 and own["baseline"] == 1.0 and own["n_random"] == 19
    assert own["p_vs_random"] == pytest.approx(1 / 20) and own["p_vs_unmodified"] < 1e-3
    assert own["random_lo"] == 1.0                               # no random set loses a single fact
    f = {x.key: x for x in res.report.findings}
    assert f["own_effect"].holds is True and f["own_effect"].numbers["passed"] == ["a"]
    assert res["evaluated_relations"] == ["a"]                   # b is unknown to the model: not evaluated
    # a rerun computes nothing: every arm comes from state.json
    again = run(lm, cfg, tmp_path / "study", facts=facts)
    assert again["timing"]["model_forward_calls"] == 0 and again["own_effect"] == res["own_effect"]
