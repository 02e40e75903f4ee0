# Types of the compiled wire writer and readers (conceptsvc/_wire.pyx); see its docstring.
from collections.abc import Callable, Sequence
from typing import Any

from conceptsvc.model import Annotation, MentionRows, StreamResult

class AnnotationWriter:
    def __init__(
        self, mention_layout: Sequence[tuple[str, int, int]], mentions_field: int,
        concepts_field: int, mention_type: type | None = None,
    ) -> None: ...
    def encode(self, annotation: Annotation) -> bytes: ...
    def encode_rows(self, parts: MentionRows) -> bytes: ...

class ItemJoiner:
    def __init__(self, items_field: int, id_field: int, cached_field: bytes) -> None: ...
    def join(
        self, blobs: list[bytes], ids: list[str], cached: bytes | bytearray, tail: bytes
    ) -> bytes: ...

class BatchReader:
    def __init__(
        self, mention_slots: Sequence[tuple[str, int, int, object]],
        numbers: tuple[int, ...], round_slot: int, decimals: int, top_keys: tuple[bytes, ...],
        json_keys: list[bytes], status_strings: tuple[int, ...], max_depth: int,
        decode_error: Callable[[bool, bool], Exception],
    ) -> None: ...
    def read(self, data: bytes) -> list[tuple[str, str, int, bool, Any]]: ...
    def read_json(self, data: bytes) -> list[tuple[str, str, int, bool, Any]]: ...

class ResultReader:
    def __init__(
        self, mention_type: type, annotation_type: type, result_type: type,
        mention_slots: Sequence[tuple[str, int, int, object]], annotation_slots: tuple[str, ...],
        result_slots: tuple[str, ...], numbers: tuple[int, ...],
        on_error: Callable[[bytes], StreamResult], status_strings: tuple[int, ...],
        max_depth: int, decode_error: Callable[[bool, bool], Exception],
    ) -> None: ...
    def read(self, data: bytes) -> list[StreamResult]: ...
    def read_one(self, data: bytes) -> StreamResult: ...

class RespPacker:
    def __init__(self, fallback: Any) -> None: ...
    def pack(self, *args: Any) -> list[bytes]: ...
