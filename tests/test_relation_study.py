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


def test_overlap_p_is_the_hypergeometric_tail():
    from scipy import stats

    from neuronatlas.studies.relations_report import overlap_p

    a, b = {(0, i) for i in range(10)}, {(0, i) for i in range(5, 20)}
    assert overlap_p(a, b, 100) == pytest.approx(stats.hypergeom.sf(4, 100, 10, 15))
    assert overlap_p(set(), b, 100) != overlap_p(set(), b, 100)          # NaN for an empty set


def test_miniature_study_on_tiny_model(tmp_path):
    lm = tiny_model("llama")
    cfg = RelationStudyConfig(relations=("country_capital", "country_language", "country_continent"), langs=("en", "de"),
                              max_identify_facts=6, max_test_facts=5, n_random=2, grid=(0.5, 1.0), min_known=0,
                              select_n=8, batch_size=8)
    res = run_relation_study(lm, tmp_path / "study", cfg)
    rels = ["country_capital", "country_continent", "country_language"]
    assert res["evaluated_relations"] == rels
    saved = json.loads((tmp_path / "study/results.json").read_text())
    assert saved["cross_deactivation"]["relations"] == rels and len(saved["selection"]["neurons"]["country_capital"]) == 8
    # every arm the design asks for, and the random arms only where a test needs them
    kinds = saved["conditions"]["by_kind"]
    candidates = sum(1 for d in saved["interference_pairs"] if d["delta_acc"] > 0 and d["p_mcnemar"] < cfg.alpha)
    assert kinds["baseline"] == 3 and kinds["random"] == 2 * (3 + 3 + candidates)  # own, cum 0.5, candidate pairs
    state = json.loads((tmp_path / "study/state.json").read_text())
    for r in rels:   # the own effect's random arms ran on the known facts only; the selected arm on all
        assert len(state["data"][f"arm|deact:{r}@{r}|rand0"]["exact"]) == saved["baseline_table"][r]["known"]
        assert len(state["data"][f"arm|deact:{r}@{r}"]["exact"]) == saved["baseline_table"][r]["facts"]
    assert set(saved["trend_all_facts"]) == set(rels) and "acc_selected_all" in saved["cumulativity"][rels[0]][0]
    for name in ("report.html", "summary.md", "overlap.png", "layers.png", "cross_deactivation.png",
                 "cumulativity_country_capital.png"):
        assert (tmp_path / "study" / name).stat().st_size > 0
    html = (tmp_path / "study/report.html").read_text()
    assert "Cumulativity" in html and "rule:" in html
    report = saved["report"]
    assert [f["key"] for f in report["findings"]][:3] == ["baseline", "own_effect", "cumulativity"]
    assert all(f["rule"] for f in report["findings"]) and report["sections"][0]["tables"][0]["concept_columns"]
    atlas = Atlas.open(tmp_path / "study/atlas")
    sel = atlas.query("SELECT concept, count(*) AS n FROM selections GROUP BY concept ORDER BY concept").to_pylist()
    assert {r["concept"] for r in sel} >= {"country_capital", "country_continent@de", "country_language@de"}
    assert all(r["n"] == 8 for r in sel)
    entry = atlas.manifest()["studies"]["relations"]
    assert entry["path"] == "studies/relations" and (tmp_path / "study/atlas/studies/relations/results.json").exists()
    # a rerun reuses the record and every finished arm
    again = run_relation_study(lm, tmp_path / "study", cfg)
    assert again["timing"]["model_forward_calls"] == 0
    assert json.dumps(again["cumulativity"], sort_keys=True) == json.dumps(res["cumulativity"], sort_keys=True)


def test_lape_scorer_in_the_study(tmp_path):
    lm = tiny_model("llama")
    cfg = RelationStudyConfig(relations=("country_capital", "country_language"), langs=("en",), scorer="lape",
                              max_identify_facts=6, max_test_facts=4, n_random=1, grid=(0.5,), min_known=0,
                              select_n=8, batch_size=8)
    res = run_relation_study(lm, tmp_path / "study", cfg)
    from neuronatlas.stats.lape import LAPEScorer
    from neuronatlas.record import load_record

    rec = load_record(Atlas.open(tmp_path / "study/atlas"), "relations")
    labels = sorted(rec.labels)
    lape = LAPEScorer().fit(rec.moments.act_prob[[rec.labels.index(c) for c in labels]], languages=labels)
    for c in labels:
        want = [divmod(int(f), lm.n_neurons) for f in lape.top_indices(c, 8)]
        got = [tuple(int(x) for x in n[1:].split(":")) for n in res["selection"]["neurons"][c]]
        assert sorted(got) == sorted(want) and 0 < len(want) <= 8
    md = (tmp_path / "study/summary.md").read_text()
    assert "| country_capital |" in md and "scorer: lape" in md and "Jaccard(AP, LAPE)" in md
    comp = res["scorer_comparison"]["country_capital"]
    assert 0.0 <= comp["ap_lape_jaccard"] <= 1.0 and comp["lape_assigned"] >= len(res["selection"]["neurons"]["country_capital"])


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


def test_few_shot_demonstrations_are_one_fixed_prefix_per_relation_and_template(tmp_path):
    from neuronatlas.studies.relations import _split_facts, _with_demos

    cfg = RelationStudyConfig(langs=("en",))
    _, test, demos = _split_facts(_facts(("identify", "test")), cfg)
    prompts, prefixes = _with_demos(test, demos, 2, seed=0)
    for rel, rows in test.items():
        assert prompts[rel] == [r["text"] for r in rows]
        assert len(set(prefixes[rel])) == 1 and prefixes[rel][0].count("\n") == 2
        assert all(d.split(" is")[0].startswith(rel) for d in prefixes[rel][0].splitlines())
    assert _with_demos(test, demos, 0, seed=0)[1]["r1"] == [""] * len(test["r1"])
    # the study evaluates few-shot prompts through the prefix cache, equal to the uncached scores
    lm = tiny_model("llama")
    few = RelationStudyConfig(langs=("en",), few_shot=2, n_random=1, grid=(0.5,), min_known=0, select_n=4,
                              max_identify_facts=3, max_test_facts=3)
    res = run_relation_study(lm, tmp_path / "fs", few, facts=_facts(("identify", "test")))
    from neuronatlas.evaluate import target_logprobs

    state = json.loads((tmp_path / "fs/state.json").read_text())["data"]
    rows = test["r1"][:3]
    plain = target_logprobs(lm, [prefixes["r1"][0] + r["text"] for r in rows], [r["target"] for r in rows])
    cached = state["arm|baseline|r1"]["logprob"]
    assert len(cached) == len(test["r1"]) and res["baseline_table"]["r1"]["facts"] == len(test["r1"])
    np.testing.assert_allclose(cached[:3], plain.logprob[0].tolist(), atol=1e-3)


def test_facts_files_share_the_jsonl_reader_and_its_one_line_errors(tmp_path):
    from neuronatlas.errors import DatasetError
    from neuronatlas.studies.relations import load_facts

    good = '{"text": "The capital of France is", "target": " Paris", "relation": "r", "split": "test"}'
    for lines, message in ((["[1, 2]"], r"f\.jsonl:1: each line must be a JSON object with text, target"),
                           ([good, "{oops"], r"f\.jsonl:2: bad JSON"),
                           ([good, '{"text": "x"}'], r"f\.jsonl:2 \(field 'target'\): missing 'target'")):
        (tmp_path / "f.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(DatasetError, match=message):
            load_facts(tmp_path / "f.jsonl")
    (tmp_path / "f.jsonl").write_bytes(good.encode() + b"\n\xff\n")
    with pytest.raises(DatasetError, match=r"f\.jsonl:2: not UTF-8") as err:
        load_facts(tmp_path / "f.jsonl")
    assert "--skip-bad" not in str(err.value)          # load_facts has no such flag
    (tmp_path / "f.jsonl").write_text(good + "\n\n", encoding="utf-8")
    assert load_facts(tmp_path / "f.jsonl")[0]["fact_id"] == "r:en:1"
