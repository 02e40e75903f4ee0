"""Service benchmark: captions through the real gRPC service, against QuickUMLS in-process.

``python -m benchmarks.bench service --captions PATH``. Part of ``make bench``, never of
``make test``. (``python -m benchmarks.bench_service ...`` runs it too, but its own clients then
start gRPC on its default socket layer: the dispatcher picks the layer before gRPC starts.)

What it measures, on the captions CSV given by path (``ID,Caption``; the ROCOv2 validation
captions are ``../shared/data/rocov2/valid_captions.csv``), all in one run so that every figure
shares the machine's state:

0. **The engine in-process** (one thread, :func:`benchmarks.bench_capacity.bench_engine`): the
   speed the service approaches, and its CPU per caption.
1. **Throughput of the two data paths** — ``conceptsvc serve`` as a subprocess with
   ``--workers`` processes and a private Redis; the captions split over ``--streams``
   concurrent clients, each on its own connection (connections are what SO_REUSEPORT spreads
   over the workers), either as ``AnnotateBatch`` messages of ``--batch-size`` captions (the
   batched path) or one ``AnnotateStream`` item per caption (the path older clients use):

   - *cold*: empty Redis, empty in-process caches — every caption goes through the engine;
   - *warm (memory + Redis)*: the same captions again on the same server;
   - *warm (Redis only)*: after restarting the server (empty in-process caches), again.

   Each pass also records the CPU seconds of the server's processes and of this client process
   per caption (what holds on a shared machine, where wall-clock rates do not).
1a. **``conceptsvc annotate``**, the whole command, on the captions file against a server with
   cold caches (``--annotate``), and on a corpus of ``--corpus-size`` captions (the captions
   repeated with new ids), once straight through and once killed with SIGKILL half-way and
   resumed, whose outputs must be byte-identical.
1b. **Stage shares** (``--profile``): the cold ``annotate`` run again, server and client each
   under ``py-spy record``; where their samples fall (engine, wire conversion, cache, gRPC and
   the rest; journal, outputs, start-up).

1c. **The server/engine CPU ratio** (issue 15's "≤ 2×"), ``--ratio-rounds`` times (default
   3), alternating a fresh in-process engine pass with a cold ``AnnotateBatch`` pass on a fresh
   server (empty Redis): the ratio of the two medians. One pass of each reads CPU in 10 ms ticks
   over a fraction of a second and follows the VM's drift, so one pair is not a figure.

2. **Unary latency** — p50/p99 of ``Annotate`` with 1 and 16 concurrent clients, each a
   thread with its own connection, caches off (every call runs the engine), in a client process
   of its own (:mod:`benchmarks.latency_client`): one client on gRPC's poller layer (as the
   ``conceptsvc`` command runs its clients, :mod:`conceptsvc.grpc_io`) and on gRPC's default
   layer, alternated over 4 rounds (ABBA), then 16 clients on the poller layer. The p50 is
   of all the rounds' calls; each round's p50 is given beside it.
3. **Server RSS** — resident memory of the server's processes (supervisor + workers), current
   and peak, after the runs.
4. **QuickUMLS in-process** on the same dictionary (the demo META by default) and captions,
   through :func:`benchmarks.bench_peers.quickumls_baseline` in ``.venv-peers``.

The client runs in this process on the same 2-core machine as the server, so the service's
numbers are end to end and pay for the client's CPU too. Results go to ``--out`` as JSON and,
with ``--append``, to BENCHMARKS.md under "Service throughput and latency".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import BENCH_OUT, CHECKOUT, ROCOV2
from benchmarks.bench_capacity import annotate_pass, bench_engine, tree_cpu_seconds
from benchmarks.bench_extract import _py_spy as py_spy_path
from benchmarks.processes import free_port, process_tree, tree_memory_kb
from conceptsvc.client import ConceptClient
from conceptsvc.embedded import DEMO_META
from conceptsvc.errors import ConfigError
from conceptsvc.grpc_io import POLLER_IO
from conceptsvc.server.launcher import spawn_server

__all__ = ["Server", "main", "run", "service_pass"]

log = logging.getLogger(__name__)

# The shared data sits beside the checkout (../shared); always overridable with --captions.
DEFAULT_CAPTIONS = ROCOV2 / "valid_captions.csv"
DEFAULT_META = DEMO_META
SECTION = "## Service throughput and latency"


@dataclass
class _Redis:
    proc: subprocess.Popen[bytes]
    url: str
    workdir: tempfile.TemporaryDirectory[str]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.workdir.cleanup()


def _start_redis() -> _Redis | None:
    binary = shutil.which("redis-server")
    if binary is None:
        log.warning("redis-server not found: the Redis measurements are skipped")
        return None
    port = free_port()
    workdir = tempfile.TemporaryDirectory(prefix="bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir.name],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return _Redis(proc, f"redis://127.0.0.1:{port}/0", workdir)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise ConfigError(f"redis-server did not start on port {port}")


CACHE_SECRET = secrets.token_urlsafe(32)


class Server:
    """``conceptsvc serve`` in a subprocess."""

    def __init__(self, args: Sequence[str], prefix: Sequence[str] = ()) -> None:
        # The Redis tier needs a cache secret, the same for every server of the run: the
        # warm passes read what an earlier server wrote.
        self.proc, port = spawn_server(
            args, cwd=CHECKOUT, prefix=prefix, env={"CONCEPTSVC_CACHE_SECRET": CACHE_SECRET}
        )
        self.target = f"127.0.0.1:{port}"
        self.profiled = bool(prefix)

    def rss_mb(self) -> dict[str, float]:
        """Summed over the server's processes: RSS now, each one's peak RSS, and PSS (the
        workers' shared pages counted once)."""
        mem = tree_memory_kb(self.proc.pid)
        return {"rss_mb": round(mem["rss"] / 1024, 1), "peak_rss_mb": round(mem["hwm"] / 1024, 1),
                "pss_mb": round(mem["pss"] / 1024, 1)}

    def stop(self) -> None:
        if self.profiled:  # the service is the profiler's child: it ends, the profiler writes
            for pid in process_tree(self.proc.pid)[1:2]:
                os.kill(pid, signal.SIGTERM)
            self.proc.communicate(timeout=120)
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=10)


def service_pass(
    server: Server, captions: Sequence[tuple[str, str]], streams: int, batch_size: int = 0
) -> dict[str, Any]:
    """All captions over ``streams`` concurrent clients: as AnnotateBatch messages of
    ``batch_size`` captions, or (0) on AnnotateStream. Captions/s, how many were cached, and
    the CPU seconds per caption of the server's processes and of this (client) process."""
    shards = [captions[k::streams] for k in range(streams)]
    counts = [[0, 0, 0] for _ in shards]  # ok, errors, cached
    failures: list[BaseException] = []

    def run(k: int) -> None:
        try:
            with ConceptClient(server.target, timeout=None) as c:
                if batch_size:
                    shard = shards[k]
                    results: Any = (
                        r for i in range(0, len(shard), batch_size)
                        for r in c.annotate_batch(shard[i:i + batch_size], timeout=600)
                    )
                else:
                    results = c.annotate_stream(shards[k], window=512)
                for r in results:
                    counts[k][0 if r.ok else 1] += 1
                    counts[k][2] += r.cached
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(streams)]
    server_cpu0, client_cpu0 = tree_cpu_seconds(server.proc.pid), time.process_time()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    server_cpu = tree_cpu_seconds(server.proc.pid) - server_cpu0
    client_cpu = time.process_time() - client_cpu0
    if failures:
        raise failures[0]
    ok, errors, cached = (sum(c[i] for c in counts) for i in range(3))
    n = len(captions)
    return {
        "path": f"AnnotateBatch x {batch_size}" if batch_size else "AnnotateStream",
        "captions": n,
        "seconds": round(seconds, 3),
        "captions_per_s": round(n / seconds, 1),
        "ok": ok,
        "errors": errors,
        "cached": cached,
        "server_cpu_us_per_caption": round(1e6 * server_cpu / n, 1),
        "client_cpu_us_per_caption": round(1e6 * client_cpu / n, 1),
    }


# The measuring client's gRPC socket layer (conceptsvc.grpc_io): the poller layer, as the
# `conceptsvc` command runs its clients, and gRPC's default, as a program that left
# GRPC_EXPERIMENTS unset gets it (an empty value is gRPC's defaults).
CLIENT_LAYERS = {"poller": POLLER_IO, "default": ""}


def _latency(
    target: str, texts_file: Path, clients: int, per_client: int, layers: Sequence[str],
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """Unary Annotate latency with ``clients`` concurrent callers in a client process of its
    own, for each of ``layers`` (keys of :data:`CLIENT_LAYERS`) over ``rounds`` rounds of
    ``per_client`` calls a client, the layers' order reversed every other round (ABBA): the
    percentiles of all rounds' calls, and each round's p50 and their median."""
    calls: dict[str, list[float]] = {name: [] for name in layers}
    walls: dict[str, float] = {name: 0.0 for name in layers}
    round_p50: dict[str, list[float]] = {name: [] for name in layers}
    for r in range(rounds):
        for name in (layers if r % 2 == 0 else tuple(reversed(layers))):
            want = CLIENT_LAYERS[name]
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.latency_client", target,
                     "--clients", str(clients), "--requests", str(per_client),
                     "--texts", str(texts_file)],
                    env={**os.environ, "GRPC_EXPERIMENTS": want},
                    cwd=CHECKOUT, capture_output=True, text=True, check=False, timeout=600,
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError("the latency client did not finish in 600 s") from None
            if proc.returncode:
                raise RuntimeError(f"the latency client failed: {proc.stderr.strip()[-2000:]}")
            data = json.loads(proc.stdout)
            if data["grpc_experiments"] != want:
                raise RuntimeError(f"the latency client ran with GRPC_EXPERIMENTS="
                                   f"{data['grpc_experiments']!r}, not {want!r}")
            flat = [x for per in data["samples"] for x in per]
            calls[name] += flat
            walls[name] += data["wall_s"]
            round_p50[name].append(round(statistics.median(flat) * 1000, 3))
    out = {}
    for name in layers:
        q = statistics.quantiles(sorted(calls[name]), n=100, method="inclusive")
        out[name] = {
            "clients": clients,
            "client_layer": name,
            "requests": len(calls[name]),
            "p50_ms": round(q[49] * 1000, 2),
            "p99_ms": round(q[98] * 1000, 2),
            "mean_ms": round(statistics.fmean(calls[name]) * 1000, 2),
            "requests_per_s": round(len(calls[name]) / walls[name], 1),
            "round_p50_ms": round_p50[name],
            "round_p50_median_ms": round(statistics.median(round_p50[name]), 2),
        }
    return out


def _read_captions(path: Path, limit: int | None) -> list[tuple[str, str]]:
    from conceptsvc.evaluation import read_captions

    captions = read_captions(path)
    if not captions:
        raise ConfigError(f"{path} holds no captions (expected an ID,Caption CSV)")
    return captions[:limit] if limit else captions


def _flush(redis: _Redis | None) -> None:
    if redis is not None:
        import redis as redis_py

        with redis_py.Redis.from_url(redis.url) as r:
            r.flushall()


def _cache_args(base: list[str], redis: _Redis | None) -> list[str]:
    """The server's arguments for the cache passes: Redis behind the in-process LRU when there
    is a Redis, else no cache at all (every pass then runs the engine)."""
    return [*base, "--redis-url", redis.url] if redis is not None else [*base, "--cache-size", "0"]


def _paths(
    summary: dict[str, Any], base: list[str], redis: _Redis | None,
    captions: Sequence[tuple[str, str]], streams: int, batch_size: int,
) -> None:
    """Cold, warm (memory + Redis) and warm (Redis only) passes of both data paths."""
    args = _cache_args(base, redis)
    for name, size in (("batch", batch_size), ("stream", 0)):
        _flush(redis)
        server = Server(args)
        try:
            summary[f"{name}_cold"] = service_pass(server, captions, streams, size)
            log.info("%s cold: %s", name, summary[f"{name}_cold"])
            if redis is not None:
                summary[f"{name}_warm_memory_redis"] = service_pass(server, captions, streams, size)
            summary[f"rss_after_{name}"] = server.rss_mb()
        finally:
            server.stop()
        if redis is None:
            continue
        server = Server(args)  # fresh in-process caches, Redis still warm
        try:
            summary[f"{name}_warm_redis"] = service_pass(server, captions, streams, size)
            log.info("%s warm (Redis only): %s", name, summary[f"{name}_warm_redis"])
        finally:
            server.stop()


def ratio_of_medians(engine_us: Sequence[float], server_us: Sequence[float]) -> dict[str, Any]:
    """Server CPU a caption over the engine's, as the medians of alternated rounds."""
    if not engine_us or len(engine_us) != len(server_us):
        raise ValueError("one engine figure and one server figure a round")
    e, v = statistics.median(engine_us), statistics.median(server_us)
    return {
        "rounds": len(engine_us),
        "engine_cpu_us_per_caption": [round(x, 1) for x in engine_us],
        "server_cpu_us_per_caption": [round(x, 1) for x in server_us],
        "engine_median": round(e, 1),
        "server_median": round(v, 1),
        "ratio": round(v / e, 2),
    }


def _cpu_ratios(summary: dict[str, Any]) -> None:
    """The target's figure: the alternated rounds' ratio when they ran, else the single passes'
    (both are kept)."""
    single = round(
        summary["batch_cold"]["server_cpu_us_per_caption"]
        / summary["engine_in_process"]["cpu_us_per_caption"], 2
    )
    summary["server_cpu_vs_engine_single_pass"] = single
    rounds = summary.get("ratio_rounds")
    summary["server_cpu_vs_engine_cold"] = rounds["ratio"] if rounds else single


def _ratio_rounds(
    index: Path, base: list[str], redis: _Redis | None, captions: Sequence[tuple[str, str]],
    streams: int, batch_size: int, rounds: int,
) -> dict[str, Any]:
    """Alternate a fresh engine's pass and a fresh server's cold batched pass, ``rounds`` times."""
    args = _cache_args(base, redis)
    engine_us: list[float] = []
    server_us: list[float] = []
    for _ in range(rounds):
        e = bench_engine(index, captions)
        engine_us.append(1e6 * e["server_cpu_s"] / len(captions))
        _flush(redis)
        server = Server(args)
        try:
            server_us.append(service_pass(server, captions, streams, batch_size)
                             ["server_cpu_us_per_caption"])
        finally:
            server.stop()
    return ratio_of_medians(engine_us, server_us)


def _write_corpus(path: Path, captions: Sequence[tuple[str, str]], size: int) -> Path:
    """``size`` captions: ``captions`` over and over, each copy with new ids."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ID", "Caption"])
        for i in range(size):
            rid, text = captions[i % len(captions)]
            w.writerow([f"{rid}-{i // len(captions)}", text])
    return path


def _sha256(path: Path) -> str:
    import hashlib

    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _killed_and_resumed(target: str, corpus: Path, out: Path, kill_at_bytes: int) -> dict[str, Any]:
    """``annotate`` killed with SIGKILL once its journal holds ``kill_at_bytes``, then run
    again to the end."""
    cmd = [sys.executable, "-m", "conceptsvc.cli", "annotate", str(corpus), "--out", str(out),
           "--quiet", "--target", target]
    child = subprocess.Popen(cmd, cwd=CHECKOUT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    journaled = 0
    while child.poll() is None:
        journals = out.parent.glob(f"{out.name}.*.part/journal.jsonl")
        journaled = sum(j.stat().st_size for j in journals)
        if journaled >= kill_at_bytes:
            child.kill()
            break
        time.sleep(0.05)
    child.wait()
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=CHECKOUT, check=True, timeout=7200)
    seconds = round(time.perf_counter() - t0, 2)
    return {"killed_at_journal_bytes": journaled, "resume_seconds": seconds}


def _annotate_runs(
    summary: dict[str, Any], base: list[str], redis: _Redis | None, captions_path: Path,
    captions: Sequence[tuple[str, str]], corpus_size: int, work: Path,
) -> None:
    """``conceptsvc annotate`` whole: on the captions with cold server caches, and on a corpus
    of ``corpus_size`` captions straight through and killed half-way and resumed."""
    args = [*base, "--redis-url", redis.url] if redis is not None else base
    _flush(redis)
    server = Server(args)
    try:
        row = annotate_pass([(server.proc, server.target)], captions_path, len(captions),
                            "annotate, cold server caches", extra=())
        summary["annotate_cold"] = _annotate_row(row)
    finally:
        server.stop()
    if not corpus_size:
        return
    corpus = _write_corpus(work / "corpus.csv", captions, corpus_size)
    _flush(redis)
    server = Server(args)
    try:
        straight = work / "straight" / "out.jsonl"
        straight.parent.mkdir()
        row = annotate_pass([(server.proc, server.target)], corpus, corpus_size,
                            "annotate, corpus", extra=(), out=straight)
        resumed = work / "resumed" / "out.jsonl"
        resumed.parent.mkdir()
        kill = _killed_and_resumed(server.target, corpus, resumed, straight.stat().st_size // 2)
        summary["corpus"] = {
            **_annotate_row(row), **kill,
            "byte_identical": _sha256(straight) == _sha256(resumed),
            "output_bytes": straight.stat().st_size,
        }
    finally:
        server.stop()


def _annotate_row(row: dict[str, Any]) -> dict[str, Any]:
    n = row["captions"]
    return {
        "captions": n,
        "seconds": round(row["wall_s"], 3),
        "captions_per_s": round(n / row["wall_s"], 1),
        "server_cpu_us_per_caption": round(1e6 * row["server_cpu_s"] / n, 1),
        "client_cpu_us_per_caption": round(1e6 * row["client_cpu_s"] / n, 1),
    }


# Where a profile sample goes: the innermost frame of one of these files decides its stage.
_SERVER_STAGES = {
    "extractor.py": "engine", "_speedups.pyx": "engine", "matcher.py": "engine",
    "normalize.py": "engine", "negation.py": "engine", "abbreviations.py": "engine",
    "profile.py": "engine", "index.py": "engine", "approximate.py": "engine",
    "wire.py": "wire (results to bytes)", "_wire.pyx": "wire (results to bytes)",
    "cache.py": "cache (keys, LRU, Redis)", "redis": "cache (keys, LRU, Redis)",
    "servicer.py": "servicer (batching, limits)", "admission.py": "servicer (batching, limits)",
    "auth.py": "servicer (batching, limits)", "metrics.py": "metrics",
    "prometheus_client": "metrics", "grpc": "gRPC (its Python side)",
    "google": "protobuf (parsing requests)",
}
_CLIENT_STAGES = {
    "journal.py": "journal", "outputs.py": "outputs", "parquet.py": "outputs",
    "corpus.py": "reading the corpus", "wire.py": "wire (messages)",
    "service.py": "wire (messages)", "progress.py": "progress",
    "batch.py": "batch runner", "grpc": "gRPC", "asyncio": "gRPC",
    "google": "wire (messages)", "argparse.py": "start-up (imports, arguments)",
}
_STARTUP = "start-up (imports, arguments)"
# Innermost functions of threads and processes that wait in a call py-spy samples as running
# (the worker's main thread, idle pool threads, the supervisor): not CPU, left out. An idle
# RPC thread waits in RpcThreadPool._run itself (its lock's acquire is not a Python frame).
_WAITING = frozenset({"run_worker", "_worker", "wait", "select", "_read_events", "_wait_ready",
                      "_loop", "acquire", "get", "RpcThreadPool._run"})


def _stage_shares(raw: Path, stages: dict[str, str]) -> dict[str, float]:
    """Share of ``py-spy --format raw`` samples per stage (the innermost frame that names one
    of ``stages``' files or packages; any sample inside an import is start-up; samples of
    threads waiting in a call are left out); the rest is "other" (the interpreter, gRPC's
    core)."""
    totals: dict[str, int] = {}
    with raw.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            stage = "other"
            frames = stack.split(";")
            if any("<frozen importlib" in f for f in frames):
                totals[_STARTUP] = totals.get(_STARTUP, 0) + int(count)
                continue
            innermost = frames[-1].partition(" (")[0]
            if innermost in _WAITING:
                continue
            if all(f.startswith("process ") or " (" not in f for f in frames):
                stage = "native, no Python frame (gRPC core threads)"
                totals[stage] = totals.get(stage, 0) + int(count)
                continue
            for frame in reversed(frames):
                where = frame.rpartition(" (")[2].rstrip(")").rsplit(":", 1)[0]
                parts = Path(where).parts
                hit = stages.get(Path(where).name) or next(
                    (stages[p] for p in parts if p in stages), None
                )
                if hit is not None:
                    stage = hit
                    break
            totals[stage] = totals.get(stage, 0) + int(count)
    n = sum(totals.values()) or 1
    return {k: round(v / n, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _profile(base: list[str], captions_path: Path, work: Path) -> dict[str, Any]:
    """The cold ``annotate`` run with the server's workers and the client under py-spy."""
    py_spy = py_spy_path()
    if py_spy is None:
        return {"error": "py-spy not found (it comes with the dev extra)"}
    server_raw, client_raw = work / "server.raw", work / "client.raw"
    record = [py_spy, "record", "--rate", "250", "--format", "raw"]
    server = Server([*base, "--cache-size", "0"],
                     prefix=[*record, "--subprocesses", "--output", str(server_raw), "--"])
    try:
        subprocess.run(
            [*record, "--output", str(client_raw), "--", sys.executable, "-m", "conceptsvc.cli",
             "annotate", str(captions_path), "--out", str(work / "profiled.jsonl"), "--quiet",
             "--target", server.target],
            cwd=CHECKOUT, check=True, capture_output=True, timeout=1800,
        )
    finally:
        server.stop()
    return {"server": _stage_shares(server_raw, _SERVER_STAGES),
            "client": _stage_shares(client_raw, _CLIENT_STAGES)}


def run(
    captions_path: Path,
    *,
    index: Path | None = None,
    meta: Path = DEFAULT_META,
    workers: int | None = None,
    streams: int = 4,
    batch_size: int = 512,
    latency_requests: int = 1600,
    limit: int | None = None,
    quickumls: bool = True,
    annotate: bool = True,
    corpus_size: int = 1_000_000,
    profile: bool = False,
    ratio_rounds: int = 3,
) -> dict[str, Any]:
    """Run every measurement; returns the summary (see the module docstring)."""
    captions = _read_captions(captions_path, limit)
    texts = [t for _, t in captions]
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    if index is None:
        from conceptsvc.embedded import demo_index_path

        index = demo_index_path()
    base = ["--index", str(index), "--workers", str(workers)]
    summary: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()})",
        "python": platform.python_version(),
        "captions_file": str(captions_path),
        "captions": len(captions),
        "index": str(index),
        "workers": workers,
        "streams": streams,
        "batch_size": batch_size,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    engine = bench_engine(index, captions)
    summary["engine_in_process"] = {
        "captions_per_s": round(len(captions) / engine["wall_s"], 1),
        "cpu_us_per_caption": round(1e6 * engine["server_cpu_s"] / len(captions), 1),
    }
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    redis = _start_redis()
    try:
        _paths(summary, base, redis, captions, streams, batch_size)
        if ratio_rounds:
            summary["ratio_rounds"] = _ratio_rounds(
                index, base, redis, captions, streams, batch_size, ratio_rounds
            )
        captions_file = captions_path
        with tempfile.TemporaryDirectory(prefix="bench-service-", dir=BENCH_OUT) as tmp:
            work = Path(tmp)
            if limit:  # the annotate runs read a file: the limited captions are written out
                captions_file = _write_corpus(work / "captions.csv", captions, len(captions))
            if annotate:
                _annotate_runs(summary, base, redis, captions_file, captions, corpus_size, work)
            if profile:
                summary["stage_shares"] = _profile(base, captions_file, work)
        server = Server([*base, "--cache-size", "0"])
        try:
            with tempfile.TemporaryDirectory(prefix="bench-latency-", dir=BENCH_OUT) as tmp:
                texts_file = Path(tmp) / "texts.json"
                texts_file.write_text(json.dumps(texts), encoding="utf-8")
                rounds = 4
                one = _latency(server.target, texts_file, 1, max(1, latency_requests // rounds),
                               ("poller", "default"), rounds)
                summary["unary_1_client"] = one["poller"]
                summary["unary_1_client_default_layer"] = one["default"]
                summary["unary_16_clients"] = _latency(
                    server.target, texts_file, 16, max(1, latency_requests // 16), ("poller",), 1
                )["poller"]
            summary["rss_after_latency"] = server.rss_mb()
        finally:
            server.stop()
    finally:
        if redis is not None:
            redis.stop()
    cold = summary["batch_cold"]
    _cpu_ratios(summary)
    if quickumls:
        try:
            from benchmarks.bench_peers import quickumls_baseline

            rate = quickumls_baseline(meta, captions)
            summary["quickumls_in_process"] = {"captions_per_s": round(rate, 1), "meta": str(meta)}
            summary["speedup_cold_vs_quickumls"] = round(cold["captions_per_s"] / rate, 1)
        except ConfigError as exc:
            summary["quickumls_in_process"] = {"error": str(exc).splitlines()[0]}
    summary["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return summary


# The issue-15 targets: (label, how to read it from the summary, bound, "min" or "max").
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("batched path, cold caches (captions/s)", "batch_cold.captions_per_s", 20_000, "min"),
    ("batched path, warm from Redis (captions/s)", "batch_warm_redis.captions_per_s", 30_000,
     "min"),
    ("`conceptsvc annotate`, whole command, cold (s)", "annotate_cold.seconds", 1.2, "max"),
    ("corpus end to end (captions/s)", "corpus.captions_per_s", 15_000, "min"),
    ("server CPU per caption, cold, vs the engine's", "server_cpu_vs_engine_cold", 2.0, "max"),
    ("unary Annotate p50 (ms)", "unary_1_client.p50_ms", 0.5, "max"),
)


def _get(s: dict[str, Any], path: str) -> Any:
    value: Any = s
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _ratio_note(s: dict[str, Any]) -> str:
    r = s.get("ratio_rounds")
    if not r:
        return "."
    return (
        f": medians of {r['rounds']} alternated rounds (a fresh engine's pass, then a fresh "
        f"server's cold batched pass), server {r['server_median']} µs a caption against the "
        f"engine's {r['engine_median']} (rounds: server {r['server_cpu_us_per_caption']}, "
        f"engine {r['engine_cpu_us_per_caption']}; the single passes in the table above give "
        f"{s.get('server_cpu_vs_engine_single_pass')}×)."
    )


def to_markdown(s: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for one run."""
    def row(label: str, key: str) -> str:
        r = s.get(key)
        if not r:
            return f"| {label} | not measured | | | | |"
        return (
            f"| {label} | {r['captions_per_s']:,.0f} | {r['seconds']:.2f} | "
            f"{r['server_cpu_us_per_caption']} | {r['client_cpu_us_per_caption']} | "
            f"{r.get('cached', 0):,} / {r['captions']:,} cached, {r.get('errors', 0)} errors |"
        )

    engine = s["engine_in_process"]
    q = s.get("quickumls_in_process", {})
    qline = (
        f"| QuickUMLS 1.4.2 in-process (same dictionary and captions) | "
        f"{q['captions_per_s']:,.0f} | | | | one process, one caption at a time |"
        if "captions_per_s" in q
        else f"| QuickUMLS in-process | not measured: {q.get('error', 'skipped')} | | | | |"
    )
    lines = [
        f"### Run of {s['date'][:10]} — {s['captions']:,} captions, {s['workers']} workers",
        "",
        f"Command: `{command}`  ",
        f"Machine: {s['machine']}, Python {s['python']}; the client runs on the same machine. "
        f"Index: `{Path(s['index']).name}`; {s['streams']} concurrent clients, one connection "
        f"each; batches of {s['batch_size']} captions.  ",
        f"Load average at the start: {s['load_average_at_start']}, at the end: "
        f"{s.get('load_average_at_end')} (other jobs on the same cores inflate every wall-clock "
        "figure here; the CPU columns hold better).",
        "",
        "| measurement | captions/s | seconds | server CPU µs/caption | client CPU µs/caption "
        "| notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        f"| engine in-process, one thread (the limit) | {engine['captions_per_s']:,.0f} | | "
        f"{engine['cpu_us_per_caption']} | | after 200 captions of warm-up |",
        row("AnnotateBatch, cold caches", "batch_cold"),
        row("AnnotateBatch, warm (in-process LRU + Redis)", "batch_warm_memory_redis"),
        row("AnnotateBatch, warm Redis only (server restarted)", "batch_warm_redis"),
        row("AnnotateStream, cold caches", "stream_cold"),
        row("AnnotateStream, warm (in-process LRU + Redis)", "stream_warm_memory_redis"),
        row("AnnotateStream, warm Redis only (server restarted)", "stream_warm_redis"),
        row("`conceptsvc annotate` (whole command), cold server caches", "annotate_cold"),
        qline,
    ]
    corpus = s.get("corpus")
    if corpus:
        lines += [
            "",
            f"Corpus of {corpus['captions']:,} captions (the captions repeated with new ids), "
            f"`conceptsvc annotate` whole: **{corpus['captions_per_s']:,.0f} captions/s** "
            f"({corpus['seconds']:.1f} s; server {corpus['server_cpu_us_per_caption']} µs, "
            f"client {corpus['client_cpu_us_per_caption']} µs CPU a caption). Killed with "
            f"SIGKILL at {corpus['killed_at_journal_bytes']:,} journal bytes and resumed "
            f"({corpus['resume_seconds']} s): output "
            + ("**byte-identical**" if corpus["byte_identical"] else "**DIFFERENT**")
            + f" ({corpus['output_bytes']:,} bytes).",
        ]
    lines += [
        "",
        f"Server CPU per caption on the cold batched path is **{s['server_cpu_vs_engine_cold']}×** "
        "the in-process engine's" + _ratio_note(s),
        "",
        "| unary Annotate, caches off (clients: threads of a client process of their own, one "
        "connection each) | p50 ms | p99 ms | requests/s | p50 of each round, ms (median) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for key, label in (
        ("unary_1_client", "1 client, gRPC's poller layer (as `conceptsvc` runs its clients)"),
        ("unary_1_client_default_layer",
         "1 client, gRPC's default layer (a program that left `GRPC_EXPERIMENTS` unset)"),
        ("unary_16_clients", "16 clients, poller layer"),
    ):
        r = s.get(key)
        if r:
            lines.append(
                f"| {label} | {r['p50_ms']} | {r['p99_ms']} | {r['requests_per_s']:,} | "
                f"{', '.join(str(x) for x in r.get('round_p50_ms', []))}"
                + (f" ({r['round_p50_median_ms']})" if "round_p50_median_ms" in r else "")
                + " |"
            )
    shares = s.get("stage_shares")
    if shares:
        lines += ["", "Stage shares of the cold `annotate` run (py-spy samples):"]
        if "error" in shares:
            lines.append(f"not measured: {shares['error']}")
        for side in ("server", "client"):
            if side in shares:
                startup = shares[side].get(_STARTUP, 0.0)
                rest = {k: v for k, v in shares[side].items() if k != _STARTUP}
                total = sum(rest.values()) or 1.0
                lines.append(
                    f"- {side}: start-up {100 * startup:.0f} % of the samples; the rest: "
                    + ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in rest.items())
                )
    lines += ["", "| target (issue 15) | bound | this run | |", "| --- | ---: | ---: | --- |"]
    for label, path, bound, how in TARGETS:
        value = _get(s, path)
        if value is None:
            lines.append(f"| {label} | {bound:,} | not measured | |")
            continue
        met = value >= bound if how == "min" else value <= bound
        lines.append(f"| {label} | {'≥' if how == 'min' else '≤'} {bound:,} | {value:,} | "
                     f"{'met' if met else '**missed**'} |")
    rss = s.get("rss_after_batch", {})
    if rss:
        lines += ["", f"Server RSS (supervisor + {s['workers']} workers) after the batched runs: "
                  f"{rss['rss_mb']} MB (peak {rss['peak_rss_mb']} MB)."]
    return "\n".join(lines) + "\n"


def append_to_benchmarks(markdown: str, path: Path) -> None:
    """Append a run under the service section (created at the end if missing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n"
        text += ("Produced by `python -m benchmarks.bench service` "
                 "(benchmarks/bench_service.py); newest run last.\n")
    head, _, tail = text.partition(SECTION)
    # Insert at the end of this section: before the next top-level "## " heading, if any.
    nxt = re.search(r"^## ", tail, flags=re.M)
    if nxt:
        body, rest = tail[: nxt.start()], tail[nxt.start():]
    else:
        body, rest = tail, ""
    body = body.rstrip("\n") + "\n\n" + markdown + ("\n" if rest else "")
    path.write_text(head + SECTION + body + rest, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench service", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS,
                        help="ID,Caption CSV (default: the ROCOv2 validation captions)")
    parser.add_argument("--index", type=Path, help="index to serve (default: the demo index)")
    parser.add_argument("--meta", type=Path, default=DEFAULT_META,
                        help="META directory of the same dictionary, for QuickUMLS")
    parser.add_argument("--workers", type=int, help="server worker processes (default: cores)")
    parser.add_argument("--streams", type=int, default=4,
                        help="concurrent clients (streams, or callers of AnnotateBatch)")
    parser.add_argument("--batch-size", type=int, default=512,
                        help="captions per AnnotateBatch message")
    parser.add_argument("--corpus-size", type=int, default=1_000_000,
                        help="captions of the corpus annotate run (0: skip it)")
    parser.add_argument("--no-annotate", action="store_true",
                        help="skip the `conceptsvc annotate` runs (and the corpus)")
    parser.add_argument("--profile", action="store_true",
                        help="stage shares: the cold annotate run under py-spy, both sides")
    parser.add_argument("--latency-requests", type=int, default=1600,
                        help="unary requests per latency measurement")
    parser.add_argument("--limit", type=int, help="only the first N captions (smoke runs)")
    parser.add_argument("--no-quickumls", action="store_true", help="skip the QuickUMLS run")
    parser.add_argument("--ratio-rounds", type=int, default=3,
                        help="alternated engine/cold-server rounds for the CPU ratio (0: the "
                        "single passes only)")
    parser.add_argument("--out", type=Path, default=BENCH_OUT / "service.json")
    parser.add_argument("--append", type=Path, metavar="BENCHMARKS.md",
                        help="append the results to this markdown file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.index is not None and args.meta == DEFAULT_META and not args.no_quickumls:
        raise SystemExit("with --index, give --meta with the same dictionary for QuickUMLS")
    summary = run(
        args.captions, index=args.index, meta=args.meta, workers=args.workers,
        streams=args.streams, batch_size=args.batch_size,
        latency_requests=args.latency_requests, limit=args.limit,
        quickumls=not args.no_quickumls, annotate=not args.no_annotate,
        corpus_size=args.corpus_size, profile=args.profile, ratio_rounds=args.ratio_rounds,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    command = "python -m benchmarks.bench service " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "service"
    )
    markdown = to_markdown(summary, command.strip())
    print(markdown)
    if args.append is not None:
        append_to_benchmarks(markdown, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
