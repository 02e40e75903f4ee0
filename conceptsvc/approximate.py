"""Approximate matching with QuickUMLS's semantics: character-trigram similarity ≥ threshold.

QuickUMLS (via simstring) compares every caption n-gram of up to ``window`` tokens with every
dictionary string by the similarity of their character-trigram sets (jaccard, cosine, dice or
overlap) and keeps those at or above a threshold. This module does the same over the index's
normalised keys, with two differences that are deliberate:

* it runs only on windows that no exact match touches — exact matches are cheaper and always
  right about their own span, so searching around them again only adds false positives;
* the strings compared are normalised keys on both sides (the same normaliser that built the
  index), so case, hyphenation, plurals and British spellings never cost similarity.

The candidate search is simstring's: for a query with trigram set X and threshold α, a key
with trigram set Y can only reach α if |Y| lies in a measure-specific size range and
|X ∩ Y| ≥ τ(|X|, |Y|). Any key with at least τ_min shared trigrams must appear in one of the
(|X| − τ_min + 1) *rarest* trigram lists of X (pigeonhole), so only those lists are scanned and
each candidate is then verified exactly. The inverted lists are part of the index
(:mod:`conceptsvc.trigram_index`, written by ``conceptsvc index build`` and memory-mapped), so no
request — not even the first — builds anything that grows with the dictionary; window results
are memoised, because short windows ("showing", "mass") recur in almost every caption.

This module is the reference. Every engine but ``"reference"`` runs the same windows and search
compiled (``conceptsvc/_approx.pyx``, :data:`APPROX`) over the same arrays; bounds come from
:func:`search_bounds` here in both, and ``tests/test_speedups.py`` holds them to the same keys,
scores and order.

Trigrams are taken without begin/end padding, as QuickUMLS configures simstring; a string shorter
than three characters is its own single gram.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from conceptsvc.errors import ExtractionError
from conceptsvc.index import Posting, build_hash_table
from conceptsvc.matcher import (
    MIN_MATCH_CHARS,
    ExactMatcher,
    KeyEntry,
    Match,
    check_surface,
    crosses_break,
)
from conceptsvc.model import SIMILARITIES
from conceptsvc.normalize import SPEEDUPS, STOPWORDS
from conceptsvc.trigram_index import CLASS_SIZE, TrigramArrays, build_arrays

APPROX: Any = None
"""The compiled approximate search (``conceptsvc/_approx.pyx``), or None: it is switched off
with the rest of the compiled engine (``CONCEPTSVC_PURE_PYTHON=1``) or was not built."""
if SPEEDUPS is not None:
    try:
        from conceptsvc import _approx as APPROX
    except ImportError:  # pragma: no cover - the project's install always builds it
        APPROX = None

__all__ = [
    "APPROX",
    "DEFAULT_WINDOW",
    "MEMO_CHARS",
    "SIZE_CAP",
    "ApproximateMatcher",
    "TrigramIndex",
    "search_bounds",
    "similarity",
    "size_bounds",
    "trigrams",
]

DEFAULT_WINDOW = 5
"""Longest window in tokens, as QuickUMLS's default ``window``."""

SIZE_CAP = 1 << 30
"""Upper size bound meaning "no bound": far more trigrams than any dictionary string has."""
_EXTRA_LISTS = 5  # lists counted beyond the pigeonhole minimum (see TrigramIndex.search)
MEMO_CHARS = 1 << 22
"""Characters of the windows an :class:`ApproximateMatcher` memoises, at most (besides its
``memo_size`` windows): windows of long tokens fill a memo by characters, not by count."""
_MEMO_GRAM_CHARS = 128  # longest string whose trigram set trigrams() memoises


def trigrams(s: str) -> frozenset[str]:
    """Character trigrams of ``s`` (no padding); short strings are a single gram. Memoised for
    strings of up to 128 characters: a longer one's set is kilobytes, and rare."""
    if len(s) > _MEMO_GRAM_CHARS:
        return _trigrams(s)
    return _trigrams_memo(s)


def _trigrams(s: str) -> frozenset[str]:
    if len(s) < 3:
        return frozenset((s,)) if s else frozenset()
    return frozenset(s[i : i + 3] for i in range(len(s) - 2))


_trigrams_memo = lru_cache(maxsize=1 << 17)(_trigrams)


def similarity(measure: str, overlap: int, x: int, y: int) -> float:
    """Similarity of two sets of sizes ``x`` and ``y`` that share ``overlap`` elements."""
    if x == 0 or y == 0:
        return 0.0
    if measure == "jaccard":
        return overlap / (x + y - overlap)
    if measure == "cosine":
        return overlap / math.sqrt(x * y)
    if measure == "dice":
        return 2 * overlap / (x + y)
    if measure == "overlap":
        return overlap / min(x, y)
    raise ExtractionError(f"unknown similarity {measure!r}; use one of {', '.join(SIMILARITIES)}")


def size_bounds(measure: str, x: int, alpha: float) -> tuple[int, int]:
    """Smallest and largest key trigram-set size that can reach ``alpha`` against size ``x``.

    Every ``alpha`` in (0, 1] is served, subnormals included: an upper bound past
    :data:`SIZE_CAP` (or past the float range — ``x / 1e-310`` is infinite) is no bound at all
    and comes back as ``SIZE_CAP``, and cosine divides by ``alpha`` twice because ``alpha²``
    underflows to 0 below about 1e-162. A lower bound that underflows to 0 only widens the range.
    """
    if measure == "jaccard":
        return _ceil(alpha * x), _floor_capped(x / alpha)
    if measure == "cosine":
        return _ceil(alpha * alpha * x), _floor_capped(x / alpha / alpha)
    if measure == "dice":
        return _ceil(alpha * x / (2 - alpha)), _floor_capped((2 - alpha) * x / alpha)
    if measure == "overlap":
        return 1, SIZE_CAP
    raise ExtractionError(f"unknown similarity {measure!r}; use one of {', '.join(SIMILARITIES)}")


def _ceil(v: float) -> int:
    return math.ceil(v - 1e-9)


def _floor_capped(v: float) -> int:
    # ``not v < cap`` also catches inf; the 1e-9 absorbs rounding of x / alpha for
    # thresholds like 0.7 whose quotient should be a whole number
    return math.floor(v + 1e-9) if v < SIZE_CAP else SIZE_CAP


def _min_overlap(measure: str, alpha: float) -> Callable[[int, int], int]:
    """τ(x, y): shared grams needed for sizes x and y to reach ``alpha``."""
    if measure == "jaccard":
        return lambda x, y: math.ceil(alpha * (x + y) / (1 + alpha) - 1e-9)
    if measure == "cosine":
        return lambda x, y: math.ceil(alpha * math.sqrt(x * y) - 1e-9)
    if measure == "dice":
        return lambda x, y: math.ceil(alpha * (x + y) / 2 - 1e-9)
    return lambda x, y: math.ceil(alpha * min(x, y) - 1e-9)


def search_bounds(measure: str, alpha: float, x: int) -> tuple[int, int, int]:
    """(lo, hi, τ_min) for a query of ``x`` trigrams: the key sizes that can reach ``alpha``
    (:func:`size_bounds`) and the fewest shared trigrams any of them needs. Both engines take
    their bounds from here (the compiled one caches them per measure, threshold and size)."""
    lo, hi = size_bounds(measure, x, alpha)
    if measure == "overlap":
        return lo, hi, 1
    tau = _min_overlap(measure, alpha)
    return lo, hi, max(min(tau(x, max(lo, 1)), tau(x, x)), 1)


class TrigramIndex:
    """The reference search over an index's trigram lists (:mod:`conceptsvc.trigram_index`).

    The lists are the index's memory-mapped arrays, so this engine builds nothing either; it
    reads each list's size directory and postings through Python and checks candidates with
    set intersections — slow, and meant to be: it is the definition the compiled search
    (``conceptsvc/_approx.pyx``) is held to.
    """

    def __init__(self, arrays: TrigramArrays, string: Callable[[int], str]) -> None:
        self.arrays = arrays
        self._string = string
        self._sizes = memoryview(arrays.key_counts)  # type: ignore[arg-type]

    @classmethod
    def from_strings(
        cls, strings: Sequence[str], *, class_size: int = CLASS_SIZE
    ) -> TrigramIndex:
        """Lists built in memory over ``strings`` (tests and ad-hoc use; an index has them);
        ``class_size``: :func:`~conceptsvc.trigram_index.build_arrays`'s."""
        strings = list(strings)
        return cls(build_arrays(strings, build_hash_table, class_size=class_size),
                   strings.__getitem__)

    def __len__(self) -> int:
        return len(self._sizes)

    def string(self, i: int) -> str:
        return self._string(i)

    def _slice(self, g: str, lo: int, hi: int) -> list[int]:
        t = self.arrays.gram_id(g)
        if t < 0:
            return []
        sizes, starts, end = self.arrays.size_runs(t)
        a = bisect_left(sizes, lo)
        b = bisect_right(sizes, hi, a)
        out: list[int] = []
        for r in range(a, b):  # each run holds its size's local key numbers
            out += self.arrays.run_keys(sizes[r], starts[r],
                                        starts[r + 1] if r + 1 < len(starts) else end)
        return out

    def search(self, query: str, measure: str, alpha: float) -> list[tuple[int, float]]:
        """Every string whose similarity with ``query`` is ≥ ``alpha``, best first."""
        x_grams = _grams_of(query)
        x = len(x_grams)
        if x == 0:
            return []
        lo, hi, tau_min = search_bounds(measure, alpha, x)
        n_sig = x - tau_min + 1
        if n_sig <= 0:
            return []
        slices = sorted((self._slice(g, lo, hi) for g in x_grams), key=len)
        # Generalised pigeonhole: a key sharing ≥ τ_min grams with the query appears in at
        # least m − (x − τ_min) of any m of the query's lists. Counting over a few lists more
        # than the n_sig minimum (C-level Counter) discards most candidates before the exact
        # check; with m = x the count *is* the overlap.
        m = min(x, n_sig + _EXTRA_LISTS)
        need = m - (x - tau_min)
        counts: Counter[int] = Counter()
        for lst in slices[:m]:
            if lst:
                counts.update(lst)
        sizes = self._sizes
        floor = alpha - 1e-12
        exact_counts = m == x
        out: list[tuple[int, float]] = []
        for i, c in counts.items():
            if c < need:
                continue
            y = sizes[i]
            shared = c if exact_counts else len(x_grams & _grams_of(self._string(i)))
            if measure == "jaccard":
                sim = shared / (x + y - shared)
            else:
                sim = similarity(measure, shared, x, y)
            if sim >= floor:
                out.append((i, sim))
        if len(out) > 1:
            out.sort(key=lambda t: (-t[1], -sizes[t[0]], t[0]))
        return out


def _grams_of(key: str) -> frozenset[str]:
    return trigrams(key)


class ApproximateMatcher:
    """Window generation and memoised trigram search over one loaded index.

    Windows follow QuickUMLS: up to ``window`` tokens, never starting or ending with a
    stopword, at least :data:`~conceptsvc.matcher.MIN_MATCH_CHARS` characters, never across
    phrase-ending punctuation — and, here, never touching a token an exact match already covers.
    Each window keeps its best-scoring key(s); overlaps between windows are resolved later, by
    the request's overlap strategy.

    ``compiled`` runs the windows and the search in ``conceptsvc/_approx.pyx``
    (:data:`APPROX`) over the same mapped lists; False runs this module's reference. Both find
    the same keys with the same scores (``tests/test_speedups.py``).
    """

    def __init__(
        self,
        exact: ExactMatcher,
        *,
        window: int = DEFAULT_WINDOW,
        memo_size: int = 1 << 16,
        memo_chars: int = MEMO_CHARS,
        compiled: bool = False,
    ) -> None:
        self._exact = exact
        index = exact.index
        # key numbers are positions in the sorted key list, which is the mapping's order
        self._tri = TrigramIndex(index.trigrams, index.key)
        self._window = window
        self._memo: dict[tuple[str, str, float], tuple[tuple[str, float], ...]] = {}
        self._memo_size = memo_size
        self._memo_chars = memo_chars
        self._memo_key_chars = 0
        self._fast: Any = None
        if compiled:
            if APPROX is None:
                raise ExtractionError(
                    "the compiled approximate matcher cannot run: conceptsvc._approx is not "
                    "built (run `make install` or `pip install .`)"
                )
            self._fast = APPROX.TrigramSearcher(
                index.trigrams,
                index.key,
                search_bounds,
                stopwords=frozenset(STOPWORDS),
                break_chars=frozenset(ExactMatcher.break_chars),
                min_chars=MIN_MATCH_CHARS,
                window=window,
                memo_size=memo_size,
                memo_chars=memo_chars,
            )

    @property
    def compiled(self) -> bool:
        """Whether the compiled search runs."""
        return self._fast is not None

    def search(self, query: str, measure: str, alpha: float) -> list[tuple[str, float]]:
        """Every key at similarity ≥ ``alpha`` with ``query``, best first (not memoised)."""
        found = (self._fast or self._tri).search(query, measure, alpha)
        key = self._exact.index.key
        return [(key(i), sim) for i, sim in found]

    def best(self, query: str, measure: str, alpha: float) -> tuple[tuple[str, float], ...]:
        """The key(s) most similar to ``query`` at ≥ ``alpha`` (ties all kept), memoised."""
        mk = (query, measure, alpha)
        hit = self._memo.get(mk)
        if hit is not None:
            return hit
        found = self._tri.search(query, measure, alpha)
        res: tuple[tuple[str, float], ...] = ()
        if found:
            top = found[0][1]
            res = tuple((self._tri.string(i), sim) for i, sim in found if sim >= top - 1e-12)
        if len(self._memo) >= self._memo_size or (
            self._memo and self._memo_key_chars + len(query) > self._memo_chars
        ):
            self._memo.clear()  # a crude bound; the working set refills in a few captions
            self._memo_key_chars = 0
        self._memo[mk] = res
        self._memo_key_chars += len(query)
        return res

    def match(
        self,
        text: str,
        norms: list[str],
        starts: list[int],
        ends: list[int],
        covered: list[bool],
        measure: str,
        alpha: float,
    ) -> list[Match]:
        out: list[Match] = []
        exact = self._exact
        if self._fast is not None:
            for i, j, kid, k, sim in self._fast.scan(
                text, norms, starts, ends, covered, measure, alpha
            ):
                self._add(out, text, starts, ends, i, j, k, exact.entry_by_id(kid), sim)
            return out
        n = len(norms)
        window = self._window
        for i in range(n):
            if covered[i] or norms[i] in STOPWORDS:
                continue
            key = norms[i]
            for j in range(i + 1, min(n, i + window) + 1):
                if j > i + 1:
                    if covered[j - 1] or crosses_break(text, ends[j - 2], starts[j - 1]):
                        break
                    key = key + " " + norms[j - 1]
                if norms[j - 1] in STOPWORDS or len(key) - (j - i - 1) < MIN_MATCH_CHARS:
                    continue
                for k, sim in self.best(key, measure, alpha):
                    entry = exact.entry(k)
                    if entry is not None:
                        self._add(out, text, starts, ends, i, j, k, entry, sim)
        return out

    @staticmethod
    def _add(
        out: list[Match],
        text: str,
        starts: list[int],
        ends: list[int],
        i: int,
        j: int,
        k: str,
        entry: KeyEntry,
        sim: float,
    ) -> None:
        posts: tuple[Posting, ...] = entry.free
        if entry.checked:
            posts += check_surface(entry.checked, text[starts[i] : ends[j - 1]])
            if posts:
                out.append(Match(i, j, k, posts, sim))
        elif posts:
            out.append(Match(i, j, k, posts, sim, True))
