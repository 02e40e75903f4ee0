"""Helpers for the service tests: small real indexes, throwaway certificates, servers.

Nothing here stands in for a real part: indexes are built with the real IndexBuilder, servers are
the real gRPC server on a free port, certificates are real X.509 made with ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import pytest

from conceptsvc.config import Settings, load_settings
from conceptsvc.errors import ConfigError
from conceptsvc.index import FLAG_ABBREVIATION, build_index
from conceptsvc.server import ConceptServer, create_server
from conceptsvc.server.launcher import spawn_server

CONCEPTS_A = [
    ("C0032326", "Pneumothorax", ["T047"]),
    ("C0817096", "Chest", ["T029"]),
    ("C0040405", "X-Ray Computed Tomography", ["T060"]),
    ("C0024109", "Lung", ["T023"]),
    ("C0032285", "Pneumonia", ["T047"]),
    ("C0018787", "Heart", ["T023"]),
    ("C0006826", "Malignant Neoplasms", ["T191"]),
]
TERMS_A = [
    ("C0032326", "pneumothorax", "MSH", "PT", 0),
    ("C0032326", "collapsed lung", "SNOMEDCT_US", "SY", 0),
    ("C0817096", "chest", "MSH", "PT", 0),
    ("C0817096", "thorax", "SNOMEDCT_US", "SY", 0),
    ("C0040405", "computed tomography", "MSH", "PT", 0),
    ("C0040405", "CT", "MSH", "AB", FLAG_ABBREVIATION),
    ("C0024109", "lung", "MSH", "PT", 0),
    ("C0032285", "pneumonia", "MSH", "PT", 0),
    ("C0018787", "heart", "MSH", "PT", 0),
    ("C0006826", "cancer", "MSH", "SY", 0),
]
# Index B: everything of A plus one concept, so a reload is observable.
CONCEPTS_B = [*CONCEPTS_A, ("C0013604", "Edema", ["T046"])]
TERMS_B = [*TERMS_A, ("C0013604", "edema", "MSH", "PT", 0)]

CAPTIONS = [
    ("r1", "Chest CT shows a right pneumothorax."),
    ("r2", "No pneumonia; the heart is normal."),
    ("r3", "Computed tomography of the thorax: collapsed lung."),
    ("r4", "Lung cancer with pleural edema."),
    ("r5", "Nothing to see here."),
]


def build_index_a(path: Path) -> Path:
    return build_index(path, CONCEPTS_A, TERMS_A, source_release="test-A")


def build_index_b(path: Path) -> Path:
    return build_index(path, CONCEPTS_B, TERMS_B, source_release="test-B")


CACHE_SECRET = "test-cache-secret-" + "s" * 24
"""The cache secret of test servers with a Redis tier (one for all: they share entries)."""


def settings_for(index: Path, **overrides: Any) -> Settings:
    """Settings for an in-process test server: port 0, one worker, small thread pool; with a
    Redis tier, :data:`CACHE_SECRET` unless the test gives its own."""
    base: dict[str, Any] = {"index": index, "port": 0, "workers": 1, "threads": 8}
    if overrides.get("redis_url"):
        base["cache_secret"] = CACHE_SECRET
    base.update(overrides)
    return load_settings(**base)


@contextmanager
def running_server(
    settings: Settings, *, load: bool = True, **kwargs: Any
) -> Iterator[tuple[ConceptServer, int]]:
    server, port = create_server(settings, **kwargs)
    server.start(load=load)
    try:
        yield server, port
    finally:
        server.stop(0)


ANNOTATION_CALLS = ("Annotate", "AnnotateStream", "AnnotateBatch")


class _Garbling:
    """A gRPC handler in front of a real server that answers the calls named in ``methods``
    (of Annotate, AnnotateStream, AnnotateBatch) with ``reply``, bytes as they are, and
    forwards every other call: a server whose replies are not what conceptsvc writes."""

    def __init__(self, target: str, reply: bytes, methods: tuple[str, ...]) -> None:
        self._channel = grpc.insecure_channel(target)
        self._reply = reply
        self._methods = methods

    def service(self, details: Any) -> Any:
        method = details.method
        name = method.rsplit("/", 1)[-1]
        if name == "AnnotateStream" and name in self._methods:
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, _: (self._reply for _ in requests)
            )
        if name in self._methods:
            return grpc.unary_unary_rpc_method_handler(lambda _, __: self._reply)
        forward = self._channel.unary_unary(method)
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: forward(request, metadata=context.invocation_metadata())
        )

    def close(self) -> None:
        self._channel.close()


class ProxyHandler(Protocol):
    """A generic gRPC handler in front of a real server (:func:`proxied_server`)."""

    def service(self, details: Any) -> Any: ...

    def close(self) -> None: ...


H = TypeVar("H", bound=ProxyHandler)


@contextmanager
def proxied_server(index: Path, make_handler: Callable[[str], H]) -> Iterator[tuple[H, str]]:
    """A real server over ``index`` behind a proxy whose handler ``make_handler`` makes from
    the server's target: (the handler, the proxy's target)."""
    with running_server(settings_for(index)) as (_, port):
        handler = make_handler(f"127.0.0.1:{port}")
        proxy = grpc.server(ThreadPoolExecutor(4))
        proxy.add_generic_rpc_handlers((handler,))
        target = f"127.0.0.1:{proxy.add_insecure_port('127.0.0.1:0')}"
        proxy.start()
        try:
            yield handler, target
        finally:
            proxy.stop(0)
            handler.close()


@contextmanager
def garbling_server(
    index: Path, reply: bytes, methods: tuple[str, ...] = ANNOTATION_CALLS
) -> Iterator[str]:
    """A real server over ``index`` whose calls ``methods`` are answered with ``reply``
    (see :class:`_Garbling`): its target."""
    with proxied_server(index, lambda target: _Garbling(target, reply, methods)) as (_, t):
        yield t


def unreadable_reply() -> bytes:
    """The review's reply: an unknown field whose length, 2**64 - 2**40 (a 10-byte varint),
    was negative once cast, so the compiled reader went on reading before its buffer
    (SIGSEGV)."""
    size, length = 2**64 - (1 << 40), bytearray()
    while size >= 0x80:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    return bytes([15 << 3 | 2, *length, size]) + b"x" * 8


# -- certificates -------------------------------------------------------------------------------
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA nobody's certificate chains to


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: Any, path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: Any, path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(common_name: str) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca_key: Any, ca_cert: Any, common_name: str, *, server: bool) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """A throwaway CA with one server (localhost, 127.0.0.1) and one client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("conceptsvc test CA")
    s_key, s_cert = _leaf(ca_key, ca_cert, "localhost", server=True)
    c_key, c_cert = _leaf(ca_key, ca_cert, "test client", server=False)
    _, other = _ca("some other CA")
    return Pki(
        ca=_write_cert(ca_cert, directory / "ca.pem"),
        server_cert=_write_cert(s_cert, directory / "server.pem"),
        server_key=_write_key(s_key, directory / "server.key"),
        client_cert=_write_cert(c_cert, directory / "client.pem"),
        client_key=_write_key(c_key, directory / "client.key"),
        other_ca=_write_cert(other, directory / "other-ca.pem"),
    )


def serve_subprocess(
    *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """Start ``conceptsvc serve --port 0 ARGS`` as a real process; return it and its port."""
    try:
        return spawn_server(args, env=env)
    except ConfigError as exc:
        pytest.fail(str(exc))
