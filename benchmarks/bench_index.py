"""Index build and load at UMLS scale: ``python -m benchmarks.bench index``.

For each size (default 1M, 4M and 16M MRCONSO rows) this generates synthetic RRF files with
:mod:`benchmarks.synth_umls` (once; they are kept under ``bench-out/``), builds the index
with the real command line (``conceptsvc index build``) in a subprocess, and loads it in a
fresh subprocess. Reported per size: build wall time and CPU time, peak RSS of the build
process (its VmHWM, sampled while it runs), index size on disk, load time with and without
hash verification, RSS after load, and the cost of a key lookup and of a posting read once
loaded. QuickUMLS builds its index from the smallest size in its own venv (``.venv-peers``,
``make peers``) through :mod:`benchmarks.peers.run`, non-interactively, for comparison.

Load times are measured with the files in the page cache (they were just written; dropping
caches needs root and would slow everyone else on a shared machine). Results go to
``bench-out/bench_index.json`` and, as a Markdown section for BENCHMARKS.md, to
``bench-out/bench_index.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import BENCH_OUT, CHECKOUT
from benchmarks.processes import run_measured

__all__ = ["dir_size", "main", "parse_size", "size_label"]

TARGETS_16M = {"build_s": 15 * 60, "build_peak_rss_mb": 12 * 1024, "load_s": 5.0,
               "rss_after_load_mb": 3 * 1024}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = 1_000_000 if t.endswith("M") else 1_000 if t.endswith("K") else 1
    return int(float(t.rstrip("MK")) * mult)


def size_label(rows: int) -> str:
    return f"{rows // 1_000_000}M" if rows % 1_000_000 == 0 else f"{rows // 1000}k"


def _run_measured(cmd: Sequence[str], *, log_path: Path) -> dict[str, Any]:
    """Run ``cmd``; wall time, CPU time and peak RSS (see :func:`run_measured`); raises on
    failure."""
    result = run_measured(cmd, log_path=log_path)
    if "error" in result:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({result['error']}):\n{tail}")
    return result


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _probe(index_dir: Path) -> dict[str, Any]:
    """Run inside a fresh process: load the index, measure, look things up."""
    from conceptsvc.index import DICT_THRESHOLD, ConceptIndex

    base = _rss_mb()
    t0 = time.perf_counter()
    ConceptIndex.load(index_dir, verify=False)
    load_noverify = time.perf_counter() - t0
    t0 = time.perf_counter()
    ix = ConceptIndex.load(index_dir)
    load = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    rng = random.Random(1)
    kids = [rng.randrange(ix.n_keys) for _ in range(20_000)]
    keys = [ix.key(k) for k in kids]
    misses = [k + " zz" for k in keys]
    t0 = time.perf_counter()
    for k in keys:
        ix.key_id(k)
    hit_us = (time.perf_counter() - t0) / len(keys) * 1e6
    t0 = time.perf_counter()
    for k in misses:
        ix.key_id(k)
    miss_us = (time.perf_counter() - t0) / len(misses) * 1e6
    firsts = [k.split(" ")[0] for k in keys]
    t0 = time.perf_counter()
    for f in firsts:
        ix.max_tokens_from(f)
    first_us = (time.perf_counter() - t0) / len(firsts) * 1e6
    t0 = time.perf_counter()
    n_post = sum(len(ix.postings_of(k)) for k in kids[:5000])
    post_us = (time.perf_counter() - t0) / 5000 * 1e6
    cuis = [ix.cuis[rng.randrange(len(ix))] for _ in range(2000)]
    t0 = time.perf_counter()
    for c in cuis:
        ix.concept(c)
    concept_us = (time.perf_counter() - t0) / len(cuis) * 1e6
    return {
        "rss_before_load_mb": round(base),
        "load_s": round(load, 2),
        "load_noverify_s": round(load_noverify, 3),
        "rss_after_load_mb": round(rss_loaded),
        "rss_after_lookups_mb": round(_rss_mb()),
        "key_lookup_hit_us": round(hit_us, 2),
        "key_lookup_miss_us": round(miss_us, 2),
        "first_token_lookup_us": round(first_us, 2),
        "postings_of_us": round(post_us, 1),
        "postings_per_key": round(n_post / 5000, 2),
        "concept_us": round(concept_us, 1),
        "dict_lookups": ix.n_keys <= DICT_THRESHOLD,
    }


def _bench_size(rows: int, out: Path, py: str, workers: int) -> dict[str, Any]:
    label = size_label(rows)
    meta = out / f"synth-{label}" / "META"
    result: dict[str, Any] = {"rows": rows, "label": label, "workers": workers}
    if not (meta / "MRFILES.RRF").is_file():
        print(f"[{label}] generating synthetic RRF in {meta}", flush=True)
        gen = _run_measured(
            [py, "-m", "benchmarks.synth_umls", "--rows", str(rows), "--out", str(meta)],
            log_path=out / f"synth-{label}.log",
        )
        result["generate"] = gen
    result["rrf_bytes"] = dir_size(meta)
    index_dir = out / f"index-{label}"
    print(f"[{label}] building the index", flush=True)
    result["build"] = _run_measured(
        [py, "-m", "conceptsvc.cli", "index", "build", "--umls", str(meta),
         "--out", str(index_dir), "--workers", str(workers)],
        log_path=out / f"build-{label}.log",
    )
    manifest = json.loads((index_dir / "manifest.json").read_text())
    result["counts"] = {k: manifest["counts"][k] for k in
                        ("concepts", "keys", "strings", "postings")}
    result["index_bytes"] = dir_size(index_dir)
    print(f"[{label}] loading it in a fresh process", flush=True)
    probe = subprocess.run(
        [py, "-m", "benchmarks.bench_index", "--probe", str(index_dir)],
        check=True, capture_output=True, text=True, cwd=CHECKOUT,
    )
    result["load"] = json.loads(probe.stdout)
    print(f"[{label}] {json.dumps(result)}", flush=True)
    return result


def _bench_quickumls(rows: int, out: Path) -> dict[str, Any]:
    peers_py = CHECKOUT / ".venv-peers" / "bin" / "python"
    label = size_label(rows)
    if not peers_py.is_file():
        return {"skipped": ".venv-peers not found (run `make peers`)"}
    meta = out / f"synth-{label}" / "META"
    target = out / f"quickumls-{label}"
    if target.exists():
        import shutil

        shutil.rmtree(target)
    print(f"[{label}] building QuickUMLS's index (.venv-peers)", flush=True)
    try:
        res = _run_measured(
            [str(peers_py), "-m", "benchmarks.peers.run", "build-quickumls",
             "--meta", str(meta), "--out", str(target)],
            log_path=out / f"quickumls-{label}.log",
        )
    except RuntimeError as exc:
        return {"failed": str(exc)[-500:]}
    res["index_bytes"] = dir_size(target)
    try:
        log_text = (out / f"quickumls-{label}.log").read_text().strip().splitlines()
        res["report"] = json.loads(log_text[-1])
    except (ValueError, IndexError):
        pass
    return res


def _markdown(results: list[dict[str, Any]], quick: dict[str, Any] | None, argv: list[str]) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = [
        "## Index build and load",
        "",
        f"Command: `python -m benchmarks.bench index {' '.join(argv)}`".rstrip() + " "
        f"(`make bench-index`). Date: {when}. Machine: 2-core shared VM "
        f"({platform.processor() or platform.machine()}), {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}. Input: synthetic RRF from `benchmarks.synth_umls` "
        "(~32 % non-English rows, ~12 % suppressible; default filters ENG and drop O/E/Y). "
        "Build = `conceptsvc index build` as a subprocess; peak RSS of that process (VmHWM). "
        "Load = `ConceptIndex.load` in a fresh process, files in the page cache.",
        "",
        "| rows | workers | build wall | build CPU | build peak RSS | concepts | keys | postings "
        "| index on disk | load (verify) | load (no verify) | RSS after load "
        "| key lookup hit/miss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, c, ld = r["build"], r["counts"], r["load"]
        lines.append(
            f"| {r['label']} | {r.get('workers', 1)} | {b['wall_s']:.0f} s | {b['cpu_s']:.0f} s | "
            f"{b['peak_rss_mb'] / 1024:.1f} GB | {c['concepts']:,} | {c['keys']:,} | "
            f"{c['postings']:,} | {r['index_bytes'] / 2**20:,.0f} MB | {ld['load_s']:.2f} s | "
            f"{ld['load_noverify_s']:.3f} s | {ld['rss_after_load_mb']} MB | "
            f"{ld['key_lookup_hit_us']:.1f} / {ld['key_lookup_miss_us']:.1f} µs |"
        )
    big = next((r for r in results if r["rows"] == 16_000_000), None)
    if big is not None:
        checks = {
            "build ≤ 15 min": big["build"]["wall_s"] <= TARGETS_16M["build_s"],
            "peak RSS ≤ 12 GB": big["build"]["peak_rss_mb"] <= TARGETS_16M["build_peak_rss_mb"],
            "load ≤ 5 s": big["load"]["load_s"] <= TARGETS_16M["load_s"],
            "RSS after load ≤ 3 GB": big["load"]["rss_after_load_mb"]
            <= TARGETS_16M["rss_after_load_mb"],
        }
        lines += ["", "Targets at 16M rows: " + "; ".join(
            f"{k}: {'met' if v else 'MISSED'}" for k, v in checks.items()) + "."]
    if quick is not None:
        lines.append("")
        if "wall_s" in quick:
            lines.append(
                f"QuickUMLS 1.4.2 (its own writer, unqlite + simstring, `.venv-peers`) from the "
                f"{results[0]['label']} file: build {quick['wall_s']:.0f} s wall, "
                f"{quick['cpu_s']:.0f} s CPU, peak RSS {quick['peak_rss_mb'] / 1024:.1f} GB, "
                f"{quick['index_bytes'] / 2**20:,.0f} MB on disk (conceptsvc on the same file: "
                f"{results[0]['build']['wall_s']:.0f} s wall, "
                f"{results[0]['build']['cpu_s']:.0f} s CPU, "
                f"{results[0]['build']['peak_rss_mb'] / 1024:.1f} GB, "
                f"{results[0]['index_bytes'] / 2**20:,.0f} MB). On a shared machine compare CPU "
                "times: wall times depend on the other load at the time of each run."
            )
        else:
            why = quick.get("skipped") or quick.get("failed")
            lines.append(f"QuickUMLS: not measured ({why}).")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench index",
                                description="Index build/load at UMLS scale.")
    p.add_argument("--sizes", default="1M,4M,16M", help="MRCONSO row counts (default 1M,4M,16M)")
    p.add_argument("--out", type=Path, default=BENCH_OUT, help="work directory")
    p.add_argument("--no-quickumls", action="store_true", help="skip the QuickUMLS build")
    p.add_argument("--workers", type=int, default=2,
                   help="`index build --workers` (default 2: both cores of the target machine)")
    p.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # internal: load-probe child
    args = p.parse_args(args_list)
    if args.probe is not None:
        print(json.dumps(_probe(args.probe)))
        return 0
    sizes = sorted(parse_size(s) for s in args.sizes.split(",") if s.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    results = []
    quick: dict[str, Any] | None = None
    for i, rows in enumerate(sizes):
        results.append(_bench_size(rows, args.out, py, args.workers))
        if i == 0 and not args.no_quickumls:
            quick = _bench_quickumls(rows, args.out)
            print(f"[quickumls] {json.dumps(quick)}", flush=True)
    # Merge with earlier runs (the 16M size is usually run on its own, once).
    store = args.out / "bench_index.json"
    if store.is_file():
        previous = json.loads(store.read_text())
        done = {r["rows"] for r in results}
        results = sorted([*(r for r in previous.get("results", []) if r["rows"] not in done),
                          *results], key=lambda r: r["rows"])
        if quick is None:
            quick = previous.get("quickumls")
    store.write_text(json.dumps({"results": results, "quickumls": quick}, indent=2) + "\n")
    md = _markdown(results, quick, args_list)
    (args.out / "bench_index.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
