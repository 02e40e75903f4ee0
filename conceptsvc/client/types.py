"""What the service client returns, as plain frozen dataclasses (no protobuf past the client).

Annotations are the shared domain types of :mod:`conceptsvc.model`; search candidates are the
engine's :class:`conceptsvc.extractor.Candidate`; semantic types are
:class:`conceptsvc.semantic_network.SemanticType`. The types here are the ones that only exist
because there is a service in between: per-item stream outcomes, service information, a
concept with its synonyms, a reload result, and the error a failed call raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conceptsvc.errors import ClientError
from conceptsvc.model import Annotation
from conceptsvc.semantic_network import SemanticGroup, SemanticType

if TYPE_CHECKING:
    from conceptsvc.extractor import ExtractOptions

__all__ = [
    "ConceptRecord",
    "IndexSummary",
    "ItemError",
    "ReloadResult",
    "SemanticCatalog",
    "ServiceCallError",
    "ServiceInfo",
    "ServiceLimits",
    "StreamResult",
    "Synonym",
]


class ServiceCallError(ClientError):
    """An RPC failed with a gRPC status (after the client's retries, if it was retryable).

    ``status`` is the gRPC status name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"`` …) and
    ``details`` the server's message.
    """

    code = "E610"

    def __init__(self, method: str, status: str, details: str) -> None:
        self.method = method
        self.status = status
        self.details = details
        hint = {
            "UNAVAILABLE": " Is the service running and reachable (check --target)?",
            "UNAUTHENTICATED": " Pass the service's token (--token / CONCEPTSVC_TOKEN).",
            "DEADLINE_EXCEEDED": " Raise the deadline (--timeout) or send smaller batches.",
        }.get(status, "")
        super().__init__(f"{method} failed: {status}: {details.rstrip('.')}.{hint}")


@dataclass(frozen=True, slots=True)
class ItemError:
    """Why one stream item failed; the stream itself went on."""

    status: str  # gRPC status name, e.g. "INVALID_ARGUMENT"
    message: str
    error_code: str = ""  # conceptsvc's E-code when the error has one


@dataclass(frozen=True, slots=True)
class StreamResult:
    """The outcome of one item of :meth:`ConceptClient.annotate_stream`."""

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
    """One concept as the service describes it."""

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
