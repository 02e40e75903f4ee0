"""The compiled concept index: built once offline, loaded fast, never written at request time.

An index is a directory::

    manifest.json        format/normaliser versions, source release, filters, counts, hashes
    keys.txt             normalised term keys, UTF-8, one per line, sorted
    key_offsets.npy      uint32[n_keys+1]: key i owns postings [off[i], off[i+1])
    post_cui.npy         uint32 per posting: concept number
    post_str.npy         uint32 per posting: string number (the original dictionary string)
    post_sab.npy         uint16 per posting: source number (``sabs.txt``)
    post_tty.npy         uint16 per posting: term-type number (``ttys.txt``)
    post_flags.npy       uint8 per posting: FLAG_* bits
    strings.bin          original strings, UTF-8, "\\n"-separated (newlines in strings become spaces)
    string_offsets.npy   uint64[n_strings+1] byte offsets into strings.bin
    cuis.txt             concept ids, one per line, concept number order
    pref_str.npy         uint32 per concept: string number of the preferred name
    sty_offsets.npy      uint32[n_cuis+1]; sty_codes.npy uint16: semantic types (``tuis.txt``)
    cui_post_offsets.npy uint32[n_cuis+1]; cui_post.npy uint32: postings of each concept
    first_tokens.txt     first token of every key; first_token_max.npy uint16: longest key (tokens)
    sabs.txt ttys.txt tuis.txt

Why this shape: plain arrays memory-map in milliseconds and cost no RSS until touched, which is
what lets a full UMLS (≈ 10 M keys) load in seconds; only the two dictionaries the matcher
consults on every token (key → number, first token → longest key) are built in Python at load
time. No pickle: ``np.load(allow_pickle=False)`` and text files only.

Integrity: every file's SHA-256 is in the manifest, and ``content_hash`` is the hash of those.
Loading refuses an unknown format version, a normaliser version other than this code's, a
missing file or a hash mismatch. Cache keys elsewhere include ``content_hash``, so a new
dictionary can never be served stale results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from conceptsvc.errors import IndexError_
from conceptsvc.normalize import NORMALIZER_VERSION, normalize_term

__all__ = [
    "FLAG_ABBREVIATION",
    "FLAG_CASE_SENSITIVE",
    "FLAG_PREFERRED",
    "FORMAT_VERSION",
    "ConceptIndex",
    "ConceptInfo",
    "IndexBuilder",
    "Posting",
]

FORMAT_VERSION = 1

FLAG_PREFERRED = 1  # this string is the concept's preferred name
FLAG_ABBREVIATION = 2  # an abbreviation/acronym (TTY AB/ACR/…, or a short all-caps string)
FLAG_CASE_SENSITIVE = 4  # match only when the caption's surface has the same letter case

_ARRAYS = (
    "key_offsets",
    "post_cui",
    "post_str",
    "post_sab",
    "post_tty",
    "post_flags",
    "string_offsets",
    "pref_str",
    "sty_offsets",
    "sty_codes",
    "cui_post_offsets",
    "cui_post",
    "first_token_max",
)
_TEXTS = ("keys.txt", "cuis.txt", "first_tokens.txt", "sabs.txt", "ttys.txt", "tuis.txt")
_BLOBS = ("strings.bin",)


class Posting(NamedTuple):
    """One (normalised key → concept) link, with where the string came from."""

    cui: str
    string: str
    sab: str
    tty: str
    flags: int


@dataclass(frozen=True, slots=True)
class ConceptInfo:
    cui: str
    preferred_name: str
    semantic_types: tuple[str, ...]
    sources: tuple[str, ...]


def _read_lines(path: Path) -> list[str]:
    data = path.read_bytes().decode("utf-8")
    return data.split("\n") if data else []


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _content_hash(file_hashes: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(file_hashes):
        h.update(f"{name}\0{file_hashes[name]}\n".encode())
    return h.hexdigest()


class ConceptIndex:
    """A loaded index. Immutable; safe to share between threads."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.content_hash: str = manifest["content_hash"]
        a = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _ARRAYS}
        self._a = a
        keys = _read_lines(path / "keys.txt")
        self._key_ids: dict[str, int] = dict(zip(keys, range(len(keys)), strict=True))
        self.cuis: list[str] = _read_lines(path / "cuis.txt")
        self._cui_ids: dict[str, int] = dict(zip(self.cuis, range(len(self.cuis)), strict=True))
        firsts = _read_lines(path / "first_tokens.txt")
        self._first_max: dict[str, int] = dict(
            zip(firsts, np.asarray(a["first_token_max"]).tolist(), strict=True)
        )
        self.sabs = _read_lines(path / "sabs.txt")
        self.ttys = _read_lines(path / "ttys.txt")
        self.tuis = _read_lines(path / "tuis.txt")
        self._strings = np.memmap(path / "strings.bin", dtype=np.uint8, mode="r") if (
            path / "strings.bin"
        ).stat().st_size else np.zeros(0, dtype=np.uint8)
        self.max_key_tokens = max(self._first_max.values(), default=0)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str], *, verify: bool = True) -> ConceptIndex:
        """Open an index directory; ``verify`` checks every file against the manifest hashes."""
        p = Path(path)
        mpath = p / "manifest.json"
        if not mpath.is_file():
            raise IndexError_(
                f"{p} is not a conceptsvc index (no manifest.json). Build one with "
                "`conceptsvc index build ... --out DIR`."
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise IndexError_(f"{mpath}: unreadable manifest ({exc}); rebuild the index.") from exc
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexError_(
                f"{p}: index format version {version!r} is not supported by this conceptsvc "
                f"(expects {FORMAT_VERSION}); rebuild the index with this version."
            )
        if manifest.get("normalizer_version") != NORMALIZER_VERSION:
            raise IndexError_(
                f"{p}: built with normaliser version {manifest.get('normalizer_version')!r}, "
                f"this conceptsvc normalises with {NORMALIZER_VERSION!r}; its keys would not "
                "match captions. Rebuild the index."
            )
        files: dict[str, str] = manifest.get("files", {})
        for name in files:
            if not (p / name).is_file():
                raise IndexError_(f"{p}: index file {name} is missing; the index is truncated.")
        if _content_hash(files) != manifest.get("content_hash"):
            raise IndexError_(f"{p}: manifest content_hash does not match its file list.")
        if verify:
            for name, expected in files.items():
                if _sha256(p / name) != expected:
                    raise IndexError_(
                        f"{p}/{name}: content hash mismatch — the index is corrupt or was "
                        "modified after it was built. Rebuild it."
                    )
        try:
            return cls(p, manifest)
        except (OSError, ValueError, KeyError) as exc:
            raise IndexError_(f"{p}: cannot load index ({exc}); rebuild it.") from exc

    # -- lookups used by the matcher (hot path) ----------------------------------------------
    def key_id(self, key: str) -> int | None:
        return self._key_ids.get(key)

    def max_tokens_from(self, first_token: str) -> int:
        """Length in tokens of the longest key starting with ``first_token`` (0 if none)."""
        return self._first_max.get(first_token, 0)

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
        a = self._a
        lo, hi = int(a["key_offsets"][key_id]), int(a["key_offsets"][key_id + 1])
        return tuple(self._posting(i) for i in range(lo, hi))

    def _posting(self, i: int) -> Posting:
        a = self._a
        return Posting(
            self.cuis[int(a["post_cui"][i])],
            self.string(int(a["post_str"][i])),
            self.sabs[int(a["post_sab"][i])],
            self.ttys[int(a["post_tty"][i])],
            int(a["post_flags"][i]),
        )

    def keys(self) -> Iterator[str]:
        return iter(self._key_ids)

    # -- concepts ----------------------------------------------------------------------------
    def string(self, sid: int) -> str:
        off = self._a["string_offsets"]
        return bytes(self._strings[int(off[sid]) : int(off[sid + 1]) - 1]).decode("utf-8")

    def __contains__(self, cui: object) -> bool:
        return cui in self._cui_ids

    def __len__(self) -> int:
        return len(self.cuis)

    def concept(self, cui: str) -> ConceptInfo | None:
        cid = self._cui_ids.get(cui)
        if cid is None:
            return None
        a = self._a
        return ConceptInfo(
            cui=cui,
            preferred_name=self.string(int(a["pref_str"][cid])),
            semantic_types=self.semantic_types_of(cid),
            sources=tuple(sorted({p.sab for p in self.concept_postings(cui)})),
        )

    def semantic_types_of(self, cid: int) -> tuple[str, ...]:
        a = self._a
        lo, hi = int(a["sty_offsets"][cid]), int(a["sty_offsets"][cid + 1])
        return tuple(self.tuis[int(c)] for c in a["sty_codes"][lo:hi])

    def concept_postings(self, cui: str) -> tuple[Posting, ...]:
        """Every string of a concept (its synonyms), in build order."""
        cid = self._cui_ids.get(cui)
        if cid is None:
            return ()
        a = self._a
        lo, hi = int(a["cui_post_offsets"][cid]), int(a["cui_post_offsets"][cid + 1])
        return tuple(self._posting(int(i)) for i in a["cui_post"][lo:hi])


@dataclass
class _TermRow:
    cui: int
    string: int
    sab: int
    tty: int
    flags: int


@dataclass
class IndexBuilder:
    """Accumulates concepts and terms, then writes an index directory.

    The caller (``conceptsvc.dictionary``) has already filtered and chosen preferred names;
    this class only normalises, deduplicates and lays out the arrays.
    """

    source_release: str = "unknown"
    filters: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._cui_ids: dict[str, int] = {}
        self._cuis: list[str] = []
        self._pref: dict[int, int] = {}
        self._stys: dict[int, tuple[str, ...]] = {}
        self._strings: dict[str, int] = {}
        self._string_list: list[str] = []
        self._sab_ids: dict[str, int] = {}
        self._tty_ids: dict[str, int] = {}
        self._by_key: dict[str, dict[tuple[int, int, int, int], int]] = {}

    def _intern(self, table: dict[str, int], value: str) -> int:
        i = table.get(value)
        if i is None:
            i = table[value] = len(table)
        return i

    def _cui(self, cui: str) -> int:
        i = self._cui_ids.get(cui)
        if i is None:
            i = self._cui_ids[cui] = len(self._cuis)
            self._cuis.append(cui)
        return i

    def _string(self, s: str) -> int:
        s = s.replace("\n", " ").replace("\r", " ")
        i = self._strings.get(s)
        if i is None:
            i = self._strings[s] = len(self._string_list)
            self._string_list.append(s)
        return i

    def set_concept(
        self, cui: str, *, preferred_name: str, semantic_types: Sequence[str]
    ) -> None:
        cid = self._cui(cui)
        self._pref[cid] = self._string(preferred_name)
        self._stys[cid] = tuple(dict.fromkeys(semantic_types))

    def add_term(self, cui: str, string: str, *, sab: str, tty: str, flags: int = 0) -> bool:
        """Add one dictionary string; returns False if it normalises to nothing."""
        key = normalize_term(string)
        if not key:
            return False
        cid = self._cui(cui)
        sid = self._string(string)
        row = (cid, sid, self._intern(self._sab_ids, sab), self._intern(self._tty_ids, tty))
        postings = self._by_key.setdefault(key, {})
        postings[row] = postings.get(row, 0) | flags
        return True

    @property
    def n_concepts(self) -> int:
        return len(self._cuis)

    def write(self, out: str | os.PathLike[str]) -> Path:
        """Write the index to ``out`` atomically (a temp dir renamed into place)."""
        out_path = Path(out)
        for cid, cui in enumerate(self._cuis):
            if cid not in self._pref:
                raise IndexError_(f"concept {cui} has terms but no preferred name was set")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".index-", dir=out_path.parent))
        try:
            self._write_files(tmp)
            if out_path.exists():
                if not (out_path / "manifest.json").is_file():
                    raise IndexError_(
                        f"{out_path} exists and is not an index; choose an empty --out path."
                    )
                old = out_path.with_name(out_path.name + ".old")
                if old.exists():
                    shutil.rmtree(old)
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
        keys = sorted(self._by_key)
        key_off = np.zeros(len(keys) + 1, dtype=np.uint32)
        rows: list[tuple[int, int, int, int, int]] = []
        first_max: dict[str, int] = {}
        for i, k in enumerate(keys):
            postings = self._by_key[k]
            for (cid, sid, sab, tty), fl in sorted(postings.items()):
                flags = fl | (FLAG_PREFERRED if self._pref.get(cid) == sid else 0)
                rows.append((cid, sid, sab, tty, flags))
            key_off[i + 1] = len(rows)
            toks = k.split(" ")
            if len(toks) > first_max.get(toks[0], 0):
                first_max[toks[0]] = len(toks)
        arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
        tuis = sorted({t for ts in self._stys.values() for t in ts})
        tui_ids = {t: i for i, t in enumerate(tuis)}
        sty_off = np.zeros(len(self._cuis) + 1, dtype=np.uint32)
        sty_codes: list[int] = []
        for cid in range(len(self._cuis)):
            sty_codes.extend(tui_ids[t] for t in self._stys.get(cid, ()))
            sty_off[cid + 1] = len(sty_codes)
        order = np.argsort(arr[:, 0], kind="stable") if len(arr) else np.zeros(0, dtype=np.int64)
        counts = np.bincount(arr[:, 0], minlength=len(self._cuis)) if len(arr) else np.zeros(
            len(self._cuis), dtype=np.int64
        )
        cui_post_off = np.zeros(len(self._cuis) + 1, dtype=np.uint32)
        np.cumsum(counts, out=cui_post_off[1:])
        encoded = [s.encode("utf-8") + b"\n" for s in self._string_list]
        str_off = np.zeros(len(encoded) + 1, dtype=np.uint64)
        np.cumsum([len(e) for e in encoded], out=str_off[1:])
        (d / "strings.bin").write_bytes(b"".join(encoded))
        firsts = sorted(first_max)
        arrays: dict[str, np.ndarray[Any, Any]] = {
            "key_offsets": key_off,
            "post_cui": arr[:, 0].astype(np.uint32),
            "post_str": arr[:, 1].astype(np.uint32),
            "post_sab": arr[:, 2].astype(np.uint16),
            "post_tty": arr[:, 3].astype(np.uint16),
            "post_flags": arr[:, 4].astype(np.uint8),
            "string_offsets": str_off,
            "pref_str": np.array(
                [self._pref[c] for c in range(len(self._cuis))], dtype=np.uint32
            ),
            "sty_offsets": sty_off,
            "sty_codes": np.array(sty_codes, dtype=np.uint16),
            "cui_post_offsets": cui_post_off,
            "cui_post": order.astype(np.uint32),
            "first_token_max": np.array([first_max[f] for f in firsts], dtype=np.uint16),
        }
        for name, a in arrays.items():
            np.save(d / f"{name}.npy", a, allow_pickle=False)
        texts = {
            "keys.txt": keys,
            "cuis.txt": self._cuis,
            "first_tokens.txt": firsts,
            "sabs.txt": list(self._sab_ids),
            "ttys.txt": list(self._tty_ids),
            "tuis.txt": tuis,
        }
        for name, lines in texts.items():
            (d / name).write_bytes("\n".join(lines).encode("utf-8"))
        files = {p.name: _sha256(p) for p in sorted(d.iterdir())}
        per_sab = np.bincount(arrays["post_sab"], minlength=len(self._sab_ids)) if len(arr) else []
        per_tui = np.bincount(arrays["sty_codes"], minlength=len(tuis)) if sty_codes else []
        manifest = {
            "format_version": FORMAT_VERSION,
            "normalizer_version": NORMALIZER_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_release": self.source_release,
            "inputs": self.inputs,
            "filters": self.filters,
            "counts": {
                "concepts": len(self._cuis),
                "keys": len(keys),
                "strings": len(self._string_list),
                "postings": len(rows),
                "per_sab": {s: int(n) for s, n in zip(self._sab_ids, per_sab, strict=True)},
                "per_semantic_type": {t: int(n) for t, n in zip(tuis, per_tui, strict=True)},
            },
            "report": self.report,
            "files": files,
            "content_hash": _content_hash(files),
        }
        (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


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
