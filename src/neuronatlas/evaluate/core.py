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
                    progress: ProgressFn | None = None) -> TargetScores:
    """Log-probability of each target continuation after its prompt, under every condition.

    ``position='last'`` interventions act on the last prompt token. Each batch of ``batch_size``
    prompts is evaluated under up to ``max_rows // batch_size`` conditions per forward pass
    (:func:`neuronatlas.intervene.forward_conditions`: the layers below the first intervened one
    run once for all of them).
    """
    if len(prompts) != len(targets):
        raise InterventionError(f"got {len(prompts)} prompts but {len(targets)} targets; give one target per prompt")
    conds = normalize_conditions(conditions)
    p_ids = encode_ids(lm, prompts)
    t_ids = encode_ids(lm, targets, add_special_tokens=False)
    n, c_total = len(prompts), len(conds)
    logprob = torch.zeros(c_total, n)
    first_lp = torch.zeros(c_total, n)
    first_rank = torch.zeros(c_total, n, dtype=torch.long)
    head = torch.zeros(c_total, n, dtype=torch.bool)
    exact = torch.zeros(c_total, n, dtype=torch.bool)
    head_len = torch.tensor([_informative_length(lm, t) for t in t_ids])
    for rows in batches(n, batch_size):
        seqs = [p_ids[i] + t_ids[i] for i in rows]
        batch = pad_ids(lm, seqs, "left")
        width = batch["input_ids"].shape[1]
        t_len = torch.tensor([len(t_ids[i]) for i in rows])
        keep = int(t_len.max()) + 1  # left padding aligns ends: targets lie in the last `keep` positions
        last_prompt = width - t_len - 1
        # (B, Tmax) offsets into the kept window and the target ids, padded with a valid dummy
        offs = (keep - 1 - t_len)[:, None] + torch.arange(keep - 1)[None, :]
        valid = torch.arange(keep - 1)[None, :] < t_len[:, None]
        offs = torch.where(valid, offs, torch.zeros_like(offs))
        tgt = torch.zeros(len(rows), keep - 1, dtype=torch.long)
        for j, i in enumerate(rows):
            tgt[j, : len(t_ids[i])] = torch.tensor(t_ids[i])
        for group_start, group in _groups(conds, max_rows, len(rows), lm):
            logits = forward_conditions(lm, batch, group, last_index=last_prompt, logits_to_keep=keep).logits.float()
            logp = logits.log_softmax(-1).view(len(group), len(rows), keep, -1)
            b_idx = torch.arange(len(rows))[:, None]
            at = logp[:, b_idx, offs]                                   # (G, B, Tmax, V)
            lps = at.gather(-1, tgt[None, :, :, None].expand(len(group), -1, -1, 1)).squeeze(-1)
            lps = torch.where(valid[None], lps, torch.zeros_like(lps))
            sl = slice(group_start, group_start + len(group))
            idx = torch.tensor(list(rows))
            logprob[sl, idx] = lps.sum(-1)
            first_lp[sl, idx] = lps[..., 0]
            ranks = (at > lps[..., None]).sum(-1)                       # (G, B, Tmax)
            first_rank[sl, idx] = ranks[..., 0]
            wrong = (ranks > 0) & valid[None]
            upto = torch.arange(keep - 1)[None, :] < head_len[idx][:, None]
            head[sl, idx] = ~(wrong & upto[None]).any(-1)
            exact[sl, idx] = ~wrong.any(-1)
        if progress:
            progress(len(rows))
    return TargetScores(logprob, first_lp, first_rank, torch.tensor([len(t) for t in t_ids]), head, exact)


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
                        batch_size: int = 16, max_rows: int | None = None) -> torch.Tensor:
    """Full next-token log-distribution, shape (conditions, prompts, vocab). Mind the memory."""
    conds = normalize_conditions(conditions)
    out = torch.zeros(len(conds), len(prompts), lm.model.config.vocab_size if lm.model.get_output_embeddings() is None
                      else lm.model.get_output_embeddings().weight.shape[0])
    for rows in batches(len(prompts), batch_size):
        batch = encode(lm, [prompts[i] for i in rows], padding_side="left")
        for start, group in _groups(conds, max_rows, len(rows), lm):
            logits = forward_conditions(lm, batch, group, logits_to_keep=1).logits[:, -1].float()
            logp = logits.log_softmax(-1).view(len(group), len(rows), -1)
            out[start:start + len(group), rows.start:rows.stop] = logp[..., :out.shape[-1]]
    return out


def next_token_topk(lm: LoadedModel, prompts: Sequence[str], *, k: int = 10, conditions: ConditionsArg = ((),),
                    batch_size: int = 16) -> list[list[list[tuple[str, float]]]]:
    """Top-k next tokens with probabilities: ``[condition][prompt] -> [(token, prob), ...]``."""
    logp = next_token_logprobs(lm, prompts, conditions=conditions, batch_size=batch_size)
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
