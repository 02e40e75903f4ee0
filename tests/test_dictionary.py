"""Dictionary builds from real-format fixtures: every filter, preferred names, merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conceptsvc.dictionary import (
    DictionaryFilters,
    JsonlSource,
    TableSource,
    UmlsSource,
    build_dictionary_index,
    term_flags,
)
from conceptsvc.errors import DictionaryError, MalformedRowError, SemanticNetworkError
from conceptsvc.index import (
    FLAG_ABBREVIATION,
    FLAG_CASE_SENSITIVE,
    FLAG_PREFERRED,
    ConceptIndex,
)
from conceptsvc.normalize import normalize_term

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = UmlsSource(FIXTURES / "rrf_small")
ALL_CUIS = {
    "C0041618", "C0024485", "C0040405", "C0000726", "C0817096", "C1527336", "C0005283",
    "C0001175", "C9999991",
}


def _build(tmp_path: Path, *sources: object, **filters: object) -> ConceptIndex:
    out = tmp_path / "ix"
    build_dictionary_index(
        list(sources) or [SMALL], out, filters=DictionaryFilters(**filters)  # type: ignore[arg-type]
    )
    return ConceptIndex.load(out)


def _strings(ix: ConceptIndex) -> set[str]:
    return {p.string for cui in ix.cuis for p in ix.concept_postings(cui)}


def test_dictionary_defaults_report_and_absent_concepts(tmp_path: Path) -> None:
    report = build_dictionary_index([SMALL], tmp_path / "ix")
    ix = ConceptIndex.load(tmp_path / "ix")
    assert set(ix.cuis) == ALL_CUIS  # C9999992: all atoms French or obsolete → absent
    assert "C9999992" not in ix and ix.concept("C9999992") is None
    assert report.atoms_kept == 23 and report.rows_read["MRCONSO.RRF"] == 31
    assert report.dropped == {"language": 3, "suppressed": 4, "shorter than min_length": 1}
    assert report.concepts == 9 and report.concepts_without_semantic_type == 1
    assert report.source_release == "UMLS 2024AA"
    assert any("no semantic type" in line for line in report.lines())
    m = ix.manifest
    assert m["source_release"] == "UMLS 2024AA"
    assert m["filters"]["languages"] == ["ENG"] and m["filters"]["drop_suppress"] == ["O", "E", "Y"]
    assert m["inputs"][0]["source_versions"]["MSH"] == "MSH2024_2023_08_04"
    assert m["inputs"][0]["preferred_names"] == "MRRANK"
    assert m["report"]["concepts_without_semantic_type"] == 1
    assert m["counts"]["concepts"] == 9


def test_dictionary_cui_without_mrsty_is_unknown(tmp_path: Path) -> None:
    info = _build(tmp_path).concept("C9999991")
    assert info is not None
    assert info.semantic_types == ("T000",) and info.preferred_name == "Hounsfield window region"


def test_dictionary_preferred_name_by_mrrank(tmp_path: Path) -> None:
    ix = _build(tmp_path)
    ct = ix.concept("C0040405")
    assert ct is not None and ct.preferred_name == "X-Ray Computed Tomography"  # NCI PT > MSH ET
    us = ix.concept("C0041618")
    assert us is not None and us.preferred_name == "Ultrasonography"
    pref = [p for p in ix.concept_postings("C0040405") if p.flags & FLAG_PREFERRED]
    assert [p.string for p in pref] == ["X-Ray Computed Tomography"]


def test_dictionary_preferred_name_without_mrrank_uses_ts_stt_ispref(tmp_path: Path) -> None:
    ix = _build(tmp_path, UmlsSource(FIXTURES / "rrf_gz"))
    ct = ix.concept("C0040405")
    assert ct is not None and ct.preferred_name == "Tomography, X-Ray Computed"
    assert ix.manifest["inputs"][0]["preferred_names"] == "TS/STT/ISPREF"


@pytest.mark.parametrize("name", ["rrf_gz", "rrf_split", "rrf_mrfiles"])
def test_dictionary_same_concepts_from_every_rrf_form(tmp_path: Path, name: str) -> None:
    ix = _build(tmp_path, UmlsSource(FIXTURES / name))
    assert set(ix.cuis) == ALL_CUIS
    assert "Ultraschall" not in _strings(ix) and "Chest" in _strings(ix)


def test_dictionary_flags(tmp_path: Path) -> None:
    ix = _build(tmp_path)
    flags = {p.string: p.flags for cui in ix.cuis for p in ix.concept_postings(cui)}
    cs = FLAG_ABBREVIATION | FLAG_CASE_SENSITIVE
    assert flags["US"] & cs == cs and flags["AIDS"] & cs == cs and flags["CT"] & cs == cs
    assert flags["abd"] & FLAG_ABBREVIATION and not flags["abd"] & FLAG_CASE_SENSITIVE
    assert flags["Echography"] == 0
    assert flags["Ultrasonography"] == FLAG_PREFERRED


@pytest.mark.parametrize(
    ("string", "tty", "expected"),
    [
        ("US", "SY", FLAG_ABBREVIATION | FLAG_CASE_SENSITIVE),
        ("ABCDEF", "SY", FLAG_ABBREVIATION),  # too long to be case-sensitive
        ("ABCDEFG", "SY", 0),
        ("T2", "SY", 0),  # one letter: a label, not an acronym
        ("HIV-1", "SY", 0),
        ("mRNA", "SY", 0),
        ("abd", "AB", FLAG_ABBREVIATION),
        ("Lung", "ACR", FLAG_ABBREVIATION),
        ("CT scan", "SY", 0),
    ],
)
def test_dictionary_term_flags(string: str, tty: str, expected: int) -> None:
    assert term_flags(string, tty) == expected


def test_dictionary_filter_languages(tmp_path: Path) -> None:
    ix = _build(tmp_path, languages=("ENG", "GER"))
    assert "Ultraschall" in _strings(ix) and "Radiographie" not in _strings(ix)


def test_dictionary_filter_sab_include(tmp_path: Path) -> None:
    ix = _build(tmp_path, sabs=("MSH",))
    assert set(ix.sabs) == {"MSH"} and "C9999991" not in ix and len(ix) == 8
    ct = ix.concept("C0040405")
    assert ct is not None and ct.preferred_name == "Tomography, X-Ray Computed"  # NCI not kept


def test_dictionary_filter_sab_exclude(tmp_path: Path) -> None:
    strings = _strings(_build(tmp_path, exclude_sabs=("NCI",)))
    assert not strings & {"US", "MRI", "CT", "abd", "CT scan"} and "Echography" in strings


def test_dictionary_filter_suppress(tmp_path: Path) -> None:
    ix = _build(tmp_path, drop_suppress=())
    assert {"Tomodensitometry", "Thoraces", "Roentgenography obsolete"} <= _strings(ix)
    assert "C9999992" in ix
    only_o = _strings(_build(tmp_path, drop_suppress=("O",)))
    assert "Tomodensitometry" in only_o and "Roentgenography obsolete" not in only_o


def test_dictionary_filter_tty_exclude(tmp_path: Path) -> None:
    strings = _strings(_build(tmp_path, exclude_ttys=("AB", "ACR")))
    assert not strings & {"US", "MRI", "CT", "abd", "AIDS"} and "CT scan" in strings


def test_dictionary_filter_semantic_group_and_type(tmp_path: Path) -> None:
    assert set(_build(tmp_path, semantic_types=("DISO",)).cuis) == {
        "C1527336", "C0005283", "C0001175"
    }
    assert set(_build(tmp_path, semantic_types=("diap",)).cuis) == {
        "C0041618", "C0024485", "C0040405"
    }
    assert set(_build(tmp_path, semantic_types=("unknown",)).cuis) == {"C9999991"}


def test_dictionary_filter_semantic_exclude_keeps_unknown(tmp_path: Path) -> None:
    ix = _build(tmp_path, exclude_semantic_types=("Anatomy", "T019"))
    assert "C0000726" not in ix and "C0817096" not in ix
    assert "C0005283" not in ix  # T047 + T019: any excluded type excludes the concept
    assert "C9999991" in ix


def test_dictionary_filter_semantic_descendants(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    with pytest.raises(DictionaryError, match="kept no concept, so no index was written"):
        build_dictionary_index([SMALL], out, filters=DictionaryFilters(semantic_types=("T046",)))
    assert not out.exists()
    ix = _build(tmp_path, semantic_types=("T046",), include_descendants=True)
    assert set(ix.cuis) == {"C1527336", "C0005283", "C0001175"}


def test_dictionary_filter_min_length(tmp_path: Path) -> None:
    strings = _strings(_build(tmp_path, min_length=4))
    assert not strings & {"US", "MRI", "CT", "abd"} and "AIDS" in strings
    assert "A" in _strings(_build(tmp_path, min_length=0))


def test_dictionary_unknown_semantic_filter_suggests(tmp_path: Path) -> None:
    with pytest.raises(SemanticNetworkError) as err:
        build_dictionary_index(
            [SMALL], tmp_path / "ix", filters=DictionaryFilters(semantic_types=("DISSO",))
        )
    assert "DISO" in err.value.suggestions
    assert not (tmp_path / "ix").exists()


def test_dictionary_filter_validation() -> None:
    with pytest.raises(DictionaryError, match="SUPPRESS"):
        DictionaryFilters(drop_suppress=("X",))
    with pytest.raises(DictionaryError, match="both included and excluded"):
        DictionaryFilters(sabs=("MSH",), exclude_sabs=("MSH",))
    with pytest.raises(DictionaryError, match="min_length"):
        DictionaryFilters(min_length=-1)


def test_dictionary_unicode_strings(tmp_path: Path) -> None:
    ix = _build(tmp_path)
    sjogren = ix.postings(normalize_term("Sjögren's Syndrome"))
    assert {p.string for p in sjogren} == {"Sjögren's Syndrome", "Sjogren syndrome"}
    beta = ix.postings(normalize_term("β-Thalassemia"))
    assert [p.cui for p in beta] == ["C0005283"]
    info = ix.concept("C1527336")
    assert info is not None and info.preferred_name == "Sjögren's Syndrome"


def test_dictionary_malformed_umls_fails_or_skips(tmp_path: Path) -> None:
    bad = UmlsSource(FIXTURES / "rrf_malformed")
    with pytest.raises(MalformedRowError, match=r"MRCONSO\.RRF:3:"):
        build_dictionary_index([bad], tmp_path / "ix")
    report = build_dictionary_index([bad], tmp_path / "ix", on_error="skip")
    assert report.malformed_skipped == {"MRCONSO.RRF": 3}
    assert any("skipped 3 malformed rows" in line for line in report.lines())
    assert ConceptIndex.load(tmp_path / "ix").manifest["report"]["malformed_skipped"] == {
        "MRCONSO.RRF": 3
    }


def test_dictionary_merge_umls_jsonl_table_keeps_origin(tmp_path: Path) -> None:
    tsv = tmp_path / "site.tsv"
    tsv.write_text(
        "cui\tterm\ttui\tsab\n"
        "C0041618\tsonography\tT060\tSITE\n"
        "C7777777\tHounsfield scale\t\t\n"
        "C7777777\tHU scale\tqnco\t\n",
        encoding="utf-8",
    )
    ix = _build(
        tmp_path, SMALL, JsonlSource(FIXTURES / "scispacy_kb_fixture.json"), TableSource(tsv)
    )
    us = {p.string: p.sab for p in ix.concept_postings("C0041618")}
    assert us["sonography"] == "SITE" and us["Echography"] == "SNOMEDCT_US"
    info = ix.concept("C0041618")
    assert info is not None and info.preferred_name == "Ultrasonography"  # UMLS wins
    assert {"SITE", "MSH", "NCI", "SNOMEDCT_US"} <= set(info.sources)
    hu = ix.concept("C7777777")
    assert hu is not None and hu.preferred_name == "Hounsfield scale"  # first term of the table
    assert hu.semantic_types == ("T081",) and hu.sources == ("LOCAL",)
    dppc = ix.concept("C0000039")
    assert dppc is not None and dppc.preferred_name == "1,2-Dipalmitoylphosphatidylcholine"
    assert "SCISPACY" in dppc.sources
    assert [i["kind"] for i in ix.manifest["inputs"]] == ["umls", "jsonl", "table"]


def test_dictionary_jsonl_types_merge_into_semantic_filter(tmp_path: Path) -> None:
    # C9999991 has no MRSTY row; a JSONL record gives it T060, so a T060 filter keeps it.
    kb = tmp_path / "kb.jsonl"
    kb.write_text(
        json.dumps({"concept_id": "C9999991", "canonical_name": "HU window",
                    "aliases": ["HU window"], "types": ["T060"]}) + "\n",
        encoding="utf-8",
    )
    ix = _build(tmp_path, SMALL, JsonlSource(kb), semantic_types=("T060",))
    assert "C9999991" in ix
    info = ix.concept("C9999991")
    assert info is not None and info.semantic_types == ("T060",)
    assert info.preferred_name == "Hounsfield window region"


def test_dictionary_missing_input_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DictionaryError, match="no such file"):
        build_dictionary_index([TableSource(tmp_path / "nope.tsv")], tmp_path / "ix")
    with pytest.raises(DictionaryError, match="no dictionary input"):
        build_dictionary_index([], tmp_path / "ix")


def test_dictionary_source_release_given(tmp_path: Path) -> None:
    build_dictionary_index([SMALL], tmp_path / "ix", source_release="UMLS 2024AA (site subset)")
    assert ConceptIndex.load(tmp_path / "ix").manifest["source_release"] == (
        "UMLS 2024AA (site subset)"
    )


def test_dictionary_workers_give_the_identical_index(tmp_path: Path) -> None:
    """Normalising in worker processes changes nothing in the output, byte for byte."""
    from benchmarks.synth_umls import generate

    meta = tmp_path / "META"
    generate(meta, 1500, seed=11)
    one = build_dictionary_index([UmlsSource(meta)], tmp_path / "one")
    two = build_dictionary_index([UmlsSource(meta)], tmp_path / "two", workers=2)
    assert one.to_dict() | {"seconds": 0} == two.to_dict() | {"seconds": 0}
    a, b = ConceptIndex.load(tmp_path / "one"), ConceptIndex.load(tmp_path / "two")
    assert a.content_hash == b.content_hash
    with pytest.raises(DictionaryError, match="workers"):
        build_dictionary_index([SMALL], tmp_path / "x", workers=0)
