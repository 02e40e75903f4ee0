"""The peers benchmark driver, run for real with QuickUMLS from this venv.

``make peers`` puts QuickUMLS, MedCAT and mmlite into ``.venv-peers``; CI has QuickUMLS in the
main venv too (the ``quickumls`` extra), so these tests pass this interpreter as the peers'
interpreter and exercise the real subprocess path, QuickUMLS build, predictions and scoring.
MedCAT and mmlite are exercised by the benchmark itself, not here.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from benchmarks import bench_peers
from conceptsvc.backends.quickumls import QUICKUMLS_INSTALL_HINT, quickumls_available
from conceptsvc.errors import ConfigError

META = Path(__file__).parent / "fixtures" / "quickumls_META"

if not quickumls_available():
    if os.environ.get("CI"):
        pytest.fail(
            f"quickumls is not installed in this venv; {QUICKUMLS_INSTALL_HINT}", pytrace=False
        )
    pytest.skip(f"quickumls is not installed; {QUICKUMLS_INSTALL_HINT}", allow_module_level=True)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def rocov2(tmp_path: Path) -> Path:
    d = tmp_path / "rocov2"
    d.mkdir()
    write_csv(d / "valid_captions.csv", ["ID", "Caption"], [
        ["img1", "CT of the abdomen"],
        ["img2", "Pleural effusion."],
        ["img3", "Nothing to see."],
    ])
    write_csv(d / "valid_concepts.csv", ["ID", "CUIs"], [
        ["img1", "C0040405;C0000726"],
        ["img2", "C0032227"],
        ["img3", ""],
    ])
    write_csv(d / "valid_concepts_manual.csv", ["ID", "CUIs"], [
        ["img1", "C0040405;C0000726"],
        ["img2", ""],
        ["img3", ""],
    ])
    return d


def test_bench_peers_run_peers_scores_quickumls(rocov2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = bench_peers.run_peers(
        rocov2, META, out, peers=["quickumls"], python=sys.executable
    )
    q = summary["peers"]["quickumls"]
    # img1: QuickUMLS lists both concepts of "CT" (CT scan, Chlamydia trachomatis) plus the
    # abdomen → F1 2·2/(3+2) = 0.8; img2 → 1.0; img3 has no gold and is not scored.
    assert q["primary_f1"] == pytest.approx(0.9)
    # Keeping the best-ranked concept per span drops Chlamydia trachomatis (its "CT" atom is
    # not preferred), so both images score 1.0.
    assert q["scores"]["top1"]["primary_f1"] == pytest.approx(1.0)
    assert q["secondary_f1"] == pytest.approx(1.0)  # C0008149 is outside the 14 manual CUIs
    assert q["captions"] == 3 and q["captions_per_s"] > 0 and q["us_median"] > 0
    assert q["settings"]["min_match_length"] == 2
    rows = list(csv.reader((out / "quickumls.csv").read_text(encoding="utf-8").splitlines()))
    assert rows[0] == ["ID", "CUIs"]
    assert set(rows[1][1].split(";")) == {"C0040405", "C0008149", "C0000726"}
    assert json.loads((out / "summary.json").read_text())["peers"]["quickumls"]["captions"] == 3
    assert summary["meta_sha256"] == bench_peers.snapshot_meta(META, tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["MRCONSO.RRF", "MRSTY.RRF"]
    table = bench_peers.format_table(summary)
    assert "| quickumls 1.4.2 | 0.900 | 1.000 |" in table
    assert "| quickumls 1.4.2 (top1) | 1.000 | 1.000 |" in table


def test_bench_peers_quickumls_baseline_and_build_timing(tmp_path: Path) -> None:
    captions = [(f"c{i}", "MRI of the abdomen shows a pleural effusion") for i in range(20)]
    rate = bench_peers.quickumls_baseline(META, captions, python=sys.executable)
    assert rate > 0
    timing = bench_peers.quickumls_build_timing(META, python=sys.executable)
    assert timing["rows_read"] == 14
    assert timing["seconds"] > 0
    assert timing["index_bytes"] > 0
    assert timing["peak_rss_mb"] > 0


def test_bench_peers_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="make peers"):
        bench_peers.peers_python(tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(ConfigError, match=r"no MRCONSO\.RRF"):
        bench_peers.quickumls_build_timing(tmp_path, python=sys.executable)
    with pytest.raises(ConfigError, match=r"valid_captions\.csv not found"):
        bench_peers.run_peers(tmp_path, META, tmp_path / "out", python=sys.executable)
    assert bench_peers.main(["--peers", "quickumls", "--rocov2", str(tmp_path)]) == 2
