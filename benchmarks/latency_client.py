"""Unary ``Annotate`` latency from a client process of its own.

``python -m benchmarks.latency_client TARGET --clients N --requests R --texts FILE`` prints one
JSON object: the call times in seconds, per client thread. It runs as a separate process because
gRPC picks its socket layer once, when a process starts it (:mod:`conceptsvc.grpc_io`): the
service benchmark measures a client on the poller layer (as ``conceptsvc`` runs its clients)
and one on gRPC's default layer (a program that left ``GRPC_EXPERIMENTS`` unset) by starting
this module with each environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "measure"]


def measure(target: str, texts: Sequence[str], clients: int, per_client: int) -> dict[str, object]:
    """``clients`` threads, each with its own connection, call ``Annotate`` ``per_client``
    times back to back (after one call outside the measurement, which connects); every call's
    time, the wall time from when all had connected, and the ``GRPC_EXPERIMENTS`` gRPC read."""
    from conceptsvc.client import ConceptClient

    samples: list[list[float]] = [[] for _ in range(clients)]
    failures: list[BaseException] = []
    began: list[float] = []  # when every client has connected: the measurement's start
    start = threading.Barrier(clients, action=lambda: began.append(time.perf_counter()))

    def run(k: int) -> None:
        try:
            with ConceptClient(target, timeout=30) as c:
                c.annotate(texts[k % len(texts)])
                start.wait()
                for i in range(per_client):
                    text = texts[(k * per_client + i) % len(texts)]
                    t0 = time.perf_counter()
                    c.annotate(text)
                    samples[k].append(time.perf_counter() - t0)
        except BaseException as exc:
            failures.append(exc)
            start.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.perf_counter()
    if failures:
        raise failures[0]
    # the layer this process's gRPC started with, so that the caller can check it
    return {"samples": samples, "wall_s": end - began[0],
            "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="HOST:PORT of the service")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--requests", type=int, default=400, help="calls per client")
    parser.add_argument("--texts", type=Path, required=True,
                        help="a JSON list of caption texts (called in turn)")
    args = parser.parse_args(argv)
    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    json.dump(measure(args.target, texts, args.clients, args.requests), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
