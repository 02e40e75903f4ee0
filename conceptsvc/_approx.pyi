"""Types of approximate matching's compiled search (``_approx.pyx``) as Python calls it.

Its rules come from ``conceptsvc.approximate`` (bounds, window rules) and its data from
``conceptsvc.trigram_index`` (the index's mapped arrays); nothing here has rules of its own.
"""

from collections.abc import Callable

from conceptsvc.trigram_index import TrigramArrays

class TrigramSearcher:
    def __init__(
        self,
        arrays: TrigramArrays,
        key_string: Callable[[int], str],
        bounds: Callable[[str, float, int], tuple[int, int, int]],
        *,
        stopwords: frozenset[str],
        break_chars: frozenset[str],
        min_chars: int,
        window: int,
        memo_size: int,
        memo_chars: int = ...,
    ) -> None: ...
    @property
    def memo_entries(self) -> int: ...
    @property
    def memo_key_chars(self) -> int: ...
    @property
    def searches(self) -> int: ...
    @property
    def scratch_bytes(self) -> int: ...
    def search(self, query: str, measure: str, alpha: float) -> list[tuple[int, float]]: ...
    def scan(
        self,
        text: str,
        norms: list[str],
        starts: list[int],
        ends: list[int],
        covered: list[bool],
        measure: str,
        alpha: float,
    ) -> list[tuple[int, int, int, str, float]]: ...

def set_simd(on: bool) -> bool: ...
