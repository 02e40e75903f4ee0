"""Batch annotation end to end against real servers (in-process on port 0, or subprocesses).

The client runs either in-process (:func:`annotate_corpus`) or as the real CLI in a subprocess
— the latter whenever the test kills it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from hypothesis import HealthCheck, given
from hypothesis import settings as settings_h
from hypothesis import strategies as st
from service_helpers import build_index_a, garbling_server, unreadable_reply

from conceptsvc.cli import main
from conceptsvc.client.batch import EXIT_INCOMPLETE, BatchSettings, annotate_corpus
from conceptsvc.client.corpus import Corpus
from conceptsvc.client.outputs import OutputFormat, annotation_to_json, resolve_outputs
from conceptsvc.config import load_settings
from conceptsvc.embedded import demo_index
from conceptsvc.errors import (
    BadInputError,
    ClientError,
    EmptyCorpusError,
    IndexChangedError,
    RunIncompatibleError,
    ServiceUnreachableError,
)
from conceptsvc.evaluation import read_concepts
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex, IndexBuilder
from conceptsvc.model import ExtractOptions, MentionRows
from conceptsvc.server.app import ConceptServer, create_server

DEMO_CAPTIONS = Path(__file__).parent.parent / "conceptsvc" / "data" / "demo" / "captions.csv"
ROCOV2 = {"profile": "rocov2"}


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_extractor(tmp_path_factory: pytest.TempPathFactory) -> Extractor:
    return Extractor(demo_index(tmp_path_factory.mktemp("demo-cache")))


def start_server(extractor: Extractor, port: int = 0, **settings: object) -> ConceptServer:
    server, _ = create_server(
        load_settings(port=port, workers=1, host="127.0.0.1", **settings), extractor=extractor
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def demo_service(demo_extractor: Extractor) -> Iterator[ConceptServer]:
    server = start_server(demo_extractor)
    try:
        yield server
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def demo_server(demo_service: ConceptServer) -> str:
    return f"127.0.0.1:{demo_service.port}"


def annotate_calls(server: ConceptServer) -> float:
    """Annotation RPCs a server has handled (from its Prometheus metrics)."""
    total = 0.0
    for metric in server.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "conceptsvc_requests_total" and sample.labels.get("method") in (
                "Annotate", "AnnotateStream", "AnnotateBatch"
            ):
                total += sample.value
    return total


def demo_rows() -> list[tuple[str, str]]:
    with DEMO_CAPTIONS.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return [(r[0], r[1]) for r in rows[1:]]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ID", "Caption"])
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def big_corpus(path: Path, n: int) -> Path:
    """``n`` captions cycled from the demo sample, with fresh ids."""
    rows = demo_rows()
    return write_csv(path, [(f"cap{i:06d}", rows[i % len(rows)][1]) for i in range(n)])


def settings(*targets: str, **kw: object) -> BatchSettings:
    kw.setdefault("progress", "quiet")
    kw.setdefault("backoff_base", 0.05)
    kw.setdefault("backoff_max", 0.5)
    return BatchSettings(targets=targets, **kw)  # type: ignore[arg-type]


def expected_lines(
    extractor: Extractor, rows: list[tuple[str, str]], **options: object
) -> list[str]:
    """What the engine in this process says, rendered as canonical JSON lines."""
    opts = ExtractOptions(**options)  # type: ignore[arg-type]
    return [
        json.dumps(annotation_to_json(extractor.extract(text, opts, id=rid)),
                   ensure_ascii=False, separators=(",", ":"))
        for rid, text in rows
    ]


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``conceptsvc ARGS`` in this process (the real CLI entry point), capturing its
    output; the SIGKILL tests run it as a subprocess instead."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        sys.stdin = saved
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def ids_of_jsonl(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text(encoding="utf-8").splitlines()]


# -- formats -----------------------------------------------------------------------------------
def test_batch_all_output_formats_match_the_engine(
    tmp_path: Path, demo_server: str, demo_extractor: Extractor
) -> None:
    rows = demo_rows()[:120]
    src = write_csv(tmp_path / "in.csv", rows)
    specs = resolve_outputs(tmp_path / "out" / "run.jsonl", ["jsonl", "csv", "submission", "roco"])
    result = annotate_corpus(
        Corpus(src), specs, settings(demo_server, batch_size=7, concurrency=3), overrides=ROCOV2
    )
    assert result.complete and result.exit_code == 0
    assert (result.counts.captions, result.counts.annotated, result.counts.failed) == (120, 120, 0)
    jsonl = (tmp_path / "out" / "run.jsonl").read_text(encoding="utf-8").splitlines()
    # in input order, and exactly what the engine gives in-process
    assert jsonl == expected_lines(demo_extractor, rows, profile="rocov2")
    concepts = {json.loads(x)["id"]: json.loads(x)["concepts"] for x in jsonl}
    # every other format carries the same concept sets, readable by the evaluation readers
    for name in ("run.csv", "run.submission.tsv", "run.roco.tsv", "run.jsonl"):
        assert read_concepts(tmp_path / "out" / name) == concepts, name
    csv_text = (tmp_path / "out" / "run.csv").read_text()
    assert csv_text.startswith("ID,CUIs\n") and csv_text.count("\n") == 121
    # the work directory is gone; the manifest says what was done
    assert not list((tmp_path / "out").glob("*.part"))
    manifest = json.loads((tmp_path / "out" / "run.jsonl.manifest.json").read_text())
    assert manifest["complete"] is True and manifest["options"]["profile"] == "rocov2"
    assert manifest["input"]["format"] == "csv" and len(manifest["input"]["sha256"]) == 64
    assert manifest["service"]["index_content_hash"] == demo_extractor.index.content_hash
    assert manifest["service"]["index_manifest_sha256"] == hashlib.sha256(
        json.dumps(demo_extractor.index.manifest, sort_keys=True).encode()
    ).hexdigest()
    assert manifest["service"]["service_version"]
    assert manifest["counts"]["annotated"] == 120
    assert [o["format"] for o in manifest["outputs"]] == ["jsonl", "csv", "submission", "roco"]
    timing = manifest["timing"]
    assert timing["started_at"] <= timing["finished_at"]
    assert [r["resumed"] for r in timing["invocations"]] == [0]


@pytest.mark.parametrize("fmt", ["roco", "jsonl", "text"])
def test_batch_every_input_format(
    tmp_path: Path, demo_server: str, demo_extractor: Extractor, fmt: str
) -> None:
    rows = demo_rows()[:25]
    if fmt == "roco":
        src = tmp_path / "in.txt"
        src.write_text("".join(f"{i}\t {t}\n" for i, t in rows), encoding="utf-8")
        expect_rows = rows
    elif fmt == "jsonl":
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
        expect_rows = rows
    else:
        src = tmp_path / "in.txt"
        src.write_text("".join(t + "\n" for _, t in rows), encoding="utf-8")
        expect_rows = [(str(n), t) for n, (_, t) in enumerate(rows, 1)]
    corpus = Corpus(src)
    assert corpus.format.value == fmt
    out = tmp_path / "run.jsonl"
    result = annotate_corpus(corpus, resolve_outputs(out), settings(demo_server))
    assert result.complete
    assert out.read_text(encoding="utf-8").splitlines() == expected_lines(
        demo_extractor, expect_rows
    )


def test_batch_cli_reads_stdin_and_writes_several_formats(
    tmp_path: Path, demo_server: str
) -> None:
    rows = demo_rows()[:30]
    data = write_csv(tmp_path / "in.csv", rows).read_bytes()
    out = tmp_path / "run.csv"
    proc = cli("annotate", "-", "--input-format", "csv", "--out", str(out), "--format", "csv",
               "--format", "roco", "--target", demo_server, "--profile", "rocov2", stdin=data)
    assert proc.returncode == 0, proc.stderr
    assert "30/30 captions in the output (complete)" in proc.stderr
    got = read_concepts(out)
    assert list(got) == [r[0] for r in rows]
    assert read_concepts(tmp_path / "run.roco.tsv") == got
    manifest = json.loads((tmp_path / "run.csv.manifest.json").read_text())
    assert manifest["input"]["path"] == "-"


# -- malformed input ---------------------------------------------------------------------------
BAD_CSV = (
    "ID,Caption\n"
    "a,Chest X-ray\n"
    'b,"broken "quote" here"\n'
    "c,CT of the abdomen, with contrast\n"
    "a,duplicate id\n"
    ",no id\n"
    "d,MRI of the brain\n"
)


def test_batch_bad_input_stops_before_sending(
    tmp_path: Path, demo_server: str, demo_service: ConceptServer
) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(BAD_CSV.encode() + b"e,caf\xe9\n")
    out = tmp_path / "run.jsonl"
    calls = annotate_calls(demo_service)
    with pytest.raises(BadInputError) as info:
        annotate_corpus(Corpus(src), resolve_outputs(out), settings(demo_server))
    assert annotate_calls(demo_service) == calls  # not one caption was sent
    assert sorted(b.line for b in info.value.bad) == [3, 4, 5, 6, 8]
    text = str(info.value)
    assert "nothing was sent" in text and f"{src}:3:" in text and "invalid UTF-8" in text
    # nothing was started: no output, no work directory; the full list is in the errors file
    assert not out.exists() and not list(tmp_path.glob("*.part"))
    errors = [json.loads(x) for x in (tmp_path / "run.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [3, 4, 5, 6, 8]
    assert all(e["stage"] == "input" for e in errors)
    # the CLI exits 2 with the same report
    proc = cli("annotate", str(src), "--out", str(out), "--target", demo_server)
    assert proc.returncode == 2 and "E620" in proc.stderr and "--on-bad-input skip" in proc.stderr


def test_batch_bad_input_skip_records_them(tmp_path: Path, demo_server: str) -> None:
    src = tmp_path / "in.csv"
    src.write_text(BAD_CSV)
    out = tmp_path / "run.csv"
    result = annotate_corpus(
        Corpus(src), resolve_outputs(out), settings(demo_server, on_bad_input="skip")
    )
    assert result.complete and result.exit_code == 0
    assert list(read_concepts(out)) == ["a", "d"]
    assert result.counts.skipped_bad_input == 4
    assert result.errors is not None
    errors = [json.loads(x) for x in result.errors.read_text().splitlines()]
    assert [(e["line"], e["id"]) for e in errors] == [(3, None), (4, "c"), (5, "a"), (6, None)]
    assert "duplicate id 'a'" in errors[2]["reason"]


def test_batch_rejected_options_fail_before_the_corpus(tmp_path: Path, demo_server: str) -> None:
    src = write_csv(tmp_path / "in.csv", demo_rows()[:5])
    with pytest.raises(ClientError, match="rejected the run's options: INVALID_ARGUMENT"):
        annotate_corpus(
            Corpus(src), resolve_outputs(tmp_path / "o.jsonl"), settings(demo_server),
            overrides={"semantic_types": ("T999",)},
        )
    assert not (tmp_path / "o.jsonl").exists()


# -- resume ------------------------------------------------------------------------------------
def journal_lines(out: Path) -> int:
    total = 0
    for work in out.parent.glob(f"{out.name}.*.part"):
        j = work / "journal.jsonl"
        if j.exists():
            total += j.read_bytes().count(b"\n")
    return total


@pytest.mark.slow
def test_batch_resume_after_sigkill_is_byte_identical(
    tmp_path: Path, demo_server: str
) -> None:
    """Kill the CLI with SIGKILL at several points (before and during streaming), then let it
    finish: every id exactly once, outputs byte-identical to an uninterrupted run."""
    n = 4000  # enough left after the last kill that no child finishes the run before it
    src = big_corpus(tmp_path / "in.csv", n)
    args = ["--target", demo_server, "--batch-size", "8", "--concurrency", "2",
            "--profile", "rocov2", "--format", "jsonl", "--format", "csv", "--quiet"]
    ref = tmp_path / "ref" / "run.jsonl"
    reference = annotate_corpus(
        Corpus(src), resolve_outputs(ref, ["jsonl", "csv"]),
        settings(demo_server, batch_size=64), overrides=ROCOV2,
    )
    assert reference.complete

    out = tmp_path / "killed" / "run.jsonl"
    out.parent.mkdir()
    kills = []
    thresholds = [0, 200, 800, 1400, 2000]  # journal lines to wait for before the kill
    for k, threshold in enumerate(thresholds):
        child = subprocess.Popen(
            [sys.executable, "-m", "conceptsvc.cli", "annotate", str(src), "--out", str(out),
             *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        # each later child journals something of its own before it is killed (an earlier one
        # may have passed this one's threshold already: the client starts fast)
        goal = max(threshold, journal_lines(out) + 1)
        if k == 0:
            # importing or scanning: a short fixed delay, since a whole run of n captions can
            # take well under a second on a quiet machine (0.3 s let the first child journal
            # every caption, and the later ones had nothing left to be killed in)
            time.sleep(0.05)
        else:
            while journal_lines(out) < goal and child.poll() is None:
                assert time.monotonic() < deadline, "the run made no progress"
                time.sleep(0.005)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            kills.append(journal_lines(out))
        child.wait()
    assert len(kills) == 5, kills
    assert kills == sorted(kills) and kills[-1] < n  # really interrupted mid-run
    assert not out.exists()  # nothing is moved into place before the run completes
    proc = cli("annotate", str(src), "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    ids = ids_of_jsonl(out)
    assert len(ids) == n and len(set(ids)) == n
    assert out.read_bytes() == ref.read_bytes()
    assert (tmp_path / "killed" / "run.csv").read_bytes() == (
        tmp_path / "ref" / "run.csv"
    ).read_bytes()
    manifest = json.loads((tmp_path / "killed" / "run.jsonl.manifest.json").read_text())
    runs = manifest["timing"]["invocations"]
    assert len(runs) >= 5  # the first kill may come before the journal existed
    assert runs[-1]["resumed"] == kills[-1]
    # apart from the timing section (and where the output went) the manifest is the one an
    # uninterrupted run writes
    ref_manifest = json.loads((tmp_path / "ref" / "run.jsonl.manifest.json").read_text())
    for m in (manifest, ref_manifest):
        del m["timing"]
        for o in m["outputs"]:
            o["path"] = Path(o["path"]).name
        m["settings"] = m["service"]["targets"] = None
    assert manifest == ref_manifest
    assert not list(out.parent.glob("*.part"))


def test_batch_rerun_of_a_complete_run_is_a_no_op(tmp_path: Path, demo_server: str) -> None:
    src = write_csv(tmp_path / "in.csv", demo_rows()[:10])
    specs = resolve_outputs(tmp_path / "run.jsonl")
    first = annotate_corpus(Corpus(src), specs, settings(demo_server))
    before = (tmp_path / "run.jsonl").stat().st_mtime_ns
    again = annotate_corpus(Corpus(src), specs, settings(demo_server))
    assert again.already_complete and again.complete
    assert (tmp_path / "run.jsonl").stat().st_mtime_ns == before
    assert again.counts.annotated == first.counts.annotated == 10
    # asking for a report the first run did not write is not a no-op
    with_report = annotate_corpus(Corpus(src), specs, settings(demo_server, report=True))
    assert not with_report.already_complete and with_report.report_files is not None
    assert annotate_corpus(Corpus(src), specs, settings(demo_server, report=True)).already_complete
    # --restart always does the work again
    restarted = annotate_corpus(Corpus(src), specs, settings(demo_server, restart=True))
    assert not restarted.already_complete and restarted.counts.resumed == 0
    # a changed output is not "complete": the run is done again
    (tmp_path / "run.jsonl").write_text("tampered\n")
    third = annotate_corpus(Corpus(src), specs, settings(demo_server))
    assert not third.already_complete and len(ids_of_jsonl(tmp_path / "run.jsonl")) == 10


# -- faults: replicas, retries, deadlines ---------------------------------------------------------
@pytest.mark.slow
def test_batch_replica_killed_mid_run_with_two_targets(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    """Two real server processes; one is SIGKILLed mid-run; the run completes on the other."""
    env = {**os.environ, "CONCEPTSVC_INDEX": str(demo_extractor.index.path)}
    ports = [free_port(), free_port()]
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "conceptsvc.cli", "serve", "--port", str(p), "--workers", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    try:
        from conceptsvc.client import ConceptClient

        for p in ports:
            with ConceptClient(f"127.0.0.1:{p}") as c:
                c.wait_until_serving(60)
        n = 2000
        src = big_corpus(tmp_path / "in.csv", n)
        out = tmp_path / "run.jsonl"
        result: dict[str, object] = {}

        def run() -> None:
            result["r"] = annotate_corpus(
                Corpus(src), resolve_outputs(out),
                settings(*(f"127.0.0.1:{p}" for p in ports), batch_size=16, concurrency=4),
                overrides=ROCOV2,
            )

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 60
        while journal_lines(out) < 300:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.005)
        servers[1].kill()
        servers[1].wait()
        at_kill = journal_lines(out)
        t.join(120)
        r = result["r"]
        assert r.complete, r  # type: ignore[attr-defined]
        assert at_kill < n
        ids = ids_of_jsonl(out)
        assert len(ids) == n and len(set(ids)) == n
        assert ids == [f"cap{i:06d}" for i in range(n)]
    finally:
        for s in servers:
            s.kill()
            s.wait()


def test_batch_streams_are_not_ended_as_idle(tmp_path: Path, demo_extractor: Extractor) -> None:
    """A batch run keeps its streams busy (each sends its whole batch at once), so even a short
    stream_idle_seconds never ends one of them: no stream of the run ends UNAVAILABLE."""
    server = start_server(demo_extractor, threads=8, stream_idle_seconds=0.5)
    try:
        src = big_corpus(tmp_path / "in.csv", 400)
        result = annotate_corpus(
            Corpus(src), resolve_outputs(tmp_path / "run.jsonl"),
            settings(f"127.0.0.1:{server.port}", batch_size=20, concurrency=4),
        )
        assert result.complete and result.counts.annotated == 400
        assert annotate_calls(server) >= 20
        assert server.metrics.value(
            "conceptsvc_requests_total", {"method": "AnnotateStream", "code": "UNAVAILABLE"}
        ) == 0
    finally:
        server.stop(0)


def test_batch_one_target_with_several_addresses_is_balanced_round_robin(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    """A target that resolves to several addresses (as dns:/// does for a headless service)
    spreads the streams over all of them."""
    servers = [start_server(demo_extractor), start_server(demo_extractor)]
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
        src = write_csv(tmp_path / "in.csv", demo_rows()[:200])
        result = annotate_corpus(
            Corpus(src), resolve_outputs(tmp_path / "run.jsonl"),
            settings(target, batch_size=10, concurrency=2),
        )
        assert result.complete and result.counts.annotated == 200
        calls = [annotate_calls(s) for s in servers]
        assert all(c >= 3 for c in calls), calls  # 20 batches (+ the probe), both replicas
    finally:
        for s in servers:
            s.stop(0)


def test_batch_retries_until_a_late_service_comes_up(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    port = free_port()
    src = write_csv(tmp_path / "in.csv", demo_rows()[:40])
    servers: list[ConceptServer] = []
    timer = threading.Timer(1.0, lambda: servers.append(start_server(demo_extractor, port)))
    timer.start()
    try:
        result = annotate_corpus(
            Corpus(src), resolve_outputs(tmp_path / "run.jsonl"),
            settings(f"127.0.0.1:{port}", retries=10, backoff_base=0.1, backoff_max=0.4),
        )
        assert result.complete and result.counts.annotated == 40
    finally:
        timer.join()
        for s in servers:
            s.stop(0)


def test_batch_service_restarted_mid_stream_is_retried(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    """The only target stops (in-flight streams fail UNAVAILABLE) and comes back on the same
    port: unanswered items are retried, none is lost or duplicated."""
    port = free_port()
    first = start_server(demo_extractor, port)
    n = 2000
    src = big_corpus(tmp_path / "in.csv", n)
    out = tmp_path / "run.jsonl"
    servers = [first]
    result: dict[str, object] = {}

    def run() -> None:
        result["r"] = annotate_corpus(
            Corpus(src), resolve_outputs(out),
            settings(f"127.0.0.1:{port}", batch_size=32, retries=20, backoff_base=0.1),
        )

    t = threading.Thread(target=run)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while journal_lines(out) < 300:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.005)
        first.stop(0)
        time.sleep(0.5)
        servers.append(start_server(demo_extractor, port))
        t.join(120)
        r = result["r"]
        assert r.complete and r.counts.retried_batches >= 1  # type: ignore[attr-defined]
        ids = ids_of_jsonl(out)
        assert ids == [f"cap{i:06d}" for i in range(n)]
    finally:
        for s in servers:
            s.stop(0)


def test_batch_items_that_keep_failing_make_the_run_incomplete(
    tmp_path: Path, demo_server: str, demo_extractor: Extractor
) -> None:
    rows = demo_rows()[:20]
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "run.jsonl"
    # A deadline nobody can meet: every call fails DEADLINE_EXCEEDED, items are retried and
    # then given up. (gRPC rounds a deadline up to a millisecond, in which a batch of cached
    # answers can come back: this server takes 2 ms a caption and caches nothing.)
    slow = start_server(SlowExtractor(demo_extractor.index), cache_size=0)
    try:
        result = annotate_corpus(
            Corpus(src), resolve_outputs(out),
            settings(f"127.0.0.1:{slow.port}", deadline=1e-4, retries=2),
        )
    finally:
        slow.stop(0)
    assert not result.complete and result.exit_code == EXIT_INCOMPLETE
    assert result.counts.failed + result.counts.annotated == 20 and result.counts.failed > 0
    errors = [json.loads(x) for x in (tmp_path / "run.jsonl.errors.jsonl").read_text().splitlines()]
    # (a deadline that expires before the call got going shows as INTERNAL "Internal error from
    # Core", or, while the requests are being written, as grpc.aio cancelling the call itself)
    statuses = {e["status"] for e in errors}
    assert "DEADLINE_EXCEEDED" in statuses
    assert statuses <= {"DEADLINE_EXCEEDED", "INTERNAL", "CANCELLED"}
    assert all(e["attempts"] == 3 and e["stage"] == "annotate" for e in errors)
    manifest = json.loads((tmp_path / "run.jsonl.manifest.json").read_text())
    assert manifest["complete"] is False
    assert list(tmp_path.glob("run.jsonl.*.part"))  # kept for the rerun
    # rerunning with a sane deadline retries only what failed and completes the run
    again = annotate_corpus(Corpus(src), resolve_outputs(out), settings(demo_server))
    assert again.complete and again.counts.resumed == result.counts.annotated
    assert out.read_text(encoding="utf-8").splitlines() == expected_lines(demo_extractor, rows)
    assert not (tmp_path / "run.jsonl.errors.jsonl").exists()


def test_batch_a_busy_service_slows_the_run_down_without_failing_captions(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    """More concurrent calls than the service admits: its RESOURCE_EXHAUSTED refusals (the
    call was turned away before any caption was looked at) are backpressure, not the
    captions' failures. They are retried after a backoff without costing an attempt, so a run
    with few retries still completes, with every caption annotated."""
    rows = [(f"cap{i:04d}", demo_rows()[i % 30][1]) for i in range(240)]
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "run.jsonl"
    # one call at a time, 2 ms a caption: 8 workers' batches of 4 mostly find it busy
    busy = start_server(SlowExtractor(demo_extractor.index), cache_size=0,
                        max_concurrent_rpcs=1)
    try:
        result = annotate_corpus(
            Corpus(src), resolve_outputs(out),
            settings(f"127.0.0.1:{busy.port}", concurrency=8, batch_size=4, retries=1,
                     backoff_base=0.01, backoff_max=0.05),
        )
    finally:
        busy.stop(0)
    assert result.counts.busy_refusals > 0  # the service did refuse calls
    assert result.complete and result.counts.failed == 0, result.counts
    manifest = json.loads((tmp_path / "run.jsonl.manifest.json").read_text())
    assert manifest["timing"]["invocations"][-1]["busy_refusals"] == result.counts.busy_refusals
    assert "busy_refusals" not in manifest["counts"]  # how this run went, not what it made
    assert out.read_text(encoding="utf-8").splitlines() == expected_lines(demo_extractor, rows)


def test_batch_batches_hold_at_most_the_services_max_batch_items(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    """A service whose ``max_batch_items`` is below ``--batch-size``: the run's batches are
    closed at the service's limit (GetInfo reports it), so none is refused; before, every
    batch was refused whole, taken for a busy service and retried until its captions were
    given up."""
    rows = [(f"cap{i:04d}", demo_rows()[i % 30][1]) for i in range(60)]
    src = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "run.jsonl"
    small = start_server(demo_extractor, max_batch_items=7)
    try:
        result = annotate_corpus(
            Corpus(src), resolve_outputs(out),
            settings(f"127.0.0.1:{small.port}", batch_size=512, retries=1,
                     backoff_base=0.01, backoff_max=0.05),
        )
        refused = small.metrics.value(
            "conceptsvc_requests_total", {"method": "AnnotateBatch", "code": "RESOURCE_EXHAUSTED"}
        )
        served = small.metrics.value(
            "conceptsvc_requests_total", {"method": "AnnotateBatch", "code": "OK"}
        )
    finally:
        small.stop(0)
    assert result.complete and result.counts.failed == 0, result.counts
    assert (refused, served) == (0, 9)  # 60 captions in batches of at most 7
    assert out.read_text(encoding="utf-8").splitlines() == expected_lines(demo_extractor, rows)


class SlowExtractor(Extractor):
    """The real engine, 2 ms a caption slower."""

    def extract_rows(
        self, text: str, options: ExtractOptions | None = None
    ) -> MentionRows:
        time.sleep(0.002)
        return super().extract_rows(text, options)


class GatedExtractor(Extractor):
    """The real engine, except that a caption containing ``marker`` waits at a gate until the
    test opens it: the server is busy with that caption for exactly as long as the test wants,
    however fast the engine and the machine are. ``held`` counts the captions that waited."""

    def __init__(self, index: ConceptIndex, marker: str) -> None:
        super().__init__(index)
        self.marker = marker
        self.gate = threading.Event()
        self.held = 0
        self._held_lock = threading.Lock()

    def extract_rows(
        self, text: str, options: ExtractOptions | None = None
    ) -> MentionRows:
        if self.marker in text:
            with self._held_lock:
                self.held += 1
            self.gate.wait(120)  # bounded, so a broken test cannot hang the server forever
        return super().extract_rows(text, options)


def test_batch_a_caption_that_always_times_out_does_not_sink_its_batch(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    """A caption the server is still working on when the deadline passes, in the middle of its
    batch: it is found, retried alone and given up; its batch-mates complete.

    An AnnotateBatch call answers nothing until it is done, so its failure does not say which
    caption held it up: the batch is split in halves, uncharged, until that caption is alone.

    The server is held on that caption by a gate rather than by a caption long enough to be
    slow, so the outcome does not depend on how fast the engine has become (a 2 MB caption
    once took 2.5 s against a 1 s deadline, then 0.5 s)."""
    gated = GatedExtractor(demo_extractor.index, marker="HOLD-THIS-CAPTION")
    server = start_server(gated)
    try:
        rows = [(f"ok{i}", t) for i, (_, t) in enumerate(demo_rows()[:9])]
        rows.insert(4, ("slow", "HOLD-THIS-CAPTION chest x-ray shows pleural effusion"))
        src = write_csv(tmp_path / "in.csv", rows)
        out = tmp_path / "run.csv"
        # (2 s: long enough for every request to reach the server on a loaded machine, so the
        # caption is held on both attempts)
        result = annotate_corpus(
            Corpus(src), resolve_outputs(out),
            settings(f"127.0.0.1:{server.port}", batch_size=10, concurrency=1, deadline=2.0,
                     retries=1),
        )
        assert not result.complete and result.counts.failed == 1
        assert list(read_concepts(out)) == [f"ok{i}" for i in range(9)]
        errors_file = tmp_path / "run.csv.errors.jsonl"
        (err,) = [json.loads(x) for x in errors_file.read_text().splitlines()]
        assert err["id"] == "slow" and err["status"] == "DEADLINE_EXCEEDED"
        assert err["attempts"] == 2
        # retried four times: halves of 10 (the 5 with it fail), of 5 (the 2 with it), of 2
        # (it alone, charged), then it alone again (charged: its second attempt); it reached
        # the engine every time, its batch-mates were never charged
        assert result.counts.retried_batches == 4 and gated.held == 5
    finally:
        gated.gate.set()
        server.stop(0)


def test_batch_a_caption_whose_reply_is_too_large_fails_alone(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    """Two megabytes of findings annotate to about 10 MB, over the server's 4 MiB message
    limit: that caption, first in its batch, fails RESOURCE_EXHAUSTED in its own response and
    is not retried (it would fail the same way); its batch-mates complete. The deadline is
    generous: how long the engine takes is not what is tested here."""
    server = start_server(demo_extractor, max_text_chars=3_000_000)
    try:
        big = "chest x-ray shows pleural effusion and pneumonia. " * 40_000
        rows = [("big", big)] + [(f"ok{i}", t) for i, (_, t) in enumerate(demo_rows()[:9])]
        src = write_csv(tmp_path / "in.csv", rows)
        out = tmp_path / "run.csv"
        result = annotate_corpus(
            Corpus(src), resolve_outputs(out),
            settings(f"127.0.0.1:{server.port}", batch_size=10, concurrency=1, deadline=120.0,
                     retries=1),
        )
        assert not result.complete and result.counts.failed == 1
        assert result.counts.retried_batches == 0
        assert list(read_concepts(out)) == [f"ok{i}" for i in range(9)]
        errors_file = tmp_path / "run.csv.errors.jsonl"
        (err,) = [json.loads(x) for x in errors_file.read_text().splitlines()]
        assert err["id"] == "big" and err["status"] == "RESOURCE_EXHAUSTED"
        assert err["attempts"] == 1
        assert "over the server's message limit of 4194304" in err["reason"]
    finally:
        server.stop(0)


def test_batch_oversized_caption_goes_to_the_errors_file(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    server = start_server(demo_extractor, max_text_chars=200)
    try:
        rows = [("ok", "Chest X-ray"), ("huge", "pneumonia " * 100), ("ok2", "CT of the head")]
        src = write_csv(tmp_path / "in.csv", rows)
        out = tmp_path / "run.csv"
        proc = cli("annotate", str(src), "--out", str(out), "--target",
                   f"127.0.0.1:{server.port}", "--retries", "1")
        assert proc.returncode == EXIT_INCOMPLETE, proc.stderr
        assert "INCOMPLETE" in proc.stderr
        assert list(read_concepts(out)) == ["ok", "ok2"]
        errors_file = tmp_path / "run.csv.errors.jsonl"
        (err,) = [json.loads(x) for x in errors_file.read_text().splitlines()]
        assert err["id"] == "huge" and err["status"] == "RESOURCE_EXHAUSTED"
        assert "over the service's limit of 200" in err["reason"]
    finally:
        server.stop(0)
    # the message-size limit is checked the same way (a 70,000-character caption in 64 KiB)
    server = start_server(demo_extractor, max_message_bytes=65536)
    try:
        rows = [("ok", "Chest X-ray"), ("big", "lung " * 14_000)]
        src = write_csv(tmp_path / "in2.csv", rows)
        result = annotate_corpus(
            Corpus(src), resolve_outputs(tmp_path / "run2.csv"),
            settings(f"127.0.0.1:{server.port}"),
        )
        assert not result.complete and result.counts.annotated == 1
        errors_file = tmp_path / "run2.csv.errors.jsonl"
        (err,) = [json.loads(x) for x in errors_file.read_text().splitlines()]
        assert err["id"] == "big" and "message limit of 65536; not sent" in err["reason"]
    finally:
        server.stop(0)


def test_batch_refuses_to_mix_indexes(tmp_path: Path, demo_server: str) -> None:
    other_dir = tmp_path / "other-index"
    b = IndexBuilder(source_release="other")
    b.set_concept("C0000001", preferred_name="Chest", semantic_types=["T029"])
    b.add_term("C0000001", "chest", sab="TEST", tty="PT")
    other = Extractor(ConceptIndex.load(b.write(other_dir)))
    other_server = start_server(other)
    try:
        other_target = f"127.0.0.1:{other_server.port}"
        src = write_csv(tmp_path / "in.csv", demo_rows()[:10])
        out = tmp_path / "run.jsonl"
        with pytest.raises(RunIncompatibleError, match="different indexes"):
            annotate_corpus(Corpus(src), resolve_outputs(out), settings(demo_server, other_target))
        # an interrupted run against the demo index cannot be finished on another index
        annotate_corpus(
            Corpus(src), resolve_outputs(out), settings(demo_server, deadline=1e-4, retries=0)
        )
        with pytest.raises(RunIncompatibleError, match="--restart"):
            annotate_corpus(Corpus(src), resolve_outputs(out), settings(other_target))
        r = annotate_corpus(Corpus(src), resolve_outputs(out), settings(other_target, restart=True))
        assert r.complete and r.counts.resumed == 0
    finally:
        other_server.stop(0)


def test_batch_unreachable_service_is_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody listens: the run says at once that it is waiting (the retries' backoff can take
    many seconds), then fails with a clear error."""
    src = write_csv(tmp_path / "in.csv", demo_rows()[:3])
    target = f"127.0.0.1:{free_port()}"
    with caplog.at_level("WARNING", logger="conceptsvc"):
        with pytest.raises(ServiceUnreachableError, match="no target answered GetInfo"):
            annotate_corpus(
                Corpus(src), resolve_outputs(tmp_path / "o.jsonl"), settings(target, retries=2)
            )
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
    assert len(waits) == 1 and f"waiting for {target} to answer (UNAVAILABLE" in waits[0]
    assert "trying 2 more time(s)" in waits[0]


def test_batch_an_unreadable_reply_stops_the_run_with_a_clear_error(tmp_path: Path) -> None:
    """A service whose AnnotateBatch replies are the review's bytes (a length of 2**64 - 2**40,
    which killed the client with SIGSEGV): `conceptsvc annotate` stops with E600 naming the
    target and protobuf's error, exit 2 and no traceback, and writes no output. In a process
    of its own, so that a crash fails this test rather than the test run."""
    src = write_csv(tmp_path / "in.csv", demo_rows()[:3])
    out = tmp_path / "out" / "run.jsonl"
    index = build_index_a(tmp_path / "index-a")
    with garbling_server(index, unreadable_reply(), ("AnnotateBatch",)) as target:
        done = subprocess.run(
            [sys.executable, "-m", "conceptsvc.cli", "annotate", str(src), "--out", str(out),
             "--target", target, "--retries", "0", "--quiet"],
            capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 2, f"exit {done.returncode} (-11: SIGSEGV): {done.stderr[-2000:]}"
    assert done.stderr.strip().splitlines()[-1] == (
        f"conceptsvc: [E600] {target}: AnnotateBatch: the server's reply cannot be read (Error "
        "parsing message with type 'conceptsvc.v1.AnnotateBatchResponse': Wire format was "
        "corrupt)"
    )
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_batch_draining_service_is_named_as_such(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    """A service that is shutting down answers GetInfo UNAVAILABLE "shutting down": the run
    says it is draining (as `lookup` and the client do), not "is the service running"."""
    server = start_server(demo_extractor)
    try:
        server.state.start_draining()  # refusing, not stopped yet
        src = write_csv(tmp_path / "in.csv", demo_rows()[:3])
        with pytest.raises(ServiceUnreachableError) as err:
            annotate_corpus(Corpus(src), resolve_outputs(tmp_path / "o.jsonl"),
                            settings(f"127.0.0.1:{server.port}", retries=0))
        assert "is shutting down (draining)" in str(err.value), err.value
        assert "Is the service running" not in str(err.value)
    finally:
        server.stop(0)


def test_batch_token_is_sent_and_required(tmp_path: Path, demo_extractor: Extractor) -> None:
    token = "s3cret-token-for-the-batch-test"
    server = start_server(demo_extractor, auth_token=token)
    try:
        src = write_csv(tmp_path / "in.csv", demo_rows()[:5])
        target = f"127.0.0.1:{server.port}"
        proc = cli("annotate", str(src), "--out", str(tmp_path / "a.jsonl"), "--target", target)
        assert proc.returncode == 2 and "UNAUTHENTICATED" in proc.stderr
        proc = cli("annotate", str(src), "--out", str(tmp_path / "a.jsonl"), "--target", target,
                   "--token", token)
        assert proc.returncode == 0, proc.stderr
    finally:
        server.stop(0)


def test_batch_mutual_tls(tmp_path: Path, demo_extractor: Extractor) -> None:
    from service_helpers import make_pki

    pki = make_pki(tmp_path / "pki")
    server = start_server(
        demo_extractor, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    try:
        src = write_csv(tmp_path / "in.csv", demo_rows()[:8])
        target = f"localhost:{server.port}"
        tls = ["--ca-cert", str(pki.ca), "--client-cert", str(pki.client_cert),
               "--client-key", str(pki.client_key)]
        proc = cli("annotate", str(src), "--out", str(tmp_path / "a.csv"), "--target", target,
                   *tls, "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert len(read_concepts(tmp_path / "a.csv")) == 8
        # without a client certificate the handshake fails: a clear error, nothing written
        proc = cli("annotate", str(src), "--out", str(tmp_path / "b.csv"), "--target", target,
                   "--ca-cert", str(pki.ca), "--retries", "0")
        assert proc.returncode == 2 and "no target answered GetInfo" in proc.stderr
        assert not (tmp_path / "b.csv").exists()
    finally:
        server.stop(0)


def test_batch_report_numbers_on_a_known_corpus(tmp_path: Path) -> None:
    b = IndexBuilder(source_release="report-test")
    b.set_concept("C0000001", preferred_name="Pneumonia", semantic_types=["T047"])
    b.set_concept("C0000002", preferred_name="Lung", semantic_types=["T023"])
    b.set_concept("C0000003", preferred_name="Computed tomography", semantic_types=["T060"])
    b.add_term("C0000001", "pneumonia", sab="TEST", tty="PT")
    b.add_term("C0000002", "lung", sab="TEST", tty="PT")
    b.add_term("C0000003", "computed tomography", sab="TEST", tty="PT")
    server = start_server(Extractor(ConceptIndex.load(b.write(tmp_path / "index"))))
    try:
        rows = [
            ("a", "Computed tomography of the lung shows pneumonia."),
            ("b", "Lung."),
            ("c", "Nothing to see here."),
            ("d", "Pneumonia, and more pneumonia."),
        ]
        src = write_csv(tmp_path / "in.csv", rows)
        out = tmp_path / "run.jsonl"
        proc = cli("annotate", str(src), "--out", str(out), "--target",
                   f"127.0.0.1:{server.port}", "--report")
        assert proc.returncode == 0, proc.stderr
        table = proc.stdout
        assert "captions                 4" in table
        assert "with concepts            3 (75.0%)" in table
        assert "without concepts         1 (25.0%)" in table
        assert "mean 1.25, median 1" in table
        assert "mentions                 6" in table
        assert "distinct concepts        3" in table
        md = (tmp_path / "run.jsonl.report.md").read_text()
        assert "| 1 | C0000001 | Pneumonia | 2 | 50.0% | T047 |" in md
        assert "| 2 | C0000002 | Lung | 2 | 50.0% | T023 |" in md
        assert "| 3 | C0000003 | Computed tomography | 1 | 25.0% | T060 |" in md
        assert "| DISO | Disorders | 2 | 40.0% |" in md
        assert "| ANAT | Anatomy | 2 | 40.0% |" in md
        assert "| PROC | Procedures | 1 | 20.0% |" in md
        for png in ("concepts-per-caption", "top-concepts"):
            assert (tmp_path / f"run.jsonl.report-{png}.png").read_bytes().startswith(b"\x89PNG")
    finally:
        server.stop(0)


def test_batch_settings_are_validated() -> None:
    with pytest.raises(ClientError, match="--concurrency must be >= 1"):
        BatchSettings(concurrency=0)
    with pytest.raises(ClientError, match="--deadline must be > 0"):
        BatchSettings(deadline=0)
    with pytest.raises(ClientError, match="at least one --target"):
        BatchSettings(targets=())
    assert OutputFormat("jsonl") is OutputFormat.JSONL


# -- issue 16: a run never writes over its input, nor CSV into a .jsonl; an empty input says so --
def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_issue_16_an_output_that_is_the_input_is_refused(
    tmp_path: Path, demo_server: str, demo_service: ConceptServer
) -> None:
    clob = tmp_path / "clob"
    clob.mkdir()
    src = write_csv(clob / "captions.csv", demo_rows()[:5])
    before = md5(src)
    calls = annotate_calls(demo_service)
    # the second format goes to --out's stem + .csv, which is the input
    proc = cli("annotate", str(src), "--out", str(clob / "captions.jsonl"), "--format", "jsonl",
               "--format", "csv", "--target", demo_server)
    assert proc.returncode == 2, proc.stderr
    assert "E624" in proc.stderr and "--format csv=PATH" in proc.stderr
    assert f"output {src} is the input {src}" in proc.stderr.replace("the csv output", "output")
    assert md5(src) == before and sorted(p.name for p in clob.iterdir()) == ["captions.csv"]
    # --out the input itself, also through a hard link and a symlink
    inplace = tmp_path / "inplace.jsonl"
    inplace.write_text('{"id": "a", "text": "Chest X-ray"}\n', encoding="utf-8")
    os.link(inplace, tmp_path / "hard.jsonl")
    (tmp_path / "soft.jsonl").symlink_to(inplace)
    for out in ("inplace.jsonl", "hard.jsonl", "soft.jsonl"):
        proc = cli("annotate", str(inplace), "--out", str(tmp_path / out), "--target", demo_server)
        assert proc.returncode == 2 and "E624" in proc.stderr, proc.stderr
        assert f"{tmp_path / out} is the input {inplace}" in proc.stderr
        assert "Change --out" in proc.stderr
    assert inplace.read_text(encoding="utf-8") == '{"id": "a", "text": "Chest X-ray"}\n'
    # an explicit FORMAT=PATH onto the input names that flag
    proc = cli("annotate", str(src), "--out", str(tmp_path / "r.jsonl"), "--format",
               f"csv={src}", "--target", demo_server)
    assert proc.returncode == 2 and "Change --format csv=PATH" in proc.stderr, proc.stderr
    # nor may the input be the run's manifest, errors file or work directory
    for name in ("r.jsonl.manifest.json", "r.jsonl.errors.jsonl"):
        side = write_csv(tmp_path / name, demo_rows()[:2])
        proc = cli("annotate", str(side), "--input-format", "csv", "--out",
                   str(tmp_path / "r.jsonl"), "--target", demo_server)
        assert proc.returncode == 2 and "E624" in proc.stderr, proc.stderr
        assert f"the input {side} is {side}" in proc.stderr and "another --out" in proc.stderr
    work = tmp_path / "r.jsonl.0123456789abcdef.part"
    work.mkdir()
    inside = write_csv(work / "in.csv", demo_rows()[:2])
    proc = cli("annotate", str(inside), "--out", str(tmp_path / "r.jsonl"), "--target",
               demo_server)
    assert proc.returncode == 2 and "work directory" in proc.stderr, proc.stderr
    # an output may not be a side file of the first one either
    proc = cli("annotate", str(src), "--out", str(tmp_path / "r.jsonl"), "--format", "jsonl",
               "--format", f"jsonl={tmp_path / 'r.jsonl.errors.jsonl'}", "--target",
               demo_server)
    assert proc.returncode == 2 and "the errors file" in proc.stderr, proc.stderr
    assert annotate_calls(demo_service) == calls  # nothing was sent
    assert not (tmp_path / "r.jsonl").exists()


def test_issue_16_csv_is_not_written_into_a_jsonl_file(
    tmp_path: Path, demo_server: str
) -> None:
    src = write_csv(tmp_path / "big.csv", demo_rows()[:5])
    out = tmp_path / "out" / "big.jsonl"
    proc = cli("annotate", str(src), "--out", str(out), "--format", "csv", "--target",
               demo_server)
    assert proc.returncode == 2 and "E625" in proc.stderr, proc.stderr
    assert f"`--out {tmp_path / 'out' / 'big.csv'} --format csv`" in proc.stderr
    assert f"--format csv={tmp_path / 'out' / 'big.csv'}" in proc.stderr
    assert not out.parent.exists()
    # the first suggestion works, and the summary says which format each file got
    proc = cli("annotate", str(src), "--out", str(out), "--format",
               f"csv={tmp_path / 'out' / 'big.csv'}", "--target", demo_server)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8").startswith('{"id":')
    assert (tmp_path / "out" / "big.csv").read_text(encoding="utf-8").startswith("ID,CUIs\n")
    assert f"output   {out} (jsonl)" in proc.stderr
    # an extension that names no format takes any, and the summary says which was written
    proc = cli("annotate", str(src), "--out", str(tmp_path / "big.out"), "--format", "csv",
               "--target", demo_server)
    assert proc.returncode == 0 and f"output   {tmp_path / 'big.out'} (csv)" in proc.stderr


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.csv", b""), ("header.csv", b"ID,Caption\n"), ("blank.txt", b"\n  \n\n"),
     ("blank.jsonl", b"\n")],
)
def test_issue_16_an_empty_corpus_is_refused_unless_allowed(
    tmp_path: Path, demo_server: str, demo_service: ConceptServer, name: str, content: bytes
) -> None:
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "run.csv"
    calls = annotate_calls(demo_service)
    proc = cli("annotate", str(src), "--out", str(out), "--target", demo_server)
    assert proc.returncode == 2, proc.stderr
    assert "E626" in proc.stderr and f"no captions in {src}" in proc.stderr
    assert "--allow-empty" in proc.stderr
    assert annotate_calls(demo_service) == calls and list(tmp_path.iterdir()) == [src]
    with pytest.raises(EmptyCorpusError, match="no captions in stdin"):
        annotate_corpus(Corpus.from_bytes(content), resolve_outputs(out),
                        settings(demo_server))
    # asked to accept it: empty outputs (the CSV header alone) and a manifest, exit 0
    proc = cli("annotate", str(src), "--out", str(out), "--format", "csv", "--format", "jsonl",
               "--allow-empty", "--target", demo_server)
    assert proc.returncode == 0, proc.stderr
    assert "0/0 captions in the output (complete)" in proc.stderr
    assert out.read_text(encoding="utf-8") == "ID,CUIs\n"
    assert (tmp_path / "run.jsonl").read_text(encoding="utf-8") == ""
    manifest = json.loads((tmp_path / "run.csv.manifest.json").read_text(encoding="utf-8"))
    assert manifest["complete"] and manifest["counts"]["captions"] == 0


def test_issue_16_all_records_malformed_and_skipped_is_an_empty_corpus(
    tmp_path: Path, demo_server: str
) -> None:
    src = tmp_path / "in.csv"
    src.write_text("ID,Caption\n,no id\nb,one,two\n", encoding="utf-8")
    out = tmp_path / "run.jsonl"
    with pytest.raises(EmptyCorpusError, match=r"all 2 record\(s\) are malformed") as info:
        annotate_corpus(Corpus(src), resolve_outputs(out), settings(demo_server,
                                                                    on_bad_input="skip"))
    assert str(tmp_path / "run.jsonl.errors.jsonl") in str(info.value)
    assert len((tmp_path / "run.jsonl.errors.jsonl").read_text().splitlines()) == 2
    assert not out.exists()


# -- issue 16: pipes, columns, caption text, Ctrl-C ------------------------------------------------
def test_issue_16_out_dash_writes_to_stdout(
    tmp_path: Path, demo_server: str, demo_extractor: Extractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = demo_rows()[:25]
    src = write_csv(tmp_path / "in.csv", rows)
    monkeypatch.chdir(tmp_path)
    proc = cli("annotate", str(src), "--out", "-", "--target", demo_server,
               "--profile", "rocov2", "--progress", "log")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected_lines(demo_extractor, rows, profile="rocov2")
    assert "25/25 captions in the output (complete)" in proc.stderr  # progress on stderr
    assert "(standard output)" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]  # no file named "-"
    proc = cli("annotate", str(src), "--out", "-", "--format", "submission",
               "--target", demo_server, "--quiet")
    assert proc.returncode == 0 and proc.stderr == ""
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [r[0] for r in rows]
    proc = cli("annotate", str(src), "--out", "-", "--format", "jsonl,csv",
               "--target", demo_server)
    assert proc.returncode == 2 and "--out - writes one format" in proc.stderr


# Modules `conceptsvc annotate` must not import: the server's and the engine's (numpy with the
# index), serve's settings (pydantic), the scoring module, the typed client, the report (only
# with --report), pyarrow (only for Parquet), spacy and matplotlib.
NOT_FOR_ANNOTATE = (
    "numpy", "pydantic", "pydantic_settings", "yaml", "pyarrow", "spacy", "matplotlib",
    "conceptsvc.index", "conceptsvc.extractor", "conceptsvc.normalize", "conceptsvc.matcher",
    "conceptsvc.trigram_index", "conceptsvc.config", "conceptsvc.server", "conceptsvc.evaluation",
    "conceptsvc.client.service", "conceptsvc.client.report", "conceptsvc.client.html_page",
    "conceptsvc.client.parquet", "grpc_health.v1",
)


def modules_of_annotate(tmp_path: Path, *argv: str, env: dict[str, str]) -> tuple[int, set[str]]:
    """Run ``conceptsvc annotate ARGV`` in a fresh interpreter; its exit status and the modules
    it had imported by the end."""
    listing = tmp_path / "modules.json"
    code = (
        "import json, sys\n"
        "from conceptsvc.cli import main\n"
        "try:\n"
        f"    rc = main({['annotate', *argv]!r})\n"
        "except SystemExit as stop:\n"
        "    rc = stop.code\n"
        f"open({str(listing)!r}, 'w').write(json.dumps(sorted(sys.modules)))\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert listing.exists(), proc.stderr
    return proc.returncode, set(json.loads(listing.read_text()))


def test_batch_annotate_imports_only_what_it_needs(tmp_path: Path, demo_server: str) -> None:
    """`conceptsvc annotate` pays at start-up for what it uses: gRPC and the client modules,
    not the server, the engine, serve's settings or the formats it does not write. A fresh
    interpreter runs the whole command (and its --help) and lists what it imported."""
    src = write_csv(tmp_path / "in.csv", demo_rows()[:30])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCEPTSVC_")}
    env["CONCEPTSVC_TOKEN"] = "not-checked-by-this-server"  # read by the client: no settings
    out = tmp_path / "out" / "run.jsonl"
    for argv in (
        ("--help",),
        (str(src), "--out", str(out), "--format", "jsonl", "--format", "csv", "--format",
         "submission", "--format", "roco", "--include-text", "--target", demo_server,
         "--profile", "rocov2", "--progress", "log"),
    ):
        rc, modules = modules_of_annotate(tmp_path, *argv, env=env)
        assert rc == 0, argv
        loaded = {m for m in NOT_FOR_ANNOTATE
                  if m in modules or any(x.startswith(m + ".") for x in modules)}
        assert loaded == set(), (argv, sorted(loaded))
        assert "conceptsvc.client.arguments" in modules  # (the listing is of a real run)
    assert {"grpc", "conceptsvc.client.batch", "conceptsvc.wire"} <= modules
    assert len(ids_of_jsonl(out)) == 30


def test_issue_16_include_text_lets_offsets_be_read(
    tmp_path: Path, demo_server: str, demo_extractor: Extractor
) -> None:
    rows = demo_rows()[:40]
    src = write_csv(tmp_path / "in.csv", rows)
    specs = resolve_outputs(tmp_path / "run.jsonl", ["jsonl", "csv"])
    result = annotate_corpus(Corpus(src), specs, settings(demo_server, batch_size=7),
                             overrides=ROCOV2, include_text=True)
    assert result.complete
    objs = [json.loads(x) for x in (tmp_path / "run.jsonl").read_text("utf-8").splitlines()]
    assert [(o["id"], o["text"]) for o in objs] == rows
    assert list(objs[0]) == ["id", "text", "concepts", "mentions"]
    mentions = [(o["text"], m) for o in objs for m in o["mentions"]]
    assert mentions and all(t[m["start"]:m["end"]] == m["text"] for t, m in mentions)
    # without the option the rows are what they always were; the csv never carries text
    plain = expected_lines(demo_extractor, rows, profile="rocov2")
    assert [json.dumps({k: v for k, v in o.items() if k != "text"}, ensure_ascii=False,
                       separators=(",", ":")) for o in objs] == plain
    assert (tmp_path / "run.csv").read_text().count("\n") == 41


def test_batch_outputs_are_the_render_of_each_annotation_kept_or_streamed(
    tmp_path: Path, demo_server: str, demo_extractor: Extractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every output file is, byte for byte, render() of the engine's annotations in input order
    (what the outputs were before they were written from the journal's text) — whether the
    scan kept the corpus or it was too big to keep and was read again."""
    from conceptsvc.client import corpus as corpus_module
    from conceptsvc.client.outputs import render

    rows = [*demo_rows()[:60], ('q"uote', 'Chest "X-ray", {"cui": no} \\ Sjögren 😀')]
    src = write_csv(tmp_path / "in.csv", rows)
    opts = ExtractOptions(profile="rocov2")
    expected = [(demo_extractor.extract(text, opts, id=rid), text) for rid, text in rows]
    formats = ["jsonl", "csv", "submission", "roco"]
    for keep in (corpus_module.KEEP_BYTES, 0):
        monkeypatch.setattr(corpus_module, "KEEP_BYTES", keep)
        specs = resolve_outputs(tmp_path / f"keep{keep}" / "run.jsonl", formats)
        result = annotate_corpus(Corpus(src), specs, settings(demo_server, batch_size=9),
                                 overrides=ROCOV2, include_text=True)
        assert result.complete
        assert result.counts.mentions == sum(len(a.mentions) for a, _ in expected)
        assert result.counts.concepts == sum(len(set(a.concepts)) for a, _ in expected)
        for spec in specs:
            header = "ID,CUIs\n" if spec.format is OutputFormat.CSV else ""
            assert spec.path.read_text(encoding="utf-8") == header + "".join(
                render(spec.format, a, text) for a, text in expected
            ), (keep, spec.format)


def test_issue_16_annotate_other_csv_columns(tmp_path: Path, demo_server: str) -> None:
    rows = demo_rows()[:12]
    src = tmp_path / "wide.csv"
    with src.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["split", "image_id", "caption"])
        w.writerows(("train", rid, text) for rid, text in rows)
    out = tmp_path / "run.jsonl"
    proc = cli("annotate", str(src), "--out", str(out), "--target", demo_server, "--quiet")
    assert proc.returncode == 2
    assert "split, image_id, caption" in proc.stderr and "--text-column" in proc.stderr
    proc = cli("annotate", str(src), "--out", str(out), "--target", demo_server, "--quiet",
               "--id-column", "image_id", "--text-column", "caption", "--include-text")
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
    assert [(o["id"], o["text"]) for o in objs] == rows


@pytest.mark.slow
def test_issue_16_ctrl_c_says_how_to_resume_and_the_resume_says_what_it_resumed(
    tmp_path: Path, demo_server: str
) -> None:
    """SIGINT mid-run, then the same command: the interruption says how to resume, the resumed
    run says how many it resumed before its first rate line, and its output (with the caption
    text) is byte-identical to an uninterrupted run's."""
    n = 3000
    src = big_corpus(tmp_path / "in.csv", n)
    ref = tmp_path / "ref" / "run.jsonl"
    assert annotate_corpus(Corpus(src), resolve_outputs(ref), settings(demo_server),
                           overrides=ROCOV2, include_text=True).complete
    out = tmp_path / "run.jsonl"
    argv = [sys.executable, "-m", "conceptsvc.cli", "annotate", str(src), "--out", str(out),
            "--target", demo_server, "--profile", "rocov2", "--include-text",
            "--batch-size", "4", "--concurrency", "1",
            "--progress", "log", "--progress-interval", "0.05"]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while journal_lines(out) < 100 and child.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err
    done = journal_lines(out)
    assert 100 <= done < n
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stderr.splitlines()
    first_rate = next(i for i, x in enumerate(lines) if "captions/s" in x)
    said = [i for i, x in enumerate(lines) if x.startswith("annotate: resuming: ")]
    assert said and said[0] < first_rate
    assert f"resuming: {done} of {n} captions" in lines[said[0]]
    assert out.read_bytes() == ref.read_bytes()


# -- the index of every answer (issue 18 item 1, issue 16 item 3) --------------------------------
class ReloadingExtractor(Extractor):
    """The real engine, except that the first caption containing ``marker`` calls ``swap``
    before it is annotated — the test's deployment: index B replaces the directory the server
    loads from and the server reloads (what SIGHUP does). The stream holding that caption stays
    on the index it started with; every later stream is answered by B. No timing involved."""

    def __init__(self, index: ConceptIndex, marker: str, hold: str | None = None) -> None:
        super().__init__(index)
        self.marker = marker
        self.swap: Callable[[], object] = lambda: None
        self.fired = 0
        # With ``hold``: a caption containing it waits at ``gate`` (on the old index), and the
        # swap waits until such a caption is being held — a stream opened before the reload
        # that answers after it.
        self.hold = hold
        self.held = threading.Event()
        self.gate = threading.Event()

    def extract_rows(
        self, text: str, options: ExtractOptions | None = None
    ) -> MentionRows:
        if self.hold is not None and self.hold in text:
            self.held.set()
            self.gate.wait(60)  # bounded, so a broken test cannot hang the server
        if self.marker in text and not self.fired:
            self.fired += 1
            if self.hold is not None:
                self.held.wait(60)
            self.swap()
        return super().extract_rows(text, options)


MARKER = "DEPLOY-HERE"


@contextlib.contextmanager
def service_reloading_mid_run(
    tmp_path: Path, hold: str | None = None
) -> Iterator[tuple[ConceptServer, ReloadingExtractor]]:
    """A server on index A (from ``tmp_path/idx``) that reloads to B when it meets MARKER."""
    from service_helpers import build_index_a, build_index_b

    path = build_index_a(tmp_path / "idx")
    engine = ReloadingExtractor(ConceptIndex.load(path), MARKER, hold)
    server = start_server(engine)
    engine.swap = lambda: (build_index_b(path), server.reload())
    try:
        yield server, engine
    finally:
        engine.gate.set()
        server.stop(0)


def index_change_corpus(path: Path) -> Path:
    """40 captions, many with "edema" (a concept of B only); MARKER in caption 9, so with
    batches of 4 on one stream at a time, captions 0-11 are answered by A and 12-39 by B."""
    from service_helpers import CAPTIONS

    rows = [(f"c{i:03d}", CAPTIONS[i % len(CAPTIONS)][1]) for i in range(40)]
    rows[9] = ("c009", f"{MARKER}: pleural edema of the lung.")
    return write_csv(path, rows)


def one_at_a_time(target: str, **kw: object) -> BatchSettings:
    return settings(target, batch_size=4, concurrency=1, **kw)


def clean_run_against(target: str, src: Path, out: Path) -> bytes:
    result = annotate_corpus(Corpus(src), resolve_outputs(out), one_at_a_time(target))
    assert result.complete
    return out.read_bytes()


def test_issue_18_index_changed_mid_run_stops_with_e627(tmp_path: Path) -> None:
    """Without the check the run exits complete with captions 0-11 from A and 12-39 from B
    and a manifest naming A. With it, the first answer from B stops the run: nothing at the
    output path, the journal keeps only A's results, and the error names both indexes and the
    choices."""
    from service_helpers import build_index_a

    a_hash = ConceptIndex.load(build_index_a(tmp_path / "a")).content_hash
    with service_reloading_mid_run(tmp_path) as (server, _):
        target = f"127.0.0.1:{server.port}"
        src = index_change_corpus(tmp_path / "in.csv")
        out = tmp_path / "run.jsonl"
        with pytest.raises(RunIncompatibleError) as info:
            annotate_corpus(Corpus(src), resolve_outputs(out), one_at_a_time(target))
        b_hash = server.state.current.content_hash if server.state.current else ""
        assert a_hash != b_hash
        err = info.value
        assert isinstance(err, IndexChangedError) and err.code == "E627"
        assert (err.run_hash, err.new_hash, err.done) == (a_hash, b_hash, 12)
        text = str(err)
        assert a_hash[:12] in text and b_hash[:12] in text
        assert "--on-index-change redo" in text
        # nothing written at the output path, no manifest claiming anything
        assert not out.exists() and not (tmp_path / "run.jsonl.manifest.json").exists()
        (work,) = tmp_path.glob("run.jsonl.*.part")
        lines = [json.loads(x) for x in (work / "journal.jsonl").read_text().splitlines()]
        assert sorted(x["seq"] for x in lines) == list(range(12))
        assert {x["ix"] for x in lines} == {a_hash}
        # the same command again: the journal's index is not the service's (E621, as before,
        # now naming the redo choice as well)
        with pytest.raises(RunIncompatibleError, match="--on-index-change redo") as again:
            annotate_corpus(Corpus(src), resolve_outputs(out), one_at_a_time(target))
        assert again.value.code == "E621" and not out.exists()
        proc = cli("annotate", str(src), "--out", str(out), "--target", target, "--quiet")
        assert proc.returncode == 2 and "E621" in proc.stderr
        # redo: A's 12 results are annotated again with B; the output is a clean run's
        redone = annotate_corpus(
            Corpus(src), resolve_outputs(out), one_at_a_time(target, on_index_change="redo")
        )
        assert redone.complete and redone.counts.resumed == 0
        reference = clean_run_against(target, src, tmp_path / "clean" / "run.jsonl")
        assert out.read_bytes() == reference
        manifest = json.loads((tmp_path / "run.jsonl.manifest.json").read_text())
        assert manifest["complete"] is True
        assert manifest["service"]["index_content_hash"] == b_hash
        (change,) = manifest["timing"]["invocations"][-1]["index_changes"]
        assert change == {"from": a_hash, "to": b_hash, "redone": 12}


def test_issue_18_index_changed_mid_run_redo_gives_a_clean_run_of_the_new_index(
    tmp_path: Path,
) -> None:
    """--on-index-change redo: the run adopts B when it first hears from it, annotates A's
    captions again, and its output is byte-identical to a run against B alone."""
    with service_reloading_mid_run(tmp_path) as (server, _):
        target = f"127.0.0.1:{server.port}"
        src = index_change_corpus(tmp_path / "in.csv")
        out = tmp_path / "run.jsonl"
        result = annotate_corpus(
            Corpus(src), resolve_outputs(out), one_at_a_time(target, on_index_change="redo")
        )
        assert result.complete and result.counts.annotated == 40
        b_hash = server.state.current.content_hash if server.state.current else ""
        reference = clean_run_against(target, src, tmp_path / "clean" / "run.jsonl")
        assert out.read_bytes() == reference
        # B knows edema (C0013604): every caption with it has it, A's too
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        with_edema = [r["id"] for r in rows if "C0013604" in r["concepts"]]
        assert with_edema == sorted(
            [f"c{i:03d}" for i in range(40) if i % 5 == 3] + ["c009"]
        )
        manifest = json.loads((tmp_path / "run.jsonl.manifest.json").read_text())
        assert manifest["service"]["index_content_hash"] == b_hash
        (change,) = manifest["timing"]["invocations"][-1]["index_changes"]
        assert change["to"] == b_hash and change["redone"] == 12
        assert not list(tmp_path.glob("run.jsonl.*.part"))


def test_issue_18_redo_resends_answers_of_the_old_index_still_in_flight(tmp_path: Path) -> None:
    """Two streams at a time: one opened on A is held at a gate while the other meets the
    reload; the run adopts B, and only then are the held stream's A answers released. They are
    not journaled but sent again (to B); the output is still a clean run of B."""
    with service_reloading_mid_run(tmp_path, hold="HOLD-ME") as (server, engine):
        target = f"127.0.0.1:{server.port}"
        from service_helpers import CAPTIONS

        rows = [(f"c{i:03d}", CAPTIONS[i % len(CAPTIONS)][1]) for i in range(24)]
        rows[0] = ("c000", "HOLD-ME: lung edema.")
        rows[5] = ("c005", f"{MARKER}: pleural edema of the lung.")
        src = write_csv(tmp_path / "in.csv", rows)
        out = tmp_path / "run.jsonl"
        from service_helpers import build_index_b

        b_hash = ConceptIndex.load(build_index_b(tmp_path / "b")).content_hash

        def release_once_b_is_adopted() -> None:
            # the run saves the index it adopts in its run.json before it goes on
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                for state in tmp_path.glob("run.jsonl.*.part/run.json"):
                    with contextlib.suppress(OSError, ValueError, KeyError):
                        if json.loads(state.read_text())["index_content_hash"] == b_hash:
                            engine.gate.set()
                            return
                time.sleep(0.005)

        opener = threading.Thread(target=release_once_b_is_adopted)
        opener.start()
        try:
            result = annotate_corpus(
                Corpus(src), resolve_outputs(out),
                settings(target, batch_size=4, concurrency=2, on_index_change="redo"),
            )
        finally:
            engine.gate.set()
            opener.join(60)
        assert engine.held.is_set() and engine.fired == 1
        assert result.complete and result.counts.retried_batches >= 1  # the held batch, resent
        reference = clean_run_against(target, src, tmp_path / "clean" / "run.jsonl")
        assert out.read_bytes() == reference
        manifest = json.loads((tmp_path / "run.jsonl.manifest.json").read_text())
        assert manifest["service"]["index_content_hash"] == b_hash
        (change,) = manifest["timing"]["invocations"][-1]["index_changes"]
        assert change["to"] == b_hash


def test_issue_16_complete_run_is_rechecked_against_the_index_and_options(
    tmp_path: Path,
) -> None:
    """A complete run is "already complete" only while the service serves the index its
    manifest names, with the same options; otherwise E621 says how to redo it, and the old
    outputs stay as they are until --restart (or redo) replaces them."""
    from service_helpers import build_index_a, build_index_b

    path = build_index_a(tmp_path / "idx")
    server = start_server(Extractor(ConceptIndex.load(path)))
    try:
        target = f"127.0.0.1:{server.port}"
        src = index_change_corpus(tmp_path / "in.csv")
        out = tmp_path / "run.jsonl"
        specs = resolve_outputs(out)
        first = annotate_corpus(Corpus(src), specs, settings(target))
        assert first.complete
        assert annotate_corpus(Corpus(src), specs, settings(target)).already_complete
        a_bytes = out.read_bytes()
        manifest_a = (tmp_path / "run.jsonl.manifest.json").read_text()
        # other options, same index: not complete for this command, and not replaced unasked
        with pytest.raises(RunIncompatibleError, match="other options") as opt:
            annotate_corpus(Corpus(src), specs, settings(target),
                            overrides={"include_negated": False})
        assert opt.value.code == "E621" and "--restart" in str(opt.value)
        assert "include_negated: True then, False now" in str(opt.value)
        # the service now serves B
        build_index_b(path)
        server.reload()
        b_hash = server.state.current.content_hash if server.state.current else ""
        with pytest.raises(RunIncompatibleError, match="--restart") as stale:
            annotate_corpus(Corpus(src), specs, settings(target))
        assert stale.value.code == "E621" and b_hash[:12] in str(stale.value)
        proc = cli("annotate", str(src), "--out", str(out), "--target", target)
        assert proc.returncode == 2 and "E621" in proc.stderr
        assert "already complete" not in proc.stderr
        assert out.read_bytes() == a_bytes
        assert (tmp_path / "run.jsonl.manifest.json").read_text() == manifest_a
        # --restart annotates it again with B
        again = annotate_corpus(Corpus(src), specs, settings(target, restart=True))
        assert again.complete and not again.already_complete
        assert out.read_bytes() != a_bytes  # B finds edema, A did not
        assert out.read_bytes() == clean_run_against(target, src, tmp_path / "b" / "run.jsonl")
        manifest = json.loads((tmp_path / "run.jsonl.manifest.json").read_text())
        assert manifest["service"]["index_content_hash"] == b_hash
        assert annotate_corpus(Corpus(src), specs, settings(target)).already_complete
        # back to A: --on-index-change redo also replaces a complete run of another index
        build_index_a(path)
        server.reload()
        proc = cli("annotate", str(src), "--out", str(out), "--target", target,
                   "--on-index-change", "redo")
        assert proc.returncode == 0, proc.stderr
        assert "(complete)" in proc.stderr and "already complete" not in proc.stderr
        assert out.read_bytes() == a_bytes
    finally:
        server.stop(0)


def test_batch_incomplete_run_writes_what_it_annotated_and_says_so(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    """The documented rule for partial outputs: an incomplete run (exit 3) writes every
    caption it annotated at the output path, in input order, with complete: false in the
    manifest and the rest in the errors file; the journal stays for the rerun. A run stopped
    by an error writes nothing there (see the E627 test)."""
    server = start_server(demo_extractor, max_text_chars=200)
    try:
        rows = [("ok", "Chest X-ray"), ("huge", "pneumonia " * 100), ("ok2", "CT of the head")]
        src = write_csv(tmp_path / "in.csv", rows)
        out = tmp_path / "run.jsonl"
        result = annotate_corpus(
            Corpus(src), resolve_outputs(out), settings(f"127.0.0.1:{server.port}")
        )
        assert not result.complete and result.exit_code == EXIT_INCOMPLETE
        assert ids_of_jsonl(out) == ["ok", "ok2"]
        manifest = json.loads((tmp_path / "run.jsonl.manifest.json").read_text())
        assert manifest["complete"] is False and manifest["counts"]["failed"] == 1
        assert manifest["outputs"][0]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
        assert list(tmp_path.glob("run.jsonl.*.part"))
        (err,) = [json.loads(x) for x in (tmp_path / "run.jsonl.errors.jsonl").read_text()
                  .splitlines()]
        assert err["id"] == "huge"
    finally:
        server.stop(0)


# -- the batched path ----------------------------------------------------------------------------
def test_batch_batched_and_unbatched_paths_give_identical_results(
    tmp_path: Path, demo_server: str, demo_extractor: Extractor
) -> None:
    """AnnotateBatch, AnnotateStream and unary Annotate answer the demo captions alike, and
    `annotate` writes the same bytes whatever its batch size (one caption a message, odd
    sizes, all in one), equal to the engine in this process."""
    from conceptsvc.client import ConceptClient

    rows = demo_rows()
    with ConceptClient(demo_server) as c:
        for options in (None, ExtractOptions(profile="rocov2"),
                        ExtractOptions(include_mentions=False, semantic_groups=("DISO",))):
            batched = c.annotate_batch(rows, options=options)
            streamed = list(c.annotate_stream(rows, options=options))
            assert [r.annotation for r in batched] == [r.annotation for r in streamed]
            assert [r.annotation for r in batched] == [
                c.annotate(text, id=rid, options=options) for rid, text in rows
            ]
    src = write_csv(tmp_path / "in.csv", rows)
    expected = expected_lines(demo_extractor, rows, **ROCOV2)
    outputs = []
    for size in (1, 7, 512):
        out = tmp_path / f"b{size}" / "run.jsonl"
        result = annotate_corpus(
            Corpus(src), resolve_outputs(out, ["jsonl", "csv"]),
            settings(demo_server, batch_size=size), overrides=ROCOV2,
        )
        assert result.complete
        assert out.read_text(encoding="utf-8").splitlines() == expected
        outputs.append((out.read_bytes(), out.with_suffix(".csv").read_bytes()))
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.fixture(scope="module")
def interrupted_run(
    tmp_path_factory: pytest.TempPathFactory, demo_extractor: Extractor, demo_server: str
) -> tuple[Path, Path, bytes, bytes]:
    """A corpus, the work directory an interrupted run of it left (every caption journaled but
    one, which a server with a small text limit refused) and the bytes of an uninterrupted
    run's JSONL and CSV outputs."""
    base = tmp_path_factory.mktemp("interrupted")
    rows = [(f"cap{i:03d}", t) for i, (_, t) in enumerate(demo_rows() * 2)][:60]
    rows[23] = ("cap023", "chest x-ray shows pleural effusion and pneumonia. " * 40)
    src = write_csv(base / "in.csv", rows)
    specs = ["jsonl", "csv"]
    ref = base / "ref" / "run.jsonl"
    assert annotate_corpus(Corpus(src), resolve_outputs(ref, specs),
                           settings(demo_server)).complete
    small = start_server(demo_extractor, max_text_chars=1500)
    try:
        cut = base / "cut" / "run.jsonl"
        result = annotate_corpus(Corpus(src), resolve_outputs(cut, specs),
                                 settings(f"127.0.0.1:{small.port}"))
    finally:
        small.stop(0)
    assert not result.complete and result.counts.annotated == 59
    (work,) = cut.parent.glob("run.jsonl.*.part")
    return src, work, ref.read_bytes(), ref.with_suffix(".csv").read_bytes()


@settings_h(max_examples=20, deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 17), min_size=1, max_size=20),
    keep=st.lists(st.booleans(), min_size=20, max_size=20),
    order=st.randoms(use_true_random=False),
    torn=st.integers(0, 40),
    batch_size=st.integers(1, 40),
)
def test_batch_resume_property_over_batch_boundaries(
    interrupted_run: tuple[Path, Path, bytes, bytes], demo_service: ConceptServer,
    sizes: list[int], keep: list[bool], order: Any, torn: int, batch_size: int,
) -> None:
    """Whatever a killed run had journaled — any of its batches, each whole (a batch is one
    write), in any completion order, with a torn line at the end — the resumed run, with any
    batch size, writes the bytes of an uninterrupted run and resends exactly the rest."""
    import shutil
    import tempfile

    src, work, ref_jsonl, ref_csv = interrupted_run
    lines = (work / "journal.jsonl").read_bytes().splitlines(keepends=True)
    batches, start = [], 0
    for size in sizes:  # the run's batches: consecutive slices of the journaled lines
        batches.append(lines[start:start + size])
        start += size
    done = [b for b, k in zip(batches, keep, strict=False) if k and b]
    order.shuffle(done)
    tail = lines[-1][:torn] if torn and torn < len(lines[-1]) else b""
    def answered() -> float:
        return sum(demo_service.metrics.value("conceptsvc_captions_annotated_total",
                                              {"source": s}) for s in ("engine", "cache"))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.jsonl"
        copy = Path(tmp) / work.name
        shutil.copytree(work, copy)
        (copy / "journal.jsonl").write_bytes(b"".join(line for b in done for line in b) + tail)
        before = answered()
        result = annotate_corpus(
            Corpus(src), resolve_outputs(out, ["jsonl", "csv"]),
            settings(f"127.0.0.1:{demo_service.port}", batch_size=batch_size),
        )
        assert result.complete
        resumed = sum(len(b) for b in done)
        assert result.counts.resumed == resumed
        assert answered() - before == 60 - resumed + 1  # the rest, and the options probe
        assert out.read_bytes() == ref_jsonl
        assert out.with_suffix(".csv").read_bytes() == ref_csv


def test_batch_answers_a_full_reply_could_not_hold_are_sent_again_in_smaller_batches(
    tmp_path: Path, demo_extractor: Extractor
) -> None:
    """A batch whose answers are together over the message limit (each alone is not) comes
    back with E503 for the items that did not fit; the run sends those again in halves, at
    once, charging nobody — and completes with the engine's results."""
    server = start_server(demo_extractor, max_message_bytes=64 * 1024)
    try:
        rows = [(f"r{i}", "pleural effusion and pneumonia. " * 120) for i in range(8)]
        src = write_csv(tmp_path / "in.csv", rows)
        out = tmp_path / "run.jsonl"
        result = annotate_corpus(
            Corpus(src), resolve_outputs(out),
            settings(f"127.0.0.1:{server.port}", batch_size=8, concurrency=1, retries=0),
        )
        assert result.complete and result.counts.retried_batches == 0
        assert out.read_text(encoding="utf-8").splitlines() == expected_lines(demo_extractor, rows)
        assert server.metrics.value(
            "conceptsvc_stream_item_errors_total", {"code": "RESOURCE_EXHAUSTED"}
        ) >= 1
    finally:
        server.stop(0)
