"""Abbreviations: definitions inside a caption, and choosing among a short form's concepts.

Two problems, one module, because both decide what a short form means.

**Definitions in the caption** (Schwartz & Hearst, PSB 2003): "computed tomography (CT)" defines
CT for the rest of the caption, so a later "CT" maps to the long form's concept whatever else
the dictionary lists for "CT". :func:`find_definitions` implements the published algorithm on
the original text (short form in parentheses after its long form, or the reverse when the
parenthesis holds the longer text), returning code-point offsets.

**Ambiguous keys**: a dictionary key that belongs to several concepts ("CT": computed tomography
and Chlamydia trachomatis; "MS"). QuickUMLS returns whichever comes first; we never do.
:class:`AmbiguityResolver` ranks the candidates by, in order:

1. a definition in the caption (Schwartz–Hearst) naming one of them;
2. context — how many of the caption's other content words occur in the candidate's other
   dictionary strings ("MS" next to "mitral valve" is mitral stenosis);
3. semantic-type preference — the active profile's ordered list of TUIs (for radiology
   captions a diagnostic procedure beats a bacterium);
4. prior frequency — the active profile's per-concept priors, if it has any.

When the top candidates still tie on all four, every tied candidate is kept (and the caller can
see the ambiguity as several concepts on one span) — a silent first-CUI choice is exactly the
bug this exists to avoid.

**A bound on the candidates ranked** (issue 13): a span is ranked among at most
:data:`MAX_CANDIDATES` (64) concepts, the best by the context-free part of the rank — type
preference, then prior, then CUI order (:meth:`AmbiguityResolver.shortlist`). A real UMLS's
most ambiguous strings are in the tens of concepts (Aronson, "Ambiguity in the UMLS
Metathesaurus", 2001 and 2005 editions: "Other" in 55), so for them the bound changes nothing;
a noisy site dictionary can map a word to thousands ("left" → 8,013 concepts in the stress
synthetic release), and ranking all of them on every mention made one caption cost
milliseconds, with as many tied mentions out. Beyond the 64th, a concept could only have won on
context words, and a tie of more than 64 is cut in CUI order. Because the shortlist of a union
is the shortlist of the union of shortlists, the extractor applies it per key when it filters a
key's postings (memoised per key and options), so a mention's cost does not grow with its
key's concepts; no ROCOv2 validation prediction changes (the demo dictionary's most ambiguous
key has far fewer concepts).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from conceptsvc.index import ConceptIndex
from conceptsvc.normalize import SPEEDUPS, STOPWORDS, tokenize_spans

__all__ = [
    "MAX_CANDIDATES",
    "MAX_DEFINITIONS",
    "AmbiguityResolver",
    "Definition",
    "Ranking",
    "fast_find_definitions",
    "find_definitions",
]

# The rules of find_definitions; the compiled engine is handed them at the end of the module.
_MIN_SHORT_LEN = 2  # a short form has 2 to 10 characters, in at most 2 words
_MAX_SHORT_LEN = 10
_MAX_SHORT_WORDS = 2
_LOOK_BACK = 40  # characters before "(" searched for the short form of "SF (long form)"
_CLAUSE_BREAKS = ".;:!?()[]"  # a long form does not reach back past these
_INNER_CUTS = (";", ",")  # "(CT; see text)", "(CT, MRI)": the short form ends at these
# A long form has at most min(len(short) + 5, 2 * len(short)) words (Schwartz & Hearst).
_LONG_FORM_EXTRA_WORDS = 5
_LONG_FORM_WORDS_PER_CHAR = 2
# What str.split() splits words on (every str.isspace() code point): a long form starts after
# the last of these before its first word, whichever it is (a thin or no-break space too).
_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
MAX_CANDIDATES = 64
"""Concepts of one span that are ranked: the best by type preference, prior and CUI (see the
module docstring)."""
VOCAB_MEMO_SIZE = 1 << 16
"""Concepts whose content words an :class:`AmbiguityResolver` keeps before its memo is emptied
(read when the resolver is made): the memo otherwise grows with every ambiguous concept a
long-lived worker meets."""
MAX_DEFINITIONS = 50
"""Definitions read per caption: real captions define a few; applying each one scans the
caption, so a 100 KB text of nothing but definitions would otherwise take tens of seconds."""


@dataclass(frozen=True, slots=True)
class Definition:
    """``text[short_start:short_end]`` abbreviates ``text[long_start:long_end]``."""

    short: str
    short_start: int
    short_end: int
    long_start: int
    long_end: int


def _valid_short(sf: str) -> bool:
    """Schwartz–Hearst's short-form test, plus: at least one capital letter.

    The extra condition is ours: captions are full of parenthesised words that are not
    abbreviations ("(arrow)", "(red arrows)"), and a short form without a capital is almost
    never one in radiology text; it also keeps the per-caption cost near zero.
    """
    if not (_MIN_SHORT_LEN <= len(sf) <= _MAX_SHORT_LEN) or len(sf.split()) > _MAX_SHORT_WORDS:
        return False
    if not sf[0].isalnum() or not any(c.isupper() for c in sf):
        return False
    return True


def _best_long_form(sf: str, lf: str) -> int | None:
    """Schwartz–Hearst: start offset in ``lf`` of the shortest long form matching ``sf``.

    Every character of the short form must occur in order in the long form, matched from the
    end, and its first character must start a word of the long form.
    """
    s = len(sf) - 1
    t = len(lf) - 1
    while s >= 0:
        c = sf[s].lower()
        if not c.isalnum():
            s -= 1
            continue
        while (t >= 0 and lf[t].lower() != c) or (s == 0 and t > 0 and lf[t - 1].isalnum()):
            t -= 1
        if t < 0:
            return None
        t -= 1
        s -= 1
    # back to the start of the word, as the algorithm's lastIndexOf(' ') does for its words
    while t >= 0 and lf[t] not in _WHITESPACE:
        t -= 1
    return t + 1



def find_definitions(text: str) -> list[Definition]:
    """Every (short form, long form) pair defined with parentheses in ``text``."""
    out: list[Definition] = []
    pos = 0
    while len(out) < MAX_DEFINITIONS:
        open_ = text.find("(", pos)
        if open_ < 0:
            return out
        close = text.find(")", open_ + 1)
        if close < 0:
            return out
        pos = open_ + 1
        inner_start, inner = open_ + 1, text[open_ + 1 : close]
        if "(" in inner:
            continue
        for sep in _INNER_CUTS:
            cut = inner.find(sep)
            if cut >= 0:
                inner = inner[:cut]
        lead = len(inner) - len(inner.lstrip())
        inner_s = inner.strip()
        inner_start += lead
        forward = _valid_short(inner_s)
        if not forward:
            if len(inner_s) <= _MAX_SHORT_LEN and len(inner_s.split()) <= _MAX_SHORT_WORDS:
                continue
            # reverse pattern needs a short form right before the parenthesis
            head = text[max(0, open_ - _LOOK_BACK) : open_].split()
            if not head or not _valid_short(head[-1]) or head[-1].islower():
                continue
        # the clause before the parenthesis: back to the previous clause break
        left = max(text.rfind(c, 0, open_) for c in _CLAUSE_BREAKS) + 1
        before = text[left:open_].rstrip()
        if forward:
            n_words = min(
                len(inner_s) + _LONG_FORM_EXTRA_WORDS, _LONG_FORM_WORDS_PER_CHAR * len(inner_s)
            )
            words = before.split()
            if not words:
                continue
            cand = " ".join(words[-n_words:])
            rel = _best_long_form(inner_s, cand)
            if rel is None:
                continue
            lf = cand[rel:]
            lf_words = lf.split()
            if len(lf) <= len(inner_s) or len(lf_words) > n_words or inner_s in lf_words:
                continue
            # ``cand`` joins the words with single spaces, so ``rel`` is no offset into the
            # caption: the long form starts where its first word does in ``before``.
            tail = before.split(None, len(words) - len(lf_words))[-1]
            out.append(
                Definition(
                    inner_s,
                    inner_start,
                    inner_start + len(inner_s),
                    left + len(before) - len(tail),
                    left + len(before),
                )
            )
        elif len(inner_s) > _MAX_SHORT_LEN or len(inner_s.split()) > _MAX_SHORT_WORDS:
            # reverse pattern: "SF (long form)"
            words = before.split()
            if not words:
                continue
            sf = words[-1]
            if not _valid_short(sf) or sf.islower():
                continue
            rel = _best_long_form(sf, inner_s)
            # as in the forward pattern, a long form that holds the short form is none
            if rel is None or len(inner_s) - rel <= len(sf) or sf in inner_s[rel:].split():
                continue
            sf_start = left + before.rfind(sf)
            out.append(
                Definition(
                    sf, sf_start, sf_start + len(sf), inner_start + rel, inner_start + len(inner_s)
                )
            )
    return out


fast_find_definitions: Callable[[str], list[Definition]] = find_definitions
""":func:`find_definitions`, compiled when the extension is built (the same definitions:
``tests/test_speedups.py``); it gets this module's rules here, once."""

if SPEEDUPS is not None:
    fast_find_definitions = SPEEDUPS.DefinitionFinder(
        Definition,
        max_definitions=MAX_DEFINITIONS,
        min_short_len=_MIN_SHORT_LEN,
        max_short_len=_MAX_SHORT_LEN,
        max_short_words=_MAX_SHORT_WORDS,
        look_back=_LOOK_BACK,
        clause_breaks=_CLAUSE_BREAKS,
        inner_cuts=_INNER_CUTS,
        long_form_extra_words=_LONG_FORM_EXTRA_WORDS,
        long_form_words_per_char=_LONG_FORM_WORDS_PER_CHAR,
        whitespace=_WHITESPACE,
    )


class AmbiguityResolver:
    """Ranks the concepts of an ambiguous key (see the module docstring for the order).

    ``tokenize`` splits dictionary strings into normalised tokens (default: the compiled
    tokeniser when it is built; the reference engine passes ``normalize.tokenize_spans_py``).
    ``concept_strings``, when given, returns a concept's distinct dictionary strings (the
    compiled engine reads them from the index's arrays, ``PostingFilter.concept_strings``,
    without building its postings); by default they are read from
    ``index.concept_postings``.
    """

    def __init__(
        self,
        index: ConceptIndex,
        *,
        type_preference: Sequence[str] = (),
        priors: Mapping[str, float] | None = None,
        tokenize: Callable[[str], tuple[list[str], list[int], list[int]]] = tokenize_spans,
        concept_strings: Callable[[str], Iterable[str]] | None = None,
    ) -> None:
        self._index = index
        self._tokenize = tokenize
        self._concept_strings = concept_strings
        self._type_rank = {t: i for i, t in enumerate(type_preference)}
        self._priors = dict(priors or {})
        self._vocab: dict[str, frozenset[str]] = {}
        self._vocab_max = max(1, VOCAB_MEMO_SIZE)

    def _concept_vocab(self, cui: str) -> frozenset[str]:
        """Content words of all of a concept's dictionary strings (memoised per concept)."""
        v = self._vocab.get(cui)
        if v is None:
            words: set[str] = set()
            strings: Iterable[str] = (
                (p.string for p in self._index.concept_postings(cui))
                if self._concept_strings is None
                else self._concept_strings(cui)
            )
            tokenize = self._tokenize
            for s in strings:
                words.update(tokenize(s)[0])
            words -= STOPWORDS
            if len(self._vocab) >= self._vocab_max:  # readers fall back to this method
                self._vocab.clear()
            v = self._vocab[cui] = frozenset(words)
        return v

    def type_rank(self, types: Sequence[str]) -> int:
        worst = len(self._type_rank)
        return min((self._type_rank.get(t, worst) for t in types), default=worst)

    def shortlist(self, cuis: Sequence[str], types: Mapping[str, Sequence[str]]) -> list[str]:
        """The :data:`MAX_CANDIDATES` best of ``cuis`` by the context-free rank (type
        preference, prior, CUI), in their given order; all of them when there are no more."""
        if len(cuis) <= MAX_CANDIDATES:
            return list(cuis)
        priors = self._priors
        best = heapq.nsmallest(
            MAX_CANDIDATES,
            cuis,
            key=lambda c: (self.type_rank(types.get(c, ())), -priors.get(c, 0.0), c),
        )
        keep = set(best)
        return [c for c in cuis if c in keep]

    def ranking(self, cuis: Sequence[str], types: Mapping[str, Sequence[str]]) -> Ranking:
        """The ranking of one set of candidates (their :meth:`shortlist`), to be asked for the
        best of them in any caption (:meth:`Ranking.best`). Building it reads every
        candidate's dictionary strings; asking it costs what the caption's words do, so the
        extractor keeps it per candidate set."""
        cuis = self.shortlist(cuis, types)
        priors = self._priors
        rank_of = self._type_rank
        worst = len(rank_of)
        static: list[tuple[int, float]] = []
        vocab = self._vocab
        words: dict[str, list[int]] = {}
        for i, c in enumerate(cuis):
            rank = worst  # type_rank, inlined: this runs for every candidate of a new span
            for t in types.get(c, ()):
                r = rank_of.get(t, worst)
                if r < rank:
                    rank = r
            static.append((rank, -priors.get(c, 0.0)))
            v = vocab.get(c)
            for w in self._concept_vocab(c) if v is None else v:
                held = words.get(w)
                if held is None:
                    words[w] = [i]
                else:
                    held.append(i)
        top = min(static, default=None)
        return Ranking(
            tuple(cuis),
            tuple(static),
            {w: tuple(v) for w, v in words.items()},
            tuple([c for c, r in zip(cuis, static, strict=True) if r == top]),
        )

    def choose(
        self,
        cuis: Sequence[str],
        types: Mapping[str, Sequence[str]],
        *,
        context: frozenset[str],
        own_tokens: frozenset[str],
        defined: frozenset[str] = frozenset(),
    ) -> list[str]:
        """The best-ranked candidates among ``cuis`` (several only on a complete tie).

        ``context`` is the caption's normalised words, ``own_tokens`` the ambiguous span's own
        words (not evidence for anything), ``defined`` the concepts a caption definition names.
        """
        if len(cuis) < 2:
            return list(cuis)
        return self.ranking(cuis, types).best(context - own_tokens, defined)


@dataclass(frozen=True, slots=True)
class Ranking:
    """The candidates of one ambiguous span, ready to rank in any caption.

    The rank of a candidate is (named by a caption definition, −context words it shares,
    type rank, −prior): only the second part depends on the caption, and only through the
    caption words some candidate's strings contain, so ``words`` maps each such word to the
    candidates (positions in ``cuis``) whose strings hold it, and ``static`` is the rest.
    """

    cuis: tuple[str, ...]
    static: tuple[tuple[int, float], ...]
    words: dict[str, tuple[int, ...]]
    without_context: tuple[str, ...]  # the best when no caption word is shared

    def weight(self) -> int:
        """Approximate bytes (for a byte-bounded memo): ~100 per candidate and per word."""
        return 100 * (len(self.cuis) + len(self.words) + sum(map(len, self.words.values())))

    def best(self, context: frozenset[str], defined: frozenset[str] = frozenset()) -> list[str]:
        """The best-ranked candidates given the caption's words (the span's own excluded),
        in candidate order; costs what ``context`` holds, not what ``cuis`` does."""
        shared: dict[int, int] = {}
        words = self.words
        for w in context:
            for i in words.get(w, ()):
                shared[i] = shared.get(i, 0) + 1
        static = self.static
        if defined:
            ranks = [
                (0 if c in defined else 1, -shared.get(i, 0), *static[i])
                for i, c in enumerate(self.cuis)
            ]
            top = min(ranks)
            return [c for c, r in zip(self.cuis, ranks, strict=True) if r == top]
        if not shared:
            return list(self.without_context)
        most = max(shared.values())
        pool = sorted(i for i, n in shared.items() if n == most)
        top_static = min(static[i] for i in pool)
        return [self.cuis[i] for i in pool if static[i] == top_static]
