"""Architecture specs: one small declarative record per model family.

A spec says where a family keeps its decoder layers, the MLP's projections and activation module,
the final norm and the unembedding; dimensions come from the Hugging Face config. Specs are looked
up by ``config.model_type``.

    >>> from neuronatlas.models.specs import spec_for, SPECS
    >>> spec_for("llama").gated
    True
    >>> sorted(SPECS)[:3]
    ['gemma', 'gemma2', 'gemma3']

Adding a family is adding one entry to :data:`SPECS` (see docs/architectures.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuronatlas.errors import SiteError, UnsupportedModelError
from neuronatlas.models.sites import Component

__all__ = ["ArchSpec", "SPECS", "spec_for", "get_module"]


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its neurons. All paths are dotted attribute paths.

    ``layers``: from the top model to the list of decoder layers. ``mlp``: from a layer to the
    module that holds the projections. ``down``/``up``/``gate``/``act``/``gate_up``/``fc_in``:
    from that module to the projections. ``conv1d``: GPT-2's ``Conv1D`` stores weights as
    (in, out) instead of ``nn.Linear``'s (out, in). ``norm_offset``: Gemma's RMSNorm multiplies by
    ``1 + weight``. ``width``: config attributes tried in order for the MLP width. ``attn``: from a
    layer to the attention module; ``attn_out``: from that module to its output projection (whose
    input is the concatenation of the heads' outputs).
    """

    family: str
    layers: str
    mlp: str
    down: str
    act: str
    final_norm: str
    unembed: str
    width: tuple[str, ...] = ("intermediate_size",)
    up: str | None = None
    gate: str | None = None
    gate_up: str | None = None
    fc_in: str | None = None
    conv1d: bool = False
    norm_offset: float = 0.0
    attn: str = "self_attn"
    attn_out: str = "o_proj"

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up is not None

    @property
    def components(self) -> tuple[Component, ...]:
        return (Component.MLP, Component.GATE) if self.gated else (Component.MLP,)

    def check_component(self, component: Component | str) -> Component:
        comp = Component.parse(component)
        if comp not in self.components:
            choices = ", ".join(c.value for c in self.components)
            raise SiteError(
                f"site {comp.value!r} is not available for {self.family} (non-gated MLP); "
                f"choose from: {choices}"
            )
        return comp

    # --- module access -------------------------------------------------------------------
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(get_module(model, self.layers))

    def layer_container(self, model: nn.Module) -> nn.ModuleList:
        """The ``nn.ModuleList`` holding the decoder layers (items can be swapped temporarily)."""
        return get_module(model, self.layers)  # type: ignore[no-any-return]

    def mlp_module(self, model: nn.Module, layer: int) -> nn.Module:
        return get_module(self.layer_modules(model)[layer], self.mlp)

    def attn_module(self, model: nn.Module, layer: int) -> nn.Module:
        return get_module(self.layer_modules(model)[layer], self.attn)

    def attn_output_projection(self, model: nn.Module, layer: int) -> nn.Module:
        return get_module(self.attn_module(model, layer), self.attn_out)

    def down_module(self, model: nn.Module, layer: int) -> nn.Module:
        return get_module(self.mlp_module(model, layer), self.down)

    def hook_module(self, model: nn.Module, layer: int, component: Component) -> nn.Module:
        """The module whose input (MLP site: down-projection) or output (GATE site: act) is hooked."""
        mlp = self.mlp_module(model, layer)
        return get_module(mlp, self.down if component is Component.MLP else self.act)

    def n_layers(self, config: Any) -> int:
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        raise UnsupportedModelError(f"cannot read the number of layers from the {self.family} config")

    def n_neurons(self, config: Any) -> int:
        for name in self.width:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        if self.family == "gpt2":  # n_inner=None means 4 * n_embd
            return 4 * int(config.n_embd)
        raise UnsupportedModelError(f"cannot read the MLP width from the {self.family} config")

    # --- weights, as (n_neurons, d_model) matrices -----------------------------------------
    def _linear_rows(self, module: nn.Module, out_side: bool) -> torch.Tensor:
        w: torch.Tensor = module.weight  # type: ignore[assignment]
        if self.conv1d:  # Conv1D weight is (in, out)
            return w.T if not out_side else w
        return w if not out_side else w.T

    def output_vectors(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Rows j = what neuron j writes to the residual stream (column j of the down-projection)."""
        mlp = self.mlp_module(model, layer)
        return self._linear_rows(get_module(mlp, self.down), out_side=True)

    def input_vectors(self, model: nn.Module, layer: int) -> dict[str, torch.Tensor]:
        """Rows j = what neuron j reads: ``up`` and ``gate`` for gated MLPs, ``in`` otherwise."""
        mlp = self.mlp_module(model, layer)
        if self.gate_up is not None:  # fused [gate; up] (phi3)
            fused = get_module(mlp, self.gate_up).weight
            gate, up = fused.chunk(2, dim=0)
            return {"up": up, "gate": gate}
        if self.gated:
            assert self.up is not None and self.gate is not None
            return {"up": get_module(mlp, self.up).weight, "gate": get_module(mlp, self.gate).weight}
        assert self.fc_in is not None
        return {"in": self._linear_rows(get_module(mlp, self.fc_in), out_side=False)}

    def unembedding(self, model: nn.Module) -> torch.Tensor:
        """(vocab, d_model) unembedding; HF's output embeddings first, the spec's path as a fallback."""
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
        weight: torch.Tensor = (out if out is not None else get_module(model, self.unembed)).weight  # type: ignore[assignment]
        return weight

    def final_norm_scale(self, model: nn.Module) -> torch.Tensor | None:
        try:
            norm = get_module(model, self.final_norm)
        except AttributeError:
            return None
        weight = getattr(norm, "weight", None)
        if weight is None:
            return None
        return weight + self.norm_offset


def get_module(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        if part:
            obj = getattr(obj, part)
    if obj is None:
        raise AttributeError(path)
    return obj


def _llama_like(family: str, **kw: Any) -> ArchSpec:
    base: dict[str, Any] = dict(
        family=family, layers="model.layers", mlp="mlp", down="down_proj", up="up_proj",
        gate="gate_proj", act="act_fn", final_norm="model.norm", unembed="lm_head",
    )
    base.update(kw)
    return ArchSpec(**base)


SPECS: dict[str, ArchSpec] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "gemma": _llama_like("gemma", norm_offset=1.0),
    "gemma2": _llama_like("gemma2", norm_offset=1.0),
    "gemma3_text": _llama_like("gemma3_text", norm_offset=1.0),
    "gemma3": _llama_like("gemma3", norm_offset=1.0),
    "phi3": _llama_like("phi3", up=None, gate=None, gate_up="gate_up_proj", act="activation_fn"),
    "gpt2": ArchSpec(
        family="gpt2", layers="transformer.h", mlp="mlp", down="c_proj", fc_in="c_fc", act="act",
        final_norm="transformer.ln_f", unembed="lm_head", width=("n_inner",), conv1d=True, attn="attn", attn_out="c_proj",
    ),
    "gpt_neox": ArchSpec(
        family="gpt_neox", layers="gpt_neox.layers", mlp="mlp", down="dense_4h_to_h",
        fc_in="dense_h_to_4h", act="act", final_norm="gpt_neox.final_layer_norm",
        unembed="embed_out", attn="attention", attn_out="dense",
    ),
    "opt": ArchSpec(
        family="opt", layers="model.decoder.layers", mlp="", down="fc2", fc_in="fc1",
        act="activation_fn", final_norm="model.decoder.final_layer_norm", unembed="lm_head",
        width=("ffn_dim",), attn_out="out_proj",
    ),
}


def spec_for(model_type: str) -> ArchSpec:
    try:
        return SPECS[model_type]
    except KeyError:
        families = ", ".join(sorted(SPECS))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {families}; "
            "add an ArchSpec for it to neuronatlas.models.specs.SPECS (see docs/architectures.md)"
        ) from None
