"""Semi-nonnegative matrix factorisation (semi-NMF) of activations, streamed in mini-batches.

Factor ``A`` (tokens x neurons) as ``A ~ Z W`` with ``Z >= 0`` (tokens x k, sparse token codes) and
``W`` signed (k x neurons, features as signed combinations of neurons, each row of norm at most 1),
minimising ``0.5 ||A - Z W||^2 + l1 * scale * sum(Z)``, where ``scale`` is the mean token norm of the
first batch (so ``l1`` is unitless).

* Codes: the multiplicative update of semi-NMF (Ding, Li & Jordan 2010) with the L1 penalty in its
  denominator, ``Z <- Z * sqrt((P+ + Z N-) / (P- + Z N+ + l1*scale))`` with ``P = A W^T``, ``N = W W^T``
  and ``X+ = max(X, 0)``, ``X- = max(-X, 0)``; codes stay non-negative, zeros stay zero.
* Dictionary: block coordinate descent on the rows of ``W`` against the running sufficient statistics
  ``Z^T Z`` and ``Z^T A`` (online dictionary learning, Mairal et al. 2010), each row projected onto
  the unit ball. Memory is ``O(k^2 + k x neurons)`` whatever the number of tokens, so a corpus that
  does not fit in memory is streamed batch by batch through :meth:`SNMF.partial_fit`.

Why not a library: scikit-learn's ``NMF``/``MiniBatchNMF`` force ``W >= 0``;
``MiniBatchDictionaryLearning(positive_code=True)`` solves the same problem but encodes each batch with
a per-token Lasso in NumPy, far slower than these two matrix products per batch in torch (measured in
``benchmarks/bench_snmf.py``), and cannot run on the model's device.

    >>> import torch
    >>> from neuronatlas.stats.snmf import SNMF
    >>> acts = torch.randn(512, 48)
    >>> snmf = SNMF(k=8, l1=0.01, seed=0)
    >>> for chunk in acts.split(128):
    ...     _ = snmf.partial_fit(chunk)
    >>> codes = snmf.transform(acts)           # (512, 8), >= 0
    >>> snmf.components_.shape                 # (8, 48) signed directions in neuron space
    torch.Size([8, 48])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuronatlas.errors import NeuronAtlasError

__all__ = ["SNMF", "SNMFError", "objective"]

_EPS = 1e-12


class SNMFError(NeuronAtlasError):
    """Bad SNMF parameters or input."""


def objective(acts: torch.Tensor, codes: torch.Tensor, components: torch.Tensor, penalty: float) -> float:
    """``0.5 ||A - Z W||^2 + penalty * sum(Z)`` (float64)."""
    resid = acts.double() - codes.double() @ components.double()
    return float(0.5 * (resid * resid).sum() + penalty * codes.double().sum())


def _update_codes(codes: torch.Tensor, proj: torch.Tensor, gram: torch.Tensor, penalty: float,
                  iters: int) -> torch.Tensor:
    """``iters`` multiplicative updates of the codes given ``proj = A W^T`` and ``gram = W W^T``."""
    proj_pos, proj_neg = proj.clamp(min=0), (-proj).clamp(min=0)
    gram_pos, gram_neg = gram.clamp(min=0), (-gram).clamp(min=0)
    for _ in range(iters):
        num = proj_pos + codes @ gram_neg
        den = proj_neg + codes @ gram_pos + penalty
        codes = codes * torch.sqrt(num / den.clamp(min=_EPS))
    return codes


@dataclass
class SNMF:
    """Streaming semi-NMF with an L1 penalty on the codes (scikit-learn conventions: fitted attributes
    end in ``_``).

    ``k``: features; ``l1``: L1 weight on the codes relative to the mean token norm; ``code_iters``:
    multiplicative updates per batch; ``dict_iters``: passes of row updates of ``W`` per batch;
    ``batch_iters``: alternations of codes and dictionary on each batch (its share of the statistics
    replaced each time); ``forget``: weight of the old statistics per batch (1.0 keeps all; below 1
    forgets early, poorly coded batches, as in online dictionary learning); ``seed``: the initial rows.
    """

    k: int = 64
    l1: float = 0.05
    code_iters: int = 50
    dict_iters: int = 2
    batch_iters: int = 2
    forget: float = 0.98
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise SNMFError(f"k must be at least 1, got {self.k}; give the number of features per layer, e.g. 64")
        if not self.l1 >= 0:
            raise SNMFError(f"l1 must be >= 0, got {self.l1}; 0 disables the sparsity penalty")
        if min(self.code_iters, self.dict_iters, self.batch_iters) < 1:
            raise SNMFError("code_iters, dict_iters and batch_iters must be at least 1")
        if not 0 < self.forget <= 1:
            raise SNMFError(f"forget must be in (0, 1], got {self.forget}")
        self.components_: torch.Tensor | None = None
        self.scale_: float = 1.0
        self.zz_: torch.Tensor | None = None       # running Z^T Z   (k, k)
        self.za_: torch.Tensor | None = None       # running Z^T A   (k, neurons)
        self.n_seen_: int = 0

    @property
    def penalty(self) -> float:
        """The L1 weight in activation units (``l1 x`` the mean token norm of the first batch)."""
        return self.l1 * self.scale_

    def _check(self, acts: torch.Tensor) -> torch.Tensor:
        if acts.dim() != 2 or acts.shape[0] == 0:
            raise SNMFError(f"activations must be a non-empty (tokens, neurons) matrix, got shape {tuple(acts.shape)}")
        if self.components_ is not None and acts.shape[1] != self.components_.shape[1]:
            raise SNMFError(f"activations have {acts.shape[1]} neurons but the factorisation was fitted on "
                            f"{self.components_.shape[1]}; use one SNMF per layer")
        return acts.float()

    def _init(self, acts: torch.Tensor) -> None:
        """Rows of ``W``: ``k`` distinct tokens of the first batch (normalised), with a little noise."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        n, d = acts.shape
        pick = torch.randperm(n, generator=gen)[: self.k].to(acts.device)
        rows = acts[pick]
        if rows.shape[0] < self.k:   # fewer tokens than features: fill with random directions
            extra = torch.randn(self.k - rows.shape[0], d, generator=gen).to(acts.device)
            rows = torch.cat([rows, extra])
        rows = rows + 0.01 * rows.norm(dim=1, keepdim=True).mean() * torch.randn(rows.shape, generator=gen).to(acts.device) / d ** 0.5
        self.components_ = rows / rows.norm(dim=1, keepdim=True).clamp(min=_EPS)
        self.scale_ = float(acts.norm(dim=1).mean().clamp(min=_EPS))
        self.zz_ = torch.zeros(self.k, self.k, device=acts.device)
        self.za_ = torch.zeros(self.k, d, device=acts.device)

    def transform(self, acts: torch.Tensor, iters: int | None = None) -> torch.Tensor:
        """Non-negative codes ``Z`` (tokens, k) of ``acts`` under the current dictionary."""
        if self.components_ is None:
            raise SNMFError("the factorisation is not fitted yet; call partial_fit first")
        acts = self._check(acts)
        w = self.components_
        proj = acts @ w.T
        gram = w @ w.T
        start = proj.clamp(min=0) / gram.diagonal().clamp(min=_EPS) + 1e-3 * self.scale_ / self.k
        return _update_codes(start, proj, gram, self.penalty, self.code_iters if iters is None else iters)

    def _update_dict(self) -> None:
        assert self.components_ is not None and self.zz_ is not None and self.za_ is not None
        w = self.components_.clone()
        zz, za = self.zz_, self.za_
        for _ in range(self.dict_iters):
            for j in range(self.k):
                if zz[j, j] <= _EPS:
                    continue                     # a feature no token used: keep its direction
                row = w[j] + (za[j] - zz[j] @ w) / zz[j, j]
                w[j] = row / row.norm().clamp(min=1.0)
        self.components_ = w

    def partial_fit(self, acts: torch.Tensor) -> "SNMF":
        """Fold one batch of activations (tokens, neurons) into the dictionary; returns ``self``."""
        acts = self._check(acts)
        if self.components_ is None:
            self._init(acts)
        assert self.zz_ is not None and self.za_ is not None
        old_zz, old_za = self.forget * self.zz_, self.forget * self.za_
        for _ in range(self.batch_iters):
            codes = self.transform(acts)
            self.zz_ = old_zz + codes.T @ codes
            self.za_ = old_za + codes.T @ acts
            self._update_dict()
        self.n_seen_ += int(acts.shape[0])
        return self

    def fit(self, acts: torch.Tensor, epochs: int = 20) -> "SNMF":
        """Batch semi-NMF of an in-memory matrix: ``epochs`` alternations of codes and dictionary, the
        statistics recomputed from scratch each time (the objective never increases)."""
        acts = self._check(acts)
        if self.components_ is None:
            self._init(acts)
        codes = self.transform(acts)
        for _ in range(epochs):
            codes = self.refine(acts, codes)
        self.n_seen_ = int(acts.shape[0])
        return self

    def refine(self, acts: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """One alternation on an in-memory matrix: dictionary for ``codes``, then codes continued from
        ``codes`` (the step :meth:`fit` repeats; each half lowers :func:`objective`)."""
        self.zz_ = codes.T @ codes
        self.za_ = codes.T @ acts
        self._update_dict()
        assert self.components_ is not None
        w = self.components_
        return _update_codes(codes, acts @ w.T, w @ w.T, self.penalty, self.code_iters)

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        if self.components_ is None:
            raise SNMFError("the factorisation is not fitted yet; call partial_fit first")
        return codes @ self.components_

    def state(self) -> dict[str, torch.Tensor]:
        """The fitted state as tensors (for safetensors)."""
        if self.components_ is None or self.zz_ is None or self.za_ is None:
            raise SNMFError("the factorisation is not fitted yet; call partial_fit first")
        return {"components": self.components_.cpu(), "zz": self.zz_.cpu(), "za": self.za_.cpu(),
                "scale": torch.tensor([self.scale_]), "n_seen": torch.tensor([self.n_seen_])}
