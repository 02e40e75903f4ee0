"""Exact candidate matching: every dictionary key that occurs as a run of caption tokens.

The matcher answers one question per caption — which token windows ``[i, j)`` spell a
normalised dictionary key — and nothing else: filters, ambiguity, overlaps, negation and
profiles are later stages (``extractor.py``). It reports *all* matching windows, nested and
overlapping ones included, because which one wins depends on per-request options (a type filter
can remove "lung cancer" and leave "lung").

Speed is the point of its shape. A caption is normalised once into parallel lists (no per-token
objects); for each token one dict probe of ``index.first_token_max`` says whether any key starts
there and how long the longest one is; only then are n-gram keys built incrementally and probed in
``index.key_ids``. What a key's postings mean (case rules, stopword rules, minimum length) is
worked out once per key and memoised, so a key seen in a previous caption costs one dict hit.

Acceptance rules, applied per posting:

* a window made only of stopwords ("in", "no", "all") is rejected, unless the posting is
  case-sensitive and the caption writes it in the same case (an acronym spelt like a word);
* the minimum match length is three characters of normalised key; shorter keys are kept only
  where the dictionary marks them as abbreviations (or writes them in capitals) *and* the caption
  writes them in capitals — so "CT", "MR", "US" match, "us", "Ct" and single letters (panel labels
  "(A)") do not;
* no window spans phrase-ending punctuation (``, ; : . ( )`` ...), see :func:`crosses_break` —
  unless the dictionary string itself has that punctuation between the same two words
  ("ABDOMEN:  Soft", "chest tightness, pressure"): such a window keeps only the postings whose
  string does (:meth:`ExactMatcher.crossed_postings`);
* a ``FLAG_CASE_SENSITIVE`` posting matches only when the caption's surface has the same letter
  case as the dictionary string ("US" the modality, not "us" the pronoun).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import ClassVar, NamedTuple

from conceptsvc.index import (
    FLAG_ABBREVIATION,
    FLAG_CASE_SENSITIVE,
    ConceptIndex,
    KeyTrie,
    Posting,
)
from conceptsvc.normalize import STOPWORDS, tokenize_spans_py

__all__ = [
    "BREAK_CHARS",
    "MIN_MATCH_CHARS",
    "ExactMatcher",
    "KeyEntry",
    "Match",
    "check_surface",
    "crosses_break",
    "posting_checks",
    "same_case",
    "surface_check",
]

MIN_MATCH_CHARS = 3
"""Keys shorter than this (in normalised characters, spaces excluded) need abbreviation
evidence on both sides; see the module docstring."""

BREAK_CHARS = frozenset(",;:.!?()[]{}")
"""Punctuation that ends a phrase: no match (exact or approximate) spans it. Hyphens, slashes
and apostrophes do not break ("T2-weighted", "PET/CT"); commas do, so that a list ("liver,
spleen") is never read as one term. Dictionary strings with commas ("Fracture, femur") are
inverted forms that captions do not use. The compiled engine reads this set
(:attr:`ExactMatcher.break_chars`)."""


def crosses_break(text: str, left_end: int, right_start: int) -> bool:
    """True when the gap between two tokens holds phrase-ending punctuation."""
    if right_start - left_end == 1 and text[left_end] == " ":
        return False
    return not BREAK_CHARS.isdisjoint(text[left_end:right_start])


# How a posting is checked against the caption surface (see KeyEntry.checked).
_CHECK_CASE = 1  # surface must have the dictionary string's case
_CHECK_UPPER = 2  # surface must be written in capitals (short abbreviations)


class Match(NamedTuple):
    """One window of tokens ``[start_tok, end_tok)`` that spells dictionary ``key``."""

    start_tok: int
    end_tok: int
    key: str
    postings: tuple[Posting, ...]
    score: float = 1.0
    # True when ``postings`` is the key's case-independent set: whatever depends only on the
    # postings (filtering per request) can then be memoised per key.
    stable: bool = False


class KeyEntry(NamedTuple):
    """Everything the matcher needs about one key, resolved once.

    ``free`` postings match whatever the caption's case; ``checked`` ones carry a check code.
    A key with neither is rejected outright (stopword-only, single letter, ...).
    """

    free: tuple[Posting, ...]
    checked: tuple[tuple[Posting, int], ...]


def same_case(surface: str, string: str) -> bool:
    """True when ``surface`` (caption text) is written in the same case as ``string``.

    Both sides are compared in NFKC form (compatibility characters such as full-width
    letters are the letters they stand for). Letters are compared position by position when
    both have the same alphanumerics (after dropping the plural "s" of an acronym, "CTs");
    otherwise (a British spelling) only the all-capitals property has to agree.
    """
    if not surface.isascii():
        surface = unicodedata.normalize("NFKC", surface)  # full-width "ＣＴ" is written "CT"
    if not string.isascii():
        string = unicodedata.normalize("NFKC", string)
    a = [c for c in surface if c.isalnum()]
    b = [c for c in string if c.isalnum()]
    if len(a) == len(b) + 1 and a[-1] == "s":
        a.pop()  # an acronym's plural: "CTs" is written like "CT"
    if len(a) == len(b):
        return a == b
    return surface.isupper() == string.isupper()


# tuple.__new__ builds a NamedTuple without running its Python-level __new__ (a measurable
# share of the matcher's time, one Match per accepted window).
_new = tuple.__new__


_CHECK_FREE = 0  # matches whatever the caption's case
_CHECK_REJECT = -1  # never matches (see posting_checks)
# A posting's kind for posting_checks: its case-sensitive and abbreviation flags, and whether
# its string is written in capitals.
_KIND_CASE_SENSITIVE = 1
_KIND_ABBREVIATION = 2
_KIND_UPPER = 4


def posting_checks(key: str) -> tuple[int, ...]:
    """How the postings of ``key`` are checked against the caption surface, by posting kind:
    entry ``kind`` (1 if the posting is case-sensitive, + 2 if it is an abbreviation, + 4 if its
    string is written in capitals) is 0 (free: any case), -1 (rejected: stopword-only or
    single-letter keys, short keys without abbreviation evidence) or the check code that
    :func:`surface_check` applies. The rules of the module docstring, per key; the compiled
    engine reads a key's postings by their flags against this table."""
    tokens = key.split(" ")
    stop_only = all(t in STOPWORDS for t in tokens)
    n_chars = len(key) - (len(tokens) - 1)
    out = []
    for kind in range(8):
        case_sensitive = bool(kind & _KIND_CASE_SENSITIVE)
        how = _CHECK_REJECT
        if stop_only or n_chars < MIN_MATCH_CHARS:
            if n_chars < 2:
                pass  # single letters are panel labels, never concepts
            elif case_sensitive:
                how = _CHECK_CASE
            elif not stop_only and kind & (_KIND_ABBREVIATION | _KIND_UPPER):
                how = _CHECK_UPPER
        elif case_sensitive:
            how = _CHECK_CASE
        else:
            how = _CHECK_FREE
        out.append(how)
    return tuple(out)


def _key_entry(key: str, postings: tuple[Posting, ...]) -> KeyEntry:
    checks = posting_checks(key)
    free: list[Posting] = []
    checked: list[tuple[Posting, int]] = []
    for p in postings:
        kind = (_KIND_CASE_SENSITIVE if p.flags & FLAG_CASE_SENSITIVE else 0) | (
            _KIND_ABBREVIATION if p.flags & FLAG_ABBREVIATION else 0)
        if checks[kind] != checks[kind | _KIND_UPPER] and p.string.isupper():
            kind |= _KIND_UPPER
        how = checks[kind]
        if how == _CHECK_FREE:
            free.append(p)
        elif how != _CHECK_REJECT:
            checked.append((p, how))
    return KeyEntry(tuple(free), tuple(checked))


class ExactMatcher:
    """All dictionary keys in a caption's token sequence; one instance per loaded index.

    The compiled engine (``conceptsvc/_speedups.pyx``) runs :meth:`match` itself and reads
    what it needs through the public accessors below (:attr:`key_trie`,
    :meth:`crossed_postings`, :attr:`break_chars`) and the module's rules
    (:func:`posting_checks`, :func:`surface_check`): it reads a key's postings from the
    index's arrays by their flags, without a :class:`KeyEntry`.
    """

    break_chars: ClassVar[frozenset[str]] = BREAK_CHARS
    """Punctuation no window spans (:data:`BREAK_CHARS`)."""

    def __init__(self, index: ConceptIndex) -> None:
        self.index = index
        self._key_ids: Mapping[str, int] = index.key_ids
        self._first_max: Mapping[str, int] = index.first_token_max
        self._entries: dict[int, KeyEntry] = {}
        # key id → its postings with the break punctuation of their strings (crossed_postings)
        self._punctuated: dict[int, tuple[tuple[Posting, tuple[frozenset[str], ...]], ...]] = {}
        # Token-prefix table: every token-prefix of every key → its key id, or -1 when the
        # prefix is not itself a key. One probe per token says both "is this a key" and "can a
        # longer key continue here", so extension stops at the first dead end instead of
        # probing up to first_token_max n-grams. A dict built at load (≈ 0.1 s per 100 k
        # keys), so only for the small indexes whose lookups are dicts anyway
        # (``index.materialized``); larger ones probe first_token_max and the mapped key table
        # here, and the compiled engine reads the index's own token trie at any size.
        self._prefixes: dict[str, int] | None = None
        if index.materialized:
            table: dict[str, int] = {}
            for key, kid in self._key_ids.items():
                table[key] = kid
                cut = key.rfind(" ")
                while cut > 0:
                    prefix = key[:cut]
                    if prefix in table:
                        break  # its own prefixes are already in
                    table[prefix] = -1
                    cut = key.rfind(" ", 0, cut)
            self._prefixes = table

    @property
    def prefixes(self) -> Mapping[str, int] | None:
        """The token-prefix table: every key and every token-prefix of one (space-joined
        normalised tokens) → the key's id, or -1 for a prefix that is not itself a key; None
        for an index too large to build it at load (``index.materialized`` is False)."""
        return self._prefixes

    @property
    def key_trie(self) -> KeyTrie:
        """The index's token trie (memory-mapped, built by the index build), which the
        compiled engine matches over."""
        return self.index.key_trie

    @property
    def entries(self) -> dict[int, KeyEntry]:
        """The memo of resolved keys, key id → :class:`KeyEntry`; it only ever gains entries,
        and a caller that probes it directly fills it through :meth:`entry_by_id` on a
        miss."""
        return self._entries

    def entry_by_id(self, kid: int) -> KeyEntry:
        """The memoised entry of the key with id ``kid`` (resolved on first use)."""
        e = self._entries.get(kid)
        if e is None:
            e = self._entry(kid, self.index.key(kid))
        return e

    def entry(self, key: str) -> KeyEntry | None:
        """The memoised entry of a normalised key, or None when the key is not in the index."""
        kid = self._key_ids.get(key)
        if kid is None:
            return None
        return self._entry(kid, key)

    def _entry(self, kid: int, key: str) -> KeyEntry:
        e = self._entries.get(kid)
        if e is None:
            e = self._entries[kid] = _key_entry(key, self.index.postings_of(kid))
        return e

    def match(self, text: str, norms: list[str], starts: list[int], ends: list[int]) -> list[Match]:
        """Every accepted window, in order of start token then length."""
        if self._prefixes is not None:
            return self._match_prefixes(self._prefixes, text, norms, starts, ends)
        out: list[Match] = []
        first_max = self._first_max
        key_ids = self._key_ids
        entries = self._entries
        n = len(norms)
        for i in range(n):
            m = first_max.get(norms[i])
            if m is None:
                continue
            lim = i + m if i + m < n else n
            key = norms[i]
            j = i + 1
            crossed = False
            while True:
                kid = key_ids.get(key)
                if kid is not None and crossed:
                    self._add_crossed(out, kid, key, text, starts, ends, i, j)
                elif kid is not None:
                    e = entries.get(kid)
                    if e is None:
                        e = self._entry(kid, key)
                    if e.checked:
                        posts = e.free + check_surface(e.checked, text[starts[i] : ends[j - 1]])
                        if posts:
                            out.append(Match(i, j, key, posts))
                    elif e.free:
                        out.append(_new(Match, (i, j, key, e.free, 1.0, True)))
                if j >= lim:
                    break
                if crosses_break(text, ends[j - 1], starts[j]):
                    crossed = True
                key = key + " " + norms[j]
                j += 1
        return out

    def _match_prefixes(
        self,
        prefixes: dict[str, int],
        text: str,
        norms: list[str],
        starts: list[int],
        ends: list[int],
    ) -> list[Match]:
        out: list[Match] = []
        entries = self._entries
        get = prefixes.get
        n = len(norms)
        breaks = BREAK_CHARS
        for i in range(n):
            key = norms[i]
            kid = get(key)
            if kid is None:
                continue
            j = i + 1
            crossed = False
            while True:
                if kid >= 0 and crossed:
                    self._add_crossed(out, kid, key, text, starts, ends, i, j)
                elif kid >= 0:
                    e = entries.get(kid)
                    if e is None:
                        e = self._entry(kid, key)
                    if e.checked:
                        posts = e.free + check_surface(e.checked, text[starts[i] : ends[j - 1]])
                        if posts:
                            out.append(Match(i, j, key, posts))
                    elif e.free:
                        out.append(_new(Match, (i, j, key, e.free, 1.0, True)))
                if j >= n:
                    break
                longer = key + " " + norms[j]
                kid = get(longer)
                if kid is None:
                    break
                left, right = ends[j - 1], starts[j]
                if (right - left != 1 or text[left] != " ") and not breaks.isdisjoint(
                    text[left:right]
                ):
                    crossed = True  # inlined crosses_break: only punctuated strings go on
                key = longer
                j += 1
        return out

    def _add_crossed(
        self, out: list[Match], kid: int, key: str, text: str, starts: list[int],
        ends: list[int], i: int, j: int,
    ) -> None:
        posts = self.crossed_postings(kid, text, starts, ends, i, j)
        if posts:
            out.append(Match(i, j, key, posts))

    def crossed_postings(
        self, kid: int, text: str, starts: list[int], ends: list[int], i: int, j: int
    ) -> tuple[Posting, ...]:
        """The postings of key ``kid`` that the window of tokens ``[i, j)``, which spans break
        punctuation, matches: those whose dictionary string has the same break characters
        between the same two words ("Abdomen:  soft" for "ABDOMEN: SOFT", not for "abdomen.
        Soft"), after the key's case checks. Rare, so not memoised beyond the strings' own
        punctuation."""
        e = self.entry_by_id(kid)
        punctuated = self._punctuated.get(kid)
        if punctuated is None:
            punctuated = self._punctuated[kid] = _punctuated_postings(
                self.index.key(kid), (*e.free, *(p for p, _ in e.checked))
            )
        if not punctuated:
            return ()
        gaps = tuple(
            BREAK_CHARS.intersection(text[ends[t - 1] : starts[t]]) for t in range(i + 1, j)
        )
        kept = {id(p) for p, own in punctuated if own == gaps}
        if not kept:
            return ()
        surface = text[starts[i] : ends[j - 1]]
        ok = [p for p in e.free if id(p) in kept]
        checked = tuple(c for c in e.checked if id(c[0]) in kept)
        if checked:
            ok.extend(check_surface(checked, surface))
        return tuple(ok)


def _punctuated_postings(
    key: str, postings: tuple[Posting, ...]
) -> tuple[tuple[Posting, tuple[frozenset[str], ...]], ...]:
    """The postings whose string has break punctuation between its words, each with the break
    characters of every gap between its tokens (tokenised as captions are, so that the gaps
    line up with the key's words; a string that does not tokenise to ``key`` is left out)."""
    out = []
    for p in postings:
        if BREAK_CHARS.isdisjoint(p.string):
            continue
        norms, starts, ends = tokenize_spans_py(p.string)
        if " ".join(norms) != key:
            continue
        gaps = tuple(
            BREAK_CHARS.intersection(p.string[ends[t - 1] : starts[t]])
            for t in range(1, len(norms))
        )
        if any(gaps):
            out.append((p, gaps))
    return tuple(out)


def surface_check(how: int, surface: str, string: str) -> bool:
    """Whether the caption ``surface`` passes check ``how`` (:func:`posting_checks`) for a
    posting of dictionary string ``string``."""
    if how == _CHECK_UPPER:
        return surface.isupper()
    return same_case(surface, string)


def check_surface(checked: tuple[tuple[Posting, int], ...], surface: str) -> tuple[Posting, ...]:
    """The postings among ``checked`` that the caption surface satisfies."""
    return tuple(p for p, how in checked if surface_check(how, surface, p.string))
