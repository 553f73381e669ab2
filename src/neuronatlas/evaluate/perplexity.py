"""Per-text negative log-likelihood and perplexity, batched, padding-correct, many conditions per forward.

    >>> from neuronatlas.evaluate.perplexity import text_nll, count_forwards
    >>> from neuronatlas.intervene import Ablate, NeuronSet
    >>> conds = [(), (Ablate(NeuronSet.parse("L1:0-9", "gate")),)]     # baseline + one deactivation
    >>> with count_forwards(lm) as calls:
    ...     r = text_nll(lm, ["Le chat dort.", "Der Hund bellt."], conditions=conds)
    >>> r.nll.shape, r.n_tokens                 # (2 conditions, 2 texts) summed NLL; tokens scored per text
    >>> r.ppl()                                 # (2,) exp(total NLL / total tokens) over all texts
    >>> r.ppl([1]), calls.forwards, calls.rows  # PPL of text 1 only; forward passes and rows they carried

Each text is tokenised as the model's tokenizer does by default (special tokens included) and cut at
``max_length`` tokens; tokens 2..n are scored, each given the ones before it (the first token has no
context, so a text of n tokens contributes n - 1). Batches are right-padded with position ids taken
from the attention mask, and padded positions never count. Conditions are evaluated by repeating the
batch once per condition (``repeat_batch``) and applying condition c to rows ``[c*B, (c+1)*B)``, so
C conditions cost one forward pass per batch while ``C * rows * width`` stays under ``max_tokens``
(that bounds the (rows, width, vocab) logits tensor; more conditions are split over several passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neuronatlas.errors import InterventionError
from neuronatlas.intervene.interventions import Intervention, normalize_conditions
from neuronatlas.intervene.shared import forward_conditions
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import ForwardCount, count_forwards, encode_ids, pad_ids  # re-exported

__all__ = ["PerplexityResult", "ForwardCount", "text_nll", "perplexity", "count_forwards"]

ConditionsArg = Sequence[Intervention | Sequence[Intervention]]


def perplexity(total_nll: float, total_tokens: float) -> float:
    """``exp(total NLL / total tokens)``; NaN when no token was scored."""
    return math.exp(total_nll / total_tokens) if total_tokens > 0 else math.nan


@dataclass
class PerplexityResult:
    """Summed NLL per (condition, text) and tokens scored per text."""

    nll: torch.Tensor        # (conditions, texts) float64, nats
    n_tokens: torch.Tensor   # (texts,) int64
    n_forwards: int = 0

    def ppl(self, texts: Sequence[int] | None = None) -> torch.Tensor:
        """Corpus perplexity per condition over ``texts`` (default: all): exp(sum NLL / sum tokens)."""
        idx = torch.arange(self.nll.shape[1]) if texts is None else torch.as_tensor(list(texts), dtype=torch.long)
        total = float(self.n_tokens[idx].sum())
        return torch.tensor([perplexity(float(v), total) for v in self.nll[:, idx].sum(1)], dtype=torch.float64)


def text_nll(lm: LoadedModel, texts: Sequence[str], *, conditions: ConditionsArg = ((),), batch_size: int = 16,
             max_tokens: int = 4096, max_length: int | None = 128,
             progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Summed NLL of every text under every condition; see the module docstring.

    ``progress(n)`` is called with the number of texts finished after each batch.
    """
    if batch_size < 1 or max_tokens < 1:
        raise InterventionError(f"batch_size and max_tokens must be at least 1, got {batch_size} and {max_tokens}")
    conds = normalize_conditions(conditions)
    if not conds:
        raise InterventionError("no conditions given; pass [()] for the unmodified model")
    ids = encode_ids(lm, texts, max_length=max_length) if len(texts) else []
    n_tokens = torch.tensor([max(len(x) - 1, 0) for x in ids], dtype=torch.long)
    nll = torch.zeros(len(conds), len(texts), dtype=torch.float64, device=lm.device)  # stays there until the end
    scored = sorted((i for i in range(len(ids)) if len(ids[i]) >= 2), key=lambda i: (len(ids[i]), i))
    n_forwards = 0
    for start in range(0, len(scored), batch_size):
        rows = scored[start:start + batch_size]
        batch = pad_ids(lm, [ids[i] for i in rows], "right")
        B, width = batch["input_ids"].shape
        targets = batch["input_ids"][:, 1:].to(lm.device)
        valid = batch["attention_mask"][:, 1:].bool().to(lm.device)
        idx = torch.tensor(rows, dtype=torch.long, device=lm.device)
        per_pass = max(1, max_tokens // (B * width))
        for c0 in range(0, len(conds), per_pass):
            group = conds[c0:c0 + per_pass]
            logits = forward_conditions(lm, batch, group).logits
            n_forwards += 1
            for g in range(len(group)):
                lg = logits[g * B:(g + 1) * B, :-1].float()
                tok_nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.to(lg.device).reshape(-1),
                                          reduction="none").view(B, width - 1)
                nll[c0 + g, idx] = (tok_nll * valid.to(lg.device)).sum(1).double().to(nll.device)
            del logits
        if progress:
            progress(len(rows))
    if progress and len(scored) < len(texts):
        progress(len(texts) - len(scored))
    return PerplexityResult(nll.cpu(), n_tokens, n_forwards)
