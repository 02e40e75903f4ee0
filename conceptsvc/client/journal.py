"""The resume journal: which captions of a batch run are done, durable across ``kill -9``.

A run over millions of captions will be interrupted — by an operator, an OOM killer, a reboot.
The journal is what lets the rerun continue instead of starting over, without losing or
duplicating a caption:

* It lives in a work directory whose name carries a hash of the input and the options, so a
  rerun with the same arguments finds it and a run with different ones does not (``run.json``
  records what the hash was made of).
* ``journal.jsonl`` is append-only; each finished caption is one line
  ``{"seq": N, "r": {...}, "ix": HASH}`` where ``seq`` is the caption's position in the input,
  ``r`` its result in the canonical JSON form of :mod:`conceptsvc.client.outputs` and ``ix`` the
  content hash of the index that produced it (lines written before ``ix`` existed lack it: they
  belong to the index ``run.json`` names, since such a journal was never resumed against
  another). A caption's *last* line is its result: when the service's index changes and the
  run redoes the captions of the old index (:meth:`Journal.retire`), their new lines supersede
  the old ones, which stay in the file until the work directory goes. A batch of lines goes
  out in one ``write``, so a kill leaves at most one torn line at the end; opening the journal
  cuts that line off (it is simply annotated again). Lines are fsync'd at most every
  ``sync_interval`` seconds and on close: a killed *process* loses nothing that was written
  (the page cache survives it); an OS crash can lose the last fraction of a second, which the
  rerun redoes.
* Only one process may use a work directory at a time (``flock``, released by the kernel even
  on ``kill -9``).

The final outputs are rendered from the journal in ``seq`` order, never in completion order,
so a run interrupted five times produces the same bytes as one that never was.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
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
        self.add_new(seq)

    def add_new(self, seq: int) -> bool:
        """Add ``seq``; whether it was not in the set before."""
        if seq < 0:
            raise ValueError(f"a seq is >= 0, got {seq}")
        if seq >= len(self._flags):
            # Grow geometrically: one extend per doubling, not one per caption.
            self._flags.extend(bytes(max(seq + 1, 2 * len(self._flags), 1024) - len(self._flags)))
        if self._flags[seq]:
            return False
        self._flags[seq] = 1
        self._count += 1
        return True

    def discard(self, seq: int) -> None:
        if 0 <= seq < len(self._flags) and self._flags[seq]:
            self._flags[seq] = 0
            self._count -= 1

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
        # The index of each seq's last line, as a 1-byte number into _hashes (0 = unlabelled):
        # one byte a caption, like ``done``.
        self._ix_of = bytearray()
        self._hashes: list[str] = [""]
        # Each seq's last line's byte offset (8 bytes a caption, -1 = none), kept as lines are
        # read at open and written after, so that reading the results back in seq order needs
        # no pass over the file to find them.
        self._where = array("q")
        self._size = 0  # bytes of whole lines in the file
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
                parsed = _parse_line(raw)
                if parsed is None:
                    self.bad_lines += 1
                    log.warning(
                        "%s: skipping an unreadable journal line at byte %d; that caption will "
                        "be annotated again", self.path, offset,
                    )
                else:
                    seq, ix = parsed
                    self.done.add(seq)
                    self._set_index(seq, ix)
                    self._set_offset(seq, offset)
                offset += len(raw)
                good_end = offset
        self._size = good_end
        size = self.path.stat().st_size
        if size > good_end:
            self.torn_bytes = size - good_end
            log.info("%s: cutting a torn last line (%d bytes)", self.path, self.torn_bytes)
            with self.path.open("r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())

    # -- writing -------------------------------------------------------------------------------
    def append(
        self, results: Sequence[tuple[int, Mapping[str, Any]]], index_hash: str = ""
    ) -> None:
        """Record finished captions made with the index ``index_hash``; a seq already
        recorded (and not retired) is ignored."""
        self.append_json(
            [(seq, dumps(r).encode("utf-8")) for seq, r in results if seq not in self.done],
            index_hash,
        )

    def append_json(self, results: Sequence[tuple[int, bytes]], index_hash: str = "") -> None:
        """:meth:`append` of results already in their JSON text (``dumps`` of the result, as
        UTF-8): each line is ``dumps({"seq": seq, "r": result, "ix": index_hash})`` (no
        ``ix`` when the hash is empty) — written here without parsing the result again."""
        if not results:
            return
        ix = index_hash
        tail = (b',"ix":' + dumps(ix).encode("utf-8") if ix else b"") + b"}\n"
        k = self._label(ix)
        self._reserve(max(seq for seq, _ in results))
        done, ix_of, where = self.done, self._ix_of, self._where
        lines = []
        offset = self._size
        for seq, text in results:
            if not done.add_new(seq):
                continue  # recorded already
            ix_of[seq] = k
            where[seq] = offset
            raw = b'{"seq":%d,"r":%b%b' % (seq, text, tail)
            offset += len(raw)
            lines.append(raw)
        if not lines:
            return
        data = b"".join(lines)
        self._size = offset
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._dirty = True
        if time.monotonic() - self._last_sync >= self.sync_interval:
            self.sync()

    # -- index identity ----------------------------------------------------------------------
    def _label(self, ix: str) -> int:
        """The 1-byte number of the index hash ``ix`` (registered on first use)."""
        try:
            return self._hashes.index(ix)
        except ValueError:
            if len(self._hashes) >= 256:
                raise ClientError(
                    f"{self.path} names more than 255 indexes; remove {self.work_dir} to start "
                    "this run afresh."
                ) from None
            self._hashes.append(ix)
            return len(self._hashes) - 1

    def _reserve(self, seq: int) -> None:
        """Room for ``seq`` in the per-seq index labels and line offsets."""
        if seq >= len(self._ix_of):
            self._ix_of.extend(bytes(seq + 1 - len(self._ix_of)))
        where = self._where
        if seq >= len(where):
            # Grow geometrically: one extend per doubling, not one per caption.
            where.extend(_MISSING * (max(seq + 1, 2 * len(where), 1024) - len(where)))

    def _set_index(self, seq: int, ix: str) -> None:
        k = self._label(ix)
        self._reserve(seq)
        self._ix_of[seq] = k

    def _set_offset(self, seq: int, offset: int) -> None:
        self._reserve(seq)
        self._where[seq] = offset

    def _index_of(self, seq: int, unlabelled: str) -> str:
        k = self._ix_of[seq] if seq < len(self._ix_of) else 0
        return self._hashes[k] or unlabelled

    def index_counts(self, unlabelled: str) -> dict[str, int]:
        """How many done captions each index made (unlabelled lines count as ``unlabelled``)."""
        counts: dict[str, int] = {}
        for seq in self.done:
            ix = self._index_of(seq, unlabelled)
            counts[ix] = counts.get(ix, 0) + 1
        return counts

    def retire(self, keep: str, unlabelled: str) -> int:
        """Count every caption not made with the index ``keep`` as not done, so the run
        annotates it again; returns how many. Their lines stay in the file until a new line
        for the same caption supersedes them (or, after a restart of the process, they are
        retired again)."""
        gone = [s for s in self.done if self._index_of(s, unlabelled) != keep]
        for seq in gone:
            self.done.discard(seq)
        return len(gone)

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    # -- reading back in input order ---------------------------------------------------------
    def results(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """The result of every done caption once, ordered by ``seq`` (its last line)."""
        for seq, text in self.texts():
            yield seq, json.loads(text)

    def texts(self) -> Iterator[tuple[int, bytes]]:
        """:meth:`results`, each as its JSON text (``dumps`` of the result, as UTF-8) cut from
        its line — what a JSONL output holds, so writing one parses nothing. The file is
        mapped, not read: the lines are visited in ``seq`` order, which is not the order they
        were written in."""
        self.sync()
        if self._size == 0:
            return
        # The end of each line for each index label: a line is ours when it ends so.
        tails = [(b',"ix":' + dumps(h).encode("utf-8") if h else b"") + b"}\n"
                 for h in self._hashes]
        where, ix_of = self._where, self._ix_of
        with self.path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for seq in self.done:
                start = where[seq]
                end = mm.find(b"\n", start) + 1
                line = mm[start:end]
                head = b'{"seq":%d,"r":' % seq
                tail = tails[ix_of[seq]]
                if line.startswith(head) and line.endswith(tail):
                    yield seq, line[len(head):len(line) - len(tail)]
                else:  # a line some other writer spaced or ordered otherwise
                    yield seq, dumps(json.loads(line)["r"]).encode("utf-8")

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


def _parse_line(raw: bytes) -> tuple[int, str] | None:
    """A journal line's seq and index hash ("" when it names none), or None if unreadable."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("r"), dict):
        return None
    seq = obj.get("seq")
    if not (isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0):
        return None
    ix = obj.get("ix", "")
    return (seq, ix) if isinstance(ix, str) else None
