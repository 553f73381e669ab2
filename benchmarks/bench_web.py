"""Bounded load test of the viewer: N requests from C concurrent clients against `neuronatlas serve`.

Serves an atlas on 127.0.0.1 only (a subprocess running the real CLI), sends a fixed, seeded mix of
page requests (neuron pages, concept pages, heatmap, the three searches, home, study, static files)
over keep-alive connections (or httpx.AsyncClient), stops by itself after --requests, and reports errors (must be 0), latency
percentiles and requests per second. Exit code 1 when any request failed.

    python benchmarks/bench_web.py --out artifacts/bench_web.json                # builds a 30 x 1536 atlas
    python benchmarks/bench_web.py --atlas my-atlas --requests 2000 --concurrency 50

Without --atlas it builds one from a small random Llama (30 layers x 1,536 neurons, hidden size 64,
the tiny test tokenizer) recorded on 240 prompts, then adds tables sized like a real 30 x 1536 model:
decoded (7.37 M rows: 4 sides x top/bottom x 20 ranks, as `neuronatlas decode` writes), selections (12 concepts x 460 neurons x 2
methods), explanations (3,000 neurons), corpus exemplars (1,000 neurons x 15 windows of 32 tokens)
and a study with plots. --workdir keeps it for reuse.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

LAYERS, NEURONS = 30, 1536
CONCEPTS = ["capital", "language", "currency", "continent", "element_symbol", "animal_sound", "color",
            "profession", "sport", "instrument", "emotion: joy", "number"]


def build_atlas(root: Path) -> Path:
    """Record a random 30 x 1536 Llama into ``root/bench-atlas`` and add realistically sized tables."""
    import numpy as np
    import pyarrow as pa
    import torch
    import transformers as tf

    from neuronatlas.data.prompts import PromptSet
    from neuronatlas.models.loading import wrap_model
    from neuronatlas.models.tiny import tiny_tokenizer
    from neuronatlas.record import RecordConfig, record
    from neuronatlas.store import Atlas

    path = root / "bench-atlas"
    if (path / "manifest.json").exists() and (path / "decoded.parquet").exists():
        return path
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=NEURONS, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=1, eos_token_id=0, bos_token_id=0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    lm = wrap_model(model, tok, name="bench-llama-30x1536", provenance={"seed": 0})
    rng = random.Random(0)
    words = ["capital", "France", "Paris", "Japan", "Tokyo", "Berlin", "Germany", "Madrid", "Spain", "Rome", "Italy",
             "dog", "cat", "bird", "Iron", "Gold", "symbol"]
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 14))), "label": c}
            for c in CONCEPTS for _ in range(20)]
    record(lm, PromptSet.from_rows(rows, source="bench"), path, name="facts", config=RecordConfig(top_k=20,
                                                                                                  batch_size=32))
    atlas = Atlas.open(path)
    vocab = np.array(tok.convert_ids_to_tokens(list(range(len(tok)))), dtype=object)
    g = np.random.default_rng(0)
    n = LAYERS * NEURONS
    sides, directions, ranks = ["out", "out_normed", "in_up", "in_gate"], ["top", "bottom"], 20
    per = len(sides) * len(directions) * ranks
    ids = g.integers(2, len(vocab), size=n * per)
    score = g.normal(size=n * per).astype(np.float32)
    atlas.write_table("decoded.parquet", pa.table({
        "layer": np.repeat(np.arange(LAYERS, dtype=np.int32), NEURONS * per),
        "neuron": np.tile(np.repeat(np.arange(NEURONS, dtype=np.int32), per), LAYERS),
        "side": pa.array(np.tile(np.repeat(sides, len(directions) * ranks), n)).dictionary_encode(),
        "direction": pa.array(np.tile(np.repeat(directions, ranks), n * len(sides))).dictionary_encode(),
        "rank": np.tile(np.arange(ranks, dtype=np.int32), n * len(sides) * len(directions)),
        "token_id": ids.astype(np.int64), "token": vocab[ids].tolist(), "score": score,
    }), describe="bench: random decoding, sized like a 30x1536 model")
    sel: dict[str, list[Any]] = {k: [] for k in ("study", "concept", "method", "site", "layer", "neuron", "score", "rank")}
    for concept in CONCEPTS:
        for method in ("ap", "smd"):
            picks = g.choice(n, size=460, replace=False)
            for rank, flat in enumerate(picks):
                for k, v in (("study", "relations"), ("concept", concept), ("method", method), ("site", "mlp"),
                             ("layer", int(flat // NEURONS)), ("neuron", int(flat % NEURONS)),
                             ("score", float(1 - rank / 460)), ("rank", rank)):
                    sel[k].append(v)
    atlas.write_table("selections.parquet", sel)
    explained = g.choice(n, size=3000, replace=False)
    phrases = ["capital cities", "country names", "animal words", "chemical symbols", "numbers", "colours",
               "the end of a sentence", "French words", "sports", "musical instruments"]
    atlas.write_table("explanations.parquet", {
        "layer": (explained // NEURONS).astype(np.int32), "neuron": (explained % NEURONS).astype(np.int32),
        "site": ["mlp"] * 3000, "explanation": [f"fires on {phrases[i % len(phrases)]} (#{i})" for i in range(3000)],
        "explainer": ["bench"] * 3000, "score": g.uniform(-0.2, 0.9, 3000), "baseline_score": g.uniform(-0.1, 0.2, 3000),
        "pmi": g.normal(size=3000), "candidates": [["a", "b"]] * 3000,
        "causal_delta_exemplars": g.normal(-0.3, 0.1, 3000), "causal_delta_random": g.normal(0, 0.02, 3000)})
    docs = [[str(t) for t in vocab[g.integers(2, len(vocab), 200)]] for _ in range(200)]
    atlas.write_table("corpus_docs.parquet", {"doc_id": [str(i) for i in range(200)], "source": ["bench"] * 200,
                                              "text": ["".join(d) for d in docs], "tokens": docs})
    ce: dict[str, list[Any]] = {k: [] for k in ("layer", "neuron", "kind", "rank", "doc_id", "position", "activation",
                                                "window_start", "window_tokens", "window_acts")}
    for flat in g.choice(n, size=1000, replace=False):
        for kind, count in (("top", 10), ("random", 5)):
            for rank in range(count):
                doc, start = int(g.integers(200)), int(g.integers(0, 160))
                acts = g.normal(0, 0.5, 32).astype(float).tolist()
                for k, v in (("layer", int(flat // NEURONS)), ("neuron", int(flat % NEURONS)), ("kind", kind),
                             ("rank", rank), ("doc_id", str(doc)), ("position", start + 16), ("activation", acts[16]),
                             ("window_start", start), ("window_tokens", docs[doc][start:start + 32]),
                             ("window_acts", acts)):
                    ce[k].append(v)
    atlas.write_table("corpus_exemplars.parquet", ce)
    _write_study(atlas, g)
    return path


def _write_study(atlas: Any, g: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = atlas.path / "studies" / "relations"
    study.mkdir(parents=True, exist_ok=True)
    results = {"n_neurons": 460, "concepts": {c: {"accuracy_drop": float(g.uniform(0.1, 0.5)),
                                                 "random_drop": float(g.uniform(0, 0.05))} for c in CONCEPTS}}
    (study / "results.json").write_text(json.dumps(results))
    (study / "report.html").write_text("<html><body><h1>relations (benchmark)</h1></body></html>")
    for concept in CONCEPTS[:4]:
        fig, ax = plt.subplots(figsize=(4, 2.6))
        x = [0, 0.1, 0.25, 0.5, 1.0]
        ax.plot(x, [1 - v * results["concepts"][concept]["accuracy_drop"] for v in x], marker="o", label=concept)
        ax.plot(x, [1 - v * 0.03 for v in x], marker="o", label="random")
        ax.set_xlabel("share of neurons deactivated")
        ax.set_ylabel("fact accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(study / f"{concept}_dose_response.png", dpi=80)
        plt.close(fig)
    atlas.update_manifest(lambda m: m["studies"].__setitem__("relations", {
        "kind": "relations", "path": "studies/relations", "created": "2026-01-01T00:00:00+00:00",
        "concepts": CONCEPTS}))


def request_mix(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """A seeded list of (kind, path) for the benchmark atlas (slug 'bench-atlas' or the given one)."""
    rng = random.Random(seed)
    from neuronatlas.web.data import concept_key

    kinds = [("neuron", 50), ("concept", 14), ("heatmap", 5), ("search_token", 10), ("search_explanation", 5),
             ("search_concept", 4), ("atlas", 4), ("home", 2), ("study", 2), ("static", 4)]
    population = [k for k, w in kinds for _ in range(w)]
    tokens = ["Paris", "ĠTokyo", "the", "dog", "Fe", "capital"]
    out = []
    for _ in range(n):
        kind = rng.choice(population)
        if kind == "neuron":
            path = f"/neuron/L{rng.randrange(LAYERS)}/{rng.randrange(NEURONS)}"
        elif kind == "concept":
            path = f"/concept/{concept_key(rng.choice(CONCEPTS))}" + rng.choice(
                ["", "?page=2", f"?layer={rng.randrange(LAYERS)}", "?method=ap&page=3"])
        elif kind == "heatmap":
            path = rng.choice(["/heatmap", "/heatmap?method=smd"])
        elif kind == "search_token":
            path = rng.choice([f"/search?kind=token&q={quote(rng.choice(tokens))}",
                               f"/search?kind=token&q={quote(rng.choice(tokens))}&side=out&direction=top",
                               "/search?kind=token&q=e&match=contains&page=" + str(rng.randint(1, 40))])
        elif kind == "search_explanation":
            path = f"/search?kind=explanation&q={quote(rng.choice(['capital', 'animal', 'French', '#12']))}"
        elif kind == "search_concept":
            path = f"/search?kind=concept&q={rng.choice(['cap', 'e', 'sport'])}"
        elif kind == "atlas":
            path = ""
        elif kind == "study":
            path = "/study/relations"
        else:
            out.append((kind, rng.choice(["/static/style.css", "/static/app.js"])))
            continue
        out.append((kind, "/a/{slug}" + path) if kind != "home" else (kind, "/"))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _fetch_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, url: str) -> int:
    """One HTTP/1.1 keep-alive GET on an open connection; returns the status (body read and dropped)."""
    writer.write(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\n\r\n".encode("latin-1"))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    if headers.get("connection", "").lower() == "close":
        raise ConnectionResetError("server closed the connection")
    return status


async def _run(base: str, mix: list[tuple[str, str]], concurrency: int, timeout: float,
               client: str = "raw") -> dict[str, Any]:
    """Send ``mix`` with ``concurrency`` workers; ``client`` is 'raw' (asyncio streams) or 'httpx'."""
    import httpx

    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for item in mix:
        queue.put_nowait(item)
    lat: list[tuple[str, float]] = []
    errors: list[str] = []
    host = base.split("://", 1)[1]
    ip, port = host.rsplit(":", 1)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as hx:
        async def worker() -> None:
            conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
            while True:
                try:
                    kind, url = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                t0 = time.perf_counter()
                try:
                    if client == "httpx":
                        status = (await hx.get(url)).status_code
                    else:
                        if conn is None:
                            conn = await asyncio.open_connection(ip, int(port))
                        try:
                            status = await asyncio.wait_for(_fetch_raw(*conn, host, url), timeout)
                        except (OSError, asyncio.IncompleteReadError):
                            conn[1].close()
                            conn = None
                            raise
                    if status != 200:
                        errors.append(f"{status} {url}")
                except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                    errors.append(f"{type(exc).__name__} {url}")
                lat.append((kind, time.perf_counter() - t0))
            if conn is not None:
                conn[1].close()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"lat": lat, "errors": errors, "wall": wall}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc; NaN elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] * 1000 if s else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--atlas", type=Path, help="an existing atlas (default: build the 30x1536 benchmark atlas)")
    ap.add_argument("--workdir", type=Path, help="where to build/keep the benchmark atlas (default: a temp dir)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    ap.add_argument("--sequential", type=int, default=200,
                    help="first send this many requests from one client, for latencies without queueing")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="raw: keep-alive HTTP/1.1 over asyncio streams (cheap, so the 2-core box measures the "
                         "server); httpx: httpx.AsyncClient")
    ap.add_argument("--passes", type=int, default=2,
                    help="send the same request mix this many times; the server's memory after each pass shows "
                         "whether it keeps growing (it must stay within its caches' bound)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)

    tmp = None
    if args.atlas is None:
        if args.workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench-web-")
        workdir = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        atlas = build_atlas(workdir)
        print(f"benchmark atlas ready at {atlas} ({time.perf_counter() - t0:.1f} s)", flush=True)
    else:
        atlas = args.atlas
    from neuronatlas.web.data import Library

    slug = next(iter(Library([atlas]).views))
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen([sys.executable, "-m", "neuronatlas.cli.main", "serve", str(atlas), "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {server.stderr.read().decode() if server.stderr else ''}")
            time.sleep(0.2)
        mix = [(k, u.replace("{slug}", slug)) for k, u in request_mix(args.requests)]
        rss = {"started": _rss_mb(server.pid)}
        warm = [(k, u.replace("{slug}", slug)) for k, u in request_mix(50, seed=1)]
        asyncio.run(_run(base, warm, min(10, args.concurrency), args.timeout, args.client))  # warm caches
        seq = asyncio.run(_run(base, [(k, u.replace("{slug}", slug)) for k, u in request_mix(args.sequential, seed=2)],
                               1, args.timeout, args.client)) if args.sequential else None
        rss["before_load"] = _rss_mb(server.pid)
        cpu0 = _cpu_seconds(server.pid)
        res = asyncio.run(_run(base, mix, args.concurrency, args.timeout, args.client))
        server_cpu = _cpu_seconds(server.pid) - cpu0
        rss["after_pass_1"] = _rss_mb(server.pid)
        for i in range(2, args.passes + 1):  # the same mix again: hits the page cache, must not grow memory
            again = asyncio.run(_run(base, mix, args.concurrency, args.timeout, args.client))
            res["errors"] += again["errors"]
            rss[f"after_pass_{i}"] = _rss_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        if tmp is not None:
            tmp.cleanup()
    lat = [t for _, t in res["lat"]]
    by_kind = {}
    for kind in sorted({k for k, _ in res["lat"]}):
        ts = [t for k, t in res["lat"] if k == kind]
        by_kind[kind] = {"n": len(ts), "p50_ms": round(_pct(ts, 50), 1), "p95_ms": round(_pct(ts, 95), 1)}
    summary = {
        "requests": len(lat), "concurrency": args.concurrency, "errors": len(res["errors"]),
        "error_samples": res["errors"][:10], "wall_s": round(res["wall"], 2),
        "requests_per_s": round(len(lat) / res["wall"], 1), "p50_ms": round(_pct(lat, 50), 1),
        "p95_ms": round(_pct(lat, 95), 1), "p99_ms": round(_pct(lat, 99), 1),
        "mean_ms": round(statistics.fmean(lat) * 1000, 1), "max_ms": round(max(lat) * 1000, 1),
        "server_cpu_ms_per_request": round(server_cpu / max(len(lat), 1) * 1000, 2), "client": args.client,
        "server_rss_mb": rss, "passes": args.passes,
        "by_kind": by_kind,
        "atlas": str(atlas), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                         "python": platform.python_version(),
                                         "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "note": "client and server share this machine; one uvicorn worker",
    }
    if seq is not None:
        one = [t for _, t in seq["lat"]]
        summary["sequential"] = {"requests": len(one), "errors": len(seq["errors"]), "p50_ms": round(_pct(one, 50), 1),
                                 "p95_ms": round(_pct(one, 95), 1), "p99_ms": round(_pct(one, 99), 1),
                                 "requests_per_s": round(len(one) / seq["wall"], 1)}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if res["errors"] or (seq is not None and seq["errors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
