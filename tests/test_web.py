"""The viewer: every page, search, static export, 404s, traversal attempts, bad parameters, read-only.

The atlas is built here from a real tiny model (`record`); the tables whose producers are still being
written (decoded, selections, explanations, corpus exemplars, a study) are written with the exact
schema of docs/atlas-format.md.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from neuronatlas.data.prompts import PromptSet
from neuronatlas.report.model import Finding, Section, StudyReport, Table
from neuronatlas.store import Atlas

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from neuronatlas.web import Library, create_app, export_site
from neuronatlas.web.data import concept_key
from neuronatlas.web.render import display_token

PROMPTS = [
    {"text": "The capital of France is Paris", "label": "capital"},
    {"text": "The capital of Japan is Tokyo", "label": "capital"},
    {"text": "Berlin is the capital of Germany", "label": "capital"},
    {"text": "My favourite animal is a dog", "label": "animal"},
    {"text": "Today I saw a cat and a bird", "label": "animal"},
    {"text": "Iron has the symbol Fe", "label": "symbol"},
    {"text": "Gold has the symbol Au", "label": "symbol"},
]
ODD_CONCEPT = "emotion: joy/sad"
EXPLAINED = {(1, 3): "capital cities such as Paris and Tokyo", (0, 7): "animal words like dog and cat",
             (1, 20): "chemical symbols 100% of the time"}


STUDY_REPORT = StudyReport(
    "relations", "Relation-specific neurons", intro="Which neurons carry a relation, and what switching them off does.",
    setup={"model": "tiny-llama", "n_select": 6, "langs": ["en", "de"]},
    findings=[Finding("cumulativity", "Cumulativity", "Accuracy falls as more selected neurons are deactivated.",
                      rule="slope < 0 and p_trend < 0.05", holds=True, numbers={"slope": -0.31, "p_trend": 0.004}),
              Finding("interference", "Interference", "Deactivating capital neurons leaves symbol facts intact.",
                      rule="McNemar p < 0.05 after BH", holds=False, numbers={"p": 0.41})],
    sections=[Section("Selected versus random neurons", "cumulativity", figures=["capital_dose_response.png", "gone.png"],
                      tables=[Table(["relation", "neuron", "drop", "random drop", "p"],
                                    [["capital", "L1:3", 0.31, 0.02, 0.001], ["animal", "L0:7", 0.12, None, 0.2],
                                     ["symbol", "L9:99", 0.0, 0.0, 1.0]],
                                    caption="accuracy drop per relation", concept_columns=["relation"])]),
              Section("Overlap", "Selections of different relations barely overlap.", figures=["overlap.png"])])


def tiny_png() -> bytes:
    """A valid 2x2 PNG (no imaging library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + b"\xff\x7a\x00" * 2 for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def build_web_atlas(root: Path) -> Path:
    """Record a tiny llama into ``root/atlas`` and add every table the viewer reads (2 layers x 32 neurons)."""
    from neuronatlas.models.tiny import tiny_model
    from neuronatlas.record import RecordConfig, record

    lm = tiny_model("llama")
    path = root / "atlas"
    record(lm, PromptSet.from_rows(PROMPTS, source="web-test"), path, name="facts", config=RecordConfig(top_k=5))
    atlas = Atlas.open(path)
    L, N = lm.n_layers, lm.n_neurons
    vocab = lm.tokenizer.convert_ids_to_tokens(list(range(len(lm.tokenizer))))
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {k: [] for k in ("layer", "neuron", "side", "direction", "rank", "token_id", "token", "score")}
    for layer in range(L):
        for n in range(N):
            for side in ("out", "in_up", "in_gate"):
                for direction in ("top", "bottom"):
                    for rank in range(5):
                        tid = int(rng.integers(2, len(vocab)))
                        if (layer, n, side, direction, rank) == (1, 3, "out", "top", 0):
                            tid = vocab.index("ĠParis")
                        rows["layer"].append(layer)
                        rows["neuron"].append(n)
                        rows["side"].append(side)
                        rows["direction"].append(direction)
                        rows["rank"].append(rank)
                        rows["token_id"].append(tid)
                        rows["token"].append(vocab[tid])
                        rows["score"].append(float((5 - rank) * (1 if direction == "top" else -1)))
    atlas.write_table("decoded.parquet", rows, describe="weight-based decoding through the unembedding")
    sel = []
    for concept, neurons in (("capital", [(1, 3), (1, 5), (0, 2), (0, 9)]), ("animal", [(0, 7), (1, 3)]),
                             ("symbol", [(1, 20)]), (ODD_CONCEPT, [(0, 11)])):
        for rank, (layer, n) in enumerate(neurons):
            sel.append({"study": "relations", "concept": concept, "method": "ap", "site": "mlp", "layer": layer,
                        "neuron": n, "score": 0.9 - 0.1 * rank, "rank": rank})
    sel.append({"study": "relations", "concept": "capital", "method": "smd", "site": "mlp", "layer": 1, "neuron": 3,
                "score": 2.5, "rank": 0})
    atlas.write_table("selections.parquet", {k: [r[k] for r in sel] for k in sel[0]})
    ex = [{"layer": layer, "neuron": n, "site": "mlp", "explanation": text, "explainer": "test-explainer",
           "score": 0.8 - 0.1 * i, "baseline_score": 0.05, "pmi": 1.5, "candidates": [text, "something else"],
           "causal_delta_exemplars": -0.42, "causal_delta_random": -0.01}
          for i, ((layer, n), text) in enumerate(EXPLAINED.items())]
    atlas.write_table("explanations.parquet", {k: [r[k] for r in ex] for k in ex[0]})
    doc = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "."]
    atlas.write_table("corpus_docs.parquet", {"doc_id": ["0"], "source": ["test"], "text": ["The capital of France is Paris."],
                                              "tokens": [doc]})
    atlas.write_table("corpus_exemplars.parquet", {
        "layer": [1, 1], "neuron": [3, 3], "kind": ["top", "random"], "rank": [0, 0], "doc_id": ["0", "0"],
        "position": [5, 2], "activation": [2.5, 0.1], "window_start": [0, 0], "window_tokens": [doc, doc],
        "window_acts": [[0.0, 0.3, 0.1, 0.9, 0.2, 2.5, -0.4], [0.0, 0.3, 0.1, 0.9, 0.2, 2.5, -0.4]]})
    study = path / "studies" / "relations"
    study.mkdir(parents=True)
    (study / "results.json").write_text(json.dumps({
        "n_neurons": 6, "concepts": {"capital": {"accuracy_drop": 0.31, "random_drop": 0.02, "n": 4},
                                     "animal": {"accuracy_drop": 0.12}},
        "raw": {f"key{i}": {"idx": list(range(30)), "value": i} for i in range(50)},     # never shown as a dump
        "report": STUDY_REPORT.to_json()}))
    (study / "report.html").write_text("<html><body><h1>relations report</h1></body></html>")
    (study / "capital_dose_response.png").write_bytes(tiny_png())
    (study / "overlap.png").write_bytes(tiny_png())
    (study / "notes.txt").write_text("not servable")
    legacy = path / "studies" / "legacy"
    legacy.mkdir(parents=True)
    (legacy / "results.json").write_text(json.dumps({
        "findings": {"cumulativity": "Accuracy falls as more neurons are switched off."},
        "config": {"langs": ["en", "de"]}, "raw": {f"k{i}": i for i in range(400)}}))
    (root / "secret.png").write_bytes(b"secret outside the atlas")
    (study / "leak.png").symlink_to(root / "secret.png")
    atlas.update_manifest(lambda m: m["studies"].__setitem__("relations", {
        "kind": "relations", "path": "studies/relations", "created": "2026-01-01T00:00:00+00:00",
        "concepts": ["capital", "animal", "symbol"]}))
    return path


@pytest.fixture(scope="session")
def web_atlas(tmp_path_factory) -> Path:
    return build_web_atlas(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="session")
def client(web_atlas) -> TestClient:
    return TestClient(create_app(Library([web_atlas])))


def ok(client: TestClient, url: str) -> str:
    r = client.get(url)
    assert r.status_code == 200, (url, r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("text/html")
    return r.text


def test_home_and_atlas_pages(client):
    html = ok(client, "/")
    assert "/a/atlas" in html and "tiny-llama" in html and "facts" in html and "relations" in html
    html = ok(client, "/a/atlas")
    for text in ("tiny-llama", "capital", "animal", "symbol", "decoded", "selections", "report.html",
                 "capital cities such as Paris", "2 layers"):
        assert text in html, text


def test_heatmap_counts_and_filters(client):
    html = ok(client, "/a/atlas/heatmap")
    # capital: layer 0 -> 2 neurons, layer 1 -> 2 neurons (L1/3 counted once across methods)
    assert 'href="/a/atlas/concept/capital?layer=1">2</a>' in html
    assert 'href="/a/atlas/concept/capital?layer=0">2</a>' in html
    html = ok(client, "/a/atlas/heatmap?method=smd")
    assert "capital" in html and "symbol" not in html.split("<tbody>")[1]
    assert client.get("/a/atlas/heatmap?method=nope").status_code == 400


def test_concept_page(client):
    html = ok(client, "/a/atlas/concept/capital")
    assert "/a/atlas/neuron/L1/3" in html and "/a/atlas/neuron/L0/9" in html
    assert "accuracy_drop" in html and "0.31" in html                      # study numbers for this concept
    assert "Selected versus random neurons · accuracy drop per relation · random drop" in html   # its report rows
    assert "/a/atlas/study/relations/files/capital_dose_response.png" in html  # its plot
    assert "overlap.png" not in html                                         # not a plot of this concept
    assert "/a/atlas/study/relations/files/report.html" in html
    assert "capital cities such as Paris" in html                            # explanation next to the neuron
    html = ok(client, "/a/atlas/concept/capital?layer=0")
    assert "/a/atlas/neuron/L0/2" in html and "/a/atlas/neuron/L1/5" not in html
    key = concept_key(ODD_CONCEPT)
    assert key != ODD_CONCEPT
    assert "emotion: joy/sad" in ok(client, f"/a/atlas/concept/{key}")
    assert f"/a/atlas/concept/{key}" in ok(client, "/a/atlas")


def test_neuron_page_sections(client):
    html = ok(client, "/a/atlas/neuron/L1/3")
    for section in ('id="explanation"', 'id="stats"', 'id="decoded"', 'id="exemplars"', 'id="corpus"',
                    'id="selections"'):
        assert section in html, section
    assert "capital cities such as Paris and Tokyo" in html and "-0.42" in html and "0.05" in html
    assert "<svg" in html and "all tokens" in html                              # bar chart of means
    assert 'class="chip">·Paris</span>' in html                                 # decoded token, Ġ undone
    assert 'class="t focus"' in html                                             # exemplar token highlighted
    assert html.count('style="background-color: rgba(') >= 5                     # corpus window coloured
    assert 'href="/a/atlas/concept/capital"' in html and 'href="/a/atlas/concept/animal"' in html
    # a neuron with only statistics, decoded tokens and exemplars
    html = ok(client, "/a/atlas/neuron/L0/0")
    assert 'id="stats"' in html and 'id="explanation"' not in html and 'id="selections"' not in html
    assert "L0/1" in html  # next-neuron link
    assert ok(client, "/a/atlas/neuron/1/31")  # the "L" is optional


def test_neuron_stats_match_the_table(client, web_atlas):
    atlas = Atlas.open(web_atlas)
    row = atlas.query("SELECT mean FROM stats WHERE layer = 1 AND neuron = 3 AND label = 'capital'").to_pylist()[0]
    assert f"{row['mean']:.4g}" in ok(client, "/a/atlas/neuron/L1/3")


def test_search(client):
    html = ok(client, "/a/atlas/search?q=Paris&kind=token")
    assert "/a/atlas/neuron/L1/3" in html
    html = ok(client, "/a/atlas/search?q=par&kind=token&match=contains&side=out&direction=top")
    assert "/a/atlas/neuron/L1/3" in html
    html = ok(client, "/a/atlas/search?q=capital%20cities&kind=explanation")
    assert "/a/atlas/neuron/L1/3" in html and "L0/7" not in html
    html = ok(client, "/a/atlas/search?q=100%25&kind=explanation")          # % is literal, not a wildcard
    assert "/a/atlas/neuron/L1/20" in html and "L1/3" not in html
    assert "1 result" in ok(client, "/a/atlas/search?q=of%20the%20time&kind=explanation")
    html = ok(client, "/a/atlas/search?q=capit&kind=concept")
    assert 'href="/a/atlas/concept/capital"' in html and "/a/atlas/neuron/L0/9" in html
    html = ok(client, "/a/atlas/search?q=L1/17")
    assert 'href="/a/atlas/neuron/L1/17"' in html
    html = ok(client, "/a/atlas/search?q=' OR 1=1; DROP TABLE stats; --&kind=explanation")
    assert "0 results" in html
    assert ok(client, "/a/atlas/search")  # empty form


def test_search_pagination(client):
    html = ok(client, "/a/atlas/search?q=%C4%A0&kind=token&match=contains")  # every 'Ġ' token
    assert "page=2" in html
    assert client.get("/a/atlas/search?q=%C4%A0&kind=token&match=contains&page=2").status_code == 200
    assert client.get("/a/atlas/search?q=%C4%A0&kind=token&match=contains&page=999").status_code == 404


def test_study_page_and_files(client):
    html = ok(client, "/a/atlas/study/relations")
    assert "<h1>Relation-specific neurons</h1>" in html
    for f in STUDY_REPORT.findings:                                   # findings in full, with their rules
        assert f.text in html and f.rule.replace("<", "&lt;") in html
    assert "does not hold" in html and "holds</span>" in html
    assert '<img src="/a/atlas/study/relations/files/capital_dose_response.png"' in html
    assert '<img src="/a/atlas/study/relations/files/overlap.png"' in html
    assert "gone.png is not in the study folder" in html
    assert 'href="/a/atlas/neuron/L1/3"' in html and 'href="/a/atlas/neuron/L0/7"' in html
    assert "L9:99" in html and "/neuron/L9/99" not in html           # outside the atlas: plain text
    assert 'href="/a/atlas/concept/capital"' in html and 'href="/a/atlas/concept/symbol"' in html
    assert "accuracy drop per relation" in html and "0.001" in html
    assert 'download href="/a/atlas/study/relations/files/results.json"' in html
    assert "/a/atlas/study/relations/files/report.html" in html
    assert "key49" not in html and "raw.key" not in html and "idx" not in html   # no key dump
    html = ok(client, "/a/atlas/study/legacy")                        # results.json without a typed report
    assert "Accuracy falls as more neurons are switched off." in html
    assert "k399" not in html and "langs" not in html
    assert 'download href="/a/atlas/study/legacy/files/results.json"' in html
    r = client.get("/a/atlas/study/relations/files/overlap.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == tiny_png()
    r = client.get("/a/atlas/study/relations/files/report.html")
    assert r.status_code == 200 and "sandbox" in r.headers["content-security-policy"]


@pytest.mark.parametrize("url", [
    "/a/nope", "/a/nope/neuron/L0/0", "/a/atlas/neuron/L2/0", "/a/atlas/neuron/L0/32", "/a/atlas/concept/nope",
    "/a/atlas/concept/%2e%2e", "/a/atlas/study/nope", "/a/atlas/study/relations/files/notes.txt",
    "/a/atlas/study/relations/files/leak.png", "/a/atlas/study/relations/files/missing.png",
    "/a/atlas/study/relations/files/..%2F..%2Fmanifest.json", "/a/atlas/study/%2e%2e/files/manifest.json",
    "/a/atlas/study/relations/files/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.png", "/a/x/../../etc/passwd",
    "/a/atlas/%2e%2e/%2e%2e/etc/passwd", "/static/../../etc/passwd", "/static/%2e%2e/data.py", "/nothing",
])
def test_not_found_and_traversal(client, url):
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code)
    assert r.headers["content-type"].startswith("text/html")
    assert "secret outside" not in r.text and "schema_version" not in r.text


@pytest.mark.parametrize("url", [
    "/a/atlas/neuron/Lx/abc", "/a/atlas/neuron/L1/-3", "/a/atlas/neuron/L1/99999999999999", "/a/atlas/heatmap?page=0",
    "/a/atlas/heatmap?page=-1", "/a/atlas/heatmap?page=99999999999999999999", "/a/atlas/heatmap?page=abc",
    "/a/atlas/concept/capital?page=1000001", "/a/atlas/concept/capital?layer=-1", "/a/atlas/concept/capital?layer=7",
    "/a/atlas/search?q=x&kind=sql", "/a/atlas/search?q=x&match=regex", "/a/atlas/search?q=" + "x" * 300,
    "/a/atlas/search?q=x&side=../../etc", "/a/atlas/concept/capital?study=nope",
])
def test_bad_parameters_are_4xx(client, url):
    r = client.get(url)
    assert 400 <= r.status_code < 500, (url, r.status_code)
    assert r.headers["content-type"].startswith("text/html")


def test_pages_past_the_end_are_404(client):
    assert client.get("/a/atlas/concept/capital?page=2").status_code == 404
    assert client.get("/a/atlas/heatmap?page=50000").status_code == 404


@pytest.mark.parametrize("method", ["post", "put", "delete", "patch"])
@pytest.mark.parametrize("url", ["/", "/a/atlas", "/a/atlas/neuron/L1/3", "/a/atlas/search",
                                 "/a/atlas/study/relations/files/overlap.png", "/static/style.css"])
def test_read_only(client, web_atlas, method, url):
    before = sorted((p, p.stat().st_mtime_ns) for p in web_atlas.rglob("*"))
    r = getattr(client, method)(url)
    assert r.status_code == 405, (method, url, r.status_code)
    assert sorted((p, p.stat().st_mtime_ns) for p in web_atlas.rglob("*")) == before


def test_security_headers_and_host_guard(web_atlas):
    client = TestClient(create_app(Library([web_atlas]), allowed_hosts=["127.0.0.1", "localhost"]),
                        base_url="http://127.0.0.1:8765")
    r = client.get("/")
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400


def test_several_atlases(web_atlas, tmp_path):
    import shutil

    other = tmp_path / "atlas"
    shutil.copytree(web_atlas, other, symlinks=True)
    lib = Library([web_atlas, other])
    assert list(lib.views) == ["atlas", "atlas-2"]
    client = TestClient(create_app(lib))
    html = ok(client, "/")
    assert "/a/atlas-2" in html
    assert ok(client, "/a/atlas-2/neuron/L1/3")


def test_atlas_with_only_a_record(tmp_path):
    from neuronatlas.models.tiny import tiny_model
    from neuronatlas.record import RecordConfig, record

    record(tiny_model("gpt2"), PromptSet.from_rows(PROMPTS[:3]), tmp_path / "bare", config=RecordConfig(top_k=3))
    client = TestClient(create_app(Library([tmp_path / "bare"])))
    assert "heatmap" not in ok(client, "/a/bare").split("<main>")[1]
    html = ok(client, "/a/bare/neuron/L1/4")
    assert 'id="stats"' in html and 'id="decoded"' not in html and "Not in this atlas" in html
    assert client.get("/a/bare/heatmap").status_code == 404
    assert "no decoded.parquet" in ok(client, "/a/bare/search?q=Paris")


def test_display_token():
    assert display_token("ĠParis") == " Paris" and display_token("▁Paris") == " Paris"
    assert display_token("Ċ") == "↵" and display_token("café") == "café" and display_token("Ã©") == "é"


def test_static_export(web_atlas, tmp_path):
    out = tmp_path / "site"
    summary = export_site([web_atlas], out, tokens=["Paris"])
    expected = {(1, 3), (1, 5), (0, 2), (0, 9), (0, 7), (1, 20), (0, 11)}
    assert summary.neurons >= len(expected)
    for layer, n in expected:
        assert (out / f"a/atlas/neuron/L{layer}/{n}.html").exists()
    home = (out / "index.html").read_text()
    assert 'href="a/atlas/index.html"' in home and 'href="static/style.css"' in home
    concept = (out / "a/atlas/concept/capital.html").read_text()
    assert 'href="../neuron/L1/3.html"' in concept and "capital_dose_response.png" in concept
    assert (out / "a/atlas/concept/capital+L0.html").exists()
    assert (out / "a/atlas/study/relations/files/capital_dose_response.png").read_bytes() == tiny_png()
    assert not (out / "a/atlas/study/relations/files/leak.png").exists()
    assert (out / "a/atlas/search/token-paris.html").exists()
    neuron = (out / "a/atlas/neuron/L1/3.html").read_text()
    assert 'href="../../../../static/style.css"' in neuron and 'href="../../concept/capital.html"' in neuron
    assert "/a/atlas/" not in neuron  # no absolute server links
    # every relative link of every page resolves to a written file
    for page in out.rglob("*.html"):
        for href in __import__("re").findall(r'(?:href|src)="([^"#?]+)"', page.read_text()):
            assert (page.parent / href).resolve().exists(), (page, href)
    assert not (out / "a/atlas/neuron/L0/0.html").exists()
    with pytest.raises(Exception, match="not an empty directory"):
        export_site([web_atlas], tmp_path)  # refuses a non-export directory
    again = export_site([web_atlas], out, all_neurons=True)  # an earlier export may be overwritten
    assert again.neurons == 64 and (out / "a/atlas/neuron/L0/0.html").exists()


def test_cli_export_and_serve_options(web_atlas, tmp_path):
    from neuronatlas.cli.main import main

    assert main(["export-html", str(web_atlas), "--out", str(tmp_path / "s"), "--json"]) == 0
    assert (tmp_path / "s/index.html").exists()
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(web_atlas), "--port", "0"]) == 2


def test_no_torch_in_the_server_process(web_atlas):
    code = f"""
import sys
from fastapi.testclient import TestClient
import neuronatlas.web
from neuronatlas.web import Library, create_app
client = TestClient(create_app(Library([{str(web_atlas)!r}])))
for url in ["/", "/a/atlas", "/a/atlas/heatmap", "/a/atlas/concept/capital", "/a/atlas/neuron/L1/3",
            "/a/atlas/search?q=Paris", "/a/atlas/study/relations"]:
    assert client.get(url).status_code == 200, url
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("LOADED", bad)
sys.exit(1 if bad else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_parquet_fallback_matches_in_memory_copies(web_atlas):
    """With no memory budget every table is read from Parquet; the pages must not change."""
    fast, slow = Library([web_atlas]), Library([web_atlas], memory_mb=0)
    fast.get("atlas").warm()
    assert set(fast.get("atlas").in_memory) >= {"stats", "exemplars", "decoded", "prompts"}
    a, b = TestClient(create_app(fast)), TestClient(create_app(slow))
    for url in ["/a/atlas/neuron/L1/3", "/a/atlas/search?q=Paris", "/a/atlas/search?q=par&match=contains&side=out",
                "/a/atlas/concept/capital", "/a/atlas/search?q=%C4%A0&match=contains&page=2", "/a/atlas",
                "/a/atlas/search?q=paris&direction=top"]:
        assert ok(a, url) == ok(b, url), url
    assert slow.get("atlas").in_memory == []


def test_show_card_and_neuron_page_come_from_one_builder(web_atlas):
    """`neuronatlas show` and the viewer's neuron page read the same rows for the same neuron."""
    from neuronatlas.explain.card import AtlasSource, neuron_card, neuron_sections
    from neuronatlas.web.neuron import neuron_context

    view = Library([web_atlas]).get("atlas")
    card, ctx = neuron_card(web_atlas, 1, 3, n_top=20, n_decoded=5), neuron_context(view, 1, 3)
    sec = ctx["sections"]
    assert card["explanation"] == sec["explanations"][0]
    assert card["explanation"]["explanation"] == EXPLAINED[(1, 3)]
    page_decoded = {d["side"]: {k: [r["token"] for r in d[k]] for k in ("top", "bottom") if d[k]} for d in sec["decoded"]}
    assert card["decoded"] == page_decoded and card["decoded"]["out"]["top"][0] == "ĠParis"
    page_stats = sorted((r["record"], r["label"], r["mean"]) for g in sec["stats"] for r in g["rows"])
    assert sorted((r["record"], r["label"], r["mean"]) for r in card["stats"]) == page_stats
    page_corpus = {g["kind"]: [(r["doc_id"], r["activation"]) for r in g["rows"]] for g in sec["corpus"]}
    assert [(e["doc_id"], e["activation"]) for e in card["exemplars"]["top"]] == page_corpus["top"]
    assert [(e["doc_id"], e["activation"]) for e in card["exemplars"]["random"]] == page_corpus["random"]
    assert card["selections"] == [{k: v for k, v in r.items() if k != "key"} for r in sec["selections"]]
    # the builder itself answers the same over the viewer's connection and over a plain atlas source
    src = AtlasSource(web_atlas)
    plain, served = neuron_sections(src, 1, 3), neuron_sections(view, 1, 3)
    src.close()
    assert {k: len(v) for k, v in plain.items()} == {k: len(v) for k, v in served.items()}
    assert plain["explanations"] == served["explanations"] and plain["selections"] == served["selections"]


def test_neuron_page_distributions_quadrants_and_logits(client):
    html = ok(client, "/a/atlas/neuron/L1/3")
    hist = html.split('id="histogram"')[1].split("</section>")[0]
    assert '<svg class="chart hist"' in hist and "p50 |a|" in hist and "p99.9 |a|" in hist and "max |a|" in hist
    for label in ("all tokens", "capital", "animal", "symbol"):
        assert f"<td>{label}</td>" in hist
    glu = html.split('id="glu"')[1].split("</section>")[0]
    assert all(f'data-quadrant="{q}"' in glu for q in ("g+u+", "g+u-", "g-u+", "g-u-"))
    assert glu.count('class="t focus"') >= 4                        # top exemplars of the quadrants
    logits = html.split('id="logits"')[1].split("</aside>")[0]
    assert "·Paris" in logits and "negative" in logits
    assert 'id="live"' not in html                                    # no model, no live box


def _direct_recording(lm, text, layer, neuron, tmp_path):
    """The neuron's activation on every token of ``text``, through the recorder (top-k >= tokens)."""
    from neuronatlas.record import RecordConfig, record

    rec = record(lm, PromptSet.from_rows([{"text": text, "label": "x"}]), tmp_path / "direct",
                 config=RecordConfig(top_k=64, neuron_stats=False))
    n_tok = int(Atlas.open(tmp_path / "direct").query("SELECT n_tokens FROM prompts").column(0)[0].as_py())
    acts = [0.0] * n_tok
    for k in range(rec.topk.k):
        pos = int(rec.topk.position[layer, neuron, k])
        if pos >= 0:
            acts[pos] = float(rec.topk.values[layer, neuron, k])
    return acts


def test_live_box_equals_a_direct_recording(web_atlas, tmp_path):
    from neuronatlas.models.tiny import tiny_model
    from neuronatlas.web.live import LiveModel

    lm = tiny_model("llama")                       # the model the web atlas was recorded with
    live = LiveModel(lm)
    library = Library([web_atlas])
    live.check_atlas(library.get("atlas"))
    local = TestClient(create_app(library, live=live), client=("127.0.0.1", 40000))
    assert 'id="live"' in ok(local, "/a/atlas/neuron/L1/3")
    text = "The capital of Italy is Rome, not Milan"
    r = local.post("/a/atlas/neuron/L1/3/live", json={"text": text})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["acts"] == _direct_recording(lm, text, 1, 3, tmp_path)
    assert data["tokens"] == lm.tokenizer.convert_ids_to_tokens(lm.tokenizer(text)["input_ids"])
    assert "".join(data["display"]).strip().startswith("The capital")
    # one-line errors
    for body, status, words in [({"text": ""}, 400, "empty"), ({"text": "x" * 2001}, 400, "limit is 2000"),
                                ({"txt": "a"}, 400, '"text"')]:
        r = local.post("/a/atlas/neuron/L1/3/live", json=body)
        assert r.status_code == status and words in r.json()["error"] and "\n" not in r.json()["error"]
    r = local.post("/a/atlas/neuron/L1/3/live", content=b"text=a", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert local.post("/a/atlas/neuron/L9/3/live", json={"text": "a"}).status_code == 404
    assert local.post("/a/atlas/neuron/L1/3/live", content=b"x" * 10_000,
                      headers={"content-type": "application/json"}).status_code == 413
    remote = TestClient(create_app(library, live=live), client=("10.1.2.3", 40000))
    assert remote.post("/a/atlas/neuron/L1/3/live", json={"text": "a"}).status_code == 403
    # without a model there is no route
    assert client_without_model(web_atlas).post("/a/atlas/neuron/L1/3/live", json={"text": "a"}).status_code in (404, 405)


def client_without_model(atlas):
    return TestClient(create_app(Library([atlas])), client=("127.0.0.1", 40001))


def test_serve_model_needs_loopback(web_atlas):
    from neuronatlas.cli.main import main

    assert main(["serve", str(web_atlas), "--model", "default", "--host", "0.0.0.0"]) == 2
