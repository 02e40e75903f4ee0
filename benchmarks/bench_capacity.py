"""Capacity benchmark for docs/SCALE_OUT.md: captions per second per worker process, measured.

``python -m benchmarks.bench_capacity --captions ../shared/data/rocov2/valid_captions.csv
[--spark] [--append]``. Never part of ``make test``.

Scale-out planning needs one number that does not depend on how many other jobs share the
machine: how many captions one busy worker process handles per second of CPU. Wall-clock
throughput on this 2-core VM is also reported, but the client, the server and whatever else
runs here share the same two cores, so CPU accounting is what extrapolates:

1. **engine** — :class:`~conceptsvc.extractor.Extractor` in this process, one thread: the
   ceiling for one core with no RPC at all;
2. **service** — ``conceptsvc serve`` (caches off: every caption runs the engine) driven by the
   real batch client, ``conceptsvc annotate`` (4 streams of 64); as 1 replica x 1 worker,
   1 replica x 2 workers (SO_REUSEPORT) and 2 replicas x 1 worker (client-side round-robin
   over two ``--target``). Captions per *server* CPU-second is the per-worker capacity; the
   client's CPU-seconds per caption say how many batch clients a cluster needs. Then a warm
   pass answered by Redis alone (in-process tier off), and Redis memory per cached caption;
3. **spark** (``--spark``) — :func:`conceptsvc.integrations.spark.annotate_dataframe`,
   in-process engine on the shipped index, PySpark ``local[2]``; timed on a second job (the
   first pays for the Python workers' start-up and index load).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import CHECKOUT, ROCOV2
from benchmarks.processes import free_port
from conceptsvc.client import ConceptClient
from conceptsvc.embedded import demo_index_path
from conceptsvc.errors import ConfigError
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex

__all__ = ["annotate_pass", "bench_engine", "main", "run", "tree_cpu_seconds"]

DEFAULT_CAPTIONS = ROCOV2 / "valid_captions.csv"
SECTION = "## Capacity per worker process (scale-out planning)"
_TICKS = os.sysconf("SC_CLK_TCK")


def _read_captions(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise ConfigError(
            f"{path}: no captions file; pass --captions PATH (a CSV with ID,Caption, e.g. "
            "the ROCOv2 validation captions)"
        )
    with path.open(newline="", encoding="utf-8") as fh:
        return [(r["ID"], r["Caption"]) for r in csv.DictReader(fh)]


def tree_cpu_seconds(root: int) -> float:
    """user+system CPU of a live process and all its descendants, from /proc."""
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICKS
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                todo.extend(int(c) for c in task.read_text().split())
        except (OSError, IndexError, ValueError):
            continue
    return total


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def bench_engine(index: Path, captions: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The engine in this process, one thread, after 200 captions of warm-up (its plan)."""
    extractor = Extractor(ConceptIndex.load(index))
    for _, text in captions[:200]:
        extractor.extract(text)  # warm the per-options plan and memo tables
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _, text in captions:
        extractor.extract(text)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"name": "engine in-process, 1 thread", "processes": 1, "captions": len(captions),
            "wall_s": wall, "server_cpu_s": cpu, "client_cpu_s": 0.0}


def _serve(
    index: Path, workers: int, redis_url: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    extra = ["--redis-url", redis_url] if redis_url else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "conceptsvc.cli", "serve", "--index", str(index), "--host",
         "127.0.0.1", "--port", str(port), "--workers", str(workers), "--cache-size", "0",
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # (the Redis tier needs a secret; a throwaway one: the run's Redis is its own)
        env={**os.environ, "CONCEPTSVC_CACHE_SECRET": secrets.token_urlsafe(32)},
    )
    target = f"127.0.0.1:{port}"
    with ConceptClient(target) as client:
        client.wait_until_serving(timeout=120)
    return proc, target


def annotate_pass(
    servers: Sequence[tuple[subprocess.Popen[Any], str]], captions_csv: Path, n: int, name: str,
    *, extra: Sequence[str] = ("--concurrency", "4", "--batch-size", "64"),
    out: Path | None = None,
) -> dict[str, Any]:
    """``conceptsvc annotate`` as a subprocess against ``servers``: its wall time, its CPU and
    the servers' (``extra``: more annotate arguments; ``out``: keep the output there)."""
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        args = [sys.executable, "-m", "conceptsvc.cli", "annotate", str(captions_csv),
                "--out", str(out or Path(tmp) / "out.jsonl"), "--quiet", *extra]
        for _, target in servers:
            args += ["--target", target]
        server_cpu0 = sum(tree_cpu_seconds(p.pid) for p, _ in servers)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(args, check=True, timeout=1800)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_cpu = sum(tree_cpu_seconds(p.pid) for p, _ in servers) - server_cpu0
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"name": name, "processes": sum(1 for _ in servers), "captions": n, "wall_s": wall,
            "server_cpu_s": server_cpu, "client_cpu_s": client_cpu}


def bench_service(
    index: Path, captions_csv: Path, n: int, replicas: int, workers: int
) -> dict[str, Any]:
    servers = [_serve(index, workers) for _ in range(replicas)]
    try:
        row = annotate_pass(
            servers, captions_csv, n,
            f"service cold, {replicas} replica(s) x {workers} worker(s), via annotate",
        )
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=60)
    row["processes"] = replicas * workers
    return row


def bench_redis(index: Path, captions_csv: Path, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A cold pass that fills Redis, then a warm pass answered from Redis alone."""
    import redis

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            with redis.Redis.from_url(url) as r:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        r.ping()
                        break
                    except redis.ConnectionError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                baseline = int(r.info("memory")["used_memory"])
                server = _serve(index, 1, url)
                try:
                    annotate_pass([server], captions_csv, n, "fill")
                    warm = annotate_pass(
                        [server], captions_csv, n,
                        "service warm (Redis only), 1 replica x 1 worker, via annotate",
                    )
                finally:
                    server[0].terminate()
                    server[0].wait(timeout=60)
                keys = int(r.dbsize())
                used = int(r.info("memory")["used_memory"]) - baseline
        finally:
            redis_proc.terminate()
            redis_proc.wait(timeout=30)
    return warm, {"keys": keys, "bytes": used, "bytes_per_key": used / max(1, keys)}


def bench_spark(index: Path, captions: Sequence[tuple[str, str]]) -> dict[str, Any]:
    import pandas as pd
    from pyspark.sql import SparkSession

    from conceptsvc.integrations.spark import annotate_dataframe

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = (
        SparkSession.builder.master("local[2]").appName("conceptsvc-capacity")
        .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        df = spark.createDataFrame(pd.DataFrame(captions, columns=["ID", "Caption"])).cache()
        df.count()
        annotated = annotate_dataframe(df, "Caption", index=index)
        annotated.write.format("noop").mode("overwrite").save()  # warm-up job
        t0 = time.perf_counter()
        annotated.write.format("noop").mode("overwrite").save()
        wall = time.perf_counter() - t0
    finally:
        spark.stop()
    return {"name": "Spark local[2], in-process engine (2nd job)", "processes": 2,
            "captions": len(captions), "wall_s": wall, "server_cpu_s": None,
            "client_cpu_s": None}


def run(captions_csv: Path, *, index: Path | None, spark: bool) -> dict[str, Any]:
    captions = _read_captions(captions_csv)
    idx = index or demo_index_path()
    load_start = _loadavg()
    rows = [bench_engine(idx, captions)]
    for replicas, workers in ((1, 1), (1, 2), (2, 1)):
        rows.append(bench_service(idx, captions_csv, len(captions), replicas, workers))
    warm, redis_memory = bench_redis(idx, captions_csv, len(captions))
    rows.append(warm)
    if spark:
        rows.append(bench_spark(idx, captions))
    chars = sum(len(t) for _, t in captions)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()}), "
        f"Python {platform.python_version()}",
        "captions_file": str(captions_csv),
        "captions": len(captions),
        "mean_chars": chars / max(1, len(captions)),
        "index": str(idx),
        "index_concepts": len(ConceptIndex.load(idx, verify=False)),
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "rows": rows,
        "redis": redis_memory,
    }


def to_markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        f"### Run of {result['date']} — {result['captions']:,} captions "
        f"(mean {result['mean_chars']:.0f} characters)",
        "",
        f"Command: `{command}`  ",
        f"Machine: 2-core shared VM ({result['machine']}); client and server on the same cores. "
        f"Index: `{Path(result['index']).name}` ({result['index_concepts']:,} concepts). "
        f"Load average {result['loadavg_start']:.1f} at the start, "
        f"{result['loadavg_end']:.1f} at the end (other jobs on the same cores deflate the "
        "wall-clock figures; the per-CPU-second figures are much less affected).",
        "",
        "| setup | worker processes | wall s | captions/s (wall) | server CPU s "
        "| captions per worker CPU-second | client CPU ms per 1,000 captions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        rate = r["captions"] / r["wall_s"]
        per_cpu = "" if not r["server_cpu_s"] else f"{r['captions'] / r['server_cpu_s']:,.0f}"
        cpu = "" if r["server_cpu_s"] is None else f"{r['server_cpu_s']:.1f}"
        client = (
            "" if not r["client_cpu_s"]
            else f"{1000 * r['client_cpu_s'] / r['captions'] * 1000:,.0f}"
        )
        lines.append(
            f"| {r['name']} | {r['processes']} | {r['wall_s']:.1f} | {rate:,.0f} | {cpu} "
            f"| {per_cpu} | {client} |"
        )
    redis_memory = result["redis"]
    lines += [
        "",
        f"Redis after one pass: {redis_memory['keys']:,} keys, "
        f"{redis_memory['bytes'] / 2**20:.1f} MiB used "
        f"({redis_memory['bytes_per_key']:,.0f} bytes per cached caption, with mentions).",
    ]
    return "\n".join(lines) + "\n"


def append_to_benchmarks(markdown: str, path: Path) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + (
            f"\n\n{SECTION}\n\nProduced by `python -m benchmarks.bench_capacity` "
            "(benchmarks/bench_capacity.py); used by docs/SCALE_OUT.md; newest run last.\n"
        )
    start = text.index(SECTION)
    following = text.find("\n## ", start + len(SECTION))
    end = len(text) if following == -1 else following
    text = text[:end].rstrip("\n") + "\n\n" + markdown + text[end:]
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_capacity", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS,
                        help="ID,Caption CSV (default: the ROCOv2 validation captions)")
    parser.add_argument("--index", type=Path, help="index directory (default: demo index)")
    parser.add_argument("--spark", action="store_true", help="also measure PySpark local[2]")
    parser.add_argument("--out", type=Path, help="write the raw results as JSON here")
    parser.add_argument("--append", action="store_true",
                        help="append the table to BENCHMARKS.md")
    args = parser.parse_args(argv)
    result = run(args.captions, index=args.index, spark=args.spark)
    command = "python -m benchmarks.bench_capacity " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--append"
    )
    markdown = to_markdown(result, command.strip())
    print(markdown)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.append:
        append_to_benchmarks(markdown, CHECKOUT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
