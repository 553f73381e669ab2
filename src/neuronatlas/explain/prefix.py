"""Run a prompt once and continue it many times from its key/value cache.

The explainer samples several candidates after one prompt, PMI scores several candidates after the
same prompt, and the simulator reads many excerpts after one header: each runs the shared prompt
once (:func:`run_prefix`) and repeats its cache for a right-padded batch of continuations.

    >>> from neuronatlas.explain.prefix import run_prefix
    >>> prefix = run_prefix(lm, "The capital of France is")
    >>> logits = prefix.continue_batch(lm, [[12, 7], [99]])   # logits[i, j] predicts continuation i's token j
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import encode_ids, pad_ids

__all__ = ["Prefix", "run_prefix"]


@dataclass
class Prefix:
    """A prompt's text and token ids, and the key/value cache of all its tokens but the last."""

    text: str
    ids: list[int]
    past: Any

    def repeated(self, n: int) -> Any:
        """A copy of the cache for a batch of ``n`` rows (None for a one-token prompt)."""
        if self.past is None:
            return None
        past = copy.deepcopy(self.past)
        past.batch_repeat_interleave(n)
        return past

    def continue_batch(self, lm: LoadedModel, continuations: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits (rows, 1 + longest, vocab): ``[i, j]`` is the distribution of continuation i's
        token j given the prompt and the continuation's first j tokens (rows are right-padded)."""
        batch = pad_ids(lm, [[self.ids[-1], *c] for c in continuations], "right")
        n, h = len(continuations), len(self.ids) - 1
        device = lm.device
        mask = torch.cat([torch.ones(n, h, dtype=torch.long), batch["attention_mask"]], dim=1)
        with torch.inference_mode():
            return lm.model(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device),
                            position_ids=(batch["position_ids"] + h).to(device), past_key_values=self.repeated(n),
                            use_cache=self.past is not None).logits


def run_prefix(lm: LoadedModel, text: str) -> Prefix:
    """Tokenise ``text`` (with the tokenizer's special tokens) and cache all its tokens but the last."""
    ids = list(encode_ids(lm, [text])[0])
    past = None
    if len(ids) > 1:
        with torch.inference_mode():
            past = lm.model(input_ids=torch.tensor([ids[:-1]], device=lm.device), use_cache=True).past_key_values
    return Prefix(text, ids, past)
