"""Client memory of ``conceptsvc annotate`` on a large Parquet corpus (issue 16).

``python -m benchmarks.bench_parquet [--rows 1000000]``. Not part of ``make test`` or
``make bench``: it is one figure, taken once and recorded in BENCHMARKS.md.

What it does:

1. writes a Parquet corpus of ``--rows`` rows (``id``, ``text``) from the captions CSV
   (default: the ROCOv2 validation captions, ``../shared/data/rocov2/valid_captions.csv``)
   repeated with fresh ids, in row groups of ``--row-group`` rows — written a row group at a
   time, so this process never holds the corpus either;
2. starts ``conceptsvc serve --workers 2`` on the embedded demo dictionary (a real multi-process
   service; its in-process cache on, as deployed — the captions repeat, the client's work does
   not change with that);
3. runs the real CLI, ``conceptsvc annotate CORPUS --out OUT.parquet``, as a subprocess and
   samples its resident memory (``VmRSS``) every ``--sample-every`` seconds together with the
   journal's length, so the figure can be read per phase (validation scan, streaming,
   writing the output); the peak is the kernel's own high-water mark for the child
   (``ru_maxrss`` of the waited-for client, not a sample);
4. prints the figures as JSON (and to ``--json``, with every sample): rows, input and output
   sizes, wall time, peak RSS, and the RSS when the journal reached 10 %, 50 % and 100 % of its
   final size (before that, the client is scanning; after, writing the output).

The machine is shared, so wall time is only indicative; the memory figure hardly depends on load.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import BENCH_OUT, ROCOV2
from conceptsvc.server.launcher import spawn_server

__all__ = ["main", "run"]

log = logging.getLogger(__name__)

DEFAULT_CAPTIONS = ROCOV2 / "valid_captions.csv"


def read_captions(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return [r[1] for r in rows[1:] if len(r) == 2 and r[1].strip()]


def write_corpus(path: Path, captions: list[str], rows: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    with pq.ParquetWriter(str(path), schema, compression="zstd") as writer:
        for start in range(0, rows, row_group):
            stop = min(rows, start + row_group)
            writer.write_table(pa.table({
                "id": [f"bench{i:08d}" for i in range(start, stop)],
                "text": [captions[i % len(captions)] for i in range(start, stop)],
            }, schema=schema))


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _journal_bytes(out: Path) -> int:
    # Its size, not its lines: counting a GB of journal twice a second would load the machine.
    total = 0
    for j in out.parent.glob(f"{out.name}.*.part/journal.jsonl"):
        try:
            total += j.stat().st_size
        except OSError:
            continue
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.rows}.parquet"
    if not corpus.exists():
        t = time.monotonic()
        write_corpus(corpus, read_captions(args.captions), args.rows, args.row_group)
        log.info("wrote %s (%d rows) in %.1f s", corpus, args.rows, time.monotonic() - t)
    out = work / "annotations.parquet"
    for old in [out, *work.glob("annotations.parquet.*")]:
        if old.is_file():
            old.unlink()
    server, port = spawn_server(["--workers", str(args.workers)])
    samples: list[tuple[float, int, float]] = []  # (seconds, journal bytes, RSS MiB)
    try:
        cmd = [sys.executable, "-m", "conceptsvc.cli", "annotate", str(corpus), "--out", str(out),
               "--target", f"127.0.0.1:{port}", "--concurrency", str(args.concurrency),
               "--batch-size", str(args.batch_size), "--quiet"]
        log.info("running %s", " ".join(cmd[1:]))
        started = time.monotonic()
        client = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        while client.poll() is None:
            rss = _rss_mib(client.pid)
            if rss is not None:
                samples.append((round(time.monotonic() - started, 1), _journal_bytes(out),
                                round(rss, 1)))
            time.sleep(args.sample_every)
        _, err = client.communicate()
        wall = time.monotonic() - started
        # Only the client has been waited for so far: this is its own high-water mark.
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if client.returncode != 0:
            raise SystemExit(f"annotate exited {client.returncode}: {err[-2000:]}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    full = max((s[1] for s in samples), default=0)  # the journal just before it was removed

    def at(fraction: float) -> float | None:
        hits = [rss for _, size, rss in samples if full and size >= fraction * full]
        return hits[0] if hits else None

    result = {
        "rows": args.rows,
        "input_bytes": corpus.stat().st_size,
        "output_bytes": out.stat().st_size,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "wall_seconds": round(wall, 1),
        "client_peak_rss_mib": round(peak_kib / 1024, 1),
        "client_rss_mib_at_journal_10pct": at(0.10),
        "client_rss_mib_at_journal_50pct": at(0.50),
        "client_rss_mib_at_journal_100pct": at(1.0),
        "client_rss_mib_max_sampled": max((s[2] for s in samples), default=None),
        "samples": samples,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated corpus")
    p.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS,
                   help="ID,Caption CSV the rows are cycled from (default: ROCOv2 validation)")
    p.add_argument("--row-group", type=int, default=65_536, help="rows per input row group")
    p.add_argument("--workers", type=int, default=2, help="service worker processes")
    p.add_argument("--concurrency", type=int, default=4, help="annotate --concurrency")
    p.add_argument("--batch-size", type=int, default=64, help="annotate --batch-size")
    p.add_argument("--sample-every", type=float, default=0.5, help="RSS sampling period (s)")
    p.add_argument("--work-dir", type=Path, default=BENCH_OUT / "parquet",
                   help="where the corpus and the output go (default bench-out/parquet)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
