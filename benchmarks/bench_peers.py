"""Benchmark the peers — QuickUMLS, MedCAT 2, mmlite — on our dictionary and the ROCOv2 captions.

The peers live in ``.venv-peers`` (``make peers``), so everything here runs them through
``.venv-peers/bin/python -m benchmarks.peers.run`` in a subprocess and reads the JSON it
prints; the predictions it writes (ImageCLEF CSV) are scored here with
:func:`conceptsvc.evaluation.score`, the same scorer as ``conceptsvc evaluate``, so the numbers
compare with the engine's.

Entry points:

- ``python -m benchmarks.bench peers`` (the bench dispatcher) or
  ``python -m benchmarks.bench_peers [--rocov2 DIR] [--meta DIR] [--out DIR] ...``:
  every peer on the ROCOv2 validation captions; prints and writes a JSON summary.
- :func:`quickumls_baseline` — QuickUMLS captions/s on a dictionary and captions, for the
  service benchmark.
- :func:`quickumls_build_timing` — QuickUMLS index build time and peak RSS on a META directory,
  for the index benchmark (e.g. the 1M-row synthetic MRCONSO).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import BENCH_OUT, ROCOV2, run_in_venv, venv_python
from conceptsvc.embedded import DEMO_META
from conceptsvc.errors import ConfigError
from conceptsvc.evaluation import read_concepts, score

__all__ = [
    "DEFAULT_META",
    "DEFAULT_ROCOV2",
    "PEERS",
    "main",
    "peers_python",
    "quickumls_baseline",
    "quickumls_build_timing",
    "run_peer",
    "run_peers",
    "snapshot_meta",
]

log = logging.getLogger(__name__)

DEFAULT_ROCOV2 = ROCOV2
DEFAULT_META = DEMO_META
PEERS = ("quickumls", "medcat", "mmlite")


def peers_python(python: str | Path | None = None) -> Path:
    """The interpreter of the peers' venv; a clear error when ``make peers`` has not run."""
    return venv_python(
        python, ".venv-peers",
        "the peer tools live in their own venv; run `make peers` "
        "(QuickUMLS, MedCAT 2.9.0, mmlite 0.1.4; a few minutes, compiles two extensions)",
    )


def _run(python: Path, args: Sequence[str], *, timeout: float) -> dict[str, Any]:
    """Run ``benchmarks.peers.run`` in the peers' venv and parse its JSON line."""
    stdout = run_in_venv(python, "benchmarks.peers.run", args, timeout=timeout,
                         what=f"peer run {' '.join(args[:2])}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise ConfigError(f"peer run printed no JSON summary: {stdout[-500:]!r}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _check_meta(meta: Path) -> Path:
    if not any(meta.glob("MRCONSO.RRF*")):
        raise ConfigError(
            f"{meta} has no MRCONSO.RRF; give a META directory with --meta "
            "(the demo dictionary is conceptsvc/data/demo/META)"
        )
    return meta


def run_peer(
    name: str,
    meta: Path,
    captions_csv: Path,
    out: Path,
    *,
    limit: int | None = None,
    python: str | Path | None = None,
    timeout: float = 3600,
) -> dict[str, Any]:
    """One peer: build its dictionary from ``meta``, annotate, write predictions under ``out``."""
    if name not in PEERS:
        raise ConfigError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    args = ["annotate", name, "--meta", str(_check_meta(meta)), "--captions", str(captions_csv),
            "--out", str(out)]
    if limit is not None:
        args += ["--limit", str(limit)]
    return _run(peers_python(python), args, timeout=timeout)


def quickumls_baseline(
    meta_dir: str | Path,
    captions: str | Path | Iterable[tuple[str, str]],
    *,
    python: str | Path | None = None,
) -> float:
    """QuickUMLS captions/s on ``meta_dir`` (built fresh) and ``captions``, in the peers' venv.

    ``captions`` is an ``ID,Caption`` CSV path or ``(id, text)`` pairs. The rate is QuickUMLS
    alone in one process (threshold 0.7, jaccard, window 5, min_match_length 2, best match),
    after a one-caption warm-up; the index build is not included.
    """
    with tempfile.TemporaryDirectory(prefix="quickumls-baseline-") as tmp:
        if isinstance(captions, (str, Path)):
            csv_path = Path(captions)
        else:
            csv_path = Path(tmp) / "captions.csv"
            _write_captions(csv_path, captions)
        result = run_peer("quickumls", Path(meta_dir), csv_path, Path(tmp) / "out", python=python)
    return float(result["captions_per_s"])


def _write_captions(path: Path, captions: Iterable[tuple[str, str]]) -> None:
    import csv

    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ID", "Caption"])
        w.writerows(captions)


def quickumls_build_timing(
    meta_dir: str | Path, *, python: str | Path | None = None, timeout: float = 7200
) -> dict[str, Any]:
    """Build a QuickUMLS index from ``meta_dir`` in a temporary directory; report its cost.

    Returns QuickUMLS's build report (``seconds``, ``rows_read``, ``terms``, ...) plus
    ``peak_rss_mb`` of the building process and ``index_bytes`` on disk. The index is deleted.
    """
    with tempfile.TemporaryDirectory(prefix="quickumls-build-") as tmp:
        out = Path(tmp) / "index"
        result = _run(
            peers_python(python),
            ["build-quickumls", "--meta", str(_check_meta(Path(meta_dir))), "--out", str(out)],
            timeout=timeout,
        )
        result["index_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return result


def snapshot_meta(meta: Path, dest: Path) -> str:
    """Copy the RRF files of ``meta`` into ``dest``; return a SHA-256 over names and contents.

    Every peer of a run reads the snapshot, so a dictionary rewritten while the run goes on
    (the demo dictionary is generated) cannot give the peers different dictionaries; the hash
    in the summary says which dictionary the numbers belong to.
    """
    _check_meta(meta)
    dest.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for src in sorted(p for p in meta.iterdir() if p.is_file() and ".RRF" in p.name):
        data = src.read_bytes()
        digest.update(src.name.encode() + b"\0" + hashlib.sha256(data).digest())
        (dest / src.name).write_bytes(data)
    return digest.hexdigest()


def _score_file(pred_csv: Path, gold: dict[str, list[str]], manual: dict[str, list[str]]
                ) -> dict[str, Any]:
    res = score(read_concepts(pred_csv), gold, manual)
    return res.as_dict(top=10)


def run_peers(
    rocov2: Path = DEFAULT_ROCOV2,
    meta: Path = DEFAULT_META,
    out: Path = BENCH_OUT / "peers",
    *,
    peers: Sequence[str] = PEERS,
    limit: int | None = None,
    python: str | Path | None = None,
) -> dict[str, Any]:
    """Every peer on the ROCOv2 validation split: F1 (primary/secondary), captions/s, µs median.

    Writes ``out/<peer>.csv`` predictions, ``out/<peer>.json`` run details and
    ``out/summary.json``; returns the summary.
    """
    captions = rocov2 / "valid_captions.csv"
    gold_path = rocov2 / "valid_concepts.csv"
    manual_path = rocov2 / "valid_concepts_manual.csv"
    for p in (captions, gold_path, manual_path):
        if not p.is_file():
            raise ConfigError(f"{p} not found; give the ROCOv2 directory with --rocov2")
    gold = read_concepts(gold_path)
    manual = read_concepts(manual_path)
    if limit is not None:
        # Score only the captions that were annotated.
        with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as fh:
            subset = Path(fh.name)
        from conceptsvc.evaluation import read_captions

        rows = read_captions(captions)[:limit]
        _write_captions(subset, rows)
        ids = {i for i, _ in rows}
        gold = {k: v for k, v in gold.items() if k in ids}
        manual = {k: v for k, v in manual.items() if k in ids}
        captions = subset
    out.mkdir(parents=True, exist_ok=True)
    snapshot_dir = Path(tempfile.mkdtemp(prefix="peers-meta-"))
    meta_sha256 = snapshot_meta(meta, snapshot_dir)
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "loadavg_1min_start": os.getloadavg()[0],
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "meta": str(meta),
        "meta_sha256": meta_sha256,
        "captions": str(rocov2 / "valid_captions.csv"),
        "limit": limit,
        "peers": {},
    }
    try:
        for name in peers:
            run = run_peer(name, snapshot_dir, captions, out, python=python)
            variants = {
                variant: _score_file(Path(path), gold, manual)
                for variant, path in run["predictions"].items()
            }
            main_scores = next(iter(variants.values()))
            summary["peers"][name] = {
                "version": run["version"],
                "primary_f1": main_scores["primary_f1"],
                "secondary_f1": main_scores["secondary_f1"],
                "captions_per_s": run["captions_per_s"],
                "captions_per_cpu_s": run["captions_per_cpu_s"],
                "us_median": run["us_median"],
                "cpu_us_median": run["cpu_us_median"],
                "loadavg_1min_end": run["loadavg_1min_end"],
                "us_p99": run["us_p99"],
                "build_seconds": run["build"]["seconds"],
                "load_seconds": run["load_seconds"],
                "peak_rss_mb": run["peak_rss_mb"],
                "captions": run["captions"],
                "settings": run["settings"],
                "scores": variants,
            }
            log.info("%s: %s", name, {k: summary["peers"][name][k] for k in
                                      ("primary_f1", "secondary_f1", "captions_per_s")})
    finally:
        shutil.rmtree(snapshot_dir, ignore_errors=True)  # the temporary copy made above
        if limit is not None:
            captions.unlink(missing_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary as the Markdown table BENCHMARKS.md uses."""
    lines = [
        "| peer | primary F1 | secondary F1 | captions/s (wall) | captions/CPU-s "
        "| µs/caption median (wall / CPU) | build s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["peers"].items():
        speed = (
            f"{r['captions_per_s']:,.0f} | {r['captions_per_cpu_s']:,.0f} | "
            f"{r['us_median']:,.0f} / {r['cpu_us_median']:,.0f} | {r['build_seconds']:.1f}"
        )
        for i, (variant, sc) in enumerate(r["scores"].items()):
            label = f"{name} {r['version']}" + (f" ({variant})" if i else "")
            lines.append(
                f"| {label} | {sc['primary_f1']:.3f} | {sc['secondary_f1']:.3f} | {speed} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench peers [options]`` (and this module's own entry)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench peers",
        description="Run QuickUMLS, MedCAT and mmlite on the ROCOv2 validation captions.",
    )
    parser.add_argument("--rocov2", type=Path, default=DEFAULT_ROCOV2,
                        help="directory with valid_captions.csv and valid_concepts*.csv "
                        "(default: ../shared/data/rocov2 beside the checkout)")
    parser.add_argument("--meta", type=Path, default=DEFAULT_META,
                        help="META directory of the dictionary (default: the demo dictionary)")
    parser.add_argument("--out", type=Path, default=BENCH_OUT / "peers")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset")
    parser.add_argument("--limit", type=int, help="only the first N captions (smoke runs)")
    parser.add_argument("--peers-python", help="interpreter of the peers' venv")
    parser.add_argument("--build-quickumls", type=Path, metavar="META",
                        help="only time a QuickUMLS index build on this META directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        if args.build_quickumls is not None:
            print(json.dumps(quickumls_build_timing(args.build_quickumls,
                                                    python=args.peers_python), indent=2))
            return 0
        peers = [p.strip() for p in args.peers.split(",") if p.strip()]
        unknown = sorted(set(peers) - set(PEERS))
        if unknown:
            parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
        if args.limit is not None and args.limit < 1:
            parser.error("--limit must be at least 1")
        summary = run_peers(args.rocov2, args.meta, args.out, peers=peers, limit=args.limit,
                            python=args.peers_python)
    except ConfigError as exc:
        print(f"bench peers: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
