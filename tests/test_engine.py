"""Core engine checks on tiny random models of several families, against hand computations."""

from __future__ import annotations

import pytest
import torch

from neuronatlas.errors import InterventionError, SelectionError, SiteError
from neuronatlas.evaluate import generate, target_logprobs
from neuronatlas.intervene import Ablate, Clamp, NeuronSet, Scale, Steer, intervene
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record.batching import encode, forward, repeat_batch
from neuronatlas.record.hooks import count_hooks, site_hooks

from conftest import ALL_FAMILIES, TEXTS

SENTS = TEXTS["capital"][:3]


def _logits(lm, batch):
    return forward(lm, batch).logits


def test_noop_intervention_is_bit_identical(lm):
    batch = encode(lm, SENTS, padding_side="left")
    plain = _logits(lm, batch)
    with intervene(lm, [()]):
        same = _logits(lm, batch)
    with site_hooks(lm, "mlp", observe=lambda layer, h: None, batch_size=len(SENTS)):
        observed = _logits(lm, batch)
    assert torch.equal(plain, same)
    assert torch.equal(plain, observed)


def test_plain_forward_matches_hf(lm):
    """Our forward (position ids from the mask) equals HF's on unpadded input."""
    ids = lm.tokenizer(SENTS[0], return_tensors="pt")["input_ids"]
    hf = lm.model(input_ids=ids).logits
    ours = _logits(lm, encode(lm, SENTS[:1]))
    assert torch.equal(hf, ours)


def _manual_edit(lm, batch, layer, fn):
    """Run with the site activation edited by hand through a raw hook."""
    module = lm.spec.hook_module(lm.model, layer, lm.spec.components[0])

    def pre(_m, args):
        h = args[0].clone()
        fn(h)
        return (h, *args[1:])

    handle = module.register_forward_pre_hook(pre)
    try:
        return _logits(lm, batch)
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_zero_ablation_equals_manual(family):
    lm = tiny_model(family)
    batch = encode(lm, SENTS, padding_side="left")
    ns = NeuronSet.of([(1, 3), (1, 7)])
    with intervene(lm, [Ablate(ns)], rows_per_condition=len(SENTS)):
        ours = _logits(lm, batch)

    def zero(h):
        h[..., [3, 7]] = 0

    manual = _manual_edit(lm, batch, 1, zero)
    assert torch.equal(ours, manual)
    assert not torch.equal(ours, _logits(lm, batch))


def test_clamp_scale_steer_equal_manual(llama):
    lm = llama
    batch = encode(lm, SENTS, padding_side="left")
    ns = NeuronSet.of([(0, 2), (0, 5)])
    with intervene(lm, [Clamp(ns, (4.0, -1.5))]):
        clamped = _logits(lm, batch)

    def clamp(h):
        h[..., 2] = 4.0
        h[..., 5] = -1.5

    assert torch.equal(clamped, _manual_edit(lm, batch, 0, clamp))
    with intervene(lm, [Scale(ns, 3.0)]):
        scaled = _logits(lm, batch)

    def scale(h):
        h[..., [2, 5]] = h[..., [2, 5]] * 3.0

    assert torch.equal(scaled, _manual_edit(lm, batch, 0, scale))
    direction = tuple(float(i % 3) for i in range(lm.n_neurons))
    with intervene(lm, [Steer(0, direction, alpha=0.5)]):
        steered = _logits(lm, batch)

    def steer(h):
        h += 0.5 * torch.tensor(direction)

    assert torch.allclose(steered, _manual_edit(lm, batch, 0, steer), atol=1e-6)


def test_last_position_only(llama):
    lm = llama
    batch = encode(lm, SENTS, padding_side="left")
    ns = NeuronSet.of([(0, 1)])
    with intervene(lm, [Clamp(ns, 9.0, position="last")]):
        ours = _logits(lm, batch)

    def clamp_last(h):
        h[:, -1, 1] = 9.0

    assert torch.equal(ours, _manual_edit(lm, batch, 0, clamp_last))
    base = _logits(lm, batch)
    real = batch["attention_mask"].bool()[:, :-1]  # pad rows may attend anywhere; real earlier tokens must not change
    assert torch.equal(ours[:, :-1][real], base[:, :-1][real])


def test_no_hook_survives_even_after_exception(lm):
    before = count_hooks(lm.model)
    ns = NeuronSet.of([(0, 1), (1, 2)])
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(lm, [Ablate(ns)]):
            assert count_hooks(lm.model) > before
            raise RuntimeError("boom")
    assert count_hooks(lm.model) == before == 0
    with pytest.raises(ValueError):
        with site_hooks(lm, "mlp", observe=lambda layer, h: None):
            raise ValueError("x")
    assert count_hooks(lm.model) == 0


def test_batched_conditions_equal_sequential(lm):
    batch = encode(lm, SENTS, padding_side="left")
    conds = [(), (Ablate(NeuronSet.of([(0, 1), (1, 4)])),), (Clamp(NeuronSet.of([(1, 0)]), 2.0),),
             (Scale(NeuronSet.of([(0, 3)]), 0.5), Ablate(NeuronSet.of([(1, 9)])))]
    with intervene(lm, conds, rows_per_condition=len(SENTS)):
        big = _logits(lm, repeat_batch(batch, len(conds)))
    for c, cond in enumerate(conds):
        with intervene(lm, [cond], rows_per_condition=len(SENTS)):
            one = _logits(lm, batch)
        assert torch.allclose(big[c * len(SENTS):(c + 1) * len(SENTS)], one, atol=1e-5)


def test_target_logprobs_batched_and_direct(lm):
    prompts, targets = SENTS, [" Paris", " dog", " is the"]
    conds = [(), (Ablate(NeuronSet.of([(1, j) for j in range(10)])),)]
    scores = target_logprobs(lm, prompts, targets, conditions=conds, batch_size=2)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        p_ids = lm.tokenizer(p)["input_ids"]
        t_ids = lm.tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + t_ids])
        for c, cond in enumerate(conds):
            with intervene(lm, [cond]):
                logp = lm.model(input_ids=ids).logits[0].log_softmax(-1)
            direct = sum(logp[len(p_ids) - 1 + k, tok] for k, tok in enumerate(t_ids))
            assert torch.isclose(scores.logprob[c, i], direct, atol=1e-4)
            first = logp[len(p_ids) - 1]
            assert int(scores.first_rank[c, i]) == int((first > first[t_ids[0]]).sum())


def test_generate_conditions_and_padding(llama):
    lm = llama
    conds = [(), (Clamp(NeuronSet.of([(1, j) for j in range(32)]), 5.0),)]
    gens = generate(lm, SENTS, conditions=conds, max_new_tokens=5)
    assert len(gens) == 2 and all(len(g) == len(SENTS) for g in gens)
    one_by_one = [generate(lm, [s], max_new_tokens=5)[0][0] for s in SENTS]
    assert gens[0] == one_by_one  # left padding does not change greedy output
    assert gens[0] != gens[1]


def test_sampling_is_seeded(llama):
    a = generate(llama, SENTS[:2], max_new_tokens=6, do_sample=True, seed=3)
    b = generate(llama, SENTS[:2], max_new_tokens=6, do_sample=True, seed=3)
    assert a == b


def test_bad_interventions_have_clear_errors(llama):
    with pytest.raises(SelectionError, match="neuron index 99"):
        with intervene(llama, [Ablate(NeuronSet.of([(0, 99)]))]):
            pass
    with pytest.raises(SelectionError, match="layer 7"):
        with intervene(llama, [Ablate(NeuronSet.of([(7, 0)]))]):
            pass
    with pytest.raises(InterventionError, match="mean ablation needs"):
        Ablate(NeuronSet.of([(0, 1)]), mode="mean")
    with pytest.raises(InterventionError, match="3 values for 2 neurons"):
        Clamp(NeuronSet.of([(0, 1), (0, 2)]), (1.0, 2.0, 3.0))
    with pytest.raises(SiteError, match="not available for gpt2"):
        with intervene(tiny_model("gpt2"), [Ablate(NeuronSet.of([(0, 1)], component="gate"))]):
            pass


def test_mean_ablation(llama):
    batch = encode(llama, SENTS)
    ns = NeuronSet.of([(0, 1), (1, 2)])
    with intervene(llama, [Ablate(ns, mode="mean", values=(0.25, -0.5))]):
        ours = _logits(llama, batch)
    with intervene(llama, [Clamp(ns, (0.25, -0.5))]):
        clamped = _logits(llama, batch)
    assert torch.equal(ours, clamped)


@pytest.mark.parametrize("selector,expected", [
    ("L3:5", [(3, 5)]), ("L1:2-4", [(1, 2), (1, 3), (1, 4)]), ("L0:1,3 L2:0", [(0, 1), (0, 3), (2, 0)]),
    ("L1:0-1;L0:5", [(0, 5), (1, 0), (1, 1)]), ("3:4", [(3, 4)]), ("l2:7", [(2, 7)]),
])
def test_selector_parsing(selector, expected):
    assert list(NeuronSet.parse(selector).pairs) == expected


@pytest.mark.parametrize("bad,part", [("L3", "L3"), ("L3:a", "L3:a"), ("X3:4", "X3:4"), ("L2:5-1", "5-1"), ("", "empty")])
def test_selector_errors_name_the_bad_part(bad, part):
    with pytest.raises(SelectionError, match=part):
        NeuronSet.parse(bad)


def test_selector_file(tmp_path):
    path = tmp_path / "sel.jsonl"
    path.write_text('{"layer": 1, "neuron": 4}\n{"layer": 0, "neuron": 2}\n')
    assert NeuronSet.parse(f"@{path} L1:0").pairs == ((0, 2), (1, 0), (1, 4))
    assert NeuronSet.parse("L1:*", n_neurons=3).pairs == ((1, 0), (1, 1), (1, 2))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt"])
def test_shared_prefix_pass_equals_repeated_pass(family):
    """Layers before the first intervened one run once; the outputs equal the plain repeated pass and
    the model's layers and hooks are exactly as before, also after an exception."""
    from neuronatlas.intervene import first_intervened_layer, forward_conditions

    lm = tiny_model(family)
    batch = encode(lm, SENTS, padding_side="left")
    conds = [(), (Ablate(NeuronSet.of([(1, 0), (1, 5)])),), (Clamp(NeuronSet.of([(1, 2)]), 3.0),),
             (Scale(NeuronSet.of([(1, 3)]), 0.0, position="last"),)]
    assert first_intervened_layer(conds, lm.n_layers) == 1
    before = list(lm.spec.layer_modules(lm.model))
    calls = []
    handle = before[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    shared = forward_conditions(lm, batch, conds).logits
    handle.remove()
    assert calls == [len(SENTS)]                       # layer 0 ran once, on the un-repeated batch
    plain = forward_conditions(lm, batch, conds, share_prefix=False).logits
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)
    for c, cond in enumerate(conds[1:], start=1):      # every condition really acted
        assert not torch.allclose(shared[c * len(SENTS):(c + 1) * len(SENTS)], shared[: len(SENTS)])
    assert list(lm.spec.layer_modules(lm.model)) == before and count_hooks(lm.model) == 0

    def boom(*_):
        raise RuntimeError("boom")

    h2 = before[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        forward_conditions(lm, batch, conds)
    h2.remove()
    assert list(lm.spec.layer_modules(lm.model)) == before and count_hooks(lm.model) == 0
