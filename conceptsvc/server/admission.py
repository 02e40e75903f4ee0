"""Admission control: never more calls in progress than RPC threads to run them, and a reserve.

The synchronous gRPC server runs every call on one thread of a fixed pool, and an open stream
holds its thread for its whole life (its reader thread is a plain thread outside the pool). When
every pool thread is held, a new call — a health check included — waits in the pool's queue
until one frees, possibly forever: orchestrators then kill a busy but healthy server, and clients
see DEADLINE_EXCEEDED instead of a refusal they could act on.

So every call except the health service is counted from the moment its pool thread starts it
until that thread lets it go, and one beyond ``limit`` is refused at once with
RESOURCE_EXHAUSTED. ``limit`` is set below the pool size (``max_concurrent_rpcs`` ≤
``threads - reserved_threads``), so the reserved threads are never held by counted calls: health
checks and refusals always find one. Counting happens on the pool thread rather than when the
call arrives, because a call cancelled before its thread starts it never runs its handler, and
a count taken earlier could then never be given back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from conceptsvc.server.status import draining, overloaded, reflection_busy, status_for

__all__ = ["REFLECTION_STREAMS", "AdmissionInterceptor"]

_EXEMPT_PREFIX = "/grpc.health.v1.Health/"
_REFLECTION_PREFIX = "/grpc.reflection."  # v1alpha and v1
REFLECTION_STREAMS = 4
"""Server-reflection streams in progress at once (per worker). A tool such as grpcurl opens one
per command and closes it; but no idle timeout ends one a client leaves open, and each holds an
RPC thread and one of the ``limit`` calls, so beyond this many they are refused
(RESOURCE_EXHAUSTED) instead of taking the calls that annotate."""


class AdmissionInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls beyond ``limit`` in progress with RESOURCE_EXHAUSTED (health exempt)."""

    def __init__(
        self,
        limit: int,
        on_refuse: Callable[[str, grpc.StatusCode], None],
        is_draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.limit = limit
        self._on_refuse = on_refuse
        self._is_draining = is_draining
        self._lock = threading.Lock()
        self._in_progress = 0
        self._reflecting = 0
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    @property
    def in_progress(self) -> int:
        return self._in_progress

    def _admit(self, reflection: bool = False) -> bool:
        """Count a call in, unless ``limit`` calls (or, for a server-reflection stream,
        REFLECTION_STREAMS of those) are in progress."""
        with self._lock:
            if self._in_progress >= self.limit or (
                reflection and self._reflecting >= REFLECTION_STREAMS
            ):
                return False
            self._in_progress += 1
            self._reflecting += reflection
            return True

    def _release(self, reflection: bool = False) -> None:
        with self._lock:
            self._in_progress -= 1
            self._reflecting -= reflection

    def _refuse(self, method: str, context: grpc.ServicerContext) -> None:
        # a draining server's refusal says so (UNAVAILABLE: go elsewhere), not "busy"
        if self._is_draining():
            exc = draining()
        elif method.startswith(_REFLECTION_PREFIX) and self._reflecting >= REFLECTION_STREAMS:
            exc = reflection_busy(REFLECTION_STREAMS)
        else:
            exc = overloaded(self.limit)
        code, message, _ = status_for(exc)
        self._on_refuse(method, code)
        context.abort(code, message)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_EXEMPT_PREFIX):
            return handler
        # A method's handler is the same object on every call (unless the auth interceptor
        # refuses the call): its counting wrapper is built once and kept, not per call.
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.response_streaming:
            inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
            streaming = self._streaming(method, inner)
            if handler.request_streaming:
                return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
            return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
        unary = self._unary(method, inner)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)

    def _unary(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            if not self._admit():
                self._refuse(method, context)
            try:
                return inner(request, context)
            finally:
                self._release()

        return run

    def _streaming(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        # A generator, so that the count is taken when the pool thread first runs it and given
        # back by its ``finally`` (which a started generator always reaches, closed or not).
        reflection = method.startswith(_REFLECTION_PREFIX)

        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if not self._admit(reflection):
                self._refuse(method, context)
            try:
                yield from inner(request, context)
            finally:
                self._release(reflection)

        return run
