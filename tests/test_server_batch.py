"""AnnotateBatch, the batched annotation RPC, against the real server in-process on port 0.

The same cases as the stream has (tests/test_server.py): answers in request order with their
ids, per-item errors, size limits on both ways, deadlines, draining, admission control, auth
and the cache tiers — plus what only a batch has: a reply that would be over the message limit
(E503 for the items that do not fit, sent again by the client).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import redis
from service_helpers import CAPTIONS, build_index_a, running_server, settings_for

from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2_grpc as pb_grpc
from conceptsvc.cache import result_key
from conceptsvc.client import ConceptClient
from conceptsvc.errors import ServiceCallError
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.model import ExtractOptions, MentionRows
from conceptsvc.server import create_server

if TYPE_CHECKING:
    from conftest import RedisServer

TOKEN = "user-token-0123456789abcdef"
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


@pytest.fixture(scope="module")
def index_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index_a(tmp_path_factory.mktemp("svc-batch") / "index-a")


@pytest.fixture(scope="module")
def port(index_a: Path) -> Iterator[int]:
    with running_server(settings_for(index_a)) as (_, port):
        yield port


def _stub(port: int) -> Any:
    return pb_grpc.ConceptServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def _batch(items: list[tuple[str, str]], **options: Any) -> pb.AnnotateBatchRequest:
    msg = pb.AnnotateBatchRequest(items=[pb.AnnotateRequest(id=i, text=t) for i, t in items])
    if options:
        msg.options.CopyFrom(pb.AnnotateOptions(**options))
    return msg


class _SlowExtractor(Extractor):
    """The real engine, ``delay`` seconds slower a caption."""

    def __init__(self, index: ConceptIndex, delay: float) -> None:
        super().__init__(index)
        self.delay = delay

    def extract_rows(
        self, text: str, options: ExtractOptions | None = None
    ) -> MentionRows:
        time.sleep(self.delay)
        return super().extract_rows(text, options)


def test_server_batch_answers_in_request_order_like_the_stream_and_unary(port: int) -> None:
    with ConceptClient(f"127.0.0.1:{port}") as c:
        batch = c.annotate_batch(CAPTIONS)
        stream = list(c.annotate_stream(CAPTIONS))
        assert [r.id for r in batch] == [i for i, _ in CAPTIONS]
        assert all(r.ok and r.index_hash for r in batch)
        assert [r.annotation for r in batch] == [r.annotation for r in stream]
        assert [r.index_hash for r in batch] == [r.index_hash for r in stream]
        for (rid, text), r in zip(CAPTIONS, batch, strict=True):
            assert c.annotate(text, id=rid) == r.annotation
    # Raw: the reply is an AnnotateBatchResponse protobuf reads like any other; the second
    # call is answered from the cache, with the same mentions and this call's ids.
    stub = _stub(port)
    first = stub.AnnotateBatch(_batch([("a", "Chest CT"), ("b", "lung")]), timeout=10)
    again = stub.AnnotateBatch(_batch([("c", "Chest CT"), ("d", "lung")]), timeout=10)
    assert [i.id for i in again.items] == ["c", "d"] and all(i.cached for i in again.items)
    assert [list(i.mentions) for i in first.items] == [list(i.mentions) for i in again.items]
    assert {i.index_hash for i in first.items} == {i.index_hash for i in again.items}
    assert stub.AnnotateBatch(pb.AnnotateBatchRequest(), timeout=10).items == []


def test_server_batch_per_item_errors_do_not_fail_the_batch(port: int) -> None:
    stub = _stub(port)
    bad = pb.AnnotateOptions(semantic_types=pb.NameList(values=["dsny"]))
    msg = _batch([("ok1", "Chest CT"), ("", "missing id"), ("big", "x" * 100_001)])
    msg.items.add(id="opts", text="lung", options=bad)
    msg.items.add(id="ok2", text="pneumothorax")
    out = stub.AnnotateBatch(msg, timeout=10)
    assert [(i.id, i.status.code, i.status.error_code) for i in out.items] == [
        ("ok1", 0, ""),
        ("", grpc.StatusCode.INVALID_ARGUMENT.value[0], ""),
        ("big", RESOURCE_EXHAUSTED, "E501"),
        ("opts", grpc.StatusCode.INVALID_ARGUMENT.value[0], "E300"),
        ("ok2", 0, ""),
    ]
    assert "non-empty id" in out.items[1].status.message
    assert "Did you mean" in out.items[3].status.message
    assert list(out.items[4].concepts) == ["C0032326"]
    assert all(i.index_hash for i in out.items)
    # The batch's options apply to every item without its own; an item's own replace them.
    msg = _batch([("a", "Chest CT shows a pneumothorax")], semantic_groups=pb.NameList(
        values=["DISO"]))
    msg.items.add(id="b", text="Chest CT shows a pneumothorax", options=pb.AnnotateOptions())
    out = stub.AnnotateBatch(msg, timeout=10)
    assert [list(i.concepts) for i in out.items] == [
        ["C0032326"], ["C0817096", "C0040405", "C0032326"]
    ]
    # Bad batch options fail the items that use them, not the call.
    msg = _batch([("a", "lung")], semantic_types=pb.NameList(values=["dsny"]))
    msg.items.add(id="b", text="lung", options=pb.AnnotateOptions())
    out = stub.AnnotateBatch(msg, timeout=10)
    assert [i.status.error_code for i in out.items] == ["E300", ""]


@pytest.mark.parametrize(
    ("odd", "code", "error_code"),
    [
        (pb.AnnotateRequest(id="", text="lung"), grpc.StatusCode.INVALID_ARGUMENT.value[0], ""),
        (pb.AnnotateRequest(id="odd", text="x" * 100_001), RESOURCE_EXHAUSTED, "E501"),
        (
            pb.AnnotateRequest(id="odd", text="Chest CT shows a pneumothorax",
                               options=pb.AnnotateOptions()),
            0, "",
        ),
    ],
    ids=["empty-id", "long-text", "own-options"],
)
def test_server_batch_one_odd_item_among_plain_ones_is_checked_alone(
    port: int, odd: pb.AnnotateRequest, code: int, error_code: str
) -> None:
    """A batch whose items all pass the per-item checks is checked in one go
    (``servicer._uniform``); one item that would not must still get its own answer."""
    msg = _batch([("a", "Chest CT shows a pneumothorax")],
                 semantic_groups=pb.NameList(values=["DISO"]))
    msg.items.append(odd)
    msg.items.add(id="z", text="lung")
    out = _stub(port).AnnotateBatch(msg, timeout=10)
    assert [(i.status.code, i.status.error_code) for i in out.items] == [
        (0, ""), (code, error_code), (0, "")
    ]
    assert list(out.items[0].concepts) == ["C0032326"]  # the batch's options (DISO)
    if odd.HasField("options"):  # its own (none: every group), not the batch's
        assert list(out.items[1].concepts) == ["C0817096", "C0040405", "C0032326"]


def test_server_batch_request_over_the_message_limit_is_refused_whole(index_a: Path) -> None:
    s = settings_for(index_a, max_message_bytes=64 * 1024)
    with running_server(s) as (server, port):
        items = [(str(i), "lung " * 2000) for i in range(8)]  # 80 KB of request
        with pytest.raises(grpc.RpcError) as err:
            _stub(port).AnnotateBatch(_batch(items), timeout=10)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # refused before the handler: nothing was annotated, not even the first items
        assert server.metrics.value(
            "conceptsvc_captions_annotated_total", {"source": "engine"}
        ) == 0
        with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
            with pytest.raises(ServiceCallError) as exc:
                c.annotate_batch(items)
            assert exc.value.status == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_server_batch_reply_over_the_message_limit_fails_only_what_does_not_fit(
    index_a: Path, cache: str
) -> None:
    """An item whose own answer is over the limit fails alone (E501); items whose answers do
    not fit beside the earlier ones fail with E503, never a truncated or failed reply; the
    client sends those again in smaller batches and gets everything."""
    limit = 64 * 1024
    s = settings_for(index_a, max_message_bytes=limit, cache_size=0 if cache == "none" else 64)
    big = "lung " * 3000  # about 150 KB of annotation: over the limit on its own
    mid = "lung " * 450  # about 22 KB each: two fit in a reply, three do not
    with running_server(s) as (server, port):
        stub = _stub(port)
        for _ in range(2):  # fresh, then (with the memory tier) from the cache
            items = [("ok", "Chest CT"), ("big", big), ("m1", mid), ("m2", mid), ("m3", mid),
                     ("m4", mid)]
            reply = stub.AnnotateBatch(_batch(items), timeout=30)
            assert reply.ByteSize() <= limit
            got = [(i.id, i.status.error_code) for i in reply.items]
            assert got == [("ok", ""), ("big", "E501"), ("m1", ""), ("m2", ""),
                           ("m3", "E503"), ("m4", "E503")], got
            assert "over the server's message limit" in reply.items[1].status.message
            assert "smaller batch" in reply.items[4].status.message
            assert len(reply.items[2].mentions) == 450
        with ConceptClient(f"127.0.0.1:{port}") as c:
            results = c.annotate_batch(items)
        assert [r.id for r in results] == [i for i, _ in items]
        assert [r.ok for r in results] == [True, False, True, True, True, True]
        assert all(len(r.annotation.mentions) == 450 for r in results[2:])  # type: ignore[union-attr]
        assert server.metrics.value(
            "conceptsvc_stream_item_errors_total", {"code": "RESOURCE_EXHAUSTED"}
        ) >= 4


def test_server_batch_reply_counts_the_ids_and_framing_not_only_the_answers(
    index_a: Path,
) -> None:
    """Answers that fit the limit together, beside long ids (4-byte characters) that make
    the reply too big: the items that do not fit are refused (E503), the reply stays under
    the limit — the size check counts each item's id, index hash and framing too."""
    limit = 32 * 1024
    s = settings_for(index_a, max_message_bytes=limit, cache_size=0)
    items = [(f"{k:02d}" + "\N{GRINNING FACE}" * 58, "lung " * 6) for k in range(60)]
    with running_server(s) as (_, port):
        reply = _stub(port).AnnotateBatch(_batch(items), timeout=30)
    assert reply.ByteSize() <= limit
    answers = sum(len(i.SerializeToString()) for i in reply.items if not i.status.error_code)
    codes = [i.status.error_code for i in reply.items]
    assert [i.id for i in reply.items] == [i for i, _ in items]
    assert "" in codes and codes[-1] == "E503", codes
    assert answers * len(items) / codes.count("") > limit  # all answers would not have fit


def test_server_batch_whose_refusals_cannot_fit_fails_cleanly(index_a: Path) -> None:
    """A batch whose reply could not hold even a refusal of each item is refused whole, and
    before any caption is annotated: the ids tell, so no work is done and thrown away (it
    was, before: every caption was annotated and cached first). The client sends it again in
    halves and gets every answer."""
    s = settings_for(index_a, max_message_bytes=16 * 1024, cache_size=0)
    with running_server(s) as (server, port):
        items = [(f"{i:04d}", "lung " * 25) for i in range(100)]  # 14 KB asked, 130 KB answered
        with pytest.raises(grpc.RpcError) as err:
            _stub(port).AnnotateBatch(_batch(items), timeout=10)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "send smaller batches" in (err.value.details() or "")
        assert server.metrics.value(
            "conceptsvc_captions_annotated_total", {"source": "engine"}
        ) == 0
        with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
            results = c.annotate_batch(items)
        assert [r.id for r in results] == [i for i, _ in items]
        assert all(r.ok and len(r.annotation.mentions) == 25 for r in results)  # type: ignore[union-attr]


def test_server_batch_over_max_batch_items_is_refused_before_any_work(index_a: Path) -> None:
    """More items than ``max_batch_items`` are refused whole (RESOURCE_EXHAUSTED, naming the
    setting) before any caption is read: before the limit, only the message size bounded the
    item count, and 340,000 one-letter captions cost a worker 380 MiB. GetInfo reports the
    limit; ConceptClient splits its batches to its own ``max_batch_items`` and halves a batch
    a server with a lower limit refuses, so a caller never sees the refusal."""
    with running_server(settings_for(index_a, max_batch_items=5, cache_size=0)) as (srv, port):
        stub = _stub(port)
        assert stub.GetInfo(pb.GetInfoRequest()).limits.max_batch_items == 5
        items = [(str(i), "lung") for i in range(6)]
        with pytest.raises(grpc.RpcError) as err:
            stub.AnnotateBatch(_batch(items), timeout=10)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "6 items, over this server's limit of 5 (max_batch_items)" in (
            err.value.details() or ""
        )
        assert srv.metrics.value(
            "conceptsvc_captions_annotated_total", {"source": "engine"}
        ) == 0
        assert len(stub.AnnotateBatch(_batch(items[:5]), timeout=10).items) == 5  # at the cap
        many = [(str(i), "lung") for i in range(23)]
        with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
            assert c.get_info().limits.max_batch_items == 5
            assert [r.id for r in c.annotate_batch(many)] == [i for i, _ in many]
        refused = srv.metrics.value(
            "conceptsvc_requests_total", {"method": "AnnotateBatch", "code": "RESOURCE_EXHAUSTED"}
        )
        with ConceptClient(f"127.0.0.1:{port}", retries=0, max_batch_items=5) as c:
            results = c.annotate_batch(many)
        assert all(r.ok for r in results) and len(results) == 23
        assert srv.metrics.value(  # split to 5 before sending: none refused
            "conceptsvc_requests_total", {"method": "AnnotateBatch", "code": "RESOURCE_EXHAUSTED"}
        ) == refused
        assert srv.metrics.value(
            "conceptsvc_captions_annotated_total", {"source": "engine"}
        ) == 5 + 23 + 23


def test_server_batch_answers_what_it_has_when_the_deadline_comes_close(index_a: Path) -> None:
    extractor = _SlowExtractor(ConceptIndex.load(index_a), delay=0.05)
    with running_server(settings_for(index_a), extractor=extractor) as (server, port):
        items = [(str(i), f"lung {i}") for i in range(60)]  # 3 s of work
        t0 = time.monotonic()
        reply = _stub(port).AnnotateBatch(_batch(items), timeout=1.5)
        assert time.monotonic() - t0 < 1.5
        codes = [i.status.code for i in reply.items]
        done = codes.index(DEADLINE_EXCEEDED)
        assert 5 <= done < 30, codes
        assert codes == [0] * done + [DEADLINE_EXCEEDED] * (60 - done)
        assert [i.id for i in reply.items] == [i for i, _ in items]
        assert "send it again" in reply.items[-1].status.message
        assert server.metrics.value(
            "conceptsvc_captions_annotated_total", {"source": "engine"}
        ) == done
        # A deadline that has passed before the call is served fails it, with nothing done.
        with ConceptClient(f"127.0.0.1:{port}", timeout=0.0, retries=0) as c:
            with pytest.raises(ServiceCallError) as exc:
                c.annotate_batch(items[:2])
            assert exc.value.status == "DEADLINE_EXCEEDED"


def test_server_batch_drain_finishes_in_flight_and_refuses_new(index_a: Path) -> None:
    extractor = _SlowExtractor(ConceptIndex.load(index_a), delay=0.02)
    s = settings_for(index_a, drain_delay_seconds=0.6, grace_seconds=10)
    server, port = create_server(s, extractor=extractor)
    server.start()
    stub = _stub(port)
    items = [(str(i), f"lung {i}") for i in range(40)]  # 0.8 s of work
    in_flight = stub.AnnotateBatch.future(_batch(items), timeout=20)
    deadline = time.monotonic() + 10
    while not server.metrics.value("conceptsvc_inflight_requests"):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    drainer = threading.Thread(target=server.drain)
    drainer.start()
    time.sleep(0.2)  # the drain delay: still answered
    assert stub.AnnotateBatch(_batch(items[:1]), timeout=5).items[0].status.code == 0
    deadline = time.monotonic() + 5
    while not server.state.draining:  # then refused
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as err:
        stub.AnnotateBatch(_batch(items[:1]), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # the client resends elsewhere
    assert "shutting down" in (err.value.details() or "")
    reply = in_flight.result()
    assert [i.id for i in reply.items] == [i for i, _ in items]
    assert all(i.status.code == 0 for i in reply.items)
    drainer.join(15)
    assert not drainer.is_alive()


def test_server_batch_resent_after_a_drain_by_the_client(index_a: Path) -> None:
    """A batch refused with UNAVAILABLE (a draining server) is sent again, whole, to the server
    that comes back on the port: resend-on-drain for batches."""
    from conftest import free_port

    port = free_port()
    s = settings_for(index_a, port=port, drain_delay_seconds=2.0, grace_seconds=1)
    first, _ = create_server(s)
    first.start()
    drainer = threading.Thread(target=first.drain)
    drainer.start()
    while not first.state.draining:
        time.sleep(0.005)
    second: list[Any] = []

    def replace() -> None:
        drainer.join(20)
        server, _ = create_server(s)
        server.start()
        second.append(server)

    replacer = threading.Thread(target=replace)
    replacer.start()
    try:
        with ConceptClient(f"127.0.0.1:{port}", retries=12, backoff=0.2, backoff_max=1.0) as c:
            results = c.annotate_batch(CAPTIONS)
        assert [r.id for r in results] == [i for i, _ in CAPTIONS] and all(r.ok for r in results)
        assert first.metrics.value(
            "conceptsvc_requests_total", {"method": "AnnotateBatch", "code": "UNAVAILABLE"}
        ) >= 1
    finally:
        replacer.join(30)
        for server in second:
            server.stop(0)


def test_server_batch_is_admitted_and_refused_like_any_call(index_a: Path) -> None:
    """A batch in progress holds the one call a worker admits here; another is refused at
    once with RESOURCE_EXHAUSTED, not queued; once the first is answered, calls go through."""
    extractor = _SlowExtractor(ConceptIndex.load(index_a), delay=0.1)
    s = settings_for(index_a, max_concurrent_rpcs=1, threads=4, cache_size=0)
    with running_server(s, extractor=extractor) as (server, port):
        stub = _stub(port)
        held = stub.AnnotateBatch.future(_batch([(str(i), "lung") for i in range(20)]),
                                         timeout=30)
        deadline = time.monotonic() + 10
        while not server.metrics.value("conceptsvc_inflight_requests"):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as err:
            stub.AnnotateBatch(_batch([("a", "lung")]), timeout=5)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(held.result().items) == 20
        assert len(stub.AnnotateBatch(_batch([("a", "lung")]), timeout=5).items) == 1


def test_server_batch_needs_the_token(index_a: Path) -> None:
    with running_server(settings_for(index_a, auth_token=TOKEN)) as (server, port):
        with ConceptClient(f"127.0.0.1:{port}", token=TOKEN) as c:
            assert [r.ok for r in c.annotate_batch([("1", "lung")])] == [True]
        with ConceptClient(f"127.0.0.1:{port}") as c:
            with pytest.raises(ServiceCallError) as err:
                c.annotate_batch([("1", "lung")])
            assert err.value.status == "UNAUTHENTICATED"
        assert server.metrics.value(
            "conceptsvc_requests_total", {"method": "AnnotateBatch", "code": "UNAUTHENTICATED"}
        ) == 1


def test_server_batch_answers_from_redis_equal_the_engine_and_skip_bad_entries(
    index_a: Path, shared_redis: RedisServer
) -> None:
    """A fresh server (empty memory tier) answers from what another filled Redis with: the
    bytes are copied into the reply and read back as the engine's answers. An entry that is not
    an answer is a miss (and logged), never a broken reply."""
    cfg = {"redis_url": shared_redis.url, "redis_prefix": "batch-redis:", "cache_size": 0}
    items = [(f"{i}", f"Chest CT {i}: pneumothorax, no pneumonia") for i in range(50)]
    with running_server(settings_for(index_a, **cfg)) as (first, port):
        with ConceptClient(f"127.0.0.1:{port}") as c:
            fresh = c.annotate_batch(items)
            content_hash = c.get_info().index.content_hash
        assert first.cache.redis is not None
        name = first.cache.redis.name(
            result_key(content_hash, ExtractOptions().cache_key(), items[7][1])
        )
    assert not any(r.cached for r in fresh)
    r = redis.Redis.from_url(shared_redis.url)
    stored = r.get(name)
    assert stored
    r.set(name, b"\xff\xfe not protobuf")
    with running_server(settings_for(index_a, **cfg)) as (server, port):
        with ConceptClient(f"127.0.0.1:{port}") as c:
            warm = c.annotate_batch(items)
    assert [x.annotation for x in warm] == [x.annotation for x in fresh]
    assert [x.cached for x in warm] == [i != 7 for i in range(50)]
    # the one item answered by the engine was stored again, over the bad entry
    assert r.get(name) == stored
    # the bad entry was found, refused for its signature, and counted as a miss
    assert server.metrics.value(
        "conceptsvc_cache_lookups_total", {"tier": "redis", "result": "hit"}
    ) == 49
    assert server.metrics.value("conceptsvc_redis_rejected_total") == 1
