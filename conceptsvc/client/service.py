"""``ConceptClient``: the typed Python client of the conceptsvc gRPC service.

Returns domain types (:mod:`conceptsvc.model`), never protobuf.
What it adds over a raw stub:

- deadlines on every unary call (``timeout``, default 30 s), and an optional overall deadline
  for streams;
- retries of UNAVAILABLE with exponential backoff and jitter (the server restarting, draining
  or a replica going away), and of CANCELLED that this client did not cause (a replica that
  stopped while the call was on its way to it, at the end of a drain's grace): every call but
  ``ReloadIndex`` only reads, so sending it again is safe, and ``ReloadIndex`` is not resent
  after a CANCELLED. Other statuses are raised at once as
  :class:`~conceptsvc.errors.ServiceCallError`;
- :meth:`ConceptClient.annotate_batch` sends many captions in one ``AnnotateBatch`` message
  and gets their answers in one (the path for corpora: a message per caption costs more than
  annotating it), split into as many messages as the client's ``max_message_bytes`` and
  ``max_batch_items`` need; it resends a batch refused with UNAVAILABLE (a draining server), and
  in smaller batches the items a full reply could not hold, those of a reply over the client's
  receive limit, and a batch the service turned away whole as too big for it (more items than
  its ``max_batch_items``, a reply too small for their refusals);
- :meth:`ConceptClient.annotate_stream` keeps the items that were sent but not yet answered;
  when the stream fails with UNAVAILABLE it reopens the stream and resends exactly those, so a
  drained worker or a reload never loses or duplicates an item. It also bounds how many items
  are in flight (``window``) so memory stays flat on corpora of any size;
- every stream result names the index that produced it (:attr:`StreamResult.index_hash
  <conceptsvc.model.StreamResult.index_hash>`, the index's content hash): a reload can change
  the index between two streams, or between the attempts of one that was resent, and a caller
  that must not mix indexes compares it with the hash it started with
  (:func:`conceptsvc.client.batch.annotate_corpus` does);
- TLS / mutual TLS and a bearer token (:mod:`conceptsvc.client.channel`).

Each client opens its own connection (``grpc.use_local_subchannel_pool``): with the server's
worker processes sharing one port, connections — not calls — are what spread over the cores,
so several clients (or streams on several clients) use several workers.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conceptsvc import wire
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2_grpc as pb_grpc
from conceptsvc.client.channel import (
    ChannelSecurity,
    bearer_metadata,
    unavailable_hint,
    warn_token_in_plaintext,
)
from conceptsvc.errors import (
    ClientError,
    ConceptNotFoundError,
    InputTooLargeError,
    ReplyFullError,
    ServiceCallError,
)
from conceptsvc.model import (
    MAX_BATCH_ITEMS,
    Annotation,
    Candidate,
    ConceptRecord,
    ExtractOptions,
    ItemError,
    ReloadResult,
    SemanticCatalog,
    ServiceInfo,
    StreamResult,
    batch_items,
    stream_items,
)

__all__ = ["ConceptClient"]

T = TypeVar("T")
# The statuses of a call the service refused for its token.
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


def _unsendable(id_: str, text: str, exc: UnicodeEncodeError) -> str:
    """Why an item cannot go on the wire (protobuf strings must be valid UTF-8)."""
    where = "id" if exc.object is id_ else "text"
    return (
        f"item {id_!r}: its {where} has a lone surrogate ({exc.object[exc.start]!r}) at "
        f"position {exc.start}, which UTF-8 cannot encode; the input was probably decoded with "
        "errors='surrogateescape' or from broken UTF-16 — fix its encoding"
    )


def _build_request(
    id_: str, text: str, options: pb.AnnotateOptions | None
) -> pb.AnnotateRequest | str:
    """The request for one item, or why it cannot be sent."""
    try:
        req = pb.AnnotateRequest(id=id_, text=text)
    except UnicodeEncodeError as exc:
        return _unsendable(id_, text, exc)
    if options is not None:
        req.options.CopyFrom(options)
    return req


def _framed(size: int) -> int:
    """Bytes a message of ``size`` bytes takes as a field (numbers below 16) of another: its
    tag, its length as a varint, itself."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


# How gRPC core words a reply over this client's receive limit (its own side says CLIENT; the
# server's refusal of a request over its limit says SERVER).
_CLIENT_RECEIVE_LIMIT = "CLIENT: Received message larger than max"


def _method_path(name: str) -> str:
    service = pb.DESCRIPTOR.services_by_name["ConceptService"]
    return f"/{service.full_name}/{service.methods_by_name[name].name}"


class _Attempt:
    """One try of a stream; a failed try's request generator must stop pulling items."""

    def __init__(self) -> None:
        self.alive = True


class ConceptClient:
    """A connection to one conceptsvc target (``host:port``, or ``dns:///name:port``)."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        admin_token: str | None = None,
        tls: bool = False,
        ca_cert: Path | str | bytes | None = None,
        client_cert: Path | str | bytes | None = None,
        client_key: Path | str | bytes | None = None,
        server_name: str | None = None,
        timeout: float | None = 30.0,
        retries: int = 4,
        backoff: float = 0.1,
        backoff_max: float = 5.0,
        max_message_bytes: int = _DEFAULT_MAX_MESSAGE,
        max_batch_items: int = MAX_BATCH_ITEMS,
        round_robin: bool = False,
        own_connection: bool = True,
    ) -> None:
        security = ChannelSecurity(
            tls=tls, ca_cert=ca_cert, client_cert=client_cert, client_key=client_key,
            server_name=server_name, token=token,
        )
        security.check()
        self._uses_tls = security.uses_tls
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._token = token
        self._admin_token = admin_token
        self.max_message_bytes = max_message_bytes
        self.max_batch_items = max(1, max_batch_items)
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        if round_robin:
            options.append(("grpc.lb_policy_name", "round_robin"))
        options += security.channel_options()
        creds = security.credentials()
        warn_token_in_plaintext(target, security.uses_tls, bool(token or admin_token))
        self._closed = False
        if creds is not None:
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.ConceptServiceStub(self._channel)  # type: ignore[no-untyped-call]
        # The annotation methods with their replies left as bytes: the compiled reader makes
        # the StreamResults straight from them (wire.result_reader), never building messages.
        self._reader = wire.result_reader()
        self._annotate_call = self._channel.unary_unary(
            _method_path("Annotate"),
            request_serializer=pb.AnnotateRequest.SerializeToString,
            response_deserializer=None,
        )
        self._batch_call = self._channel.unary_unary(
            _method_path("AnnotateBatch"),
            request_serializer=pb.AnnotateBatchRequest.SerializeToString,
            response_deserializer=None,
        )
        self._stream_call = self._channel.stream_stream(
            _method_path("AnnotateStream"),
            request_serializer=pb.AnnotateRequest.SerializeToString,
            response_deserializer=None,
        )
        self._admin = pb_grpc.AdminServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection; calls in progress are cancelled, and every later call raises
        :class:`~conceptsvc.errors.ClientError` saying the client was closed."""
        self._closed = True
        self._channel.close()

    def _closed_error(self, name: str) -> ClientError:
        return ClientError(
            f"{name}: this ConceptClient ({self.target}) was closed (by close() or at the end "
            "of its `with` block); make a new ConceptClient to call the service again"
        )

    @contextlib.contextmanager
    def _open(self, name: str) -> Iterator[None]:
        """Around the start of a call: the closed-client error before it, or for the bare
        ValueError with which gRPC refuses a call on a channel closed just now."""
        if self._closed:
            raise self._closed_error(name)
        try:
            yield
        except ValueError:
            if self._closed:
                raise self._closed_error(name) from None
            raise

    def _resend(self, code: grpc.StatusCode, *, cancelled: bool = True) -> bool:
        """Whether a call that failed with ``code`` may be sent again: UNAVAILABLE always,
        CANCELLED when ``cancelled`` allows it and the client was not closed (closing cancels
        the calls in flight; any other CANCELLED comes from the server)."""
        if code is grpc.StatusCode.UNAVAILABLE:
            return True
        return cancelled and code is grpc.StatusCode.CANCELLED and not self._closed

    def __enter__(self) -> ConceptClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sleep_backoff(self, attempt: int, deadline: float | None) -> bool:
        """Wait before retry ``attempt``; False if the deadline leaves no time for it."""
        delay = min(self.backoff_max, self.backoff * (2**attempt)) * random.uniform(0.5, 1.0)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return False
        time.sleep(delay)
        return True

    def _unary(
        self,
        name: str,
        method: Callable[..., T],
        request: Any,
        *,
        timeout: float | None,
        token: str | None = None,
        resend_cancelled: bool = True,
    ) -> T:
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        md = bearer_metadata(token if token is not None else self._token)
        attempt = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                # gRPC rounds deadlines to the millisecond: an expired one could still be sent
                # and served, so it is not sent at all
                raise ServiceCallError(name, "DEADLINE_EXCEEDED", "the deadline has passed")
            try:
                with self._open(name):  # (each try: close() may come between two)
                    return method(request, timeout=remaining, metadata=md)
            except grpc.RpcError as exc:
                code = exc.code()
                if (
                    self._resend(code, cancelled=resend_cancelled)
                    and attempt < self.retries
                    and self._sleep_backoff(attempt, deadline)
                ):
                    attempt += 1
                    continue
                raise self._call_error(name, code, exc.details() or "") from None

    def _call_error(self, name: str, code: grpc.StatusCode, details: str) -> ServiceCallError:
        """The error of a failed call, with what to change when UNAVAILABLE says why (a TLS
        mismatch, a draining server)."""
        unavailable = code is grpc.StatusCode.UNAVAILABLE
        hint = unavailable_hint(details, self._uses_tls) if unavailable else ""
        if name == "ReloadIndex" and code in _REFUSED:
            hint = (
                " ReloadIndex needs the service's admin token (its CONCEPTSVC_ADMIN_TOKEN), not "
                "the client token: ConceptClient(target, admin_token=...). Without a client, "
                "send the service SIGHUP."
            )
        elif code is grpc.StatusCode.UNAUTHENTICATED:
            hint = (
                " Pass the service's token (its CONCEPTSVC_AUTH_TOKEN): "
                "ConceptClient(target, token=...), or --token / CONCEPTSVC_TOKEN on the command "
                "line."
            )
        return ServiceCallError(name, code.name, details, hint)

    @staticmethod
    def _read(name: str, read: Callable[[bytes], T], raw: bytes) -> T:
        """A reply's bytes read by the result reader; bytes it cannot read are the server's
        fault, reported as a ClientError rather than a parser's exception."""
        try:
            return read(raw)
        except (ValueError, DecodeError) as exc:
            raise ClientError(f"{name}: the server's reply cannot be read ({exc})") from None

    # -- annotation ------------------------------------------------------------------------------
    def annotate(
        self,
        text: str,
        *,
        id: str = "",
        options: ExtractOptions | None = None,
        timeout: float | None = None,
    ) -> Annotation:
        """Annotate one caption (``options`` None = the server's defaults)."""
        req = _build_request(
            id, text, wire.options_to_pb(options) if options is not None else None
        )
        if isinstance(req, str):
            raise ClientError(req)
        raw = self._unary("Annotate", self._annotate_call, req, timeout=timeout)
        annotation = self._read("Annotate", self._reader.read_one, raw).annotation
        if annotation is None:  # a status inside a unary reply: not what servers send
            raise ClientError("Annotate answered an item error instead of a status; a server bug")
        return annotation

    def annotate_stream(
        self,
        items: Iterable[str] | Iterable[tuple[str, str]] | Mapping[str, str],
        *,
        options: ExtractOptions | None = None,
        timeout: float | None = None,
        window: int = 512,
    ) -> Iterator[StreamResult]:
        """Annotate ``(id, text)`` pairs on one stream; results come in input order.

        ``items`` takes what :meth:`Extractor.extract_batch
        <conceptsvc.extractor.Extractor.extract_batch>` takes: ``(id, text)`` pairs (an
        integer id becomes its string), plain texts (each id is then its position: ``"0"``,
        ``"1"``, ...) or a mapping of id to text; it is read lazily, and its first item says
        which shape all have. An item of another shape raises
        :class:`~conceptsvc.errors.ExtractArgumentError` showing the right call, and an
        exception ``items`` raises is raised as it is; either comes once the items read before
        it have been answered (and yielded), and nothing after it is read.
        A bad item yields a :class:`StreamResult` with ``error`` set and the stream goes on;
        that includes items that cannot even be sent (text that is not valid Unicode), which
        are answered here with INVALID_ARGUMENT without reaching the server.
        ``timeout`` bounds the whole stream (None = no deadline). On UNAVAILABLE (or a
        CANCELLED this client did not cause) the unanswered items are resent on a new stream
        (up to ``retries`` times in a row); a stream the server ends with nothing unanswered
        (idle longer than its ``stream_idle_seconds``) is replaced once ``items`` yields again,
        without counting as a failure.
        Closing the returned iterator early cancels the stream.
        """
        if window < 1:
            raise ClientError("window must be at least 1")
        opts_pb = wire.options_to_pb(options) if options is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        md = bearer_metadata(self._token)
        source = stream_items(items, call="annotate_stream", one="annotate(text)")
        # What reading ``source`` raised, in the request generator's thread (where gRPC would
        # turn it into an UNKNOWN status); raised to the caller once the stream is done.
        source_error: list[Exception] = []
        source_lock = threading.Lock()  # one request generator pulls from ``source`` at a time
        cond = threading.Condition()  # guards ``pending``
        # Items pulled and not yet yielded, in input order: a request that was sent (and awaits
        # its response), or the reason an item could not be sent (answered locally, in order).
        pending: deque[tuple[str, pb.AnnotateRequest | str]] = deque()
        in_flight = [0]  # sent and unanswered; what ``window`` bounds
        exhausted = [False]  # ``source`` has ended

        def requests(attempt: _Attempt) -> Iterator[pb.AnnotateRequest]:
            with source_lock:
                replay = [r for _, r in pending if not isinstance(r, str)]
            for sent in replay:
                if not attempt.alive:
                    return
                yield sent
            while True:
                with source_lock:
                    with cond:
                        while attempt.alive and in_flight[0] >= window:
                            cond.wait(0.1)
                    if not attempt.alive:
                        return
                    req = pull()
                    if req is None:
                        return
                if not isinstance(req, str):
                    yield req

        def pull() -> pb.AnnotateRequest | str | None:
            """The next item from ``source`` into ``pending`` (``source_lock`` held); None at
            its end."""
            if exhausted[0]:
                return None
            try:
                id_, text = next(source)
            except StopIteration:
                exhausted[0] = True
                return None
            except Exception as exc:  # the caller's iterator, or an item of the wrong shape
                source_error.append(exc)
                exhausted[0] = True
                return None
            req = _build_request(id_, text, opts_pb)
            with cond:
                pending.append((id_, req))
                if not isinstance(req, str):
                    in_flight[0] += 1
            return req

        def local_failures() -> Iterator[StreamResult]:
            """Unsendable items at the head of ``pending``, answered in their place."""
            while True:
                with cond:
                    if not pending or not isinstance(pending[0][1], str):
                        return
                    id_, reason = pending.popleft()
                    cond.notify_all()
                yield StreamResult(id_, None, ItemError("INVALID_ARGUMENT", str(reason)))

        failures = 0
        while True:
            attempt = _Attempt()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            with self._open("AnnotateStream"):
                call = self._stream_call(requests(attempt), timeout=remaining, metadata=md)
            read_one = self._reader.read_one
            try:
                for raw in call:
                    yield from local_failures()
                    result = self._read("AnnotateStream", read_one, raw)
                    with cond:
                        if not pending or pending[0][0] != result.id:
                            raise ClientError(
                                f"AnnotateStream answered id {result.id!r} out of order "
                                f"(expected {pending[0][0] if pending else None!r})"
                            )
                        pending.popleft()
                        in_flight[0] -= 1
                        cond.notify_all()
                    failures = 0
                    yield result
            except grpc.RpcError as exc:
                attempt.alive = False
                with cond:
                    cond.notify_all()
                code = exc.code()
                yield from local_failures()
                if self._resend(code) and not pending:
                    # Nothing was lost: the server closed a stream with every item answered
                    # (idle for its stream_idle_seconds, draining or stopping). Not a failure:
                    # the next stream opens once the caller has another item, however long that
                    # takes.
                    while True:
                        with source_lock:  # after a request generator still waiting on it
                            if not pending:
                                pull()
                        yield from local_failures()  # an unsendable item: pull again
                        if pending:
                            break
                        if exhausted[0]:
                            if source_error:
                                raise source_error[0] from None  # (not the idle stream's end)
                            return
                    continue
                if (
                    self._resend(code)
                    and failures < self.retries
                    and self._sleep_backoff(failures, deadline)
                ):
                    failures += 1
                    continue
                raise self._call_error("AnnotateStream", code, exc.details() or "") from None
            except BaseException:  # the consumer closed us, or a protocol error
                attempt.alive = False
                call.cancel()
                raise
            yield from local_failures()
            if pending:
                raise ClientError(
                    f"AnnotateStream ended with {len(pending)} items unanswered; "
                    "this is a server bug"
                )
            if source_error:
                raise source_error[0]
            return

    def annotate_batch(
        self,
        items: Iterable[str] | Iterable[tuple[str, str]] | Mapping[str, str],
        *,
        options: ExtractOptions | None = None,
        timeout: float | None = None,
    ) -> list[StreamResult]:
        """Annotate ``(id, text)`` pairs with ``AnnotateBatch`` calls; results in input order.

        ``items`` takes what :meth:`Extractor.extract_batch
        <conceptsvc.extractor.Extractor.extract_batch>` takes (pairs, plain texts whose ids are
        their positions, or a mapping of id to text) and refuses the same, with
        :class:`~conceptsvc.errors.ExtractArgumentError`, before anything is sent.
        The items go in as few calls as this client's ``max_message_bytes`` and
        ``max_batch_items`` allow: a batch whose request would be larger, or hold more items,
        is split, in order, into requests that fit (so a caller may pass any number of items;
        the sizes are the exact protobuf sizes). A request the service refuses whole before
        annotating any of it (more items than its own ``max_batch_items``, or a reply too small
        for even their refusals) is sent again in halves. A bad item gets
        its ``error``, as on a stream, and the others their annotations; items that cannot be
        sent are answered here: text that is not valid Unicode with INVALID_ARGUMENT, an item
        whose request alone is over the message limit with RESOURCE_EXHAUSTED (E501, naming
        the limit). Items the server's reply had no room for (E503) are sent again in halves;
        so are the items of a reply over this client's receive limit (a client whose
        ``max_message_bytes`` is below the server's: the server fills replies up to its own),
        down to single items, and one whose answer alone is over it fails with
        RESOURCE_EXHAUSTED (E501) — each halving costs the server the annotation again, so
        give the client the server's limit. UNAVAILABLE is retried (``retries``, with
        backoff: a draining server), and a CANCELLED the client did not cause (a stopping
        one); other call failures, the server's refusal of a request over *its* smaller
        limit included, raise :class:`~conceptsvc.errors.ServiceCallError`. ``timeout`` is
        each call's deadline (None = the client's).
        """
        pairs = batch_items(items, call="annotate_batch", one="annotate(text)")
        opts_pb = wire.options_to_pb(options) if options is not None else None
        limit = self.max_message_bytes
        room = limit - (_framed(opts_pb.ByteSize()) if opts_pb is not None else 0)
        results: list[StreamResult | None] = [None] * len(pairs)
        todo: deque[list[int]] = deque()
        requests: dict[int, pb.AnnotateRequest] = {}
        part: list[int] = []
        used = 0
        for k, (id_, text) in enumerate(pairs):
            req = _build_request(id_, text, None)
            if isinstance(req, str):
                results[k] = StreamResult(id_, None, ItemError("INVALID_ARGUMENT", req))
                continue
            size = _framed(req.ByteSize())
            if size > room:
                results[k] = StreamResult(id_, None, ItemError(
                    "RESOURCE_EXHAUSTED",
                    f"item {id_!r}: its request would be {limit - room + size} bytes, over "
                    f"this client's message limit of {limit} bytes (max_message_bytes); not "
                    "sent — split the caption, or raise max_message_bytes (the service's too)",
                    InputTooLargeError.code,
                ))
                continue
            if part and (used + size > room or len(part) >= self.max_batch_items):
                todo.append(part)
                part, used = [], 0
            requests[k] = req
            part.append(k)
            used += size
        if part:
            todo.append(part)

        def halve(rest: list[int]) -> None:
            half = (len(rest) + 1) // 2
            todo.extendleft([rest[half:], rest[:half]] if half < len(rest) else [rest])

        while todo:
            part = todo.popleft()
            msg = pb.AnnotateBatchRequest(items=[requests[k] for k in part])
            if opts_pb is not None:
                msg.options.CopyFrom(opts_pb)
            try:
                raw = self._unary("AnnotateBatch", self._batch_call, msg, timeout=timeout)
            except ServiceCallError as exc:
                if exc.status != "RESOURCE_EXHAUSTED":
                    raise
                if wire.BATCH_SPLIT_HINT in exc.details and len(part) > 1:
                    halve(part)  # refused whole, before any work: too big for this service
                    continue
                if _CLIENT_RECEIVE_LIMIT not in exc.details:
                    raise
                if len(part) > 1:  # the reply was over what this client receives: in halves
                    halve(part)
                    continue
                k = part[0]
                results[k] = StreamResult(pairs[k][0], None, ItemError(
                    "RESOURCE_EXHAUSTED",
                    f"item {pairs[k][0]!r}: its answer is over this client's message limit of "
                    f"{limit} bytes (max_message_bytes); raise it to the service's",
                    InputTooLargeError.code,
                ))
                continue
            answers = self._read("AnnotateBatch", self._reader.read, raw)
            if len(answers) != len(part):
                raise ClientError(
                    f"AnnotateBatch answered {len(answers)} items for {len(part)}; this is a "
                    "server bug"
                )
            full: list[int] = []
            for k, result in zip(part, answers, strict=True):
                if result.id != pairs[k][0]:
                    raise ClientError(
                        f"AnnotateBatch answered id {result.id!r} in the place of "
                        f"{pairs[k][0]!r}"
                    )
                error = result.error
                if error is not None and error.error_code == ReplyFullError.code and len(part) > 1:
                    full.append(k)
                else:
                    results[k] = result
            if full:  # the reply was full: the rest again, in halves
                halve(full)
        return [r for r in results if r is not None]

    # -- lookups --------------------------------------------------------------------------------
    def get_concept(
        self, cui: str, *, synonyms: bool = False, timeout: float | None = None
    ) -> ConceptRecord:
        """The concept ``cui`` with its types and sources (and its synonyms if asked).

        A CUI the service's index does not have raises
        :class:`~conceptsvc.errors.ConceptNotFoundError` (E623), a ServiceCallError with status
        NOT_FOUND."""
        req = pb.GetConceptRequest(cui=cui, include_synonyms=synonyms)
        try:
            resp = self._unary("GetConcept", self._stub.GetConcept, req, timeout=timeout)
        except ServiceCallError as exc:
            if exc.status == "NOT_FOUND":  # the one thing GetConcept answers NOT_FOUND for
                raise ConceptNotFoundError(
                    cui, exc.details, "ConceptClient.search(text) finds concepts by name"
                ) from None
            raise
        return wire.concept_from_pb(resp)

    def search(
        self,
        query: str,
        *,
        limit: int = 10,
        options: ExtractOptions | None = None,
        timeout: float | None = None,
    ) -> list[Candidate]:
        req = pb.SearchConceptsRequest(query=query, limit=limit)
        if options is not None:
            req.options.CopyFrom(wire.options_to_pb(options))
        resp = self._unary("SearchConcepts", self._stub.SearchConcepts, req, timeout=timeout)
        return [wire.candidate_from_pb(c) for c in resp.candidates]

    def list_semantic_types(self, *, timeout: float | None = None) -> SemanticCatalog:
        resp = self._unary(
            "ListSemanticTypes", self._stub.ListSemanticTypes, pb.ListSemanticTypesRequest(),
            timeout=timeout,
        )
        return wire.catalog_from_pb(resp)

    def get_info(self, *, timeout: float | None = None) -> ServiceInfo:
        resp = self._unary("GetInfo", self._stub.GetInfo, pb.GetInfoRequest(), timeout=timeout)
        return wire.info_from_pb(resp)

    # -- operations ------------------------------------------------------------------------------
    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """``SERVING``, ``NOT_SERVING`` or ``SERVICE_UNKNOWN``; raises if unreachable."""
        try:
            with self._open("Health.Check"):
                resp = self._health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout
                )
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise self._call_error("Health.Check", exc.code(), exc.details() or "") from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_until_serving(self, timeout: float = 30.0, service: str = "") -> None:
        """Poll the health service until SERVING; raises ClientError after ``timeout``."""
        deadline = time.monotonic() + timeout
        last = "unreachable"
        while time.monotonic() < deadline:
            try:
                last = self.health(service, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            except ServiceCallError as exc:
                last = exc.status
            if last == "SERVING":
                return
            time.sleep(0.05)
        raise ClientError(f"{self.target} did not become SERVING within {timeout}s (last: {last})")

    def reload_index(self, *, timeout: float | None = 600.0) -> ReloadResult:
        """Ask the server to reload its configured index (needs the admin token)."""
        resp = self._unary(
            "ReloadIndex", self._admin.ReloadIndex, pb.ReloadIndexRequest(), timeout=timeout,
            token=self._admin_token, resend_cancelled=False,  # it may have been done
        )
        return wire.reload_from_pb(resp)
