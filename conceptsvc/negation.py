"""ConText for captions: which tokens lie in the scope of a negation, hypothetical, historical
or other-experiencer trigger.

ConText (Harkema, Dowling, Thornblade and Chapman, J Biomed Inform 2009), NegEx's successor,
marks a concept as negated when it lies in the scope of a trigger: forward triggers ("no",
"without", "negative for") scope over what follows, backward triggers ("was ruled out", "is
negative") over what precedes, bidirectional ones over both. Pseudo-triggers ("no change",
"gram negative") look like triggers and negate nothing; terminations ("but", "however") and
sentence ends close a scope; a scope also ends where another trigger starts. The rules are data:
:data:`CONTEXT_RULES` below, one entry per phrase with its direction and the reason for every
departure from ConText's lexicon. Both engines read that table (the compiled
``NegationScanner`` through :class:`NegationDetector`'s public accessors), so there is one
source of the rules.

Radiology captions are shorter and more telegraphic than clinical notes, so four rules are ours:

* caption verbs that introduce a finding ("showing", "demonstrating", "reveals", "with") end a
  scope — "CT without contrast showing a mass" negates contrast, not the mass;
* a location phrase ("on the chest radiograph", "in the pelvis": a location preposition up to
  the next comma, "or"/"and", trigger or sentence end) is never negated, and a scope goes on
  past it — in "No evidence of pneumothorax on the chest radiograph" the chest and the
  radiograph exist;
* an exam verb ("excluded", "ruled out") negates forward when its clause goes on ("CT of the
  chest excluded pulmonary embolism": the exam is the subject) and backward when it ends the
  clause ("pulmonary embolism was excluded"), and nothing right after another phrase ("showing
  excluded stomach distention": the surgical "excluded stomach");
* a closing word ("present", "noted", "seen") ends a forward scope at the last comma before it:
  "no pleural effusion, pneumothorax present" negates the effusion only, while "no pleural
  effusion present" still negates the effusion.

ConText's other three properties work the same way, each a :class:`Category` with triggers,
pseudo-triggers and terminations of its own (:data:`HYPOTHETICAL_RULES`: "rule out", "if",
"evaluate for", "suspected"; :data:`HISTORICAL_RULES`: "history of", "prior", "status post";
:data:`EXPERIENCER_RULES`: "family history of", "mother"). A phrase ends the scopes of its own
category (and of those its rule names in ``ends``); ConText's general terminations ("but",
"however") end every category's, our caption terminations ("showing", "with") negation's
only, and another category's trigger none: "denies any history of asthma" is negated and
historical. Their scopes cross a colon, which ends a negation: "PAST MEDICAL HISTORY:
hypertension". The NegEx set's annotators call "rule out MI" and "evaluate for DVT" recent;
ConText, and users who drop hypothetical mentions, call them hypothetical, as here.

A mention is negated when its first token is in a forward scope or its last token in a
backward one (:func:`mention_negated`; :func:`mention_context` for every category): a trigger
inside a mention does not negate that mention, as in medspaCy, whose ConText does not let a
modifier modify a target it overlaps ("hemiarthroplasty without hardware complication" as one
concept is affirmed).

Scopes run to the end of the sentence (ConText's window; NegEx's was five words) but stop at
sentence punctuation (``. ; : ! ?``); commas do not end them, so "denies any shortness of
breath, chest pain or diaphoresis" negates all three. Everything works on the normalised tokens
the matcher already has; a caption without any trigger word costs one set intersection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from conceptsvc.normalize import normalize_term

__all__ = [
    "ALL_CATEGORIES",
    "BACKWARD_SCOPE",
    "CONTEXT_RULES",
    "DEFAULT_SCOPE",
    "EXPERIENCER_RULES",
    "FORWARD_SCOPE",
    "HEADER_BREAKS",
    "HEADER_CROSSING",
    "HISTORICAL_RULES",
    "HYPOTHETICAL_RULES",
    "LIST_WORDS",
    "PHRASE_BREAKS",
    "SENTENCE_BREAKS",
    "Category",
    "ContextRule",
    "Kind",
    "NegationDetector",
    "NegationRules",
    "mention_context",
    "mention_negated",
]

DEFAULT_SCOPE: int | None = None
"""Tokens a scope may cover at most; ``None``: to the end of the sentence, as ConText."""


class Kind(IntEnum):
    """What a phrase of the rule table does (the compiled scanner reads these values)."""

    PSEUDO = 0  # looks like a trigger, negates nothing, ends scopes
    FORWARD = 1  # negates what follows
    BACKWARD = 2  # negates what precedes
    TERMINATE = 3  # ends a scope
    BIDIRECTIONAL = 4  # negates both sides
    CLAUSE = 5  # forward if its clause goes on after it, else backward ("excluded")
    CLOSE = 6  # ends a forward scope at the last comma before it ("present")
    LOCATION = 7  # starts a location phrase, which no scope negates ("on", "in")


class Category(IntEnum):
    """ConText's properties of a mention: which scope a trigger opens (bit ``2 * category`` of
    a token's flags for a forward scope, ``2 * category + 1`` for a backward one)."""

    NEGATED = 0  # "no pneumothorax"
    HYPOTHETICAL = 1  # "rule out pneumonia", "return if fever" (ConText's "not particular")
    HISTORICAL = 2  # "history of stroke", "status post CABG"
    OTHER_EXPERIENCER = 3  # "family history of colon cancer", "mother had breast cancer"


@dataclass(frozen=True)
class ContextRule:
    """One phrase of the rule table (raw text; normalised on use).

    ``category`` is the property a trigger sets, the scopes a pseudo-trigger or termination
    ends, or ``None`` for a phrase that works on every category (ConText's general
    terminations "but", "however", our location words). A phrase ends the scopes of its own
    category, and also those of the categories in ``ends`` ("personal history of" starts a
    historical scope and ends another person's)."""

    phrase: str
    kind: Kind
    category: Category | None = Category.NEGATED
    ends: tuple[Category, ...] = ()


def _rules(
    kind: Kind, *phrases: str, category: Category | None = Category.NEGATED,
    ends: tuple[Category, ...] = (),
) -> tuple[ContextRule, ...]:
    return tuple(ContextRule(p, kind, category, ends) for p in phrases)


# ConText's other categories (Harkema et al. 2009, and medspaCy 1.3.1's context_rules.json,
# MIT licence, (c) medspaCy authors, for the entries marked "medspaCy"). They share the scope
# machinery with negation: a scope runs to the sentence's end, a termination of its category
# or of all categories, or the next phrase of its category; unlike negation's, their scopes
# cross a colon (:data:`HEADER_BREAKS`: "PAST MEDICAL HISTORY:  Hypertension, gout").
HYPOTHETICAL_RULES: tuple[ContextRule, ...] = (
    # ConText forward hypothetical triggers ("rule out" was a negation pseudo-trigger here
    # before; ConText lists it as hypothetical, which is what "Rule out pneumonia." means)
    *_rules(
        Kind.FORWARD,
        "if", "should there be", "should he", "should she", "should the patient",
        "rule out", "to rule out", "r o", "evaluate for", "evaluation for", "to evaluate for",
        "assess for", "to assess for", "screen for", "screening for", "check for",
        "checked for", "test for", "tested for", "watch for", "monitor for",
        "call for", "call also for", "return for", "concern for",
        # the brief of issue 17 and medspaCy's POSSIBLE_EXISTENCE: suspected, not yet found
        "suspected", "suspect", "suspicious for", "question of", "questionable for",
        # ours: discharge advice lists what is not there yet ("call the physician if any of
        # the following are noted: ..." is "if"; these are its other wordings, dev set)
        "in the event of", "as needed for",
        category=Category.HYPOTHETICAL,
    ),
    # ConText pseudo-triggers: "if" that asks nothing about a finding
    *_rules(
        Kind.PSEUDO, "even if", "if needed", "if necessary",
        category=Category.HYPOTHETICAL,
    ),
)
HISTORICAL_RULES: tuple[ContextRule, ...] = (
    *_rules(
        Kind.FORWARD,
        "history", "history of", "past history", "past medical history", "medical history",
        "surgical history", "social history", "past", "prior", "previous",
        "previously", "former", "formerly", "status post", "s p", "h o", "known", "know",
        "remote", "history significant for",
        category=Category.HISTORICAL,
    ),
    # ConText: the patient's own history ends another person's
    *_rules(
        Kind.FORWARD, "personal history", "personal history of", category=Category.HISTORICAL,
        ends=(Category.OTHER_EXPERIENCER,),
    ),
    *_rules(
        Kind.BACKWARD, "in the past", "years ago", "in childhood", category=Category.HISTORICAL
    ),
    # ConText pseudo-historical: a "history" that is the present one
    *_rules(
        Kind.PSEUDO,
        "history of present illness", "history of the present illness", "history and physical",
        "history and examination", "history taking", "poor history", "clinical history",
        "history of chief complaint",
        # ours: a history counted in days or weeks is the present illness ("presents with
        # one-week history of intermittent pain", "a two-day history of fever", dev set)
        "day history", "week history", "month history", "hour history",
        "past 24 hours", "past hour", "past few days",
        "past week", "prior to admission", "prior to arrival", "prior to",
        category=Category.HISTORICAL,
    ),
    # ConText historical terminations: the present starts
    *_rules(
        Kind.TERMINATE,
        "who presents", "presented", "presenting", "complains", "complaining", "now",
        "currently", "current", "today", "recent", "recently", "admitted", "came in",
        "comes in",
        # (not "presents" alone: it normalises to "present", negation's closing word; these
        # phrases are longer than it: "presents to the Emergency Department with ...", dev set)
        "presents to", "presents with", "coming in",
        category=Category.HISTORICAL,
    ),
)
EXPERIENCER_RULES: tuple[ContextRule, ...] = (
    *_rules(
        Kind.FORWARD,
        "family history", "family history of", "family hx", "fh", "fhx", "mother", "father",
        "sister", "brother", "sibling", "siblings", "aunt", "uncle", "grandmother",
        "grandfather", "cousin", "parent", "parents", "daughter", "son", "his wife",
        "her husband", "mother s", "father s",
        category=Category.OTHER_EXPERIENCER,
    ),
    # ConText: the patient ends another person's scope (and "personal history of" above)
    *_rules(
        Kind.TERMINATE, "patient", "the patient", "he", "she",
        category=Category.OTHER_EXPERIENCER,
    ),
)

# The rule table. Its start is the negation part of ConText's lexicon (Harkema et al. 2009),
# written from the published lexicon, then compared phrase by phrase with medspaCy 1.3.1's
# default English rules (resources/en/context_rules.json, MIT licence, (c) medspaCy authors);
# the entries taken from that file are marked "medspaCy". Left out of medspaCy's negation
# rules: its spaCy token patterns (each literal is here, inflections through normalisation),
# "checked for", "test for", "evaluate for" (hypothetical in ConText's original lexicon; two
# more false positives on the dev set), ": none" / ": no" (a colon ends a scope here; "none" is
# a backward trigger instead), "any other" and "as well as any" (they continue a list another
# trigger started, which a sentence-long scope covers already, and "any"/"as" are too frequent
# for the fast path's word check). medspaCy has no pseudo-trigger category; ConText's are below.
# ConText's other categories are in :data:`HYPOTHETICAL_RULES`, :data:`HISTORICAL_RULES` and
# :data:`EXPERIENCER_RULES` above.
# Every departure from ConText carries its reason in a comment.
CONTEXT_RULES: tuple[ContextRule, ...] = (
    # ConText forward negation triggers
    *_rules(
        Kind.FORWARD,
        "no", "not", "without", "absence of", "negative for", "free of", "no evidence of",
        "no evidence for", "no evidence", "no sign of", "no signs of", "no findings of",
        "no findings to indicate", "no suggestion of", "no suspicious", "no new", "no abnormal",
        "no significant", "no history of", "no complaints of", "no cause of", "never",
        "never had", "never developed", "neither", "nor", "denies", "denied", "denying",
        "deny", "declined", "declines", "cannot see", "not demonstrate", "not appear",
        "not have", "not had", "not reveal", "not see", "not exhibit", "not feel",
        "not known to have", "not associated with", "fails to reveal", "with no",
        "without any evidence of", "without evidence of", "without evidence",
        "without indication of", "without sign of", "without signs of", "rather than",
        "unremarkable for", "to exclude",
        # ours: "with" ends a scope in captions (below), so ConText's "not ... consistent
        # with X" needs the whole phrase (dev set: "not consistent with aortic dissection")
        "not consistent with", "inconsistent with",
        # ours: "suggest"/"suggesting" end a scope in captions, so these need the whole phrase
        # (dev set: "no findings suggesting osteomyelitis", "no findings to suggest")
        "no findings suggesting", "no findings to suggest", "no finding to suggest",
        # ours: caption wording of "no evidence of"
        "no signs", "lack of", "lacks", "lacking", "no features of",
        # medspaCy
        "clear of", "lacked", "not to be",
    ),
    # ConText backward negation triggers
    *_rules(
        Kind.BACKWARD,
        "was ruled out", "were ruled out", "is ruled out", "are ruled out",
        "has been ruled out", "have been ruled out", "was excluded", "were excluded",
        "is excluded", "are excluded", "has been excluded", "have been excluded", "not seen",
        "is negative", "are negative", "was negative", "were negative", "has been negative",
        "resolved", "unlikely",
        # ConText's "free" ("pain free") is left out: "free fluid" and "free air" are
        # findings in radiology, and "no free fluid in the pelvis" is negated (dev set)
        # ours: caption wording (report style "X not visualized", "X is absent")
        "not visible", "not visualized", "not visualised", "not detected", "not identified",
        "not present", "not demonstrated", "is absent", "are absent", "was absent",
        "were absent", "disappeared",
        # medspaCy (its ": none" without the colon: "ALLERGIES - NONE", dev set)
        "none", "no longer present", "not significant", "non diagnostic", "now resolved",
        "are not evident", "negative on", "prophylaxis",
    ),
    # ConText lists "absent" in both directions ("absent pulses", "pulses absent")
    *_rules(Kind.BIDIRECTIONAL, "absent"),
    # ours: an exam verb in active voice has the exam as its subject ("CT excluded PE"), in
    # passive or telegraphic voice ends its clause ("PE excluded."); ConText lists these as
    # bidirectional, which would negate the exam (issue 17: "CT of the chest excluded
    # pulmonary embolism")
    # ("rule out" stays ConText's: hypothetical, a pseudo-trigger here: "Rule out pneumonia.";
    # "rules out" normalises to the same tokens, so it is not listed)
    *_rules(Kind.CLAUSE, "excluded", "ruled out"),
    # ConText pseudo-triggers
    *_rules(
        Kind.PSEUDO,
        "no change", "no significant change", "no interval change", "no definite change",
        "no suspicious change", "no increase", "not only", "not necessarily", "not extend",
        "not cause", "not drain", "not certain", "not certain if", "not certain whether",
        "gram negative", "without difficulty", "without change", "not rule out",
        "not ruled out", "not been ruled out", "cannot be ruled out",
        "can not be ruled out", "could not be ruled out", "cannot be excluded",
        "can not be excluded", "could not be excluded", "not excluded", "not be excluded",
        "whether or not",
        # ours: measurement phrasing in captions
        "no longer than", "not just",
        # NegEx's and our earlier list had "no further": dropped, the dev set negates
        # "no further episodes of coffee-ground emesis" and "no further signs of infection"
    ),
    # ConText terminations (its general ones end every category's scope; so do ours, which
    # end a finding's phrase in captions)
    *_rules(
        Kind.TERMINATE,
        "but", "however", "although", "though", "nevertheless", "yet", "still", "except",
        "apart from", "aside from", "which", "whereas", "while", "secondary to", "due to",
        "because of", "cause of", "cause for", "source of", "reason for", "etiology of",
        "origin of",
        # medspaCy
        "as a cause for", "as has", "origin for", "source for", "trigger event for",
        "secondary", "other possibilities of",
        category=None,
    ),
    # ours: negation's own terminations. They end negation scopes only: "return if there is
    # any fever" and "call for any weight gain ..., fever associated with chills" are
    # hypothetical to their ends, "past medical history is positive for gout" historical (dev
    # set)
    *_rules(
        Kind.TERMINATE,
        # an affirmation ends a list of negated findings (dev set: "showed no biliary
        # dilatation and positive for cholecystolithiasis")
        "positive for",
        # ours: caption verbs that introduce a finding ("CT without contrast showing a mass")
        "showing", "show", "shows", "shown", "demonstrating", "demonstrates", "demonstrated",
        "revealing", "reveals", "revealed", "showed", "displaying", "displays", "depicting",
        "depicts", "confirming", "confirms", "illustrating", "illustrates", "indicative of",
        "suggestive of", "suggesting", "suggests", "consistent with",
        "with", "indicating", "indicates", "and then", "presence of", "there is", "there was",
        "there are",
        # ours: "and" with a determiner starts a new, affirmed finding in captions ("absent
        # right coronary ostium and a large left circumflex artery"); the dev set negates no
        # item after "and a/an/the"
        "and a", "and an", "and the",
    ),
    # ours (issue 17): "no pleural effusion, pneumothorax present"
    *_rules(Kind.CLOSE, "present", "is present", "are present", "noted", "seen"),
    # ours (issue 17): prepositions that introduce where a finding is or how it was imaged.
    # Not "of": "signs or symptoms of infection", "shortness of breath" (dev set).
    *_rules(
        Kind.LOCATION, "on", "in", "at", "within", "along", "involving", "over", "under",
        "throughout", "into", "near", category=None,
    ),
    *HYPOTHETICAL_RULES,
    *HISTORICAL_RULES,
    *EXPERIENCER_RULES,
)

LIST_WORDS = frozenset({"and", "or"})
"""Words that end a location phrase as a comma does ("no mass in the liver or spleen cyst")."""
SENTENCE_BREAKS = frozenset(".;:!?")
"""Punctuation that ends a negation scope (commas do not: "no fracture, dislocation or
effusion" negates all three)."""
HEADER_BREAKS = frozenset(":")
"""Sentence punctuation that the scopes of the other categories cross: a colon after
"PAST MEDICAL HISTORY" or "if any of the following are noted" introduces the list it
qualifies, while "No acute disease: normal heart" ends a negation."""
PHRASE_BREAKS = SENTENCE_BREAKS | frozenset(",()")
"""Punctuation that no trigger phrase spans ("no, evidence of" is not "no evidence of")."""
LIST_BREAKS = frozenset(",")
"""Punctuation that ends a location phrase and marks where a closing word's item begins."""

FORWARD_SCOPE = 1
"""Bit of a token's flag: in the scope of a negation trigger before it (a category's bits are
``FORWARD_SCOPE << 2 * category`` and ``BACKWARD_SCOPE << 2 * category``)."""
BACKWARD_SCOPE = 2
"""Bit of a token's flag: in the scope of a negation trigger after it."""
ALL_CATEGORIES = (1 << len(Category)) - 1
"""Stop mask of a phrase that ends every category's scope."""
HEADER_CROSSING = ALL_CATEGORIES & ~(1 << Category.NEGATED)
"""Categories (a bit each) whose scopes cross :data:`HEADER_BREAKS`."""

_TRIGGERS = frozenset({Kind.FORWARD, Kind.BACKWARD, Kind.BIDIRECTIONAL, Kind.CLAUSE})
# Words too frequent in captions to stand for a trigger in the fast path's word check (see
# NegationDetector.trigger_words); normalised as the tokens are.
_COMMON_WORDS = frozenset(
    normalize_term(w)
    for w in ("a", "an", "the", "of", "to", "with", "is", "are", "was", "were", "has", "have",
              "been", "be", "for", "any", "in", "on", "and", "or",
              # caption words that start triggers of the other categories ("years ago", "as
              # needed for", "s/p", "surgical history", "his wife"); their key word is the next
              "year", "as", "s", "surgical", "his", "her")
)


def _phrases(raw: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    out = {tuple(normalize_term(p).split(" ")) for p in raw}
    out.discard(("",))
    return tuple(sorted(out, key=lambda t: (-len(t), t)))


@dataclass(frozen=True)
class NegationRules:
    """The rule table and the scope in tokens (``None``: to the end of the sentence)."""

    rules: tuple[ContextRule, ...] = CONTEXT_RULES
    scope: int | None = DEFAULT_SCOPE
    list_words: frozenset[str] = LIST_WORDS


def mention_negated(flags: list[int] | None, start_tok: int, end_tok: int) -> bool:
    """Whether the mention over tokens ``[start_tok, end_tok)`` is negated, given
    :meth:`NegationDetector.negated_tokens`: its first token in a forward scope or its last in
    a backward one, so that a trigger inside the mention does not negate it."""
    if flags is None:
        return False
    return bool(flags[start_tok] & FORWARD_SCOPE or flags[end_tok - 1] & BACKWARD_SCOPE)


def mention_context(flags: list[int] | None, start_tok: int, end_tok: int) -> int:
    """The categories (bit ``1 << category``) of the mention over tokens
    ``[start_tok, end_tok)``: as :func:`mention_negated`, per category."""
    if flags is None:
        return 0
    first, last = flags[start_tok], flags[end_tok - 1] >> 1
    out = 0
    for c in range(len(Category)):
        if (first | last) >> (2 * c) & 1:
            out |= 1 << c
    return out


@dataclass
class NegationDetector:
    """Compiled :class:`NegationRules`; thread-safe and stateless after construction.

    It finds every category's scopes (the name is negation's, which came first). The compiled
    engine's ``NegationScanner`` runs :meth:`negated_tokens` itself and reads the detector's
    rules through its public accessors: :attr:`phrase_table`, :attr:`trigger_words`,
    :attr:`scope_limit`, :attr:`list_words`, and the class constants below (``kinds`` is
    :class:`Kind`).
    """

    rules: NegationRules = field(default_factory=NegationRules)
    sentence_breaks: ClassVar[frozenset[str]] = SENTENCE_BREAKS
    header_breaks: ClassVar[frozenset[str]] = HEADER_BREAKS
    header_crossing: ClassVar[int] = HEADER_CROSSING
    phrase_breaks: ClassVar[frozenset[str]] = PHRASE_BREAKS
    list_breaks: ClassVar[frozenset[str]] = LIST_BREAKS
    kinds: ClassVar[type[Kind]] = Kind
    category_names: ClassVar[type[Category]] = Category
    forward_scope: ClassVar[int] = FORWARD_SCOPE
    backward_scope: ClassVar[int] = BACKWARD_SCOPE

    def __post_init__(self) -> None:
        # first token → [(phrase tokens, kind, category, stop mask)], longest phrase first;
        # among phrases of one length the lower kind first (pseudo before triggers: "no
        # change" wins over "no"). One phrase, one entry: the lowest (kind, category) wins.
        by_rule: dict[tuple[Kind, int, int], list[str]] = {}
        for r in self.rules.rules:
            cat = -1 if r.category is None else int(r.category)
            also = sum({1 << c for c in r.ends})
            by_rule.setdefault((r.kind, cat, also), []).append(r.phrase)
        entries: dict[tuple[str, ...], tuple[int, int, int]] = {}
        for kind, cat, also in sorted(by_rule):
            if kind == Kind.LOCATION:
                stops = 0  # a location phrase is skipped by scopes, never ends them
            elif cat < 0:
                stops = ALL_CATEGORIES
            else:
                stops = 1 << cat | also
            for ph in _phrases(by_rule[(kind, cat, also)]):
                entries.setdefault(ph, (int(kind), cat, stops))
        table: dict[str, list[tuple[tuple[str, ...], int, int, int]]] = {}
        for ph, (code, cat, stops) in entries.items():
            table.setdefault(ph[0], []).append((ph, code, cat, stops))
        for lst in table.values():
            lst.sort(key=lambda e: (-len(e[0]), e[1], e[2]))
        self._table = table
        # Only a trigger can set anything, and a caption holds one only if it holds the
        # trigger's key word (its first that is not a common word: "with no" → "no", "to
        # exclude" → "exclude"). Terminations, pseudo-triggers, location words and common
        # words ("with", "in", "is", "to") are frequent and must not defeat the fast path.
        common = _COMMON_WORDS
        self._trigger_words = frozenset(
            next((tok for tok in ph if tok not in common), ph[-1])
            for ph, (kind, _, _) in entries.items()
            if kind in _TRIGGERS
        )
        limit = self.rules.scope
        self._limit = -1 if limit is None else limit

    def negated_tokens(
        self, text: str, norms: list[str], starts: list[int], ends: list[int]
    ) -> list[int] | None:
        """Per token, the scope bits of every category it lies in (:data:`FORWARD_SCOPE` |
        :data:`BACKWARD_SCOPE` for negation, shifted by ``2 * category`` for the others; see
        :func:`mention_context`); ``None`` when no token is in any scope."""
        if self._trigger_words.isdisjoint(norms):
            return None
        n = len(norms)
        # Phrase hits: (start, end, kind, category, stop mask); a token belongs to at most one
        hits: list[tuple[int, int, int, int, int]] = []
        i = 0
        table = self._table
        while i < n:
            cands = table.get(norms[i])
            if cands:
                for ph, kind, cat, stops in cands:
                    L = len(ph)
                    if tuple(norms[i : i + L]) == ph and not _breaks_inside(
                        text, starts, ends, i, i + L
                    ):
                        hits.append((i, i + L, kind, cat, stops))
                        i += L
                        break
                else:
                    i += 1
            else:
                i += 1
        if not any(h[2] in _TRIGGERS for h in hits):
            return None
        # stop[t]: the categories whose scopes token t ends (it is part of such a phrase);
        # head[t] / head_cat[t]: kind and category of the phrase starting at token t, or -1
        stop = [0] * n
        head = [-1] * n
        head_cat = [-1] * n
        for s, e, kind, cat, stops in hits:
            head[s] = kind
            head_cat[s] = cat
            for t in range(s, e):
                stop[t] |= stops
        # brk[t] / hdr[t] / comma[t]: sentence punctuation (other than a colon) / a colon /
        # a comma between token t-1 and t
        brk = [False] * (n + 1)
        hdr = [False] * (n + 1)
        comma = [False] * (n + 1)
        strict = SENTENCE_BREAKS - HEADER_BREAKS
        for t in range(1, n):
            gap = text[ends[t - 1] : starts[t]]
            if gap != " ":
                brk[t] = not strict.isdisjoint(gap)
                hdr[t] = not HEADER_BREAKS.isdisjoint(gap)
                comma[t] = not LIST_BREAKS.isdisjoint(gap)
        # loc[t]: token t is in a location phrase (a location word up to the next comma,
        # list word, other phrase or sentence end)
        loc = [False] * n
        inside = False
        words = self.rules.list_words
        for t in range(n):
            if head[t] == Kind.LOCATION:
                inside = True
            elif brk[t] or hdr[t] or comma[t] or stop[t] or norms[t] in words:
                inside = False
            loc[t] = inside
        out = [0] * n
        limit = self._limit
        for s, e, kind, cat, _ in hits:
            if kind not in _TRIGGERS:
                continue
            own = 1 << cat
            fbit = FORWARD_SCOPE << 2 * cat
            bbit = BACKWARD_SCOPE << 2 * cat
            crosses = bool(HEADER_CROSSING & own)
            if kind == Kind.CLAUSE:
                # backward when the trigger ends its clause; forward when the clause goes on,
                # unless another phrase comes right before it ("showing excluded stomach
                # distention" is the surgical "excluded stomach")
                if e >= n or brk[e] or hdr[e] or comma[e]:
                    kind = Kind.BACKWARD
                elif s > 0 and not (brk[s] or hdr[s]) and stop[s - 1]:
                    continue
                else:
                    kind = Kind.FORWARD
            if kind == Kind.FORWARD or kind == Kind.BIDIRECTIONAL:
                t = e
                item = -1  # first token after the last comma in the scope
                while (t < n and t - e != limit and not brk[t] and (crosses or not hdr[t])
                       and not stop[t] & own):
                    if comma[t] and t > e:
                        item = t
                    if not loc[t]:
                        out[t] |= fbit
                    t += 1
                if (t < n and head[t] == Kind.CLOSE and head_cat[t] == cat and not brk[t]
                        and not hdr[t] and item >= 0):
                    for q in range(item, t):
                        out[q] &= ~fbit
            if kind == Kind.BACKWARD or kind == Kind.BIDIRECTIONAL:
                t = s - 1
                while (t >= 0 and s - 1 - t != limit and not brk[t + 1]
                       and (crosses or not hdr[t + 1]) and not stop[t] & own):
                    if not loc[t]:
                        out[t] |= bbit
                    t -= 1
        return out if any(out) else None

    @property
    def phrase_table(self) -> Mapping[str, list[tuple[tuple[str, ...], int, int, int]]]:
        """First normalised token → [(phrase tokens, kind, category or -1 for all, stop mask
        of the categories whose scopes it ends)], longest phrase first and, among phrases of
        one length, the lower :class:`Kind` first."""
        return self._table

    @property
    def trigger_words(self) -> frozenset[str]:
        """One key word per trigger (its first word that is not a common one such as "with"
        or "is"): a caption without any of them has no token in any scope."""
        return self._trigger_words

    @property
    def scope_limit(self) -> int:
        """The most tokens a scope covers; -1 for no limit (to the end of the sentence)."""
        return self._limit

    @property
    def list_words(self) -> frozenset[str]:
        """Normalised words that end a location phrase (:data:`LIST_WORDS`)."""
        return self.rules.list_words


def _breaks_inside(text: str, starts: list[int], ends: list[int], i: int, j: int) -> bool:
    for t in range(i + 1, j):
        gap = text[ends[t - 1] : starts[t]]
        if gap != " " and not PHRASE_BREAKS.isdisjoint(gap):
            return True
    return False
