"""Shared-prefix key/value caching: few-shot prompts at close to zero-shot cost.

Prompt i is ``prefixes[i] + prompts[i]``; rows with the same prefix (a fixed set of demonstrations)
run that prefix once, keep its keys and values (a Hugging Face ``DynamicCache``), and every batch of
test prompts continues from a per-batch copy of them, under every condition::

    >>> from neuronatlas.evaluate import target_logprobs
    >>> from neuronatlas.intervene import Ablate, NeuronSet
    >>> ns = NeuronSet.parse("L1:0-9")
    >>> demos = "The capital of Japan is Tokyo.\\nThe capital of Italy is Rome.\\n"
    >>> r = target_logprobs(lm, ["The capital of France is", "The capital of Spain is"], [" Paris", " Madrid"],
    ...                     prefixes=[demos, demos], conditions=[(), (Ablate(ns),)])

Tokens: every row is tokenised as the joined text (with the tokenizer's special tokens, a BOS where
the model has one); the cached part is the longest run of the prefix's own ids that all its rows
start with (:func:`split_ids`), so the cache never changes the text. ``prefix_cache=False``
evaluates the very same ids without a cache (the reference the tests compare with).

Conditions: an intervention at ``position='all'`` changes the prefix's keys/values too, so the prefix
is run once per distinct set of all-position interventions (one forward pass of one row per such
variant, for the whole prompt list); baseline and ``position='last'`` conditions continue the clean
prefix (``position='last'`` acts on the last token of the prompt, never on the prefix).

Layout: the new tokens are right-padded after the prefix (``[prefix | tokens | pads]``) with position
ids continuing the prefix's, so every real token keeps its true distance to every prefix token (as
in a left-padded uncached batch; sliding-window layers such as Gemma 3's see the same window), and
no real token attends to a pad. Scores are read at each row's own positions: :func:`gather_positions`
gathers them before the unembedding, so only the scored positions pay for the vocabulary projection.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from neuronatlas.errors import InterventionError
from neuronatlas.intervene.interventions import Condition, intervene
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import encode_ids

__all__ = ["PrefixKV", "split_ids", "plan_prefixes", "continuation_batch", "gather_positions", "prefix_variant"]


def split_ids(lm: LoadedModel, prefixes: Sequence[str], prompts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each row's cacheable prefix and of the rest: together, exactly the ids of the
    joined text ``prefixes[i] + prompts[i]`` (with special tokens). The cut is the longest run of
    the prefix's own ids that the joined tokenisation of every row sharing that prefix starts
    with, so a token that would straddle the boundary (``"\n\n"`` + ``"Sentence"`` is ``"\n"``,
    ``"\nSentence"``... in some tokenizers) moves out of the cached part instead of changing the text."""
    if len(prefixes) != len(prompts):
        raise InterventionError(f"got {len(prefixes)} prefixes for {len(prompts)} prompts; give one prefix per "
                                "prompt (repeat the shared one)")
    unique = list(dict.fromkeys(prefixes))
    own = dict(zip(unique, encode_ids(lm, unique)))
    joined = encode_ids(lm, [p + q for p, q in zip(prefixes, prompts)])
    cut = {p: len(ids) for p, ids in own.items()}
    for p, ids in zip(prefixes, joined):
        k, limit, mine = 0, min(cut[p], len(ids)), own[p]
        while k < limit and mine[k] == ids[k]:
            k += 1
        cut[p] = k
    return [own[p][:cut[p]] for p in prefixes], [ids[cut[p]:] for p, ids in zip(prefixes, joined)]


def plan_prefixes(pre_ids: Sequence[Sequence[int]], rem_ids: Sequence[Sequence[int]], cache: bool = True
                  ) -> tuple[list[int], list[tuple[list[int], dict[int, list[int]]]]]:
    """Rows to evaluate whole (``pre_ids[i] + rem_ids[i]``), and per shared prefix the ids to cache
    with each row's ids after them. A prompt that is all prefix cannot continue it, so in its group
    the prefix's last token moves to the start of every row (the same ids either way)."""
    if not cache:
        return list(range(len(pre_ids))), []
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, ids in enumerate(pre_ids):
        groups.setdefault(tuple(ids), []).append(i)
    plain: list[int] = []
    cached: list[tuple[list[int], dict[int, list[int]]]] = []
    for key, members in groups.items():
        prefix, rems = list(key), {i: list(rem_ids[i]) for i in members}
        if prefix and any(not r for r in rems.values()):
            prefix, rems = prefix[:-1], {i: prefix[-1:] + r for i, r in rems.items()}
        if prefix:
            cached.append((prefix, rems))
        else:
            plain += members
    return sorted(plain), cached


def prefix_variant(cond: Condition) -> Condition:
    """The part of a condition that acts on prefix positions: its ``position='all'`` interventions."""
    return tuple(iv for iv in cond if iv.position == "all")


def _cache_key(lm: LoadedModel) -> str:
    """The model's name for its cache argument (``cache`` in recent transformers, ``past_key_values`` before)."""
    params = inspect.signature(lm.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class PrefixKV:
    """Keys/values of one prefix, one stored row per variant; ``variant_of[c]`` is condition c's row.

    Implements :class:`neuronatlas.intervene.shared.PastSource`."""

    cache: Any
    length: int
    variant_of: list[int]
    key: str

    @classmethod
    def compute(cls, lm: LoadedModel, prefix_ids: Sequence[int], conditions: Sequence[Condition]) -> PrefixKV:
        """Run the prefix once per distinct :func:`prefix_variant` of ``conditions`` (variant 0: none),
        all variants in one forward pass."""
        if not prefix_ids:
            raise InterventionError("the shared prefix has no tokens; pass prefixes=None for plain prompts")
        index: dict[Condition, int] = {(): 0}
        variant_of = [index.setdefault(prefix_variant(c), len(index)) for c in conditions]
        variants = list(index)
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=lm.device).repeat(len(variants), 1)
        positions = torch.arange(ids.shape[1], device=lm.device).expand_as(ids)
        with intervene(lm, variants, rows_per_condition=1), torch.inference_mode():
            out = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                           use_cache=True, logits_to_keep=1)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        return cls(cache, len(prefix_ids), variant_of, _cache_key(lm))

    def model_kwargs(self, variants: Sequence[int], rows: int) -> dict[str, Any]:
        """A fresh cache of ``len(variants) * rows`` rows (block b: ``rows`` copies of variant ``variants[b]``).

        The stored cache is never modified: the copy shares its tensors until the model's ``update``
        concatenates new keys onto them, which makes new tensors."""
        device = _cache_device(self.cache)
        idx = torch.tensor(list(variants), dtype=torch.long, device=device).repeat_interleave(rows)
        layers = getattr(self.cache, "layers", None)
        if layers is None:                       # older transformers: a cache without per-layer objects
            fresh = copy.deepcopy(self.cache)
        else:
            fresh = copy.copy(self.cache)
            fresh.layers = [copy.copy(layer) for layer in layers]
        fresh.batch_select_indices(idx)
        return {self.key: fresh}


def _cache_device(cache: Any) -> torch.device:
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor):
            return keys.device
    key_cache = getattr(cache, "key_cache", None)
    return key_cache[0].device if key_cache else torch.device("cpu")


def continuation_batch(lm: LoadedModel, prefix_len: int, seqs: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Right-padded ``seqs`` continuing a prefix of ``prefix_len`` tokens: ``input_ids`` and
    ``position_ids`` of shape (B, W) (positions ``prefix_len + t``), ``attention_mask`` of shape
    (B, prefix_len + W) covering prefix and new tokens. Built on ``lm.device``."""
    pad_id = lm.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = lm.tokenizer.eos_token_id or 0
    width = max(len(s) for s in seqs)
    ids = [list(s) + [int(pad_id)] * (width - len(s)) for s in seqs]
    mask = [[1] * prefix_len + [1] * len(s) + [0] * (width - len(s)) for s in seqs]
    device = lm.device
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    positions = (prefix_len + torch.arange(width, device=device)).expand(len(seqs), -1)
    return {"input_ids": input_ids, "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
            "position_ids": positions}


@contextmanager
def gather_positions(lm: LoadedModel, positions: torch.Tensor) -> Iterator[None]:
    """Inside the block the model's logits are those of ``positions`` only: ``positions`` has shape
    (R, K), one row of K sequence indices per batch row, and the logits come out as (R, K, vocab).

    A forward pre-hook on the output embedding gathers the final hidden states, so the vocabulary
    projection (and any logit soft-capping after it) runs on R x K positions instead of all of them."""
    head = lm.model.get_output_embeddings()
    if head is None:
        raise InterventionError(f"{lm.name} has no output embedding to read logits from")

    def pre_hook(_m: Any, args: tuple[Any, ...]) -> Any:
        hidden = args[0]
        idx = positions.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
        return (hidden.gather(1, idx), *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
