"""``conceptsvc serve`` as a child process: the ready line it prints, and how to start one.

The CLI announces readiness with one line on stdout (:data:`READY_LINE`); whoever starts the
service as a subprocess — the demo, the benchmarks, the soak, the tests — finds the bound port
in that line with :data:`READY_RE`. Both live here so the format is written down once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from conceptsvc.errors import ConfigError

__all__ = ["READY_LINE", "READY_RE", "ready_line", "spawn_server"]

READY_LINE = "conceptsvc serving on {host}:{port} with {workers} worker(s)"
READY_RE = re.compile(r"conceptsvc serving on (\S+):(\d+)")


def ready_line(host: str, port: int, workers: int) -> str:
    return READY_LINE.format(host=host, port=port, workers=workers)


def spawn_server(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    prefix: Sequence[str] = (),
) -> tuple[subprocess.Popen[str], int]:
    """Start ``conceptsvc serve --port 0 ARGS`` and block until it is ready.

    Returns the process (stdout/stderr are pipes; its stdout has been read up to the ready
    line) and the port it bound. A process that exits or prints something else first is killed
    and reported as a :class:`ConfigError` with the tail of its stderr. ``prefix`` runs the
    service under another command (a profiler: ``py-spy record ... --``), whose own lines
    (``py-spy>`` ones, blank ones) may come first.
    """
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "conceptsvc.cli", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=Path(cwd) if cwd is not None else None,
    )
    assert proc.stdout is not None  # stdout=PIPE above
    line = proc.stdout.readline()
    while prefix and line and (line.startswith("py-spy>") or not line.strip()):
        line = proc.stdout.readline()
    match = READY_RE.search(line)
    if match is None:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise ConfigError(f"the service did not start: {line!r}\n{err[-2000:]}")
    return proc, int(match.group(2))
