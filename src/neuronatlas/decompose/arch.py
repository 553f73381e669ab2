"""Where the decomposition finds each layer's pieces: data per family, read from the HF modules.

The MLP paths come from the family's :class:`~neuronatlas.models.specs.ArchSpec`; this table adds the
attention value/output projections and the norms around them. Weights are used in place (``nn.Linear``
stores (out, in); GPT-2's ``Conv1D`` (in, out) is read transposed, the fused ``c_attn``/``qkv_proj``
sliced), so nothing is converted.

    >>> from neuronatlas.decompose.arch import decomp_arch
    >>> decomp_arch(lm).parts(lm.model, 0).gated
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuronatlas.errors import UnsupportedModelError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.specs import get_module

__all__ = ["LayerParts", "DecompArch", "decomp_arch", "DECOMP_FAMILIES"]

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3")
DECOMP_FAMILIES = (*_LLAMA_LIKE, "gpt2")


@dataclass
class LayerParts:
    """One decoder layer's parameters as the decomposition uses them (weights (out, in))."""

    in_norm: nn.Module
    mlp_norm: nn.Module
    post_attn_norm: nn.Module | None
    post_mlp_norm: nn.Module | None
    v_weight: torch.Tensor
    v_bias: torch.Tensor | None
    o_weight: torch.Tensor
    o_bias: torch.Tensor | None
    n_heads: int
    n_kv: int
    head_dim: int
    up_weight: torch.Tensor
    up_bias: torch.Tensor | None
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    gate_weight: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    norm_offset: float = 0.0
    layernorm: bool = False

    @property
    def gated(self) -> bool:
        return self.gate_weight is not None


def _bias(module: Any) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.float()


@dataclass(frozen=True)
class DecompArch:
    """Family-level facts: the spec, the embedding and the final norm/soft-capping."""

    lm: LoadedModel

    @property
    def family(self) -> str:
        return self.lm.spec.family

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return self.lm.spec.layer_modules(model)

    def attention(self, layer: nn.Module) -> nn.Module:
        return get_module(layer, "attn" if self.family == "gpt2" else "self_attn")  # type: ignore[no-any-return]

    def n_heads(self, config: Any) -> int:
        return int(getattr(config, "num_attention_heads", None) or config.n_head)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.lm.spec.final_norm)  # type: ignore[no-any-return]

    @property
    def final_parts(self) -> LayerParts:
        return self.parts(self.lm.model, 0)

    @property
    def final_softcap(self) -> float | None:
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def token_embedding(self, model: Any, ids: torch.Tensor) -> torch.Tensor:
        emb = model.get_input_embeddings()(ids).float()
        if self.family in ("gemma", "gemma2"):  # these scale in the model's forward, not in the module
            emb = emb * torch.tensor(math.sqrt(self.lm.config.hidden_size), dtype=model.dtype).float()
        return emb  # type: ignore[no-any-return]

    def other_embedding(self, model: Any, ids: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            pos = torch.arange(ids.shape[-1], device=ids.device)[None]
            return model.transformer.wpe(pos).float()  # type: ignore[no-any-return]
        return torch.zeros_like(tok)

    def parts(self, model: nn.Module, index: int) -> LayerParts:
        layer = self.layers(model)[index]
        if self.family == "gpt2":
            return _gpt2_parts(layer, self.lm.config)
        return _llama_parts(self.lm, layer)


def _llama_parts(lm: LoadedModel, layer: Any) -> LayerParts:
    spec = lm.spec
    attn: Any = get_module(layer, "self_attn")
    cfg = lm.config
    n_heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(attn, "head_dim", None) or cfg.hidden_size // n_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    if hasattr(attn, "qkv_proj"):  # phi3: fused [q; k; v]
        w = attn.qkv_proj.weight.float()
        b = _bias(attn.qkv_proj)
        lo = n_heads * head_dim + n_kv * head_dim
        v_weight, v_bias = w[lo:], (None if b is None else b[lo:])
    else:
        v_weight, v_bias = attn.v_proj.weight.float(), _bias(attn.v_proj)
    mlp = get_module(layer, spec.mlp)
    if spec.gate_up is not None:
        fused = get_module(mlp, spec.gate_up)
        gate_w, up_w = fused.weight.float().chunk(2, dim=0)
        fb = _bias(fused)
        gate_b, up_b = (None, None) if fb is None else fb.chunk(2)
    else:
        assert spec.gate is not None and spec.up is not None
        g, u = get_module(mlp, spec.gate), get_module(mlp, spec.up)
        gate_w, gate_b, up_w, up_b = g.weight.float(), _bias(g), u.weight.float(), _bias(u)
    down = get_module(mlp, spec.down)
    sandwich = hasattr(layer, "pre_feedforward_layernorm")
    return LayerParts(
        in_norm=layer.input_layernorm,
        mlp_norm=layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm,
        post_attn_norm=layer.post_attention_layernorm if sandwich else None,
        post_mlp_norm=layer.post_feedforward_layernorm if sandwich else None,
        v_weight=v_weight, v_bias=v_bias, o_weight=attn.o_proj.weight.float(), o_bias=_bias(attn.o_proj),
        n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
        gate_weight=gate_w, gate_bias=gate_b, up_weight=up_w, up_bias=up_b,
        down_weight=down.weight.float(), down_bias=_bias(down), act=get_module(mlp, spec.act),
        norm_offset=spec.norm_offset,
    )


def _gpt2_parts(layer: Any, cfg: Any) -> LayerParts:
    d = int(cfg.n_embd)
    n_heads = int(cfg.n_head)
    attn, mlp = layer.attn, layer.mlp
    c_attn_w = attn.c_attn.weight.float()  # Conv1D: (in, 3d)
    c_attn_b = attn.c_attn.bias.float()
    return LayerParts(
        in_norm=layer.ln_1, mlp_norm=layer.ln_2, post_attn_norm=None, post_mlp_norm=None,
        v_weight=c_attn_w[:, 2 * d:].T, v_bias=c_attn_b[2 * d:],
        o_weight=attn.c_proj.weight.float().T, o_bias=_bias(attn.c_proj),
        n_heads=n_heads, n_kv=n_heads, head_dim=d // n_heads,
        up_weight=mlp.c_fc.weight.float().T, up_bias=_bias(mlp.c_fc),
        down_weight=mlp.c_proj.weight.float().T, down_bias=_bias(mlp.c_proj), act=mlp.act,
        layernorm=True,
    )


def decomp_arch(lm: LoadedModel) -> DecompArch:
    if lm.spec.family not in DECOMP_FAMILIES:
        raise UnsupportedModelError(
            f"contextual decomposition does not support the {lm.spec.family} family yet; "
            f"supported: {', '.join(DECOMP_FAMILIES)}")
    return DecompArch(lm)
