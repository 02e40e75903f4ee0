"""The one mapping from what went wrong to a gRPC status code.

Every RPC of the servicer, every stream item and the auth interceptor go through
:func:`status_for`; nothing else in the server picks a status code. The table:

====================================================  ===================
cause                                                 status
====================================================  ===================
bad input: empty id, unknown semantic type / group /  INVALID_ARGUMENT
source, bad option values (``ExtractionError``,
``SemanticNetworkError``)
text, an option list, a request or a reply over the   RESOURCE_EXHAUSTED
configured limits (``InputTooLargeError``)
every RPC thread a call may take is busy              RESOURCE_EXHAUSTED
(``max_concurrent_rpcs``), refused at once
a server-reflection stream beyond                     RESOURCE_EXHAUSTED
``admission.REFLECTION_STREAMS`` open ones
a reload that failed (``ConceptIndexError``)          FAILED_PRECONDITION
index not loaded yet (the server is starting)         UNAVAILABLE
server draining (shutting down)                       UNAVAILABLE
a stream idle longer than ``stream_idle_seconds``     UNAVAILABLE
unknown CUI                                           NOT_FOUND
missing / wrong token                                 UNAUTHENTICATED
admin RPC without the admin token                     PERMISSION_DENIED
client deadline passed while waiting                  DEADLINE_EXCEEDED
the client went away while its call was being         CANCELLED, or
answered (work stops between captions; the status     DEADLINE_EXCEEDED when
reaches only the metrics)                             its deadline passed
anything else (a bug)                                 INTERNAL, logged
====================================================  ===================

Messages say what was wrong and what to do, and never contain caption text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from conceptsvc.errors import (
    ConceptIndexError,
    ConceptsvcError,
    ExtractionError,
    InputTooLargeError,
    SemanticNetworkError,
)

__all__ = [
    "RpcFailure",
    "Status",
    "client_gone",
    "deadline_exceeded",
    "draining",
    "invalid_argument",
    "not_found",
    "not_ready",
    "overloaded",
    "permission_denied",
    "reflection_busy",
    "refusing_handler",
    "status_for",
    "stream_idle",
    "too_large",
    "unauthenticated",
]

Status = tuple[grpc.StatusCode, str, str]  # code, message, conceptsvc E-code ("" if none)


class RpcFailure(Exception):
    """A condition of the service itself (not of the engine) that ends a call or an item."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


def too_large(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def not_found(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.NOT_FOUND, message)


def not_ready() -> RpcFailure:
    # UNAVAILABLE, not FAILED_PRECONDITION: a server loading its index is a transient state
    # that ends by itself, and clients retry UNAVAILABLE with backoff — a replacement server
    # that comes up on the port while a batch is resent after a drain must not fail the batch.
    return RpcFailure(
        grpc.StatusCode.UNAVAILABLE,
        "the index is not loaded yet (the server is starting); retry — the health check "
        "reports SERVING once it is",
    )


def draining() -> RpcFailure:
    return RpcFailure(
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down; retry, another replica or the restarted server will answer",
    )


def overloaded(limit: int) -> RpcFailure:
    return RpcFailure(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"this server is at its limit of {limit} RPCs in progress (max_concurrent_rpcs; an "
        "open stream counts until it ends); retry after a backoff, on another replica, or close "
        "idle streams",
    )


def reflection_busy(limit: int) -> RpcFailure:
    return RpcFailure(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"this server already has {limit} server-reflection streams open (each holds an RPC "
        "thread until its client closes it); close one, or retry after a backoff",
    )


def stream_idle(seconds: float) -> RpcFailure:
    # UNAVAILABLE, not DEADLINE_EXCEEDED: no deadline of the client's passed, and every item the
    # stream sent has been answered, so reopening the stream is safe — which is what UNAVAILABLE
    # tells clients (the batch client retries it like a draining server's).
    return RpcFailure(
        grpc.StatusCode.UNAVAILABLE,
        f"the stream sent nothing for {seconds:g}s with nothing left to answer "
        "(stream_idle_seconds) and was closed to free its thread; open a new stream when there "
        "is more to send",
    )


def deadline_exceeded(message: str = "the client's deadline has passed") -> RpcFailure:
    return RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def client_gone(deadline_passed: bool) -> RpcFailure:
    """The client cancelled the call, or its deadline passed, while it was being answered: no
    one will read the status, but the metrics record it (not OK) and the work stops."""
    if deadline_passed:
        return deadline_exceeded("the client's deadline passed while the call was answered")
    return RpcFailure(grpc.StatusCode.CANCELLED, "the client cancelled the call")


def unauthenticated(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.UNAUTHENTICATED, message)


def permission_denied(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.PERMISSION_DENIED, message)


def status_for(exc: BaseException) -> Status:
    """The status a failure is reported with. ``INTERNAL`` means a bug: the caller logs it."""
    if isinstance(exc, RpcFailure):
        return exc.code, exc.message, ""
    if isinstance(exc, InputTooLargeError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message, exc.code
    if isinstance(exc, ExtractionError | SemanticNetworkError):
        return grpc.StatusCode.INVALID_ARGUMENT, exc.message, exc.code
    if isinstance(exc, ConceptIndexError):
        return grpc.StatusCode.FAILED_PRECONDITION, exc.message, exc.code
    if isinstance(exc, ConceptsvcError):
        return grpc.StatusCode.INTERNAL, exc.message, exc.code
    return (
        grpc.StatusCode.INTERNAL,
        "internal error in conceptsvc; the server log has the details",
        "",
    )


def refusing_handler(
    handler: grpc.RpcMethodHandler, failure: RpcFailure, on_refuse: Callable[[], None]
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape that only ends the call with ``failure``'s status."""
    code, message, _ = status_for(failure)

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        on_refuse()
        context.abort(code, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
