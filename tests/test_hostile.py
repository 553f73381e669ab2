"""Every bad input of issue #20 is one line naming the value and the fix, exit code 2, no traceback,
and nothing half-written in ``--out`` (a tiny llama saved as a real HF directory)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from neuronatlas.cli.main import main
from neuronatlas.models.tiny import tiny_model


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    lm = tiny_model("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"text number {i}", "label": "ab"[i % 2]}) + "\n" for i in range(6)))
    assert main(["record", "--model", str(root / "model"), "--data", str(data), "--out", str(root / "atlas"),
                 "--json"]) == 0
    return {"root": root, "model": root / "model", "data": data, "atlas": root / "atlas"}


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(capsys, args: list[str], *needles: str) -> str:
    """Run ``args``; assert exit code 2 and exactly one error line containing every needle."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in " ".join(err.split()), (needle, err)
    return err


def _sub(args: list[str], env: dict[str, Path]) -> list[str]:
    return [str(env[a]) if a in ("model", "data", "atlas") else a for a in args]


CASES = [
    # the value the message must name, and the fix it must give
    (["generate", "--model", "model", "-p", "x", "--device", "tpu"], ["'tpu'", "choose cpu"]),
    (["generate", "--model", "model", "-p", "x", "--device", "cuda"], ["'cuda'", "--device cpu"]),
    (["inspect", "--model", "model", "--device", "cuda:x"], ["'cuda:x'", "cuda:N"]),
    (["record", "--model", "model", "--data", "data", "--out", "OUT", "--max-length", "0"],
     ["--max-length", "'0'", "greater than or equal to 1"]),
    (["record", "--model", "model", "--data", "data", "--out", "OUT", "--max-length", "-5"], ["--max-length", "'-5'"]),
    (["record", "--model", "model", "--data", "data", "--out", "OUT", "--batch-size", "0"], ["--batch-size", "'0'"]),
    (["exemplars", "--model", "model", "--out", "OUT", "--max-length", "0"], ["--max-length", "'0'"]),
    (["generate", "--model", "model", "-p", "x", "--max-new-tokens", "-1"], ["--max-new-tokens", "'-1'"]),
    (["generate", "--model", "model", "-p", "x", "--sample", "--temperature", "0"],
     ["--temperature", "0 is not above 0"]),
    (["generate", "--model", "model", "-p", "x", "--sample", "--temperature", "nan"], ["--temperature", "nan"]),
    (["generate", "--model", "model", "-p", "x", "--clamp", "L0:1=inf"], ["'inf'", "within +-10000"]),
    (["generate", "--model", "model", "-p", "x", "--clamp", "L0:1=1e40"], ["'1e40'", "within +-10000"]),
    (["generate", "--model", "model", "-p", "x", "--clamp", "L0:1=-1e40"], ["'-1e40'", "within +-10000"]),
    (["generate", "--model", "model", "-p", "x", "--scale", "L0:1=1e5"], ["'1e5'", "within +-10000"]),
    (["generate", "--model", "model", "-p", "x", "--clamp", "L0:1=1e40xmax", "--atlas", "atlas"], ["'1e40xmax'"]),
    (["study", "clamp", "--model", "model", "--concept", "dog", "--out", "OUT", "--value", "inf"], ["'inf'"]),
    (["query", "atlas", "SELECT 1", "--timeout", "-1"], ["--timeout", "-1 is not above 0"]),
]


@pytest.mark.parametrize("args,needles", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_options_are_one_line(capsys, env, tmp_path, args, needles):
    out = tmp_path / "out"
    one_line_error(capsys, [str(out) if a == "OUT" else a for a in _sub(args, env)], *needles)
    assert not out.exists()  # refused before anything was written


def test_inf_clamp_is_refused_but_the_largest_allowed_value_gives_finite_logits(env):
    """The documented bound: +-1e4 still gives finite logits on a float32 model (no silent NaN)."""
    import torch

    from neuronatlas.evaluate import target_logprobs
    from neuronatlas.intervene.parse import MAX_MAGNITUDE, parse_intervention
    from neuronatlas.models import load_model

    lm = load_model(str(env["model"]))
    for value in (MAX_MAGNITUDE, -MAX_MAGNITUDE):
        iv = parse_intervention("clamp", f"L0:0-31={value:g}", n_neurons=lm.n_neurons)
        scores = target_logprobs(lm, ["The capital of"], [" x"], conditions=[(iv,)])
        assert torch.isfinite(torch.as_tensor(scores.logprob)).all()


@pytest.mark.parametrize("content,needles", [
    (b'{"text": "caf\xe9", "label": "a"}\n', ["data.jsonl:1", "not UTF-8", "byte 0xe9", "UTF-8"]),
    (b"\xff\xfe\x00{", ["data.jsonl:1", "not UTF-8"]),
    (b"", ["empty"]),
    (b"5\n[1, 2]\n", ["data.jsonl:1", "not an object"]),
    (b'{"text": 5, "label": "a"}\n', ["data.jsonl:1", "'text'"]),
    (b'{"text": "a", "label": null}\n', ["missing label"]),
    (b'{"text": "a", "target": 3}\n', ["target must be a string"]),
])
def test_bad_data_files(capsys, env, tmp_path, content, needles):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    one_line_error(capsys, ["record", "--model", str(env["model"]), "--data", str(data), "--out", str(tmp_path / "o")],
                   *needles)
    assert not (tmp_path / "o" / "records").exists()


def test_latin1_lines_are_skipped_with_skip_bad(capsys, env, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "caf\xe9", "label": "a"}\n{"text": "fine", "label": "a"}\n')
    assert main(["record", "--model", str(env["model"]), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--skip-bad", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_rows"] == 1


@pytest.mark.parametrize("suffix,content,needle", [
    (".csv", b"text,label\ncaf\xe9,a\n", "not UTF-8"),
    (".parquet", b"PAR1 this is not parquet PAR1", "not a readable Parquet file"),
    (".txt", b"hello", "unsupported file type"),
])
def test_bad_data_formats(capsys, env, tmp_path, suffix, content, needle):
    data = tmp_path / f"data{suffix}"
    data.write_bytes(content)
    one_line_error(capsys, ["record", "--model", str(env["model"]), "--data", str(data), "--out", str(tmp_path / "o")],
                   needle, str(data))


def test_data_path_that_is_a_folder(capsys, env, tmp_path):
    one_line_error(capsys, ["record", "--model", str(env["model"]), "--data", str(tmp_path), "--out",
                            str(tmp_path / "o")], "is not a file")


@pytest.mark.parametrize("content,needles", [
    (b"garbage" * 20, ["is not a GGUF file", "Hugging Face model directory"]),
    (b"GGUF\x03\x00\x00\x00", ["is truncated", "download it again"]),
    (b"GGUF\x03\x00\x00\x00" + b"\xff" * 40, ["damaged or truncated GGUF", "download it again"]),
])
def test_garbage_and_truncated_gguf(capsys, tmp_path, content, needles):
    model = tmp_path / "model.gguf"
    model.write_bytes(content)
    one_line_error(capsys, ["inspect", "--model", str(model)], str(model), *needles)


def test_hf_directory_with_broken_config(capsys, env, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(env["model"], model)
    (model / "config.json").write_text("{not json")
    one_line_error(capsys, ["inspect", "--model", str(model)], "could not load model", "config.json")


@pytest.mark.parametrize("out,needles", [
    ("FILE", ["must be a directory", "a file"]),
    ("/dev/null", ["'/dev/null'", "kernel pseudo file system"]),
    ("/proc/self/atlas", ["'/proc/self/atlas'", "kernel pseudo file system"]),
    ("FILE/sub", ["must be a directory", "is a file"]),
])
@pytest.mark.parametrize("command", ["record", "exemplars", "decode", "study-clamp", "export-html"])
def test_bad_out_directories(capsys, env, tmp_path, out, needles, command):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = out.replace("FILE", str(afile))
    args = {"record": ["record", "--model", str(env["model"]), "--data", str(env["data"])],
            "exemplars": ["exemplars", "--model", str(env["model"]), "--corpus", str(env["data"])],
            "decode": ["decode", "--model", str(env["model"])],
            "study-clamp": ["study", "clamp", "--model", str(env["model"]), "--concept", "dog"],
            "export-html": ["export-html", str(env["atlas"])]}[command]
    one_line_error(capsys, [*args, "--out", out], *needles)
    assert afile.read_text() == "keep me"
    assert Path("/dev/null").is_char_device()


@pytest.mark.parametrize("out", ["/dev/null", "/proc/self/x.json", "DIR"])
def test_bad_out_files(capsys, env, tmp_path, out):
    out = out.replace("DIR", str(tmp_path))
    one_line_error(capsys, ["compare-decode", "--model", str(env["model"]), "--model-b", str(env["model"]),
                            "--out", out], repr(out))
    one_line_error(capsys, ["data", "relations", "--out", out, "--relations", "element_symbol"], repr(out))
    assert Path("/dev/null").is_char_device()


def test_atomic_write_never_replaces_a_device(tmp_path):
    from neuronatlas.errors import AtlasError
    from neuronatlas.store import write_json_atomic

    with pytest.raises(AtlasError, match="pseudo file system"):
        write_json_atomic(Path("/dev/null"), {"a": 1})
    with pytest.raises(AtlasError, match="not a regular file"):
        write_json_atomic(tmp_path, {"a": 1})
    assert Path("/dev/null").is_char_device()


def test_read_only_out_folder(capsys, env, tmp_path):
    """A folder we may not write to is refused before any work (as root, EROFS is injected instead: below)."""
    if os.geteuid() == 0:
        pytest.skip("root can write to any folder; the read-only file system is covered by test_injected_write_errors_keep_the_previous_atlas")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        one_line_error(capsys, ["record", "--model", str(env["model"]), "--data", str(env["data"]), "--out",
                                str(folder / "atlas")], "cannot be written")
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("code,fix", [(errno.EROFS, "read-only"), (errno.ENOSPC, "free some space"),
                                      (errno.EFBIG, "file size limit")])
def test_injected_write_errors_keep_the_previous_atlas(capsys, env, tmp_path, monkeypatch, code, fix):
    """An OSError inside the writer (read-only or full file system): one line, the atlas unchanged and readable."""
    import shutil

    import pyarrow.parquet as pq

    atlas = tmp_path / "atlas"
    shutil.copytree(env["atlas"], atlas)
    before = digest(atlas)
    real = pq.write_table

    def failing(table, where, *args, **kwargs):
        real(table, where, *args, **kwargs)  # the temporary file is written, then the disk "fails"
        raise OSError(code, os.strerror(code), str(where))

    monkeypatch.setattr(pq, "write_table", failing)
    data = tmp_path / "new.jsonl"  # a new dataset for the same record: its tables would replace the old ones
    data.write_text(json.dumps({"text": "another text", "label": "c"}) + "\n")
    one_line_error(capsys, ["record", "--model", str(env["model"]), "--data", str(data), "--out", str(atlas)],
                   os.strerror(code), fix)
    monkeypatch.undo()
    after = digest(atlas)
    assert {k: v for k, v in after.items() if "/.checkpoint/" not in k} == before
    assert not [p for p in atlas.rglob("*.tmp")]
    assert main(["query", str(atlas), "SELECT count(*) AS n FROM stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["n"] > 0


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe latin-1 \xe9", b"[1, 2]", b'{"schema_version": 1'])
def test_damaged_manifest_is_reported_then_rebuilt_with_force(capsys, env, tmp_path, content):
    import shutil

    atlas = tmp_path / "atlas"
    shutil.copytree(env["atlas"], atlas)
    (atlas / "manifest.json").write_bytes(content)
    args = ["record", "--model", str(env["model"]), "--data", str(env["data"]), "--out", str(atlas)]
    one_line_error(capsys, args, "manifest.json", "--force")
    assert (atlas / "manifest.json").read_bytes() == content  # never silently overwritten
    assert main([*args, "--force", "--json"]) == 0
    capsys.readouterr()
    assert json.loads((atlas / "manifest.json").read_text())["records"]["default"]["n_prompts"] == 6


@pytest.mark.parametrize("suffix,content", [(".txt", b"caf\xe9 au lait\n"), (".jsonl", b'{"text": "caf\xe9"}\n')])
def test_exemplars_corpus_not_utf8(capsys, env, tmp_path, suffix, content):
    corpus = tmp_path / f"corpus{suffix}"
    corpus.write_bytes(content)
    one_line_error(capsys, ["exemplars", "--model", str(env["model"]), "--corpus", str(env["data"]), "--corpus",
                            str(corpus), "--out", str(tmp_path / "o")], str(corpus), "not UTF-8", "byte 0xe9")
    assert not (tmp_path / "o" / "corpus_exemplars.parquet").exists()


@pytest.mark.parametrize("args", [
    ["study", "relations", "--out", "x", "--n-random", "-1"],
    ["study", "relations", "--out", "x", "--select-fraction", "2"],
    ["study", "relations", "--out", "x", "--few-shot", "99"],
    ["study", "clamp", "--concept", "dog", "--out", "x", "--value", "inf"],
    ["study", "languages", "--out", "x", "--n-random", "0"],
])
def test_study_options_are_checked_at_the_boundary(args, capsys, tmp_path, monkeypatch):
    from neuronatlas.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and not (tmp_path / "x").exists()
