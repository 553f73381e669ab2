"""Language-specific neurons from activation probabilities: LAPE and its entropy-minus-max variant.

Both scorers take ``act_prob`` of shape (languages, layers, neurons): the fraction of a language's
tokens on which a neuron's gate activation ``act(gate_proj(x))`` is > 0. That is exactly
``RecordResult.moments.act_prob`` of a record made with ``RecordConfig(component="gate")``.

    >>> from neuronatlas.stats.lape import LAPEScorer, EntropyMaxScorer
    >>> lape = LAPEScorer(top_rate=0.01).fit(rec.moments.act_prob, counts=rec.moments.count,
    ...                                     languages=rec.labels)
    >>> lape.languages_, lape.selected_[:3], lape.entropy_.shape   # ['en', 'fr', ...], [[22, 7], ...], (L, N)
    >>> lape.neurons_["fr"]                                         # [(layer, neuron), ...] best first
    >>> lape.layer_counts_["fr"]                                    # selected French neurons per layer
    >>> emax = EntropyMaxScorer().fit(rec.moments.act_prob, languages=rec.labels)   # lambda swept
    >>> emax.lambda_chosen_, emax.category_counts_                  # {'specific': .., 'related': .., ...}

LAPE (Tang et al. 2024), every threshold a parameter:

1. ``p' = p / sum_k p`` over languages; ``entropy_ = -sum_k p' log p'`` (natural log, 0 log 0 = 0).
2. The thresholds are order statistics of *all* p values (every layer, neuron and kept language):
   the ``round(n * rate)``-th smallest value (1-based, clipped to [1, n]), as ``torch.kthvalue`` in the
   reference code. ``filter_threshold_`` uses ``filter_rate``, ``activation_bar_`` ``activation_bar_ratio``.
3. A neuron is eligible when some language's p is strictly above ``filter_threshold_``.
4. ``round(top_rate * n_neurons_total)`` neurons are selected: the eligible ones with the lowest score
   (fewer when fewer are eligible). Ties are broken by position: lower layer, then lower index.
5. A selected neuron belongs to every language whose p is strictly above ``activation_bar_`` (several
   languages possible; none when ``filter_rate`` > ``activation_bar_ratio`` lets such a neuron in).

Edge cases. A neuron never active in any language (p = 0 everywhere) has no defined entropy: its
``entropy_`` is ``+inf``, it is flagged in ``dead_`` and never selected; no NaN is produced. A language
with no tokens (``counts[k] == 0``, or, without ``counts``, p = 0 for every neuron) carries no evidence:
it is excluded with a :class:`LanguageWarning` and listed in ``excluded_languages_``; fewer than two
languages left raise :class:`~neuronatlas.errors.DatasetError`. Strict ">" means that when the
percentile equals the largest p (e.g. most neurons always active) nothing passes and nothing is chosen.

The variant (Zhang et al. 2025) scores ``H(p')/log K - lambda * max_k p_k / norm_max`` with
``norm_max = (sum_{k=1..K} 1/k) / K`` and raw p in the max term (``max_term="normalized"`` uses p');
selection and assignment are as above. Selected neurons assigned to exactly one language are
*specific*, to several but not all *related*; all other neurons are *agnostic*. With ``lambda_=None``
lambda is the largest value of ``lambdas`` for which no selected neuron is assigned to all K languages.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from neuronatlas.errors import DatasetError
from neuronatlas.stats.scorers import ConceptScorer, Tails

__all__ = ["LAPEScorer", "EntropyMaxScorer", "LanguageWarning", "kth_threshold", "lape_entropy",
           "CATEGORIES", "DEFAULT_LAMBDAS"]

CATEGORIES = ("agnostic", "specific", "related")          # codes 0, 1, 2 of ``category_``
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(41))   # 0, 0.05, ..., 2.0


class LanguageWarning(UserWarning):
    """A language was left out of the scoring (it has no tokens)."""


def kth_threshold(values: np.ndarray, rate: float) -> float:
    """The ``round(n * rate)``-th smallest of ``values`` (1-based, clipped to [1, n])."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        raise DatasetError("no activation probabilities to take a percentile of")
    k = min(max(int(round(flat.size * rate)), 1), flat.size)
    return float(np.partition(flat, k - 1)[k - 1])


def lape_entropy(act_prob: np.ndarray) -> np.ndarray:
    """LAPE of (K, ...) probabilities over axis 0; ``+inf`` where every p is 0."""
    p = np.asarray(act_prob, dtype=np.float64)
    total = p.sum(axis=0)
    dead = total <= 0
    norm = p / np.where(dead, 1.0, total)
    logs = np.log(np.where(norm > 0, norm, 1.0))
    ent = -(norm * logs).sum(axis=0)
    return np.where(dead, np.inf, np.maximum(ent, 0.0))


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise DatasetError(f"{name} must lie in [0, 1], got {value}; e.g. 0.01 for top_rate, 0.95 for the percentiles")


class _LanguageScorer:
    """Shared fitting: input checks, language exclusion, thresholds, selection and assignment."""

    top_rate: float
    filter_rate: float
    activation_bar_ratio: float

    def _prepare(self, act_prob: Any, counts: Any, languages: Sequence[str] | None) -> np.ndarray:
        _check_rate("top_rate", self.top_rate)
        _check_rate("filter_rate", self.filter_rate)
        _check_rate("activation_bar_ratio", self.activation_bar_ratio)
        p = np.array(act_prob.numpy() if hasattr(act_prob, "numpy") else act_prob, dtype=np.float64)
        if p.ndim == 2:
            p = p[:, None, :]
        if p.ndim != 3:
            raise DatasetError(f"act_prob must have shape (languages, layers, neurons), got {p.shape}")
        if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
            raise DatasetError("act_prob must hold probabilities in [0, 1] (no NaN); pass moments.act_prob")
        names = [str(x) for x in languages] if languages is not None else [str(k) for k in range(p.shape[0])]
        if len(names) != p.shape[0]:
            raise DatasetError(f"got {len(names)} language names for {p.shape[0]} languages in act_prob")
        if counts is not None:
            c = np.asarray(counts, dtype=np.float64).reshape(-1)
            if c.shape[0] != p.shape[0]:
                raise DatasetError(f"counts has {c.shape[0]} entries for {p.shape[0]} languages")
            empty = c <= 0
        else:
            empty = (p.reshape(p.shape[0], -1) == 0).all(axis=1)
        self.excluded_languages_ = [n for n, e in zip(names, empty) if e]
        if self.excluded_languages_:
            warnings.warn(f"languages without tokens are left out of the scoring: {self.excluded_languages_}",
                          LanguageWarning, stacklevel=3)
        keep = ~empty
        if keep.sum() < 2:
            raise DatasetError(f"need at least two languages with tokens, got {[n for n, k in zip(names, keep) if k]}; "
                               "add text for more languages")
        self.languages_ = [n for n, k in zip(names, keep) if k]
        self.act_prob_ = p[keep]
        self.n_layers_, self.n_neurons_ = p.shape[1], p.shape[2]
        self.dead_ = self.act_prob_.sum(axis=0) <= 0
        self.filter_threshold_ = kth_threshold(self.act_prob_, self.filter_rate)
        self.activation_bar_ = kth_threshold(self.act_prob_, self.activation_bar_ratio)
        self.eligible_ = (self.act_prob_ > self.filter_threshold_).any(axis=0)
        self.n_select_ = int(round(self.top_rate * self.n_layers_ * self.n_neurons_))
        return self.act_prob_

    def _select(self, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(selected flat indices best first, their scores, their (S, K) language assignment)."""
        flat = score.reshape(-1)
        candidates = np.flatnonzero(self.eligible_.reshape(-1))
        order = candidates[np.lexsort((candidates, flat[candidates]))]   # score, then position
        chosen = order[: self.n_select_]
        probs = self.act_prob_.reshape(len(self.languages_), -1)[:, chosen].T   # (S, K)
        return chosen, flat[chosen], probs > self.activation_bar_

    def _finish(self, chosen: np.ndarray, scores: np.ndarray, assign: np.ndarray) -> None:
        layers, neurons = np.divmod(chosen, self.n_neurons_)
        self.selected_ = np.stack([layers, neurons], axis=1).astype(np.int64)      # (S, 2) best first
        self.selected_scores_ = scores.astype(np.float64)                          # (S,) best first
        self.assignment_ = assign                                                  # (S, K) bool
        self.neurons_: dict[str, list[tuple[int, int]]] = {}
        self.neuron_scores_: dict[str, list[float]] = {}
        self.layer_counts_: dict[str, list[int]] = {}
        for k, lang in enumerate(self.languages_):
            rows = np.flatnonzero(assign[:, k])
            self.neurons_[lang] = [(int(layers[i]), int(neurons[i])) for i in rows]
            self.neuron_scores_[lang] = [float(scores[i]) for i in rows]
            self.layer_counts_[lang] = np.bincount(layers[rows], minlength=self.n_layers_).astype(int).tolist()
        self.counts_ = {lang: len(v) for lang, v in self.neurons_.items()}
        n_lang = assign.sum(axis=1)
        self.n_unassigned_ = int((n_lang == 0).sum())
        self.n_shared_ = int((n_lang > 1).sum())

    def selection_rows(self, *, study: str, method: str, site: str = "gate") -> list[dict[str, Any]]:
        """Rows for the atlas's ``selections.parquet``: one per (language, neuron), rank 0 = best score."""
        rows = []
        for lang in self.languages_:
            for rank, ((layer, neuron), score) in enumerate(zip(self.neurons_[lang], self.neuron_scores_[lang])):
                rows.append({"study": study, "concept": lang, "method": method, "site": site, "layer": layer,
                             "neuron": neuron, "score": score, "rank": rank})
        return rows

    def summary(self) -> dict[str, Any]:
        """Every fitted number worth storing (JSON-ready)."""
        return {"languages": self.languages_, "excluded_languages": self.excluded_languages_,
                "n_selected": int(len(self.selected_)), "n_select_target": self.n_select_,
                "n_eligible": int(self.eligible_.sum()), "n_dead": int(self.dead_.sum()),
                "filter_threshold": self.filter_threshold_, "activation_bar": self.activation_bar_,
                "n_unassigned": self.n_unassigned_, "n_shared": self.n_shared_,
                "counts": self.counts_, "layer_counts": self.layer_counts_}


class LAPEScorer(_LanguageScorer, ConceptScorer):
    """Language activation probability entropy (Tang et al. 2024); see the module docstring.

    As a :class:`~neuronatlas.stats.scorers.ConceptScorer`, ``scores_[k]`` is
    :meth:`concept_scores` of concept k (-entropy where LAPE assigns the neuron to k, -inf
    elsewhere) and ``select(concept, n)`` the ``n`` lowest-entropy neurons assigned to it.
    """

    def __init__(self, top_rate: float = 0.01, filter_rate: float = 0.95, activation_bar_ratio: float = 0.95) -> None:
        self.top_rate = top_rate
        self.filter_rate = filter_rate
        self.activation_bar_ratio = activation_bar_ratio

    def fit(self, act_prob: Any, counts: Any = None, languages: Sequence[str] | None = None) -> "LAPEScorer":
        """``act_prob``: (languages, layers, neurons) or (languages, neurons); ``counts``: tokens per language."""
        p = self._prepare(act_prob, counts, languages)
        self.entropy_ = lape_entropy(p)                       # (layers, neurons); +inf for dead neurons
        self._finish(*self._select(self.entropy_))
        self.concepts_ = list(self.languages_)
        self.layout_ = (self.n_layers_, self.n_neurons_)
        self.scores_ = np.stack([self.concept_scores(k) for k in range(len(self.languages_))])
        return self

    def fit_record(self, rec: Any, concepts: Sequence[str] | None = None,
                   groups: Sequence[Any] | None = None) -> "LAPEScorer":
        """Fit on a record's token-level activation probabilities of ``concepts`` (default all labels);
        ``groups`` is accepted for the common interface and unused (token-level rates have no test)."""
        names = list(concepts) if concepts is not None else list(rec.labels)
        unknown = [c for c in names if c not in rec.labels]
        if unknown:
            raise DatasetError(f"concepts {unknown} are not labels of record {rec.name!r} (labels: {rec.labels})")
        idx = [rec.labels.index(c) for c in names]
        self.component = rec.config.component
        return self.fit(rec.moments.act_prob[idx], counts=rec.moments.count[idx], languages=names)

    def concept_scores(self, concept: int | str) -> np.ndarray:
        """Per-concept LAPE ranking, flat over (layer, neuron): ``-entropy_`` where the concept's p is
        strictly above ``activation_bar_`` (LAPE's assignment rule) and the neuron is eligible,
        ``-inf`` elsewhere. Higher is more specific to ``concept``; ``top_rate`` plays no part."""
        k = self.concept_index(concept)
        ok = (self.act_prob_[k] > self.activation_bar_) & self.eligible_ & ~self.dead_
        return np.where(ok, -self.entropy_, -np.inf).reshape(-1)

    def top_indices(self, concept: int | str, n: int, tails: Tails = "top") -> np.ndarray:
        """The ``n`` neurons (flat indices) with the lowest entropy among those LAPE assigns to
        ``concept``, best first, ties broken by position; fewer when fewer are assigned (LAPE has no
        negative tail, so ``tails`` is ignored). This is how the relation study uses LAPE as a
        per-concept selector (a fixed count per concept, like AP)."""
        score = self.concept_scores(concept)
        ok = np.flatnonzero(np.isfinite(score))
        order = ok[np.lexsort((ok, -score[ok]))]
        return order[: max(0, int(n))]


class EntropyMaxScorer(_LanguageScorer):
    """Entropy minus a max-probability bonus (Zhang et al. 2025) with specific/related/agnostic classes."""

    def __init__(self, lambda_: float | None = None, lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                 top_rate: float = 0.01, filter_rate: float = 0.95, activation_bar_ratio: float = 0.95,
                 max_term: Literal["raw", "normalized"] = "raw") -> None:
        self.lambda_ = lambda_
        self.lambdas = lambdas
        self.top_rate = top_rate
        self.filter_rate = filter_rate
        self.activation_bar_ratio = activation_bar_ratio
        self.max_term = max_term

    def score(self, lam: float) -> np.ndarray:
        """The variant's score of every neuron for one lambda (after ``fit``); +inf for dead neurons."""
        return self.entropy_norm_ - lam * self.max_ratio_

    def fit(self, act_prob: Any, counts: Any = None, languages: Sequence[str] | None = None) -> "EntropyMaxScorer":
        if self.max_term not in ("raw", "normalized"):
            raise DatasetError(f"unknown max_term {self.max_term!r}; choose 'raw' or 'normalized'")
        p = self._prepare(act_prob, counts, languages)
        K = p.shape[0]
        self.norm_max_ = sum(1.0 / k for k in range(1, K + 1)) / K
        self.entropy_ = lape_entropy(p)
        self.entropy_norm_ = self.entropy_ / math.log(K)
        total = p.sum(axis=0)
        peak = p.max(axis=0) if self.max_term == "raw" else p.max(axis=0) / np.where(total > 0, total, 1.0)
        self.max_ratio_ = peak / self.norm_max_
        if self.lambda_ is not None:
            grid = [float(self.lambda_)]
        else:
            grid = sorted(float(x) for x in self.lambdas)
            if not grid:
                raise DatasetError("lambdas is empty; give candidate values such as 0, 0.05, ..., 2")
        sweep, fits = [], []
        for lam in grid:
            chosen, scores, assign = self._select(self.score(lam))
            n_lang = assign.sum(axis=1)
            n_all = int((n_lang == len(self.languages_)).sum())
            sweep.append({"lambda": lam, "n_all_languages": n_all, "n_specific": int((n_lang == 1).sum()),
                          "n_related": int(((n_lang > 1) & (n_lang < len(self.languages_))).sum())})
            fits.append((lam, chosen, scores, assign, n_all))
        self.lambda_sweep_ = sweep
        ok = [f for f in fits if f[4] == 0]
        if self.lambda_ is None and not ok:
            warnings.warn("every lambda assigns some selected neuron to all languages; using the smallest",
                          LanguageWarning, stacklevel=2)
        best = ok[-1] if ok and self.lambda_ is None else fits[0]
        self.lambda_chosen_ = float(best[0])
        self._finish(best[1], best[2], best[3])
        n_lang = self.assignment_.sum(axis=1)
        cat = np.zeros((self.n_layers_, self.n_neurons_), dtype=np.int8)
        layers, neurons = self.selected_[:, 0], self.selected_[:, 1]
        cat[layers[n_lang == 1], neurons[n_lang == 1]] = 1
        related = (n_lang > 1) & (n_lang < len(self.languages_))
        cat[layers[related], neurons[related]] = 2
        self.category_ = cat                                  # codes index CATEGORIES
        self.category_counts_ = {name: int((cat == code).sum()) for code, name in enumerate(CATEGORIES)}
        return self

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "lambda": self.lambda_chosen_, "norm_max": self.norm_max_,
                "max_term": self.max_term, "categories": self.category_counts_, "lambda_sweep": self.lambda_sweep_}
