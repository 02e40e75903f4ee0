"""The port picker (``benchmarks.processes.free_port``) that every server a test or a benchmark
starts on a given port relies on: a port it hands out must not be one an outgoing connection
can take."""

from __future__ import annotations

import socket

from benchmarks.processes import ephemeral_range, free_port


def test_free_port_is_outside_the_ephemeral_range_free_and_never_repeated() -> None:
    lo, hi = ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(not lo <= p <= hi for p in ports)  # the kernel's source ports: [lo, hi] only
    for port in ports[:20]:  # and each can be bound (nothing else holds it)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
