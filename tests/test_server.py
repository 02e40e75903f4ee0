"""The real gRPC server, in-process on a free port (and as subprocesses for multi-process serving).

Covers every RPC, every status the service reports, per-item stream errors, deadlines, size
limits, health on start and drain, reflection, reload under load, Redis failing mid-stream,
TLS / mutual TLS, token auth, metrics and logging hygiene.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from offsets import check_annotation
from service_helpers import (
    CAPTIONS,
    build_index_a,
    build_index_b,
    make_pki,
    running_server,
    serve_subprocess,
    settings_for,
)

from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2_grpc as pb_grpc
from conceptsvc.cache import result_keys
from conceptsvc.client import ConceptClient
from conceptsvc.errors import ServiceCallError
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.metrics import start_metrics_http_server
from conceptsvc.model import ExtractOptions, MentionRows
from conceptsvc.server import create_server

if TYPE_CHECKING:
    from conftest import RedisServer

TOKEN = "user-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def index_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index_a(tmp_path_factory.mktemp("svc") / "index-a")


@pytest.fixture(scope="module")
def served(index_a: Path) -> Iterator[tuple[Any, int]]:
    """One shared server with default settings for read-only tests."""
    with running_server(settings_for(index_a)) as (server, port):
        yield server, port


@pytest.fixture
def client(served: tuple[Any, int]) -> Iterator[ConceptClient]:
    with ConceptClient(f"127.0.0.1:{served[1]}", timeout=10) as c:
        yield c


def _status(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ServiceCallError) as err:
        fn(*args, **kwargs)
    return err.value.status


def _channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}")


# -- every RPC ---------------------------------------------------------------------------------
def test_server_annotate_offsets_slice_the_original_text(
    client: ConceptClient, index_a: Path
) -> None:
    text = "Chest CT shows a right pneumothorax."
    a = client.annotate(text, id="x1")
    assert a.id == "x1"
    assert a.concepts == ("C0817096", "C0040405", "C0032326")
    check_annotation(ConceptIndex.load(index_a), text, a)
    assert [m.text for m in a.mentions] == ["Chest", "CT", "pneumothorax"]
    ct = a.mentions[1]
    assert (ct.cui, ct.preferred_name, ct.source, ct.semantic_types, ct.score) == (
        "C0040405", "X-Ray Computed Tomography", "MSH", ("T060",), 1.0
    )


def test_server_annotate_echoes_id_and_reports_negation(served: tuple[Any, int]) -> None:
    stub = pb_grpc.ConceptServiceStub(_channel(served[1]))
    resp = stub.Annotate(pb.AnnotateRequest(id="img-7", text="No pneumonia."), timeout=5)
    assert resp.id == "img-7" and resp.status.code == 0
    assert [(m.cui, m.negated) for m in resp.mentions] == [("C0032285", True)]
    opts = pb.AnnotateOptions(include_negated=False)
    resp = stub.Annotate(pb.AnnotateRequest(text="No pneumonia.", options=opts), timeout=5)
    assert list(resp.concepts) == []


def test_server_annotate_options_filter_and_mentions(client: ConceptClient) -> None:
    text = "Chest CT shows a right pneumothorax."
    only_disorders = ExtractOptions(semantic_groups=("DISO",))
    assert client.annotate(text, options=only_disorders).concepts == ("C0032326",)
    by_type = ExtractOptions(semantic_types=("Diagnostic Procedure",))
    assert client.annotate(text, options=by_type).concepts == ("C0040405",)
    snomed = ExtractOptions(sources=("SNOMEDCT_US",))
    assert client.annotate("collapsed lung", options=snomed).concepts == ("C0032326",)
    bare = client.annotate(text, options=ExtractOptions(include_mentions=False))
    assert bare.mentions == () and len(bare.concepts) == 3
    excluded = ExtractOptions(exclude_cuis=("C0040405",))
    assert "C0040405" not in client.annotate(text, options=excluded).concepts
    approx = ExtractOptions(mode="approximate", threshold=0.6)
    assert "C0032326" in client.annotate("pneumothorx seen", options=approx).concepts


def test_server_stream_answers_in_order_with_ids(client: ConceptClient) -> None:
    results = list(client.annotate_stream(CAPTIONS))
    assert [r.id for r in results] == [i for i, _ in CAPTIONS]
    assert all(r.ok for r in results)
    by_id = {r.id: r.annotation for r in results}
    assert by_id["r5"] is not None and by_id["r5"].concepts == ()
    assert by_id["r3"] is not None and set(by_id["r3"].concepts) == {
        "C0040405", "C0817096", "C0032326"
    }
    # Same results as unary calls, item by item.
    for i, text in CAPTIONS:
        assert client.annotate(text).concepts == by_id[i].concepts  # type: ignore[union-attr]


def test_server_get_concept_with_synonyms(client: ConceptClient) -> None:
    c = client.get_concept("C0032326", synonyms=True)
    assert c.preferred_name == "Pneumothorax"
    assert [(t.tui, t.group, t.group_name) for t in c.semantic_types] == [
        ("T047", "DISO", "Disorders")
    ]
    assert c.sources == ("MSH", "SNOMEDCT_US")
    assert {(s.string, s.source) for s in c.synonyms} == {
        ("pneumothorax", "MSH"), ("collapsed lung", "SNOMEDCT_US")
    }
    assert client.get_concept("C0032326").synonyms == ()
    assert client.get_concept("C0040405", synonyms=True).synonyms[1].abbreviation


def test_server_search_ranks_exact_before_approximate(client: ConceptClient) -> None:
    exact = client.search("pneumothorax")
    assert exact[0].cui == "C0032326" and exact[0].score == 1.0
    fuzzy = client.search("pneumothorx", options=ExtractOptions(threshold=0.5))
    assert fuzzy and fuzzy[0].cui == "C0032326" and fuzzy[0].score < 1.0
    assert len(client.search("lung", limit=1)) == 1


def test_server_list_semantic_types_and_info(client: ConceptClient, index_a: Path) -> None:
    cat = client.list_semantic_types()
    assert len(cat.types) == 127 and len(cat.groups) == 15
    assert {g.code for g in cat.groups} >= {"DISO", "ANAT", "PROC"}
    info = client.get_info()
    idx = ConceptIndex.load(index_a)
    assert info.index.content_hash == idx.content_hash
    assert info.index.source_release == "test-A" and info.index.concepts == 7
    assert info.index.manifest["content_hash"] == idx.content_hash
    assert info.default_options == ExtractOptions()
    assert info.limits.max_text_chars == 100_000
    assert info.limits.max_option_items == 10_000
    assert "none" in info.profiles and info.api_version == "v1"


def test_server_max_connection_age_makes_clients_reconnect_and_lets_calls_finish(
    index_a: Path,
) -> None:
    """``max_connection_age_seconds``: the server closes a client's connection (GOAWAY) after
    about that long, so the client's next call opens a new one (after resolving the name
    again: how a long run reaches replicas added since it started), and a call in progress
    at the age finishes within the grace. Off (0, the default): one connection throughout."""

    def watch(port: int) -> tuple[grpc.Channel, list[str]]:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        states: list[str] = []
        channel.subscribe(lambda s: states.append(s.name), try_to_connect=True)
        return channel, states

    def slow_items() -> Iterator[pb.AnnotateRequest]:
        for i in range(3):  # 1.2 s: past the 0.5 s age (± a tenth), within the 5 s grace
            yield pb.AnnotateRequest(id=str(i), text="Chest CT")
            time.sleep(0.4)

    s = settings_for(index_a, max_connection_age_seconds=0.5, max_connection_age_grace_seconds=5)
    with running_server(s) as (_, port):
        channel, states = watch(port)
        stub = pb_grpc.ConceptServiceStub(channel)
        out = list(stub.AnnotateStream(slow_items(), timeout=30))
        assert [(r.id, r.status.code) for r in out] == [(str(i), 0) for i in range(3)]
        assert len(out[0].concepts) == 2 and all(r.concepts == out[0].concepts for r in out)
        deadline = time.monotonic() + 10
        while "IDLE" not in states[states.index("READY"):] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "IDLE" in states[states.index("READY"):], states  # the server closed it
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).api_version == "v1"
        assert states.count("READY") == 2, states  # a second connection
        channel.close()

    with running_server(settings_for(index_a)) as (_, port):
        channel, states = watch(port)
        stub = pb_grpc.ConceptServiceStub(channel)
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).api_version == "v1"
        time.sleep(1.5)
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).api_version == "v1"
        assert states.count("READY") == 1 and "IDLE" not in states[states.index("READY"):], states
        channel.close()


def test_server_defaults_come_from_settings(index_a: Path) -> None:
    s = settings_for(index_a, defaults={"semantic_groups": "DISO", "include_negated": False})
    with running_server(s) as (_, port), ConceptClient(f"127.0.0.1:{port}") as c:
        assert c.get_info().default_options.semantic_groups == ("DISO",)
        assert c.annotate("Chest CT shows a right pneumothorax.").concepts == ("C0032326",)
        assert c.annotate("No pneumothorax.").concepts == ()
        # An explicit empty list lifts the server's default restriction.
        stub = pb_grpc.ConceptServiceStub(_channel(port))
        opts = pb.AnnotateOptions(semantic_groups=pb.NameList(values=[]))
        resp = stub.Annotate(pb.AnnotateRequest(text="Chest CT", options=opts), timeout=5)
        assert list(resp.concepts) == ["C0817096", "C0040405"]


# -- error statuses ----------------------------------------------------------------------------
def test_server_invalid_argument_for_bad_options(client: ConceptClient) -> None:
    for opts, fragment in [
        (ExtractOptions(semantic_types=("T999",)), "unknown semantic type"),
        (ExtractOptions(semantic_groups=("NOPE",)), "unknown semantic type or group"),
        (ExtractOptions(sources=("ICD99",)), "unknown source"),
        (ExtractOptions(threshold=1.5), "threshold"),
        (ExtractOptions(profile="no-such-profile"), "profile"),
    ]:
        with pytest.raises(ServiceCallError) as err:
            client.annotate("chest", options=opts)
        assert err.value.status == "INVALID_ARGUMENT"
        assert fragment in err.value.details


def test_server_invalid_argument_for_unknown_enum_and_empty_fields(
    served: tuple[Any, int], client: ConceptClient
) -> None:
    stub = pb_grpc.ConceptServiceStub(_channel(served[1]))
    req = pb.AnnotateRequest(text="chest")
    req.options.mode = 7  # a value from a future API version
    with pytest.raises(grpc.RpcError) as err:
        stub.Annotate(req, timeout=5)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "mode enum value 7" in (err.value.details() or "")
    assert _status(client.get_concept, "") == "INVALID_ARGUMENT"
    assert _status(client.search, "  ") == "INVALID_ARGUMENT"
    assert _status(client.search, "lung", limit=1000) == "INVALID_ARGUMENT"


def test_server_not_found_for_unknown_cui(client: ConceptClient) -> None:
    with pytest.raises(ServiceCallError) as err:
        client.get_concept("C9999999")
    assert err.value.status == "NOT_FOUND" and "C9999999" in err.value.details


def test_server_per_item_errors_do_not_end_the_stream(client: ConceptClient, index_a: Path) -> None:
    items = [
        ("ok1", "Chest CT"),
        ("", "missing id"),
        ("big", "x" * 100_001),
        ("ok2", "pneumothorax"),
    ]
    results = list(client.annotate_stream(items))
    assert [r.id for r in results] == ["ok1", "", "big", "ok2"]
    assert results[0].ok and results[3].ok
    assert results[1].error is not None and results[1].error.status == "INVALID_ARGUMENT"
    assert "non-empty id" in results[1].error.message
    assert results[2].error is not None and results[2].error.status == "RESOURCE_EXHAUSTED"
    assert results[2].error.error_code == "E501"
    assert results[3].annotation is not None and results[3].annotation.concepts == ("C0032326",)
    # Bad options on one item of a raw stream: that item fails, its neighbours do not.
    with running_server(settings_for(index_a)) as (_, port):
        stub = pb_grpc.ConceptServiceStub(_channel(port))
        bad = pb.AnnotateOptions(semantic_types=pb.NameList(values=["dsny"]))
        reqs = [
            pb.AnnotateRequest(id="a", text="lung"),
            pb.AnnotateRequest(id="b", text="lung", options=bad),
            pb.AnnotateRequest(id="c", text="heart"),
        ]
        out = list(stub.AnnotateStream(iter(reqs), timeout=10))
        assert [(r.id, r.status.code) for r in out] == [
            ("a", 0), ("b", grpc.StatusCode.INVALID_ARGUMENT.value[0]), ("c", 0)
        ]
        assert "Did you mean" in out[1].status.message and out[1].status.error_code == "E300"


def test_server_size_limits(index_a: Path) -> None:
    s = settings_for(index_a, max_text_chars=1000, max_message_bytes=64 * 1024)
    with running_server(s) as (_, port), ConceptClient(f"127.0.0.1:{port}") as c:
        assert c.annotate("lung " * 190).concepts == ("C0024109",)
        with pytest.raises(ServiceCallError) as err:
            c.annotate("lung " * 300)
        assert err.value.status == "RESOURCE_EXHAUSTED" and "max_text_chars" in err.value.details
        # Over the message limit: refused by gRPC before any handler runs.
        with pytest.raises(ServiceCallError) as err:
            c.annotate("y" * 100_000)
        assert err.value.status == "RESOURCE_EXHAUSTED"
        assert _status(c.search, "q" * 2000) == "RESOURCE_EXHAUSTED"
        assert c.get_info().limits.max_message_bytes == 64 * 1024


def test_server_reply_over_the_message_limit_fails_only_its_item(
    index_a: Path, shared_redis: RedisServer
) -> None:
    """A caption whose annotation is over max_message_bytes (the request is not) gets
    RESOURCE_EXHAUSTED in its own response and the stream goes on; gRPC alone would fail the
    whole call and every later item with it. Checked fresh from the engine with and without
    a cache, and read back from a Redis that a server with a larger limit filled."""
    big = "lung " * 3000  # 15 KB of text, about 150 KB of annotation
    items = [("ok1", "Chest CT"), ("big", big), ("ok2", "pneumothorax")]
    redis_cfg = {"redis_url": shared_redis.url, "redis_prefix": "reply-limit:", "cache_size": 0}
    with running_server(settings_for(index_a, **redis_cfg)) as (_, port):
        with ConceptClient(f"127.0.0.1:{port}") as c:
            assert len(c.annotate(big).mentions) == 3000  # now in Redis
    limit = 64 * 1024
    for cfg in ({"cache_size": 0}, {}, redis_cfg):
        s = settings_for(index_a, max_message_bytes=limit, **cfg)
        with running_server(s) as (server, port), ConceptClient(f"127.0.0.1:{port}") as c:
            results = list(c.annotate_stream(items))
            assert [r.id for r in results] == ["ok1", "big", "ok2"], cfg
            assert results[0].ok and results[2].ok, cfg
            err = results[1].error
            assert err is not None and err.status == "RESOURCE_EXHAUSTED", cfg
            assert err.error_code == "E501"
            assert f"over the server's message limit of {limit}" in err.message
            with pytest.raises(ServiceCallError) as exc:
                c.annotate(big)
            assert exc.value.status == "RESOURCE_EXHAUSTED"
            assert "max_message_bytes" in exc.value.details
            from_redis = server.metrics.value(
                "conceptsvc_cache_lookups_total", {"tier": "redis", "result": "hit"}
            )
            assert from_redis == (2 if cfg is redis_cfg else 0), cfg


def test_server_too_many_concurrent_rpcs_is_resource_exhausted(index_a: Path) -> None:
    s = settings_for(index_a, max_concurrent_rpcs=1, threads=4)
    with running_server(s) as (_, port):
        gate = threading.Event()

        def slow_items() -> Iterator[pb.AnnotateRequest]:
            yield pb.AnnotateRequest(id="1", text="lung")
            gate.wait(10)

        stub = pb_grpc.ConceptServiceStub(_channel(port))
        held = stub.AnnotateStream(slow_items(), timeout=10)
        assert next(held).id == "1"  # the one allowed RPC is now in progress
        with pytest.raises(grpc.RpcError) as err:
            stub.Annotate(pb.AnnotateRequest(text="lung"), timeout=5)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.set()
        assert list(held) == []


def test_server_deadline_stops_stream_work(index_a: Path) -> None:
    with running_server(settings_for(index_a)) as (server, port):
        sent = []

        def slow() -> Iterator[pb.AnnotateRequest]:
            for i in range(40):
                sent.append(i)
                yield pb.AnnotateRequest(id=str(i), text="lung")
                time.sleep(0.05)

        stub = pb_grpc.ConceptServiceStub(_channel(port))
        got = []
        with pytest.raises(grpc.RpcError) as err:
            for r in stub.AnnotateStream(slow(), timeout=0.5):
                got.append(r.id)
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0 < len(got) < 40
        # The handler stops promptly: nothing in flight, no more captions annotated.
        deadline = time.monotonic() + 3
        while server.metrics.value("conceptsvc_inflight_requests") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.metrics.value("conceptsvc_inflight_requests") == 0
        done = server.metrics.value("conceptsvc_captions_annotated_total", {"source": "engine"})
        time.sleep(0.3)
        assert server.metrics.value(
            "conceptsvc_captions_annotated_total", {"source": "engine"}
        ) == done
        assert done < 40
        # An already-expired unary deadline fails without being sent or served. (A deadline of
        # 1 µs was not always expired when the client checked it; gRPC then rounded it up to
        # 1 ms and a fast server answered OK.)
        def annotate_calls() -> float:  # Annotate RPCs the server saw, whatever their status
            return sum(
                sample.value
                for metric in server.metrics.registry.collect()
                for sample in metric.samples
                if sample.name == "conceptsvc_requests_total"
                and sample.labels.get("method") == "Annotate"
            )

        with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
            assert c.annotate("lung").concepts == ("C0024109",)  # the count sees a call
        seen = annotate_calls()
        assert seen >= 1
        c = ConceptClient(f"127.0.0.1:{port}", timeout=0.0, retries=0)
        assert _status(c.annotate, "lung") == "DEADLINE_EXCEEDED"
        c.close()
        assert annotate_calls() == seen


# -- health, draining and reload ---------------------------------------------------------------
def _health(port: int, service: str = "") -> str:
    stub = health_pb2_grpc.HealthStub(_channel(port))
    resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def test_server_health_not_serving_until_loaded(index_a: Path) -> None:
    with running_server(settings_for(index_a), load=False) as (server, port):
        assert _health(port) == "NOT_SERVING"
        assert _health(port, "conceptsvc.v1.ConceptService") == "NOT_SERVING"
        with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
            # UNAVAILABLE (transient, retried by clients), not FAILED_PRECONDITION
            assert _status(c.annotate, "lung") == "UNAVAILABLE"
            assert _status(c.get_info) == "UNAVAILABLE"
            outcome = server.reload()
            assert outcome.changed and outcome.previous_content_hash == ""
            assert _health(port) == "SERVING"
            assert c.annotate("lung").concepts == ("C0024109",)


def test_server_drain_refuses_new_rpcs_and_finishes_in_flight(index_a: Path) -> None:
    s = settings_for(index_a, drain_delay_seconds=0.6, grace_seconds=5)
    server, port = create_server(s)
    server.start()
    stub = pb_grpc.ConceptServiceStub(_channel(port))
    release = threading.Event()

    def items() -> Iterator[pb.AnnotateRequest]:
        yield pb.AnnotateRequest(id="before", text="lung")
        release.wait(10)
        yield pb.AnnotateRequest(id="after", text="heart")

    in_flight = stub.AnnotateStream(items(), timeout=10)
    assert next(in_flight).id == "before"
    drainer = threading.Thread(target=server.drain)
    t0 = time.monotonic()
    drainer.start()
    time.sleep(0.2)
    # inside the drain delay: health says NOT_SERVING, RPCs are still answered (load balancers
    # and clients are still noticing that this endpoint goes away)
    assert _health(port) == "NOT_SERVING"
    assert stub.Annotate(pb.AnnotateRequest(text="lung"), timeout=5).concepts
    assert not server.state.draining and time.monotonic() - t0 < 0.6
    while not server.state.draining:  # after it: refused
        assert time.monotonic() - t0 < 5
        time.sleep(0.01)
    assert time.monotonic() - t0 >= 0.6
    with pytest.raises(grpc.RpcError) as err:
        stub.Annotate(pb.AnnotateRequest(text="lung"), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (err.value.details() or "")
    release.set()
    # The in-flight stream ends with UNAVAILABLE and nothing unanswered: its client resends
    # the rest elsewhere (the item that was sent during the drain is answered first).
    rest = []
    with pytest.raises(grpc.RpcError) as err:
        for r in in_flight:
            rest.append(r.id)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert rest in ([], ["after"])
    drainer.join(10)
    assert not drainer.is_alive()
    with pytest.raises(grpc.RpcError):
        stub.Annotate(pb.AnnotateRequest(text="lung"), timeout=1)


class _GatedExtractor(Extractor):
    """The real engine, held at the start of ``extract_rows`` (what the server calls) until the
    test opens the gate: a call is then known to be in flight (not merely slow) for as long as
    the test needs."""

    def __init__(self, index: ConceptIndex) -> None:
        super().__init__(index)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def extract_rows(
        self, text: str, options: ExtractOptions | None = None
    ) -> MentionRows:
        self.entered.set()
        self.gate.wait(20)
        return super().extract_rows(text, options)


class _GatedSlowExtractor(_GatedExtractor):
    """:class:`_GatedExtractor`, 0.2 s slower a caption once through the gate."""

    def extract_rows(
        self, text: str, options: ExtractOptions | None = None
    ) -> MentionRows:
        rows = super().extract_rows(text, options)
        time.sleep(0.2)
        return rows


def _recorded(server: Any, method: str) -> dict[str, float]:
    """The calls of ``method`` the server's metrics hold, by status, once it has recorded one
    (waiting for the handler to end: up to 30 s)."""
    def codes() -> dict[str, float]:
        return {
            sample.labels["code"]: sample.value
            for metric in server.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "conceptsvc_requests_total"
            and sample.labels.get("method") == method and sample.value
        }

    until = time.monotonic() + 30
    while not codes() and time.monotonic() < until:
        time.sleep(0.02)
    return codes()


@pytest.mark.parametrize("method", ["Annotate", "AnnotateBatch"])
def test_server_work_stops_when_the_client_goes_and_is_recorded_as_such(
    index_a: Path, method: str
) -> None:
    """A client that gives up (deadline, cancel) while its call is being answered: a batch
    starts no caption after that (the one held in the engine is finished), and the call is
    recorded with the status that ended it. Before, a batch without a deadline annotated
    every caption for nobody (9.8 s of CPU for 120 KB), and both were recorded OK. (A stream
    checks between items the same way; it already stopped between its batches.) The server
    learns of a cancel a moment after the client: the captions after the first take 0.2 s
    each, so a few may start meanwhile."""
    extractor = _GatedSlowExtractor(ConceptIndex.load(index_a))
    with running_server(settings_for(index_a, cache_size=0), extractor=extractor) as (
        server, port,
    ):
        stub = pb_grpc.ConceptServiceStub(_channel(port))
        items = [pb.AnnotateRequest(id=str(i), text=f"lung {i}") for i in range(20)]
        if method == "Annotate":  # its deadline passes while the engine holds the caption
            call = stub.Annotate.future(items[0], timeout=0.5)
            assert extractor.entered.wait(20)
            assert call.exception(20).code() is grpc.StatusCode.DEADLINE_EXCEEDED
            expected = "DEADLINE_EXCEEDED"
        else:  # no deadline: cancelled
            call = stub.AnnotateBatch.future(pb.AnnotateBatchRequest(items=items))
            assert extractor.entered.wait(20)
            call.cancel()
            expected = "CANCELLED"
        extractor.gate.set()
        assert _recorded(server, method) == {expected: 1}
        done = server.metrics.value("conceptsvc_captions_annotated_total", {"source": "engine"})
        assert 1 <= done < len(items) / 2
        # the server goes on answering
        assert list(stub.Annotate(pb.AnnotateRequest(text="lung"), timeout=10).concepts)


def _start_drain(server: Any) -> threading.Thread:
    """``server.drain()`` in a thread of its own, returned once the drain has begun."""
    drainer = threading.Thread(target=server.drain)
    drainer.start()
    deadline = time.monotonic() + 5
    while not server.state.draining:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return drainer


def test_server_drain_lets_in_flight_unary_finish(index_a: Path) -> None:
    extractor = _GatedExtractor(ConceptIndex.load(index_a))
    s = settings_for(index_a, grace_seconds=5)
    with running_server(s, extractor=extractor) as (server, port):
        results: list[Any] = []
        errors: list[BaseException] = []

        def call() -> None:
            try:
                with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
                    results.append(c.annotate("lung").concepts)
            except BaseException as exc:
                errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        assert extractor.entered.wait(10)
        drainer = _start_drain(server)
        # The drain has begun while the call is inside the engine, and waits for it.
        assert server.metrics.value("conceptsvc_inflight_requests") == 1
        drainer.join(0.5)
        assert drainer.is_alive()
        extractor.gate.set()
        caller.join(10)
        drainer.join(10)
        assert not drainer.is_alive()
        assert errors == []
        assert results == [("C0024109",)]
        assert server.metrics.value("conceptsvc_inflight_requests") == 0


def test_server_drain_answers_new_calls_until_in_flight_ones_end(index_a: Path) -> None:
    """While a call is in flight, a draining server still takes new calls and answers each,
    on a connection already up or a new one, with UNAVAILABLE "shutting down" — what clients
    retry elsewhere — including when every admitted slot is held (not RESOURCE_EXHAUSTED);
    stopping gRPC at once instead could end such a call CANCELLED. The drain ends as soon as
    the in-flight call does, well inside the grace."""
    extractor = _GatedExtractor(ConceptIndex.load(index_a))
    s = settings_for(index_a, grace_seconds=30, max_concurrent_rpcs=1)
    with running_server(s, extractor=extractor) as (server, port):
        results: list[Any] = []

        def call() -> None:
            with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
                results.append(c.annotate("lung").concepts)

        caller = threading.Thread(target=call)
        caller.start()
        assert extractor.entered.wait(10)
        up = ConceptClient(f"127.0.0.1:{port}", retries=0, timeout=5)
        with up:
            assert _status(up.annotate, "heart") == "RESOURCE_EXHAUSTED"  # the one slot held
            drainer = _start_drain(server)
            for _ in range(3):
                with ConceptClient(f"127.0.0.1:{port}", retries=0, timeout=5) as new:
                    for c in (up, new):
                        with pytest.raises(ServiceCallError) as err:
                            c.annotate("heart")
                        assert err.value.status == "UNAVAILABLE"
                        assert "shutting down" in str(err.value)
                time.sleep(0.1)
            assert drainer.is_alive()  # still waiting for the call in the engine
            t0 = time.monotonic()
            extractor.gate.set()
            caller.join(10)
            drainer.join(10)
            assert not drainer.is_alive()
            assert time.monotonic() - t0 < 5  # not the 30 s grace
        assert results == [("C0024109",)]


def test_server_reload_under_load_without_failed_requests(
    tmp_path: Path, index_a: Path
) -> None:
    path = build_index_a(tmp_path / "live-index")
    s = settings_for(path, admin_token=ADMIN, threads=16)
    errors: list[BaseException] = []
    counts = {"unary": 0, "stream": 0}
    stop = threading.Event()
    with running_server(s) as (server, port):
        target = f"127.0.0.1:{port}"

        def unary_load() -> None:
            with ConceptClient(target, retries=0) as c:
                while not stop.is_set():
                    try:
                        c.annotate("Chest CT: pneumothorax and edema")
                        counts["unary"] += 1
                    except BaseException as exc:
                        errors.append(exc)

        def stream_load() -> None:
            with ConceptClient(target, retries=0) as c:
                while not stop.is_set():
                    try:
                        items = ((str(i), f"lung {i} heart") for i in range(50))
                        for r in c.annotate_stream(items):
                            if not r.ok:
                                errors.append(AssertionError(r.error))
                            counts["stream"] += 1
                    except BaseException as exc:
                        errors.append(exc)

        # A stream opened on index A stays on A to its end: its second item is sent while B
        # is loaded (where "edema" is a concept) and must still be answered from A.
        gate = threading.Event()
        first_answered = threading.Event()
        old_results: list[Any] = []

        def pinned_items() -> Iterator[tuple[str, str]]:
            yield "p1", "edema"
            gate.wait(20)
            yield "p2", "edema"

        def pinned() -> None:
            with ConceptClient(target, retries=0) as c:
                for r in c.annotate_stream(pinned_items()):
                    old_results.append(r)
                    first_answered.set()

        workers = [threading.Thread(target=f) for f in (unary_load, unary_load, stream_load)]
        pin = threading.Thread(target=pinned)
        for w in [*workers, pin]:
            w.start()
        try:
            time.sleep(0.4)
            assert first_answered.wait(10)  # the pinned stream is open on index A
            with ConceptClient(target, admin_token=ADMIN) as admin:
                assert admin.annotate("edema").concepts == ()
                build_index_b(path)  # replaces the directory atomically, like a deployment
                result = admin.reload_index()
                assert result.changed and result.concepts == 8
                assert admin.annotate("edema").concepts == ("C0013604",)
                fresh = list(admin.annotate_stream([("n1", "edema")]))
                assert [r.annotation.concepts for r in fresh] == [("C0013604",)]
                gate.set()  # while B is loaded
                pin.join(20)
                assert not pin.is_alive()
                assert [r.id for r in old_results] == ["p1", "p2"]
                assert [r.annotation.concepts for r in old_results] == [(), ()]
                again = admin.reload_index()
                assert not again.changed and again.content_hash == result.content_hash
                time.sleep(0.3)
                build_index_a(path)
                server.reload()  # what SIGHUP does
                assert admin.annotate("edema").concepts == ()
            time.sleep(0.4)
        finally:  # a failed assertion must not leave the load running
            gate.set()
            stop.set()
            for w in [*workers, pin]:
                w.join(30)
    assert errors == []
    assert counts["unary"] > 20 and counts["stream"] > 50


def test_server_calls_before_the_index_is_loaded_are_retried_until_it_is(index_a: Path) -> None:
    """A server that is still loading answers UNAVAILABLE, which clients retry with backoff: a
    call made before the load is answered once the index is in (a replacement server coming up
    on the port while a drained batch is resent takes this path)."""
    with running_server(settings_for(index_a), load=False) as (server, port):
        results: list[Any] = []
        with ConceptClient(f"127.0.0.1:{port}", retries=20, backoff=0.05, backoff_max=0.2) as c:
            caller = threading.Thread(
                target=lambda: results.append(c.annotate_batch([("1", "lung")]))
            )
            caller.start()
            deadline = time.monotonic() + 10
            while server.metrics.value(
                "conceptsvc_requests_total", {"method": "AnnotateBatch", "code": "UNAVAILABLE"}
            ) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the call has been refused at least once
            server.reload()
            caller.join(20)
        assert results and [r.annotation.concepts for r in results[0]] == [("C0024109",)]
        assert server.metrics.value(
            "conceptsvc_requests_total", {"method": "AnnotateBatch", "code": "UNAVAILABLE"}
        ) >= 1


def test_server_failed_reload_keeps_serving_the_old_index(tmp_path: Path) -> None:
    path = build_index_a(tmp_path / "idx")
    with running_server(settings_for(path, admin_token=ADMIN)) as (_, port):
        (path / "keys.txt").write_text("tampered")
        manifest = (path / "manifest.json").read_text()
        (path / "manifest.json").write_text(manifest.replace('"test-A"', '"test-X"').replace(
            '"content_hash": "', '"content_hash": "0'))
        with ConceptClient(f"127.0.0.1:{port}", admin_token=ADMIN) as c:
            with pytest.raises(ServiceCallError) as err:
                c.reload_index()
            assert err.value.status == "FAILED_PRECONDITION"
            assert c.annotate("lung").concepts == ("C0024109",)
            assert c.health() == "SERVING"


def test_server_reload_of_the_same_manifest_checks_the_files(tmp_path: Path) -> None:
    """A reload that finds the served index's manifest still in place does not load it again,
    but checks its files: one changed in place fails the reload (it said "nothing to do" and
    changed=False, and only a restart found the corruption)."""
    path = build_index_a(tmp_path / "idx")
    with running_server(settings_for(path, admin_token=ADMIN)) as (_, port):
        with ConceptClient(f"127.0.0.1:{port}", admin_token=ADMIN) as c:
            assert c.reload_index().changed is False  # whole: nothing to do
            # one byte changed in place, the size kept (the server maps the file: a truncated
            # mapping would fault on its next read)
            victim = path / "cuis.bin"
            data = bytearray(victim.read_bytes())
            data[-1] ^= 0xFF
            with victim.open("r+b") as fh:
                fh.write(data)
            with pytest.raises(ServiceCallError) as err:
                c.reload_index()
            assert err.value.status == "FAILED_PRECONDITION"
            assert "content hash mismatch" in (err.value.details or ""), err.value.details


# -- reflection --------------------------------------------------------------------------------
def _reflected_services(port: int) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(_channel(port))
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    resp = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=5)))
    return sorted(s.name for s in resp.list_services_response.service)


def test_server_reflection_lists_the_service_and_can_be_off(index_a: Path) -> None:
    with running_server(settings_for(index_a)) as (_, port):
        names = _reflected_services(port)
        assert "conceptsvc.v1.ConceptService" in names
        assert "conceptsvc.v1.AdminService" in names and "grpc.health.v1.Health" in names
    with running_server(settings_for(index_a, reflection=False)) as (_, port):
        with pytest.raises(grpc.RpcError) as err:
            _reflected_services(port)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


# -- Redis failing mid-stream ------------------------------------------------------------------
def test_server_redis_killed_and_restarted_during_a_stream(
    index_a: Path, redis_server: RedisServer
) -> None:
    texts = [f"case {i}: chest CT with pneumothorax" if i % 3 else f"lung {i}" for i in range(600)]
    s = settings_for(
        index_a, redis_url=redis_server.url, cache_size=0, redis_backoff_seconds=0.05,
        redis_backoff_max_seconds=0.2, stream_batch_size=16,
    )
    with running_server(s) as (_, port):  # reference results, Redis up all the time
        with ConceptClient(f"127.0.0.1:{port}", retries=0) as c:
            expected = [r.annotation for r in c.annotate_stream(enumerate_items(texts))]
    redis.Redis.from_url(redis_server.url).flushall()
    with running_server(s) as (server, port), ConceptClient(f"127.0.0.1:{port}", retries=0) as c:

        def items() -> Iterator[tuple[str, str]]:
            for i, text in enumerate_items(texts):
                if i == "100":
                    redis_server.stop()
                elif i == "300":
                    redis_server.start()
                    time.sleep(0.3)  # let the backoff window pass
                yield i, text

        results = list(c.annotate_stream(items()))
        assert all(r.ok for r in results)
        assert [r.annotation for r in results] == expected
        assert server.metrics.value("conceptsvc_redis_errors_total") >= 1
        written_after = server.metrics.value(
            "conceptsvc_cache_lookups_total", {"tier": "redis", "result": "miss"}
        )
        assert written_after > 0
        # After the restart, results reached Redis again.
        r = redis.Redis.from_url(redis_server.url)
        assert len(r.keys("conceptsvc:*")) > 100
        # And a second pass is served from Redis.
        again = list(c.annotate_stream(enumerate_items(texts[400:])))
        assert all(x.cached for x in again)


def enumerate_items(texts: list[str]) -> Iterator[tuple[str, str]]:
    return ((str(i), t) for i, t in enumerate(texts))


def test_server_memory_cache_answers_repeats(index_a: Path) -> None:
    with running_server(settings_for(index_a)) as (server, port):
        stub = pb_grpc.ConceptServiceStub(_channel(port))
        first = stub.Annotate(pb.AnnotateRequest(id="1", text="Chest CT"), timeout=5)
        second = stub.Annotate(pb.AnnotateRequest(id="2", text="Chest CT"), timeout=5)
        assert not first.cached and second.cached and second.id == "2"
        assert list(first.mentions) == list(second.mentions)
        other = pb.AnnotateOptions(include_mentions=False)  # other options: another key
        third = stub.Annotate(pb.AnnotateRequest(text="Chest CT", options=other), timeout=5)
        assert not third.cached and not third.mentions
        m = server.metrics
        assert m.value("conceptsvc_cache_lookups_total", {"tier": "memory", "result": "hit"}) == 1
        assert m.value("conceptsvc_captions_annotated_total", {"source": "cache"}) == 1


def test_server_damaged_cache_entry_is_a_miss_and_replaced(
    index_a: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry that does not parse as an answer is ignored (answered by the engine, not
    cached) and overwritten, on the unary path (``_answer_one``) as on the batched one."""
    with running_server(settings_for(index_a)) as (server, port):
        loaded = server.state.current
        assert loaded is not None and server.cache.enabled
        stub = pb_grpc.ConceptServiceStub(_channel(port))

        def damage(text: str) -> str:
            [key] = result_keys(loaded.content_hash, loaded.defaults.cache_key(), [text])
            server.cache.put_many([(key, b"\xff\xff\xff")])
            return key

        key = damage("Chest CT")
        with caplog.at_level(logging.WARNING, logger="conceptsvc.server.servicer"):
            fresh = stub.Annotate(pb.AnnotateRequest(id="1", text="Chest CT"), timeout=5)
        assert not fresh.cached and fresh.mentions
        assert any(key in r.getMessage() for r in caplog.records)
        again = stub.Annotate(pb.AnnotateRequest(id="2", text="Chest CT"), timeout=5)
        assert again.cached and list(again.mentions) == list(fresh.mentions)

        damage("lung")
        items = [pb.AnnotateRequest(id="a", text="lung"), pb.AnnotateRequest(id="b", text="lung")]
        reply = stub.AnnotateBatch(pb.AnnotateBatchRequest(items=items), timeout=5)
        assert [r.cached for r in reply.items] == [False, False]
        second = stub.Annotate(pb.AnnotateRequest(text="lung"), timeout=5)
        assert second.cached and second.mentions[0].cui == "C0024109"


# -- TLS and tokens ----------------------------------------------------------------------------
def test_server_tls_and_mutual_tls(tmp_path: Path, index_a: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    s = settings_for(index_a, tls_cert=pki.server_cert, tls_key=pki.server_key)
    with running_server(s) as (_, port):
        with ConceptClient(f"localhost:{port}", ca_cert=pki.ca) as c:
            assert c.annotate("lung").concepts == ("C0024109",)
        with ConceptClient(f"127.0.0.1:{port}", ca_cert=pki.ca, retries=0, timeout=3) as c:
            assert c.health() == "SERVING"  # the IP is in the certificate too
        with ConceptClient(f"localhost:{port}", retries=0, timeout=3) as c:  # plaintext
            assert _status(c.annotate, "lung") == "UNAVAILABLE"
        with ConceptClient(f"localhost:{port}", ca_cert=pki.other_ca, retries=0, timeout=3) as c:
            assert _status(c.annotate, "lung") == "UNAVAILABLE"  # untrusted server
    s = settings_for(
        index_a, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    with running_server(s) as (_, port):
        with ConceptClient(
            f"localhost:{port}", ca_cert=pki.ca, client_cert=pki.client_cert,
            client_key=pki.client_key,
        ) as c:
            assert c.annotate("lung").concepts == ("C0024109",)
        with ConceptClient(f"localhost:{port}", ca_cert=pki.ca, retries=0, timeout=3) as c:
            assert _status(c.annotate, "lung") == "UNAVAILABLE"  # no client certificate


def test_server_token_auth_accepts_and_rejects(index_a: Path) -> None:
    s = settings_for(index_a, auth_token=TOKEN, admin_token=ADMIN)
    with running_server(s) as (server, port):
        t = f"127.0.0.1:{port}"
        with ConceptClient(t, token=TOKEN) as c:
            assert c.annotate("lung").concepts == ("C0024109",)
            assert len(list(c.annotate_stream([("1", "lung")]))) == 1
            assert _status(c.reload_index) == "PERMISSION_DENIED"  # user token, admin RPC
        with ConceptClient(t, token=ADMIN) as c:  # the admin token works everywhere
            assert c.get_concept("C0024109").preferred_name == "Lung"
        with ConceptClient(t, token=TOKEN, admin_token=ADMIN) as c:
            assert c.reload_index().changed is False
        with ConceptClient(t) as c:
            assert _status(c.annotate, "lung") == "UNAUTHENTICATED"
            with pytest.raises(ServiceCallError) as err:
                list(c.annotate_stream([("1", "lung")]))
            assert err.value.status == "UNAUTHENTICATED"
            assert _status(c.reload_index) == "UNAUTHENTICATED"
            assert c.health() == "SERVING"  # probes need no token
        with ConceptClient(t, token="x" * len(TOKEN)) as c:
            assert _status(c.get_info) == "UNAUTHENTICATED"
        stub = pb_grpc.ConceptServiceStub(_channel(port))
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInfo(pb.GetInfoRequest(), metadata=[("authorization", TOKEN)], timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED  # scheme missing
        assert server.metrics.value(
            "conceptsvc_requests_total", {"method": "Annotate", "code": "UNAUTHENTICATED"}
        ) == 1


def test_server_admin_rpc_disabled_without_admin_token(index_a: Path) -> None:
    with running_server(settings_for(index_a, auth_token=TOKEN)) as (_, port):
        with ConceptClient(f"127.0.0.1:{port}", token=TOKEN, admin_token=TOKEN) as c:
            with pytest.raises(ServiceCallError) as err:
                c.reload_index()
            assert err.value.status == "PERMISSION_DENIED" and "disabled" in err.value.details


# -- observability -----------------------------------------------------------------------------
def test_server_metrics_count_rpcs_and_serve_over_http(index_a: Path) -> None:
    with running_server(settings_for(index_a)) as (server, port):
        with ConceptClient(f"127.0.0.1:{port}") as c:
            c.annotate("lung")
            list(c.annotate_stream([("1", "heart"), ("", "bad")]))
            _status(c.get_concept, "C9999999")
        m = server.metrics
        assert m.value("conceptsvc_requests_total", {"method": "Annotate", "code": "OK"}) == 1
        assert m.value("conceptsvc_requests_total", {"method": "AnnotateStream", "code": "OK"}) == 1
        assert m.value(
            "conceptsvc_requests_total", {"method": "GetConcept", "code": "NOT_FOUND"}
        ) == 1
        assert m.value(
            "conceptsvc_request_duration_seconds_count", {"method": "Annotate", "code": "OK"}
        ) == 1
        assert m.value("conceptsvc_stream_item_errors_total", {"code": "INVALID_ARGUMENT"}) == 1
        assert m.value("conceptsvc_captions_annotated_total", {"source": "engine"}) == 2
        assert m.value("conceptsvc_index_concepts") == 7
        http, _, mport = start_metrics_http_server(0, "127.0.0.1", m.registry)
        try:
            text = _scrape(mport)
        finally:
            http.shutdown()
            http.server_close()
        assert 'conceptsvc_requests_total{code="OK",method="Annotate"} 1.0' in text
        assert "conceptsvc_cache_lookups_total" in text and "conceptsvc_index_keys" in text


def test_server_caption_text_never_logged_unless_enabled(
    index_a: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Patient John Doe chest pneumothorax"
    for enabled in (False, True):
        caplog.clear()
        with caplog.at_level(logging.DEBUG), running_server(
            settings_for(index_a, log_payloads=enabled)
        ) as (_, port), ConceptClient(f"127.0.0.1:{port}") as c:
            c.annotate(secret)
            list(c.annotate_stream([("1", secret), ("2", secret + " x" * 100_000)]))
            _status(c.annotate, secret, options=ExtractOptions(semantic_types=("bogus",)))
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert (secret in logged) is enabled


# -- processes ---------------------------------------------------------------------------------
def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _metrics_worker_pids(port: int) -> set[str]:
    text = _scrape(port)
    return set(re.findall(r'conceptsvc_worker_up\{pid="(\d+)"\} 1\.0', text))


def _index_loads(port: int) -> float:
    """Indexes loaded by all workers together, dead ones included (a counter)."""
    found = re.search(
        r'^conceptsvc_index_reloads_total\{result="ok"\} (\S+)$', _scrape(port), re.MULTILINE
    )
    return float(found.group(1)) if found else 0.0


def test_server_workers_get_every_secret_of_the_settings(index_a: Path) -> None:
    """A worker's settings are its supervisor's, secrets included. The settings' JSON dump
    writes a secret as '**********': a secret the payload did not name (the cache secret,
    when it came) would have reached every worker as those ten stars, the same on every
    deployment."""
    from conceptsvc.config import Settings
    from conceptsvc.server.app import _settings_payload

    s = settings_for(
        index_a, redis_url="redis://127.0.0.1:1/0", auth_token="u" * 32, admin_token="a" * 32,
        cache_secret="c" * 40,
    )
    worker = Settings(**json.loads(_settings_payload(s)))
    assert worker.cache_secret is not None and worker.cache_secret.get_secret_value() == "c" * 40
    assert worker == s


@pytest.mark.slow
def test_server_multiprocess_workers_share_one_port(tmp_path: Path, index_a: Path) -> None:
    from conftest import free_port

    from conceptsvc.cli import main
    from conceptsvc.errors import ConfigError
    from conceptsvc.server.app import PortClaim

    mport, hport = free_port(), free_port()
    path = build_index_a(tmp_path / "idx")
    proc, port = serve_subprocess(
        "--workers", "2", "--index", str(path), "--metrics-port", str(mport),
        "--admin-token", ADMIN, "--health-port", str(hport),
    )
    try:
        pids = _metrics_worker_pids(mport)
        assert len(pids) == 2 and str(proc.pid) not in pids
        # the workers share the health port as they share the service port; while it is
        # theirs, another service cannot take it
        assert main(["health", "--target", f"127.0.0.1:{hport}"]) == 0
        with pytest.raises(ConfigError, match=f"port {hport} is already in use"):
            PortClaim("127.0.0.1", hport, setting="health_port")
        # The kernel, not the test, picks the worker of each connection (all of them on one
        # is possible), so what each worker did is read from the metrics: index loads are
        # counted per worker and summed, and a worker loads a changed index exactly once.
        assert _index_loads(mport) == 2
        clients = [ConceptClient(f"127.0.0.1:{port}") for _ in range(8)]
        for c in clients:
            assert c.annotate("lung").concepts == ("C0024109",)
        # An admin reload on one worker propagates to the other.
        build_index_b(path)
        with ConceptClient(f"127.0.0.1:{port}", admin_token=ADMIN) as admin:
            assert admin.reload_index().changed
        deadline = time.monotonic() + 20
        while _index_loads(mport) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _index_loads(mport) == 4
        assert all(c.annotate("edema").concepts == ("C0013604",) for c in clients)
        # SIGHUP reloads every worker.
        build_index_a(path)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while _index_loads(mport) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _index_loads(mport) == 6
        assert all(c.annotate("edema").concepts == () for c in clients)
        # A killed worker is replaced. The index on disk changed meanwhile, without a reload:
        # the new worker loads it, and the supervisor has the other reload too, so that the
        # port never serves two dictionaries (before, it served both until the next SIGHUP).
        build_index_b(path)
        victim = int(sorted(pids)[0])
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _metrics_worker_pids(mport)
            if len(now) == 2 and str(victim) not in now and _index_loads(mport) >= 8:
                break
            time.sleep(0.2)
        assert len(_metrics_worker_pids(mport)) == 2
        assert _index_loads(mport) == 8  # the new worker's load and the other's reload
        fresh = [ConceptClient(f"127.0.0.1:{port}") for _ in range(8)]
        assert all(c.annotate("edema").concepts == ("C0013604",) for c in clients + fresh)
        for c in clients + fresh:
            c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_issue_18_a_claimed_port_is_shared_only_by_its_own_workers(index_a: Path) -> None:
    from conceptsvc.errors import ConfigError
    from conceptsvc.server.app import PortClaim

    claim = PortClaim("127.0.0.1", 0)  # port 0: picked once, here
    try:
        for host in ("127.0.0.1", "0.0.0.0"):  # the same address, and one that overlaps it
            with pytest.raises(ConfigError, match=f"E100.*port {claim.port} is already in use"):
                PortClaim(host, claim.port)
        # the health port is claimed the same way, and the message names its own flag
        with pytest.raises(ConfigError, match="choose another --health-port"):
            PortClaim("127.0.0.1", claim.port, setting="health_port")
        # a worker joins the claim; a server that does not share (--workers 1) cannot
        with running_server(settings_for(index_a, port=claim.port), reuse_port=True) as (_, p):
            assert p == claim.port
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{p}"):
                create_server(settings_for(index_a, port=p))
            claim.close()
            # the listening worker alone still keeps other supervisors out
            with pytest.raises(ConfigError, match=f"port {p} is already in use"):
                PortClaim("127.0.0.1", p)
        PortClaim("127.0.0.1", claim.port).close()  # free again once every holder is gone
    finally:
        claim.close()


def _claim_together(port: int, n: int) -> tuple[list[Any], list[Exception]]:
    """``n`` threads claiming ``port`` at the same instant: the claims won and the errors."""
    from conceptsvc.errors import ConfigError
    from conceptsvc.server.app import PortClaim

    barrier = threading.Barrier(n)
    won: list[PortClaim] = []
    lost: list[Exception] = []

    def claim() -> None:
        barrier.wait()
        try:
            won.append(PortClaim("127.0.0.1", port))
        except ConfigError as exc:
            lost.append(exc)

    threads = [threading.Thread(target=claim) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return won, lost


def test_issue_18_port_claims_racing_for_one_port_let_one_through() -> None:
    from conftest import free_port

    # Two supervisors started in the same instant. Without the lock, 70-87 of 300 rounds did
    # not have exactly one winner: both probes passed before either guard was bound, or each
    # failed on the other's probe. A tiny switch interval lets the threads interleave there.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(300):
            port = free_port()
            won, lost = _claim_together(port, 2)
            for c in won:
                c.close()
            assert (len(won), len(lost)) == (1, 1), (port, lost)
    finally:
        sys.setswitchinterval(switch)


@pytest.mark.slow
@pytest.mark.parametrize(("first", "second"), [("2", "2"), ("1", "2"), ("2", "1")])
def test_issue_18_a_second_service_cannot_join_a_taken_port(
    tmp_path: Path, first: str, second: str
) -> None:
    # Workers share their port with SO_REUSEPORT, and Linux let the workers of a second
    # `serve --workers 2` on the same port join the first's group: both dictionaries answered
    # on one port, at random per connection, and the second service started cleanly.
    a = build_index_a(tmp_path / "a")
    b = build_index_b(tmp_path / "b")
    proc, port = serve_subprocess("--workers", first, "--index", str(b))
    try:
        other = subprocess.Popen(
            [sys.executable, "-m", "conceptsvc.cli", "serve", "--port", str(port),
             "--workers", second, "--index", str(a)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert other.stdout is not None
            ready = other.stdout.readline()  # the ready line, or "" once it has exited
            # Each client has its own connection, and the kernel picks the listener of each.
            releases = []
            for _ in range(40):
                with ConceptClient(f"127.0.0.1:{port}") as c:
                    releases.append(c.get_info().index.source_release)
        finally:
            if other.poll() is None:
                other.kill()
            _, other_err = other.communicate(timeout=30)
        assert set(releases) == {"test-B"}, releases
        assert ready == "", f"a second service started on port {port}: {ready!r}"
        assert other.returncode == 2, other_err
        assert "E100" in other_err and str(port) in other_err, other_err
        with ConceptClient(f"127.0.0.1:{port}") as c:  # the first one is unharmed
            assert c.annotate("edema").concepts == ("C0013604",)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


@pytest.mark.slow
def test_server_serves_the_demo_dictionary_and_drains_on_sigterm(tmp_path: Path) -> None:
    # No --index: the embedded demo dictionary, built into a private cache directory.
    proc, port = serve_subprocess(
        "--workers", "1", env={"CONCEPTSVC_CACHE_DIR": str(tmp_path / "cache")}
    )
    try:
        with ConceptClient(f"127.0.0.1:{port}") as c:
            info = c.get_info()
            assert info.index.concepts > 1000
            assert "C0032326" in c.annotate("Chest CT shows a pneumothorax.").concepts
            assert c.get_concept("C0032326").semantic_types[0].group == "DISO"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_issue_16_serve_logs_its_index_and_reloads_at_info_never_captions(
    tmp_path: Path,
) -> None:
    """No -v: the index served (path, content hash, concepts) and each reload (old and new
    hash) are on stderr; caption text is not."""
    path = build_index_a(tmp_path / "idx")
    first = ConceptIndex.load(path).content_hash
    secret = "Patient Jane Roe lung caption"
    proc, port = serve_subprocess("--workers", "1", "--index", str(path))
    try:
        with ConceptClient(f"127.0.0.1:{port}") as c:
            c.annotate(secret)
            list(c.annotate_stream([("1", secret)]))
            build_index_b(path)
            second = ConceptIndex.load(path).content_hash
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while c.get_info().index.content_hash != second:
                assert time.monotonic() < deadline, "the index was not reloaded"
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    concepts = ConceptIndex.load(path).manifest["counts"]["concepts"]
    serving = next(line for line in err.splitlines() if "serving conceptsvc" in line)
    assert " INFO " in serving
    assert f"index {path}, content hash {first}, " in serving
    assert re.search(r"index .*, \d+ concepts$", serving)
    assert f"content hash {first} -> {second} ({concepts} concepts)" in err
    assert secret not in err


def test_server_cli_health_exit_codes(index_a: Path) -> None:
    from conceptsvc.cli import main

    with running_server(settings_for(index_a), load=False) as (server, port):
        assert main(["health", "--target", f"127.0.0.1:{port}"]) == 1
        server.reload()
        assert main(["health", "--target", f"127.0.0.1:{port}"]) == 0
        assert main(["health", "--target", f"127.0.0.1:{port}", "--service", "nope"]) == 1
    from conftest import free_port

    assert main(["health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 2


def test_server_cli_serve_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from conceptsvc.cli import main
    from conceptsvc.config import DefaultOptions, Settings

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        if name in ("defaults", "config_file"):
            continue
        assert "--" + name.replace("_", "-") in text, name
        assert "CONCEPTSVC_" + name.upper() in text.replace("\n", "").replace(" ", "")
    for name in DefaultOptions.model_fields:
        assert "--default-" + name.replace("_", "-") in text, name
    assert "--config" in text


def test_server_cli_serve_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from conceptsvc.cli import main

    assert main(["serve", "--workers", "0", "--default-mode", "fuzzy"]) == 2
    err = capsys.readouterr().err
    assert "workers" in err and "defaults.mode" in err and "E100" in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_server_metrics_port_in_use_is_a_config_error(tmp_path: Path, workers: str) -> None:
    """A metrics port that cannot be bound stops `serve` with E100 naming the address and the
    flag (exit 2), as the service port does, not with a traceback."""
    import socket

    a = build_index_a(tmp_path / "a")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        mport = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "conceptsvc.cli", "serve", "--port", "0", "--host",
             "127.0.0.1", "--workers", workers, "--index", str(a), "--metrics-host",
             "127.0.0.1", "--metrics-port", str(mport)],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert f"[E100] cannot serve metrics on 127.0.0.1:{mport}" in done.stderr, done.stderr
    assert "--metrics-port" in done.stderr and "Traceback" not in done.stderr


def test_server_log_level_setting_and_the_start_up_posture_line(tmp_path: Path) -> None:
    """`serve` says at start which security and cache it runs with (no secret: the Redis
    URL's password stays out), and CONCEPTSVC_LOG_LEVEL=warning silences its INFO lines
    (there was no log-level setting: only `conceptsvc -vv serve`, which an image's CMD fixes)."""
    a = build_index_a(tmp_path / "a")
    env = {"CONCEPTSVC_AUTH_TOKEN": "t" * 32, "CONCEPTSVC_REDIS_URL":
           "redis://:pa55word-x@127.0.0.1:1/0", "CONCEPTSVC_CACHE_SECRET": "k" * 40}
    proc, _ = serve_subprocess("--index", str(a), env=env)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert ("security and cache: token auth on, admin RPC off, TLS off; in-process cache "
            in err), err
    assert "Redis 127.0.0.1:1 (not answering" in err and "pa55word" not in err
    assert "k" * 40 not in err
    # a token without TLS, but on loopback: nothing crosses a network, nothing to warn of
    assert "without TLS" not in err, err
    # (said at start-up, before any request: a PING)
    assert "Redis cache tier unavailable (PING failed" in err, err
    proc, _ = serve_subprocess("--index", str(a), env={"CONCEPTSVC_LOG_LEVEL": "warning"})
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert " INFO " not in err and "security and cache" not in err, err


def test_server_refused_calls_are_logged_without_flooding(
    index_a: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong token is logged (method and why, never the token), at most once per
    REFUSAL_LOG_SECONDS, with the count of refusals since the last line."""
    token = "right-token-" + "r" * 24
    wrong = "wrong-token-" + "w" * 24
    with caplog.at_level("WARNING", logger="conceptsvc.server.auth"):
        with running_server(settings_for(index_a, auth_token=token)) as (_, port):
            with ConceptClient(f"127.0.0.1:{port}", token=wrong, retries=0) as c:
                for _ in range(5):
                    with pytest.raises(ServiceCallError):
                        c.get_info()
    lines = [r.getMessage() for r in caplog.records if r.name == "conceptsvc.server.auth"]
    assert lines == ["refused /conceptsvc.v1.ConceptService/GetInfo: UNAUTHENTICATED: "
                     "invalid token"], lines
    assert all(wrong not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_server_json_log_lines_for_a_collector(tmp_path: Path, workers: str) -> None:
    """CONCEPTSVC_LOG_FORMAT=json: every line `serve` logs (supervisor and workers) is one JSON
    object with time, level, logger and message, and a worker's number when there are workers
    (gRPC's own C-core lines, which bypass logging, are the only text lines left)."""
    a = build_index_a(tmp_path / "a")
    proc, _ = serve_subprocess("--index", str(a), "--workers", workers,
                               env={"CONCEPTSVC_LOG_FORMAT": "json"})
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert not [line for line in err.splitlines()
                if line.strip() and not line.startswith(("{", "I1", "W1", "E1"))], err
    serving = [r for r in records if r["message"].startswith("serving conceptsvc.v1")]
    assert len(serving) == int(workers), err
    for r in records:
        assert set(r) >= {"time", "level", "logger", "message"} and r["time"].endswith("Z")
    if workers == "2":
        assert {r["worker"] for r in serving} == {0, 1}
    else:
        assert all("worker" not in r for r in records)
