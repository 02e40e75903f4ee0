from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conceptsvc.approximate import (
    ApproximateMatcher,
    TrigramIndex,
    similarity,
    size_bounds,
    trigrams,
)
from conceptsvc.errors import ExtractionError
from conceptsvc.index import ConceptIndex
from conceptsvc.matcher import ExactMatcher
from conceptsvc.model import SIMILARITIES
from conceptsvc.normalize import tokenize_spans


def test_approximate_trigrams_without_padding() -> None:
    assert trigrams("lung") == {"lun", "ung"}
    assert trigrams("ct") == {"ct"}
    assert trigrams("") == frozenset()


def test_approximate_similarity_formulas() -> None:
    # |X| = 4, |Y| = 6, overlap 3
    assert similarity("jaccard", 3, 4, 6) == pytest.approx(3 / 7)
    assert similarity("cosine", 3, 4, 6) == pytest.approx(3 / (24**0.5))
    assert similarity("dice", 3, 4, 6) == pytest.approx(6 / 10)
    assert similarity("overlap", 3, 4, 6) == pytest.approx(3 / 4)
    with pytest.raises(ExtractionError):
        similarity("levenshtein", 1, 1, 1)


@settings(max_examples=300)
@given(
    st.sampled_from(SIMILARITIES),
    st.integers(1, 40),
    st.integers(1, 40),
    st.floats(0.05, 1.0),
    st.data(),
)
def test_approximate_size_bounds_never_exclude_a_match(
    measure: str, x: int, y: int, alpha: float, data: st.DataObject
) -> None:
    overlap = data.draw(st.integers(0, min(x, y)))
    if similarity(measure, overlap, x, y) >= alpha:
        lo, hi = size_bounds(measure, x, alpha)
        assert lo <= y <= hi


WORDS = st.text(alphabet="abcdeflmnortu ", min_size=1, max_size=14)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(WORDS, min_size=1, max_size=25, unique=True),
    WORDS,
    st.sampled_from(SIMILARITIES),
    st.sampled_from([0.5, 0.7, 0.9, 1.0]),
)
def test_approximate_search_equals_brute_force(
    strings: list[str], query: str, measure: str, alpha: float
) -> None:
    tri = TrigramIndex(strings)
    got = {(tri.string(i), round(sim, 9)) for i, sim in tri.search(query, measure, alpha)}
    q = trigrams(query)
    expected = set()
    for s in strings:
        y = trigrams(s)
        if q and y:
            sim = similarity(measure, len(q & y), len(q), len(y))
            if sim >= alpha - 1e-12:
                expected.add((s, round(sim, 9)))
    assert got == expected


@pytest.fixture(scope="module")
def approx(engine_index_path: Path) -> ApproximateMatcher:
    return ApproximateMatcher(ExactMatcher(ConceptIndex.load(engine_index_path)))


def run(am: ApproximateMatcher, text: str, covered_words: set[str] = frozenset(),
        alpha: float = 0.6) -> list[tuple[str, str, float]]:
    norms, starts, ends = tokenize_spans(text)
    covered = [text[s:e] in covered_words for s, e in zip(starts, ends, strict=True)]
    out = []
    for m in am.match(text, norms, starts, ends, covered, "jaccard", alpha):
        out.append((text[starts[m.start_tok] : ends[m.end_tok - 1]], m.key, round(m.score, 3)))
    return out


def test_approximate_matches_misspellings(approx: ApproximateMatcher) -> None:
    found = run(approx, "left pleural efusion")
    # 12 shared trigrams of 13 and 14: jaccard 12 / (13 + 14 - 12) = 0.8
    assert ("pleural efusion", "pleural effusion", 0.8) in found


def test_approximate_skips_covered_tokens_and_stopwords(approx: ApproximateMatcher) -> None:
    assert run(approx, "pleural efusion", covered_words={"pleural"}) == []
    # windows never start or end with a stopword
    assert all(not w[0].startswith("the ") for w in run(approx, "the pleural efusion"))


def test_approximate_best_is_memoised(approx: ApproximateMatcher) -> None:
    a = approx.best("pleural efusion", "jaccard", 0.6)
    assert a is approx.best("pleural efusion", "jaccard", 0.6)
    assert a[0][0] == "pleural effusion"


# Every threshold the (0, 1] validation lets through, subnormals included (issue 18: 1e-310
# overflowed x / alpha, and cosine's alpha² underflowed to 0 below about 1e-162).
THRESHOLDS = st.floats(min_value=0, max_value=1, exclude_min=True, allow_subnormal=True)
TINY = (5e-324, 1e-310, 2.2250738585072014e-308, 1e-200, 1e-162, 1e-9)


@settings(max_examples=300)
@given(st.sampled_from(SIMILARITIES), st.integers(1, 60), st.integers(1, 60), THRESHOLDS,
       st.data())
def test_issue_18_size_bounds_hold_for_every_threshold(
    measure: str, x: int, y: int, alpha: float, data: st.DataObject
) -> None:
    lo, hi = size_bounds(measure, x, alpha)
    assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi
    overlap = data.draw(st.integers(0, min(x, y)))
    if similarity(measure, overlap, x, y) >= alpha:
        assert lo <= y <= hi


@pytest.mark.parametrize("alpha", TINY)
@pytest.mark.parametrize("measure", SIMILARITIES)
def test_issue_18_tiny_thresholds_have_no_size_bound(measure: str, alpha: float) -> None:
    lo, hi = size_bounds(measure, 13, alpha)
    assert lo <= 1 and hi >= 1 << 20


@pytest.fixture(scope="module")
def keys(engine_index_path: Path) -> list[str]:
    return sorted(ConceptIndex.load(engine_index_path).keys())


def _brute_force(keys: list[str], query: str, measure: str, alpha: float) -> set[tuple[str, float]]:
    """The definition: every key whose trigram similarity with ``query`` is ≥ ``alpha``."""
    q = trigrams(query)
    out = set()
    for k in keys:
        y = trigrams(k)
        sim = similarity(measure, len(q & y), len(q), len(y)) if q and y else 0.0
        # sim > 0: ≥ alpha > 0 implies it; the 1e-12 (the search's own rounding allowance)
        # would otherwise admit every key at thresholds below 1e-12
        if sim > 0 and sim >= alpha - 1e-12:
            out.add((k, round(sim, 9)))
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.data(),
    st.sampled_from(SIMILARITIES),
    st.one_of(THRESHOLDS, st.sampled_from(TINY)),
)
def test_issue_18_search_at_any_threshold_equals_brute_force(
    approx: ApproximateMatcher, keys: list[str], data: st.DataObject, measure: str, alpha: float
) -> None:
    # a dictionary key with a few characters dropped, doubled or replaced, or random letters
    base = data.draw(st.sampled_from(keys))
    edits = data.draw(st.lists(st.tuples(st.integers(0, 40), st.sampled_from("aeflnrstu ")),
                               max_size=4))
    query = base
    for pos, c in edits:
        p = pos % (len(query) + 1)
        query = query[:p] + c + query[p + 1 :] if pos % 2 else query[:p] + c + query[p:]
    got = {(k, round(sim, 9)) for k, sim in approx.search(query, measure, alpha)}
    assert got == _brute_force(keys, query, measure, alpha)
