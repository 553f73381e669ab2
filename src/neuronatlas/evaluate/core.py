"""Evaluation primitives, each batched, padding-correct and able to run several conditions at once.

    >>> from neuronatlas.evaluate import target_logprobs, next_token_topk, generate
    >>> from neuronatlas.intervene import Ablate, NeuronSet
    >>> conds = [(), (Ablate(NeuronSet.parse("L1:0-9")),)]     # baseline + one ablation
    >>> r = target_logprobs(lm, ["The capital of France is"], [" Paris"], conditions=conds)
    >>> r.logprob.shape, r.first_correct.shape                     # (2, 1) each: conditions x prompts
    >>> gens = generate(lm, ["My favourite animal is"], conditions=conds, max_new_tokens=10)

A condition is a tuple of interventions; ``()`` is the unmodified model. The batch is repeated once
per condition, so C conditions cost one forward pass per batch, not C.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neuronatlas.errors import InterventionError
from neuronatlas.evaluate.prefix import PrefixKV, continuation_batch, gather_positions, plan_prefixes, split_ids
from neuronatlas.intervene.interventions import Condition, Intervention, intervene, normalize_conditions
from neuronatlas.intervene.shared import forward_conditions
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import batches, encode, encode_ids, pad_ids, repeat_batch

__all__ = ["TargetScores", "target_logprobs", "next_token_topk", "next_token_logprobs", "generate",
           "ConditionsArg", "chunk_conditions"]

ConditionsArg = Sequence[Intervention | Sequence[Intervention]]
ProgressFn = Callable[[int], None]


def default_max_rows(lm: LoadedModel) -> int:
    """Rows per forward pass when conditions are batched: 64 on a CPU, where larger passes spill the
    caches and run slower per row (measured in benchmarks/bench_record.py), 256 on an accelerator."""
    return 64 if lm.device.type == "cpu" else 256


def chunk_conditions(conds: list[Condition], max_rows: int | None, batch_rows: int,
                     lm: LoadedModel | None = None) -> list[list[Condition]]:
    """Split conditions into groups whose expanded batch stays under ``max_rows`` rows
    (``None``: :func:`default_max_rows` of ``lm``, else 64)."""
    if max_rows is None:
        max_rows = default_max_rows(lm) if lm is not None else 64
    per_group = max(1, max_rows // max(1, batch_rows))
    return [conds[i:i + per_group] for i in range(0, len(conds), per_group)]


@dataclass
class TargetScores:
    """Scores of target continuations, each of shape (conditions, prompts)."""

    logprob: torch.Tensor          # sum of log p over the target's tokens
    first_logprob: torch.Tensor    # log p of the target's first token
    first_rank: torch.Tensor       # rank of the first token (0 = the model's top choice)
    n_tokens: torch.Tensor         # (prompts,) target length in tokens
    head_correct: torch.Tensor     # greedy decoding yields every target token up to the first informative one
    exact: torch.Tensor            # greedy decoding yields the whole target (teacher-forced ranks all 0)

    @property
    def first_correct(self) -> torch.Tensor:
        """First-token accuracy; a leading token with no letter or digit (" ", " +", " .") does not
        count alone: the tokens up to the first one with a letter or digit must all be greedy."""
        return self.head_correct


def target_logprobs(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str], *,
                    conditions: ConditionsArg = ((),), batch_size: int = 8, max_rows: int | None = None,
                    progress: ProgressFn | None = None, prefixes: Sequence[str] | None = None,
                    prefix_cache: bool = True) -> TargetScores:
    """Log-probability of each target continuation after its prompt, under every condition.

    ``position='last'`` interventions act on the last prompt token. Each batch of ``batch_size``
    prompts is evaluated under up to ``max_rows // batch_size`` conditions per forward pass
    (:func:`neuronatlas.intervene.forward_conditions`: the layers below the first intervened one
    run once for all of them).

    ``prefixes``: prompt i is ``prefixes[i] + prompts[i]`` (e.g. few-shot demonstrations); prompts
    sharing a prefix run it once and continue from its cached keys/values
    (:mod:`neuronatlas.evaluate.prefix`; ``prefix_cache=False`` computes the same token ids without
    the cache). Results stay on ``lm.device`` until the end and are returned on the CPU.
    """
    if len(prompts) != len(targets):
        raise InterventionError(f"got {len(prompts)} prompts but {len(targets)} targets; give one target per prompt")
    conds = normalize_conditions(conditions)
    t_ids = encode_ids(lm, targets, add_special_tokens=False)
    if prefixes is None:
        pre_ids: list[list[int]] = [[] for _ in prompts]
        rem_ids = encode_ids(lm, prompts)
    else:
        pre_ids, rem_ids = split_ids(lm, prefixes, prompts)
    res = _Results.empty(len(conds), len(prompts), lm.device)
    head_len = [_informative_length(lm, t) for t in t_ids]
    plain, cached = plan_prefixes(pre_ids, rem_ids, prefixes is not None and prefix_cache)
    # similar lengths share a batch: left padding costs as much as a real token (25% of the relation
    # study's tokens when batches followed the fact order, 4% when sorted by length)
    plain = sorted(plain, key=lambda i: (len(pre_ids[i]) + len(rem_ids[i]) + len(t_ids[i]), i))
    for prefix, rems in cached:
        _targets_cached(lm, prefix, rems, t_ids, head_len, conds, res, batch_size, max_rows, progress)
    for rows in batches(len(plain), batch_size):
        idx = [plain[r] for r in rows]
        _targets_plain(lm, [pre_ids[i] + rem_ids[i] for i in idx], idx, t_ids, head_len, conds, res, max_rows)
        if progress:
            progress(len(idx))
    return res.scores(torch.tensor([len(t) for t in t_ids]))


@dataclass
class _Results:
    """Outputs of :func:`target_logprobs` under construction, on the model's device."""

    logprob: torch.Tensor
    first_lp: torch.Tensor
    first_rank: torch.Tensor
    head: torch.Tensor
    exact: torch.Tensor

    @classmethod
    def empty(cls, c: int, n: int, device: torch.device) -> _Results:
        def z(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(c, n, dtype=dtype, device=device)

        return cls(z(torch.float32), z(torch.float32), z(torch.long), z(torch.bool), z(torch.bool))

    def fill(self, sl: slice, idx: torch.Tensor, logp: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor,
             head_len: torch.Tensor) -> None:
        """Score rows ``idx`` of conditions ``sl``: ``logp`` (G, B, K, V), position k predicting ``tgt[:, k]``."""
        g, k = logp.shape[0], logp.shape[2]
        lps = logp.gather(-1, tgt[None, :, :, None].expand(g, -1, -1, 1)).squeeze(-1)
        lps = torch.where(valid[None], lps, torch.zeros_like(lps))
        self.logprob[sl, idx] = lps.sum(-1)
        self.first_lp[sl, idx] = lps[..., 0]
        ranks = (logp > lps[..., None]).sum(-1)                     # (G, B, K)
        self.first_rank[sl, idx] = ranks[..., 0]
        wrong = (ranks > 0) & valid[None]
        upto = torch.arange(k, device=logp.device)[None, :] < head_len[:, None]
        self.head[sl, idx] = ~(wrong & upto[None]).any(-1)
        self.exact[sl, idx] = ~wrong.any(-1)

    def scores(self, n_tokens: torch.Tensor) -> TargetScores:
        return TargetScores(self.logprob.cpu(), self.first_lp.cpu(), self.first_rank.cpu(), n_tokens,
                            self.head.cpu(), self.exact.cpu())


def _target_tensors(t_lens: list[int], rows: list[int], t_ids: list[list[int]], head_len: list[int],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices, padded target ids (B, K), their validity mask and each row's informative length."""
    k = max(t_lens)
    tgt = torch.tensor([t_ids[i] + [0] * (k - len(t_ids[i])) for i in rows], dtype=torch.long, device=device)
    valid = torch.tensor([[j < t for j in range(k)] for t in t_lens], dtype=torch.bool, device=device)
    return (torch.tensor(rows, dtype=torch.long, device=device), tgt, valid,
            torch.tensor([head_len[i] for i in rows], device=device))


def _targets_plain(lm: LoadedModel, p_ids: list[list[int]], rows: list[int], t_ids: list[list[int]],
                   head_len: list[int], conds: list[Condition], res: _Results, max_rows: int | None) -> None:
    """One left-padded batch of whole prompts (prompt + target ids), every condition."""
    device = lm.device
    batch = pad_ids(lm, [p + t_ids[i] for p, i in zip(p_ids, rows)], "left")
    width = batch["input_ids"].shape[1]
    t_lens = [len(t_ids[i]) for i in rows]
    keep = max(t_lens) + 1  # left padding aligns ends: targets lie in the last `keep` positions
    last_prompt = torch.tensor([width - t - 1 for t in t_lens], device=device)
    # (B, K) offsets into the kept window, padded with a valid dummy
    offs = torch.tensor([[keep - 1 - t + j if j < t else 0 for j in range(keep - 1)] for t in t_lens], device=device)
    idx, tgt, valid, hl = _target_tensors(t_lens, rows, t_ids, head_len, device)
    b_idx = torch.arange(len(rows), device=device)[:, None]
    for start, group in _groups(conds, max_rows, len(rows), lm):
        logits = forward_conditions(lm, batch, group, last_index=last_prompt, logits_to_keep=keep).logits.float()
        logp = logits.log_softmax(-1).view(len(group), len(rows), keep, -1)[:, b_idx, offs]   # (G, B, K, V)
        res.fill(slice(start, start + len(group)), idx, logp, tgt, valid, hl)


def _targets_cached(lm: LoadedModel, prefix: list[int], rems: dict[int, list[int]], t_ids: list[list[int]],
                    head_len: list[int], conds: list[Condition], res: _Results, batch_size: int,
                    max_rows: int | None, progress: ProgressFn | None) -> None:
    """Rows ``rems`` (row -> ids after the prefix) sharing ``prefix``: the prefix runs once per
    prefix variant, every batch continues it."""
    device = lm.device
    kv = PrefixKV.compute(lm, prefix, conds)
    order = sorted(rems, key=lambda i: len(rems[i]) + len(t_ids[i]))   # similar lengths pad less
    for chunk in batches(len(order), batch_size):
        rows = [order[r] for r in chunk]
        batch = continuation_batch(lm, len(prefix), [rems[i] + t_ids[i] for i in rows])
        t_lens = [len(t_ids[i]) for i in rows]
        last = [len(rems[i]) - 1 for i in rows]
        # position last + k predicts target token k; padded slots read a valid dummy position
        pos = torch.tensor([[p + j if j < t else p for j in range(max(t_lens))] for p, t in zip(last, t_lens)],
                           device=device)
        idx, tgt, valid, hl = _target_tensors(t_lens, rows, t_ids, head_len, device)
        last_t = torch.tensor(last, device=device)
        for start, group in _groups(conds, max_rows, len(rows), lm):
            with gather_positions(lm, pos.repeat(len(group), 1)):
                logits = forward_conditions(lm, batch, group, last_index=last_t, past=kv,
                                            past_variants=kv.variant_of[start:start + len(group)]).logits.float()
            logp = logits.log_softmax(-1).view(len(group), len(rows), pos.shape[1], -1)
            res.fill(slice(start, start + len(group)), idx, logp, tgt, valid, hl)
        if progress:
            progress(len(rows))


def _informative_length(lm: LoadedModel, ids: Sequence[int]) -> int:
    """Number of target tokens up to and including the first one with a letter or digit."""
    for i in range(len(ids)):
        if any(ch.isalnum() for ch in lm.tokenizer.decode([ids[i]])):
            return i + 1
    return len(ids)


def _groups(conds: list[Condition], max_rows: int | None, batch_rows: int,
            lm: LoadedModel | None = None) -> list[tuple[int, list[Condition]]]:
    out, start = [], 0
    for group in chunk_conditions(conds, max_rows, batch_rows, lm):
        out.append((start, group))
        start += len(group)
    return out


def next_token_logprobs(lm: LoadedModel, prompts: Sequence[str], *, conditions: ConditionsArg = ((),),
                        batch_size: int = 16, max_rows: int | None = None, prefixes: Sequence[str] | None = None,
                        prefix_cache: bool = True) -> torch.Tensor:
    """Full next-token log-distribution, shape (conditions, prompts, vocab), built on ``lm.device``
    and returned on the CPU. Mind the memory. ``prefixes``: as in :func:`target_logprobs`."""
    conds = normalize_conditions(conditions)
    head = lm.model.get_output_embeddings()
    vocab = lm.model.config.vocab_size if head is None else head.weight.shape[0]
    out = torch.zeros(len(conds), len(prompts), vocab, device=lm.device)
    if prefixes is None:
        pre_ids: list[list[int]] = [[] for _ in prompts]
        rem_ids = encode_ids(lm, prompts)
    else:
        pre_ids, rem_ids = split_ids(lm, prefixes, prompts)
    plain, cached = plan_prefixes(pre_ids, rem_ids, prefixes is not None and prefix_cache)
    for prefix, rems in cached:
        kv = PrefixKV.compute(lm, prefix, conds)
        order = sorted(rems, key=lambda i: len(rems[i]))
        for chunk in batches(len(order), batch_size):
            rows = [order[r] for r in chunk]
            batch = continuation_batch(lm, len(prefix), [rems[i] for i in rows])
            last = torch.tensor([len(rems[i]) - 1 for i in rows], device=lm.device)
            idx = torch.tensor(rows, device=lm.device)
            for start, group in _groups(conds, max_rows, len(rows), lm):
                with gather_positions(lm, last.repeat(len(group))[:, None]):
                    logits = forward_conditions(lm, batch, group, last_index=last, past=kv,
                                                past_variants=kv.variant_of[start:start + len(group)]).logits
                logp = logits[:, 0].float().log_softmax(-1).view(len(group), len(rows), -1)
                out[start:start + len(group), idx] = logp[..., :vocab]
    plain = sorted(plain, key=lambda i: (len(pre_ids[i]) + len(rem_ids[i]), i))     # less left padding
    for chunk in batches(len(plain), batch_size):
        rows = [plain[r] for r in chunk]
        batch = pad_ids(lm, [pre_ids[i] + rem_ids[i] for i in rows], "left")
        idx = torch.tensor(rows, device=lm.device)
        for start, group in _groups(conds, max_rows, len(rows), lm):
            logits = forward_conditions(lm, batch, group, logits_to_keep=1).logits[:, -1].float()
            logp = logits.log_softmax(-1).view(len(group), len(rows), -1)
            out[start:start + len(group), idx] = logp[..., :vocab]
    return out.cpu()


def next_token_topk(lm: LoadedModel, prompts: Sequence[str], *, k: int = 10, conditions: ConditionsArg = ((),),
                    batch_size: int = 16, prefixes: Sequence[str] | None = None) -> list[list[list[tuple[str, float]]]]:
    """Top-k next tokens with probabilities: ``[condition][prompt] -> [(token, prob), ...]``."""
    logp = next_token_logprobs(lm, prompts, conditions=conditions, batch_size=batch_size, prefixes=prefixes)
    values, ids = logp.exp().topk(k, dim=-1)
    return [[[(lm.tokenizer.decode([int(t)]), float(p)) for t, p in zip(ids[c, i], values[c, i])]
             for i in range(len(prompts))] for c in range(logp.shape[0])]


def generate(lm: LoadedModel, prompts: Sequence[str], *, conditions: ConditionsArg = ((),),
             max_new_tokens: int = 20, stop: Sequence[str] = (), do_sample: bool = False,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
             max_rows: int = 128, progress: ProgressFn | None = None) -> list[list[str]]:
    """Continuations ``[condition][prompt]`` (greedy unless ``do_sample``), cut at the first stop string."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    conds = normalize_conditions(conditions)
    out: list[list[str]] = [[""] * len(prompts) for _ in conds]
    tok = lm.tokenizer

    class _AllStopped(StoppingCriteria):
        def __init__(self, width: int) -> None:
            self.width = width

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: object) -> torch.Tensor:
            texts = tok.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
            done = all(any(s in t for s in stop) for t in texts)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    for rows in batches(len(prompts), batch_size):
        batch = encode(lm, [prompts[i] for i in rows], padding_side="left")
        width = batch["input_ids"].shape[1]
        for start, group in _groups(conds, max_rows, len(rows)):
            big = repeat_batch(batch, len(group))
            big.pop("position_ids")  # generate derives positions from the attention mask
            criteria = StoppingCriteriaList([_AllStopped(width)]) if stop else None
            rng = torch.random.fork_rng(devices=[]) if do_sample else contextlib.nullcontext()
            with rng, intervene(lm, group, rows_per_condition=len(rows)), torch.inference_mode():
                if do_sample:
                    torch.manual_seed(seed)
                gen = lm.model.generate(
                    **{k: v.to(lm.device) for k, v in big.items()}, max_new_tokens=max_new_tokens,
                    do_sample=do_sample, temperature=temperature if do_sample else None,
                    top_p=None, top_k=None, pad_token_id=tok.pad_token_id, stopping_criteria=criteria,
                )
            texts = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
            for g in range(len(group)):
                for j, i in enumerate(rows):
                    out[start + g][i] = _cut(texts[g * len(rows) + j], stop)
        if progress:
            progress(len(rows))
    return out


def _cut(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]
