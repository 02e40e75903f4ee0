"""Client side of conceptsvc: the typed service client and the tools built on it.

``ConceptClient`` (``service``) talks to the gRPC service and returns domain types; ``convert``
is the only module that maps protobuf messages to and from those types.
"""

from __future__ import annotations

from conceptsvc.client.service import ConceptClient
from conceptsvc.client.types import (
    ConceptRecord,
    ItemError,
    ReloadResult,
    SemanticCatalog,
    ServiceCallError,
    ServiceInfo,
    StreamResult,
    Synonym,
)

__all__ = [
    "ConceptClient",
    "ConceptRecord",
    "ItemError",
    "ReloadResult",
    "SemanticCatalog",
    "ServiceCallError",
    "ServiceInfo",
    "StreamResult",
    "Synonym",
]
