"""The wire: protobuf messages to and from conceptsvc's domain types, both directions inverse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from service_helpers import build_index_a

from conceptsvc import wire
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc.errors import ExtractArgumentError, ExtractionError
from conceptsvc.index import ConceptIndex
from conceptsvc.model import Annotation, Candidate, ExtractOptions, Mention
from conceptsvc.semantic_network import load_semantic_network


@pytest.fixture(scope="module")
def index_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index_a(tmp_path_factory.mktemp("wire") / "index-a")


# -- options -------------------------------------------------------------------------------
def test_wire_options_round_trip_sets_every_field() -> None:
    opts = ExtractOptions(
        semantic_types=("T047", "dsyn"), semantic_groups=("ANAT",), sources=("MSH",),
        exclude_cuis=("C1",), mode="approximate", similarity="dice", threshold=0.85,
        overlap="all", profile="rocov2", include_negated=False, include_mentions=False,
    )
    msg = wire.options_to_pb(opts)
    for name in ("semantic_types", "threshold", "profile", "include_negated", "include_mentions"):
        assert msg.HasField(name)
    other_defaults = ExtractOptions(mode="exact", semantic_groups=("DISO",), threshold=0.5)
    assert wire.options_from_pb(msg, other_defaults) == opts
    # Even the "falsy" values survive: an empty list and False are sent, not left unset.
    empty = wire.options_to_pb(ExtractOptions(include_negated=False))
    back = wire.options_from_pb(empty, other_defaults)
    assert back.semantic_groups == () and back.include_negated is False


def test_wire_options_partial_message_merges_over_defaults() -> None:
    defaults = ExtractOptions(semantic_groups=("DISO",), threshold=0.9, profile="rocov2")
    assert wire.options_from_pb(pb.AnnotateOptions(), defaults) is defaults
    msg = pb.AnnotateOptions(mode=pb.MATCH_MODE_APPROXIMATE, include_mentions=False)
    got = wire.options_from_pb(msg, defaults)
    assert got == ExtractOptions(
        semantic_groups=("DISO",), threshold=0.9, profile="rocov2", mode="approximate",
        include_mentions=False,
    )


def test_wire_options_unknown_values_are_errors() -> None:
    msg = pb.AnnotateOptions()
    msg.similarity = 42
    with pytest.raises(ExtractionError, match="similarity enum value 42"):
        wire.options_from_pb(msg, ExtractOptions())
    with pytest.raises(ExtractionError, match="mode 'fuzzy'"):
        wire.options_to_pb(ExtractOptions(mode="fuzzy"))


def test_wire_annotation_round_trip() -> None:
    text = "ﬁndings: Ｃhest ＣＴ 🙂 pneumothorax"
    start = text.index("pneumothorax")
    assert start == 20  # code points: the emoji and full-width letters count one each
    m = Mention(
        "C0032326", "Pneumothorax", "pneumothorax", start, start + 12, 0.875, ("T047",), "MSH",
        True,
    )
    a = Annotation("id-1", (m,), ("C0032326", "C0040405"))
    msg = wire.annotation_to_pb(a)
    sent = pb.AnnotateResponse.FromString(msg.SerializeToString())
    assert wire.annotation_from_pb(sent) == a
    ok = wire.stream_result_from_pb(sent)
    assert ok.ok and ok.annotation == a
    bad = pb.AnnotateResponse(id="x", status=pb.ItemStatus(code=3, message="m", error_code="E300"))
    res = wire.stream_result_from_pb(bad)
    assert not res.ok and res.annotation is None
    assert res.error is not None and (res.error.status, res.error.error_code) == (
        "INVALID_ARGUMENT", "E300"
    )


def test_wire_concept_candidate_and_catalog_round_trip(index_a: Path) -> None:
    sn = load_semantic_network()
    idx = ConceptIndex.load(index_a)
    info = idx.concept("C0040405")
    assert info is not None
    rec = wire.concept_from_pb(wire.concept_to_pb(info, sn, idx.concept_postings("C0040405")))
    assert rec.cui == "C0040405" and rec.semantic_types[0] == sn.types["T060"]
    assert [(s.string, s.tty, s.abbreviation) for s in rec.synonyms] == [
        ("computed tomography", "PT", False), ("CT", "AB", True)
    ]
    cand = Candidate("C0040405", "X-Ray Computed Tomography", "CT", 1.0, ("T060", "T000"), ("MSH",))
    assert wire.candidate_from_pb(wire.candidate_to_pb(cand, sn)) == cand
    unknown = wire.candidate_to_pb(cand, sn).semantic_types[1]  # T000: a placeholder entry
    assert unknown.group == "UNKNOWN" and unknown.name == "Unknown"
    cat = wire.catalog_from_pb(wire.catalog_to_pb(sn))
    assert set(cat.types) == set(sn.types.values())
    assert {g.code: g.tuis for g in cat.groups} == {c: g.tuis for c, g in sn.groups.items()}


def test_wire_stream_result_carries_the_index_hash() -> None:
    """The index that answered reaches the domain result, for a result and for an item error;
    a response from a server older than the field has none."""
    ok = wire.stream_result_from_pb(
        pb.AnnotateResponse(id="a", concepts=["C0024109"], index_hash="f" * 64)
    )
    assert ok.index_hash == "f" * 64 and ok.annotation is not None and ok.ok
    failed = wire.stream_result_from_pb(pb.AnnotateResponse(
        id="b", status=pb.ItemStatus(code=3, message="bad"), index_hash="e" * 64
    ))
    assert failed.index_hash == "e" * 64 and failed.error is not None
    old = pb.AnnotateResponse.FromString(pb.AnnotateResponse(id="c").SerializeToString())
    assert wire.stream_result_from_pb(old).index_hash == ""


def test_wire_context_properties_and_include_hypothetical() -> None:
    # issue 17: ConText's properties travel on the Mention; include_hypothetical only when set
    m = Mention("C0032285", "Pneumonia", "pneumonia", 9, 18, 1.0, ("T047",), "MSH",
                False, True, True, "other")
    a = Annotation("id-2", (m,), ("C0032285",))
    sent = pb.AnnotateResponse.FromString(wire.annotation_to_pb(a).SerializeToString())
    assert wire.annotation_from_pb(sent) == a
    # a server older than the fields sends none of them: patient, neither hypothetical nor
    # historical
    old = pb.AnnotateResponse(id="x", mentions=[pb.Mention(cui="C1", text="a", start=0, end=1)])
    got = wire.annotation_from_pb(old).mentions[0]
    assert (got.hypothetical, got.historical, got.experiencer) == (False, False, "patient")
    # None (the profile's choice) is left unset; True and False are sent
    assert not wire.options_to_pb(ExtractOptions()).HasField("include_hypothetical")
    defaults = ExtractOptions(include_hypothetical=True)
    assert wire.options_from_pb(wire.options_to_pb(ExtractOptions()), defaults) == defaults
    for value in (True, False):
        msg = wire.options_to_pb(ExtractOptions(include_hypothetical=value))
        assert msg.HasField("include_hypothetical")
        assert wire.options_from_pb(msg, ExtractOptions()).include_hypothetical is value


# -- annotations as wire bytes -------------------------------------------------------------
# (control characters, quotes and backslashes included: the JSON writer escapes them)
_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ['"', "\\", "\n\t\r\b\f\x00\x1f\x7f", "é\u2028😀", ""]
)
_mentions = st.builds(
    Mention,
    cui=_texts, preferred_name=_texts, text=_texts,
    start=st.integers(0, 2**32 - 1), end=st.integers(0, 2**32 - 1),
    score=st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, 1.0]),
    semantic_types=st.lists(_texts, max_size=3).map(tuple),
    source=_texts, negated=st.booleans(), hypothetical=st.booleans(),
    historical=st.booleans(),
    # (never empty: an empty experiencer reads back as "patient", servers older than it)
    experiencer=st.sampled_from(["patient", "other"]) | _texts.filter(bool),
)
_annotations = st.builds(
    Annotation, id=st.just(""), mentions=st.lists(_mentions, max_size=4).map(tuple),
    concepts=st.lists(_texts, max_size=4).map(tuple),
)


def _protobuf_bytes(a: Annotation) -> bytes:
    return bytes(wire.annotation_to_pb(a).SerializeToString())


def test_wire_compiled_writer_is_built_and_used() -> None:
    """The compiled writer must be what the server gets: a Mention field added on one side
    only (or of a type the writers do not know) would turn it off, and this fails."""
    from conceptsvc import _wire

    assert isinstance(wire.annotation_writer(), _wire.AnnotationWriter)
    assert isinstance(wire.item_joiner(), _wire.ItemJoiner)
    assert isinstance(wire.result_reader(), _wire.ResultReader)
    layout, mentions, concepts = wire.annotation_layout()
    assert [name for name, _, _ in layout] == [f.name for f in fields(Mention)]
    assert (mentions, concepts) == (2, 3)


@settings(max_examples=300, deadline=None)
@given(_annotations)
def test_wire_writers_give_protobufs_own_bytes(a: Annotation) -> None:
    expected = _protobuf_bytes(a)
    assert wire.annotation_writer().encode(a) == expected
    assert wire.annotation_writer(compiled=False).encode(a) == expected
    back = wire.annotation_from_pb(pb.AnnotateResponse.FromString(expected))
    assert (back.mentions, back.concepts) == (a.mentions, a.concepts)
    # the same values as rows (what the server hands the writer): the same bytes
    rows = (tuple(m.row() for m in a.mentions), a.concepts)
    assert wire.annotation_writer().encode_rows(rows) == expected
    assert wire.annotation_writer(compiled=False).encode_rows(rows) == expected
    assert wire._ProtobufWriter().encode_rows(rows) == expected


def test_wire_writers_refuse_rows_of_another_length_or_type() -> None:
    """A row is checked, not trusted: a short one is refused by every writer (Mention's
    defaults would otherwise fill it in), and a value of the wrong type in a string field is a
    TypeError in the compiled writer, never a read of another object's memory."""
    m = Mention("C1", "n", "t", 0, 1, 1.0, ("T1",), "S")
    for writer in (wire.annotation_writer(), wire.annotation_writer(compiled=False),
                   wire._ProtobufWriter()):
        with pytest.raises(ValueError, match="11 values, not 12"):
            writer.encode_rows(((m.row()[:-1],), ()))
    for bad in (0, b"C1", ()):
        with pytest.raises(TypeError):
            wire.annotation_writer().encode_rows((((bad, *m.row()[1:]),), ()))


def test_wire_writers_on_the_demo_captions(tmp_path: Path) -> None:
    from conceptsvc.embedded import demo_index
    from conceptsvc.extractor import Extractor

    ex = Extractor(demo_index(tmp_path))
    fast, ref = wire.annotation_writer(), wire.annotation_writer(compiled=False)
    rows = (Path(__file__).parent.parent / "conceptsvc" / "data" / "demo" / "captions.csv")
    import csv

    with rows.open(newline="", encoding="utf-8") as fh:
        texts = [r[1] for r in list(csv.reader(fh))[1:]]
    n_mentions = 0
    for opts in (ExtractOptions(), ExtractOptions(include_mentions=False),
                 ExtractOptions(profile="rocov2", overlap="all"),
                 ExtractOptions(mode="approximate", include_hypothetical=True)):
        for text in texts:
            a = ex.extract(text, opts)
            n_mentions += len(a.mentions)
            assert fast.encode(a) == ref.encode(a) == _protobuf_bytes(a), text
            # the server's path: the engine's rows (no Mention objects), written as rows
            rows = ex.extract_rows(text, opts)
            assert rows == (tuple(m.row() for m in a.mentions), a.concepts), text
            assert fast.encode_rows(rows) == ref.encode_rows(rows) == fast.encode(a), text
    assert n_mentions > 100


def test_wire_extract_rows_of_the_reference_engine_match_the_compiled_one(
    tmp_path: Path,
) -> None:
    """``Extractor.extract_rows`` on the reference engine (Mention objects turned into rows)
    gives what the compiled one builds without them."""
    from conceptsvc.embedded import demo_index
    from conceptsvc.extractor import Extractor

    index = demo_index(tmp_path)
    fast, ref = Extractor(index, engine="compiled"), Extractor(index, engine="reference")
    texts = ["No pleural effusion. History of stroke; mother had breast cancer.",
             "CT of the chest (computed tomography) shows a lung nodule", "", "xyz"]
    for opts in (None, ExtractOptions(mode="approximate"), ExtractOptions(include_mentions=False)):
        for text in texts:
            assert fast.extract_rows(text, opts) == ref.extract_rows(text, opts), text
    assert fast.extract_rows(texts[0])[0], "the first text has mentions"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(_annotations, _texts, st.booleans()), max_size=6),
    st.text(alphabet="0123456789abcdef", max_size=64),
)
def test_wire_joined_items_read_back_as_the_batch_response(
    items: list[tuple[Annotation, str, bool]], index_hash: str
) -> None:
    writer = wire.annotation_writer()
    blobs = [writer.encode(a) for a, _, _ in items]
    ids = [rid for _, rid, _ in items]
    cached = bytearray(hit for _, _, hit in items)
    tail = pb.AnnotateResponse(index_hash=index_hash).SerializeToString()
    joined = wire.item_joiner().join(blobs, ids, cached, tail)
    assert joined == wire.item_joiner(compiled=False).join(blobs, ids, cached, tail)
    reply = pb.AnnotateBatchResponse.FromString(joined)
    assert len(reply.items) == len(items)
    for got, (a, rid, hit), blob in zip(reply.items, items, blobs, strict=True):
        want = wire.annotation_to_pb(replace(a, id=rid))
        want.cached, want.index_hash = hit, index_hash
        assert got == want
        # one item alone (what Annotate and AnnotateStream send) reads the same
        assert pb.AnnotateResponse.FromString(wire.response_bytes(blob, rid, hit, tail)) == got


def test_wire_joiner_refuses_lists_of_different_lengths() -> None:
    for joiner in (wire.item_joiner(), wire.item_joiner(compiled=False)):
        with pytest.raises(ValueError):
            joiner.join([b""], [], bytearray(1), b"")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(_annotations, _texts, st.booleans(), st.integers(0, 16)), max_size=6),
    st.text(alphabet="0123456789abcdef", max_size=64),
)
def test_wire_batch_reader_reads_what_the_reference_reads(
    items: list[tuple[Annotation, str, bool, int]], index_hash: str
) -> None:
    """The compiled reader of batch replies gives the JSON form outputs.annotation_to_json
    gives of the parsed message — answers and failed items alike, ids, hashes, cached flags."""
    from conceptsvc._wire import BatchReader
    from conceptsvc.client.outputs import SCORE_DECIMALS, annotation_to_json, dumps

    fast = wire.batch_reader(annotation_to_json, dumps, SCORE_DECIMALS)
    ref = wire.batch_reader(annotation_to_json, dumps, SCORE_DECIMALS, compiled=False)
    assert isinstance(fast, BatchReader) and isinstance(ref, wire.BatchReaderPy)
    writer = wire.annotation_writer()
    blobs = []
    for a, _, _, code in items:
        if code:  # a failed item: its status instead of an answer
            status = pb.ItemStatus(code=code, message="why", error_code="E501")
            blobs.append(pb.AnnotateResponse(status=status).SerializeToString())
        else:
            blobs.append(writer.encode(a))
    tail = pb.AnnotateResponse(index_hash=index_hash).SerializeToString()
    data = wire.item_joiner().join(
        blobs, [rid for _, rid, _, _ in items], bytearray(hit for _, _, hit, _ in items), tail
    )
    got, want = fast.read(data), ref.read(data)
    assert [g[:4] for g in got] == [w[:4] for w in want]
    for g, w in zip(got, want, strict=True):
        if g[2]:  # the failed item's bytes read as the same message
            assert pb.AnnotateResponse.FromString(g[4]) == pb.AnnotateResponse.FromString(w[4])
        else:
            assert g[4] == w[4]
            assert list(g[4]) == list(w[4])  # the keys in the same order, too
            assert [list(m) for m in g[4]["mentions"]] == [list(m) for m in w[4]["mentions"]]
    # and as JSON text, byte for byte what json.dumps writes (escapes, floats, key order)
    for g, w in zip(fast.read_json(data), ref.read_json(data), strict=True):
        assert g[:4] == w[:4]
        if g[2]:
            assert pb.AnnotateResponse.FromString(g[4]) == pb.AnnotateResponse.FromString(w[4])
        else:
            assert g[4] == w[4]


# What protobuf raises for a reply cut short, and so the compiled readers too.
_CORRUPT_BATCH = (
    r"^Error parsing message with type 'conceptsvc\.v1\.AnnotateBatchResponse': "
    r"Wire format was corrupt$"
)


def test_wire_batch_reader_refuses_truncated_replies() -> None:
    """A cut reply raises protobuf's DecodeError, the same from both readers."""
    from conceptsvc.client.outputs import SCORE_DECIMALS, annotation_to_json, dumps

    a = Annotation("x", (Mention("C1", "n", "t", 0, 1, 1.0, ("T1",), "S"),), ("C1",))
    data = wire.item_joiner().join([wire.annotation_writer().encode(a)], ["x"], bytearray(1), b"")
    reader = wire.batch_reader(annotation_to_json, dumps, SCORE_DECIMALS)
    ref = wire.batch_reader(annotation_to_json, dumps, SCORE_DECIMALS, compiled=False)
    assert reader.read(data)[0][4]["mentions"][0]["cui"] == "C1"
    for cut in (1, len(data) // 2, len(data) - 1):
        for read in (reader.read, reader.read_json, ref.read, ref.read_json):
            with pytest.raises(DecodeError, match=_CORRUPT_BATCH):
                read(data[:cut])


def test_wire_batch_readers_read_absent_fields_as_annotation_from_pb_does() -> None:
    """A mention without the ConText fields (as a server older than them writes it) reads as
    the dataclass's defaults — experiencer "patient" — in both readers, as on the stream."""
    from conceptsvc.client.outputs import SCORE_DECIMALS, annotation_to_json, dumps

    old = pb.AnnotateResponse(mentions=[pb.Mention(cui="C1", text="a", start=0, end=1)],
                              concepts=["C1"]).SerializeToString()
    data = wire.item_joiner().join([old], ["x"], bytearray([1]), b"")
    want = annotation_to_json(wire.annotation_from_pb(pb.AnnotateResponse.FromString(old)))
    want["id"] = "x"
    for compiled in (True, False):
        reader = wire.batch_reader(annotation_to_json, dumps, SCORE_DECIMALS, compiled=compiled)
        ((rid, _, code, cached, got),) = reader.read(data)
        assert (rid, code, cached, got) == ("x", 0, True, want)
        assert got["mentions"][0]["experiencer"] == "patient"
        assert reader.read_json(data)[0][4] == dumps(want).encode("utf-8")


# -- replies into domain objects (ConceptClient) ------------------------------------------------
def _batch_reply(items: list[tuple[Annotation, str, bool, int]], index_hash: str) -> bytes:
    """An AnnotateBatchResponse as the server writes it; an item with a code is a failure."""
    writer = wire.annotation_writer()
    blobs = []
    for a, _, _, code in items:
        if code:
            status = pb.ItemStatus(code=code, message="why", error_code="E501")
            blobs.append(pb.AnnotateResponse(status=status).SerializeToString())
        else:
            blobs.append(writer.encode(a))
    tail = pb.AnnotateResponse(index_hash=index_hash).SerializeToString()
    return wire.item_joiner().join(
        blobs, [rid for _, rid, _, _ in items], bytearray(hit for _, _, hit, _ in items), tail
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(_annotations, _texts, st.booleans(), st.integers(0, 16)), max_size=6),
    st.text(alphabet="0123456789abcdef", max_size=64),
)
def test_wire_result_reader_reads_what_the_reference_reads(
    items: list[tuple[Annotation, str, bool, int]], index_hash: str
) -> None:
    """The compiled reader of the client gives the StreamResults protobuf and
    stream_result_from_pb give — answers (all their fields and types) and failed items, ids,
    cached flags, index hashes — of a whole batch reply and of one item alone."""
    from conceptsvc._wire import ResultReader

    fast, ref = wire.result_reader(), wire.result_reader(compiled=False)
    assert isinstance(fast, ResultReader) and isinstance(ref, wire.ResultReaderPy)
    data = _batch_reply(items, index_hash)
    got, want = fast.read(data), ref.read(data)
    assert got == want
    for g, w, (a, rid, hit, code) in zip(got, want, items, strict=True):
        assert (g.id, g.cached, g.index_hash, g.ok) == (rid, hit, index_hash, not code)
        if g.annotation is not None and w.annotation is not None:
            assert g.annotation == replace(a, id=rid)
            for gm, wm in zip(g.annotation.mentions, w.annotation.mentions, strict=True):
                assert [type(getattr(gm, f.name)) for f in fields(Mention)] == [
                    type(getattr(wm, f.name)) for f in fields(Mention)
                ]
    for item in pb.AnnotateBatchResponse.FromString(data).items:
        one = item.SerializeToString()
        assert fast.read_one(one) == ref.read_one(one) == wire.stream_result_from_pb(item)


def test_wire_result_readers_read_absent_fields_as_stream_result_from_pb_does() -> None:
    """A mention without the ConText fields and a reply without index hash (servers older
    than them) read as the dataclass's defaults — experiencer "patient" — in both readers."""
    old = pb.AnnotateResponse(mentions=[pb.Mention(cui="C1", text="a", start=0, end=1)],
                              concepts=["C1"]).SerializeToString()
    data = wire.item_joiner().join([old], ["x"], bytearray([1]), b"")
    want = wire.stream_result_from_pb(pb.AnnotateBatchResponse.FromString(data).items[0])
    for compiled in (True, False):
        reader = wire.result_reader(compiled=compiled)
        (got,) = reader.read(data)
        assert got == want and got.cached and got.index_hash == ""
        assert got.annotation is not None
        assert got.annotation.mentions[0].experiencer == "patient"
        assert got.annotation.mentions[0].semantic_types == ()


def test_wire_result_reader_refuses_truncated_replies() -> None:
    a = Annotation("x", (Mention("C1", "n", "t", 0, 1, 1.0, ("T1",), "S"),), ("C1",))
    data = wire.item_joiner().join([wire.annotation_writer().encode(a)], ["x"], bytearray(1), b"")
    reader, ref = wire.result_reader(), wire.result_reader(compiled=False)
    assert reader.read(data)[0].annotation == a
    for cut in (1, len(data) // 2, len(data) - 1):
        for read in (reader.read, ref.read):
            with pytest.raises(DecodeError, match=_CORRUPT_BATCH):
                read(data[:cut])


def test_wire_result_reader_shares_strings_only_when_equal() -> None:
    """The compiled reader shares short strings between answers through a table of 4,096
    slots: with more distinct strings than slots, every one must still read as itself."""
    writer = wire.annotation_writer()
    n = 3 * 4096
    answers = [
        Annotation("", (Mention(f"C{i:07d}", f"name {i}", "t", 0, 1, 1.0, (f"T{i % 997:03d}",),
                                "MSH"),), (f"C{i:07d}",))
        for i in range(n)
    ]
    data = wire.item_joiner().join(
        [writer.encode(a) for a in answers], [str(i) for i in range(n)], bytearray(n), b""
    )
    got = wire.result_reader().read(data)
    assert got == wire.result_reader(compiled=False).read(data)
    assert [r.annotation.concepts for r in got if r.annotation] == [a.concepts for a in answers]
    first, second = got[1].annotation, got[2].annotation
    assert first is not None and second is not None
    # the same source in two neighbouring answers is one object
    assert first.mentions[0].source is second.mentions[0].source


# -- replies that are not what our servers write --------------------------------------------------
def _readers_in_a_child(*args: str) -> Any:
    """``tests/malformed_replies.py ARGS`` in a process of its own (a reader that reads outside
    its bytes may kill it), on the conceptsvc this process imported: its JSON."""
    import conceptsvc

    path = os.pathsep.join(
        p for p in (str(Path(conceptsvc.__file__).parents[1]), os.environ.get("PYTHONPATH")) if p
    )
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("malformed_replies.py")), *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": path},
    )
    assert done.returncode == 0, (
        f"the readers' process ended with {done.returncode} (a negative number: killed by that "
        f"signal, -11 SIGSEGV):\n{done.stderr[-3000:]}"
    )
    return json.loads(done.stdout)


def test_wire_readers_refuse_crafted_replies_with_protobufs_error() -> None:
    """Lengths of 2**63 and more (the review's: an id, then an unknown field, each with a
    length that was negative once cast, which crashed the compiled reader), and every other
    length, key, fixed-width field, group and string a reply can get wrong: each reader of
    the client does what protobuf does — refuses with its DecodeError, word for word, or
    reads what protobuf reads — alone and as the one item of a batch."""
    outcomes = _readers_in_a_child("crafted")
    wrong = {
        f"{case} / {reader}": pair
        for case, by_reader in outcomes.items()
        for reader, pair in by_reader.items()
        if pair[0] != pair[1]
    }
    assert not wrong
    corrupt = "Error parsing message with type 'conceptsvc.v1.{}': Wire format was corrupt"
    for case in ("id length 2**64-64", "unknown field length 2**64-2**40"):
        assert outcomes[case]["ResultReader.read_one"][0] == [
            "DecodeError", corrupt.format("AnnotateResponse"),
        ]
        for reader in ("ResultReader.read", "BatchReader.read", "BatchReader.read_json"):
            assert outcomes[f"item: {case}"][reader][0] == [
                "DecodeError", corrupt.format("AnnotateBatchResponse"),
            ]
    # a length of 2**63 or more is refused wherever it stands
    assert all(
        pair[0][0] == "DecodeError"
        for case, by_reader in outcomes.items() if "length 2**6" in case
        for pair in by_reader.values()
    )
    # and what protobuf reads is read, not refused
    assert outcomes["start of 2**40+7 (uint32)"]["ResultReader.read_one"][0][0] == "ok"
    assert "start=7," in outcomes["start of 2**40+7 (uint32)"]["ResultReader.read_one"][0][1]


def test_wire_readers_agree_with_protobuf_on_mutated_replies() -> None:
    """3,000 valid batch replies and 3,000 single answers, each mutated once (bits flipped,
    cut, a length prefix set to 2**63 and past or just past the end, group keys and
    continuation bytes put in), through the four ways a client reads a reply: the compiled
    reader and protobuf give the same result or both raise DecodeError (see
    malformed_replies.agree for the one difference of wording allowed)."""
    result = _readers_in_a_child("fuzz", "20240607", "3000")
    assert result["disagreements"] == []
    # the mutations reach every outcome, reads as well as refusals of both kinds
    assert all(result["tally"].get(k, 0) > 500 for k in (
        "read", "Wire format was corrupt", "String field had bad UTF-8",
    )), result["tally"]


@pytest.mark.parametrize(
    "kwargs", [{"include_negated": "no"}, {"threshold": "0.7"}, {"include_hypothetical": 1}]
)
def test_wire_options_of_the_wrong_type_are_refused_as_in_process(
    kwargs: dict[str, object],
) -> None:
    """options_to_pb raises what ExtractOptions.validate raises (E502), not protobuf's
    TypeError, and does not read a string as true."""
    options = ExtractOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ExtractArgumentError) as in_process:
        options.validate()
    with pytest.raises(ExtractArgumentError) as on_the_wire:
        wire.options_to_pb(options)
    assert str(on_the_wire.value) == str(in_process.value)
