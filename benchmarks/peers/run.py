"""Build one peer's dictionary, annotate a captions CSV with it, time both (run in .venv-peers).

Usage (``.venv-peers/bin/python -m benchmarks.peers.run ...``)::

    build-quickumls --meta META_DIR --out INDEX_DIR
        Build a QuickUMLS index without prompts; print the build report as JSON.
    annotate {quickumls,medcat,mmlite} --meta META_DIR --captions CAPTIONS.csv --out OUT_DIR
             [--work DIR] [--limit N]
        Build the peer's dictionary (timed), annotate every caption one at a time (timed per
        caption), write ImageCLEF predictions ``OUT_DIR/<peer>.csv`` (``ID,CUIs``, ``;``-joined;
        extra variants as ``<peer>-<variant>.csv``) and ``OUT_DIR/<peer>.json``; print the JSON.

The JSON is the contract with :mod:`benchmarks.bench_peers`, which runs this in a subprocess
and scores the predictions. Only this file prints: it is the command-line edge.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from conceptsvc.evaluation import read_captions, write_concepts_csv

__all__ = ["PEERS", "Peer", "main", "run_peer"]

log = logging.getLogger(__name__)


class Peer(Protocol):
    name: str
    variants: tuple[str, ...]  # the first is the one reported

    def build(self, meta: Path, work: Path) -> dict[str, Any]: ...
    def load(self, work: Path) -> None: ...
    def annotate(self, text: str) -> dict[str, list[str]]: ...
    def settings(self) -> dict[str, Any]: ...


def _make_peer(name: str) -> Peer:
    # Imported on demand: each peer pulls in its own heavy package.
    if name == "quickumls":
        from benchmarks.peers.quickumls_peer import QuickUMLSPeer

        return QuickUMLSPeer()
    if name == "medcat":
        from benchmarks.peers.medcat_peer import MedCATPeer

        return MedCATPeer()
    if name == "mmlite":
        from benchmarks.peers.mmlite_peer import MMLitePeer

        return MMLitePeer()
    raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")


PEERS = ("quickumls", "medcat", "mmlite")
_DISTRIBUTIONS = {"quickumls": "quickumls", "medcat": "medcat", "mmlite": "mmlite"}


def run_peer(
    name: str,
    meta: Path,
    captions_csv: Path,
    out: Path,
    *,
    work: Path | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Build, load, annotate and time one peer; write its predictions; return the summary."""
    peer = _make_peer(name)
    captions = read_captions(captions_csv)
    if limit is not None:
        captions = captions[:limit]
    if not captions:
        raise ValueError(f"{captions_csv} has no captions")
    out.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    work_dir = Path(tempfile.mkdtemp(prefix=f"peer-{name}-")) if work is None else work
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        build = peer.build(meta, work_dir)
        t0 = time.perf_counter()
        peer.load(work_dir)
        load_seconds = time.perf_counter() - t0
        peer.annotate(captions[0][1])  # warm-up: lazy initialisation is not per-caption cost
        results: list[tuple[str, dict[str, list[str]]]] = []
        per_caption: list[float] = []
        cpu_per_caption: list[float] = []
        # Wall time is what users see; CPU time of this process is what survives a busy
        # shared machine (other processes inflate wall time, much less this process's CPU).
        clock, cpu = time.perf_counter, time.process_time
        t_all, c_all = clock(), cpu()
        for image_id, text in captions:
            t, c = clock(), cpu()
            got = peer.annotate(text)
            per_caption.append(clock() - t)
            cpu_per_caption.append(cpu() - c)
            results.append((image_id, got))
        seconds, cpu_seconds = clock() - t_all, cpu() - c_all
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)  # the temporary directory made above
    predictions: dict[str, str] = {}
    for i, variant in enumerate(peer.variants):
        path = out / (f"{name}.csv" if i == 0 else f"{name}-{variant}.csv")
        write_concepts_csv(path, ((image_id, got[variant]) for image_id, got in results))
        predictions[variant] = str(path)
    per_caption.sort()
    summary = {
        "peer": name,
        "version": metadata.version(_DISTRIBUTIONS[name]),
        "settings": peer.settings(),
        "meta": str(meta),
        "captions_file": str(captions_csv),
        "captions": len(captions),
        "build": build,
        "load_seconds": load_seconds,
        "seconds": seconds,
        "captions_per_s": len(captions) / seconds if seconds else None,
        "cpu_seconds": cpu_seconds,
        "captions_per_cpu_s": len(captions) / cpu_seconds if cpu_seconds else None,
        "us_median": statistics.median(per_caption) * 1e6,
        "cpu_us_median": statistics.median(cpu_per_caption) * 1e6,
        "loadavg_1min_end": os.getloadavg()[0],
        "us_p99": per_caption[min(len(per_caption) - 1, int(0.99 * len(per_caption)))] * 1e6,
        "predictions": predictions,
        "peak_rss_mb": _peak_rss_mb(),
        "python": platform.python_version(),
    }
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.run")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-quickumls", help="build a QuickUMLS index and time it")
    b.add_argument("--meta", type=Path, required=True, help="META directory with RRF files")
    b.add_argument("--out", type=Path, required=True, help="new directory for the index")
    a = sub.add_parser("annotate", help="build a peer, annotate captions, write predictions")
    a.add_argument("peer", choices=PEERS)
    a.add_argument("--meta", type=Path, required=True, help="META directory with RRF files")
    a.add_argument("--captions", type=Path, required=True, help="ID,Caption CSV")
    a.add_argument("--out", type=Path, required=True, help="directory for predictions + JSON")
    a.add_argument("--work", type=Path, help="keep the built dictionary here (default: temp)")
    a.add_argument("--limit", type=int, help="only the first N captions")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "build-quickumls":
        from conceptsvc.backends.quickumls import build_quickumls_index

        report = build_quickumls_index(args.meta, args.out)
        print(json.dumps({**report.as_dict(), "peak_rss_mb": _peak_rss_mb()}))
        return 0
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    summary = run_peer(
        args.peer, args.meta, args.captions, args.out, work=args.work, limit=args.limit
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
