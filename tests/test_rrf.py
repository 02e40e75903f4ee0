"""RRF readers against real-format fixtures: NLM's sample, plain/gz/split, MRFILES, quirks."""

from __future__ import annotations

from pathlib import Path

import pytest

from conceptsvc.errors import DictionaryError, MalformedRowError
from conceptsvc.sources import ReadStats
from conceptsvc.sources.rrf import (
    STANDARD_COLUMNS,
    MetaDir,
    iter_mrconso,
    iter_mrrank,
    iter_mrsab,
    iter_mrsty,
    read_release,
    read_table,
)

FIXTURES = Path(__file__).parent / "fixtures"
N_ATOMS = 31  # rows in the rrf_* fixtures' MRCONSO (see fixtures/make_rrf_fixtures.py)


def _atoms(name: str) -> list[tuple[str, ...]]:
    return [tuple(r) for r in iter_mrconso(MetaDir(FIXTURES / name))]


def test_rrf_nlm_sample_reads_with_mrfiles_columns() -> None:
    meta = MetaDir(FIXTURES / "umls_META")
    assert meta.columns("MRCONSO.RRF") == STANDARD_COLUMNS["MRCONSO.RRF"]
    rows = list(iter_mrconso(meta))
    # The sample's MRCONSO has no final newline; the last row must still be read.
    assert [r.cui for r in rows] == ["C0000005", "C0000005", "C0000039"]
    assert rows[1].string == "(131)I-MAA" and rows[1].tty == "ET" and rows[1].ts == "S"
    assert rows[2].ispref == "N" and rows[2].suppress == "N"
    stys = list(iter_mrsty(meta))
    assert [(s.cui, s.tui) for s in stys] == [
        ("C0000005", "T116"), ("C0000039", "T109"), ("C0000039", "T121")
    ]


def test_rrf_plain_gz_and_split_read_the_same_rows() -> None:
    plain = _atoms("rrf_small")
    assert len(plain) == N_ATOMS
    assert _atoms("rrf_gz") == plain
    assert _atoms("rrf_split") == plain
    assert _atoms("rrf_mrfiles") == plain


def test_rrf_split_parts_found_in_order() -> None:
    meta = MetaDir(FIXTURES / "rrf_split")
    assert [p.name for p in meta.parts("MRCONSO.RRF")] == [
        "MRCONSO.RRF.aa.gz", "MRCONSO.RRF.ab.gz", "MRCONSO.RRF.ac.gz"
    ]
    assert len(list(iter_mrsty(meta))) == 10


def test_rrf_crlf_and_unicode_strings() -> None:
    rows = _atoms("rrf_small")
    assert rows[0][0] == "C0041618" and not any("\r" in f for r in rows for f in r)
    strings = {r[7] for r in rows}
    assert "Sjögren's Syndrome" in strings and "β-Thalassemia" in strings


def test_rrf_mrfiles_column_order_and_extra_column() -> None:
    meta = MetaDir(FIXTURES / "rrf_mrfiles")
    cols = meta.columns("MRCONSO.RRF")
    assert cols[0] == "STR" and "EXTRA" in cols and len(cols) == 14
    assert meta.expected_rows("MRCONSO.RRF") == N_ATOMS
    # MRRANK_RANK is the long name of MRRANK's RANK column.
    assert meta.columns("MRRANK.RRF")[0] == "RANK"
    assert next(iter_mrrank(meta)).rank == "0400"


def test_rrf_release_root_resolves_to_meta(tmp_path: Path) -> None:
    meta_dir = tmp_path / "2024AA" / "META"
    meta_dir.mkdir(parents=True)
    for f in (FIXTURES / "rrf_small").iterdir():
        (meta_dir / f.name).write_bytes(f.read_bytes())
    assert MetaDir(tmp_path / "2024AA").path == meta_dir


def test_rrf_missing_mrconso_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DictionaryError, match=r"no MRCONSO\.RRF"):
        MetaDir(tmp_path)
    with pytest.raises(DictionaryError, match="not a directory"):
        MetaDir(tmp_path / "nope")


def test_rrf_malformed_row_names_file_and_line() -> None:
    meta = MetaDir(FIXTURES / "rrf_malformed")
    with pytest.raises(MalformedRowError) as err:
        list(iter_mrconso(meta))
    assert err.value.line == 3
    assert err.value.path.endswith("rrf_malformed/MRCONSO.RRF")
    assert "MRCONSO.RRF:3:" in str(err.value) and "17 fields, expected 18" in str(err.value)
    assert "--on-error skip" in str(err.value)


def test_rrf_malformed_skip_counts() -> None:
    meta = MetaDir(FIXTURES / "rrf_malformed")
    stats = ReadStats()
    rows = list(iter_mrconso(meta, on_error="skip", stats=stats))
    assert len(rows) == 5
    assert stats.skipped == {"MRCONSO.RRF": 3}
    assert stats.rows == {"MRCONSO.RRF": 5}
    lines = sorted(int(e.split(":")[1]) for e in stats.examples)
    assert lines == [3, 5, 7]
    assert any("UTF-8" in e for e in stats.examples)


def test_rrf_on_error_validated() -> None:
    meta = MetaDir(FIXTURES / "rrf_small")
    with pytest.raises(DictionaryError, match="on_error"):
        list(read_table(meta, "MRSTY.RRF", on_error="ignore"))  # type: ignore[arg-type]


def test_rrf_mrsab_and_mrrank() -> None:
    meta = MetaDir(FIXTURES / "rrf_small")
    sabs = {r.rsab: r for r in iter_mrsab(meta)}
    assert sabs["MSH"].vsab == "MSH2024_2023_08_04" and sabs["MSHGER"].lat == "GER"
    ranks = list(iter_mrrank(meta))
    assert (ranks[0].sab, ranks[0].tty, ranks[0].suppress) == ("MTH", "PN", "N")


def test_rrf_progress_reports_fraction(tmp_path: Path) -> None:
    seen: list[tuple[str, int, float | None]] = []
    meta = MetaDir(FIXTURES / "rrf_split")
    list(iter_mrconso(meta, progress=lambda t, n, f: seen.append((t, n, f))))
    assert seen[-1] == ("MRCONSO.RRF", N_ATOMS, 1.0)


def test_rrf_split_row_spanning_parts_reported_at_start(tmp_path: Path) -> None:
    # A malformed row that starts in part aa and ends in ab is reported at aa's line.
    (tmp_path / "MRCONSO.RRF.aa").write_bytes(b"C0024109|ENG|P|L|PF|S|Y|A|||D|MSH|MH|1|Bad")
    (tmp_path / "MRCONSO.RRF.ab").write_bytes(b" row|0|N|\n")
    with pytest.raises(MalformedRowError) as err:
        list(iter_mrconso(MetaDir(tmp_path)))
    assert err.value.path.endswith("MRCONSO.RRF.aa") and err.value.line == 1


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_rrf_tiny_read_chunks_change_nothing(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Rows, line numbers and errors do not depend on where the 4 MB read blocks end."""
    expected = {name: _atoms(name) for name in ("rrf_small", "rrf_split", "umls_META")}
    stats = ReadStats()
    list(iter_mrconso(MetaDir(FIXTURES / "rrf_malformed"), on_error="skip", stats=stats))
    monkeypatch.setattr("conceptsvc.sources.rrf._CHUNK", chunk)
    for name, rows in expected.items():
        assert _atoms(name) == rows
    small_chunks = ReadStats()
    list(iter_mrconso(MetaDir(FIXTURES / "rrf_malformed"), on_error="skip", stats=small_chunks))
    assert small_chunks.examples == stats.examples and small_chunks.rows == stats.rows


def test_rrf_blank_lines_and_crlf_only_file(tmp_path: Path) -> None:
    (tmp_path / "MRCONSO.RRF").write_bytes(
        b"\r\n\nC0024109|ENG|P|L|PF|S|Y|A|||D|MSH|MH|1|Lung|0|N||\r\n\r\n"
    )
    rows = list(iter_mrconso(MetaDir(tmp_path)))
    assert [r.string for r in rows] == ["Lung"]


def test_rrf_byte_order_mark_and_damaged_cuis(tmp_path: Path) -> None:
    """A byte-order mark before the first row is not part of its CUI; a CUI that is not C and
    seven digits (lower case, a space, empty) is a malformed row at its line, which
    --on-error skip skips and counts, not a concept of its own."""
    row = "|ENG|P|L|PF|S|Y|A|||D|MSH|MH|1|{}|0|N||\n"
    (tmp_path / "MRCONSO.RRF").write_bytes(
        b"\xef\xbb\xbf" + ("C0024109" + row.format("Lung")).encode()
        + ("c0024109 " + row.format("Lungs")).encode()
        + row.format("Nothing").encode()
        + ("C0032227" + row.format("Pleural effusion")).encode()
    )
    with pytest.raises(MalformedRowError) as err:
        list(iter_mrconso(MetaDir(tmp_path)))
    assert "MRCONSO.RRF:2:" in str(err.value) and "'c0024109 ' is not a UMLS CUI" in str(err.value)
    stats = ReadStats()
    rows = list(iter_mrconso(MetaDir(tmp_path), on_error="skip", stats=stats))
    assert [(r.cui, r.string) for r in rows] == [("C0024109", "Lung"),
                                                 ("C0032227", "Pleural effusion")]
    assert stats.skipped == {"MRCONSO.RRF": 2}
    (tmp_path / "MRSTY.RRF").write_text("C0024109|T023|A1.2.3.1|Body Part, Organ, or Organ "
                                        "Component|AT1||\nC024109|T023|A1|x|AT2||\n")
    with pytest.raises(MalformedRowError, match=r"MRSTY\.RRF:2:.*'C024109'"):
        list(iter_mrsty(MetaDir(tmp_path)))


def test_rrf_row_length_against_mrfiles_names_mrfiles(tmp_path: Path) -> None:
    """A row whose length differs from the column list MRFILES gives says MRFILES is where
    the list came from (one copied from another release is the usual cause)."""
    for f in (FIXTURES / "rrf_mrfiles").iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    mrfiles = (tmp_path / "MRFILES.RRF").read_text(encoding="utf-8").splitlines()
    mrfiles = [line.replace(",CODE|", ",CODE,MORE|").replace("|14|", "|15|")
               if line.startswith("MRCONSO.RRF|") else line for line in mrfiles]
    (tmp_path / "MRFILES.RRF").write_text("\n".join(mrfiles) + "\n", encoding="utf-8")
    assert len(MetaDir(tmp_path).columns("MRCONSO.RRF")) == 15
    with pytest.raises(MalformedRowError) as err:
        list(iter_mrconso(MetaDir(tmp_path)))
    assert "expected 15 (the 15 columns MRFILES.RRF gives it" in str(err.value)


def test_rrf_read_release_from_release_dat_then_mrsab(tmp_path: Path) -> None:
    small = read_release(MetaDir(FIXTURES / "rrf_small"))
    assert small.name == "2024AA"
    assert small.source_versions is not None
    assert small.source_versions["MSH"] == "MSH2024_2023_08_04"
    # Without release.dat the name comes from MTH's version in MRSAB; without MRSAB, nothing.
    meta = tmp_path / "META"
    meta.mkdir()
    (meta / "MRCONSO.RRF").write_bytes((FIXTURES / "rrf_small" / "MRCONSO.RRF").read_bytes())
    mth = ["C1", "C2", "MTH2025AB", "MTH", "UMLS Metathesaurus", *[""] * 14, "ENG", "UTF-8",
           "Y", "Y", "", ""]
    (meta / "MRSAB.RRF").write_text("|".join(mth) + "|\n", encoding="utf-8")
    assert read_release(MetaDir(meta)) == ("2025AB", {"MTH": "MTH2025AB"})
    (meta / "MRSAB.RRF").unlink()
    assert read_release(MetaDir(meta)) == (None, None)
