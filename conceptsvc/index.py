"""The compiled concept index: built once offline, loaded fast, never written at request time.

An index is a directory (format 5)::

    manifest.json            format/normaliser versions, source release, filters, counts, hashes
    keys.bin                 normalised term keys, sorted, UTF-8, each followed by "\\n"
    keys_offsets.npy         uint64[n_keys+1]: key i is keys.bin[off[i] : off[i+1]-1]
    keys_table.npy           uint64[2^k]: open-addressing hash table over the keys (see below)
    post_offsets.npy         uint64[n_keys+1]: key i owns postings [off[i], off[i+1])
    post_cui.npy             uint32 per posting: concept number (concepts are sorted by CUI)
    post_str.npy             uint32 per posting: string number (the original dictionary string)
    post_sab.npy             uint16 per posting: source number (``sabs.txt``)
    post_tty.npy             uint16 per posting: term-type number (``ttys.txt``)
    post_flags.npy           uint8 per posting: FLAG_* bits
    strings.bin              original strings, UTF-8, "\\n"-terminated (newlines inside → spaces)
    strings_offsets.npy      uint64[n_strings+1]
    cuis.bin, cuis_offsets.npy, cuis_table.npy            concept ids, sorted, with hash table
    concept_pref.npy         uint32 per concept: string number of the preferred name
    concept_sty_offsets.npy  uint32[n_cuis+1]; concept_sty.npy uint16: semantic types (tuis.txt)
    concept_post_offsets.npy uint64[n_cuis+1]; concept_post.npy uint32: postings of each concept
    first_tokens.bin, first_tokens_offsets.npy, first_tokens_table.npy   first token of keys
    first_token_max.npy      uint16 per first token: length in tokens of its longest key
    tokens.bin, tokens_offsets.npy, tokens_table.npy     distinct tokens of the keys, sorted
    trie_edge_keys.npy       uint64[2^k]: token trie edges, ``(parent + 1) << 32 | (token + 1)``
    trie_edge_child.npy      uint32[2^k]: the child node of the edge in the same slot
    trie_node_key.npy        int32 per trie node: the key the path to it spells, or -1
    sabs.txt ttys.txt tuis.txt
    trigram_*.npy, key_trigram_counts.npy   approximate matching's trigram lists
                                            (:mod:`conceptsvc.trigram_index`)

Why this shape: a full UMLS has ~10 M keys, and building a Python ``dict`` of them costs ~10 s
and ~1.5 GB at every start. Instead every lookup structure is a file that is memory-mapped:
loading costs milliseconds and RSS grows only with the pages actually touched. Key → number is
an open-addressing table of ``uint64`` entries ``(crc32(key) << 32) | (number + 1)`` (0 =
empty slot, load factor ≤ 0.75, linear probing), so a lookup is one CRC, usually one probe and
one byte comparison — about a microsecond from Python. Small indexes (the demo dictionary)
additionally get plain dicts at load time, which are faster per lookup and cost little there.
No pickle anywhere: ``np.load(allow_pickle=False)`` and text/byte files only.

The token trie (format 3) is the compiled matcher's prefix structure: every key is a path of
token numbers from the root (node 0), every token-prefix of a key is a node, and
``trie_node_key`` says which nodes end a key. Extending a caption window by one token is one
probe of the edge table (open addressing, linear probing, load factor ≤ 0.75, the slot is
:func:`trie_slot` of the edge key, which the compiled engine computes the same way), so the
matcher stops at the first token no key continues with and never builds a string. It is
exact — no hash of a phrase stands in for the phrase — and built once by the index build
(per node: a 12-byte edge slot at a load factor of 0.375–0.75 and a 4-byte key id, so 20–36
bytes; a 16M-row synthetic release's 10.6 M nodes take 243 MB, mapped and touched only where
captions probe), so no process builds anything that grows with the index when it loads.

Integrity: every file's SHA-256 is in the manifest and ``content_hash`` is the hash of those.
Loading refuses an unknown format version, a normaliser version other than this code's, a
missing or truncated file, or a hash mismatch. Cache keys elsewhere include ``content_hash``,
so a new dictionary can never be served stale results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import zlib
from array import array
from collections.abc import ItemsView, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, overload

import numpy as np

from conceptsvc import trigram_index
from conceptsvc.errors import ConceptIndexError
from conceptsvc.mapping import map_array, map_bytes, settle_page_cache
from conceptsvc.normalize import NORMALIZER_VERSION, normalize_term

__all__ = [
    "FLAG_ABBREVIATION",
    "FLAG_CASE_SENSITIVE",
    "FLAG_PREFERRED",
    "FORMAT_VERSION",
    "MAX_LOAD",
    "ConceptIndex",
    "ConceptInfo",
    "IndexBuilder",
    "KeyTrie",
    "Posting",
    "PostingArrays",
    "build_index",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 7
"""3 added the token trie (issue 13), 4 approximate matching's trigram lists (issue 14): a
format-3 index lacks the lists, and the demo index cache is keyed on this number. 5 fills
the hash tables up to :data:`MAX_LOAD` (4: 0.5), which a format-4 reader refuses (it checks
the trigram table's size). 6 stores the trigram lists' postings as size-local key numbers
(:mod:`conceptsvc.trigram_index`), which formats 4 and 5 hold as key numbers: read as the
other, either would find wrong keys, so neither is read by the other's code. 7 orders each
size's keys by their trigrams in a class of common ones, with the table of where each count
starts (the trigram lists' second filter): format 6 lacks the table, and its local numbers
are in another order."""

READABLE_VERSIONS = (FORMAT_VERSION,)
"""Index formats this code loads."""

FLAG_PREFERRED = 1  # this string is the concept's preferred name
FLAG_ABBREVIATION = 2  # an abbreviation/acronym (TTY AB/ACR/…, or a short all-caps string)
FLAG_CASE_SENSITIVE = 4  # match only when the caption's surface has the same letter case

# Tables with at most this many entries also get a Python dict at load time (faster lookups;
# ~1 µs and ~150 bytes per entry to build, so only worth it when small).
DICT_THRESHOLD = 300_000

_STRTABS = ("keys", "strings", "cuis", "first_tokens", "tokens")  # <name>.bin + <name>_offsets.npy
_HASHED = ("keys", "cuis", "first_tokens", "tokens")  # + <name>_table.npy
_ARRAYS = (
    "post_offsets",
    "post_cui",
    "post_str",
    "post_sab",
    "post_tty",
    "post_flags",
    "concept_pref",
    "concept_sty_offsets",
    "concept_sty",
    "concept_post_offsets",
    "concept_post",
    "first_token_max",
    "trie_edge_keys",
    "trie_edge_child",
    "trie_node_key",
)
_TEXTS = ("sabs.txt", "ttys.txt", "tuis.txt")
_EMPTY = 0


class Posting(NamedTuple):
    """One (normalised key → concept) link, with where the string came from."""

    cui: str
    string: str
    sab: str
    tty: str
    flags: int


class KeyTrie(NamedTuple):
    """The index's token trie (module docstring), as the compiled matcher reads it: the three
    memory-mapped arrays, and the token → number lookup (``token_dict``, a dict, for small
    indexes whose tables are materialised; else None and ``token_ids`` probes the mapped
    table)."""

    edge_keys: np.ndarray[Any, Any]
    edge_child: np.ndarray[Any, Any]
    node_key: np.ndarray[Any, Any]
    token_ids: Mapping[str, int]
    token_dict: dict[str, int] | None


class PostingArrays(NamedTuple):
    """The index's posting and concept arrays as the compiled engine reads them in place
    (:attr:`ConceptIndex.posting_arrays`; the files of the module docstring, memory-mapped):
    a key's postings, their concepts, strings, sources, flags and term types, each concept's
    preferred name, semantic types and postings, and the concept-id and string tables (UTF-8
    blob + offsets)."""

    post_offsets: np.ndarray[Any, Any]
    post_cui: np.ndarray[Any, Any]
    post_str: np.ndarray[Any, Any]
    post_sab: np.ndarray[Any, Any]
    post_flags: np.ndarray[Any, Any]
    post_tty: np.ndarray[Any, Any]
    concept_pref: np.ndarray[Any, Any]
    concept_sty_offsets: np.ndarray[Any, Any]
    concept_sty: np.ndarray[Any, Any]
    concept_post_offsets: np.ndarray[Any, Any]
    concept_post: np.ndarray[Any, Any]
    cuis_blob: memoryview
    cuis_offsets: np.ndarray[Any, Any]
    strings_blob: memoryview
    strings_offsets: np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class ConceptInfo:
    cui: str
    preferred_name: str
    semantic_types: tuple[str, ...]
    sources: tuple[str, ...]


# -- files ----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _hash_files(paths: Sequence[Path]) -> dict[str, str]:
    """SHA-256 of every file; two threads (hashlib releases the GIL on large buffers)."""
    big_first = sorted(paths, key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(max_workers=2) as pool:
        digests = list(pool.map(_sha256, big_first))
    return {p.name: h for p, h in zip(big_first, digests, strict=True)}


def _content_hash(file_hashes: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(file_hashes):
        h.update(f"{name}\0{file_hashes[name]}\n".encode())
    return h.hexdigest()


def _read_lines(path: Path) -> list[str]:
    data = path.read_bytes().decode("utf-8")
    return data.split("\n") if data else []


MAX_LOAD = 0.75
"""Largest share of occupied slots in the index's open-addressing tables. A lookup touches
the home slot's page of a table the size of the index's biggest arrays, so a denser table
is fewer pages for the same probes (RSS: on a 16M-row release a caption pass touches most of
the trie's pages); linear probing at 0.75 still ends a miss within a few cache lines. Tables
are powers of two, so the load is between ``MAX_LOAD / 2`` and ``MAX_LOAD``; readers take
the size from the file (indexes built with the former bound of 0.5 load as they are)."""


def _table_size(n: int) -> int:
    size = 8
    while n > MAX_LOAD * size:
        size <<= 1
    return size


def _place(home: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    """The slot of each entry in an open-addressing table (linear probing) of ``size`` slots,
    entry ``i`` hashing to slot ``home[i]``.

    Vectorised in rounds: every unplaced entry tries its next slot; among those that find it
    empty, the first claims it. An entry only ever moves past occupied slots, so a lookup that
    probes from the home slot until an empty one always meets it.
    """
    n = len(home)
    mask = np.uint64(size - 1)
    taken = np.zeros(size, dtype=bool)
    slot_of = np.zeros(n, dtype=np.int64)
    pending = np.arange(n, dtype=np.int64)
    pos = home.astype(np.uint64) & mask
    while pending.size:
        free = ~taken[pos]
        cand, cpos = pending[free], pos[free]
        slots, first = np.unique(cpos, return_index=True)
        winners = cand[first]
        taken[slots] = True
        slot_of[winners] = slots
        placed = np.zeros(n, dtype=bool)
        placed[winners] = True
        keep = ~placed[pending]
        pending = pending[keep]
        pos = (pos[keep] + np.uint64(1)) & mask
    return slot_of


def build_hash_table(crcs: np.ndarray[Any, np.dtype[np.uint32]]) -> np.ndarray[Any, Any]:
    """Table of entries ``(crc << 32) | (i + 1)`` over entries 0..n-1 with the given CRCs."""
    n = len(crcs)
    size = _table_size(n)
    table = np.zeros(size, dtype=np.uint64)
    entries = (crcs.astype(np.uint64) << np.uint64(32)) | (np.arange(n, dtype=np.uint64) + 1)
    table[_place(crcs.astype(np.uint64), size)] = entries
    return table


def trie_slot(edge_keys: np.ndarray[Any, Any], mask: int) -> np.ndarray[Any, Any]:
    """Home slots of trie edge keys: a 64-bit mix (splitmix's finaliser, as
    ``_speedups._KeyTrie`` computes it per probe), then the table's mask."""
    k = edge_keys.astype(np.uint64)
    with np.errstate(over="ignore"):
        k = k ^ (k >> np.uint64(29))
        k = k * np.uint64(0xBF58476D1CE4E5B9)
        k = k ^ (k >> np.uint64(32))
    return k & np.uint64(mask)


def _build_trie(
    sorted_keys: Sequence[str],
) -> tuple[list[str], dict[str, np.ndarray[Any, Any]]]:
    """The token trie of the keys (module docstring): the sorted token list and the arrays.

    Built level by level with numpy: at depth d every key of more than d tokens extends its
    depth-(d-1) node by its d-th token; the distinct (parent, token) pairs of a level are its
    new nodes. No per-prefix Python object, so it costs seconds at UMLS scale.
    """
    n_keys = len(sorted_keys)
    flat = " ".join(sorted_keys).split(" ") if n_keys else []
    tokens = sorted(set(flat))
    tok_ids = {t: i for i, t in enumerate(tokens)}
    tids = np.fromiter(map(tok_ids.__getitem__, flat), dtype=np.uint64, count=len(flat))
    del flat
    counts = np.fromiter((k.count(" ") + 1 for k in sorted_keys), dtype=np.int64, count=n_keys)
    tok_off = np.zeros(n_keys, dtype=np.int64)
    if n_keys:
        np.cumsum(counts[:-1], out=tok_off[1:])
    node_of = np.zeros(n_keys, dtype=np.uint64)  # each key's node at the current depth
    edge_parts: list[np.ndarray[Any, Any]] = []
    child_parts: list[np.ndarray[Any, Any]] = []
    key_nodes: list[np.ndarray[Any, Any]] = []
    key_ids: list[np.ndarray[Any, Any]] = []
    live = np.arange(n_keys, dtype=np.int64)  # keys with more than ``depth`` tokens
    n_nodes = 1
    depth = 0
    while live.size:
        edge = ((node_of[live] + np.uint64(1)) << np.uint64(32)) | (
            tids[tok_off[live] + depth] + np.uint64(1)
        )
        uniq, inverse = np.unique(edge, return_inverse=True)
        children = np.arange(n_nodes, n_nodes + len(uniq), dtype=np.uint64)
        n_nodes += len(uniq)
        edge_parts.append(uniq)
        child_parts.append(children)
        node_of[live] = children[inverse]
        depth += 1
        ends = counts[live] == depth
        key_ids.append(live[ends])
        key_nodes.append(node_of[live[ends]])
        live = live[~ends]
    node_key = np.full(n_nodes, -1, dtype=np.int32)
    for kids, nodes in zip(key_ids, key_nodes, strict=True):
        node_key[nodes.astype(np.int64)] = kids
    keys = np.concatenate(edge_parts) if edge_parts else np.zeros(0, dtype=np.uint64)
    children = np.concatenate(child_parts) if child_parts else np.zeros(0, dtype=np.uint64)
    size = _table_size(len(keys))
    slots = _place(trie_slot(keys, size - 1), size)
    edge_keys = np.zeros(size, dtype=np.uint64)
    edge_child = np.zeros(size, dtype=np.uint32)
    edge_keys[slots] = keys
    edge_child[slots] = children.astype(np.uint32)
    return tokens, {
        "trie_edge_keys": edge_keys,
        "trie_edge_child": edge_child,
        "trie_node_key": node_key,
    }


def _write_strtab(
    d: Path, name: str, strings: Iterable[str], n: int, *, hashed: bool
) -> None:
    """Write ``<name>.bin`` + ``<name>_offsets.npy`` (+ ``<name>_table.npy`` if hashed)."""
    lens = array("Q")
    crcs = array("I")
    crc32 = zlib.crc32
    with (d / f"{name}.bin").open("wb", buffering=1 << 22) as fh:
        write = fh.write
        for s in strings:
            e = s.encode("utf-8")
            write(e)
            write(b"\n")
            lens.append(len(e) + 1)
            if hashed:
                crcs.append(crc32(e))
    if len(lens) != n:
        raise ConceptIndexError(f"internal: {name} has {len(lens)} entries, expected {n}")
    off = np.zeros(n + 1, dtype=np.uint64)
    if n:
        np.cumsum(np.frombuffer(lens, dtype=np.uint64), out=off[1:])
    np.save(d / f"{name}_offsets.npy", off, allow_pickle=False)
    if hashed:
        table = build_hash_table(np.frombuffer(crcs, dtype=np.uint32) if n else np.zeros(
            0, dtype=np.uint32))
        np.save(d / f"{name}_table.npy", table, allow_pickle=False)


# -- loaded string tables -------------------------------------------------------------------


class _StringTable:
    """Strings stored as one UTF-8 blob plus offsets, with an optional on-disk hash table."""

    __slots__ = ("_blob", "_dict", "_mask", "_n", "_off", "_table")

    def __init__(self, blob: memoryview, offsets: memoryview, table: memoryview | None) -> None:
        self._blob = blob
        self._off = offsets
        self._n = len(offsets) - 1
        self._table = table
        self._mask = len(table) - 1 if table is not None else 0
        self._dict: dict[str, int] | None = None

    def __len__(self) -> int:
        return self._n

    def string(self, i: int) -> str:
        off = self._off
        return str(self._blob[off[i] : off[i + 1] - 1], "utf-8")

    def materialize(self) -> None:
        """Build a dict for lookups (small tables only: it costs time and memory)."""
        self._dict = {s: i for i, s in enumerate(self)}

    def find(self, s: str) -> int:
        """Number of ``s``, or -1."""
        d = self._dict
        if d is not None:
            return d.get(s, -1)
        tab = self._table
        if tab is None:
            raise ConceptIndexError("internal: lookup in a table without a hash index")
        e = s.encode("utf-8")
        h = zlib.crc32(e)
        mask = self._mask
        slot = h & mask
        off, blob = self._off, self._blob
        while True:
            entry = tab[slot]
            if entry == _EMPTY:
                return -1
            if entry >> 32 == h:
                i = (entry & 0xFFFFFFFF) - 1
                if blob[off[i] : off[i + 1] - 1] == e:
                    return i
            slot = (slot + 1) & mask

    def __iter__(self) -> Iterator[str]:
        blob = bytes(self._blob)
        if not blob:
            return iter(())
        return iter(blob[:-1].decode("utf-8").split("\n"))


class _IdMap(Mapping[str, int]):
    """Read-only Mapping view: string → its number (or ``values[number]``)."""

    __slots__ = ("_tab", "_values")

    def __init__(self, tab: _StringTable, values: memoryview | None = None) -> None:
        self._tab = tab
        self._values = values

    def get(self, key: str, default: Any = None) -> Any:
        i = self._tab.find(key)
        if i < 0:
            return default
        return i if self._values is None else self._values[i]

    def __getitem__(self, key: str) -> int:
        i = self._tab.find(key)
        if i < 0:
            raise KeyError(key)
        return i if self._values is None else int(self._values[i])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._tab.find(key) >= 0

    def __len__(self) -> int:
        return len(self._tab)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tab)

    def items(self) -> ItemsView[str, int]:
        """In table order, without a hash lookup per item (whole-index scans use this)."""
        return _Items(self)

    def as_dict(self) -> dict[str, int] | None:
        """The materialised dict behind this view (small indexes), else None."""
        return None

    def hashed_layout(self) -> tuple[memoryview, memoryview, memoryview] | None:
        """(UTF-8 blob, offsets, hash table) of the mapped string table behind this view, for
        a compiled reader to probe as :meth:`_StringTable.find` does (the table's slots hold
        ``crc32 << 32 | number + 1``, linear probing, 0 empty); None when the view maps to
        other values than the strings' numbers or the table has no hash index."""
        tab = self._tab
        if self._values is not None or tab._table is None:
            return None
        return tab._blob, tab._off, tab._table

    def _pairs(self) -> Iterator[tuple[str, int]]:
        if self._values is None:
            return zip(self._tab, range(len(self._tab)), strict=True)
        return zip(self._tab, self._values.tolist(), strict=True)


class _Items(ItemsView[str, int]):
    _mapping: _IdMap

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return self._mapping._pairs()


class _FastIdMap(_IdMap):
    """The same view over a materialised dict (small indexes): plain dict speed."""

    __slots__ = ("_d",)

    def __init__(self, tab: _StringTable, values: memoryview | None = None) -> None:
        super().__init__(tab, values)
        if values is None:
            self._d = {s: i for i, s in enumerate(tab)}
        else:
            self._d = {s: int(values[i]) for i, s in enumerate(tab)}

    def get(self, key: str, default: Any = None) -> Any:
        return self._d.get(key, default)

    def as_dict(self) -> dict[str, int] | None:
        return self._d

    def __getitem__(self, key: str) -> int:
        return self._d[key]

    def __contains__(self, key: object) -> bool:
        return key in self._d


class _StringList(Sequence[str]):
    """Read-only Sequence view of a string table (``ConceptIndex.cuis``)."""

    __slots__ = ("_tab",)

    def __init__(self, tab: _StringTable) -> None:
        self._tab = tab

    def __len__(self) -> int:
        return len(self._tab)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        n = len(self._tab)
        if isinstance(i, slice):
            return [self._tab.string(j) for j in range(*i.indices(n))]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("concept number out of range")
        return self._tab.string(i)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tab)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and self._tab.find(value) >= 0

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        i = self._tab.find(value) if isinstance(value, str) else -1
        if i < 0 or i < start or (stop is not None and i >= stop):
            raise ValueError(f"{value!r} is not in the index")
        return i


def _mv(a: np.ndarray[Any, Any]) -> memoryview:
    # memoryview indexing returns Python ints ~6x faster than numpy scalar indexing.
    return memoryview(a)  # type: ignore[arg-type]


class ConceptIndex:
    """A loaded index. Immutable; safe to share between threads.

    It has no ``close()``: its files' mappings go when the last object viewing them does. The
    arrays it maps are handed out — to the compiled engine (:attr:`key_trie`,
    :attr:`posting_arrays`, the trigram lists), which keeps its own buffer views of them, and
    to any caller — and a mapping with views still open cannot be unmapped (``mmap.close``
    raises ``BufferError``); unmapping it under them anyway would turn their next read into a
    segmentation fault. A close that is safe would need every holder, the compiled code
    included, to check the index before each read. To replace an index directory, drop the
    index and the Extractors made from it first; on Linux a directory may also be replaced
    while mapped (renamed or deleted files live on until they are unmapped), as the server's
    reload relies on.
    """

    def __init__(
        self, path: Path, manifest: dict[str, Any], *, materialize: bool | None = None
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.content_hash: str = manifest["content_hash"]
        a = {name: map_array(path / f"{name}.npy") for name in (
            *_ARRAYS, *(f"{t}_offsets" for t in _STRTABS), *(f"{t}_table" for t in _HASHED)
        )}
        self._a = a
        tabs: dict[str, _StringTable] = {}
        blobs: dict[str, memoryview] = {}
        for t in _STRTABS:
            blobs[t] = map_bytes(path / f"{t}.bin")
            table = _mv(a[f"{t}_table"]) if t in _HASHED else None
            tabs[t] = _StringTable(blobs[t], _mv(a[f"{t}_offsets"]), table)
        self._check_shapes(tabs)
        self._keys, self._strings, self._cuis = tabs["keys"], tabs["strings"], tabs["cuis"]
        self._firsts = tabs["first_tokens"]
        self._m = {name: _mv(a[name]) for name in _ARRAYS}
        small = materialize if materialize is not None else len(self._keys) <= DICT_THRESHOLD
        self.materialized = small
        """Whether the lookups are Python dicts built at load (small indexes only)."""
        if small:
            self._cuis.materialize()
            self._key_ids: _IdMap = _FastIdMap(self._keys)
            self._first_max: _IdMap = _FastIdMap(self._firsts, self._m["first_token_max"])
            token_ids: _IdMap = _FastIdMap(tabs["tokens"])
        else:
            self._key_ids = _IdMap(self._keys)
            self._first_max = _IdMap(self._firsts, self._m["first_token_max"])
            token_ids = _IdMap(tabs["tokens"])
        self.key_trie = KeyTrie(
            a["trie_edge_keys"], a["trie_edge_child"], a["trie_node_key"], token_ids,
            token_ids.as_dict(),
        )
        """The token trie of the compiled matcher (memory-mapped; see the module docstring)."""
        self.cuis: Sequence[str] = _StringList(self._cuis)
        self.posting_arrays = PostingArrays._make([
            *(a[name] for name in PostingArrays._fields[:11]),
            blobs["cuis"], a["cuis_offsets"], blobs["strings"], a["strings_offsets"],
        ])
        """The posting and concept arrays, memory-mapped, that the compiled engine filters a
        key's postings over without building :class:`Posting` objects."""
        self.sabs = _read_lines(path / "sabs.txt")
        self.ttys = _read_lines(path / "ttys.txt")
        self.tuis = _read_lines(path / "tuis.txt")
        counts = manifest.get("counts")
        counted = counts.get("max_key_tokens") if isinstance(counts, dict) else None
        if not isinstance(counted, int):  # (every index this format writes has it)
            ftm = a["first_token_max"]
            counted = int(ftm.max()) if len(ftm) else 0
        self.max_key_tokens: int = counted
        """Length in tokens of the longest key (from the manifest: load reads no array
        whole)."""
        # approximate matching's trigram lists: mapped, never built at load or at request time
        self.trigrams = trigram_index.load(path, manifest["files"], len(self._keys))

    def _check_shapes(self, tabs: Mapping[str, _StringTable]) -> None:
        """Cheap structural checks, so a truncated index fails at load even unverified."""
        a = self._a
        n_keys, n_cuis = len(tabs["keys"]), len(tabs["cuis"])
        n_post = len(a["post_cui"])
        problems = []
        for t, tab in tabs.items():
            end = int(a[f"{t}_offsets"][-1])
            if end != len(tab._blob):
                problems.append(f"{t}.bin has {len(tab._blob)} bytes, offsets say {end}")
        if len(a["post_offsets"]) != n_keys + 1 or int(a["post_offsets"][-1]) != n_post:
            problems.append("post_offsets does not match keys/postings")
        for name in ("post_str", "post_sab", "post_tty", "post_flags", "concept_post"):
            if len(a[name]) != n_post:
                problems.append(f"{name} has {len(a[name])} entries, expected {n_post}")
        for name, n in (("concept_pref", n_cuis), ("concept_sty_offsets", n_cuis + 1),
                        ("concept_post_offsets", n_cuis + 1),
                        ("first_token_max", len(tabs["first_tokens"])),
                        ("trie_edge_child", len(a["trie_edge_keys"]))):
            if len(a[name]) != n:
                problems.append(f"{name} has {len(a[name])} entries, expected {n}")
        size = len(a["trie_edge_keys"])
        if size < 8 or size & (size - 1) or len(a["trie_node_key"]) < 1:
            problems.append("the token trie's tables have impossible sizes")
        if problems:
            raise ConceptIndexError(
                f"{self.path}: index is truncated or inconsistent ({'; '.join(problems)}); "
                "rebuild it."
            )

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def check_files(cls, path: str | os.PathLike[str]) -> None:
        """Raise :class:`ConceptIndexError` unless the index at ``path`` is whole and every file
        matches its manifest hash: what :meth:`load` checks, without opening it (a reload that
        finds the served index's manifest still in place checks its files this way)."""
        cls._checked_manifest(Path(path), True)

    @staticmethod
    def _checked_manifest(p: Path, verify: bool) -> dict[str, Any]:
        """The manifest of the index at ``p``, its format, normaliser and files checked (and,
        with ``verify``, every file's hash)."""
        mpath = p / "manifest.json"
        if not mpath.is_file():
            raise ConceptIndexError(
                f"{p} is not a conceptsvc index (no manifest.json). Build one with "
                "`conceptsvc index build ... --out DIR`."
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConceptIndexError(
                f"{mpath}: unreadable manifest ({exc}); rebuild the index."
            ) from exc
        if not isinstance(manifest, dict):
            raise ConceptIndexError(f"{mpath}: manifest is not a JSON object; rebuild the index.")
        version = manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            older = isinstance(version, int) and version < 4  # before the trigram lists
            raise ConceptIndexError(
                f"{p}: index format version {version!r} is not supported by this conceptsvc "
                f"(expects {' or '.join(map(str, READABLE_VERSIONS))}"
                + ("; older indexes lack the token trie the matcher reads"
                   + (" or approximate matching's trigram lists" if version == 3 else "")
                   if older else "")
                + ("; formats 4 to 6 number the keys of approximate matching's trigram lists "
                   "differently" if version in (4, 5, 6) else "")
                + "); rebuild the index with this version (`conceptsvc index build ... "
                "--out DIR`)."
            )
        if manifest.get("normalizer_version") != NORMALIZER_VERSION:
            raise ConceptIndexError(
                f"{p}: built with normaliser version {manifest.get('normalizer_version')!r}, "
                f"this conceptsvc normalises with {NORMALIZER_VERSION!r}; its keys would not "
                "match captions. Rebuild the index."
            )
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise ConceptIndexError(f"{mpath}: manifest lists no files; rebuild the index.")
        for name in files:
            if not (p / name).is_file():
                raise ConceptIndexError(
                    f"{p}: index file {name} is missing; the index is truncated."
                )
        if _content_hash(files) != manifest.get("content_hash"):
            raise ConceptIndexError(f"{p}: manifest content_hash does not match its file list.")
        for name in files:  # before hashing, which then reads the single pages (mapping.py)
            if name.endswith((".npy", ".bin")):
                settle_page_cache(p / name)
        if verify:
            actual = _hash_files([p / name for name in files])
            for name, expected in files.items():
                if actual[name] != expected:
                    raise ConceptIndexError(
                        f"{p}/{name}: content hash mismatch — the index is corrupt or was "
                        "modified after it was built. Rebuild it."
                    )
        return manifest

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, verify: bool = True, materialize: bool | None = None
    ) -> ConceptIndex:
        """Open an index directory.

        ``verify`` checks every file against the manifest hashes (≈1 s per GB on this
        hardware, two threads). ``materialize`` forces (True) or forbids (False) building
        Python dicts for the lookups; by default only small indexes get them.

        Every mapped file is first re-read into the page cache in single pages
        (:func:`conceptsvc.mapping.settle_page_cache`): a load reads the index from disk once
        (in the background; hashing waits for it), and a request then maps the pages it
        reads, not the large folios a sequential read leaves (RSS).
        """
        p = Path(path)
        manifest = cls._checked_manifest(p, verify)
        try:
            return cls(p, manifest, materialize=materialize)
        except ConceptIndexError:
            raise
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise ConceptIndexError(f"{p}: cannot load index ({exc}); rebuild it.") from exc

    # -- lookups used by the matcher (hot path) ----------------------------------------------
    def key_id(self, key: str) -> int | None:
        result: int | None = self._key_ids.get(key)
        return result

    def max_tokens_from(self, first_token: str) -> int:
        """Length in tokens of the longest key starting with ``first_token`` (0 if none)."""
        result: int = self._first_max.get(first_token, 0)
        return result

    @property
    def first_token_max(self) -> Mapping[str, int]:
        return self._first_max

    @property
    def key_ids(self) -> Mapping[str, int]:
        return self._key_ids

    def postings(self, key: str) -> tuple[Posting, ...]:
        """All (concept, string, source) links of a normalised key; ``()`` when unknown."""
        kid = self._key_ids.get(key)
        return () if kid is None else self.postings_of(kid)

    def postings_of(self, key_id: int) -> tuple[Posting, ...]:
        off = self._m["post_offsets"]
        return tuple(self.posting(i) for i in range(off[key_id], off[key_id + 1]))

    def posting(self, i: int) -> Posting:
        """Posting number ``i`` (postings are numbered key by key: ``post_offsets``)."""
        m = self._m
        return Posting(
            self._cuis.string(m["post_cui"][i]),
            self._strings.string(m["post_str"][i]),
            self.sabs[m["post_sab"][i]],
            self.ttys[m["post_tty"][i]],
            m["post_flags"][i],
        )

    def key(self, key_id: int) -> str:
        return self._keys.string(key_id)

    def keys(self) -> Iterator[str]:
        """Every normalised key, in sorted order."""
        return iter(self._keys)

    @property
    def n_keys(self) -> int:
        return len(self._keys)

    def ambiguous_keys(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """Every key whose postings name more than one concept, with those CUIs (sorted)."""
        pc = np.asarray(self._a["post_cui"])
        off = np.asarray(self._a["post_offsets"]).astype(np.int64)
        if not len(pc):
            return
        new = np.ones(len(pc), dtype=np.int64)
        new[1:] = pc[1:] != pc[:-1]
        new[off[:-1]] = 1  # the first posting of every key starts a new concept
        distinct = np.add.reduceat(new, off[:-1])
        for kid in np.flatnonzero(distinct > 1).tolist():
            cids = dict.fromkeys(pc[off[kid] : off[kid + 1]].tolist())
            yield self._keys.string(kid), tuple(self._cuis.string(c) for c in cids)

    # -- concepts ----------------------------------------------------------------------------
    def string(self, sid: int) -> str:
        return self._strings.string(sid)

    def __contains__(self, cui: object) -> bool:
        return isinstance(cui, str) and self._cuis.find(cui) >= 0

    def __len__(self) -> int:
        return len(self._cuis)

    def concept(self, cui: str) -> ConceptInfo | None:
        cid = self._cuis.find(cui)
        if cid < 0:
            return None
        m = self._m
        lo, hi = m["concept_post_offsets"][cid], m["concept_post_offsets"][cid + 1]
        post, sab = m["concept_post"], m["post_sab"]
        sabs = {self.sabs[sab[post[i]]] for i in range(lo, hi)}
        return ConceptInfo(
            cui=cui,
            preferred_name=self._strings.string(m["concept_pref"][cid]),
            semantic_types=self.semantic_types_of(cid),
            sources=tuple(sorted(sabs)),
        )

    def concept_number(self, cui: str) -> int:
        """The number of concept ``cui`` (its rank in CUI order, as ``post_cui`` holds it), or
        -1 when the index does not have it."""
        return self._cuis.find(cui)

    def name_and_types(self, cui: str) -> tuple[str, tuple[str, ...]] | None:
        """(preferred name, semantic types) of a concept: :meth:`concept` without the sources,
        which the extractor does not need (it asks once per concept it meets)."""
        cid = self._cuis.find(cui)
        if cid < 0:
            return None
        return (
            self._strings.string(self._m["concept_pref"][cid]),
            self.semantic_types_of(cid),
        )

    def semantic_types_of(self, cid: int) -> tuple[str, ...]:
        m = self._m
        lo, hi = m["concept_sty_offsets"][cid], m["concept_sty_offsets"][cid + 1]
        codes = m["concept_sty"]
        return tuple(self.tuis[codes[i]] for i in range(lo, hi))

    def concept_postings(self, cui: str) -> tuple[Posting, ...]:
        """Every string of a concept (its synonyms), in key order."""
        cid = self._cuis.find(cui)
        if cid < 0:
            return ()
        m = self._m
        lo, hi = m["concept_post_offsets"][cid], m["concept_post_offsets"][cid + 1]
        post = m["concept_post"]
        return tuple(self.posting(post[i]) for i in range(lo, hi))


# -- building -------------------------------------------------------------------------------

_NO_KEY = -1  # the string normalises to nothing
_KEY_UNKNOWN = -2  # interned as a preferred name only; key not computed yet


@dataclass
class IndexBuilder:
    """Accumulates concepts and terms, then writes an index directory.

    The caller (``conceptsvc.dictionary``) has already filtered and chosen preferred names;
    this class only normalises, deduplicates and lays out the arrays. It is built for a full
    UMLS: one Python dict entry per distinct string and per distinct key, everything per
    posting in compact ``array`` columns, and the layout done with numpy sorts at the end.
    Each distinct string is normalised once, however many sources carry it.
    """

    source_release: str = "unknown"
    filters: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._cui_ids: dict[str, int] = {}
        self._pref = array("q")  # per concept: preferred string number, -1 unset
        self._sty = array("I")  # per concept: index into self._sty_sets
        self._sty_sets: list[tuple[str, ...]] = [()]
        self._sty_ids: dict[tuple[str, ...], int] = {(): 0}
        self._strings: dict[str, int] = {}
        self._str_key = array("q")  # per string: key number, _NO_KEY or _KEY_UNKNOWN
        self._keys: dict[str, int] = {}
        self._first_max: dict[str, int] = {}
        self._sab_ids: dict[str, int] = {}
        self._tty_ids: dict[str, int] = {}
        self._p_cid = array("I")
        self._p_sid = array("I")
        self._p_sab = array("H")
        self._p_tty = array("H")
        self._p_flags = array("B")

    @staticmethod
    def _intern(table: dict[str, int], value: str, what: str) -> int:
        i = table.get(value)
        if i is None:
            if "\n" in value or not value:
                raise ConceptIndexError(f"invalid {what} {value!r}: empty or contains a newline")
            i = table[value] = len(table)
        return i

    def _cui(self, cui: str) -> int:
        i = self._cui_ids.get(cui)
        if i is None:
            if not cui or "\n" in cui:
                raise ConceptIndexError(f"invalid concept id {cui!r}: empty or contains a newline")
            i = self._cui_ids[cui] = len(self._cui_ids)
            self._pref.append(-1)
            self._sty.append(0)
        return i

    def _string(self, s: str) -> int:
        i = self._strings.get(s)
        if i is None:
            if "\n" in s or "\r" in s:
                s = s.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
                return self._string(s)
            i = self._strings[s] = len(self._str_key)
            self._str_key.append(_KEY_UNKNOWN)
        return i

    def key_known(self, string: str) -> bool:
        """Whether ``string``'s key is already computed (see :meth:`prime_keys`)."""
        sid = self._strings.get(string)
        return sid is not None and self._str_key[sid] != _KEY_UNKNOWN

    def prime_keys(self, strings: Sequence[str], keys: Sequence[str]) -> None:
        """Record keys computed elsewhere (``keys[i] == normalize_term(strings[i])``, e.g. in
        worker processes), so that :meth:`add_term` does not normalise these strings again."""
        for s, key in zip(strings, keys, strict=True):
            sid = self._strings.get(s)
            if sid is None:
                sid = self._string(s)
            self._key_of(sid, s, key)

    def _key_of(self, sid: int, s: str, key: str | None = None) -> int:
        kid = self._str_key[sid]
        if kid != _KEY_UNKNOWN:
            return kid
        if key is None:
            key = normalize_term(s)
        if not key:
            kid = _NO_KEY
        else:
            kid = self._keys.get(key, -1)
            if kid < 0:
                kid = self._keys[key] = len(self._keys)
                first, _, _ = key.partition(" ")
                ntok = key.count(" ") + 1
                if ntok > self._first_max.get(first, 0):
                    self._first_max[first] = ntok
        self._str_key[sid] = kid
        return kid

    def set_concept(
        self, cui: str, *, preferred_name: str, semantic_types: Sequence[str]
    ) -> None:
        cid = self._cui(cui)
        self._pref[cid] = self._string(preferred_name)
        stys = tuple(dict.fromkeys(semantic_types))
        for t in stys:
            if not t or "\n" in t:
                raise ConceptIndexError(f"invalid semantic type {t!r} for {cui}")
        sid = self._sty_ids.get(stys)
        if sid is None:
            sid = self._sty_ids[stys] = len(self._sty_sets)
            self._sty_sets.append(stys)
        self._sty[cid] = sid

    def add_term(self, cui: str, string: str, *, sab: str, tty: str, flags: int = 0) -> bool:
        """Add one dictionary string; returns False if it normalises to nothing.

        Called once per atom (16 M times for a full UMLS), so the common case — string, key,
        concept, source and term type all seen before — is a handful of dict lookups and
        array appends with no further calls.
        """
        sid = self._strings.get(string)
        if sid is None:
            sid = self._string(string)
        kid = self._str_key[sid]
        if kid == _KEY_UNKNOWN:
            kid = self._key_of(sid, string)
        if kid < 0:
            return False
        cid = self._cui_ids.get(cui)
        if cid is None:
            cid = self._cui(cui)
        sab_id = self._sab_ids.get(sab)
        if sab_id is None:
            sab_id = self._intern(self._sab_ids, sab, "source")
        tty_id = self._tty_ids.get(tty)
        if tty_id is None:
            tty_id = self._intern(self._tty_ids, tty, "term type")
        self._p_cid.append(cid)
        self._p_sid.append(sid)
        self._p_sab.append(sab_id)
        self._p_tty.append(tty_id)
        self._p_flags.append(flags & 0xFF)
        return True

    def write(self, out: str | os.PathLike[str]) -> Path:
        """Write the index to ``out`` atomically (a temp dir renamed into place)."""
        out_path = Path(out)
        for cui, cid in self._cui_ids.items():
            if self._pref[cid] < 0:
                raise ConceptIndexError(f"concept {cui} has terms but no preferred name was set")
        if out_path.exists() and not (out_path / "manifest.json").is_file():
            raise ConceptIndexError(
                f"{out_path} exists and is not an index; choose an empty --out path."
            )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its directory is 0700 whatever the umask, and this one becomes
        # the index, which other users read (an image built as root, served as a service
        # user; a dictionary mounted read-only). mkdir gives the umask's mode, as cp and tar do.
        while True:
            tmp = out_path.parent / f".index-{secrets.token_hex(8)}"
            try:
                tmp.mkdir()
                break
            except FileExistsError:
                continue
        try:
            self._write_files(tmp)
            _sync_files(tmp)
            if out_path.exists():
                old = Path(tempfile.mkdtemp(prefix=".index-old-", dir=out_path.parent))
                old.rmdir()
                out_path.rename(old)
                tmp.rename(out_path)
                shutil.rmtree(old)
            else:
                tmp.rename(out_path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out_path

    def _write_files(self, d: Path) -> None:
        n_keys, n_cuis, n_str = len(self._keys), len(self._cui_ids), len(self._str_key)
        # Keys and concepts are renumbered in sorted order (binary-stable, reproducible).
        sorted_keys = sorted(self._keys)
        key_rank = np.empty(n_keys, dtype=np.int64)
        key_rank[np.fromiter((self._keys[k] for k in sorted_keys), np.int64, n_keys)] = (
            np.arange(n_keys)
        )
        sorted_cuis = sorted(self._cui_ids)
        cid_rank = np.empty(n_cuis, dtype=np.int64)
        cid_rank[np.fromiter((self._cui_ids[c] for c in sorted_cuis), np.int64, n_cuis)] = (
            np.arange(n_cuis)
        )
        str_key = np.frombuffer(self._str_key, dtype=np.int64) if n_str else np.zeros(
            0, np.int64)

        def col(a: array[int], dtype: Any) -> np.ndarray[Any, Any]:
            return np.frombuffer(a, dtype=dtype) if len(a) else np.zeros(0, dtype=dtype)

        p_sid = col(self._p_sid, np.uint32).astype(np.int64)
        p_key = key_rank[str_key[p_sid]] if len(p_sid) else np.zeros(0, np.int64)
        p_cid = cid_rank[col(self._p_cid, np.uint32)] if len(p_sid) else np.zeros(0, np.int64)
        p_sab = col(self._p_sab, np.uint16)
        p_tty = col(self._p_tty, np.uint16)
        p_flags = col(self._p_flags, np.uint8)
        order = np.lexsort((p_tty, p_sab, p_sid, p_cid, p_key))
        p_key, p_cid, p_sid = p_key[order], p_cid[order], p_sid[order]
        p_sab, p_tty, p_flags = p_sab[order], p_tty[order], p_flags[order]
        del order
        # Duplicate rows (same key, concept, string, source, term type) merge; flags OR.
        if len(p_key):
            first = np.ones(len(p_key), dtype=bool)
            first[1:] = (
                (p_key[1:] != p_key[:-1]) | (p_cid[1:] != p_cid[:-1]) | (p_sid[1:] != p_sid[:-1])
                | (p_sab[1:] != p_sab[:-1]) | (p_tty[1:] != p_tty[:-1])
            )
            starts = np.flatnonzero(first)
            p_flags = np.bitwise_or.reduceat(p_flags, starts).astype(np.uint8)
            p_key, p_cid, p_sid = p_key[starts], p_cid[starts], p_sid[starts]
            p_sab, p_tty = p_sab[starts], p_tty[starts]
        pref_old = col(self._pref, np.int64)
        pref = np.empty(n_cuis, dtype=np.uint32)
        pref[cid_rank] = pref_old
        if len(p_key):
            p_flags |= np.where(pref[p_cid] == p_sid, FLAG_PREFERRED, 0).astype(np.uint8)
        n_post = len(p_key)
        post_off = np.zeros(n_keys + 1, dtype=np.uint64)
        np.cumsum(np.bincount(p_key, minlength=n_keys), out=post_off[1:])
        # Semantic types per concept (new order).
        tuis = sorted({t for ts in self._sty_sets for t in ts})
        tui_ids = {t: i for i, t in enumerate(tuis)}
        sty_of_old = col(self._sty, np.uint32)
        sty_sets = [self._sty_sets[s] for s in sty_of_old[np.argsort(cid_rank)].tolist()]
        sty_off = np.zeros(n_cuis + 1, dtype=np.uint32)
        np.cumsum([len(s) for s in sty_sets], out=sty_off[1:])
        sty_codes = np.fromiter(
            (tui_ids[t] for s in sty_sets for t in s), dtype=np.uint16, count=int(sty_off[-1])
        )
        # Postings of each concept.
        cpost = np.argsort(p_cid, kind="stable").astype(np.uint32)
        cpost_off = np.zeros(n_cuis + 1, dtype=np.uint64)
        np.cumsum(np.bincount(p_cid, minlength=n_cuis), out=cpost_off[1:])
        firsts = sorted(self._first_max)
        arrays: dict[str, np.ndarray[Any, Any]] = {
            "post_offsets": post_off,
            "post_cui": p_cid.astype(np.uint32),
            "post_str": p_sid.astype(np.uint32),
            "post_sab": p_sab.astype(np.uint16),
            "post_tty": p_tty.astype(np.uint16),
            "post_flags": p_flags.astype(np.uint8),
            "concept_pref": pref,
            "concept_sty_offsets": sty_off,
            "concept_sty": sty_codes,
            "concept_post_offsets": cpost_off,
            "concept_post": cpost,
            "first_token_max": np.array(
                [self._first_max[f] for f in firsts], dtype=np.uint16
            ),
        }
        tokens, trie = _build_trie(sorted_keys)
        arrays.update(trie)
        for name, arr in arrays.items():
            np.save(d / f"{name}.npy", arr, allow_pickle=False)
        del trie
        _write_strtab(d, "keys", sorted_keys, n_keys, hashed=True)
        trigram_index.write(d, trigram_index.build_arrays(sorted_keys, build_hash_table))
        del sorted_keys
        _write_strtab(d, "tokens", tokens, len(tokens), hashed=True)
        _write_strtab(d, "strings", self._strings, n_str, hashed=False)
        _write_strtab(d, "cuis", sorted_cuis, n_cuis, hashed=True)
        _write_strtab(d, "first_tokens", firsts, len(firsts), hashed=True)
        texts = {"sabs.txt": list(self._sab_ids), "ttys.txt": list(self._tty_ids),
                 "tuis.txt": tuis}
        for name, lines in texts.items():
            (d / name).write_bytes("\n".join(lines).encode("utf-8"))
        files = _hash_files(sorted(d.iterdir()))
        sab_names = list(self._sab_ids)
        per_sab = np.bincount(arrays["post_sab"], minlength=len(sab_names))
        pairs = np.unique((p_cid.astype(np.uint64) << np.uint64(16)) | p_sab.astype(np.uint64))
        concepts_per_sab = np.bincount(
            (pairs & np.uint64(0xFFFF)).astype(np.int64), minlength=len(sab_names)
        )
        per_tui = np.bincount(sty_codes, minlength=len(tuis))
        manifest = {
            "format_version": FORMAT_VERSION,
            "normalizer_version": NORMALIZER_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_release": self.source_release,
            "inputs": self.inputs,
            "filters": self.filters,
            "counts": {
                "concepts": n_cuis,
                "keys": n_keys,
                "strings": n_str,
                "postings": n_post,
                "max_key_tokens": max(self._first_max.values(), default=0),
                "per_sab": {s: int(n) for s, n in zip(sab_names, per_sab, strict=True)},
                "concepts_per_sab": {
                    s: int(n) for s, n in zip(sab_names, concepts_per_sab, strict=True)
                },
                "per_semantic_type": {t: int(n) for t, n in zip(tuis, per_tui, strict=True)},
            },
            "report": self.report,
            "files": files,
            "content_hash": _content_hash(files),
        }
        (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _sync_files(d: Path) -> None:
    """Write the files of ``d`` back to disk before the index is renamed into place: a crash
    then leaves the old index or the whole new one, and a load right after the build finds
    no dirty page, which the kernel would not drop (:func:`mapping.settle_page_cache`)."""
    for f in d.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def build_index(
    out: str | os.PathLike[str],
    concepts: Iterable[tuple[str, str, Sequence[str]]],
    terms: Iterable[tuple[str, str, str, str, int]],
    **builder_kwargs: Any,
) -> Path:
    """Convenience: ``concepts`` as (cui, preferred name, TUIs), ``terms`` as
    (cui, string, sab, tty, flags)."""
    b = IndexBuilder(**builder_kwargs)
    for cui, name, stys in concepts:
        b.set_concept(cui, preferred_name=name, semantic_types=stys)
    for cui, s, sab, tty, flags in terms:
        b.add_term(cui, s, sab=sab, tty=tty, flags=flags)
    return b.write(out)
