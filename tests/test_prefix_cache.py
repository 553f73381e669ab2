"""Shared-prefix KV caching: cached evaluation equals the uncached computation of the same token ids.

Tolerance: float32 models, absolute 1e-4 on summed target log-probabilities and on next-token
log-probabilities (observed differences are 0 to ~1e-6: the cached pass multiplies the same rows in
differently shaped matrices); ranks and greedy-correctness flags must be identical.
"""

from __future__ import annotations

import sys

import pytest
import torch

from neuronatlas.errors import InterventionError, SelectionError
from neuronatlas.evaluate import next_token_logprobs, target_logprobs
from neuronatlas.evaluate.perplexity import text_nll
from neuronatlas.evaluate.prefix import plan_prefixes, split_ids
from neuronatlas.intervene import Ablate, Clamp, NeuronSet, Scale, intervene
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record.hooks import count_hooks

ATOL = 1e-4
# longer than the tiny Gemma 3's sliding window (16 tokens), so its sliding layers see a cut window
DEMOS = ("The capital of Japan is Tokyo. Berlin is the capital of Germany. Madrid is in Spain.\n"
         "The capital of France is Paris. Iron has the symbol Fe.\n")
OTHER = "Today I saw a cat and a bird. Gold has the symbol Au.\n"
PROMPTS = ["The capital of France is", "Rome is in", "My favourite animal is a", "Le chat est", "Iron has the symbol",
           "0 1 2 3 4 5 6 7"]
TARGETS = [" Paris", " Italy", " dog", " noir. Der Hund", " Fe", " 8 9"]


def _conditions(lm):
    n = lm.n_neurons
    top = lm.n_layers - 1
    return [(),
            (Ablate(NeuronSet.of([(top, j) for j in range(0, n, 2)])),),            # all positions, upper layer
            (Clamp(NeuronSet.of([(0, j) for j in range(6)]), 3.0),),                 # all positions, layer 0
            (Clamp(NeuronSet.of([(top, j) for j in range(6)]), 4.0, position="last"),),
            (Scale(NeuronSet.of([(0, 1), (0, 2)]), 0.0, position="last"),
             Ablate(NeuronSet.of([(top, 3)]))),                                      # mixed: one of each
            ]


def _assert_same(a, b):
    torch.testing.assert_close(a.logprob, b.logprob, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.first_logprob, b.first_logprob, atol=ATOL, rtol=0)
    assert torch.equal(a.first_rank, b.first_rank)
    assert torch.equal(a.head_correct, b.head_correct) and torch.equal(a.exact, b.exact)
    assert torch.equal(a.n_tokens, b.n_tokens)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt2", "opt"])
def test_cached_equals_uncached(family):
    """Every condition kind, remainders of different lengths in one batch (left-padded without the
    cache, right-padded after the cached prefix), several batches continuing one stored prefix."""
    lm = tiny_model(family)
    conds = _conditions(lm)
    prefixes = [DEMOS] * len(PROMPTS)
    cached = target_logprobs(lm, PROMPTS, TARGETS, conditions=conds, prefixes=prefixes, batch_size=4)
    plain = target_logprobs(lm, PROMPTS, TARGETS, conditions=conds, prefixes=prefixes, batch_size=4,
                            prefix_cache=False)
    _assert_same(cached, plain)
    for c in range(1, len(conds)):                    # every condition really changed the scores
        assert not torch.allclose(cached.logprob[c], cached.logprob[0], atol=1e-4)
    assert count_hooks(lm.model) == 0
    # conditions split over several passes, and no layer sharing: the same numbers
    split = target_logprobs(lm, PROMPTS, TARGETS, conditions=conds, prefixes=prefixes, batch_size=4, max_rows=4)
    _assert_same(split, plain)
    nxt = next_token_logprobs(lm, PROMPTS, conditions=conds, prefixes=prefixes, batch_size=4)
    ref = next_token_logprobs(lm, PROMPTS, conditions=conds, prefixes=prefixes, batch_size=4, prefix_cache=False)
    torch.testing.assert_close(nxt, ref, atol=ATOL, rtol=0)


def test_reference_is_plain_hf_on_concatenated_ids():
    """The uncached reference scores prefix ids + prompt ids + target ids exactly as one plain HF
    forward pass of that sequence does (interventions applied by hand through ``intervene``)."""
    lm = tiny_model("llama")
    conds = _conditions(lm)
    scores = target_logprobs(lm, PROMPTS[:3], TARGETS[:3], conditions=conds, prefixes=[DEMOS] * 3)
    pre, rem = split_ids(lm, [DEMOS] * 3, PROMPTS[:3])
    assert pre[0] == lm.tokenizer(DEMOS)["input_ids"]
    for i, t in enumerate(TARGETS[:3]):
        t_ids = lm.tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([pre[i] + rem[i] + t_ids])
        start = len(pre[i]) + len(rem[i]) - 1
        for c, cond in enumerate(conds):
            with intervene(lm, [cond], last_index=torch.tensor([start])), torch.inference_mode():
                logp = lm.model(input_ids=ids).logits[0].float().log_softmax(-1)
            direct = sum(float(logp[start + k, tok]) for k, tok in enumerate(t_ids))
            assert abs(float(scores.logprob[c, i]) - direct) < ATOL


def test_a_token_straddling_the_boundary_reads_the_joined_text():
    """``" "`` ending the prefix and ``"1"`` starting the prompt are one token (``" 1"``) in the
    joined text: the cached path must score that text, not ``" "`` then ``"1"``."""
    lm = tiny_model("llama")
    tok = lm.tokenizer
    prefix, prompts = "Label: 0\nLabel: ", ["1\nLabel:", "1 and", "0"]
    joined = [prefix + p for p in prompts]
    separate = tok(prefix)["input_ids"] + tok(prompts[0], add_special_tokens=False)["input_ids"]
    assert separate != tok(joined[0])["input_ids"]             # the case this test is about
    pre, rem = split_ids(lm, [prefix] * 3, prompts)
    assert all(p + r == tok(j)["input_ids"] for p, r, j in zip(pre, rem, joined))
    assert len(pre[0]) == len(tok(prefix)["input_ids"]) - 1 and pre[0] == pre[1] == pre[2]
    cached = next_token_logprobs(lm, prompts, prefixes=[prefix] * 3)
    plain = next_token_logprobs(lm, joined)
    assert torch.allclose(cached, plain, atol=ATOL)


def _widths(lm, conds, batch_size):
    """(rows, tokens) of every forward pass of the model during a cached evaluation."""
    widths: list[tuple[int, int]] = []
    handle = lm.model.register_forward_pre_hook(
        lambda _m, args, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        scores = target_logprobs(lm, PROMPTS, TARGETS, conditions=conds, prefixes=[DEMOS] * len(PROMPTS),
                                 batch_size=batch_size, max_rows=64)
    finally:
        handle.remove()
    return widths, scores


def test_prefix_runs_once_per_variant_not_per_prompt():
    """One prefix pass of one row per distinct set of all-position interventions; every other pass
    carries only the tokens after the prefix."""
    lm = tiny_model("llama")
    n_prefix = len(lm.tokenizer(DEMOS)["input_ids"])
    # variants: clean (baseline, last-only), the ablation, the clamp, the mixed condition's ablation
    widths, _ = _widths(lm, _conditions(lm), batch_size=2)
    assert widths[0] == (4, n_prefix)
    assert len(widths) == 1 + 3 and all(w[1] < n_prefix for w in widths[1:])  # a layer-0 clamp: nothing shared


def test_shared_layers_continue_the_clean_prefix():
    """Conditions acting only from layer 1 up: per batch, layer 0 runs once on B rows continuing the
    clean prefix, then the upper layers on C x B rows continuing each condition's prefix variant."""
    lm = tiny_model("llama")
    conds = [c for i, c in enumerate(_conditions(lm)) if i in (0, 1, 3)]
    n_prefix = len(lm.tokenizer(DEMOS)["input_ids"])
    widths, cached = _widths(lm, conds, batch_size=3)
    assert widths[0] == (2, n_prefix)                       # clean + the all-position ablation
    assert [w[0] for w in widths[1:]] == [3, 9, 3, 9]       # shared pass, full pass, per batch of 3
    plain = target_logprobs(lm, PROMPTS, TARGETS, conditions=conds, prefixes=[DEMOS] * len(PROMPTS), batch_size=3,
                            prefix_cache=False)
    _assert_same(cached, plain)


def test_mixed_prefixes_empty_remainders_and_no_prefix():
    """Rows with different prefixes, an empty prefix, and a prompt that is all prefix."""
    lm = tiny_model("qwen2")
    conds = _conditions(lm)
    prompts = PROMPTS + ["", "The capital of Japan is"]
    targets = TARGETS + [" The", " Tokyo"]
    prefixes = [DEMOS, OTHER, DEMOS, "", OTHER, DEMOS, DEMOS, ""]
    plain_rows, cached = plan_prefixes(*split_ids(lm, prefixes, prompts))
    assert len(cached) == 2 and 3 in plain_rows   # the tiny tokenizer adds no BOS: "" has no tokens
    a = target_logprobs(lm, prompts, targets, conditions=conds, prefixes=prefixes, batch_size=3)
    b = target_logprobs(lm, prompts, targets, conditions=conds, prefixes=prefixes, batch_size=3, prefix_cache=False)
    _assert_same(a, b)
    # no prefixes at all is the unchanged zero-shot path
    zero = target_logprobs(lm, prompts[:6], targets[:6], conditions=conds)
    with_empty = target_logprobs(lm, prompts[:6], targets[:6], conditions=conds, prefixes=[""] * 6)
    _assert_same(zero, with_empty)


def test_bad_prefixes_and_hooks_after_errors():
    lm = tiny_model("llama")
    with pytest.raises(InterventionError, match="2 prefixes for 3 prompts"):
        target_logprobs(lm, PROMPTS[:3], TARGETS[:3], prefixes=[DEMOS, DEMOS])
    with pytest.raises(SelectionError, match="neuron index 99"):
        target_logprobs(lm, PROMPTS[:3], TARGETS[:3], prefixes=[DEMOS] * 3,
                        conditions=[(), (Ablate(NeuronSet.of([(1, 99)])),)])
    assert count_hooks(lm.model) == 0


# --- host round-trips ------------------------------------------------------------------------------

_HOST = ("cpu", "tolist", "numpy", "item", "__float__", "__int__", "__index__", "__bool__")


@pytest.fixture
def host_calls(monkeypatch):
    """Every tensor-to-host conversion made by NeuronAtlas code (not by transformers or torch)."""
    seen: list[str] = []

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            frame = sys._getframe(1)
            module = frame.f_globals.get("__name__", "")
            if module.startswith("neuronatlas") and not module.startswith("neuronatlas.models.tiny"):
                seen.append(f"{module}:{frame.f_lineno} {name}")
            return original(self, *args, **kwargs)

        return counted

    for name in _HOST:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    return seen


def test_evaluation_keeps_batches_on_the_device(host_calls):
    """No conversion to the host happens per batch: evaluating 1 or 6 batches makes the same
    conversions (only the final copies of the results), with and without a cached prefix."""
    lm = tiny_model("llama")
    conds = _conditions(lm)

    def run(n: int) -> list[str]:
        host_calls.clear()
        target_logprobs(lm, PROMPTS[:n], TARGETS[:n], conditions=conds, batch_size=1)
        target_logprobs(lm, PROMPTS[:n], TARGETS[:n], conditions=conds, batch_size=1, prefixes=[DEMOS] * n)
        next_token_logprobs(lm, PROMPTS[:n], conditions=conds, batch_size=1, prefixes=[DEMOS] * n)
        text_nll(lm, PROMPTS[:n], conditions=conds, batch_size=1)
        return sorted(host_calls)

    one, six = run(1), run(6)
    assert one == six, sorted(set(six) - set(one))
    assert all(c.endswith(" cpu") for c in one), one      # the final copies of the results


@pytest.mark.slow
def test_cached_equals_uncached_on_the_embedded_model():
    from neuronatlas.models import load_model

    lm = load_model("default")
    demos = "The capital of Japan is Tokyo.\nThe capital of Italy is Rome.\nThe capital of Kenya is Nairobi.\n"
    prompts = ["The capital of France is", "The capital of the United Kingdom is", "The capital of Peru is"]
    targets = [" Paris", " London", " Lima"]
    conds = [(), (Ablate(NeuronSet.of([(12, j) for j in range(200)])),),
             (Clamp(NeuronSet.of([(20, j) for j in range(20)]), 2.0, position="last"),)]
    a = target_logprobs(lm, prompts, targets, conditions=conds, prefixes=[demos] * 3, batch_size=2)
    b = target_logprobs(lm, prompts, targets, conditions=conds, prefixes=[demos] * 3, batch_size=2,
                        prefix_cache=False)
    _assert_same(a, b)
    assert bool(a.first_correct[0].all())        # 3-shot: the model knows these capitals
