"""Child processes that the benchmarks measure: a process tree's memory, and a command run
with its wall time, CPU time and peak memory, under a time limit and a memory guard.

A figure "per process" needs each measured stage in a process of its own; a build or a server
is a tree (``index build --workers``, ``serve --workers``), so memory is summed over the tree,
sampled while it runs (RSS counts the pages the workers share once per process; PSS shares
them out, and is what "RSS in all" of a multi-process server should be read as).
"""

from __future__ import annotations

import os
import random
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import CHECKOUT

__all__ = ["free_port", "process_tree", "run_measured", "tree_memory_kb"]

_KB = re.compile(r"^(VmRSS|VmHWM|Pss):\s+(\d+) kB", re.M)
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()
_port_rng = random.Random()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux's default if unreadable)."""
    try:
        lo, hi = (int(v) for v in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return lo, hi


def free_port() -> int:
    """A port nothing listens on, for a server started on a given number (Redis, or a service
    whose port is chosen before it starts; the tests use it too).

    Not one from ``bind(port 0)``: those come from the kernel's ephemeral range, where every
    outgoing connection (a client's, a replica's to Redis) also takes its source port, so
    between the pick and the server's own bind a connection could take it. That happened once
    (a replica of tests/test_scale_out.py: "Address already in use" on its metrics port, in a
    fresh-clone CI run). A port outside that range is only ever taken by an explicit bind:
    each one is handed out once a process, and checked free by binding it.
    """
    lo, hi = ephemeral_range()
    start, stop = (10_000, lo) if lo > 11_000 else (hi + 1, 65_536)
    for _ in range(1000):
        port = _port_rng.randrange(start, stop)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in [{start}, {stop}) after 1,000 tries")


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (those alive now)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                continue
    return out


def tree_memory_kb(root: int) -> dict[str, int]:
    """Sum over the tree of ``root``: ``rss`` (VmRSS), ``hwm`` (each process's peak RSS) and
    ``pss`` (proportional set size: shared pages divided among their users); and
    ``largest_hwm``, the largest single process's peak RSS; in kB."""
    total = {"rss": 0, "hwm": 0, "pss": 0, "largest_hwm": 0}
    for pid in process_tree(root):
        for name, key in (("status", None), ("smaps_rollup", "pss")):
            try:
                text = Path(f"/proc/{pid}/{name}").read_text()
            except OSError:
                continue
            for field, kb in _KB.findall(text):
                k = {"VmRSS": "rss", "VmHWM": "hwm", "Pss": "pss"}[field]
                if key is None or k == key:
                    total[k] += int(kb)
                if k == "hwm":
                    total["largest_hwm"] = max(total["largest_hwm"], int(kb))
    return total


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (it was started in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_measured(
    cmd: Sequence[str],
    *,
    log_path: Path,
    stdout_path: Path | None = None,
    timeout: float | None = None,
    max_rss_mb: float | None = None,
    address_space_mb: float | None = None,
    env: Mapping[str, str] | None = None,
    sample_every: float = 0.25,
) -> dict[str, Any]:
    """Run ``cmd`` from the checkout, stderr (and stdout, unless ``stdout_path``) to
    ``log_path``; return its figures.

    ``wall_s``; ``cpu_s`` (the child and the descendants it waited for, from ``wait4``);
    ``peak_rss_mb`` (the largest single process's peak RSS, its VmHWM, sampled: wait4's
    ru_maxrss would count the harness's own pages that a forked child held before its exec);
    ``peak_tree_rss_mb`` and ``peak_tree_pss_mb`` (the tree's summed RSS/PSS, sampled every
    ``sample_every`` s).
    The child runs in a session of its own, so that the whole tree can be stopped: past
    ``timeout`` seconds, or when the tree's RSS passes ``max_rss_mb``, it is killed and the
    result has ``error`` saying why ("did not finish in 600 s", "stopped at 8,192 MB RSS ...");
    ``address_space_mb`` also sets RLIMIT_AS in the child, so that an allocation beyond it
    fails there instead of swapping the machine. A non-zero exit gives ``error`` with the last
    line of the log. Never raises for the child's failure.
    """
    limit = None if address_space_mb is None else int(address_space_mb * 2**20)

    def limit_address_space() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    preexec: Callable[[], None] | None = limit_address_space if limit is not None else None
    t0 = time.monotonic()
    peak_rss = peak_pss = peak_one = 0
    error: str | None = None
    with log_path.open("wb") as log, (
        stdout_path.open("wb") if stdout_path is not None else log
    ) as out:
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=log, cwd=CHECKOUT, start_new_session=True,
            env=None if env is None else {**os.environ, **env}, preexec_fn=preexec,
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            mem = tree_memory_kb(proc.pid)
            peak_rss, peak_pss = max(peak_rss, mem["rss"]), max(peak_pss, mem["pss"])
            peak_one = max(peak_one, mem["largest_hwm"])
            elapsed = time.monotonic() - t0
            if timeout is not None and elapsed > timeout:
                error = f"did not finish in {timeout:,.0f} s"
            elif max_rss_mb is not None and mem["rss"] > max_rss_mb * 1024:
                error = (f"stopped at {mem['rss'] / 1024:,.0f} MB RSS (limit "
                         f"{max_rss_mb:,.0f} MB) after {elapsed:,.0f} s")
            if error is not None:
                _kill_tree(proc)
                _pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(sample_every)
    proc.returncode = os.waitstatus_to_exitcode(status)
    _kill_tree(proc)  # anything it left behind in its group
    result: dict[str, Any] = {
        "wall_s": round(time.monotonic() - t0, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(peak_one / 1024),
        "peak_tree_rss_mb": round(peak_rss / 1024),
        "peak_tree_pss_mb": round(peak_pss / 1024),
        "returncode": proc.returncode,
    }
    if error is None and proc.returncode != 0:
        said = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        error = f"exited with status {proc.returncode}: {(said or ['no output'])[-1].strip()}"
    if error is not None:
        result["error"] = error
    return result
