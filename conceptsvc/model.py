"""Domain results: what an annotation is, independent of how it travelled (library, gRPC, file).

Frozen dataclasses inside the package; protobuf exists only at the edges (``server/``,
``client/``). Offsets are code-point offsets into the ORIGINAL text the caller passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Annotation", "Mention"]


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
