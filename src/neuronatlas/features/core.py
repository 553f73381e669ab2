"""SNMF features of every layer's MLP activations, fitted and read in two streaming passes.

Pass 1 feeds each forward batch's activations (real tokens only, special tokens skipped) of every
layer to that layer's :class:`~neuronatlas.stats.snmf.SNMF` (``partial_fit``): nothing but the
``k x neurons`` dictionary and its ``k x k`` / ``k x neurons`` statistics is kept. Pass 2 encodes
every token with the final dictionaries and keeps, per layer: reconstruction error (fraction of
variance unexplained, FVU), sparsity (mean number of active codes per token, L0), per-feature
activation frequency, mean and max code, and the top-k exemplars of every feature with their
windows (the corpus exemplar machinery of :mod:`neuronatlas.record.exemplar_stats`, fed codes
instead of neuron activations).

    >>> from neuronatlas.data.corpus import default_corpus
    >>> from neuronatlas.features import FeatureConfig, fit_features
    >>> run = fit_features(lm, default_corpus(n_docs=20, seed=0), FeatureConfig(k=4, top_k=3, max_length=32))
    >>> run.components.shape            # (layers, k, neurons)
    >>> run.layer_stats[0]["fvu"], run.layer_stats[0]["l0"]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from neuronatlas.errors import DatasetError
from neuronatlas.explain.exemplars import ExemplarConfig, doc_batches
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record.batching import forward_through, pad_ids
from neuronatlas.record.exemplar_stats import Reservoir, WindowTopK
from neuronatlas.record.hooks import site_hooks
from neuronatlas.stats.snmf import SNMF

__all__ = ["FeatureConfig", "FeatureRun", "fit_features", "encode_batches", "token_mask"]

ProgressFn = Callable[[str, int], None]


@dataclass(frozen=True)
class FeatureConfig:
    """``k`` features per layer; ``l1`` the sparsity weight (relative to the mean token norm);
    ``active``: a code counts as active (sparsity, frequency) above ``active x`` the mean token norm;
    ``top_k``/``n_random``/``context``/``after``: top and random exemplars per feature and their windows; the rest as in
    :class:`~neuronatlas.stats.snmf.SNMF` and :class:`~neuronatlas.explain.exemplars.ExemplarConfig`."""

    k: int = 64
    l1: float = 0.02
    component: Component = Component.MLP
    code_iters: int = 50
    dict_iters: int = 2
    batch_iters: int = 2
    forget: float = 0.98
    active: float = 0.01
    top_k: int = 20
    n_random: int = 5
    context: int = 32
    after: int | None = None
    batch_size: int = 8
    max_length: int = 128
    chunk_docs: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "component", Component.parse(self.component))
        for name in ("k", "top_k", "batch_size", "max_length", "chunk_docs"):
            if getattr(self, name) < 1:
                raise DatasetError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_random < 0 or self.context < 0 or (self.after is not None and self.after < 0) or not self.active >= 0:
            raise DatasetError("context, after and active must not be negative")
        self.snmf()   # checks the solver's parameters

    def snmf(self) -> SNMF:
        return SNMF(k=self.k, l1=self.l1, code_iters=self.code_iters, dict_iters=self.dict_iters,
                    batch_iters=self.batch_iters, forget=self.forget, seed=self.seed)

    def exemplar_config(self) -> ExemplarConfig:
        return ExemplarConfig(component=self.component, top_k=self.top_k, n_random=0, context=self.context,
                              after=self.after, batch_size=self.batch_size, max_length=self.max_length,
                              chunk_docs=self.chunk_docs, seed=self.seed)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["component"] = self.component.value
        out["after"] = self.exemplar_config().after_tokens
        return out


@dataclass
class FeatureRun:
    """The fitted features of every layer and what pass 2 measured.

    ``components``: (layers, k, neurons) float32, rows of norm <= 1; ``scale``: (layers,) the mean
    token norm each layer's L1 weight and activity threshold are relative to; ``layer_stats``: per
    layer ``fvu``, ``l0``, ``dead`` (features never active), ``tokens``; ``feature_stats``: per layer
    tensors ``freq``, ``mean``, ``max`` of shape (k,); ``top``/``random``: per layer the top
    exemplars and a seeded uniform sample of tokens (for scoring explanations).
    """

    components: torch.Tensor
    scale: torch.Tensor
    layer_stats: list[dict[str, float]]
    feature_stats: list[dict[str, torch.Tensor]]
    top: list[WindowTopK]
    random: list[WindowTopK]
    tokens: int
    docs: int
    seconds: dict[str, float] = field(default_factory=dict)
    models: list[SNMF] = field(default_factory=list)


def token_mask(lm: LoadedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, tokens) bool: real tokens that are not special tokens (BOS...)."""
    mask = batch["attention_mask"].bool()
    special = torch.tensor(sorted({int(i) for i in lm.tokenizer.all_special_ids}), dtype=torch.long)
    if len(special):
        mask &= ~torch.isin(batch["input_ids"], special)
    return mask


def _docs(corpus: Iterable[dict] | Callable[[], Iterable[dict]]) -> Iterable[dict]:
    return corpus() if callable(corpus) else corpus


def encode_batches(lm: LoadedModel, corpus: Iterable[dict] | Callable[[], Iterable[dict]], config: FeatureConfig,
                   observe: Callable[[int, torch.Tensor, torch.Tensor, dict[str, Any]], None],
                   progress: ProgressFn | None = None, phase: str = "pass", max_docs: int | None = None) -> tuple[int, int]:
    """Run the corpus through ``lm`` in length-sorted batches; ``observe(layer, h, mask, info)`` gets
    each layer's site activations (batch, tokens, neurons), the counted-token mask and the batch's
    ``indices``/``lengths``. Returns (documents, counted tokens)."""
    from itertools import islice

    docs = iter(_docs(corpus))
    if max_docs is not None:
        docs = islice(docs, max_docs)
    n_docs = n_tokens = 0
    for batch in doc_batches(lm, docs, config.exemplar_config()):
        n_docs = batch.docs_done if batch.chunk_end else n_docs
        if not batch.ids:
            continue
        padded = pad_ids(lm, batch.ids, "right")
        mask = token_mask(lm, padded).to(lm.device)
        info = {"indices": batch.indices, "lengths": padded["attention_mask"].sum(1).to(lm.device)}
        with site_hooks(lm, config.component, observe=lambda layer, h: observe(layer, h, mask, info),
                        batch_size=len(batch.ids)):
            forward_through(lm, padded)
        n_tokens += int(mask.sum())
        if progress:
            progress(phase, len(batch.indices))
    return n_docs, n_tokens


def fit_features(lm: LoadedModel, corpus: Iterable[dict] | Callable[[], Iterable[dict]],
                 config: FeatureConfig = FeatureConfig(), *, max_docs: int | None = None,
                 progress: ProgressFn | None = None) -> FeatureRun:
    """Fit ``config.k`` SNMF features per layer over ``corpus`` (pass 1), then encode it (pass 2).

    ``corpus``: ``{"text": ...}`` dicts, or a function returning a fresh iterable of them (read twice).
    ``progress(phase, docs)`` is called after every batch with the documents it held.
    """
    lm.spec.check_component(config.component)
    if not callable(corpus) and not isinstance(corpus, Sequence):
        raise DatasetError("the corpus is read twice: pass a list of documents or a function returning them")
    models = [config.snmf() for _ in range(lm.n_layers)]

    def fit(layer: int, h: torch.Tensor, mask: torch.Tensor, info: dict[str, Any]) -> None:
        acts = h[mask]
        if acts.shape[0]:
            models[layer].partial_fit(acts)

    t0 = time.perf_counter()
    _, tokens = encode_batches(lm, corpus, config, fit, progress, "fit", max_docs)
    if tokens == 0:
        raise DatasetError("the corpus has no tokens; give at least one non-empty document")
    t1 = time.perf_counter()
    run = _encode_pass(lm, corpus, config, models, progress, max_docs)
    run.seconds = {"fit": round(t1 - t0, 3), "encode": round(time.perf_counter() - t1, 3)}
    return run


@dataclass
class _LayerSums:
    err: float = 0.0
    sq: float = 0.0
    active: float = 0.0
    n: int = 0
    total: torch.Tensor | None = None          # (neurons,) sum of activations
    freq: torch.Tensor | None = None           # (k,) tokens with the code active
    code_sum: torch.Tensor | None = None       # (k,)
    code_max: torch.Tensor | None = None       # (k,)


def _encode_pass(lm: LoadedModel, corpus: Iterable[dict] | Callable[[], Iterable[dict]], config: FeatureConfig,
                 models: list[SNMF], progress: ProgressFn | None, max_docs: int | None) -> FeatureRun:
    after = config.exemplar_config().after_tokens
    top = [WindowTopK.empty(config.k, config.top_k, config.context, after, lm.device) for _ in models]
    sums = [_LayerSums() for _ in models]
    generator = torch.Generator(device=lm.device).manual_seed(config.seed)
    samples = [Reservoir(config.k, config.n_random, config.context, after, generator, lm.device)
               for _ in models] if config.n_random else []
    seen = [0] * len(models)

    def encode(layer: int, h: torch.Tensor, mask: torch.Tensor, info: dict[str, Any]) -> None:
        snmf, s = models[layer], sums[layer]
        b, t, n = h.shape
        codes = snmf.transform(h.reshape(-1, n).float()).view(b, t, -1)
        counted = mask.reshape(-1)
        doc = torch.as_tensor(info["indices"], dtype=torch.int32, device=h.device)
        top[layer].update(codes, counted, doc, info["lengths"])
        if samples:
            counted_index = counted.nonzero()[:, 0]
            samples[layer].update(seen[layer], codes, counted_index, doc, info["lengths"])
            seen[layer] += int(counted_index.numel())
        acts, z = h[mask].float(), codes[mask]
        resid = acts - snmf.reconstruct(z)
        on = z > config.active * snmf.scale_
        s.err += float((resid * resid).sum())
        s.sq += float((acts * acts).sum())
        s.active += float(on.sum())
        s.n += int(acts.shape[0])
        total, freq, zsum, zmax = acts.sum(0), on.sum(0).float(), z.sum(0), z.max(0).values
        if s.total is None:
            s.total, s.freq, s.code_sum, s.code_max = total, freq, zsum, zmax
        else:
            assert s.freq is not None and s.code_sum is not None and s.code_max is not None
            s.total, s.freq, s.code_sum = s.total + total, s.freq + freq, s.code_sum + zsum
            s.code_max = torch.maximum(s.code_max, zmax)

    n_docs, tokens = encode_batches(lm, corpus, config, encode, progress, "encode", max_docs)
    layer_stats, feature_stats = [], []
    for s in sums:
        assert s.total is not None and s.freq is not None and s.code_sum is not None and s.code_max is not None
        centred = s.sq - float((s.total * s.total).sum()) / max(s.n, 1)
        layer_stats.append({"fvu": s.err / max(centred, 1e-12), "relative_error": (s.err / max(s.sq, 1e-12)) ** 0.5,
                            "l0": s.active / max(s.n, 1), "dead": int((s.freq == 0).sum()), "tokens": s.n})
        feature_stats.append({"freq": (s.freq / max(s.n, 1)).cpu(), "mean": (s.code_sum / max(s.n, 1)).cpu(),
                              "max": s.code_max.cpu()})
    comps = torch.stack([m.components_ for m in models if m.components_ is not None]).float().cpu()
    scale = torch.tensor([m.scale_ for m in models], dtype=torch.float32)
    return FeatureRun(comps, scale, layer_stats, feature_stats, top, [r.sample for r in samples], tokens, n_docs,
                      models=models)
