"""How the index's files are memory-mapped: random-access advice and small page-cache pages.

A request reads a few entries at random places of the index's big arrays (a hash probe, a
key's postings, a trigram list's run), and every page mapped into a process counts in its
RSS, shared page cache or not. Two kernel habits make one such read map far more than the
page it needs:

* **read-around**: a fault on a page that is not cached reads (and caches) the pages around
  it, up to the device's read-ahead size (often 128 KB, 8 MB on some virtual disks);
  ``MADV_RANDOM`` on the mapping turns that off, so a fault reads the page it needs.
* **large folios**: sequential reads of a file (hashing it, copying it, writing it) fill the
  page cache with large folios, up to 2 MB each, and recent kernels (Linux 6.18 here) map a
  whole cached folio on the first fault in it; ``MADV_RANDOM`` does not change that. On a
  16M-row index one request then mapped ~200 MB and a pass over the ROCOv2 captions almost
  the whole index. :func:`settle_page_cache` drops the file's cached pages that no process
  has mapped and reads it again with ``POSIX_FADV_WILLNEED``, whose read-ahead caches
  single pages; a fault then maps the page plus the cached neighbours of the kernel's
  fault-around window (64 KB by default).

Both are advice: where the platform lacks them (no ``posix_fadvise``, no ``madvise``) the
index works the same, with the kernel's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["advise_random", "map_array", "map_bytes", "settle_page_cache"]

_WILLNEED_CHUNK = 128 << 10
"""Bytes per ``POSIX_FADV_WILLNEED`` call: Linux reads at most the device's read-ahead size
(128 KB by default) per call, so a whole file is asked for in chunks of that size."""

_PAGE = mmap.PAGESIZE
_MADV_RANDOM: int | None = getattr(mmap, "MADV_RANDOM", None)


def _libc_madvise() -> Any:
    if _MADV_RANDOM is None or os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def advise_random(arr: np.ndarray[Any, Any]) -> bool:
    """``MADV_RANDOM`` on the pages that hold ``arr`` (a memory-mapped array): no read-around
    on its faults. False when the platform has no madvise or the kernel refused it."""
    if _madvise is None or arr.nbytes == 0:
        return False
    addr = arr.ctypes.data
    start = addr - addr % _PAGE
    return bool(_madvise(start, addr + arr.nbytes - start, _MADV_RANDOM) == 0)


def settle_page_cache(path: Path) -> None:
    """Re-cache ``path`` in single pages (see the module docstring): drop its cached pages
    that no process maps (pages another worker has mapped stay, shared), then ask the kernel
    to read it again. Returns at once; the reads go on in the background and a fault or a
    read of a page still under I/O waits for it."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for off in range(0, size, _WILLNEED_CHUNK):
            os.posix_fadvise(fd, off, _WILLNEED_CHUNK, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def map_array(path: Path) -> np.memmap[Any, Any]:
    """The ``.npy`` file at ``path`` memory-mapped read-only (no pickle), with
    :func:`advise_random`; reading it maps only the pages it touches."""
    arr: np.memmap[Any, Any] = np.load(path, mmap_mode="r", allow_pickle=False)
    advise_random(arr)
    return arr


def map_bytes(path: Path) -> memoryview:
    """The raw file at ``path`` as a read-only memoryview over its mapping (empty files give
    an empty view), with :func:`advise_random`."""
    if not path.stat().st_size:
        return memoryview(b"")
    arr = np.memmap(path, dtype=np.uint8, mode="r")
    advise_random(arr)
    return memoryview(arr)  # type: ignore[arg-type]
