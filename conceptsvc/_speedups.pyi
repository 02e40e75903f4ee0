"""Types of the compiled hot path (``_speedups.pyx``) as the Python modules call it.

Every constructor takes the owning Python module's rules or objects (see the pyx docstring);
nothing here has rules of its own.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from conceptsvc.abbreviations import Definition
from conceptsvc.approximate import ApproximateMatcher
from conceptsvc.index import ConceptIndex, Posting
from conceptsvc.matcher import ExactMatcher, Match
from conceptsvc.model import Annotation
from conceptsvc.negation import NegationDetector
from conceptsvc.profile import Profile

FAST_MEMO_MAX: int

class AsciiNormalizer:
    def __init__(
        self,
        reference: Callable[[str], str],
        *,
        british_words: dict[str, str],
        british_stem_markers: Iterable[str],
        irregular_plurals: dict[str, str],
        not_plural: frozenset[str],
        never_singular_len: int,
        plural_suffixes: Iterable[tuple[tuple[str, ...], int, int, str, bool]],
        acronym_min_letters: int,
    ) -> None: ...
    def __call__(self, raw: str) -> str: ...
    def normalize(self, raw: str) -> str: ...

class SpanTokenizer:
    def __init__(
        self,
        normalize_token: Callable[[str], str],
        *,
        marks: Iterable[tuple[int, int]],
        apostrophes: Iterable[str],
        max_cache: int = ...,
    ) -> None: ...
    def __call__(self, text: str) -> tuple[list[str], list[int], list[int]]: ...
    def spans(self, text: str) -> tuple[list[str], list[int], list[int]]: ...

class DefinitionFinder:
    def __init__(
        self,
        definition_type: type[Definition],
        *,
        max_definitions: int,
        min_short_len: int,
        max_short_len: int,
        max_short_words: int,
        look_back: int,
        clause_breaks: Iterable[str],
        inner_cuts: Iterable[str],
        long_form_extra_words: int,
        long_form_words_per_char: int,
        whitespace: Iterable[str],
    ) -> None: ...
    def __call__(self, text: str) -> list[Definition]: ...

class NegationScanner:
    forward_bit: int
    backward_bit: int
    categories: int
    def __init__(self, detector: NegationDetector) -> None: ...
    def negated_tokens(
        self, text: str, norms: list[str], starts: list[int], ends: list[int]
    ) -> list[int] | None: ...

class _Vocab:
    """Token → number for the tries of one extractor (the index's tokens first)."""

    def __init__(
        self,
        lookup: Mapping[str, int] | None = ...,
        base: dict[str, int] | None = ...,
        n_base: int = ...,
    ) -> None: ...

class ProfileRunner:
    def __init__(self, profile: Profile, vocab: _Vocab | None = ...) -> None: ...
    def apply(
        self, mentioned: list[str], text: str, norms: list[str], starts: list[int], ends: list[int]
    ) -> tuple[set[str], tuple[str, ...]]: ...

class FilterPlan: ...

class PostingFilter:
    def __init__(
        self,
        index: ConceptIndex,
        *,
        posting_checks: Callable[[str], tuple[int, ...]],
        surface_check: Callable[[int, str, str], bool],
        max_candidates: int,
        flag_preferred: int,
        flag_case_sensitive: int,
        flag_abbreviation: int,
        posting_type: type[Posting],
        concept_memo: dict[str, tuple[str, tuple[str, ...]]],
        concept_memo_size: int,
    ) -> None: ...
    def plan(
        self,
        tuis: frozenset[str] | None,
        sabs: frozenset[str] | None,
        excluded: frozenset[str],
        profile: Profile,
    ) -> FilterPlan: ...
    def concept_strings(self, cui: str) -> list[str]: ...

class Disambiguator:
    def __init__(
        self,
        rankings: Any,
        concept_info: Callable[[str], tuple[str, tuple[str, ...]]],
        stopwords: Iterable[str],
    ) -> None: ...
    def __call__(self, plan: Any, norms: list[str], cands: list[Any]) -> list[Any]: ...

class FastPath:
    def __init__(
        self,
        matcher: ExactMatcher,
        *,
        tokenizer: SpanTokenizer,
        negation: NegationScanner,
        definitions: DefinitionFinder,
        profiles: Sequence[Profile],
        postings: PostingFilter,
        # the extractor's own steps; ``Any`` is its private plan and candidate types
        filter_postings: Callable[[Any, Sequence[Posting]], tuple[tuple[str, Posting], ...]],
        filter_matches: Callable[[Any, list[Match]], list[Any]],
        disambiguate: Callable[[Any, list[str], list[Any]], list[Any]],
        approximate: Callable[[], ApproximateMatcher],
        concept_info: Callable[[str], tuple[str, tuple[str, ...]]],
        concept_memo: dict[str, tuple[str, tuple[str, ...]]],
        mention_type: type[Any],
        annotation_type: type[Annotation],
        context_exempt: Callable[[str], bool],
    ) -> None: ...
    def extract(self, text: str, plan: Any, id: Any = ...) -> Annotation: ...
    def extract_rows(
        self, text: str, plan: Any
    ) -> tuple[tuple[tuple[Any, ...], ...], tuple[str, ...]]: ...
