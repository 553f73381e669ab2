"""Neuron scorers for concept selection, scikit-learn style (``fit`` returns ``self``; fitted
attributes end in ``_``). All are vectorised over every neuron at once.

    >>> from neuronatlas.stats.scorers import APScorer, SMDScorer
    >>> ap = APScorer().fit(responses, labels)        # responses: (prompts, neurons); labels: (prompts,)
    >>> ap.scores_.shape                             # (concepts, neurons) average precision
    >>> ap.select(concept=0, n=500, tails="top")     # neuron indices, best first
    >>> smd = SMDScorer(alpha=0.05).fit(responses, labels)
    >>> smd.d_, smd.p_, smd.significant_             # Cohen's d, Welch p-values, BH-FDR mask

``responses`` are pooled per-prompt responses (a record's ``pooled`` array reshaped to
``(prompts, layers * neurons)``); concept ``k`` is "prompt has label k" against all other prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from neuronatlas.errors import DatasetError

__all__ = ["APScorer", "SMDScorer", "average_precision", "benjamini_hochberg", "top_n"]

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


class APScorer:
    """Expertise of each neuron for each concept: average precision of its pooled responses
    (Liu et al. 2025). ``fit`` computes ``scores_`` (concepts, neurons) and, for ``tails='both'``,
    ``neg_scores_`` (AP of the negated responses: neurons that switch *off* for the concept)."""

    def __init__(self, chunk: int = 2048) -> None:
        self.chunk = chunk

    def fit(self, responses: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray) -> "APScorer":
        x = torch.as_tensor(np.asarray(responses, dtype=np.float32))
        lab, k = _labels_matrix(labels)
        if x.shape[0] != lab.numel():
            raise DatasetError(f"{x.shape[0]} responses but {lab.numel()} labels; give one label per prompt")
        missing = [c for c in range(k) if not bool((lab == c).any())]
        if missing:
            raise DatasetError(f"concept {missing[0]} has no prompts; every label index up to {k - 1} needs prompts")
        self.scores_, self.neg_scores_ = average_precision_multi(x, lab, k, self.chunk)
        self.base_rate_ = torch.bincount(lab, minlength=k).double() / lab.numel()
        return self

    def select(self, concept: int, n: int, tails: Tails = "top") -> torch.Tensor:
        """Top-``n`` neurons by AP; ``tails='both'`` adds the top ``n // 2`` by AP of the negated responses."""
        chosen = top_n(self.scores_[concept], n)
        if tails == "both":
            extra = [int(j) for j in top_n(self.neg_scores_[concept], n) if int(j) not in set(chosen.tolist())]
            chosen = torch.cat([chosen, torch.tensor(extra[: n // 2], dtype=torch.long)])
        return chosen


def benjamini_hochberg(p: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Boolean mask of hypotheses rejected at false discovery rate ``alpha`` (Benjamini-Hochberg)."""
    p = np.asarray(p, dtype=float)
    flat = p.reshape(-1)
    m = flat.size
    order = np.argsort(flat, kind="stable")
    thresh = alpha * np.arange(1, m + 1) / m
    passed = flat[order] <= thresh
    mask = np.zeros(m, dtype=bool)
    if passed.any():
        last = int(np.nonzero(passed)[0].max())
        mask[order[: last + 1]] = True
    return mask.reshape(p.shape)


class SMDScorer:
    """Standardised mean difference (Cohen's d, pooled SD) of concept vs other prompts per neuron,
    with Welch's t-test p-values and Benjamini-Hochberg control over all neurons of a concept."""

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha

    def fit(self, responses: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray) -> "SMDScorer":
        from scipy import stats

        x = np.asarray(responses, dtype=np.float64)
        lab, k = _labels_matrix(labels)
        labs = lab.numpy()
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
        return self

    def select(self, concept: int, n: int, tails: Tails = "top") -> torch.Tensor:
        """Top-``n`` FDR-significant neurons by d (``both``: also the n//2 most negative)."""
        d = torch.as_tensor(self.d_[concept])
        sig = torch.as_tensor(self.significant_[concept])
        masked = torch.where(sig, d, torch.full_like(d, -torch.inf))
        chosen = [int(j) for j in top_n(masked, n) if bool(sig[j])]
        if tails == "both":
            neg = torch.where(sig, -d, torch.full_like(d, -torch.inf))
            chosen += [int(j) for j in top_n(neg, n // 2) if bool(sig[j]) and d[j] < 0]
        return torch.tensor(chosen, dtype=torch.long)
