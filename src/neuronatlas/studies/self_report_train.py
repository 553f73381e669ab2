"""The trained-in conditions of the self-report study, as in arXiv 2505.17120:

1. *preferences*: a short LoRA fine-tune (peft) of a copy of the model on choices made by hidden
   weights that are never stated in the prompt (one agent per domain, so the domain tells the
   agents apart);
2. *introspection training* (optional): a second LoRA stage on top of (1) that teaches the model
   to report the weights of some agents (the answer is the digit of the true weight on the 1-9
   scale); its reports are then scored on the other, held-out agents, whose weights it has only
   ever seen through their choices.

    >>> from neuronatlas.studies.self_report_train import train_preferences
    >>> tuned, info = train_preferences(lm, agents, steps=120, seed=0)      # doctest: +SKIP

Needs the ``train`` extra (``pip install "neuronatlas[train]"``: peft). The original model is
left untouched; each adapter is merged into a copy.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from neuronatlas.data.choices import Agent, choice_pairs, utility
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import encode_ids, pad_ids

__all__ = ["train_preferences", "train_reports", "training_rows", "report_rows", "weight_digit", "lora_finetune"]

Progress = Callable[[int, int], None]


def training_rows(agents: Sequence[Agent], per_agent: int, seed: int, *, differ: int = 0) -> list[tuple[str, str]]:
    """(prompt without the weights, the answer the agent's weights give: " A" or " B"); ties dropped.
    ``differ``: options differ in that many attributes (:func:`~neuronatlas.data.choices.choice_pairs`)."""
    from neuronatlas.studies.self_report import choice_prompt

    rows = []
    for i, ag in enumerate(agents):
        for a, b in choice_pairs(ag.domain, per_agent, seed=seed * 7_000_003 + 17 * i + 1, differ=differ):
            ua, ub = utility(ag, a), utility(ag, b)
            if ua != ub:
                rows.append((choice_prompt(ag, a, b, stated=False), " B" if ub > ua else " A"))
    random.Random(seed).shuffle(rows)
    return rows


def weight_digit(weight: float) -> int:
    """The answer on the report scale (1..9, 5 = did not matter) nearest to ``weight`` in [-100, 100]:
    the inverse of the study's reading, weight = (answer - 5) x 25."""
    return int(min(9, max(1, round(weight / 25 + 5))))


def report_rows(agents: Sequence[Agent]) -> list[tuple[str, str]]:
    """(report prompt without the weights, the digit of the true weight) for every attribute of ``agents``."""
    from neuronatlas.studies.self_report import report_prompt

    return [(report_prompt(ag, k, stated=False), f" {weight_digit(w)}") for ag in agents for k, w in enumerate(ag.weights)]


def lora_finetune(lm: LoadedModel, rows: Sequence[tuple[str, str]], *, steps: int, batch_size: int = 8,
                  lr: float = 1e-3, rank: int = 8, seed: int = 0, name: str = "lora", top_layers: float = 1.0,
                  progress: Progress | None = None) -> tuple[LoadedModel, dict[str, Any]]:
    """A copy of ``lm`` with a LoRA adapter (rank ``rank`` on every linear layer of the top
    ``top_layers`` share of the decoder layers: 0.5 adapts the upper half, and the backward pass
    then stops halfway down) trained for ``steps`` AdamW steps, cycling through ``rows`` =
    (prompt, answer) in order, on the answer's tokens only (cross-entropy), then merged into the
    copy's weights. ``progress(done, steps)`` is called after every step."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise NeuronAtlasError("the trained-in condition needs peft; fix: pip install 'neuronatlas[train]' "
                               "or run without --train-steps") from None
    if not rows:
        raise NeuronAtlasError("no training rows: every choice was a tie; raise the training choices per agent")
    torch.manual_seed(seed)
    model = copy.deepcopy(lm.model).float()
    if not 0 < top_layers <= 1:
        raise NeuronAtlasError(f"top_layers {top_layers} must be in (0, 1]: the share of decoder layers adapted")
    first = lm.n_layers - max(1, round(top_layers * lm.n_layers))
    layer0 = lm.spec.layer_modules(model)[0]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in layer0.named_modules() if isinstance(m, torch.nn.Linear)})
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=linear,
                                                  layers_to_transform=list(range(first, lm.n_layers))))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    prompts = encode_ids(lm, [p for p, _ in rows])
    answers = [encode_ids(lm, [a], add_special_tokens=False)[0] for _, a in rows]
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = [(step * batch_size + j) % len(rows) for j in range(batch_size)]
        seqs = [prompts[i] + answers[i] for i in idx]
        batch = {k: v.to(lm.device) for k, v in pad_ids(lm, seqs, "right").items()}
        labels = torch.full_like(batch["input_ids"], -100)
        for r, i in enumerate(idx):
            start = len(prompts[i])
            labels[r, start:start + len(answers[i])] = torch.tensor(answers[i], device=lm.device)
        out = peft_model(**batch, labels=labels, use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        if progress is not None:
            progress(step + 1, steps)
    peft_model.eval()
    merged = peft_model.merge_and_unload().to(next(lm.model.parameters()).dtype)
    merged.eval()
    k = max(1, min(10, steps // 4))
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "rank": rank, "layers": [first, lm.n_layers - 1],
            "examples": len(rows),
            "epochs": round(steps * batch_size / len(rows), 2),
            "loss_first": round(sum(losses[:k]) / k, 4) if losses else None,
            "loss_last": round(sum(losses[-k:]) / k, 4) if losses else None,
            "seconds": round(time.perf_counter() - t0, 1)}
    tuned = replace(lm, model=merged, name=f"{lm.name}+{name}", provenance={**lm.provenance, name: info})
    return tuned, info


def train_preferences(lm: LoadedModel, agents: Sequence[Agent], *, steps: int, per_agent: int = 40, differ: int = 0,
                      batch_size: int = 8, lr: float = 1e-3, rank: int = 8, top_layers: float = 0.5, seed: int = 0,
                      progress: Progress | None = None) -> tuple[LoadedModel, dict[str, Any]]:
    """A copy of ``lm`` fine-tuned (LoRA on the upper ``top_layers`` of the layers, merged) for
    ``steps`` steps on :func:`training_rows`: the agents' weights are learnt from their choices alone."""
    return lora_finetune(lm, training_rows(agents, per_agent, seed, differ=differ), steps=steps, batch_size=batch_size,
                         lr=lr, rank=rank, seed=seed, name="lora-preferences", top_layers=top_layers, progress=progress)


def train_reports(lm: LoadedModel, agents: Sequence[Agent], *, steps: int, batch_size: int = 8, lr: float = 1e-3,
                  rank: int = 8, top_layers: float = 0.5, seed: int = 0,
                  progress: Progress | None = None) -> tuple[LoadedModel, dict[str, Any]]:
    """Introspection training: a copy of ``lm`` (normally the preference-tuned one) fine-tuned to
    answer each report question of ``agents`` with the digit of the true weight
    (:func:`report_rows`). Score it on other agents."""
    rows = report_rows(agents)
    random.Random(seed + 1).shuffle(rows)
    return lora_finetune(lm, rows, steps=steps, batch_size=batch_size, lr=lr, rank=rank, seed=seed + 1,
                         name="lora-introspection", top_layers=top_layers, progress=progress)
