"""``make soak`` itself: a two-second miniature run against a real server, and its report."""

from __future__ import annotations

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
