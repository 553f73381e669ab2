"""Every module's usage recipe runs: each module docstring with ``>>>`` lines is run as a doctest.

For each module under ``src/neuronatlas`` whose docstring holds a recipe, the recipe's examples run
in order with :mod:`doctest` (``ELLIPSIS``, ``NORMALIZE_WHITESPACE``), in a fresh namespace (the
module's globals plus the prelude below) and a fresh temporary working directory. An example that
shows an output is checked against it; an example that shows none is executed and its value is not
checked (recipes note such values in comments, e.g. shapes that depend on the model). An exception
fails the test unless the recipe shows the traceback. Lines marked ``# doctest: +SKIP`` (only those
that need the real embedded model, a network service or minutes of compute) are not run; the
prelude's tiny model stands in for ``lm`` in the lines that follow them.

The prelude, the free names recipes use (built once per session; each test gets a copy of the atlas):

- ``lm``: ``tiny_model("llama")`` (2 layers x 32 neurons; recipes name neurons that exist in it,
  such as ``L1:3``); ``lm_a`` / ``lm_b``: two such models (seeds 0 and 1); ``tokenizer``: ``lm.tokenizer``;
- ``prompts``: a labelled :class:`PromptSet` (labels ``capital``, ``animal``, ``symbol``);
  ``texts`` two prompts and ``batch`` their encoded, padded batch;
- ``my-atlas`` (in the working directory): an atlas of ``lm`` with the record ``facts`` of
  ``prompts``, ``decoded.parquet``, corpus exemplars of ``DOCS``, an explanation of ``L1:3`` and
  a ``capital`` selection; ``facts.jsonl`` and ``facts.csv``: the prompts as files;
- ``prompt``: an explainer prompt;
- ``rec``: a gate-site record of three languages; ``responses`` / ``labels``: its pooled responses
  and prompt labels;
- ``acts`` / ``token_labels`` / ``other_shard``: random activations for the running statistics;
- ``curve`` / ``random_curves``: a dose-response curve and random reference curves;
- ``selected`` (a :class:`NeuronSet`), ``out_dir``, ``value``, ``table`` (a small pyarrow table),
  ``torch``, ``Path``, ``load_model`` (the real loader; only in skipped lines).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

import neuronatlas

SRC = Path(neuronatlas.__file__).resolve().parent
DOCS = [{"doc_id": f"d{i}", "text": t, "source": "recipes"} for i, t in enumerate([
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Berlin is the capital of Germany. Madrid is in Spain. Rome is in Italy.",
    "My favourite animal is a dog. Today I saw a cat and a bird.",
    "Le chat est noir. Der Hund ist braun. El perro es grande.",
    "Iron has the symbol Fe. Gold has the symbol Au. 0 1 2 3 4 5 6 7 8 9 10",
    "The bird saw the dog. The cat saw the bird. The dog saw the cat.",
])]
TEXTS = {
    "capital": ["The capital of France is Paris", "The capital of Japan is Tokyo", "Berlin is the capital of Germany"],
    "animal": ["My favourite animal is a dog", "Today I saw a cat", "a bird and a dog"],
    "symbol": ["Iron has the symbol Fe", "Gold has the symbol Au", "0 1 2 3"],
}
LANG_TEXTS = {"en": ["The dog is brown", "The cat sleeps"], "fr": ["Le chat est noir", "Le chien dort"],
              "de": ["Der Hund ist braun", "Die Katze schläft"]}


def recipe_modules() -> list[str]:
    """Dotted names of the modules whose docstring holds a ``>>>`` recipe."""
    names = []
    for path in sorted(SRC.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
        if doc and ">>>" in doc:
            rel = path.relative_to(SRC.parent).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            names.append(".".join(parts))
    return names


MODULES = recipe_modules()


@pytest.fixture(scope="session")
def prelude(tmp_path_factory) -> dict[str, Any]:
    import pandas as pd

    from neuronatlas.data import PromptSet
    from neuronatlas.decode import decode_neurons, write_decoded
    from neuronatlas.explain import ExemplarConfig, ExplainConfig, LocalExplainer, collect_exemplars, explain_neurons
    from neuronatlas.explain.prompts import explain_prompt
    from neuronatlas.intervene import NeuronSet
    from neuronatlas.models import load_model
    from neuronatlas.models.tiny import tiny_model
    from neuronatlas.record import RecordConfig, record
    from neuronatlas.record.batching import encode
    from neuronatlas.stats.scorers import APScorer
    from neuronatlas.store import Atlas
    from neuronatlas.store.schemas import conform

    root = tmp_path_factory.mktemp("recipes")
    lm = tiny_model("llama")
    rows = [{"text": t, "label": lab, "target": " x"} for lab, ts in TEXTS.items() for t in ts]
    prompts = PromptSet.from_rows(rows, source="recipes")
    pd.DataFrame(rows).to_json(root / "facts.jsonl", orient="records", lines=True)
    pd.DataFrame(rows).to_csv(root / "facts.csv", index=False)

    atlas = root / "my-atlas"
    result = record(lm, prompts, atlas, name="facts", config=RecordConfig(pool="mean", top_k=3))
    write_decoded(atlas, decode_neurons(lm, k=50), lm)
    collect_exemplars(lm, DOCS, atlas, config=ExemplarConfig(top_k=4, n_random=3, context=3, after=2, seed=0),
                      corpus_name="recipes")
    explain_neurons(atlas, NeuronSet.parse("L1:3"), explainer=LocalExplainer(lm, max_new_tokens=6),
                    scorer=lm, subject=lm, config=ExplainConfig(candidates=2, seed=0, n_top=2, n_random=2))
    ap = APScorer().fit(result.pooled, result.prompt_labels)     # the 'capital' selection: AP's top 5
    top, n = ap.top_indices(0, 5), lm.n_neurons
    Atlas.open(atlas).write_table("selections.parquet", conform("selections.parquet", {
        "study": ["recipes"] * 5, "concept": ["capital"] * 5, "method": ["ap"] * 5, "site": ["mlp"] * 5,
        "layer": [int(i) // n for i in top], "neuron": [int(i) % n for i in top],
        "score": [float(ap.scores_[0, i]) for i in top], "rank": list(range(5))}))

    lang_rows = [{"text": t, "label": lang} for lang, ts in LANG_TEXTS.items() for t in ts]
    rec = record(lm, PromptSet.from_rows(lang_rows, source="recipes"), root / "lang-atlas", name="langs",
                 config=RecordConfig(component="gate", pool="mean"))
    rng = np.random.default_rng(0)
    texts = ["The capital of France is", "My favourite animal is"]
    return {
        "root": root,
        "lm": lm, "lm_a": lm, "lm_b": tiny_model("llama", seed=1), "tokenizer": lm.tokenizer, "load_model": load_model,
        "prompts": prompts, "texts": texts, "batch": encode(lm, texts),
        "prompt": explain_prompt([(["The", " cat"], [0, 10])]),
        "rec": rec, "responses": result.pooled, "labels": result.prompt_labels,
        "acts": torch.from_numpy(rng.normal(size=(6, 2, 32)).astype(np.float32)),
        "token_labels": torch.tensor([0, 0, 1, 1, 0, 1]),
        "curve": [0.9, 0.6, 0.2], "random_curves": [[0.9, 0.85, 0.8], [0.92, 0.9, 0.86], [0.88, 0.9, 0.85]],
        "selected": NeuronSet.parse("L0:1-4 L1:3"), "value": {"accuracy": 0.8},
        "table": pa.table({"layer": [1], "neuron": [3]}),
        "torch": torch, "Path": Path,
    }


def _globs(module: Any, prelude: dict[str, Any]) -> dict[str, Any]:
    from neuronatlas.stats.running import LabelMoments

    other = LabelMoments(n_labels=2, shape=(2, 32))
    other.update(prelude["acts"], prelude["token_labels"])
    names = {k: v for k, v in prelude.items() if k != "root"}
    return {**vars(module), **names, "other_shard": other, "out_dir": Path("out")}


class _Checker(doctest.OutputChecker):
    """Shown outputs are checked; an example that shows none may print anything (its value is a note)."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return not want.strip() or super().check_output(want, got, optionflags)


# Recipes known to be stale in files this test may not edit; strict, so a fixed recipe fails here
# until its entry is removed.
STALE: dict[str, str] = {}


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.xfail(reason=STALE[m], strict=True))
                                  if m in STALE else m for m in MODULES])
def test_recipe_runs(name, prelude, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(prelude["root"] / "my-atlas", tmp_path / "my-atlas")
    for f in ("facts.jsonl", "facts.csv"):
        shutil.copy(prelude["root"] / f, tmp_path / f)
    test = doctest.DocTestParser().get_doctest(module.__doc__, _globs(module, prelude), name, module.__file__, 0)
    assert test.examples, f"{name}: no examples"
    runner = doctest.DocTestRunner(checker=_Checker(), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    result = runner.run(test, out=out.append, clear_globs=True)
    assert result.failed == 0, "".join(out)


def test_every_recipe_module_is_found():
    assert len(MODULES) >= 50 and "neuronatlas.ids" in MODULES and "neuronatlas.studies.relations" in MODULES
