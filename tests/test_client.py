"""ConceptClient against real servers (the pb <-> domain conversions: tests/test_wire.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from service_helpers import (
    CAPTIONS,
    build_index_a,
    garbling_server,
    proxied_server,
    running_server,
    settings_for,
    unreadable_reply,
)

from conceptsvc.client import ConceptClient
from conceptsvc.errors import ClientError, ExtractArgumentError, ServiceCallError
from conceptsvc.model import StreamResult
from conceptsvc.server import create_server
from conceptsvc.server.app import ConceptServer


@pytest.fixture(scope="module")
def index_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index_a(tmp_path_factory.mktemp("client") / "index-a")


# -- behaviour against real servers ------------------------------------------------------------
def test_client_retries_unavailable_until_the_server_is_up(index_a: Path) -> None:
    from conftest import free_port

    port = free_port()
    s = settings_for(index_a, port=port)
    servers: list[Any] = []

    def start_later() -> None:
        time.sleep(0.6)
        server, _ = create_server(s)
        server.start()
        servers.append(server)

    t = threading.Thread(target=start_later)
    t.start()
    try:
        with ConceptClient(f"127.0.0.1:{port}", retries=8, backoff=0.1, timeout=10) as c:
            t0 = time.monotonic()
            assert c.annotate("lung").concepts == ("C0024109",)
            assert time.monotonic() - t0 >= 0.5
    finally:
        t.join()
        for server in servers:
            server.stop(0)


def test_client_gives_up_after_retries_or_deadline() -> None:
    from conftest import free_port

    target = f"127.0.0.1:{free_port()}"
    with ConceptClient(target, retries=2, backoff=0.05) as c:
        with pytest.raises(ServiceCallError) as err:
            c.get_info()
        assert err.value.status == "UNAVAILABLE" and "reachable" in str(err.value)
    # 1000 retries with backoff up to 5 s would go on for over an hour: the 0.6 s deadline
    # must end them. (30 s is only there so that a client ignoring its deadline fails here
    # instead of hanging the run.)
    with ConceptClient(target, retries=1000, backoff=0.05, timeout=0.6) as c:
        outcome: list[Exception] = []

        def call() -> None:
            try:
                c.get_info()
            except Exception as exc:  # handed to the test thread
                outcome.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "the deadline did not end the retries"
        (failure,) = outcome
        assert isinstance(failure, ServiceCallError)
        assert failure.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_client_does_not_retry_other_statuses(index_a: Path) -> None:
    with running_server(settings_for(index_a)) as (server, port):
        with ConceptClient(f"127.0.0.1:{port}", retries=5, backoff=1.0) as c:
            with pytest.raises(ServiceCallError) as err:
                c.get_concept("C9999999")
            assert err.value.status == "NOT_FOUND"
        # the server saw the call once: no retry (it counts a call before answering it)
        assert server.metrics.value(
            "conceptsvc_requests_total", {"method": "GetConcept", "code": "NOT_FOUND"}
        ) == 1


class _CancelFirst(grpc.GenericRpcHandler):
    """A proxy to a real server that ends the first ``n`` calls of each method with
    CANCELLED, as a replica stopping while calls are on their way to it does (a stream after
    reading one item and answering none); later calls are forwarded, bytes as they are."""

    def __init__(self, target: str, n: int, delay: float = 0.0) -> None:
        self._channel = grpc.insecure_channel(target)
        self._n = n
        self._delay = delay  # before a unary call is forwarded
        self._lock = threading.Lock()
        self.seen: dict[str, int] = {}

    def _cancels(self, method: str) -> bool:
        with self._lock:
            self.seen[method] = self.seen.get(method, 0) + 1
            return self.seen[method] <= self._n

    def service(self, details: Any) -> Any:
        method = details.method
        if method.endswith("/AnnotateStream"):
            forward_stream = self._channel.stream_stream(method)

            def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
                if self._cancels(method):
                    next(requests, None)
                    context.abort(grpc.StatusCode.CANCELLED, "the server is stopping")
                yield from forward_stream(requests)

            return grpc.stream_stream_rpc_method_handler(stream)
        forward = self._channel.unary_unary(method)

        def unary(request: bytes, context: Any) -> bytes:
            if self._cancels(method):
                context.abort(grpc.StatusCode.CANCELLED, "the server is stopping")
            time.sleep(self._delay)
            return forward(request, metadata=context.invocation_metadata())

        return grpc.unary_unary_rpc_method_handler(unary)

    def close(self) -> None:
        self._channel.close()


@contextmanager
def _cancelling_proxy(
    index: Path, n: int, delay: float = 0.0
) -> Iterator[tuple[_CancelFirst, str]]:
    """A real server over ``index`` behind a :class:`_CancelFirst` proxy: (its handler, the
    proxy's target)."""
    with proxied_server(index, lambda target: _CancelFirst(target, n, delay)) as pair:
        yield pair


def test_client_resends_calls_a_stopping_server_cancelled(index_a: Path) -> None:
    """A CANCELLED the client did not cause comes from a replica that stopped under the call
    (the end of a drain's grace): reads are resent, like UNAVAILABLE, on every path;
    ReloadIndex, which may have been done, is not; nor is anything past ``retries``."""
    with _cancelling_proxy(index_a, 2) as (handler, target):
        with ConceptClient(target, retries=3, backoff=0.01) as c:
            assert c.annotate("lung").concepts == ("C0024109",)
            batch = c.annotate_batch([("a", "lung"), ("b", "pleural effusion")])
            assert [(r.id, r.error) for r in batch] == [("a", None), ("b", None)]
            streamed = list(c.annotate_stream(iter([("s1", "lung"), ("s2", "lung")])))
            assert [(r.id, r.error) for r in streamed] == [("s1", None), ("s2", None)]
            assert c.get_info().service_version
            with pytest.raises(ServiceCallError) as err:
                c.reload_index()
            assert err.value.status == "CANCELLED"
        calls = {m.rsplit("/", 1)[1]: n for m, n in handler.seen.items()}
        assert calls == {"Annotate": 3, "AnnotateBatch": 3, "AnnotateStream": 3,
                         "GetInfo": 3, "ReloadIndex": 1}
        with ConceptClient(target, retries=1, backoff=0.01) as c:
            with pytest.raises(ServiceCallError) as err:
                c.get_concept("C0024109")
            assert err.value.status == "CANCELLED"


def test_client_closed_during_a_call_does_not_resend_it(index_a: Path) -> None:
    """Closing the client cancels its calls in flight: that CANCELLED is the client's own and
    is raised, not resent on the closed channel."""
    with _cancelling_proxy(index_a, 0, delay=1.0) as (handler, target):
        c = ConceptClient(target, retries=5, backoff=0.01)
        closer = threading.Timer(0.3, c.close)
        closer.start()
        with pytest.raises(ServiceCallError) as err:
            c.annotate("lung")
        closer.join()
        assert err.value.status == "CANCELLED"
        assert handler.seen == {"/conceptsvc.v1.ConceptService/Annotate": 1}


def test_client_stream_resumes_on_another_server_without_loss_or_duplicates(
    index_a: Path,
) -> None:
    """Two servers share one port (SO_REUSEPORT, like the workers); the one serving the
    stream is drained mid-stream and the client resends exactly the unanswered items."""
    first, port = create_server(settings_for(index_a, grace_seconds=5), reuse_port=True)
    second, _ = create_server(settings_for(index_a, port=port), reuse_port=True)
    first.start()
    second.start()
    servers = [first, second]
    n = 600
    texts = [(f"id{i}", f"{CAPTIONS[i % len(CAPTIONS)][1]} #{i}") for i in range(n)]
    drained: list[Any] = []

    def items() -> Iterator[tuple[str, str]]:
        for i, item in enumerate(texts):
            if i == 200:
                busy = [s for s in servers if s.metrics.value("conceptsvc_inflight_requests")]
                assert len(busy) == 1
                drained.append(busy[0])
                threading.Thread(target=busy[0].drain).start()
            if i % 50 == 0:
                time.sleep(0.05)
            yield item

    try:
        with ConceptClient(f"127.0.0.1:{port}", retries=6, backoff=0.05) as c:
            results = list(c.annotate_stream(items(), window=64))
        assert [r.id for r in results] == [i for i, _ in texts]
        assert all(r.ok for r in results)
        survivor = next(s for s in servers if s is not drained[0])
        served = [
            s.metrics.value("conceptsvc_captions_annotated_total", {"source": "engine"})
            + s.metrics.value("conceptsvc_captions_annotated_total", {"source": "cache"})
            for s in (drained[0], survivor)
        ]
        # Each server answered part of the stream; together at least every item (an item the
        # drained server answered but whose response was lost is answered again: at least once
        # on the servers, exactly once in the client's results).
        assert served[0] >= 100 and served[1] >= 100
        assert sum(served) >= n
    finally:
        first.stop(0)
        second.stop(0)


def test_client_stream_window_bounds_items_in_flight(index_a: Path) -> None:
    with running_server(settings_for(index_a)) as (_, port):
        pulled = 0
        ahead: list[int] = []

        def items() -> Iterator[tuple[str, str]]:
            nonlocal pulled
            for i in range(300):
                pulled += 1
                yield str(i), "chest CT"

        with ConceptClient(f"127.0.0.1:{port}") as c:
            for k, r in enumerate(c.annotate_stream(items(), window=10)):
                ahead.append(pulled - k)
                assert r.ok
        assert max(ahead) <= 11 and len(ahead) == 300


def test_client_stream_outlives_the_servers_idle_timeout(index_a: Path) -> None:
    """The caller's items pause for many times the server's stream_idle_seconds: the server
    ends each quiet stream with UNAVAILABLE (nothing unanswered), and the client carries on on
    a new stream when the next item comes — without spending its retries (2 here, far fewer
    than the idle periods), also when the first item after the pause cannot be sent."""
    settings = settings_for(index_a, threads=4, stream_idle_seconds=0.2)
    with running_server(settings) as (server, port):

        def items() -> Iterator[tuple[str, str]]:
            yield "a", "lung"
            time.sleep(2.5)
            yield "bad", "x\ud800"
            yield "b", "Chest CT"
            time.sleep(1.0)
            yield "c", "CT"

        with ConceptClient(f"127.0.0.1:{port}", retries=2, timeout=30) as c:
            results = list(c.annotate_stream(items(), window=1))
        assert [(r.id, r.error.status if r.error else "OK") for r in results] == [
            ("a", "OK"), ("bad", "INVALID_ARGUMENT"), ("b", "OK"), ("c", "OK"),
        ]
        assert [r.annotation.concepts for r in results if r.annotation] == [
            ("C0024109",), ("C0817096", "C0040405"), ("C0040405",),
        ]
        # The server did end the quiet streams: the client really reopened.
        ended = server.metrics.value(
            "conceptsvc_requests_total", {"method": "AnnotateStream", "code": "UNAVAILABLE"}
        )
        assert ended >= 2


def test_client_closing_a_stream_early_cancels_it(index_a: Path) -> None:
    with running_server(settings_for(index_a)) as (server, port):
        with ConceptClient(f"127.0.0.1:{port}") as c:

            def endless() -> Iterator[tuple[str, str]]:
                i = 0
                while True:
                    i += 1
                    yield str(i), "lung"

            stream = c.annotate_stream(endless(), window=8)
            assert next(stream).id == "1"
            stream.close()  # type: ignore[attr-defined]
            deadline = time.monotonic() + 5
            while server.metrics.value("conceptsvc_inflight_requests"):
                assert time.monotonic() < deadline
                time.sleep(0.02)


def test_client_wait_until_serving(index_a: Path) -> None:
    with running_server(settings_for(index_a), load=False) as (server, port):
        with ConceptClient(f"127.0.0.1:{port}") as c:
            # The connection is set up first, so that the short wait below measures polling,
            # not a connect on a loaded machine (a cold 0.3 s wait once ended on
            # DEADLINE_EXCEEDED instead of NOT_SERVING).
            assert c.health() == "NOT_SERVING"
            with pytest.raises(ClientError, match=r"did not become SERVING.*NOT_SERVING"):
                c.wait_until_serving(timeout=1.0)
            threading.Timer(0.2, server.reload).start()
            c.wait_until_serving(timeout=5)
            assert c.health("conceptsvc.v1.ConceptService") == "SERVING"
            assert c.health("no.such.Service") == "SERVICE_UNKNOWN"


def test_client_rejects_incomplete_tls_options(tmp_path: Path) -> None:
    with pytest.raises(ClientError, match="together"):
        ConceptClient("localhost:1", client_cert=tmp_path / "c.pem")
    with pytest.raises(ClientError, match="cannot read"):
        ConceptClient("localhost:1", ca_cert=tmp_path / "missing.pem")


def test_client_unsendable_text_is_refused_per_item(index_a: Path) -> None:
    """A lone surrogate has no UTF-8 form: protobuf cannot send it. The unary call raises a
    ClientError naming the item; a stream answers that item locally, in order, and goes on."""
    with running_server(settings_for(index_a)) as (server, port):
        with ConceptClient(f"127.0.0.1:{port}") as c:
            with pytest.raises(ClientError, match=r"item 's'.*lone surrogate.*position 6"):
                c.annotate("Chest \ud800 CT", id="s")
            items = [("a", "Chest"), ("b", "x\udfffy"), ("c", "CT"), ("d\ud800", "lung")]
            results = list(c.annotate_stream(items))
            assert [r.id for r in results] == ["a", "b", "c", "d\ud800"]
            assert [r.ok for r in results] == [True, False, True, False]
            assert results[1].error is not None and results[1].error.status == "INVALID_ARGUMENT"
            assert "its id has" in results[3].error.message  # type: ignore[union-attr]
            assert results[2].annotation is not None
            assert results[2].annotation.concepts == ("C0040405",)
            # Unsendable items do not take a window slot: no deadlock with window=1.
            only_bad = list(c.annotate_stream([("x", "\ud800"), ("y", "lung")], window=1))
            assert [(r.id, r.ok) for r in only_bad] == [("x", False), ("y", True)]
            assert [r.ok for r in c.annotate_stream([("z", "\ud800")])] == [False]
        # Nothing unsendable reached the server.
        m = server.metrics
        assert m.value("conceptsvc_captions_annotated_total", {"source": "engine"}) + m.value(
            "conceptsvc_captions_annotated_total", {"source": "cache"}
        ) == 3


def test_client_every_answer_names_its_index(tmp_path: Path) -> None:
    """AnnotateResponse.index_hash, fresh and cached, on failed items too, and the index after
    a reload: what lets a client tell which index answered (issue 18, item 1)."""
    from service_helpers import build_index_b

    path = build_index_a(tmp_path / "idx")
    with running_server(settings_for(path, max_text_chars=100)) as (server, port), \
            ConceptClient(f"127.0.0.1:{port}") as c:
        a_hash = c.get_info().index.content_hash
        items = [("1", "lung edema"), ("2", "lung edema"), ("3", "x" * 101)]
        first = list(c.annotate_stream(items))
        again = list(c.annotate_stream(items[:1]))
        assert not first[0].cached and again[0].cached
        assert first[2].error is not None and first[2].error.status == "RESOURCE_EXHAUSTED"
        assert {r.index_hash for r in [*first, *again]} == {a_hash}
        assert first[0].annotation is not None and first[0].annotation.concepts == ("C0024109",)
        build_index_b(path)
        server.reload()
        b_hash = c.get_info().index.content_hash
        (after,) = c.annotate_stream(items[:1])
        assert b_hash != a_hash and after.index_hash == b_hash and not after.cached
        assert after.annotation is not None
        assert after.annotation.concepts == ("C0024109", "C0013604")


def _batch_with_limit(
    index: Path, items: list[tuple[str, str]], limit: int, *, failing: str
) -> tuple[ConceptServer, list[StreamResult]]:
    """``items`` through annotate_batch of a client whose message limit is ``limit``; the one
    item ``failing`` fails alone with RESOURCE_EXHAUSTED naming the limit, in input order."""
    with running_server(settings_for(index)) as (server, port):
        with ConceptClient(f"127.0.0.1:{port}", max_message_bytes=limit, retries=0) as c:
            results = c.annotate_batch(items)
    assert [r.id for r in results] == [i for i, _ in items]
    assert [r.id for r in results if not r.ok] == [failing]
    (error,) = [r.error for r in results if r.id == failing]
    assert error is not None and error.status == "RESOURCE_EXHAUSTED"
    assert f"message limit of {limit} bytes" in error.message
    return server, results


def test_client_batch_splits_a_request_over_its_message_limit(index_a: Path) -> None:
    """A batch is not one message whatever its size: it goes in requests that fit the client's
    max_message_bytes, in order; a caption whose request alone is over it fails by itself,
    with the limit named, and nothing of it is sent."""
    limit = 64 * 1024
    plain = "Nothing to see here. " * 500  # 10.5 KB asked, nothing answered
    items = [(f"p{i}", plain) for i in range(12)]  # 126 KB of request
    items.insert(5, ("lung", "lung"))
    items.insert(9, ("huge", "x" * (limit + 1)))
    server, results = _batch_with_limit(index_a, items, limit, failing="huge")
    assert results[9].error is not None and results[9].error.error_code == "E501"
    assert results[5].annotation is not None and results[5].annotation.concepts == ("C0024109",)
    m = server.metrics
    assert m.value("conceptsvc_captions_annotated_total", {"source": "engine"}) + m.value(
        "conceptsvc_captions_annotated_total", {"source": "cache"}
    ) == len(items) - 1


def test_client_batch_reply_over_its_receive_limit_is_sent_again_in_halves(
    index_a: Path,
) -> None:
    """A client whose message limit is below the server's gets replies the server filled up to
    its own limit: such a batch is sent again in halves, as an E503 rest is, and an item whose
    answer alone is over the client's limit fails by itself, naming the limit."""
    limit = 64 * 1024
    items = [(f"m{i}", "lung " * 150) for i in range(8)]  # ~12 KB answered each, ~100 KB all
    items.insert(3, ("big", "lung " * 2000))  # ~150 KB answered
    _, results = _batch_with_limit(index_a, items, limit, failing="big")
    assert all(len(r.annotation.mentions) == 150 for r in results if r.ok)  # type: ignore[union-attr]


# -- what the caller passes ----------------------------------------------------------------------
def test_client_items_take_what_extract_batch_takes(index_a: Path) -> None:
    """Plain texts (ids by position), pairs with integer ids and mappings, on a stream and in a
    batch, as Extractor.extract_batch; a wrong shape is refused showing the right call."""
    with running_server(settings_for(index_a)) as (_, port), \
            ConceptClient(f"127.0.0.1:{port}") as c:
        for annotate in (c.annotate_batch, lambda i: list(c.annotate_stream(i))):
            plain = annotate(["Chest CT", "lung"])
            assert [(r.id, r.annotation.concepts if r.annotation else None) for r in plain] == [
                ("0", ("C0817096", "C0040405")), ("1", ("C0024109",))
            ]
            assert [r.id for r in annotate([(7, "lung")])] == ["7"]
            assert [r.id for r in annotate({"a": "lung", "b": "heart"})] == ["a", "b"]
        with pytest.raises(ExtractArgumentError) as err:
            c.annotate_batch("Chest CT")
        assert "use annotate(text) for one text" in str(err.value)
        with pytest.raises(ExtractArgumentError) as err:
            c.annotate_batch([("a", "lung"), "heart"])
        assert "item 1 is a text ('heart')" in str(err.value)
        assert 'annotate_batch([("cap1", "CT of the chest")' in str(err.value)
        stream = c.annotate_stream(iter([("a", "lung"), ("b", "heart", "x")]))
        assert next(stream).id == "a"  # the items before the bad one are answered
        with pytest.raises(ExtractArgumentError) as err:
            next(stream)
        assert "annotate_stream: item 1 is ('b', 'heart', 'x')" in str(err.value)
        assert 'annotate_stream(["CT of the chest", "MRI of the brain"])' in str(err.value)


def test_client_stream_raises_the_exception_of_the_callers_items(index_a: Path) -> None:
    """An exception of the caller's iterator is raised as itself after the items read before it
    are answered, not as the UNKNOWN status gRPC makes of it; nothing after it is read."""
    problem = ValueError("my input reader broke")
    read: list[str] = []

    def items() -> Iterator[tuple[str, str]]:
        for id_ in ("a", "b"):
            read.append(id_)
            yield id_, "lung"
        raise problem

    with running_server(settings_for(index_a)) as (_, port), \
            ConceptClient(f"127.0.0.1:{port}") as c:
        got: list[str] = []
        with pytest.raises(ValueError) as err:
            for r in c.annotate_stream(items()):
                got.append(r.id)
        assert err.value is problem
        assert got == ["a", "b"] and read == ["a", "b"]
        assert [r.id for r in c.annotate_stream([("c", "lung")])] == ["c"]  # the client is fine


def test_client_options_of_the_wrong_type_are_refused_before_sending(index_a: Path) -> None:
    """The error the engine raises in-process (E502), not protobuf's TypeError, from every
    method that takes options; no call reaches the server."""
    from conceptsvc.model import ExtractOptions

    bad = ExtractOptions(include_negated="no")  # type: ignore[arg-type]
    with running_server(settings_for(index_a)) as (server, port), \
            ConceptClient(f"127.0.0.1:{port}") as c:
        calls = [
            lambda: c.annotate("lung", options=bad),
            lambda: list(c.annotate_stream([("a", "lung")], options=bad)),
            lambda: c.annotate_batch([("a", "lung")], options=bad),
            lambda: c.search("lung", options=bad),
        ]
        for call in calls:
            with pytest.raises(ExtractArgumentError, match=r"include_negated=\.\.\.\) takes True"):
                call()
        c.annotate("lung")  # the one call that reached the server
        m = server.metrics
        assert m.value("conceptsvc_captions_annotated_total", {"source": "engine"}) + m.value(
            "conceptsvc_captions_annotated_total", {"source": "cache"}
        ) == 1
        assert m.value("conceptsvc_requests_total", {"method": "SearchConcepts", "code": "OK"}) == 0


def test_client_closed_says_so_as_a_client_error(index_a: Path) -> None:
    """Every call of a closed client raises ClientError saying it was closed, not gRPC's bare
    ValueError ("Cannot invoke RPC on closed channel!", "Channel closed!")."""
    with running_server(settings_for(index_a)) as (_, port):
        c = ConceptClient(f"127.0.0.1:{port}")
        assert c.annotate("lung").concepts == ("C0024109",)
        c.close()
        calls = {
            "Annotate": lambda: c.annotate("lung"),
            "AnnotateStream": lambda: list(c.annotate_stream([("a", "lung")])),
            "AnnotateBatch": lambda: c.annotate_batch([("a", "lung")]),
            "GetConcept": lambda: c.get_concept("C0024109"),
            "SearchConcepts": lambda: c.search("lung"),
            "GetInfo": c.get_info,
            "Health.Check": c.health,
            "ReloadIndex": c.reload_index,
        }
        for name, call in calls.items():
            with pytest.raises(ClientError) as err:
                call()
            assert type(err.value) is ClientError
            assert f"{name}: this ConceptClient (127.0.0.1:{port}) was closed" in str(err.value)
            assert "make a new ConceptClient" in str(err.value)


def test_client_an_unreadable_reply_is_a_client_error_not_a_crash(index_a: Path) -> None:
    """A server whose annotation replies are the review's bytes (a length of 2**64 - 2**40,
    which once killed the client with SIGSEGV): each annotation call raises ClientError (E600)
    with protobuf's DecodeError, and the process goes on. The client runs in a process of its
    own, so that a crash fails this test rather than the test run."""
    code = (
        "import json, sys\n"
        "from conceptsvc.client import ConceptClient\n"
        "from conceptsvc.errors import ClientError\n"
        "c = ConceptClient(sys.argv[1], retries=0)\n"
        "calls = {'Annotate': lambda: c.annotate('pleural effusion'),\n"
        "         'AnnotateStream': lambda: list(c.annotate_stream([('a', 'lung')])),\n"
        "         'AnnotateBatch': lambda: c.annotate_batch([('a', 'lung')])}\n"
        "out = {}\n"
        "for name, call in calls.items():\n"
        "    try:\n"
        "        out[name] = ['answered', repr(call())]\n"
        "    except ClientError as exc:\n"
        "        out[name] = [type(exc).__name__, str(exc)]\n"
        "out['GetInfo'] = c.get_info().index.source_release\n"
        "print(json.dumps(out))\n"
    )
    with garbling_server(index_a, unreadable_reply()) as target:
        done = subprocess.run([sys.executable, "-c", code, target], capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode} (-11: SIGSEGV): {done.stderr[-2000:]}"
    got = json.loads(done.stdout)
    assert got.pop("GetInfo") == "test-A"  # the rest of the service is read as ever
    corrupt = "Error parsing message with type 'conceptsvc.v1.{}': Wire format was corrupt"
    assert got == {
        name: ["ClientError", f"[E600] {name}: the server's reply cannot be read "
                              f"({corrupt.format(message)})"]
        for name, message in (("Annotate", "AnnotateResponse"),
                              ("AnnotateStream", "AnnotateResponse"),
                              ("AnnotateBatch", "AnnotateBatchResponse"))
    }


def test_client_unknown_concept_is_concept_not_found(index_a: Path) -> None:
    """GetConcept's NOT_FOUND is ConceptNotFoundError (E623), which is still the
    ServiceCallError with status NOT_FOUND that the client raised before."""
    from conceptsvc.errors import ConceptNotFoundError

    with running_server(settings_for(index_a)) as (_, port), \
            ConceptClient(f"127.0.0.1:{port}") as c:
        with pytest.raises(ConceptNotFoundError) as err:
            c.get_concept("C9999999")
        assert isinstance(err.value, ServiceCallError) and err.value.status == "NOT_FOUND"
        assert err.value.cui == "C9999999" and "C9999999" in err.value.details
        assert str(err.value) == (
            "[E623] C9999999 is not in the dictionary; ConceptClient.search(text) finds concepts "
            "by name."
        )


def test_client_refused_token_hint_names_the_right_token(index_a: Path) -> None:
    """ReloadIndex refused for its token says it needs admin_token=..., not the service's
    token or a command-line flag; other calls name both the client's token= and --token."""
    user, admin = "user-token-" + "u" * 24, "admin-token-" + "a" * 24
    settings = settings_for(index_a, auth_token=user, admin_token=admin)
    with running_server(settings) as (_, port):
        target = f"127.0.0.1:{port}"
        for kwargs in ({}, {"token": user}):  # no token; the user token, which it falls back to
            with ConceptClient(target, retries=0, **kwargs) as c:
                with pytest.raises(ServiceCallError) as err:
                    c.reload_index()
                assert err.value.status in ("UNAUTHENTICATED", "PERMISSION_DENIED")
                assert "ConceptClient(target, admin_token=...)" in str(err.value)
                assert "--token" not in str(err.value)
        with ConceptClient(target, retries=0) as c:
            with pytest.raises(ServiceCallError) as err:
                c.get_info()
            assert "ConceptClient(target, token=...), or --token" in str(err.value)
        with ConceptClient(target, token=user, admin_token=admin, retries=0) as c:
            assert c.reload_index().content_hash
