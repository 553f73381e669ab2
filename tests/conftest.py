from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuronatlas.data.prompts import PromptSet
from neuronatlas.models.tiny import tiny_model

CORE_FAMILIES = ["llama", "qwen2", "gpt2", "gpt_neox"]
ALL_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt"]

TEXTS = {
    "capital": ["The capital of France is Paris", "The capital of Japan is Tokyo", "Berlin is the capital of Germany",
                "Madrid is in Spain", "Rome is in Italy"],
    "animal": ["My favourite animal is a dog", "Today I saw a cat", "a bird and a dog", "Der Hund ist braun",
               "El perro es grande y el gato"],
    "symbol": ["Iron has the symbol Fe", "Gold has the symbol Au", "0 1 2 3", "4 5 6 7 8 9 10"],
}


@pytest.fixture(params=CORE_FAMILIES)
def lm(request):
    return tiny_model(request.param)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def prompts() -> PromptSet:
    rows = [{"text": t, "label": lab, "target": " x"} for lab, texts in TEXTS.items() for t in texts]
    return PromptSet.from_rows(rows, source="tests")


@pytest.fixture
def write_jsonl(tmp_path: Path):
    def _write(rows, name="data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    return _write


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder, for the CLI's --model PATH."""
    path = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def run_cli(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    from neuronatlas.cli.main import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err
