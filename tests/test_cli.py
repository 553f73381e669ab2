"""The CLI end to end on a tiny model saved as a real HF directory."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli as _run   # one CLI runner (and the model_dir fixture) for every CLI test


def test_models_and_inspect(capsys, model_dir):
    code, out, _ = _run(capsys, "models", "--json")
    assert code == 0 and {"model_type": "gpt2"}.items() <= next(r for r in json.loads(out) if r["model_type"] == "gpt2").items()
    code, out, _ = _run(capsys, "inspect", "--model", str(model_dir), "--json")
    info = json.loads(out)
    assert code == 0 and info["layers"] == 2 and info["neurons_per_layer"] == 32 and info["total_neurons"] == 64
    assert info["sites"] == ["mlp", "gate"]


def test_record_query_generate(capsys, model_dir, tmp_path, write_jsonl):
    data = write_jsonl([{"text": "The capital of France is Paris", "label": "geo"},
                        {"text": "My favourite animal is a dog", "label": "animal"}, "{broken"])
    code, _, err = _run(capsys, "record", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "a"))
    assert code == 2 and "data.jsonl:3: bad JSON" in err and "Traceback" not in err
    code, out, _ = _run(capsys, "record", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "a"),
                        "--skip-bad", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["skipped_rows"] == 1 and set(summary["labels"]) == {"geo", "animal"}
    code, out, _ = _run(capsys, "query", str(tmp_path / "a"), "SELECT label, count(*) AS n FROM stats GROUP BY label ORDER BY label", "--json")
    assert code == 0 and [r["label"] for r in json.loads(out)] == ["__all__", "animal", "geo"]
    code, out, _ = _run(capsys, "generate", "--model", str(model_dir), "-p", "The capital of", "--clamp", "L1:0-3=3xmax",
                        "--atlas", str(tmp_path / "a"), "--max-new-tokens", "4", "--json")
    res = json.loads(out)
    assert code == 0 and "intervened" in res["results"][0] and "Clamp" in res["interventions"][0]


@pytest.mark.parametrize("args,message", [
    (["inspect", "--model", "/nonexistent/model"], "neither a local path nor in the local Hugging Face cache"),
    (["generate", "--model", "MODEL", "-p", "x", "--ablate", "L9:0"], "layer 9 in L9:0 is out of range"),
    (["generate", "--model", "MODEL", "-p", "x", "--clamp", "L0:1"], "needs SELECTOR=VALUE"),
    (["generate", "--model", "MODEL", "-p", "x", "--clamp", "L0:1=3xmax"], "needs recorded maxima"),
    (["query", "/nonexistent/atlas", "SELECT 1"], "is not an atlas"),
    (["record", "--model", "MODEL", "--data", "/nope.jsonl", "--out", "x"], "file not found"),
    (["data", "relations", "--out", "x.jsonl", "--relations", "nope"], "unknown relation 'nope'"),
])
def test_errors_are_one_red_line(capsys, model_dir, args, message):
    args = [str(model_dir) if a == "MODEL" else a for a in args]
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert sum("error:" in line for line in err.splitlines()) == 1


def test_unsupported_model_type(capsys, tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    code, _, err = _run(capsys, "inspect", "--model", str(tmp_path))
    assert code == 2 and ("not supported" in err or "could not load" in err)
