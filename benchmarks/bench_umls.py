"""A full UMLS release beside the demo dictionary: ``make bench-umls`` (issue 13).

``python -m benchmarks.bench umls [--rows 16000000] [--variants realistic,stress]``

What a user with a licensed release meets, measured in one run, for the demo index and for
each synthetic release (:mod:`benchmarks.synth_umls`; ``realistic`` has the published UMLS
ambiguity, ``stress`` the heavy one of a noisy site dictionary) merged with the demo
dictionary as a user would (``conceptsvc index build --umls <synth>/META --umls
conceptsvc/data/demo/META --workers 2``):

* **build**: wall and CPU time, peak memory of the build's process tree (summed RSS and PSS,
  sampled; and the largest single process), index size on disk; concepts, keys, and how
  ambiguous the keys are (:func:`benchmarks.synth_umls.ambiguity_stats`);
* **exact mode**, one process on the ROCOv2 validation captions (read as
  :mod:`benchmarks.bench_extract` reads them, timed by its :func:`~benchmarks.bench_extract.bench`):
  load time, the first request after load (and the extractor's construction before it),
  captions/s cold (a fresh extractor) and warm, median µs per caption, RSS after the run;
* **the service** with 2 workers (:class:`benchmarks.bench_service.Server`, caches off):
  captions/s of a cold stream pass, and the memory of all its processes (RSS summed, and PSS,
  which counts the pages the workers share once);
* **approximate mode** (jaccard 0.7): the first request after load, captions/s cold, RSS after
  — under a guard, since a pathological engine must not take the machine down: the process
  runs with an address-space limit and an RSS watchdog and a timeout, and the report says
  "did not finish: <reason>" instead of hanging;
* **quality**: ``conceptsvc evaluate --local --profile rocov2`` primary/secondary F1 (when the
  ROCOv2 gold files are there), which must not move with the synthetic concepts merged in.

Each measured stage is a process of its own (``--probe``), so that its memory is its own.
The releases are kept in ``--data`` (default ``bench-out/umls``) between runs and regenerated
only when the generator's version or parameters changed (``stamp.json`` beside each META); the
indexes are rebuilt every run (the build is measured). The report replaces its section of
BENCHMARKS.md (``--write``), with the command, the machine, the date and the load average
before and after; a load above 1.2 before the run marks the figures as not comparable.

Quick check of the harness (not of the targets): ``--rows 200000``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import BENCH_OUT, CHECKOUT, ROCOV2
from benchmarks.bench_index import dir_size, parse_size, size_label
from benchmarks.processes import run_measured
from benchmarks.soak import write_section
from benchmarks.synth_umls import AMBIGUITY, GENERATOR_VERSION
from conceptsvc.embedded import DEMO_META

__all__ = ["TARGETS", "main", "markdown", "measure_index", "run"]

log = logging.getLogger(__name__)

DEFAULT_DATA = BENCH_OUT / "umls"
DEFAULT_CAPTIONS = ROCOV2 / "valid_captions.csv"
SECTION_TAG = "bench-umls"
SECTION_HEADING = "UMLS scale: a full release beside the demo dictionary (issue 13)"
QUIET_LOAD = 1.2  # 1-minute load average above which the figures are marked

#: Issue 13's targets at 16M rows (realistic + demo; stress) and for the demo index.
TARGETS = {
    "realistic": {"exact_cold": 20_000, "first_request_ms": 50, "rss_mb": 1536,
                  "service_rss_mb": 3072},
    "stress": {"exact_cold": 5_000, "rss_mb": 3072},
    "demo": {"exact_cold": 35_000},
    "build_s": 15 * 60, "build_peak_mb": 12 * 1024, "index_mb": 3 * 1024, "f1_delta": 0.005,
}
_SIMILARITY, _THRESHOLD, _PROFILE = "jaccard", 0.7, "rocov2"


# -- probes: each runs in a process of its own ----------------------------------------------

def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _probe_extract(index_dir: Path, captions_csv: Path, mode: str, repeat: int) -> dict[str, Any]:
    from benchmarks.bench_extract import bench
    from conceptsvc.evaluation import read_captions
    from conceptsvc.extractor import Extractor
    from conceptsvc.index import ConceptIndex
    from conceptsvc.model import ExtractOptions

    captions = read_captions(captions_csv)
    out: dict[str, Any] = {"rss_before_load_mb": _status_mb("VmRSS")}
    t0 = time.perf_counter()
    index = ConceptIndex.load(index_dir)
    out["load_s"] = round(time.perf_counter() - t0, 3)
    out["rss_after_load_mb"] = _status_mb("VmRSS")
    t0 = time.perf_counter()
    extractor = Extractor(index)
    out["extractor_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    options = ExtractOptions(mode=mode, similarity=_SIMILARITY, threshold=_THRESHOLD,
                             profile=_PROFILE)
    t0 = time.perf_counter()
    extractor.extract(captions[0][1], options, id=captions[0][0])
    out["first_request_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    out.update(bench(extractor, captions, options, repeat=repeat, profile=False))
    out["rss_after_run_mb"] = _status_mb("VmRSS")
    out["peak_rss_mb"] = _status_mb("VmHWM")
    return out


def _probe_service(
    index_dir: Path, captions_csv: Path, workers: int, streams: int
) -> dict[str, Any]:
    from benchmarks.bench_service import Server, service_pass
    from conceptsvc.evaluation import read_captions

    captions = read_captions(captions_csv)
    t0 = time.perf_counter()
    server = Server(["--index", str(index_dir), "--workers", str(workers), "--cache-size", "0"])
    try:
        out: dict[str, Any] = {"workers": workers, "streams": streams,
                               "startup_s": round(time.perf_counter() - t0, 2),
                               "memory_after_startup": server.rss_mb()}
        out["stream_cold"] = service_pass(server, captions, streams)
        out["batch_cold"] = service_pass(server, captions, streams, batch_size=512)
        out["memory_after_run"] = server.rss_mb()
    finally:
        server.stop()
    return out


def _probe_stats(index_dir: Path) -> dict[str, Any]:
    from benchmarks.synth_umls import ambiguity_stats
    from conceptsvc.index import ConceptIndex

    s = ambiguity_stats(ConceptIndex.load(index_dir))
    return dataclasses.asdict(s) | {
        "ambiguous_key_share": round(s.ambiguous_key_share, 5),
        "ambiguous_concept_share": round(s.ambiguous_concept_share, 5),
        "ambiguous_abbreviation_share": round(s.ambiguous_abbreviation_share, 5),
    }


def _probe(args: argparse.Namespace) -> int:
    kind = args.probe
    if kind in ("exact", "approximate"):
        result = _probe_extract(args.index, args.captions, kind, args.repeat)
    elif kind == "service":
        result = _probe_service(args.index, args.captions, args.workers, args.streams)
    else:
        result = _probe_stats(args.index)
    args.result.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


# -- the run -------------------------------------------------------------------------------

def _release(data: Path, variant: str, rows: int, timeout: float) -> tuple[Path, dict[str, Any]]:
    """The META directory of ``variant`` at ``rows`` rows, generated unless its stamp says it
    was generated by this generator with these parameters; and what generating it cost (empty
    when kept)."""
    home = data / f"synth-{variant}-{size_label(rows)}"
    meta, stamp = home / "META", home / "stamp.json"
    want = {"generator_version": GENERATOR_VERSION, "rows": rows, "ambiguity": variant,
            "seed": 7, "sabs": 100}
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == want:
        return meta, {}
    home.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # a failed generation leaves no stamp: regenerated next time
    log.info("[%s] generating %s rows into %s", variant, f"{rows:,}", meta)
    gen = run_measured(
        [sys.executable, "-m", "benchmarks.synth_umls", "--rows", str(rows), "--ambiguity",
         variant, "--seed", "7", "--sabs", "100", "--out", str(meta)],
        log_path=home / "generate.log", timeout=timeout,
    )
    if "error" in gen:
        raise RuntimeError(f"generating {meta} failed: {gen['error']} (see {home}/generate.log)")
    stamp.write_text(json.dumps(want) + "\n", encoding="utf-8")
    return meta, gen


def _stage(
    kind: str,
    index_dir: Path,
    args: argparse.Namespace,
    work: Path,
    *,
    timeout: float,
    max_rss_mb: float | None = None,
    address_space_mb: float | None = None,
) -> dict[str, Any]:
    """One probe in a process of its own; its result, with the process's figures."""
    result_path = work / f"{kind}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.bench_umls", "--probe", kind, "--index",
           str(index_dir), "--captions", str(args.captions), "--result", str(result_path),
           "--repeat", str(0 if kind == "approximate" else args.repeat),
           "--workers", str(args.workers), "--streams", str(args.streams)]
    proc = run_measured(cmd, log_path=work / f"{kind}.log", timeout=timeout,
                        max_rss_mb=max_rss_mb, address_space_mb=address_space_mb)
    if "error" in proc:
        log.warning("%s on %s: %s", kind, index_dir.name, proc["error"])
        return {"error": proc["error"], "process": proc}
    result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
    return result | {"process": proc}


def _quality(index_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    gold, manual = args.rocov2 / "valid_concepts.csv", args.rocov2 / "valid_concepts_manual.csv"
    if not (gold.is_file() and manual.is_file()):
        return {"error": f"not measured: {gold} or {manual} not found"}
    out = work / "quality.json"
    proc = run_measured(
        [sys.executable, "-m", "conceptsvc.cli", "evaluate", "--local", "--captions",
         str(args.captions), "--gold", str(gold), "--manual", str(manual), "--index",
         str(index_dir), "--profile", _PROFILE, "--json"],
        log_path=work / "quality.log", stdout_path=out, timeout=args.stage_timeout,
    )
    if "error" in proc:
        return {"error": proc["error"]}
    scores = json.loads(out.read_text(encoding="utf-8"))
    return {k: scores[k] for k in ("primary_f1", "secondary_f1", "n_images")}


def measure_index(
    name: str, metas: Sequence[Path], args: argparse.Namespace
) -> dict[str, Any]:
    """Build one index from ``metas`` and run every stage on it."""
    work = args.data / f"run-{name}"
    work.mkdir(parents=True, exist_ok=True)
    index_dir = args.data / f"index-{name}"
    cmd = [sys.executable, "-m", "conceptsvc.cli", "index", "build"]
    for meta in metas:
        cmd += ["--umls", str(meta)]
    cmd += ["--out", str(index_dir), "--workers", str(args.workers)]
    log.info("[%s] building %s", name, index_dir)
    r: dict[str, Any] = {"name": name, "build_command": " ".join(
        ["conceptsvc", *cmd[3:]])}
    r["build"] = run_measured(cmd, log_path=work / "build.log", timeout=args.build_timeout)
    if "error" in r["build"]:
        return r
    manifest = json.loads((index_dir / "manifest.json").read_text(encoding="utf-8"))
    r["counts"] = {k: manifest["counts"][k] for k in ("concepts", "keys", "postings")}
    r["index_mb"] = round(dir_size(index_dir) / 2**20, 1)
    r["rrf_rows"] = sum(_rows(m) for m in metas)
    stages = ["stats", "exact", "service", "approximate"]
    for kind in stages:
        if kind == "service" and args.no_service:
            continue
        log.info("[%s] %s", name, kind)
        if kind == "approximate":
            r[kind] = _stage(kind, index_dir, args, work, timeout=args.approx_timeout,
                             max_rss_mb=args.approx_max_rss_mb,
                             address_space_mb=args.approx_address_space_mb)
        else:
            r[kind] = _stage(kind, index_dir, args, work, timeout=args.stage_timeout)
    if not args.no_quality:
        log.info("[%s] quality", name)
        r["quality"] = _quality(index_dir, args, work)
    return r


def _rows(meta: Path) -> int:
    """MRCONSO rows of ``meta``: MRFILES's count, else the file's lines (the demo META)."""
    from conceptsvc.sources.rrf import MetaDir

    rows = MetaDir(meta).expected_rows("MRCONSO.RRF")
    if rows is None:
        with (meta / "MRCONSO.RRF").open("rb") as f:
            rows = sum(1 for _ in f)
    return rows


def _machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem_kb / 2**20:.0f} GB RAM, "
            f"Python {platform.python_version()}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate (if needed), build and measure every index; the summary for the report."""
    summary: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "rows": args.rows,
        "variants": args.variants,
        "captions": str(args.captions),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    args.data.mkdir(parents=True, exist_ok=True)
    metas: dict[str, list[Path]] = {"demo": [DEMO_META]}
    summary["generated"] = {}
    for variant in args.variants:
        meta, gen = _release(args.data, variant, args.rows, args.build_timeout)
        metas[variant] = [meta, DEMO_META]
        summary["generated"][variant] = gen or "kept from an earlier run"
    summary["load_before_measuring"] = [round(x, 2) for x in os.getloadavg()]
    summary["indexes"] = [measure_index(name, ms, args) for name, ms in metas.items()]
    summary["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return summary


# -- the report ------------------------------------------------------------------------------

def _n(x: float | None, unit: str = "", digits: int = 0) -> str:
    return "–" if x is None else f"{x:,.{digits}f}{unit}"


def _mb(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x / 1024:,.2f} GB" if x >= 1024 else f"{x:,.0f} MB"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else " ✓" if ok else " ✗"


def _get(r: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(r, dict) or p not in r:
            return None
        r = r[p]
    return r


def _cells(r: dict[str, Any], full: bool, demo_f1: float | None) -> dict[str, str]:
    """One index's column of the report; ``full`` marks the targets (16M rows only)."""
    name = r["name"]
    t = TARGETS.get(name, {})
    assert isinstance(t, dict)

    def target(value: float | None, key: str, above: bool) -> bool | None:
        if not full or value is None or key not in t:
            return None
        return bool(value >= t[key] if above else value <= t[key])

    def failed(stage: str) -> str | None:
        err = _get(r, stage, "error")
        return f"did not finish: {err}" if err else None

    c: dict[str, str] = {}
    b = r["build"]
    if "error" in b:
        return {"build": f"did not finish: {b['error']}"}
    limit_ok = (full or None) and (b["wall_s"] <= TARGETS["build_s"]
                                   and b["peak_tree_rss_mb"] <= TARGETS["build_peak_mb"])
    c["rows"] = _n(r.get("rrf_rows"))
    c["concepts / keys"] = f"{r['counts']['concepts']:,} / {r['counts']['keys']:,}"
    s = r.get("stats", {})
    c["ambiguous keys"] = failed("stats") or (
        f"{s['ambiguous_keys']:,} ({s['ambiguous_key_share']:.1%}); "
        f"{s['ambiguous_concept_share']:.1%} of concepts; max {s['max_concepts_per_key']:,} "
        f"({s['most_ambiguous'][0][0] if s['most_ambiguous'] else '–'})")
    c["build wall / CPU"] = f"{b['wall_s']:,.0f} s / {b['cpu_s']:,.0f} s{_mark(limit_ok)}"
    c["build peak memory"] = (f"{_mb(b['peak_tree_rss_mb'])} RSS, {_mb(b['peak_tree_pss_mb'])} "
                              f"PSS (largest process {_mb(b['peak_rss_mb'])})")
    c["index on disk"] = _mb(r["index_mb"]) + _mark(
        (full or None) and r["index_mb"] <= TARGETS["index_mb"])
    e = r.get("exact", {})
    err = failed("exact")
    c["load"] = err or f"{e['load_s']:.2f} s"
    c["first exact request after load"] = err or (
        f"{e['first_request_ms']:,.1f} ms (+ {e['extractor_ms']:,.1f} ms extractor)"
        + _mark(target(e["first_request_ms"] + e["extractor_ms"], "first_request_ms", False)))
    c["exact captions/s cold"] = err or (
        f"{e['cold_captions_per_s_wall']:,.0f} ({e['cold_captions_per_s_cpu']:,.0f}/CPU-s)"
        + _mark(target(e["cold_captions_per_s_wall"], "exact_cold", True)))
    c["exact captions/s warm"] = err or f"{e['captions_per_s_wall']:,.0f}"
    c["exact median µs per caption (warm)"] = err or f"{e['median_us_per_caption']:,.1f}"
    c["RSS after the exact run (one process)"] = err or (
        f"{_mb(e['rss_after_run_mb'])} (peak {_mb(e['peak_rss_mb'])})"
        + _mark(target(e["rss_after_run_mb"], "rss_mb", False)))
    sv = r.get("service")
    if sv is not None:
        err = failed("service")
        cold = _get(sv, "stream_cold")
        mem = _get(sv, "memory_after_run")
        c["service (2 workers) cold stream captions/s"] = err or (
            f"{cold['captions_per_s']:,.0f} ({cold['errors']} errors; start-up "
            f"{sv['startup_s']:.1f} s)")
        batch = sv.get("batch_cold")
        if batch is not None:
            c["service (2 workers) cold AnnotateBatch captions/s"] = err or (
                f"{batch['captions_per_s']:,.0f} ({batch['errors']} errors; 512 a message)")
        c["service memory in all after the run"] = err or (
            f"{_mb(mem['rss_mb'])} RSS, {_mb(mem['pss_mb'])} PSS"
            + _mark(target(mem["rss_mb"], "service_rss_mb", False)))
    a = r.get("approximate", {})
    err = failed("approximate")
    c["approximate: first request after load"] = err or (
        f"{a['first_request_ms'] / 1000:,.2f} s (+ {a['extractor_ms']:,.1f} ms extractor)")
    c["approximate captions/s cold"] = err or (
        f"{a['cold_captions_per_s_wall']:,.0f} ({a['cold_captions_per_s_cpu']:,.0f}/CPU-s)")
    c["RSS after the approximate run"] = err or (
        f"{_mb(a['rss_after_run_mb'])} (peak {_mb(a['peak_rss_mb'])})")
    q = r.get("quality")
    if q is not None:
        if "error" in q:
            c["primary / secondary F1 (exact, rocov2)"] = q["error"]
        else:
            ok = None if demo_f1 is None or name != "realistic" else (
                abs(q["primary_f1"] - demo_f1) <= TARGETS["f1_delta"])
            c["primary / secondary F1 (exact, rocov2)"] = (
                f"{q['primary_f1']:.4f} / {q['secondary_f1']:.4f}{_mark(ok)}")
    return c


_TARGET_TEXT = {
    "build wall / CPU": "≤ 15 min, ≤ 12 GB peak (16M)",
    "index on disk": "≤ 3 GB",
    "first exact request after load": "≤ 50 ms (realistic)",
    "exact captions/s cold": "≥ 20,000 realistic, ≥ 5,000 stress, ≥ 35,000 demo",
    "RSS after the exact run (one process)": "≤ 1.5 GB realistic, ≤ 3 GB stress",
    "service memory in all after the run": "≤ 3 GB (realistic)",
    "primary / secondary F1 (exact, rocov2)": "realistic: primary within 0.005 of the demo's",
}


def markdown(summary: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section of one run."""
    full = summary["rows"] >= 16_000_000
    indexes = summary["indexes"]
    demo_f1 = next((_get(r, "quality", "primary_f1") for r in indexes if r["name"] == "demo"),
                   None)
    cols = [_cells(r, full, demo_f1) for r in indexes]
    label = size_label(summary["rows"])
    heads = [r["name"] if r["name"] == "demo" else f"{r['name']} {label} + demo" for r in indexes]
    before, after = summary["load_before"], summary["load_after"]
    busy = before[0] > QUIET_LOAD
    lines = [
        f"### Run of {summary['date']} — {summary['rows']:,} synthetic rows "
        f"({', '.join(summary['variants'])}) + the demo dictionary",
        "",
        f"Command: `{command}`  ",
        f"Machine: {summary['machine']}.  ",
        f"Load average (1/5/15 min) before the run: {' / '.join(map(str, before))}; before the "
        f"measurements (after any generation): "
        f"{' / '.join(map(str, summary['load_before_measuring']))}; after: "
        f"{' / '.join(map(str, after))} (the run's own last stages included).",
    ]
    if busy:
        lines += ["", f"**⚠ Load average {before[0]} > {QUIET_LOAD} before the run: other jobs "
                  "shared the CPUs; these figures are not comparable with a quiet machine's and "
                  "do not decide the targets.**"]
    gen = summary.get("generated", {})
    releases = [f"{v} kept from an earlier run" if isinstance(g, str)
                else f"{v} generated in {g['wall_s']:,.0f} s" for v, g in gen.items()]
    lines += ["", f"Releases: {'; '.join(releases) or 'none'}. Captions: "
              f"`{os.path.relpath(summary['captions'], CHECKOUT)}` (from the checkout).", ""]
    names = [k for c in cols for k in c]
    order = list(dict.fromkeys(names))
    lines.append("| figure | " + " | ".join(heads) + " | target |")
    lines.append("|---|" + "---|" * len(heads) + "---|")
    for key in order:
        lines.append(f"| {key} | " + " | ".join(c.get(key, "–") for c in cols)
                     + f" | {_TARGET_TEXT.get(key, '')} |")
    lines += [
        "",
        "✓/✗: the issue's target met/missed (speed and memory at 16M rows only; quality, "
        "which does not depend on the machine, at any size). Build memory: the "
        "build's process tree, summed and sampled every 0.25 s (PSS counts pages the workers "
        "share once). Exact and approximate: one process each, `Extractor` with the "
        f"`{_PROFILE}` profile; cold = a fresh extractor's first pass; warm = best of "
        f"{summary.get('repeat', 3)} passes after a warm-up. Approximate: jaccard "
        f"{_THRESHOLD}, cold pass only, under a guard (timeout, RSS watchdog, address-space "
        "limit). Service: `conceptsvc serve --workers 2 --cache-size 0`, 4 streams.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench umls",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rows", type=parse_size, default=16_000_000,
                   help="MRCONSO rows of each synthetic release (default 16M; 200k checks the "
                   "harness in a minute)")
    p.add_argument("--variants", default="realistic,stress",
                   help=f"synthetic releases to measure, comma-separated ({', '.join(AMBIGUITY)})")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="where releases (kept between runs) and indexes go "
                   "(default bench-out/umls in the checkout)")
    p.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS,
                   help="ID,Caption CSV (default: the ROCOv2 validation captions beside the "
                   "checkout)")
    p.add_argument("--rocov2", type=Path, default=ROCOV2,
                   help="directory with valid_concepts.csv and valid_concepts_manual.csv for "
                   "the quality check (default ../shared/data/rocov2)")
    p.add_argument("--workers", type=int, default=2, help="build and service workers")
    p.add_argument("--streams", type=int, default=4, help="service client streams")
    p.add_argument("--repeat", type=int, default=3, help="warm exact passes")
    p.add_argument("--build-timeout", type=float, default=3600)
    p.add_argument("--stage-timeout", type=float, default=1800,
                   help="seconds after which an exact/service/quality stage is stopped")
    p.add_argument("--approx-timeout", type=float, default=600)
    p.add_argument("--approx-max-rss-mb", type=float, default=8192,
                   help="RSS at which the approximate stage is stopped (default 8 GB)")
    p.add_argument("--approx-address-space-mb", type=float, default=16384,
                   help="RLIMIT_AS of the approximate stage (default 16 GB; the index is "
                   "mapped, so this must exceed its size)")
    p.add_argument("--no-service", action="store_true")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--refuse-busy", action="store_true",
                   help=f"exit without measuring if the load average is above {QUIET_LOAD}")
    p.add_argument("--write", type=Path, nargs="?", const=CHECKOUT / "BENCHMARKS.md",
                   default=None, help="replace this benchmark's section of BENCHMARKS.md (or of "
                   "the file given)")
    p.add_argument("--json", type=Path, help="also write the summary here (default "
                   "DATA/bench_umls.json)")
    # internal: a measured stage (see _stage)
    p.add_argument("--probe", choices=["stats", "exact", "approximate", "service"],
                   help=argparse.SUPPRESS)
    p.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(args_list)
    if args.probe is not None:
        return _probe(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    # The stages run from the checkout: paths given relative to here must not change meaning.
    args.data, args.captions, args.rocov2 = (path.resolve() for path in (
        args.data, args.captions, args.rocov2))
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in AMBIGUITY]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(AMBIGUITY)}")
    if not args.captions.is_file():
        p.error(f"{args.captions}: no such file; give the captions with --captions")
    load = os.getloadavg()[0]
    if load > QUIET_LOAD:
        log.warning("load average %.2f > %.1f: the figures will be marked as not comparable",
                    load, QUIET_LOAD)
        if args.refuse_busy:
            return 3
    summary = run(args) | {"repeat": args.repeat}
    out = args.json or args.data / "bench_umls.json"
    out.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    text = markdown(summary, "python -m benchmarks.bench umls " + " ".join(args_list))
    print(text)
    if args.write is not None:
        write_section(args.write, text, tag=SECTION_TAG, heading=SECTION_HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
