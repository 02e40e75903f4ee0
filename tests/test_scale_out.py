"""Scale-out, proven on one machine: three replicas, a shared Redis, one of them killed mid-run.

Three ``conceptsvc serve`` processes on three ports share one real Redis (the cache tier);
``conceptsvc annotate`` spreads its streams over all three round-robin (``--target`` three
times). Once the batch run is well under way one replica is killed with SIGKILL — no drain, as
when a node dies — and the run must still finish with every caption annotated exactly once,
each result identical to the engine's in-process answer for that caption.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from conftest import RedisServer, free_port
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import CACHE_SECRET

from conceptsvc.client import ConceptClient
from conceptsvc.embedded import demo_index_path
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex

DEMO_CAPTIONS = Path(__file__).parent.parent / "conceptsvc" / "data" / "demo" / "captions.csv"
REPEATS = 8  # 8 x the ~500 demo captions: long enough to kill a replica well inside the run


@dataclass
class Replica:
    """One ``conceptsvc serve`` process in its own session (so its whole group can be killed)."""

    port: int
    metrics_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def annotated(self) -> float:
        """Captions this replica has answered (any cache tier or the engine), from /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(url, timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "conceptsvc_captions_annotated"
            for sample in family.samples
            if sample.name.endswith("_total")
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def start_replica(index: Path, redis_url: str, workdir: Path, n: int) -> Replica:
    port, metrics_port = free_port(), free_port()
    log = workdir / f"replica-{n}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCEPTSVC_")}
    env["CONCEPTSVC_CACHE_SECRET"] = CACHE_SECRET  # one for all replicas: they share entries
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conceptsvc.cli", "serve", "--index", str(index),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
             "--redis-url", redis_url, "--grace-seconds", "2"],
            env=env,
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    return Replica(port, metrics_port, proc, log)


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return demo_index_path(tmp_path / "demo-cache")


@pytest.fixture
def replicas(index_dir: Path, redis_server: RedisServer, tmp_path: Path) -> Iterator[list[Replica]]:
    started = [start_replica(index_dir, redis_server.url, tmp_path, n) for n in range(3)]
    try:
        for replica in started:
            with ConceptClient(replica.target) as client:
                try:
                    client.wait_until_serving(timeout=60)
                except Exception:
                    pytest.fail(replica.log.read_text(errors="replace"))
        yield started
    finally:
        for replica in started:
            replica.kill()


def write_corpus(path: Path) -> dict[str, str]:
    """The demo captions, REPEATS times with distinct ids; every other round verbatim, so
    replicas also answer repeats (from the shared cache) and not only fresh text."""
    with DEMO_CAPTIONS.open(newline="", encoding="utf-8") as fh:
        base = [(r["ID"], r["Caption"]) for r in csv.DictReader(fh)]
    corpus = {}
    for k in range(REPEATS):
        for caption_id, text in base:
            corpus[f"{caption_id}-r{k}"] = text if k % 2 else f"{text} (panel {k})"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Caption"])
        writer.writerows(corpus.items())
    return corpus


@pytest.mark.slow
def test_scale_out_three_replicas_survive_a_killed_replica(
    replicas: list[Replica], redis_server: RedisServer, index_dir: Path, tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "corpus.csv")
    out = tmp_path / "annotations.jsonl"
    args = [sys.executable, "-m", "conceptsvc.cli", "annotate", str(tmp_path / "corpus.csv"),
            "--out", str(out), "--batch-size", "16", "--concurrency", "3", "--quiet"]
    for replica in replicas:
        args += ["--target", replica.target]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCEPTSVC_")}
    client_log = tmp_path / "annotate.log"
    victim, survivors = replicas[0], replicas[1:]
    with client_log.open("wb") as sink:
        run = subprocess.Popen(args, env=env, stdout=sink, stderr=sink)
    try:
        # Kill the victim once it has done a real share of the work, while the run goes on.
        deadline = time.monotonic() + 120
        while victim.annotated() < len(corpus) * 0.05:
            assert run.poll() is None, "the run ended before a replica could be killed; " + (
                client_log.read_text(errors="replace")
            )
            assert time.monotonic() < deadline, "the victim replica never got work"
            time.sleep(0.02)
        before = [r.annotated() for r in survivors]
        assert run.poll() is None, "the run ended before a replica could be killed"
        victim.kill()
        assert victim.proc.returncode == -signal.SIGKILL
        status = run.wait(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert status == 0, client_log.read_text(errors="replace")

    # Every caption exactly once, in input order, each with the engine's own answer.
    lines = out.read_text(encoding="utf-8").splitlines()
    results = [json.loads(line) for line in lines]
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) == len(corpus)
    assert ids == list(corpus)
    engine = Extractor(ConceptIndex.load(index_dir))
    for result in results:
        expected = engine.extract(corpus[result["id"]])
        assert result["concepts"] == list(expected.concepts), result["id"]
    # The survivors finished the run: both served captions after the kill.
    after = [r.annotated() for r in survivors]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    # All three replicas shared one Redis cache tier.
    with redis.Redis.from_url(redis_server.url) as cache:
        assert cache.dbsize() > 0
