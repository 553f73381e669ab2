"""Directions: capture in residual-stream spaces, fitting with held-out accuracy, steering."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import ALL_FAMILIES, run_cli
from neuronatlas.directions import (
    SteerVector, capture, fit_direction, fit_one_vs_rest, load_directions, probe_scorer, steering_sweep,
)
from neuronatlas.errors import DatasetError, InterventionError, NeuronAtlasError, SiteError
from neuronatlas.evaluate import generate, next_token_logprobs, target_logprobs
from neuronatlas.evaluate.perplexity import text_nll
from neuronatlas.intervene import Steer, forward_conditions, intervene
from neuronatlas.models.tiny import tiny_model
from neuronatlas.record.batching import encode, forward
from neuronatlas.record.hooks import count_hooks

TEXTS = ["hello world this is", "a b c", "the cat sat on the mat today", "x", "Paris is the capital of France"]


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("space", ["resid", "attn_out", "mlp_out"])
def test_capture_batched_equals_one_by_one(family, space):
    lm = tiny_model(family)
    for pool in ("last", "mean"):
        together = capture(lm, TEXTS, space=space, layers=[0, 1], pool=pool, batch_size=3)
        alone = torch.cat([capture(lm, [t], space=space, layers=[0, 1], pool=pool) for t in TEXTS])
        assert together.shape == (len(TEXTS), 2, lm.config.hidden_size)
        torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_resid_is_the_hidden_state_and_the_sum_of_its_writes(family):
    """resid at L equals HF's hidden_states[L+1]; for pre-norm blocks it is resid[L-1] + attn_out[L] + mlp_out[L]."""
    lm = tiny_model(family)
    text = TEXTS[4]
    hidden = forward(lm, encode(lm, [text]), output_hidden_states=True).hidden_states
    for pool in ("last", "mean"):
        res = capture(lm, [text], space="resid", pool=pool)[0]
        attn = capture(lm, [text], space="attn_out", pool=pool)[0]
        mlp = capture(lm, [text], space="mlp_out", pool=pool)[0]
        h = hidden[1][0, -1] if pool == "last" else hidden[1][0].mean(0)
        torch.testing.assert_close(res[0], h.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res[1], res[0] + attn[1] + mlp[1], atol=1e-4, rtol=1e-4)


def test_capture_rejects_bad_input(llama):
    with pytest.raises(DatasetError, match="pooling"):
        capture(llama, TEXTS, pool="max")  # type: ignore[arg-type]
    with pytest.raises(SiteError, match="activation space"):
        capture(llama, TEXTS, space="resid_pre")
    with pytest.raises(SiteError, match="out of range"):
        capture(llama, TEXTS, layers=[99])
    with pytest.raises(DatasetError, match="no texts"):
        capture(llama, [])


def _planted(n: int, d: int, axis: torch.Tensor, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, 2, d, generator=gen) + shift * axis
    neg = torch.randn(n, 2, d, generator=gen) - shift * axis
    return pos, neg


@pytest.mark.parametrize("method", ["mean_diff", "pca", "logistic"])
def test_fit_recovers_a_planted_axis(method):
    d = 32
    axis = torch.zeros(d)
    axis[5] = 1.0
    pos, neg = _planted(200, d, axis, 2.0, 0)
    tpos, tneg = _planted(100, d, axis, 2.0, 1)
    ds = fit_direction(pos, neg, method=method, layers=[3, 7], test_pos=tpos, test_neg=tneg, concept="c")
    assert ds.layers == [3, 7]
    torch.testing.assert_close(ds.vectors.norm(dim=-1), torch.ones(2))
    for k in range(2):
        assert float(ds.vectors[k] @ axis) > 0.85          # found and oriented towards the concept
        assert ds.accuracy[k] > 0.9 and ds.train_accuracy[k] > 0.9
        assert ds.separation[k] > 2.0
    assert ds.best_layer() in (3, 7)


def test_shuffled_labels_give_chance_held_out_accuracy():
    gen = torch.Generator().manual_seed(3)
    acts = torch.randn(400, 1, 64, generator=gen)
    ds = fit_direction(acts[:150], acts[150:300], method="logistic", test_pos=acts[300:350], test_neg=acts[350:])
    assert ds.train_accuracy[0] > 0.6          # the probe overfits noise in 64 dims...
    assert abs(ds.accuracy[0] - 0.5) < 0.15    # ...and the held-out accuracy says so
    assert math.isnan(fit_direction(acts[:10], acts[10:20]).accuracy[0])


def test_one_vs_rest_and_save_load(tmp_path):
    d = 16
    axes = torch.eye(d)[:3]
    gen = torch.Generator().manual_seed(0)
    labels = [lab for lab in "abc" for _ in range(40)]
    acts = torch.stack([torch.randn(1, d, generator=gen) + 2 * axes["abc".index(lab)] for lab in labels])
    sets = fit_one_vs_rest(acts, labels, method="mean_diff", test_acts=acts, test_labels=labels)
    assert sorted(sets) == ["a", "b", "c"]
    for lab, ds in sets.items():
        assert int(ds.vectors[0].abs().argmax()) == "abc".index(lab)
        assert ds.concept == lab and ds.accuracy[0] > 0.85
    path = sets["b"].save(tmp_path / "b.npz")
    back = load_directions(path)
    torch.testing.assert_close(back.vectors, sets["b"].vectors)
    assert back.accuracy == sets["b"].accuracy and back.concept == "b" and back.method == "mean_diff"
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a NeuronAtlas direction file"):
        load_directions(tmp_path / "bad.npz")
    with pytest.raises(DatasetError, match="does not exist"):
        load_directions(tmp_path / "missing.npz")
    with pytest.raises(DatasetError, match="one label per text"):
        fit_one_vs_rest(acts, labels[:-1])
    with pytest.raises(DatasetError, match="no layer 5"):
        sets["a"].vector(5)
    with pytest.raises(DatasetError, match="at least 2 texts"):
        fit_direction(acts[:1], acts[1:3])
    with pytest.raises(DatasetError, match="unknown direction method"):
        fit_direction(acts[:5], acts[5:10], method="svm")  # type: ignore[arg-type]


def _vec(lm, seed=0):
    return torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3_text"])
def test_steer_vector_adds_to_the_stream(family):
    lm = tiny_model(family)
    v = torch.tensor(_vec(lm))
    batch = encode(lm, TEXTS)
    clean = capture(lm, TEXTS, space="resid", pool="mean")
    # steering the resid at layer 0 shifts what capture sees at layer 0 by alpha * v at every real token
    seen = {}
    from neuronatlas.directions import stream_hooks

    def observe(layer, h):
        seen[layer] = h.clone()

    with intervene(lm, [SteerVector(0, tuple(v.tolist()), 2.0)]), \
            stream_hooks(lm, "resid", observe=observe, layers=[0], batch_size=len(TEXTS)):
        forward(lm, batch)
    mask = batch["attention_mask"].float()
    mean = (seen[0] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(mean, clean[:, 0] + 2.0 * v, atol=1e-4, rtol=1e-4)
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mlp_out_steer_equals_neuron_steer_through_the_down_projection(family):
    """Adding d to the neurons of layer L writes W_down d (+ nothing else) to mlp_out of layer L."""
    lm = tiny_model(family)
    d = torch.randn(lm.n_neurons, generator=torch.Generator().manual_seed(1))
    w_out = lm.spec.output_vectors(lm.model, 1).detach()      # (neurons, d_model)
    written = (d @ w_out).tolist()
    a = next_token_logprobs(lm, TEXTS, conditions=[(Steer(1, tuple(d.tolist()), 1.5),)])
    b = next_token_logprobs(lm, TEXTS, conditions=[(SteerVector(1, written, 1.5, space="mlp_out"),)])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_batched_conditions_equal_one_by_one_and_shared_prefix(llama):
    v = _vec(llama)
    conds = [(), (SteerVector(1, v, 3.0),), (SteerVector(0, v, -2.0, space="attn_out"),),
             (SteerVector(1, v, 1.0, space="mlp_out", position="last"),)]
    together = next_token_logprobs(llama, TEXTS, conditions=conds)
    for c, cond in enumerate(conds):
        torch.testing.assert_close(together[c], next_token_logprobs(llama, TEXTS, conditions=[cond])[0],
                                   atol=1e-4, rtol=1e-4)
    assert not torch.allclose(together[0], together[1])
    batch = encode(llama, TEXTS)
    shared = forward_conditions(llama, batch, conds).logits
    plain = forward_conditions(llama, batch, conds, share_prefix=False).logits
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-4)
    # zero alpha is the unmodified model, in every helper taking conditions
    zero = [(), (SteerVector(1, v, 0.0),)]
    nll = text_nll(llama, TEXTS, conditions=zero).nll
    torch.testing.assert_close(nll[0], nll[1])
    scores = target_logprobs(llama, TEXTS, [" x"] * len(TEXTS), conditions=zero)
    torch.testing.assert_close(scores.logprob[0], scores.logprob[1])
    texts = generate(llama, TEXTS[:2], conditions=conds, max_new_tokens=4)
    assert [generate(llama, TEXTS[:2], conditions=[c], max_new_tokens=4)[0] for c in conds] == texts


def test_steer_vector_errors(llama):
    with pytest.raises(InterventionError, match="has 3 values"):
        next_token_logprobs(llama, TEXTS, conditions=[(SteerVector(0, (1.0, 2.0, 3.0)),)])
    with pytest.raises(InterventionError, match="out of range"):
        next_token_logprobs(llama, TEXTS, conditions=[(SteerVector(9, _vec(llama)),)])
    with pytest.raises(SiteError, match="activation space"):
        SteerVector(0, _vec(llama), space="embed")
    with pytest.raises(InterventionError, match="non-finite"):
        SteerVector(0, [math.nan] * 4)
    assert "|vector|=" in repr(SteerVector(0, _vec(llama)))


def test_steering_sweep_batched_equals_one_by_one(llama):
    gen = torch.Generator().manual_seed(0)
    acts = capture(llama, TEXTS * 2, layers=[0, 1])
    ds = fit_direction(acts[:5] + 0.1 * torch.randn(5, 2, acts.shape[-1], generator=gen), acts[5:], layers=[0, 1],
                       concept="c")
    kw = dict(layers=[0, 1], alphas=[0, 0.5, 2.0], alpha_unit="norm", score=probe_scorer(llama, ds), max_new_tokens=4)
    a = steering_sweep(llama, TEXTS[:3], ds, **kw)
    b = steering_sweep(llama, TEXTS[:3], ds, batched=False, **kw)
    assert a.continuations == b.continuations
    assert len(a.cells) == 6 and {c.alpha for c in a.cells} == {0, 0.5, 2.0}
    zero = [c for c in a.cells if c.alpha == 0]
    assert all(c.concept_rate == a.baseline.concept_rate and c.perplexity == a.baseline.perplexity for c in zero)
    assert all(0 <= c.concept_rate <= 1 and (math.isnan(c.perplexity) or c.perplexity > 1) for c in a.cells)
    with pytest.raises(DatasetError, match="no layer 7"):
        steering_sweep(llama, TEXTS, ds, layers=[7], alphas=[1.0], score=lambda t: [0.0] * len(t))


def test_cli_fit_generate_and_sweep(tmp_path, capsys, model_dir, write_jsonl):
    rows = [{"text": f"I am so happy and glad {i}", "label": "joy"} for i in range(12)]
    rows += [{"text": f"The train leaves at {i} o'clock", "label": "neutral"} for i in range(12)]
    data = write_jsonl(rows)
    out = tmp_path / "joy.npz"
    code, stdout, err = run_cli(capsys, "directions", "fit", "--model", str(model_dir), "--data", str(data),
                                "--positive", "joy", "--out", str(out), "--json")
    assert code == 0, err
    result = json.loads(stdout)["joy"]
    assert result["file"] == str(out) and len(result["layers"]) == 2
    ds = load_directions(out)
    assert ds.extra["n_test"] == 6 and ds.extra["n_train"] == 18
    assert all(0 <= a <= 1 for a in ds.accuracy)
    code, stdout, err = run_cli(capsys, "generate", "--model", str(model_dir), "-p", "Hello", "--steer",
                                f"{out}@L1:0.5xnorm", "--steer", f"{out}@L0:-3", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert json.loads(stdout)["interventions"][0].startswith("SteerVector(layer=1")
    folder = tmp_path / "all"
    code, stdout, err = run_cli(capsys, "directions", "fit", "--model", str(model_dir), "--data", str(data),
                                "--out", str(folder), "--method", "pca", "--space", "mlp_out", "--pool", "mean", "--json")
    assert code == 0, err
    assert sorted(p.name for p in folder.glob("*.npz")) == ["joy.npz", "neutral.npz"]
    sweep = tmp_path / "sweep"
    code, stdout, err = run_cli(capsys, "directions", "sweep", "--model", str(model_dir), "--directions", str(out),
                                "-p", "Hello", "-p", "Today", "--layers", "0,1", "--alphas", "0,1",
                                "--max-new-tokens", "3", "--out", str(sweep), "--json")
    assert code == 0, err
    saved = json.loads((sweep / "sweep.json").read_text())
    assert saved["alpha_unit"] == "norm" and len(saved["cells"]) == 4 and (sweep / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--steer", "x.npz@12:3"], "cannot parse --steer"),
    (["--steer", "missing.npz@L1:3"], "does not exist"),
])
def test_cli_steer_errors(capsys, model_dir, args, message):
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), "-p", "Hi", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_fit_errors(tmp_path, capsys, model_dir, write_jsonl):
    data = write_jsonl([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    code, _, err = run_cli(capsys, "directions", "fit", "--model", str(model_dir), "--data", str(data),
                           "--out", str(tmp_path / "d.npz"))
    assert code == 2 and "one label" in err
    data = write_jsonl([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], name="two.jsonl")
    code, _, err = run_cli(capsys, "directions", "fit", "--model", str(model_dir), "--data", str(data),
                           "--positive", "z", "--out", str(tmp_path / "d.npz"))
    assert code == 2 and "label 'z' is not in" in err
    code, _, err = run_cli(capsys, "directions", "fit", "--model", str(model_dir), "--data", str(data),
                           "--method", "svm", "--out", str(tmp_path / "d.npz"))
    assert code == 2 and "unknown --method 'svm'" in err
