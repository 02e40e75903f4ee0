"""How the client reaches a service: TLS, the bearer token, and the options a call carries.

Every client of the service — :class:`~conceptsvc.client.ConceptClient` (its unary calls and
streams), the corpus runner (:mod:`conceptsvc.client.batch`, on ``grpc.aio`` channels) and the
lookups (:mod:`conceptsvc.client.lookup`) — takes its credentials, its call metadata and its
effective options from here, so that TLS files are read, a client certificate is paired with its
key and a token is sent the same way whichever way the service is called — and a token about to
leave this machine in plaintext is warned of (:func:`warn_token_in_plaintext`) by each of them.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from conceptsvc.errors import ClientError
from conceptsvc.model import ExtractOptions

__all__ = [
    "ChannelSecurity", "bearer_metadata", "effective_options", "target_hosts",
    "tls_mismatch_hint", "unavailable_hint", "warn_token_in_plaintext",
]

log = logging.getLogger(__name__)

# A TLS file given as a path, or its PEM bytes.
Pem = Path | str | bytes

# Targets already warned about (a process warns once per target, not once per client or call).
_warned_targets: set[str] = set()
_warned_lock = threading.Lock()
_LOCAL_SCHEMES = ("unix:", "unix-abstract:", "vsock:")


def target_hosts(target: str) -> list[str]:
    """The hosts a gRPC target names: ``host:port``, ``[v6]:port``, ``dns:[//auth/]host:port``,
    ``ipv4:a:p,b:p``, ``ipv6:[a]:p,...``; none for a local socket (``unix:``, ...)."""
    if target.startswith(_LOCAL_SCHEMES):
        return []
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        addresses = rest.split(",")
    elif sep and scheme == "dns":
        addresses = [rest.removeprefix("//").split("/", 1)[-1] if rest.startswith("//") else rest]
    else:
        addresses = [target]
    hosts = []
    for address in addresses:
        if address.startswith("["):
            hosts.append(address[1:].partition("]")[0])
        elif address.count(":") == 1:
            hosts.append(address.partition(":")[0])
        else:  # a bare name, or a bare IPv6 address
            hosts.append(address)
    return hosts


def _loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: it may resolve anywhere
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return address.is_loopback


def warn_token_in_plaintext(target: str, uses_tls: bool, sends_token: bool) -> None:
    """Warn, once per target in a process, when a bearer token is to go to ``target`` over a
    plaintext channel and the target is not this machine: anyone on the network path can read
    the token (and the captions) and call the service with it."""
    if uses_tls or not sends_token:
        return
    hosts = target_hosts(target)
    if all(map(_loopback, hosts)):
        return
    with _warned_lock:
        if target in _warned_targets:
            return
        _warned_targets.add(target)
    log.warning(
        "sending a bearer token to %s over a plaintext channel (no TLS): anyone on the "
        "network path can read it, and the captions, and call the service with it; use TLS "
        "(--tls / --ca-cert, ConceptClient(tls=True or ca_cert=...)) when the service is not "
        "on this machine", target,
    )


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
