"""Contextual decomposition (CD-T): invariants against the stock forward, attributions against hand
computations, the circuit loop, the CLI and its one-line errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from neuronatlas.decompose import LogitTarget, NeuronTarget, Source, propagate, trace_ids, trace_prompt
from neuronatlas.decompose.ablation import ablated_logits, logit_diffs
from neuronatlas.decompose.attribution import component_attribution, parse_component, sources_for, token_attribution
from neuronatlas.decompose.circuit import all_components, discover_circuit, fact_rows, faithfulness
from neuronatlas.errors import SelectionError
from neuronatlas.intervene import Ablate, NeuronSet, intervene
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record.batching import encode, forward

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2"]
PROMPT = "The capital of France is Paris. The capital"
# float32: rel + irrel matches the stock forward to 1e-5 of the activations' scale (max |value|, at least 1)
TOL = 1e-5


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= TOL * max(1.0, float(b.abs().max()))


def _target(lm: LoadedModel, word: str = " Paris") -> int:
    return lm.tokenizer.encode(word)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_rel_plus_irrel_is_the_forward_at_every_layer(family):
    lm = tiny_model(family)
    tr = trace_prompt(lm, PROMPT)
    with torch.no_grad():
        plain = lm.model(input_ids=tr.input_ids[None]).logits[0]
    assert close(tr.logits, plain)  # the traced (eager) forward is the ordinary forward
    T = tr.n_tokens
    sources = [Source(), Source(tokens=(0, 3)), Source(tokens=tuple(range(T))),
               Source(neurons=((0, 5), (1, 7)), heads=((0, 1),)), Source(heads=((1, 0),), positions=(2, -1))]
    out = propagate(lm, tr, sources, target=LogitTarget(_target(lm), foil=_target(lm, " Tokyo")),
                    keep_layers=True, full_logits=True)
    assert sorted(out.layers) == list(range(lm.n_layers))
    for layer, x in out.layers.items():
        for b in range(len(sources)):
            assert close(x[0, b] + x[1, b], tr.layer_out[layer][0]), (family, layer, b)
    assert out.logits is not None
    for b in range(len(sources)):
        assert close(out.logits[0, b] + out.logits[1, b], tr.logits)
    # the empty source carries exactly nothing, anywhere
    assert all(float(x[0, 0].abs().max()) == 0.0 for x in out.layers.values())
    assert float(out.logits[0, 0].abs().max()) == 0.0 and float(out.rel[0]) == 0.0
    total = float(tr.logits[-1, _target(lm)] - tr.logits[-1, _target(lm, " Tokyo")])
    assert all(abs(float(r + i) - total) <= TOL * max(1.0, abs(total)) for r, i in zip(out.rel, out.irrel))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_all_tokens_as_source(family):
    lm = tiny_model(family)
    tr = trace_prompt(lm, PROMPT)
    T = tr.n_tokens
    out = propagate(lm, tr, [Source(tokens=tuple(range(T)))], target=LogitTarget(_target(lm)))
    logit = float(tr.logits[-1, _target(lm)])
    if family == "gpt2":  # position embeddings (and their share of every bias) stay irrel
        assert abs(float(out.irrel[0])) > 0 and abs(float(out.rel[0] + out.irrel[0]) - logit) < 1e-5
    else:  # no position embeddings: everything flows from the tokens, the irrel part is exactly 0
        assert float(out.irrel[0]) == 0.0 and abs(float(out.rel[0]) - logit) < 1e-5


def test_token_parts_add_up_where_the_network_is_linear():
    """With the MLPs' outputs removed, norms take the total's scale and attention its fixed
    probabilities, so the decomposition is linear: single-token parts sum to the logit. With the
    MLPs back, the gated product makes the parts interact."""
    lm = tiny_model("llama")
    tr = trace_prompt(lm, PROMPT)
    tgt = LogitTarget(_target(lm))
    full = token_attribution(lm, tr, tgt)
    assert abs(full.interaction) > 1e-4
    linear = LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.spec, "tiny-linear")
    with torch.no_grad():
        for layer in linear.model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    parts = token_attribution(linear, trace_prompt(linear, PROMPT), tgt)
    assert abs(sum(parts.rel) - parts.total) < 1e-5 and abs(parts.interaction) < 1e-5
    assert len(parts.rel) == trace_prompt(linear, PROMPT).n_tokens and all(parts.stable)


def _rms_scale(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def test_last_layer_neuron_matches_a_hand_computation():
    """Neuron j of the last layer writes h_j * down[:, j]; after that only the final RMSNorm (with the
    total's scale) and the unembedding act, so its part of the logit is a dot product."""
    lm = tiny_model("llama")
    tr = trace_prompt(lm, PROMPT)
    t = _target(lm)
    last = lm.n_layers - 1
    seen = {}
    down = lm.model.model.layers[last].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0].detach()))
    try:
        lm.model(input_ids=tr.input_ids[None])
    finally:
        handle.remove()
    final = tr.layer_out[last][0, -1]
    scale = _rms_scale(lm.model.model.norm, final)
    w_u = lm.model.lm_head.weight[t]
    for j in (0, 5, 17):
        hand = float(seen["h"][0, -1, j] * (down.weight[:, j] * scale) @ w_u)
        cd = float(propagate(lm, tr, [Source(neurons=((last, j),))], target=LogitTarget(t)).rel[0])
        assert abs(cd - hand) < 1e-6
    scores = {s.name: s.rel for s in component_attribution(lm, tr, LogitTarget(t), heads=False, mlps=False,
                                                           neuron_layers=(last,))}
    hand0 = float(seen["h"][0, -1, 0] * (down.weight[:, 0] * scale) @ w_u)
    assert abs(scores[f"L{last}:0"] - hand0) < 1e-6


def test_last_layer_head_matches_a_hand_computation():
    """With the last MLP silenced, head h of the last layer reaches the logit through o_proj's
    columns of that head, the final norm's total scale and the unembedding."""
    lm = tiny_model("llama")
    model = copy.deepcopy(lm.model)
    last = lm.n_layers - 1
    with torch.no_grad():
        model.model.layers[last].mlp.down_proj.weight.zero_()
    lm2 = LoadedModel(model, lm.tokenizer, lm.spec, "tiny-head")
    tr = trace_prompt(lm2, PROMPT)
    t = _target(lm2)
    o_proj = model.model.layers[last].self_attn.o_proj
    seen = {}
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("z", args[0].detach()))
    try:
        model(input_ids=tr.input_ids[None])
    finally:
        handle.remove()
    hd = model.model.layers[last].self_attn.head_dim
    scale = _rms_scale(model.model.norm, tr.layer_out[last][0, -1])
    for h in range(model.config.num_attention_heads):
        sl = slice(h * hd, (h + 1) * hd)
        hand = float((o_proj.weight[:, sl] @ seen["z"][0, -1, sl]) * scale @ model.lm_head.weight[t])
        cd = float(propagate(lm2, tr, [Source(heads=((last, h),))], target=LogitTarget(t)).rel[0])
        assert abs(cd - hand) < 1e-6


def test_neuron_target_and_sources_that_cannot_reach_it():
    lm = tiny_model("qwen2")
    tr = trace_prompt(lm, PROMPT)
    seen = {}
    down = lm.model.model.layers[1].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0].detach()))
    try:
        lm.model(input_ids=tr.input_ids[None])
    finally:
        handle.remove()
    target = NeuronTarget(1, 4)
    out = propagate(lm, tr, [Source(), Source(tokens=(1,)), Source(heads=((0, 0),)), Source(neurons=((1, 4),))],
                    target=target)
    act = float(seen["h"][0, -1, 4])
    assert all(abs(float(r + i) - act) < 1e-5 for r, i in zip(out.rel, out.irrel))
    assert float(out.rel[0]) == 0.0 and abs(float(out.rel[3]) - act) < 1e-6  # the neuron is its own source


def test_sources_are_validated():
    lm = tiny_model("llama")
    tr = trace_prompt(lm, "The capital")
    for bad in (Source(tokens=(99,)), Source(neurons=((5, 0),)), Source(heads=((0, 9),))):
        with pytest.raises(SelectionError):
            propagate(lm, tr, [bad])
    assert parse_component("L3.head:5") == ("head", 3, 5) and parse_component("L2.mlp") == ("mlp", 2, -1)
    assert parse_component("l1:7") == ("neuron", 1, 7)
    with pytest.raises(SelectionError, match="L<layer>.head"):
        parse_component("head 3")


def test_row_ablation_matches_the_project_ablate():
    lm = tiny_model("llama")
    prompt = "The capital of France is"
    ours = ablated_logits(lm, prompt, [[], ["L1:3"], ["L0:2", "L1:5"]])
    batch = encode(lm, [prompt])
    for row, pairs in ((1, [(1, 3)]), (2, [(0, 2), (1, 5)])):
        with intervene(lm, [Ablate(NeuronSet.of(pairs))]):
            ref = forward(lm, batch).logits[0, -1]
        assert torch.allclose(ours[row], ref, atol=1e-6)
    assert torch.allclose(ours[0], forward(lm, batch).logits[0, -1], atol=1e-6)


FACTS = [{"text": "The capital of France is", "target": " Paris"},
         {"text": "The capital of Japan is", "target": " Tokyo"},
         {"text": "Berlin is the capital of", "target": " Germany"}]


def test_circuit_loop_on_a_tiny_model():
    lm = tiny_model("llama")
    facts = fact_rows(lm, FACTS)
    assert all(f.foil != f.target for f in facts)
    res = discover_circuit(lm, facts, share=0.6, n_random=4, seed=1)
    names = all_components(lm)
    assert len(names) == lm.n_layers * (lm.config.num_attention_heads + 1)
    ranked = [res.scores[c] for c in res.components]
    assert ranked == sorted(ranked, reverse=True) and all(s > 0 for s in ranked)
    # the reported share is the circuit's own decomposition, recomputed independently here
    carried = 0.0
    total = 0.0
    for f in facts:
        tr = trace_ids(lm, torch.tensor(lm.tokenizer(f.text)["input_ids"]))
        out = propagate(lm, tr, [sources_for(lm, res.components, tuple(range(1, tr.n_tokens)))],
                        target=LogitTarget(f.target, f.foil))
        carried += float(out.rel[0])
        total += float(tr.logits[-1, f.target] - tr.logits[-1, f.foil])
    assert abs(res.explained_share - carried / total) < 1e-5
    assert res.reached == (res.explained_share >= 0.6)
    if res.reached:  # the smallest prefix that reaches the share
        assert all(s < 0.6 for k, s in res.curve if k < len(res.components))
    assert res.faithfulness is not None and len(res.random_faithfulness) == 4 and 0 < res.random_p <= 1
    assert res.necessity is not None and len(res.random_necessity) == 4 and 0 < res.necessity_p <= 1
    # a circuit of every component ablates nothing: faithfulness is exactly 1; the empty one: necessity 1
    res.components = names
    faithfulness(lm, facts, res, n_random=0)
    assert abs(res.faithfulness - 1.0) < 1e-6
    res.components = []
    faithfulness(lm, facts, res, n_random=0)
    assert abs(res.necessity - 1.0) < 1e-6
    # zero ablation of every component: the same as an all-ablated row by hand
    lds = logit_diffs(lm, [f.text for f in facts], [f.target for f in facts], [f.foil for f in facts], [[], names])
    res.components = []
    faithfulness(lm, facts, res, n_random=0, ablation="zero")
    assert abs(res.faithfulness - float(lds[1].sum() / lds[0].sum())) < 1e-5


# --- CLI -----------------------------------------------------------------------------------------
from conftest import run_cli as _run  # noqa: E402  (model_dir: the fixture in conftest)


def test_cli_decompose(capsys, model_dir, tmp_path):
    html = tmp_path / "view.html"
    code, out, _ = _run(capsys, "decompose", "--model", str(model_dir), "--prompt", "The capital of France is",
                        "--target", " Paris", "--html", str(html), "--json", "--top", "5")
    assert code == 0
    data = json.loads(out)
    assert len(data["tokens"]) == 5 and len(data["components"]) == 5 and len(data["neuron_layers"]) == 1
    assert abs(sum(t["rel"] for t in data["tokens"]) + data["interaction"] - data["total"]) < 1e-5
    page = html.read_text()
    assert "background:rgba" in page and "capital" in page
    code, out, _ = _run(capsys, "decompose", "--model", str(model_dir), "-p", "The capital of France is",
                        "-t", " Paris", "--foil", " Tokyo", "--neuron-layers", "0,1", "--html", str(html))
    assert code == 0 and "per input token" in out and "top 20 components" in out
    # a downstream neuron as the target: only components that can reach it, the total is its activation
    code, out, _ = _run(capsys, "decompose", "--model", str(model_dir), "-p", "The capital of France is",
                        "--to-neuron", "L1:4", "--html", str(html), "--json")
    data = json.loads(out)
    lm = tiny_model("llama")
    seen = {}
    handle = lm.model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("h", args[0]))
    try:
        lm.model(**lm.tokenizer("The capital of France is", return_tensors="pt"))
    finally:
        handle.remove()
    assert code == 0 and data["target_kind"] == "neuron" and data["neuron_layers"] == [0]
    assert abs(data["total"] - float(seen["h"][0, -1, 4])) < 1e-5
    assert all(c["layer"] <= 1 and c["name"] != "L1.mlp" for c in data["components"])


def test_cli_circuit_registers_a_study(capsys, model_dir, tmp_path, write_jsonl):
    facts = write_jsonl([{**f, "label": "capital"} for f in FACTS])
    atlas = tmp_path / "atlas"
    code, out, _ = _run(capsys, "circuit", "--model", str(model_dir), "--facts", str(facts), "--relation", "capital",
                        "--out", str(atlas), "--n-random", "3", "--share", "0.5", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["study"] == "circuit-capital" and data["n_facts"] == 3
    manifest = json.loads((atlas / "manifest.json").read_text())
    assert manifest["studies"]["circuit-capital"]["kind"] == "circuit"
    svg = (atlas / "studies" / "circuit-capital" / "circuit.svg").read_text()
    assert svg.startswith("<svg") and all(c in svg for c in data["components"])
    fastapi = pytest.importorskip("fastapi")
    assert fastapi
    from fastapi.testclient import TestClient

    from neuronatlas.web import Library, create_app

    client = TestClient(create_app(Library([atlas])))
    page = client.get("/a/atlas/study/circuit-capital")
    assert page.status_code == 200 and "circuit.svg" in page.text and "necessity" in page.text
    assert client.get("/a/atlas/study/circuit-capital/files/circuit.svg").status_code == 200


@pytest.mark.parametrize("args, needle", [
    (["decompose", "--prompt", "x", "--target", ""], "encodes to no tokens"),
    (["decompose", "--prompt", " ", "--target", " Paris"], "prompt is empty"),
    (["decompose", "--prompt", "The cat", "--target", " Paris", "--neuron-layers", "7"], "out of range"),
    (["decompose", "--prompt", "The cat", "--target", " Paris", "--neuron-layers", "a"], "cannot parse --neuron-layers"),
    (["decompose", "--prompt", "The cat"], "nothing to explain"),
    (["decompose", "--prompt", "The cat", "--to-neuron", "L9:0"], "outside the model"),
    (["decompose", "--prompt", "The cat", "--to-neuron", "L1"], "cannot parse neuron id"),
    (["circuit", "--relation", "capital", "--facts", "missing.jsonl"], "file not found"),
    (["circuit", "--relation", "nope", "--facts", "FACTS"], "no facts of relation 'nope'"),
    (["circuit", "--relation", "capital", "--facts", "FACTS", "--ablation", "half"], "unknown --ablation"),
])
def test_cli_errors_are_one_line(capsys, model_dir, tmp_path, write_jsonl, args, needle):
    facts = write_jsonl([{**f, "label": "capital"} for f in FACTS])
    args = [str(facts) if a == "FACTS" else a for a in args]
    if args[0] == "circuit":
        args += ["--out", str(tmp_path / "atlas")]
    code, _, err = _run(capsys, *args, "--model", str(model_dir))
    assert code == 2 and needle in err and "Traceback" not in err
    assert sum("error" in line for line in err.strip().splitlines()) == 1  # progress notes, then one error line


@pytest.mark.slow
def test_embedded_model_invariant():
    from neuronatlas.models import load_model

    from neuronatlas.record.hooks import count_hooks

    lm = load_model("default")
    before = lm.model.config._attn_implementation
    tr = trace_prompt(lm, "The capital of France is")
    assert lm.model.config._attn_implementation == before and count_hooks(lm.model) == 0
    T = tr.n_tokens
    target = LogitTarget(lm.tokenizer.encode(" Paris")[0])
    out = propagate(lm, tr, [Source(), Source(tokens=(1, 3)), Source(heads=((3, 2),), neurons=((10, 100),))],
                    target=target, keep_layers=True)
    for layer, x in out.layers.items():
        for b in range(3):
            assert close(x[0, b] + x[1, b], tr.layer_out[layer][0]), (layer, b)
        assert float(x[0, 0].abs().max()) == 0.0
    logit = float(tr.logits[-1, target.token])
    assert float(out.rel[0]) == 0.0
    assert all(abs(float(r + i) - logit) < 1e-3 for r, i in zip(out.rel, out.irrel))
    whole = propagate(lm, tr, [Source(tokens=tuple(range(T)))], target=target)
    assert abs(float(whole.rel[0]) - logit) < 1e-3 and float(whole.irrel[0]) == 0.0
    # the first token is the attention sink: alone as the source its parts cancel, and are flagged
    tokens = token_attribution(lm, tr, target)
    assert tokens.total == pytest.approx(logit) and tokens.stable == [False] + [True] * (T - 1)
    assert tokens.interaction is None and 0 < sum(tokens.rel[1:]) < 2 * logit


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_mode_equals_the_two_part_run(family):
    """The fast mode reads W irrel as W total - W rel; it must agree with multiplying both parts."""
    lm = tiny_model(family)
    tr = trace_prompt(lm, PROMPT)
    sources = [Source(), Source(tokens=(0, 3)), Source(neurons=((0, 5), (1, 7)), heads=((0, 1),)),
               Source(mlps=(1,), positions=(1, 2))]
    target = LogitTarget(_target(lm), foil=_target(lm, " Tokyo"))
    exact = propagate(lm, tr, sources, target=target, keep_layers=True)
    fast = propagate(lm, tr, sources, target=target, keep_layers=True, fast=True)
    assert fast.rel.shape == (len(sources),) and float(fast.rel[0]) == 0.0
    assert torch.allclose(fast.rel, exact.rel, atol=1e-5) and torch.allclose(fast.irrel, exact.irrel, atol=1e-5)
    for layer in exact.layers:
        assert close(fast.layers[layer], exact.layers[layer])
    down = propagate(lm, tr, sources, target=NeuronTarget(1, 3), fast=True)
    ref = propagate(lm, tr, sources, target=NeuronTarget(1, 3))
    assert torch.allclose(down.rel, ref.rel, atol=1e-6)


def test_no_hook_survives():
    from neuronatlas.decompose.ablation import ablate_rows
    from neuronatlas.record.hooks import count_hooks

    lm = tiny_model("llama")
    before = count_hooks(lm.model)
    trace_prompt(lm, "The capital")
    with pytest.raises(RuntimeError):
        with ablate_rows(lm, [["L0.head:1", "L1.mlp", "L1:3"]]):
            assert count_hooks(lm.model) > before
            raise RuntimeError("boom")
    assert count_hooks(lm.model) == before
    assert lm.model.config._attn_implementation == "eager"


def test_neuron_validation_against_ablation():
    """In the last layer a neuron reaches the logit through the final norm only, so CD-T's ranking
    and the zero-ablation ranking nearly coincide (the norm's scale shifts a little under ablation)."""
    from neuronatlas.decompose.circuit import validate_neurons

    lm = tiny_model("llama")
    v = validate_neurons(lm, fact_rows(lm, FACTS), lm.n_layers - 1, ks=(5,))
    assert v.unstable == 0 and v.spearman > 0.95 and v.overlap[5] >= 0.8
    assert len(v.cd_top) == 10 and v.cd_top[0] == v.ablation_top[0]
