"""The Spark integration, run for real: PySpark in local mode on the demo captions.

Results must be those of the CLI: ``conceptsvc annotate`` is run (as a subprocess, through a
real server on the same demo index) and its JSONL is the reference for both executor modes —
the engine in-process on an index shipped with ``SparkContext.addFile``, and executors calling
the service. Spark's JVM binds to loopback only.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conceptsvc.client.outputs import SCORE_DECIMALS, annotation_from_json
from conceptsvc.config import load_settings
from conceptsvc.embedded import demo_index_path
from conceptsvc.errors import ConfigError
from conceptsvc.integrations.spark import MENTION_FIELDS, annotate_dataframe
from conceptsvc.model import Annotation, ExtractOptions
from conceptsvc.server.app import create_server

DEMO_CAPTIONS = Path(__file__).parent.parent / "conceptsvc" / "data" / "demo" / "captions.csv"


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Fail loudly, never skip: `make install` installs the spark extra and Java 17.
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        pytest.fail("PySpark is not installed; run `make install` (the spark extra)")
    if shutil.which("java") is None:
        pytest.fail("no Java runtime; `make install` installs Debian's openjdk-17-jre-headless")

    previous = {k: os.environ.get(k) for k in ("PYSPARK_PYTHON", "SPARK_LOCAL_IP")}
    # Executors must run this interpreter (with conceptsvc and pyarrow); loopback only.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    session = (
        SparkSession.builder.master("local[2]")
        .appName("conceptsvc-test")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.local.dir", str(tmp_path_factory.mktemp("spark-local")))
        # A short-lived test JVM: the C1 compiler only and the serial collector start faster
        # and burn less CPU on a small shared machine.
        .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_index_path(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def service(index_dir: Path) -> Iterator[str]:
    server, port = create_server(
        load_settings(index=index_dir, port=0, workers=1, host="127.0.0.1")
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def cli_results(service: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Annotation]:
    """The reference: ``conceptsvc annotate`` over the demo captions."""
    out = tmp_path_factory.mktemp("cli") / "annotations.jsonl"
    subprocess.run(
        [sys.executable, "-m", "conceptsvc.cli", "annotate", str(DEMO_CAPTIONS),
         "--out", str(out), "--target", service, "--quiet"],
        check=True,
        timeout=120,
    )
    results = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        annotation = annotation_from_json(json.loads(line))
        results[annotation.id] = annotation
    return results


def demo_frame(spark: Any) -> Any:
    import pandas as pd

    with DEMO_CAPTIONS.open(newline="", encoding="utf-8") as fh:
        rows = [(r["ID"], r["Caption"]) for r in csv.DictReader(fh)]
    rows.append(("no-caption", None))  # a null caption gets null results, not an error
    frame = pd.DataFrame(rows, columns=["ID", "Caption"])
    return spark.createDataFrame(frame, "ID string, Caption string")


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, SCORE_DECIMALS)  # the CLI's JSONL rounds scores
    return tuple(value) if isinstance(value, list | tuple) else value


def row_mentions(mentions: Any) -> list[tuple[Any, ...]]:
    return [tuple(_plain(m[name]) for name, _ in MENTION_FIELDS) for m in mentions]


def domain_mentions(annotation: Annotation) -> list[tuple[Any, ...]]:
    return [
        tuple(_plain(getattr(m, name)) for name, _ in MENTION_FIELDS)
        for m in annotation.mentions
    ]


def assert_same_as_cli(rows: list[Any], cli: dict[str, Annotation]) -> None:
    by_id = {row["ID"]: row for row in rows}
    assert by_id.pop("no-caption")["concepts"] is None
    assert set(by_id) == set(cli), "every caption exactly once"
    assert len(rows) == len(cli) + 1
    assert sum(bool(a.concepts) for a in cli.values()) > len(cli) // 2  # a real workload
    for caption_id, expected in cli.items():
        row = by_id[caption_id]
        assert list(row["concepts"]) == list(expected.concepts), caption_id
        assert row_mentions(row["mentions"]) == domain_mentions(expected), caption_id


def test_spark_in_process_engine_matches_the_cli(
    spark: Any, index_dir: Path, cli_results: dict[str, Annotation]
) -> None:
    df = demo_frame(spark)
    annotated = annotate_dataframe(df, "Caption", index=index_dir)
    assert annotated.columns == ["ID", "Caption", "concepts", "mentions"]
    rows = annotated.collect()
    assert_same_as_cli(rows, cli_results)
    # Each mention's offsets slice its own caption.
    for row in rows:
        for m in row["mentions"] or ():
            assert row["Caption"][m["start"] : m["end"]] == m["text"]


def test_spark_executors_calling_the_service_match_the_cli(
    spark: Any, service: str, cli_results: dict[str, Annotation]
) -> None:
    rows = annotate_dataframe(demo_frame(spark), "Caption", target=service, batch_size=50).collect()
    assert_same_as_cli(rows, cli_results)


def test_spark_shared_path_and_options_without_mentions(spark: Any, index_dir: Path) -> None:
    """An index at a path every executor reads (no shipping), a type filter, concepts only."""
    from conceptsvc.embedded import demo_index
    from conceptsvc.extractor import Extractor

    options = ExtractOptions(semantic_groups=("DISO",))
    df = demo_frame(spark).limit(60)
    annotated = annotate_dataframe(
        df, "Caption", index=index_dir, ship_index=False, options=options, mentions_col=None
    )
    assert annotated.columns == ["ID", "Caption", "concepts"]
    engine = Extractor(demo_index(index_dir.parent))
    for row in annotated.collect():
        if row["Caption"] is None:
            assert row["concepts"] is None
        else:
            assert list(row["concepts"]) == list(engine.extract(row["Caption"], options).concepts)


def test_spark_rejects_bad_arguments_before_running(spark: Any, index_dir: Path) -> None:
    df = demo_frame(spark)
    with pytest.raises(ConfigError, match="not both"):
        annotate_dataframe(df, index=index_dir, target="127.0.0.1:1")
    with pytest.raises(ConfigError, match="no column 'text'"):
        annotate_dataframe(df, "text", index=index_dir)
    with pytest.raises(ConfigError, match="already has column"):
        annotate_dataframe(df, "Caption", index=index_dir, concepts_col="ID")
    with pytest.raises(Exception, match="semantic type or group"):
        annotate_dataframe(
            df, index=index_dir, options=ExtractOptions(semantic_types=("NotAType",))
        )


def test_spark_two_indexes_of_one_name_in_one_session(
    spark: Any, index_dir: Path, engine_index_path: Path, tmp_path: Path
) -> None:
    """addFile names a shipped directory by its base name: a second index called ``idx``, or
    the same one rebuilt in place, must not clash with the first in one session."""
    from conceptsvc.extractor import Extractor
    from conceptsvc.index import ConceptIndex

    shutil.copytree(index_dir, tmp_path / "a" / "idx")
    shutil.copytree(engine_index_path, tmp_path / "b" / "idx")
    df = spark.createDataFrame(
        [("1", "Known lung cancer; no pleural effusion."), ("2", "CT of the thorax.")],
        "ID string, Caption string",
    )

    def concepts(index: Path) -> list[list[str]]:
        rows = annotate_dataframe(df, index=index, mentions_col=None).orderBy("ID").collect()
        return [list(r["concepts"]) for r in rows]

    def expected(index: Path) -> list[list[str]]:
        engine = Extractor(ConceptIndex.load(index))
        return [list(engine.extract(t).concepts) for t in
                ("Known lung cancer; no pleural effusion.", "CT of the thorax.")]

    want_a, want_b = expected(tmp_path / "a" / "idx"), expected(tmp_path / "b" / "idx")
    assert want_a != want_b  # two indexes that answer differently
    assert concepts(tmp_path / "a" / "idx") == want_a
    assert concepts(tmp_path / "b" / "idx") == want_b
    assert concepts(tmp_path / "a" / "idx") == want_a  # again: nothing shipped twice
    # a/idx rebuilt in place (here: replaced by b's files)
    shutil.rmtree(tmp_path / "a" / "idx")
    shutil.copytree(engine_index_path, tmp_path / "a" / "idx")
    assert concepts(tmp_path / "a" / "idx") == want_b


def test_spark_rejects_a_caption_column_that_is_not_text(spark: Any, index_dir: Path) -> None:
    """Numbers are not captions: refused on the driver, as a missing column is, instead of a
    job that gives every row null concepts."""
    numbers = spark.createDataFrame([(1, 123)], "ID int, Caption int")
    with pytest.raises(ConfigError, match="column 'Caption' is int, not string"):
        annotate_dataframe(numbers, index=index_dir)
    with pytest.raises(ConfigError, match="column 'ID' is int, not string"):
        annotate_dataframe(numbers, "ID", target="127.0.0.1:1")
