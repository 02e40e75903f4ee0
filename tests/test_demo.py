"""`make demo` end to end: real service subprocess, real annotate and evaluate commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conceptsvc.demo import CAPTIONS, GOLD, GOLD_MANUAL
from conceptsvc.evaluation import read_concepts, score


@pytest.mark.slow
def test_demo_runs_the_whole_job(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONCEPTSVC_")},
        "CONCEPTSVC_CACHE_DIR": str(tmp_path / "cache"),  # a fresh machine: builds the index
    }
    out_dir = tmp_path / "demo-out"
    proc = subprocess.run(
        [sys.executable, "-m", "conceptsvc.demo", "--out-dir", str(out_dir)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    # every step ran, in order, and the service was stopped gracefully
    steps = [int(m) for m in re.findall(r"^=== (\d)\.", log, flags=re.M)]
    assert steps == [1, 2, 3, 4, 5]
    assert "SERVING" in log and "service exited with status 0" in log
    assert list((tmp_path / "cache").iterdir())
    # the annotate command's report and the evaluation were printed
    assert "Corpus report" in log and "Top 20 concepts" in log
    n_captions = len(read_concepts(GOLD))
    assert f"captions                 {n_captions}" in log
    m = re.search(r"primary F1\s+([0-9.]+)", log)
    assert m is not None and "secondary F1" in log
    # the printed score is the score of the file the demo wrote
    pred = read_concepts(out_dir / "demo.csv")
    assert len(pred) == n_captions
    expected = score(pred, read_concepts(GOLD), read_concepts(GOLD_MANUAL))
    assert float(m.group(1)) == pytest.approx(expected.primary_f1, abs=1e-4)
    assert expected.primary_f1 > 0.5  # the demo dictionary and profile do real work
    manifest = json.loads((out_dir / "demo.csv.manifest.json").read_text())
    assert manifest["complete"] and manifest["options"]["profile"] == "rocov2"
    assert manifest["input"]["path"] == str(CAPTIONS.resolve())
    for name in ("demo.jsonl", "demo.csv.report.md", "demo.csv.report-top-concepts.png",
                 "demo.csv.report.html"):
        assert (out_dir / name).stat().st_size > 0
    # every file the demo writes is removed before its next run, and the report page is named
    from conceptsvc.demo import _OUTPUTS

    assert {p.name for p in out_dir.iterdir()} <= set(_OUTPUTS)
    assert "demo.csv.report.html" in log.rsplit("Demo finished", 1)[1]
