"""Capture pooled activations of a residual-stream space for a list of texts.

    >>> from neuronatlas.directions import capture
    >>> acts = capture(lm, ["I am so happy today", "The meeting is at noon"], space="resid",
    ...                layers=[3, 6], pool="last")                              # doctest: +SKIP
    >>> acts.shape                                                             # doctest: +SKIP
    torch.Size([2, 2, 576])

Texts are batched by similar length (less padding) and each forward stops after the last layer
asked for. ``pool="last"`` keeps each text's last real token, ``"mean"`` averages its real tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from neuronatlas.directions.spaces import Space, check_layers, stream_hooks
from neuronatlas.errors import DatasetError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import batches, encode_ids, forward_through, pad_ids

__all__ = ["capture", "Pool"]

Pool = Literal["last", "mean"]


def capture(lm: LoadedModel, texts: Sequence[str], *, space: Space | str = Space.RESID,
            layers: Sequence[int] | None = None, pool: Pool = "last", batch_size: int = 16,
            max_length: int | None = 256,
            progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
    """Pooled activations, float32, shape ``(len(texts), len(layers), d_model)`` (layers in the
    order given; all layers when ``layers`` is None)."""
    if pool not in ("last", "mean"):
        raise DatasetError(f"unknown pooling {pool!r}; choose 'last' or 'mean'")
    if not texts:
        raise DatasetError("no texts to capture activations for; give at least one")
    chosen = list(range(lm.n_layers)) if layers is None else check_layers(lm, layers)
    if not chosen:
        raise DatasetError("no layers to capture; give at least one layer")
    ids = encode_ids(lm, texts, max_length=max_length)
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise DatasetError(f"text {empty[0]} ({texts[empty[0]]!r}) has no tokens; remove empty texts")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    d_model = int(lm.config.hidden_size)
    out = torch.zeros((len(texts), len(chosen), d_model), dtype=torch.float32)
    slot = {layer: k for k, layer in enumerate(chosen)}
    groups = batches(len(order), batch_size)
    for g, group in enumerate(groups):
        rows = [order[i] for i in group]
        batch = pad_ids(lm, [ids[r] for r in rows], "left")
        mask = batch["attention_mask"].to(torch.float32)
        pooled: dict[int, torch.Tensor] = {}

        def observe(layer: int, h: torch.Tensor) -> None:
            h = h.float().cpu()
            if pool == "last":  # left padding: the last position is every row's last real token
                pooled[layer] = h[:, -1]
            else:
                pooled[layer] = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

        with stream_hooks(lm, space, observe=observe, layers=chosen, batch_size=len(rows)):
            forward_through(lm, batch, max(chosen))
        for layer, value in pooled.items():
            out[rows, slot[layer]] = value
        if progress is not None:
            progress("capture", g + 1, len(groups))
    return out
