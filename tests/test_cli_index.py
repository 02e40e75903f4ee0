"""`conceptsvc index build|info`: thin wrappers, real files, exit codes and messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from conceptsvc.cli import main
from conceptsvc.index import ConceptIndex

FIXTURES = Path(__file__).parent / "fixtures"


def test_cli_index_build_with_filters_and_info(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ix"
    tsv = tmp_path / "site.tsv"
    tsv.write_text("C7777777\tHounsfield scale\tT081\n", encoding="utf-8")
    rc = main([
        "index", "build", "--umls", str(FIXTURES / "rrf_split"), "--tsv", str(tsv),
        "--tsv-sab", "SITE", "--exclude-sab", "SNOMEDCT_US", "--exclude-tty", "AB,ACR",
        "--semantic-type", "DISO", "--semantic-type", "qnco,T060", "--suppress", "O",
        "--min-length", "3", "--source-release", "fixture", "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.strip() == str(out)
    assert "MRCONSO.RRF: 31 rows" in captured.err and "kept " in captured.err
    ix = ConceptIndex.load(out)
    assert ix.manifest["source_release"] == "fixture"
    f = ix.manifest["filters"]
    assert f["exclude_ttys"] == ["AB", "ACR"] and f["semantic_types"] == ["DISO", "qnco", "T060"]
    assert f["drop_suppress"] == ["O"] and f["min_length"] == 3
    strings = {p.string for c in ix.cuis for p in ix.concept_postings(c)}
    assert "Tomography, X-Ray Computed" in strings and "Hounsfield scale" in strings
    assert not strings & {"US", "CT", "Echography", "Chest"}
    assert "C0000726" not in ix  # anatomy: not in DISO/qnco/T060

    assert main(["index", "info", str(out), "--ambiguous"]) == 0
    info = capsys.readouterr().out
    assert "source release   fixture" in info and "SITE" in info
    assert "T060" in info and "Diagnostic Procedure" in info
    assert "ambiguous keys" in info


def test_cli_index_build_lang_any_and_suppress_none(tmp_path: Path) -> None:
    out = tmp_path / "ix"
    assert main(["index", "build", "-q", "--umls", str(FIXTURES / "rrf_gz"), "--lang", "any",
                 "--suppress", "none", "--out", str(out)]) == 0
    strings = {p.string for c in ConceptIndex.load(out).cuis
               for p in ConceptIndex.load(out).concept_postings(c)}
    assert {"Ultraschall", "Radiographie", "Roentgenography obsolete"} <= strings


def test_cli_index_malformed_fails_then_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["index", "build", "-q", "--umls", str(FIXTURES / "rrf_malformed"),
            "--out", str(tmp_path / "ix")]
    assert main(args) == 2
    assert "MRCONSO.RRF:3:" in capsys.readouterr().err
    assert main([*args, "--on-error", "skip"]) == 0
    assert "skipped 3 malformed rows in MRCONSO.RRF" in capsys.readouterr().err


def test_cli_index_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", "build", "--out", str(tmp_path / "ix")]) == 2
    err = capsys.readouterr().err
    assert "[E001]" in err and "at least one input" in err  # misuse: a UsageError
    assert main(["index", "build", "-q", "--umls", str(FIXTURES / "rrf_small"),
                 "--exclude-semantic-type", "Anatomie", "--out", str(tmp_path / "ix")]) == 2
    assert "Did you mean" in capsys.readouterr().err
    assert main(["index", "info", str(tmp_path / "missing")]) == 2
    assert "E400" in capsys.readouterr().err


def test_cli_index_build_progress_lines(tmp_path: Path) -> None:
    import io

    from conceptsvc.cli import BuildProgress
    from conceptsvc.dictionary import UmlsSource, build_dictionary_index

    stream = io.StringIO()
    progress = BuildProgress(stream, interval=0.0)
    report = build_dictionary_index(
        [UmlsSource(FIXTURES / "rrf_small")], tmp_path / "ix", progress=progress
    )
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "MRSTY.RRF: 10 rows, 100%" in lines[0]
    assert any(line.startswith("MRCONSO.RRF: 31 rows") for line in lines)
    assert lines[-1] == f"writing index ({report.concepts:,} concepts)"
    stream = io.StringIO()
    progress = BuildProgress(stream, interval=0.0)
    progress("MRCONSO.RRF", 1000, 0.25)
    assert "25%" in stream.getvalue() and "ETA" in stream.getvalue()


def test_cli_index_build_with_its_progress_imports_no_grpc(tmp_path: Path) -> None:
    """`index build` (its ETA formatted by the client's progress module included) runs in a
    process that never imports gRPC or protobuf: an index host needs neither."""
    import json
    import subprocess
    import sys

    script = (
        "import io, json, sys\n"
        "from conceptsvc.cli import BuildProgress, main\n"
        "stream = io.StringIO()\n"
        "BuildProgress(stream, interval=0.0)('MRCONSO.RRF', 1000, 0.25)\n"
        f"rc = main(['index', 'build', '--umls', {str(FIXTURES / 'rrf_small')!r}, "
        f"'--out', {str(tmp_path / 'ix')!r}])\n"
        "print(json.dumps([rc, stream.getvalue(), "
        "[m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, timeout=120)
    rc, line, loaded = json.loads(done.stdout.splitlines()[-1])
    assert rc == 0 and "ETA 0:00:" in line
    assert loaded == []


def test_cli_index_build_refuses_an_empty_index_and_warns_of_unused_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A build whose filters keep nothing fails (E200, exit 2) and writes nothing, naming what
    was dropped and why; a source filter value that kept no string is warned about."""
    out = tmp_path / "empty"
    rc = main(["index", "build", "--umls", str(FIXTURES / "rrf_small"), "--sab", "SNOMEDCT",
               "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "[E200] the inputs and filters kept no concept" in err
    assert "dropped 24 strings: source not included" in err
    with caplog.at_level("WARNING", logger="conceptsvc.dictionary"):
        rc = main(["index", "build", "--umls", str(FIXTURES / "rrf_small"), "--sab",
                   "SNOMEDCT_US,NOSUCH", "--out", str(tmp_path / "some"), "-q"])
    assert rc == 0 and len(ConceptIndex.load(tmp_path / "some")) == 5
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("source filter NOSUCH kept no strings")
    assert warning.endswith("the index has: SNOMEDCT_US")


def test_cli_index_build_filter_codes_in_any_case_and_exclusions_that_drop_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Languages and term types are UMLS codes: `--lang eng --exclude-tty ab` means ENG and
    AB (they were compared as given and silently matched nothing); an exclusion that drops
    nothing is warned about; a type name with commas is one name in --semantic-type."""
    upper = tmp_path / "upper"
    lower = tmp_path / "lower"
    assert main(["index", "build", "-q", "--umls", str(FIXTURES / "rrf_small"), "--lang", "ENG",
                 "--exclude-tty", "AB", "--out", str(upper)]) == 0
    assert main(["index", "build", "-q", "--umls", str(FIXTURES / "rrf_small"), "--lang", "eng",
                 "--exclude-tty", "ab", "--out", str(lower)]) == 0
    a, b = ConceptIndex.load(upper), ConceptIndex.load(lower)
    assert a.content_hash == b.content_hash and "us" not in a.keys()
    with caplog.at_level("WARNING", logger="conceptsvc.dictionary"):
        assert main(["index", "build", "-q", "--umls", str(FIXTURES / "rrf_small"),
                     "--exclude-sab", "msh", "--exclude-tty", "XX", "--out",
                     str(tmp_path / "w")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("--exclude-sab msh dropped no string") for w in warnings), warnings
    assert any(w.startswith("--exclude-tty XX dropped no string") for w in warnings), warnings
    body = tmp_path / "body"
    assert main(["index", "build", "-q", "--umls", str(FIXTURES / "rrf_small"),
                 "--semantic-type", "Body Part, Organ, or Organ Component,Body Location or Region",
                 "--out", str(body)]) == 0
    kept = ConceptIndex.load(body)
    assert kept.concept("C0817096") is not None and kept.concept("C0024485") is None


def test_cli_index_build_without_mrsty_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = tmp_path / "META"
    meta.mkdir()
    (meta / "MRCONSO.RRF").write_bytes((FIXTURES / "rrf_small" / "MRCONSO.RRF").read_bytes())
    rc = main(["index", "build", "-q", "--umls", str(meta), "--out", str(tmp_path / "ix")])
    err = capsys.readouterr().err
    assert rc == 2 and "no MRSTY.RRF" in err and "copy it in from the same release" in err
