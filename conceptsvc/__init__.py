"""conceptsvc: UMLS concept mapping for radiology captions, as a library and a gRPC service.

``conceptsvc.Extractor`` and ``conceptsvc.ExtractOptions`` are the extraction engine
(:mod:`conceptsvc.extractor`); they are imported on first use so that ``import conceptsvc``
(and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conceptsvc.extractor import ExtractOptions, Extractor

__version__ = "0.1.0"

__all__ = ["ExtractOptions", "Extractor", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Extractor", "ExtractOptions"):
        from conceptsvc import extractor

        return getattr(extractor, name)
    raise AttributeError(f"module 'conceptsvc' has no attribute {name!r}")
