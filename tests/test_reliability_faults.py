"""Faults injected into real processes while work is running, each with its outcome measured.

- Redis stopped, restarted, flushed and frozen (SIGSTOP) during a long stream: no failed item,
  results identical to a server that has no Redis at all;
- one of two service replicas killed with SIGKILL during ``conceptsvc annotate``: the run
  completes with every id exactly once and the same bytes as an undisturbed run;
- ``conceptsvc annotate`` itself killed with SIGKILL at random points, at least five times in one
  run: after resuming, every id exactly once and outputs byte-identical to an uninterrupted run
  (the manifest differs only in timestamps and run history);
- dictionary reloads (SIGHUP and the admin RPC) on a two-worker server under load: no failed
  request;
- SIGTERM on a two-worker server under load: in-flight requests complete within the grace
  period, new ones are refused with UNAVAILABLE, the server exits 0.

The outcomes (counts, timings) are printed with ``-s`` and recorded in RELIABILITY.md.
"""

from __future__ import annotations

import csv
import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import RedisServer, free_port
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import (
    CAPTIONS,
    build_index_a,
    build_index_b,
    running_server,
    serve_subprocess,
    settings_for,
)

from conceptsvc.client import ConceptClient
from conceptsvc.errors import ServiceCallError
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.model import ExtractOptions

ADMIN = "admin-token-" + "f" * 24

_WORDS = ["chest", "CT", "pneumothorax", "collapsed lung", "thorax", "computed tomography",
          "lung", "pneumonia", "heart", "cancer", "edema", "no", "right", "left", "small",
          "shows", "with", "and", "of the", "without", "axial", "image", "arrow", "(CT)"]


def corpus_texts(n: int, *, seed: int = 11, distinct: int | None = None) -> list[str]:
    """``n`` captions; with ``distinct`` only that many different texts (so caches get hits)."""
    rnd = random.Random(seed)
    pool = [
        f"{rnd.randint(1, 99)}: " + " ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(3, 25)))
        for _ in range(distinct or n)
    ]
    return [pool[i % len(pool)] for i in range(n)]


def metric(port: int, name: str) -> float:
    """One sample of a server's Prometheus metrics (all workers together), read over HTTP."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def report(name: str, **figures: Any) -> None:
    """Outcome line for RELIABILITY.md (visible with ``pytest -s``)."""
    print(f"\n[reliability] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture(scope="module")
def index_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index_a(tmp_path_factory.mktemp("faults") / "a")


# -- Redis ----------------------------------------------------------------------------------------
def test_reliability_faults_redis_stopped_restarted_flushed_and_frozen_during_a_stream(
    index_a: Path, redis_server: RedisServer
) -> None:
    texts = corpus_texts(4000, distinct=250)  # repeats: Redis hits between the faults
    items = [(f"r{i}", t) for i, t in enumerate(texts)]
    with running_server(settings_for(index_a, cache_size=0)) as (_s, port):
        with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
            expected = [r.annotation for r in c.annotate_stream(items)]
    assert len(expected) == len(items)

    s = settings_for(
        index_a, redis_url=redis_server.url, cache_size=0, stream_batch_size=16,
        redis_timeout_seconds=0.1, redis_backoff_seconds=0.05, redis_backoff_max_seconds=0.2,
    )
    events: list[tuple[int, str]] = []

    def faulty() -> Iterator[tuple[str, str]]:
        assert redis_server.proc is not None
        for n, item in enumerate(items):
            action = {
                400: "stop", 900: "start", 1400: "flushall", 1900: "freeze", 2300: "thaw",
                2800: "restart", 3300: "flushall",
            }.get(n)
            if action == "stop":
                redis_server.stop()
            elif action == "start":
                redis_server.start()
            elif action == "flushall":
                redis.Redis.from_url(redis_server.url).flushall()
            elif action == "freeze":
                redis_server.proc.send_signal(signal.SIGSTOP)  # a hung Redis: timeouts
            elif action == "thaw":
                redis_server.proc.send_signal(signal.SIGCONT)
            elif action == "restart":
                redis_server.restart()
            if action:
                events.append((n, action))
            yield item

    t0 = time.perf_counter()
    with running_server(s) as (server, port), ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
        results = list(c.annotate_stream(faulty(), window=64))
        seconds = time.perf_counter() - t0
        errors = server.metrics.value("conceptsvc_redis_errors_total")
        hits = server.metrics.value(
            "conceptsvc_cache_lookups_total", {"tier": "redis", "result": "hit"}
        )
    failed = [r for r in results if not r.ok]
    report("redis faults", items=len(results), failed=len(failed), redis_errors=errors,
           redis_hits=hits, events=len(events), seconds=round(seconds, 1))
    assert [e for _, e in events] == [
        "stop", "start", "flushall", "freeze", "thaw", "restart", "flushall"
    ]
    assert failed == []
    assert [r.id for r in results] == [i for i, _ in items]
    assert [r.annotation for r in results] == expected
    assert errors >= 2  # the stop and the freeze were both noticed
    assert hits > 0  # and Redis did serve results in between


# -- subprocess helpers ---------------------------------------------------------------------------
def _stop(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return err


def _write_csv(path: Path, texts: list[str]) -> list[str]:
    ids = [f"ROCOv2_2023_test_{i:06d}" for i in range(len(texts))]
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "Caption"])
        w.writerows(zip(ids, texts, strict=True))
    return ids


_FORMATS = ["jsonl", "csv", "submission", "roco"]


def _annotate_cmd(corpus: Path, out: Path, targets: list[int], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "conceptsvc.cli", "annotate", str(corpus), "--out", str(out),
           "--quiet", *extra, "--format", "jsonl"]  # the first format goes to --out
    for fmt in _FORMATS[1:]:
        cmd += ["--format", f"{fmt}={out}.{fmt}"]
    for port in targets:
        cmd += ["--target", f"127.0.0.1:{port}"]
    return cmd


def _outputs(out: Path) -> dict[str, bytes]:
    files = {"jsonl": out, **{fmt: Path(f"{out}.{fmt}") for fmt in _FORMATS[1:]}}
    return {fmt: p.read_bytes() for fmt, p in files.items()}


def _jsonl_ids(data: bytes) -> list[str]:
    return [json.loads(line)["id"] for line in data.decode("utf-8").splitlines()]


_RUN_HISTORY = ("timing", "started_at", "finished_at", "runs")


def _manifest_without_history(out: Path) -> dict[str, Any]:
    m = json.loads(Path(f"{out}.manifest.json").read_text(encoding="utf-8"))
    for key in _RUN_HISTORY:
        m.pop(key, None)
    # How often the run was interrupted, not what it produced:
    for key in ("resumed", "retried_batches"):
        m["counts"].pop(key, None)
    m["service"].pop("targets", None)
    m.pop("settings", None)
    for o in m["outputs"]:
        o["path"] = Path(o["path"]).name
    return dict(m)


def _journal_lines(out: Path) -> int:
    total = 0
    for part in out.parent.glob(f"{out.name}.*.part"):
        journal = part / "journal.jsonl"
        if journal.is_file():
            total += journal.read_bytes().count(b"\n")
    return total


@dataclass
class Reference:
    corpus: Path
    ids: list[str]
    out: Path
    outputs: dict[str, bytes]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, index_a: Path) -> Reference:
    """A 3,000-caption corpus and the outputs of one undisturbed `conceptsvc annotate` run."""
    tmp = tmp_path_factory.mktemp("reference")
    corpus = tmp / "corpus.csv"
    ids = _write_csv(corpus, corpus_texts(3000, seed=5))
    out = tmp / "out" / "out.jsonl"
    out.parent.mkdir()
    with running_server(settings_for(index_a, cache_size=0)) as (_s, port):
        done = subprocess.run(_annotate_cmd(corpus, out, [port]), capture_output=True,
                              text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return Reference(corpus, ids, out, _outputs(out))


# -- the batch client killed ----------------------------------------------------------------------
def test_reliability_faults_batch_client_killed_at_random_points_resumes_exactly(
    tmp_path: Path, index_a: Path, reference: Reference
) -> None:
    ids = reference.ids
    rnd = random.Random(20261128)
    with running_server(settings_for(index_a, cache_size=0, threads=8)) as (_s, port):
        out = tmp_path / "killed" / "out.jsonl"
        out.parent.mkdir()
        cmd = _annotate_cmd(reference.corpus, out, [port], "--concurrency", "2",
                            "--batch-size", "16")
        kills: list[str] = []
        runs = 0
        while True:
            runs += 1
            assert runs < 40, f"no progress after {runs} runs; kills: {kills}"
            log = (tmp_path / f"run-{runs}.log").open("w")
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
            log.close()
            if len(kills) < 6:
                # Alternate kill points: a random moment (early ones land in the scan or the
                # journal set-up), or once the journal has grown by a random number of lines.
                before = _journal_lines(out)
                if len(kills) % 2 == 0:
                    delay = rnd.uniform(0.3, 4.0)
                    grow, point = 300, f"t+{delay:.2f}s"
                else:
                    delay = 60.0
                    grow = rnd.randint(10, 300)
                    point = f"+{grow} lines"
                # Never more than 300 results between kills, however fast this machine is, so
                # that six kills always fit in the 3,000 captions.
                deadline = time.monotonic() + delay
                while (_journal_lines(out) < before + grow and proc.poll() is None
                       and time.monotonic() < deadline):
                    time.sleep(0.005)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(30)
                    kills.append(f"{point} (journal {before}->{_journal_lines(out)})")
                    continue
            proc.wait(300)
            if proc.returncode == 0:
                break
            pytest.fail(f"annotate exited with {proc.returncode}: "
                        f"{(tmp_path / f'run-{runs}.log').read_text()}")
    got = _outputs(out)
    report("batch client SIGKILL", kills=len(kills), runs=runs, captions=len(ids),
           points="; ".join(kills))
    assert len(kills) >= 5
    assert _jsonl_ids(got["jsonl"]) == ids  # every id exactly once, in input order
    assert got == reference.outputs  # byte-identical, every format
    assert _manifest_without_history(out) == _manifest_without_history(reference.out)
    assert not list(out.parent.glob("*.part"))  # the work directory is gone


# -- a replica killed -----------------------------------------------------------------------------
def test_reliability_faults_replica_killed_during_a_batch_run(
    tmp_path: Path, index_a: Path, reference: Reference
) -> None:
    ids = reference.ids
    a, port_a = serve_subprocess("--workers", "1", "--index", str(index_a), "--cache-size", "0")
    b, port_b = serve_subprocess("--workers", "1", "--index", str(index_a), "--cache-size", "0")
    try:
        out = tmp_path / "run" / "out.jsonl"
        out.parent.mkdir()
        cmd = _annotate_cmd(reference.corpus, out, [port_a, port_b], "--concurrency", "4",
                            "--batch-size", "32", "--retries", "8")
        t0 = time.perf_counter()
        log = (tmp_path / "annotate.log").open("w")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        log.close()
        deadline = time.monotonic() + 60
        while _journal_lines(out) < 300 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        at = _journal_lines(out)
        assert proc.poll() is None, "the run finished before the replica could be killed"
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        proc.wait(300)
        err = (tmp_path / "annotate.log").read_text()
        seconds = time.perf_counter() - t0
    finally:
        for p in (a, b):
            _stop(p)
    got = _outputs(out)
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    report("replica killed", captions=len(ids), killed_at_journal_lines=at,
           counts=manifest["counts"], seconds=round(seconds, 1),
           exit=proc.returncode)
    assert proc.returncode == 0, err
    assert _jsonl_ids(got["jsonl"]) == ids
    assert got == reference.outputs
    assert manifest["complete"] is True and manifest["counts"]["failed"] == 0


# -- reload under load ----------------------------------------------------------------------------
class Load:
    """Clients hammering a server from threads; every failure is kept."""

    def __init__(self, port: int, n_stream: int, n_unary: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.ok = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._stream, args=(i,)) for i in range(n_stream)]
        self.threads += [threading.Thread(target=self._unary, args=(i,)) for i in range(n_unary)]

    def _count(self, n: int = 1) -> None:
        with self.lock:
            self.ok += n

    def _stream(self, k: int) -> None:
        texts = corpus_texts(200, seed=100 + k)
        with ConceptClient(f"127.0.0.1:{self.port}", retries=0) as c:
            while not self.stop.is_set():
                try:
                    for r in c.annotate_stream((f"{k}-{i}", t) for i, t in enumerate(texts)):
                        if r.ok:
                            self._count()
                        else:
                            self.errors.append(f"item {r.id}: {r.error}")
                except Exception as exc:
                    self.errors.append(f"stream: {exc}")

    def _unary(self, k: int) -> None:
        with ConceptClient(f"127.0.0.1:{self.port}", retries=0) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    c.annotate(f"{i}: chest CT shows edema and pneumothorax", id=str(i))
                    self._count()
                except Exception as exc:
                    self.errors.append(f"unary: {exc}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def _wait_for(pred: Any, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_reliability_faults_reload_under_load_on_two_workers(tmp_path: Path) -> None:
    path = build_index_a(tmp_path / "live")
    proc, port = serve_subprocess("--workers", "2", "--index", str(path), "--admin-token", ADMIN)
    probes = [ConceptClient(f"127.0.0.1:{port}") for _ in range(6)]  # connections to both

    def everyone_sees(concepts: tuple[str, ...]) -> bool:
        return all(c.annotate("edema").concepts == concepts for c in probes)

    reloads = 0
    try:
        with Load(port, n_stream=3, n_unary=2) as load:
            time.sleep(1.0)
            for cycle in range(2):
                build_index_b(path)  # a new dictionary deployed in place
                proc.send_signal(signal.SIGHUP)
                assert _wait_for(lambda: everyone_sees(("C0013604",))), f"SIGHUP {cycle}"
                reloads += 1
                build_index_a(path)
                with ConceptClient(f"127.0.0.1:{port}", admin_token=ADMIN) as admin:
                    assert admin.reload_index().changed
                assert _wait_for(lambda: everyone_sees(())), f"admin reload {cycle}"
                reloads += 1
            time.sleep(0.5)
        report("reload under load", reloads=reloads, ok_requests=load.ok,
               failed=len(load.errors))
        assert load.errors == []
        assert load.ok > 500
    finally:
        for c in probes:
            c.close()
        err = _stop(proc)
    assert proc.returncode == 0, err


# -- SIGTERM under load ---------------------------------------------------------------------------
@pytest.mark.slow
def test_reliability_faults_sigterm_under_load_drains_in_flight_and_refuses_new(
    index_a: Path,
) -> None:
    """In flight = the handler is running. A request whose bytes are still arriving, or that
    waits for a thread, when SIGTERM comes is refused with UNAVAILABLE like a new one (clients
    retry UNAVAILABLE); so the slow requests here (300 KB, 0.3–1 s of engine time each) go
    out on connections that are already up, and SIGTERM waits until the server's metrics count
    every one of them in a handler. The server runs the pure-Python reference engine
    (CONCEPTSVC_PURE_PYTHON=1): the compiled one finishes 300 KB before SIGTERM comes, and
    what is tested here is the drain, not the engine."""
    grace = 20.0
    metrics_port = free_port()
    proc, port = serve_subprocess(
        "--workers", "2", "--index", str(index_a), "--grace-seconds", str(grace),
        "--cache-size", "0", "--max-text-chars", "400000",
        "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
        env={"CONCEPTSVC_PURE_PYTHON": "1"},
    )
    slow_text = " ".join(CAPTIONS[i % len(CAPTIONS)][1] for i in range(7000))[:300_000]
    options = ExtractOptions(include_mentions=False)
    n = 6
    clients = [ConceptClient(f"127.0.0.1:{port}", retries=0, timeout=60) for _ in range(n)]
    results: dict[int, Any] = {}
    finished_at: dict[int, float] = {}

    def in_flight(k: int) -> None:
        try:
            results[k] = clients[k].annotate(slow_text, id=f"slow-{k}", options=options)
        except ServiceCallError as exc:
            results[k] = exc
        finished_at[k] = time.monotonic()

    try:
        for c in clients:  # connections up before the test starts
            assert c.annotate("lung", id="warm").concepts == ("C0024109",)
        threads = [threading.Thread(target=in_flight, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        # SIGTERM once every slow request is in its handler (or already answered): one still
        # on its way would rightly be refused, and no fixed sleep is long enough on a loaded
        # machine to be sure it is not.
        waited = time.monotonic() + 60
        while metric(metrics_port, "conceptsvc_inflight_requests") + len(finished_at) < n:
            assert time.monotonic() < waited, "the slow requests never all reached a handler"
            time.sleep(0.02)
        sigterm = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = []
        for attempt in range(5):
            for c in (clients[0], ConceptClient(f"127.0.0.1:{port}", retries=0, timeout=5)):
                try:
                    c.annotate("lung", id=f"new-{attempt}")
                    refused.append("OK")
                except ServiceCallError as exc:
                    refused.append(exc.status)
            time.sleep(0.1)
        for t in threads:
            t.join(grace + 30)
        try:
            proc.wait(grace + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the server did not exit after SIGTERM")
        exited = time.monotonic() - sigterm
    finally:
        for c in clients:
            c.close()
        err = _stop(proc)
    after = sorted(round(t - sigterm, 2) for t in finished_at.values())
    report("SIGTERM under load", in_flight=n,
           in_flight_ok=sum(not isinstance(r, Exception) for r in results.values()),
           finished_after_sigterm=sum(t > 0 for t in after), finish_times_s=after,
           new_refused=f"{refused.count('UNAVAILABLE')}/{len(refused)} UNAVAILABLE",
           exited_s=round(exited, 2), grace_s=grace)
    # every in-flight request came back (a thread that hung or died records nothing), whole
    # and right: the same annotation the engine gives in this process
    assert not any(t.is_alive() for t in threads)
    assert sorted(results) == sorted(finished_at) == list(range(n)), results
    assert all(not isinstance(r, Exception) for r in results.values()), results
    want = Extractor(ConceptIndex.load(index_a)).extract(slow_text, options)
    assert want.concepts
    assert all(r == replace(want, id=f"slow-{k}") for k, r in results.items())
    assert sum(t > 0 for t in after) >= n // 2, "most slow requests should still be running"
    assert after[-1] < grace
    assert refused == ["UNAVAILABLE"] * len(refused)
    assert proc.returncode == 0, err
    assert exited < grace + 5
