"""conceptsvc: UMLS concept mapping for radiology captions, as a library and a gRPC service."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
