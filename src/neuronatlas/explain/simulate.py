"""Simulate a neuron from its explanation and score the explanation (Bills et al. 2023, "all at once").

The simulator prompt (plain text, one worked example) gives the explanation and then the excerpt as
``token<TAB>unknown`` lines. One forward pass per excerpt (excerpts batched, the shared header's
key/value cache computed once per explanation) yields, at the position
right after each ``<TAB>``, the next-token distribution; the simulated activation is its expected
value over the value tokens "0".."10", renormalised over those tokens. Values whose number is not a
single token after a tab (``10`` in digit-splitting tokenizers such as SmolLM's or Llama's) are left
out; Pearson correlation does not depend on the scale.

The score is the Pearson correlation of simulated and true normalised (0..10) activations over all
tokens of the scored excerpts (5 top + 5 random by default), pooled.

    >>> from neuronatlas.explain.simulate import Simulator, pearson
    >>> lm = load_model("default")  # doctest: +SKIP
    >>> sim = Simulator(lm)
    >>> sim.simulate("words about cats", [["The", " cat", " sat"]])     # [array([0.4, 6.1, 1.2])]
    >>> from neuronatlas.explain.tables import read_exemplars
    >>> ex = read_exemplars("my-atlas", layer=1, neuron=3)
    >>> sim.score("words about cats", ex.top[:5], max_activation=ex.max_activation)   # Pearson r
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from neuronatlas.errors import ExplainerError
from neuronatlas.explain.prefix import run_prefix
from neuronatlas.explain.prompts import (
    VALUE_MAX,
    normalise,
    show_token,
    simulation_header,
)
from neuronatlas.explain.tables import Excerpt
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import encode_ids

__all__ = ["Simulator", "pearson", "simulation_body", "simulation_ids", "value_token_ids"]


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (the correlation is undefined)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"pearson needs two equal-length sequences of >= 2 values, got {a.shape} and {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def value_token_ids(tokenizer: Any) -> dict[int, int]:
    """Value v (0..10) -> the single token id that spells ``str(v)`` right after a tab."""
    enc = tokenizer.encode
    tab = enc("\t", add_special_tokens=False)
    out: dict[int, int] = {}
    for v in range(VALUE_MAX + 1):
        ids = enc(f"\t{v}", add_special_tokens=False)
        if ids[: len(tab)] == tab and len(ids) == len(tab) + 1:
            out[v] = ids[-1]
    return out


def simulation_body(lm: LoadedModel, tokens: Sequence[str]) -> tuple[list[int], list[int]]:
    """Token ids of one excerpt's ``token<TAB>unknown`` lines and the position after each tab."""
    tok = lm.tokenizer
    unknown = tok.encode("unknown\n", add_special_tokens=False)
    ids: list[int] = []
    reads = []
    for t in tokens:
        ids.extend(tok.encode(show_token(t) + "\t", add_special_tokens=False))
        reads.append(len(ids) - 1)
        ids.extend(unknown)
    ids.extend(tok.encode("<end>", add_special_tokens=False))
    return ids, reads


def simulation_ids(lm: LoadedModel, explanation: str, tokens: Sequence[str]) -> tuple[list[int], list[int]]:
    """Token ids of the whole simulator prompt for one excerpt, and the position after each token's tab."""
    header = list(encode_ids(lm, [simulation_header(explanation)])[0])
    body, reads = simulation_body(lm, tokens)
    return header + body, [len(header) + r for r in reads]


class Simulator:
    """Predict per-token activations from an explanation with a local LM (``batch_size`` excerpts per forward)."""

    def __init__(self, lm: LoadedModel, *, batch_size: int = 4) -> None:
        self.lm, self.batch_size = lm, batch_size
        self.value_ids = value_token_ids(lm.tokenizer)
        if len(self.value_ids) < 2:
            raise ExplainerError(f"the tokenizer of {lm.name!r} spells fewer than two of the values 0..10 as single "
                                 "tokens; use another simulator model")
        self.values = torch.tensor(sorted(self.value_ids), dtype=torch.float64)
        self._ids = torch.tensor([self.value_ids[v] for v in sorted(self.value_ids)])

    def simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Expected activation (0..10 scale) at every token of every excerpt.

        The shared prompt header is run once; its key/value cache is repeated for each batch of
        excerpts (right-padded, so every excerpt starts right after the header).
        """
        lm = self.lm
        header = run_prefix(lm, simulation_header(explanation))
        bodies = [simulation_body(lm, tokens) for tokens in excerpts]
        out: list[np.ndarray] = [np.zeros(0)] * len(bodies)
        order = sorted(range(len(bodies)), key=lambda i: len(bodies[i][0]))       # less padding
        for start in range(0, len(order), self.batch_size):
            group = order[start:start + self.batch_size]
            logits = header.continue_batch(lm, [bodies[i][0] for i in group])
            for row, i in enumerate(group):
                reads = bodies[i][1]
                if not reads:
                    continue
                # logits[row, r + 1] is the distribution after body token r (the tab)
                at = torch.tensor(reads, device=logits.device) + 1
                logp = logits[row, at].double().log_softmax(-1)[:, self._ids.to(logits.device)].cpu()
                probs = (logp - logp.logsumexp(-1, keepdim=True)).exp()          # renormalised over values
                out[i] = (probs @ self.values).numpy()
        return out

    def score(self, explanation: str, excerpts: Sequence[Excerpt], max_activation: float) -> float:
        """Pearson r of simulated vs true normalised activations, pooled over ``excerpts``."""
        simulated = self.simulate(explanation, [e.tokens for e in excerpts])
        true = np.concatenate([normalise(e.acts, max_activation) for e in excerpts]).astype(np.float64)
        return pearson(np.concatenate(simulated), true)
