"""Causal ground truth for the decomposition: ablate heads, MLP blocks and neurons, row by row.

Each batch row carries its own set of components to switch off, so a sweep over many components is a
few batched forwards. Heads are ablated at the input of the attention output projection (their slice
of ``o_proj``'s input), MLP blocks at the block's output, neurons at the down-projection's input
(the project's ``mlp`` site). ``means`` (from :func:`component_means`) replaces instead of zeroing.

    >>> from neuronatlas.decompose.ablation import ablated_logits
    >>> rows = [[], ["L0.head:1"], ["L1:3", "L1.mlp"]]
    >>> ablated_logits(lm, "The capital of France is", rows).shape      # (rows, vocab), last position
    torch.Size([3, 400])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from neuronatlas.decompose.arch import decomp_arch
from neuronatlas.decompose.attribution import parse_component
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.specs import get_module
from neuronatlas.record.batching import encode, forward, last_positions

__all__ = ["ablate_rows", "ablated_logits", "component_means", "logit_diffs"]

Means = dict[str, torch.Tensor]


def _out_proj(lm: LoadedModel, layer: int) -> nn.Module:
    arch = decomp_arch(lm)
    attn = arch.attention(arch.layers(lm.model)[layer])
    return get_module(attn, "c_proj" if lm.spec.family == "gpt2" else "o_proj")  # type: ignore[no-any-return]


def _plan(lm: LoadedModel, rows: Sequence[Sequence[str]]) -> dict[tuple[str, int], list[tuple[int, int, str]]]:
    """(kind, layer) -> [(row, index, name)] for every component of every row."""
    plan: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    for r, names in enumerate(rows):
        for name in names:
            kind, layer, index = parse_component(name)
            plan.setdefault((kind, layer), []).append((r, index, name))
    return plan


@contextmanager
def ablate_rows(lm: LoadedModel, rows: Sequence[Sequence[str]], *, repeat: int = 1,
                means: Means | None = None) -> Iterator[None]:
    """Inside the block, batch row ``r * repeat + k`` (k < repeat) has the components ``rows[r]``
    switched off (zero, or the value in ``means``). Every hook is removed on exit."""
    arch = decomp_arch(lm)
    head_dim = arch.parts(lm.model, 0).head_dim
    handles: list[Any] = []

    def expand(r: int) -> slice:
        return slice(r * repeat, (r + 1) * repeat)

    def heads_hook(items: list[tuple[int, int, str]]) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> Any:
            z = args[0].clone()
            for r, h, name in items:
                cols = slice(h * head_dim, (h + 1) * head_dim)
                z[expand(r), :, cols] = 0.0 if means is None else means[name].to(z.dtype)
            return (z, *args[1:])
        return hook

    def mlp_hook(items: list[tuple[int, int, str]]) -> Any:
        def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> Any:
            out = out.clone()
            for r, _, name in items:
                out[expand(r)] = 0.0 if means is None else means[name].to(out.dtype)
            return out
        return hook

    def neuron_hook(items: list[tuple[int, int, str]]) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> Any:
            h = args[0].clone()
            for r, j, name in items:
                h[expand(r), :, j] = 0.0 if means is None else means[name].to(h.dtype)
            return (h, *args[1:])
        return hook

    try:
        for (kind, layer), items in _plan(lm, rows).items():
            if kind == "head":
                handles.append(_out_proj(lm, layer).register_forward_pre_hook(heads_hook(items)))
            elif kind == "mlp":
                handles.append(lm.spec.mlp_module(lm.model, layer).register_forward_hook(mlp_hook(items)))
            else:
                down = get_module(lm.spec.mlp_module(lm.model, layer), lm.spec.down)
                handles.append(down.register_forward_pre_hook(neuron_hook(items)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def ablated_logits(lm: LoadedModel, prompt: str, rows: Sequence[Sequence[str]], *,
                   means: Means | None = None, batch: int = 256) -> torch.Tensor:
    """Last-position logits of ``prompt`` with each row's components ablated: (rows, vocab)."""
    enc = encode(lm, [prompt])
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        b = {k: v.repeat(len(chunk), 1) for k, v in enc.items()}
        with ablate_rows(lm, chunk, means=means):
            out.append(forward(lm, b, logits_to_keep=1).logits[:, -1].float())
    return torch.cat(out)


@torch.no_grad()
def logit_diffs(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[int], foils: Sequence[int],
                rows: Sequence[Sequence[str]], *, means: Means | None = None) -> torch.Tensor:
    """(rows, prompts) logit(target) - logit(foil) at each prompt's last token, under each row's ablation."""
    enc = encode(lm, list(prompts), padding_side="left")
    n = len(prompts)
    last = last_positions(enc["attention_mask"])
    out = []
    t = torch.tensor(list(targets))
    f = torch.tensor(list(foils))
    for i in range(0, len(rows), max(1, 256 // n)):
        chunk = rows[i:i + max(1, 256 // n)]
        b = {k: v.repeat(len(chunk), 1) for k, v in enc.items()}
        with ablate_rows(lm, chunk, repeat=n, means=means):
            logits = forward(lm, b).logits.float()
        rows_idx = torch.arange(len(chunk) * n)
        lg = logits[rows_idx, last.repeat(len(chunk))].view(len(chunk), n, -1)
        out.append(lg[:, torch.arange(n), t] - lg[:, torch.arange(n), f])
    return torch.cat(out)


@torch.no_grad()
def component_means(lm: LoadedModel, prompts: Sequence[str], names: Sequence[str]) -> Means:
    """Mean over every real token of ``prompts`` of each component's ablated quantity."""
    enc = encode(lm, list(prompts), padding_side="left")
    mask = enc["attention_mask"].bool()
    arch = decomp_arch(lm)
    head_dim = arch.parts(lm.model, 0).head_dim
    captured: dict[tuple[str, int], torch.Tensor] = {}
    handles: list[Any] = []
    plan = _plan(lm, [list(names)])

    def keep(key: tuple[str, int], pre: bool) -> Any:
        def hook(_m: nn.Module, args: Any, out: Any = None) -> None:
            captured[key] = (args[0] if pre else out).detach().float()
        return hook

    try:
        for kind, layer in plan:
            if kind == "head":
                handles.append(_out_proj(lm, layer).register_forward_pre_hook(keep((kind, layer), True)))
            elif kind == "mlp":
                handles.append(lm.spec.mlp_module(lm.model, layer).register_forward_hook(keep((kind, layer), False)))
            else:
                down = get_module(lm.spec.mlp_module(lm.model, layer), lm.spec.down)
                handles.append(down.register_forward_pre_hook(keep((kind, layer), True)))
        forward(lm, enc)
    finally:
        for handle in handles:
            handle.remove()
    means: Means = {}
    for (kind, layer), items in plan.items():
        flat = captured[(kind, layer)][mask]            # (tokens, width)
        for _, index, name in items:
            if kind == "head":
                means[name] = flat[:, index * head_dim:(index + 1) * head_dim].mean(0)
            elif kind == "mlp":
                means[name] = flat.mean(0)
            else:
                means[name] = flat[:, index].mean()
    return means
