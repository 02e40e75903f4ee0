"""The wire: the one place where protobuf messages and conceptsvc's domain types meet.

Both ends use it: the servicer (``server/``) turns engine results into messages, the client
(``client/``) turns messages back into :mod:`conceptsvc.model` types. It sits beside them rather
than in either, so that neither end imports the other. Keeping both directions together keeps
them inverse (``tests/test_client.py`` round-trips them).

Annotations have a second, faster way out (:class:`AnnotationWriter`): the wire bytes of a
caption's result written straight from the dataclasses, by the compiled ``_wire`` extension
or, without it, by the pure-Python writer here that defines its output. The layout both follow
is read from the .proto's descriptors (:func:`annotation_layout`), matched to the dataclass
fields by name, so a field added to ``Mention`` in both places travels without touching the
writers; a field the writers cannot map turns them off (the protobuf path is used, and a test
fails). Batches of such bytes are framed into an ``AnnotateBatchResponse`` by
:class:`ItemJoiner` — a cached result is copied into the reply, never parsed and rebuilt.
The clients read replies the same way round: :func:`batch_reader` into the journal's JSON form,
:func:`result_reader` into the :class:`~conceptsvc.model.StreamResult` s ``ConceptClient``
returns (compiled, with protobuf and :func:`stream_result_from_pb` as the reference).

Options have presence semantics (see ``AnnotateOptions`` in the .proto): an unset field takes the
server's default. :func:`options_to_pb` therefore sets *every* field — a client that passes an
:class:`~conceptsvc.model.ExtractOptions` means all of it — while :func:`options_from_pb`
merges whatever is set over the defaults.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc.errors import ExtractionError
from conceptsvc.model import (
    Annotation,
    Candidate,
    ConceptRecord,
    ExtractOptions,
    IndexSummary,
    ItemError,
    Mention,
    MentionRows,
    ReloadResult,
    SemanticCatalog,
    ServiceInfo,
    ServiceLimits,
    StreamResult,
    Synonym,
)
from conceptsvc.semantic_network import SemanticGroup, SemanticNetwork, SemanticType

if TYPE_CHECKING:
    # (the index module, and numpy with it, is the server's: clients import this module)
    from conceptsvc.index import ConceptInfo, Posting

__all__ = [
    "BATCH_SPLIT_HINT",
    "KIND_BOOL",
    "KIND_DOUBLE",
    "KIND_INT32",
    "KIND_STRING",
    "KIND_STRINGS",
    "KIND_UINT32",
    "KIND_UINT64",
    "KIND_VARINT",
    "AnnotationWriter",
    "AnnotationWriterPy",
    "BatchItem",
    "BatchReader",
    "BatchReaderPy",
    "ItemJoiner",
    "ItemJoinerPy",
    "ResultReader",
    "ResultReaderPy",
    "WireLayoutError",
    "annotation_from_pb",
    "annotation_layout",
    "annotation_to_pb",
    "annotation_writer",
    "batch_reader",
    "candidate_from_pb",
    "candidate_to_pb",
    "candidates_to_pb",
    "catalog_from_pb",
    "catalog_to_pb",
    "concept_from_pb",
    "concept_to_pb",
    "index_info_to_pb",
    "info_from_pb",
    "item_joiner",
    "options_from_pb",
    "options_to_pb",
    "reload_from_pb",
    "response_bytes",
    "result_reader",
    "status_name",
    "stream_result_from_pb",
]

log = logging.getLogger(__name__)

BATCH_SPLIT_HINT = "send smaller batches"
"""How the service ends its refusal of a whole AnnotateBatch that it turned away before
annotating any item of it (more items than ``max_batch_items``, or a reply that could not hold
even a refusal of each): a client that reads it sends the batch again in halves, which costs the
service nothing."""

_MODES = {"exact": pb.MATCH_MODE_EXACT, "approximate": pb.MATCH_MODE_APPROXIMATE}
_SIMILARITIES = {
    "jaccard": pb.SIMILARITY_JACCARD,
    "cosine": pb.SIMILARITY_COSINE,
    "dice": pb.SIMILARITY_DICE,
    "overlap": pb.SIMILARITY_OVERLAP,
}
_OVERLAPS = {
    "longest": pb.OVERLAP_POLICY_LONGEST,
    "best_score": pb.OVERLAP_POLICY_BEST_SCORE,
    "all": pb.OVERLAP_POLICY_ALL,
}
_LIST_FIELDS = ("semantic_types", "semantic_groups", "sources", "exclude_cuis")
_STATUS_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}


def _enum_value(table: Mapping[str, int], name: str, what: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise ExtractionError(f"{what} {name!r} is not one of {', '.join(table)}") from None


def _enum_name(table: Mapping[str, int], value: int, what: str) -> str:
    for name, v in table.items():
        if v == value:
            return name
    raise ExtractionError(
        f"{what} enum value {value} is unknown to this server (an API newer than v1?); use "
        f"one of {', '.join(table)}"
    )


# -- options -------------------------------------------------------------------------------------
def options_to_pb(options: ExtractOptions) -> pb.AnnotateOptions:
    """Every field set, so the receiver applies none of its own defaults — but
    ``include_hypothetical`` when the options leave it to the profile (None).

    A field of the wrong type raises :class:`~conceptsvc.errors.ExtractArgumentError`
    (:meth:`ExtractOptions.check_types <conceptsvc.model.ExtractOptions.check_types>`, what the
    engine raises in-process) before a message is built; values of the right type are left to
    the receiver to judge (a threshold of 1.5 is the server's INVALID_ARGUMENT)."""
    options.check_types()
    msg = pb.AnnotateOptions(
        mode=_enum_value(_MODES, options.mode, "mode"),
        similarity=_enum_value(_SIMILARITIES, options.similarity, "similarity"),
        threshold=options.threshold,
        overlap=_enum_value(_OVERLAPS, options.overlap, "overlap"),
        profile=options.profile,
        include_negated=options.include_negated,
        include_mentions=options.include_mentions,
    )
    if options.include_hypothetical is not None:  # unset: the profile's choice
        msg.include_hypothetical = options.include_hypothetical
    for name in _LIST_FIELDS:
        getattr(msg, name).SetInParent()
        getattr(msg, name).values.extend(getattr(options, name))
    return msg


def options_from_pb(msg: pb.AnnotateOptions, defaults: ExtractOptions) -> ExtractOptions:
    """``defaults`` with the fields ``msg`` sets; raises ExtractionError on unknown enums."""
    changes: dict[str, Any] = {}
    for name in _LIST_FIELDS:
        if msg.HasField(name):
            changes[name] = tuple(getattr(msg, name).values)
    if msg.mode:
        changes["mode"] = _enum_name(_MODES, msg.mode, "mode")
    if msg.similarity:
        changes["similarity"] = _enum_name(_SIMILARITIES, msg.similarity, "similarity")
    if msg.overlap:
        changes["overlap"] = _enum_name(_OVERLAPS, msg.overlap, "overlap")
    if msg.HasField("threshold"):
        changes["threshold"] = msg.threshold
    if msg.HasField("profile"):
        changes["profile"] = msg.profile
    if msg.HasField("include_negated"):
        changes["include_negated"] = msg.include_negated
    if msg.HasField("include_mentions"):
        changes["include_mentions"] = msg.include_mentions
    if msg.HasField("include_hypothetical"):
        changes["include_hypothetical"] = msg.include_hypothetical
    return replace(defaults, **changes) if changes else defaults


# -- annotations ---------------------------------------------------------------------------------
def annotation_to_pb(a: Annotation) -> pb.AnnotateResponse:
    return pb.AnnotateResponse(
        id=a.id,
        mentions=[
            pb.Mention(
                cui=m.cui,
                preferred_name=m.preferred_name,
                text=m.text,
                start=m.start,
                end=m.end,
                score=m.score,
                semantic_types=m.semantic_types,
                source=m.source,
                negated=m.negated,
                hypothetical=m.hypothetical,
                historical=m.historical,
                experiencer=m.experiencer,
            )
            for m in a.mentions
        ],
        concepts=a.concepts,
    )


def annotation_from_pb(msg: pb.AnnotateResponse) -> Annotation:
    return Annotation(
        id=msg.id,
        mentions=tuple(
            Mention(
                cui=m.cui,
                preferred_name=m.preferred_name,
                text=m.text,
                start=m.start,
                end=m.end,
                score=m.score,
                semantic_types=tuple(m.semantic_types),
                source=m.source,
                negated=m.negated,
                hypothetical=m.hypothetical,
                historical=m.historical,
                experiencer=m.experiencer or "patient",  # servers older than the field
            )
            for m in msg.mentions
        ),
        concepts=tuple(msg.concepts),
    )


# -- annotations as wire bytes ------------------------------------------------------------------
# Wire kinds of a Mention field, as the writers know them (``_wire.pyx`` has the same numbers).
# The integer kinds (KIND_VARINT is int64) are written alike; a reader keeps of a varint what
# protobuf keeps for the field's type (the low 32 bits of a uint32, ...).
(KIND_STRING, KIND_VARINT, KIND_DOUBLE, KIND_BOOL, KIND_STRINGS, KIND_INT32, KIND_UINT32,
 KIND_UINT64) = range(8)
_FD = pb.Mention.DESCRIPTOR.fields[0].__class__  # FieldDescriptor: its TYPE_* / LABEL_*
_INT_KIND_OF_TYPE = {
    _FD.TYPE_INT64: KIND_VARINT, _FD.TYPE_INT32: KIND_INT32, _FD.TYPE_UINT32: KIND_UINT32,
    _FD.TYPE_UINT64: KIND_UINT64,
}
_INT_KINDS = frozenset(_INT_KIND_OF_TYPE.values())
_WIRE_TYPE = {
    KIND_STRING: 2, KIND_STRINGS: 2, KIND_DOUBLE: 1, KIND_BOOL: 0,
    **{kind: 0 for kind in _INT_KINDS},
}


class WireLayoutError(Exception):
    """The dataclasses and the .proto disagree in a way the byte writers cannot map."""


def _kind(fd: Any) -> int:
    repeated = fd.is_repeated
    if fd.has_presence:
        raise WireLayoutError(
            f"Mention.{fd.name} has explicit presence (proto3 `optional`); the annotation "
            "writers leave defaults out, so they would lose its presence"
        )
    if fd.type == _FD.TYPE_STRING:
        return KIND_STRINGS if repeated else KIND_STRING
    if not repeated and fd.type in _INT_KIND_OF_TYPE:
        return _INT_KIND_OF_TYPE[fd.type]
    if not repeated and fd.type == _FD.TYPE_DOUBLE:
        return KIND_DOUBLE
    if not repeated and fd.type == _FD.TYPE_BOOL:
        return KIND_BOOL
    raise WireLayoutError(
        f"Mention.{fd.name} has a protobuf type the annotation writers do not handle; teach "
        "conceptsvc.wire.annotation_layout (and _wire.pyx) that type"
    )


def annotation_layout() -> tuple[tuple[tuple[str, int, int], ...], int, int]:
    """``((attribute, field number, kind) per Mention field in number order, mentions field,
    concepts field)``: what the writers need, read from the descriptors.

    Every field of :class:`~conceptsvc.model.Mention` must be a field of ``pb.Mention`` of the
    same name and every ``pb.Mention`` field one of the dataclass, or :class:`WireLayoutError`
    says which is missing: a field only one side has would be dropped without a word.
    """
    by_name = {fd.name: fd for fd in pb.Mention.DESCRIPTOR.fields}
    ours = [f.name for f in fields(Mention)]
    missing = sorted(set(ours) ^ set(by_name))
    if missing:
        raise WireLayoutError(
            f"Mention fields {missing} are not on both the dataclass and the .proto; add them "
            "to both (model.Mention, conceptsvc.proto)"
        )
    layout = tuple(sorted(
        ((name, by_name[name].number, _kind(by_name[name])) for name in ours),
        key=lambda t: t[1],
    ))
    resp = pb.AnnotateResponse.DESCRIPTOR.fields_by_name
    return layout, resp["mentions"].number, resp["concepts"].number


def _varint(v: int) -> bytes:
    out = bytearray()
    v &= (1 << 64) - 1  # negative ints as protobuf writes them: 10 bytes, two's complement
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _delimited(tag: bytes, data: bytes) -> bytes:
    return tag + _varint(len(data)) + data


class AnnotationWriter(Protocol):
    def encode(self, annotation: Annotation) -> bytes: ...
    def encode_rows(self, parts: MentionRows) -> bytes: ...


def _annotation_of_rows(parts: MentionRows) -> Annotation:
    mentions, concepts = parts
    size = len(Mention.__slots__)
    for row in mentions:
        if len(row) != size:  # (Mention's defaults would fill a short row in silently)
            raise ValueError(f"a mention row has {len(row)} values, not {size}")
    return Annotation(id="", mentions=tuple(Mention(*row) for row in mentions), concepts=concepts)


class AnnotationWriterPy:
    """The reference writer: an Annotation's ``mentions`` and ``concepts`` as canonical
    AnnotateResponse bytes (fields in number order, proto3 defaults left out)."""

    def __init__(
        self, mention_layout: Sequence[tuple[str, int, int]], mentions_field: int,
        concepts_field: int,
    ) -> None:
        self._fields = [
            (attr, _varint(number << 3 | _WIRE_TYPE[kind]), kind)
            for attr, number, kind in mention_layout
        ]
        self._mentions_tag = _varint(mentions_field << 3 | 2)
        self._concepts_tag = _varint(concepts_field << 3 | 2)

    def _mention(self, m: Mention) -> bytes:
        parts: list[bytes] = []
        for attr, tag, kind in self._fields:
            v = getattr(m, attr)
            if kind == KIND_STRING:
                if v:
                    parts.append(_delimited(tag, v.encode("utf-8")))
            elif kind in _INT_KINDS:
                if v:
                    parts.append(tag + _varint(int(v)))
            elif kind == KIND_DOUBLE:
                raw = struct.pack("<d", v)
                if raw != bytes(8):
                    parts.append(tag + raw)
            elif kind == KIND_BOOL:
                if v:
                    parts.append(tag + b"\x01")
            else:
                parts.extend(_delimited(tag, s.encode("utf-8")) for s in v)
        return b"".join(parts)

    def encode(self, annotation: Annotation) -> bytes:
        parts = [_delimited(self._mentions_tag, self._mention(m)) for m in annotation.mentions]
        parts += [_delimited(self._concepts_tag, c.encode("utf-8")) for c in annotation.concepts]
        return b"".join(parts)

    def encode_rows(self, parts: MentionRows) -> bytes:
        """:meth:`encode` of what ``Extractor.extract_rows`` returns."""
        return self.encode(_annotation_of_rows(parts))


class _ProtobufWriter:
    """The writer of last resort: protobuf's own serialisation (when the layout is unmappable)."""

    def encode(self, annotation: Annotation) -> bytes:
        msg = annotation_to_pb(annotation)
        msg.id = ""
        return bytes(msg.SerializeToString())

    def encode_rows(self, parts: MentionRows) -> bytes:
        return self.encode(_annotation_of_rows(parts))


class ItemJoiner(Protocol):
    def join(
        self, blobs: list[bytes], ids: list[str], cached: bytes | bytearray, tail: bytes
    ) -> bytes: ...


class ItemJoinerPy:
    """The reference joiner: AnnotateBatchResponse bytes from per-caption bytes.

    Item ``i`` is ``blobs[i]`` (AnnotateResponse fields without the id: what the writers and
    the cache hold, or a failed item's status), then the item's ``id``, the ``cached`` field
    when ``cached[i]`` is 1, then ``tail`` (the fields every item of the batch shares: the
    index hash). Protobuf reads fields in any order, so appending them is all it takes.
    """

    def __init__(self, items_field: int, id_field: int, cached_field: bytes) -> None:
        self._item_tag = _varint(items_field << 3 | 2)
        self._id_tag = _varint(id_field << 3 | 2)
        self._cached_field = cached_field

    def join(
        self, blobs: list[bytes], ids: list[str], cached: bytes | bytearray, tail: bytes
    ) -> bytes:
        if not len(blobs) == len(ids) == len(cached):
            raise ValueError("join: blobs, ids and cached differ in length")
        parts = []
        for blob, rid, hit in zip(blobs, ids, cached, strict=True):
            item = blob
            if rid:
                item += _delimited(self._id_tag, rid.encode("utf-8"))
            if hit:
                item += self._cached_field
            parts.append(_delimited(self._item_tag, item + tail))
        return b"".join(parts)


def response_bytes(blob: bytes, id_: str, cached: int, tail: bytes) -> bytes:
    """One AnnotateResponse as bytes: ``blob`` (see :class:`ItemJoinerPy`), its id, the cached
    flag when set, then ``tail``."""
    out = blob
    if id_:
        out += _ID_TAG + _varint(len(raw := id_.encode("utf-8"))) + raw
    if cached:
        out += _CACHED_FIELD
    return out + tail


_ID_TAG = _varint(pb.AnnotateResponse.DESCRIPTOR.fields_by_name["id"].number << 3 | 2)
_CACHED_FIELD = pb.AnnotateResponse(cached=True).SerializeToString()


def _compiled_wire() -> Any:
    try:
        from conceptsvc import _wire
    except ImportError:
        return None
    return _wire


def annotation_writer(*, compiled: bool = True) -> AnnotationWriter:
    """The fastest writer that can serve this build: the compiled one, else the reference,
    else (a Mention field the layout cannot map: logged) protobuf's serialisation."""
    try:
        layout, mentions_field, concepts_field = annotation_layout()
    except WireLayoutError as exc:
        log.warning("annotations are serialised through protobuf messages: %s", exc)
        return _ProtobufWriter()
    mod = _compiled_wire() if compiled else None
    if mod is not None:
        return mod.AnnotationWriter(  # type: ignore[no-any-return]
            layout, mentions_field, concepts_field, Mention
        )
    return AnnotationWriterPy(layout, mentions_field, concepts_field)


def item_joiner(*, compiled: bool = True) -> ItemJoiner:
    """The compiled joiner when built, else the reference."""
    items = pb.AnnotateBatchResponse.DESCRIPTOR.fields_by_name["items"].number
    id_field = pb.AnnotateResponse.DESCRIPTOR.fields_by_name["id"].number
    mod = _compiled_wire() if compiled else None
    if mod is not None:
        return mod.ItemJoiner(items, id_field, _CACHED_FIELD)  # type: ignore[no-any-return]
    return ItemJoinerPy(items, id_field, _CACHED_FIELD)


# -- reading replies: what both compiled readers are handed --------------------------------------
# The compiled readers take a server's bytes as protobuf does: what it accepts they read as it
# reads it, what it refuses they refuse with its DecodeError, word for word but in one case
# (a string running past the end of its message with bad UTF-8 in it: protobuf finds the UTF-8,
# they the overrun, first); tests/test_wire.py holds them to protobuf on crafted and mutated
# replies (tests/malformed_replies.py). What that takes beside the layout:
# ItemStatus's string fields (whose UTF-8 protobuf checks; the readers keep only the code), how
# deep protobuf lets messages and unknown groups nest (its default recursion limit), and its
# error. upb's reasons, as it words them:
_CORRUPT = "Wire format was corrupt"
_BAD_UTF8 = "String field had bad UTF-8"
_MAX_DEPTH = 100
_REPLY_FIELDS = {
    "conceptsvc.v1.AnnotateBatchResponse": {"items"},
    "conceptsvc.v1.AnnotateResponse": {
        "id", "mentions", "concepts", "status", "cached", "index_hash",
    },
}


def _decode_error(batch: bool, bad_utf8: bool) -> DecodeError:
    """What protobuf raises for a reply (an AnnotateBatchResponse when ``batch``) it cannot
    parse."""
    message = pb.AnnotateBatchResponse if batch else pb.AnnotateResponse
    return DecodeError(
        f"Error parsing message with type '{message.DESCRIPTOR.full_name}': "
        f"{_BAD_UTF8 if bad_utf8 else _CORRUPT}"
    )


_PROTOBUF_RULES = (
    tuple(fd.number for fd in pb.ItemStatus.DESCRIPTOR.fields if fd.type == _FD.TYPE_STRING),
    _MAX_DEPTH,
    _decode_error,
)


def _reply_numbers() -> tuple[int, ...] | None:
    """The field numbers the compiled readers walk a reply by: AnnotateBatchResponse.items,
    AnnotateResponse's id, mentions, concepts, status, cached and index_hash, ItemStatus.code.
    None when the replies have a field more: the readers would skip it unread (and unchecked)
    where protobuf reads it."""
    for message in (pb.AnnotateBatchResponse, pb.AnnotateResponse):
        d = message.DESCRIPTOR
        if {fd.name for fd in d.fields} != _REPLY_FIELDS[d.full_name]:
            return None
    resp = pb.AnnotateResponse.DESCRIPTOR.fields_by_name
    return (
        pb.AnnotateBatchResponse.DESCRIPTOR.fields_by_name["items"].number,
        *(resp[name].number for name in ("id", "mentions", "concepts", "status")),
        pb.ItemStatus.DESCRIPTOR.fields_by_name["code"].number,
        resp["cached"].number, resp["index_hash"].number,
    )


# -- reading batch replies (the batch client) -----------------------------------------------------
# One answer of a batch reply: (id, index hash, status code, cached, answer) — the answer in its
# canonical JSON form when the code is 0, else the item's bytes (its status, for protobuf).
BatchItem = tuple[str, str, int, bool, Any]
_DEFAULT_OF_KIND: dict[int, Any] = {
    KIND_STRING: "", KIND_DOUBLE: 0.0, KIND_BOOL: False, KIND_STRINGS: [],
    **{kind: 0 for kind in _INT_KINDS},
}


class BatchReader(Protocol):
    def read(self, data: bytes) -> list[BatchItem]: ...
    def read_json(self, data: bytes) -> list[BatchItem]: ...


class BatchReaderPy:
    """The reference reader: protobuf parses the reply, ``to_json`` makes each answer's JSON
    form (the batch client passes ``outputs.annotation_to_json``), ``dumps`` its text."""

    def __init__(
        self, to_json: Callable[[Any], dict[str, Any]], dumps: Callable[[Any], str]
    ) -> None:
        self._to_json = to_json
        self._dumps = dumps

    def read(self, data: bytes) -> list[BatchItem]:
        out: list[BatchItem] = []
        for item in pb.AnnotateBatchResponse.FromString(data).items:
            code = item.status.code
            answer = (
                bytes(item.SerializeToString()) if code
                else self._to_json(annotation_from_pb(item))
            )
            out.append((item.id, item.index_hash, code, item.cached, answer))
        return out

    def read_json(self, data: bytes) -> list[BatchItem]:
        return [
            (rid, ix, code, cached, a if code else self._dumps(a).encode("utf-8"))
            for rid, ix, code, cached, a in self.read(data)
        ]


def batch_reader(
    to_json: Callable[[Any], dict[str, Any]], dumps: Callable[[Any], str], decimals: int,
    *, compiled: bool = True,
) -> BatchReader:
    """A reader of AnnotateBatch replies whose answers are ``to_json``'s dicts (``read``) or
    their ``dumps`` text (``read_json``).

    The compiled reader writes those itself, so what it must write is read off
    ``to_json``: its keys and their order from the JSON form of a sample answer, each
    mention key matched to its Mention field (and so to the .proto's layout) by name, and the
    one double (the score) rounded to ``decimals`` places. Anything it could not reproduce —
    a key that is no field, another shape, a second double, a reply field it does not know
    (:func:`_reply_numbers`) — leaves the reference reader in charge (``tests/test_wire.py``
    holds the two to the same output, and to the same errors).
    """
    reference = BatchReaderPy(to_json, dumps)
    mod = _compiled_wire() if compiled else None
    if mod is None:
        return reference
    try:
        layout, _, _ = annotation_layout()
    except WireLayoutError:
        return reference
    by_name = {name: (number, kind) for name, number, kind in layout}
    sample = Mention(**{name: _DEFAULT_OF_KIND[kind] for name, _, kind in layout})
    shape = to_json(Annotation(id="", mentions=(sample,), concepts=()))
    keys = list(shape["mentions"][0]) if shape.get("mentions") else []
    if list(shape) != ["id", "concepts", "mentions"] or sorted(keys) != sorted(by_name):
        return reference
    doubles = [k for k, key in enumerate(keys) if by_name[key][1] == KIND_DOUBLE]
    if len(doubles) > 1:
        return reference
    # An absent field (or an empty string) reads as the dataclass's default where it has one
    # (experiencer "patient" from servers older than the field), as annotation_from_pb does.
    own = {f.name: f.default for f in fields(Mention) if f.default is not MISSING}
    slots = [
        (key, *by_name[key], own.get(key, _DEFAULT_OF_KIND[by_name[key][1]])) for key in keys
    ]
    numbers = _reply_numbers()
    if numbers is None:
        return reference

    def before(k: int, key: str) -> bytes:
        """The JSON text before the value of ``key``, ``k``-th in its object, as ``dumps``
        writes it (``dumps({key: 0})`` is ``{"key":0}`` with its separator)."""
        return (("{" if k == 0 else ",") + dumps({key: 0})[1:-2]).encode("utf-8")

    reader = mod.BatchReader(
        slots, numbers, doubles[0] if doubles else -1, decimals,
        tuple(before(k, key) for k, key in enumerate(shape)),
        [before(k, key) for k, key in enumerate(keys)],
        *_PROTOBUF_RULES,
    )
    return reader  # type: ignore[no-any-return]


# -- reading replies into domain objects (ConceptClient) ------------------------------------------
class ResultReader(Protocol):
    def read(self, data: bytes) -> list[StreamResult]: ...
    def read_one(self, data: bytes) -> StreamResult: ...


class ResultReaderPy:
    """The reference reader of annotation replies: protobuf parses them,
    :func:`stream_result_from_pb` makes each item's :class:`~conceptsvc.model.StreamResult`."""

    def read(self, data: bytes) -> list[StreamResult]:
        return [stream_result_from_pb(m) for m in pb.AnnotateBatchResponse.FromString(data).items]

    def read_one(self, data: bytes) -> StreamResult:
        return stream_result_from_pb(pb.AnnotateResponse.FromString(data))


def _failed_item(data: bytes) -> StreamResult:
    return stream_result_from_pb(pb.AnnotateResponse.FromString(data))


_ANNOTATION_SLOTS = ("id", "mentions", "concepts")
_RESULT_SLOTS = ("id", "annotation", "error", "cached", "index_hash")


def result_reader(*, compiled: bool = True) -> ResultReader:
    """A reader of AnnotateBatchResponse (``read``) and AnnotateResponse (``read_one``) bytes
    into :class:`~conceptsvc.model.StreamResult` s: the compiled one when built, else the
    reference. Both give what :func:`stream_result_from_pb` gives of the parsed message (an
    absent or empty string field reads as the dataclass's default where it has one, as there);
    ``tests/test_wire.py`` holds them to that, and to protobuf's errors. A layout the compiled
    reader cannot map (see :func:`annotation_layout`, dataclass slots or reply fields it does
    not know) leaves the reference."""
    reference = ResultReaderPy()
    mod = _compiled_wire() if compiled else None
    if mod is None:
        return reference
    try:
        layout, _, _ = annotation_layout()
    except WireLayoutError:
        return reference
    if (set(Annotation.__slots__) != set(_ANNOTATION_SLOTS)
            or set(StreamResult.__slots__) != set(_RESULT_SLOTS)):
        return reference
    own = {f.name: f.default for f in fields(Mention) if f.default is not MISSING}
    slots = [
        (name, number, kind, own.get(name, _DEFAULT_OF_KIND[kind]))
        for name, number, kind in layout
    ]
    numbers = _reply_numbers()
    if numbers is None:
        return reference
    return mod.ResultReader(  # type: ignore[no-any-return]
        Mention, Annotation, StreamResult, slots, _ANNOTATION_SLOTS, _RESULT_SLOTS, numbers,
        _failed_item, *_PROTOBUF_RULES,
    )


def status_name(code: int) -> str:
    return _STATUS_NAMES.get(code, f"CODE_{code}")


def stream_result_from_pb(msg: pb.AnnotateResponse) -> StreamResult:
    if msg.HasField("status") and msg.status.code != 0:
        err = ItemError(status_name(msg.status.code), msg.status.message, msg.status.error_code)
        return StreamResult(msg.id, None, err, msg.cached, msg.index_hash)
    return StreamResult(msg.id, annotation_from_pb(msg), None, msg.cached, msg.index_hash)


# -- semantic network ------------------------------------------------------------------------------
def _sty_to_pb(t: SemanticType) -> pb.SemanticType:
    return pb.SemanticType(
        tui=t.tui,
        abbreviation=t.abbrev,
        name=t.name,
        tree_number=t.tree_number,
        group=t.group,
        group_name=t.group_name,
        definition=t.definition,
    )


def _sty_from_pb(m: pb.SemanticType) -> SemanticType:
    return SemanticType(
        tui=m.tui,
        abbrev=m.abbreviation,
        name=m.name,
        tree_number=m.tree_number,
        group=m.group,
        group_name=m.group_name,
        definition=m.definition,
    )


def catalog_to_pb(sn: SemanticNetwork) -> pb.ListSemanticTypesResponse:
    return pb.ListSemanticTypesResponse(
        types=[_sty_to_pb(t) for t in sorted(sn.types.values(), key=lambda t: t.tui)],
        groups=[
            pb.SemanticGroup(code=g.code, name=g.name, tuis=g.tuis)
            for g in sorted(sn.groups.values(), key=lambda g: g.code)
        ],
    )


def catalog_from_pb(msg: pb.ListSemanticTypesResponse) -> SemanticCatalog:
    return SemanticCatalog(
        types=tuple(_sty_from_pb(t) for t in msg.types),
        groups=tuple(SemanticGroup(g.code, g.name, tuple(g.tuis)) for g in msg.groups),
    )


# -- concepts and candidates ---------------------------------------------------------------
def concept_to_pb(
    info: ConceptInfo, sn: SemanticNetwork, synonyms: Iterable[Posting] | None = None
) -> pb.Concept:
    from conceptsvc.index import FLAG_ABBREVIATION, FLAG_PREFERRED

    msg = pb.Concept(
        cui=info.cui,
        preferred_name=info.preferred_name,
        semantic_types=[_sty_to_pb(sn.describe(t)) for t in info.semantic_types],
        sources=info.sources,
    )
    if synonyms is not None:
        msg.synonyms.extend(
            pb.Synonym(
                string=p.string,
                source=p.sab,
                tty=p.tty,
                preferred=bool(p.flags & FLAG_PREFERRED),
                abbreviation=bool(p.flags & FLAG_ABBREVIATION),
            )
            for p in synonyms
        )
    return msg


def concept_from_pb(msg: pb.Concept) -> ConceptRecord:
    return ConceptRecord(
        cui=msg.cui,
        preferred_name=msg.preferred_name,
        semantic_types=tuple(_sty_from_pb(t) for t in msg.semantic_types),
        sources=tuple(msg.sources),
        synonyms=tuple(
            Synonym(s.string, s.source, s.tty, s.preferred, s.abbreviation) for s in msg.synonyms
        ),
    )


def candidate_to_pb(c: Candidate, sn: SemanticNetwork) -> pb.Candidate:
    return pb.Candidate(
        cui=c.cui,
        preferred_name=c.preferred_name,
        matched_string=c.matched_string,
        score=c.score,
        semantic_types=[_sty_to_pb(sn.describe(t)) for t in c.semantic_types],
        sources=c.sources,
    )


def candidate_from_pb(msg: pb.Candidate) -> Candidate:
    return Candidate(
        cui=msg.cui,
        preferred_name=msg.preferred_name,
        matched_string=msg.matched_string,
        score=msg.score,
        semantic_types=tuple(t.tui for t in msg.semantic_types),
        sources=tuple(msg.sources),
    )


# -- service information ------------------------------------------------------------------
def index_info_to_pb(manifest: Mapping[str, Any]) -> pb.IndexInfo:
    counts = manifest.get("counts", {})
    return pb.IndexInfo(
        content_hash=str(manifest.get("content_hash", "")),
        source_release=str(manifest.get("source_release", "")),
        format_version=int(manifest.get("format_version", 0)),
        normalizer_version=str(manifest.get("normalizer_version", "")),
        created_at=str(manifest.get("created_at", "")),
        concepts=int(counts.get("concepts", 0)),
        keys=int(counts.get("keys", 0)),
        manifest_json=json.dumps(manifest, sort_keys=True),
    )


def info_from_pb(msg: pb.GetInfoResponse) -> ServiceInfo:
    ix = msg.index
    return ServiceInfo(
        service_version=msg.service_version,
        api_version=msg.api_version,
        index=IndexSummary(
            content_hash=ix.content_hash,
            source_release=ix.source_release,
            format_version=ix.format_version,
            normalizer_version=ix.normalizer_version,
            created_at=ix.created_at,
            concepts=ix.concepts,
            keys=ix.keys,
            manifest=json.loads(ix.manifest_json) if ix.manifest_json else {},
        ),
        default_options=options_from_pb(msg.default_options, ExtractOptions()),
        limits=ServiceLimits(
            max_text_chars=msg.limits.max_text_chars,
            max_message_bytes=msg.limits.max_message_bytes,
            max_search_limit=msg.limits.max_search_limit,
            max_concurrent_rpcs=msg.limits.max_concurrent_rpcs,
            max_option_items=msg.limits.max_option_items,
            max_batch_items=msg.limits.max_batch_items,
        ),
        profiles=tuple(msg.profiles),
    )


def reload_from_pb(msg: pb.ReloadIndexResponse) -> ReloadResult:
    return ReloadResult(
        previous_content_hash=msg.previous_content_hash,
        content_hash=msg.content_hash,
        changed=msg.changed,
        concepts=msg.concepts,
        load_seconds=msg.load_seconds,
    )


def candidates_to_pb(cands: Sequence[Candidate], sn: SemanticNetwork) -> pb.SearchConceptsResponse:
    return pb.SearchConceptsResponse(candidates=[candidate_to_pb(c, sn) for c in cands])
