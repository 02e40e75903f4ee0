"""Parquet in and out of a batch run (conceptsvc.client.parquet), against a real service.

The 1M-row memory figure is not a test (it takes minutes): ``benchmarks/bench_parquet.py``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conceptsvc.cli import main
from conceptsvc.client.batch import annotate_corpus
from conceptsvc.client.corpus import Corpus, InputFormat
from conceptsvc.client.outputs import OutputFormat, OutputSet, resolve_outputs
from conceptsvc.client.parquet import ParquetAnnotationWriter, annotation_schema
from conceptsvc.config import load_settings
from conceptsvc.embedded import demo_index
from conceptsvc.errors import BadInputError, ClientError
from conceptsvc.extractor import Extractor
from conceptsvc.model import ExtractOptions
from conceptsvc.server.app import ConceptServer, create_server

DEMO_CAPTIONS = Path(__file__).parent.parent / "conceptsvc" / "data" / "demo" / "captions.csv"
ROCOV2 = {"profile": "rocov2"}
CHECKOUT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def demo_extractor(tmp_path_factory: pytest.TempPathFactory) -> Extractor:
    return Extractor(demo_index(tmp_path_factory.mktemp("demo-cache")))


@pytest.fixture(scope="module")
def demo_server(demo_extractor: Extractor) -> Iterator[str]:
    server: ConceptServer
    server, _ = create_server(
        load_settings(port=0, workers=1, host="127.0.0.1"), extractor=demo_extractor
    )
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(0)


def demo_rows() -> list[tuple[str, str]]:
    with DEMO_CAPTIONS.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return [(r[0], r[1]) for r in rows[1:]]


def write_parquet(path: Path, columns: dict[str, list[object]], **kw: object) -> Path:
    pq.write_table(pa.table(columns), path, **kw)  # type: ignore[arg-type]
    return path


def settings(target: str, **kw: object) -> object:
    from conceptsvc.client.batch import BatchSettings

    kw.setdefault("progress", "quiet")
    kw.setdefault("backoff_base", 0.05)
    kw.setdefault("backoff_max", 0.5)
    return BatchSettings(targets=(target,), **kw)  # type: ignore[arg-type]


def run(corpus: Corpus, out: Path, formats: list[str], target: str, **kw: object) -> object:
    result = annotate_corpus(
        corpus, resolve_outputs(out, formats), settings(target, **kw),  # type: ignore[arg-type]
        overrides=ROCOV2,
    )
    assert result.complete, result
    return result


# -- round trip ------------------------------------------------------------------------------
def test_parquet_demo_round_trip_equals_the_csv_path(tmp_path: Path, demo_server: str) -> None:
    """The demo captions as Parquet give byte-for-byte the CSV input's jsonl and csv outputs,
    and the Parquet output holds exactly the jsonl output's records."""
    rows = demo_rows()
    src = write_parquet(tmp_path / "captions.parquet",
                        {"ID": [r[0] for r in rows], "Caption": [r[1] for r in rows]},
                        row_group_size=64)  # several row groups on the way in
    via_csv = tmp_path / "csv" / "run.jsonl"
    run(Corpus(DEMO_CAPTIONS), via_csv, ["jsonl", "csv"], demo_server)
    via_pq = tmp_path / "pq" / "run.jsonl"
    corpus = Corpus(src)
    assert corpus.format is InputFormat.PARQUET
    run(corpus, via_pq, ["jsonl", "csv", "parquet"], demo_server, batch_size=16, concurrency=3)
    assert via_pq.read_bytes() == via_csv.read_bytes()
    assert (tmp_path / "pq" / "run.csv").read_bytes() == (tmp_path / "csv" / "run.csv").read_bytes()
    records = [json.loads(x) for x in via_csv.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(rows) and any(r["mentions"] for r in records)
    table = pq.read_table(tmp_path / "pq" / "run.parquet")
    assert table.schema == annotation_schema()
    assert table.to_pylist() == records
    manifest = json.loads((tmp_path / "pq" / "run.jsonl.manifest.json").read_text())
    assert manifest["input"]["format"] == "parquet"
    assert (manifest["input"]["id_column"], manifest["input"]["text_column"]) == ("ID", "Caption")
    assert [o["format"] for o in manifest["outputs"]] == ["jsonl", "csv", "parquet"]


def test_parquet_out_is_chosen_by_the_suffix_and_is_deterministic(tmp_path: Path) -> None:
    assert [s.format for s in resolve_outputs(tmp_path / "run.parquet")] == [OutputFormat.PARQUET]
    specs = resolve_outputs(tmp_path / "run.jsonl", ["jsonl", "parquet"])
    assert specs[1].path == tmp_path / "run.parquet"
    rows = [
        {"id": f"r{i}", "concepts": ["C0000001"] * (i % 3),
         "mentions": [{"cui": "C0000001", "preferred_name": "Thing", "text": "thing",
                       "start": i, "end": i + 5, "score": 0.5, "semantic_types": ["T001"],
                       "source": "MSH", "negated": bool(i % 2), "hypothetical": i % 5 == 1,
                       "historical": False, "experiencer": "patient"}] * (i % 3)}
        for i in range(50)
    ]
    paths = []
    for k in range(2):
        path = tmp_path / f"w{k}.parquet"
        writer = ParquetAnnotationWriter(path, group_rows=7, group_mentions=1000)
        for r in rows:
            writer.write(r)
        writer.close()
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    f = pq.ParquetFile(paths[0])
    assert f.metadata.num_row_groups == 8  # 50 rows in groups of 7: flushed as they came
    assert f.read().to_pylist() == rows
    # a group is also cut at the mention bound: rows 0-4 hold 0+1+2+0+1 = 4 mentions
    path = tmp_path / "m.parquet"
    writer = ParquetAnnotationWriter(path, group_rows=1000, group_mentions=4)
    for r in rows:
        writer.write(r)
    writer.close()
    f = pq.ParquetFile(path)
    assert f.metadata.row_group(0).num_rows == 5
    assert f.read().to_pylist() == rows


def test_parquet_output_set_aborted_leaves_nothing(tmp_path: Path) -> None:
    specs = resolve_outputs(tmp_path / "run.parquet")
    with OutputSet(specs, tmp_path / "work"):
        pass
    assert not (tmp_path / "run.parquet").exists() and not list((tmp_path / "work").iterdir())


# -- columns -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", [("ID", "Caption"), ("id", "text"), ("id", "caption")])
def test_parquet_default_columns(tmp_path: Path, pair: tuple[str, str]) -> None:
    src = write_parquet(tmp_path / "in.parquet",
                        {"other": [1, 2], pair[0]: ["a", "b"], pair[1]: ["x-ray", "CT"]})
    corpus = Corpus(src)
    assert corpus.identity() == {"id_column": pair[0], "text_column": pair[1]}
    assert [(c.id, c.text, c.line) for c in corpus.captions()] == [("a", "x-ray", 1),
                                                                   ("b", "CT", 2)]


@pytest.mark.parametrize(("columns", "chosen"), [
    ({"image_id": ["a", "b"], "caption": ["x-ray", "CT"]}, ("image_id", "caption")),
    ({"Filename": ["a", "b"], "width": [1, 2], "Description": ["x-ray", "CT"]},
     ("Filename", "Description")),
])
def test_parquet_columns_named_as_a_csv_header_is_read(
    tmp_path: Path, columns: dict[str, list[object]], chosen: tuple[str, str]
) -> None:
    """A file with none of the default pairs, whose id and caption columns are named as a CSV
    corpus's header may name them (image_id/caption), is read as the CSV would be (it was
    refused: E600 "the Parquet file has no id and caption columns")."""
    corpus = Corpus(write_parquet(tmp_path / "in.parquet", columns))
    assert corpus.identity() == {"id_column": chosen[0], "text_column": chosen[1]}
    assert [(c.id, c.text) for c in corpus.captions()] == [("a", "x-ray"), ("b", "CT")]


def test_parquet_columns_ambiguous_by_name_are_refused(tmp_path: Path) -> None:
    """Two columns named like captions: no guess, the refusal lists the columns."""
    src = write_parquet(tmp_path / "in.parquet",
                        {"image_id": ["a"], "caption": ["x"], "text_en": ["y"], "Text": ["z"]})
    with pytest.raises(ClientError, match="Name them with --id-column and --text-column"):
        Corpus(src).identity()


def test_parquet_column_options(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "in.parquet", {
        "image": ["i1", "i2"], "id": [10, 11], "text": ["t1", "t2"], "summary": ["s1", None],
        "width": [1, 2],
    })
    assert [(c.id, c.text) for c in Corpus(src).captions()] == [("10", "t1"), ("11", "t2")]
    named = Corpus(src, id_column="image", text_column="summary")
    assert named.identity() == {"id_column": "image", "text_column": "summary"}
    scan = named.scan()
    assert (scan.n_good, [b.line for b in scan.bad]) == (1, [2])
    # only one named: the other comes from the default pairs
    assert [c.text for c in Corpus(src, text_column="summary").captions()] == ["s1"]
    # the columns read are part of the run's identity, so a resume never mixes them
    assert Corpus(src).identity() != named.identity()
    with pytest.raises(ClientError, match=r"no column\(s\) 'caption'.*columns are image, id"):
        Corpus(src, text_column="caption")
    with pytest.raises(ClientError, match="caption column 'width' is int64"):
        Corpus(src, text_column="width")
    nothing = write_parquet(tmp_path / "none.parquet", {"a": ["x"], "b": ["y"]})
    with pytest.raises(ClientError, match=r"tried ID/Caption, id/text, id/caption.*--id-column"):
        Corpus(nothing)
    roco = tmp_path / "in.tsv"
    roco.write_text("a\t x-ray\n")
    with pytest.raises(ClientError, match="apply to csv, jsonl, parquet input"):
        Corpus(roco, id_column="ID")


def test_parquet_cli_columns_and_stdin(tmp_path: Path, demo_server: str) -> None:
    """The CLI's --id-column/--text-column and --input-format parquet on standard input."""
    rows = demo_rows()[:20]
    src = write_parquet(tmp_path / "in.parquet", {
        "image": [r[0] for r in rows], "summary": [r[1] for r in rows], "id": list(range(20)),
        "caption": ["x"] * 20,
    })
    out = tmp_path / "run.parquet"
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(src.read_bytes()), encoding="utf-8")
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = main(["annotate", "-", "--input-format", "parquet", "--id-column", "image",
                         "--text-column", "summary", "--out", str(out), "--format", "parquet",
                         "--format", "jsonl", "--target", demo_server, "--profile", "rocov2"])
    finally:
        sys.stdin = saved
    assert code == 0, err.getvalue()
    table = pq.read_table(out).to_pylist()
    assert [r["id"] for r in table] == [r[0] for r in rows]
    assert table == [json.loads(x) for x in (tmp_path / "run.jsonl").read_text().splitlines()]
    manifest = json.loads((tmp_path / "run.parquet.manifest.json").read_text())
    assert manifest["input"]["text_column"] == "summary"
    roco = tmp_path / "in.tsv"
    roco.write_text("a\t x-ray\n")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["annotate", str(roco), "--text-column", "Caption",
                     "--out", str(tmp_path / "x.jsonl"), "--target", demo_server])
    assert code == 2 and "--id-column/--text-column apply to" in err.getvalue()


def test_parquet_stdin_is_sniffed(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "in.parquet", {"id": ["a"], "text": ["chest x-ray"]})
    corpus = Corpus.from_bytes(src.read_bytes())
    assert corpus.format is InputFormat.PARQUET
    assert [c.text for c in corpus.captions()] == ["chest x-ray"]
    assert corpus.scan().sha256 == Corpus(src).scan().sha256


def test_parquet_not_parquet_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "in.parquet"
    bogus.write_text("ID,Caption\na,b\n")
    with pytest.raises(ClientError, match="not a readable Parquet file"):
        Corpus(bogus)


# -- bad records -------------------------------------------------------------------------------
def test_parquet_bad_records_are_reported_by_row(tmp_path: Path, demo_server: str) -> None:
    src = write_parquet(tmp_path / "in.parquet", {
        "id": ["a", None, "c", "a", "  ", "d", "e\tf"],
        "text": ["chest x-ray", "no id", None, "duplicate", "blank id", "brain MRI", "tab"],
    }, row_group_size=2)
    out = tmp_path / "run.jsonl"
    with pytest.raises(BadInputError) as info:
        annotate_corpus(Corpus(src), resolve_outputs(out), settings(demo_server))  # type: ignore[arg-type]
    assert [b.line for b in info.value.bad] == [2, 3, 4, 5, 7]
    text = str(info.value)
    assert f"{src}: row 4: duplicate id 'a' (first seen at row 1)" in text
    assert "missing caption (column 'text' is null)" in text and not out.exists()
    result = annotate_corpus(
        Corpus(src), resolve_outputs(out),
        settings(demo_server, on_bad_input="skip"),  # type: ignore[arg-type]
    )
    assert result.complete and result.counts.skipped_bad_input == 5
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "d"]
    assert result.errors is not None
    errors = [json.loads(x) for x in result.errors.read_text().splitlines()]
    assert [(e["row"], e["id"]) for e in errors] == [(2, None), (3, "c"), (4, "a"), (5, None),
                                                     (7, None)]
    assert all("line" not in e for e in errors)


# -- resume ------------------------------------------------------------------------------------
def journal_lines(out: Path) -> int:
    return sum(j.read_bytes().count(b"\n")
               for j in out.parent.glob(f"{out.name}.*.part/journal.jsonl"))


@pytest.mark.slow
def test_parquet_resume_after_sigkill_is_byte_identical(
    tmp_path: Path, demo_server: str, demo_extractor: Extractor
) -> None:
    """Parquet in, Parquet out, the CLI killed twice mid-run: the final file is byte-identical
    to an uninterrupted run's and holds every row once, in input order."""
    rows = demo_rows()
    n = 1500
    ids = [f"cap{i:05d}" for i in range(n)]
    src = write_parquet(tmp_path / "in.parquet",
                        {"id": ids, "text": [rows[i % len(rows)][1] for i in range(n)]},
                        row_group_size=256)
    ref = tmp_path / "ref" / "run.parquet"
    run(Corpus(src), ref, ["parquet"], demo_server, batch_size=64)

    out = tmp_path / "killed" / "run.parquet"
    out.parent.mkdir()
    args = ["annotate", str(src), "--out", str(out), "--target", demo_server, "--batch-size", "8",
            "--concurrency", "2", "--profile", "rocov2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    kills = []
    for threshold in (300, 900):
        child = subprocess.Popen([sys.executable, "-m", "conceptsvc.cli", *args], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while journal_lines(out) < threshold and child.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        assert child.poll() is None, "the run finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        kills.append(journal_lines(out))
    assert kills[0] < kills[1] < n and not out.exists()
    done = subprocess.run([sys.executable, "-m", "conceptsvc.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == ref.read_bytes()
    got = pq.read_table(out, columns=["id", "concepts"]).to_pylist()
    assert [r["id"] for r in got] == ids
    opts = ExtractOptions(profile="rocov2")
    for i in (0, 777, n - 1):
        text = rows[i % len(rows)][1]
        assert got[i]["concepts"] == list(demo_extractor.extract(text, opts).concepts)
    manifest = json.loads((tmp_path / "killed" / "run.parquet.manifest.json").read_text())
    assert manifest["timing"]["invocations"][-1]["resumed"] == kills[-1]


# -- without pyarrow ---------------------------------------------------------------------------
def test_parquet_without_pyarrow_is_a_coded_error(tmp_path: Path) -> None:
    """An interpreter where pyarrow cannot be imported (``sys.modules`` entry ``None`` makes
    ``import pyarrow`` fail as when it is not installed): the CLI exits 2 with E628 and the
    extra to install, for Parquet input and for Parquet output, before contacting anything."""
    src = write_parquet(tmp_path / "in.parquet", {"id": ["a"], "text": ["x"]})
    csv_src = tmp_path / "in.csv"
    csv_src.write_text("ID,Caption\na,x\n")
    code = (
        "import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
        "from conceptsvc.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    for args in ([str(src), "--out", str(tmp_path / "o.jsonl")],
                 [str(csv_src), "--out", str(tmp_path / "o.parquet")]):
        proc = subprocess.run(
            [sys.executable, "-c", code, "annotate", *args, "--target", "127.0.0.1:9"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert "E628" in proc.stderr and "conceptsvc[parquet]" in proc.stderr
