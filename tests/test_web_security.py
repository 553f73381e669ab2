"""The viewer against hostile atlases and requests (issue #20, part 4).

An atlas whose labels, prompts, explanations, concepts, decoded tokens and study results carry HTML
and script is served by uvicorn on 127.0.0.1: every page shows the text escaped (checked in the raw
HTML, and in a real Chromium when /usr/bin/chromium and Playwright are there: no dialog, no injected
element, no script but the viewer's own). Traversal (encoded ``../``, ``%2e%2e``, absolute paths,
symlinks planted in a study folder) is 404 without content; a foreign Host header is 400; a
non-loopback ``--host`` prints a warning.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient

from neuronatlas.data.prompts import PromptSet
from neuronatlas.store import Atlas
from neuronatlas.web import Library, create_app
from neuronatlas.web.app import LOOPBACK_HOSTS
from neuronatlas.web.data import concept_key

# tests/ is on sys.path under pytest's default (prepend) import mode
from test_web import build_web_atlas, tiny_png

IMG = '<img src=x onerror="window.__pwned=1;alert(1)">'
SCRIPT = "</script><script>window.__pwned=2;alert(2)</script>"
SVG = '"><svg onload="window.__pwned=3;alert(3)">'
PAYLOAD = IMG + SCRIPT + SVG
CONCEPT = "evil " + IMG
SECRET = "SECRET-OUTSIDE-THE-ATLAS"


def build_hostile_atlas(root: Path) -> Path:
    """The viewer test atlas plus a record, explanations, concepts, tokens and a study full of markup."""
    from neuronatlas.models.tiny import tiny_model
    from neuronatlas.record import RecordConfig, record

    path = build_web_atlas(root)
    rows = [{"text": f"{PAYLOAD} number {i}", "label": ("x" + PAYLOAD) if i % 2 else SCRIPT} for i in range(6)]
    record(tiny_model("llama"), PromptSet.from_rows(rows, source=PAYLOAD), path, name="hostile",
           config=RecordConfig(top_k=3))
    atlas = Atlas.open(path)

    def edit(table: str, change) -> None:
        data = pq.read_table(path / table).to_pydict()
        change(data)
        atlas.write_table(table, data)

    def explanations(d):
        d["explanation"] = [PAYLOAD + " " + e for e in d["explanation"]]
        d["candidates"] = [[PAYLOAD, SCRIPT] for _ in d["candidates"]]
        d["explainer"] = [SVG for _ in d["explainer"]]

    def selections(d):
        for k in d:
            d[k].append({"study": "relations", "concept": CONCEPT, "method": "ap", "site": "mlp", "layer": 1,
                         "neuron": 3, "score": 0.5, "rank": 0}[k])

    def decoded(d):
        for i in range(0, len(d["token"]), 7):
            d["token"][i] = PAYLOAD

    def corpus(d):
        d["text"] = [PAYLOAD]
        d["tokens"] = [[IMG, SCRIPT, SVG]]

    edit("explanations.parquet", explanations)
    edit("selections.parquet", selections)
    edit("decoded.parquet", decoded)
    edit("corpus_docs.parquet", corpus)
    study = path / "studies" / "xss"
    study.mkdir(parents=True)
    (study / "results.json").write_text(json.dumps({"findings": [PAYLOAD], PAYLOAD: {SCRIPT: 1.0},
                                                    "concepts": {CONCEPT: {"accuracy_drop": 0.5}}}))
    (study / "plot.png").write_bytes(tiny_png())
    # symlinks planted in study folders: to a file outside the atlas, and a whole study folder outside it
    outside = root / "outside"
    outside.mkdir()
    (outside / "results.json").write_text(json.dumps({"leaked": SECRET}))
    (outside / "secret.png").write_bytes(SECRET.encode())
    (outside / "report.html").write_text(SECRET)
    (study / "secret.png").symlink_to(outside / "secret.png")
    (study / "passwd.html").symlink_to("/etc/passwd")
    (path / "studies" / "linked").symlink_to(outside, target_is_directory=True)
    atlas.update_manifest(lambda m: m["studies"].__setitem__("xss", {"kind": PAYLOAD, "path": "studies/xss",
                                                                     "concepts": [CONCEPT]}))
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    return build_hostile_atlas(tmp_path_factory.mktemp("hostile-web"))


@pytest.fixture(scope="module")
def server(hostile) -> Iterator[str]:
    app = create_app(Library([hostile]), allowed_hosts=LOOPBACK_HOSTS)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def pages() -> list[str]:
    key = concept_key(CONCEPT)
    return ["/", "/a/atlas", "/a/atlas/heatmap", f"/a/atlas/concept/{key}", "/a/atlas/concept/capital",
            "/a/atlas/neuron/L1/3", "/a/atlas/neuron/L0/7", "/a/atlas/neuron/L1/20", "/a/atlas/neuron/L0/0",
            "/a/atlas/study/xss", "/a/atlas/study/relations",
            f"/a/atlas/search?q={quote(PAYLOAD)}&kind=explanation",
            f"/a/atlas/search?q={quote(PAYLOAD)}&kind=token",
            f"/a/atlas/search?q={quote('evil <img')}&kind=concept&match=contains",
            f"/a/atlas/search?q={quote(SCRIPT)}&kind=token&match=contains",
            f"/a/atlas/neuron/{quote(IMG)}/1", f"/a/atlas/concept/{quote(SCRIPT, safe='')}"]


def get(server: str, path: str, host: str | None = None) -> tuple[int, str]:
    """A raw HTTP/1.1 GET: the path goes on the wire exactly as given (no client-side normalising)."""
    hostname, port = server.split(":")
    conn = http.client.HTTPConnection(hostname, int(port), timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or server)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


@pytest.mark.parametrize("url", pages())
def test_every_page_escapes_the_markup(server, url):
    status, html = get(server, url)
    expected = 400 if url.startswith("/a/atlas/neuron/%3C") else 404 if "concept/%3C" in url else 200
    assert status == expected, (url, status)
    for raw in ("<img src=x", "<script>window", "<svg onload", "onerror=\"window", "onload=\"window"):
        assert raw not in html, (url, raw)
    assert SECRET not in html


def test_the_markup_is_shown_as_text(server):
    """Escaped, not stripped: the explanation's markup is visible to the reader."""
    _, html = get(server, "/a/atlas/neuron/L1/3")
    assert "&lt;img src=x onerror=" in html and "&lt;/script&gt;&lt;script&gt;" in html


TRAVERSAL = [
    "/a/atlas/study/xss/files/secret.png",                        # symlink to a file outside the atlas
    "/a/atlas/study/xss/files/passwd.html",                       # symlink to /etc/passwd
    "/a/atlas/study/linked",                                      # a study folder that is a symlink outside
    "/a/atlas/study/linked/files/secret.png",
    "/a/atlas/study/linked/files/report.html",
    "/a/atlas/study/xss/files/..%2F..%2Fmanifest.json",
    "/a/atlas/study/xss/files/%2e%2e%2f%2e%2e%2fmanifest.json",
    "/a/atlas/study/%2e%2e/files/manifest.json",
    "/a/atlas/study/xss/files/%2e%2e",
    "/a/atlas/study/xss/files/%2Fetc%2Fpasswd",
    "/a/atlas/study/xss/files//etc/passwd",
    "/a/atlas/study/xss/files/%252e%252e%252fmanifest.json",       # double-encoded
    "/a/atlas/study/xss/files/..%5c..%5cmanifest.json",            # backslashes
    "/a/atlas/study/xss/files/plot.png%00.html",                   # NUL byte
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static//etc/passwd",
    "/static/%2Fetc%2Fpasswd",
    "/a/atlas/../../../../etc/passwd",
    "/../../../../etc/passwd",
    "//etc/passwd",
]


@pytest.mark.parametrize("url", TRAVERSAL)
def test_traversal_is_404_without_content(server, url):
    status, body = get(server, url)
    assert status in (404, 400), (url, status)
    assert SECRET not in body and "root:x:0:0" not in body and "schema_version" not in body


def test_a_real_study_file_is_still_served(server):
    status, body = get(server, "/a/atlas/study/xss/files/plot.png")
    assert status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil",
                                  "10.0.0.1"])
def test_foreign_host_header_is_400(server, host):
    status, body = get(server, "/a/atlas", host=host)
    assert status == 400 and "tiny-llama" not in body


def test_loopback_host_headers_are_served(server):
    port = server.split(":")[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert get(server, "/", host=host)[0] == 200, host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_non_loopback_host_prints_a_warning(hostile):
    """`serve --host 0.0.0.0` warns on stderr that the atlas is readable by anyone on the network."""
    code = "import sys; from neuronatlas.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                      os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(hostile), "--host", "0.0.0.0", "--port",
                             str(_free_port())], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "serving" in line:
                break
        text = " ".join(" ".join(lines).split())
        assert "warning:" in text and "readable by anyone" in text, text
    finally:
        proc.kill()
        proc.wait()
    assert TestClient(create_app(Library([hostile]))).get("/").status_code == 200


# --- a real browser -----------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


@pytest.mark.browser
def test_no_script_runs_in_a_real_browser(server):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    dialogs: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            for url in pages():
                response = page.goto(f"http://{server}{url}")
                assert response is not None and response.status in (200, 400, 404), (url, response and response.status)
                page.wait_for_load_state("load")
                assert page.evaluate("window.__pwned") is None, url
                assert page.locator("img[src='x'], [onerror], [onload], svg[onload]").count() == 0, url
                scripts = page.eval_on_selector_all("script", "els => els.map(e => e.getAttribute('src'))")
                assert all(src and src.startswith("/static/") for src in scripts), (url, scripts)
            page.goto(f"http://{server}/a/atlas/neuron/L1/3")
            assert "<img src=x onerror=" in page.inner_text("body")  # shown as text
        finally:
            browser.close()
    assert dialogs == []
