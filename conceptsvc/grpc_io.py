"""Which of gRPC's two socket layers conceptsvc's own processes run on, and why.

grpcio 1.85 moves every socket through its EventEngine by default: a call's bytes are read and
written by EventEngine threads and handed to the thread that polls the call's completion queue.
The older poller layer (``iomgr``; gRPC keeps it behind the ``event_engine_*`` experiments)
lets the polling thread do that I/O itself, one thread hand-over less at each end of a call.
For a unary call on a 2-core machine that is most of a round trip: measured on 2026-12-06
(quiet VM, ``conceptsvc serve --workers 2``, one client, back to back, interleaved rounds), the
p50 of an ``Annotate`` of a ROCOv2 caption fell from 0.52–0.65 ms to 0.36–0.39 ms and a
``Health.Check`` from 0.41–0.52 to 0.21–0.22, the client's CPU a call from 205–264 to
137–154 µs; the client's side gives most of it. The batched data path did not move
(``AnnotateBatch`` and the ``conceptsvc annotate`` runs within their noise), because it makes
few calls. BENCHMARKS.md has the runs.

gRPC reads ``GRPC_EXPERIMENTS`` once, when it starts, so the choice can only be made before a
process imports ``grpc`` — which is why it is an environment variable and not one of the
service's settings (those are read later, by a command that may already need gRPC). The
``conceptsvc`` command makes it in :func:`conceptsvc.cli.run` (its ``serve`` workers inherit
it); a program that uses :class:`conceptsvc.client.ConceptClient` in its own process chooses
for itself, by putting ``GRPC_EXPERIMENTS=`` + :data:`POLLER_IO` in its environment. Whoever
has set ``GRPC_EXPERIMENTS`` (an empty value included, which means gRPC's own defaults) is
left alone: importing a library never changes a process's gRPC.
"""

from __future__ import annotations

from collections.abc import Container, MutableMapping

__all__ = ["POLLER_IO", "prefer_poller_io"]

# gRPC's names for the three EventEngine switches: its client connections, its listeners, and
# every other endpoint (the server side of accepted connections).
POLLER_IO = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"


def prefer_poller_io(environ: MutableMapping[str, str], loaded: Container[str]) -> bool:
    """Put the poller layer into ``environ`` for a process whose gRPC has not started.

    Nothing is changed when ``GRPC_EXPERIMENTS`` is already set (the caller's choice) or when
    ``grpc`` is among the ``loaded`` module names (the setting could not take effect, and
    children of this process would then run differently from it). Returns whether it was set.
    """
    if "GRPC_EXPERIMENTS" in environ or "grpc" in loaded:
        return False
    environ["GRPC_EXPERIMENTS"] = POLLER_IO
    return True
