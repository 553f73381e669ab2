"""The trained-in condition of the self-report study: a short LoRA fine-tune (peft) of a copy of
the model on choices made by hidden weights, never stated in the prompt (one agent per domain, so
the domain tells the agents apart), as in arXiv 2505.17120's preference fine-tuning.

    >>> from neuronatlas.studies.self_report_train import train_preferences
    >>> tuned, info = train_preferences(lm, agents, steps=40, seed=0)      # doctest: +SKIP

Needs the ``train`` extra (``pip install "neuronatlas[train]"``: peft). The original model is
left untouched; the adapter is merged into the copy.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from neuronatlas.data.choices import Agent, choice_pairs, utility
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import encode_ids, pad_ids

__all__ = ["train_preferences", "training_rows"]


def training_rows(agents: Sequence[Agent], per_agent: int, seed: int) -> list[tuple[str, str]]:
    """(prompt without the weights, the answer the agent's weights give: " A" or " B"); ties dropped."""
    from neuronatlas.studies.self_report import choice_prompt

    rows = []
    for i, ag in enumerate(agents):
        for a, b in choice_pairs(ag.domain, per_agent, seed=seed * 7_000_003 + 17 * i + 1):
            ua, ub = utility(ag, a), utility(ag, b)
            if ua != ub:
                rows.append((choice_prompt(ag, a, b, stated=False), " B" if ub > ua else " A"))
    random.Random(seed).shuffle(rows)
    return rows


def train_preferences(lm: LoadedModel, agents: Sequence[Agent], *, steps: int, per_agent: int = 40,
                      batch_size: int = 8, lr: float = 1e-3, rank: int = 8, seed: int = 0) -> tuple[LoadedModel, dict[str, Any]]:
    """A copy of ``lm`` with a LoRA adapter (rank ``rank`` on every linear layer) trained for
    ``steps`` AdamW steps on the answer token of :func:`training_rows`, merged into the weights."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise NeuronAtlasError("the trained-in condition needs peft; fix: pip install 'neuronatlas[train]' "
                               "or run without --train-steps") from None
    torch.manual_seed(seed)
    rows = training_rows(agents, per_agent, seed)
    model = copy.deepcopy(lm.model).float()
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules="all-linear"))
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
    peft_model.eval()
    merged = peft_model.merge_and_unload().to(next(lm.model.parameters()).dtype)
    merged.eval()
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "rank": rank, "examples": len(rows),
            "loss_first": losses[:5], "loss_last": losses[-5:], "seconds": round(time.perf_counter() - t0, 1)}
    tuned = replace(lm, model=merged, name=f"{lm.name}+lora", provenance={**lm.provenance, "lora": info})
    return tuned, info
