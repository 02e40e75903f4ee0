"""Service benchmark: captions through the real gRPC service, against QuickUMLS in-process.

``python -m benchmarks.bench service --captions PATH`` (or ``python -m
benchmarks.bench_service ...``). Part of ``make bench``, never of ``make test``.

What it measures, on the captions CSV given by path (``ID,Caption``; the ROCOv2 validation
captions are ``../shared/data/rocov2/valid_captions.csv``):

1. **Streaming throughput** — ``conceptsvc serve`` as a subprocess with ``--workers`` processes
   and a private Redis; the captions split over ``--streams`` concurrent streams, each on its
   own connection (connections are what SO_REUSEPORT spreads over the workers):

   - *cold*: empty Redis, empty in-process caches — every caption goes through the engine;
   - *warm (memory + Redis)*: the same captions again on the same server;
   - *warm (Redis only)*: after restarting the server (empty in-process caches), again.

2. **Unary latency** — p50/p99 of ``Annotate`` with 1 and 16 concurrent clients, each a
   thread with its own connection, caches off (every call runs the engine).
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
from conceptsvc.client import ConceptClient
from conceptsvc.embedded import DEMO_META
from conceptsvc.errors import ConfigError
from conceptsvc.server.launcher import spawn_server

__all__ = ["main", "run"]

log = logging.getLogger(__name__)

# The shared data sits beside the checkout (../shared); always overridable with --captions.
DEFAULT_CAPTIONS = ROCOV2 / "valid_captions.csv"
DEFAULT_META = DEMO_META
SECTION = "## Service throughput and latency"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = _free_port()
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


class _Server:
    """``conceptsvc serve`` in a subprocess."""

    def __init__(self, args: Sequence[str]) -> None:
        self.proc, port = spawn_server(args, cwd=CHECKOUT)
        self.target = f"127.0.0.1:{port}"

    def pids(self) -> list[int]:
        """The server and every process below it."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    todo.extend(int(c) for c in task.read_text().split())
                except OSError:
                    continue
        return out

    def rss_mb(self) -> dict[str, float]:
        cur = peak = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            cur += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            peak += int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return {"rss_mb": round(cur / 1024, 1), "peak_rss_mb": round(peak / 1024, 1)}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=10)


def _stream_pass(target: str, captions: Sequence[tuple[str, str]], streams: int) -> dict[str, Any]:
    """All captions over ``streams`` concurrent streams; captions/s and how many were cached."""
    shards = [captions[k::streams] for k in range(streams)]
    counts = [[0, 0, 0] for _ in shards]  # ok, errors, cached
    failures: list[BaseException] = []

    def run(k: int) -> None:
        try:
            with ConceptClient(target, timeout=None) as c:
                for r in c.annotate_stream(shards[k], window=512):
                    counts[k][0 if r.ok else 1] += 1
                    counts[k][2] += r.cached
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if failures:
        raise failures[0]
    ok, errors, cached = (sum(c[i] for c in counts) for i in range(3))
    return {
        "captions": len(captions),
        "seconds": round(seconds, 3),
        "captions_per_s": round(len(captions) / seconds, 1),
        "ok": ok,
        "errors": errors,
        "cached": cached,
    }


def _latency(target: str, texts: Sequence[str], clients: int, per_client: int) -> dict[str, Any]:
    """Unary Annotate latency with ``clients`` concurrent callers."""
    samples: list[list[float]] = [[] for _ in range(clients)]
    failures: list[BaseException] = []
    start = threading.Barrier(clients)

    def run(k: int) -> None:
        try:
            with ConceptClient(target, timeout=30) as c:
                c.annotate(texts[k % len(texts)])  # connect outside the measurement
                start.wait()
                for i in range(per_client):
                    text = texts[(k * per_client + i) % len(texts)]
                    t0 = time.perf_counter()
                    c.annotate(text)
                    samples[k].append(time.perf_counter() - t0)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failures:
        raise failures[0]
    flat = sorted(x for s in samples for x in s)
    q = statistics.quantiles(flat, n=100, method="inclusive")
    return {
        "clients": clients,
        "requests": len(flat),
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "mean_ms": round(statistics.fmean(flat) * 1000, 2),
        "requests_per_s": round(len(flat) / wall, 1),
    }


def _read_captions(path: Path, limit: int | None) -> list[tuple[str, str]]:
    from conceptsvc.evaluation import read_captions

    captions = read_captions(path)
    if not captions:
        raise ConfigError(f"{path} holds no captions (expected an ID,Caption CSV)")
    return captions[:limit] if limit else captions


def run(
    captions_path: Path,
    *,
    index: Path | None = None,
    meta: Path = DEFAULT_META,
    workers: int | None = None,
    streams: int = 4,
    latency_requests: int = 1600,
    limit: int | None = None,
    quickumls: bool = True,
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
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    redis = _start_redis()
    try:
        if redis is not None:
            args = [*base, "--redis-url", redis.url]
            server = _Server(args)
            try:
                summary["stream_cold"] = _stream_pass(server.target, captions, streams)
                log.info("cold: %s", summary["stream_cold"])
                summary["stream_warm_memory_redis"] = _stream_pass(
                    server.target, captions, streams
                )
                summary["rss_after_streams"] = server.rss_mb()
            finally:
                server.stop()
            server = _Server(args)  # fresh in-process caches, Redis still warm
            try:
                summary["stream_warm_redis"] = _stream_pass(server.target, captions, streams)
                log.info("warm (Redis only): %s", summary["stream_warm_redis"])
            finally:
                server.stop()
        else:
            server = _Server([*base, "--cache-size", "0"])
            try:
                summary["stream_cold"] = _stream_pass(server.target, captions, streams)
                summary["rss_after_streams"] = server.rss_mb()
            finally:
                server.stop()
        server = _Server([*base, "--cache-size", "0"])
        try:
            per = max(1, latency_requests // 16)
            summary["unary_1_client"] = _latency(server.target, texts, 1, latency_requests)
            summary["unary_16_clients"] = _latency(server.target, texts, 16, per)
            summary["rss_after_latency"] = server.rss_mb()
        finally:
            server.stop()
    finally:
        if redis is not None:
            redis.stop()
    if quickumls:
        try:
            from benchmarks.bench_peers import quickumls_baseline

            rate = quickumls_baseline(meta, captions)
            summary["quickumls_in_process"] = {"captions_per_s": round(rate, 1), "meta": str(meta)}
            summary["speedup_cold_vs_quickumls"] = round(
                summary["stream_cold"]["captions_per_s"] / rate, 1
            )
        except ConfigError as exc:
            summary["quickumls_in_process"] = {"error": str(exc).splitlines()[0]}
    return summary


def to_markdown(s: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for one run."""
    def row(label: str, key: str) -> str:
        r = s.get(key)
        if not r:
            return f"| {label} | not measured | | |"
        return (
            f"| {label} | {r['captions_per_s']:,.0f} | {r['seconds']:.1f} | "
            f"{r['cached']:,} / {r['captions']:,} cached, {r['errors']} errors |"
        )

    q = s.get("quickumls_in_process", {})
    qline = (
        f"| QuickUMLS 1.4.2 in-process (same dictionary and captions) | "
        f"{q['captions_per_s']:,.0f} | | one process, one caption at a time |"
        if "captions_per_s" in q
        else f"| QuickUMLS in-process | not measured: {q.get('error', 'skipped')} | | |"
    )
    lines = [
        f"### Run of {s['date'][:10]} — {s['captions']:,} captions, {s['workers']} workers",
        "",
        f"Command: `{command}`  ",
        f"Machine: 2-core shared VM ({s['machine']}), Python {s['python']}; the client runs on "
        "the same machine. Index: "
        f"`{Path(s['index']).name}`; {s['streams']} concurrent streams, one connection each.",
    ]
    if "load_average_at_start" in s:
        lines.append(
            f"Load average when the run started: {s['load_average_at_start']} (other jobs on the "
            "same cores inflate every figure here, QuickUMLS's included)."
        )
    lines += [
        "",
        "| measurement | captions/s | seconds | notes |",
        "| --- | ---: | ---: | --- |",
        row("stream, cold cache (engine for every caption)", "stream_cold"),
        row("stream, warm (in-process LRU + Redis)", "stream_warm_memory_redis"),
        row("stream, warm Redis only (server restarted)", "stream_warm_redis"),
        qline,
        "",
        "Cold means empty caches at the start of the pass; a caption that occurs twice in the "
        "file is a hit the second time (the \"cached\" count).",
    ]
    if "speedup_cold_vs_quickumls" in s:
        target = "meets" if s["speedup_cold_vs_quickumls"] >= 5 else "misses"
        lines += ["", f"Cold-cache service vs QuickUMLS in-process: "
                  f"**{s['speedup_cold_vs_quickumls']}×** ({target} the ≥ 5× target)."]
    lines += ["", "| unary Annotate, caches off (clients: threads of the benchmark process, one "
              "connection each) | p50 ms | p99 ms | requests/s |",
              "| --- | ---: | ---: | ---: |"]
    for key, label in (("unary_1_client", "1 client"), ("unary_16_clients", "16 clients")):
        r = s.get(key)
        if r:
            lines.append(f"| {label} | {r['p50_ms']} | {r['p99_ms']} | {r['requests_per_s']:,} |")
    rss = s.get("rss_after_streams", {})
    if rss:
        lines += ["", f"Server RSS (supervisor + {s['workers']} workers) after the stream runs: "
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
    parser.add_argument("--streams", type=int, default=4, help="concurrent client streams")
    parser.add_argument("--latency-requests", type=int, default=1600,
                        help="unary requests per latency measurement")
    parser.add_argument("--limit", type=int, help="only the first N captions (smoke runs)")
    parser.add_argument("--no-quickumls", action="store_true", help="skip the QuickUMLS run")
    parser.add_argument("--out", type=Path, default=BENCH_OUT / "service.json")
    parser.add_argument("--append", type=Path, metavar="BENCHMARKS.md",
                        help="append the results to this markdown file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.index is not None and args.meta == DEFAULT_META and not args.no_quickumls:
        raise SystemExit("with --index, give --meta with the same dictionary for QuickUMLS")
    summary = run(
        args.captions, index=args.index, meta=args.meta, workers=args.workers,
        streams=args.streams, latency_requests=args.latency_requests, limit=args.limit,
        quickumls=not args.no_quickumls,
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
