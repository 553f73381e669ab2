"""Screenshots of the viewer's study and neuron pages for docs/viewer.md, from a real atlas.

Serves ATLAS on 127.0.0.1 (a free port, in this process; with --model the neuron page's "try your
own text" box is on), opens the study page and one neuron page in Debian's Chromium through
Playwright, types --text into the live box, and writes ``viewer-study.png`` and ``viewer-neuron.png``.

    python docs/make_screenshots.py out/relations/atlas --model default --out docs/img
    python docs/make_screenshots.py ATLAS --study relations --neuron L12:345 --text "Paris is the capital of"

The neuron defaults to the best-ranked selected neuron of the study's first concept.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def pick_neuron(atlas: Path, study: str) -> tuple[int, int]:
    from neuronatlas.store import Atlas

    store = Atlas.open(atlas)
    try:
        t = store.query("SELECT layer, neuron FROM selections WHERE study = ? ORDER BY rank, concept LIMIT 1", [study])
    except Exception:  # no selections: the first neuron
        return 0, 0
    if t.num_rows == 0:
        return 0, 0
    return int(t.column("layer")[0].as_py()), int(t.column("neuron")[0].as_py())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("atlas", type=Path)
    ap.add_argument("--study", default="relations")
    ap.add_argument("--neuron", default=None, help="L<layer>:<index> (default: the study's best-ranked selection)")
    ap.add_argument("--model", default=None, help="the atlas's model, for the live box (e.g. default)")
    ap.add_argument("--text", default="The capital of France is Paris, and the capital of Japan is Tokyo.")
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--max-height", type=int, default=2600, help="crop tall pages to this many pixels")
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from neuronatlas.ids import NeuronId
    from neuronatlas.web import Library, create_app
    from neuronatlas.web.app import LOOPBACK_HOSTS

    library = Library([args.atlas])
    view = next(iter(library))
    view.warm()
    live = None
    if args.model:
        from neuronatlas.models import load_model
        from neuronatlas.web.live import LiveModel

        live = LiveModel(load_model(args.model))
        live.check_atlas(view)
    layer, neuron = NeuronId.parse(args.neuron).pair if args.neuron else pick_neuron(args.atlas, args.study)
    server = uvicorn.Server(uvicorn.Config(create_app(library, allowed_hosts=LOOPBACK_HOSTS, live=live),
                                           host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/a/{view.slug}"
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)

            def shot(name: str) -> None:
                height = min(args.max_height, page.evaluate("document.documentElement.scrollHeight"))
                page.screenshot(path=str(args.out / name), clip={"x": 0, "y": 0, "width": 1280, "height": height},
                                full_page=True)
                print(f"wrote {args.out / name} (1280 x {height})")

            page.goto(f"{base}/study/{args.study}")
            page.wait_for_load_state("networkidle")
            shot("viewer-study.png")
            page.goto(f"{base}/neuron/L{layer}/{neuron}")
            if live is not None:
                page.locator("#live-text").fill(args.text)
                page.locator("#live-run").click()
                page.locator("#live-out .toks .t").first.wait_for()
                page.locator("#live").scroll_into_view_if_needed()
            shot("viewer-neuron.png")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


if __name__ == "__main__":
    main()
