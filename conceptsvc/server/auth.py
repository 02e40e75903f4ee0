"""Bearer-token authentication, checked before any handler runs.

Clients send ``authorization: Bearer <token>`` metadata. Tokens are compared with
:func:`hmac.compare_digest` against every configured token (no early exit), so the time taken
does not reveal which token, or how much of one, matched. The health service is exempt: load
balancers and orchestrators probe it without credentials, and it reveals nothing but
SERVING/NOT_SERVING. The admin service accepts only the admin token, and is refused outright
when no admin token is configured.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from conceptsvc.server.status import (
    RpcFailure,
    permission_denied,
    refusing_handler,
    unauthenticated,
)

log = logging.getLogger(__name__)

#: Refused calls are logged at most once per this many seconds (with how many were refused
#: meanwhile): a client with a wrong token retrying in a loop must not flood the log.
REFUSAL_LOG_SECONDS = 10.0

__all__ = ["AuthInterceptor", "bearer_token"]

_HEALTH_PREFIX = "/grpc.health.v1.Health/"


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of the first ``authorization: Bearer …`` entry, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        raw = value.encode("utf-8", "replace") if isinstance(value, str) else value
        scheme, _, token = raw.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
        return None
    return None


def _matches(presented: bytes, expected: bytes | None) -> bool:
    if expected is None:
        # Still do a comparison so that "no such token" costs the same as "wrong token".
        hmac.compare_digest(presented, presented)
        return False
    return hmac.compare_digest(presented, expected)


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Rejects calls without the right token with UNAUTHENTICATED / PERMISSION_DENIED."""

    def __init__(
        self,
        *,
        token: str | None,
        admin_token: str | None,
        admin_prefix: str,
        on_reject: Callable[[str, grpc.StatusCode], None],
    ) -> None:
        self._token = token.encode("utf-8") if token else None
        self._admin = admin_token.encode("utf-8") if admin_token else None
        self._admin_prefix = admin_prefix
        self._on_reject = on_reject
        self._log_lock = threading.Lock()
        self._logged_at = -REFUSAL_LOG_SECONDS
        self._unlogged = 0

    def _log_refusal(self, method: str, failure: RpcFailure) -> None:
        """A WARNING for a refused call, at most one per REFUSAL_LOG_SECONDS (the token is
        never logged: only the method and why)."""
        now = time.monotonic()
        with self._log_lock:
            if now - self._logged_at < REFUSAL_LOG_SECONDS:
                self._unlogged += 1
                return
            before, self._unlogged, self._logged_at = self._unlogged, 0, now
        log.warning(
            "refused %s: %s: %s%s", method, failure.code.name, failure.message,
            f" ({before} more refused since the last such line)" if before else "",
        )

    def _check(self, method: str, metadata: Any) -> RpcFailure | None:
        if method.startswith(_HEALTH_PREFIX):
            return None
        admin = method.startswith(self._admin_prefix)
        if not admin and self._token is None:
            return None  # nothing to check: the metadata is not even read
        presented = bearer_token(metadata)
        if admin:
            if self._admin is None:
                return permission_denied(
                    "admin RPCs are disabled on this server; configure an admin token "
                    "(CONCEPTSVC_ADMIN_TOKEN) to enable them"
                )
            if presented is None:
                return unauthenticated("admin RPCs need `authorization: Bearer <admin token>`")
            if not _matches(presented, self._admin):
                return permission_denied("this token is not the admin token")
            return None
        if presented is None:
            return unauthenticated(
                "this server requires a token: send `authorization: Bearer <token>` metadata"
            )
        ok_user = _matches(presented, self._token)
        ok_admin = _matches(presented, self._admin)
        if not (ok_user or ok_admin):
            return unauthenticated("invalid token")
        return None

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        failure = self._check(method, handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if failure is None or handler is None:
            return handler
        self._log_refusal(method, failure)
        return self._reject(handler, method, failure)

    def _reject(
        self, handler: grpc.RpcMethodHandler, method: str, failure: RpcFailure
    ) -> grpc.RpcMethodHandler:
        on_reject = self._on_reject
        return refusing_handler(handler, failure, lambda: on_reject(method, failure.code))
