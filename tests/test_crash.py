"""Nothing is lost on a crash or a failed write (issue #20, part 3).

``record``, ``exemplars`` and ``study clamp`` run in a subprocess that is SIGKILLed at three points,
each recognised by the files it leaves (no test hooks in the code): during the first batch (the
atlas exists, no checkpoint yet), after a checkpoint, and during the final writes. The same command
then resumes in-process and must give exactly what an uninterrupted run gives. A write that fails
with EFBIG (RLIMIT_FSIZE lowered, SIGXFSZ ignored: what a full disk looks like) is one line and
leaves the previous atlas intact and readable.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from neuronatlas.cli.main import main
from neuronatlas.models.tiny import tiny_model

pytestmark = pytest.mark.slow  # each case starts a Python process that imports torch (seconds on a busy CPU)

WORDS = ("the dog ran to a small house near the river while my cat slept and a bird sang about iron gold "
         "paris tokyo numbers one two three").split()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crash")
    lm = tiny_model("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    with open(root / "prompts.jsonl", "w") as fh:
        for i in range(120):
            words = rng.choice(WORDS, size=3 + i % 9)
            fh.write(json.dumps({"text": " ".join(words), "label": "abc"[i % 3]}) + "\n")
    with open(root / "corpus.jsonl", "w") as fh:
        for i in range(80):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=6 + i % 17))}) + "\n")
    return {"root": root, "model": root / "model", "prompts": root / "prompts.jsonl", "corpus": root / "corpus.jsonl"}


def commands(env: dict[str, Path], out: Path) -> dict[str, list[str]]:
    model = str(env["model"])
    return {
        "record": ["record", "--model", model, "--data", str(env["prompts"]), "--out", str(out), "--batch-size", "2",
                   "--max-length", "16", "--top-k", "5", "--json"],
        "exemplars": ["exemplars", "--model", model, "--corpus", str(env["corpus"]), "--out", str(out), "--batch-size",
                      "2", "--max-length", "24", "--chunk-docs", "8", "--top-k", "5", "--random", "3", "--json"],
        "study": ["study", "clamp", "--model", model, "--concept", "dog", "--out", str(out), "--neurons", "3",
                  "--n-random", "2", "--n-prompts", "3", "--n-texts", "8", "--max-new-tokens", "4", "--json"],
    }


# the three kill points of each command, as predicates on its output folder
KILL_POINTS: dict[str, dict[str, Callable[[Path], bool]]] = {
    "record": {
        "first-batch": lambda out: (out / "manifest.json").exists(),
        "after-checkpoint": lambda out: (out / "records/default/.checkpoint/state.json").exists(),
        "final-writes": lambda out: (out / "records/default/prompts.parquet").exists(),
    },
    "exemplars": {
        "first-batch": lambda out: (out / "manifest.json").exists(),
        "after-checkpoint": lambda out: (out / ".exemplars-checkpoint/state.json").exists(),
        "final-writes": lambda out: (out / "corpus_docs.parquet").exists(),
    },
    "study": {
        "first-batch": lambda out: (out / "atlas/manifest.json").exists(),
        "after-checkpoint": lambda out: (out / "state.json").exists(),
        "final-writes": lambda out: any((out / f).exists() for f in ("results.json", "report.html"))
        or any(out.glob("*.png")),
    },
}


def spawn(args: list[str], **kwargs) -> subprocess.Popen:
    code = "import sys; from neuronatlas.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                      os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, **kwargs)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fail if it ends first (then the point was missed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL, "the process ended before it could be killed"
            return
        if proc.poll() is not None:
            pytest.fail(f"the process ended (code {proc.returncode}) before the kill point: {proc.stderr.read()[-2000:]!r}")
        time.sleep(0.001)
    proc.kill()
    pytest.fail("kill point never reached")


def run_in_process(args: list[str], capsys) -> dict:
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


VOLATILE = {"record_seconds", "resumed_from_batch", "resumed_from_doc", "stream_seconds", "write_seconds", "seconds",
            "timings", "created", "scan_seconds", "date", "reused", "docs_stored",
            "timing", "wall time (s)"}          # a study's wall clock and forward counts (a resumed run does less)


def strip(value):
    """A JSON value without wall-clock and resume bookkeeping fields, at any depth."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def snapshot(out: Path) -> dict[str, object]:
    """Everything a finished run leaves, comparable across runs: tables, arrays, JSON files."""
    from safetensors.numpy import load_file

    result: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        if not path.is_file() or "checkpoint" in rel:
            continue
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            result[rel] = table.replace_schema_metadata(None).to_pylist()
        elif path.suffix == ".safetensors":
            result[rel] = {k: v.tobytes() for k, v in load_file(path).items()}
        elif path.suffix == ".json":
            data = json.loads(path.read_text().replace(json.dumps(str(out))[1:-1], "OUT"))
            if rel.endswith("manifest.json"):
                data = {k: v for k, v in data.items() if k not in ("created",)}
            result[rel] = strip(data)
    assert not list(out.rglob("*.tmp")), "a temporary file survived"
    return result


@pytest.fixture(scope="module")
def baselines(env, tmp_path_factory) -> dict[str, dict[str, object]]:
    """Uninterrupted runs of each command, in-process."""
    out: dict[str, dict[str, object]] = {}
    for name in ("record", "exemplars", "study"):
        folder = tmp_path_factory.mktemp(f"base-{name}") / "out"
        assert main(commands(env, folder)[name]) == 0
        out[name] = snapshot(folder)
    return out


@pytest.mark.parametrize("point", ["first-batch", "after-checkpoint", "final-writes"])
@pytest.mark.parametrize("command", ["record", "exemplars", "study"])
def test_kill_and_resume_equals_uninterrupted(env, baselines, tmp_path, capsys, command, point):
    out = tmp_path / "out"
    args = commands(env, out)[command]
    capsys.readouterr()
    kill_when(spawn(args), lambda: KILL_POINTS[command][point](out))
    run_in_process(args, capsys)                            # resume with the same command
    after = snapshot(out)
    assert sorted(after) == sorted(baselines[command])
    for rel, expected in baselines[command].items():
        assert after[rel] == expected, f"{rel} differs after a kill at {point}"


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_size_limit_is_one_line_and_keeps_the_atlas(env, tmp_path, capsys):
    atlas = tmp_path / "atlas"
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"text number {i}", "label": "ab"[i % 2]}) + "\n" for i in range(6)))
    assert main(["record", "--model", str(env["model"]), "--data", str(small), "--out", str(atlas), "--json"]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in atlas.rglob("*") if p.is_file()}
    # a new dataset for the same record: its first table (prompts.parquet) is larger than the limit
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps({"text": f"another text {i}", "label": "cd"[i % 2]}) + "\n" for i in range(9)))
    proc = spawn(["record", "--model", str(env["model"]), "--data", str(new), "--out", str(atlas)],
                 preexec_fn=_limit_file_size(1024))
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1, err
    assert "File too large" in err and "file size limit" in err and "prompts.parquet" in err
    assert {p: p.read_bytes() for p in atlas.rglob("*") if p.is_file()} == before
    assert main(["query", str(atlas), "SELECT count(*) AS n FROM prompts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 6}]


def test_reopening_an_atlas_removes_temporaries_a_killed_writer_left(tmp_path):
    """A SIGKILL between atomic_path's mkstemp and its rename leaves `.<name>.<random>.tmp`; the
    next writer to open the atlas removes it and leaves every real file as it was."""
    from neuronatlas.store.atlas import Atlas

    model = {"model": "m", "file_sha256": "abc"}
    atlas = Atlas.create(tmp_path / "a", model=model)
    before = atlas.manifest_path.read_text()
    (tmp_path / "a/records/r").mkdir(parents=True)
    stale = [tmp_path / "a/.manifest.json.k2j4.tmp", tmp_path / "a/records/r/.stats.parquet.x9.tmp"]
    for p in stale:
        p.write_text("half a file")
    (tmp_path / "a/records/r/keep.tmp").write_text("not ours")       # not atomic_path's pattern
    Atlas.create(tmp_path / "a", model=model)
    assert not any(p.exists() for p in stale) and (tmp_path / "a/records/r/keep.tmp").exists()
    assert atlas.manifest_path.read_text() == before
