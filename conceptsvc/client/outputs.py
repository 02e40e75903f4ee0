"""Annotation results as the files the next step of a dataset build reads directly.

Formats:

``jsonl``       (default) one object per caption with the concept set and every mention:
                ``{"id", "concepts": [CUI...], "mentions": [{"cui", "preferred_name", "text",
                "start", "end", "score", "semantic_types", "source", "negated",
                "hypothetical", "historical", "experiencer"}]}``; with
                ``include_text`` the caption follows the id (``{"id", "text", "concepts", ...}``),
                so that ``text[start:end]`` can be checked without re-joining the input.
``csv``         ImageCLEFmedical concept file, as ROCOv2 ships it: header ``ID,CUIs``, CUIs
                joined by ``;``.
``submission``  the ImageCLEFmedical run-submission variant: ``ID<TAB>CUI;CUI``, no header.
``roco``        ROCO's per-caption CUI file: ``ID<TAB><TAB>CUI<TAB>CUI...``.
``parquet``     the ``jsonl`` fields as Parquet columns: ``id`` string, ``concepts``
                list<string>, ``mentions`` list<struct<cui, preferred_name, text, start, end,
                score, semantic_types list<string>, source, negated, hypothetical,
                historical, experiencer>>, written in row groups
                (:mod:`conceptsvc.client.parquet`, needs pyarrow).

Every caption gets exactly one line (row) in every format, also when it has no concepts. Files
are written as part files and moved into place with ``os.replace`` only when fully written, so a
reader never sees half a file, and a killed run leaves the previous output untouched. (Whether a
run's outputs hold every caption is the manifest's ``complete``: see
:mod:`conceptsvc.client.batch`.)

Rendering is a pure function of the :class:`~conceptsvc.model.Annotation` (fixed key order,
scores rounded to 6 decimals), which is what makes a resumed run byte-identical to an
uninterrupted one. A batch run renders from the journal, which holds each result as its JSON
text (:class:`ResultText`): a JSONL line is that text, and the other text formats read only the
id and concepts off it; the whole result is parsed only for Parquet (and the report).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from conceptsvc.errors import ClientError, OutputClashError, OutputFormatError
from conceptsvc.model import Annotation, Mention

__all__ = [
    "OutputFormat",
    "OutputSet",
    "OutputSpec",
    "ResultText",
    "annotation_from_json",
    "annotation_to_json",
    "atomic_write_text",
    "dumps",
    "fsync_dir",
    "render",
    "render_json",
    "resolve_outputs",
    "same_file",
]


class OutputFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    SUBMISSION = "submission"
    ROCO = "roco"
    PARQUET = "parquet"


# The suffix an extra output gets when several formats share one --out stem.
_SUFFIX = {
    OutputFormat.JSONL: ".jsonl",
    OutputFormat.CSV: ".csv",
    OutputFormat.SUBMISSION: ".submission.tsv",
    OutputFormat.ROCO: ".roco.tsv",
    OutputFormat.PARQUET: ".parquet",
}
# --out suffixes that say which format is meant when --format is not given.
_BY_SUFFIX = {".jsonl": OutputFormat.JSONL, ".ndjson": OutputFormat.JSONL, ".csv": OutputFormat.CSV,
              ".parquet": OutputFormat.PARQUET}
# File-name endings that name formats, longest first: a file may only be written in one of the
# formats its ending names (a plain .tsv is either TAB format). Other endings (.txt, .out, .json)
# name none and take any format.
_NAMED_BY_ENDING: tuple[tuple[str, frozenset[OutputFormat]], ...] = (
    (".submission.tsv", frozenset({OutputFormat.SUBMISSION})),
    (".roco.tsv", frozenset({OutputFormat.ROCO})),
    (".ndjson", frozenset({OutputFormat.JSONL})),
    (".jsonl", frozenset({OutputFormat.JSONL})),
    (".csv", frozenset({OutputFormat.CSV})),
    (".parquet", frozenset({OutputFormat.PARQUET})),
    (".tsv", frozenset({OutputFormat.SUBMISSION, OutputFormat.ROCO})),
)

SCORE_DECIMALS = 6

# How an output's path was chosen, which decides the flag a user changes to move it.
Origin = Literal["out", "stem", "explicit"]


@dataclass(frozen=True, slots=True)
class OutputSpec:
    format: OutputFormat
    path: Path
    # Not part of equality: two specs naming the same file in the same format are the same
    # output, whichever flag chose the path.
    origin: Origin = field(default="out", compare=False)

    def flag(self) -> str:
        """The command-line flag that chose this path, as a user would change it."""
        if self.origin == "explicit":
            return f"--format {self.format.value}=PATH"
        if self.origin == "stem":
            return (f"--out (the {self.format.value} output is --out's stem plus "
                    f"{_SUFFIX[self.format]}), or give it its own path with "
                    f"--format {self.format.value}=PATH")
        return "--out"


def _parse_format(name: str) -> OutputFormat:
    try:
        return OutputFormat(name.strip().lower())
    except ValueError:
        raise ClientError(
            f"unknown output format {name!r}; use one of "
            f"{', '.join(f.value for f in OutputFormat)} (optionally FORMAT=PATH)."
        ) from None


def _stem(out: Path) -> Path:
    """``out`` without the suffix of a known format (``run.submission.tsv`` → ``run``)."""
    name = out.name
    for suffix in sorted(_SUFFIX.values(), key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return out.with_name(name[: -len(suffix)])
    return out.with_suffix("") if out.suffix else out


def _named_formats(path: Path) -> tuple[str, frozenset[OutputFormat]] | None:
    """The ending of ``path`` that names formats, and those formats (None: it names none)."""
    name = path.name.lower()
    for ending, formats in _NAMED_BY_ENDING:
        if name.endswith(ending) and len(name) > len(ending):
            return ending, formats
    return None


def _format_by_ending(path: Path) -> OutputFormat:
    """The format ``--out`` gets without a --format for it: the one its ending names
    (``.csv``, ``.parquet``, ``.roco.tsv``, ``.submission.tsv``, ``.jsonl``), else jsonl (a
    plain ``.tsv`` names two formats: it is then refused, with the choice to make)."""
    named = _named_formats(path)
    if named is not None and len(named[1]) == 1:
        (fmt,) = named[1]
        return fmt
    return OutputFormat.JSONL


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file: the same inode where both exist (hard links,
    symlinks, a case-insensitive file system), else the same resolved path."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass  # one of them does not exist (yet)
    return a.resolve() == b.resolve()


def _check_format(spec: OutputSpec, out: Path, given: Sequence[str]) -> None:
    """Refuse ``spec`` when its file's ending names other formats (``given``: the --format
    items the user wrote, for the message)."""
    named = _named_formats(spec.path)
    if named is None or spec.format in named[1]:
        return
    ending, formats = named
    names = " or ".join(sorted(f.value for f in formats))
    fmt = spec.format.value
    if spec.origin == "explicit":
        right = spec.path.with_name(_stem(spec.path).name + _SUFFIX[spec.format])
        raise OutputFormatError(
            f"--format {fmt}={spec.path}: a file ending in {ending} holds {names}, but {fmt} "
            f"would be written to it. Write it as `--format {fmt}={right}`."
        )
    right = _stem(out).with_name(_stem(out).name + _SUFFIX[spec.format])
    if not any("=" not in i for i in given):
        why = "no --format was given" if not given else "no --format names --out's format"
        raise OutputFormatError(
            f"--out {out} ends in {ending}, the extension of {names}, but {why}, so {fmt} "
            f"(the default) would be written to it. Use `--out {right}`, or name the format "
            "first: " + " or ".join(f"`--format {f}`" for f in sorted(formats)) + "."
        )
    fixes = [f"`--out {right} --format {fmt}`"]
    by_suffix = _BY_SUFFIX.get(out.suffix.lower())
    if by_suffix is not None:
        fixes.append(f"`--out {out} --format {fmt}={right}` to write {fmt} beside the "
                     f"{by_suffix.value} file")
    if any(i.partition("=")[0].strip().lower() in formats for i in given):
        fixes.append(f"name {names} first in --format")
    raise OutputFormatError(
        f"--out {out} ends in {ending}, the extension of {names}, but the first --format "
        f"without =PATH is {fmt}, so {fmt} would be written to it. Use " + ", or ".join(fixes) + "."
    )


def resolve_outputs(out: str | os.PathLike[str], formats: Sequence[str] = ()) -> list[OutputSpec]:
    """Turn ``--out`` and ``--format`` values into output files.

    Each format item is ``FORMAT`` or ``FORMAT=PATH`` (comma-separated lists are accepted).
    The first format without an explicit path is written to ``out`` itself; further ones to
    ``out``'s stem plus the format's suffix (``.csv``, ``.submission.tsv``, ``.roco.tsv``,
    ``.jsonl``, ``.parquet``). Without ``--format`` — or with only ``FORMAT=PATH`` items —
    ``out`` gets the format its ending names (``.csv`` → csv, ``.parquet`` → parquet,
    ``.roco.tsv`` → roco, ``.submission.tsv`` → submission, otherwise jsonl).

    Refused (before anything is written): a file whose ending names another format than the
    one it would get (:class:`~conceptsvc.errors.OutputFormatError`; ``.jsonl``/``.ndjson``,
    ``.csv``, ``.parquet``, ``.submission.tsv``, ``.roco.tsv``, and ``.tsv`` for either TAB
    format — other endings take any format), and two outputs that are one file
    (:class:`~conceptsvc.errors.OutputClashError`). Whether an output is the input is
    checked by :func:`~conceptsvc.client.batch.annotate_corpus`, which knows the input.
    """
    out_path = Path(out)
    given = [item for f in formats for item in f.split(",") if item.strip()]
    items = given
    if not items:
        items = [_format_by_ending(out_path).value]
    specs: list[OutputSpec] = []
    primary_taken = False
    for item in items:
        name, eq, explicit = item.partition("=")
        fmt = _parse_format(name)
        if eq:
            if not explicit.strip():
                raise ClientError(f"--format {item!r}: the path after '=' is empty.")
            specs.append(OutputSpec(fmt, Path(explicit.strip()), "explicit"))
        elif not primary_taken:
            specs.append(OutputSpec(fmt, out_path, "out"))
            primary_taken = True
        else:
            path = _stem(out_path).with_name(_stem(out_path).name + _SUFFIX[fmt])
            specs.append(OutputSpec(fmt, path, "stem"))
    if not primary_taken:
        # Only FORMAT=PATH items: ``out`` still gets its own file (never silently unused).
        specs.insert(0, OutputSpec(_format_by_ending(out_path), out_path, "out"))
    # --out's own format first: a later format derived from --out's stem lands on --out itself
    # exactly when --out's ending names that format, and the format message says what to do.
    primary = next(spec for spec in specs if spec.origin == "out")
    _check_format(primary, out_path, given)
    for i, spec in enumerate(specs):
        for other in specs[:i]:
            if same_file(spec.path, other.path):
                raise OutputClashError(
                    f"two outputs would be written to one file: {other.path} ({other.format}, "
                    f"from {other.flag()}) and {spec.path} ({spec.format}, from {spec.flag()}); "
                    "give one of them an explicit path with FORMAT=PATH."
                )
    for spec in specs:
        if spec is not primary:
            _check_format(spec, out_path, given)
    return specs


# -- the canonical JSON form (also what the resume journal stores) ---------------------------
def annotation_to_json(a: Annotation) -> dict[str, Any]:
    """The canonical JSON form of a caption's result (what ``wire.batch_reader`` writes
    straight from a batch reply, following this function's keys)."""
    return {
        "id": a.id,
        "concepts": list(a.concepts),
        "mentions": [
            {
                "cui": m.cui,
                "preferred_name": m.preferred_name,
                "text": m.text,
                "start": m.start,
                "end": m.end,
                "score": round(m.score, SCORE_DECIMALS),
                "semantic_types": list(m.semantic_types),
                "source": m.source,
                "negated": m.negated,
                "hypothetical": m.hypothetical,
                "historical": m.historical,
                "experiencer": m.experiencer,
            }
            for m in a.mentions
        ],
    }


def annotation_from_json(obj: Mapping[str, Any]) -> Annotation:
    """Inverse of :func:`annotation_to_json` (raises KeyError/TypeError on a foreign shape)."""
    return Annotation(
        id=str(obj["id"]),
        concepts=tuple(obj["concepts"]),
        mentions=tuple(
            Mention(
                cui=m["cui"],
                preferred_name=m["preferred_name"],
                text=m["text"],
                start=int(m["start"]),
                end=int(m["end"]),
                score=float(m["score"]),
                semantic_types=tuple(m["semantic_types"]),
                source=m["source"],
                negated=bool(m["negated"]),
                # files written before these fields: the defaults, as the wire does
                hypothetical=bool(m.get("hypothetical", False)),
                historical=bool(m.get("historical", False)),
                experiencer=str(m.get("experiencer", "patient")),
            )
            for m in obj.get("mentions", ())
        ),
    )


def dumps(obj: Any) -> str:
    """One compact JSON line, non-ASCII kept as UTF-8 (a reader should see "Sjögren" in the
    file, not "Sj\\u00f6gren")."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def render(fmt: OutputFormat, a: Annotation, text: str | None = None) -> str:
    """One caption's line (with its newline) in ``fmt``; ``text``, the caption, goes into the
    JSONL row after the id (the other formats have no place for it). Text formats only:
    Parquet rows are written by :class:`~conceptsvc.client.parquet.ParquetAnnotationWriter`."""
    return render_json(fmt, annotation_to_json(a), text)


def render_json(fmt: OutputFormat, obj: Mapping[str, Any], text: str | None = None) -> str:
    """:func:`render` of a result in its canonical JSON form (what the journal holds), so that
    writing a run's outputs does not build the dataclasses only to take them apart again."""
    if fmt is OutputFormat.JSONL:
        if text is not None:
            obj = {"id": obj["id"], "text": text, **obj}
        return dumps(obj) + "\n"
    rid, concepts = obj["id"], obj["concepts"]
    if fmt is OutputFormat.CSV:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([rid, ";".join(concepts)])
        return buf.getvalue()
    if fmt is OutputFormat.SUBMISSION:
        return f"{rid}\t{';'.join(concepts)}\n"
    return f"{rid}\t" + "".join(f"\t{c}" for c in concepts) + "\n"


_ID_END = b',"concepts":['
_CONCEPTS_END = b'],"mentions":['
_MENTION = b'{"cui":'


class ResultText:
    """A caption's result as its canonical JSON text — ``dumps(annotation_to_json(a))`` as
    UTF-8, what the journal holds — with the parts the outputs need read off it on demand.

    Writing a run's outputs from the journal needs far less than the whole result: a JSONL line
    is the text itself (with ``include_text``, the caption spliced in after the id), the other
    text formats and the run's counts need the id, the concepts and how many mentions there
    are. Those are cut from the text without parsing the mentions: in JSON text a ``"`` inside
    a string is always escaped, so ``,"concepts":[`` first occurs where the id ends,
    ``],"mentions":[`` where the concepts end, and ``{"cui":`` only where a mention begins
    (``annotation_to_json`` puts ``cui`` first). Text of another shape is parsed whole. The
    whole dict (:meth:`obj`) is for Parquet and the report.
    """

    __slots__ = ("_cuts", "_obj", "text")

    def __init__(self, text: bytes) -> None:
        self.text = text
        self._cuts: tuple[int, int] | None = None
        self._obj: dict[str, Any] | None = None
        t = text
        if t.startswith(b'{"id":"') and t.endswith(b"]}"):
            i = t.find(_ID_END)
            j = t.find(_CONCEPTS_END, i)
            if i > 0 and j > 0:
                self._cuts = (i, j)

    @classmethod
    def of(cls, a: Annotation) -> ResultText:
        return cls(dumps(annotation_to_json(a)).encode("utf-8"))

    def obj(self) -> dict[str, Any]:
        """The result as :func:`annotation_to_json`'s dict."""
        if self._obj is None:
            obj = json.loads(self.text)
            if not isinstance(obj, dict):
                raise ClientError(f"a journaled result is not a JSON object: {self.text[:80]!r}")
            self._obj = obj
        return self._obj

    def id(self) -> str:
        if self._cuts is None:
            return str(self.obj()["id"])
        rid: str = json.loads(self.text[6:self._cuts[0]])
        return rid

    def concepts(self) -> list[str]:
        if self._cuts is None:
            return list(self.obj()["concepts"])
        i, j = self._cuts
        cuis: list[str] = json.loads(self.text[i + len(_ID_END) - 1:j + 1])
        return cuis

    def distinct_concepts(self) -> int:
        """How many different concepts, counted on their JSON strings: between two of them the
        text has ``","``, which no string holds unescaped, and JSON text writes equal strings
        alike."""
        if self._cuts is None:
            return len(set(self.obj()["concepts"]))
        i, j = self._cuts
        inner = self.text[i + len(_ID_END):j]
        return len(set(inner[1:-1].split(b'","'))) if inner else 0

    def mention_count(self) -> int:
        if self._cuts is None:
            return len(self.obj()["mentions"])
        return self.text.count(_MENTION, self._cuts[1])

    def jsonl(self, caption: str | None = None) -> bytes:
        """The JSONL line (with its newline); ``caption`` goes in after the id, as ``text``."""
        if caption is None:
            return self.text + b"\n"
        if self._cuts is None:
            return render_json(OutputFormat.JSONL, self.obj(), caption).encode("utf-8")
        i = self._cuts[0]
        return b"".join((self.text[:i], b',"text":', dumps(caption).encode("utf-8"),
                         self.text[i:], b"\n"))

    def render(self, fmt: OutputFormat, caption: str | None = None) -> bytes:
        """:func:`render_json` of this result as UTF-8 (text formats only)."""
        if fmt is OutputFormat.JSONL:
            return self.jsonl(caption)
        return render_json(fmt, {"id": self.id(), "concepts": self.concepts()}).encode("utf-8")


def _header(fmt: OutputFormat) -> str:
    return "ID,CUIs\n" if fmt is OutputFormat.CSV else ""


# -- atomic files --------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file (manifest, errors list) so that readers see the old or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part")
    with part.open("w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)
    fsync_dir(path.parent)


class _TextPart:
    """A part file of a line-per-caption text format."""

    def __init__(self, fmt: OutputFormat, path: Path) -> None:
        self.format = fmt
        self._fh: IO[bytes] = path.open("wb")
        self._fh.write(_header(fmt).encode("utf-8"))

    def write(self, result: ResultText, caption: str | None = None) -> None:
        self._fh.write(result.render(self.format, caption))

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()


class _ParquetPart:
    """A part file in Parquet, flushed a row group at a time."""

    def __init__(self, path: Path) -> None:
        from conceptsvc.client.parquet import ParquetAnnotationWriter

        self._path = path
        self._writer = ParquetAnnotationWriter(path)

    def write(self, result: ResultText, caption: str | None = None) -> None:
        # No text column: like csv, Parquet rows hold the results only (--include-text is jsonl's).
        self._writer.write(dict(result.obj()))

    def close(self) -> None:
        self._writer.close()
        with self._path.open("rb+") as fh:
            os.fsync(fh.fileno())

    def abort(self) -> None:
        self._writer.abort()


def _open_part(fmt: OutputFormat, path: Path) -> _TextPart | _ParquetPart:
    return _ParquetPart(path) if fmt is OutputFormat.PARQUET else _TextPart(fmt, path)


class OutputSet:
    """All requested outputs of one run, written together and committed together.

    Part files go into ``work_dir`` (on the same file system as the outputs, so the final
    ``os.replace`` is a rename), and are removed again if the set is closed uncommitted.
    """

    def __init__(self, specs: Iterable[OutputSpec], work_dir: Path) -> None:
        self.specs = list(specs)
        self._parts: list[tuple[OutputSpec, Path, _TextPart | _ParquetPart]] = []
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i, spec in enumerate(self.specs):
                spec.path.parent.mkdir(parents=True, exist_ok=True)
                part = work_dir / f"out-{i}.{spec.format.value}.part"
                self._parts.append((spec, part, _open_part(spec.format, part)))
        except OSError as exc:
            self.abort()
            raise ClientError(f"cannot create output files: {exc}") from exc
        except BaseException:
            self.abort()
            raise
        self.count = 0
        self._committed = False

    def write(self, a: Annotation, text: str | None = None) -> None:
        self.write_result(ResultText.of(a), text)

    def write_result(self, result: ResultText, text: str | None = None) -> None:
        """:meth:`write` of a result as its JSON text (a journal's), ``text`` the caption."""
        for _, _, writer in self._parts:
            writer.write(result, text)
        self.count += 1

    def commit(self) -> list[Path]:
        """Flush, fsync and move every part file into place."""
        for _, _, writer in self._parts:
            writer.close()
        for spec, part, _ in self._parts:
            os.replace(part, spec.path)
        for parent in {spec.path.parent for spec in self.specs}:
            fsync_dir(parent)
        self._committed = True
        return [spec.path for spec in self.specs]

    def abort(self) -> None:
        for _, part, writer in self._parts:
            writer.abort()
            part.unlink(missing_ok=True)
        self._parts = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._committed:
            self.abort()
