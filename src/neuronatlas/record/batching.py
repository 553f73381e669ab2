"""Tokenising, padding and running batches the same way everywhere.

Position ids are always computed from the attention mask, so left- and right-padded batches give
each real token the same position (HF's plain forward would otherwise count padding).

    >>> from neuronatlas.record.batching import encode, forward
    >>> batch = encode(lm, ["The capital of France is"], padding_side="left")
    >>> logits = forward(lm, batch).logits
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from neuronatlas.models.loading import LoadedModel

__all__ = ["encode", "encode_ids", "forward", "forward_through", "repeat_batch", "batches", "last_positions",
           "ForwardCount", "count_forwards"]

PaddingSide = Literal["left", "right"]


def encode_ids(lm: LoadedModel, texts: Sequence[str], *, add_special_tokens: bool = True,
               max_length: int | None = None) -> list[list[int]]:
    out = lm.tokenizer(list(texts), add_special_tokens=add_special_tokens, truncation=max_length is not None,
                       max_length=max_length)["input_ids"]
    return [list(ids) for ids in out]


def pad_ids(lm: LoadedModel, ids: Sequence[Sequence[int]], padding_side: PaddingSide = "left") -> dict[str, torch.Tensor]:
    """Pad token id lists into ``input_ids``, ``attention_mask`` and ``position_ids``."""
    pad_id = lm.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = lm.tokenizer.eos_token_id or 0
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        n = len(row)
        if padding_side == "left":
            input_ids[i, width - n:] = torch.tensor(row, dtype=torch.long)
            mask[i, width - n:] = 1
        else:
            input_ids[i, :n] = torch.tensor(row, dtype=torch.long)
            mask[i, :n] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


def encode(lm: LoadedModel, texts: Sequence[str], *, padding_side: PaddingSide = "left",
           max_length: int | None = None) -> dict[str, torch.Tensor]:
    return pad_ids(lm, encode_ids(lm, texts, max_length=max_length), padding_side)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    width = attention_mask.shape[1]
    positions = torch.arange(width, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def repeat_batch(batch: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Repeat every row block ``times`` times, condition-major: rows [c*B, (c+1)*B) are copy c."""
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in batch.items()}


def forward(lm: LoadedModel, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    device = lm.device
    with torch.inference_mode():
        return lm.model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False, **kwargs)


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (see :func:`forward_through`)."""


def forward_through(lm: LoadedModel, batch: dict[str, torch.Tensor], layer: int | None = None, **kwargs: Any) -> Any:
    """Run ``batch`` through layers 0..``layer`` (default: the last) and stop there: no final norm,
    no unembedding. Recording needs nothing after the last hooked layer, and the unembedding alone
    is a fifth of SmolLM2's per-token work. Returns that layer's output; ``kwargs`` go to the model
    (e.g. a key/value cache to continue from)."""
    layers = lm.spec.layer_modules(lm.model)
    captured: list[Any] = []

    def stop(_m: Any, _args: Any, output: Any) -> None:
        captured.append(output)
        raise StopForward

    handle = layers[lm.n_layers - 1 if layer is None else layer].register_forward_hook(stop)
    try:
        forward(lm, batch, **kwargs)
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured[0] if captured else None


@dataclass
class ForwardCount:
    """Forward passes through a model inside :func:`count_forwards`, with the rows and tokens they carried."""

    forwards: int = 0
    rows: int = 0
    tokens: int = 0


@contextmanager
def count_forwards(lm: LoadedModel) -> Iterator[ForwardCount]:
    """Count every call of ``lm.model`` (a generation step is one call) inside the block."""
    count = ForwardCount()

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        count.forwards += 1
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            count.rows += int(ids.shape[0])
            count.tokens += int(ids.shape[0] * ids.shape[1])

    handle = lm.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def batches(n: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
