"""Weight-based decoding, find, selection files, clamping by hand, compare-decode and the clamp study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from neuronatlas.cli.main import main
from neuronatlas.data.prompts import PromptSet
from neuronatlas.decode import (
    compare_decoding,
    decode_arrays,
    decode_info,
    decode_neurons,
    find_neurons,
    normalize_token,
    save_selection,
    word_variants,
    write_decoded,
)
from neuronatlas.decode.core import token_ranks
from neuronatlas.decode.find import concept_token_ids, mention_pattern
from neuronatlas.errors import (
    AtlasError,
    SelectionError,
    SiteError,
    UnsupportedModelError,
)
from neuronatlas.evaluate import next_token_logprobs
from neuronatlas.intervene import Clamp, NeuronSet, intervene
from neuronatlas.intervene.parse import parse_intervention
from neuronatlas.models.sites import Component
from neuronatlas.models.specs import get_module
from neuronatlas.models.tiny import TINY_FAMILIES, tiny_model
from neuronatlas.record import RecordConfig, record
from neuronatlas.record.batching import encode, forward
from neuronatlas.record.hooks import count_hooks
from neuronatlas.store import Atlas

COLUMNS = ["layer", "neuron", "side", "direction", "rank", "token_id", "token", "score"]


def _hand_vectors(lm, side: str, layer: int) -> torch.Tensor:
    """Neuron vectors straight from the HF modules, the final norm folded in by hand for out_normed."""
    mlp = get_module(lm.spec.layer_modules(lm.model)[layer], lm.spec.mlp)
    fam = lm.spec.family
    if side in ("out", "out_normed"):
        w = get_module(mlp, lm.spec.down).weight
        v = (w if fam == "gpt2" else w.T).detach().float()          # GPT-2's Conv1D stores (in, out)
        if side == "out_normed":
            norm = get_module(lm.model, lm.spec.final_norm)
            if isinstance(norm, torch.nn.LayerNorm):
                v = (v - v.mean(-1, keepdim=True)) * norm.weight.detach().float()
            elif fam.startswith("gemma"):
                v = v * (1.0 + norm.weight.detach().float())
            else:
                v = v * norm.weight.detach().float()
        return v
    if fam == "phi3":
        gate, up = get_module(mlp, "gate_up_proj").weight.detach().float().chunk(2, dim=0)
        return up if side == "in_up" else gate
    if side in ("in_up", "in_gate"):
        return get_module(mlp, "up_proj" if side == "in_up" else "gate_proj").weight.detach().float()
    w = get_module(mlp, lm.spec.fc_in).weight.detach().float()
    return w.T if fam == "gpt2" else w


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_decoded_scores_equal_direct_per_neuron_computation(family):
    lm = tiny_model(family)
    k = 5
    arrays = decode_arrays(lm, k, chunk=13)
    w_u = lm.model.get_output_embeddings().weight.detach().float()
    expected_sides = ["out", "out_normed", "in_up", "in_gate"] if lm.spec.gated else ["out", "out_normed", "in"]
    assert arrays.sides == expected_sides
    for side in arrays.sides:
        for layer in range(lm.n_layers):
            vectors = _hand_vectors(lm, side, layer)
            for j in range(lm.n_neurons):
                scores = w_u @ vectors[j]
                top, bottom = scores.topk(k), scores.topk(k, largest=False)
                r = arrays.index(side, layer, j)
                assert arrays.top_ids[r].tolist() == top.indices.tolist(), (side, layer, j)
                assert arrays.bottom_ids[r].tolist() == bottom.indices.tolist(), (side, layer, j)
                np.testing.assert_allclose(arrays.top_scores[r], top.values.numpy(), rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(arrays.bottom_scores[r], bottom.values.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "phi3"])
def test_chunked_equals_unchunked_table(family):
    lm = tiny_model(family)
    small = decode_neurons(lm, k=4, chunk=3)           # chunks cross layer and side boundaries
    whole = decode_neurons(lm, k=4, chunk=10**6)
    for name in ("layer", "neuron", "rank", "token_id"):
        assert small.column(name).to_pylist() == whole.column(name).to_pylist()
    np.testing.assert_allclose(small.column("score").to_numpy(), whole.column("score").to_numpy(), rtol=1e-6, atol=1e-7)


def test_norm_folding_matches_hand_computation_and_matters():
    for family, offset in (("llama", 0.0), ("gemma3_text", 1.0)):
        lm = tiny_model(family)
        arrays = decode_arrays(lm, 3, sides=["out_normed"])
        norm = get_module(lm.model, lm.spec.final_norm).weight.detach().float()
        v = get_module(lm.spec.mlp_module(lm.model, 1), "down_proj").weight.detach().float()[:, 7]
        w_u = lm.model.get_output_embeddings().weight.detach().float()
        hand = w_u @ (v * (norm + offset))
        np.testing.assert_allclose(arrays.top_scores[arrays.index("out_normed", 1, 7)], hand.topk(3).values.numpy(),
                                   rtol=1e-5)
    lm = tiny_model("gpt2")                              # LayerNorm: centre, then scale
    arrays = decode_arrays(lm, 3, sides=["out_normed", "out"])
    ln = lm.model.transformer.ln_f.weight.detach().float()
    v = lm.model.transformer.h[0].mlp.c_proj.weight.detach().float()[4]
    hand = lm.model.lm_head.weight.detach().float() @ ((v - v.mean()) * ln)
    np.testing.assert_allclose(arrays.top_scores[arrays.index("out_normed", 0, 4)], hand.topk(3).values.numpy(), rtol=1e-5)
    assert not np.allclose(arrays.top_scores[arrays.index("out", 0, 4)], hand.topk(3).values.numpy())


def test_table_format_and_writer(tmp_path):
    lm = tiny_model("llama")
    table = decode_neurons(lm, k=3, layers=[1], sides="out,in_up")
    assert table.column_names == COLUMNS
    assert table.num_rows == 2 * 1 * lm.n_neurons * 2 * 3
    rows = table.slice(0, 6).to_pylist()
    assert [(r["direction"], r["rank"]) for r in rows] == [("top", 0), ("top", 1), ("top", 2),
                                                           ("bottom", 0), ("bottom", 1), ("bottom", 2)]
    vocab = lm.tokenizer.convert_ids_to_tokens(list(range(len(lm.tokenizer))))
    assert all(r["token"] == vocab[r["token_id"]] for r in table.to_pylist())
    assert set(table.column("layer").to_pylist()) == {1}
    info = decode_info(table)
    assert info["sides"] == ["out", "in_up"] and info["k"] == 3 and info["total_s"] > 0
    path = write_decoded(tmp_path / "atlas", table, lm)
    atlas = Atlas.open(tmp_path / "atlas")
    assert path.name == "decoded.parquet" and "decoded.parquet" in atlas.manifest()["tables"]
    assert atlas.query("SELECT count(*) AS n FROM decoded").to_pylist()[0]["n"] == table.num_rows
    with pytest.raises(SiteError, match="'in'"):
        decode_neurons(lm, sides=["in"])
    with pytest.raises(SiteError, match="layer 9"):
        decode_neurons(lm, layers=[9])


def test_token_ranks_match_brute_force():
    lm = tiny_model("qwen2")
    ids = [5, 77, 123]
    rank, score, which, _ = token_ranks(lm, ids, side="out", chunk=11)
    w_u = lm.model.get_output_embeddings().weight.detach().float()
    for layer in range(lm.n_layers):
        full = lm.spec.output_vectors(lm.model, layer).detach().float() @ w_u.T
        best = full[:, ids].max(dim=1)
        assert score[layer].tolist() == pytest.approx(best.values.tolist(), rel=1e-5)
        assert rank[layer].tolist() == (full > best.values[:, None]).sum(1).tolist()
        assert which[layer].tolist() == [ids[i] for i in best.indices.tolist()]


def test_normalize_token_and_variants():
    assert normalize_token("Ġdog") == " dog"
    assert normalize_token("▁dog") == " dog"
    assert normalize_token("Ã©t") == "ét"
    assert normalize_token("ĊĊ") == "\n\n"
    assert normalize_token("dog") == "dog"
    variants = word_variants("dog")
    assert {"dog", " dog", "Dog", " Dogs", " DOG", "dogs"} <= set(variants)
    assert " boxes" in word_variants("box") and " cities" in word_variants("city")
    pattern = mention_pattern("dog")
    assert pattern.search("Two Dogs ran") and pattern.search("a dog.") and not pattern.search("hotdogs and dogma")
    with pytest.raises(SelectionError):
        word_variants("  ")


def _synthetic_atlas(tmp_path: Path, lm) -> Path:
    """An atlas with a recorded dataset and a hand-made decoded table of known ranks."""
    path = tmp_path / "atlas"
    prompts = PromptSet.from_rows([{"text": t, "label": "x"} for t in
                                   ["My favourite animal is a dog", "Today I saw a cat", "Der Hund ist braun"]])
    record(lm, prompts, path, name="rec", config=RecordConfig(top_k=2))
    rows = [  # layer, neuron, side, direction, rank, token, score
        (0, 1, "out_normed", "top", 3, "Ġdog", 9.0),
        (0, 2, "out_normed", "top", 0, "dog", 1.0),
        (1, 3, "out_normed", "top", 0, "ĠDogs", 2.0),
        (1, 3, "out_normed", "top", 4, "Ġdog", 0.5),      # same neuron, worse rank: not a second hit
        (1, 4, "out_normed", "top", 0, "Ġdogma", 5.0),    # another word
        (1, 5, "out_normed", "bottom", 0, "Ġdog", -3.0),  # suppressed, not promoted
        (0, 6, "out", "top", 1, "Ġdog", 4.0),             # another side
        (1, 7, "out_normed", "top", 2, "Ġcat", 3.0),
    ]
    table = pa.table({"layer": [r[0] for r in rows], "neuron": [r[1] for r in rows], "side": [r[2] for r in rows],
                      "direction": [r[3] for r in rows], "rank": [r[4] for r in rows],
                      "token_id": list(range(len(rows))), "token": [r[5] for r in rows],
                      "score": [r[6] for r in rows]})
    Atlas.open(path).write_table("decoded.parquet", table, describe="test")
    return path


def test_find_ranks_by_rank_then_score_with_activation_evidence(tmp_path):
    lm = tiny_model("llama")
    path = _synthetic_atlas(tmp_path, lm)
    hits = find_neurons(path, text="dog")
    assert [(h["layer"], h["neuron"], h["rank"]) for h in hits] == [(1, 3, 0), (0, 2, 0), (0, 1, 3)]
    assert hits[0]["token"] == " Dogs" and hits[0]["id"] == "L1:3"
    stats = Atlas.open(path).query("SELECT mean, max, act_prob FROM stats WHERE label = '__all__' AND layer = 1 "
                                   "AND neuron = 3").to_pylist()[0]
    assert hits[0]["act_mean"] == pytest.approx(stats["mean"]) and hits[0]["act_max"] == pytest.approx(stats["max"])
    assert hits[0]["act_prob"] == pytest.approx(stats["act_prob"]) and hits[0]["record"] == "rec"
    assert [(h["layer"], h["neuron"]) for h in find_neurons(path, token=" dog")] == [(0, 1), (1, 3)]
    assert [(h["layer"], h["neuron"]) for h in find_neurons(path, token="Ġdog", side="out")] == [(0, 6)]
    assert [(h["side"], h["neuron"]) for h in find_neurons(path, text="dog", side="all")][:2] == [
        ("out_normed", 3), ("out_normed", 2)]
    assert [h["neuron"] for h in find_neurons(path, text="dog", direction="bottom")] == [5]
    assert len(find_neurons(path, text="dog", limit=1)) == 1
    with pytest.raises(SiteError, match="in_up"):
        find_neurons(path, text="dog", side="in_up")
    with pytest.raises(SelectionError, match="exactly one"):
        find_neurons(path, text="dog", token=" dog")
    with pytest.raises(AtlasError, match="decode"):
        find_neurons(_empty_atlas(tmp_path, lm), text="dog")


def _empty_atlas(tmp_path: Path, lm) -> Path:
    Atlas.create(tmp_path / "empty", model=lm.provenance)
    return tmp_path / "empty"


def test_saved_selection_parses_as_selector_and_in_clamp_values(tmp_path):
    lm = tiny_model("llama")
    hits = find_neurons(_synthetic_atlas(tmp_path, lm), text="dog")
    sel = save_selection(hits, tmp_path / "dog.jsonl")
    expected = ((0, 1), (0, 2), (1, 3))
    assert NeuronSet.parse(f"@{sel}").pairs == expected
    clamp = parse_intervention("clamp", f"@{sel}=8")
    assert isinstance(clamp, Clamp) and clamp.neurons.pairs == expected and clamp.value == 8.0
    rel = parse_intervention("clamp", f"@{sel}=3xmax", max_lookup=lambda ns: [1.0, 2.0, 0.5])
    assert rel.value == (3.0, 6.0, 1.5)
    assert parse_intervention("ablate", f"@{sel}").neurons.pairs == expected
    with pytest.raises(SelectionError, match="nothing"):
        save_selection([], tmp_path / "none.jsonl")


def test_single_row_selection_file(tmp_path):
    sel = save_selection([{"layer": 1, "neuron": 2}], tmp_path / "one.jsonl")
    assert NeuronSet.parse(f"@{sel}").pairs == ((1, 2),)


@pytest.mark.parametrize("text,bad", [("L1:x=8", "L1:x"), ("L1:2=abc", "abc"), ("@/no/such/file.jsonl=3", "/no/such"),
                                      ("L1:5-2=1", "5-2"), ("L1:2", "L1:2")])
def test_bad_selectors_name_the_bad_part(text, bad):
    with pytest.raises(SelectionError, match=bad.replace("*", r"\*")):
        parse_intervention("clamp", text)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_clamp_changes_logits_exactly_as_a_hand_hook(family):
    lm = tiny_model(family)
    pairs, values = [(0, 3), (1, 5), (1, 9)], (2.5, -1.0, 4.0)
    batch = encode(lm, ["My favourite animal is a dog", "Today I saw"], padding_side="left")
    with intervene(lm, [Clamp(NeuronSet.of(pairs), values)]):
        clamped = forward(lm, batch).logits
    handles = []
    try:
        for layer in (0, 1):
            wanted = [(j, v) for (lay, j), v in zip(pairs, values) if lay == layer]

            def pre_hook(_m, args, _wanted=wanted):
                h = args[0].clone()
                for j, v in _wanted:
                    h[..., j] = v
                return (h, *args[1:])

            module = lm.spec.hook_module(lm.model, layer, Component.MLP)
            handles.append(module.register_forward_pre_hook(pre_hook))
        by_hand = forward(lm, batch).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(clamped, by_hand)
    assert not torch.equal(clamped, forward(lm, batch).logits)
    assert count_hooks(lm.model) == 0


def test_batched_clamp_conditions_match_single_runs():
    lm = tiny_model("llama")
    prompts = ["My favourite animal is", "Today I saw a cat and"]
    a, b = Clamp(NeuronSet.of([(1, 4)]), 3.0), Clamp(NeuronSet.of([(0, 2), (1, 8)]), (1.5, -2.0))
    together = next_token_logprobs(lm, prompts, conditions=[(), (a,), (b,)])
    for c, cond in enumerate([(), (a,), (b,)]):
        alone = next_token_logprobs(lm, prompts, conditions=[cond])[0]
        torch.testing.assert_close(together[c], alone, rtol=1e-5, atol=1e-5)


def test_compare_decoding_same_and_different_seeds():
    same = compare_decoding(tiny_model("llama", seed=0), tiny_model("llama", seed=0))
    assert all(r["overall"] == 1.0 for r in same["sides"].values())
    assert same["same_tokenizer"] and len(same["sides"]["in_up"]["per_layer"]) == 2
    other = compare_decoding(tiny_model("llama", seed=0), tiny_model("llama", seed=1))
    assert all(r["overall"] < 0.2 for r in other["sides"].values())
    with pytest.raises(UnsupportedModelError, match="shapes differ"):
        compare_decoding(tiny_model("llama"), tiny_model("gpt2"))


@pytest.fixture
def tiny_dir(tmp_path):
    def save(family: str = "llama", seed: int = 0) -> str:
        lm = tiny_model(family, seed=seed)
        path = tmp_path / f"{family}-{seed}"
        lm.model.save_pretrained(path)
        lm.tokenizer.save_pretrained(path)
        return str(path)

    return save


def _run(capsys, args: list[str]) -> tuple[int, object, str]:
    code = main(args)
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except json.JSONDecodeError:
        return code, out, err


def test_cli_decode_find_save_generate(tmp_path, tiny_dir, capsys):
    model = tiny_dir("llama")
    atlas = tmp_path / "atlas"
    code, summary, _ = _run(capsys, ["decode", "--model", model, "--out", str(atlas), "--top-k", "5", "--chunk", "10",
                                     "--json"])
    assert code == 0 and summary["rows"] == 4 * 2 * 32 * 2 * 5 and summary["sides"][1] == "out_normed"
    table = Atlas.open(atlas).read_table("decoded.parquet")
    assert table.column_names == COLUMNS
    tops = [r["token"] for r in table.to_pylist() if r["direction"] == "top"]
    common = max(set(tops), key=tops.count)                      # a token many neurons decode to
    sel = tmp_path / "sel.jsonl"
    code, hits, _ = _run(capsys, ["find", "--atlas", str(atlas), "--token", common, "--side", "all", "--limit", "5",
                                  "--save", str(sel), "--json"])
    assert code == 0 and 2 <= len(hits) <= 5
    assert NeuronSet.parse(f"@{sel}").pairs == tuple(sorted({(h["layer"], h["neuron"]) for h in hits}))
    for flag in (["--clamp", f"@{sel}=8"], ["--ablate", f"@{sel}"]):
        code, out, _ = _run(capsys, ["generate", "--model", model, "-p", "My favourite animal is", "--max-new-tokens",
                                     "3", *flag, "--json"])
        assert code == 0 and "intervened" in out["results"][0]
    code, _, err = _run(capsys, ["find", "--atlas", str(atlas), "--text", "dog", "--side", "bogus"])
    assert code == 2 and "bogus" in err and "Traceback" not in err
    code, _, err = _run(capsys, ["generate", "--model", model, "-p", "x", "--clamp", "L1:zz=8"])
    assert code == 2 and "L1:zz" in err


def test_cli_compare_decode(tiny_dir, capsys, tmp_path):
    a, b, c = tiny_dir("llama", 0), tiny_dir("llama", 1), tiny_dir("gpt2", 0)
    code, same, _ = _run(capsys, ["compare-decode", "--model", a, "--model-b", a, "--json"])
    assert code == 0 and same["sides"]["out"]["overall"] == 1.0
    code, diff, _ = _run(capsys, ["compare-decode", "--model", a, "--model-b", b, "--sides", "in_up",
                                  "--out", str(tmp_path / "cmp.json"), "--json"])
    assert code == 0 and list(diff["sides"]) == ["in_up"] and diff["sides"]["in_up"]["overall"] < 0.2
    assert json.loads((tmp_path / "cmp.json").read_text())["sides"]["in_up"]["overall"] == diff["sides"]["in_up"]["overall"]
    code, _, err = _run(capsys, ["compare-decode", "--model", a, "--model-b", c])
    assert code == 2 and "shapes differ" in err


def test_concept_tokens_and_selection_rows(tmp_path):
    from neuronatlas.studies import run
    from neuronatlas.studies.clamp import ClampConfig, parse_value

    lm = tiny_model("llama")
    ids = concept_token_ids(lm.tokenizer, "dog")
    assert ids and all(normalize_token(t).strip().lower() in ("dog", "dogs") for t in ids.values())
    assert parse_value("3xmax") == (3.0, True) and parse_value("10") == (10.0, False)
    with pytest.raises(Exception, match="3xmox"):
        ClampConfig(concept="dog", value="3xmox")
    atlas = Atlas.create(tmp_path / "atlas", model=lm.provenance)
    atlas.write_table("selections.parquet", {"study": ["relations"], "concept": ["capital"], "method": ["ap"],
                                             "site": ["mlp"], "layer": [1], "neuron": [2], "score": [0.5], "rank": [0]})
    small = dict(n_random=1, n_prompts=2, max_new_tokens=2, n_texts=4, n_permutations=5, sources=("plots",))
    run(lm, ClampConfig(concept="dog", n_neurons=2, **small), tmp_path / "dog", atlas=tmp_path / "atlas")
    run(lm, ClampConfig(concept="dog", n_neurons=1, **small), tmp_path / "dog1", atlas=tmp_path / "atlas")  # replaces
    run(lm, ClampConfig(concept="cat", n_neurons=2, **small), tmp_path / "cat", atlas=tmp_path / "atlas")
    rows = atlas.read_table("selections.parquet").to_pylist()
    assert [(r["study"], r["concept"]) for r in rows] == [("relations", "capital"), ("clamp", "dog"), ("clamp", "cat"),
                                                          ("clamp", "cat")]
    assert atlas.read_table("selections.parquet").column_names == ["study", "concept", "method", "site", "layer",
                                                                   "neuron", "score", "rank"]
    studies = atlas.manifest()["studies"]
    assert studies["clamp-dog"]["kind"] == "clamp" and studies["clamp-cat"]["concepts"] == ["cat"]


def test_clamp_study_on_a_tiny_model_writes_everything_and_resumes(tmp_path, monkeypatch):
    import neuronatlas.studies.clamp as clamp_study

    lm = tiny_model("llama")
    config = clamp_study.ClampConfig(concept="dog", n_neurons=3, value="2xmax", n_random=2, n_prompts=3,
                                     max_new_tokens=3, n_texts=6, n_permutations=20, sources=("plots",))
    first = clamp_study.run_clamp_study(lm, config, tmp_path / "run", atlas=tmp_path / "atlas")
    neurons = first["decoded"]["neurons"]
    assert [n["selection_rank"] for n in neurons] == [0, 1, 2]
    ranks = [(n["rank"], -n["score"]) for n in neurons]
    assert ranks == sorted(ranks)
    assert first["conditions"]["by_kind"] == {"baseline": 1, "selected": 1, "random": 2}
    assert first["texts"]["concept_texts"] == 6 and first["texts"]["other_texts"] == 6
    assert [f.key for f in first.report.findings] == ["selection", "mention", "logprob", "activation"]
    for name in ("results.json", "report.html", "summary.md", "mention_rate.png", "logprob_shift.png", "state.json"):
        assert (tmp_path / "run" / name).exists(), name

    def no_rerun(*args, **kwargs):
        raise AssertionError("finished stages must come from state.json")

    monkeypatch.setattr(clamp_study, "generate", no_rerun)
    monkeypatch.setattr(clamp_study, "next_token_logprobs", no_rerun)
    monkeypatch.setattr(clamp_study, "select_concept_neurons", no_rerun)
    again = clamp_study.run_clamp_study(lm, config, tmp_path / "run", atlas=tmp_path / "atlas")
    assert again["generations"] == first["generations"] and again["logprob"] == first["logprob"]
    rows = Atlas.open(tmp_path / "atlas").read_table("selections.parquet").to_pylist()
    assert len(rows) == 3 and {r["concept"] for r in rows} == {"dog"}


@pytest.mark.slow
def test_clamp_study_in_miniature_on_the_embedded_model(tmp_path):
    from neuronatlas.models import load_model
    from neuronatlas.studies.clamp import ClampConfig, run_clamp_study

    lm = load_model("default")
    config = ClampConfig(concept="dog", n_neurons=4, value="3xmax", n_random=2, n_prompts=4, max_new_tokens=8,
                         n_texts=12, layers=(28, 29), n_permutations=100, sources=("reviews", "plots"))
    results = run_clamp_study(lm, config, tmp_path / "run", atlas=tmp_path / "atlas")
    chosen = results["selection"]["neurons"]["dog"]
    assert len(chosen) == 4 and all(n["rank"] < 50 for n in results["decoded"]["neurons"])
    assert "dog" in [t.strip().lower() for t in results["concept_token_text"]]
    assert set(results["generations"]) == {"baseline|prompts", "clamp", "clamp|rand0"}
    assert all(len(g) == 4 for g in results["generations"].values())
    lp = results["logprob"]
    assert lp["n_items"] == 4 and lp["selected"] > lp["baseline"]          # clamping a 'dog' neuron raises log p(dog)
    assert results["activation"] is not None and results["texts"]["concept_texts"] == 12
    for name in ("results.json", "report.html", "mention_rate.png", "logprob_shift.png"):
        assert (tmp_path / "run" / name).exists(), name
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["findings"] == results.findings and on_disk["provenance"]["dataset_sha256"]
    sel = Atlas.open(tmp_path / "atlas").read_table("selections.parquet").to_pylist()
    assert [f"L{r['layer']}:{r['neuron']}" for r in sel] == [n["id"] for n in results["decoded"]["neurons"]]
    assert {r["method"] for r in sel} == {"decode"}