from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from array import array
from pathlib import Path

import pytest

from conceptsvc.client import corpus as corpus_module
from conceptsvc.client.corpus import (
    BadRecord,
    Caption,
    Corpus,
    InputFormat,
    detect_format,
    find_duplicates,
    id_hash,
)
from conceptsvc.errors import BadInputError, ClientError

CSV_TEXT = (
    "ID,Caption\r\n"
    'IMG_1,"Chest X-ray showing cardiomegaly, and mild congestion."\r\n'
    'IMG_2,"He said ""no"" to CT"\r\n'
    "IMG_3,Plain caption without quotes\r\n"
)


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return p


def goods(corpus: Corpus) -> list[tuple[int, str, str, int]]:
    return [(c.seq, c.id, c.text, c.line) for c in corpus.captions()]


def test_corpus_detect_format_by_extension_and_sniffing() -> None:
    assert detect_format("a/b/captions.csv") is InputFormat.CSV
    assert detect_format("captions.CSV.gz") is InputFormat.CSV
    assert detect_format("x.jsonl") is InputFormat.JSONL
    assert detect_format("x.ndjson") is InputFormat.JSONL
    assert detect_format("x.tsv") is InputFormat.ROCO
    assert detect_format("x.txt", "ROCO_00020\t Axial CT\n") is InputFormat.ROCO
    assert detect_format("x.txt", "Axial CT of the pelvis\n") is InputFormat.TEXT
    assert detect_format("", '{"id": "a", "text": "b"}') is InputFormat.JSONL
    assert detect_format("", "ID,Caption\n") is InputFormat.CSV
    assert detect_format("", "\ufeffid,caption\n") is InputFormat.CSV


def test_corpus_csv_reads_quoting_crlf_and_header(tmp_path: Path) -> None:
    corpus = Corpus(write(tmp_path, "c.csv", CSV_TEXT))
    assert corpus.format is InputFormat.CSV
    assert goods(corpus) == [
        (0, "IMG_1", "Chest X-ray showing cardiomegaly, and mild congestion.", 2),
        (1, "IMG_2", 'He said "no" to CT', 3),
        (2, "IMG_3", "Plain caption without quotes", 4),
    ]
    scan = corpus.scan()
    assert (scan.n_records, scan.n_good, scan.bad) == (3, 3, [])
    assert scan.sha256 == hashlib.sha256(CSV_TEXT.encode()).hexdigest()


@pytest.mark.parametrize("header", ["image_id,caption", "name,Caption", "ID,text",
                                    "figure,description", "\ufeffImage ID,Captions"])
def test_corpus_csv_two_column_headers_other_than_id_caption(tmp_path: Path,
                                                              header: str) -> None:
    """A two-column header names an id or a caption column in other words than ROCOv2's
    ID,Caption: it is a header, not a caption (it was annotated as one, id "image_id")."""
    corpus = Corpus(write(tmp_path, "c.csv", f"{header}\nA,CT of the chest\nB,MRI brain\n"))
    assert goods(corpus) == [(0, "A", "CT of the chest", 2), (1, "B", "MRI brain", 3)]
    # a first row that names neither stays a caption (headerless ID,Caption input)
    corpus = Corpus(write(tmp_path, "d.csv", "ROCO_1,Axial CT\nROCO_2,MRI brain\n"))
    assert [c.id for c in corpus.captions()] == ["ROCO_1", "ROCO_2"]


def test_corpus_csv_with_bom_and_multiline_quoted_caption(tmp_path: Path) -> None:
    data = '\ufeffID,Caption\nA,"first line\nsecond line"\nB,next\n'
    corpus = Corpus(write(tmp_path, "c.csv", data))
    assert goods(corpus) == [(0, "A", "first line\nsecond line", 2), (1, "B", "next", 4)]


def test_corpus_csv_bad_quoting_is_reported_with_lines(tmp_path: Path) -> None:
    data = (
        "ID,Caption\n"
        'A,"fine"\n'
        'B,"stray "quote" inside"\n'  # line 3: quote in the middle of a quoted field
        "C,unquoted, comma\n"  # line 4: three fields
        'D,"unterminated\n'  # line 5, swallows line 6 then fails
        'E,"next"\n'
        "F,last\n"
        ",no id\n"  # line 8
        "G\n"  # line 9: one field
    )
    corpus = Corpus(write(tmp_path, "c.csv", data))
    scan = corpus.scan()
    bad = {b.line: b for b in scan.bad}
    assert sorted(bad) == [3, 4, 5, 8, 9]
    assert "bad CSV quoting" in bad[3].problem
    assert "3 field(s), expected 2" in bad[4].problem and bad[4].id == "C"
    assert (bad[5].line, bad[5].end_line) == (5, 6) and "from line 5" in bad[5].problem
    assert "missing id" in bad[8].problem
    assert "1 field(s)" in bad[9].problem
    assert [c.id for c in corpus.captions()] == ["A", "F"]
    assert scan.n_good == 2 and scan.n_records == 7
    # seq numbers count bad records too, so they are the same whatever is skipped
    assert [c.seq for c in corpus.captions()] == [0, 4]


def test_corpus_invalid_utf8_reported_with_line_and_byte(tmp_path: Path) -> None:
    data = b"ID,Caption\nA,ok\nB,caf\xe9 au lait\nC,fine\n"
    scan = Corpus(write(tmp_path, "c.csv", data)).scan()
    assert len(scan.bad) == 1
    b = scan.bad[0]
    assert (b.line, b.id) == (3, "B")
    assert "invalid UTF-8" in b.problem and "0xe9" in b.problem and "offset 5" in b.problem


def test_corpus_duplicate_ids_keep_the_first(tmp_path: Path) -> None:
    data = "ID,Caption\nA,one\nB,two\nA,three\n"
    corpus = Corpus(write(tmp_path, "c.csv", data))
    scan = corpus.scan()
    assert [(b.line, b.id) for b in scan.bad] == [(4, "A")]
    assert "duplicate id 'A' (first seen at line 2)" in scan.bad[0].problem
    assert [(c.id, c.text) for c in corpus.captions()] == [("A", "one"), ("B", "two")]


def test_corpus_roco_strips_the_format_space_only(tmp_path: Path) -> None:
    data = (
        "ROCO_00020\t Axial computed tomography of the pelvis.\n"
        "ROCO_00027\t  Two spaces: one belongs to the caption.\n"
        "ROCO_00030\tNo space at all.\n"
        "\n"
        "no tab here\n"
        "\t missing id\n"
    )
    corpus = Corpus(write(tmp_path, "captions.txt", data))
    assert corpus.format is InputFormat.ROCO
    assert goods(corpus) == [
        (0, "ROCO_00020", "Axial computed tomography of the pelvis.", 1),
        (1, "ROCO_00027", " Two spaces: one belongs to the caption.", 2),
        (2, "ROCO_00030", "No space at all.", 3),
    ]
    bad = Corpus(write(tmp_path, "captions.tsv", data)).scan().bad
    assert [(b.line, b.problem.split(" (")[0]) for b in bad] == [
        (5, "no TAB between id and caption"),
        (6, "missing id"),
    ]


def test_corpus_jsonl_validates_objects(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "a", "text": "CT of the chest"}),
        json.dumps({"id": 7, "text": "integer ids are fine"}),
        "",
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"text": "no id"}),
        json.dumps({"id": "", "text": "empty id"}),
        json.dumps({"id": True, "text": "bool id"}),
        json.dumps({"id": "b"}),
        '{"id": "c", "text": "lone \\ud800 surrogate"}',
        json.dumps({"id": "a", "text": "dup"}),
    ]
    corpus = Corpus(write(tmp_path, "c.jsonl", "\n".join(lines) + "\n"))
    assert goods(corpus) == [(0, "a", "CT of the chest", 1), (1, "7", "integer ids are fine", 2)]
    bad = {b.line: b.problem for b in corpus.scan().bad}
    assert sorted(bad) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert bad[4].startswith("invalid JSON")
    assert "expected a JSON object" in bad[5]
    assert all("missing id" in bad[n] for n in (6, 7, 8))
    assert "missing caption" in bad[9]
    assert "unpaired surrogate" in bad[10]
    assert "duplicate id 'a'" in bad[11]


def test_corpus_plain_text_ids_are_line_numbers(tmp_path: Path) -> None:
    data = b"first caption\r\n\nthird caption\nbad \xff byte\n"
    corpus = Corpus(write(tmp_path, "c.txt", data))
    assert corpus.format is InputFormat.TEXT
    assert goods(corpus) == [(0, "1", "first caption", 1), (1, "3", "third caption", 3)]
    assert [(b.line, b.id) for b in corpus.scan().bad] == [(4, "4")]


def test_corpus_format_override_and_unknown_format(tmp_path: Path) -> None:
    p = write(tmp_path, "c.csv", "a\tb\n")
    assert [c.text for c in Corpus(p, "roco").captions()] == ["b"]
    with pytest.raises(ClientError, match="unknown input format 'xml'"):
        Corpus(p, "xml")
    with pytest.raises(ClientError, match="does not exist"):
        Corpus(tmp_path / "missing.csv")


def test_corpus_gzip_input(tmp_path: Path) -> None:
    p = write(tmp_path, "c.csv.gz", gzip.compress(CSV_TEXT.encode()))
    corpus = Corpus(p)
    assert corpus.format is InputFormat.CSV
    assert [c.id for c in corpus.captions()] == ["IMG_1", "IMG_2", "IMG_3"]
    truncated = write(tmp_path, "t.csv.gz", gzip.compress(CSV_TEXT.encode() * 50)[:-30])
    with pytest.raises(ClientError, match="truncated"):
        Corpus(truncated).scan()


def test_corpus_from_bytes_sniffs_like_stdin() -> None:
    corpus = Corpus.from_bytes(b'{"id": "x", "text": "MRI of the brain"}\n')
    assert corpus.format is InputFormat.JSONL
    assert [c.id for c in corpus.captions()] == ["x"]


def test_corpus_stdin_is_read_once_and_rescannable() -> None:
    # Corpus("-") reads sys.stdin.buffer; run it in a child so stdin is real.
    code = (
        "from conceptsvc.client.corpus import Corpus\n"
        "c = Corpus('-')\n"
        "print(c.format.value, c.scan().n_good, [x.id for x in c.captions()])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=CSV_TEXT.encode(), capture_output=True, check=True
    )
    assert out.stdout.decode().strip() == "csv 3 ['IMG_1', 'IMG_2', 'IMG_3']"


def test_corpus_bad_input_error_lists_locations() -> None:
    bad = [BadRecord(i, i + 2, i + 2, f"problem {i}") for i in range(25)]
    err = BadInputError("in.csv", bad)
    text = str(err)
    assert err.code == "E620" and "25 malformed record(s); nothing was sent" in text
    assert "in.csv:2: problem 0" in text and "... and 5 more" in text
    assert "--on-bad-input skip" in text


def test_corpus_records_yields_good_and_bad_in_order() -> None:
    corpus = Corpus.from_bytes(b"ID,Caption\nA,x\nA,y\nB,z\n", "csv")
    kinds = [type(r).__name__ for r in corpus.records()]
    assert kinds == ["Caption", "BadRecord", "Caption"]
    recs = list(corpus.records())
    assert isinstance(recs[0], Caption) and isinstance(recs[1], BadRecord)
    assert recs[1].to_json() == {
        "id": "A", "line": 3, "end_line": 3, "stage": "input",
        "reason": "duplicate id 'A' (first seen at line 2)",
    }


def test_corpus_does_not_buffer_files(tmp_path: Path) -> None:
    # A file corpus streams: two independent passes give the same records.
    p = write(tmp_path, "c.csv", CSV_TEXT)
    corpus = Corpus(p)
    assert corpus._buffer is None
    assert goods(corpus) == goods(corpus)


def test_corpus_ids_that_would_break_tsv_outputs_are_bad() -> None:
    data = b'ID,Caption\n"a\tb",tab in id\n"c\nd",newline in id\nok,fine\n'
    corpus = Corpus.from_bytes(data, "csv")
    assert [(b.line, "TAB, line break" in b.problem) for b in corpus.scan().bad] == [
        (2, True), (3, True)
    ]
    assert [c.id for c in corpus.captions()] == ["ok"]


def test_corpus_csv_reads_megabyte_captions() -> None:
    big = "pleural effusion " * 120_000  # ~2 MB, over the csv module's default field limit
    corpus = Corpus.from_bytes(f'ID,Caption\nbig,"{big}"\nsmall,x\n'.encode(), "csv")
    assert corpus.scan().bad == []
    assert [len(c.text) for c in corpus.captions()] == [len(big), 1]


def test_corpus_csv_unterminated_quote_at_end_of_file() -> None:
    bad = Corpus.from_bytes(b'ID,Caption\nA,ok\nB,"never closed\nC,more\n', "csv").scan().bad
    assert [(b.line, b.end_line) for b in bad] == [(3, 4)]
    assert "unexpected end of data" in bad[0].problem


# -- other layouts: --id-column / --text-column (issue 16) ---------------------------------------
WIDE_CSV = (
    "image_id,split,caption,modality\n"
    "IMG_1,train,\"Chest X-ray, frontal view.\",XR\n"
    "IMG_2,valid,CT of the abdomen,CT\n"
    "IMG_3,train,too few\n"
    "IMG_4,test,MRI of the brain,MR\n"
)


def test_issue_16_csv_with_other_columns_names_them_and_the_options(tmp_path: Path) -> None:
    path = write(tmp_path, "wide.csv", WIDE_CSV)
    with pytest.raises(ClientError) as err:
        Corpus(path).scan()
    text = str(err.value)
    assert "image_id, split, caption, modality" in text
    assert "--id-column" in text and "--text-column" in text
    assert "captions containing commas must be quoted" not in text


def test_corpus_csv_columns_chosen_by_header_name(tmp_path: Path) -> None:
    path = write(tmp_path, "wide.csv", WIDE_CSV)
    corpus = Corpus(path, id_column="image_id", text_column="Caption")  # case-insensitive
    assert goods(corpus) == [
        (0, "IMG_1", "Chest X-ray, frontal view.", 2),
        (1, "IMG_2", "CT of the abdomen", 3),
        (3, "IMG_4", "MRI of the brain", 5),
    ]
    bad = corpus.scan().bad
    assert [(b.line, b.id, b.problem) for b in bad] == [
        (4, "IMG_3", "3 field(s), expected 4 (the header's columns)")
    ]
    with pytest.raises(ClientError, match=r"no column 'text'.*columns: image_id, split"):
        Corpus(path, id_column="image_id", text_column="text").scan()


def test_corpus_csv_id_caption_header_with_extra_columns_needs_no_options(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "extra.csv", "Caption,ID,source\nCT scan,a,x\nX-ray,b,y\n")
    assert goods(Corpus(path)) == [(0, "a", "CT scan", 2), (1, "b", "X-ray", 3)]


def test_corpus_jsonl_keys_chosen(tmp_path: Path) -> None:
    path = write(tmp_path, "c.jsonl", '{"pmcid": "P1", "caption": "CT"}\n{"pmcid": "P2"}\n')
    corpus = Corpus(path, id_column="pmcid", text_column="caption")
    assert goods(corpus) == [(0, "P1", "CT", 1)]
    assert corpus.scan().bad[0].problem == (
        "missing caption (needs a string \"caption\"; the object's keys: pmcid)"
    )
    default = Corpus(path).scan().bad[0].problem
    assert "the object's keys: pmcid, caption" in default and "--id-column" in default


def test_corpus_columns_refused_for_formats_without_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "c.tsv", "ROCO_1\t CT\n")
    with pytest.raises(ClientError, match="apply to csv, jsonl"):
        Corpus(path, text_column="caption")


DUP_CSV = (
    "ID,Caption\n"
    "a,one\n"          # line 2
    "b,two\n"          # line 3
    '"a","one, again\nacross two lines"\n'  # lines 4-5: duplicate of line 2
    "c,three\n"        # line 6
    "b,two again\n"    # line 7: duplicate of line 3
    "a,third a\n"      # line 8: duplicate of line 2
)


def _dup_problems(corpus: Corpus) -> list[tuple[int, int, str | None, str]]:
    return [(b.seq, b.line, b.id, b.problem) for b in corpus.scan().bad]


def test_issue_16_duplicate_ids_found_from_hashes_even_when_hashes_collide() -> None:
    want = [
        (2, 4, "a", "duplicate id 'a' (first seen at line 2)"),
        (4, 7, "b", "duplicate id 'b' (first seen at line 3)"),
        (5, 8, "a", "duplicate id 'a' (first seen at line 2)"),
    ]
    assert _dup_problems(Corpus.from_bytes(DUP_CSV.encode(), "csv")) == want
    # Every id hashing alike, or distinct ids sharing a hash with a real duplicate, must not
    # make a unique id ("c") a duplicate nor lose a real one.
    for forced in (lambda rid: 0, lambda rid: 0 if rid in ("a", "c") else id_hash(rid)):
        corpus = Corpus.from_bytes(DUP_CSV.encode(), "csv")
        corpus.hash_id = forced
        assert _dup_problems(corpus) == want
        assert [(c.seq, c.id, c.line) for c in corpus.captions()] == [
            (0, "a", 2), (1, "b", 3), (3, "c", 6)
        ]


def test_issue_16_find_duplicates_is_rows_and_keeps_only_the_colliding_ids() -> None:
    recs = [Caption(0, "x", "t", 1), BadRecord(1, 2, 2, "bad"), Caption(2, "y", "t", 3),
            Caption(3, "x", "t", 4)]
    seen: list[str] = []

    def h(rid: str) -> int:
        seen.append(rid)
        return id_hash(rid)

    hashes = array("Q", (id_hash(r.id) for r in recs if isinstance(r, Caption)))
    assert hashes.itemsize == 8  # 8 bytes a caption while scanning, nothing after
    found = find_duplicates(hashes, lambda: recs, "row", hash_id=h)
    assert {s: (b.line, b.problem, b.unit) for s, b in found.items()} == {
        3: (4, "duplicate id 'x' (first seen at row 1)", "row")
    }
    # no duplicate hash, no second pass at all
    assert find_duplicates(array("Q", [1, 2, 3]), lambda: recs, "line", hash_id=h) == {}
    assert seen == ["x", "y", "x"]


def test_issue_16_streaming_pass_reuses_the_scans_duplicate_check() -> None:
    lines = "".join(f"id{i}\tcaption {i}\n" for i in range(2000)) + "id7\tagain\n"
    calls = 0

    def counting(rid: str) -> int:
        nonlocal calls
        calls += 1
        return id_hash(rid)

    corpus = Corpus.from_bytes(lines.encode(), "roco")
    corpus.hash_id = counting
    scan = corpus.scan()
    assert [(b.line, b.problem) for b in scan.bad] == [
        (2001, "duplicate id 'id7' (first seen at line 8)")
    ]
    after_scan = calls
    caps = list(corpus.captions())
    assert len(caps) == scan.n_good == 2000 and calls == after_scan


def test_corpus_small_input_is_parsed_once_and_a_large_one_streamed_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan keeps a small corpus's records, so the annotation pass reads nothing again;
    past KEEP_BYTES they are read again from the file. Either way the same records, bad
    ones (malformed, duplicate ids) included."""
    text = CSV_TEXT + 'IMG_4,"bad "quote""\r\nIMG_1,again\r\n,no id\r\nIMG\t5,tab in id\r\n'
    path = write(tmp_path, "c.csv", text)
    opened: list[str] = []
    real_open = Corpus._open

    def counting_open(self: Corpus) -> object:
        opened.append(self.source)
        return real_open(self)

    monkeypatch.setattr(Corpus, "_open", counting_open)
    seen = []
    for keep in (corpus_module.KEEP_BYTES, 0):
        monkeypatch.setattr(corpus_module, "KEEP_BYTES", keep)
        corpus = Corpus(path)
        scan = corpus.scan()
        opened.clear()
        records = list(corpus.records())
        assert [c.id for c in corpus.captions()] == ["IMG_1", "IMG_2", "IMG_3"]
        assert (len(opened) == 0) == (keep > 0), keep  # read again only when not kept
        seen.append((scan, records))
    assert seen[0] == seen[1]
    kinds = [(type(r).__name__, r.seq) for r in seen[0][1]]
    assert kinds == [("Caption", 0), ("Caption", 1), ("Caption", 2), ("BadRecord", 3),
                     ("BadRecord", 4), ("BadRecord", 5), ("BadRecord", 6)]


def test_corpus_repeated_hashes_in_python_and_numpy_alike() -> None:
    """Few ids are checked for duplicates by sorting in Python, many with numpy (imported
    only then): the same repeated values."""
    for values in ([], [5], [1, 2, 3], [3, 1, 3, 2, 1, 3], [2**64 - 1, 0, 2**64 - 1],
                   [k % 997 for k in range(5000)]):
        hashes = array("Q", values)
        python = corpus_module._repeated(hashes, python_below=len(values) + 1)
        numpy = corpus_module._repeated(hashes, python_below=0)
        assert python == numpy == {v for v in values if values.count(v) > 1}, values
