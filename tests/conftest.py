"""Shared test fixtures: real Redis servers, real fixture files.

Redis is a real dependency, so tests that exercise the Redis tier talk to a real
``redis-server``. Each test session starts its own private servers on free ports (so tests can
stop, restart and flush them without touching anybody else's Redis). If the binary is missing
the fixture fails loudly — it never skips: ``make install`` installs Debian's redis-server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from benchmarks.processes import free_port

# gRPC's fork handlers stop and restart its pollers around every fork() of a process that has
# used gRPC. PySpark starts its JVM with Popen(preexec_fn=...), a fork, in this process after
# earlier tests ran gRPC clients and servers here; in 2 of 6 runs of tests/test_server*.py,
# test_soak.py, test_spacy_component.py and test_spark.py the restart closed a descriptor the
# JVM's new stdin pipe had just taken (gRPC logged "epoll_wait error: Bad file descriptor"), and
# the JVM, whose stdin closed, exited before reporting its port (JAVA_GATEWAY_EXITED). Nothing
# the tests run forks a process that goes on using gRPC (the service spawns its workers), so the
# handlers are switched off before anything imports grpc (0 of 8 runs failed so).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

if TYPE_CHECKING:
    from conceptsvc.index import ConceptIndex, IndexBuilder

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class RedisServer:
    """A private redis-server process that a test may stop, restart and flush."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed; the Redis tests need a real server. "
                "Run `make install` (installs Debian's redis-server) or apt-get install it."
            )
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private Redis for the whole session, for tests that only read and write."""
    server = RedisServer(port=free_port(), workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def build_engine_index(out: Path) -> Path:
    """Build a real index from ``fixtures/engine_dictionary.tsv`` (the extraction tests' data)."""
    from conceptsvc.index import IndexBuilder

    builder = IndexBuilder(source_release="engine-test-fixture")
    rows = [
        line.split("\t")
        for line in (FIXTURES / "engine_dictionary.tsv").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    for cui, name, tuis, *_ in rows:
        builder.set_concept(cui, preferred_name=name, semantic_types=tuis.split(","))
    for cui, _name, _tuis, string, sab, tty, flags in rows:
        builder.add_term(cui, string, sab=sab, tty=tty, flags=int(flags))
    return builder.write(out)


@pytest.fixture(scope="session")
def engine_index_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of the engine fixture index, built once per session."""
    return build_engine_index(tmp_path_factory.mktemp("engine") / "index")


LARGE_INDEX_KEYS = 2_050_000
"""Keys of the large test index: just above the 2M keys at which the compiled engine used to
be switched off (issue 13)."""
LARGE_AMBIGUOUS = ("left", 300)
"""A caption word the large index maps to this many extra concepts (beyond the ranking bound,
``abbreviations.MAX_CANDIDATES``)."""


def large_words() -> list[str]:
    """The 8,000 made-up tokens of the large index's synthetic keys ("bacedi", ...)."""
    syl = "ba ce di fo gu ha ji ko lu me ni po qu ra se ti vu wa xe zo".split()
    return [a + b + c for a in syl for b in syl for c in syl]


def builder_from(index: ConceptIndex, source_release: str) -> IndexBuilder:
    """An :class:`IndexBuilder` holding every concept and term of ``index`` (its preferred
    names, semantic types, and each key's postings with their sources, term types and
    flags), for a test index that extends a real one."""
    from conceptsvc.index import IndexBuilder

    b = IndexBuilder(source_release=source_release)
    for cui in index.cuis:
        name, types = index.name_and_types(cui) or (cui, ())
        b.set_concept(cui, preferred_name=name, semantic_types=types)
    for kid in range(index.n_keys):
        for p in index.postings_of(kid):
            b.add_term(p.cui, p.string, sab=p.sab, tty=p.tty, flags=p.flags)
    return b


def build_large_index(out: Path) -> Path:
    """The demo dictionary plus synthetic keys: more than 2M keys in all.

    Every synthetic key is a real posting (one of ~512k concepts, four keys each) of two or
    three made-up tokens; one in ten starts with a caption word ("lung bacedi"), so captions
    reach into the synthetic part of the trie. The keys are written already normalised and
    handed to :meth:`IndexBuilder.prime_keys`, which skips normalising them: the build costs
    ~20 s and ~1.4 GB, once per session.
    """
    import random

    from conceptsvc.embedded import demo_index

    demo = demo_index(out.parent / "demo-cache")
    b = builder_from(demo, "large-test-index")
    rng = random.Random(13)
    words = large_words()
    anchors = ("left", "right", "lung", "liver", "chest", "ct", "mass", "bone", "artery")
    keys: dict[str, None] = {}
    while len(keys) < LARGE_INDEX_KEYS - demo.n_keys:
        head = anchors[len(keys) % 9] if len(keys) % 10 == 0 else rng.choice(words)
        tail = " ".join(rng.choices(words, k=rng.choice((1, 2, 2))))
        keys[f"{head} {tail}"] = None
    strings = list(keys)
    del keys
    b.prime_keys(strings, strings)
    tuis = ("T047", "T033", "T023", "T060", "T121", "T061", "T029")
    cui = ""
    for i, s in enumerate(strings):
        if i % 4 == 0:
            cui = f"C8{i // 4:07d}"
            b.set_concept(cui, preferred_name=s, semantic_types=(tuis[i % 7],))
        b.add_term(cui, s, sab="SYNTH", tty="PT")
    word, n = LARGE_AMBIGUOUS
    for k in range(n):
        c = f"C7{k:07d}"
        b.set_concept(c, preferred_name=f"{word} {words[k]}", semantic_types=(tuis[k % 7],))
        b.add_term(c, word, sab="SYNTH", tty="SY")
    return b.write(out)


@pytest.fixture(scope="session")
def large_index_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of the large (> 2M keys) index, built once per session."""
    return build_large_index(tmp_path_factory.mktemp("large") / "index")


@pytest.fixture(scope="module")
def demo_index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded demo dictionary compiled into a fresh directory (its real build path)."""
    from conceptsvc.embedded import demo_index

    return demo_index(tmp_path_factory.mktemp("demo-cache")).path


@pytest.fixture(scope="module")
def target(demo_index_dir: Path) -> Iterator[str]:
    """Address of a real in-process service (port 0) on the demo dictionary."""
    from conceptsvc.config import load_settings
    from conceptsvc.extractor import Extractor
    from conceptsvc.index import ConceptIndex
    from conceptsvc.server.app import create_server

    server, port = create_server(
        load_settings(port=0, workers=1, host="127.0.0.1"),
        extractor=Extractor(ConceptIndex.load(demo_index_dir)),
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)
