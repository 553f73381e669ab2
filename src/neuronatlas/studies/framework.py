"""The skeleton every study is built on: config, resumable state, selection, condition grid with
matched random baselines, batched measurement, statistical comparisons, typed findings, report and
atlas registration, owned once here. A study supplies four methods:

- ``select(ctx)`` -> :class:`Selection` (concept -> ranked neurons);
- ``conditions(ctx, selection)`` -> :class:`Grid` (``grid.selected(...)`` adds the matched random
  arms itself);
- ``measure(ctx, items, arms)`` -> per-item values of every metric for a group of arms measured on
  the same items (one batched call; results are kept in ``state.json`` so a rerun resumes);
- ``findings(ctx, selection, grid, measured)`` -> :class:`Outcome` (typed findings, sections, the
  study's own numbers, figures).

Every study is run the same way, from Python or the CLI::

    >>> from neuronatlas.studies import run
    >>> from neuronatlas.studies.clamp import ClampConfig
    >>> result = run(lm, ClampConfig(concept="dog"), "out/dog")       # doctest: +SKIP
    >>> result.report.findings_dict()                                   # doctest: +SKIP

``out`` receives ``results.json`` (config, provenance, selection, the study's numbers and the typed
``report``), ``report.html``, ``summary.md``, the figures and ``state.json``; the atlas (``OUT/atlas``
by default) receives the recording, the selections and a copy of the study's files for the viewer.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np

from neuronatlas.intervene import NeuronSet
from neuronatlas.intervene.interventions import Condition
from neuronatlas.models.loading import LoadedModel
from neuronatlas.record.batching import count_forwards
from neuronatlas.report.html import write_study_report
from neuronatlas.report.model import Finding, Section, StudyReport
from neuronatlas.stats.inference import (
    Alternative, empirical_p, mcnemar_exact, paired_permutation, random_interval,
)
from neuronatlas.store.atlas import Atlas, atomic_path, write_json_atomic
from neuronatlas.studies.common import (
    StudyState, concept_seed, copy_into_atlas, random_like, replace_selections, study_provenance,
)

__all__ = ["StudyConfig", "Selection", "Arm", "Grid", "Measured", "Comparison", "Outcome", "Context", "Study",
           "StudyResult", "ProgressFn", "register_study", "run", "study_for", "json_safe"]

ProgressFn = Callable[[str, int, int], None]        # (phase, done, total): the one progress signature
ArmKind = Literal["baseline", "selected", "random", "other"]


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars and arrays -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


@dataclass(frozen=True)
class StudyConfig:
    """Fields every study has. Subclasses add theirs (all frozen, JSON-serialisable)."""

    seed: int = 0
    n_random: int = 20            # matched random neuron sets per selected condition
    alpha: float = 0.05           # significance level of every finding's rule

    def fingerprint(self) -> str:
        """The one fingerprint recipe: study config class and every field."""
        blob = json.dumps({"config": type(self).__name__, **asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Selection:
    """Concept -> neurons, best first, with the score that ranked them (stored in the atlas)."""

    method: str
    site: str
    ranked: dict[str, list[tuple[tuple[int, int], float]]] = field(default_factory=dict)

    def add(self, concept: str, pairs: Sequence[tuple[int, int]], scores: Sequence[float] | None = None) -> None:
        sc = list(scores) if scores is not None else [math.nan] * len(pairs)
        self.ranked[concept] = [((int(a), int(b)), float(s)) for (a, b), s in zip(pairs, sc)]

    def neurons(self, concept: str) -> NeuronSet:
        return NeuronSet.of([p for p, _ in self.ranked[concept]], self.site)

    def top(self, concept: str, n: int) -> NeuronSet:
        return NeuronSet.of([p for p, _ in self.ranked[concept][:n]], self.site)

    @property
    def concepts(self) -> list[str]:
        return sorted(self.ranked)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "site": self.site,
                "neurons": {c: [f"L{a}:{b}" for (a, b), _ in rows] for c, rows in sorted(self.ranked.items())}}


@dataclass(frozen=True)
class Arm:
    """One cell of the condition grid: interventions measured on one item set."""

    key: str
    condition: Condition                       # () = the unmodified model
    items: str                                 # which item set (e.g. a relation's test facts)
    kind: ArmKind = "selected"
    concept: str | None = None
    of: str | None = None                      # for a random arm: the selected arm it is a baseline for
    subset: tuple[int, ...] | None = None      # indices into the item set; None = all of them


class Grid:
    """The arms of a study, in order. ``selected`` adds an arm and its matched random arms."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.arms: dict[str, Arm] = {}

    def add(self, arm: Arm) -> Arm:
        if arm.key in self.arms and self.arms[arm.key] != arm:
            raise ValueError(f"two different arms share the key {arm.key!r}")
        self.arms[arm.key] = arm
        return arm

    def baseline(self, items: str, subset: Sequence[int] | None = None, key: str | None = None) -> Arm:
        return self.add(Arm(key or f"baseline|{items}", (), items, "baseline",
                            subset=tuple(subset) if subset is not None else None))

    def selected(self, key: str, neurons: NeuronSet, make: Callable[[NeuronSet], Condition], items: str, *,
                 concept: str | None = None, subset: Sequence[int] | None = None, random: bool = True,
                 random_tag: str | None = None) -> Arm:
        """The arm ``make(neurons)`` on ``items`` and, with ``random``, ``config.n_random`` arms
        ``make(R)`` for random sets R matched to ``neurons`` (see :meth:`Context.random_sets`; the
        same ``random_tag`` gives the same sets, so one concept's sets can be reused on other items)."""
        sub = tuple(subset) if subset is not None else None
        arm = self.add(Arm(key, make(neurons), items, "selected", concept, subset=sub))
        if random:
            for r in self.random_arms(key, neurons, make, items, random_tag=random_tag or key, concept=concept,
                                      subset=subset):
                self.add(r)
        return arm

    def random_arms(self, key: str, neurons: NeuronSet, make: Callable[[NeuronSet], Condition], items: str, *,
                    random_tag: str, concept: str | None = None, subset: Sequence[int] | None = None,
                    exclude: NeuronSet | None = None) -> list[Arm]:
        """The matched random arms of arm ``key`` (not added to the grid; a subset of its items may be
        given), e.g. for :meth:`Study.more_arms`."""
        sub = tuple(subset) if subset is not None else None
        return [Arm(f"{key}|rand{s}", make(ns), items, "random", concept, of=key, subset=sub)
                for s, ns in enumerate(self.ctx.random_sets(neurons, random_tag, exclude=exclude))]

    def randoms(self, key: str) -> list[Arm]:
        return [a for a in self.arms.values() if a.of == key]

    def __iter__(self) -> Iterator[Arm]:
        return iter(self.arms.values())

    def __len__(self) -> int:
        return len(self.arms)


@dataclass(frozen=True)
class Comparison:
    """A selected arm against its random arms and against the unmodified model, on one metric."""

    metric: str
    n_items: int
    selected: float                 # mean over items
    baseline: float                 # the unmodified model on the same items
    random_mean: float
    random_lo: float                # 2.5% and 97.5% of the random-set distribution (not a CI of its mean)
    random_hi: float
    n_random: int
    p_vs_random: float              # empirical rank of the selected arm among the random arms
    p_vs_unmodified: float          # exact McNemar (0/1 metrics) or sign-flip permutation, paired on items
    alternative: Alternative

    @property
    def delta(self) -> float:
        return self.selected - self.baseline

    def to_json(self) -> dict[str, Any]:
        return json_safe({**asdict(self), "delta": self.delta})


class Measured:
    """Per-item values of every metric for every measured arm."""

    def __init__(self, grid: Grid, values: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
        self.grid = grid
        self.values = values

    def get(self, key: str, metric: str) -> np.ndarray:
        return np.asarray(self.values[key][metric], dtype=float)

    def mean(self, key: str, metric: str) -> float:
        v = self.get(key, metric)
        return float(v.mean()) if v.size else math.nan

    def on(self, key: str, metric: str, subset: Sequence[int]) -> np.ndarray:
        """Values of ``key`` restricted to item indices ``subset`` (of the full item set)."""
        arm = self.grid.arms[key]
        v = self.get(key, metric)
        pos = {i: n for n, i in enumerate(arm.subset)} if arm.subset is not None else None
        idx = [pos[i] for i in subset if i in pos] if pos is not None else list(subset)
        return v[idx]

    def compare(self, key: str, metric: str, *, baseline: str, alternative: Alternative = "less",
                binary: bool = True, subset: Sequence[int] | None = None, seed: int = 0) -> Comparison:
        """Compare arm ``key`` with its random arms (empirical rank) and with ``baseline`` (paired
        test over items: exact McNemar when ``binary``, else a sign-flip permutation test).
        ``alternative='less'``: the selected arm lowers the metric more than chance."""
        arm = self.grid.arms[key]
        items = subset if subset is not None else (arm.subset if arm.subset is not None else
                                                    range(len(self.get(key, metric))))
        items = list(items)
        sel = self.on(key, metric, items)
        base = self.on(baseline, metric, items)
        # a random arm counts only where it was measured on every compared item
        rand = [float(self.on(r.key, metric, items).mean()) for r in self.grid.randoms(key) if r.key in self.values
                and len(items) and (r.subset is None or set(items) <= set(r.subset))]
        m, lo, hi = random_interval(rand)
        sel_mean = float(sel.mean()) if sel.size else math.nan
        if binary:
            p_unmod = mcnemar_exact(base, sel, "greater" if alternative == "greater" else
                                    "less" if alternative == "less" else "two-sided") if sel.size else math.nan
        else:
            p_unmod = paired_permutation(sel, base, alternative=alternative, seed=seed) if sel.size else math.nan
        return Comparison(metric, len(items), sel_mean, float(base.mean()) if base.size else math.nan, m, lo, hi,
                          len(rand), empirical_p(sel_mean, rand, alternative) if rand else math.nan, p_unmod,
                          alternative)


@dataclass
class Outcome:
    """What a study's ``findings`` returns: typed findings, report sections, its numbers, figures."""

    findings: list[Finding]
    sections: list[Section]
    numbers: dict[str, Any]
    setup: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)      # files in ``out`` written by the study


@dataclass
class StudyResult:
    """The in-memory form of ``results.json``."""

    study: str
    out: Path
    report: StudyReport
    results: dict[str, Any]

    @property
    def findings(self) -> dict[str, str]:
        return self.report.findings_dict()

    def __getitem__(self, key: str) -> Any:      # results["..."] keeps working for callers of the old scripts
        return self.results[key]


C = TypeVar("C", bound=StudyConfig)


class Context(Generic[C]):
    """What a study's methods see: the model, config, output folder, atlas, state and progress."""

    def __init__(self, lm: LoadedModel, config: C, out: Path, store: Atlas, state: StudyState,
                 progress: ProgressFn | None) -> None:
        self.lm, self.config, self.out, self.store, self.state = lm, config, out, store, state
        self._progress = progress
        self.bins: np.ndarray | None = None     # (layers, neurons) magnitude bins for matching random sets
        self.data: dict[str, Any] = {}          # the study's own scratch (data provenance, recordings...)
        self.timings: dict[str, float] = {}

    def tick(self, phase: str, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(phase, done, total)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 2)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``state[key]``, computing and storing it (atomically) the first time."""
        if key in self.state:
            return self.state.get(key)
        return self.state.put(key, json_safe(compute()))

    def random_sets(self, neurons: NeuronSet, tag: str, n: int | None = None,
                    exclude: NeuronSet | None = None) -> list[NeuronSet]:
        """``n`` (default ``config.n_random``) random sets of ``len(neurons)``, each drawn with its own
        seed from (config seed, tag, draw), matched on layer and, when ``self.bins`` is set, on the
        magnitude bin (e.g. decile of mean |response|) within the layer; never drawing from
        ``exclude`` (default: ``neurons`` itself)."""
        count = self.config.n_random if n is None else n
        return [random_like(neurons, self.lm.n_neurons, seed=concept_seed(self.config.seed, tag, s), bins=self.bins,
                            exclude=exclude) for s in range(count)]


_REGISTRY: dict[type, type[Study[Any]]] = {}


def register_study(cls: type[Study[Any]]) -> type[Study[Any]]:
    """Class decorator: ``run(lm, config, out)`` finds the study by its config class."""
    _REGISTRY[cls.config_class] = cls
    return cls


def study_for(config: StudyConfig) -> type[Study[Any]]:
    try:
        return _REGISTRY[type(config)]
    except KeyError:
        raise TypeError(f"no study is registered for {type(config).__name__}") from None


def run(lm: LoadedModel, config: StudyConfig, out: str | Path, *, atlas: str | Path | Atlas | None = None,
        progress: ProgressFn | None = None, **inputs: Any) -> StudyResult:
    """Run (or resume) the study that ``config`` belongs to; ``inputs`` are study-specific data
    (e.g. ``facts=`` for the relation study)."""
    return study_for(config)(config, **inputs).run(lm, out, atlas=atlas, progress=progress)


class Study(ABC, Generic[C]):
    """Subclasses set ``name``, ``title``, ``intro``, ``config_class`` and the four methods."""

    name: ClassVar[str]
    title: ClassVar[str]
    intro: ClassVar[str] = ""
    config_class: ClassVar[type]
    pass_arms: ClassVar[int] = 8                # arms measured together (one batched call, one resume step)
    replace_all_selections: ClassVar[bool] = True   # False: replace only the rows of this run's concepts

    def instance(self) -> str:
        """The name of this run in the atlas (``studies/<instance>/``, the manifest key); default ``name``."""
        return self.name

    def __init__(self, config: C, **inputs: Any) -> None:
        self.config = config
        self.inputs = inputs

    # --- supplied by each study -------------------------------------------------------------------------
    @abstractmethod
    def select(self, ctx: Context[C]) -> Selection: ...

    @abstractmethod
    def conditions(self, ctx: Context[C], selection: Selection) -> Grid: ...

    @abstractmethod
    def measure(self, ctx: Context[C], items: str, arms: Sequence[Arm]) -> dict[str, dict[str, Any]]: ...

    @abstractmethod
    def findings(self, ctx: Context[C], selection: Selection, grid: Grid, measured: Measured) -> Outcome: ...

    # --- optional hooks -----------------------------------------------------------------------------------
    def data_fingerprint(self) -> str:
        """Identifies the study's input data (part of the resume fingerprint)."""
        blob = json.dumps(self.inputs, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def more_arms(self, ctx: Context[C], grid: Grid, measured: Measured) -> list[Arm]:
        """Arms to measure in a further stage, once the values so far are known (default: none).
        Called until it returns nothing; lets a study choose the items it tests (known facts) from
        the baseline, or spend random baselines only where a test needs them."""
        return []

    # --- owned by the skeleton ------------------------------------------------------------------------------
    def run(self, lm: LoadedModel, out: str | Path, *, atlas: str | Path | Atlas | None = None,
            progress: ProgressFn | None = None) -> StudyResult:
        t_start = time.perf_counter()
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        store = atlas if isinstance(atlas, Atlas) else Atlas.create(atlas or out_dir / "atlas", model=lm.provenance)
        identity = lm.provenance.get("file_sha256") or lm.provenance.get("revision") or lm.name
        fingerprint = f"{self.name}:{self.config.fingerprint()}:{self.data_fingerprint()}:{str(identity)[:16]}"
        state = StudyState(out_dir / "state.json", fingerprint)
        ctx: Context[C] = Context(lm, self.config, out_dir, store, state, progress)
        with count_forwards(lm) as forwards:
            with ctx.phase("select"):
                selection = self.select(ctx)
            self._write_selection(store, selection)
            grid = self.conditions(ctx, selection)
            values = self._measure_all(ctx, list(grid))
            while extra := [a for a in self.more_arms(ctx, grid, Measured(grid, values)) if a.key not in values]:
                for arm in extra:
                    grid.add(arm)
                values.update(self._measure_all(ctx, extra))
            measured = Measured(grid, values)
            with ctx.phase("findings"):
                outcome = self.findings(ctx, selection, grid, measured)
        ctx.timings["total"] = round(time.perf_counter() - t_start, 2)
        report = StudyReport(self.name, self.title, self.intro,
                             {**outcome.setup, "random sets per condition": self.config.n_random,
                              "significance level": self.config.alpha, "seed": self.config.seed,
                              "wall time (s)": ctx.timings["total"]},
                             outcome.findings, outcome.sections)
        results = json_safe({
            "study": self.name, "config": asdict(self.config), "fingerprint": fingerprint,
            "provenance": study_provenance(lm, seed=self.config.seed, dataset_sha256=self.data_fingerprint(),
                                           extra={"data": ctx.data.get("provenance", {})}),
            "selection": selection.to_json(),
            "conditions": {"arms": len(grid), "by_kind": _count_kinds(grid)},
            **outcome.numbers,
            "findings": report.findings_dict(),
            "report": report.to_json(),
            "timing": {"seconds": ctx.timings["total"], "phases": ctx.timings, "model_forward_calls": forwards.forwards,
                       "model_forward_rows": forwards.rows, "model_forward_tokens": forwards.tokens},
        })
        write_json_atomic(out_dir / "results.json", results)
        write_study_report(out_dir / "report.html", report)
        with atomic_path(out_dir / "summary.md") as tmp:
            tmp.write_text(summary_markdown(report), encoding="utf-8")
        files = [out_dir / "results.json", out_dir / "report.html", out_dir / "summary.md",
                 *[out_dir / f for f in outcome.figures]]
        copy_into_atlas(store, self.instance(), files)
        store.update_manifest(lambda m: m.setdefault("studies", {}).__setitem__(self.instance(), {
            "kind": self.name, "path": f"studies/{self.instance()}", "output": str(out_dir.resolve()),
            "created": results["provenance"]["created"], "concepts": selection.concepts}))
        return StudyResult(self.name, out_dir, report, results)

    def _measure_all(self, ctx: Context[C], arms: list[Arm]) -> dict[str, dict[str, Any]]:
        """Measure every arm once, grouped by item set (and subset) in chunks of ``pass_arms``;
        finished arms come from the state."""
        groups: dict[tuple[str, tuple[int, ...] | None], list[Arm]] = defaultdict(list)
        for arm in arms:
            groups[(arm.items, arm.subset)].append(arm)
        todo = [a for a in arms if f"arm|{a.key}" not in ctx.state]
        total, done = len(todo), 0
        with ctx.phase("measure"):
            for (items, _), group in groups.items():
                pending = [a for a in group if f"arm|{a.key}" not in ctx.state]
                for k in range(0, len(pending), self.pass_arms):
                    chunk = pending[k:k + self.pass_arms]
                    got = self.measure(ctx, items, chunk)
                    ctx.state.update({f"arm|{arm.key}": json_safe(got[arm.key]) for arm in chunk})
                    done += len(chunk)
                    ctx.tick("conditions", done, total)
        return {a.key: ctx.state.get(f"arm|{a.key}") for a in arms}

    def _write_selection(self, store: Atlas, selection: Selection) -> None:
        import pyarrow as pa

        rows: dict[str, list[Any]] = defaultdict(list)
        for concept, ranked in sorted(selection.ranked.items()):
            for rank, ((layer, j), score) in enumerate(ranked):
                for col, val in (("study", self.name), ("concept", concept), ("method", selection.method),
                                 ("site", selection.site), ("layer", layer), ("neuron", j), ("score", score),
                                 ("rank", rank)):
                    rows[col].append(val)
        if not rows:
            return
        table = pa.table({k: pa.array(v, type=pa.int32() if k in ("layer", "neuron", "rank") else
                                      pa.float64() if k == "score" else pa.string()) for k, v in rows.items()})
        replace_selections(store, table, study=self.name,
                           concepts=None if self.replace_all_selections else selection.concepts)


def _count_kinds(grid: Grid) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for arm in grid:
        out[arm.kind] += 1
    return dict(out)


def summary_markdown(report: StudyReport, max_rows: int = 40) -> str:
    """The findings (with their rules) and the first table of each section (at most ``max_rows``
    rows; the rest are in results.json and report.html), as Markdown."""
    lines = [f"## {report.title}", ""]
    setup = ", ".join(f"{k}: {v}" for k, v in report.setup.items())
    lines += [f"Setup: {setup}.", "", "Findings (each computed by the stated rule):", ""]
    for f in report.findings:
        verdict = "" if f.holds is None else (" — holds" if f.holds else " — does not hold")
        lines.append(f"- **{f.title}**: {f.text}" + (f" _(rule: {f.rule}{verdict})_" if f.rule else ""))
    for sec in report.sections:
        for t in sec.tables[:1]:
            lines += ["", f"### {sec.title}", "", "| " + " | ".join(t.columns) + " |",
                      "|" + "---|" * len(t.columns)]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in t.rows[:max_rows]]
            if len(t.rows) > max_rows:
                lines += ["", f"({len(t.rows) - max_rows} more rows in results.json and report.html)"]
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v).replace("|", "\\|")
