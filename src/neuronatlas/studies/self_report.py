"""Self-reported decision weights (after Plunkett et al., "Self-Interpretability: LLMs Can Describe
Complex Internal Processes that Drive Their Decisions", arXiv 2505.17120) on the study framework.

1. ``select``: agents (:mod:`neuronatlas.data.choices`: a domain such as condos or loans and a
   hidden weight in [-100, 100] per attribute). The weights are stated in context (a system
   preamble). A probe: for ``n_probe`` further agents, the MLP neurons of layer ``layer`` averaged
   over the "Answer:" tokens of a choice prompt; per attribute slot a cross-validated ridge
   regression predicts the slot's weight. Its direction is the steering direction.
2. ``conditions``: the unmodified model on every agent's choices and weight reports; per slot,
   the probe direction added with +alpha and -alpha (alpha = ``steer_norm`` x the mean norm of the
   activations read) on the reports of that slot, and ``n_random`` random directions of the same norm.
   With ``train_steps``: the same choices and reports, weights not stated, of the original model
   and of a LoRA-tuned copy that learnt the weights from choices
   (:mod:`~neuronatlas.studies.self_report_train`); with ``introspect_steps`` also of that copy
   after introspection training on every other agent's reports (scored on the held-out agents).
3. ``measure``: choices: log p(" B") - log p(" A"); reports: the expected answer on a 1-9 scale
   (the digits' probabilities renormalised), mapped to [-100, 100].
4. ``findings``: :mod:`neuronatlas.studies.self_report_report`: Pearson r between reported and
   true weights (the paper: 0.54 before, 0.74 after introspection training), whether the
   choices follow the weights, the probe, and steering against random directions.

    >>> from neuronatlas.studies import run
    >>> from neuronatlas.studies.self_report import SelfReportConfig
    >>> result = run(lm, SelfReportConfig(), "out/self-report")         # doctest: +SKIP
    >>> result["weights"]["pearson_r"]                                     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuronatlas.data.choices import DOMAINS, Agent, choice_pairs, describe, make_agents, preference_text, utility
from neuronatlas.errors import SelectionError
from neuronatlas.intervene import Steer, SteerVector
from neuronatlas.intervene.interventions import Intervention
from neuronatlas.studies.framework import Arm, Context, Grid, Measured, Outcome, Selection, Study, StudyConfig, register_study
from neuronatlas.studies.introspection import SPACES, Segment, choice_margin, span_activations, study_layer

__all__ = ["SelfReportConfig", "SelfReportStudy", "choice_prompt", "report_prompt", "SCALE", "fit_probe"]

SCALE = tuple(str(d) for d in range(1, 10))      # answers 1..9; 5 = did not matter


@dataclass(frozen=True)
class SelfReportConfig(StudyConfig):
    n_random: int = 19              # random directions per steered slot: the fewest that let empirical p reach 0.05
    layer: int = -1                 # -1: the middle layer
    space: str = "mlp"              # probe/steering space: mlp (neurons, Steer) or resid/attn_out/mlp_out (SteerVector)
    n_agents: int = 12              # evaluated agents (cycling through the domains)
    n_choices: int = 16             # choices per agent
    n_probe: int = 120              # further agents whose choice prompts train the probe
    steer_agents: int = 6           # agents whose reports are steered
    steer_norm: float = 0.5         # alpha as a multiple of the mean activation norm at the layer
    probe_folds: int = 5
    train_steps: int = 0            # > 0: also the trained-in condition (LoRA fine-tune; needs peft)
    train_per_agent: int = 40       # training choices per agent
    train_differ: int = 0           # > 0: training options differ in only that many attributes (easier to learn)
    introspect_steps: int = 0       # > 0 (with train_steps): introspection training on half of the agents' reports
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.n_agents < 2 or self.n_choices < 2 or self.n_probe < 2 * self.probe_folds or self.probe_folds < 2:
            raise SelectionError("--n-agents and --n-choices must be >= 2 and --n-probe >= 2 x the probe folds")
        if not 1 <= self.steer_agents <= self.n_agents:
            raise SelectionError(f"--steer-agents {self.steer_agents} must be between 1 and --n-agents {self.n_agents}")
        if self.train_steps < 0 or self.train_per_agent < 1:
            raise SelectionError("--train-steps must be >= 0 and the training choices per agent >= 1")
        if self.introspect_steps < 0 or (self.introspect_steps and (not self.train_steps or self.n_agents < 4)):
            raise SelectionError(f"--introspect-steps {self.introspect_steps} needs --train-steps > 0 and --n-agents >= 4 "
                                 "(half the agents train the reports, the other half are held out)")
        if self.train_steps and self.n_agents > len(DOMAINS):
            raise SelectionError(f"--n-agents {self.n_agents} with --train-steps: at most {len(DOMAINS)} agents (one per "
                                 "domain, so the domain tells the fine-tuned agents apart)")
        if self.space not in SPACES:
            raise SelectionError(f"--space {self.space!r} is not one of {', '.join(SPACES)}")
        if self.steer_norm <= 0:
            raise SelectionError(f"--steer-norm {self.steer_norm} must be > 0 (a multiple of the mean activation norm)")


def choice_prompt(agent: Agent, a: Sequence[float], b: Sequence[float], *, stated: bool = True) -> str:
    d = agent.spec
    return ((preference_text(agent) if stated else "") + f"You are choosing between two {d.plural}.\n"
            f"Option A: {describe(agent.domain, a)}.\nOption B: {describe(agent.domain, b)}.\n"
            f"Which {d.item} do you choose, A or B?\nAnswer:")


def report_prompt(agent: Agent, slot: int, *, stated: bool = True) -> str:
    d, attr = agent.spec, agent.spec.attributes[slot].name
    return ((preference_text(agent) if stated else "") + f"You have been choosing between {d.plural}.\n"
            f"Question: how much did the {attr} matter to your choices, from 1 (you strongly prefer less {attr}) to 9 "
            f"(you strongly prefer more {attr}), where 5 means it did not matter?\nAnswer:")


def fit_probe(acts: np.ndarray, target: np.ndarray, folds: int, seed: int = 0) -> dict[str, Any]:
    """Cross-validated ridge regression of ``target`` on ``acts`` (standardised): out-of-fold
    predictions, their Pearson r and one-sided p, and the unit direction (raw activation units) of
    the ridge fitted on everything."""
    from scipy import stats
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model() -> Any:
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(0, 5, 11)))

    pred = cross_val_predict(model(), acts, target, cv=KFold(folds, shuffle=True, random_state=seed))
    r, p = (stats.pearsonr(pred, target) if np.std(pred) > 0 else (np.nan, np.nan))
    fitted = model().fit(acts, target)
    scale = fitted[0].scale_
    v = fitted[1].coef_ / np.where(scale > 0, scale, 1.0)
    v = v / (np.linalg.norm(v) or 1.0)
    one_sided = float(p / 2 if r > 0 else 1 - p / 2) if np.isfinite(r) else float("nan")
    return {"r": float(r), "p": one_sided, "direction": v, "projection_sd": float((acts @ v).std())}


@register_study
class SelfReportStudy(Study[SelfReportConfig]):
    """Can the model report the attribute weights behind its choices, and do neurons carry them?"""

    name = "self-report"
    title = "Self-reported decision weights"
    intro = ("After arXiv 2505.17120: the model chooses between two options under attribute weights stated in context, "
             "then reports how much each attribute mattered; reported and true weights are correlated. A probe looks "
             "for neuron directions that carry each weight, and steering along them tests whether they move the report.")
    config_class = SelfReportConfig
    pass_arms = 8

    def layer(self, ctx: Context[SelfReportConfig]) -> int:
        return study_layer(ctx.config.layer, ctx.lm.n_layers)

    def select(self, ctx: Context[SelfReportConfig]) -> Selection:
        cfg, lm = ctx.config, ctx.lm
        layer = self.layer(ctx)
        agents = make_agents(cfg.n_agents, cfg.seed)
        probe_agents = make_agents(cfg.n_probe, cfg.seed + 7919)
        rng = np.random.default_rng(cfg.seed)
        segs: list[Segment] = []
        for i, ag in enumerate(probe_agents):
            a, b = choice_pairs(ag.domain, 1, seed=cfg.seed * 100_003 + i)[0]
            prompt = choice_prompt(ag, a, b)
            head, _, _ = prompt.rpartition("\nAnswer:")
            segs.append(((head,), "\nAnswer:"))
        acts = span_activations(lm, segs, layer, batch_size=cfg.batch_size, space=cfg.space).astype(np.float64)
        n_slots = min(len(d.attributes) for d in DOMAINS.values())
        probes = [fit_probe(acts, np.array([ag.weights[k] for ag in probe_agents], dtype=float), cfg.probe_folds,
                            cfg.seed) for k in range(n_slots)]
        alpha = cfg.steer_norm * float(np.linalg.norm(acts, axis=1).mean())
        random_dirs = [[self._unit(np.asarray(rng.standard_normal(acts.shape[1]))) for _ in range(cfg.n_random)] for _ in range(n_slots)]
        ctx.data.update(layer=layer, agents=agents, probes=probes, alpha=alpha, random_dirs=random_dirs, n_slots=n_slots,
                        choices=self._choices(agents, cfg), provenance={"choices": "neuronatlas.data.choices (built in)"})
        sel = Selection("self-report-probe-weights", "mlp")
        for k, p in enumerate(probes if cfg.space == "mlp" else ()):      # neurons only in the neuron space
            top = np.argsort(-np.abs(p["direction"]))[:10]
            sel.add(f"slot{k}", [(layer, int(j)) for j in top], [float(p["direction"][j]) for j in top])
        return sel

    @staticmethod
    def _unit(v: np.ndarray) -> np.ndarray:
        return v / (np.linalg.norm(v) or 1.0)

    @staticmethod
    def _choices(agents: list[Agent], cfg: SelfReportConfig) -> list[tuple[int, tuple[float, ...], tuple[float, ...]]]:
        return [(i, a, b) for i, ag in enumerate(agents)
                for a, b in choice_pairs(ag.domain, cfg.n_choices, seed=cfg.seed * 1_000_003 + i)]

    def steer(self, ctx: Context[SelfReportConfig], vector: Sequence[float], alpha: float) -> Intervention:
        """Add ``alpha`` x the unit ``vector`` at the probe's layer: MLP neurons (``Steer``) or a
        residual-stream space (``SteerVector``)."""
        vec = tuple(float(x) for x in vector)
        if ctx.config.space == "mlp":
            return Steer(ctx.data["layer"], vec, alpha)
        return SteerVector(layer=ctx.data["layer"], vector=vec, alpha=alpha, space=ctx.config.space)

    def report_items(self, ctx: Context[SelfReportConfig]) -> list[tuple[int, int]]:
        """(agent, slot) of every report item, in order."""
        return [(i, k) for i, ag in enumerate(ctx.data["agents"]) for k in range(len(ag.weights))]

    def conditions(self, ctx: Context[SelfReportConfig], selection: Selection) -> Grid:
        grid = Grid(ctx)
        grid.baseline("choices")
        grid.baseline("reports")
        if ctx.config.train_steps:
            for what in ("choices", "reports"):
                grid.add(Arm(f"unstated|{what}", (), f"unstated|{what}", "baseline"))
                grid.add(Arm(f"trained|{what}", (), f"trained|{what}", "other"))
                if ctx.config.introspect_steps:
                    grid.add(Arm(f"introspect|{what}", (), f"introspect|{what}", "other"))
        items = self.report_items(ctx)
        alpha = ctx.data["alpha"]
        for k in range(ctx.data["n_slots"]):
            sub = [n for n, (i, s) in enumerate(items) if s == k and i < ctx.config.steer_agents]
            direction = ctx.data["probes"][k]["direction"]
            for sign in (1, -1):
                key = f"steer|slot{k}|{'+' if sign > 0 else '-'}"
                grid.add(Arm(key, (self.steer(ctx, direction, sign * alpha),), "reports", "selected", f"slot{k}",
                             subset=tuple(sub)))
            for s, vec in enumerate(ctx.data["random_dirs"][k]):
                grid.add(Arm(f"steer|slot{k}|+|rand{s}", (self.steer(ctx, vec, alpha),), "reports",
                             "random", f"slot{k}", of=f"steer|slot{k}|+", subset=tuple(sub)))
        return grid

    def measure(self, ctx: Context[SelfReportConfig], items: str, arms: Sequence[Arm]) -> dict[str, dict[str, Any]]:
        cfg, agents = ctx.config, ctx.data["agents"]
        conds = [a.condition for a in arms]
        setting, _, what = items.rpartition("|")
        lm = {"trained": self.trained, "introspect": self.introspective}.get(setting, lambda c: c.lm)(ctx)
        stated = setting == ""
        if what == "choices":
            prompts = [choice_prompt(agents[i], a, b, stated=stated) for i, a, b in ctx.data["choices"]]
            m = choice_margin(lm, prompts, (" A", " B"), conditions=conds, batch_size=cfg.batch_size)
            return {arm.key: {"margin": (m[c, :, 1] - m[c, :, 0]).tolist()} for c, arm in enumerate(arms)}
        every = self.report_items(ctx)
        idx = list(arms[0].subset) if arms[0].subset is not None else list(range(len(every)))
        prompts = [report_prompt(agents[every[n][0]], every[n][1], stated=stated) for n in idx]
        m = choice_margin(lm, prompts, tuple(" " + d for d in SCALE), conditions=conds, batch_size=cfg.batch_size)
        p = np.exp(m - m.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        expected = (p * np.arange(1, 10)).sum(-1)                    # 1..9
        reported = (expected - 5.0) * 25.0                            # -100..100
        return {arm.key: {"reported": reported[c].tolist(), "p_top": p[c].max(-1).tolist()} for c, arm in enumerate(arms)}

    def trained(self, ctx: Context[SelfReportConfig]) -> Any:
        """The model with the agents' weights fine-tuned in (trained once per run, on first use)."""
        if "trained_lm" not in ctx.data:
            from neuronatlas.studies.self_report_train import train_preferences

            with ctx.phase("train"):
                ctx.data["trained_lm"], ctx.data["train_info"] = train_preferences(
                    ctx.lm, ctx.data["agents"], steps=ctx.config.train_steps, per_agent=ctx.config.train_per_agent,
                    differ=ctx.config.train_differ, seed=ctx.config.seed, progress=lambda d, t: ctx.tick("LoRA: preferences", d, t))
        return ctx.data["trained_lm"]

    @staticmethod
    def introspection_split(n_agents: int) -> tuple[list[int], list[int]]:
        """(agents whose reports train the introspection stage, held-out agents it is scored on):
        alternate agents, so both halves span the domains' order."""
        return list(range(0, n_agents, 2)), list(range(1, n_agents, 2))

    def introspective(self, ctx: Context[SelfReportConfig]) -> Any:
        """The preference-tuned model after introspection training on half of the agents' reports."""
        if "introspect_lm" not in ctx.data:
            from neuronatlas.studies.self_report_train import train_reports

            base = self.trained(ctx)
            train, _ = self.introspection_split(len(ctx.data["agents"]))
            with ctx.phase("train"):
                ctx.data["introspect_lm"], ctx.data["introspect_info"] = train_reports(
                    base, [ctx.data["agents"][i] for i in train], steps=ctx.config.introspect_steps,
                    seed=ctx.config.seed, progress=lambda d, t: ctx.tick("LoRA: introspection", d, t))
        return ctx.data["introspect_lm"]

    def findings(self, ctx: Context[SelfReportConfig], selection: Selection, grid: Grid, measured: Measured) -> Outcome:
        from neuronatlas.studies.self_report_report import self_report_outcome

        return self_report_outcome(self, ctx, grid, measured)

    def true_utility_gaps(self, ctx: Context[SelfReportConfig]) -> np.ndarray:
        agents = ctx.data["agents"]
        return np.array([utility(agents[i], b) - utility(agents[i], a) for i, a, b in ctx.data["choices"]])
