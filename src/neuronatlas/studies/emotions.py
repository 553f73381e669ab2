"""Emotion study: emotion directions, the neurons and heads that write them, their causal control of
the emotion of continuations, and emotional stimuli in task prompts.

After Wang et al. (2025), "Do LLMs 'Feel'? Emotion Circuits Discovery and Control" (arXiv
2510.11328), EmotionPrompt (Li et al., 2023) and NegativePrompt (Wang et al., 2024).

1. ``select``: last-token activations of scenario prompts ("<scenario> I felt",
   :mod:`neuronatlas.data.emotions`) are recorded; per layer and emotion, a mean-difference
   direction ``v_e`` (one emotion against the other five, :func:`neuronatlas.directions.fit_one_vs_rest`)
   in the ``mlp_out``, ``attn_out`` and ``resid`` spaces, with held-out accuracy on the test scenarios.
   Neuron contribution ``c_j = h_j * (W_down^T v_e)_j`` at the last token, averaged over the
   emotion's identification prompts, ranks the neurons; a head's output projected on the layer's
   ``attn_out`` direction ranks the heads.
2. ``conditions``: on the emotion's held-out scenarios, the top neurons (and heads) ablated; on
   neutral scenarios, them scaled up by ``amplify``; matched random neuron sets (same layer and
   magnitude decile) for both; steering along the ``resid`` direction (a layers x alpha sweep);
   an explicit instruction ("prompting"); emotional stimuli prefixed to relation facts, and the
   neurons they move most ablated under the stimulus.
3. ``measure``: greedy continuations classified by :class:`neuronatlas.evaluate.emotion.EmotionClassifier`
   (not the model; its held-out accuracy is reported); first-token accuracy of the facts.

    >>> from neuronatlas.studies import run
    >>> from neuronatlas.studies.emotions import EmotionStudyConfig
    >>> result = run(lm, EmotionStudyConfig(), "out/emotions")          # doctest: +SKIP
    >>> result.findings["amplify"]                                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from neuronatlas.data.emotions import (
    EMOTIONS, FRAMES, NEUTRAL, STIMULI, build_emotion_sentences, build_feeling_sentences, feeling_prompt, provenance,
)
from neuronatlas.data.prompts import PromptSet
from neuronatlas.errors import SelectionError
from neuronatlas.evaluate import generate, target_logprobs
from neuronatlas.evaluate.emotion import EmotionClassifier, lexicon_label
from neuronatlas.intervene import Ablate, NeuronSet, Scale
from neuronatlas.intervene.heads import head_outputs, head_shape, scale_heads
from neuronatlas.intervene.interventions import Condition
from neuronatlas.record import RecordConfig, record
from neuronatlas.stats.inference import magnitude_bins
from neuronatlas.studies.framework import Arm, Context, Grid, Measured, Outcome, Selection, Study, StudyConfig, register_study

__all__ = ["EmotionStudyConfig", "EmotionStudy", "ADJECTIVES", "STIMULUS_RELATIONS"]

ADJECTIVES = {"anger": "angry", "disgust": "disgusted", "fear": "afraid", "joy": "happy", "sadness": "sad",
              "surprise": "surprised"}
SPACES = ("mlp_out", "attn_out", "resid")
STIMULUS_RELATIONS = ("country_capital", "country_language", "element_symbol", "country_continent")


@dataclass(frozen=True)
class EmotionStudyConfig(StudyConfig):
    emotions: tuple[str, ...] = EMOTIONS
    n_neurons: int = 200              # top neurons per emotion by contribution (all layers)
    n_heads: int = 20                 # top heads per emotion
    amplify: float = 4.0              # Scale factor of neurons / heads on neutral prompts
    n_prompts: int = 16               # held-out scenario prompts per emotion (and neutral ones)
    n_frames: int = 8                 # frames per event in the recorded scenarios (8: all 128 per emotion)
    max_new_tokens: int = 10
    steer_layers: tuple[int, ...] = ()        # () = four layers spread over the model
    steer_alphas: tuple[float, ...] = (0.5, 1.0, 2.0)   # multiples of the layer's mean resid norm
    steer_alpha: float = 1.0          # the direction arm compared with neurons and heads
    n_facts: int = 48                 # relation facts for the stimuli
    n_stimulus_neurons: int = 50      # neurons a stimulus moves most, ablated under it
    batch_size: int = 16

    def __post_init__(self) -> None:
        bad = [e for e in self.emotions if e not in EMOTIONS]
        if bad or len(self.emotions) < 2:
            raise SelectionError(f"--emotions {','.join(self.emotions)}: give at least two of {', '.join(EMOTIONS)}")
        if min(self.n_neurons, self.n_heads, self.n_prompts, self.n_facts, self.n_stimulus_neurons, self.max_new_tokens) < 1:
            raise SelectionError("--neurons, --heads, --n-prompts, --n-facts, --stimulus-neurons and --max-new-tokens "
                                 "must be >= 1")
        if not 1 <= self.n_frames <= len(FRAMES):
            raise SelectionError(f"--frames {self.n_frames}: choose 1-{len(FRAMES)}")
        if self.n_prompts > 64:
            raise SelectionError(f"--n-prompts {self.n_prompts}: each emotion has 64 held-out scenario prompts")
        if self.amplify <= 1 or not self.steer_alphas:
            raise SelectionError(f"--amplify {self.amplify} must be > 1 and --steer-alphas non-empty")


def _pick(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    idx = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[i] for i in sorted(idx)]


def _down_weights(lm: Any) -> list[torch.Tensor]:
    from neuronatlas.decompose.arch import decomp_arch

    arch = decomp_arch(lm)
    return [arch.parts(lm.model, layer).down_weight.detach().float().cpu() for layer in range(lm.n_layers)]


@register_study
class EmotionStudy(Study[EmotionStudyConfig]):
    name = "emotions"
    title = "Emotion circuits and emotional stimuli"
    intro = ("Emotion directions from last-token sublayer outputs of scenario prompts; the neurons and heads that "
             "write them, ablated and amplified against matched random neurons and against steering by the direction; "
             "emotional stimuli (EmotionPrompt / NegativePrompt) prefixed to relation facts.")
    config_class = EmotionStudyConfig
    pass_arms = 8

    # ----------------------------------------------------------------------------------------------- select
    def select(self, ctx: Context[EmotionStudyConfig]) -> Selection:
        cfg = ctx.config
        rows = [r for r in build_emotion_sentences(seed=cfg.seed) if r["label"] in (*cfg.emotions, NEUTRAL)]
        feel = build_feeling_sentences(seed=cfg.seed)
        train = [r for r in rows + feel if r["split"] == "identify"]
        clf = EmotionClassifier(seed=cfg.seed).fit([r["text"] for r in train], [r["label"] for r in train])
        ctx.data["classifier"] = clf
        ctx.data["classifier_accuracy"] = ctx.cached("classifier_accuracy", lambda: _classifier_accuracy(clf, rows, feel))
        ctx.data["provenance"] = provenance()
        ctx.data["w_down"] = _down_weights(ctx.lm)
        files = {(space, e): ctx.out / "directions" / f"{space}-{e}.npz" for space in SPACES for e in cfg.emotions}
        found = ctx.state.get("selection")
        if found is None or not all(p.exists() for p in files.values()):
            found = _compute_selection(ctx, [r for r in rows if r["label"] != NEUTRAL and r["frame"] < cfg.n_frames],
                                       files)
            ctx.state.put("selection", found)
        from neuronatlas.directions import load_directions

        ctx.data["sets"] = {space: {e: load_directions(files[(space, e)]) for e in cfg.emotions} for space in SPACES}
        ctx.bins = np.asarray(found["bins"], dtype=np.int64)
        ctx.data["heads"] = {e: [((a, b), s) for (a, b), s in v] for e, v in found["heads"].items()}
        ctx.data["stimuli"] = {**found["stimuli"], "moved": {k: [tuple(p) for p in v] for k, v in found["stimuli"]["moved"].items()}}
        sel = Selection("contribution", "mlp")
        for e in cfg.emotions:
            sel.add(e, [tuple(p) for p, _ in found["neurons"][e]], [sc for _, sc in found["neurons"][e]])
        return sel

    # ------------------------------------------------------------------------------------------- conditions
    def conditions(self, ctx: Context[EmotionStudyConfig], selection: Selection) -> Grid:
        cfg, lm = ctx.config, ctx.lm
        grid = Grid(ctx)
        plans: dict[str, dict[tuple[int, int], float]] = {}
        grid.baseline("neutral")
        for e in cfg.emotions:
            heads = [p for p, _ in ctx.data["heads"][e]]
            grid.baseline(f"emo:{e}")
            grid.baseline(f"instructed:{e}", key=f"prompting|{e}")
            grid.selected(f"ablate|{e}", selection.neurons(e), lambda ns: (Ablate(ns),), f"emo:{e}", concept=e)
            grid.selected(f"amplify|{e}", selection.neurons(e), lambda ns: (Scale(ns, cfg.amplify),), "neutral", concept=e)
            for key, items, f, cond in (
                    (f"heads_ablate|{e}", f"emo:{e}", 0.0, ()),
                    (f"heads_amplify|{e}", "neutral", cfg.amplify, ()),
                    (f"both_amplify|{e}", "neutral", cfg.amplify, (Scale(selection.neurons(e), cfg.amplify),))):
                grid.add(Arm(key, cond, items, "other", e))
                plans[key] = {p: f for p in heads}
            for layer in _steer_layers(cfg, lm.n_layers):
                for a in sorted({*cfg.steer_alphas, cfg.steer_alpha}):
                    grid.add(Arm(f"steer|{e}|L{layer}|x{a:g}", (_steer(ctx, e, layer, a),), "neutral", "other", e))
        ctx.data["head_plans"] = plans
        stim = ctx.data["stimuli"]
        grid.baseline("facts")
        for sid, neurons in stim["moved"].items():
            grid.baseline(f"facts|{sid}", key=f"stimulus|{sid}")
            grid.selected(f"stim_ablate|{sid}", NeuronSet.of(neurons, "mlp"), lambda ns: (Ablate(ns),), f"facts|{sid}",
                          concept=sid)
        return grid

    # ---------------------------------------------------------------------------------------------- measure
    def measure(self, ctx: Context[EmotionStudyConfig], items: str, arms: Sequence[Arm]) -> dict[str, dict[str, Any]]:
        cfg, lm = ctx.config, ctx.lm
        if items.startswith("facts"):
            facts = ctx.data["stimuli"]["facts"]
            sid = items.split("|", 1)[1] if "|" in items else None
            prefix = (ctx.data["stimuli"]["text"][sid] + " ") if sid else ""
            scores = target_logprobs(lm, [prefix + f["text"] for f in facts], [f["target"] for f in facts],
                                     conditions=[a.condition for a in arms], batch_size=cfg.batch_size)
            return {a.key: {"correct": scores.first_correct[k].int().tolist(), "logprob": scores.logprob[k].tolist()}
                    for k, a in enumerate(arms)}
        prompts = _prompts(ctx, items)
        plans = ctx.data["head_plans"]
        texts: dict[str, list[str]] = {}
        plain = [a for a in arms if a.key not in plans]
        if plain:
            gens = generate(lm, prompts, conditions=[a.condition for a in plain], max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size)
            texts.update({a.key: gens[k] for k, a in enumerate(plain)})
        for a in arms:
            if a.key in plans:
                with scale_heads(lm, plans[a.key]):
                    texts[a.key] = generate(lm, prompts, conditions=[a.condition], max_new_tokens=cfg.max_new_tokens,
                                            batch_size=cfg.batch_size)[0]
        clf: EmotionClassifier = ctx.data["classifier"]
        out: dict[str, dict[str, Any]] = {}
        for a in arms:
            pred = clf.predict(texts[a.key])
            out[a.key] = {"text": texts[a.key], "pred": pred, "lexicon": [lexicon_label(t) for t in texts[a.key]],
                          **{f"express_{e}": [int(p == e) for p in pred] for e in cfg.emotions}}
        return out

    # --------------------------------------------------------------------------------------------- findings
    def findings(self, ctx: Context[EmotionStudyConfig], selection: Selection, grid: Grid, measured: Measured) -> Outcome:
        from neuronatlas.studies.emotions_report import emotion_outcome

        return emotion_outcome(ctx, selection, grid, measured)


def _compute_selection(ctx: Context[EmotionStudyConfig], emo: list[dict[str, Any]],
                       files: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """Record, fit the directions (saved to ``files``), rank neurons and heads, and the stimuli's
    neurons: everything ``select`` keeps in the state so that a rerun computes nothing."""
    from neuronatlas.directions import capture, fit_one_vs_rest

    cfg, lm = ctx.config, ctx.lm
    texts = [feeling_prompt(r["text"]) for r in emo]
    labels = np.array([r["label"] for r in emo])
    test = np.array([r["split"] == "test" for r in emo])
    prompts = PromptSet.from_rows([{"text": t, "label": lab, "split": r["split"]} for t, lab, r in zip(texts, labels, emo)])
    rec = record(lm, prompts, ctx.store, name="emotions", progress=lambda d, t: ctx.tick("record", d, t),
                 config=RecordConfig(pool="last", top_k=5, batch_size=cfg.batch_size, max_length=64, neuron_stats=False))
    assert rec.pooled is not None
    h = torch.from_numpy(rec.pooled.astype(np.float32))                              # (n, L, N)
    w_down = ctx.data["w_down"]
    spaces = {"mlp_out": torch.stack([h[:, layer] @ w_down[layer].T for layer in range(lm.n_layers)], dim=1)}
    for space in ("attn_out", "resid"):
        ctx.tick(f"capture {space}", 0, 1)
        spaces[space] = capture(lm, texts, space=space, pool="last", batch_size=cfg.batch_size)
    tr, te = ~test, test
    sets = {space: fit_one_vs_rest(acts[tr], list(labels[tr]), method="mean_diff", test_acts=acts[te],
                                   test_labels=list(labels[te])) for space, acts in spaces.items()}
    for (space, e), path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        sets[space][e].save(path)
    ctx.data["sets"] = sets
    n_heads, _ = head_shape(lm)
    neurons, heads = {}, {}
    for e in cfg.emotions:
        v = sets["mlp_out"][e].vectors                                                # (L, d)
        u = torch.stack([w_down[layer].T @ v[layer] for layer in range(lm.n_layers)])   # (L, N)
        contrib = (h[tr & (labels == e)] * u[None]).mean(0)                           # (L, N)
        top = torch.topk(contrib.flatten(), cfg.n_neurons)
        neurons[e] = [(divmod(int(i), lm.n_neurons), float(sc)) for i, sc in zip(top.indices, top.values)]
        ctx.tick("heads", cfg.emotions.index(e), len(cfg.emotions))
        ho = head_outputs(lm, [t for t, keep in zip(texts, tr & (labels == e)) if keep], batch_size=cfg.batch_size)
        proj = torch.einsum("nlhd,ld->lh", ho, sets["attn_out"][e].vectors) / ho.shape[0]   # (L, H)
        top_h = torch.topk(proj.flatten(), min(cfg.n_heads, proj.numel()))
        heads[e] = [(divmod(int(i), n_heads), float(sc)) for i, sc in zip(top_h.indices, top_h.values)]
    return {"neurons": neurons, "heads": heads, "bins": magnitude_bins(h.abs().mean(0).numpy()).tolist(),
            "stimuli": _stimulus_selection(ctx)}


def _classifier_accuracy(clf: EmotionClassifier, rows: list[dict[str, Any]], feel: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, data in (("scenarios", rows), ("feelings", feel)):
        test = [r for r in data if r["split"] == "test"]
        x, y = [r["text"] for r in test], [r["label"] for r in test]
        out[name] = {"n": len(test), "probe": clf.score(x, y),
                     "lexicon": float(np.mean([lexicon_label(t) == lab for t, lab in zip(x, y)])),
                     "chance": 1 / len({r["label"] for r in data})}
    return out


def _steer_layers(cfg: EmotionStudyConfig, n_layers: int) -> list[int]:
    if cfg.steer_layers:
        bad = [x for x in cfg.steer_layers if not 0 <= x < n_layers]
        if bad:
            raise SelectionError(f"--steer-layers {bad}: the model has layers 0-{n_layers - 1}")
        return sorted(set(cfg.steer_layers))
    return sorted({min(n_layers - 1, round(n_layers * f)) for f in (0.2, 0.4, 0.6, 0.8)})


def _steer(ctx: Context[EmotionStudyConfig], e: str, layer: int, multiple: float) -> Any:
    ds = ctx.data["sets"]["resid"][e]
    i = ds.layers.index(layer)
    return ds.steer(layer, float(multiple * ds.mean_norm[i]))


def _prompts(ctx: Context[EmotionStudyConfig], items: str) -> list[str]:
    cfg = ctx.config
    rows = build_emotion_sentences(seed=cfg.seed)
    if items == "neutral":
        pool = [r for r in rows if r["label"] == NEUTRAL and r["split"] == "test"]
        return [feeling_prompt(r["text"]) for r in _pick(pool, cfg.n_prompts, cfg.seed)]
    kind, e = items.split(":", 1)
    if kind == "emo":
        pool = [r for r in rows if r["label"] == e and r["split"] == "test"]
        return [feeling_prompt(r["text"]) for r in _pick(pool, cfg.n_prompts, cfg.seed)]
    neutral = _prompts(ctx, "neutral")
    return [f"Describe your day as someone who feels very {ADJECTIVES[e]}. {p}" for p in neutral]


def _stimulus_selection(ctx: Context[EmotionStudyConfig]) -> dict[str, Any]:
    """Facts for the stimuli; per stimulus, the change of every neuron at the last token and its
    contribution to each emotion's ``mlp_out`` direction; the neurons that move it most."""
    from neuronatlas.data.relations import build_relation_facts

    cfg, lm = ctx.config, ctx.lm
    rows = [r for r in build_relation_facts(list(STIMULUS_RELATIONS), n_test=cfg.n_facts, seed=cfg.seed)
            if r["split"] == "test" and r["template_id"] == 0]
    facts = _pick(rows, cfg.n_facts, cfg.seed)
    stim_text = {s.id: s.text for s in STIMULI}
    texts = [f["text"] for f in facts] + [f"{s.text} {f['text']}" for s in STIMULI for f in facts]
    labels = ["none"] * len(facts) + [s.id for s in STIMULI for _ in facts]
    rec = record(lm, PromptSet.from_rows([{"text": t, "label": lab} for t, lab in zip(texts, labels)]), ctx.store,
                 name="emotion-stimuli", progress=lambda d, t: ctx.tick("record stimuli", d, t),
                 config=RecordConfig(pool="last", top_k=1, batch_size=cfg.batch_size, max_length=96, neuron_stats=False))
    assert rec.pooled is not None
    h = torch.from_numpy(rec.pooled.astype(np.float32)).reshape(len(STIMULI) + 1, len(facts), lm.n_layers, -1)
    delta = (h[1:] - h[:1]).mean(1)                                                  # (S, L, N)
    sets, w_down = ctx.data["sets"]["mlp_out"], ctx.data["w_down"]
    shift: dict[str, dict[str, float]] = {}
    moved: dict[str, list[tuple[int, int]]] = {}
    for s_i, s in enumerate(STIMULI):
        contrib = {}
        for e in cfg.emotions:
            v = sets[e].vectors
            u = torch.stack([w_down[layer].T @ v[layer] for layer in range(lm.n_layers)])
            contrib[e] = delta[s_i] * u                                                # (L, N)
        shift[s.id] = {e: float(c.sum()) for e, c in contrib.items()}
        top_e = max(shift[s.id], key=lambda e: abs(shift[s.id][e]))
        score = contrib[top_e].flatten() * float(np.sign(shift[s.id][top_e]) or 1.0)
        idx = torch.topk(score, cfg.n_stimulus_neurons).indices
        moved[s.id] = [divmod(int(i), lm.n_neurons) for i in idx]
    return {"facts": facts, "text": stim_text, "shift": shift, "moved": moved,
            "norm_delta": {s.id: float(delta[i].norm()) for i, s in enumerate(STIMULI)}}
