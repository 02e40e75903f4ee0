# Types of the compiled annotation wire writer (conceptsvc/_wire.pyx); see its docstring.
from collections.abc import Sequence
from typing import Any

from conceptsvc.model import Annotation

class AnnotationWriter:
    def __init__(
        self, mention_layout: Sequence[tuple[str, int, int]], mentions_field: int,
        concepts_field: int,
    ) -> None: ...
    def encode(self, annotation: Annotation) -> bytes: ...

class ItemJoiner:
    def __init__(self, items_field: int, id_field: int, cached_field: bytes) -> None: ...
    def join(
        self, blobs: list[bytes], ids: list[str], cached: bytes | bytearray, tail: bytes
    ) -> bytes: ...

class BatchReader:
    def __init__(
        self, mention_slots: Sequence[tuple[str, int, int, object]],
        numbers: tuple[int, ...], round_slot: int, decimals: int, top_keys: tuple[bytes, ...],
        json_keys: list[bytes],
    ) -> None: ...
    def read(self, data: bytes) -> list[tuple[str, str, int, bool, Any]]: ...
    def read_json(self, data: bytes) -> list[tuple[str, str, int, bool, Any]]: ...
