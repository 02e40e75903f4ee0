"""The approximate matcher's candidate structure, built with the index and memory-mapped.

Approximate matching (:mod:`conceptsvc.approximate`) needs, for every character trigram, the
keys that contain it, ordered so that a query can take only the keys whose trigram-set size can
reach its threshold (simstring's CPMerge). Built per process on first use, those lists cost a
full UMLS 22 GB and over a minute in every worker; here ``conceptsvc index build`` writes them
once as flat arrays, and a worker maps them (the page cache shares them between workers):

    trigram_codes.npy        uint64 per trigram, ascending: the trigram packed (see gram_code)
    trigram_table.npy        uint64[2^k]: open-addressing table over the codes, as the index's
                             string tables: (hash32(code) << 32) | (trigram number + 1)
    trigram_offsets.npy      uint64[n_trigrams+1]: trigram t owns trigram_keys[off[t]:off[t+1]]
    trigram_keys.npy         uint32 size-local key numbers (below), per trigram sorted by
                             (key trigram count, key)
    trigram_dir_offsets.npy  uint64[n_trigrams+1]: trigram t's size directory entries
    trigram_dir_size.npy     uint16 per entry: a key trigram count present in t's list ...
    trigram_dir_start.npy    uint32 per entry: ... and where its run starts, relative to off[t]
    key_trigram_counts.npy   uint16 per key: the size of its trigram set
    trigram_size_offsets.npy uint64[max size + 2] (one 0 for no keys): the keys of size y are ...
    trigram_size_keys.npy    uint32[n_keys]: ... size_keys[size_offsets[y]:size_offsets[y+1]],
                             ordered by (z, key number), z below
    trigram_classes.npy      uint8 per trigram: 1 for the trigrams of the class C (below)
    trigram_zc_offsets.npy   uint64[max size + 2]: size y's entries of zc_starts are ...
    trigram_zc_starts.npy    uint32: ... zc_starts[zc_offsets[y]:zc_offsets[y+1]]: entry k is the
                             first local number (below) of a key of size y whose z is k or
                             more; the last entry is the size's key count

A posting holds the key's number among the keys of its own size (its *size-local* number:
key = size_keys[size_offsets[y] + local]), not the key number itself. Every run is of one size,
so the two say the same; but a size's keys are then the dense range [0, n_y), and the compiled
search reads a size's runs against a bitmap of n_y bits, rounded up to a power of two (32 KB
for the largest size of a 16M-row release, most far smaller), instead of a hash table of key
numbers.

Local numbers rank a size's keys by (z, key number), where z is how many of the key's trigrams
are in the class C: the ``class_size`` trigrams with the most postings that hold no space
(:func:`build_arrays`; 800 by default). That order is a second filter, exact like the size
filter: a key of size y shares at most min(z, m_C) + min(y − z, m_N) trigrams with a query
whose m_C trigrams of the class and m_N others have keys of size y, so it can reach an overlap
``need`` only when need − m_N ≤ z ≤ y + m_C − need — one range of z, hence one range of local
numbers (``zc_starts``), to which the compiled search cuts the runs it counts. On a 16M-row
release a window of four or five common words, which matches nothing, read ≈ 3–4× fewer
postings so (the common words' trigrams are in C, a key's rare words' are not).

The directory is what makes size filtering cheap without storing a size per posting: a list's
run of keys of size y is found by a bisection over at most a few dozen directory entries, so a
query reads only the postings it needs and never a key's size from elsewhere. A trigram is
three code points packed into 63 bits (21 bits each), so codes are exact — no hash collisions
to resolve by reading keys — and a string shorter than three characters (its own single gram,
as QuickUMLS configures simstring) gets bit 63 and its length.

Building is vectorised (numpy over the keys' code points, in chunks of keys, then one sort
per bucket of trigrams); see :func:`build_arrays` for its memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptsvc.errors import ConceptIndexError
from conceptsvc.mapping import map_array

__all__ = [
    "FILES",
    "TrigramArrays",
    "build_arrays",
    "gram_code",
    "gram_hash",
    "load",
    "write",
]

FILES = (
    "trigram_codes",
    "trigram_table",
    "trigram_offsets",
    "trigram_keys",
    "trigram_dir_offsets",
    "trigram_dir_size",
    "trigram_dir_start",
    "key_trigram_counts",
    "trigram_size_offsets",
    "trigram_size_keys",
    "trigram_classes",
    "trigram_zc_offsets",
    "trigram_zc_starts",
)
"""The ``.npy`` files of the structure (each listed and hashed in the index manifest)."""

_SHORT = 1 << 63  # marks a string of one or two characters, its own single gram
_HASH_MUL = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads packed codes over 32 bits
_MASK64 = (1 << 64) - 1
CLASS_SIZE = 800
"""Trigrams in the class C of the second filter (module docstring): the ones with the most
postings, space-free. 600–1,000 cut the postings of a 16M-row release's long windows about as
much; a few hundred, or thousands, less."""
_SPACE = 32
_CHUNK_KEYS = 100_000  # keys per vectorised chunk (bounds the build's temporary arrays)
_BUCKET_PAIRS = 8_000_000  # key–trigram pairs sorted at once (~0.25 GB of temporaries)
MAX_KEY_TRIGRAMS = 0xFFFF
"""Largest trigram set a key may have (sizes are stored as uint16)."""


def gram_code(gram: str) -> int:
    """The packed code of one gram: three code points, or a shorter string with its length."""
    if len(gram) == 3:
        return (ord(gram[0]) << 42) | (ord(gram[1]) << 21) | ord(gram[2])
    if len(gram) == 2:
        return _SHORT | (2 << 42) | (ord(gram[0]) << 21) | ord(gram[1])
    return _SHORT | (1 << 42) | (ord(gram[0]) << 21)


def gram_hash(code: int) -> int:
    """32-bit hash of a code (the table's slot and check value)."""
    return ((code * _HASH_MUL) & _MASK64) >> 32


@dataclass(frozen=True)
class TrigramArrays:
    """The structure's arrays (memory-mapped when loaded, in memory when just built)."""

    codes: np.ndarray[Any, np.dtype[np.uint64]]
    table: np.ndarray[Any, np.dtype[np.uint64]]
    offsets: np.ndarray[Any, np.dtype[np.uint64]]
    keys: np.ndarray[Any, np.dtype[np.uint32]]
    dir_offsets: np.ndarray[Any, np.dtype[np.uint64]]
    dir_size: np.ndarray[Any, np.dtype[np.uint16]]
    dir_start: np.ndarray[Any, np.dtype[np.uint32]]
    key_counts: np.ndarray[Any, np.dtype[np.uint16]]
    size_offsets: np.ndarray[Any, np.dtype[np.uint64]]
    size_keys: np.ndarray[Any, np.dtype[np.uint32]]
    classes: np.ndarray[Any, np.dtype[np.uint8]]
    zc_offsets: np.ndarray[Any, np.dtype[np.uint64]]
    zc_starts: np.ndarray[Any, np.dtype[np.uint32]]

    def as_files(self) -> dict[str, np.ndarray[Any, Any]]:
        return dict(zip(FILES, (self.codes, self.table, self.offsets, self.keys,
                                self.dir_offsets, self.dir_size, self.dir_start,
                                self.key_counts, self.size_offsets, self.size_keys,
                                self.classes, self.zc_offsets, self.zc_starts),
                        strict=True))

    def gram_id(self, gram: str) -> int:
        """Number of ``gram`` in :attr:`codes`, or -1 when no key contains it."""
        code = gram_code(gram)
        h = gram_hash(code)
        table = self.table
        mask = len(table) - 1
        slot = h & mask
        while True:
            entry = int(table[slot])
            if entry == 0:
                return -1
            if entry >> 32 == h:
                t = (entry & 0xFFFFFFFF) - 1
                if int(self.codes[t]) == code:
                    return t
            slot = (slot + 1) & mask

    def run_keys(self, size: int, start: int, end: int) -> list[int]:
        """Key numbers of the postings ``[start, end)`` of one run of keys of ``size``."""
        base = int(self.size_offsets[size])
        return [int(k) for k in self.size_keys[base + self.keys[start:end].astype(np.int64)]]

    def size_runs(self, t: int) -> tuple[list[int], list[int], int]:
        """Trigram ``t``'s directory: run sizes, their absolute starts, and the list's end."""
        d0, d1 = int(self.dir_offsets[t]), int(self.dir_offsets[t + 1])
        base = int(self.offsets[t])
        sizes = self.dir_size[d0:d1].tolist()
        starts = [base + s for s in self.dir_start[d0:d1].tolist()]
        return sizes, starts, int(self.offsets[t + 1])


def _chunk_grams(
    chunk: Sequence[str],
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Distinct grams of each key of ``chunk``: (the chunk's gram codes, ascending; per
    (key, gram) pair the key's position in the chunk and the gram's position in those codes),
    pairs ordered by key then gram."""
    lens = np.fromiter(map(len, chunk), dtype=np.int64, count=len(chunk))
    cp = np.frombuffer(("\n".join(chunk) + "\n").encode("utf-32-le"), dtype=np.uint32)
    cp = cp.astype(np.uint64)
    kid = np.repeat(np.arange(len(chunk), dtype=np.uint64), lens + 1)
    # keys never contain "\n" (the index refuses them), so a window without one lies inside
    # a single key
    nl = cp == 10
    ok = ~(nl[:-2] | nl[1:-1] | nl[2:])
    codes = ((cp[:-2] << np.uint64(42)) | (cp[1:-1] << np.uint64(21)) | cp[2:])[ok]
    kid = kid[:-2][ok]
    del nl, ok
    short = np.flatnonzero(lens < 3)
    if len(short):
        starts = np.concatenate(([0], np.cumsum(lens + 1)[:-1]))[short]
        c0 = cp[starts]
        c1 = np.where(lens[short] == 2, cp[np.minimum(starts + 1, len(cp) - 1)], 0)
        scodes = (np.uint64(_SHORT) | (lens[short].astype(np.uint64) << np.uint64(42))
                  | (c0 << np.uint64(21)) | c1.astype(np.uint64))
        codes = np.concatenate((codes, scodes))
        kid = np.concatenate((kid, short.astype(np.uint64)))
    del cp
    # sort-based distinct values (np.unique may hash, several times slower on these arrays)
    uniq = _distinct(np.sort(codes))
    pairs = (kid << np.uint64(32)) | np.searchsorted(uniq, codes).astype(np.uint64)
    del codes, kid
    pairs.sort()
    pairs = _distinct(pairs)
    return (uniq, (pairs >> np.uint64(32)).astype(np.uint32),
            (pairs & np.uint64(0xFFFFFFFF)).astype(np.uint32))


def _distinct(ordered: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The distinct values of a sorted array."""
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def build_arrays(
    keys: Sequence[str],
    hash_table: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]],
    *,
    class_size: int = CLASS_SIZE,
) -> TrigramArrays:
    """The structure over ``keys`` (key number = position); ``hash_table`` builds the
    open-addressing table from the codes' 32-bit hashes (the index's own table builder);
    ``class_size`` trigrams form the class C (module docstring).

    Memory is what a full UMLS (~190 M key–trigram pairs) dictates: the pairs are held per
    chunk of keys as two uint32 columns (trigram number, key number) plus the uint32 output,
    12 bytes a pair; sorting is done per bucket of trigrams on one packed uint64 per pair, so
    no argsort over all pairs is ever held.
    """
    n = len(keys)
    chunks = [_chunk_grams(keys[i : i + _CHUNK_KEYS]) for i in range(0, n, _CHUNK_KEYS)]
    gram_codes = (_distinct(np.sort(np.concatenate([c[0] for c in chunks]))) if chunks
                  else np.zeros(0, np.uint64))
    n_grams = len(gram_codes)
    # each chunk's pairs as (trigram number, key number − chunk start), renumbered in place:
    # the pairs are never concatenated, so they cost 8 bytes each for the whole build
    parts: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
    key_counts = np.zeros(n, dtype=np.int64)
    per_gram = np.zeros(n_grams, dtype=np.int64)
    for i, (uniq, ckid, clocal) in enumerate(chunks):
        clocal[:] = np.searchsorted(gram_codes, uniq).astype(np.uint32)[clocal]
        first = i * _CHUNK_KEYS
        key_counts[first : first + _CHUNK_KEYS] = np.bincount(
            ckid, minlength=min(_CHUNK_KEYS, n - first))
        per_gram += np.bincount(clocal, minlength=n_grams)
        parts.append((clocal, ckid))
    del chunks
    if n and key_counts.max() > MAX_KEY_TRIGRAMS:
        long_key = keys[int(np.argmax(key_counts))]
        raise ConceptIndexError(
            f"key {long_key[:60]!r}... has more than {MAX_KEY_TRIGRAMS} distinct trigrams; "
            "drop such strings from the dictionary (they are not terms)."
        )
    sizes = key_counts.astype(np.uint16)
    del key_counts
    # the class C: the space-free trigrams with the most postings (ties: the lower code)
    spaced = (((gram_codes >> np.uint64(42)) & np.uint64(0x1FFFFF)) == _SPACE) | (
        ((gram_codes >> np.uint64(21)) & np.uint64(0x1FFFFF)) == _SPACE) | (
        (gram_codes & np.uint64(0x1FFFFF)) == _SPACE) | (gram_codes >= np.uint64(_SHORT))
    eligible = np.flatnonzero(~spaced)
    best = eligible[np.argsort(-per_gram[eligible], kind="stable")[: max(class_size, 0)]]
    classes = np.zeros(n_grams, dtype=np.uint8)
    classes[best] = 1
    del spaced, eligible, best
    zc = np.zeros(n, dtype=np.int64)  # per key: its trigrams in C
    for i, (gid, ckid) in enumerate(parts):
        first = i * _CHUNK_KEYS
        zc[first : first + _CHUNK_KEYS] = np.bincount(
            ckid[classes[gid] == 1], minlength=min(_CHUNK_KEYS, n - first))
    # the keys of each size by (z, key number), and each key's number among them (the module)
    size_keys = np.lexsort((np.arange(n), zc, sizes)).astype(np.uint32)
    size_offsets = np.zeros(int(sizes.max()) + 2 if n else 1, dtype=np.uint64)
    np.cumsum(np.bincount(sizes, minlength=len(size_offsets) - 1), out=size_offsets[1:])
    local = np.empty(n, dtype=np.uint32)
    local[size_keys] = (np.arange(n, dtype=np.int64)
                        - size_offsets[sizes[size_keys]].astype(np.int64)).astype(np.uint32)
    zc_offsets, zc_starts = _zc_table(sizes, zc, size_offsets)
    del zc
    offsets = np.zeros(n_grams + 1, dtype=np.uint64)
    np.cumsum(per_gram, out=offsets[1:])
    out_keys = np.empty(int(offsets[-1]), dtype=np.uint32)
    dir_gram: list[np.ndarray[Any, Any]] = []
    dir_size: list[np.ndarray[Any, Any]] = []
    dir_pos: list[np.ndarray[Any, Any]] = []
    for a, b in _buckets(offsets):
        # (trigram − a, key size, key number) packed: one plain sort gives the lists' order
        pieces = []
        for i, (gid, ckid) in enumerate(parts):
            sel = (gid >= a) & (gid < b)
            bkid = ckid[sel].astype(np.uint64) + np.uint64(i * _CHUNK_KEYS)
            pieces.append(((gid[sel] - np.uint32(a)).astype(np.uint64) << np.uint64(48))
                          | (sizes[bkid].astype(np.uint64) << np.uint64(32))
                          | local[bkid].astype(np.uint64))
        packed = np.concatenate(pieces)
        del pieces
        packed.sort()
        lo, hi = int(offsets[a]), int(offsets[b])
        out_keys[lo:hi] = (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        head = packed >> np.uint64(32)
        del packed
        run = np.ones(len(head), dtype=bool)
        run[1:] = head[1:] != head[:-1]
        starts = np.flatnonzero(run)
        dir_gram.append((head[starts] >> np.uint64(16)).astype(np.int64) + a)
        dir_size.append((head[starts] & np.uint64(0xFFFF)).astype(np.uint16))
        dir_pos.append(starts + lo)
    del parts, local
    runs_gram = np.concatenate(dir_gram) if dir_gram else np.zeros(0, np.int64)
    runs_size = np.concatenate(dir_size) if dir_size else np.zeros(0, np.uint16)
    runs_pos = np.concatenate(dir_pos) if dir_pos else np.zeros(0, np.int64)
    dir_offsets = np.zeros(n_grams + 1, dtype=np.uint64)
    if n_grams:
        np.cumsum(np.bincount(runs_gram, minlength=n_grams), out=dir_offsets[1:])
    dir_start = (runs_pos - offsets[runs_gram].astype(np.int64)).astype(np.uint32)
    hashes = ((gram_codes * np.uint64(_HASH_MUL)) >> np.uint64(32)).astype(np.uint32)
    return TrigramArrays(
        codes=gram_codes.astype(np.uint64),
        table=hash_table(hashes),
        offsets=offsets,
        keys=out_keys,
        dir_offsets=dir_offsets,
        dir_size=runs_size,
        dir_start=dir_start,
        key_counts=sizes,
        size_offsets=size_offsets,
        size_keys=size_keys,
        classes=classes,
        zc_offsets=zc_offsets,
        zc_starts=zc_starts,
    )


def _zc_table(
    sizes: np.ndarray[Any, Any], zc: np.ndarray[Any, Any], size_offsets: np.ndarray[Any, Any]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """``zc_offsets`` and ``zc_starts`` (module docstring): for each size y, entries z = 0 ..
    zmax_y + 1 (zmax_y the largest z of a key of size y; a size without keys has one entry,
    0), entry k the first local number of a key whose z is k or more."""
    n_sizes = len(size_offsets) - 1
    zmax = np.full(n_sizes, -1, dtype=np.int64)
    if len(sizes):
        np.maximum.at(zmax, sizes.astype(np.int64), zc)
    counts = zmax + 2
    zc_offsets = np.zeros(n_sizes + 1, dtype=np.uint64)
    np.cumsum(counts, out=zc_offsets[1:])
    # keys per (size, z), then per size the running sums from 0
    flat = zc_offsets[sizes.astype(np.int64)].astype(np.int64) + zc + 1
    per = np.bincount(flat, minlength=int(zc_offsets[-1])) if len(sizes) else np.zeros(
        int(zc_offsets[-1]), dtype=np.int64)
    starts = np.cumsum(per)
    starts -= np.repeat(starts[zc_offsets[:-1].astype(np.int64)], counts)
    return zc_offsets, starts.astype(np.uint32)


def _buckets(offsets: np.ndarray[Any, Any]) -> list[tuple[int, int]]:
    """Contiguous trigram ranges [a, b) of at most 2^16 trigrams (they are packed in 16 bits)
    and, unless one trigram alone has more, at most ``_BUCKET_PAIRS`` pairs."""
    out = []
    n_grams = len(offsets) - 1
    a = 0
    while a < n_grams:
        limit = int(offsets[a]) + _BUCKET_PAIRS
        b = int(np.searchsorted(offsets, limit, side="right")) - 1
        b = min(max(b, a + 1), a + (1 << 16), n_grams)
        out.append((a, b))
        a = b
    return out


def write(d: Path, arrays: TrigramArrays) -> None:
    """Save the arrays into index directory ``d`` (the caller hashes them with the rest)."""
    for name, arr in arrays.as_files().items():
        np.save(d / f"{name}.npy", arr, allow_pickle=False)


def load(path: Path, files: Mapping[str, str], n_keys: int) -> TrigramArrays:
    """Map the structure of the index at ``path``; nothing is read beyond the .npy headers.

    ``files`` is the manifest's file list: an index written before approximate matching was
    part of the format lacks these files and is refused with a message to rebuild it.
    """
    missing = [name for name in FILES if f"{name}.npy" not in files]
    if missing:
        raise ConceptIndexError(
            f"{path}: the index has no approximate-matching structure ({', '.join(missing)}); "
            "rebuild it with this conceptsvc (`conceptsvc index build ...`)."
        )
    a = {name: map_array(path / f"{name}.npy") for name in FILES}
    arrays = TrigramArrays(
        codes=a["trigram_codes"], table=a["trigram_table"], offsets=a["trigram_offsets"],
        keys=a["trigram_keys"], dir_offsets=a["trigram_dir_offsets"],
        dir_size=a["trigram_dir_size"], dir_start=a["trigram_dir_start"],
        key_counts=a["key_trigram_counts"], size_offsets=a["trigram_size_offsets"],
        size_keys=a["trigram_size_keys"], classes=a["trigram_classes"],
        zc_offsets=a["trigram_zc_offsets"], zc_starts=a["trigram_zc_starts"],
    )
    n_grams = len(arrays.codes)
    problems = []
    if len(arrays.offsets) != n_grams + 1 or len(arrays.dir_offsets) != n_grams + 1:
        problems.append("trigram offsets do not match the trigram count")
    elif int(arrays.offsets[-1]) != len(arrays.keys):
        problems.append("trigram_offsets does not match trigram_keys")
    elif int(arrays.dir_offsets[-1]) != len(arrays.dir_size):
        problems.append("trigram_dir_offsets does not match the directory")
    if len(arrays.dir_start) != len(arrays.dir_size):
        problems.append("trigram_dir_start and trigram_dir_size differ in length")
    if len(arrays.key_counts) != n_keys:
        problems.append(f"key_trigram_counts has {len(arrays.key_counts)} entries, "
                        f"expected {n_keys}")
    if len(arrays.size_keys) != n_keys:
        problems.append(f"trigram_size_keys has {len(arrays.size_keys)} entries, "
                        f"expected {n_keys}")
    elif (len(arrays.size_offsets) < 1 or int(arrays.size_offsets[0]) != 0
          or int(arrays.size_offsets[-1]) != n_keys):
        problems.append("trigram_size_offsets does not match trigram_size_keys")
    if len(arrays.classes) != n_grams:
        problems.append("trigram_classes does not match the trigram count")
    if (len(arrays.zc_offsets) != len(arrays.size_offsets) or int(arrays.zc_offsets[0]) != 0
            or int(arrays.zc_offsets[-1]) != len(arrays.zc_starts)):
        problems.append("trigram_zc_offsets does not match the sizes or trigram_zc_starts")
    table = arrays.table
    if len(table) & (len(table) - 1) or n_grams >= len(table):  # (≥ 1 empty slot ends a miss)
        problems.append("trigram_table has the wrong size")
    if problems:
        raise ConceptIndexError(
            f"{path}: approximate-matching structure is truncated or inconsistent "
            f"({'; '.join(problems)}); rebuild the index."
        )
    return arrays
