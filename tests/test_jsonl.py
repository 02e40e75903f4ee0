"""The scispacy knowledge-base reader: both file shapes, malformed records, and a real build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conceptsvc.dictionary import JsonlSource, build_dictionary_index
from conceptsvc.errors import DictionaryError, MalformedRowError
from conceptsvc.sources import ReadStats
from conceptsvc.sources.jsonl import KbConcept, iter_concepts

FIXTURES = Path(__file__).parent / "fixtures"


def test_jsonl_array_and_lines_read_alike(tmp_path: Path) -> None:
    records = json.loads((FIXTURES / "scispacy_kb_fixture.json").read_text(encoding="utf-8"))
    lines = tmp_path / "kb.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    stats = ReadStats()
    from_array = list(iter_concepts(FIXTURES / "scispacy_kb_fixture.json"))
    from_lines = list(iter_concepts(lines, stats=stats))
    assert from_array == from_lines and len(from_array) == len(records)
    assert stats.rows == {"kb.jsonl": len(records)} and stats.total_skipped == 0
    first = records[1]
    assert from_array[1] == KbConcept(
        first["concept_id"], first["canonical_name"], first["aliases"], first["types"]
    )


def test_jsonl_record_checks_name_the_line(tmp_path: Path) -> None:
    kb = tmp_path / "kb.jsonl"
    kb.write_text(
        '"a string"\n'
        '{"concept_id": "", "canonical_name": "x"}\n'
        '{"concept_id": "C1"}\n'
        '{"concept_id": "C1", "canonical_name": "x", "aliases": "y"}\n'
        '{"concept_id": "C1", "canonical_name": "x", "types": [1]}\n'
        '{"concept_id": "C2", "canonical_name": "kept"}\n',
        encoding="utf-8",
    )
    stats = ReadStats()
    kept = list(iter_concepts(kb, on_error="skip", stats=stats))
    assert kept == [KbConcept("C2", "kept", [], [])]
    assert stats.skipped == {"kb.jsonl": 5}
    assert [e.split(": ", 1)[0] for e in stats.examples] == [f"{kb}:{n}" for n in range(1, 6)]
    with pytest.raises(DictionaryError, match="on_error"):
        list(iter_concepts(kb, on_error="ignore"))  # type: ignore[arg-type]


def test_jsonl_array_that_is_not_json_fails(tmp_path: Path) -> None:
    kb = tmp_path / "kb.json"
    kb.write_text('[{"concept_id": "C1",\n "canonical_name": }]', encoding="utf-8")
    with pytest.raises(MalformedRowError) as err:
        list(iter_concepts(kb))
    assert err.value.line == 2 and "invalid JSON" in str(err.value)


def test_jsonl_malformed_line(tmp_path: Path) -> None:
    kb = tmp_path / "kb.jsonl"
    good = {"concept_id": "C1", "canonical_name": "Lung nodule", "aliases": [], "types": []}
    kb.write_text(
        json.dumps(good) + "\n{not json\n" + json.dumps({"canonical_name": "x"}) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(MalformedRowError) as err:
        build_dictionary_index([JsonlSource(kb)], tmp_path / "ix")
    assert err.value.line == 2 and "kb.jsonl:2:" in str(err.value)
    report = build_dictionary_index([JsonlSource(kb)], tmp_path / "ix", on_error="skip")
    assert report.malformed_skipped == {"kb.jsonl": 2} and report.concepts == 1
