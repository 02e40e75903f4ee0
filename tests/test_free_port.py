"""The suite's own port picker (``conftest.free_port``), which every server a test starts on a
given port relies on: a port it hands out must not be one an outgoing connection can take."""

from __future__ import annotations

import socket

from conftest import _ephemeral_range, free_port


def test_free_port_is_below_the_ephemeral_range_free_and_never_repeated() -> None:
    lo, _ = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(p < lo for p in ports)  # the kernel gives source ports from [lo, hi] only
    for port in ports[:20]:  # and each can be bound (nothing else holds it)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
