"""Findings, figures and tables of the emotion study (:mod:`neuronatlas.studies.emotions`).

Every claim is a rule applied to measured numbers: matched random neuron sets (empirical p) and exact
McNemar tests against the unmodified model, Benjamini-Hochberg corrected over emotions or stimuli.

    >>> from neuronatlas.studies.emotions_report import PAPER   # the seed papers' headline figures
    >>> PAPER["neurons_and_heads"]
    0.9965
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from neuronatlas.report import Finding, Section, Table, plots
from neuronatlas.stats.inference import benjamini_hochberg, mcnemar_exact
from neuronatlas.studies import rules
from neuronatlas.studies.framework import Comparison, Context, Grid, Measured, Outcome, Selection

__all__ = ["emotion_outcome", "PAPER"]

# arXiv 2510.11328: emotion expression rate on neutral prompts, circuit modulation vs prompting
PAPER = {"neurons_and_heads": 0.9965, "prompting": 0.9885}


def _mcnemar_finding(key: str, title: str, comps: dict[str, Comparison], *, alpha: float, what: str,
                     direction: str) -> Finding:
    names = [e for e, c in comps.items() if math.isfinite(c.selected)]
    p = np.array([comps[e].p_vs_unmodified for e in names], dtype=float)
    ok = benjamini_hochberg(p, alpha) if names else np.zeros(0, dtype=bool)
    passed = [e for i, e in enumerate(names) if ok[i]]
    sel = float(np.mean([comps[e].selected for e in names])) if names else math.nan
    base = float(np.mean([comps[e].baseline for e in names])) if names else math.nan
    word = "raises" if direction == "raise" else "lowers"
    text = (f"{what} gives an expression rate of {rules.pct(sel)} on average (unmodified: {rules.pct(base)}); it "
            f"{word} the rate significantly (exact McNemar, BH q < {alpha}) for {len(passed)} of {len(names)} emotions"
            + (f" ({', '.join(passed)})." if passed else "."))
    return Finding(key, title, text, rule=f"per emotion: one-sided exact McNemar vs the unmodified model, BH q < {alpha}; "
                   "holds when more than half of the emotions pass (no random baseline)",
                   holds=None if not names else len(passed) > len(names) / 2,
                   numbers={"passed": passed, "mean_selected": sel, "mean_unmodified": base})


def emotion_outcome(ctx: Context[Any], selection: Selection, grid: Grid, measured: Measured) -> Outcome:
    cfg, lm, out = ctx.config, ctx.lm, ctx.out
    emotions = list(cfg.emotions)
    sets = ctx.data["sets"]
    acc = ctx.data["classifier_accuracy"]
    f: list[Finding] = []
    f.append(Finding("classifier", "Emotion of a continuation",
                     f"Continuations are labelled by a logistic probe on word n-grams plus NRC lexicon counts (7 classes "
                     f"with neutral), fitted on identification sentences only. Held-out accuracy: "
                     f"{rules.pct(acc['scenarios']['probe'])} on {acc['scenarios']['n']} scenario sentences with unseen "
                     f"events and {rules.pct(acc['feelings']['probe'])} on {acc['feelings']['n']} feeling statements with "
                     f"unseen emotion words (chance {rules.pct(acc['scenarios']['chance'])} and "
                     f"{rules.pct(acc['feelings']['chance'])}; the NRC lexicon alone: "
                     f"{rules.pct(acc['scenarios']['lexicon'])} and {rules.pct(acc['feelings']['lexicon'])}). Rates below "
                     "inherit this error.", rule="descriptive", numbers=acc))
    # per-layer held-out accuracy of the directions
    layers = list(range(lm.n_layers))
    probe = {space: [float(np.nanmean([s[e].accuracy[i] for e in emotions])) for i in layers]
             for space, s in sets.items()}
    best_space, best_layer = max(((sp, i) for sp in probe for i in layers), key=lambda t: probe[t[0]][t[1]])
    plots.line_with_bands(out / "probe_accuracy.png", layers, {sp: (v, None, None) for sp, v in probe.items()},
                          xlabel="layer", ylabel="held-out accuracy (mean over emotions)",
                          title="Emotion direction (mean difference, one vs rest) by layer")
    f.append(Finding("directions", "Emotion directions",
                     f"Mean-difference directions (each emotion against the other {len(emotions) - 1}) separate held-out "
                     f"scenarios best in {best_space} at layer {best_layer}: {rules.pct(probe[best_space][best_layer])} "
                     "mean held-out balanced accuracy over emotions (threshold at the midpoint of the class means).", rule="descriptive",
                     numbers={"accuracy": probe, "best": [best_space, best_layer]}))
    base_n = "baseline|neutral"
    ablate = {e: measured.compare(f"ablate|{e}", f"express_{e}", baseline=f"baseline|emo:{e}", alternative="less")
              for e in emotions}
    amplify = {e: measured.compare(f"amplify|{e}", f"express_{e}", baseline=base_n, alternative="greater")
               for e in emotions}
    f.append(rules.selected_vs_random("ablate", "Ablating the emotion neurons", ablate, alpha=cfg.alpha,
                                      what=f"Zeroing each emotion's top {cfg.n_neurons} neurons",
                                      metric_name="the share of held-out scenarios continued with that emotion",
                                      unit="emotion", direction="lower"))
    f.append(rules.selected_vs_random("amplify", "Amplifying the emotion neurons", amplify, alpha=cfg.alpha,
                                      what=f"Scaling each emotion's top {cfg.n_neurons} neurons by {cfg.amplify:g}",
                                      metric_name="the share of neutral scenarios continued with that emotion",
                                      unit="emotion", direction="raise"))
    heads_ab = {e: measured.compare(f"heads_ablate|{e}", f"express_{e}", baseline=f"baseline|emo:{e}", alternative="less")
                for e in emotions}
    heads_am = {e: measured.compare(f"heads_amplify|{e}", f"express_{e}", baseline=base_n, alternative="greater")
                for e in emotions}
    both = {e: measured.compare(f"both_amplify|{e}", f"express_{e}", baseline=base_n, alternative="greater")
            for e in emotions}
    # the direction arm: the sweep layer nearest the resid layer whose direction is read best (held-out scenarios)
    resid_best = int(np.nanargmax(probe["resid"]))
    steer_layer = min(grid_layers(grid), key=lambda x: abs(x - resid_best))
    steer = {e: measured.compare(f"steer|{e}|L{steer_layer}|x{cfg.steer_alpha:g}", f"express_{e}", baseline=base_n,
                                 alternative="greater") for e in emotions}
    prompting = {e: measured.compare(f"prompting|{e}", f"express_{e}", baseline=base_n, alternative="greater")
                 for e in emotions}
    f.append(_mcnemar_finding("heads_ablate", "Ablating the emotion heads", heads_ab, alpha=cfg.alpha,
                              what=f"Zeroing each emotion's top {cfg.n_heads} heads on its held-out scenarios",
                              direction="lower"))
    f.append(_mcnemar_finding("heads_amplify", "Amplifying the emotion heads", heads_am, alpha=cfg.alpha,
                              what=f"Scaling each emotion's top {cfg.n_heads} heads by {cfg.amplify:g} on neutral scenarios",
                              direction="raise"))
    f.append(_mcnemar_finding("both", "Neurons and heads together", both, alpha=cfg.alpha,
                              what=f"Scaling the top {cfg.n_neurons} neurons and {cfg.n_heads} heads by {cfg.amplify:g}",
                              direction="raise"))
    f.append(_mcnemar_finding("steer", "Steering by the direction", steer, alpha=cfg.alpha,
                              what=f"Adding the resid direction at layer {steer_layer} ({cfg.steer_alpha:g} x the layer's "
                                   "mean activation norm)", direction="raise"))
    f.append(_mcnemar_finding("prompting", "Asking for the emotion", prompting, alpha=cfg.alpha,
                              what="Prefixing 'Describe your day as someone who feels very <emotion>.'", direction="raise"))
    rates = {"unmodified": [amplify[e].baseline for e in emotions], "neurons": [amplify[e].selected for e in emotions],
             "random neurons": [amplify[e].random_mean for e in emotions], "heads": [heads_am[e].selected for e in emotions],
             "neurons+heads": [both[e].selected for e in emotions], "direction": [steer[e].selected for e in emotions],
             "prompting": [prompting[e].selected for e in emotions]}
    plots.bars(out / "control_rates.png", emotions, rates, title="Neutral scenarios continued with the emotion",
               ylabel="share of prompts")
    f.append(Finding("paper", "Beside the paper",
                     f"Mean expression rate on neutral scenarios: neurons+heads {rules.pct(float(np.mean(rates['neurons+heads'])))}, "
                     f"direction {rules.pct(float(np.mean(rates['direction'])))}, prompting "
                     f"{rules.pct(float(np.mean(rates['prompting'])))} (unmodified {rules.pct(float(np.mean(rates['unmodified'])))}); "
                     f"arXiv 2510.11328 reports {100 * PAPER['neurons_and_heads']:.2f}% with ~2,000 neurons + ~150 heads and "
                     f"{100 * PAPER['prompting']:.2f}% by prompting, on larger models, a judge model and its own prompts, so "
                     "the numbers are not directly comparable.", rule="descriptive",
                     numbers={k: float(np.mean(v)) for k, v in rates.items()}))
    sweep = _sweep(ctx, grid, measured)
    plots.line_with_bands(out / "steering_sweep.png", sweep["layers"],
                          {f"alpha {a:g} x norm": (v, None, None) for a, v in sweep["rates"].items()},
                          xlabel="layer", ylabel="expression rate (mean over emotions)",
                          title="Steering along the resid direction on neutral scenarios")
    stim_f, stim_sec, stim_num = _stimuli(ctx, measured)
    f += stim_f
    gens = {k: measured.values[k]["text"] for k in ("baseline|neutral", f"amplify|{emotions[0]}", f"both_amplify|{emotions[0]}")
            if k in measured.values}
    sections = [
        Section("Emotion of a continuation", "classifier", tables=[Table(
            ["held-out set", "sentences", "probe accuracy", "NRC lexicon accuracy", "chance"],
            [[k, v["n"], v["probe"], v["lexicon"], v["chance"]] for k, v in acc.items()])]),
        Section("Emotion directions", "directions", figures=["probe_accuracy.png"]),
        Section("Neurons and heads", "ablate", tables=[
            Table(["emotion", "top neurons (contribution c_j)", "layers of the top neurons"],
                  [[e, " ".join(f"L{a}:{b}" for (a, b), _ in selection.ranked[e][:8]),
                    _layer_summary([p for p, _ in selection.ranked[e]])] for e in emotions], concept_columns=["emotion"]),
            Table(["emotion", "top heads (projection on the attn_out direction)"],
                  [[e, " ".join(f"L{a}.H{b}" for (a, b), _ in ctx.data["heads"][e][:10])] for e in emotions],
                  concept_columns=["emotion"])]),
        Section("Control of expression", "amplify", figures=["control_rates.png"], tables=[Table(
            ["emotion", "ablate: unmodified", "ablate: neurons", "ablate: random", "ablate: heads", *rates],
            [[e, ablate[e].baseline, ablate[e].selected, ablate[e].random_mean, heads_ab[e].selected,
              *(rates[k][i] for k in rates)] for i, e in enumerate(emotions)], concept_columns=["emotion"])]),
        Section("Steering sweep", "steer", figures=["steering_sweep.png"], tables=[Table(
            ["alpha (x mean norm)", *[f"L{x}" for x in sweep["layers"]]],
            [[a, *v] for a, v in sweep["rates"].items()])]),
        *stim_sec,
        Section("Example continuations", "the first emotion; neutral scenarios", tables=[Table(
            ["unmodified", "neurons amplified", "neurons+heads amplified"],
            [[gens.get(k, [""] * 99)[i] for k in gens] for i in range(min(8, cfg.n_prompts))])]),
    ]
    setup = {"model": lm.provenance.get("model"), "emotions": ", ".join(emotions), "neurons per emotion": cfg.n_neurons,
             "heads per emotion": cfg.n_heads, "amplify factor": cfg.amplify, "prompts per item set": cfg.n_prompts,
             "max new tokens": cfg.max_new_tokens, "facts for stimuli": cfg.n_facts}
    numbers = {"classifier": acc, "probe_accuracy": probe,
               "heads": {e: [[f"L{a}.H{b}", s] for (a, b), s in ctx.data["heads"][e]] for e in emotions},
               "ablate": {e: c.to_json() for e, c in ablate.items()}, "amplify": {e: c.to_json() for e, c in amplify.items()},
               "heads_ablate": {e: c.to_json() for e, c in heads_ab.items()},
               "heads_amplify": {e: c.to_json() for e, c in heads_am.items()},
               "both_amplify": {e: c.to_json() for e, c in both.items()}, "steer": {e: c.to_json() for e, c in steer.items()},
               "steer_layer": steer_layer, "prompting": {e: c.to_json() for e, c in prompting.items()},
               "rates": rates, "paper": PAPER, "sweep": sweep, "stimuli": stim_num, "generations": gens}
    figures = ["probe_accuracy.png", "control_rates.png", "steering_sweep.png", "stimulus_effects.png"]
    return Outcome(f, sections, numbers, setup, figures)


def grid_layers(grid: Grid) -> list[int]:
    return sorted({int(k.split("|")[2][1:]) for k in grid.arms if k.startswith("steer|")})


def _layer_summary(pairs: list[tuple[int, int]]) -> str:
    counts = np.bincount([a for a, _ in pairs])
    top = np.argsort(-counts)[:3]
    return ", ".join(f"L{int(x)}: {int(counts[x])}" for x in top if counts[x])


def _sweep(ctx: Context[Any], grid: Grid, measured: Measured) -> dict[str, Any]:
    cfg = ctx.config
    layers = grid_layers(grid)
    alphas = sorted({*cfg.steer_alphas, cfg.steer_alpha})
    rates = {a: [float(np.mean([measured.mean(f"steer|{e}|L{x}|x{a:g}", f"express_{e}") for e in cfg.emotions]))
                 for x in layers] for a in alphas}
    return {"layers": layers, "rates": rates}


def _stimuli(ctx: Context[Any], measured: Measured) -> tuple[list[Finding], list[Section], dict[str, Any]]:
    cfg = ctx.config
    stim = ctx.data["stimuli"]
    base = measured.get("baseline|facts", "correct")
    rows, p_vals, ids = [], [], list(stim["moved"])
    for sid in ids:
        with_s = measured.get(f"stimulus|{sid}", "correct")
        p_vals.append(mcnemar_exact(base, with_s, "two-sided"))
    ok = benjamini_hochberg(np.array(p_vals), cfg.alpha)
    effects: dict[str, Any] = {}
    for i, sid in enumerate(ids):
        with_s = measured.get(f"stimulus|{sid}", "correct")
        abl = measured.compare(f"stim_ablate|{sid}", "correct", baseline=f"stimulus|{sid}", alternative="two-sided")
        top_e = max(stim["shift"][sid], key=lambda e: abs(stim["shift"][sid][e]))
        effects[sid] = {"accuracy": float(with_s.mean()), "delta": float(with_s.mean() - base.mean()), "p": p_vals[i],
                        "significant": bool(ok[i]), "ablated": abl.to_json(), "emotion_shift": stim["shift"][sid],
                        "most_moved_emotion": top_e}
        rows.append([sid, stim["text"][sid], float(with_s.mean()), effects[sid]["delta"], p_vals[i], bool(ok[i]),
                     top_e, stim["shift"][sid][top_e], abl.selected, abl.random_mean, abl.p_vs_unmodified])
    sig = [sid for sid in ids if effects[sid]["significant"]]
    plots.bars(ctx.out / "stimulus_effects.png", ids, {"accuracy change": [effects[s]["delta"] for s in ids]},
               title="Emotional stimuli prefixed to relation facts", ylabel="first-token accuracy - unmodified prompt")
    text = (f"On {len(base)} held-out relation facts (unmodified accuracy {rules.pct(float(base.mean()))}), "
            f"{len(sig)} of {len(ids)} stimuli change first-token accuracy significantly (two-sided exact McNemar, BH q < "
            f"{cfg.alpha})" + (f": {', '.join(sig)}." if sig else "."))
    findings = [Finding("stimuli", "Emotional stimuli in prompts", text,
                        rule=f"per stimulus: two-sided exact McNemar vs the prompt without it, BH over {len(ids)} stimuli, "
                             f"q < {cfg.alpha}; holds when any stimulus passes", holds=bool(sig),
                        numbers={"significant": sig, "baseline_accuracy": float(base.mean())})]
    restored = [s for s in sig if effects[s]["ablated"]["p_vs_unmodified"] < cfg.alpha
                and np.sign(-effects[s]["delta"]) == np.sign(effects[s]["ablated"]["delta"])]
    findings.append(Finding(
        "stimulus_neurons", "Do the moved neurons carry the stimulus effect?",
        (f"Ablating the {cfg.n_stimulus_neurons} neurons each stimulus moves most along an emotion direction reverses "
         f"the effect for {len(restored)} of {len(sig)} stimuli with a significant effect." if sig else
         f"No stimulus had a significant effect, so there is none to remove; ablating the {cfg.n_stimulus_neurons} "
         "neurons each stimulus moves most is reported in the table for completeness."),
        rule=f"per stimulus with an effect: exact McNemar of the ablated arm vs the stimulus arm < {cfg.alpha}, in the "
             "direction opposite to the effect; holds when more than half of them pass",
        holds=None if not sig else len(restored) > len(sig) / 2, numbers={"restored": restored}))
    sec = [Section("Emotional stimuli", "stimuli", figures=["stimulus_effects.png"], tables=[Table(
        ["stimulus", "text", "accuracy", "change", "McNemar p", "BH significant", "emotion moved most",
         "shift along it", "moved neurons ablated: accuracy", "random neurons ablated", "p vs stimulus"], rows,
        caption="Stimulus ids: EP-* follow EmotionPrompt's EP01-EP11, NP-* NegativePrompt's NP01-NP10 (see "
                "neuronatlas.data.emotions.STIMULI).")])]
    return findings, sec, {"effects": effects, "baseline_accuracy": float(base.mean()), "norm_delta": stim["norm_delta"]}
