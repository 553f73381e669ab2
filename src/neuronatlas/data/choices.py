"""Two-option choices described by attributes, made under hidden attribute weights (after
Plunkett et al., "Self-Interpretability", arXiv 2505.17120): condos, loans, vacations...

An *agent* is a domain and one weight in [-100, 100] per attribute (positive: prefers more of
it). An option's utility is the weighted sum of its attribute values rescaled to [0, 1]; the agent
chooses the option of higher utility.

    >>> from neuronatlas.data.choices import DOMAINS, make_agents, choice_pairs, utility
    >>> agents = make_agents(3, seed=0)
    >>> agents[0].domain in DOMAINS, len(agents[0].weights) == len(DOMAINS[agents[0].domain].attributes)
    (True, True)
    >>> a, b = choice_pairs(agents[0].domain, 1, seed=0)[0]
    >>> isinstance(utility(agents[0], a), float)
    True

The domains and attribute ranges are written for this package (no external data).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from neuronatlas.errors import DatasetError

__all__ = ["Attribute", "Domain", "DOMAINS", "Agent", "make_agents", "choice_pairs", "utility", "describe",
           "preference_text"]


@dataclass(frozen=True)
class Attribute:
    name: str
    fmt: str              # "{v}" is replaced by the value
    lo: float
    hi: float
    step: float = 1.0


@dataclass(frozen=True)
class Domain:
    item: str             # "condo"
    plural: str           # "condos"
    attributes: tuple[Attribute, ...]


def _d(item: str, plural: str, *attrs: tuple[str, str, float, float, float]) -> Domain:
    return Domain(item, plural, tuple(Attribute(*a) for a in attrs))


DOMAINS: dict[str, Domain] = {d.plural: d for d in [
    _d("condo", "condos", ("price", "${v}k", 200, 900, 10), ("size", "{v} square feet", 500, 2000, 50),
       ("distance to work", "{v} miles", 1, 30, 1), ("floor", "floor {v}", 1, 30, 1),
       ("monthly fee", "${v} per month", 100, 900, 50)),
    _d("loan", "loans", ("interest rate", "{v}%", 2, 12, 0.5), ("term", "{v} years", 5, 30, 5),
       ("fee", "${v}", 0, 3000, 250), ("lender rating", "{v} stars", 1, 5, 1),
       ("approval time", "{v} days", 1, 30, 1)),
    _d("vacation", "vacations", ("cost", "${v}", 500, 5000, 100), ("length", "{v} days", 3, 21, 1),
       ("flight time", "{v} hours", 1, 15, 1), ("temperature", "{v} degrees", 40, 95, 5),
       ("hotel rating", "{v} stars", 1, 5, 1)),
    _d("car", "cars", ("price", "${v}k", 10, 80, 1), ("fuel economy", "{v} miles per gallon", 15, 60, 1),
       ("horsepower", "{v} hp", 100, 500, 10), ("seats", "{v} seats", 2, 8, 1), ("age", "{v} years old", 0, 15, 1)),
    _d("laptop", "laptops", ("price", "${v}", 300, 3000, 50), ("battery life", "{v} hours", 3, 20, 1),
       ("weight", "{v} pounds", 2, 7, 0.5), ("screen size", "{v} inches", 11, 17, 1),
       ("memory", "{v} GB", 4, 64, 4)),
    _d("job", "jobs", ("salary", "${v}k", 30, 200, 5), ("commute", "{v} minutes", 5, 90, 5),
       ("vacation days", "{v} days", 5, 35, 1), ("weekly hours", "{v} hours", 30, 60, 1),
       ("team size", "{v} people", 2, 50, 1)),
    _d("restaurant", "restaurants", ("price per meal", "${v}", 10, 120, 5), ("rating", "{v} stars", 1, 5, 1),
       ("distance", "{v} miles", 1, 20, 1), ("waiting time", "{v} minutes", 0, 60, 5),
       ("menu size", "{v} dishes", 5, 80, 5)),
    _d("apartment", "apartments", ("rent", "${v} per month", 800, 4000, 100), ("bedrooms", "{v} bedrooms", 1, 5, 1),
       ("distance to a park", "{v} minutes", 1, 30, 1), ("building age", "{v} years", 1, 100, 1),
       ("noise level", "{v} out of 10", 1, 10, 1)),
    _d("phone", "phones", ("price", "${v}", 100, 1500, 50), ("battery", "{v} hours", 8, 48, 2),
       ("camera", "{v} megapixels", 8, 200, 8), ("storage", "{v} GB", 32, 1024, 32),
       ("screen size", "{v} inches", 4, 7, 0.5)),
    _d("hotel", "hotels", ("nightly price", "${v}", 50, 600, 10), ("distance to the center", "{v} miles", 0, 15, 1),
       ("guest rating", "{v} out of 10", 1, 10, 1), ("room size", "{v} square feet", 150, 800, 50),
       ("floor", "floor {v}", 1, 40, 1)),
    _d("gym", "gyms", ("monthly price", "${v}", 10, 200, 5), ("distance", "{v} miles", 1, 20, 1),
       ("opening hours", "{v} hours a day", 8, 24, 1), ("classes", "{v} classes a week", 0, 60, 5),
       ("crowding", "{v} out of 10", 1, 10, 1)),
    _d("flight", "flights", ("price", "${v}", 50, 1500, 25), ("duration", "{v} hours", 1, 20, 1),
       ("stops", "{v} stops", 0, 3, 1), ("legroom", "{v} inches", 28, 40, 1),
       ("departure hour", "{v}:00", 5, 23, 1)),
]}


@dataclass(frozen=True)
class Agent:
    """A domain and one weight per attribute (integers in [-100, 100])."""

    domain: str
    weights: tuple[int, ...]

    @property
    def spec(self) -> Domain:
        return DOMAINS[self.domain]


def make_agents(n: int, seed: int = 0, domains: Sequence[str] | None = None) -> list[Agent]:
    """``n`` agents cycling through ``domains`` (default all), weights uniform in [-100, 100]."""
    names = list(domains or DOMAINS)
    rng = random.Random(f"neuronatlas.choices.agents:{seed}")
    return [Agent(names[i % len(names)], tuple(rng.randint(-100, 100) for _ in DOMAINS[names[i % len(names)]].attributes))
            for i in range(n)]


def _value(attr: Attribute, rng: random.Random) -> float:
    steps = int(round((attr.hi - attr.lo) / attr.step))
    return attr.lo + attr.step * rng.randint(0, steps)


def choice_pairs(domain: str, n: int, seed: int = 0, *, differ: int = 0) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """``n`` pairs of options (attribute values), drawn on each attribute's grid. ``differ`` > 0:
    the two options differ in exactly that many attributes (chosen at random) and share the
    others, which makes a choice depend on fewer weights (0: every attribute drawn for both)."""
    spec = DOMAINS[domain]
    rng = random.Random(f"neuronatlas.choices.pairs:{seed}:{domain}")
    if not differ:
        return [(tuple(_value(a, rng) for a in spec.attributes), tuple(_value(a, rng) for a in spec.attributes))
                for _ in range(n)]
    if not 0 < differ <= len(spec.attributes):
        raise DatasetError(f"differ={differ}: a {spec.item} has {len(spec.attributes)} attributes; use 1 to that")
    pairs = []
    for _ in range(n):
        a = [_value(x, rng) for x in spec.attributes]
        b = list(a)
        for k in rng.sample(range(len(a)), differ):
            while b[k] == a[k]:
                b[k] = _value(spec.attributes[k], rng)
        pairs.append((tuple(a), tuple(b)))
    return pairs


def utility(agent: Agent, values: Sequence[float]) -> float:
    """Sum over attributes of weight/100 x the value rescaled to [0, 1]."""
    return float(sum(w / 100 * (v - a.lo) / (a.hi - a.lo) for w, v, a in zip(agent.weights, values, agent.spec.attributes)))


def _fmt(attr: Attribute, v: float) -> str:
    text = f"{v:g}" if attr.step < 1 else str(int(round(v)))
    return attr.fmt.replace("{v}", text)


def describe(domain: str, values: Sequence[float]) -> str:
    """``"price $450k, size 900 square feet, ..."``."""
    return ", ".join(f"{a.name} {_fmt(a, v)}" for a, v in zip(DOMAINS[domain].attributes, values))


def preference_text(agent: Agent) -> str:
    """The agent's weights in words, for an in-context (system prompt) condition."""
    parts = ", ".join(f"{a.name} {w:+d}" for a, w in zip(agent.spec.attributes, agent.weights))
    return (f"When choosing {agent.spec.plural}, your preferences are set by attribute weights from -100 (you strongly "
            f"prefer less of it) to +100 (you strongly prefer more of it): {parts}.\n")
