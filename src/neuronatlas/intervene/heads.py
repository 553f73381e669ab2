"""Attention heads: read each head's contribution at the last token, and scale heads during a forward.

A head's output is its slice of the input of the attention output projection (``o_proj``); its
contribution to the residual stream is that slice times the matching columns of ``o_proj.weight``.
Families whose attention ends in an ``o_proj`` linear layer (llama, mistral, qwen2/3, gemma 1-3)
are supported; others raise :class:`~neuronatlas.errors.UnsupportedModelError`.

    >>> from neuronatlas.intervene.heads import head_outputs, scale_heads
    >>> from neuronatlas.record.batching import encode
    >>> out = head_outputs(lm, ["I felt happy"])           # (texts, layers, heads, d_model) at the last token
    >>> with scale_heads(lm, {(0, 1): 0.0}):                # ablate head 1 of layer 0 in the block
    ...     logits = lm.model(**encode(lm, ["I felt happy"])).logits
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from neuronatlas.errors import InterventionError, UnsupportedModelError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import batches, encode, forward, last_positions

__all__ = ["head_shape", "head_outputs", "scale_heads", "parse_head"]


def _o_proj(lm: LoadedModel, layer: int) -> torch.nn.Linear:
    block = lm.spec.layer_modules(lm.model)[layer]
    proj = getattr(getattr(block, "self_attn", None), "o_proj", None)
    if not isinstance(proj, torch.nn.Linear):
        raise UnsupportedModelError(f"head-level reading needs an attention o_proj; the {lm.spec.family} family "
                                    "has none; use neuron-level interventions only")
    return proj


def head_shape(lm: LoadedModel) -> tuple[int, int]:
    """(heads per layer, head dimension)."""
    n_heads = int(lm.config.num_attention_heads)
    in_features = _o_proj(lm, 0).in_features
    return n_heads, in_features // n_heads


def parse_head(text: str) -> tuple[int, int]:
    """``L12.H3`` -> (12, 3)."""
    import re

    m = re.fullmatch(r"L(\d+)\.H(\d+)", text.strip())
    if not m:
        raise InterventionError(f"cannot parse head {text!r}; write it as L<layer>.H<head>, e.g. L12.H3")
    return int(m.group(1)), int(m.group(2))


@torch.no_grad()
def head_outputs(lm: LoadedModel, texts: Sequence[str], *, layers: Sequence[int] | None = None,
                 batch_size: int = 16) -> torch.Tensor:
    """Each head's contribution to the residual stream at each text's last real token:
    float32 (texts, len(layers), heads, d_model) on the CPU (bias of ``o_proj`` not included)."""
    chosen = list(range(lm.n_layers)) if layers is None else list(layers)
    n_heads, hd = head_shape(lm)
    d = int(lm.config.hidden_size)
    out = torch.zeros(len(texts), len(chosen), n_heads, d)
    weights = {layer: _o_proj(lm, layer).weight.detach().float().cpu().reshape(d, n_heads, hd) for layer in chosen}
    for rows in batches(len(texts), batch_size):
        batch = encode(lm, [texts[i] for i in rows])
        seen: dict[int, torch.Tensor] = {}
        handles = []
        for k, layer in enumerate(chosen):
            def pre(_m: Any, args: tuple[Any, ...], _k: int = k) -> None:
                seen[_k] = args[0].detach()
            handles.append(_o_proj(lm, layer).register_forward_pre_hook(pre))
        try:
            forward(lm, batch)
        finally:
            for h in handles:
                h.remove()
        pos = last_positions(batch["attention_mask"]).cpu()
        idx = torch.arange(len(rows))
        for k, layer in enumerate(chosen):
            z = seen[k].cpu()[idx, pos].float().reshape(len(rows), n_heads, hd)          # (B, H, hd)
            out[rows[0]:rows[-1] + 1, k] = torch.einsum("bhe,dhe->bhd", z, weights[layer]).cpu()
    return out


@contextmanager
def scale_heads(lm: LoadedModel, factors: Mapping[tuple[int, int], float]) -> Iterator[None]:
    """Multiply the outputs of heads ``(layer, head)`` by their factor (0 ablates) on every row and
    position of every forward inside the block; hooks are removed on exit, even after an error."""
    n_heads, hd = head_shape(lm)
    by_layer: dict[int, list[tuple[int, float]]] = {}
    for (layer, head), f in factors.items():
        if not 0 <= layer < lm.n_layers or not 0 <= head < n_heads:
            raise InterventionError(f"head L{layer}.H{head} is out of range; the model has {lm.n_layers} layers "
                                    f"of {n_heads} heads")
        by_layer.setdefault(layer, []).append((head, float(f)))
    handles = []
    try:
        for layer, items in by_layer.items():
            scale = torch.ones(n_heads * hd)
            for head, f in items:
                scale[head * hd:(head + 1) * hd] = f

            def pre(_m: Any, args: tuple[Any, ...], _s: torch.Tensor = scale) -> tuple[Any, ...]:
                x = args[0]
                return (x * _s.to(x.device, x.dtype), *args[1:])
            handles.append(_o_proj(lm, layer).register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()
