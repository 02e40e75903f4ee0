"""``make soak`` itself: a two-second miniature run against a real server, and its report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from service_helpers import build_index_a

from benchmarks.soak import main, write_section


def test_soak_short_run_reports_and_writes_its_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = build_index_a(tmp_path / "a")
    doc = tmp_path / "RELIABILITY.md"
    doc.write_text("# R\n\nbefore\n<!-- soak:begin -->\nold\n<!-- soak:end -->\nafter\n")
    code = main(["--duration", "3", "--clients", "2", "--client-processes", "1",
                 "--workers", "1", "--index", str(index), "--warmup", "0.5",
                 "--sample-every", "1", "--stream-size", "8", "--write", str(doc)])
    out = capsys.readouterr().out
    assert "| errors | 0 failed streams, 0 failed items" in out
    assert "| server exit on SIGTERM | 0 |" in out
    text = doc.read_text()
    assert "old" not in text and text.startswith("# R\n\nbefore\n<!-- soak:begin -->\n| figure")
    assert text.endswith("<!-- soak:end -->\nafter\n")
    assert "captions annotated" in text
    # The exit status follows the verdict (RSS growth over 3 s of warm-up is not meaningful).
    assert (code == 0) == ("| verdict | targets met |" in out)


def test_soak_write_section_appends_when_markers_are_missing(tmp_path: Path) -> None:
    doc = tmp_path / "R.md"
    doc.write_text("# R\n")
    write_section(doc, "| a | b |")
    expected = "# R\n\n## Soak\n\n<!-- soak:begin -->\n| a | b |\n<!-- soak:end -->\n"
    assert doc.read_text() == expected


def test_soak_option_sets_scenario_reports_rss_and_counts_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue 18 (item 5) scenario in miniature: distinct 9,999-name option sets for a few
    seconds against one worker; the two-minute run is `make soak`'s. Its report has the RSS
    figures and a verdict that sets the exit status; requests over the server's cap are
    counted as failures (the scenario can fail), and a section of its own is written."""
    index = build_index_a(tmp_path / "a")
    doc = tmp_path / "RELIABILITY.md"
    doc.write_text("# R\n<!-- soak:begin -->\nkept\n<!-- soak:end -->\n")
    code = main(["--scenario", "option-sets", "--duration", "4", "--index", str(index),
                 "--warmup", "1", "--sample-every", "0.5", "--write", str(doc)])
    out = capsys.readouterr().out
    assert "exclude_cuis list of 9,999 names never sent before" in out
    assert "server: 1 worker process(es)" in out
    requests = re.search(r"\| requests \| ([\d,]+) \(.*\), (\d+) failed", out)
    assert requests is not None and int(requests.group(1).replace(",", "")) > 0
    assert requests.group(2) == "0"
    rss = re.search(r"first ([\d.]+) MiB; after warm-up ([\d.]+) MiB; peak after warm-up "
                    r"([\d.]+) MiB \(([+-][\d.]+) %", out)
    assert rss is not None and 0 < float(rss.group(2)) <= float(rss.group(3))
    assert "| server exit on SIGTERM | 0 |" in out
    assert (code == 0) == ("| verdict | targets met |" in out)
    text = doc.read_text()
    assert "kept" in text  # the captions soak's section is left alone
    assert "## Soak: distinct large option sets\n\n<!-- soak-options:begin -->\n| figure" in text
    # over the server's max_option_items (10,000): every request refused, the verdict missed
    code = main(["--scenario", "option-sets", "--duration", "2", "--index", str(index),
                 "--warmup", "0.5", "--sample-every", "0.5", "--option-items", "10001"])
    out = capsys.readouterr().out
    assert code == 1 and "| verdict | TARGETS MISSED |" in out
    assert "RESOURCE_EXHAUSTED" in out and "max_option_items" in out
