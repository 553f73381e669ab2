"""Gradient attribution of every MLP neuron to a target's probability, one backward pass per batch.

For prompt i with gold continuation y (teacher-forced), activation ``a[l, t, j]`` of neuron j of
layer l at position t, and ``f = p(y | prompt)``:

- ``objective="prob"`` (CULNIG, arXiv 2510.08284): score = max_t (a * df/da) * p;
- ``objective="logprob"`` (attribution patching): score = max_t (a * d log p / da).

``a * df/da`` is the first-order change in f when the activation is scaled by (1 + eps), per eps:
the finite-difference effect of nudging the neuron (tested in ``tests/test_attribution.py``). The
product comes from one forward and one backward pass per batch for all neurons of all layers: the
site hooks hand each layer's activation to autograd (:func:`torch.autograd.grad` on the captured
tensors, so no parameter gradient is computed), never one pass per neuron.

    >>> from neuronatlas.stats.attribution import attribute, AttributionScorer
    >>> res = attribute(lm, ["The capital of France is"], [" Paris"], objective="prob")
    >>> res.scores.shape                          # (prompts, layers, neurons)
    (1, 2, 32)
    >>> sc = AttributionScorer(lm).fit_prompts(["The capital of France is", "Iron has the symbol"],
    ...                                        [" Paris", " Fe"], [0, 1])
    >>> sc.scores_.shape, len(sc.select(0, 3))    # concept 0 against the others (or a control set)
    ((2, 64), 3)

Positions: every real token up to the one that predicts the last target token (later positions
cannot change f); padding never counts. ``reduce="sum"`` sums over positions instead of taking the
maximum (the linear estimate of ablating the neuron everywhere is minus that sum).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from neuronatlas.errors import DatasetError
from neuronatlas.models.loading import LoadedModel
from neuronatlas.models.sites import Component
from neuronatlas.record.batching import batches, encode_ids, pad_ids
from neuronatlas.record.hooks import site_hooks
from neuronatlas.stats.scorers import ConceptScorer

__all__ = ["Objective", "Reduce", "AttributionResult", "attribute", "attribution_batch", "AttributionScorer"]

Objective = Literal["prob", "logprob"]
Reduce = Literal["max", "sum"]


@dataclass
class AttributionResult:
    """Attribution scores of every neuron for every prompt."""

    scores: np.ndarray          # (prompts, layers, neurons) float32, reduced over positions
    prob: np.ndarray            # (prompts,) p(target | prompt) of the unmodified model
    magnitude: np.ndarray       # (layers, neurons) mean |activation| over every scored token
    objective: str
    reduce: str


@dataclass
class BatchAttribution:
    """One batch: per-position products and the objective."""

    product: torch.Tensor       # (layers, rows, tokens, neurons) a * d log p / da
    activation: torch.Tensor    # (layers, rows, tokens, neurons)
    logprob: torch.Tensor       # (rows,) log p(target | prompt)
    valid: torch.Tensor         # (rows, tokens) bool: positions that can change the objective


def _objective_batch(lm: LoadedModel, p_ids: Sequence[Sequence[int]], t_ids: Sequence[Sequence[int]]
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Left-padded prompt + target ids; (batch, target ids (B, K), target mask (B, K), valid positions, keep)."""
    batch = pad_ids(lm, [list(p) + list(t) for p, t in zip(p_ids, t_ids)], "left")
    width = batch["input_ids"].shape[1]
    t_lens = [len(t) for t in t_ids]
    k = max(t_lens)
    tgt = torch.tensor([list(t) + [0] * (k - len(t)) for t in t_ids], dtype=torch.long)
    tmask = torch.tensor([[j < n for j in range(k)] for n in t_lens], dtype=torch.bool)
    # the target ends every row (left padding): the last token predicts nothing, the rest may matter
    valid = batch["attention_mask"].bool().clone()
    valid[:, width - 1] = False
    return batch, tgt, tmask, valid, k + 1


def attribution_batch(lm: LoadedModel, prompts_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
                      *, component: Component | str = Component.MLP) -> BatchAttribution:
    """``a * d log p(target) / da`` at every position of every neuron of every layer, for one batch,
    from one forward and one backward pass."""
    if any(len(t) == 0 for t in target_ids):
        raise DatasetError("a target has no tokens; give every prompt a non-empty target such as ' Paris'")
    batch, tgt, tmask, valid, keep = _objective_batch(lm, prompts_ids, target_ids)
    rows = len(prompts_ids)
    acts: dict[int, torch.Tensor] = {}

    def edit(layer: int, h: torch.Tensor) -> torch.Tensor:
        # a leaf where nothing upstream needs grad (frozen weights); else a copy that stays in the graph
        x = h.detach().requires_grad_(True) if not h.requires_grad else h.clone()
        acts[layer] = x
        return x

    device = lm.device
    with torch.enable_grad(), site_hooks(lm, component, edit=edit, batch_size=rows):
        out = lm.model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False, logits_to_keep=keep)
        logits = out.logits if out.logits.dtype == torch.float64 else out.logits.float()
        logp = logits.log_softmax(-1)[:, :-1]                  # (B, K, V): position k predicts target k
        k = tgt.shape[1]
        # left padding: the target occupies the last len(t) slots; align each row's targets to the window's end
        shift = torch.tensor([k - int(m.sum()) for m in tmask], device=device)
        idx = (torch.arange(k, device=device)[None, :] + shift[:, None]).clamp(max=k - 1)
        tok = tgt.to(device)
        lp = logp.gather(1, idx[:, :, None].expand(-1, -1, logp.shape[-1])).gather(-1, tok[:, :, None]).squeeze(-1)
        total = torch.where(tmask.to(device), lp, torch.zeros_like(lp)).sum(-1)  # (B,)
        layers = sorted(acts)
        grads = torch.autograd.grad(total.sum(), [acts[layer] for layer in layers], allow_unused=True)
    act = torch.stack([acts[layer].detach() for layer in layers])
    grad = torch.stack([g if g is not None else torch.zeros_like(acts[layer]) for layer, g in zip(layers, grads)])
    return BatchAttribution(act * grad, act, total.detach(), valid.to(device))


def attribute(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str], *, objective: Objective = "prob",
              reduce: Reduce = "max", component: Component | str = Component.MLP, batch_size: int = 8,
              progress: Callable[[int, int], None] | None = None) -> AttributionResult:
    """Attribution of every neuron for every (prompt, target); see the module docstring."""
    if objective not in ("prob", "logprob") or reduce not in ("max", "sum"):
        raise DatasetError(f"objective {objective!r} / reduce {reduce!r}: choose objective prob or logprob, "
                           "reduce max or sum")
    if len(prompts) != len(targets):
        raise DatasetError(f"got {len(prompts)} prompts but {len(targets)} targets; give one target per prompt")
    if not prompts:
        raise DatasetError("no prompts to attribute; give at least one prompt with a target")
    comp = lm.spec.check_component(component)
    p_ids = encode_ids(lm, prompts)
    t_ids = encode_ids(lm, targets, add_special_tokens=False)
    scores = np.zeros((len(prompts), lm.n_layers, lm.n_neurons), dtype=np.float32)
    prob = np.zeros(len(prompts), dtype=np.float64)
    mag_sum = torch.zeros(lm.n_layers, lm.n_neurons, dtype=torch.float64)
    n_tok = 0
    order = sorted(range(len(prompts)), key=lambda i: (len(p_ids[i]) + len(t_ids[i]), i))   # less padding
    done = 0
    for chunk in batches(len(order), batch_size):
        rows = [order[r] for r in chunk]
        b = attribution_batch(lm, [p_ids[i] for i in rows], [t_ids[i] for i in rows], component=comp)
        valid = b.valid[None, :, :, None]
        if reduce == "max":
            red = torch.where(valid, b.product, torch.full_like(b.product, -torch.inf)).amax(dim=2)
        else:
            red = torch.where(valid, b.product, torch.zeros_like(b.product)).sum(dim=2)
        p = b.logprob.double().exp()
        if objective == "prob":       # a * dp/da = p * (a * dlogp/da); the recipe multiplies by p once more
            red = red * (p * p).to(red.dtype)[None, :, None]
        scores[rows] = red.permute(1, 0, 2).float().cpu().numpy()
        prob[rows] = p.cpu().numpy()
        mag_sum += torch.where(valid, b.activation.abs(), torch.zeros_like(b.activation)).sum(dim=(1, 2)).double().cpu()
        n_tok += int(b.valid.sum())
        done += len(rows)
        if progress is not None:
            progress(done, len(prompts))
    return AttributionResult(scores, prob, (mag_sum / max(n_tok, 1)).float().numpy(), objective, reduce)


class AttributionScorer(ConceptScorer):
    """Concept scores from attributions: per concept, the mean attribution over its prompts minus the
    mean over a control set (``control``) or, without one, over the other concepts' prompts.

    ``fit(attributions, labels, control=None)`` takes precomputed (prompts, layers, neurons) scores
    (from :func:`attribute`); ``fit_prompts`` computes them with the model given at construction.
    Higher = the neuron raises the gold answer's probability more on the concept than on the control.
    """

    needs_model = True

    def __init__(self, lm: LoadedModel | None = None, objective: Objective = "prob", reduce: Reduce = "max",
                 component: str = "mlp", batch_size: int = 8) -> None:
        self.lm, self.objective, self.reduce, self.batch_size = lm, objective, reduce, batch_size
        self.component = component

    def fit(self, attributions: np.ndarray, labels: Sequence[int] | np.ndarray,
            control: np.ndarray | None = None) -> "AttributionScorer":
        x = np.asarray(attributions, dtype=np.float64)
        if x.ndim == 2:
            x = x[:, None, :]
        if x.ndim != 3:
            raise DatasetError(f"attributions must be (prompts, layers, neurons), got shape {x.shape}")
        lab = np.asarray(labels, dtype=np.int64)
        if lab.shape[0] != x.shape[0] or lab.size == 0:
            raise DatasetError(f"{x.shape[0]} attribution rows but {lab.size} labels; give one label per prompt")
        k = int(lab.max()) + 1
        flat = x.reshape(x.shape[0], -1)
        ctrl = None if control is None else np.asarray(control, dtype=np.float64).reshape(len(control), -1)
        scores = []
        for c in range(k):
            pos = flat[lab == c]
            if not len(pos):
                raise DatasetError(f"concept {c} has no prompts; every label index up to {k - 1} needs prompts")
            ref = ctrl if ctrl is not None else flat[lab != c]
            if ref is None or not len(ref):
                raise DatasetError("no control prompts and a single concept; give a control set to subtract")
            scores.append(pos.mean(0) - ref.mean(0))
        self.scores_ = np.stack(scores)
        self.layout_ = (x.shape[1], x.shape[2])
        self.concepts_ = [str(c) for c in range(k)]
        return self

    def attribute(self, prompts: Sequence[str], targets: Sequence[str],
                  progress: Callable[[int, int], None] | None = None) -> AttributionResult:
        if self.lm is None:
            raise DatasetError("the attribution scorer needs the model: AttributionScorer(lm) or scorer('attribution', lm=lm)")
        return attribute(self.lm, prompts, targets, objective=self.objective, reduce=self.reduce,
                         component=self.component, batch_size=self.batch_size, progress=progress)

    def fit_prompts(self, prompts: Sequence[str], targets: Sequence[str], labels: Sequence[int] | np.ndarray,
                    control: tuple[Sequence[str], Sequence[str]] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> "AttributionScorer":
        """Attribute (prompts, targets) and, when given, the control (prompts, targets); then :meth:`fit`."""
        res = self.attribute(prompts, targets, progress)
        ctrl = self.attribute(*control).scores if control is not None else None
        self.result_ = res
        return self.fit(res.scores, labels, ctrl)

    def fit_record(self, rec: Any, concepts: Sequence[str] | None = None,
                   groups: Sequence[Any] | None = None) -> "ConceptScorer":
        raise DatasetError("the attribution scorer needs prompts and their gold targets, not a record; "
                           "use AttributionScorer(lm).fit_prompts(prompts, targets, labels)")

    def _negative_scores(self, k: int) -> torch.Tensor:
        return torch.as_tensor(-np.asarray(self.scores_[k], dtype=np.float64))
