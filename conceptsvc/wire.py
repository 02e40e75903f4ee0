"""The wire: the one place where protobuf messages and conceptsvc's domain types meet.

Both ends use it: the servicer (``server/``) turns engine results into messages, the client
(``client/``) turns messages back into :mod:`conceptsvc.model` types. It sits beside them rather
than in either, so that neither end imports the other. Keeping both directions together keeps
them inverse (``tests/test_client.py`` round-trips them).

Options have presence semantics (see ``AnnotateOptions`` in the .proto): an unset field takes the
server's default. :func:`options_to_pb` therefore sets *every* field — a client that passes an
:class:`~conceptsvc.model.ExtractOptions` means all of it — while :func:`options_from_pb`
merges whatever is set over the defaults.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc.errors import ExtractionError
from conceptsvc.index import FLAG_ABBREVIATION, FLAG_PREFERRED, ConceptInfo, Posting
from conceptsvc.model import (
    Annotation,
    Candidate,
    ConceptRecord,
    ExtractOptions,
    IndexSummary,
    ItemError,
    Mention,
    ReloadResult,
    SemanticCatalog,
    ServiceInfo,
    ServiceLimits,
    StreamResult,
    Synonym,
)
from conceptsvc.semantic_network import SemanticGroup, SemanticNetwork, SemanticType

__all__ = [
    "annotation_from_pb",
    "annotation_to_pb",
    "candidate_from_pb",
    "candidate_to_pb",
    "candidates_to_pb",
    "catalog_from_pb",
    "catalog_to_pb",
    "concept_from_pb",
    "concept_to_pb",
    "index_info_to_pb",
    "info_from_pb",
    "options_from_pb",
    "options_to_pb",
    "reload_from_pb",
    "status_name",
    "stream_result_from_pb",
]

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
    ``include_hypothetical`` when the options leave it to the profile (None)."""
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
