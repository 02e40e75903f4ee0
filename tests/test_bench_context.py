"""``make bench-context``'s scoring, condition location and conceptsvc run (issue 17).

medspaCy's side needs its own venv and is not run here; the scoring it goes through is the
same as conceptsvc's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from benchmarks.bench_context import (
    Prediction,
    context_python,
    main,
    run_conceptsvc,
    score_negation,
    score_temporality,
    why_not_found,
    write_condition_table,
)
from benchmarks.context_peer.annotations import locate, read_annotations
from conceptsvc.errors import ConfigError
from conceptsvc.model import Mention

HEADER = (
    "line number\tCondition\tsentence\tnegation_status (negated, affirmed, possible)\t"
    "temporality (historical, recent, hypothetical)\texperiencer (patient, other)\n"
)
ROWS = [
    ("1", "edema", "Extremities reveal no peripheral cyanosis or EDEMA.", "Negated", "Recent",
     "Patient"),
    ("3", "Hypertension", "HYPERTENSION.", "Affirmed", "Historical", "Patient"),
    ("7", "chest pain", "He denies any chest  pain today.", "Negated", "Recent", "Patient"),
    ("9", "fever", "FEVER was present on admission.", "Negated", "Recent", "Family member"),
    ("12", "pneumonia", "Rule out pneumonia.", "Affirmed", "Not particular", "Patient"),
]


def _tsv(tmp_path: Path, rows: list[tuple[str, ...]] = ROWS) -> Path:
    path = tmp_path / "annotations.tsv"
    path.write_text(HEADER + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bench_context_reads_rows_and_locates_conditions(tmp_path: Path) -> None:
    rows = read_annotations(_tsv(tmp_path))
    assert [r.line for r in rows] == ["1", "3", "7", "9", "12"]
    assert [r.negated for r in rows] == [True, False, True, True, False]
    assert [r.temporality for r in rows] == [
        "recent", "historical", "recent", "recent", "hypothetical"
    ]
    assert [r.family for r in rows] == [False, False, False, True, False]
    # case and a run of spaces differ between condition and sentence
    assert [r.sentence[s:e] for r in rows for s, e in r.spans] == [
        "EDEMA", "HYPERTENSION", "chest  pain", "FEVER", "pneumonia"
    ]


def test_bench_context_locate_ignores_case_and_spacing_not_word_boundaries() -> None:
    s = "Given for MVP WITH  REGURG."
    assert [s[a:b] for a, b in locate("MVP with regurg", s)] == ["MVP WITH  REGURG"]
    assert [s[a:b] for a, b in locate("mvp  with\tregurg", s)] == ["MVP WITH  REGURG"]
    s = "PEEP of 5; PE's were ruled out, no PE."
    assert [s[a:b] for a, b in locate("PE", s)] == ["PE", "PE"]
    assert locate("PE", s)[0] == (s.index("PE'"), s.index("PE'") + 2)
    # only inside a longer word: that occurrence is all there is
    assert locate("edem", "No EDEMA.") == ((3, 7),)
    assert locate("cyanosis", "No EDEMA.") == ()
    assert locate("   ", "No EDEMA.") == ()


def test_bench_context_malformed_row_names_its_line(tmp_path: Path) -> None:
    bad = _tsv(tmp_path, [*ROWS[:2], ("5", "edema", "No edema.", "Possible", "Recent", "Patient")])
    with pytest.raises(ValueError, match=r"annotations.tsv:4: negation status 'Possible'"):
        read_annotations(bad)


def test_bench_context_negation_scores_by_hand(tmp_path: Path) -> None:
    rows = read_annotations(_tsv(tmp_path))
    preds = [
        Prediction(found=True, negated=True),  # negated, flagged: TP
        Prediction(found=True, negated=True),  # affirmed, flagged: FP
        Prediction(found=False, negated=True),  # negated, not found = affirmed: FN
        Prediction(found=True, negated=False),  # negated, not flagged: FN
        Prediction(found=True, negated=False),  # affirmed, not flagged: TN
    ]
    s = score_negation(rows, preds)
    assert (s.tp, s.fp, s.fn, s.tn) == (1, 1, 2, 1)
    assert s.precision == pytest.approx(1 / 2)
    assert s.recall == pytest.approx(1 / 3)
    assert s.f1 == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))  # 0.4
    assert s.accuracy == pytest.approx(2 / 5)
    # on the rows found, the not-found negated row drops out of the FN
    found = [i for i, p in enumerate(preds) if p.found]
    s = score_negation([rows[i] for i in found], [preds[i] for i in found])
    assert (s.tp, s.fp, s.fn, s.tn) == (1, 1, 1, 1)
    assert (s.precision, s.recall, s.f1, s.accuracy) == (0.5, 0.5, 0.5, 0.5)
    none = score_negation(rows[1:2], [Prediction(found=True)])
    assert (none.precision, none.recall, none.f1, none.accuracy) == (0.0, 0.0, 0.0, 1.0)


def test_bench_context_temporality_scores_by_hand(tmp_path: Path) -> None:
    rows = read_annotations(_tsv(tmp_path))
    preds = [
        Prediction(True, historical=False, hypothetical=False),  # recent: right
        Prediction(True, historical=True, hypothetical=False),  # historical: right
        Prediction(False, historical=True, hypothetical=False),  # not found = recent: right
        Prediction(True, historical=False, hypothetical=True),  # hypothetical, gold recent
        Prediction(True, historical=True, hypothetical=True),  # hypothetical wins: right
    ]
    t = score_temporality(rows, preds)
    assert t is not None
    assert t["accuracy"] == pytest.approx(4 / 5)
    assert (t["historical"].tp, t["historical"].fp, t["historical"].fn) == (1, 0, 0)
    hyp = t["hypothetical"]
    assert (hyp.precision, hyp.recall) == (0.5, 1.0) and hyp.f1 == pytest.approx(2 / 3)
    assert score_temporality(rows, [Prediction(True, negated=True)] * 5) is None


def test_bench_context_conditions_share_a_concept_only_when_their_keys_match(
    tmp_path: Path,
) -> None:
    rows = read_annotations(_tsv(tmp_path, [
        *ROWS, ("20", "Edema", "EDEMA.", "Affirmed", "Recent", "Patient"),
    ]))
    cuis = write_condition_table(rows, tmp_path / "conditions.tsv")
    assert cuis[0] == cuis[5] and len(set(cuis)) == 5
    assert all(c.startswith("C97") and len(c) == 8 for c in cuis)
    lines = (tmp_path / "conditions.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "cui\tterm\ttui" and f"{cuis[0]}\tEdema\tT033" in lines


def test_bench_context_runs_conceptsvc_on_its_own_dictionary(tmp_path: Path) -> None:
    rows = read_annotations(_tsv(tmp_path))
    preds, engine = run_conceptsvc(rows, tmp_path)
    assert engine in ("compiled", "reference")
    assert [p.found for p in preds] == [True, True, True, True, True]
    # plain cases of NegEx's rules: "no … EDEMA", "denies any chest pain"; none in the others
    assert [p.negated for p in preds] == [True, False, True, False, False]
    tells = "historical" in {f.name for f in dataclasses.fields(Mention)}
    assert all((p.historical is None) != tells for p in preds)


def test_bench_context_main_writes_its_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n", encoding="utf-8")
    assert main(["--tsv", str(_tsv(tmp_path)), "--no-peer", "--write", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert "## Context (negation, temporality)\n\n<!-- bench-context:begin -->" in text
    assert "5 annotated sentences (3 negated)" in text
    # 2 of the 3 negated rows flagged, nothing wrongly: P 1, R 2/3, F1 0.8, accuracy 4/5
    assert "| conceptsvc | 5 | 5 (0.0 % not found) | 1.000 | 0.667 | 0.800 | 0.800 | 2/0/1 |" in (
        text
    )
    assert "| 0.933 | 0.959 | 0.946 | 0.977 |" in text
    assert capsys.readouterr().out.startswith("### Run of ")


def test_bench_context_missing_peer_venv_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="make context-peer"):
        context_python(tmp_path / "no-venv" / "bin" / "python")


def test_bench_context_names_why_a_condition_was_not_found(tmp_path: Path) -> None:
    rows = read_annotations(_tsv(tmp_path, [
        ("1", "abdomen was soft.  It was nontender", "His   abdomen was soft.", "Affirmed",
         "Recent", "Patient"),
        ("2", "heart transplantatio", "Status post HEART TRANSPLANTATIOn.", "Affirmed",
         "Historical", "Patient"),
        ("3", "ABDOMEN:  Soft", "ABDOMEN:  SOFT.", "Affirmed", "Recent", "Patient"),
        ("4", "strong   pulses", "He has STRONG   PULSES.", "Affirmed", "Recent", "Patient"),
        ("5", "CP", "He has cp.", "Affirmed", "Recent", "Patient"),
        ("6", "fever", "FEVER.", "Affirmed", "Recent", "Patient"),
    ]))
    assert [why_not_found(r).split()[0] for r in rows] == [
        "not", "only", "punctuation", "a", "case:", "other"
    ]
