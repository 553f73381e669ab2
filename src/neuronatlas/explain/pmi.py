"""MILAN-style reranking of candidate explanations by pointwise mutual information.

Among candidates ``d`` choose ``argmax log p(d | exemplars) - lambda * log p(d)`` (Hernandez et al.
2022, lambda = 0.2). Both terms come from the same local LM: the sum of the token log-probs of
``" " + d`` after the explainer prompt with the excerpts (conditional) and after the same prompt with
the excerpts removed (prior). The prior term penalises descriptions that are likely whatever the
neuron does ("words", "the").

    >>> from neuronatlas.explain.pmi import pmi_rerank
    >>> best, scores = pmi_rerank(lm, prompt, ["capital cities", "words"], lam=0.2)
    >>> scores[best].pmi, scores[best].logp_cond, scores[best].logp_prior
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neuronatlas.errors import ExplainerError
from neuronatlas.explain.prefix import Prefix, run_prefix
from neuronatlas.explain.prompts import ExplainPrompt
from neuronatlas.models.loading import LoadedModel

__all__ = ["DEFAULT_LAMBDA", "PMIScore", "continuation_logprobs", "pmi_rerank", "pmi_scores"]

DEFAULT_LAMBDA = 0.2


@dataclass(frozen=True)
class PMIScore:
    candidate: str
    logp_cond: float        # log p(d | exemplars)
    logp_prior: float       # log p(d)
    pmi: float              # logp_cond - lambda * logp_prior


def pmi_scores(lm: LoadedModel, prompt: ExplainPrompt, candidates: Sequence[str], *, lam: float = DEFAULT_LAMBDA,
               batch_size: int = 4, prefix: Prefix | None = None) -> list[PMIScore]:
    """Score every candidate; ``lam`` is MILAN's lambda. ``prefix``: the explainer prompt already run
    on ``lm`` (a :class:`LocalExplainer` keeps it), reused when its text matches."""
    if not candidates:
        raise ExplainerError("no candidate explanations to rerank")
    targets = [" " + c.strip() for c in candidates]
    text = prompt.render(lm.tokenizer)
    cond_prefix = prefix if prefix is not None and prefix.text == text else run_prefix(lm, text)
    cond = continuation_logprobs(lm, cond_prefix, targets, batch_size=batch_size)
    prior = continuation_logprobs(lm, run_prefix(lm, prompt.prior().render(lm.tokenizer)), targets,
                                  batch_size=batch_size)
    return [PMIScore(c, a, b, a - lam * b) for c, a, b in zip(candidates, cond, prior)]


def continuation_logprobs(lm: LoadedModel, prompt: str | Prefix, targets: Sequence[str], *,
                          batch_size: int = 4) -> list[float]:
    """Sum of the token log-probs of each target after ``prompt``. The prompt is run once and its
    key/value cache repeated for the targets, which are tokenised on their own, like
    :func:`neuronatlas.evaluate.target_logprobs`."""
    prefix = prompt if isinstance(prompt, Prefix) else run_prefix(lm, prompt)
    t_ids = [lm.tokenizer.encode(t, add_special_tokens=False) for t in targets]
    result = [0.0] * len(targets)
    for start in range(0, len(targets), batch_size):
        rows = [i for i in range(start, min(start + batch_size, len(targets))) if t_ids[i]]
        if not rows:
            continue
        logp = prefix.continue_batch(lm, [t_ids[i] for i in rows]).double().log_softmax(-1)
        for row, i in enumerate(rows):
            ids = torch.tensor(t_ids[i], device=logp.device)
            result[i] = float(logp[row, torch.arange(len(ids), device=logp.device), ids].sum())
    return result


def pmi_rerank(lm: LoadedModel, prompt: ExplainPrompt, candidates: Sequence[str], *, lam: float = DEFAULT_LAMBDA,
               batch_size: int = 4, prefix: Prefix | None = None) -> tuple[int, list[PMIScore]]:
    """Index of the best candidate (first on ties) and every candidate's scores."""
    scores = pmi_scores(lm, prompt, candidates, lam=lam, batch_size=batch_size, prefix=prefix)
    best = max(range(len(scores)), key=lambda i: (scores[i].pmi, -i))
    return best, scores
