from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conceptsvc.client.outputs import (
    OutputFormat,
    OutputSet,
    OutputSpec,
    ResultText,
    annotation_from_json,
    annotation_to_json,
    atomic_write_text,
    dumps,
    render,
    resolve_outputs,
)
from conceptsvc.errors import ClientError, OutputClashError, OutputFormatError
from conceptsvc.model import Annotation, Mention

CHEST = Annotation(
    id="ROCOv2_2023_valid_000001",
    mentions=(
        Mention("C1306645", "Plain x-ray", "X-ray", 6, 11, 1.0, ("T060",), "CURATED"),
        Mention("C0817096", "Chest", "Chest", 0, 5, 0.8000000119, ("T029",), "DCM", False),
        Mention("C0018800", "Cardiomegaly", "cardiomegaly", 20, 32, 1.0, ("T047",), "HPO", True),
    ),
    concepts=("C0817096", "C1306645", "C0018800"),
)
EMPTY = Annotation(id="IMG,2", mentions=(), concepts=())
UNICODE = Annotation(
    id="x3",
    mentions=(Mention("C0036921", "Sjögren's syndrome", "Sjögren", 0, 7, 1.0, ("T047",), "DOID"),),
    concepts=("C0036921",),
)


def test_outputs_render_every_format() -> None:
    assert render(OutputFormat.CSV, CHEST) == (
        "ROCOv2_2023_valid_000001,C0817096;C1306645;C0018800\n"
    )
    assert render(OutputFormat.SUBMISSION, CHEST) == (
        "ROCOv2_2023_valid_000001\tC0817096;C1306645;C0018800\n"
    )
    assert render(OutputFormat.ROCO, CHEST) == (
        "ROCOv2_2023_valid_000001\t\tC0817096\tC1306645\tC0018800\n"
    )
    # no concepts: still exactly one line; CSV quotes an id with a comma
    assert render(OutputFormat.CSV, EMPTY) == '"IMG,2",\n'
    assert render(OutputFormat.SUBMISSION, EMPTY) == "IMG,2\t\n"
    assert render(OutputFormat.ROCO, EMPTY) == "IMG,2\t\n"
    line = render(OutputFormat.JSONL, CHEST)
    assert line.endswith("}\n") and line.count("\n") == 1
    obj = json.loads(line)
    assert list(obj) == ["id", "concepts", "mentions"]
    assert obj["mentions"][1] == {
        "cui": "C0817096", "preferred_name": "Chest", "text": "Chest", "start": 0, "end": 5,
        "score": 0.8, "semantic_types": ["T029"], "source": "DCM", "negated": False,
        "hypothetical": False, "historical": False, "experiencer": "patient",
    }
    assert obj["mentions"][2]["negated"] is True
    assert "Sjögren" in render(OutputFormat.JSONL, UNICODE)


def test_outputs_json_round_trip() -> None:
    for a in (CHEST, EMPTY, UNICODE):
        back = annotation_from_json(json.loads(render(OutputFormat.JSONL, a)))
        assert annotation_to_json(back) == annotation_to_json(a)
        assert back.concepts == a.concepts and len(back.mentions) == len(a.mentions)


def test_outputs_resolve_single_and_inferred(tmp_path: Path) -> None:
    assert resolve_outputs(tmp_path / "r.jsonl") == [
        OutputSpec(OutputFormat.JSONL, tmp_path / "r.jsonl")
    ]
    assert resolve_outputs(tmp_path / "r.csv") == [OutputSpec(OutputFormat.CSV, tmp_path / "r.csv")]
    assert resolve_outputs(tmp_path / "r.out") == [
        OutputSpec(OutputFormat.JSONL, tmp_path / "r.out")
    ]
    assert resolve_outputs(tmp_path / "r.txt", ["roco"]) == [
        OutputSpec(OutputFormat.ROCO, tmp_path / "r.txt")
    ]


def test_outputs_resolve_several_formats(tmp_path: Path) -> None:
    specs = resolve_outputs(tmp_path / "run.jsonl", ["jsonl,csv", "submission", "roco"])
    assert specs == [
        OutputSpec(OutputFormat.JSONL, tmp_path / "run.jsonl"),
        OutputSpec(OutputFormat.CSV, tmp_path / "run.csv"),
        OutputSpec(OutputFormat.SUBMISSION, tmp_path / "run.submission.tsv"),
        OutputSpec(OutputFormat.ROCO, tmp_path / "run.roco.tsv"),
    ]
    specs = resolve_outputs(tmp_path / "run.csv", ["csv", f"jsonl={tmp_path / 'x' / 'full.json'}"])
    assert specs[1] == OutputSpec(OutputFormat.JSONL, tmp_path / "x" / "full.json")
    # --out is never left unused: with only FORMAT=PATH items it gets its suffix's format
    assert resolve_outputs(tmp_path / "run.jsonl", [f"csv={tmp_path / 'c.csv'}"]) == [
        OutputSpec(OutputFormat.JSONL, tmp_path / "run.jsonl"),
        OutputSpec(OutputFormat.CSV, tmp_path / "c.csv"),
    ]


def test_outputs_resolve_rejects_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(ClientError, match="unknown output format 'xml'"):
        resolve_outputs(tmp_path / "r.jsonl", ["xml"])
    with pytest.raises(ClientError, match="two outputs would be written"):
        resolve_outputs(tmp_path / "r.csv", ["csv", f"jsonl={tmp_path / 'r.csv'}"])
    with pytest.raises(ClientError, match="path after '=' is empty"):
        resolve_outputs(tmp_path / "r.csv", ["csv="])


def test_outputs_set_commits_atomically(tmp_path: Path) -> None:
    specs = resolve_outputs(tmp_path / "out" / "run.jsonl", ["jsonl", "csv", "submission", "roco"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.csv").write_text("previous\n")
    work = tmp_path / "work"
    with OutputSet(specs, work) as out:
        for a in (CHEST, EMPTY, UNICODE):
            out.write(a)
        # nothing is in place before commit; the old file is untouched
        assert not (tmp_path / "out" / "run.jsonl").exists()
        assert (tmp_path / "out" / "run.csv").read_text() == "previous\n"
        paths = out.commit()
    assert paths == [s.path for s in specs]
    assert list(work.iterdir()) == []
    with (tmp_path / "out" / "run.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows == [
        ["ID", "CUIs"], [CHEST.id, ";".join(CHEST.concepts)], ["IMG,2", ""], ["x3", "C0036921"]
    ]
    jl = (tmp_path / "out" / "run.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["id"] for x in jl] == [CHEST.id, "IMG,2", "x3"]
    assert (tmp_path / "out" / "run.roco.tsv").read_text().count("\n") == 3
    assert (tmp_path / "out" / "run.submission.tsv").read_text().splitlines()[2] == "x3\tC0036921"


def test_outputs_set_aborted_leaves_nothing(tmp_path: Path) -> None:
    specs = resolve_outputs(tmp_path / "run.jsonl", ["jsonl", "csv"])
    work = tmp_path / "work"
    with pytest.raises(RuntimeError), OutputSet(specs, work) as out:
        out.write(CHEST)
        raise RuntimeError("killed")
    assert list(work.iterdir()) == []
    assert not (tmp_path / "run.jsonl").exists() and not (tmp_path / "run.csv").exists()


def test_outputs_atomic_write_text_replaces(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.json"]


def test_issue_16_an_out_extension_must_fit_its_format(tmp_path: Path) -> None:
    # CSV into a .jsonl: refused, with the two commands that work
    with pytest.raises(OutputFormatError) as info:
        resolve_outputs(tmp_path / "big.jsonl", ["csv"])
    text = str(info.value)
    assert info.value.code == "E625"
    assert f"`--out {tmp_path / 'big.csv'} --format csv`" in text
    assert f"`--out {tmp_path / 'big.jsonl'} --format csv={tmp_path / 'big.csv'}`" in text
    # which works: the .jsonl gets jsonl, the .csv csv
    assert resolve_outputs(tmp_path / "big.jsonl", [f"csv={tmp_path / 'big.csv'}"]) == [
        OutputSpec(OutputFormat.JSONL, tmp_path / "big.jsonl"),
        OutputSpec(OutputFormat.CSV, tmp_path / "big.csv"),
    ]
    with pytest.raises(OutputFormatError, match="name jsonl first in --format"):
        resolve_outputs(tmp_path / "big.jsonl", ["csv", "jsonl"])
    with pytest.raises(OutputFormatError, match=r"`--format jsonl=.*full\.jsonl`"):
        resolve_outputs(tmp_path / "r.jsonl", [f"jsonl={tmp_path / 'full.csv'}"])
    with pytest.raises(OutputFormatError, match=r"ends in \.roco\.tsv, the extension of roco"):
        resolve_outputs(tmp_path / "r.roco.tsv", ["submission"])
    # a plain .tsv is either TAB format, never JSONL (the default without --format)
    with pytest.raises(OutputFormatError, match=r"no --format was given.*`--format roco`"):
        resolve_outputs(tmp_path / "r.tsv")
    for fmt in ("roco", "submission"):
        assert resolve_outputs(tmp_path / "r.tsv", [fmt])[0].format == fmt
    # an ending that names one format is that format without --format, as .csv is
    assert resolve_outputs(tmp_path / "r.roco.tsv") == [
        OutputSpec(OutputFormat.ROCO, tmp_path / "r.roco.tsv")]
    assert resolve_outputs(tmp_path / "r.submission.tsv", [f"csv={tmp_path / 'x.csv'}"]) == [
        OutputSpec(OutputFormat.SUBMISSION, tmp_path / "r.submission.tsv"),
        OutputSpec(OutputFormat.CSV, tmp_path / "x.csv"),
    ]
    # the format --out gets is the first one without =PATH, and the message says so
    with pytest.raises(OutputFormatError, match="the first --format without =PATH is submission"):
        resolve_outputs(tmp_path / "p.roco.tsv", [f"roco={tmp_path / 'q.roco.tsv'}", "submission"])
    # endings that name no format take any
    assert resolve_outputs(tmp_path / "r.out", ["csv"])[0].format == "csv"
    assert resolve_outputs(tmp_path / "r.json", ["jsonl"])[0].format == "jsonl"


def test_issue_16_two_outputs_through_a_hard_link_are_one_file(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("ID,CUIs\n")
    os.link(tmp_path / "r.csv", tmp_path / "alias.txt")
    with pytest.raises(OutputClashError) as info:
        resolve_outputs(tmp_path / "r.csv", ["csv", f"roco={tmp_path / 'alias.txt'}"])
    assert info.value.code == "E624"
    assert f"{tmp_path / 'r.csv'} (csv, from --out)" in str(info.value)
    assert f"{tmp_path / 'alias.txt'} (roco, from --format roco=PATH)" in str(info.value)


# Strings that look like the JSON text's own landmarks, quotes, escapes and non-ASCII: what a
# reader of the text must not be fooled by.
_TRICKY = st.sampled_from([
    ',"concepts":[', '],"mentions":[', '{"cui":', '"', "\\", "\\\"", "{", "]}", "\n", "\t",
    "\x00", "\x1f", "é", "😀", "\u2028", ",", ";", " ",
])
_TEXT = st.lists(st.one_of(_TRICKY, st.text(max_size=4)), max_size=5).map("".join)
_MENTION = st.builds(
    Mention, cui=_TEXT, preferred_name=_TEXT, text=_TEXT, start=st.integers(0, 10**6),
    end=st.integers(0, 10**6),
    score=st.floats(min_value=0, max_value=1, allow_nan=False),
    semantic_types=st.lists(_TEXT, max_size=3).map(tuple), source=_TEXT, negated=st.booleans(),
    hypothetical=st.booleans(), historical=st.booleans(), experiencer=_TEXT,
)
_ANNOTATION = st.builds(
    Annotation, id=_TEXT.filter(bool), mentions=st.lists(_MENTION, max_size=4).map(tuple),
    concepts=st.lists(_TEXT | st.sampled_from(["C1", "C1", '"', "\\"]), max_size=5).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(a=_ANNOTATION, caption=st.none() | _TEXT)
def test_outputs_result_text_renders_as_the_annotation(a: Annotation, caption: str | None) -> None:
    """A result written from its JSON text (what the journal holds) is byte for byte what
    ``render`` makes of the annotation, in every text format; the id, concepts and mention
    count read off the text are the annotation's."""
    result = ResultText.of(a)
    assert result.text == dumps(annotation_to_json(a)).encode("utf-8")
    for fmt in (OutputFormat.JSONL, OutputFormat.CSV, OutputFormat.SUBMISSION, OutputFormat.ROCO):
        assert result.render(fmt, caption) == render(fmt, a, caption).encode("utf-8"), fmt
    assert (result.id(), result.concepts()) == (a.id, list(a.concepts))
    assert result.mention_count() == len(a.mentions)
    assert result.distinct_concepts() == len(set(a.concepts))
    # text of another shape (keys in another order, one more key) is read whole, to the same
    # answers
    obj = annotation_to_json(a)
    for shape in ({"mentions": obj["mentions"], **obj}, {"n": 1, **obj}, {**obj, "n": [1]}):
        other = ResultText(dumps(shape).encode("utf-8"))
        assert (other.id(), other.concepts(), other.mention_count(),
                other.distinct_concepts()) == (
            a.id, list(a.concepts), len(a.mentions), len(set(a.concepts))
        )
        assert other.obj() == shape


def test_outputs_set_writes_a_result_text_as_its_annotation(tmp_path: Path) -> None:
    specs = resolve_outputs(tmp_path / "run.jsonl", ["jsonl", "csv", "submission", "roco"])
    both = [tmp_path / "from-annotations", tmp_path / "from-texts"]
    for k, base in enumerate(both):
        with OutputSet([OutputSpec(s.format, base / s.path.name) for s in specs],
                       base / "work") as out:
            for a, caption in ((CHEST, "Chest X-ray: cardiomegaly"), (EMPTY, None),
                               (UNICODE, "Sjögren")):
                if k == 0:
                    out.write(a, caption)
                else:
                    out.write_result(ResultText.of(a), caption)
            out.commit()
    for spec in specs:
        one, two = (base / spec.path.name for base in both)
        assert one.read_bytes() == two.read_bytes()
        expected = "".join(render(spec.format, a, c) for a, c in (
            (CHEST, "Chest X-ray: cardiomegaly"), (EMPTY, None), (UNICODE, "Sjögren")))
        header = "ID,CUIs\n" if spec.format is OutputFormat.CSV else ""
        assert one.read_text(encoding="utf-8") == header + expected
