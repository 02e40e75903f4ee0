"""Parquet tables in and out of a batch run, one row group at a time.

ROCOv2 and most image–caption datasets are distributed as Parquet, often several GB of it, so a
corpus is read with :meth:`pyarrow.parquet.ParquetFile.iter_batches` over its id and caption
columns only (memory is bounded by a batch of two columns, not by the file), and the results are
written with :class:`pyarrow.parquet.ParquetWriter` in row groups as they are rendered.

pyarrow is an optional dependency (``pip install 'conceptsvc[parquet]'``): the service never
needs it, and the text formats work without it. It is imported only when a Parquet file is
actually read or written; without it, :class:`~conceptsvc.errors.MissingExtraError` says what to
install.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conceptsvc.errors import ClientError, MissingExtraError
from conceptsvc.model import CAPTION_HEADERS, ID_HEADERS

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

__all__ = [
    "DEFAULT_COLUMNS",
    "MAGIC",
    "BadValue",
    "ParquetAnnotationWriter",
    "ParquetCaptions",
    "annotation_schema",
    "require_pyarrow",
]

# Every Parquet file starts (and ends) with these four bytes; used to sniff standard input.
MAGIC = b"PAR1"

# (id, caption) column pairs tried in order when the caller names none: ROCOv2 / ImageCLEF
# spell them ID/Caption; Hugging Face caption datasets mostly id/text or id/caption.
DEFAULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ID", "Caption"), ("id", "text"), ("id", "caption"),
)

# Rows per record batch read from the input: small enough that two string columns of it are a
# few MB, large enough that the per-batch overhead of pyarrow does not show.
_READ_BATCH_ROWS = 8192
# A row group is written every this many rows or mentions, whichever comes first: buffered,
# the mentions of a group are about 15 MB of Python objects at the mention bound.
_WRITE_GROUP_ROWS = 8192
_WRITE_GROUP_MENTIONS = 32768
# The mention fields held in a flat buffer each (semantic_types, a list, has its own).
_MENTION_SCALARS = ("cui", "preferred_name", "text", "start", "end", "score", "source", "negated",
                    "hypothetical", "historical", "experiencer")


def require_pyarrow() -> None:
    """Raise :class:`~conceptsvc.errors.MissingExtraError` now, rather than after a long run
    reaches its Parquet output, when pyarrow is not installed."""
    _pyarrow()


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise MissingExtraError(
            "Parquet input and output need pyarrow, which is not installed "
            f"({exc}); install it with `pip install 'conceptsvc[parquet]'`, or use a CSV or JSONL "
            "file instead."
        ) from None
    return pyarrow, pyarrow.parquet


def _is_string(t: pa.DataType) -> bool:
    pa_, _ = _pyarrow()
    if pa_.types.is_dictionary(t):
        t = t.value_type
    return bool(pa_.types.is_string(t) or pa_.types.is_large_string(t)
                or getattr(pa_.types, "is_string_view", lambda _: False)(t))


def _is_integer(t: pa.DataType) -> bool:
    pa_, _ = _pyarrow()
    return bool(pa_.types.is_integer(t))


def _named_columns(
    names: Sequence[str], id_column: str | None, text_column: str | None
) -> tuple[str, str] | None:
    """The id and caption columns by the header names a CSV corpus's header is recognised by
    (:data:`~conceptsvc.model.ID_HEADERS`, :data:`~conceptsvc.model.CAPTION_HEADERS`, in any
    case: ``image_id``/``caption``, ``filename``/``description``), each column given by name
    taken as it is; None unless each is one column of the file, and two different ones."""

    def pick(given: str | None, known: frozenset[str]) -> str | None:
        if given is not None:
            return given if given in names else None
        hits = [n for n in names if n.casefold() in known]
        return hits[0] if len(hits) == 1 else None

    i, t = pick(id_column, ID_HEADERS), pick(text_column, CAPTION_HEADERS)
    return (i, t) if i is not None and t is not None and i != t else None


class ParquetCaptions:
    """The (row number, id, caption) values of a Parquet file's id and caption columns.

    ``id_column`` / ``text_column`` name the columns; a name left ``None`` is taken from the
    first pair of :data:`DEFAULT_COLUMNS` whose columns the file has, else from the one column
    named like an id (a caption) the way a CSV header is recognised (:func:`_named_columns`:
    ``image_id``/``caption``, ...). Ids may be strings or
    integers (written as decimal strings); captions must be strings. Nulls are passed on as
    ``None`` for the corpus to report with their row number.
    """

    def __init__(
        self,
        source: str,
        data: bytes | None = None,
        *,
        id_column: str | None = None,
        text_column: str | None = None,
    ) -> None:
        self.source = source
        self._data = data
        pf = self._open()
        names = list(pf.schema_arrow.names)
        self.num_rows = int(pf.metadata.num_rows)
        pairs = [(id_column or i, text_column or t) for i, t in DEFAULT_COLUMNS]
        found: tuple[str, str] | None = None
        for i, t in dict.fromkeys(pairs):
            if i in names and t in names:
                found = i, t
                break
        else:
            found = _named_columns(names, id_column, text_column)
        if found is not None:
            self.id_column, self.text_column = found
        else:
            asked = [c for c in (id_column, text_column) if c is not None and c not in names]
            wanted = (
                f"column(s) {', '.join(map(repr, asked))}" if asked
                else "id and caption columns (tried "
                + ", ".join(f"{i}/{t}" for i, t in dict.fromkeys(pairs)) + ")"
            )
            raise ClientError(
                f"{source}: the Parquet file has no {wanted}; its columns are "
                f"{', '.join(names) or '(none)'}. Name them with --id-column and --text-column."
            )
        schema = pf.schema_arrow
        id_type = schema.field(self.id_column).type
        text_type = schema.field(self.text_column).type
        if not (_is_string(id_type) or _is_integer(id_type)):
            raise ClientError(
                f"{source}: id column {self.id_column!r} is {id_type}; it must hold strings or "
                "integers. Name another with --id-column."
            )
        if not _is_string(text_type):
            raise ClientError(
                f"{source}: caption column {self.text_column!r} is {text_type}; it must hold "
                "strings. Name another with --text-column."
            )

    def _open(self) -> pq.ParquetFile:
        _, pq_ = _pyarrow()
        try:
            if self._data is not None:
                return pq_.ParquetFile(io.BytesIO(self._data))
            return pq_.ParquetFile(self.source)
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise ClientError(
                f"{self.source} is not a readable Parquet file ({exc}); it is truncated or not "
                "what its name says."
            ) from exc

    def rows(self) -> Iterator[tuple[int, object, object]]:
        """``(row, id, caption)`` for every row, ``row`` counted from 1 as a person would."""
        pf = self._open()
        row = 0
        try:
            for batch in pf.iter_batches(
                batch_size=_READ_BATCH_ROWS, columns=[self.id_column, self.text_column],
                use_threads=False,
            ):
                ids = _values(batch.column(0))
                texts = _values(batch.column(1))
                for rid, text in zip(ids, texts, strict=True):
                    row += 1
                    yield row, rid, text
        except (OSError, ValueError) as exc:
            raise ClientError(
                f"{self.source}: read failed after row {row} ({exc}); the file is truncated or "
                "corrupt."
            ) from exc


class BadValue:
    """A value pyarrow could not decode (invalid UTF-8 in a string column)."""

    def __init__(self, why: str) -> None:
        self.why = why


def _values(array: pa.Array) -> Sequence[object]:
    try:
        return array.to_pylist()  # type: ignore[no-any-return]
    except UnicodeDecodeError:
        # One bad value would fail the whole batch; decode them one by one to name the row.
        out: list[object] = []
        for i in range(len(array)):
            try:
                out.append(array[i].as_py())
            except UnicodeDecodeError as exc:
                out.append(BadValue(f"invalid UTF-8 ({exc.reason}); re-encode the column as UTF-8"))
        return out


def annotation_schema() -> pa.Schema:
    """``id`` string, ``concepts`` list<string>, ``mentions`` list<struct<...>> — the JSONL
    output's fields, in the same order."""
    pa_, _ = _pyarrow()
    mention = pa_.struct([
        pa_.field("cui", pa_.string(), nullable=False),
        pa_.field("preferred_name", pa_.string(), nullable=False),
        pa_.field("text", pa_.string(), nullable=False),
        pa_.field("start", pa_.int64(), nullable=False),
        pa_.field("end", pa_.int64(), nullable=False),
        pa_.field("score", pa_.float64(), nullable=False),
        pa_.field("semantic_types", pa_.list_(pa_.field("item", pa_.string(), nullable=False)),
                  nullable=False),
        pa_.field("source", pa_.string(), nullable=False),
        pa_.field("negated", pa_.bool_(), nullable=False),
        pa_.field("hypothetical", pa_.bool_(), nullable=False),
        pa_.field("historical", pa_.bool_(), nullable=False),
        pa_.field("experiencer", pa_.string(), nullable=False),
    ])
    return pa_.schema([
        pa_.field("id", pa_.string(), nullable=False),
        pa_.field("concepts", pa_.list_(pa_.field("item", pa_.string(), nullable=False)),
                  nullable=False),
        pa_.field("mentions", pa_.list_(pa_.field("item", mention, nullable=False)),
                  nullable=False),
    ])


class ParquetAnnotationWriter:
    """Canonical JSON results (:func:`~conceptsvc.client.outputs.annotation_to_json`) into a
    Parquet file, a row group at a time.

    Rows are taken apart into column buffers as they arrive (a Python dict per mention would
    cost about 1 KB; a list slot per field a tenth of that) and written as a row group every
    ``group_rows`` rows or ``group_mentions`` mentions, whichever comes first — mentions, not
    rows, are what a row group's memory is made of. The bytes depend only on the rows and the
    pyarrow version (no timestamps; ``created_by`` names the writing library; the row groups
    are cut by the data alone), so the same results give the same file — which is what makes a
    resumed run's output identical to an uninterrupted one.
    """

    def __init__(
        self,
        path: Path,
        *,
        group_rows: int = _WRITE_GROUP_ROWS,
        group_mentions: int = _WRITE_GROUP_MENTIONS,
    ) -> None:
        pa_, pq_ = _pyarrow()
        self._pa = pa_
        self.schema = annotation_schema()
        self._writer = pq_.ParquetWriter(str(path), self.schema, compression="zstd")
        self.group_rows = group_rows
        self.group_mentions = group_mentions
        self._reset()

    def _reset(self) -> None:
        self._ids: list[str] = []
        self._concept_offsets = [0]
        self._concepts: list[str] = []
        self._mention_offsets = [0]
        self._fields: dict[str, list[Any]] = {name: [] for name in _MENTION_SCALARS}
        self._type_offsets = [0]
        self._types: list[str] = []

    def write(self, row: dict[str, Any]) -> None:
        self._ids.append(row["id"])
        self._concepts.extend(row["concepts"])
        self._concept_offsets.append(len(self._concepts))
        for m in row["mentions"]:
            for name, values in self._fields.items():
                values.append(m[name])
            self._types.extend(m["semantic_types"])
            self._type_offsets.append(len(self._types))
        self._mention_offsets.append(self._mention_offsets[-1] + len(row["mentions"]))
        if (len(self._ids) >= self.group_rows
                or self._mention_offsets[-1] >= self.group_mentions):
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        pa_ = self._pa
        schema = self.schema
        mention_type = schema.field("mentions").type.value_type
        arrays = []
        for field in mention_type:
            if field.name == "semantic_types":
                arrays.append(pa_.ListArray.from_arrays(
                    pa_.array(self._type_offsets, pa_.int32()),
                    pa_.array(self._types, pa_.string()), type=field.type,
                ))
            else:
                arrays.append(pa_.array(self._fields[field.name], field.type))
        mentions = pa_.StructArray.from_arrays(arrays, fields=list(mention_type))
        table = pa_.Table.from_arrays([
            pa_.array(self._ids, pa_.string()),
            pa_.ListArray.from_arrays(
                pa_.array(self._concept_offsets, pa_.int32()),
                pa_.array(self._concepts, pa_.string()), type=schema.field("concepts").type,
            ),
            pa_.ListArray.from_arrays(
                pa_.array(self._mention_offsets, pa_.int32()), mentions,
                type=schema.field("mentions").type,
            ),
        ], schema=schema)
        self._writer.write_table(table, row_group_size=len(self._ids))
        self._reset()

    def close(self) -> None:
        """Write what is buffered and the footer."""
        self._flush()
        self._writer.close()

    def abort(self) -> None:
        self._reset()
        try:
            self._writer.close()
        except (OSError, ValueError):
            pass
