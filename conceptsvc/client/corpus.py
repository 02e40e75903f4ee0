"""Caption corpora in the formats dataset builders actually have, read with line numbers.

A batch run must never discover half-way through a million captions that line 412,877 is broken,
so :meth:`Corpus.scan` reads everything before anything is sent, hashing the bytes (the resume
journal is keyed on that hash) and collecting every malformed record with its line numbers;
:meth:`Corpus.captions` then gives the good records for annotation. A small corpus (up to about
32 MB of records in memory, :data:`KEEP_BYTES`; ROCOv2's 9,904 validation captions take 4 MB)
is kept from the scan, so it is read and parsed once; a larger one is not held in memory but
read again, streamed, for every later pass (stdin is always buffered: it can only be read
once).

Formats (detected from the file name, overridable with ``fmt``):

``csv``    ROCOv2 / ImageCLEF ``ID,Caption`` with CSV quoting and a header row
           (``.csv``). Quoting is checked strictly: ``"abc"def`` or an unterminated quote is an
           error, not a silently merged record.
``roco``   ROCO text, ``ROCO_00020<TAB> caption`` (``.tsv``, or a ``.txt`` whose first line has
           a TAB). The single space ROCO puts after the TAB is part of the format, not of the
           caption, and is removed, so offsets count from the caption's first character.
``jsonl``  one ``{"id": ..., "text": ...}`` object per line (``.jsonl``, ``.ndjson``).
``text``   one caption per line, the id is the line number (``.txt`` without TABs).
``parquet`` an id and a caption column of a Parquet file (``.parquet``), read a batch of rows at
           a time (:mod:`conceptsvc.client.parquet`, needs pyarrow). The columns are named by
           ``id_column`` / ``text_column``, or else the first of ``ID``/``Caption``,
           ``id``/``text``, ``id``/``caption`` the file has. Records are numbered by *row*
           (from 1) where the text formats count lines.

Other layouts are read by naming the columns: ``id_column`` / ``text_column`` (the CLI's
``--id-column`` / ``--text-column``) pick a Parquet file's columns (see above), a CSV's columns
by their header names (exact, else case-insensitive), or a JSONL object's keys. Without them a
CSV header ``ID,Caption`` plus other columns is read by those two names; a CSV whose first row
has more than two fields and no ``ID`` column stops with the columns it found and these
options.

Any text format may be gzip-compressed (``.gz``). ``-`` reads standard input; its format is sniffed
from the first line unless given. Blank lines are skipped in every format (in ``text`` they do not
shift ids: an id is always the physical line number).

Malformed records — bad CSV quoting, a wrong number of fields, invalid UTF-8, a missing id or
caption, invalid JSON, an unpaired surrogate escape, an id containing a TAB or line break, a
duplicate id (every occurrence after the first), a null id or caption in Parquet — become
:class:`BadRecord` values carrying their line range (row, for Parquet) and what is wrong.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

from conceptsvc.errors import ClientError
from conceptsvc.model import CAPTION_HEADERS, ID_HEADERS

if TYPE_CHECKING:
    from conceptsvc.client.parquet import ParquetCaptions

__all__ = [
    "BadRecord",
    "Caption",
    "Corpus",
    "CorpusScan",
    "InputFormat",
    "detect_format",
    "find_duplicates",
    "id_hash",
]

STDIN = "-"

# Records the scan keeps for the later passes, by an estimate of their memory (bytes of id and
# text plus the objects around them); a corpus that needs more is read again instead.
KEEP_BYTES = 32 << 20
_RECORD_OVERHEAD = 200
# Below this many ids the duplicate check sorts their hashes in Python: cheaper than importing
# numpy, which sorts a million in milliseconds where Python takes a good part of a second.
_SORT_IN_PYTHON = 1 << 16
_ID_BREAKS = re.compile(r"[\t\r\n\x00]")

# Longest CSV field accepted (characters). Far above any caption the service would take; a field
# this long is almost always an unterminated quote that swallowed the rest of the file.
_CSV_FIELD_LIMIT = 256 * 1024 * 1024
# A two-column CSV's first row is a header when its first field names an id column
# (model.ID_HEADERS, as a concepts file's) or its second a caption column
# (model.CAPTION_HEADERS; case-insensitive): ROCOv2 writes "ID,Caption", others
# "image_id,caption" or "id,text". A caption spelt like one of these is not plausible.


class InputFormat(StrEnum):
    CSV = "csv"
    ROCO = "roco"
    JSONL = "jsonl"
    TEXT = "text"
    PARQUET = "parquet"


@dataclass(frozen=True, slots=True)
class Caption:
    """One caption to annotate. ``seq`` is its ordinal among all records of the input (good and
    bad), which is stable across reruns of the same input and orders the final output."""

    seq: int
    id: str
    text: str
    line: int  # first physical line of the record (1-based)


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that cannot be annotated as it stands."""

    seq: int
    line: int
    end_line: int
    problem: str
    id: str | None = None
    unit: Literal["line", "row"] = "line"  # what line/end_line count: rows in Parquet

    def location(self, source: str) -> str:
        lines = f"{self.line}" if self.end_line == self.line else f"{self.line}-{self.end_line}"
        if self.unit == "row":
            return f"{source}: row {lines}"
        return f"{source}:{lines}"

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            self.unit: self.line,
            f"end_{self.unit}": self.end_line,
            "stage": "input",
            "reason": self.problem,
        }


# What a format's parser yields: (id, text, line) of a good record, or a bad one (seq -1).
_Parsed = tuple[str, str, int] | BadRecord


@dataclass(frozen=True)
class CorpusScan:
    """What the validation pass found."""

    sha256: str
    n_records: int  # good + bad
    n_good: int
    bad: list[BadRecord] = field(default_factory=list)
    size_bytes: int = 0


_EXTENSIONS = {
    ".csv": InputFormat.CSV,
    ".tsv": InputFormat.ROCO,
    ".jsonl": InputFormat.JSONL,
    ".ndjson": InputFormat.JSONL,
    ".parquet": InputFormat.PARQUET,
}
_COLUMN_FORMATS = ("csv", "jsonl", "parquet")
_ROCO_LINE = re.compile(r"^[^\s\t]+\t")


def id_hash(rid: str) -> int:
    """A 64-bit hash of an id: the duplicate check keeps these (8 bytes a caption), not the ids."""
    return int.from_bytes(hashlib.blake2b(rid.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def find_duplicates(
    hashes: array[int],
    records: Callable[[], Iterable[Caption | BadRecord]],
    unit: Literal["line", "row"],
    *,
    hash_id: Callable[[str], int] = id_hash,
) -> dict[int, BadRecord]:
    """The duplicate-id records (every occurrence after the first), by seq.

    ``hashes`` holds ``hash_id(id)`` of every good caption. Equal hashes only say "maybe": the
    ids behind them are compared in a second pass over ``records()`` that keeps only the ids
    whose hash occurs more than once — a dict of every id cost ~130 bytes a caption.
    """
    suspects = _repeated(hashes)
    if not suspects:
        return {}
    first: dict[str, int] = {}
    found: dict[int, BadRecord] = {}
    for rec in records():
        if not isinstance(rec, Caption) or hash_id(rec.id) not in suspects:
            continue
        line = first.setdefault(rec.id, rec.line)
        if line != rec.line:
            found[rec.seq] = BadRecord(
                rec.seq, rec.line, rec.line,
                f"duplicate id {rec.id!r} (first seen at {unit} {line})", rec.id, unit=unit,
            )
    return found


def _repeated(hashes: array[int], *, python_below: int = _SORT_IN_PYTHON) -> set[int]:
    """The values that occur more than once in ``hashes``."""
    if len(hashes) < 2:
        return set()
    if len(hashes) < python_below:
        keys = sorted(hashes)
        return {b for a, b in pairwise(keys) if a == b}
    import numpy as np

    ordered = np.sort(np.frombuffer(hashes, dtype=np.uint64))
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    return set(np.unique(repeated).tolist())


def _sniff(first_line: str) -> InputFormat:
    if first_line.startswith("PAR1"):
        return InputFormat.PARQUET
    stripped = first_line.lstrip("\ufeff").strip()
    if stripped.startswith("{"):
        return InputFormat.JSONL
    if _ROCO_LINE.match(first_line.lstrip("\ufeff")):
        return InputFormat.ROCO
    head = stripped.split(",", 1)[0].strip().strip('"').casefold()
    if "," in stripped and head == "id":
        return InputFormat.CSV
    return InputFormat.TEXT


def detect_format(name: str, first_line: str | None = None) -> InputFormat:
    """The input format implied by a file name; ``.txt`` and unknown names are sniffed."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    return _sniff(first_line or "")


class _Lines:
    """Raw lines of a byte stream, decoded, numbered, hashed; remembers invalid UTF-8."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.sha = hashlib.sha256()
        self.size = 0
        self.line_no = 0
        self.bad_utf8: dict[int, str] = {}

    def __iter__(self) -> Iterator[str]:
        for raw in self._stream:
            self.sha.update(raw)
            self.size += len(raw)
            self.line_no += 1
            if self.line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.bad_utf8[self.line_no] = (
                    f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {exc.start} of "
                    f"the line); re-encode the file as UTF-8"
                )
                yield raw.decode("utf-8", errors="replace")

    def utf8_problem(self, first: int, last: int) -> str | None:
        for n in range(first, last + 1):
            if n in self.bad_utf8:
                return self.bad_utf8[n] if first == last else f"line {n}: {self.bad_utf8[n]}"
        return None


def _strip_eol(line: str) -> str:
    return line.rstrip("\r\n")


def _id_problem(rid: str) -> str | None:
    """Ids end up as fields of TAB- and line-separated output files, so they may not split one."""
    if _ID_BREAKS.search(rid):
        return f"id {rid!r} contains a TAB, line break or NUL, which the output formats cannot hold"
    return None


def _surrogate_problem(value: str, what: str) -> str | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"{what} contains an unpaired surrogate (\\u{ord(value[exc.start]):04x}) at "
            f"position {exc.start}; it is not valid Unicode text"
        )
    return None


class Corpus:
    """A caption corpus on disk (or stdin); see the module docstring for the formats.

    """

    def __init__(
        self,
        source: str | Path,
        fmt: InputFormat | str | None = None,
        *,
        id_column: str | None = None,
        text_column: str | None = None,
    ) -> None:
        self.source = str(source)
        self.id_column, self.text_column = id_column, text_column
        self._buffer: bytes | None = None
        if self.source == STDIN:
            import sys

            self._buffer = sys.stdin.buffer.read()
        elif not Path(self.source).is_file():
            raise ClientError(f"input {self.source} does not exist or is not a file.")
        if fmt is None:
            name = self.source if self.source != STDIN else ""
            # A Parquet file is binary: its name decides before any "first line" is read.
            fmt = detect_format(name, None if name.lower().endswith(".parquet")
                                else self._first_line())
        self._setup(fmt)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        fmt: InputFormat | str | None = None,
        *,
        name: str = STDIN,
        id_column: str | None = None,
        text_column: str | None = None,
    ) -> Corpus:
        """A corpus over bytes already in memory (used for stdin and by tests)."""
        self = cls.__new__(cls)
        self.source = name
        self.id_column, self.text_column = id_column, text_column
        self._buffer = data
        if fmt is None:
            fmt = detect_format("", self._first_line())
        self._setup(fmt)
        return self

    def _setup(self, fmt: InputFormat | str) -> None:
        try:
            self.format = InputFormat(fmt)
        except ValueError:
            raise ClientError(
                f"unknown input format {fmt!r}; use one of "
                f"{', '.join(f.value for f in InputFormat)}."
            ) from None
        self._check_columns()
        self.record_unit: Literal["line", "row"] = "line"
        self._duplicates: dict[int, BadRecord] | None = None  # by seq, once scanned
        self._kept: list[Caption | BadRecord] | None = None  # a small corpus's records
        self.hash_id: Callable[[str], int] = id_hash
        self._table: ParquetCaptions | None = None
        if self.format is InputFormat.PARQUET:
            from conceptsvc.client.parquet import ParquetCaptions

            self.record_unit = "row"
            self._table = ParquetCaptions(
                self.source, self._buffer, id_column=self.id_column, text_column=self.text_column
            )

    def identity(self) -> dict[str, str]:
        """The columns a table's captions were read from (the run manifest names them); empty
        for the text formats."""
        if self._table is None:
            return {}
        return {"id_column": self._table.id_column, "text_column": self._table.text_column}

    @property
    def columns(self) -> tuple[str | None, str | None] | None:
        """The id and text columns asked for (None: the format's own layout)."""
        if self.id_column is None and self.text_column is None:
            return None
        return self.id_column, self.text_column

    def _check_columns(self) -> None:
        # Silently ignoring --text-column on a ROCO file would annotate the wrong thing.
        if self.columns is not None and self.format not in _COLUMN_FORMATS:
            raise ClientError(
                f"--id-column/--text-column apply to {', '.join(_COLUMN_FORMATS)} input; "
                f"{self.source} is read as {self.format.value}."
            )

    def _csv_columns(self, names: list[str]) -> tuple[int, int]:
        """Indexes of the id and caption columns in a CSV header."""
        if self.columns is None and len(names) == 2:
            return 0, 1  # ID,Caption under whatever names, as always

        def find(want: str) -> int:
            for fold in (False, True):
                hits = [i for i, n in enumerate(names)
                        if (n.casefold() == want.casefold() if fold else n == want)]
                if len(hits) == 1:
                    return hits[0]
            raise ClientError(
                f"{self.source}: no column {want!r} in the CSV header (columns: "
                f"{', '.join(names)}); name the caption and id columns with --text-column NAME "
                "and --id-column NAME."
            )

        i = find(self.id_column or "ID")
        t = find(self.text_column or "Caption")
        if i == t:
            raise ClientError(f"{self.source}: the id and caption columns are the same column.")
        return i, t

    def _open(self) -> BinaryIO:
        if self._buffer is not None:
            raw: BinaryIO = io.BytesIO(self._buffer)
            if self._buffer[:2] == b"\x1f\x8b":
                return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
            return raw
        with open(self.source, "rb") as probe:
            compressed = probe.read(2) == b"\x1f\x8b"
        if compressed:
            return gzip.open(self.source, "rb")  # type: ignore[return-value]
        return open(self.source, "rb")

    def _first_line(self) -> str:
        try:
            with self._open() as fh:
                for raw in fh:
                    if raw.strip():
                        return raw.decode("utf-8", errors="replace")
        except (OSError, EOFError) as exc:
            raise ClientError(f"cannot read {self.source}: {exc}") from exc
        return ""

    # -- the two passes ----------------------------------------------------------------------
    def scan(self) -> CorpusScan:
        """Read everything once: hash, count, and collect every malformed record."""
        self._kept = None  # (a rescan reads the input, not what an earlier scan kept)
        if self._table is not None:
            return self._scan_table()
        with self._open() as fh:
            lines = _Lines(fh)
            n, good, bad = self._tally(self._records(lines))
        return CorpusScan(
            sha256=lines.sha.hexdigest(), n_records=n, n_good=good, bad=bad, size_bytes=lines.size
        )

    def _tally(
        self, records: Iterable[Caption | BadRecord]
    ) -> tuple[int, int, list[BadRecord]]:
        """Count the records and collect the bad ones, duplicate ids included (which
        :meth:`records` then reuses instead of checking again)."""
        bad: list[BadRecord] = []
        hashes: array[int] = array("Q")
        kept: list[Caption | BadRecord] | None = []
        room = KEEP_BYTES
        n = 0
        for rec in records:
            n += 1
            if isinstance(rec, BadRecord):
                bad.append(rec)
            else:
                hashes.append(self.hash_id(rec.id))
            if kept is not None:
                kept.append(rec)
                if isinstance(rec, Caption):
                    room -= _RECORD_OVERHEAD + len(rec.id) + len(rec.text)
                    if room < 0:
                        kept = None  # too big to hold: later passes read the input again
        good = len(hashes)
        self._kept = kept
        dups = find_duplicates(hashes, self._numbered_records, self.record_unit,
                               hash_id=self.hash_id)
        del hashes
        self._duplicates = dups
        if dups:
            bad = sorted([*bad, *dups.values()], key=lambda b: b.seq)
        return n, good - len(dups), bad

    def _scan_table(self) -> CorpusScan:
        # The journal is keyed on the file's bytes, as for the text formats; hashing is a
        # separate sequential read because pyarrow reads the file in its own order.
        sha = hashlib.sha256()
        size = 0
        with self._open() as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
                size += len(chunk)
        n, good, bad = self._tally(self._numbered_records())
        return CorpusScan(sha256=sha.hexdigest(), n_records=n, n_good=good, bad=bad,
                          size_bytes=size)

    def captions(self) -> Iterator[Caption]:
        """The good records, in input order."""
        for rec in self.records():
            if isinstance(rec, Caption):
                yield rec

    def records(self) -> Iterator[Caption | BadRecord]:
        """Every record, good and bad, in input order."""
        if self._duplicates is None:
            self.scan()  # the duplicate ids are only known after a whole pass
        dups = self._duplicates
        assert dups is not None
        for rec in self._numbered_records():
            yield dups.get(rec.seq, rec) if dups else rec

    def _numbered_records(self) -> Iterator[Caption | BadRecord]:
        """Every record, numbered and id-checked, duplicates not yet marked."""
        if self._kept is not None:
            yield from self._kept
            return
        if self._table is not None:
            yield from self._checked(self._table_records(), self.record_unit)
            return
        with self._open() as fh:
            yield from self._records(_Lines(fh))

    def _records(self, lines: _Lines) -> Iterator[Caption | BadRecord]:
        try:
            parse = {
                InputFormat.CSV: self._csv,
                InputFormat.ROCO: self._roco,
                InputFormat.JSONL: self._jsonl,
                InputFormat.TEXT: self._text,
            }[self.format]
            yield from self._checked(parse(lines), "line")
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ClientError(
                f"{self.source}: read failed after line {lines.line_no} ({exc}); the file is "
                "truncated or not what its name says."
            ) from exc

    @staticmethod
    def _checked(
        records: Iterator[_Parsed], unit: Literal["line", "row"]
    ) -> Iterator[Caption | BadRecord]:
        """Number the records and apply the id check every format shares (duplicate ids are
        found by :func:`find_duplicates` over a whole pass)."""
        for seq, rec in enumerate(records):
            if isinstance(rec, BadRecord):
                yield BadRecord(seq, rec.line, rec.end_line, rec.problem, rec.id, unit)
                continue
            rid, text, line = rec
            problem = _id_problem(rid)
            if problem is not None:
                yield BadRecord(seq, line, line, problem, unit=unit)
            else:
                yield Caption(seq, rid, text, line)

    # -- per-format parsers: a good record is (id, text, line), a bad one a BadRecord with
    # seq=-1; _checked numbers them -------------------------------------------------------
    def _table_records(self) -> Iterator[_Parsed]:
        from conceptsvc.client.parquet import BadValue

        assert self._table is not None
        id_col, text_col = self._table.id_column, self._table.text_column
        for n, raw_id, text in self._table.rows():
            if isinstance(raw_id, BadValue):
                yield BadRecord(-1, n, n, f"column {id_col!r}: {raw_id.why}")
                continue
            rid = str(raw_id).strip() if raw_id is not None else ""
            if not rid:
                yield BadRecord(-1, n, n, f"missing id (column {id_col!r} is null or empty)")
            elif isinstance(text, BadValue):
                yield BadRecord(-1, n, n, f"column {text_col!r}: {text.why}", rid)
            elif not isinstance(text, str):
                yield BadRecord(-1, n, n, f"missing caption (column {text_col!r} is null)", rid)
            else:
                yield rid, text, n

    def _csv(self, lines: _Lines) -> Iterator[_Parsed]:
        # The csv module refuses fields over 128 KiB by default, a limit a 1 MB caption meets.
        # The limit is process-wide (there is no per-reader setting); it is only ever raised.
        if csv.field_size_limit() < _CSV_FIELD_LIMIT:
            csv.field_size_limit(_CSV_FIELD_LIMIT)
        reader = csv.reader(lines, strict=True)
        header_done = False
        id_at, text_at, width = 0, 1, 2  # ID,Caption unless a header says otherwise
        named = False
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                end = max(reader.line_num, start)
                span = "" if end == start else f" (the quoted field runs from line {start})"
                yield BadRecord(
                    -1, start, end,
                    f"bad CSV quoting: {exc}{span}; a caption with quotes, commas or line "
                    "breaks must be enclosed in double quotes with inner quotes doubled",
                )
                continue
            end = reader.line_num
            # csv counts the blank lines it skips; the record starts on its first nonblank line.
            if not row:
                continue
            problem = lines.utf8_problem(start, end)
            if not header_done:
                header_done = True
                names = [c.strip().lstrip("\ufeff") for c in row]
                folded = [n.casefold() for n in names]
                header = (folded[0] in ID_HEADERS or (len(names) > 2 and "id" in folded)
                          or (len(names) == 2 and folded[1] in CAPTION_HEADERS))
                if self.columns is not None or (header and problem is None):
                    id_at, text_at = self._csv_columns(names)
                    width, named = len(names), len(names) != 2
                    continue
                if len(row) > 2:
                    raise ClientError(
                        f"{self.source}:{start}: the first row has {len(row)} fields "
                        f"({', '.join(names)}) and no ID column; a CSV with other columns than "
                        "ID,Caption needs a header row, and --id-column NAME and "
                        "--text-column NAME to choose the columns (or quote captions that "
                        "contain commas)."
                    )
            if problem is not None:
                rid = row[id_at].strip() if len(row) > id_at else ""
                yield BadRecord(-1, start, end, problem, rid or None)
                continue
            if len(row) != width:
                if named:
                    hint = " (the header's columns)"
                elif len(row) > 2:
                    hint = "; captions containing commas must be quoted"
                else:
                    hint = "; expected ID,Caption"
                yield BadRecord(
                    -1, start, end, f"{len(row)} field(s), expected {width}{hint}",
                    (row[id_at].strip() or None) if len(row) > id_at else None,
                )
                continue
            rid, text = row[id_at].strip(), row[text_at]
            if not rid:
                yield BadRecord(-1, start, end, "missing id (the first field is empty)")
                continue
            yield rid, text, start

    def _roco(self, lines: _Lines) -> Iterator[_Parsed]:
        for line in lines:
            n = lines.line_no
            line = _strip_eol(line)
            if not line.strip():
                continue
            problem = lines.utf8_problem(n, n)
            rid, tab, text = line.partition("\t")
            rid = rid.strip()
            if problem is not None:
                yield BadRecord(-1, n, n, problem, rid or None)
            elif not tab:
                yield BadRecord(-1, n, n, "no TAB between id and caption (ROCO: ID<TAB> caption)")
            elif not rid:
                yield BadRecord(-1, n, n, "missing id (the line starts with a TAB)")
            else:
                yield rid, text[1:] if text.startswith(" ") else text, n

    def _jsonl(self, lines: _Lines) -> Iterator[_Parsed]:
        ik, tk = self.id_column or "id", self.text_column or "text"
        hint = "" if self.columns else " (--id-column/--text-column choose others)"
        for line in lines:
            n = lines.line_no
            if not line.strip():
                continue
            problem = lines.utf8_problem(n, n)
            if problem is not None:
                yield BadRecord(-1, n, n, problem)
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                yield BadRecord(-1, n, n, f"invalid JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                yield BadRecord(-1, n, n, f"expected a JSON object {{{ik!r}: ..., {tk!r}: ...}}, "
                                          f"got {type(obj).__name__}")
                continue
            keys = f"; the object's keys: {', '.join(map(str, obj)) or 'none'}{hint}"
            rid = obj.get(ik)
            if isinstance(rid, int) and not isinstance(rid, bool):
                rid = str(rid)
            if not isinstance(rid, str) or not rid.strip():
                yield BadRecord(
                    -1, n, n, f'missing id (needs a non-empty string or integer "{ik}"{keys})'
                )
                continue
            rid = rid.strip()
            text = obj.get(tk)
            if not isinstance(text, str):
                yield BadRecord(-1, n, n, f'missing caption (needs a string "{tk}"{keys})', rid)
                continue
            problem = _surrogate_problem(rid, "id")
            if problem is not None:
                yield BadRecord(-1, n, n, problem)
                continue
            problem = _surrogate_problem(text, "text")
            if problem is not None:
                yield BadRecord(-1, n, n, problem, rid)
                continue
            yield rid, text, n

    def _text(self, lines: _Lines) -> Iterator[_Parsed]:
        for line in lines:
            n = lines.line_no
            line = _strip_eol(line)
            if not line.strip():
                continue
            problem = lines.utf8_problem(n, n)
            if problem is not None:
                yield BadRecord(-1, n, n, problem, str(n))
            else:
                yield str(n), line, n
