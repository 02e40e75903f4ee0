"""Admission control and idle streams (issue 18, item 3), against the real server on port 0.

Open streams hold an RPC thread each. These tests fill a small pool (``threads=8`` or 4) with
streams that send one item and go quiet, and check what the issue asks: further calls are
answered or refused with RESOURCE_EXHAUSTED, never left to wait for their deadline; the health
check answers; an idle stream is ended after ``stream_idle_seconds`` and its thread is reused.
Deadlines here are generous: a call that waits for a thread fails them with DEADLINE_EXCEEDED,
a refused one ends with RESOURCE_EXHAUSTED long before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_helpers import build_index_a, running_server, settings_for

from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2_grpc as pb_grpc
from conceptsvc.client import ConceptClient
from conceptsvc.errors import ServiceCallError
from conceptsvc.server.admission import REFLECTION_STREAMS

# Long enough for any answer on a loaded machine; a call queued behind held threads never gets
# one, so it reaches this deadline instead.
_DEADLINE = 10.0


@pytest.fixture(scope="module")
def index_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index_a(tmp_path_factory.mktemp("admission") / "index-a")


class _IdleStream:
    """An AnnotateStream on its own connection that sends one item, then nothing until
    :meth:`finish` (no deadline, like the issue's streams). ``outcome`` is "answered" once the
    first item came back, or the status code name the call ended with."""

    def __init__(self, port: int, name: str) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.gate = threading.Event()
        self.first = threading.Event()
        self.done = threading.Event()
        self.outcome = ""
        self.details = ""
        self.name = name
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[pb.AnnotateRequest]:
        yield pb.AnnotateRequest(id=self.name, text="Chest CT")
        self.gate.wait(60)

    def _call(self) -> Iterator[bool]:
        """The stream's responses, each as whether it answers the first request."""
        stub = pb_grpc.ConceptServiceStub(self.channel)
        return (resp.id == self.name for resp in stub.AnnotateStream(self._requests()))

    def _run(self) -> None:
        try:
            for answered in self._call():
                if answered:
                    self.outcome = "answered"
                    self.first.set()
            self.outcome = "OK"
        except grpc.RpcError as exc:
            self.outcome = exc.code().name
            self.details = exc.details() or ""
        finally:
            self.first.set()
            self.done.set()

    def finish(self) -> None:
        self.gate.set()
        self.done.wait(_DEADLINE)
        self.channel.close()


class _IdleReflection(_IdleStream):
    """A server-reflection stream (what grpcurl opens) that asks for the service list once,
    then sends nothing until :meth:`finish`."""

    def _call(self) -> Iterator[bool]:
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel)

        def requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            self.gate.wait(60)

        return (
            bool(resp.list_services_response.service)
            for resp in stub.ServerReflectionInfo(requests())
        )


@contextmanager
def _idle_streams(
    port: int, n: int, kind: type[_IdleStream] = _IdleStream
) -> Iterator[list[_IdleStream]]:
    """``n`` idle streams, each answered or refused before this yields."""
    with ExitStack() as stack:
        streams = []
        for k in range(n):
            s = kind(port, f"idle-{k}")
            stack.callback(s.finish)
            streams.append(s)
            assert s.first.wait(_DEADLINE), f"stream {k} neither answered nor ended"
        yield streams


def _health(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=_DEADLINE
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def _unary(port: int) -> str:
    """"OK", or the status name a fresh connection's Annotate ended with."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            pb_grpc.ConceptServiceStub(ch).Annotate(
                pb.AnnotateRequest(id="u", text="lung"), timeout=_DEADLINE
            )
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return "OK"


def test_issue_18_idle_streams_leave_health_and_annotate_answerable(index_a: Path) -> None:
    """As many idle streams as there are RPC threads: before the fix they held every thread,
    and a health check and an Annotate on a fresh connection waited until DEADLINE_EXCEEDED."""
    settings = settings_for(index_a, threads=8)
    with running_server(settings) as (_srv, port), _idle_streams(port, 8) as streams:
        outcomes = [s.outcome for s in streams]
        assert set(outcomes) <= {"answered", "RESOURCE_EXHAUSTED"}, outcomes
        assert _health(port) == "SERVING"
        assert _unary(port) in ("OK", "RESOURCE_EXHAUSTED")


def test_admission_stream_beyond_the_limit_is_refused_and_a_freed_slot_is_reused(
    index_a: Path,
) -> None:
    """threads=8 with the default reserve of 2: six streams run (each holds one pool thread —
    the reader thread is not one of the pool's), the seventh stream and a unary call are
    refused with RESOURCE_EXHAUSTED naming the setting, health answers; once one stream ends,
    a new stream is admitted."""
    settings = settings_for(index_a, threads=8)
    assert settings.rpc_limit == 6
    with running_server(settings) as (_srv, port), _idle_streams(port, 6) as held:
        assert [s.outcome for s in held] == ["answered"] * 6
        with _idle_streams(port, 1) as (extra,):
            assert extra.outcome == "RESOURCE_EXHAUSTED"
            assert "max_concurrent_rpcs" in extra.details
        assert _unary(port) == "RESOURCE_EXHAUSTED"
        assert _health(port) == "SERVING"
        held[0].finish()
        assert held[0].outcome == "OK"
        with ConceptClient(f"127.0.0.1:{port}", retries=0, timeout=_DEADLINE) as c:
            assert [r.id for r in c.annotate_stream([("after", "Chest")])] == ["after"]
        # The stream of the client has ended: its slot is free again for a unary call.
        assert _unary(port) == "OK"


def test_admission_reflection_streams_are_capped_and_leave_annotate_answerable(
    index_a: Path,
) -> None:
    """Server-reflection streams have no idle timeout, so open ones beyond
    ``REFLECTION_STREAMS`` (4) are refused with RESOURCE_EXHAUSTED saying why; Annotate and
    health still answer (threads=8: a limit of 6 calls, 4 held), and once one reflection
    stream ends a new one is admitted. Without the cap the fifth and sixth took the last two
    calls, and Annotate was refused."""
    assert REFLECTION_STREAMS == 4
    with running_server(settings_for(index_a, threads=8)) as (_srv, port):
        with _idle_streams(port, 4, _IdleReflection) as held:
            assert [s.outcome for s in held] == ["answered"] * 4
            with _idle_streams(port, 2, _IdleReflection) as extra:
                assert [s.outcome for s in extra] == ["RESOURCE_EXHAUSTED"] * 2
                assert "server-reflection streams open" in extra[0].details
                assert _unary(port) == "OK"
                assert _health(port) == "SERVING"
            held[0].finish()
            assert held[0].outcome == "OK"
            with _idle_streams(port, 1, _IdleReflection) as (again,):
                assert again.outcome == "answered"


def test_admission_idle_stream_is_ended_with_unavailable_and_frees_its_thread(
    index_a: Path,
) -> None:
    """stream_idle_seconds=0.5 with a limit of 2 streams: both idle streams end with
    UNAVAILABLE naming the setting (they were answered first), after which new calls are
    admitted again."""
    settings = settings_for(index_a, threads=4, stream_idle_seconds=0.5)
    assert settings.rpc_limit == 2
    with running_server(settings) as (_srv, port), _idle_streams(port, 2) as streams:
        for s in streams:
            assert s.done.wait(_DEADLINE), "an idle stream was not ended"
            assert s.outcome == "UNAVAILABLE", (s.outcome, s.details)
            assert "stream_idle_seconds" in s.details
        assert _unary(port) == "OK"
        with ConceptClient(f"127.0.0.1:{port}", retries=0, timeout=_DEADLINE) as c:
            assert [r.id for r in c.annotate_stream([("a", "lung"), ("b", "CT")])] == ["a", "b"]


def test_admission_stream_that_keeps_sending_is_not_idle(index_a: Path) -> None:
    """Gaps between items far below stream_idle_seconds never end the stream: the idle clock
    restarts with every item."""
    settings = settings_for(index_a, threads=4, stream_idle_seconds=1.0)

    def items() -> Iterator[tuple[str, str]]:
        for k in range(30):  # 30 gaps of 0.05 s: longer in total than the idle setting
            time.sleep(0.05)
            yield (f"k{k}", "Chest CT")

    with (
        running_server(settings) as (_srv, port),
        ConceptClient(f"127.0.0.1:{port}", retries=0, timeout=_DEADLINE * 3) as c,
    ):
        got = [r.id for r in c.annotate_stream(items(), window=1)]
    assert got == [f"k{k}" for k in range(30)]


def test_admission_stream_idle_zero_keeps_idle_streams(index_a: Path) -> None:
    """stream_idle_seconds=0 turns the idle timeout off: a quiet stream stays open (well past
    what would otherwise end it) and still finishes normally."""
    settings = settings_for(index_a, threads=4, stream_idle_seconds=0)
    with running_server(settings) as (_srv, port), _idle_streams(port, 1) as (s,):
        assert not s.done.wait(1.5)
        s.finish()
        assert s.outcome == "OK"


def test_admission_counts_calls_after_a_refused_one(index_a: Path) -> None:
    """The counting wrapper of a method is built once and kept; a call the auth interceptor
    refuses gets a wrapper of its own, and the calls after it are counted and answered with
    the method's real handler again."""
    token = "user-token-0123456789abcdef"
    with running_server(settings_for(index_a, auth_token=token)) as (server, port):
        target = f"127.0.0.1:{port}"
        with ConceptClient(target, token=token) as good, ConceptClient(target) as bad:
            for _ in range(3):
                with pytest.raises(ServiceCallError) as err:
                    bad.annotate("lung")
                assert err.value.status == "UNAUTHENTICATED"
                assert good.annotate("lung").concepts == ("C0024109",)
                assert len(list(good.annotate_stream([("1", "lung")]))) == 1
        assert server.admission.in_progress == 0
        m = server.metrics
        assert m.value("conceptsvc_requests_total", {"method": "Annotate", "code": "OK"}) == 3
        assert m.value(
            "conceptsvc_requests_total", {"method": "Annotate", "code": "UNAUTHENTICATED"}
        ) == 3
