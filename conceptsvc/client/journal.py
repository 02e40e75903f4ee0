"""The resume journal: which captions of a batch run are done, durable across ``kill -9``.

A run over millions of captions will be interrupted — by an operator, an OOM killer, a reboot.
The journal is what lets the rerun continue instead of starting over, without losing or
duplicating a caption:

* It lives in a work directory whose name carries a hash of the input and the options, so a
  rerun with the same arguments finds it and a run with different ones does not (``run.json``
  records what the hash was made of).
* ``journal.jsonl`` is append-only; each finished caption is one line ``{"seq": N, "r": {...}}``
  where ``seq`` is the caption's position in the input and ``r`` its result in the canonical
  JSON form of :mod:`conceptsvc.client.outputs`. A batch of lines goes out in one ``write``, so
  a kill leaves at most one torn line at the end; opening the journal cuts that line off (it is
  simply annotated again). Lines are fsync'd at most every ``sync_interval`` seconds and on
  close: a killed *process* loses nothing that was written (the page cache survives it); an OS
  crash can lose the last fraction of a second, which the rerun redoes.
* Only one process may use a work directory at a time (``flock``, released by the kernel even
  on ``kill -9``).

The final outputs are rendered from the journal in ``seq`` order, never in completion order,
so a run interrupted five times produces the same bytes as one that never was.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence, Set
from pathlib import Path
from types import TracebackType
from typing import Any

from conceptsvc.client.outputs import atomic_write_text, dumps
from conceptsvc.errors import ClientError

__all__ = ["Journal", "SeqSet"]

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
STATE = "run.json"
LOCK = "lock"
_MISSING = array("q", [-1])


class SeqSet(Set[int]):
    """A set of caption seqs as one byte per seq (1 = in the set).

    A ``set[int]`` of a million seqs takes ~70 MB of int objects and hash table; this takes 1 MB,
    so the client's memory stays flat in the number of captions.
    """

    def __init__(self, seqs: Iterator[int] | Sequence[int] = ()) -> None:
        self._flags = bytearray()
        self._count = 0
        for seq in seqs:
            self.add(seq)

    def add(self, seq: int) -> None:
        if seq < 0:
            raise ValueError(f"a seq is >= 0, got {seq}")
        if seq >= len(self._flags):
            # Grow geometrically: one extend per doubling, not one per caption.
            self._flags.extend(bytes(max(seq + 1, 2 * len(self._flags), 1024) - len(self._flags)))
        if not self._flags[seq]:
            self._flags[seq] = 1
            self._count += 1

    def __contains__(self, seq: object) -> bool:
        return (isinstance(seq, int) and 0 <= seq < len(self._flags)
                and self._flags[seq] == 1)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        flags, seq = self._flags, self._flags.find(1)
        while seq >= 0:
            yield seq
            seq = flags.find(1, seq + 1)

    @property
    def nbytes(self) -> int:
        """Bytes held for the flags (one per seq up to the largest, plus growth slack)."""
        return len(self._flags)

    def __repr__(self) -> str:
        return f"SeqSet({len(self)} seqs)"


class Journal:
    """Append-only, crash-tolerant record of completed captions in ``work_dir``."""

    def __init__(self, work_dir: Path, *, sync_interval: float = 0.2) -> None:
        self.work_dir = work_dir
        self.sync_interval = sync_interval
        work_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(work_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ClientError(
                f"another conceptsvc annotate run is using {work_dir} (same input, options and "
                "output); wait for it to finish or stop it first."
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        self.path = work_dir / JOURNAL
        self.torn_bytes = 0
        self.bad_lines = 0
        self.done = SeqSet()
        self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._last_sync = time.monotonic()
        self._dirty = False

    # -- state (run.json) --------------------------------------------------------------------
    def load_state(self) -> dict[str, Any] | None:
        p = self.work_dir / STATE
        if not p.is_file():
            return None
        try:
            state: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ClientError(
                f"{p} is unreadable ({exc}); remove {self.work_dir} to start this run afresh."
            ) from exc
        return state

    def save_state(self, state: Mapping[str, Any]) -> None:
        atomic_write_text(self.work_dir / STATE, json.dumps(state, indent=2, sort_keys=True) + "\n")

    # -- recovery ------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Load the finished seqs; cut a torn last line so that appends start on a fresh line."""
        if not self.path.exists():
            return
        good_end = 0
        with self.path.open("rb") as fh:
            offset = 0
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # torn: the process died inside the write of this line
                seq = _parse_seq(raw)
                if seq is None:
                    self.bad_lines += 1
                    log.warning(
                        "%s: skipping an unreadable journal line at byte %d; that caption will "
                        "be annotated again", self.path, offset,
                    )
                else:
                    self.done.add(seq)
                offset += len(raw)
                good_end = offset
        size = self.path.stat().st_size
        if size > good_end:
            self.torn_bytes = size - good_end
            log.info("%s: cutting a torn last line (%d bytes)", self.path, self.torn_bytes)
            with self.path.open("r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())

    # -- writing -------------------------------------------------------------------------------
    def append(self, results: Sequence[tuple[int, Mapping[str, Any]]]) -> None:
        """Record finished captions; a seq already recorded is ignored."""
        lines = []
        for seq, result in results:
            if seq in self.done:
                continue
            self.done.add(seq)
            lines.append(dumps({"seq": seq, "r": result}) + "\n")
        if not lines:
            return
        data = "".join(lines).encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._dirty = True
        if time.monotonic() - self._last_sync >= self.sync_interval:
            self.sync()

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    # -- reading back in input order ---------------------------------------------------------
    def results(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Every recorded result once, ordered by ``seq`` (first record wins on a repeat)."""
        self.sync()
        # Each seq's line offset in one flat array (8 bytes a caption, -1 = none): a dict of
        # (offset, length) tuples cost ~180 bytes a caption, 180 MB of a million-caption run.
        where = _MISSING * (max(self.done, default=-1) + 1)
        with self.path.open("rb") as fh:
            offset = 0
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break
                seq = _parse_seq(raw)
                if seq is not None:
                    if seq >= len(where):
                        where.extend(_MISSING * (seq + 1 - len(where)))
                    if where[seq] < 0:
                        where[seq] = offset
                offset += len(raw)
            for seq, off in enumerate(where):
                if off < 0:
                    continue
                fh.seek(off)
                obj = json.loads(fh.readline())
                yield seq, obj["r"]

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _parse_seq(raw: bytes) -> int | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("r"), dict):
        return None
    seq = obj.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None
