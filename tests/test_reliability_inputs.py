"""Bad input, tried on purpose: captions, requests and files that users will really send.

Every case must end in a clear error (a conceptsvc error code or a gRPC status with a message
that says what is wrong) or a documented, correct result — never a crash, a hang or a mention
whose offsets are not whole tokens spelling its concept (``tests/offsets.py``). RELIABILITY.md
lists each case with its outcome.

Three groups:

- **captions** through the engine (and the service where the wire changes things);
- **requests** to a real in-process server: options the server cannot honour, oversize,
  too many concurrent streams, missing ids, bytes that are not UTF-8;
- **files**: malformed RRF rows, truncated gzip, truncated or tampered index directories,
  broken caption corpora.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from offsets import check_annotation
from service_helpers import build_index_a, running_server, settings_for

from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2_grpc as pb_grpc
from conceptsvc.client import ConceptClient
from conceptsvc.client.corpus import Corpus
from conceptsvc.errors import (
    ClientError,
    ConceptIndexError,
    ConceptsvcError,
    MalformedRowError,
    ServiceCallError,
)
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.model import Annotation, ExtractOptions
from conceptsvc.sources import ReadStats
from conceptsvc.sources.rrf import MetaDir, iter_mrconso

FIXTURES = Path(__file__).parent / "fixtures"

CHEST, CT, LUNG = "C0817096", "C0040405", "C0024109"
EFFUSION = "C0032227"


@pytest.fixture(scope="module")
def ex(engine_index_path: Path) -> Extractor:
    return Extractor(ConceptIndex.load(engine_index_path))


def found(a: Annotation) -> list[tuple[str, str]]:
    return [(m.text, m.cui) for m in a.mentions]


# -- captions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", " ", "\t\n\r\x0b\x0c  ", "\u00a0\u2003\u3000\u200b"])
def test_reliability_inputs_empty_and_whitespace_captions_have_no_concepts(
    ex: Extractor, text: str
) -> None:
    for mode in ("exact", "approximate"):
        a = ex.extract(text, ExtractOptions(mode=mode), id="e")
        assert a == Annotation(id="e", mentions=(), concepts=())


@pytest.mark.parametrize("text", ["!!!", ".,;:?!-()[]{}/\\|'\"`~@#$%^&*_+=<>", "—–…‹›«»¿¡§¶†‡•"])
def test_reliability_inputs_punctuation_only_captions_have_no_concepts(
    ex: Extractor, text: str
) -> None:
    assert ex.extract(text * 50, ExtractOptions(mode="approximate")).mentions == ()


def test_reliability_inputs_nul_and_control_characters_separate_words(ex: Extractor) -> None:
    text = "\x00Chest\x00CT\x01\x02 lung\x1b[31m pleural\x7feffusion\x85\x9f"
    a = ex.extract(text)
    check_annotation(ex.index, text, a)
    # A control character separates words like punctuation does: "pleural<DEL>effusion" is
    # two adjacent tokens, so the two-word term matches across it (as across a hyphen).
    assert found(a) == [
        ("Chest", CHEST), ("CT", CT), ("lung", LUNG), ("pleural\x7feffusion", EFFUSION),
    ]
    text2 = "pleural\x00effusion"
    a2 = ex.extract(text2)
    check_annotation(ex.index, text2, a2)
    assert found(a2) == [("pleural\x00effusion", EFFUSION)]


def test_reliability_inputs_lone_surrogates_in_the_engine_are_separators(ex: Extractor) -> None:
    """Python strings can hold lone surrogates (e.g. from ``surrogateescape``); the engine
    treats them as non-word characters and still slices exactly."""
    text = "\ud800Chest \udfff CT\ud83d lung\udc00"
    approximate = ExtractOptions(mode="approximate")
    a = ex.extract(text, approximate)
    check_annotation(ex.index, text, a, approximate)
    assert found(a) == [("Chest", CHEST), ("CT", CT), ("lung", LUNG)]


def test_reliability_inputs_combining_characters_stay_inside_the_mention(ex: Extractor) -> None:
    text = "Che\u0301st CT of the lu\u0308\u0323ng; \u0301\u0301 orphan marks; e" + "\u0301" * 5000
    a = ex.extract(text)
    check_annotation(ex.index, text, a)
    assert found(a)[:3] == [("Che\u0301st", CHEST), ("CT", CT), ("lu\u0308\u0323ng", LUNG)]


def test_reliability_inputs_right_to_left_text_keeps_offsets(ex: Extractor) -> None:
    text = (
        "\u202eChest\u202c CT \u05e6\u05d9\u05dc\u05d5\u05dd \u05d7\u05d6\u05d4 lung "
        "\u0627\u0644\u0631\u0626\u0629 \u200fpleural effusion\u200e \u0661\u0662"
    )
    a = ex.extract(text)
    check_annotation(ex.index, text, a)
    assert found(a) == [
        ("Chest", CHEST), ("CT", CT), ("lung", LUNG), ("pleural effusion", EFFUSION),
    ]


def test_reliability_inputs_emoji_count_as_one_code_point_each(ex: Extractor) -> None:
    # Astral-plane characters are one code point in Python but two UTF-16 units; a ZWJ sequence
    # and a skin-tone modifier are several code points. Offsets are code points.
    text = "🫁 Chest 👍🏽 CT 🧑‍⚕️ lung 🇬🇧"
    a = ex.extract(text)
    check_annotation(ex.index, text, a)
    assert [(m.text, m.start) for m in a.mentions] == [("Chest", 2), ("CT", 11), ("lung", 19)]


def test_reliability_inputs_ligatures_and_full_width_letters_slice_the_original(
    ex: Extractor,
) -> None:
    text = "Ｃｈｅｓｔ: ｌｕｎｇ and ＰＬＥＵＲＡＬ ＥＦＦＵＳＩＯＮ; ﬁnal haematoma"
    a = ex.extract(text)
    check_annotation(ex.index, text, a)
    assert ("Ｃｈｅｓｔ", CHEST) in found(a)
    assert ("ｌｕｎｇ", LUNG) in found(a)
    assert ("ＰＬＥＵＲＡＬ ＥＦＦＵＳＩＯＮ", EFFUSION) in found(a)
    assert ("haematoma", "C0018944") in found(a)


def test_reliability_inputs_full_width_abbreviation_matches(ex: Extractor) -> None:
    text = "Axial ＣＴ of the chest"
    a = ex.extract(text)
    check_annotation(ex.index, text, a)
    assert ("ＣＴ", CT) in found(a)


def test_reliability_inputs_very_long_tokens_do_not_hang(ex: Extractor) -> None:
    cases = [
        "a" * 200_000,
        "Chest " + "x" * 200_000 + " CT",
        "a'" * 50_000,  # the apostrophe rule of the token pattern, at its worst
        "-".join(["lung"] * 20_000),  # 20k one-word matches separated by hyphens
        "https://example.org/" + "a/" * 50_000,
    ]
    approximate = ExtractOptions(mode="approximate")
    for text in cases:
        t0 = time.perf_counter()
        a = ex.extract(text, approximate)
        assert time.perf_counter() - t0 < 30, text[:40]
        check_annotation(ex.index, text, a, approximate)
    a = ex.extract(cases[1])
    assert found(a) == [("Chest", CHEST), ("CT", CT)]
    assert ex.extract(cases[3]).concepts == (LUNG,)


def _long_token_captions(n: int, chars: int, seed: int) -> list[str]:
    """Captions of two distinct random ``chars``-letter tokens each (a base64 blob, a sequence),
    between words the dictionary knows."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for _ in range(n):
        a = "".join(rng.choices(letters, k=chars))
        b = "".join(rng.choices(letters, k=chars))
        out.append(f"Chest CT {a} {b} lung")
    return out


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_reliability_inputs_distinct_long_tokens_do_not_grow_the_memos(
    engine_index_path: Path, engine: str
) -> None:
    """The token memos (the compiled token table, ``normalize_token``'s) are bounded by
    characters, not only by entries: 1,500 captions of two distinct 4,000-letter tokens grew a
    process by 23.4 MB before (16 KB a caption, on up to 2^17–2^18 entries); now by ≈ 3 MB
    (compiled) or nothing (reference)."""
    import tracemalloc

    from conceptsvc.normalize import clear_token_memo

    ex = Extractor(ConceptIndex.load(engine_index_path), engine=engine)
    captions = _long_token_captions(1_500, 4_000, seed=3)
    ex.extract(captions[0])
    clear_token_memo()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for text in captions:
            a = ex.extract(text)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert found(a) == [("Chest", CHEST), ("CT", CT), ("lung", LUNG)]
    assert grown < 12 * 1024 * 1024, f"{grown / 2**20:.1f} MB held after the captions"


def test_reliability_inputs_approximate_memo_is_bounded_by_characters(
    engine_index_path: Path,
) -> None:
    """Approximate mode memoises each window's best keys; windows of long tokens fill the memo
    by characters (``approximate.MEMO_CHARS``), long before its window count."""
    from conceptsvc.approximate import MEMO_CHARS

    ex = Extractor(ConceptIndex.load(engine_index_path))
    approximate = ExtractOptions(mode="approximate")
    captions = _long_token_captions(800, 4_000, seed=5)
    for text in captions:
        ex.extract(text, approximate)
    fast = ex._approximate()._fast
    assert fast is not None
    # the windows memoised were well over MEMO_CHARS in all (three or more of 4,000+ a caption)
    assert fast.searches * 4_000 > 2 * MEMO_CHARS
    assert 0 < fast.memo_key_chars <= MEMO_CHARS
    assert fast.memo_entries < len(captions)
    fresh = Extractor(ex.index)
    assert ex.extract(captions[-1], approximate) == fresh.extract(captions[-1], approximate)


_PROSE = (
    "the patient was seen in clinic and underwent imaging of the region with contrast agent "
    "demonstrating findings without change. "
)


def _big_caption(n_bytes: int, every: int) -> tuple[str, str]:
    """ASCII prose of exactly ``n_bytes`` with a known sentence every ``every`` bytes."""
    marker = " Chest CT shows a pleural effusion. "
    unit = (_PROSE * (every // len(_PROSE) + 1))[: every - len(marker)] + marker
    return (unit * (n_bytes // len(unit) + 1))[:n_bytes], unit


@pytest.mark.timeout(120)
@pytest.mark.parametrize("megabytes,every", [(1, 2_000), (10, 20_000)])
def test_reliability_inputs_megabyte_captions_are_annotated_exactly(
    ex: Extractor, megabytes: int, every: int
) -> None:
    """The engine has no size limit of its own (the service has: see below); a 1 MB or 10 MB
    caption is annotated in linear time with every offset exact."""
    text, unit = _big_caption(megabytes * 1024 * 1024, every)
    a = ex.extract(text)
    check_annotation(ex.index, text, a)
    per_unit = found(ex.extract(unit))
    assert per_unit == [("Chest", CHEST), ("CT", CT), ("pleural effusion", EFFUSION)]
    whole_units = len(text) // len(unit)
    tail = text[whole_units * len(unit) :]
    assert len(a.mentions) == whole_units * 3 + len(ex.extract(tail).mentions)
    assert a.mentions[-1].end <= len(text)
    assert set(a.concepts) == {CHEST, CT, EFFUSION}


def test_reliability_inputs_ten_megabytes_without_words_are_fast(ex: Extractor) -> None:
    for text in ("." * 10_485_760, "x" * 10_485_760, "🫁" * 2_621_440):
        t0 = time.perf_counter()
        assert ex.extract(text).mentions == ()
        assert time.perf_counter() - t0 < 30


# -- requests to the service -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def index_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index_a(tmp_path_factory.mktemp("rel-inputs") / "a")


@pytest.fixture(scope="module")
def server(index_a: Path) -> Iterator[int]:
    with running_server(settings_for(index_a, max_text_chars=100_000)) as (_srv, port):
        yield port


@pytest.fixture
def client(server: int) -> Iterator[ConceptClient]:
    with ConceptClient(f"127.0.0.1:{server}", retries=0, timeout=30) as c:
        yield c


def _status(fn: object, *args: object, **kwargs: object) -> tuple[str, str]:
    with pytest.raises(ServiceCallError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value.status, info.value.message


@pytest.mark.parametrize(
    "options,needle",
    [
        (ExtractOptions(semantic_types=("T999",)), "T999"),
        (ExtractOptions(semantic_types=("not a type",)), "not a type"),
        (ExtractOptions(semantic_groups=("NOPE",)), "NOPE"),
        (ExtractOptions(sources=("NOT_A_SAB",)), "NOT_A_SAB"),
        (ExtractOptions(mode="approximate", threshold=0.0), "threshold"),
        (ExtractOptions(mode="approximate", threshold=-0.5), "threshold"),
        (ExtractOptions(mode="approximate", threshold=1.5), "threshold"),
        (ExtractOptions(mode="approximate", threshold=float("nan")), "threshold"),
        (ExtractOptions(mode="approximate", threshold=float("inf")), "threshold"),
        (ExtractOptions(profile="no-such-profile"), "no-such-profile"),
        (ExtractOptions(profile="../../../etc/passwd"), "passwd"),
        (ExtractOptions(exclude_cuis=("",)), "exclude_cuis"),
    ],
)
def test_reliability_inputs_bad_options_are_invalid_argument(
    client: ConceptClient, options: ExtractOptions, needle: str
) -> None:
    code, message = _status(client.annotate, "Chest CT", id="x", options=options)
    assert code == "INVALID_ARGUMENT"
    assert needle in message
    # the same options inside a stream: a per-item error, the stream goes on
    results = list(client.annotate_stream([("a", "Chest CT")], options=options))
    assert [r.error.status if r.error else None for r in results] == ["INVALID_ARGUMENT"]
    # and the server is fine afterwards
    assert client.annotate("Chest CT", id="ok").concepts == (CHEST, CT)


def test_reliability_inputs_unknown_enum_values_are_invalid_argument(server: int) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server}")
    try:
        method = channel.unary_unary(
            "/conceptsvc.v1.ConceptService/Annotate",
            request_serializer=pb.AnnotateRequest.SerializeToString,
            response_deserializer=pb.AnnotateResponse.FromString,
        )
        for field in ("mode", "similarity", "overlap"):
            req = pb.AnnotateRequest(id="x", text="Chest CT")
            setattr(req.options, field, 97)  # open enums accept unknown numbers on the wire
            with pytest.raises(grpc.RpcError) as info:
                method(req, timeout=10)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert field in (info.value.details() or "")
    finally:
        channel.close()


def test_reliability_inputs_search_and_concept_bad_requests(client: ConceptClient) -> None:
    assert _status(client.search, "")[0] == "INVALID_ARGUMENT"
    assert _status(client.search, "   \t")[0] == "INVALID_ARGUMENT"
    assert _status(client.search, "lung", limit=10_000)[0] == "INVALID_ARGUMENT"
    # limit is unsigned on the wire: the client cannot even build a negative one
    with pytest.raises((ValueError, ClientError)):
        client.search("lung", limit=-3)
    assert len(client.search("lung", limit=0)) >= 1  # 0 = the server's default limit
    assert _status(client.search, "x" * 200_000)[0] == "RESOURCE_EXHAUSTED"
    assert _status(client.get_concept, "")[0] == "INVALID_ARGUMENT"
    assert _status(client.get_concept, "C9999999")[0] == "NOT_FOUND"
    assert _status(client.get_concept, "../../etc/passwd")[0] == "NOT_FOUND"
    assert client.get_concept(" C0024109 ").cui == LUNG


def test_reliability_inputs_text_over_the_limit_is_resource_exhausted(
    client: ConceptClient,
) -> None:
    one_mb = "Chest CT. " * 104_858
    code, message = _status(client.annotate, one_mb, id="big")
    assert code == "RESOURCE_EXHAUSTED"
    assert "max_text_chars" in message
    results = list(client.annotate_stream([("a", "lung"), ("big", one_mb), ("c", "CT")]))
    assert [r.id for r in results] == ["a", "big", "c"]
    assert results[1].error is not None and results[1].error.status == "RESOURCE_EXHAUSTED"
    assert results[0].annotation is not None and results[0].annotation.concepts == (LUNG,)
    assert results[2].annotation is not None and results[2].annotation.concepts == (CT,)


def test_reliability_inputs_ten_megabyte_message_is_refused_by_the_server(server: int) -> None:
    """10 MB is over the 4 MB message limit; the typed client refuses it before sending (its own
    limit), and a raw client that sends anyway is refused by the server."""
    ten_mb = "Chest CT. " * 1_048_576
    with ConceptClient(f"127.0.0.1:{server}", retries=0) as c:
        code, _ = _status(c.annotate, ten_mb, id="huge")
    assert code == "RESOURCE_EXHAUSTED"
    channel = grpc.insecure_channel(
        f"127.0.0.1:{server}", options=[("grpc.max_send_message_length", 64 << 20)]
    )
    try:
        method = channel.unary_unary(
            "/conceptsvc.v1.ConceptService/Annotate",
            request_serializer=pb.AnnotateRequest.SerializeToString,
            response_deserializer=pb.AnnotateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            method(pb.AnnotateRequest(id="huge", text=ten_mb), timeout=30)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = method(pb.AnnotateRequest(id="after", text="Chest CT"), timeout=10)
        assert list(ok.concepts) == [CHEST, CT]
    finally:
        channel.close()


def test_reliability_inputs_response_over_the_message_limit_fails_cleanly(index_a: Path) -> None:
    """A caption under max_text_chars can still produce a response over max_message_bytes
    (thousands of mentions). The call must fail with a status — not hang or kill the server."""
    settings = settings_for(index_a, max_text_chars=100_000, max_message_bytes=64 * 1024)
    text = "Chest CT lung. " * 4_000  # 60k chars (a 60 KB request), 12k mentions: ~1 MB back
    with running_server(settings) as (_srv, port):
        with ConceptClient(f"127.0.0.1:{port}", retries=0, max_message_bytes=64 << 20) as c:
            code, _ = _status(c.annotate, text, id="many", timeout=120)
            assert code == "RESOURCE_EXHAUSTED"
            only_concepts = ExtractOptions(include_mentions=False)
            assert c.annotate(text, id="set", options=only_concepts).concepts == (CHEST, CT, LUNG)


def test_reliability_inputs_missing_ids(client: ConceptClient) -> None:
    # Unary: the id is the caller's business and may be empty (it is only echoed back).
    assert client.annotate("Chest CT", id="").concepts == (CHEST, CT)
    # Stream: responses are matched by id, so an empty id is a per-item INVALID_ARGUMENT.
    results = list(client.annotate_stream([("a", "lung"), ("", "Chest"), ("c", "CT")]))
    assert [(r.id, r.error.status if r.error else "OK") for r in results] == [
        ("a", "OK"), ("", "INVALID_ARGUMENT"), ("c", "OK"),
    ]
    assert results[1].error is not None and "id" in results[1].error.message


def test_reliability_inputs_too_many_concurrent_streams(index_a: Path) -> None:
    """With max_concurrent_rpcs=2, a third concurrent stream is refused with RESOURCE_EXHAUSTED
    at once (not queued forever); when the first two end, new streams are accepted again."""
    settings = settings_for(index_a, max_concurrent_rpcs=2, threads=8)
    with running_server(settings) as (_srv, port):
        release = threading.Event()
        first_answered = [threading.Event(), threading.Event()]
        outcomes: list[object] = [None, None]

        def held(n: int) -> None:
            def items() -> Iterator[tuple[str, str]]:
                yield (f"h{n}-1", "Chest CT")
                release.wait(30)
                yield (f"h{n}-2", "lung")

            with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
                got = []
                for r in c.annotate_stream(items(), window=1):
                    got.append(r.id)
                    first_answered[n].set()
                outcomes[n] = got

        threads = [threading.Thread(target=held, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        try:
            for e in first_answered:
                assert e.wait(20)
            with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
                with pytest.raises(ServiceCallError) as info:
                    list(c.annotate_stream([("x", "Chest")]))
                assert info.value.status == "RESOURCE_EXHAUSTED"
        finally:
            release.set()
            for t in threads:
                t.join(30)
        assert outcomes == [["h0-1", "h0-2"], ["h1-1", "h1-2"]]
        with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
            assert [r.id for r in c.annotate_stream([("y", "Chest")])] == ["y"]



def _cuis(n: int, tag: int = 0) -> list[str]:
    """``n`` distinct CUI-shaped names (none in the index), distinct for each ``tag``."""
    return [f"C{tag:03d}{i:06d}" for i in range(n)]


def test_issue_18_option_lists_over_max_option_items_are_refused(
    index_a: Path, client: ConceptClient
) -> None:
    """Issue 18, item 5: a request's option lists are capped (``max_option_items``, default
    10,000 names). Over the cap: RESOURCE_EXHAUSTED (E501) naming the field and the limit,
    unary, per stream item and in SearchConcepts; at the cap: served; next request: served."""
    # The default server: the issue's 300,000-CUI list (3.6 MB, under the 4 MiB message
    # limit) and one name over the default cap are refused; 10,000 names are served.
    for n in (300_000, 10_001):
        code, message = _status(
            client.annotate, "Chest CT", options=ExtractOptions(exclude_cuis=tuple(_cuis(n)))
        )
        assert code == "RESOURCE_EXHAUSTED", n
        assert f"options.exclude_cuis has {n} names" in message
        assert "limit of 10000 (max_option_items)" in message
    at_cap = ExtractOptions(exclude_cuis=(CHEST, *_cuis(9_999)))
    assert client.annotate("Chest CT", options=at_cap).concepts == (CT,)
    assert client.annotate("Chest CT").concepts == (CHEST, CT)

    with running_server(settings_for(index_a, max_option_items=3)) as (_srv, port):
        stub = pb_grpc.ConceptServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        # the cap a client can read before it sends anything
        assert stub.GetInfo(pb.GetInfoRequest()).limits.max_option_items == 3
        too_many = {
            "semantic_types": ["T023", "T029", "T060", "T047"],
            "semantic_groups": ["ANAT", "PROC", "DISO", "ANAT"],
            "sources": ["MSH", "MSH", "MSH", "MSH"],
            "exclude_cuis": ["C0000001", CHEST, CT, LUNG],
        }
        for name, values in too_many.items():
            over = pb.AnnotateOptions(**{name: pb.NameList(values=values)})
            with pytest.raises(grpc.RpcError) as info:
                stub.Annotate(pb.AnnotateRequest(id="u", text="Chest CT", options=over))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, name
            assert f"options.{name} has 4 names" in info.value.details(), name
            reqs = [
                pb.AnnotateRequest(id="a", text="Chest CT"),
                pb.AnnotateRequest(id="b", text="Chest CT", options=over),
                pb.AnnotateRequest(id="c", text="lung"),
            ]
            out = list(stub.AnnotateStream(iter(reqs), timeout=30))
            assert [(r.id, r.status.code) for r in out] == [
                ("a", 0), ("b", grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), ("c", 0)
            ], name
            assert "max_option_items" in out[1].status.message
            assert out[1].status.error_code == "E501"
            assert list(out[0].concepts) == [CHEST, CT] and list(out[2].concepts) == [LUNG]
            with pytest.raises(grpc.RpcError) as info:
                stub.SearchConcepts(pb.SearchConceptsRequest(query="lung", options=over))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, name
            # at the cap: served, and the filter applies
            at = pb.AnnotateOptions(**{name: pb.NameList(values=values[:3])})
            got = stub.Annotate(pb.AnnotateRequest(id="ok", text="Chest CT lung", options=at))
            expected = [LUNG] if name == "exclude_cuis" else [CHEST, CT, LUNG]
            assert list(got.concepts) == expected, name


def test_issue_18_option_memos_stay_under_their_byte_bounds(index_a: Path) -> None:
    """Issue 18, item 5: a client cycling through large distinct option sets (10,000 CUIs,
    at the cap) does not grow the worker's option memos past their byte bounds, and every
    answer still applies its own exclusions. Since the thirteenth session the 9,999 CUIs this
    index does not have are dropped from the options the memo keeps (they exclude nothing):
    an entry weighs its wire bytes (0.1 MB), not a 10,000-CUI option set's Python size
    (1.1 MB), and the 70 sets share two plans (CHEST or CT excluded) instead of evicting each
    other's (tests/test_extractor.py holds plans to their bound with known CUIs)."""
    from conceptsvc.extractor import PLAN_CACHE_BYTES
    from conceptsvc.server.servicer import OPTIONS_MEMO_BYTES

    sets = 70  # 83 MB of memo entries and 80 MB of plans, before the unknown CUIs were dropped
    settings = settings_for(index_a, cache_size=0)
    with running_server(settings) as (srv, port):
        stub = pb_grpc.ConceptServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def options(k: int) -> pb.AnnotateOptions:
            names = [*_cuis(9_999, k), CHEST if k % 2 else CT]
            return pb.AnnotateOptions(exclude_cuis=pb.NameList(values=names))

        for k in [*range(sets), 0]:
            got = stub.Annotate(pb.AnnotateRequest(text="Chest CT", options=options(k)))
            assert list(got.concepts) == ([CT] if k % 2 else [CHEST]), k
        loaded = srv.state.current
        assert loaded is not None
        memo, plans = loaded.options_memo, loaded.extractor.plan_cache
        assert 0 < memo.size_bytes <= OPTIONS_MEMO_BYTES
        assert 0 < plans.size_bytes <= PLAN_CACHE_BYTES
        assert len(plans) <= 3  # the defaults' plan, and CHEST or CT excluded
        # an entry weighs its wire bytes and the options it keeps, without the unknown CUIs
        assert 100_000 < memo.size_bytes / len(memo) < 200_000


# -- text that protobuf cannot carry ---------------------------------------------------------------
def test_reliability_inputs_invalid_utf8_on_the_wire_is_refused_and_the_server_goes_on(
    server: int,
) -> None:
    """proto3 strings must be UTF-8. A raw client that sends other bytes (here a CESU-8 encoded
    surrogate and a stray 0xFF) is refused by grpcio's request deserialiser, before conceptsvc
    code runs, with INTERNAL "Exception deserializing request!" — grpcio picks that code, the
    servicer never sees the request. The server keeps serving; a stream fails as a whole at the
    bad item, after answering the items before it."""
    good = pb.AnnotateRequest(id="g", text="Chest CT").SerializeToString()
    bad = [good.replace(b"Chest", b"Ch\xed\xa0\x80t"), good.replace(b"Chest", b"Ch\xffst")]
    channel = grpc.insecure_channel(f"127.0.0.1:{server}")
    try:
        unary = channel.unary_unary("/conceptsvc.v1.ConceptService/Annotate")
        for raw in bad:
            with pytest.raises(grpc.RpcError) as info:
                unary(raw, timeout=10)
            assert info.value.code() is grpc.StatusCode.INTERNAL
            assert "deserializ" in (info.value.details() or "")
        assert pb.AnnotateResponse.FromString(unary(good, timeout=10)).concepts == [CHEST, CT]
        stream = channel.stream_stream("/conceptsvc.v1.ConceptService/AnnotateStream")
        answered = []
        with pytest.raises(grpc.RpcError) as info:
            for raw in stream(iter([good, bad[1], good]), timeout=10):
                answered.append(pb.AnnotateResponse.FromString(raw).id)
        assert info.value.code() is grpc.StatusCode.INTERNAL
        assert answered in ([], ["g"])  # the first item may or may not have been answered
    finally:
        channel.close()


def test_reliability_inputs_lone_surrogate_cannot_be_encoded_by_protobuf() -> None:
    """Documents the root cause: a str with a lone surrogate has no UTF-8 encoding."""
    with pytest.raises(UnicodeEncodeError):
        pb.AnnotateRequest(id="s", text="Chest \ud800 CT")


def test_reliability_inputs_lone_surrogate_unary_is_a_client_error(client: ConceptClient) -> None:
    with pytest.raises(ClientError, match="surrogate"):
        client.annotate("Chest \ud800 CT", id="s")


def test_reliability_inputs_lone_surrogate_in_a_stream_does_not_lose_other_items(
    client: ConceptClient,
) -> None:
    items = [("a", "Chest"), ("b", "x\udfffy"), ("c", "CT")]
    try:
        results = list(client.annotate_stream(items))
    except ClientError as exc:  # refusing up front, naming the item, is fine too
        assert "'b'" in str(exc) and "surrogate" in str(exc)
        return
    by_id = {r.id: r for r in results}
    assert set(by_id) == {"a", "b", "c"}
    assert by_id["b"].error is not None
    assert by_id["c"].annotation is not None and by_id["c"].annotation.concepts == (CT,)


# -- files: RRF ------------------------------------------------------------------------------------
def _meta(tmp_path: Path, source: str = "rrf_small") -> Path:
    meta = tmp_path / "META"
    shutil.copytree(FIXTURES / source, meta)
    return meta


@pytest.mark.parametrize(
    "bad_row,problem",
    [
        (b"C0000001|ENG|P|L0000001|PF|S0000001|Y|A0000001||||MSH|PT|D1|too few|\n", "fields"),
        (b"C0000001|ENG|P|L1|PF|S1|Y|A1||||MSH|PT|D1|x|0|N||extra|\n", "fields"),
        (b"C0000001|ENG|P|L1|PF|S1|Y|A1||||MSH|PT|D1|caf\xe9|0|N||\n", "UTF-8"),
        (b"\x00\x00\x00garbage\n", "fields"),
    ],
)
def test_reliability_inputs_malformed_rrf_rows_name_file_and_line(
    tmp_path: Path, bad_row: bytes, problem: str
) -> None:
    meta = _meta(tmp_path)
    conso = meta / "MRCONSO.RRF"
    lines = conso.read_bytes().splitlines(keepends=True)
    conso.write_bytes(b"".join([*lines[:2], bad_row, *lines[2:]]))
    with pytest.raises(MalformedRowError) as info:
        list(iter_mrconso(MetaDir(meta)))
    assert info.value.line == 3
    assert info.value.path.endswith("MRCONSO.RRF")
    assert problem in str(info.value)
    stats = ReadStats()
    rows = list(iter_mrconso(MetaDir(meta), on_error="skip", stats=stats))
    assert len(rows) == len(lines)
    assert stats.total_skipped == 1


def test_reliability_inputs_malformed_rrf_fails_the_index_build_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conceptsvc.cli import main

    meta = _meta(tmp_path)
    with (meta / "MRCONSO.RRF").open("ab") as fh:
        fh.write(b"C0000009|ENG|broken row\n")
    out = tmp_path / "index"
    assert main(["index", "build", "--umls", str(meta), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "MRCONSO.RRF:" in err and "E201" in err
    assert not out.exists()  # nothing half-written


def _truncate_gz(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_reliability_inputs_truncated_rrf_gzip_is_a_dictionary_error(
    tmp_path: Path, keep: float
) -> None:
    meta = _meta(tmp_path, "rrf_gz")
    _truncate_gz(meta / "MRCONSO.RRF.gz", keep)
    with pytest.raises(ConceptsvcError, match=r"MRCONSO\.RRF\.gz"):
        list(iter_mrconso(MetaDir(meta)))


def test_reliability_inputs_truncated_rrf_gzip_never_yields_a_silent_partial_table(
    tmp_path: Path,
) -> None:
    """Whatever the error type, a truncated .gz must not read as a shorter, valid table."""
    meta = _meta(tmp_path, "rrf_gz")
    _truncate_gz(meta / "MRCONSO.RRF.gz", 0.6)
    with pytest.raises((ConceptsvcError, EOFError, OSError)):
        list(iter_mrconso(MetaDir(meta)))


def test_reliability_inputs_rrf_that_is_not_gzip_is_refused(tmp_path: Path) -> None:
    meta = _meta(tmp_path, "rrf_gz")
    (meta / "MRCONSO.RRF.gz").write_bytes(b"C0000001|ENG|P|plain text, not gzip\n")
    with pytest.raises(ConceptsvcError, match=r"MRCONSO\.RRF\.gz"):
        list(iter_mrconso(MetaDir(meta)))


# -- files: index directory ------------------------------------------------------------------------
@pytest.fixture
def index_copy(index_a: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "index"
    shutil.copytree(index_a, dst)
    return dst


def _some_file(index: Path, name: str) -> Path:
    files = json.loads((index / "manifest.json").read_text())["files"]
    assert name in files
    return index / name


@pytest.mark.parametrize("name", ["keys.bin", "post_cui.npy", "strings.bin", "tuis.txt"])
def test_reliability_inputs_truncated_index_file_is_refused(index_copy: Path, name: str) -> None:
    path = _some_file(index_copy, name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConceptIndexError, match=r"hash mismatch|truncated"):
        ConceptIndex.load(index_copy)


def test_reliability_inputs_missing_index_file_is_refused(index_copy: Path) -> None:
    (index_copy / "post_flags.npy").unlink()
    with pytest.raises(ConceptIndexError, match="missing"):
        ConceptIndex.load(index_copy)


@pytest.mark.parametrize("name", ["keys.bin", "strings.bin", "post_flags.npy", "sabs.txt"])
def test_reliability_inputs_tampered_index_file_same_size_is_refused(
    index_copy: Path, name: str
) -> None:
    path = _some_file(index_copy, name)
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # one bit, size unchanged: only the content hash can notice
    path.write_bytes(bytes(data))
    with pytest.raises(ConceptIndexError, match="content hash mismatch"):
        ConceptIndex.load(index_copy)


def test_reliability_inputs_tampered_manifest_is_refused(index_copy: Path) -> None:
    mpath = index_copy / "manifest.json"
    manifest = json.loads(mpath.read_text())
    # Someone edits a file AND updates its hash in the manifest, but not the content hash.
    strings = index_copy / "strings.bin"
    strings.write_bytes(strings.read_bytes().replace(b"pneumothorax", b"pneumothorix"))
    import hashlib

    manifest["files"]["strings.bin"] = hashlib.sha256(strings.read_bytes()).hexdigest()
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ConceptIndexError, match="content_hash"):
        ConceptIndex.load(index_copy)
    mpath.write_text("{not json")
    with pytest.raises(ConceptIndexError, match="manifest"):
        ConceptIndex.load(index_copy)
    mpath.write_text("[]")
    with pytest.raises(ConceptIndexError, match="manifest"):
        ConceptIndex.load(index_copy)


def test_reliability_inputs_truncated_index_is_refused_even_unverified(index_copy: Path) -> None:
    path = index_copy / "post_cui.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(ConceptIndexError):
        ConceptIndex.load(index_copy, verify=False)


def test_reliability_inputs_service_refuses_a_tampered_index_and_keeps_serving(
    index_copy: Path,
) -> None:
    settings = settings_for(index_copy, admin_token="a" * 32)
    with running_server(settings) as (_srv, port):
        with ConceptClient(f"127.0.0.1:{port}", admin_token="a" * 32, retries=0) as c:
            before = c.get_info().index.content_hash
            # Rebuild with one more concept (a real new index), then corrupt one of its files.
            from service_helpers import build_index_b

            build_index_b(index_copy)
            keys = index_copy / "keys.bin"
            data = bytearray(keys.read_bytes())
            data[0] ^= 0x20
            keys.write_bytes(bytes(data))
            code, message = _status(c.reload_index)
            assert code == "FAILED_PRECONDITION"
            assert "hash" in message
            assert c.get_info().index.content_hash == before
            assert c.annotate("Chest CT", id="x").concepts == (CHEST, CT)
            assert c.health() == "SERVING"


# -- files: caption corpora ------------------------------------------------------------------------
def _bad(corpus: Corpus) -> list[tuple[int, str]]:
    return [(b.line, b.problem) for b in corpus.scan().bad]


def test_reliability_inputs_corpus_broken_csv_quoting(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        'ID,Caption\na,"Chest CT"\nb,"unterminated quote\nc,Lung\nd,"x"y\n', encoding="utf-8"
    )
    bad = _bad(Corpus(path))
    assert bad, "broken quoting must be reported"
    assert bad[0][0] == 3 and "quot" in bad[0][1]


def test_reliability_inputs_corpus_invalid_utf8_has_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes(b"ID,Caption\na,Chest CT\nb,caf\xe9 au lait\nc,\xff\xfe\n")
    bad = _bad(Corpus(path))
    assert [line for line, _ in bad] == [3, 4]
    assert all("UTF-8" in problem for _, problem in bad)


def test_reliability_inputs_corpus_duplicate_and_missing_ids(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"id": "a", "text": "Chest"}',
                '{"id": "a", "text": "again"}',
                '{"text": "no id"}',
                '{"id": "", "text": "empty id"}',
                '{"id": "s", "text": "lone \\ud800 surrogate"}',
                '{"id": "t\\tab", "text": "tab in id"}',
                "not json",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    bad = _bad(Corpus(path))
    assert [line for line, _ in bad] == [2, 3, 4, 5, 6, 7]
    assert "duplicate id 'a'" in bad[0][1] and "line 1" in bad[0][1]
    assert "surrogate" in bad[3][1]
    assert "JSON" in bad[5][1]


def test_reliability_inputs_corpus_truncated_gzip_is_a_client_error(tmp_path: Path) -> None:
    rnd = random.Random(7)
    rows = "".join(f"id{i},caption {rnd.random()} chest CT\n" for i in range(5000))
    path = tmp_path / "c.csv.gz"
    data = gzip.compress(("ID,Caption\n" + rows).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ClientError, match="truncated"):
        Corpus(path).scan()
