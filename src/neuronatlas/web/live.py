"""The neuron page's "try your own text" box: a model behind ``neuronatlas serve ATLAS --model M``.

This is the only viewer module that imports torch, and only ``serve --model`` imports it; without
``--model`` the server stays model-free (readers only read). :class:`LiveModel` answers one text at a
time: the per-token activations of one neuron at the atlas's site, read with the recorder's own
tokenisation and hooks, and the forward pass stops at the neuron's layer.

    >>> from neuronatlas.web.data import Library
    >>> from neuronatlas.web.live import LiveModel
    >>> live = LiveModel(load_model("default"))                                   # doctest: +SKIP
    >>> live.check_atlas(Library(["out/relations/atlas"]).get("atlas"))          # doctest: +SKIP
    >>> live.activations("The capital of France is Paris", layer=12, neuron=345)  # doctest: +SKIP
    {'tokens': ['The', 'Ġcapital', ...], 'acts': [0.01, ...]}
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from neuronatlas.errors import AtlasError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record.batching import encode_ids, forward_through, pad_ids
from neuronatlas.record.hooks import site_hooks
from neuronatlas.web.data import MAX_LIVE_CHARS, MAX_LIVE_TOKENS, AtlasView, BadRequest

__all__ = ["LiveModel"]


class LiveModel:
    """Per-token activations of one neuron on a typed text (thread-safe: one forward pass at a time)."""

    def __init__(self, lm: LoadedModel, *, max_chars: int = MAX_LIVE_CHARS, max_tokens: int = MAX_LIVE_TOKENS) -> None:
        self.lm = lm
        self.max_chars = max_chars
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._sites: dict[str, Component] = {}

    def check_atlas(self, view: AtlasView) -> None:
        """Refuse an atlas recorded with another model (identity or shape); remember its site."""
        m = view.manifest()
        mine, theirs = self.lm.provenance.get("file_sha256"), (m.get("model") or {}).get("file_sha256")
        if mine and theirs and mine != theirs:
            raise AtlasError(f"atlas {view.slug!r} was recorded with model {(m.get('model') or {}).get('model')!r} "
                             f"(file {str(theirs)[:12]}), but --model {self.lm.name!r} is file {str(mine)[:12]}; "
                             "start the server with the atlas's model")
        dims = view.dims()
        if dims is not None and dims != (self.lm.n_layers, self.lm.n_neurons):
            raise AtlasError(f"atlas {view.slug!r} has {dims[0]} layers x {dims[1]} neurons but --model "
                             f"{self.lm.name!r} has {self.lm.n_layers} x {self.lm.n_neurons}; use the atlas's model")
        sites = {str(r.get("site")) for r in (m.get("records") or {}).values() if isinstance(r, dict) and r.get("site")}
        self._sites[view.slug] = Component.parse(sorted(sites)[0]) if len(sites) == 1 else Component.MLP

    def site(self, slug: str) -> str:
        return self._sites.get(slug, Component.MLP).value

    @torch.inference_mode()
    def activations(self, text: str, layer: int, neuron: int, slug: str = "") -> dict[str, Any]:
        """``{"tokens": [...], "acts": [...], "site": ..., "truncated": bool}`` of neuron ``layer:neuron``."""
        if not text.strip():
            raise BadRequest("the text is empty; type a sentence first")
        if len(text) > self.max_chars:
            raise BadRequest(f"the text is {len(text)} characters long; the limit is {self.max_chars}")
        if not (0 <= layer < self.lm.n_layers and 0 <= neuron < self.lm.n_neurons):
            raise BadRequest(f"neuron L{layer}:{neuron} is outside the model ({self.lm.n_layers} layers x "
                             f"{self.lm.n_neurons} neurons)")
        component = self._sites.get(slug, Component.MLP)
        full = encode_ids(self.lm, [text])[0]
        ids = full[: self.max_tokens]
        seen: dict[int, torch.Tensor] = {}
        with self._lock:
            batch = pad_ids(self.lm, [ids], "right")
            with site_hooks(self.lm, component, layers=[layer], batch_size=1,
                            observe=lambda _l, h: seen.__setitem__(_l, h[0, :, neuron].detach().float().cpu())):
                forward_through(self.lm, batch, layer=layer)
        return {"tokens": self.lm.tokenizer.convert_ids_to_tokens(ids), "acts": seen[layer].tolist(),
                "site": component.value, "truncated": len(full) > len(ids)}
