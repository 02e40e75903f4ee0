"""Security properties of the service and the code base, each checked against the real thing.

- transport: TLS, mutual TLS (a client without a certificate, or with one from another CA, is
  refused);
- authentication: without the token, or with a wrong one, every RPC but health is
  UNAUTHENTICATED; the admin RPC needs the admin token (and is off without one);
- reflection can be switched off; size limits hold at their boundaries;
- no RPC reads a server path the client chose: no request message has a path-like field, and
  the one name that selects a server file (``profile``) is refused unless it is a shipped one;
- no pickle / marshal, eval / exec, or dynamic dispatch on client input anywhere in
  ``conceptsvc/``: an AST rule (tested on bad snippets so it can fail) plus ruff's
  S301/S307/S102, whose selection in pyproject is checked here too;
- caption text never reaches the server's logs unless payload logging is switched on.
"""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import redis
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_helpers import (
    CAPTIONS,
    Pki,
    build_index_a,
    make_pki,
    running_server,
    settings_for,
)

from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2_grpc as pb_grpc
from conceptsvc.cache import result_key
from conceptsvc.client import ConceptClient
from conceptsvc.errors import ServiceCallError
from conceptsvc.model import ExtractOptions

if TYPE_CHECKING:
    from conftest import RedisServer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "conceptsvc"
# The checkout's tools beside the package are held to the same rules as the package itself.
SCANNED = (PACKAGE, ROOT / "benchmarks", ROOT / "tools")
TOKEN = "user-token-" + "u" * 24
ADMIN = "admin-token-" + "a" * 24


@pytest.fixture(scope="module")
def index_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index_a(tmp_path_factory.mktemp("security") / "a")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _status(fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(ServiceCallError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value.status


# -- transport ------------------------------------------------------------------------------------
def test_security_tls_accepts_trusting_clients_only(index_a: Path, pki: Pki) -> None:
    s = settings_for(index_a, tls_cert=pki.server_cert, tls_key=pki.server_key)
    with running_server(s) as (_srv, port):
        target = f"localhost:{port}"
        with ConceptClient(target, ca_cert=pki.ca, retries=0, timeout=10) as c:
            assert c.annotate("Chest CT", id="t").concepts == ("C0817096", "C0040405")
        with ConceptClient(target, retries=0, timeout=5) as c:  # plaintext to a TLS port
            assert _status(c.annotate, "Chest", id="p") == "UNAVAILABLE"
        with ConceptClient(target, ca_cert=pki.other_ca, retries=0, timeout=5) as c:
            assert _status(c.annotate, "Chest", id="w") == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("host", "tls", "tokens", "warned"),
    [
        ("0.0.0.0", False, {"auth_token": TOKEN}, True),
        ("[::]", False, {"auth_token": TOKEN}, True),
        ("10.1.2.3", False, {"admin_token": ADMIN}, True),
        ("conceptsvc.internal", False, {"auth_token": TOKEN}, True),  # a name may be anywhere
        ("127.0.0.1", False, {"auth_token": TOKEN}, False),
        ("127.0.0.2", False, {"auth_token": TOKEN}, False),
        ("[::1]", False, {"auth_token": TOKEN}, False),
        ("localhost", False, {"auth_token": TOKEN, "admin_token": ADMIN}, False),
        ("0.0.0.0", True, {"auth_token": TOKEN}, False),
        ("0.0.0.0", False, {}, False),  # nothing to leak (and nothing asked)
    ],
)
def test_security_server_warns_of_tokens_in_plaintext_on_a_network(
    index_a: Path, pki: Pki, host: str, tls: bool, tokens: dict[str, str], warned: bool
) -> None:
    """The start-up warning of a server whose tokens would cross a network in plaintext: a
    token (or the admin token), no TLS, and an address other than loopback."""
    from conceptsvc.config import load_settings
    from conceptsvc.server.app import _plaintext_token_warning

    files = {"tls_cert": pki.server_cert, "tls_key": pki.server_key} if tls else {}
    settings = load_settings(index=index_a, host=host, **tokens, **files)
    warning = _plaintext_token_warning(settings)
    assert (warning is not None) == warned, warning
    if warning is not None:
        assert f"{host}:50051" in warning and "CONCEPTSVC_TLS_CERT" in warning
        assert TOKEN not in warning and ADMIN not in warning


def test_security_client_warns_once_of_a_token_sent_in_plaintext_off_this_machine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client warns, once per target in a process, when it would send a token over a
    plaintext channel to a host other than this machine (no call is made: channels connect
    lazily), for ConceptClient and for the batch runner's channels alike."""
    import asyncio

    from conceptsvc.client.batch import _Targets
    from conceptsvc.client.channel import ChannelSecurity

    remote = "192.0.2.10:50951"  # (TEST-NET-1: nothing there)
    with caplog.at_level(logging.WARNING, logger="conceptsvc.client.channel"):
        for _ in range(2):
            ConceptClient(remote, token=TOKEN).close()
        ConceptClient("dns:///conceptsvc-headless.pipeline.svc:50951", admin_token=ADMIN).close()
        quiet = [
            ConceptClient("192.0.2.11:50951"),  # no token
            ConceptClient("192.0.2.12:50951", token=TOKEN, tls=True),
            ConceptClient("127.0.0.1:50951", token=TOKEN),
            ConceptClient("localhost:50951", token=TOKEN),
            ConceptClient("[::1]:50951", token=TOKEN),
            ConceptClient("ipv4:127.0.0.1:50951,127.0.0.2:50951", token=TOKEN),
            ConceptClient("unix:/tmp/conceptsvc-nowhere.sock", token=TOKEN),
        ]
        for client in quiet:
            client.close()

        async def batch_channels() -> None:  # (as the batch runner makes them: in its loop)
            targets = _Targets(["192.0.2.13:50951", "127.0.0.1:1"], ChannelSecurity(token=TOKEN))
            await targets.close()

        asyncio.run(batch_channels())
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" over ")[0] for line in lines] == [
        f"sending a bearer token to {remote}",
        "sending a bearer token to dns:///conceptsvc-headless.pipeline.svc:50951",
        "sending a bearer token to 192.0.2.13:50951",
    ], lines
    assert all(TOKEN not in line and ADMIN not in line for line in lines)


@pytest.mark.parametrize("case", ["other key", "swapped", "key is not PEM", "bad client CA"])
def test_security_bad_tls_files_are_named_not_blamed_on_the_port(
    index_a: Path, pki: Pki, tmp_path: Path, case: str
) -> None:
    """A certificate with another key, a swapped pair, a key that is not PEM, or a client CA
    that is not a certificate: the error names the TLS files (gRPC alone only fails to bind
    the port, and the message said "is the port in use?")."""
    from conceptsvc.errors import ConfigError
    from conceptsvc.server.app import create_server

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    files = {
        "other key": {"tls_cert": pki.server_cert, "tls_key": pki.client_key},
        "swapped": {"tls_cert": pki.server_key, "tls_key": pki.server_cert},
        "key is not PEM": {"tls_cert": pki.server_cert, "tls_key": garbage},
        "bad client CA": {"tls_cert": pki.server_cert, "tls_key": pki.server_key,
                          "tls_client_ca": garbage},
    }[case]
    with pytest.raises(ConfigError) as info:
        create_server(settings_for(index_a, **files))
    text = str(info.value)
    assert "port" not in text, text
    named = "tls_client_ca" if case == "bad client CA" else "tls_cert"
    assert named in text and str(files.get("tls_client_ca", files["tls_key"])) in text, text


def test_security_mutual_tls_requires_a_client_certificate(
    index_a: Path, pki: Pki, tmp_path: Path
) -> None:
    s = settings_for(
        index_a, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    with running_server(s) as (_srv, port):
        target = f"localhost:{port}"
        with ConceptClient(
            target, ca_cert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key,
            retries=0, timeout=10,
        ) as c:
            assert c.annotate("lung", id="m").concepts == ("C0024109",)
        with ConceptClient(target, ca_cert=pki.ca, retries=0, timeout=5) as c:
            assert _status(c.annotate, "lung", id="n") == "UNAVAILABLE"
        # a client certificate from another CA than the one the server trusts
        other = make_pki(tmp_path / "other")
        with ConceptClient(
            target, ca_cert=pki.ca, client_cert=other.client_cert, client_key=other.client_key,
            retries=0, timeout=5,
        ) as c:
            assert _status(c.annotate, "lung", id="o") == "UNAVAILABLE"


def test_security_health_port_answers_check_alone_in_plaintext_beside_a_tls_port(
    index_a: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """``health_port``: probes that speak plaintext only (Kubernetes' gRPC probes) reach the
    health status of a server whose service port needs mutual TLS, and reach nothing else."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from conceptsvc.cli import main

    s = settings_for(
        index_a, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca,
        health_port=0, auth_token=TOKEN,
    )
    with running_server(s) as (srv, port):
        hport = srv.health_port
        assert hport and hport != port
        with grpc.insecure_channel(f"127.0.0.1:{hport}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name in ("", "conceptsvc.v1.ConceptService"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
            with pytest.raises(grpc.RpcError) as unknown:
                stub.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            # a stream would hold one of the port's few threads: Watch is not served there
            with pytest.raises(grpc.RpcError) as watch:
                next(iter(stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)))
            assert watch.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # nothing but the check: not the service, not reflection, token or no token
            annotate = ch.unary_unary(
                "/conceptsvc.v1.ConceptService/Annotate",
                request_serializer=pb.AnnotateRequest.SerializeToString,
                response_deserializer=pb.AnnotateResponse.FromString,
            )
            for metadata in ((), (("authorization", f"Bearer {TOKEN}"),)):
                with pytest.raises(grpc.RpcError) as other:
                    annotate(pb.AnnotateRequest(id="x", text="lung"), timeout=5,
                             metadata=metadata)
                assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert _reflection_services(hport) == grpc.StatusCode.UNIMPLEMENTED
        # the command the image's HEALTHCHECK runs
        assert main(["health", "--target", f"127.0.0.1:{hport}"]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        # the service port still refuses a plaintext client
        with ConceptClient(f"localhost:{port}", token=TOKEN, retries=0, timeout=5) as c:
            assert _status(c.annotate, "lung", id="p") == "UNAVAILABLE"
        # the same status as the service port's: NOT_SERVING while draining
        srv.state.start_draining()
        assert main(["health", "--target", f"127.0.0.1:{hport}"]) == 1
        assert capsys.readouterr().out.strip() == "NOT_SERVING"


def test_security_health_port_must_be_a_port_of_its_own(index_a: Path) -> None:
    from conceptsvc.errors import ConfigError
    from conceptsvc.server.app import create_server

    with pytest.raises(ConfigError, match=r"health_port .* must differ from port"):
        settings_for(index_a, port=50999, health_port=50999)
    with pytest.raises(ConfigError, match=r"health_port .* must differ"):
        settings_for(index_a, metrics_port=50998, health_port=50998)
    from conftest import free_port

    with running_server(settings_for(index_a)) as (_srv, port):  # a port another service holds
        mine = free_port()
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} \\(health_port\\)"):
            create_server(settings_for(index_a, port=mine, health_port=port))
        # the service port the failed server had bound is free again
        with running_server(settings_for(index_a, port=mine)) as (_again, bound):
            assert bound == mine


# -- authentication -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def authed(index_a: Path) -> Iterator[int]:
    with running_server(settings_for(index_a, auth_token=TOKEN, admin_token=ADMIN)) as (_s, port):
        yield port


@pytest.mark.parametrize("token", [None, "", "wrong-token-" + "w" * 20, TOKEN[:-1], TOKEN + "x"])
def test_security_missing_or_wrong_token_is_unauthenticated(
    authed: int, token: str | None
) -> None:
    with ConceptClient(f"127.0.0.1:{authed}", token=token, retries=0) as c:
        assert _status(c.annotate, "Chest", id="x") == "UNAUTHENTICATED"
        assert _status(c.get_info) == "UNAUTHENTICATED"
        assert _status(c.get_concept, "C0024109") == "UNAUTHENTICATED"
        assert _status(c.search, "lung") == "UNAUTHENTICATED"
        assert _status(c.list_semantic_types) == "UNAUTHENTICATED"
        with pytest.raises(ServiceCallError) as info:
            list(c.annotate_stream([("a", "Chest")]))
        assert info.value.status == "UNAUTHENTICATED"
        assert c.health() == "SERVING"  # probes need no credentials and reveal nothing else


def test_security_right_token_and_schemes(authed: int) -> None:
    with ConceptClient(f"127.0.0.1:{authed}", token=TOKEN, retries=0) as c:
        assert c.annotate("Chest", id="x").concepts == ("C0817096",)
        assert [r.id for r in c.annotate_stream([("a", "Chest")])] == ["a"]
    # Raw metadata: only "Bearer <token>" counts; the token in another scheme or header does not.
    channel = grpc.insecure_channel(f"127.0.0.1:{authed}")
    try:
        method = channel.unary_unary(
            "/conceptsvc.v1.ConceptService/GetInfo",
            request_serializer=pb.GetInfoRequest.SerializeToString,
            response_deserializer=pb.GetInfoResponse.FromString,
        )
        for md in ([("authorization", f"Basic {TOKEN}")], [("authorization", TOKEN)],
                   [("x-token", TOKEN)], [("authorization", f"Bearer  {TOKEN} ")]):
            try:
                method(pb.GetInfoRequest(), metadata=md, timeout=5)
                ok = True
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
                ok = False
            # surrounding whitespace around a correct bearer token is tolerated, nothing else
            assert ok == md[0][1].startswith("Bearer"), md
    finally:
        channel.close()


def test_security_a_token_read_from_a_file_works_with_its_newline(index_a: Path) -> None:
    """A token from a secret file ends in a newline no client can send: the service and the
    client cut it off (it worked for no client before: every call UNAUTHENTICATED); a token
    with whitespace inside is refused at startup."""
    from conceptsvc.errors import ConfigError

    with running_server(settings_for(index_a, auth_token=TOKEN + "\n")) as (_s, port):
        with ConceptClient(f"127.0.0.1:{port}", token=TOKEN, retries=0) as c:
            assert c.annotate("Chest", id="x").concepts == ("C0817096",)
        code = subprocess.run(
            [sys.executable, "-m", "conceptsvc.cli", "lookup", "Chest", "--target",
             f"127.0.0.1:{port}", "--token", TOKEN + "\n", "--json"],
            capture_output=True, text=True, timeout=60,
        )
        assert code.returncode == 0 and "C0817096" in code.stdout, code.stderr
    with pytest.raises(ConfigError, match="tokens cannot contain whitespace"):
        settings_for(index_a, auth_token=TOKEN[:20] + " " + TOKEN[20:])


def test_security_admin_rpc_requires_the_admin_token(authed: int, index_a: Path) -> None:
    target = f"127.0.0.1:{authed}"
    with ConceptClient(target, retries=0) as c:  # no token at all
        assert _status(c.reload_index) == "UNAUTHENTICATED"
    with ConceptClient(target, token=TOKEN, retries=0) as c:  # falls back to the user token
        assert _status(c.reload_index) == "PERMISSION_DENIED"
    with ConceptClient(target, token=TOKEN, admin_token=TOKEN, retries=0) as c:  # user token
        assert _status(c.reload_index) == "PERMISSION_DENIED"
    with ConceptClient(target, token=TOKEN, admin_token=ADMIN + "x", retries=0) as c:
        assert _status(c.reload_index) == "PERMISSION_DENIED"
    with ConceptClient(target, token=TOKEN, admin_token=ADMIN, retries=0) as c:
        assert c.reload_index().changed is False  # same index on disk: nothing to do
    # No admin token configured: the admin RPC is off, whatever the caller sends.
    with running_server(settings_for(index_a)) as (_srv, port):
        with ConceptClient(f"127.0.0.1:{port}", admin_token=ADMIN, retries=0) as c:
            assert _status(c.reload_index) == "PERMISSION_DENIED"


# -- reflection and limits ------------------------------------------------------------------------
def _reflection_services(port: int) -> list[str] | grpc.StatusCode:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            responses = list(stub.ServerReflectionInfo(iter([req]), timeout=5))
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return [s.name for s in responses[0].list_services_response.service]
    finally:
        channel.close()


def test_security_reflection_can_be_disabled(index_a: Path) -> None:
    with running_server(settings_for(index_a, reflection=True)) as (_srv, port):
        services = _reflection_services(port)
        assert isinstance(services, list) and "conceptsvc.v1.ConceptService" in services
    with running_server(settings_for(index_a, reflection=False)) as (_srv, port):
        assert _reflection_services(port) is grpc.StatusCode.UNIMPLEMENTED


def test_security_size_limits_hold_at_the_boundary(index_a: Path) -> None:
    s = settings_for(index_a, max_text_chars=1000, max_message_bytes=8192)
    with running_server(s) as (_srv, port):
        with ConceptClient(f"127.0.0.1:{port}", retries=0, max_message_bytes=1 << 20) as c:
            assert c.annotate("lung " * 200, id="at-limit", options=ExtractOptions(
                include_mentions=False)).concepts == ("C0024109",)
            assert _status(c.annotate, "lung " * 200 + "x", id="over") == "RESOURCE_EXHAUSTED"
            # 8 KiB message limit: 1000 four-byte characters are 4 KB (fine), an id of 6 KB
            # pushes the message over it
            assert c.annotate("🫁" * 1000, id="wide").concepts == ()
            assert _status(c.annotate, "lung", id="i" * 9000) == "RESOURCE_EXHAUSTED"


# -- no client-chosen server paths ----------------------------------------------------------------
# Every string a request can carry, and why it cannot name a server path.
_REQUEST_STRINGS = {
    "AnnotateRequest.id": "echoed back, never used as a name",
    "AnnotateRequest.text": "the caption",
    "SearchConceptsRequest.query": "normalised and looked up in memory",
    "GetConceptRequest.cui": "looked up in the loaded index's in-memory tables",
    "AnnotateOptions.profile": "checked against the shipped profile names (see test below)",
    "NameList.values": "semantic type / group names and SABs, resolved in memory",
    "HealthCheckRequest.service": "health service name, a dict key",
}


def _request_types() -> set[str]:
    names = set()
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            names.add(method.input_type.full_name)
    return names


def _string_fields(desc: object, seen: set[str]) -> Iterator[str]:
    from google.protobuf.descriptor import FieldDescriptor

    name = desc.name  # type: ignore[attr-defined]
    if name in seen:
        return
    seen.add(name)
    for f in desc.fields:  # type: ignore[attr-defined]
        if f.type == FieldDescriptor.TYPE_STRING or f.type == FieldDescriptor.TYPE_BYTES:
            yield f"{name}.{f.name}"
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            yield from _string_fields(f.message_type, seen)


def test_security_no_request_field_can_name_a_server_path() -> None:
    seen: set[str] = set()
    found = set()
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            found |= set(_string_fields(method.input_type, seen))
    found.add("HealthCheckRequest.service")
    assert found == set(_REQUEST_STRINGS), (
        "a request message gained or lost a string field; if it can name anything on the "
        "server (a path, a module, a URL), it must not — review it and update this table"
    )
    pathlike = {"path", "file", "filename", "dir", "directory", "url", "uri", "module"}
    for field in found:
        assert not pathlike & set(field.rsplit(".", 1)[1].lower().split("_")), field


@pytest.mark.parametrize(
    "profile",
    ["../profiles/rocov2", "/etc/passwd", "rocov2.yaml", "..", "ROCOV2", "rocov2/../none",
     "none\x00", "~root", "%2e%2e%2fetc"],
)
def test_security_profile_names_never_become_paths(authed: int, profile: str) -> None:
    with ConceptClient(f"127.0.0.1:{authed}", token=TOKEN, retries=0) as c:
        assert _status(
            c.annotate, "Chest", id="p", options=ExtractOptions(profile=profile)
        ) == "INVALID_ARGUMENT"


# -- no pickle, eval, or dynamic dispatch ---------------------------------------------------------
_FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill",
                      "cloudpickle", "jsonpickle"}
_FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}
_DISPATCH = {"getattr", "setattr", "delattr", "hasattr"}

# Reviewed uses of a computed attribute name: (file, enclosing function, name expression) → why
# the name cannot come from a client. A new one fails the test until someone reviews it here.
_REVIEWED_DISPATCH = {
    ("conceptsvc/model.py", "cache_key", "f.name"): "dataclass fields of ExtractOptions",
    ("conceptsvc/model.py", "__post_init__", "name"): "keys of the literal _NAME_FIELDS",
    ("conceptsvc/model.py", "check_types", "name"):
        "keys of the literal _NAME_FIELDS and literal tuples of field names",
    ("conceptsvc/dictionary.py", "__post_init__", "name"): "loop over a literal tuple",
    ("conceptsvc/config.py", "_paths_and_pairs", "name"): "loop over a literal tuple",
    ("conceptsvc/config.py", "settings_from_args", "f'_{group}__{name}'"):
        "argparse dests generated from the Settings model",
    ("conceptsvc/wire.py", "options_to_pb", "name"): "_LIST_FIELDS constant",
    ("conceptsvc/wire.py", "options_from_pb", "name"): "_LIST_FIELDS constant",
    ("conceptsvc/wire.py", "_mention", "attr"):
        "Mention dataclass field names, matched to the compiled .proto's descriptors",
    ("conceptsvc/server/servicer.py", "add_concept_service", "method.input_type.name"):
        "message names of the compiled .proto's service descriptor",
    ("conceptsvc/server/servicer.py", "add_concept_service", "method.output_type.name"):
        "message names of the compiled .proto's service descriptor",
    ("conceptsvc/server/servicer.py", "add_concept_service", "method.name"):
        "method names of the compiled .proto's service descriptor, at start-up",
    ("conceptsvc/backends/quickumls.py", "_configure", "plan.similarity"):
        "validated against model.SIMILARITIES in _plan before it is used",
    ("conceptsvc/backends/quickumls.py", "as_dict", "k"): "dataclass field names",
    ("benchmarks/bench.py", "_run", "BENCHMARKS[name]"):
        "developer CLI, a key of a literal dict of module names",
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    function: str
    what: str
    key: tuple[str, str, str] | None = None  # for dynamic dispatch: the review key


def _qualname_map(tree: ast.AST) -> dict[ast.AST, str]:
    owner: dict[ast.AST, str] = {}

    def visit(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            here = name
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                here = child.name
            owner[child] = here
            visit(child, here)

    visit(tree, "<module>")
    return owner


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def audit_source(source: str, path: str) -> list[Finding]:
    """Everything in ``source`` that could deserialise or dispatch on untrusted input."""
    tree = ast.parse(source, filename=path)
    owner = _qualname_map(tree)
    out: list[Finding] = []

    def add(node: ast.AST, what: str, key: tuple[str, str, str] | None = None) -> None:
        out.append(Finding(path, getattr(node, "lineno", 0), owner.get(node, "?"), what, key))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in _FORBIDDEN_MODULES:
                    add(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in _FORBIDDEN_MODULES:
                add(node, f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            fn = _dotted(node.func)
            base = fn.rsplit(".", 1)[-1]
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            if fn in _FORBIDDEN_BUILTINS or fn == "builtins.eval" or fn == "builtins.exec":
                add(node, f"call to {fn}()")
            elif fn in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                add(node, f"{fn}() can construct arbitrary objects; use yaml.safe_load")
            elif base == "load" and fn.split(".")[0] in ("np", "numpy"):
                flag = kwargs.get("allow_pickle")
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    add(node, "np.load() without allow_pickle=False")
            elif fn in ("importlib.import_module", "import_module"):
                arg = node.args[0] if node.args else None
                if not isinstance(arg, ast.Constant):
                    key = (path, owner.get(node, "?"), ast.unparse(arg) if arg else "")
                    add(node, f"import_module({key[2]}) with a computed name", key)
            elif fn in _DISPATCH and len(node.args) >= 2:
                name = node.args[1]
                if not isinstance(name, ast.Constant):
                    key = (path, owner.get(node, "?"), ast.unparse(name))
                    add(node, f"{fn}(..., {key[2]}) with a computed name", key)
        elif isinstance(node, ast.Subscript):
            target = node.value
            if isinstance(target, ast.Call) and _dotted(target.func) in ("globals", "locals",
                                                                          "vars"):
                add(node, f"{_dotted(target.func)}()[...] lookup")
    return out


def _package_files() -> Iterator[Path]:
    for root in SCANNED:
        for p in sorted(root.rglob("*.py")):
            if "_proto" not in p.parts:
                yield p


def test_security_ast_rule_catches_what_it_must() -> None:
    bad = {
        "import pickle\n": "import pickle",
        "from marshal import loads\n": "from marshal",
        "import dill as d\n": "import dill",
        "x = eval(request.text)\n": "eval",
        "exec(code)\n": "exec",
        "m = __import__(name)\n": "__import__",
        "import yaml\nyaml.load(s)\n": "safe_load",
        "import yaml\nyaml.unsafe_load(s)\n": "safe_load",
        "import numpy as np\nnp.load(p)\n": "allow_pickle",
        "import numpy as np\nnp.load(p, allow_pickle=True)\n": "allow_pickle",
        "def f(self, request):\n    return getattr(self, request.method)()\n": "getattr",
        "setattr(obj, field_from_client, 1)\n": "setattr",
        "globals()[request.name]()\n": "globals",
        "import importlib\nimportlib.import_module(request.plugin)\n": "import_module",
    }
    for source, needle in bad.items():
        findings = audit_source(source, "snippet.py")
        assert findings and needle in findings[0].what, (source, findings)
    good = (
        "import yaml\nyaml.safe_load(s)\n"
        "import numpy as np\nnp.load(p, mmap_mode='r', allow_pickle=False)\n"
        "getattr(obj, 'close', None)\n"
        "import importlib\nimportlib.import_module('json')\n"
    )
    assert audit_source(good, "snippet.py") == []


def test_security_no_pickle_eval_or_unreviewed_dispatch_in_the_package() -> None:
    problems = []
    used_reviews = set()
    for path in _package_files():
        rel = path.relative_to(ROOT).as_posix()
        for f in audit_source(path.read_text(encoding="utf-8"), rel):
            if f.key is not None and f.key in _REVIEWED_DISPATCH:
                used_reviews.add(f.key)
                continue
            problems.append(f"{f.path}:{f.line} in {f.function}: {f.what}")
    assert problems == [], (
        "possible deserialisation or dynamic dispatch on untrusted input:\n  "
        + "\n  ".join(problems)
        + "\nIf a computed attribute name provably cannot come from a client, add it to "
        "_REVIEWED_DISPATCH with the reason."
    )
    stale = set(_REVIEWED_DISPATCH) - used_reviews
    assert not stale, f"reviewed entries that no longer exist (remove them): {sorted(stale)}"


def test_security_ruff_bans_pickle_eval_exec() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    selected = set(config["tool"]["ruff"]["lint"]["select"])
    assert {"S301", "S307", "S102"} <= selected
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "S301,S307,S102",
         "--output-format", "concise", *(str(d.relative_to(ROOT)) for d in SCANNED)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # and the rules do fire on a bad file (so the check above can fail)
    probe = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select",
         "S301,S307,S102", "--output-format", "concise", "--stdin-filename", "probe.py", "-"],
        input="import pickle\npickle.loads(b'')\neval('1')\nexec('x=1')\n",
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 1
    assert all(code in probe.stdout for code in ("S301", "S307", "S102")), probe.stdout


# -- logs -----------------------------------------------------------------------------------------
MARKER = "ZZQX-caption-marker-7f3a9"


def _exercise(port: int, token: str | None = None) -> None:
    text = f"Chest CT {MARKER} shows pneumothorax"
    with ConceptClient(f"127.0.0.1:{port}", token=token, retries=0, timeout=10) as c:
        c.annotate(text, id="log-1")
        c.annotate(text, id="log-1")  # cache hit path
        list(c.annotate_stream([("log-2", text), ("", text), ("log-3", text * 30_000)]))
        c.search(f"{MARKER} lung")
        for call in (
            lambda: c.annotate(text, id="x", options=ExtractOptions(semantic_types=(MARKER,))),
            lambda: c.annotate(text, id="x", options=ExtractOptions(profile=MARKER)),
            lambda: c.get_concept(MARKER),
            lambda: c.annotate(text * 30_000, id="big"),
        ):
            with pytest.raises(ServiceCallError):
                call()


def test_security_caption_text_never_reaches_logs(
    index_a: Path, caplog: pytest.LogCaptureFixture, free_redis_url: str
) -> None:
    """Every log record the server emits, at every level down to DEBUG, while annotating (hits,
    misses, stream items with errors, oversize text, bad options, a Redis outage)."""
    caplog.set_level(logging.DEBUG)
    s = settings_for(index_a, redis_url=free_redis_url, redis_timeout_seconds=0.05)
    with running_server(s) as (_srv, port):
        _exercise(port)
    records = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert any("Redis" in m for m in records), "the outage should have been logged"
    assert not [m for m in records if MARKER in m]


def test_security_payload_logging_is_opt_in(
    index_a: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same capture does see the marker when payload logging is switched on — so the test
    above would notice a leak."""
    caplog.set_level(logging.DEBUG)
    with running_server(settings_for(index_a, log_payloads=True)) as (_srv, port):
        with ConceptClient(f"127.0.0.1:{port}") as c:
            c.annotate(f"Chest {MARKER}", id="opt-in")
    assert any(MARKER in r.getMessage() for r in caplog.records)


@pytest.fixture
def free_redis_url() -> str:
    """A Redis URL nobody listens on (a port we just bound and released)."""
    from conftest import free_port

    return f"redis://127.0.0.1:{free_port()}/0"


# -- the shared Redis tier ------------------------------------------------------------------------
_FORGED = pb.AnnotateResponse(
    concepts=["C0000000"],
    mentions=[pb.Mention(cui="C0000000", preferred_name="attacker-chosen", text="Chest",
                         start=0, end=5, score=1.0)],
).SerializeToString()


def _annotate_raw(port: int, text: str) -> pb.AnnotateResponse:
    """Annotate as the review's script does (the reply's ``cached`` flag included)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ConceptServiceStub(channel)  # type: ignore[no-untyped-call]
        return stub.Annotate(  # type: ignore[no-any-return]
            pb.AnnotateRequest(id="img1", text=text),
            metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10,
        )


def test_security_forged_redis_entries_are_never_served(
    index_a: Path, shared_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The security review's poison.py: whoever can write to the Redis tier stores an answer
    under the key any client can compute (the index hash from GetInfo, the default options,
    the caption), and Annotate returned the attacker's concept with ``cached: True``. Now
    nothing is read there, and an attacker who reads the Redis and overwrites the entry the
    service left (with a forged answer, or blanked) gets a miss: the engine's answer, counted,
    logged, and the entry written again."""
    prefix = "sec-poison:"
    caption = "Chest CT shows a collapsed lung."
    r = redis.Redis.from_url(shared_redis.url)
    s = settings_for(index_a, redis_url=shared_redis.url, redis_prefix=prefix, cache_size=0,
                     auth_token=TOKEN)
    try:
        with running_server(s) as (server, port):
            with ConceptClient(f"127.0.0.1:{port}", token=TOKEN) as c:
                content_hash = c.get_info().index.content_hash
            planted = prefix + result_key(content_hash, ExtractOptions().cache_key(), caption)
            r.set(planted, _FORGED, ex=600)
            first = _annotate_raw(port, caption)
            assert list(first.concepts) == ["C0817096", "C0040405", "C0032326"]
            assert not first.cached
            # the one entry the answer left, as an attacker who can read the Redis finds it
            (entry,) = set(r.keys(prefix + "*")) - {planted.encode()}
            signed = r.get(entry)
            with caplog.at_level(logging.WARNING, logger="conceptsvc.cache"):
                for forged in (_FORGED, b""):
                    r.set(entry, forged)
                    again = _annotate_raw(port, caption)
                    assert (list(again.concepts), again.cached) == (list(first.concepts), False)
                    assert r.get(entry) == signed  # the fresh answer, written over it
            assert _annotate_raw(port, caption).cached  # and served from Redis again
            assert server.metrics.value("conceptsvc_redis_rejected_total") == 2
            assert "without a valid signature" in caplog.text
    finally:
        r.delete(*r.keys(prefix + "*"))


def test_security_replicas_share_redis_entries_only_with_the_same_secret(
    index_a: Path, shared_redis: RedisServer
) -> None:
    """Signing must not cost the sharing: two servers with one secret (two replicas) answer
    each other's captions from Redis; a server with another secret misses them (and its own
    entries, under other names, leave the first ones alone)."""
    prefix = "sec-replicas:"
    captions = [text for _, text in CAPTIONS]
    secret = "replica-secret-" + "r" * 24

    def run(cache_secret: str) -> list[bool]:
        s = settings_for(index_a, redis_url=shared_redis.url, redis_prefix=prefix,
                         cache_size=0, cache_secret=cache_secret)
        with running_server(s) as (_srv, port), ConceptClient(f"127.0.0.1:{port}") as c:
            return [x.cached for x in c.annotate_batch(captions)]

    r = redis.Redis.from_url(shared_redis.url)
    try:
        assert run(secret) == [False] * 5  # the first replica fills Redis
        assert run(secret) == [True] * 5  # another one, with the same secret, reads it
        assert run(secret[::-1]) == [False] * 5  # another secret: other names, misses
        assert run(secret) == [True] * 5
        assert len(r.keys(prefix + "*")) == 10
    finally:
        r.delete(*r.keys(prefix + "*"))


# -- the locked dependency set ---------------------------------------------------------------------
def _lock_pins() -> dict[str, tuple[str, int]]:
    """name → (version, number of hashes) from requirements.lock."""
    from packaging.utils import canonicalize_name

    pins: dict[str, tuple[str, int]] = {}
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, rest = line.partition(" ")
        name, sep, version = spec.partition("==")
        assert sep, f"requirements.lock: {spec} is not pinned with =="
        pins[canonicalize_name(name)] = (version, rest.count("--hash=sha256:"))
    return pins


def test_security_lock_pins_every_dependency_with_hashes() -> None:
    """requirements.lock (what `make install`, CI and the image install with --require-hashes)
    pins every dependency of the package and of the extras the tests use, each with a hash, at
    a version inside pyproject's range. A dependency added to pyproject without `make lock`
    fails here, not in a fresh clone's install."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _lock_pins()
    assert all(n_hashes >= 1 for _, n_hashes in pins.values())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = ("dev", "report", "spark", "quickumls")  # the Makefile's install set
    wanted = [*project["dependencies"]]
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    stale = []
    for raw in wanted:
        req = Requirement(raw)
        pin = pins.get(canonicalize_name(req.name))
        if pin is None or not req.specifier.contains(pin[0], prereleases=True):
            stale.append(f"{raw} (locked: {pin[0] if pin else 'missing'})")
    assert not stale, "requirements.lock is stale; run `make lock`: " + ", ".join(stale)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "--require-hashes -r requirements.lock" in makefile
    assert "--no-deps" in makefile


def test_security_lock_respects_the_machine_constraints() -> None:
    """Pins must be installable under /etc/xdg/pip/constraints.txt where it exists (this
    machine caps some releases); a pin outside a constraint would break `make install`."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    constraints = Path("/etc/xdg/pip/constraints.txt")
    if not constraints.is_file():
        return  # nothing to respect on this machine
    pins = _lock_pins()
    for line in constraints.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        pin = pins.get(canonicalize_name(req.name))
        if pin is not None:
            assert req.specifier.contains(pin[0], prereleases=True), (line, pin)
