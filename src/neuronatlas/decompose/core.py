"""Contextual decomposition for transformers (CD-T): every activation split into ``rel + irrel``.

A :class:`Source` names what is "relevant": input tokens (their embeddings), MLP neurons, attention
heads (optionally at chosen positions only). :func:`propagate` re-runs each decoder layer of the stock
Hugging Face modules on the two parts, with the rules of docs/decompose.md, so that at every layer
``rel + irrel`` equals the ordinary forward and ``rel`` is what flows from the source.

    >>> from neuronatlas.decompose import Source, trace_prompt, propagate, LogitTarget
    >>> tr = trace_prompt(lm, "The capital of France is")
    >>> target = LogitTarget(lm.tokenizer.encode(" Paris")[0])
    >>> out = propagate(lm, tr, [Source(tokens=(0,)), Source()], target=target)
    >>> out.rel.shape                          # (sources, ) target values carried by rel
    torch.Size([2])
    >>> float(out.rel[1])                      # the empty source carries nothing
    0.0

Several sources run as one batch (each its own rel/irrel pair). Parameters are read from the HF
modules in place; attention probabilities come from the clean forward (the total) and stay fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from neuronatlas.decompose.arch import LayerParts, decomp_arch
from neuronatlas.errors import SelectionError
from neuronatlas.models.loading import LoadedModel

__all__ = ["Source", "Trace", "Propagation", "LogitTarget", "NeuronTarget", "Target", "trace_prompt",
           "trace_ids", "propagate", "split_linear", "split_act", "split_product"]


@dataclass(frozen=True)
class Source:
    """What is relevant: input ``tokens`` (positions), MLP ``neurons`` and attention ``heads``
    as (layer, index) pairs, whole MLP blocks (``mlps``: layers); ``positions`` limits neurons,
    heads and blocks to those positions (None: all)."""

    tokens: tuple[int, ...] = ()
    neurons: tuple[tuple[int, int], ...] = ()
    heads: tuple[tuple[int, int], ...] = ()
    mlps: tuple[int, ...] = ()
    positions: tuple[int, ...] | None = None

    @property
    def empty(self) -> bool:
        return not (self.tokens or self.neurons or self.heads or self.mlps)

    def first_layer(self, n_layers: int) -> int:
        if self.tokens:
            return 0
        layers = [layer for layer, _ in (*self.neurons, *self.heads)] + list(self.mlps)
        return min(layers) if layers else n_layers

    @cached_property
    def by_layer(self) -> dict[str, dict[int, list[int]]]:
        """kind ("neurons", "heads") -> layer -> indices (-1: every neuron of a whole block)."""
        out: dict[str, dict[int, list[int]]] = {"neurons": {}, "heads": {}}
        for kind, pairs in (("neurons", self.neurons), ("heads", self.heads)):
            for layer, index in pairs:
                out[kind].setdefault(layer, []).append(index)
        for layer in self.mlps:
            out["neurons"][layer] = [-1]
        return out

    def validate(self, n_tokens: int, n_layers: int, n_neurons: int, n_heads: int) -> "Source":
        for t in (*self.tokens, *(self.positions or ())):
            if not -n_tokens <= t < n_tokens:
                raise SelectionError(f"token position {t} is outside the prompt's {n_tokens} tokens; "
                                     f"use 0-{n_tokens - 1}")
        for layer in self.mlps:
            if not 0 <= layer < n_layers:
                raise SelectionError(f"MLP block L{layer}.mlp is outside the model (layers 0-{n_layers - 1})")
        for what, pairs, width in (("neuron", self.neurons, n_neurons), ("head", self.heads, n_heads)):
            for layer, index in pairs:
                if not (0 <= layer < n_layers and 0 <= index < width):
                    raise SelectionError(f"{what} L{layer}:{index} is outside the model (layers 0-{n_layers - 1}, "
                                         f"{what}s 0-{width - 1} per layer)")
        return self


@dataclass(frozen=True)
class LogitTarget:
    """The logit of ``token`` (minus the logit of ``foil`` when given) at ``position``."""

    token: int
    foil: int | None = None
    position: int = -1


@dataclass(frozen=True)
class NeuronTarget:
    """MLP neuron ``index`` of ``layer`` (the down-projection's input) at ``position``."""

    layer: int
    index: int
    position: int = -1


Target = LogitTarget | NeuronTarget


@dataclass
class Trace:
    """The clean forward of one prompt: ids, residual stream entering each layer, attention
    probabilities (1, heads, T, T) of each layer, and the logits (T, vocab)."""

    input_ids: torch.Tensor
    resid: list[torch.Tensor]
    probs: list[torch.Tensor]
    logits: torch.Tensor
    layer_out: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[-1])


@dataclass
class Propagation:
    """What :func:`propagate` returns: the target's rel/irrel per source (shape (sources,)), and on
    request the residual stream after each layer (``layers[l]``: (2, sources, T, d)) and the logits
    ((2, sources, T, vocab)); index 0 is rel, 1 is irrel."""

    rel: torch.Tensor
    irrel: torch.Tensor
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None


# --- the rules ---------------------------------------------------------------------------------
def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fast: bool = False) -> torch.Tensor:
    """Linear map of the parts ``x`` (2, B, ...); the bias goes to rel and irrel in proportion to
    ``|W rel|`` and ``|W irrel|`` (all of it to irrel where both are 0).

    ``fast``: the last batch row is the total (rel = total, irrel = 0), so ``W irrel`` is read as
    ``W total - W rel`` and only the rel parts are multiplied (half the matrix work)."""
    if fast:
        rel = x[0] @ weight.T
        y = torch.stack((rel, rel[-1:] - rel))
    else:
        y = x @ weight.T
    if bias is not None:
        a = y.abs()
        den = a[0] + a[1]
        share = torch.where(den > 0, a[0] / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
        y = torch.stack((y[0] + bias * share, y[1] + bias * (1 - share)))
    return y


def split_act(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Elementwise nonlinearity: ``irrel' = f(irrel)``, ``rel' = f(rel + irrel) - f(irrel)``."""
    irrel = fn(x[1])
    return torch.stack((fn(x[0] + x[1]) - irrel, irrel))


def split_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Product of two decomposed factors: ``irrel' = a_irrel * b_irrel``; every term that touches a
    rel part goes to rel: ``rel' = a_rel b_rel + a_rel b_irrel + a_irrel b_rel``."""
    irrel = a[1] * b[1]
    return torch.stack((a[0] * b[0] + a[0] * b[1] + a[1] * b[0], irrel))


def _split_rms(x: torch.Tensor, norm: Any, offset: float) -> torch.Tensor:
    """RMSNorm with the total's scale: each part times ``rsqrt(mean(total^2) + eps) * (w + offset)``."""
    total = x[0] + x[1]
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    scale = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)
    weight: torch.Tensor = norm.weight  # type: ignore[assignment]
    return x * scale * (weight.float() + offset)


def _split_layernorm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """LayerNorm with the total's standard deviation: each part centred by its own mean, divided by
    the total's std, times the weight; the bias split in proportion to the parts' magnitudes."""
    total = x[0] + x[1]
    eps = float(getattr(norm, "eps", 1e-5))
    std = torch.sqrt(total.var(-1, keepdim=True, unbiased=False) + eps)
    centred = (x - x.mean(-1, keepdim=True)) / std * norm.weight
    bias = norm.bias
    if bias is None:
        return centred
    a = centred.abs()
    den = a[0] + a[1]
    share = torch.where(den > 0, a[0] / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return torch.stack((centred[0] + bias * share, centred[1] + bias * (1 - share)))


def _norm(x: torch.Tensor, norm: nn.Module, parts: LayerParts) -> torch.Tensor:
    if parts.layernorm:
        return _split_layernorm(x, norm)
    return _split_rms(x, norm, parts.norm_offset)


def _move(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Move the masked coordinates of irrel into rel (a source inside the network)."""
    return torch.stack((x[0] + x[1] * mask, x[1] * (1 - mask)))


# --- the clean forward -------------------------------------------------------------------------
@contextmanager
def _eager(lm: LoadedModel) -> Iterator[None]:
    """Eager attention for the clean pass (so that the probabilities are returned), then restore."""
    config = lm.model.config
    before = getattr(config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    lm.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.model.set_attn_implementation(before)


def trace_prompt(lm: LoadedModel, prompt: str) -> Trace:
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    return trace_ids(lm, ids[0])


@torch.no_grad()
def trace_ids(lm: LoadedModel, input_ids: torch.Tensor) -> Trace:
    """Run the stock forward once on one prompt and keep what the decomposition needs."""
    arch = decomp_arch(lm)
    layers = lm.spec.layer_modules(lm.model)
    resid: list[torch.Tensor] = [torch.empty(0)] * len(layers)
    outs: list[torch.Tensor] = [torch.empty(0)] * len(layers)
    probs: list[torch.Tensor] = [torch.empty(0)] * len(layers)
    handles = []

    def pre(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hs = args[0] if args else kwargs["hidden_states"]
            resid[i] = hs.detach().float()
        return hook

    def post(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            outs[i] = (out[0] if isinstance(out, tuple) else out).detach().float()
        return hook

    def attn(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            probs[i] = out[1].detach().float()
        return hook

    ids = input_ids.reshape(1, -1).to(lm.device)
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post(i)))
            handles.append(arch.attention(layer).register_forward_hook(attn(i)))
        with _eager(lm):
            logits = lm.model(input_ids=ids).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    return Trace(input_ids=ids[0].cpu(), resid=resid, probs=probs, logits=logits, layer_out=outs)


# --- the decomposed forward --------------------------------------------------------------------
def _masks(sources: Sequence[Source], kind: str, layer: int, width: int, T: int,
           device: torch.device) -> torch.Tensor | None:
    """(sources, T, width) 0/1 mask of the neurons or heads of ``layer`` that are sources."""
    mask: torch.Tensor | None = None
    for b, src in enumerate(sources):
        idx = src.by_layer[kind].get(layer)
        if not idx:
            continue
        if mask is None:
            mask = torch.zeros(len(sources), T, width, device=device)
        pos = torch.arange(T) if src.positions is None else torch.tensor([p % T for p in src.positions])
        if idx == [-1]:
            mask[b, pos] = 1.0
        else:
            mask[b, pos[:, None], torch.tensor(idx)[None, :]] = 1.0
    return mask


def _attention(x: torch.Tensor, parts: LayerParts, probs: torch.Tensor, head_mask: torch.Tensor | None,
               fast: bool) -> torch.Tensor:
    """x: (2, B, T, d) normed input; values decomposed, probabilities (1, H, T, T) held fixed."""
    _, B, T, _ = x.shape
    v = split_linear(x, parts.v_weight, parts.v_bias, fast)          # (2, B, T, kv*hd)
    v = v.view(2, B, T, parts.n_kv, parts.head_dim).transpose(2, 3)  # (2, B, kv, T, hd)
    v = v.repeat_interleave(parts.n_heads // parts.n_kv, dim=2)      # (2, B, H, T, hd)
    z = probs.to(v.dtype) @ v                                        # (2, B, H, T, hd)
    z = z.transpose(2, 3)                                            # (2, B, T, H, hd)
    if head_mask is not None:
        z = _move(z, head_mask[..., None])
    return split_linear(z.reshape(2, B, T, -1), parts.o_weight, parts.o_bias, fast)


def _mlp(x: torch.Tensor, parts: LayerParts, neuron_mask: torch.Tensor | None, fast: bool,
         stop_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the MLP output and its hidden activation h (2, B, T, n_neurons)."""
    if parts.gate_weight is not None:
        gate = split_linear(x, parts.gate_weight, parts.gate_bias, fast)
        up = split_linear(x, parts.up_weight, parts.up_bias, fast)
        h = split_product(split_act(gate, parts.act), up)
    else:
        h = split_act(split_linear(x, parts.up_weight, parts.up_bias, fast), parts.act)
    if neuron_mask is not None:
        h = _move(h, neuron_mask)
    if stop_index is not None:
        return h, h
    return split_linear(h, parts.down_weight, parts.down_bias, fast), h


def _initial(lm: LoadedModel, trace: Trace, sources: Sequence[Source], start: int, fast: bool) -> torch.Tensor:
    """The parts entering layer ``start``; with ``fast`` one more row, the total (rel = total, irrel = 0)."""
    x = _initial_parts(lm, trace, sources, start)
    if not fast:
        return x
    total = x[0, :1] + x[1, :1]
    return torch.cat((x, torch.stack((total, torch.zeros_like(total)))), dim=1)


def _initial_parts(lm: LoadedModel, trace: Trace, sources: Sequence[Source], start: int) -> torch.Tensor:
    arch = decomp_arch(lm)
    B = len(sources)
    if start > 0:
        total = trace.resid[start].to(lm.device)               # (1, T, d)
        return torch.stack((torch.zeros_like(total).expand(B, -1, -1), total.expand(B, -1, -1)))
    ids = trace.input_ids.to(lm.device)[None]
    tok = arch.token_embedding(lm.model, ids).float()           # (1, T, d)
    other = arch.other_embedding(lm.model, ids, tok)            # position embeddings (GPT-2) or zeros
    mask = torch.zeros(B, trace.n_tokens, 1, device=tok.device)
    for b, src in enumerate(sources):
        for t in src.tokens:
            mask[b, t % trace.n_tokens] = 1.0
    return torch.stack((tok * mask, tok * (1 - mask) + other))


def _readout(x: torch.Tensor, lm: LoadedModel, target: LogitTarget, full: bool,
             fast: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    arch = decomp_arch(lm)
    normed = _norm(x, arch.final_norm(lm.model), arch.final_parts)
    unembed = lm.spec.unembedding(lm.model).float()
    cap = arch.final_softcap
    tokens = [target.token] + ([target.foil] if target.foil is not None else [])
    w = unembed[tokens]
    logits = split_linear(normed[:, :, target.position], w, None, fast)  # (2, B, k)
    if cap:
        logits = split_act(logits, lambda t: torch.tanh(t / cap) * cap)
    value = logits[..., 0] - (logits[..., 1] if target.foil is not None else 0.0)
    full_logits = None
    if full:
        full_logits = split_linear(normed, unembed, None, fast)
        if cap:
            full_logits = split_act(full_logits, lambda t: torch.tanh(t / cap) * cap)
    return value, full_logits


@torch.no_grad()
def propagate(lm: LoadedModel, trace: Trace, sources: Sequence[Source], *, target: Target | None = None,
              keep_layers: bool = False, full_logits: bool = False, fast: bool = False) -> Propagation:
    """Decompose the forward of ``trace``'s prompt for each of ``sources`` (one batch row each).

    With a :class:`LogitTarget`, ``rel``/``irrel`` hold the target logit (difference) per source;
    with a :class:`NeuronTarget`, the neuron's activation. Sources that start at layer ``l`` are
    exact from there on: before ``l`` everything is irrel, so the run starts from the cached total.
    ``fast`` carries the total as an extra row and reads each linear map's irrel output as
    ``W total - W rel`` (half the matrix work; equal to the two-part run up to float rounding).
    """
    out = _propagate(lm, trace, sources, target, keep_layers, full_logits, fast)
    if fast:  # drop the total's row
        out.rel, out.irrel = out.rel[:-1], out.irrel[:-1]
        out.layers = {k: v[:, :-1] for k, v in out.layers.items()}
        out.logits = None if out.logits is None else out.logits[:, :-1]
    return out


def _propagate(lm: LoadedModel, trace: Trace, sources: Sequence[Source], target: Target | None,
               keep_layers: bool, full_logits: bool, fast: bool) -> Propagation:
    arch = decomp_arch(lm)
    n_layers = len(arch.layers(lm.model))
    T = trace.n_tokens
    for src in sources:
        src.validate(T, n_layers, lm.n_neurons, arch.n_heads(lm.config))
    start = min((s.first_layer(n_layers) for s in sources), default=n_layers)
    stop = n_layers
    if isinstance(target, NeuronTarget):
        stop = target.layer + 1
        start = min(start, target.layer)
    x = _initial(lm, trace, sources, start, fast)
    if fast:
        sources = [*sources, Source()]
    out = Propagation(rel=torch.zeros(0), irrel=torch.zeros(0))
    B = len(sources)
    for layer in range(start, stop):
        parts = arch.parts(lm.model, layer)
        heads = _masks(sources, "heads", layer, parts.n_heads, T, x.device)
        neurons = _masks(sources, "neurons", layer, lm.n_neurons, T, x.device)
        attn = _attention(_norm(x, parts.in_norm, parts), parts, trace.probs[layer].to(x.device), heads, fast)
        if parts.post_attn_norm is not None:
            attn = _norm(attn, parts.post_attn_norm, parts)
        x = x + attn
        mlp_in = _norm(x, parts.mlp_norm, parts)
        last = isinstance(target, NeuronTarget) and layer == target.layer
        mlp, h = _mlp(mlp_in, parts, neurons, fast, stop_index=target.index if last and isinstance(target, NeuronTarget) else None)
        if last and isinstance(target, NeuronTarget):
            value = h[:, :, target.position, target.index]
            out.rel, out.irrel = value[0], value[1]
            return out
        if parts.post_mlp_norm is not None:
            mlp = _norm(mlp, parts.post_mlp_norm, parts)
        x = x + mlp
        if keep_layers:
            out.layers[layer] = x.clone()
    if isinstance(target, LogitTarget) or full_logits:
        value, logits = _readout(x, lm, target if isinstance(target, LogitTarget) else LogitTarget(0), full_logits, fast)
        if isinstance(target, LogitTarget):
            out.rel, out.irrel = value[0], value[1]
        out.logits = logits
    if out.rel.numel() == 0:
        out.rel = torch.zeros(B)
        out.irrel = torch.zeros(B)
    return out
