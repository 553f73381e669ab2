"""Explain: streaming exemplars vs brute force, explain -> simulate -> score, PMI, causal, HTTP backend, CLI."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from neuronatlas.cli.main import main
from neuronatlas.errors import AtlasError, ExplainerError, SelectionError
from neuronatlas.explain import (
    ExemplarConfig,
    ExplainConfig,
    LocalExplainer,
    OpenAIExplainer,
    Simulator,
    causal_effect,
    collect_exemplars,
    explain_neurons,
    explain_prompt,
    neuron_card,
    normalise,
    pearson,
    pmi_rerank,
    read_exemplars,
    read_explanations,
)
from neuronatlas.explain.exemplars import CHECKPOINT_DIR, decoded_vocab
from neuronatlas.explain.simulate import simulation_ids, value_token_ids
from neuronatlas.record.exemplar_stats import Reservoir, WindowTopK
from neuronatlas.explain.tables import EXPLANATION_COLUMNS
from neuronatlas.intervene import NeuronSet
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record.batching import encode_ids, forward, pad_ids
from neuronatlas.record.hooks import count_hooks, site_hooks
from neuronatlas.stats.running import TopK

SENTENCES = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Berlin is the capital of Germany. Madrid is in Spain. Rome is in Italy.",
    "My favourite animal is a dog. Today I saw a cat and a bird.",
    "Le chat est noir. Der Hund ist braun. El perro es grande.",
    "Iron has the symbol Fe. Gold has the symbol Au. 0 1 2 3 4 5 6 7 8 9 10",
    "a dog and a cat",
    "Tokyo is in Japan and Paris is in France.",
    "Gold",
    "The bird saw the dog. The cat saw the bird. The dog saw the cat.",
    "Der Hund und die Katze. 1 2 3",
]
DOCS = [{"doc_id": f"d{i}", "text": t, "source": "tests"} for i, t in enumerate(SENTENCES)]
SMALL = ExemplarConfig(top_k=4, n_random=3, context=3, after=2, batch_size=3, chunk_docs=4, seed=0)


def _full(lm, texts, component="mlp"):
    """Per document: (tokens, layers, neurons) activations, one document at a time (no padding)."""
    out = []
    for ids in encode_ids(lm, texts, max_length=256):
        seen: dict = {}
        with site_hooks(lm, component, observe=lambda layer, h, seen=seen: seen.__setitem__(layer, h[0].clone()),
                        batch_size=1):
            forward(lm, pad_ids(lm, [ids]))
        out.append(torch.stack([seen[i] for i in range(lm.n_layers)], dim=1))
    return out


@pytest.fixture(scope="module")
def tiny_atlas(tmp_path_factory):
    lm = tiny_model("llama")
    path = tmp_path_factory.mktemp("explain") / "atlas"
    collect_exemplars(lm, DOCS, path, config=SMALL, corpus_name="tests")
    return lm, path


# --- pure computations against hand values ----------------------------------------------------------

def test_normalise_by_hand():
    assert normalise([0.5, -1.0, 2.0, 1.99, float("nan"), 3.0], 2.0).tolist() == [2, 0, 10, 9, 0, 10]
    assert normalise([0.5, 1.0], 0.0).tolist() == [0, 0]
    assert normalise([0.5, 1.0], -1.0).tolist() == [0, 0]


def test_pearson_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0]
    # means 2.5 and 5; deviations (-1.5,-0.5,0.5,1.5) and (-3,-1,0,4)
    cov = 1.5 * 3 + 0.5 * 1 + 0 + 1.5 * 4
    expected = cov / math.sqrt((2 * 1.5**2 + 2 * 0.5**2) * (9 + 1 + 0 + 16))
    assert pearson(x, y) == pytest.approx(expected)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        pearson([1], [2])


def test_window_topk_matches_topk_and_samples_uniformly():
    gen = torch.Generator().manual_seed(0)
    n_units, k = 6, 3
    ours, ref = WindowTopK.empty(n_units, k, 1, 1), TopK.empty((n_units,), k)
    for b in range(5):
        h = torch.randn(2, 7, n_units, generator=gen)
        rows, cols = torch.ones(2, 7, dtype=torch.bool).nonzero(as_tuple=True)
        doc = torch.tensor([2 * b, 2 * b + 1], dtype=torch.int32)
        ours.update(h, torch.ones(14, dtype=torch.bool), doc, torch.tensor([7, 7]))
        ref.update(h[rows, cols], doc[rows], cols)
        # the window centre is the entry's own activation
        assert torch.equal(ours.activation[torch.isfinite(ours.top.values)], ours.top.values[torch.isfinite(ours.top.values)])
    assert torch.equal(ours.top.values, ref.values)
    assert torch.equal(ours.top.prompt, ref.prompt) and torch.equal(ours.top.position, ref.position)
    # the reservoir is a uniform sample: 100 tokens in 10 batches, 4000 units keeping 2 each -> ~80 picks per token
    counts = torch.zeros(100)
    sampler = Reservoir(4000, 2, 0, 0, gen)
    h = torch.zeros(1, 10, 4000)
    for b in range(10):
        sampler.update(10 * b, h, torch.arange(10), torch.tensor([b], dtype=torch.int32), torch.tensor([10]))
    picks = sampler.sample.top
    assert bool((picks.prompt[:, 0] * 10 + picks.position[:, 0] != picks.prompt[:, 1] * 10 + picks.position[:, 1]).all())
    for d, p in zip(picks.prompt.reshape(-1).tolist(), picks.position.reshape(-1).tolist()):
        counts[d * 10 + p] += 1
    chi2 = float(((counts - 80) ** 2 / 80).sum())
    assert chi2 < 200  # 99 degrees of freedom: mean 99, sd 14


# --- streaming exemplars ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_exemplars_equal_brute_force(tmp_path, family):
    lm = tiny_model(family)
    info = collect_exemplars(lm, DOCS, tmp_path / "a", config=SMALL, corpus_name="tests")
    assert info["docs"] == len(DOCS) and info["tokens"] == sum(len(x) for x in encode_ids(lm, SENTENCES))
    full = _full(lm, SENTENCES)
    vocab = decoded_vocab(lm.tokenizer)
    ids = encode_ids(lm, SENTENCES)
    every = torch.cat(full)                                                     # (tokens, L, N)
    table = pq.read_table(tmp_path / "a/corpus_exemplars.parquet")
    assert table.column_names == ["layer", "neuron", "kind", "rank", "doc_id", "position", "activation",
                                  "window_start", "window_tokens", "window_acts"]
    docs = pq.read_table(tmp_path / "a/corpus_docs.parquet")
    assert docs.column_names == ["doc_id", "source", "text", "tokens"]
    by_neuron: dict = {}
    for r in table.to_pylist():
        by_neuron.setdefault((r["layer"], r["neuron"]), []).append(r)
    assert len(by_neuron) == lm.n_layers * lm.n_neurons
    for layer in range(lm.n_layers):
        expected = every[:, layer].topk(SMALL.top_k, dim=0).values                # (k, N)
        for neuron in range(lm.n_neurons):
            rows = by_neuron[(layer, neuron)]
            top = [r for r in rows if r["kind"] == "top"]
            rand = [r for r in rows if r["kind"] == "random"]
            assert [r["rank"] for r in top] == list(range(SMALL.top_k)) and len(rand) == SMALL.n_random
            got = torch.tensor([r["activation"] for r in top])
            assert torch.allclose(got, expected[:, neuron], atol=1e-5)
            for r in top + rand:
                d, pos = int(r["doc_id"][1:]), r["position"]
                acts = full[d][:, layer, neuron]
                assert r["activation"] == pytest.approx(float(acts[pos]), abs=1e-5)
                start, end = max(0, pos - SMALL.context), min(len(ids[d]), pos + SMALL.after + 1)
                assert r["window_start"] == start
                assert np.allclose(r["window_acts"], acts[start:end].numpy(), atol=1e-5)
                assert r["window_tokens"] == [vocab[i] for i in ids[d][start:end]]
            assert len({(r["doc_id"], r["position"]) for r in rand}) == SMALL.n_random
    ex = read_exemplars(tmp_path / "a", 1, 3)
    assert ex.top[0].tokens[ex.top[0].center] == by_neuron[(1, 3)][0]["window_tokens"][ex.top[0].center]
    assert ex.top[0].activation == pytest.approx(ex.max_activation)


def test_random_sample_depends_on_seed_and_resume_is_exact(tmp_path):
    lm = tiny_model("llama")
    collect_exemplars(lm, DOCS, tmp_path / "full", config=SMALL, corpus_name="tests")
    other = ExemplarConfig(**{**SMALL.__dict__, "seed": 1})
    collect_exemplars(lm, DOCS, tmp_path / "seed1", config=other, corpus_name="tests")

    def rows(name, kind):
        return [r for r in pq.read_table(tmp_path / name / "corpus_exemplars.parquet").to_pylist() if r["kind"] == kind]

    assert rows("full", "top") == rows("seed1", "top") and rows("full", "random") != rows("seed1", "random")

    def crash(done):
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect_exemplars(lm, DOCS, tmp_path / "crash", config=SMALL, corpus_name="tests", on_chunk=crash)
    assert json.loads((tmp_path / "crash" / CHECKPOINT_DIR / "state.json").read_text())["docs_done"] == 4
    info = collect_exemplars(lm, DOCS, tmp_path / "crash", config=SMALL, corpus_name="tests")
    assert info["resumed_from_doc"] == 4 and not (tmp_path / "crash" / CHECKPOINT_DIR).exists()
    for kind in ("top", "random"):
        assert rows("crash", kind) == rows("full", kind)
    assert collect_exemplars(lm, DOCS, tmp_path / "crash", config=SMALL, corpus_name="tests")["reused"]
    assert count_hooks(lm.model) == 0


def test_memory_is_independent_of_corpus_length():
    lm = tiny_model("llama")
    from neuronatlas.explain.exemplars import stream_exemplars

    small, _ = stream_exemplars(lm, DOCS[:3], SMALL)
    big, n = stream_exemplars(lm, lambda: (DOCS[i % len(DOCS)] for i in range(200)), SMALL)
    assert n == 200
    size = lambda s: sum(v.nbytes for v in s.state().values())
    assert size(small) == size(big)


# --- simulate, PMI, causal ------------------------------------------------------------------------------

def test_simulator_expected_value_equals_direct_computation():
    lm = tiny_model("qwen2", seed=1)
    sim = Simulator(lm, batch_size=2)
    values = value_token_ids(lm.tokenizer)
    assert sorted(values) == list(range(10))  # "10" is two tokens in this tokenizer: left out
    excerpts = [["The", " cat"], [" dog", " and", " a", "\n", "bird"], ["Gold"]]
    got = sim.simulate("words about animals", excerpts)
    for tokens, g in zip(excerpts, got):
        ids, reads = simulation_ids(lm, "words about animals", tokens)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0]
        expected = []
        for pos in reads:
            p = logits[pos].double().softmax(-1)
            mass = sum(float(p[values[v]]) for v in values)
            expected.append(sum(v * float(p[values[v]]) for v in values) / mass)
        assert np.allclose(g, expected, atol=1e-6)


def test_score_is_pearson_of_simulated_and_normalised(tiny_atlas):
    _, path = tiny_atlas
    ex = read_exemplars(path, 1, 3)
    lm = tiny_model("qwen2", seed=1)
    sim = Simulator(lm)
    scored = ex.top[:2] + ex.random[:2]
    simulated = np.concatenate(sim.simulate("numbers", [e.tokens for e in scored]))
    true = np.concatenate([normalise(e.acts, ex.max_activation) for e in scored])
    assert sim.score("numbers", scored, ex.max_activation) == pytest.approx(pearson(simulated, true))


def test_pmi_rerank_equals_hand_computation():
    lm = tiny_model("qwen2", seed=1)
    prompt = explain_prompt([(["The", " cat"], [0, 10]), ([" dog"], [7])])
    cands = ["cats", "the symbol of gold", "Paris"]
    best, scores = pmi_rerank(lm, prompt, cands, lam=0.2)

    def logp(text, target):
        p_ids, t_ids = encode_ids(lm, [text])[0], lm.tokenizer.encode(target, add_special_tokens=False)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].double().log_softmax(-1)
        return sum(float(logits[len(p_ids) - 1 + i, t]) for i, t in enumerate(t_ids))

    hand = [logp(prompt.render(lm.tokenizer), " " + c) - 0.2 * logp(prompt.prior().render(lm.tokenizer), " " + c)
            for c in cands]
    assert [s.pmi for s in scores] == pytest.approx(hand, abs=1e-4)
    assert best == int(np.argmax(hand))
    # the cached continuation scores agree with the core evaluation helper
    from neuronatlas.evaluate.core import target_logprobs
    from neuronatlas.explain.pmi import continuation_logprobs, pmi_scores
    from neuronatlas.explain.prefix import run_prefix

    text = prompt.render(lm.tokenizer)
    core = target_logprobs(lm, [text] * 3, [" " + c for c in cands]).logprob[0].tolist()
    assert continuation_logprobs(lm, text, [" " + c for c in cands]) == pytest.approx(core, abs=1e-4)
    # a prefix the explainer already ran is reused, with the same result
    shared = pmi_scores(lm, prompt, cands, lam=0.2, prefix=run_prefix(lm, text))
    assert [s.pmi for s in shared] == pytest.approx([s.pmi for s in scores], abs=1e-6)
    assert "<start>" in prompt.render(lm.tokenizer) and "<start>" not in prompt.prior().render(lm.tokenizer)


def test_causal_effect_equals_manual_zeroing():
    lm = tiny_model("llama")
    docs = {d["doc_id"]: ids for d, ids in zip(DOCS, encode_ids(lm, SENTENCES))}
    positions = [("d0", 2), ("d0", 5), ("d4", 3), ("d7", 0), ("d7", 50)]          # ("d7", 50): no next token
    res = causal_effect(lm, docs, positions, layer=1, neuron=3)
    expected = []
    for d, p in positions[:4]:
        ids = docs[d]
        if p >= len(ids) - 1:
            continue
        batch = pad_ids(lm, [ids])

        def zero(layer, h):
            if layer == 1:
                h = h.clone()
                h[..., 3] = 0
                return h
            return None

        clean = forward(lm, batch).logits[0, p].double().log_softmax(-1)[ids[p + 1]]
        with site_hooks(lm, "mlp", edit=zero):
            ablated = forward(lm, batch).logits[0, p].double().log_softmax(-1)[ids[p + 1]]
        expected.append(float(ablated - clean))
    assert all(abs(d) > 1e-7 for d in expected)                                  # the neuron matters a little
    assert res.deltas == pytest.approx(expected, rel=1e-3, abs=1e-9)             # batched/truncated vs one by one
    assert res.mean == pytest.approx(np.mean(expected), rel=1e-3)
    assert math.isnan(causal_effect(lm, docs, [], layer=1, neuron=3).mean)


# --- the whole loop ------------------------------------------------------------------------------------

def test_whole_loop_on_tiny_models(tiny_atlas):
    lm, path = tiny_atlas
    explainer_lm = tiny_model("qwen2", seed=1)
    config = ExplainConfig(candidates=3, seed=0, n_top=3, n_random=3)
    run = explain_neurons(path, NeuronSet.parse("L1:3 L0:5"), explainer=LocalExplainer(explainer_lm, max_new_tokens=8),
                          scorer=explainer_lm, subject=lm, config=config)
    rows = read_explanations(path)
    assert [(r["layer"], r["neuron"]) for r in rows] == [(0, 5), (1, 3)]
    assert tuple(pq.read_table(path / "explanations.parquet").column_names) == EXPLANATION_COLUMNS
    for res, row in zip(run.results, rows):
        assert row["explanation"] == res.explanation and row["explanation"] in row["candidates"]
        assert 1 <= len(row["candidates"]) <= 3 and row["explainer"] == "local:tiny-qwen2" and row["site"] == "mlp"
        assert -1 <= row["score"] <= 1 and -1 <= row["baseline_score"] <= 1
        assert row["pmi"] == pytest.approx(max(s.pmi for s in res.candidate_scores))
        assert math.isfinite(row["causal_delta_exemplars"]) and math.isfinite(row["causal_delta_random"])
    # the first neuron borrowed the second's explanation as its baseline (filled at the end), and vice versa
    assert {r.baseline_from for r in run.results} == {"L1:3", "L0:5"}
    # same seed -> same candidates; rerunning upserts instead of appending
    again = explain_neurons(path, NeuronSet.parse("L1:3"), explainer=LocalExplainer(explainer_lm, max_new_tokens=8),
                            scorer=explainer_lm, subject=lm, config=config)
    assert again.results[0].candidates == run.results[1].candidates and len(read_explanations(path)) == 2
    card = neuron_card(path, 1, 3)
    assert "decoded" not in card and "stats" not in card
    assert card["explanation"]["explanation"] == run.results[1].explanation
    assert card["exemplars"]["top"][0]["activation"] == pytest.approx(card["exemplars"]["max_activation"])
    with pytest.raises(AtlasError, match="no exemplars"):
        read_exemplars(path, 1, 99)
    with pytest.raises(SelectionError, match="outside the model"):
        neuron_card(path, 1, 99)
    assert count_hooks(lm.model) == 0 and count_hooks(explainer_lm.model) == 0


def test_card_shows_decoded_tokens_and_label_stats(tiny_atlas, prompts, tmp_path, capsys):
    import shutil

    import pyarrow as pa

    from neuronatlas.record import record
    from neuronatlas.store import Atlas

    lm, src = tiny_atlas
    path = tmp_path / "copy"
    shutil.copytree(src, path)
    record(lm, prompts, path, name="facts")
    Atlas.open(path).write_table("decoded.parquet", pa.table({
        "layer": [1, 1, 0], "neuron": [3, 3, 3], "side": ["out", "out", "out"], "direction": ["top", "top", "top"],
        "rank": [0, 1, 0], "token_id": [5, 6, 7], "token": [" Paris", " Tokyo", " dog"], "score": [2.0, 1.5, 1.0]}))
    card = neuron_card(path, 1, 3)
    assert card["decoded"] == {"out": {"top": [" Paris", " Tokyo"]}}
    labels = {r["label"] for r in card["stats"]}
    assert labels == {"capital", "animal", "symbol", "__all__"} and card["stats"][0]["label"] == "__all__"
    code, out, _ = _run(capsys, "show", "L1:3", "--atlas", path)
    assert code == 0 and "Paris" in out and "per-label statistics" in out and "capital" in out


# --- the HTTP backend ------------------------------------------------------------------------------------

class _Stub:
    """A chat/completions stub on 127.0.0.1; ``script`` says how to answer each successive request."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                mode = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                if mode == "slow":
                    time.sleep(0.6)
                status, text = {
                    "ok": (200, json.dumps({"choices": [{"message": {"content": f" the word 'cat' {body['seed']}."}}]})),
                    "slow": (200, "{}"), "bad": (200, "<html>not json"), "500": (500, "internal error"),
                    "401": (401, "{\"error\": \"bad key\"}"),
                }[mode]
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(text.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def make(*script):
        servers.append(_Stub(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _client(url, **kw):
    return OpenAIExplainer(url, "stub-model", api_key="k", timeout=kw.pop("timeout", 2.0), backoff=0.0, **kw)


def test_http_backend_good_reply_and_errors(stub):
    prompt = explain_prompt([(["The", " cat"], [0, 10])])
    ok = stub("ok")
    assert _client(ok.url).explain(prompt, n=2, seed=5) == ["the word 'cat' 5", "the word 'cat' 6"]
    assert ok.requests[0]["model"] == "stub-model" and ok.requests[0]["messages"][0]["role"] == "system"
    slow = stub("slow")
    with pytest.raises(ExplainerError, match=r"timed out after 0.2 s \(after 2 attempts\)"):
        _client(slow.url, timeout=0.2, retries=2).explain(prompt, n=1, seed=0)
    bad = stub("bad")
    with pytest.raises(ExplainerError, match="not chat/completions JSON"):
        _client(bad.url).explain(prompt, n=1, seed=0)
    err = stub("500")
    with pytest.raises(ExplainerError, match="HTTP 500: internal error") as info:
        _client(err.url, retries=3).explain(prompt, n=1, seed=0)
    assert len(err.requests) == 3 and "\n" not in str(info.value)
    denied = stub("401")
    with pytest.raises(ExplainerError, match="check the API key"):
        _client(denied.url, retries=3).explain(prompt, n=1, seed=0)
    assert len(denied.requests) == 1
    flaky = stub("500", "ok")
    assert _client(flaky.url, retries=2).explain(prompt, n=1, seed=0) == ["the word 'cat' 0"]
    with pytest.raises(ExplainerError, match="unreachable"):
        _client("http://127.0.0.1:9/v1", retries=1).explain(prompt, n=1, seed=0)


def test_no_finished_result_lost_when_a_later_neuron_fails(tiny_atlas, stub, tmp_path):
    import shutil

    lm, src = tiny_atlas
    path = tmp_path / "copy"
    shutil.copytree(src, path)
    (path / "explanations.parquet").unlink(missing_ok=True)
    server = stub("ok", "ok", "500")          # 2 candidates for the first neuron, then HTTP 500 for ever
    scorer = tiny_model("qwen2", seed=1)
    with pytest.raises(ExplainerError, match=r"L1:3: .*HTTP 500.*1 finished explanation\(s\) saved"):
        explain_neurons(path, NeuronSet.parse("L0:5 L1:3"), explainer=_client(server.url, retries=2), scorer=scorer,
                        subject=lm, config=ExplainConfig(candidates=2, n_top=2, n_random=2))
    rows = read_explanations(path)
    assert [(r["layer"], r["neuron"]) for r in rows] == [(0, 5)] and rows[0]["explainer"] == "openai:stub-model"
    assert rows[0]["explanation"].startswith("the word 'cat'")


# --- CLI ---------------------------------------------------------------------------------------------------

def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_exemplars_explain_show(capsys, tmp_path, write_jsonl):
    subject_dir, explainer_dir = tmp_path / "subject", tmp_path / "explainer"
    for lm, d in ((tiny_model("llama"), subject_dir), (tiny_model("qwen2", seed=1), explainer_dir)):
        lm.model.save_pretrained(d)
        lm.tokenizer.save_pretrained(d)
    corpus = write_jsonl([{"id": i, "text": t} for i, t in enumerate(SENTENCES)], name="corpus.jsonl")
    atlas = tmp_path / "atlas"
    code, out, err = _run(capsys, "exemplars", "--model", subject_dir, "--corpus", corpus, "--out", atlas, "--top-k", 4,
                          "--context", 3, "--random", 2, "--json")
    info = json.loads(out)
    assert code == 0 and info["docs"] == len(SENTENCES) and info["n_neurons"] == 32, err
    code, out, err = _run(capsys, "explain", "--atlas", atlas, "--neurons", "L1:2-3", "--explainer-model", explainer_dir,
                          "--candidates", 2, "--n-top", 2, "--n-random", 2, "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [(r["layer"], r["neuron"]) for r in results] == [(1, 2), (1, 3)]
    code, out, err = _run(capsys, "show", "L1:3", "--atlas", atlas, "--json")
    card = json.loads(out)
    assert code == 0 and card["explanation"]["explanation"] == results[1]["explanation"]
    assert card["exemplars"]["top"][0]["doc_id"] in {str(i) for i in range(len(SENTENCES))}
    code, out, _ = _run(capsys, "show", "L1:3", "--atlas", atlas)
    assert code == 0 and "the main thing this neuron does is find" in out and "top exemplars" in out
    # errors: one red line, exit code 2
    code, _, err = _run(capsys, "show", "L1:3-4", "--atlas", atlas)
    assert code == 2 and "one neuron" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "explain", "--atlas", tmp_path / "nope", "--neurons", "L0:1")
    assert code == 2 and "not an atlas" in err
    code, _, err = _run(capsys, "explain", "--atlas", atlas, "--neurons", "L9:1", "--explainer-model", explainer_dir)
    assert code == 2 and "out of range" in err
    code, _, err = _run(capsys, "explain", "--atlas", atlas, "--neurons", "L0:1", "--explainer", "openai")
    assert code == 2 and "--base-url" in err
    code, _, err = _run(capsys, "exemplars", "--model", subject_dir, "--corpus", tmp_path / "missing.txt", "--out", atlas)
    assert code == 2 and "not found" in err


def test_card_reader_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, neuronatlas.explain.card, neuronatlas.explain.tables; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# --- the real embedded model ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_model_exemplars_and_explain(tmp_path):
    from neuronatlas.data.corpus import default_corpus
    from neuronatlas.models import load_model

    lm = load_model("default")
    docs = default_corpus(n_docs=6, seed=0)
    config = ExemplarConfig(top_k=4, n_random=2, context=5, after=1, max_length=40, batch_size=6)
    info = collect_exemplars(lm, docs, tmp_path / "a", config=config, corpus_name="default_corpus(6)")
    assert info["n_layers"] == 30 and info["n_neurons"] == 1536 and info["docs"] == 6
    ex = read_exemplars(tmp_path / "a", 20, 7)
    assert len(ex.top) == 4 and len(ex.random) == 2 and ex.top[0].activation > 0
    explain_neurons(tmp_path / "a", NeuronSet.parse("L5:100 L20:7"), explainer=LocalExplainer(lm, max_new_tokens=10),
                    scorer=lm, subject=lm, config=ExplainConfig(candidates=2, n_top=2, n_random=2))
    rows = read_explanations(tmp_path / "a")
    assert len(rows) == 2 and all(r["explanation"] and r["baseline_score"] is not None for r in rows)
    assert all(-1 <= r["score"] <= 1 and math.isfinite(r["causal_delta_exemplars"]) for r in rows)
