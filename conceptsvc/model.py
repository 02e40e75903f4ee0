"""Domain types: what a request asks and what comes back, however it travelled.

The engine, the server, the client, the CLIs and the integrations all speak these types, so a
module that only needs one of them imports this module, not the engine. Frozen dataclasses
inside the package; protobuf exists only at the edge (:mod:`conceptsvc.wire`). Offsets are
code-point offsets into the ORIGINAL text the caller passed in.

- **requests**: :class:`ExtractOptions` and the choices its enumerated fields take
  (:data:`MODES`, :data:`SIMILARITIES`, :data:`OVERLAPS`; ``config.DefaultOptions`` is typed
  with the same ``Literal`` types);
- **results**: :class:`Annotation` of a caption with its :class:`Mention` s, and the
  :class:`Candidate` s a search ranks;
- **service answers**: what only exists because there is a service in between — a stream
  item's outcome (:class:`StreamResult`), the service's description of itself
  (:class:`ServiceInfo`), a concept with its synonyms (:class:`ConceptRecord`, also what an
  in-process lookup returns), the semantic-type catalog and a reload's result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from conceptsvc.errors import ExtractionError
from conceptsvc.semantic_network import SemanticGroup, SemanticType

__all__ = [
    "MODES",
    "OVERLAPS",
    "SIMILARITIES",
    "Annotation",
    "Candidate",
    "ConceptRecord",
    "ExtractOptions",
    "IndexSummary",
    "ItemError",
    "Mention",
    "Mode",
    "Overlap",
    "ReloadResult",
    "SemanticCatalog",
    "ServiceInfo",
    "ServiceLimits",
    "Similarity",
    "StreamResult",
    "Synonym",
]

# -- requests --------------------------------------------------------------------------------
Mode = Literal["exact", "approximate"]
Similarity = Literal["jaccard", "cosine", "dice", "overlap"]
Overlap = Literal["longest", "best_score", "all"]
# The choices as values, in the order error messages and ``--help`` list them.
MODES: tuple[str, ...] = get_args(Mode)
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
OVERLAPS: tuple[str, ...] = get_args(Overlap)


@dataclass(frozen=True)
class ExtractOptions:
    """Per-request options (see :mod:`conceptsvc.extractor` for the filter semantics).

    The enumerated fields are typed ``str``, not their ``Literal``: options arrive from the
    command line, the wire and files, and :meth:`validate` is what checks them.
    """

    semantic_types: tuple[str, ...] = ()  # filter names (TUI, abbrev, name); empty = all
    semantic_groups: tuple[str, ...] = ()  # group codes/names; empty = all
    sources: tuple[str, ...] = ()  # SABs accepted; empty = all
    exclude_cuis: tuple[str, ...] = ()
    mode: str = "exact"  # one of MODES
    similarity: str = "jaccard"  # one of SIMILARITIES
    threshold: float = 0.7  # (0, 1]
    overlap: str = "longest"  # one of OVERLAPS
    profile: str = "none"  # "none" | "rocov2" | other shipped profile names
    include_negated: bool = True
    include_mentions: bool = True

    def validate(self) -> None:
        """Raise ExtractionError for a choice or threshold no engine can serve.

        What depends on an index (semantic names, sources, profiles) is checked by the
        engine's ``check_options``.
        """
        if self.mode not in MODES:
            raise ExtractionError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.similarity not in SIMILARITIES:
            raise ExtractionError(
                f"similarity {self.similarity!r} is not one of {', '.join(SIMILARITIES)}"
            )
        if not isinstance(self.threshold, int | float) or not (
            math.isfinite(self.threshold) and 0 < self.threshold <= 1
        ):
            raise ExtractionError(f"threshold {self.threshold!r} must be in (0, 1], e.g. 0.7")
        if self.overlap not in OVERLAPS:
            raise ExtractionError(
                f"overlap {self.overlap!r} is not one of {', '.join(OVERLAPS)}"
            )

    def cache_key(self) -> str:
        """Canonical text of the options: equal for options that extract the same thing.

        List-valued options are sorted and deduplicated (their order never matters); the
        threshold is printed with repr so that 0.7 and 0.70 agree.
        """
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = ",".join(sorted(set(v)))
            elif isinstance(v, float):
                v = repr(float(v))
            parts.append(f"{f.name}={v}")
        return "|".join(parts)


# -- results ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Mention:
    cui: str
    preferred_name: str
    text: str  # exactly original_text[start:end]
    start: int
    end: int
    score: float
    semantic_types: tuple[str, ...]
    source: str  # SAB of the dictionary string that matched
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Annotation:
    id: str
    mentions: tuple[Mention, ...]
    concepts: tuple[str, ...]  # deduplicated CUIs, in order of first evidence


@dataclass(frozen=True, slots=True)
class Candidate:
    """One concept proposed for a search query."""

    cui: str
    preferred_name: str
    matched_string: str
    score: float
    semantic_types: tuple[str, ...]
    sources: tuple[str, ...]


# -- service answers -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ItemError:
    """Why one stream item failed; the stream itself went on."""

    status: str  # gRPC status name, e.g. "INVALID_ARGUMENT"
    message: str
    error_code: str = ""  # conceptsvc's E-code when the error has one


@dataclass(frozen=True, slots=True)
class StreamResult:
    """The outcome of one item of ``ConceptClient.annotate_stream``."""

    id: str
    annotation: Annotation | None
    error: ItemError | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Synonym:
    string: str
    source: str
    tty: str
    preferred: bool
    abbreviation: bool


@dataclass(frozen=True, slots=True)
class ConceptRecord:
    """One concept as the service (or an in-process lookup) describes it."""

    cui: str
    preferred_name: str
    semantic_types: tuple[SemanticType, ...]
    sources: tuple[str, ...]
    synonyms: tuple[Synonym, ...] = ()


@dataclass(frozen=True, slots=True)
class SemanticCatalog:
    types: tuple[SemanticType, ...]
    groups: tuple[SemanticGroup, ...]


@dataclass(frozen=True, slots=True)
class IndexSummary:
    content_hash: str
    source_release: str
    format_version: int
    normalizer_version: str
    created_at: str
    concepts: int
    keys: int
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    max_text_chars: int
    max_message_bytes: int
    max_search_limit: int
    max_concurrent_rpcs: int


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    service_version: str
    api_version: str
    index: IndexSummary
    default_options: ExtractOptions
    limits: ServiceLimits
    profiles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    previous_content_hash: str
    content_hash: str
    changed: bool
    concepts: int
    load_seconds: float
