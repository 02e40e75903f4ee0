"""How the client reaches a service: TLS, the bearer token, and the options a call carries.

Every client of the service — :class:`~conceptsvc.client.ConceptClient` (its unary calls and
streams), the corpus runner (:mod:`conceptsvc.client.batch`, on ``grpc.aio`` channels) and the
lookups (:mod:`conceptsvc.client.lookup`) — takes its credentials, its call metadata and its
effective options from here, so that TLS files are read, a client certificate is paired with its
key and a token is sent the same way whichever way the service is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from conceptsvc.errors import ClientError
from conceptsvc.model import ExtractOptions

__all__ = [
    "ChannelSecurity", "bearer_metadata", "effective_options", "tls_mismatch_hint",
    "unavailable_hint",
]

# A TLS file given as a path, or its PEM bytes.
Pem = Path | str | bytes


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates with ``token`` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def tls_mismatch_hint(details: str, uses_tls: bool) -> str:
    """What to change when an UNAVAILABLE call's ``details`` show the client and the service
    disagree about TLS (" " and a sentence), else "". gRPC reports both ways as a failure to
    connect: a TLS client meets a plaintext service as a failed handshake (the reply is not
    TLS: WRONG_VERSION_NUMBER), a plaintext client meets a TLS service as a socket closed at
    once."""
    d = details.lower()
    if uses_tls and "handshake failed" in d:
        if "wrong_version_number" in d:
            return (" The service does not answer in TLS: if it is plaintext, drop --tls, "
                    "--ca-cert and the client certificate.")
        if "certificate" in d:
            return (" The TLS handshake failed on a certificate: check that --ca-cert signs the "
                    "service's certificate and that --server-name (or the target's host) is a "
                    "name in it, and, for mutual TLS, --client-cert and --client-key.")
        return (" The TLS handshake failed: check that the service uses TLS and that --ca-cert "
                "signs its certificate.")
    if "socket closed" in d:
        if uses_tls:
            return (" The service closed the connection at the TLS handshake: with mutual TLS "
                    "it needs a client certificate it trusts (--client-cert and --client-key).")
        return (" The connection was closed as soon as it opened, which is what a service that "
                "requires TLS does to a plaintext client: if it uses TLS, add --tls (and "
                "--ca-cert for a private CA).")
    return ""


def unavailable_hint(details: str, uses_tls: bool) -> str:
    """Advice for an UNAVAILABLE call (" " and a sentence, or ""): a draining server, or a TLS
    mismatch (:func:`tls_mismatch_hint`)."""
    if "shutting down" in details:
        return (" The service is shutting down (draining): send to another replica, or again "
                "once it has restarted.")
    return tls_mismatch_hint(details, uses_tls)


def _read(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {value}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach the targets: TLS (with a client certificate for mutual TLS) and a token.

    Field names follow :class:`~conceptsvc.client.ConceptClient`'s keyword arguments.
    """

    tls: bool = False  # TLS with the system roots when no ca_cert is given
    ca_cert: Pem | None = None
    client_cert: Pem | None = None
    client_key: Pem | None = None
    server_name: str | None = None
    token: str | None = None

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_cert is not None or self.client_cert is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.token)

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def check(self) -> None:
        """Raise ClientError when a client certificate comes without its key or vice versa."""
        if (self.client_cert is None) != (self.client_key is None):
            raise ClientError(
                "client_cert and client_key (--client-cert and --client-key) must be given "
                "together (mutual TLS)."
            )

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel credentials, None for a plaintext channel; reads the TLS files."""
        self.check()
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_cert),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_cert),
        )

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~conceptsvc.client.ConceptClient`."""
        return {
            "token": self.token, "tls": self.tls, "ca_cert": self.ca_cert,
            "client_cert": self.client_cert, "client_key": self.client_key,
            "server_name": self.server_name,
        }


def effective_options(
    defaults: ExtractOptions, overrides: Mapping[str, Any]
) -> ExtractOptions:
    """The defaults of whoever does the work (a service's, or the engine's) with the caller's
    overrides (names of :class:`~conceptsvc.model.ExtractOptions` fields)."""
    unknown = set(overrides) - set(asdict(defaults))
    if unknown:
        raise ClientError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return replace(defaults, **overrides)
