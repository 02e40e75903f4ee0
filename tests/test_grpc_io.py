"""conceptsvc.grpc_io: which gRPC socket layer the ``conceptsvc`` command's processes run on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from service_helpers import build_index_a, serve_subprocess

from conceptsvc.grpc_io import POLLER_IO, prefer_poller_io

# An echo server and one call in a fresh process, so that gRPC starts with the environment
# the test gives it; gRPC reports experiment names it does not know on stderr when it starts.
_ECHO = """
from concurrent import futures
import grpc
server = grpc.server(futures.ThreadPoolExecutor(2))
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
    "t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    assert channel.unary_unary("/t.Echo/Echo")(b"ping", timeout=10) == b"ping"
server.stop(None)
print("ok")
"""


def test_grpc_io_sets_the_poller_layer_before_grpc_starts() -> None:
    environ: dict[str, str] = {"PATH": "/bin"}
    assert prefer_poller_io(environ, {"os", "sys"})
    assert environ == {"PATH": "/bin", "GRPC_EXPERIMENTS": POLLER_IO}


@pytest.mark.parametrize("chosen", ["", "-event_engine_client", "some_other_experiment"])
def test_grpc_io_leaves_a_users_own_choice(chosen: str) -> None:
    environ = {"GRPC_EXPERIMENTS": chosen}
    assert not prefer_poller_io(environ, set())
    assert environ == {"GRPC_EXPERIMENTS": chosen}


def test_grpc_io_does_nothing_once_grpc_is_loaded() -> None:
    # The setting would not reach this process's gRPC, only its children's.
    environ: dict[str, str] = {}
    assert not prefer_poller_io(environ, {"grpc"})
    assert environ == {}


def _echo(experiments: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRPC_EXPERIMENTS": experiments, "GRPC_VERBOSITY": "ERROR"}
    return subprocess.run(
        [sys.executable, "-c", _ECHO], env=env, capture_output=True, text=True, timeout=60
    )


def test_grpc_io_names_are_experiments_this_grpc_knows() -> None:
    # A gRPC release that drops one of the switches would warn at every start of the service
    # and run it on the EventEngine again: this is where that shows.
    done = _echo(POLLER_IO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "Unknown experiment" not in done.stderr
    # ... and the check above is one that can fail:
    unknown = _echo(POLLER_IO + ",-no_such_switch")
    assert "Unknown experiment: no_such_switch" in unknown.stderr


def _children_environ(pid: int) -> list[dict[str, str]]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    out = []
    for child in children:
        raw = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        out.append(dict(e.decode().split("=", 1) for e in raw if b"=" in e))
    return out


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize(
    ("given", "expected"), [(None, POLLER_IO), ("", ""), ("-event_engine_client",) * 2]
)
def test_grpc_io_serve_workers_start_on_the_chosen_layer(
    tmp_path: Path, given: str | None, expected: str
) -> None:
    # The workers are started by `conceptsvc serve` after the command chose; a process's
    # /proc environ is what it started with, so the workers show what their gRPC read.
    env = dict(os.environ)
    env.pop("GRPC_EXPERIMENTS", None)
    if given is not None:
        env["GRPC_EXPERIMENTS"] = given
    path = build_index_a(tmp_path / "idx")
    saved = os.environ.pop("GRPC_EXPERIMENTS", None)
    try:
        proc, _port = serve_subprocess("--workers", "2", "--index", str(path), env=env)
    finally:
        if saved is not None:
            os.environ["GRPC_EXPERIMENTS"] = saved
    try:
        children = _children_environ(proc.pid)
        assert children
        assert all(c.get("GRPC_EXPERIMENTS") == expected for c in children)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
