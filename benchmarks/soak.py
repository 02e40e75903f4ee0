"""``make soak``: many streaming clients against a multi-process server for minutes, measured.

What a soak shows that unit tests cannot: that nothing degrades with time — no failed requests
after thousands of streams, no latency creep, and no memory growth (a leak of a few bytes per
request is invisible in a test and fatal after a week).

The run (defaults are the issue's target: 32 clients, 5 minutes, 2 workers):

1. starts ``conceptsvc serve --workers 2`` as a subprocess on a free port, serving the embedded
   demo dictionary (or ``--index``), with the in-process cache off by default so that every
   caption goes through the engine (``--cache`` turns it on);
2. starts the clients: ``--clients`` threads spread over ``--client-processes`` processes (so the
   clients' own GIL does not cap the load), each with its own connection, each sending streams
   of ``--stream-size`` captions from the packaged demo captions, back to back, until the time
   is up. With the cache off every caption is annotated by the engine, repeated or not.
   ``--unique-tokens`` appends a unique number to every caption: that also makes the engine's
   bounded per-token memo (``normalize_token``'s LRU, 2^18 entries, ~215 bytes each) fill up,
   which is cache warm-up, not a leak — so it is off by default;
3. measures: items answered, errors (RPC failures and per-item error statuses), the latency of
   every item (from the moment the client library takes it to the moment its response
   arrives), and the resident memory (RSS) of the server's processes, sampled every
   ``--sample-every`` seconds. "Start" RSS is taken after ``--warmup`` seconds, when the workers
   have loaded the index and the allocator has reached its working size; the RSS right after
   start-up is reported too;
4. stops the server with SIGTERM (it must exit 0) and prints the figures; with ``--write`` they
   replace the soak section of RELIABILITY.md (between ``<!-- soak:begin -->`` and
   ``<!-- soak:end -->``).

Exit status 0 when the targets hold (no errors, RSS growth under 10 %), 1 otherwise.

``--scenario option-sets`` is the memory case of issue 18 (item 5): ``--clients`` (default 1)
send unary ``Annotate`` requests back to back for ``--duration`` (default 2 minutes), each
with its own ``exclude_cuis`` list of ``--option-items`` names never sent before (default
9,999, just under the server's default ``max_option_items`` of 10,000), to one worker by
default. Every distinct option set is compiled and memoised by the worker, so memos bounded
by entry count only grew it by tens of MB a request. The server's RSS is sampled as above and
reported first / after warm-up / peak / last; the target is that every sample after warm-up
stays within 10 % of the warm-up figure (the memos fill to their byte bounds — about 100 MiB
per worker — within the warm-up) and that no request fails. With ``--write`` the figures
replace the section between ``<!-- soak-options:begin -->`` and ``<!-- soak-options:end -->``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import logging
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from benchmarks import CHECKOUT
from conceptsvc.server.launcher import spawn_server

log = logging.getLogger(__name__)

SCENARIOS = ("captions", "option-sets")
# scenario → (duration s, clients, client processes, workers) when not given
_DEFAULTS = {"captions": (300.0, 32, 4, 2), "option-sets": (120.0, 1, 1, 1)}
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class ClientStats:
    items: int = 0
    streams: int = 0
    rpc_errors: int = 0
    item_errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, other: ClientStats) -> None:
        """Add another client's (a thread's, a process's) counts to these."""
        self.items += other.items
        self.streams += other.streams
        self.rpc_errors += other.rpc_errors
        self.item_errors += other.item_errors
        self.error_samples += other.error_samples
        self.latencies_ms += other.latencies_ms


@dataclass
class SoakResult:
    date: str
    machine: str
    command: str
    duration_s: float
    clients: int
    client_processes: int
    workers: int
    stream_size: int
    unique_tokens: bool
    cache: bool
    index: str
    items: int
    streams: int
    rpc_errors: int
    item_errors: int
    throughput_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    rss_after_startup_mb: float
    rss_start_mb: float
    rss_end_mb: float
    rss_growth_pct: float
    rss_samples_mb: list[float]
    server_exit: int | None
    error_samples: list[str]

    @property
    def ok(self) -> bool:
        return (
            self.rpc_errors == 0 and self.item_errors == 0 and self.rss_growth_pct < 10.0
            and self.server_exit == 0 and self.items > 0
        )


@dataclass
class OptionSetsResult:
    """The option-sets scenario's figures (issue 18, item 5)."""

    date: str
    machine: str
    command: str
    duration_s: float
    clients: int
    workers: int
    option_items: int
    index: str
    cache: bool
    requests: int
    errors: int
    throughput_per_s: float
    rss_first_mb: float
    rss_start_mb: float
    rss_peak_mb: float
    rss_last_mb: float
    rss_peak_growth_pct: float
    rss_samples_mb: list[float]
    server_exit: int | None
    error_samples: list[str]

    @property
    def ok(self) -> bool:
        return (
            self.errors == 0 and self.requests > 0 and self.server_exit == 0
            and self.rss_peak_growth_pct < 10.0
        )


def demo_captions() -> list[str]:
    """The packaged demo captions (ROCOv2 validation sample)."""
    ref = resources.files("conceptsvc").joinpath("data/demo/captions.csv")
    text = ref.read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    return [row[1] for row in rows[1:] if len(row) == 2 and row[1].strip()]


# -- the server ---------------------------------------------------------------------------------
def start_server(
    workers: int, index: Path | None, cache: bool
) -> tuple[subprocess.Popen[str], int]:
    # 64 threads admit 62 streams per worker (two are reserved for health checks): more than
    # the soak's clients, so none is refused.
    cmd = ["--workers", str(workers), "--threads", "64"]
    if index is not None:
        cmd += ["--index", str(index)]
    if not cache:
        cmd += ["--cache-size", "0"]
    return spawn_server(cmd)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MiB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
        todo += _children(p)
    return total / (1 << 20)


# -- the clients --------------------------------------------------------------------------------
def _client_thread(target: str, k: int, captions: list[str], stream_size: int, until: float,
                   unique: bool, stats: ClientStats, lock: threading.Lock) -> None:
    from conceptsvc.client import ConceptClient
    from conceptsvc.errors import ServiceCallError

    counter = [k * 10_000_000]
    mine = ClientStats()

    def items(sent: dict[str, float]) -> Iterator[tuple[str, str]]:
        for _ in range(stream_size):
            counter[0] += 1
            n = counter[0]
            sent[str(n)] = time.perf_counter()
            text = captions[n % len(captions)]
            yield str(n), f"{text} [{n}]" if unique else text

    with ConceptClient(target, retries=0, timeout=120) as client:
        while time.time() < until:
            sent: dict[str, float] = {}
            try:
                for r in client.annotate_stream(items(sent), window=stream_size):
                    mine.latencies_ms.append((time.perf_counter() - sent[r.id]) * 1000)
                    if r.ok:
                        mine.items += 1
                    else:
                        mine.item_errors += 1
                        if len(mine.error_samples) < 5:
                            mine.error_samples.append(f"item {r.id}: {r.error}")
                mine.streams += 1
            except (ServiceCallError, Exception) as exc:  # counted, never fatal to the soak
                mine.rpc_errors += 1
                if len(mine.error_samples) < 5:
                    mine.error_samples.append(f"{type(exc).__name__}: {exc}")
    with lock:
        stats.add(mine)


def _client_process(worker: Any, target: str, ks: list[int], extra: tuple[Any, ...],
                    conn: Any) -> None:
    """One client process: a ``worker`` thread per client number in ``ks``, each called as
    ``worker(target, k, captions, *extra, stats, lock)``; their summed counts go back as JSON."""
    captions = demo_captions()
    stats = ClientStats()
    lock = threading.Lock()
    threads = [
        threading.Thread(target=worker, args=(target, k, captions, *extra, stats, lock))
        for k in ks
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn.send(json.dumps(asdict(stats)))
    conn.close()


def _start_clients(args: argparse.Namespace, worker: Any, target: str,
                   extra: tuple[Any, ...]) -> tuple[list[Any], list[Any]]:
    """``args.clients`` clients spread over ``args.client_processes`` spawned processes."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for p in range(args.client_processes):
        ks = list(range(p, args.clients, args.client_processes))
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_client_process, args=(worker, target, ks, extra, child))
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    return pipes, procs


def _gather_clients(pipes: list[Any], procs: list[Any]) -> ClientStats:
    stats = ClientStats()
    for parent, p in zip(pipes, procs, strict=True):
        stats.add(ClientStats(**json.loads(parent.recv())))
        p.join(60)
    return stats


def _stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)


def _option_sets_thread(target: str, k: int, captions: list[str], option_items: int,
                        until: float, stats: ClientStats, lock: threading.Lock) -> None:
    from conceptsvc.client import ConceptClient
    from conceptsvc.model import ExtractOptions

    mine = ClientStats()
    n = 0
    with ConceptClient(target, retries=0, timeout=120) as client:
        # At least one request, however late this client process got going (spawned clients
        # on a loaded machine could start after a short run's end and report 0 requests).
        while n == 0 or time.time() < until:
            n += 1
            # names no request has sent before: every request is a new option set to memoise
            names = tuple(f"X{k:03d}.{n:07d}.{i:05d}" for i in range(option_items))
            t0 = time.perf_counter()
            try:
                client.annotate(captions[n % len(captions)], id=str(n),
                                options=ExtractOptions(exclude_cuis=names))
                mine.items += 1
            except Exception as exc:  # counted, never fatal to the soak
                mine.item_errors += 1
                if len(mine.error_samples) < 5:
                    mine.error_samples.append(f"request {n}: {type(exc).__name__}: {exc}")
            mine.latencies_ms.append((time.perf_counter() - t0) * 1000)
    with lock:
        stats.add(mine)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def run(args: argparse.Namespace) -> SoakResult:
    proc, port = start_server(args.workers, args.index, args.cache)
    target = f"127.0.0.1:{port}"
    rss_after_startup = tree_rss_mb(proc.pid)
    log.info("server pid %d on %s (%d workers), RSS %.1f MiB", proc.pid, target, args.workers,
             rss_after_startup)
    started = time.time()
    until = started + args.duration
    pipes, procs = _start_clients(
        args, _client_thread, target, (args.stream_size, until, args.unique_tokens)
    )
    samples: list[float] = []
    rss_start: float | None = None
    next_sample = started
    while time.time() < until:
        now = time.time()
        if now >= next_sample:
            rss = tree_rss_mb(proc.pid)
            samples.append(round(rss, 1))
            if rss_start is None and now - started >= args.warmup:
                rss_start = rss
            log.info("t+%3.0fs RSS %.1f MiB", now - started, rss)
            next_sample += args.sample_every
        time.sleep(0.5)
    stats = _gather_clients(pipes, procs)
    elapsed = time.time() - started
    rss_end = tree_rss_mb(proc.pid)
    samples.append(round(rss_end, 1))
    _stop_server(proc)
    if rss_start is None:
        rss_start = samples[0]
    lat = sorted(stats.latencies_ms)
    return SoakResult(
        date=dt.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores (shared VM), Python "
                f"{platform.python_version()}",
        command="make soak  # " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "make soak",
        duration_s=round(elapsed, 1),
        clients=args.clients,
        client_processes=args.client_processes,
        workers=args.workers,
        stream_size=args.stream_size,
        unique_tokens=args.unique_tokens,
        cache=args.cache,
        index=str(args.index) if args.index else "embedded demo dictionary",
        items=stats.items,
        streams=stats.streams,
        rpc_errors=stats.rpc_errors,
        item_errors=stats.item_errors,
        throughput_per_s=round(stats.items / elapsed, 1),
        p50_ms=round(_percentile(lat, 0.50), 1),
        p99_ms=round(_percentile(lat, 0.99), 1),
        max_ms=round(lat[-1], 1) if lat else float("nan"),
        rss_after_startup_mb=round(rss_after_startup, 1),
        rss_start_mb=round(rss_start, 1),
        rss_end_mb=round(rss_end, 1),
        rss_growth_pct=round(100 * (rss_end - rss_start) / rss_start, 2),
        rss_samples_mb=samples,
        server_exit=proc.returncode,
        error_samples=stats.error_samples[:10],
    )


def run_option_sets(args: argparse.Namespace) -> OptionSetsResult:
    """The option-sets scenario: distinct large option sets, the server's RSS sampled."""
    proc, port = start_server(args.workers, args.index, args.cache)
    target = f"127.0.0.1:{port}"
    rss_first = tree_rss_mb(proc.pid)
    log.info("server pid %d on %s (%d workers), RSS %.1f MiB; option sets of %d names",
             proc.pid, target, args.workers, rss_first, args.option_items)
    started = time.time()
    until = started + args.duration
    pipes, procs = _start_clients(args, _option_sets_thread, target, (args.option_items, until))
    samples: list[float] = [round(rss_first, 1)]
    after_warmup: list[float] = []
    next_sample = started + args.sample_every
    while time.time() < until:
        now = time.time()
        if now >= next_sample:
            rss = tree_rss_mb(proc.pid)
            samples.append(round(rss, 1))
            if now - started >= args.warmup:
                after_warmup.append(rss)
            log.info("t+%3.0fs RSS %.1f MiB", now - started, rss)
            next_sample += args.sample_every
        time.sleep(min(0.5, args.sample_every / 2))
    stats = _gather_clients(pipes, procs)
    elapsed = time.time() - started
    rss_last = tree_rss_mb(proc.pid)
    samples.append(round(rss_last, 1))
    after_warmup.append(rss_last)
    _stop_server(proc)
    rss_start, rss_peak = after_warmup[0], max(after_warmup)
    return OptionSetsResult(
        date=dt.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores (shared VM), Python "
                f"{platform.python_version()}",
        command="make soak  # " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "make soak",
        duration_s=round(elapsed, 1),
        clients=args.clients,
        workers=args.workers,
        option_items=args.option_items,
        index=str(args.index) if args.index else "embedded demo dictionary",
        cache=args.cache,
        requests=stats.items,
        errors=stats.item_errors,
        throughput_per_s=round(stats.items / elapsed, 1),
        rss_first_mb=round(rss_first, 1),
        rss_start_mb=round(rss_start, 1),
        rss_peak_mb=round(rss_peak, 1),
        rss_last_mb=round(rss_last, 1),
        rss_peak_growth_pct=round(100 * (rss_peak - rss_start) / rss_start, 2),
        rss_samples_mb=samples,
        server_exit=proc.returncode,
        error_samples=stats.error_samples[:10],
    )


def render_option_sets(r: OptionSetsResult) -> str:
    verdict = "targets met" if r.ok else "TARGETS MISSED"
    rows = [
        ("date / machine", f"{r.date}, {r.machine}"),
        ("command", f"`{r.command}`"),
        ("load", f"{r.clients} client(s) sending unary Annotate back to back, each request "
                 f"with its own exclude_cuis list of {r.option_items:,} names never sent "
                 f"before, {r.duration_s:.0f} s; server: {r.workers} worker process(es), "
                 f"{r.index}, in-process cache {'on' if r.cache else 'off'}"),
        ("requests", f"{r.requests:,} ({r.throughput_per_s:,.1f}/s), {r.errors} failed "
                     "(target: none)"),
        ("server RSS (all processes)",
         f"first {r.rss_first_mb} MiB; after warm-up {r.rss_start_mb} MiB; peak after "
         f"warm-up {r.rss_peak_mb} MiB ({r.rss_peak_growth_pct:+.2f} %, target: < 10 %); "
         f"last {r.rss_last_mb} MiB"),
        ("RSS samples (MiB)", ", ".join(f"{v:g}" for v in r.rss_samples_mb)),
        ("server exit on SIGTERM", str(r.server_exit)),
        ("verdict", verdict),
    ]
    lines = ["| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if r.error_samples:
        lines += ["", "Error samples:", *[f"- `{e}`" for e in r.error_samples]]
    return "\n".join(lines)


def render(r: SoakResult) -> str:
    verdict = "targets met" if r.ok else "TARGETS MISSED"
    rows = [
        ("date / machine", f"{r.date}, {r.machine}"),
        ("command", f"`{r.command}`"),
        ("load", f"{r.clients} streaming clients ({r.client_processes} processes), streams of "
                 f"{r.stream_size} demo captions"
                 f"{' each with a unique number' if r.unique_tokens else ''}, "
                 f"{r.duration_s:.0f} s; server: {r.workers} worker processes, {r.index}, "
                 f"in-process cache {'on' if r.cache else 'off'}"),
        ("captions annotated", f"{r.items:,} in {r.streams:,} streams"),
        ("throughput", f"{r.throughput_per_s:,.1f} captions/s"),
        ("item latency", f"p50 {r.p50_ms} ms, p99 {r.p99_ms} ms, max {r.max_ms} ms"),
        ("errors", f"{r.rpc_errors} failed streams, {r.item_errors} failed items "
                   "(target: none)"),
        ("server RSS (all processes)",
         f"{r.rss_after_startup_mb} MiB after start-up; {r.rss_start_mb} MiB after warm-up → "
         f"{r.rss_end_mb} MiB at the end: {r.rss_growth_pct:+.2f} % (target: < 10 %)"),
        ("RSS samples (MiB)", ", ".join(f"{v:g}" for v in r.rss_samples_mb)),
        ("server exit on SIGTERM", str(r.server_exit)),
        ("verdict", verdict),
    ]
    lines = ["| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if r.error_samples:
        lines += ["", "Error samples:", *[f"- `{e}`" for e in r.error_samples]]
    return "\n".join(lines)


def write_section(path: Path, text: str, tag: str = "soak", heading: str = "Soak") -> None:
    """Replace the text between ``<!-- {tag}:begin -->`` and ``<!-- {tag}:end -->`` (or
    append it under ``## {heading}``)."""
    doc = path.read_text(encoding="utf-8") if path.exists() else ""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc = head + block + tail
    else:
        doc = doc.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"
    path.write_text(doc, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=SCENARIOS, default="captions",
                        help="captions (default): streaming clients on the demo captions; "
                        "option-sets: distinct large option sets (issue 18, see above)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds (default 300; option-sets: 120)")
    parser.add_argument("--clients", type=int, default=None,
                        help="clients (default 32; option-sets: 1)")
    parser.add_argument("--client-processes", type=int, default=None,
                        help="processes the clients are spread over (default 4; option-sets: 1)")
    parser.add_argument("--workers", type=int, default=None,
                        help="server processes (default 2; option-sets: 1)")
    parser.add_argument("--option-items", type=int, default=9_999,
                        help="option-sets: names in each request's exclude_cuis (default "
                        "9,999, under the server's default max_option_items)")
    parser.add_argument("--stream-size", type=int, default=64, help="captions per stream")
    parser.add_argument("--index", type=Path, default=None,
                        help="index to serve (default: the embedded demo dictionary)")
    parser.add_argument("--unique-tokens", action="store_true",
                        help="append a unique number to every caption (fills the bounded "
                        "token memo; see above)")
    parser.add_argument("--cache", action="store_true",
                        help="keep the server's in-process cache on (default: off)")
    parser.add_argument("--warmup", type=float, default=30.0,
                        help="seconds before the 'start' RSS is taken (default 30)")
    parser.add_argument("--sample-every", type=float, default=10.0, help="RSS sampling period")
    parser.add_argument("--write", type=Path, nargs="?", const=CHECKOUT / "RELIABILITY.md",
                        default=None, help="replace the soak section of this file "
                        "(default when given without a path: this checkout's RELIABILITY.md)")
    args = parser.parse_args(argv)
    duration, clients, client_processes, workers = _DEFAULTS[args.scenario]
    args.duration = duration if args.duration is None else args.duration
    args.clients = clients if args.clients is None else args.clients
    args.client_processes = (
        client_processes if args.client_processes is None else args.client_processes
    )
    args.workers = workers if args.workers is None else args.workers
    if (args.clients < 1 or args.client_processes < 1 or args.duration <= 0
            or args.workers < 1 or args.option_items < 1):
        parser.error("--clients, --client-processes, --workers, --duration and --option-items "
                     "must be positive")
    args.client_processes = min(args.client_processes, args.clients)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s soak: %(message)s")
    result: SoakResult | OptionSetsResult
    if args.scenario == "option-sets":
        result = run_option_sets(args)
        text = render_option_sets(result)
        tag, heading = "soak-options", "Soak: distinct large option sets"
    else:
        result = run(args)
        text = render(result)
        tag, heading = "soak", "Soak"
    print(text)
    if args.write is not None:
        write_section(args.write, text, tag, heading)
        print(f"\nwritten to {args.write}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
