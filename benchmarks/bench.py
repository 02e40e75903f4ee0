"""``python -m benchmarks.bench NAME [options]``: one entry point for the benchmarks.

Each benchmark is a module ``benchmarks/bench_<name>.py`` with ``main(argv) -> int``; this
dispatcher only picks one from a fixed table (``all`` runs each with its defaults, in order, and
fails if any failed; ``umls`` runs only on its own). Benchmarks are part of ``make bench``, never
of ``make test``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from conceptsvc.grpc_io import prefer_poller_io

__all__ = ["BENCHMARKS", "NOT_IN_ALL", "main"]

# name → module; a fixed table, so nothing is imported by a name typed on the command line.
BENCHMARKS = {
    "index": "benchmarks.bench_index",
    "extract": "benchmarks.bench_extract",
    "peers": "benchmarks.bench_peers",
    "service": "benchmarks.bench_service",
    "capacity": "benchmarks.bench_capacity",
    "context": "benchmarks.bench_context",
    "umls": "benchmarks.bench_umls",
}
# Not run by ``all``: generates and builds two 16M-row releases and measures each for tens of
# minutes; its own target, ``make bench-umls``.
NOT_IN_ALL = frozenset({"umls"})


def _run(name: str, argv: Sequence[str]) -> int:
    module = importlib.import_module(BENCHMARKS[name])
    return int(module.main(list(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or (args[0] not in BENCHMARKS and args[0] != "all"):
        print(f"usage: python -m benchmarks.bench {{{','.join([*BENCHMARKS, 'all'])}}} "
              "[options]\n(`... NAME --help` shows a benchmark's options)", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    name, rest = args[0], args[1:]
    if name != "all":
        return _run(name, rest)
    failed = []
    for each in (b for b in BENCHMARKS if b not in NOT_IN_ALL):
        print(f"== benchmark {each} ==", flush=True)
        try:
            code = _run(each, rest)
        except Exception as exc:  # one failing benchmark must not hide the others' results
            print(f"benchmark {each} failed: {exc}", file=sys.stderr)
            code = 1
        if code:
            failed.append(each)
    if failed:
        print(f"failed benchmarks: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    # The benchmarks' own clients, and the services they start, on the socket layer the
    # `conceptsvc` command picks (conceptsvc.grpc_io), unless GRPC_EXPERIMENTS is set.
    prefer_poller_io(os.environ, sys.modules)
    sys.exit(main())
