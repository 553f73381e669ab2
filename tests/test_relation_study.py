"""Relation study: baselines, matrices and statistics against hand computations; a miniature run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuronatlas.intervene import NeuronSet
from neuronatlas.models.tiny import tiny_model
from neuronatlas.store import Atlas
from neuronatlas.studies.common import jaccard, mean_ci, random_like
from neuronatlas.studies.relations import RelationStudyConfig, run_relation_study
from neuronatlas.studies.relations_report import summarise


def test_random_baseline_matches_layers_and_avoids_selected():
    sel = NeuronSet.of([(0, 1), (0, 2), (3, 5), (3, 6), (3, 7)])
    for seed in range(5):
        rnd = random_like(sel, n_neurons=20, seed=seed)
        assert {k: len(v) for k, v in rnd.by_layer().items()} == {0: 2, 3: 3}
        assert not set(rnd.pairs) & set(sel.pairs)
    assert random_like(sel, 20, seed=1) == random_like(sel, 20, seed=1)
    assert random_like(sel, 20, seed=1) != random_like(sel, 20, seed=2)


def test_jaccard_and_ci_by_hand():
    a, b = NeuronSet.of([(0, 1), (0, 2), (1, 1)]), NeuronSet.of([(0, 2), (1, 1), (2, 2)])
    assert jaccard(a, b) == pytest.approx(2 / 4)
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2 - 4.302652729911275 * 1 / np.sqrt(3))
    assert mean_ci([0.5])[1] == 0.5


def _fake_results():
    """Two relations, 4 facts each, seeds=2, grid (0.5, 1.0), 2 selected neurons each."""
    base = {"a": {"correct": [1, 1, 1, 0], "exact": [1, 1, 0, 0], "logprob": [-1, -1, -3, -3]},
            "b": {"correct": [1, 1, 1, 0], "exact": [1, 1, 1, 0], "logprob": [-1, -1, -1, -4]}}

    def e(c, lp):
        return {"correct": c, "exact": c, "logprob": lp}

    raw = {
        "a": {"baseline": base["a"], "deact:a": e([0, 0, 0, 0], [-5, -5, -5, -5]), "deact:b": e([1, 1, 1, 0], [-1, -1, -2, -3]),
              "rand:a:0": e([1, 1, 0, 0], [-1, -1, -3, -3]), "rand:a:1": e([1, 0, 0, 0], [-1, -2, -3, -3]),
              "rand:b:0": e([1, 1, 0, 0], [-1, -1, -3, -3]), "rand:b:1": e([1, 1, 0, 0], [-1, -1, -3, -3]),
              # cumulativity conditions are evaluated on the known facts only (idx 0 and 1)
              "cum:0.5": {**e([1, 0], [-2, -3]), "idx": [0, 1]}, "cumrand:0.5:0": {**e([1, 1], [-1, -1]), "idx": [0, 1]},
              "cumrand:0.5:1": {**e([1, 1], [-1, -1]), "idx": [0, 1]}},
        "b": {"baseline": base["b"], "deact:b": e([0, 1, 0, 0], [-4, -1, -4, -4]), "deact:a": e([1, 1, 1, 0], [-1, -1, -1, -4]),
              "rand:a:0": e([1, 1, 1, 0], [-1, -1, -1, -4]), "rand:a:1": e([1, 1, 1, 0], [-1, -1, -1, -4]),
              "rand:b:0": e([1, 1, 1, 0], [-1, -1, -1, -4]), "rand:b:1": e([1, 1, 0, 0], [-1, -1, -2, -4]),
              "cum:0.5": e([1, 1, 0, 0], [-1, -1, -3, -4]), "cumrand:0.5:0": e([1, 1, 1, 0], [-1, -1, -1, -4]),
              "cumrand:0.5:1": e([1, 1, 1, 0], [-1, -1, -1, -4])},
    }
    return {"config": {"seeds": 2, "grid": [0.5, 1.0], "min_known": 1}, "baseline": base, "raw": raw,
            "evaluated_relations": ["a", "b"], "n_layers": 4,
            "selected": {"a": [[1, 0], [2, 3]], "b": [[1, 0], [3, 1]]}}


def test_summary_tables_by_hand():
    s = summarise(_fake_results())
    cum_a = s["cumulativity"]["a"]
    # known facts of a: the first two. 50%: 1 neuron, accuracy 1/2; random 1.0 and 1.0
    assert cum_a[0]["n_neurons"] == 1 and cum_a[0]["acc_selected"] == 0.5 and cum_a[0]["acc_random"] == 1.0
    assert cum_a[0]["delta_logprob_selected"] == pytest.approx(((-2 + 1) + (-3 + 1)) / 2)
    # 100% reuses deact:a (0/2) and rand:a:* (1.0, 0.5)
    assert cum_a[1]["acc_selected"] == 0.0 and cum_a[1]["acc_random"] == 0.75
    cd = s["cross_deactivation"]
    m = np.array(cd["delta_acc_all"])
    assert m[0, 0] == pytest.approx(0 - 0.5)          # deactivate a, evaluate a (all facts)
    assert m[1, 0] == pytest.approx(0.75 - 0.5)       # deactivate b raises a: interference
    assert m[0, 1] == pytest.approx(0.75 - 0.75)
    assert m[1, 1] == pytest.approx(0.25 - 0.75)
    assert [(d["deactivated"], d["evaluated"]) for d in s["interference"]] == [("b", "a")]
    # tested against the unmodified model: 1 fact gained, 0 lost -> exact one-sided McNemar p = 1/2
    (pair,) = s["interference"]
    assert pair["p_mcnemar"] == pytest.approx(0.5) and not pair["significant_fdr05"]
    assert s["interference_tested"] == 2
    # known facts and accuracies use the whole object (exact), the first token is a secondary column
    assert s["baseline_table"]["a"]["known"] == 2 and s["baseline_table"]["a"]["first_token_acc"] == 0.75
    # the selected set's rank among the 2 random sets: (1 + 0) / (1 + 2)
    assert cum_a[1]["p_vs_random"] == pytest.approx(1 / 3)
    assert cum_a[1]["acc_random_lo"] == pytest.approx(0.5125) and cum_a[1]["acc_random_hi"] == pytest.approx(0.9875)
    # dose-response over the grid on the same known facts: 0.5 -> 0.0
    trend = s["trend"]["a"]
    assert trend["slope"] == pytest.approx(-1.0) and trend["rising_steps"] == []
    assert s["overlap"]["jaccard"][0][1] == pytest.approx(1 / 3)
    assert s["layers"]["a"] == [0, 1, 1, 0]


def test_miniature_study_on_tiny_model(tmp_path):
    lm = tiny_model("llama")
    cfg = RelationStudyConfig(relations=("country_capital", "country_language", "country_continent"), langs=("en", "de"),
                              max_identify_facts=6, max_test_facts=5, seeds=2, grid=(0.5, 1.0), min_known=0,
                              select_n=8, batch_size=8, cumulativity_on="all")
    res = run_relation_study(lm, tmp_path / "study", cfg)
    assert set(res["evaluated_relations"]) == {"country_capital", "country_language", "country_continent"}
    saved = json.loads((tmp_path / "study/results.json").read_text())
    assert saved["summary"]["cross_deactivation"]["relations"] == res["evaluated_relations"]
    assert len(saved["selected"]["country_capital"]) == 8
    for name in ("report.html", "overlap.png", "layers.png", "cross_deactivation.png", "cumulativity_country_capital.png"):
        assert (tmp_path / "study" / name).stat().st_size > 0
    html = (tmp_path / "study/report.html").read_text()
    assert "Cumulativity" in html and res["findings"]["layers"][:20] in html
    atlas = Atlas.open(tmp_path / "study/atlas")
    sel = atlas.query("SELECT concept, count(*) AS n FROM selections GROUP BY concept ORDER BY concept").to_pylist()
    assert {r["concept"] for r in sel} >= {"country_capital", "country_continent@de", "country_language@de"} and all(r["n"] == 8 for r in sel)
    assert atlas.manifest()["studies"]["relations"]["path"] == "studies/relations"
    # a rerun reuses the record and every finished condition
    again = run_relation_study(lm, tmp_path / "study", cfg)
    assert json.dumps(again["summary"], sort_keys=True) == json.dumps(res["summary"], sort_keys=True)
    assert not np.isnan(res["summary"]["cumulativity"]["country_capital"][0]["acc_selected"])
    assert again["provenance"]["record_fingerprint"] == res["provenance"]["record_fingerprint"]


def test_lape_scorer_in_the_study(tmp_path):
    lm = tiny_model("llama")
    cfg = RelationStudyConfig(relations=("country_capital", "country_language"), langs=("en",), scorer="lape",
                              max_identify_facts=6, max_test_facts=4, seeds=1, grid=(0.5,), min_known=0,
                              select_n=8, batch_size=8)
    res = run_relation_study(lm, tmp_path / "study", cfg)
    from neuronatlas.stats.lape import LAPEScorer
    from neuronatlas.record import load_record

    rec = load_record(Atlas.open(tmp_path / "study/atlas"), "relations")
    labels = sorted(rec.labels)
    lape = LAPEScorer().fit(rec.moments.act_prob[[rec.labels.index(c) for c in labels]], languages=labels)
    for c in labels:
        want = [divmod(int(f), lm.n_neurons) for f in lape.top_indices(c, 8)]
        assert sorted(tuple(p) for p in res["selected"][c]) == sorted(want) and 0 < len(want) <= 8
    md = (tmp_path / "study/summary.md").read_text()
    assert "| country_capital |" in md and "LAPE scorer" in md and "Jaccard(AP, LAPE)" in md
    comp = res["scorer_comparison"]["country_capital"]
    assert 0.0 <= comp["ap_lape_jaccard"] <= 1.0 and comp["lape_assigned"] >= len(res["selected"]["country_capital"])


def test_random_sets_match_layer_and_magnitude_decile():
    from neuronatlas.stats.inference import magnitude_bins
    from neuronatlas.studies.common import concept_seed

    rng = np.random.default_rng(0)
    mag = rng.gamma(2.0, size=(2, 200))
    bins = magnitude_bins(mag, 10)
    sel = NeuronSet.of([(0, int(j)) for j in np.argsort(mag[0])[-5:]] + [(1, int(np.argmin(mag[1])))])
    for s in range(5):
        rnd = random_like(sel, 200, seed=s, bins=bins)
        assert {k: len(v) for k, v in rnd.by_layer().items()} == {0: 5, 1: 1}
        assert not set(rnd.pairs) & set(sel.pairs)
        assert sorted(bins[l, j] for l, j in rnd.pairs) == sorted(bins[l, j] for l, j in sel.pairs)
    # each relation gets its own random sets
    assert concept_seed(0, "a", 0) != concept_seed(0, "b", 0) != concept_seed(0, "a", 1)
    assert random_like(sel, 200, seed=concept_seed(0, "a", 0), bins=bins) != random_like(
        sel, 200, seed=concept_seed(0, "b", 0), bins=bins)


def _facts(splits=("identify", "test"), templates=(0, 1)):
    rows = []
    for rel in ("r1", "r2"):
        for i in range(6):
            for t in templates:
                rows.append({"text": f"{rel} fact {i} template {t} is", "target": f" o{i}", "relation": rel,
                             "lang": "en", "split": splits[i % 2], "template_id": t, "fact_id": f"{rel}:{i}"})
    return rows


def test_identification_never_uses_the_test_template_and_user_split_names():
    from neuronatlas.errors import DatasetError
    from neuronatlas.studies.relations import _split_facts, facts_languages

    cfg = RelationStudyConfig(langs=("en",))
    ident, test, demos = _split_facts(_facts(("train", "dev")), cfg)
    assert ident and {int(r["template_id"]) for r in ident} == {1}
    assert {int(r["template_id"]) for rows in test.values() for r in rows} == {0}
    assert demos and {int(r["template_id"]) for r in demos} == {0}
    assert not {r["fact_id"] for r in ident} & {r["fact_id"] for rows in test.values() for r in rows}
    shared, _, _ = _split_facts(_facts(), RelationStudyConfig(langs=("en",), share_templates=True))
    assert {int(r["template_id"]) for r in shared} == {0, 1}
    with pytest.raises(DatasetError, match=r"splits \['identify', 'test'\].*templates \[0\].*--share-templates"):
        _split_facts(_facts(templates=(0,)), cfg)
    with pytest.raises(DatasetError, match=r"languages \['en'\]"):
        _split_facts(_facts(), RelationStudyConfig(langs=("de",)))
    assert facts_languages([{"lang": "fr"}, {"lang": "en"}, {"lang": "de"}]) == ("en", "de", "fr")
