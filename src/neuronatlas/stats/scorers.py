"""Neuron scorers for concept selection, scikit-learn style (``fit`` returns ``self``; fitted
attributes end in ``_``). All are vectorised over every neuron at once.

    >>> from neuronatlas.stats.scorers import APScorer, SMDScorer
    >>> ap = APScorer().fit(responses, labels)        # responses: (prompts, layers, neurons); labels: (prompts,)
    >>> ap.scores_.shape                             # (concepts, layers * neurons) average precision
    >>> ap.select(concept=0, n=500, tails="top")     # a NeuronSet, best first in ap.top_indices(0, 500)
    >>> smd = SMDScorer(alpha=0.05).fit(responses, labels)
    >>> smd.d_, smd.p_, smd.significant_             # Cohen's d, Welch p-values, BH-FDR mask
    >>> SCORERS["lape"]().fit_record(rec, concepts=["en", "fr"]).select("fr", 10)   # rec: a gate-site record

``responses`` are pooled per-prompt responses (a record's ``pooled`` array, (prompts, layers,
neurons), or flattened to (prompts, neurons) for one layer); concept ``k`` is "prompt has label k"
against all other prompts.

Every scorer (AP, SMD here; LAPE in :mod:`neuronatlas.stats.lape`; gradient attribution in
:mod:`neuronatlas.stats.attribution`, which needs the model and gold targets) shares one interface,
:class:`ConceptScorer`: ``fit(...)`` or ``fit_record(record, concepts)`` return ``self``;
``scores_`` is (concepts, neurons) with higher meaning more specific (-inf where a scorer excludes a
neuron); ``top_indices(concept, n, tails)`` gives flat indices best first and ``select(concept, n,
tails)`` the same neurons as a :class:`~neuronatlas.intervene.NeuronSet`. Studies pick a scorer by
name from :data:`SCORERS` and never branch on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from neuronatlas.errors import DatasetError
from neuronatlas.intervene.neurons import NeuronSet
from neuronatlas.stats.inference import benjamini_hochberg

__all__ = ["APScorer", "SMDScorer", "ConceptScorer", "SCORERS", "MODEL_SCORERS", "average_precision", "benjamini_hochberg", "top_n",
           "scorer"]

Tails = Literal["top", "both"]


def average_precision(scores: torch.Tensor, positive: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Average precision of every column of ``scores`` (n, m) as a ranking of ``positive`` (n,) bool.

    Equals ``sklearn.metrics.average_precision_score`` (ties: one threshold per distinct value).
    """
    if not bool(positive.any()):
        raise DatasetError("a concept has no positive prompts; every label needs at least one prompt")
    return average_precision_multi(scores, positive.to(torch.long), 2, chunk)[0][1]


def _tie_counts(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element of each row of ``block`` (rows, n): how many elements of its row are >= it, and > it."""
    values, order = block.sort(dim=-1, descending=True)
    n = values.shape[-1]
    pos = torch.arange(n).expand_as(values)
    same_as_next = torch.zeros_like(values, dtype=torch.bool)
    same_as_next[..., :-1] = values[..., :-1] == values[..., 1:]
    same_as_prev = torch.zeros_like(same_as_next)
    same_as_prev[..., 1:] = same_as_next[..., :-1]
    end = torch.where(same_as_next, torch.full_like(pos, n), pos)
    group_end = torch.flip(torch.cummin(torch.flip(end, [-1]), dim=-1).values, [-1])
    group_start = torch.cummax(torch.where(same_as_prev, torch.full_like(pos, -1), pos), dim=-1).values
    ge = torch.empty_like(values).scatter_(-1, order, (group_end + 1).to(values.dtype))
    gt = torch.empty_like(values).scatter_(-1, order, group_start.to(values.dtype))
    return ge, gt


def average_precision_multi(scores: torch.Tensor, labels: torch.Tensor, n_classes: int,
                            chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """AP of every column of ``scores`` (n, m) for every class of ``labels`` (n,), ranking by the
    scores and by the negated scores: two (classes, m) tensors.

    AP of class c = mean over its positives j of  #{c-items scoring >= s_j} / #{items scoring >= s_j}
    (sklearn's definition, ties included); for the negated ranking ">=" becomes "<=", i.e. the count
    minus the items scoring strictly higher. Each chunk needs one sort over all prompts and one
    within each class. Classes without positives get AP 0.
    """
    n, m = scores.shape
    pos_ap = torch.zeros(n_classes, m, dtype=torch.float64)
    neg_ap = torch.zeros(n_classes, m, dtype=torch.float64)
    members = [torch.nonzero(labels == c).flatten() for c in range(n_classes)]
    for start in range(0, m, chunk):
        block = scores[:, start:start + chunk].T.float().contiguous()         # (c, n): neurons as rows
        cols = slice(start, start + block.shape[0])
        all_ge, all_gt = _tie_counts(block)
        for c, idx in enumerate(members):
            if idx.numel():
                ge, gt = _tie_counts(block[:, idx])
                pos_ap[c, cols] = (ge.double() / all_ge[:, idx].double()).mean(-1)
                neg_ap[c, cols] = ((idx.numel() - gt).double() / (n - all_gt[:, idx]).double()).mean(-1)
    return pos_ap, neg_ap


def top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` highest scores, best first; ties broken by the lower index (deterministic)."""
    n = min(n, scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:n]


def _labels_matrix(labels: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, int]:
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if lab.numel() == 0:
        raise DatasetError("no prompts to score; the record is empty")
    return lab, int(lab.max()) + 1


class ConceptScorer:
    """What every neuron scorer shares: the (layers, neurons) layout, concept names, and selection.

    Subclasses set ``scores_`` (concepts, layers * neurons; higher = more specific, -inf = excluded),
    ``concepts_`` and ``layout_`` in ``fit``; ``_negative_scores`` gives the ranking for
    ``tails='both'`` (neurons that switch *off* for a concept), or None where a scorer has none.
    """

    scores_: Any
    concepts_: list[str]
    layout_: tuple[int, int]
    component: str = "mlp"

    def fit_record(self, rec: Any, concepts: Sequence[str] | None = None,
                   groups: Sequence[Any] | None = None) -> "ConceptScorer":
        """Fit on a :class:`~neuronatlas.record.RecordResult`: its pooled responses of the prompts
        labelled with one of ``concepts`` (default all labels), each concept against the others.
        ``groups`` (one id per recorded prompt, e.g. the fact a template was filled with) marks
        pseudo-replicates; scorers that test (SMD) average each group before testing."""
        if rec.pooled is None:
            raise DatasetError(f"record {rec.name!r} kept no pooled responses; record it with pooled responses")
        names = list(concepts) if concepts is not None else list(rec.labels)
        unknown = [c for c in names if c not in rec.labels]
        if unknown:
            raise DatasetError(f"concepts {unknown} are not labels of record {rec.name!r} (labels: {rec.labels})")
        index = {rec.labels.index(c): k for k, c in enumerate(names)}
        rows = [i for i, lab in enumerate(np.asarray(rec.prompt_labels)) if int(lab) in index]
        labels = np.array([index[int(rec.prompt_labels[i])] for i in rows])
        self.component = rec.config.component
        if groups is not None and isinstance(self, SMDScorer):
            self.fit(rec.pooled[rows].astype(np.float32), labels, groups=[groups[i] for i in rows])
        else:
            self.fit(rec.pooled[rows].astype(np.float32), labels)  # type: ignore[attr-defined]
        self.concepts_ = names
        return self

    def concept_index(self, concept: int | str) -> int:
        if isinstance(concept, str):
            if concept not in self.concepts_:
                raise DatasetError(f"unknown concept {concept!r}; fitted concepts: {', '.join(self.concepts_)}")
            return self.concepts_.index(concept)
        return int(concept)

    def _negative_scores(self, k: int) -> torch.Tensor | None:
        return None

    def top_indices(self, concept: int | str, n: int, tails: Tails = "top") -> np.ndarray:
        """Flat indices (layer * neurons + j) of the ``n`` best neurons for ``concept``, best first;
        ``tails='both'`` adds up to ``n // 2`` of the best by the negative ranking. Excluded (-inf)
        neurons are never chosen, so fewer than ``n`` may come back."""
        k = self.concept_index(concept)
        score = torch.as_tensor(np.asarray(self.scores_[k], dtype=np.float64))
        chosen = [int(j) for j in top_n(score, n) if bool(torch.isfinite(score[j]))]
        neg = self._negative_scores(k) if tails == "both" else None
        if neg is not None:
            taken = set(chosen)
            extra = [int(j) for j in top_n(neg, n) if int(j) not in taken and bool(torch.isfinite(neg[j]))]
            chosen += extra[: n // 2]
        return np.asarray(chosen, dtype=np.int64)

    def select(self, concept: int | str, n: int, tails: Tails = "top") -> NeuronSet:
        """The neurons of :meth:`top_indices` as a :class:`NeuronSet` on the fitted component."""
        width = self.layout_[1]
        return NeuronSet.of([divmod(int(f), width) for f in self.top_indices(concept, n, tails)], self.component)


def _layout(x: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """(prompts, layers * neurons) view of 2-D or 3-D responses, and the (layers, neurons) layout."""
    if x.ndim == 3:
        return x.reshape(x.shape[0], -1), (x.shape[1], x.shape[2])
    if x.ndim == 2:
        return x, (1, x.shape[1])
    raise DatasetError(f"responses must be (prompts, neurons) or (prompts, layers, neurons), got shape {x.shape}")


class APScorer(ConceptScorer):
    """Expertise of each neuron for each concept: average precision of its pooled responses
    (Liu et al. 2025). ``fit`` computes ``scores_`` (concepts, neurons) and, for ``tails='both'``,
    ``neg_scores_`` (AP of the negated responses: neurons that switch *off* for the concept)."""

    def __init__(self, chunk: int = 2048) -> None:
        self.chunk = chunk

    def fit(self, responses: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray) -> "APScorer":
        flat, self.layout_ = _layout(np.asarray(responses, dtype=np.float32))
        x = torch.as_tensor(flat)
        lab, k = _labels_matrix(labels)
        if x.shape[0] != lab.numel():
            raise DatasetError(f"{x.shape[0]} responses but {lab.numel()} labels; give one label per prompt")
        missing = [c for c in range(k) if not bool((lab == c).any())]
        if missing:
            raise DatasetError(f"concept {missing[0]} has no prompts; every label index up to {k - 1} needs prompts")
        self.scores_, self.neg_scores_ = average_precision_multi(x, lab, k, self.chunk)
        self.base_rate_ = torch.bincount(lab, minlength=k).double() / lab.numel()
        self.concepts_ = [str(c) for c in range(k)]
        return self

    def _negative_scores(self, k: int) -> torch.Tensor:
        return self.neg_scores_[k]


class SMDScorer(ConceptScorer):
    """Standardised mean difference (Cohen's d, pooled SD) of concept vs other prompts per neuron,
    with Welch's t-test p-values and Benjamini-Hochberg control over all neurons of a concept.
    With ``groups`` (e.g. one fact filled into several templates), the responses of each group are
    averaged first, so pseudo-replicates count once."""

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha

    def fit(self, responses: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray,
            groups: Sequence[Any] | None = None) -> "SMDScorer":
        from scipy import stats

        x, self.layout_ = _layout(np.asarray(responses, dtype=np.float64))
        lab, k = _labels_matrix(labels)
        labs = lab.numpy()
        if groups is not None:
            x, labs = _group_means(x, labs, groups)
        self.n_items_ = int(len(labs))
        d, p, sig = [], [], []
        for c in range(k):
            a, b = x[labs == c], x[labs != c]
            if len(a) < 2 or len(b) < 2:
                raise DatasetError(f"concept {c} has {len(a)} prompts (others {len(b)}); SMD needs at least 2 on each side")
            sd = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2))
            d_c = np.divide(a.mean(0) - b.mean(0), sd, out=np.zeros(x.shape[1]), where=sd > 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                p_c = stats.ttest_ind(a, b, axis=0, equal_var=False).pvalue
            p_c = np.where(np.isfinite(p_c), p_c, 1.0)
            d.append(d_c)
            p.append(p_c)
            sig.append(benjamini_hochberg(p_c, self.alpha))
        self.d_, self.p_, self.significant_ = np.stack(d), np.stack(p), np.stack(sig)
        # the ranking: d where FDR-significant, -inf elsewhere (never selected)
        self.scores_ = np.where(self.significant_, self.d_, -np.inf)
        self.concepts_ = [str(c) for c in range(k)]
        return self

    def _negative_scores(self, k: int) -> torch.Tensor:
        """The most negative significant d (neurons suppressed by the concept)."""
        neg = np.where(self.significant_[k] & (self.d_[k] < 0), -self.d_[k], -np.inf)
        return torch.as_tensor(neg)


def scorer(name: str, *, lm: Any = None, **params: Any) -> ConceptScorer:
    """A scorer by name (``ap``, ``smd``, ``lape``, ``attribution``), with its parameters. Scorers in
    :data:`MODEL_SCORERS` (gradient attribution) also get the model ``lm``; the others ignore it."""
    if name not in SCORERS:
        raise DatasetError(f"unknown scorer {name!r}; choose one of {', '.join(sorted(SCORERS))}")
    if name in MODEL_SCORERS:
        params["lm"] = lm
    return SCORERS[name](**params)


def _lape(**params: Any) -> ConceptScorer:
    from neuronatlas.stats.lape import LAPEScorer

    return LAPEScorer(**params)


def _attribution(**params: Any) -> ConceptScorer:
    from neuronatlas.stats.attribution import AttributionScorer

    return AttributionScorer(**params)


SCORERS: dict[str, Callable[..., ConceptScorer]] = {"ap": APScorer, "smd": SMDScorer, "lape": _lape,
                                                    "attribution": _attribution}
MODEL_SCORERS = frozenset({"attribution"})     # scorers that run the model (fit_prompts), not a record


def _group_means(x: np.ndarray, labels: np.ndarray, groups: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Average the rows of each group; every group must carry one label."""
    if len(groups) != len(labels):
        raise DatasetError(f"got {len(groups)} group ids for {len(labels)} prompts; give one per prompt")
    order: dict[Any, int] = {}
    for g in groups:
        order.setdefault(g, len(order))
    idx = np.array([order[g] for g in groups])
    sums = np.zeros((len(order), x.shape[1]))
    np.add.at(sums, idx, x)
    counts = np.bincount(idx, minlength=len(order))
    glab = np.full(len(order), -1)
    for i, g in enumerate(idx):
        if glab[g] not in (-1, labels[i]):
            raise DatasetError(f"group {groups[i]!r} has prompts of two concepts; a group must be one concept's")
        glab[g] = labels[i]
    return sums / counts[:, None], glab
