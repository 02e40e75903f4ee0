"""NegEx-style negation for captions: which tokens lie in the scope of a negation trigger.

Chapman et al.'s NegEx marks a concept as negated when it falls within a few words after a
pre-negation trigger ("no", "without", "negative for") or before a post-negation trigger ("was
ruled out"), unless the trigger is a pseudo-trigger ("no change", "not only") and unless a
terminator ("but", "however") ends the scope first. Radiology captions are shorter and more
telegraphic than clinical notes, so the lists here differ from NegEx's in two ways:

* caption verbs that introduce a finding ("showing", "demonstrating", "reveals", "with") end a
  scope — "CT without contrast showing a mass" negates contrast, not the mass;
* the scope is short (five tokens after the trigger, by default) and never crosses sentence
  punctuation (``. ; : ! ?``); commas do not end it, so "no fracture, dislocation or effusion"
  negates all three.

Everything works on the normalised tokens the matcher already has; a caption without any
trigger word costs one set intersection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from conceptsvc.normalize import normalize_term

__all__ = [
    "DEFAULT_SCOPE",
    "PHRASE_BREAKS",
    "POST_KIND",
    "PRE_KIND",
    "PSEUDO_KIND",
    "SENTENCE_BREAKS",
    "TERM_KIND",
    "NegationDetector",
    "NegationRules",
]

DEFAULT_SCOPE = 5

_PRE = (
    "no",
    "not",
    "without",
    "absence of",
    "absent",
    "negative for",
    "free of",
    "no evidence of",
    "no evidence for",
    "no sign of",
    "no signs of",
    "no findings of",
    "never",
    "neither",
    "nor",
    "denies",
    "denied",
    "ruled out",
    "rules out",
    "lack of",
    "lacks",
    "lacking",
    "cannot see",
)
_POST = (
    "ruled out",
    "was ruled out",
    "were ruled out",
    "excluded",
    "was excluded",
    "not seen",
    "not visible",
    "not visualized",
    "not detected",
    "not identified",
    "not present",
    "is absent",
    "are absent",
    "was absent",
    "were absent",
    "absent",
    "resolved",
    "disappeared",
    "was negative",
    "were negative",
    "free",
)
_PSEUDO = (
    "no change",
    "no significant change",
    "no interval change",
    "not only",
    "no increase",
    "no further",
    "not necessarily",
    "gram negative",
    "without change",
    "not certain",
    "not rule out",
    "rule out",
    "to rule out",
    "no longer than",
    "not just",
    "whether or not",
)
_TERMINATORS = (
    "but",
    "however",
    "although",
    "though",
    "except",
    "apart from",
    "aside from",
    "which",
    "whereas",
    "while",
    "yet",
    "secondary to",
    "due to",
    "because of",
    "showing",
    "show",
    "shows",
    "shown",
    "demonstrating",
    "demonstrates",
    "demonstrated",
    "revealing",
    "reveals",
    "revealed",
    "suggesting",
    "suggests",
    "consistent with",
    "with",
    "indicating",
    "indicates",
    "and then",
    "presence of",
    "there is",
    "there was",
    "there are",
)
SENTENCE_BREAKS = frozenset(".;:!?")
"""Punctuation that ends a negation scope (commas do not: "no fracture, dislocation or
effusion" negates all three)."""
PHRASE_BREAKS = SENTENCE_BREAKS | frozenset(",()")
"""Punctuation that no trigger phrase spans ("no, evidence of" is not "no evidence of")."""


def _phrases(raw: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    out = {tuple(normalize_term(p).split(" ")) for p in raw}
    out.discard(("",))
    return tuple(sorted(out, key=lambda t: (-len(t), t)))


@dataclass(frozen=True)
class NegationRules:
    """Trigger lists (raw phrases; normalised on use) and the scope in tokens."""

    pre: tuple[str, ...] = _PRE
    post: tuple[str, ...] = _POST
    pseudo: tuple[str, ...] = _PSEUDO
    terminators: tuple[str, ...] = _TERMINATORS
    scope: int = DEFAULT_SCOPE


# What a phrase of the table is (NegationDetector.phrase_table).
PSEUDO_KIND, PRE_KIND, POST_KIND, TERM_KIND = 0, 1, 2, 3


@dataclass
class NegationDetector:
    """Compiled :class:`NegationRules`; thread-safe and stateless after construction.

    The compiled engine's ``NegationScanner`` runs :meth:`negated_tokens` itself and reads
    the detector's rules through its public accessors: :attr:`phrase_table`,
    :attr:`trigger_words`, ``rules.scope``, and the class constants below.
    """

    rules: NegationRules = field(default_factory=NegationRules)
    sentence_breaks: ClassVar[frozenset[str]] = SENTENCE_BREAKS
    phrase_breaks: ClassVar[frozenset[str]] = PHRASE_BREAKS
    pre_kind: ClassVar[int] = PRE_KIND
    post_kind: ClassVar[int] = POST_KIND

    def __post_init__(self) -> None:
        # first token → [(phrase tokens, kind)], longest phrase first; pseudo before others of
        # the same length so that "no change" wins over "no".
        table: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        kinds = (
            (PSEUDO_KIND, self.rules.pseudo),
            (PRE_KIND, self.rules.pre),
            (POST_KIND, self.rules.post),
            (TERM_KIND, self.rules.terminators),
        )
        for kind, raw in kinds:
            for ph in _phrases(raw):
                table.setdefault(ph[0], []).append((ph, kind))
        for lst in table.values():
            lst.sort(key=lambda e: (-len(e[0]), e[1]))
        self._table = table
        # Only a pre- or post-negation trigger can negate anything; terminators and
        # pseudo-triggers ("with", "showing") are frequent and must not defeat the fast path.
        self._trigger_words = frozenset(
            ph[0]
            for ph, kind in (e for lst in table.values() for e in lst)
            if kind in (PRE_KIND, POST_KIND)
        )

    def negated_tokens(
        self, text: str, norms: list[str], starts: list[int], ends: list[int]
    ) -> list[bool] | None:
        """Per token, whether it lies in a negation scope; ``None`` when nothing is negated."""
        if self._trigger_words.isdisjoint(norms):
            return None
        n = len(norms)
        # Phrase hits: (start, end, kind); a token belongs to at most one phrase.
        hits: list[tuple[int, int, int]] = []
        i = 0
        table = self._table
        while i < n:
            cands = table.get(norms[i])
            if cands:
                for ph, kind in cands:
                    L = len(ph)
                    if tuple(norms[i : i + L]) == ph and not _breaks_inside(
                        text, starts, ends, i, i + L
                    ):
                        hits.append((i, i + L, kind))
                        i += L
                        break
                else:
                    i += 1
            else:
                i += 1
        if not any(k in (PRE_KIND, POST_KIND) for _, _, k in hits):
            return None
        stop = [False] * n  # token starts a new sentence / is a terminator or another trigger
        for s, e, _kind in hits:
            for t in range(s, e):
                stop[t] = True
        brk = [False] * (n + 1)  # brk[t]: sentence punctuation between token t-1 and t
        for t in range(1, n):
            gap = text[ends[t - 1] : starts[t]]
            if gap != " " and not SENTENCE_BREAKS.isdisjoint(gap):
                brk[t] = True
        out = [False] * n
        scope = self.rules.scope
        for s, e, kind in hits:
            if kind == PRE_KIND:
                t = e
                while t < n and t < e + scope and not brk[t] and not stop[t]:
                    out[t] = True
                    t += 1
            elif kind == POST_KIND:
                t = s - 1
                while t >= 0 and t >= s - scope and not brk[t + 1] and not stop[t]:
                    out[t] = True
                    t -= 1
        return out if any(out) else None

    @property
    def phrase_table(self) -> Mapping[str, list[tuple[tuple[str, ...], int]]]:
        """First normalised token → [(phrase tokens, kind)], longest phrase first and, among
        phrases of one length, pseudo-triggers first; kinds are ``PSEUDO_KIND`` ...
        ``TERM_KIND``."""
        return self._table

    @property
    def trigger_words(self) -> frozenset[str]:
        """First tokens of the pre- and post-negation triggers: a caption without any of
        them has nothing negated."""
        return self._trigger_words


def _breaks_inside(text: str, starts: list[int], ends: list[int], i: int, j: int) -> bool:
    for t in range(i + 1, j):
        gap = text[ends[t - 1] : starts[t]]
        if gap != " " and not PHRASE_BREAKS.isdisjoint(gap):
            return True
    return False
