"""The two entry points behind the CLI: decompose one prompt, find a relation's circuit.

    >>> from neuronatlas.decompose.api import decompose_prompt
    >>> result = decompose_prompt(lm, "The capital of France is", " Paris", top=5)
    >>> sorted(result)[:4]
    ['components', 'foil', 'interaction', 'model']
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuronatlas.decompose.attribution import component_attribution, token_attribution
from neuronatlas.decompose.circuit import CircuitResult, discover_circuit, fact_rows
from neuronatlas.decompose.core import LogitTarget, NeuronTarget, Target, trace_prompt
from neuronatlas.errors import DatasetError, SelectionError
from neuronatlas.ids import NeuronId
from neuronatlas.models.loading import LoadedModel

__all__ = ["decompose_prompt", "relation_facts", "circuit_to_atlas", "run_circuit"]


def _token(lm: LoadedModel, text: str, what: str) -> int:
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise SelectionError(f"{what} {text!r} encodes to no tokens; give a word such as ' Paris'")
    return int(ids[0])


def decompose_prompt(lm: LoadedModel, prompt: str, target: str | None, *, foil: str | None = None, top: int = 20,
                     neuron_layers: Sequence[int] | None = None, components: bool = True,
                     to_neuron: str | None = None) -> dict[str, Any]:
    """Token attributions and the ``top`` components (heads, MLP blocks, and the neurons of
    ``neuron_layers``; None: the MLP block with the largest contribution) for the target's first token,
    or, with ``to_neuron`` (``L20:345``), for that MLP neuron's activation at the last token.
    Components whose parts cancel (unstable) are listed apart, not ranked."""
    if not prompt.strip():
        raise SelectionError("the prompt is empty; pass --prompt 'some text'")
    tgt: Target
    max_layer: int | None = None
    if to_neuron is not None:
        nid = NeuronId.parse(to_neuron)
        if not (0 <= nid.layer < lm.n_layers and 0 <= nid.index < lm.n_neurons):
            raise SelectionError(f"neuron {nid} is outside the model (layers 0-{lm.n_layers - 1}, "
                                 f"neurons 0-{lm.n_neurons - 1})")
        tgt = NeuronTarget(nid.layer, nid.index)
        max_layer = nid.layer + 1
    elif target is not None:
        tgt = LogitTarget(_token(lm, target, "target"), None if foil is None else _token(lm, foil, "foil"))
    else:
        raise SelectionError("nothing to explain; pass --target ' Paris' or --to-neuron L20:345")
    trace = trace_prompt(lm, prompt)
    tokens = token_attribution(lm, trace, tgt)
    total = tokens.total
    comps: list[dict[str, Any]] = []
    unstable: list[str] = []
    layers: list[int] = []
    if components:
        scores = component_attribution(lm, trace, tgt, max_layer=max_layer)
        if isinstance(tgt, NeuronTarget):  # the target's own block holds the target: not a component of it
            scores = [s for s in scores if not (s.kind == "mlp" and s.layer == tgt.layer)]
        if neuron_layers is None:
            mlps = [s for s in scores if s.kind == "mlp" and s.stable]
            layers = [max(mlps, key=lambda s: abs(s.rel)).layer] if mlps else []
        else:
            layers = list(neuron_layers)
        if layers:
            if isinstance(tgt, NeuronTarget) and any(x >= tgt.layer for x in layers):
                raise SelectionError(f"--neuron-layers must be below the target neuron's layer {tgt.layer}")
            scores += [s for s in component_attribution(lm, trace, tgt, heads=False, mlps=False, neuron_layers=layers)]
        unstable = [s.name for s in scores if not s.stable]
        scores = sorted((s for s in scores if s.stable), key=lambda s: -abs(s.rel))
        comps = [{"name": s.name, "kind": s.kind, "layer": s.layer, "index": s.index, "rel": s.rel,
                  "share": s.rel / total if total else 0.0, "stable": s.stable} for s in scores[:top]]
    return {
        "model": lm.name, "prompt": prompt, "target": target if to_neuron is None else to_neuron, "foil": foil,
        "target_kind": "neuron" if to_neuron is not None else "logit",
        "target_token": tgt.token if isinstance(tgt, LogitTarget) else None,
        "total": total, "interaction": tokens.interaction, "neuron_layers": layers, "unstable_components": unstable,
        "tokens": [{"position": i, "token": t, "rel": r, "irrel": ir, "share": r / total if total else 0.0,
                    "stable": s} for i, (t, r, ir, s) in enumerate(zip(tokens.tokens, tokens.rel, tokens.irrel, tokens.stable))],
        "components": comps,
    }


def relation_facts(relation: str, path: Path | None, n_facts: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of ``relation`` from a facts JSONL/CSV file (``neuronatlas data relations``) or, without
    one, from the built-in relation data; one template per fact, ``n_facts`` distinct subjects."""
    if path is not None:
        from neuronatlas.data.prompts import load_prompts

        rows = [{**p.extra, **p.as_row()} for p in load_prompts(path)]
    else:
        from neuronatlas.data.relations import build_relation_facts

        rows = build_relation_facts([relation], n_test=0, seed=seed)
    rows = [r for r in rows if (r.get("relation") or r.get("label")) == relation and r.get("target")]
    if not rows:
        raise DatasetError(f"no facts of relation {relation!r} with a 'target' in "
                           f"{str(path) if path else 'the built-in relation data'}; check --relation",
                           path=str(path) if path else None)
    seen: set[str] = set()
    picked = []
    for row in rows:
        key = str(row.get("subject") or row["text"])
        if key in seen:
            continue
        seen.add(key)
        picked.append(row)
        if len(picked) == n_facts:
            break
    return picked


def circuit_to_atlas(lm: LoadedModel, result: CircuitResult, out: Path, name: str) -> Path:
    """Register the circuit as a study of kind ``circuit`` in the atlas at ``out``: results.json,
    circuit.svg (the layered graph the viewer shows) and report.html."""
    from neuronatlas.report.decompose_html import circuit_findings, circuit_svg, write_circuit_html
    from neuronatlas.store.atlas import Atlas, atomic_path, write_json_atomic

    atlas = Atlas.create(out, model=lm.provenance)
    folder = atlas.path / "studies" / name
    data = {"name": name, "model": lm.name, **result.to_json(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    data["findings"] = circuit_findings(data)
    write_json_atomic(folder / "results.json", data)
    with atomic_path(folder / "circuit.svg") as tmp:
        tmp.write_text(circuit_svg(data), encoding="utf-8")
    write_circuit_html(folder / "report.html", data)
    atlas.update_manifest(lambda m: m.setdefault("studies", {}).__setitem__(name, {
        "kind": "circuit", "path": f"studies/{name}", "created": data["created"], "concepts": []}))
    return folder


def run_circuit(lm: LoadedModel, relation: str, out: Path, *, facts_path: Path | None = None, n_facts: int = 10,
                share: float = 0.8, n_random: int = 20, seed: int = 0, ablation: str = "mean") -> tuple[CircuitResult, Path]:
    rows = relation_facts(relation, facts_path, n_facts, seed)
    facts = fact_rows(lm, rows)
    result = discover_circuit(lm, facts, share=share, n_random=n_random, seed=seed, ablation=ablation)
    folder = circuit_to_atlas(lm, result, out, f"circuit-{relation}")
    return result, folder
