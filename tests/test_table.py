"""The site table reader: CSV quoting, headers in any order, type names, malformed rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from conceptsvc.dictionary import DictionaryFilters, TableSource, build_dictionary_index
from conceptsvc.errors import MalformedRowError
from conceptsvc.index import ConceptIndex
from conceptsvc.semantic_network import load_semantic_network
from conceptsvc.sources import ReadStats
from conceptsvc.sources.table import TableRow, iter_rows


def test_table_header_in_any_order_and_type_names(tmp_path: Path) -> None:
    tsv = tmp_path / "site.tsv"
    tsv.write_text(
        "# site synonyms\n"
        "CUI\ttty\tterm\ttypes\tsource\n"
        "C1\tAB\tCT\tT060\t\n"
        "C2\t\tLung mass\tNeoplastic Process| dsyn\tRAD\n"
        "C3\t\tHeart\tDISO\t\n",
        encoding="utf-8",
    )
    stats = ReadStats()
    rows = list(iter_rows(tsv, load_semantic_network(), default_sab="SITE", on_error="skip",
                          stats=stats))
    assert rows == [
        TableRow("C1", "CT", ("T060",), "SITE", "AB"),
        TableRow("C2", "Lung mass", ("T191", "T047"), "RAD", "SY"),
    ]
    assert stats.rows == {"site.tsv": 2} and stats.skipped == {"site.tsv": 1}
    assert "semantic group" in stats.examples[0]


def test_table_unknown_header_column_fails(tmp_path: Path) -> None:
    tsv = tmp_path / "site.tsv"
    tsv.write_text("cui\tterm\tcolour\nC1\tLung\tred\n", encoding="utf-8")
    with pytest.raises(MalformedRowError, match="colour") as err:
        list(iter_rows(tsv, load_semantic_network(), on_error="skip"))
    # skipping rows cannot help a header: the advice says what a header must be instead
    assert "--on-error skip skips bad rows, not a bad header" in str(err.value)
    assert "rebuild with `--on-error skip`" not in str(err.value)
    # a header that does not start with an id column reads as a row of too many fields
    other = tmp_path / "other.tsv"
    other.write_text("hpo_id\tcuis\tname\tsyn\tmore\n", encoding="utf-8")
    with pytest.raises(MalformedRowError, match="its first column must be cui, concept_id or id"):
        list(iter_rows(other, load_semantic_network()))


def test_table_csv_with_quotes_and_positional_tsv(tmp_path: Path) -> None:
    csv_file = tmp_path / "terms.csv"
    csv_file.write_text('C0000001,"Fracture, femur",T037\nC0000002,Lung,"T023;T029",RAD\n')
    out = tmp_path / "ix"
    build_dictionary_index([TableSource(csv_file)], out, filters=DictionaryFilters())
    ix = ConceptIndex.load(out)
    assert ix.concept("C0000001").preferred_name == "Fracture, femur"  # type: ignore[union-attr]
    lung = ix.concept("C0000002")
    assert lung is not None and lung.semantic_types == ("T023", "T029") and lung.sources == ("RAD",)


def test_table_malformed_rows(tmp_path: Path) -> None:
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("C1\tLung\tT023\nC2\n\tHeart\tT023\nC3\tLiver\tT999\nC4\tSpleen\tT023\n")
    with pytest.raises(MalformedRowError) as err:
        build_dictionary_index([TableSource(tsv)], tmp_path / "ix")
    assert err.value.line == 2
    report = build_dictionary_index([TableSource(tsv)], tmp_path / "ix", on_error="skip")
    assert report.malformed_skipped == {"bad.tsv": 3} and report.concepts == 2
    assert any("T999" in e for e in report.malformed_examples)
