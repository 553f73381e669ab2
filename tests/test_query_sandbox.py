"""`neuronatlas query` is confined to the atlas and cannot change it (issue #20, part 2)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from neuronatlas.cli.main import main
from neuronatlas.models.tiny import tiny_model


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sandbox")
    lm = tiny_model("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"text number {i}", "label": "ab"[i % 2]}) + "\n" for i in range(6)))
    assert main(["record", "--model", str(root / "model"), "--data", str(data), "--out", str(root / "a"), "--json"]) == 0
    return root / "a"


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


ATTACKS = [
    ("SELECT * FROM read_csv('/etc/passwd')", "Cannot access file"),
    ("SELECT * FROM glob('/etc/*')", "Cannot access file"),
    ("SELECT * FROM read_text('/etc/hostname')", "Cannot access file"),
    ("COPY stats TO 'ATLAS/records/default/stats.parquet'", "COPY statement"),
    ("COPY (SELECT 1) TO '/tmp/neuronatlas-escape.csv'", "COPY statement"),
    ("EXPLAIN ANALYZE COPY stats TO 'ATLAS/records/default/stats.parquet'", "EXPLAIN of COPY"),
    ("ATTACH 'ATLAS/new.db'", "ATTACH statement"),
    ("INSTALL httpfs", "is not read-only"),
    ("LOAD httpfs", "is not read-only"),
    ("SET enable_external_access = true", "SET statement"),
    ("CREATE TABLE t AS SELECT 1", "CREATE statement"),
    ("SELECT 1; DROP VIEW stats", "DROP statement"),
    ("PRAGMA database_list", "PRAGMA statement"),
    ("SELECT FROM WHERE", "does not parse"),
]


@pytest.mark.parametrize("sql,message", ATTACKS)
def test_attacks_are_refused_and_change_nothing(capsys, atlas, tmp_path, sql, message):
    before = _digest(atlas)
    code = main(["query", str(atlas), sql.replace("ATLAS", str(atlas))])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert sum("error:" in line for line in err.splitlines()) == 1
    assert _digest(atlas) == before
    assert not Path("/tmp/neuronatlas-escape.csv").exists()


def test_time_limit_interrupts(capsys, atlas):
    code = main(["query", str(atlas), "SELECT count(*) FROM range(100000000000) a, range(10) b", "--timeout", "0.5"])
    assert code == 2 and "time limit" in capsys.readouterr().err
    code = main(["query", str(atlas), "SELECT 1", "--timeout", "0"])
    assert code == 2 and "above 0" in capsys.readouterr().err


def test_reads_still_work_and_rows_are_limited(capsys, atlas):
    for sql in ["SELECT label, count(*) AS n FROM stats GROUP BY label ORDER BY label",
                "EXPLAIN SELECT * FROM stats", "DESCRIBE stats", "SUMMARIZE prompts",
                "WITH t AS (SELECT * FROM exemplars) SELECT count(*) AS n FROM t",
                f"SELECT count(*) AS n FROM read_parquet('{atlas}/records/*/stats.parquet')"]:
        assert main(["query", str(atlas), sql, "--json"]) == 0, sql
        assert json.loads(capsys.readouterr().out)
    assert main(["query", str(atlas), "SELECT * FROM stats", "--json", "--limit", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_export_is_explicit_and_outside_atlases(capsys, atlas, tmp_path, suffix):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    out = tmp_path / f"rows{suffix}"
    assert main(["query", str(atlas), "SELECT * FROM stats", "--out", str(out)]) == 0
    n = {".csv": lambda: pcsv.read_csv(out).num_rows, ".parquet": lambda: pq.read_table(out).num_rows,
         ".json": lambda: len(json.loads(out.read_text()))}[suffix]()
    assert n == pq.read_table(atlas / "records/default/stats.parquet").num_rows
    assert not list(tmp_path.glob(".*.tmp"))
    before = _digest(atlas)
    for bad, message in [(atlas / "records/default/stats.parquet", "inside the atlas"),
                         (atlas / "x.csv", "inside the atlas"), (tmp_path / "rows.txt", "unknown format"),
                         (Path("/proc/self/x.csv"), "pseudo file system"), (Path("/dev/null"), "unknown format")]:
        assert main(["query", str(atlas), "SELECT 1", "--out", str(bad)]) == 2
        assert message in capsys.readouterr().err
    assert _digest(atlas) == before


def test_viewer_connection_is_sandboxed(atlas):
    from neuronatlas.errors import AtlasError
    from neuronatlas.web import Library

    view = Library([atlas]).get(atlas.name)
    assert view.scalar("SELECT count(*) FROM stats") > 0
    with pytest.raises(AtlasError, match="COPY statement"):
        view.rows(f"COPY stats TO '{atlas}/records/default/stats.parquet'")
    import duckdb

    cur = view.cursor()
    with pytest.raises(duckdb.Error):
        cur.execute("SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(duckdb.Error):
        cur.execute("SET enable_external_access = true")
    cur.close()


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe latin-1 \xe9", b"[1, 2]"])
def test_damaged_manifest_is_reported_never_overwritten(capsys, atlas, tmp_path, content):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(atlas, copy)
    (copy / "manifest.json").write_bytes(content)
    for args in (["query", str(copy), "SELECT 1"], ["serve", str(copy)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "manifest.json" in err and "--force" in err and "Traceback" not in err
    assert (copy / "manifest.json").read_bytes() == content


def test_corrupt_parquet_is_one_line(capsys, atlas, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(atlas, copy)
    table = copy / "records/default/stats.parquet"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    assert main(["query", str(copy), "SELECT count(*) FROM stats"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1
