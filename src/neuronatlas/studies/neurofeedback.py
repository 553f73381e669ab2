"""Neurofeedback (after Ji-An et al., "Language Models Are Capable of Metacognitive Monitoring and
Control of Their Internal Activations", arXiv 2505.13763) on the study framework.

1. ``select``: real sentences (review snippets) are read once; the mean MLP-neuron activation of
   layer ``layer`` over each sentence's tokens gives a (sentences, neurons) matrix. Axes in that
   space: principal components ``pcs`` (first, middle, late), the logistic-regression direction of
   the sentences' sentiment (a concept), and the single neuron with the largest variance. A
   sentence's label on an axis is 1 when its projection exceeds the median of the pool.
2. ``conditions``: per axis and N in ``shots``, N (sentence, label) examples in context, then each
   held-out test sentence: the label is read from log p(" 1") - log p(" 0"); the same examples with
   shuffled labels are the control. Control tasks, with ``control_shots`` examples shown label
   first: *explicit*, the model writes a sentence after "Label: 1" / "Label: 0" / no label;
   *implicit*, a given sentence follows "Label: 1" / "Label: 0" / no label. Either way the
   projection of the sentence's tokens (read in context) is measured.
3. ``measure``: per test sentence 0/1 correctness and the margin; per control item the
   standardised projection (units: SD of the axis over the pool, read without context).
4. ``findings``: :mod:`neuronatlas.studies.neurofeedback_report`.

    >>> from neuronatlas.studies import run
    >>> from neuronatlas.studies.neurofeedback import NeurofeedbackConfig
    >>> result = run(lm, NeurofeedbackConfig(), "out/neurofeedback")      # doctest: +SKIP
    >>> result["auc"]["pc1"]                                                # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuronatlas.errors import SelectionError
from neuronatlas.evaluate import generate
from neuronatlas.studies.framework import Arm, Context, Grid, Measured, Outcome, Selection, Study, StudyConfig, register_study
from neuronatlas.studies.introspection import (
    SPACES, Segment, choice_margin, review_sentences, span_activations, study_layer,
)

__all__ = ["NeurofeedbackConfig", "NeurofeedbackStudy", "INSTRUCTION", "CONTROL_INSTRUCTION", "fit_axes"]

INSTRUCTION = ("Each sentence below has a label, 0 or 1, given by a hidden rule. Learn the rule from the examples "
               "and give the label of the last sentence.\n\n")
CONTROL_INSTRUCTION = ("Each example below gives a label, 0 or 1, and then a sentence that has this label under a "
                       "hidden rule.\n\n")
TARGETS = ("1", "0", "none")


@dataclass(frozen=True)
class NeurofeedbackConfig(StudyConfig):
    layer: int = -1                      # -1: the middle layer
    space: str = "mlp"                   # mlp (neurons) or a residual-stream space: resid, attn_out, mlp_out
    n_sentences: int = 288               # pool: demonstrations and axis fitting, plus the test sentences
    n_test: int = 48                     # held-out sentences whose labels the model reports
    shots: tuple[int, ...] = (0, 4, 16, 64)
    pcs: tuple[int, ...] = (1, 8, 64)    # principal components used as axes (1-based)
    concept_axis: bool = True            # the logistic direction of sentiment (fresh vs rotten)
    neuron_axis: bool = True             # the single neuron of largest variance
    control_shots: int = 8
    n_control: int = 24                  # given sentences (implicit control)
    n_generate: int = 4                  # prompts per target (explicit control)
    max_new_tokens: int = 24
    max_words: int = 20                  # review snippets of 8 to max_words words
    temperature: float = 0.8             # sampling temperature of the written sentences
    batch_size: int = 8

    def __post_init__(self) -> None:
        if any(s < 0 or s % 2 for s in self.shots) or not self.shots or self.control_shots % 2 or self.control_shots < 2:
            raise SelectionError(f"--shots {','.join(map(str, self.shots))} and --control-shots {self.control_shots}: "
                                 "use even numbers (half label 1, half label 0), e.g. 0,4,16,64")
        if self.n_test < 4 or self.n_sentences - self.n_test < max(max(self.shots), self.control_shots, 8):
            raise SelectionError(f"--n-sentences {self.n_sentences} leaves too few examples for --shots up to "
                                 f"{max(self.shots)} after {self.n_test} test sentences; raise --n-sentences")
        if any(k < 1 for k in self.pcs) or max(self.pcs, default=1) > self.n_sentences - self.n_test:
            raise SelectionError(f"--pcs {self.pcs}: components are 1-based and at most the number of fitting sentences")
        if self.space not in SPACES:
            raise SelectionError(f"--space {self.space!r} is not one of {', '.join(SPACES)}")
        if self.n_control > self.n_test or self.n_control < 2 or self.n_generate < 2:
            raise SelectionError("--n-control must be between 2 and --n-test, --n-generate at least 2")


def fit_axes(acts: np.ndarray, train: np.ndarray, sentiment: np.ndarray, config: NeurofeedbackConfig,
             seed: int = 0) -> dict[str, dict[str, Any]]:
    """Unit axes in the activation space, fitted on rows ``train`` of ``acts`` (sentences, neurons):
    ``pc<k>`` (principal components), ``sentiment`` (the logistic-regression direction of
    ``sentiment``, :func:`neuronatlas.directions.fit_direction`), ``neuron`` (the largest-variance
    neuron, or coordinate outside the ``mlp`` space). Each: ``vector``, ``share`` (share of the
    pool's variance along it), ``kind``, and ``neuron`` for the single-neuron axis."""
    import torch
    from sklearn.decomposition import PCA

    from neuronatlas.directions import fit_direction

    x = acts[train].astype(np.float64)
    mu = x.mean(0)
    total = float(((x - mu) ** 2).sum(1).mean())
    axes: dict[str, dict[str, Any]] = {}

    def share(v: np.ndarray) -> float:
        return float(((x - mu) @ v).var() / total) if total > 0 else float("nan")

    if config.pcs:
        pca = PCA(n_components=max(config.pcs), random_state=seed).fit(x)
        for k in config.pcs:
            v = pca.components_[k - 1]
            axes[f"pc{k}"] = {"vector": v, "share": share(v), "kind": "principal component"}
    if config.concept_axis and len(set(sentiment[train].tolist())) == 2:
        y = sentiment[train]
        t = torch.tensor(x - mu, dtype=torch.float32)[:, None, :]
        # only the vector is used (the MLP neuron space is not one of the DirectionSet's spaces)
        ds = fit_direction(t[y == 1], t[y == 0], method="logistic", layers=[0], concept="sentiment", pool="mean",
                           seed=seed)
        v = ds.vectors[0].double().numpy()
        axes["sentiment"] = {"vector": v, "share": share(v), "kind": "logistic direction (sentiment)",
                             "train_accuracy": float(ds.train_accuracy[0])}
    if config.neuron_axis:
        j = int(np.argmax(x.var(0)))
        v = np.zeros(x.shape[1])
        v[j] = 1.0
        axes["neuron"] = {"vector": v, "share": share(v), "neuron": j,
                          "kind": "single neuron" if config.space == "mlp" else f"single coordinate of {config.space}"}
    return axes


def _balanced(idx: list[int], labels: np.ndarray, n: int, rng: random.Random) -> list[int]:
    """``n`` indices, in blocks of one label-1 and one label-0 item in random order: every even
    prefix is balanced and the labels follow no fixed pattern."""
    pos = [i for i in idx if labels[i] == 1]
    neg = [i for i in idx if labels[i] == 0]
    rng.shuffle(pos)
    rng.shuffle(neg)
    if min(len(pos), len(neg)) < n // 2:
        raise SelectionError(f"only {min(len(pos), len(neg))} examples of one label for {n} shots; raise --n-sentences")
    out: list[int] = []
    for a, b in zip(pos[: n // 2], neg[: n // 2]):
        out += [a, b] if rng.random() < 0.5 else [b, a]
    return out


@register_study
class NeurofeedbackStudy(Study[NeurofeedbackConfig]):
    """Can the model report, and control, the projection of its own activations on an axis?"""

    name = "neurofeedback"
    title = "Neurofeedback: reporting and controlling activation projections"
    intro = ("After arXiv 2505.13763: sentences are labelled by whether their mean MLP activation at one layer projects "
             "above the median on an axis; the model sees N labelled examples and reports the labels of new sentences "
             "(against shuffled labels), then is asked to write or read a sentence with a given label while the "
             "projection is measured.")
    config_class = NeurofeedbackConfig
    pass_arms = 3

    def layer(self, ctx: Context[NeurofeedbackConfig]) -> int:
        return study_layer(ctx.config.layer, ctx.lm.n_layers)

    def select(self, ctx: Context[NeurofeedbackConfig]) -> Selection:
        cfg, lm = ctx.config, ctx.lm
        layer = self.layer(ctx)
        texts, info = review_sentences(cfg.n_sentences, cfg.seed, max_words=cfg.max_words)
        sentiment = np.array(info["sentiment"])
        acts = span_activations(lm, [((), " " + t) for t in texts], layer, batch_size=cfg.batch_size,
                                space=cfg.space).astype(np.float64)
        n_fit = cfg.n_sentences - cfg.n_test
        train, test = np.arange(n_fit), np.arange(n_fit, cfg.n_sentences)
        axes = fit_axes(acts, train, sentiment, cfg, cfg.seed)
        if not axes:
            raise SelectionError("no axis chosen: give --pcs, or keep the concept or neuron axis")
        mu = acts[train].mean(0)
        for name, ax in axes.items():
            proj = (acts - mu) @ ax["vector"]
            ax["labels"] = (proj > np.median(proj)).astype(int)
            ax["center"], ax["scale"] = float(np.median(proj)), float(proj.std() or 1.0)
            ax["mu"] = mu
        ctx.data.update(texts=texts, sentiment=sentiment, acts=acts, axes=axes, train=train, test=test, layer=layer,
                        provenance={"sentences": {k: v for k, v in info.items() if k != "sentiment"}})
        sel = Selection("neurofeedback-axis-loadings", "mlp")
        for name, ax in (axes.items() if cfg.space == "mlp" else ()):      # neurons only in the neuron space
            v = ax["vector"]
            top = np.argsort(-np.abs(v))[: 1 if name == "neuron" else 10]
            sel.add(name, [(layer, int(j)) for j in top], [float(v[j]) for j in top])
        return sel

    def conditions(self, ctx: Context[NeurofeedbackConfig], selection: Selection) -> Grid:
        grid = Grid(ctx)
        for name in ctx.data["axes"]:
            for n in ctx.config.shots:
                items = f"report|{name}|{n}"
                grid.add(Arm(f"{items}|real", (), items, "selected", name))
                if n:
                    grid.add(Arm(f"{items}|shuffled", (), items, "baseline", name))
            for task in ("explicit", "implicit"):
                for t in TARGETS:
                    grid.add(Arm(f"{task}|{name}|{t}", (), f"{task}|{name}", "baseline" if t == "none" else "selected",
                                 name))
        return grid

    # --- prompts --------------------------------------------------------------------------------------------
    def _rng(self, ctx: Context[NeurofeedbackConfig], *tag: Any) -> random.Random:
        return random.Random(f"neurofeedback:{ctx.config.seed}:" + ":".join(map(str, tag)))

    def report_prompts(self, ctx: Context[NeurofeedbackConfig], axis: str, n: int, shuffled: bool) -> tuple[str, list[str]]:
        """(prefix with ``n`` labelled examples, one query per test sentence)."""
        texts, labels = ctx.data["texts"], ctx.data["axes"][axis]["labels"]
        order = _balanced(list(ctx.data["train"]), labels, max(ctx.config.shots), self._rng(ctx, "demo", axis))[:n]
        shown = [int(labels[i]) for i in order]
        if shuffled:
            self._rng(ctx, "shuffle", axis, n).shuffle(shown)
        prefix = INSTRUCTION + "".join(f"Sentence: {texts[i]}\nLabel: {lab}\n\n" for i, lab in zip(order, shown))
        return prefix, [f"Sentence: {texts[i]}\nLabel:" for i in ctx.data["test"]]

    def control_prefix(self, ctx: Context[NeurofeedbackConfig], axis: str, draw: int) -> str:
        texts, labels = ctx.data["texts"], ctx.data["axes"][axis]["labels"]
        order = _balanced(list(ctx.data["train"]), labels, ctx.config.control_shots, self._rng(ctx, "control", axis, draw))
        return CONTROL_INSTRUCTION + "".join(f"Label: {labels[i]}\nSentence: {texts[i]}\n\n" for i in order)

    @staticmethod
    def control_cue(target: str) -> str:
        return "Sentence:" if target == "none" else f"Label: {target}\nSentence:"

    # --- measurement ------------------------------------------------------------------------------------------
    def _project(self, ctx: Context[NeurofeedbackConfig], axis: str, acts: np.ndarray) -> list[float]:
        ax = ctx.data["axes"][axis]
        return (((acts - ax["mu"]) @ ax["vector"] - ax["center"]) / ax["scale"]).tolist()

    def measure(self, ctx: Context[NeurofeedbackConfig], items: str, arms: Sequence[Arm]) -> dict[str, dict[str, Any]]:
        cfg, lm = ctx.config, ctx.lm
        task, axis = items.split("|")[:2]
        out: dict[str, dict[str, Any]] = {}
        layer = ctx.data["layer"]
        if task == "report":
            truth = ctx.data["axes"][axis]["labels"][ctx.data["test"]]
            for arm in arms:
                prefix, queries = self.report_prompts(ctx, axis, int(items.split("|")[2]), arm.key.endswith("shuffled"))
                m = choice_margin(lm, queries, (" 0", " 1"), prefixes=[prefix] * len(queries),
                                  batch_size=cfg.batch_size)[0]
                margin = m[:, 1] - m[:, 0]
                out[arm.key] = {"margin": margin.tolist(), "correct": ((margin > 0).astype(int) == truth).astype(int).tolist()}
        elif task == "implicit":
            prefix = self.control_prefix(ctx, axis, 0)
            given = [ctx.data["texts"][i] for i in ctx.data["test"][: cfg.n_control]]
            for arm in arms:
                t = arm.key.split("|")[2]
                segs: list[Segment] = [((prefix, self.control_cue(t)), " " + g) for g in given]
                out[arm.key] = {"proj": self._project(ctx, axis, span_activations(lm, segs, layer, batch_size=cfg.batch_size,
                                                                                  space=cfg.space))}
        else:
            prefixes = [self.control_prefix(ctx, axis, 1 + k) for k in range(cfg.n_generate)]
            for arm in arms:
                t = arm.key.split("|")[2]
                prompts = [p + self.control_cue(t) for p in prefixes]
                gens = generate(lm, prompts, max_new_tokens=cfg.max_new_tokens, stop=["\n"], batch_size=cfg.batch_size,
                                do_sample=True, temperature=cfg.temperature, seed=cfg.seed)[0]
                written = [g.strip() or "." for g in gens]
                segs = [((p, self.control_cue(t)), " " + w) for p, w in zip(prefixes, written)]
                out[arm.key] = {"proj": self._project(ctx, axis, span_activations(lm, segs, layer, batch_size=cfg.batch_size,
                                                                                  space=cfg.space)),
                                "text": written}
        return out

    def findings(self, ctx: Context[NeurofeedbackConfig], selection: Selection, grid: Grid, measured: Measured) -> Outcome:
        from neuronatlas.studies.neurofeedback_report import neurofeedback_outcome

        return neurofeedback_outcome(ctx, measured)
