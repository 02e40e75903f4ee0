"""conceptsvc: UMLS concept mapping for radiology captions, as a library and a gRPC service.

``conceptsvc.Extractor`` is the extraction engine (:mod:`conceptsvc.extractor`) and
``conceptsvc.ExtractOptions`` its per-request options (:mod:`conceptsvc.model`); they are
imported on first use so that ``import conceptsvc`` (and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conceptsvc.extractor import Extractor
    from conceptsvc.model import ExtractOptions

__version__ = "0.1.0"

__all__ = ["ExtractOptions", "Extractor", "__version__"]


def __getattr__(name: str) -> Any:
    # Explicit branches, not getattr(module, name): no attribute is looked up by a computed
    # name (tests/test_security.py holds the package to that).
    if name == "Extractor":
        from conceptsvc.extractor import Extractor

        return Extractor
    if name == "ExtractOptions":
        from conceptsvc.model import ExtractOptions

        return ExtractOptions
    raise AttributeError(f"module 'conceptsvc' has no attribute {name!r}")
