"""conceptsvc.grpc_io: which gRPC socket layer the ``conceptsvc`` command's processes run on."""

from __future__ import annotations

import os
import re
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


def _echo(experiments: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRPC_EXPERIMENTS": experiments, "GRPC_VERBOSITY": "ERROR", **extra}
    return subprocess.run(
        [sys.executable, "-c", _ECHO], env=env, capture_output=True, text=True, timeout=60
    )


def test_grpc_io_names_switch_gRPC_to_its_poller_sockets() -> None:
    # gRPC's `tcp` trace names the source file of each socket event: the poller layer's
    # tcp_client_posix.cc / tcp_server_posix.cc, or the EventEngine's endpoint code.
    def files(experiments: str) -> set[str]:
        done = _echo(experiments, GRPC_TRACE="tcp", GRPC_VERBOSITY="DEBUG")
        assert done.returncode == 0, done.stderr
        return set(re.findall(r"\b([a-z_]+\.cc):\d+\]", done.stderr))

    poller = files(POLLER_IO)
    assert {"tcp_client_posix.cc", "tcp_server_posix.cc", "tcp_posix.cc"} <= poller
    default = files("")  # gRPC's own choice: the EventEngine, which the test must tell apart
    assert not {"tcp_client_posix.cc", "tcp_server_posix.cc", "tcp_posix.cc"} & default


def test_grpc_io_names_are_experiments_this_grpc_knows() -> None:
    # A gRPC release that drops one of the switches would warn at every start of the service
    # and run it on the EventEngine again: this is where that shows.
    done = _echo(POLLER_IO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "Unknown experiment" not in done.stderr
    # ... and the check above is one that can fail:
    unknown = _echo(POLLER_IO + ",-no_such_switch")
    assert "Unknown experiment: no_such_switch" in unknown.stderr


def _workers_environ(pid: int) -> list[dict[str, str]]:
    """The start-up environment of each ``serve`` worker of supervisor ``pid`` (its children
    started by multiprocessing's spawn; the resource tracker is left out)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            raw = (stat.parent / "environ").read_bytes()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) != pid or b"spawn_main" not in cmdline:
            continue
        out.append(dict(e.decode().split("=", 1) for e in raw.split(b"\0") if b"=" in e))
    return out


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize(
    ("given", "expected"), [(None, POLLER_IO), ("", ""), ("-event_engine_client",) * 2]
)
def test_grpc_io_serve_workers_start_on_the_chosen_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str | None, expected: str
) -> None:
    # The workers are started by `conceptsvc serve` after the command chose; a process's
    # /proc environ is what it started with, so the workers show what their gRPC read.
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    env = {} if given is None else {"GRPC_EXPERIMENTS": given}
    path = build_index_a(tmp_path / "idx")
    proc, _port = serve_subprocess("--workers", "2", "--index", str(path), env=env)
    try:
        workers = _workers_environ(proc.pid)
        assert len(workers) == 2
        assert [w.get("GRPC_EXPERIMENTS") for w in workers] == [expected, expected]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_grpc_io_run_picks_the_layer_and_main_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from conceptsvc import cli

    calls: list[tuple[object, object]] = []
    monkeypatch.setattr(cli, "prefer_poller_io", lambda env, mods: calls.append((env, mods)))
    monkeypatch.setattr(cli, "main", lambda argv=None: 7)
    assert cli.run() == 7
    assert calls == [(os.environ, sys.modules)]


def test_grpc_io_main_leaves_the_layer_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Called in a process of the caller's (as here, where gRPC may not have started yet),
    # main must not set what that process and its later children start gRPC with.
    from conceptsvc import cli

    def refuse(env: object, mods: object) -> bool:
        raise AssertionError("main chose gRPC's socket layer")

    monkeypatch.setattr(cli, "prefer_poller_io", refuse)
    assert cli.main(["semtypes"]) == 0
    assert "T047" in capsys.readouterr().out
