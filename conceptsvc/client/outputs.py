"""Annotation results as the files the next step of a dataset build reads directly.

Formats:

``jsonl``       (default) one object per caption with the concept set and every mention:
                ``{"id", "concepts": [CUI...], "mentions": [{"cui", "preferred_name", "text",
                "start", "end", "score", "semantic_types", "source", "negated"}]}``.
``csv``         ImageCLEFmedical concept file, as ROCOv2 ships it: header ``ID,CUIs``, CUIs
                joined by ``;``.
``submission``  the ImageCLEFmedical run-submission variant: ``ID<TAB>CUI;CUI``, no header.
``roco``        ROCO's per-caption CUI file: ``ID<TAB><TAB>CUI<TAB>CUI...``.

Every caption gets exactly one line in every format, also when it has no concepts. Files are
written as part files and moved into place with ``os.replace`` only when complete, so a reader
never sees half a file, and an interrupted run leaves the previous output untouched.

Rendering is a pure function of the :class:`~conceptsvc.model.Annotation` (fixed key order,
scores rounded to 6 decimals), which is what makes a resumed run byte-identical to an
uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from conceptsvc.errors import ClientError
from conceptsvc.model import Annotation, Mention

__all__ = [
    "OutputFormat",
    "OutputSet",
    "OutputSpec",
    "annotation_from_json",
    "annotation_to_json",
    "atomic_write_text",
    "dumps",
    "fsync_dir",
    "render",
    "resolve_outputs",
]


class OutputFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    SUBMISSION = "submission"
    ROCO = "roco"


# The suffix an extra output gets when several formats share one --out stem.
_SUFFIX = {
    OutputFormat.JSONL: ".jsonl",
    OutputFormat.CSV: ".csv",
    OutputFormat.SUBMISSION: ".submission.tsv",
    OutputFormat.ROCO: ".roco.tsv",
}
# --out suffixes that say which format is meant when --format is not given.
_BY_SUFFIX = {".jsonl": OutputFormat.JSONL, ".ndjson": OutputFormat.JSONL, ".csv": OutputFormat.CSV}

SCORE_DECIMALS = 6


@dataclass(frozen=True, slots=True)
class OutputSpec:
    format: OutputFormat
    path: Path


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


def resolve_outputs(out: str | os.PathLike[str], formats: Sequence[str] = ()) -> list[OutputSpec]:
    """Turn ``--out`` and ``--format`` values into output files.

    Each format item is ``FORMAT`` or ``FORMAT=PATH`` (comma-separated lists are accepted).
    The first format without an explicit path is written to ``out`` itself; further ones to
    ``out``'s stem plus the format's suffix (``.csv``, ``.submission.tsv``, ``.roco.tsv``,
    ``.jsonl``). Without ``--format`` — or with only ``FORMAT=PATH`` items — ``out`` gets the
    format its suffix names (``.csv`` → csv, otherwise jsonl).
    """
    out_path = Path(out)
    items = [item for f in formats for item in f.split(",") if item.strip()]
    if not items:
        items = [_BY_SUFFIX.get(out_path.suffix.lower(), OutputFormat.JSONL).value]
    specs: list[OutputSpec] = []
    primary_taken = False
    for item in items:
        name, eq, explicit = item.partition("=")
        fmt = _parse_format(name)
        if eq:
            if not explicit.strip():
                raise ClientError(f"--format {item!r}: the path after '=' is empty.")
            path = Path(explicit.strip())
        elif not primary_taken:
            path, primary_taken = out_path, True
        else:
            path = _stem(out_path).with_name(_stem(out_path).name + _SUFFIX[fmt])
        specs.append(OutputSpec(fmt, path))
    if not primary_taken:
        # Only FORMAT=PATH items: ``out`` still gets its own file (never silently unused).
        specs.insert(0, OutputSpec(_BY_SUFFIX.get(out_path.suffix.lower(), OutputFormat.JSONL),
                                   out_path))
    seen: dict[Path, OutputSpec] = {}
    for spec in specs:
        key = spec.path.resolve()
        if key in seen:
            raise ClientError(
                f"two outputs would be written to {spec.path} ({seen[key].format} and "
                f"{spec.format}); give one of them an explicit path with FORMAT=PATH."
            )
        seen[key] = spec
    return specs


# -- the canonical JSON form (also what the resume journal stores) ---------------------------
def annotation_to_json(a: Annotation) -> dict[str, Any]:
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
            )
            for m in obj.get("mentions", ())
        ),
    )


def dumps(obj: Any) -> str:
    """One compact JSON line, non-ASCII kept as UTF-8 (a reader should see "Sjögren" in the
    file, not "Sj\\u00f6gren")."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def render(fmt: OutputFormat, a: Annotation) -> str:
    """One caption's line (with its newline) in ``fmt``."""
    if fmt is OutputFormat.JSONL:
        return dumps(annotation_to_json(a)) + "\n"
    if fmt is OutputFormat.CSV:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([a.id, ";".join(a.concepts)])
        return buf.getvalue()
    if fmt is OutputFormat.SUBMISSION:
        return f"{a.id}\t{';'.join(a.concepts)}\n"
    return f"{a.id}\t" + "".join(f"\t{c}" for c in a.concepts) + "\n"


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


class OutputSet:
    """All requested outputs of one run, written together and committed together.

    Part files go into ``work_dir`` (on the same file system as the outputs, so the final
    ``os.replace`` is a rename), and are removed again if the set is closed uncommitted.
    """

    def __init__(self, specs: Iterable[OutputSpec], work_dir: Path) -> None:
        self.specs = list(specs)
        self._parts: list[tuple[OutputSpec, Path, IO[str]]] = []
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i, spec in enumerate(self.specs):
                spec.path.parent.mkdir(parents=True, exist_ok=True)
                part = work_dir / f"out-{i}.{spec.format.value}.part"
                fh = part.open("w", encoding="utf-8", newline="")
                fh.write(_header(spec.format))
                self._parts.append((spec, part, fh))
        except OSError as exc:
            self.abort()
            raise ClientError(f"cannot create output files: {exc}") from exc
        self.count = 0
        self._committed = False

    def write(self, a: Annotation) -> None:
        for spec, _, fh in self._parts:
            fh.write(render(spec.format, a))
        self.count += 1

    def commit(self) -> list[Path]:
        """Flush, fsync and move every part file into place."""
        for _, _, fh in self._parts:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        for spec, part, _ in self._parts:
            os.replace(part, spec.path)
        for parent in {spec.path.parent for spec in self.specs}:
            fsync_dir(parent)
        self._committed = True
        return [spec.path for spec in self.specs]

    def abort(self) -> None:
        for _, part, fh in self._parts:
            fh.close()
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
