"""The extraction engine: caption in, concepts with exact offsets out — no I/O on the way.

One :class:`Extractor` per loaded index, shared by the service, the CLIs and the spaCy
component. The pipeline for one caption, each stage in its own module:

1. **normalise + tokenise** (:func:`conceptsvc.normalize.tokenize_spans`): normalised tokens and
   their code-point spans in the original text;
2. **match** (:mod:`conceptsvc.matcher`): every window that spells a dictionary key; in
   ``approximate`` mode also trigram-similar windows that no exact match touches
   (:mod:`conceptsvc.approximate`);
3. **filter**: semantic types / groups, sources, excluded CUIs (semantics below);
4. **abbreviations** (:mod:`conceptsvc.abbreviations`): short forms defined in the caption take
   their long form's concept; a key with several concepts is resolved by definition, context,
   type preference and prior — ties are kept, never silently cut to the first CUI. Filtering
   comes first so that a filter can decide an ambiguity ("CT" with a Bacterium filter);
5. **overlap resolution**: ``longest`` (greedy by token length, then score), ``best_score``
   (greedy by score, then length) or ``all``;
6. **context** (:mod:`conceptsvc.negation`): per mention ConText's ``negated``,
   ``hypothetical``, ``historical`` and ``experiencer`` (scopes; ``negation.mention_context``);
   negated mentions are dropped when ``include_negated`` is false, hypothetical ones when
   ``include_hypothetical`` is (unset: the profile's ``include_hypothetical``);
7. **profile** (:mod:`conceptsvc.profile`): the dataset's conventions for the concept set, from
   a data file; it may drop concepts and infer concepts that have no mention.

Filter semantics, for multi-typed concepts (QuickUMLS issue #14): ``semantic_types`` and
``semantic_groups`` together name one set of accepted TUIs (their union; a group stands for all
its types; a type stands for itself only, not its descendants). A concept passes if **any** of
its semantic types is accepted — "Pleural effusion disorder" typed Disease or Syndrome *and*
Finding passes a Finding filter. ``sources`` applies to the matched string: a concept passes if
one of the dictionary strings matched at that span comes from an accepted source.
``exclude_cuis`` always wins. Concepts a profile infers without a mention pass the same
filters (a sources filter passes none of them: no string of theirs was matched); the profile
decides on the filtered mentions first, so a filtered-out inference is dropped, not replaced.

Two implementations, one behaviour: this module and the stage modules are the reference, in
plain Python; ``conceptsvc/_speedups.pyx`` (Cython, built by ``make install``) runs the same
pipeline per caption with the interpreter out of the loop — a token table keyed by the
caption's code points, the index's memory-mapped token trie (built by the index build, at
any index size), filtering a key's postings over the index's mapped arrays (sources, types,
exclusions and the ``MAX_CANDIDATES`` shortlist, under each plan's ``fast_filter``),
negation, profiles and caption definitions in C — and calls back into these modules for
whatever is rare (a token seen for the first time, a key's case rules, ambiguous spans).
Approximate matching's windows and trigram search run in a second extension,
``conceptsvc/_approx.pyx``, over the index's mapped trigram lists (reference:
:mod:`conceptsvc.approximate`), in every engine but ``"reference"``. Its rules are these
modules': each stage hands over its constants and tables, or exposes them through public
accessors (``ExactMatcher.key_trie``, ``NegationDetector.phrase_table``, ``Profile.slots``,
``matcher.posting_checks``, ...).
``Extractor(index, engine=...)`` chooses: ``"compiled"``, ``"reference"`` (no compiled code at
all), or ``"auto"`` — the compiled engine whenever the extension is built (and not switched off
with ``CONCEPTSVC_PURE_PYTHON=1``).
``tests/test_speedups.py`` holds the two to the same annotations.

Scores: an exact match scores 1.0; an approximate one its trigram similarity.
``Annotation.concepts`` holds the deduplicated CUIs in order of first mention, followed by the
concepts a profile inferred without a mention (e.g. ROCOv2's imaging modality).
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from conceptsvc.abbreviations import (
    MAX_CANDIDATES,
    AmbiguityResolver,
    Ranking,
    fast_find_definitions,
    find_definitions,
)
from conceptsvc.approximate import APPROX, ApproximateMatcher
from conceptsvc.errors import ExtractArgumentError, ExtractionError, SemanticNetworkError
from conceptsvc.index import (
    FLAG_ABBREVIATION,
    FLAG_CASE_SENSITIVE,
    FLAG_PREFERRED,
    ConceptIndex,
    Posting,
)
from conceptsvc.matcher import ExactMatcher, Match, posting_checks, surface_check
from conceptsvc.model import (
    Annotation,
    Candidate,
    ExtractOptions,
    Mention,
    MentionRows,
    batch_items,
    id_string,
)
from conceptsvc.negation import Category, NegationDetector, mention_context
from conceptsvc.normalize import (
    SPEEDUPS,
    SPEEDUPS_ABSENT,
    STOPWORDS,
    normalize_term,
    tokenize_spans,
    tokenize_spans_py,
)
from conceptsvc.profile import Profile, available_profiles, load_profile
from conceptsvc.semantic_network import load_semantic_network

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from conceptsvc._speedups import FastPath, PostingFilter

__all__ = [
    "ENGINES",
    "Extractor",
    "WeightedMemo",
    "option_items",
    "options_weight",
]

ENGINES = ("auto", "compiled", "reference")

_PLAN_CACHE_SIZE = 256
PLAN_CACHE_BYTES = 64 << 20
"""Approximate bytes an :class:`Extractor`'s plan cache holds: the option sets (see
:func:`options_weight`) and the plans' memos (``_MEMO_ENTRY_BYTES`` an entry, counted when the
extractor moves from a plan to another); with ``_PLAN_CACHE_SIZE`` plans at most."""
_MEMO_ENTRY_BYTES = 400
"""Approximate bytes of one entry of a plan's memos (``fast_memo``, ``filtered``, ``accept``):
a key's accepted (cui, posting) pairs with their ``Posting`` objects, 370 bytes an entry
measured by tracemalloc over the demo dictionary (mostly one concept a key); keys with many
concepts weigh more."""
_PLAN_MEMO_MAX = 1 << 16
"""Entries of a plan's Python memos (``accept``, ``filtered``) before each is emptied, as the
compiled path's ``FAST_MEMO_MAX``: their keys come from caption text, so without a bound one
plan's memos grow with every new CUI and key a client's captions reach."""
_RANKING_MEMO_SIZE = 1 << 16
RANKING_MEMO_BYTES = 32 << 20
"""Approximate bytes of the ambiguous spans' rankings an :class:`Extractor` keeps
(:meth:`abbreviations.Ranking.weight`); with ``_RANKING_MEMO_SIZE`` rankings at most."""
CONCEPT_MEMO_SIZE = 1 << 18
"""Concepts whose (preferred name, semantic types) an :class:`Extractor` keeps
(:meth:`Extractor.concept_info`, filled by both engines) before the memo is emptied: one entry
is ≈ 200–250 bytes, so a long-lived worker over a full UMLS (≈ 3M concepts) would
otherwise keep every concept its captions ever reached."""
_PLAN_BASE_BYTES = 4096  # a plan's fixed part: dataclass, empty memos, profile/resolver refs
_OPTION_ITEM_BYTES = 100  # per list item, beyond its characters: see options_weight
_new = tuple.__new__  # NamedTuple construction without its Python-level __new__


def option_items(options: ExtractOptions) -> int:
    """How many names the list-valued options hold (types, groups, sources, excluded CUIs)."""
    return (
        len(options.semantic_types) + len(options.semantic_groups) + len(options.sources)
        + len(options.exclude_cuis)
    )


def options_weight(options: ExtractOptions) -> int:
    """Approximate bytes a memo entry holding ``options`` and its resolved sets keeps alive.

    Each list item costs its characters plus ``_OPTION_ITEM_BYTES`` (100): measured on
    CPython 3.11, an 8-character CUI is a 57-byte ``str`` and an 8-byte tuple slot in the
    options, and about 42 bytes of the plan's frozenset. Used as the weight of an entry in the
    plan cache and in the service's options memo, so that both are bounded by bytes, not only
    by entries (issue 18, item 5: 300,000-CUI option sets grew a worker by 35 MB a request).
    """
    n = 0
    for values in (
        options.semantic_types, options.semantic_groups, options.sources, options.exclude_cuis
    ):
        n += sum(len(v) for v in values) + _OPTION_ITEM_BYTES * len(values)
    return n


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class WeightedMemo(Generic[_K, _V]):
    """A memo bounded by entry count and by the approximate bytes of its entries.

    Each entry has a weight (its approximate bytes, given by ``weigh`` when it is added); the
    oldest entries go first when either bound would be passed. An entry heavier than a quarter
    of ``max_bytes`` is not kept at all (:meth:`put` returns False): it would evict most of the
    others, and whoever sends option sets that large pays for their compilation per request.
    Lookups are plain dict reads; additions take a lock, so concurrent misses cannot overrun
    the bounds.
    """

    def __init__(self, max_entries: int, max_bytes: int, weigh: Callable[[_K, _V], int]) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("WeightedMemo needs max_entries >= 1 and max_bytes >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._weigh = weigh
        self._data: dict[_K, tuple[_V, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size_bytes(self) -> int:
        """The summed weights of the entries held now (never over ``max_bytes``)."""
        return self._bytes

    def get(self, key: _K) -> _V | None:
        hit = self._data.get(key)
        return None if hit is None else hit[0]

    def put(self, key: _K, value: _V, weight: int | None = None) -> bool:
        """Remember ``value`` under ``key``; False when it is too heavy to keep.

        ``weight`` overrides ``weigh`` for a caller that knows what the entry keeps alive
        better than the value can tell."""
        if weight is None:
            weight = self._weigh(key, value)
        if weight > self.max_bytes // 4:
            return False
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            data = self._data
            while data and (
                len(data) >= self.max_entries or self._bytes + weight > self.max_bytes
            ):
                _, evicted = data.pop(next(iter(data)))
                self._bytes -= evicted
            data[key] = (value, weight)
            self._bytes += weight
        return True

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


# bits of negation.mention_context
_NEGATED = 1 << Category.NEGATED
_HYPOTHETICAL = 1 << Category.HYPOTHETICAL
_HISTORICAL = 1 << Category.HISTORICAL
_OTHER = 1 << Category.OTHER_EXPERIENCER


class _Cand(NamedTuple):
    """A concept on a token span, after filtering (internal)."""

    start_tok: int
    end_tok: int
    cui: str
    posting: Posting
    score: float


@dataclass(frozen=True)
class _Plan:
    """Options compiled once: resolved filter sets, profile, resolver."""

    options: ExtractOptions
    include_hypothetical: bool  # the options', or the profile's when they leave it unset
    tuis: frozenset[str] | None
    sabs: frozenset[str] | None
    excluded: frozenset[str]
    profile: Profile
    resolver: AmbiguityResolver
    accept: dict[str, bool]  # memo: cui → passes the type filter / exclusion
    # memo: key → accepted (cui, posting)
    filtered: dict[str, tuple[tuple[str, Posting], ...]]
    # the compiled path's memo: key id, or (key id, surface) for keys whose postings need a
    # case check → accepted (cui, posting) pairs, or None when no posting passes the check
    fast_memo: dict[Any, tuple[tuple[str, Posting], ...] | None]
    # the compiled path's filters over the index's numbers (_speedups.FilterPlan), or None
    fast_filter: Any
    # which of the concepts the profile infers (without a mention) are reported: those the
    # index has (an index built without them, by a semantic-type filter say, must not report
    # concepts it cannot describe), and that the request's filters let through: the
    # exclusions and the semantic types as for a mentioned concept; a sources filter passes
    # none, since none of their strings was matched. The profile decides first, unfiltered
    # (its slot's evidence still says what the image is: with MRI excluded, "T2-weighted"
    # infers no other modality in its place).
    infer_ok: Callable[[str], bool] | None = None
    # the memos' entries when the plan was last weighed in the plan cache (Extractor._reweigh)
    weighed: list[int] = field(default_factory=lambda: [0])


def _passes_none(cui: str) -> bool:
    """A plan's ``infer_ok`` under a sources filter: no inferred concept passes it."""
    return False


def _memo_entries(plan: _Plan) -> int:
    return len(plan.fast_memo) + len(plan.filtered) + len(plan.accept)


def _plan_weight(options: ExtractOptions, plan: _Plan) -> int:
    """A plan's weight in the plan cache: its option sets (the options and the frozensets
    resolved from them, :func:`options_weight`), a fixed part, and its memos as they are now
    (``_MEMO_ENTRY_BYTES`` an entry). The memos grow as captions reach new keys, so a plan is
    weighed again when the extractor moves from it to another (:meth:`Extractor._reweigh`);
    each memo is also emptied at ``_PLAN_MEMO_MAX`` (the compiled path's ``FAST_MEMO_MAX``)
    entries. Without the memos, 256 plans of the demo dictionary held 560 MiB."""
    return _PLAN_BASE_BYTES + options_weight(options) + _MEMO_ENTRY_BYTES * _memo_entries(plan)


class Extractor:
    """Extracts concepts from captions with one loaded :class:`ConceptIndex`.

    Construction is cheap, and so is the first approximate request: its trigram lists are part
    of the index (memory-mapped), only the matcher object over them is made on first use.
    Thread-safe: a lost race on a memo table recomputes the same value, and the bounded ones
    (the plan cache, by bytes and count; a plan's memos, emptied when full) drop entries, never
    change them.

    ``engine`` chooses the implementation (the module docstring has both): ``"compiled"``
    runs ``conceptsvc/_speedups.pyx`` and raises :class:`ExtractionError` when it cannot (the
    extension is not built, or ``CONCEPTSVC_PURE_PYTHON=1`` switched it off); ``"reference"``
    runs the pure-Python modules and no compiled code at all; ``"auto"`` (the default) is the
    compiled engine when it can run, else the Python pipeline (still with the compiled
    tokeniser when the extension is built).
    :attr:`engine` says which one runs.
    """

    engine: str
    """``"compiled"`` or ``"reference"``: the implementation this extractor runs."""

    def __init__(
        self,
        index: ConceptIndex,
        *,
        default_options: ExtractOptions | None = None,
        engine: str = "auto",
    ) -> None:
        if engine not in ENGINES:
            raise ExtractionError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        self.index = index
        self._exact = ExactMatcher(index)
        compiled = engine != "reference" and SPEEDUPS is not None
        if engine == "compiled" and not compiled:
            raise ExtractionError(
                f"the compiled engine cannot run: {SPEEDUPS_ABSENT}; use engine='auto' or "
                "'reference'"
            )
        self.engine = "compiled" if compiled else "reference"
        self._engine = engine
        # the tokeniser of the Python pipeline (and of the ambiguity resolvers): the reference
        # engine runs no compiled code, "auto" keeps the compiled tokeniser when it has one
        self._tokenize = tokenize_spans_py if engine == "reference" else tokenize_spans
        self._approx: ApproximateMatcher | None = None
        self._lock = threading.Lock()
        self._negation = NegationDetector()
        self._sn = load_semantic_network()
        # bounded by the bytes of the option sets as well as by count: a client cycling
        # through large distinct exclude_cuis lists must not grow the worker (issue 18, item 5)
        self._plans: WeightedMemo[ExtractOptions, _Plan] = WeightedMemo(
            _PLAN_CACHE_SIZE, PLAN_CACHE_BYTES, _plan_weight
        )
        self._info: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._info_max = max(1, CONCEPT_MEMO_SIZE)  # read when the extractor is made
        self._known: dict[str, bool] = {}  # cui → whether the index has it (_in_index)
        self._anatomy = frozenset(self._sn.groups["ANAT"].tuis)
        self._resolvers: dict[str, AmbiguityResolver] = {}
        # (profile, an ambiguous span's concepts) → their ranking: a mention then costs what
        # its caption's words do, not what its concepts' strings do (issue 13, item 4)
        self._rankings: WeightedMemo[tuple[str, tuple[str, ...]], Ranking] = WeightedMemo(
            _RANKING_MEMO_SIZE, RANKING_MEMO_BYTES, lambda _k, r: r.weight()
        )
        # Every profile (shipped, and registered from the user's files) is parsed now, so no
        # request ever reads a profile file; a profile registered later is not this
        # extractor's (its compiled path was handed these).
        self._profile_names = tuple(available_profiles())
        for name in self._profile_names:
            load_profile(name)
        self.default_options = default_options or ExtractOptions()
        # (options object, its plan) of the previous request: batches reuse one options
        # object, and an identity check is cheaper than hashing an 11-field dataclass.
        self._last: tuple[ExtractOptions | None, _Plan | None] = (None, None)
        # The compiled hot path (conceptsvc/_speedups.pyx) runs the same pipeline; see
        # extract(). It gets the stages' rules from their public accessors, and this class's
        # own steps that it calls back (filtering, ambiguity, approximate matching) here.
        self._fast: FastPath | None = None
        # the compiled filtering of a key's postings (and the resolver's concept strings) over
        # the index's mapped arrays; every plan gets its filters when it is made
        self._postings: PostingFilter | None = None
        if compiled:
            self._postings = SPEEDUPS.PostingFilter(
                index,
                posting_checks=posting_checks,
                surface_check=surface_check,
                max_candidates=MAX_CANDIDATES,
                flag_preferred=FLAG_PREFERRED,
                flag_case_sensitive=FLAG_CASE_SENSITIVE,
                flag_abbreviation=FLAG_ABBREVIATION,
                posting_type=Posting,
                concept_memo=self._info,
                concept_memo_size=self._info_max,
            )
            self._fast = SPEEDUPS.FastPath(
                self._exact,
                tokenizer=tokenize_spans,
                negation=SPEEDUPS.NegationScanner(self._negation),
                definitions=fast_find_definitions,
                profiles=[load_profile(name) for name in self._profile_names],
                postings=self._postings,
                filter_postings=self._filter_postings,
                filter_matches=self._filter,
                # the compiled twin of _disambiguate, on the same rankings memo
                disambiguate=SPEEDUPS.Disambiguator(self._rankings, self.concept_info, STOPWORDS),
                approximate=self._approximate,
                concept_info=self.concept_info,
                concept_memo=self._info,
                context_exempt=self._context_exempt,
                mention_type=Mention,
                annotation_type=Annotation,
            )
        self.check_options(self.default_options)

    # -- options -----------------------------------------------------------------------------
    def profiles(self) -> list[str]:
        """The profiles this extractor serves: the shipped ones and those registered (from
        files) before it was made."""
        return list(self._profile_names)

    def check_options(self, options: ExtractOptions) -> None:
        """Raise ExtractionError / SemanticNetworkError if ``options`` cannot be served."""
        self._plan(options)

    def plan_options(self, options: ExtractOptions) -> ExtractOptions:
        """``options`` without the excluded CUIs this index does not have (they exclude
        nothing): the options a plan is made and cached for, so that option sets differing
        only in such CUIs share one plan — each made a plan of its own, with its own memos,
        before. ``options`` itself when every excluded CUI is in the index."""
        excluded = options.exclude_cuis
        if not excluded:
            return options
        index = self.index
        known = tuple(c for c in excluded if c in index)
        return options if len(known) == len(excluded) else replace(options, exclude_cuis=known)

    def _reweigh(self, plan: _Plan) -> None:
        """Weigh ``plan`` again in the plan cache by its memos now (they grow with the keys its
        captions reach); one heavier than the cache keeps has its memos emptied instead."""
        entries = _memo_entries(plan)
        if entries == plan.weighed[0]:
            return
        plan.weighed[0] = entries
        if not self._plans.put(plan.options, plan):
            plan.fast_memo.clear()
            plan.filtered.clear()
            plan.accept.clear()
            plan.weighed[0] = 0
            self._plans.put(plan.options, plan)

    def _plan(self, options: ExtractOptions) -> _Plan:
        plan = self._plans.get(options)
        if plan is not None:
            return plan
        options.validate()
        if any(not isinstance(c, str) or not c.strip() for c in options.exclude_cuis):
            raise ExtractionError("exclude_cuis must be non-empty CUI strings")
        planned = self.plan_options(options)
        if planned is not options:
            plan = self._plans.get(planned)
            if plan is not None:
                return plan
        o = options = planned
        if o.profile not in self._profile_names:
            load_profile(o.profile)  # an unknown name: its error, with the names there are
            raise ExtractionError(
                f"profile {o.profile!r} was registered after this Extractor was made; make a "
                "new Extractor to use it"
            )
        profile = load_profile(o.profile)
        tuis: set[str] = set()
        for name in o.semantic_types:
            tuis |= self._sn.resolve(name)
        for name in o.semantic_groups:
            key = name.strip()
            group = key.upper() if key.upper() in self._sn.groups else None
            if group is None:
                folded = key.casefold()
                group = next(
                    (g.code for g in self._sn.groups.values() if g.name.casefold() == folded),
                    None,
                )
            if group is None:
                codes = [g.code for g in self._sn.groups.values()]
                close = difflib.get_close_matches(key.upper(), codes, n=3, cutoff=0.6)
                raise SemanticNetworkError(name, close or codes)
            tuis |= set(self._sn.groups[group].tuis)
        known_sabs = set(self.index.sabs)
        unknown = [s for s in o.sources if s not in known_sabs]
        if unknown:
            raise ExtractionError(
                f"unknown source(s) {', '.join(unknown)}; this index has: "
                f"{', '.join(sorted(known_sabs))}"
            )
        resolver = self._resolvers.get(profile.name)
        if resolver is None:
            self._warn_profile_gaps(profile)  # once per profile: resolvers are kept by name
            resolver = self._resolvers[profile.name] = AmbiguityResolver(
                self.index,
                type_preference=profile.type_preference,
                priors=profile.priors,
                tokenize=self._tokenize,
                concept_strings=(
                    None if self._postings is None else self._postings.concept_strings
                ),
            )
        tui_set = frozenset(tuis) if (o.semantic_types or o.semantic_groups) else None
        sab_set = frozenset(o.sources) if o.sources else None
        excluded = frozenset(o.exclude_cuis)
        accept: dict[str, bool] = {}
        infer_ok: Callable[[str], bool] | None = None
        if sab_set is not None:
            infer_ok = _passes_none
        elif tui_set is not None or excluded:
            infer_ok = functools.partial(
                self._infers, functools.partial(self._accepts_in, accept, excluded, tui_set)
            )
        elif not all(self._in_index(c) for c in profile.inferable):
            infer_ok = self._in_index  # (else every concept it can infer is in the index)
        plan = _Plan(
            options=o,
            include_hypothetical=(
                profile.include_hypothetical if o.include_hypothetical is None
                else o.include_hypothetical
            ),
            tuis=tui_set,
            sabs=sab_set,
            excluded=excluded,
            profile=profile,
            resolver=resolver,
            accept=accept,
            filtered={},
            fast_memo={},
            fast_filter=(
                None if self._postings is None
                else self._postings.plan(tui_set, sab_set, excluded, profile)
            ),
            infer_ok=infer_ok,
        )
        self._plans.put(options, plan)
        return plan

    @property
    def plan_cache(self) -> WeightedMemo[ExtractOptions, Any]:
        """The compiled options (plans) kept for reuse, with their size accounting."""
        return self._plans

    # -- concepts ------------------------------------------------------------------------------
    def concept_info(self, cui: str) -> tuple[str, tuple[str, ...]]:
        """(preferred name, semantic types) of a concept in the index, memoised."""
        info = self._info.get(cui)
        if info is None:
            info = self.index.name_and_types(cui) or (cui, ())
            if len(self._info) >= self._info_max:  # every reader falls back to this method
                self._info.clear()
            self._info[cui] = info
        return info

    def _in_index(self, cui: str) -> bool:
        """Whether the index has ``cui`` (memoised; asked only of concepts a profile can
        infer)."""
        known = self._known.get(cui)
        if known is None:
            if len(self._known) >= self._info_max:
                self._known.clear()
            known = self._known[cui] = self.index.name_and_types(cui) is not None
        return known

    def profile_gaps(self, profile: Profile) -> dict[str, tuple[str, ...]]:
        """Per slot of ``profile``, the concepts it can label (members and defaults) that this
        index lacks, in the profile's order; slots that lack none are left out. The profile
        never reports those: an index built with a semantic-type or source filter can drop,
        say, every X-ray projection (T082) that ``rocov2`` labels."""
        gaps: dict[str, tuple[str, ...]] = {}
        for slot in profile.slots:
            missing = tuple(c for c in slot.labels if not self._in_index(c))
            if missing:
                gaps[slot.name] = missing
        return gaps

    def _warn_profile_gaps(self, profile: Profile) -> None:
        gaps = self.profile_gaps(profile)
        if not gaps:
            return
        said = "; ".join(
            f"slot {name!r}: {', '.join(cuis[:6])}{', ...' if len(cuis) > 6 else ''}"
            f" ({len(cuis)} of {len(next(s for s in profile.slots if s.name == name).members)}"
            " members)"
            for name, cuis in gaps.items()
        )
        log.warning(
            "profile %s: this index lacks concepts the profile labels, so it never reports "
            "them (%s); an index build's semantic-type, source or language filter dropped "
            "them: rebuild with their types and sources kept to get those labels",
            profile.name, said,
        )

    def _context_exempt(self, cui: str) -> bool:
        """Whether ``cui``'s semantic types are all anatomical (group ANAT): a body part, region
        or space is where a finding is, so it takes no context of its own — in "no fracture of
        the femur" or "no intracranial bleeding" the femur and "intracranial" are not negated
        (they were, and ``--drop-negated`` dropped them: 176 anatomy concepts of the ROCOv2
        validation captions, 131 of them in the gold). Asked only of mentions that some context
        would mark; the types come from the concept memo (:meth:`concept_info`)."""
        tuis = self.concept_info(cui)[1]
        return bool(tuis) and all(t in self._anatomy for t in tuis)

    def _infers(self, accepts: Callable[[str], bool], cui: str) -> bool:
        """A filtered plan's :attr:`_Plan.infer_ok`: the index has ``cui`` and ``accepts`` it
        (:meth:`_accepts_in` bound to the plan's exclusions and semantic types)."""
        return self._in_index(cui) and accepts(cui)

    def _accepts(self, plan: _Plan, cui: str) -> bool:
        return self._accepts_in(plan.accept, plan.excluded, plan.tuis, cui)

    def _accepts_in(
        self,
        accept: dict[str, bool],
        excluded: frozenset[str],
        tuis: frozenset[str] | None,
        cui: str,
    ) -> bool:
        """Whether ``cui`` passes the exclusions and the semantic types (memoised in a plan's
        ``accept``; a filtered plan's :attr:`_Plan.infer_ok` asks it too, :meth:`_infers`)."""
        ok = accept.get(cui)
        if ok is None:
            if cui in excluded:
                ok = False
            elif tuis is None:
                ok = True
            else:
                ok = not tuis.isdisjoint(self.concept_info(cui)[1])
            if len(accept) >= _PLAN_MEMO_MAX:
                accept.clear()
            accept[cui] = ok
        return ok

    def _approximate(self) -> ApproximateMatcher:
        if self._approx is None:
            with self._lock:
                if self._approx is None:
                    # the compiled search whenever any compiled code may run: it reads the
                    # index's mapped trigram lists, whatever the index's size
                    self._approx = ApproximateMatcher(
                        self._exact,
                        compiled=self._engine == "compiled"
                        or (self._engine == "auto" and APPROX is not None),
                    )
        return self._approx

    # -- extraction ----------------------------------------------------------------------------
    def _plan_of(self, options: ExtractOptions | None) -> _Plan:
        """The plan of ``options`` (the defaults when None); the last one used is kept at hand,
        since a worker's calls mostly repeat the same options."""
        last = self._last
        if options is None:
            options = self.default_options
        plan = last[1]
        if last[0] is not options or plan is None:
            if plan is not None:  # leaving it: its memos' growth counts in the cache now
                self._reweigh(plan)
            plan = self._plan(options)
        self._last = (options, plan)
        return plan

    def extract(
        self, text: str, options: ExtractOptions | None = None, *, id: str = ""
    ) -> Annotation:
        """Concepts of one caption. Offsets are code-point offsets into ``text``.

        An integer ``id`` becomes its string, as in :meth:`extract_batch`; any other non-string
        id raises :class:`~conceptsvc.errors.ExtractArgumentError`."""
        if id.__class__ is not str:
            id = _id_string(id)
        plan = self._plan_of(options)
        if self._fast is not None:
            return self._fast.extract(text, plan, id)
        o = plan.options
        norms, starts, ends = self._tokenize(text)
        matches = self._exact.match(text, norms, starts, ends)
        if o.mode == "approximate":
            covered = [False] * len(norms)
            for m in matches:
                for t in range(m.start_tok, m.end_tok):
                    covered[t] = True
            matches += self._approximate().match(
                text, norms, starts, ends, covered, o.similarity, o.threshold
            )
        cands = self._filter(plan, matches)
        if "(" in text and cands:
            cands = self._apply_definitions(plan, text, norms, starts, ends, cands)
        if len(cands) > 1:
            cands = self._disambiguate(plan, norms, cands)
            if o.overlap != "all" and len(cands) > 1:
                cands = _resolve_overlaps(cands, o.overlap)
        if not cands and plan.profile.is_identity:
            return Annotation(id=id, mentions=(), concepts=())
        flags: list[int] | None = None
        if cands:
            flags = self._negation.negated_tokens(text, norms, starts, ends)
        # (start_tok, end_tok, cui, candidate, categories): plain tuples sort without a key
        records: list[tuple[int, int, str, _Cand, int]] = []
        for c in cands:
            ctx = 0
            if flags is not None:
                ctx = mention_context(flags, c.start_tok, c.end_tok)
                if ctx and self._context_exempt(c.cui):
                    ctx = 0
                if ctx & _NEGATED and not o.include_negated:
                    continue
                if ctx & _HYPOTHETICAL and not plan.include_hypothetical:
                    continue
            records.append((c.start_tok, c.end_tok, c.cui, c, ctx))
        records.sort()
        mentioned = list(dict.fromkeys([r[2] for r in records]))
        inferred: tuple[str, ...] = ()
        if not plan.profile.is_identity:
            res = plan.profile.apply(mentioned, text, norms, starts, ends)
            kept = res.kept
            if len(kept) != len(mentioned) or not kept.issuperset(mentioned):
                records = [r for r in records if r[2] in kept]
                mentioned = [c for c in mentioned if c in kept]
            inferred = res.inferred
            if inferred and plan.infer_ok is not None:  # the request's filters hold for them
                inferred = tuple(c for c in inferred if plan.infer_ok(c))
        mentions: tuple[Mention, ...] = ()
        if o.include_mentions and records:
            out = []
            info = self._info
            for i, j, cui, c, ctx in records:
                s, e = starts[i], ends[j - 1]
                ci = info.get(cui) or self.concept_info(cui)
                out.append(Mention(
                    cui, ci[0], text[s:e], s, e, c.score, ci[1], c.posting.sab,
                    bool(ctx & _NEGATED), bool(ctx & _HYPOTHETICAL), bool(ctx & _HISTORICAL),
                    "other" if ctx & _OTHER else "patient",
                ))
            mentions = tuple(out)
        return Annotation(id=id, mentions=mentions, concepts=(*mentioned, *inferred))

    def extract_rows(self, text: str, options: ExtractOptions | None = None) -> MentionRows:
        """:meth:`extract` for a writer of wire bytes (the service's): the mentions as tuples of
        their fields (:meth:`Mention.row`) and the concepts. The compiled path builds no
        Mention or Annotation object for them."""
        if self._fast is not None:
            return self._fast.extract_rows(text, self._plan_of(options))
        a = self.extract(text, options)
        return tuple(m.row() for m in a.mentions), a.concepts

    def extract_batch(
        self,
        items: Iterable[str] | Iterable[tuple[str, str]] | Mapping[str, str],
        options: ExtractOptions | None = None,
    ) -> list[Annotation]:
        """Annotate many texts; results in the same order.

        ``items`` are plain texts (each annotation's ``id`` is then the text's position as a
        string: ``"0"``, ``"1"``, ...), ``(id, text)`` pairs, or a mapping of id to text; see
        :func:`~conceptsvc.model.batch_items` for what is refused.
        """
        return [self.extract(text, options, id=id_) for id_, text in batch_items(items)]

    def _filter(self, plan: _Plan, matches: list[Match]) -> list[_Cand]:
        """One candidate per (span, concept) that passes the request's filters."""
        out: list[_Cand] = []
        memo = plan.filtered
        for m in matches:
            pairs = memo.get(m.key) if m.stable else None
            if pairs is None:
                pairs = self._filter_postings(plan, m.postings)
                if m.stable:
                    if len(memo) >= _PLAN_MEMO_MAX:
                        memo.clear()
                    memo[m.key] = pairs
            for cui, p in pairs:
                out.append(_new(_Cand, (m.start_tok, m.end_tok, cui, p, m.score)))
        return out

    def _filter_postings(
        self, plan: _Plan, postings: Sequence[Posting]
    ) -> tuple[tuple[str, Posting], ...]:
        """The accepted concepts of a key's postings, each with its best posting (the
        preferred name if it matched, else the first accepted string); at most
        ``MAX_CANDIDATES`` of them, the resolver's shortlist — what disambiguation would keep
        of them anyway, so that a mention of a key with thousands of concepts costs what one
        with 64 does (``conceptsvc.abbreviations`` has the rule)."""
        best: dict[str, Posting] = {}
        sabs = plan.sabs
        for p in postings:
            if sabs is not None and p.sab not in sabs:
                continue
            if not self._accepts(plan, p.cui):
                continue
            prev = best.get(p.cui)
            if prev is None or (p.flags & FLAG_PREFERRED and not prev.flags & FLAG_PREFERRED):
                best[p.cui] = p
        if len(best) > MAX_CANDIDATES:
            cuis = list(best)
            kept = plan.resolver.shortlist(cuis, {c: self.concept_info(c)[1] for c in cuis})
            return tuple((c, best[c]) for c in kept)
        return tuple(best.items())

    def _apply_definitions(
        self,
        plan: _Plan,
        text: str,
        norms: list[str],
        starts: list[int],
        ends: list[int],
        cands: list[_Cand],
    ) -> list[_Cand]:
        """Short forms defined in the caption take the long form's concept(s)."""
        defs = find_definitions(text)
        if not defs:
            return cands
        tok_at_start = {s: i for i, s in enumerate(starts)}
        tok_at_end = {e: i for i, e in enumerate(ends)}
        for d in defs:
            # the long form's concept: the longest candidate ending at the long form's end
            lf_end_tok = tok_at_end.get(d.long_end)
            if lf_end_tok is None:
                continue
            inside = [
                c
                for c in cands
                if c.end_tok == lf_end_tok + 1 and starts[c.start_tok] >= d.long_start
            ]
            if not inside:
                continue
            first = min(c.start_tok for c in inside)
            lf_cands = [c for c in inside if c.start_tok == first]
            spans: list[tuple[int, int]] = []
            pattern = re.compile(r"(?<!\w)" + re.escape(d.short) + r"(?!\w)")
            for m in pattern.finditer(text):
                i = tok_at_start.get(m.start())
                j = tok_at_end.get(m.end())
                if i is not None and j is not None and j >= i:
                    spans.append((i, j + 1))
            if not spans:
                continue
            span_set = set(spans)
            cands = [c for c in cands if (c.start_tok, c.end_tok) not in span_set]
            for i, j in spans:
                for c in lf_cands:
                    cands.append(_Cand(i, j, c.cui, c.posting, c.score))
        return cands

    def _disambiguate(self, plan: _Plan, norms: list[str], cands: list[_Cand]) -> list[_Cand]:
        """Resolve spans that carry several concepts (see conceptsvc.abbreviations).

        Reads candidates by position (start, end, cui), so the compiled engine hands over its
        plain tuples of the same fields and gets the kept ones back, unconverted."""
        if len(cands) < 2:
            return cands
        prev = cands[0]
        for c in cands[1:]:
            if c[0] == prev[0] and c[1] == prev[1]:
                break  # candidates are in span order: a repeat is adjacent
            prev = c
        else:
            return cands
        by_span: dict[tuple[int, int], list[_Cand]] = {}
        for c in cands:
            by_span.setdefault((c[0], c[1]), []).append(c)
        context = frozenset(norms) - STOPWORDS
        out: list[_Cand] = []
        for (i, j), group in by_span.items():
            if len(group) == 1:
                out.extend(group)
                continue
            cuis = tuple([c[2] for c in group])
            memo_key = (plan.profile.name, cuis)
            ranking = self._rankings.get(memo_key)
            if ranking is None:
                ranking = plan.resolver.ranking(cuis, {c: self.concept_info(c)[1] for c in cuis})
                self._rankings.put(memo_key, ranking, ranking.weight())
            keep = ranking.best(context.difference(norms[i:j]))
            if len(keep) == 1:
                only = keep[0]
                out.extend([c for c in group if c[2] == only])
            else:
                kept = set(keep)
                out.extend([c for c in group if c[2] in kept])
        return out

    # -- search ----------------------------------------------------------------------------------
    def search(
        self, query: str, *, limit: int = 10, options: ExtractOptions | None = None
    ) -> list[Candidate]:
        """Concepts whose dictionary strings match ``query``: exact first, then approximate.

        Approximate candidates use the options' similarity and threshold; each concept appears
        once, with its best-scoring string. Filters apply as in :meth:`extract`.
        """
        plan = self._plan(options or self.default_options)
        if limit <= 0:
            raise ExtractionError(f"limit must be positive, got {limit}")
        key = normalize_term(query)
        if not key:
            return []
        found: dict[str, tuple[float, Posting, set[str]]] = {}

        def add(postings: Sequence[Posting], score: float) -> None:
            for p in postings:
                if plan.sabs is not None and p.sab not in plan.sabs:
                    continue
                if not self._accepts(plan, p.cui):
                    continue
                prev = found.get(p.cui)
                if prev is None or score > prev[0]:
                    found[p.cui] = (score, p, prev[2] if prev else set())
                found[p.cui][2].add(p.sab)

        add(self.index.postings(key), 1.0)
        if len(found) < limit:
            approx = self._approximate()
            for k, sim in approx.search(key, plan.options.similarity, plan.options.threshold):
                if k != key:
                    add(self.index.postings(k), sim)
        ranked = sorted(found.items(), key=lambda kv: (-kv[1][0], kv[0]))[:limit]
        out = []
        for cui, (score, p, sabs) in ranked:
            name, types = self.concept_info(cui)
            out.append(Candidate(cui, name, p.string, round(score, 6), types, tuple(sorted(sabs))))
        return out


def _id_string(id_: object) -> str:
    """An annotation id given as something else than a string: an integer's string (as
    :func:`~conceptsvc.model.batch_items` makes it, :func:`~conceptsvc.model.id_string`), or
    ExtractArgumentError."""
    rid = id_string(id_)
    if rid is not None:
        return str(rid)  # (a str subclass too becomes a str)
    raise ExtractArgumentError(
        f"extract(text, id=...) takes a string (an integer becomes its string), got "
        f"{id_!r} ({type(id_).__name__}); for example: extract(text, id=\"cap1\")."
    )


def _resolve_overlaps(cands: list[_Cand], how: str) -> list[_Cand]:
    """Keep non-overlapping spans greedily; all concepts on a kept span survive."""
    # The common case is no overlap at all. A candidate that starts before the furthest end
    # seen so far (and is not on the same span as its predecessor) may overlap; that check
    # never misses an overlap, whatever the order.
    max_end = -1
    prev: tuple[int, int] = (-1, -1)
    for c in cands:
        span = (c.start_tok, c.end_tok)
        if c.start_tok < max_end and span != prev:
            break
        prev = span
        if c.end_tok > max_end:
            max_end = c.end_tok
    else:
        return cands
    spans: dict[tuple[int, int], float] = {}
    for c in cands:
        k = (c.start_tok, c.end_tok)
        if c.score > spans.get(k, -1.0):
            spans[k] = c.score
    # plain tuples sort without a key function: (-length, -score, start, end) for "longest"
    order: list[tuple[float, float, int, int]]
    if how == "longest":
        order = sorted([(float(i - j), -sc, i, j) for (i, j), sc in spans.items()])
    else:
        order = sorted([(-sc, float(i - j), i, j) for (i, j), sc in spans.items()])
    taken = bytearray(max(c.end_tok for c in cands))
    kept: set[tuple[int, int]] = set()
    for _a, _b, i, j in order:
        if taken.find(1, i, j) >= 0:
            continue
        kept.add((i, j))
        taken[i:j] = b"\x01" * (j - i)
    return [c for c in cands if (c.start_tok, c.end_tok) in kept]
