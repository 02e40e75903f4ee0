"""``make bench-umls``'s harness on a tiny release: every stage runs in its own process, the
report is produced and its numbers are sane; a runaway stage is stopped, not waited for.
(Timings are the benchmark's business; nothing here checks a speed.)"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.bench_umls import SECTION_TAG, _release, _stage, main, markdown
from benchmarks.processes import run_measured
from conceptsvc.demo import CAPTIONS as DEMO_CAPTIONS
from conceptsvc.evaluation import read_captions


def test_bench_umls_reports_every_stage(tmp_path: Path) -> None:
    data, doc = tmp_path / "data", tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Another benchmark\n\nkept as it is\n", encoding="utf-8")
    argv = ["--rows", "2000", "--variants", "realistic", "--data", str(data), "--captions",
            str(DEMO_CAPTIONS), "--no-quality", "--repeat", "1", "--write", str(doc)]
    assert main(argv) == 0
    n_captions = len(read_captions(DEMO_CAPTIONS))
    summary = json.loads((data / "bench_umls.json").read_text(encoding="utf-8"))
    demo, real = summary["indexes"]
    assert (demo["name"], real["name"]) == ("demo", "realistic")
    assert real["rrf_rows"] == demo["rrf_rows"] + 2000
    assert real["counts"]["concepts"] > demo["counts"]["concepts"] + 300
    for r in (demo, real):
        b = r["build"]
        assert "error" not in b and b["wall_s"] > 0 and b["cpu_s"] > 0
        assert 20 < b["peak_rss_mb"] < 4096 and 20 < b["peak_tree_rss_mb"] < 4096
        assert 0 < r["index_mb"] < 50
        assert r["stats"]["keys"] == r["counts"]["keys"]
        e = r["exact"]
        assert e["captions"] == n_captions and e["mode"] == "exact"
        assert e["cold_captions_per_s_wall"] > 0 and e["captions_per_s_wall"] > 0
        assert e["median_us_per_caption"] > 0 and 0 <= e["load_s"] < 30
        assert 30 < e["rss_after_run_mb"] <= e["peak_rss_mb"] < 2048
        s = r["service"]
        assert s["stream_cold"]["ok"] == n_captions and s["stream_cold"]["errors"] == 0
        assert s["memory_after_run"]["pss_mb"] <= s["memory_after_run"]["rss_mb"]
        assert s["memory_after_run"]["rss_mb"] > 3 * 30  # supervisor and two workers
        a = r["approximate"]
        assert a["mode"] == "approximate" and a["cold_captions_per_s_wall"] > 0
        assert "captions_per_s_wall" not in a  # cold pass only
    text = doc.read_text(encoding="utf-8")
    assert "kept as it is" in text and text.count(f"<!-- {SECTION_TAG}:begin -->") == 1
    assert "| exact captions/s cold |" in text and "realistic 2k + demo" in text
    # The release is kept for the next run; a changed stamp (generator, parameters) regenerates.
    assert _release(data, "realistic", 2000, 60)[1] == {}
    stamp = data / "synth-realistic-2k" / "stamp.json"
    stamp.write_text(stamp.read_text().replace('"seed": 7', '"seed": 8'))
    assert _release(data, "realistic", 2000, 60)[1]["wall_s"] > 0

    # A stage past its memory guard is stopped and reported, never waited for.
    args = argparse.Namespace(captions=DEMO_CAPTIONS, repeat=0, workers=2, streams=4)
    stopped = _stage("approximate", data / "index-demo", args, tmp_path, timeout=120,
                     max_rss_mb=25)
    assert stopped["error"].startswith("stopped at")
    real["approximate"] = stopped
    assert "did not finish: stopped at" in markdown(summary, "python -m benchmarks.bench umls")


def test_bench_umls_guards_stop_runaway_processes(tmp_path: Path) -> None:
    log = tmp_path / "log"
    grow = [sys.executable, "-c", "import time; x = b'x' * (400 * 2**20); time.sleep(60)"]
    r = run_measured(grow, log_path=log, max_rss_mb=150, timeout=50)
    assert r["error"].startswith("stopped at") and r["wall_s"] < 45
    r = run_measured(grow, log_path=log, address_space_mb=300, timeout=50)
    assert "MemoryError" in r["error"] and r["returncode"] == 1
    r = run_measured([sys.executable, "-c", "import time; time.sleep(60)"], log_path=log,
                     timeout=1)
    assert r["error"] == "did not finish in 1 s" and r["wall_s"] < 30
