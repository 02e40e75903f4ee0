"""Streaming readers for UMLS Rich Release Format (RRF) files, as NLM distributes them.

Users have META directories in several shapes, so a table is found in any of them:
``MRCONSO.RRF``, ``MRCONSO.RRF.gz``, or the split distribution files ``MRCONSO.RRF.aa.gz``,
``MRCONSO.RRF.ab.gz`` … (also uncompressed ``MRCONSO.RRF.aa``), which are read in order as one
table. Column order comes from ``MRFILES.RRF`` when the directory has one (so a subset or a
future release with an extra column still reads correctly), otherwise from the UMLS reference
manual (:data:`STANDARD_COLUMNS`).

Real files have quirks the readers accept: every row ends with a ``|`` (so a split yields one
empty extra field), the last row may lack its newline, line endings may be CRLF, and a split
part may end in the middle of a row (the row continues in the next part) or may end with a
complete row that has no newline (then it does not). Anything else that does not fit — a wrong
number of fields, bytes that are not UTF-8 — is a :class:`~conceptsvc.errors.MalformedRowError`
naming the file and the line, or, with ``on_error="skip"``, a counted skip.

Rows are yielded as tuples of strings in a fixed order chosen per table (the named tuples
below) because a full MRCONSO has 16 million rows: a per-row dict would cost seconds and
gigabytes for nothing.
"""

from __future__ import annotations

import functools
import gzip
import logging
import operator
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

from conceptsvc.errors import DictionaryError, MalformedRowError
from conceptsvc.sources import OnError, Progress, ReadStats

__all__ = [
    "STANDARD_COLUMNS",
    "ConsoRow",
    "MetaDir",
    "RankRow",
    "ReleaseInfo",
    "SabRow",
    "StyRow",
    "iter_mrconso",
    "iter_mrrank",
    "iter_mrsab",
    "iter_mrsty",
    "read_release",
    "read_table",
]

log = logging.getLogger(__name__)

# Column order per the UMLS Reference Manual (section 3.3, "Data elements"), used when the
# directory carries no MRFILES.RRF.
STANDARD_COLUMNS: dict[str, tuple[str, ...]] = {
    "MRCONSO.RRF": (
        "CUI", "LAT", "TS", "LUI", "STT", "SUI", "ISPREF", "AUI", "SAUI", "SCUI", "SDUI",
        "SAB", "TTY", "CODE", "STR", "SRL", "SUPPRESS", "CVF",
    ),
    "MRSTY.RRF": ("CUI", "TUI", "STN", "STY", "ATUI", "CVF"),
    "MRSAB.RRF": (
        "VCUI", "RCUI", "VSAB", "RSAB", "SON", "SF", "SVER", "VSTART", "VEND", "IMETA",
        "RMETA", "SLC", "SCC", "SRL", "TFR", "CFR", "CXTY", "TTYL", "ATNL", "LAT", "CENC",
        "CURVER", "SABIN", "SSN", "SCIT",
    ),
    "MRRANK.RRF": ("RANK", "SAB", "TTY", "SUPPRESS"),
    "MRFILES.RRF": ("FIL", "DES", "FMT", "CLS", "RWS", "BTS"),
}

# MRFILES of some releases name MRRANK's first column MRRANK_RANK.
_COLUMN_ALIASES = {"MRRANK_RANK": "RANK"}

_SPLIT_SUFFIX = re.compile(r"^\.([a-z]{2,3})(\.gz)?$")


class ConsoRow(NamedTuple):
    """The MRCONSO columns conceptsvc uses, in this order whatever the file's order."""

    cui: str
    lat: str
    ts: str
    stt: str
    ispref: str
    sab: str
    tty: str
    string: str
    suppress: str


class StyRow(NamedTuple):
    cui: str
    tui: str
    sty: str


class SabRow(NamedTuple):
    vsab: str
    rsab: str
    son: str
    sver: str
    curver: str
    lat: str


class RankRow(NamedTuple):
    rank: str
    sab: str
    tty: str
    suppress: str


_WANTED: dict[str, tuple[str, ...]] = {
    "MRCONSO.RRF": ("CUI", "LAT", "TS", "STT", "ISPREF", "SAB", "TTY", "STR", "SUPPRESS"),
    "MRSTY.RRF": ("CUI", "TUI", "STY"),
    "MRSAB.RRF": ("VSAB", "RSAB", "SON", "SVER", "CURVER", "LAT"),
    "MRRANK.RRF": ("RANK", "SAB", "TTY", "SUPPRESS"),
}


class MetaDir:
    """A UMLS ``META`` directory: which tables exist, in which files, with which columns."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if not p.is_dir():
            raise DictionaryError(f"{p}: not a directory. Give the UMLS META directory.")
        if not self._find(p, "MRCONSO.RRF") and (p / "META").is_dir():
            p = p / "META"  # the release root was given; its tables are in META/
        self.path = p
        if not self._find(p, "MRCONSO.RRF"):
            raise DictionaryError(
                f"{p}: no MRCONSO.RRF (nor .gz, nor split MRCONSO.RRF.aa[.gz] parts). "
                "Give the META directory of a UMLS release (or one made by MetamorphoSys)."
            )
        self._files_meta: dict[str, tuple[tuple[str, ...], int | None]] = {}
        if self._find(p, "MRFILES.RRF"):
            self._read_mrfiles()

    @staticmethod
    def _find(directory: Path, table: str) -> list[Path]:
        plain = directory / table
        if plain.is_file():
            return [plain]
        gz = directory / f"{table}.gz"
        if gz.is_file():
            return [gz]
        parts = []
        for cand in directory.glob(f"{table}.*"):
            m = _SPLIT_SUFFIX.match(cand.name[len(table):])
            if m and cand.is_file():
                parts.append(cand)
        return sorted(parts, key=lambda c: c.name)

    def _read_mrfiles(self) -> None:
        for fields in read_table(self, "MRFILES.RRF", on_error="fail"):
            name, fmt, rws = fields[0], fields[2], fields[4]
            cols = tuple(_COLUMN_ALIASES.get(c, c) for c in fmt.split(",") if c)
            try:
                rows: int | None = int(rws)
            except ValueError:
                rows = None
            self._files_meta[name] = (cols, rows)

    def has(self, table: str) -> bool:
        return bool(self._find(self.path, table))

    def parts(self, table: str) -> list[Path]:
        """The files holding ``table``, in reading order (one file unless split)."""
        found = self._find(self.path, table)
        if not found:
            raise DictionaryError(f"{self.path}: table {table} not found.")
        return found

    def columns(self, table: str) -> tuple[str, ...]:
        meta = self._files_meta.get(table)
        if meta is not None:
            return meta[0]
        if table in STANDARD_COLUMNS:
            return STANDARD_COLUMNS[table]
        raise DictionaryError(
            f"{self.path}: no column list for {table}: it is neither in MRFILES.RRF nor a "
            "table conceptsvc knows."
        )

    def columns_origin(self, table: str) -> str:
        """Where :meth:`columns` took ``table``'s column list from, for a message about a row
        of another length ("" when it is the standard list)."""
        meta = self._files_meta.get(table)
        if meta is None:
            return ""
        return (f" (the {len(meta[0])} columns MRFILES.RRF gives it: {','.join(meta[0])}; if "
                "MRFILES.RRF comes from another release or subset, fix or remove it)")

    def expected_rows(self, table: str) -> int | None:
        """Row count MRFILES gives for the table, if any (it describes the release, which a
        subset directory may not match)."""
        meta = self._files_meta.get(table)
        return meta[1] if meta is not None else None

    def total_bytes(self, table: str) -> int:
        """On-disk size of the table's files (compressed size for .gz), for progress."""
        return sum(f.stat().st_size for f in self.parts(table))

    def signature(self) -> list[dict[str, object]]:
        """Name and size of every table file (what the index manifest records of its input)."""
        out: list[dict[str, object]] = []
        for f in sorted(self.path.iterdir()):
            if f.is_file() and ".RRF" in f.name:
                st = f.stat()
                out.append({"file": f.name, "bytes": st.st_size})
        return out


def _open_binary(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """Open a (possibly gzipped) file; returns (decompressed stream, raw file for tell())."""
    raw: IO[bytes] = path.open("rb")
    if path.name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
        return cast(IO[bytes], stream), raw
    return raw, raw


def _read_chunk(stream: IO[bytes], part: Path) -> bytes:
    """One block of decompressed bytes; a damaged .gz is an error that names the file.

    gzip reports truncation as a bare ``EOFError`` and a non-gzip file as ``BadGzipFile``;
    neither says which of possibly many split parts is broken, and a truncated part must
    never read as a shorter, valid table.
    """
    try:
        return stream.read(_CHUNK)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DictionaryError(
            f"{part}: damaged gzip file ({exc}); the download or copy is probably truncated. "
            "Re-extract or re-download this file."
        ) from exc


class _Cursor:
    """Where a multi-part read is, in on-disk bytes (compressed bytes for .gz parts)."""

    def __init__(self) -> None:
        self.done = 0
        self.raw: IO[bytes] | None = None

    def position(self) -> int:
        return self.done + (self.raw.tell() if self.raw is not None else 0)


_CHUNK = 1 << 22


def _raw_blocks(
    parts: Sequence[Path], n_fields: int, cursor: _Cursor
) -> Iterator[tuple[Path, int, bytes]]:
    """Yield (file, number of the block's first line in that file, block of whole lines).

    A block is several ``\\n``-separated lines without the final newline; reading 4 MB at a
    time and decoding and splitting a block in one call each is what keeps the per-row cost
    of a 16 M-row MRCONSO low. Split parts are one logical stream. When a part ends without a
    newline, its last fragment is a complete row if it already has the full number of fields
    (``n_fields`` separators, the RRF trailing ``|`` included); otherwise the row continues in
    the next part, and is reported at the file and line where it started.
    """
    pending: bytes | None = None
    pending_at: tuple[Path, int] = (Path(), 0)
    for part in parts:
        stream, raw = _open_binary(part)
        cursor.raw = raw
        try:
            lineno = 0  # lines of this part already yielded
            carry = b""
            while chunk := _read_chunk(stream, part):
                data = carry + chunk if carry else chunk
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                carry = data[cut + 1 :]
                block = data[:cut]
                if pending is not None:  # the previous part's last row continues here
                    nl = block.find(b"\n")
                    head, block = (block, b"") if nl < 0 else (block[:nl], block[nl + 1 :])
                    yield pending_at[0], pending_at[1], pending + head
                    pending = None
                    lineno += 1
                    if nl < 0:
                        continue
                yield part, lineno + 1, block
                lineno += block.count(b"\n") + 1
            cursor.done += raw.tell()
            cursor.raw = None
        finally:
            stream.close()
            raw.close()
        if not carry:
            continue
        if pending is not None:  # a whole part without a newline: still the same row
            pending += carry
        elif carry.rstrip(b"\r").count(b"|") >= n_fields:
            yield part, lineno + 1, carry
        else:
            pending, pending_at = carry, (part, lineno + 1)
    if pending is not None:
        yield pending_at[0], pending_at[1], pending


def read_table(
    meta: MetaDir,
    table: str,
    *,
    on_error: OnError = "fail",
    stats: ReadStats | None = None,
    progress: Progress | None = None,
    progress_every: int = 200_000,
) -> Iterator[list[str]]:
    """Yield every row of ``table`` as a list of fields in the file's column order.

    ``on_error="fail"`` raises :class:`MalformedRowError` (file and line) on the first
    malformed row; ``"skip"`` skips it and counts it in ``stats``.
    """
    return _rows(meta, table, on_error, stats, progress, progress_every, None)


def _rows(
    meta: MetaDir,
    table: str,
    on_error: OnError,
    stats: ReadStats | None,
    progress: Progress | None,
    progress_every: int,
    getter: Callable[[list[str]], Any] | None,
    cui_at: int | None = None,
) -> Iterator[Any]:
    """The reading loop; ``getter`` picks columns in the same generator (one layer less per
    row matters at 16 M rows). ``cui_at``: the column of a CUI, checked to be one (C and seven
    digits) so that a damaged value (a byte-order mark, a lower-case c, a space, nothing) is a
    malformed row at its line, not a concept of its own."""
    if on_error not in ("fail", "skip"):
        raise DictionaryError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    parts = meta.parts(table)
    n = len(meta.columns(table))
    total_bytes = meta.total_bytes(table) if progress is not None else 0
    st = stats if stats is not None else ReadStats()
    count = st.rows.get(table, 0)
    next_report = count + progress_every
    cursor = _Cursor()
    for path, first, block in _raw_blocks(parts, n, cursor):
        if first == 1 and block.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
            block = block[3:]
        bad: dict[int, str] = {}
        try:
            lines = block.decode("utf-8").split("\n")
        except UnicodeDecodeError:  # rare: find the offending line(s), decode the rest
            lines = []
            for i, raw in enumerate(block.split(b"\n")):
                try:
                    lines.append(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    bad[first + i] = f"not valid UTF-8 at byte {exc.start} of the row"
                    lines.append("")
        lineno = first - 1
        for line in lines:
            lineno += 1
            try:
                if bad and lineno in bad:
                    raise MalformedRowError(path, lineno, bad[lineno])
                if line.endswith("\r"):
                    line = line.rstrip("\r")
                if not line:
                    continue  # blank lines (e.g. a trailing empty line) carry no row
                fields = line.split("|")
                # RRF rows end with "|", so n columns split into n + 1 fields, the last
                # empty. A row without the trailing "|" is accepted when its last field is not
                # empty (otherwise it cannot be told apart from a row missing a column).
                if fields[-1] == "":
                    fields.pop()
                if len(fields) != n:
                    raise MalformedRowError(
                        path, lineno, f"{table} row has {len(fields)} fields, expected {n}"
                        + meta.columns_origin(table)
                    )
                if cui_at is not None:
                    cui = fields[cui_at]
                    if len(cui) != 8 or cui[0] != "C" or not cui[1:].isdigit():
                        raise MalformedRowError(
                            path, lineno, f"{table} row's CUI {cui!r} is not a UMLS CUI (C "
                            "and seven digits)"
                        )
            except MalformedRowError as err:
                if on_error == "fail":
                    raise
                st.skip(table, err)
                continue
            count += 1
            if progress is not None and count >= next_report:
                next_report = count + progress_every
                # Bytes, not MRFILES row counts: a subset made by MetamorphoSys keeps the
                # release's MRFILES, whose counts then describe files we are not reading.
                frac = min(1.0, cursor.position() / total_bytes) if total_bytes else None
                progress(table, count, frac)
            yield fields if getter is None else getter(fields)
    st.rows[table] = count
    if progress is not None:
        progress(table, count, 1.0)


def _typed(
    meta: MetaDir, table: str, on_error: OnError, stats: ReadStats | None,
    progress: Progress | None, row_type: type[Any],
) -> Iterator[Any]:
    cols = meta.columns(table)
    missing = [c for c in _WANTED[table] if c not in cols]
    if missing:
        raise DictionaryError(
            f"{meta.path}/{table}: its columns ({','.join(cols)}) lack {', '.join(missing)}; "
            "check MRFILES.RRF or the file."
        )
    getter = operator.itemgetter(*(cols.index(c) for c in _WANTED[table]))
    cui_at = cols.index("CUI") if "CUI" in _WANTED[table] else None
    rows = _rows(meta, table, on_error, stats, progress, 200_000, getter, cui_at)
    # partial(tuple.__new__, T) builds the named tuple in C, without a Python-level call.
    return map(functools.partial(tuple.__new__, row_type), rows)


def iter_mrconso(
    meta: MetaDir, *, on_error: OnError = "fail", stats: ReadStats | None = None,
    progress: Progress | None = None,
) -> Iterator[ConsoRow]:
    """Atoms of MRCONSO.RRF (all languages; filtering is the dictionary's job)."""
    rows: Iterator[ConsoRow] = _typed(meta, "MRCONSO.RRF", on_error, stats, progress, ConsoRow)
    return rows


def iter_mrsty(
    meta: MetaDir, *, on_error: OnError = "fail", stats: ReadStats | None = None,
    progress: Progress | None = None,
) -> Iterator[StyRow]:
    rows: Iterator[StyRow] = _typed(meta, "MRSTY.RRF", on_error, stats, progress, StyRow)
    return rows


def iter_mrsab(
    meta: MetaDir, *, on_error: OnError = "fail", stats: ReadStats | None = None
) -> Iterator[SabRow]:
    rows: Iterator[SabRow] = _typed(meta, "MRSAB.RRF", on_error, stats, None, SabRow)
    return rows


def iter_mrrank(
    meta: MetaDir, *, on_error: OnError = "fail", stats: ReadStats | None = None
) -> Iterator[RankRow]:
    rows: Iterator[RankRow] = _typed(meta, "MRRANK.RRF", on_error, stats, None, RankRow)
    return rows


class ReleaseInfo(NamedTuple):
    """Which release a META directory is, as far as it says."""

    name: str | None  # "2024AA": from release.dat, else from MRSAB's MTH version
    source_versions: dict[str, str] | None  # RSAB → current VSAB; None without MRSAB.RRF


def read_release(
    meta: MetaDir, *, on_error: OnError = "fail", stats: ReadStats | None = None
) -> ReleaseInfo:
    """The release name and source versions, from ``release.dat`` (in META or the release
    root) and MRSAB.RRF, whichever the directory has."""
    name: str | None = None
    for cand in (meta.path / "release.dat", meta.path.parent / "release.dat"):
        if cand.is_file():
            for line in cand.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("umls.release.name="):
                    name = line.split("=", 1)[1].strip()
            break
    if not meta.has("MRSAB.RRF"):
        return ReleaseInfo(name, None)
    versions: dict[str, str] = {}
    for row in iter_mrsab(meta, on_error=on_error, stats=stats):
        if row.curver in ("Y", ""):
            versions[row.rsab] = row.vsab
        if name is None and row.rsab == "MTH":
            m = re.fullmatch(r"MTH(\d{4}[A-Z]{2})", row.vsab)
            if m:
                name = m.group(1)
    return ReleaseInfo(name, versions)
