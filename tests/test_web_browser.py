"""End-to-end: the viewer in a real Chromium (Debian's /usr/bin/chromium driven by Playwright).

Starts uvicorn on 127.0.0.1 (a free port) in a thread, clicks home -> atlas -> concept -> neuron,
checks that highlighted exemplars and decoded tokens are visible, runs a search, uses the heatmap
and the keyboard shortcut, and saves screenshots to artifacts/web/ (gitignored).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "web"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium: apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
uvicorn = pytest.importorskip("uvicorn")

# tests/ is on sys.path under pytest's default (prepend) import mode
from test_web import STUDY_REPORT, _direct_recording, build_web_atlas

from neuronatlas.web import Library, create_app
from neuronatlas.web.app import LOOPBACK_HOSTS


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    from neuronatlas.models.tiny import tiny_model
    from neuronatlas.web.live import LiveModel

    atlas = build_web_atlas(tmp_path_factory.mktemp("browser"))
    library = Library([atlas])
    live = LiveModel(tiny_model("llama"))           # the model the atlas was recorded with: the live box is on
    live.check_atlas(library.get("atlas"))
    app = create_app(library, allowed_hosts=LOOPBACK_HOSTS, live=live)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 20 s")
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        pg.set_default_timeout(10_000)
        problems: list[str] = []
        pg.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        pg.on("pageerror", lambda exc: problems.append(str(exc)))
        pg.problems = problems  # type: ignore[attr-defined]
        yield pg
        browser.close()


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ARTIFACTS / path.name)
    except OSError:
        pass  # a read-only checkout still passes; the tmp_path copy is enough
    assert path.stat().st_size > 10_000
    return path


def test_browse_home_concept_neuron(page, server, tmp_path):
    page.goto(server + "/")
    page.get_by_role("link", name="atlas", exact=True).first.click()
    page.wait_for_url("**/a/atlas")
    assert page.get_by_text("tiny-llama").first.is_visible()
    page.locator("a.pill", has_text="capital").first.click()
    page.wait_for_url("**/concept/capital")
    assert page.locator("h1").inner_text() == "Concept capital"
    assert page.locator("img[alt='capital_dose_response.png']").evaluate("img => img.naturalWidth") == 2
    shot(page, tmp_path, "concept")
    page.locator("a.nid", has_text="L1/3").first.click()
    page.wait_for_url("**/neuron/L1/3")
    # exemplars: the token where the neuron fired is highlighted (outlined and coloured)
    focus = page.locator("#exemplars .t.focus").first
    assert focus.is_visible()
    assert focus.evaluate("el => getComputedStyle(el).outlineStyle") == "solid"
    # corpus exemplars: every token coloured by its activation
    coloured = page.locator("#corpus .t[style*='background-color']")
    assert coloured.count() >= 5 and coloured.first.is_visible()
    # decoded tokens, readable (byte-level 'Ġ' undone)
    chip = page.locator("#decoded .chip", has_text="Paris").first
    assert chip.is_visible() and chip.inner_text() == "·Paris"
    assert page.locator("#stats svg.chart rect").count() >= 3
    assert page.locator("#explanation blockquote").inner_text().startswith("capital cities")
    shot(page, tmp_path, "neuron")
    page.keyboard.press("]")
    page.wait_for_url("**/neuron/L1/4")
    assert not page.problems, page.problems  # no CSP violations or script errors


def test_search_and_heatmap(page, server, tmp_path):
    page.goto(server + "/a/atlas")
    page.keyboard.press("/")
    page.locator("#q").fill("Paris")
    page.locator("#q").press("Enter")
    page.wait_for_url("**/search?q=Paris*")
    result = page.locator(".results a.nid", has_text="L1/3")
    assert result.first.is_visible()
    shot(page, tmp_path, "search")
    page.locator("select[name=kind]").first.select_option("explanation")
    page.locator("#q").fill("animal words")
    page.locator("header button[type=submit]").click()
    page.wait_for_url("**kind=explanation*")
    page.locator(".results a.nid", has_text="L0/7").click()
    page.wait_for_url("**/neuron/L0/7")
    page.goto(server + "/a/atlas/heatmap")
    cell = page.locator("table.heatmap td a").first
    assert cell.is_visible()
    shot(page, tmp_path, "heatmap")
    cell.click()
    page.wait_for_url("**/concept/*?layer=*")
    assert page.locator("table.neurons a.nid").count() >= 1
    assert not page.problems, page.problems
    page.goto(server + "/a/atlas/neuron/Lx/abc")  # an error page is a styled HTML page too
    assert "400" in page.locator("h1").inner_text()
    assert page.locator("header.top").evaluate("el => getComputedStyle(el).display") == "flex"


def test_study_page_shows_the_report(page, server, tmp_path):
    page.problems.clear()             # the previous test ends on a deliberate 400 page
    page.goto(server + "/a/atlas/study/relations")
    assert page.locator("h1").inner_text() == "Relation-specific neurons"
    findings = page.locator("#findings .finding")
    assert findings.count() == len(STUDY_REPORT.findings)
    for f in STUDY_REPORT.findings:
        box = page.locator(f"#finding-{f.key}")
        assert box.get_by_text(f.text, exact=True).is_visible() and box.get_by_text(f.rule).is_visible()
    img = page.locator("img[alt='capital_dose_response.png']")
    assert img.is_visible() and img.evaluate("img => img.complete && img.naturalWidth") == 2
    body = page.locator("main").inner_text()
    assert "key49" not in body and "raw." not in body and "idx" not in body      # no key dump
    assert page.locator("main").evaluate("el => el.scrollHeight") < 3000
    shot(page, tmp_path, "study")
    page.locator("table.report a.nid", has_text="L1/3").click()
    page.wait_for_url("**/neuron/L1/3")
    assert not page.problems, page.problems


def test_neuron_histogram_quadrants_and_live_box(page, server, tmp_path):
    from neuronatlas.models.tiny import tiny_model

    page.problems.clear()
    page.goto(server + "/a/atlas/neuron/L1/3")
    bars = page.locator("#histogram svg.hist rect")
    assert bars.count() >= 5 and bars.first.is_visible()
    assert page.locator("#histogram table.pct tr.total td").first.inner_text() == "all tokens"
    rows = page.locator("#glu tr.quadrant")
    assert rows.count() == 4 and rows.first.is_visible()
    shares = [float(rows.nth(i).locator("td.share").inner_text().rstrip("%")) for i in range(4)]
    assert abs(sum(shares) - 100) < 0.1
    assert page.locator("#logits .chip", has_text="Paris").first.is_visible()
    text = "The capital of Italy is Rome"
    page.locator("#live-text").fill(text)
    page.locator("#live-run").click()
    page.locator("#live-out .toks .t").first.wait_for()
    got = [float(x) for x in page.locator("#live-out .t").evaluate_all("els => els.map(e => e.dataset.act)")]
    expected = _direct_recording(tiny_model("llama"), text, 1, 3, tmp_path)
    assert got == expected
    assert page.locator("#live-out .t[style*='background-color']").count() >= 1     # highlighted like exemplars
    shot(page, tmp_path, "neuron-live")
    assert not page.problems, page.problems
    page.locator("#live-text").fill("")                # a one-line error (the browser logs the 400 itself)
    page.locator("#live-run").click()
    page.locator("#live-out.err").wait_for()
    assert page.locator("#live-out").inner_text() == "the text is empty; type a sentence first"
