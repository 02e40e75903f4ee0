"""QuickUMLS behind conceptsvc's extractor interface (optional extra ``conceptsvc[quickumls]``).

Why it exists: some users want QuickUMLS's exact matching behaviour (it labelled ROCO), and the
benchmarks need QuickUMLS as the reference on the *same* dictionary. This module builds a
QuickUMLS index from the same RRF files conceptsvc reads — non-interactively, without
downloads — and serves it with the :class:`~conceptsvc.extractor.Extractor` call signatures,
returning :class:`~conceptsvc.model.Annotation` with code-point offsets into the original text.

How QuickUMLS is driven (its installer prompts, downloads a spaCy model and calls
``nltk.download``; none of that happens here):

- the index is written by QuickUMLS's own ``install.parse_and_encode_ngrams`` (simstring
  database + CUI/semantic-type database) from rows read by :mod:`conceptsvc.sources.rrf`, with
  the flag files its installer writes; the build goes to a sibling temporary directory that is
  renamed into place at the end, and never replaces an existing directory;
- matching uses a blank spaCy English pipeline (no trained model exists offline), so QuickUMLS's
  part-of-speech heuristics (skip determiners, adpositions, conjunctions) are inactive — its
  punctuation, stopword and number rules still apply;
- NLTK's English stopword list ships as package data (``data/nltk``, with attribution) and is
  appended to ``nltk.data.path`` — the one process-wide change this module makes;
- matching calls ``QuickUMLS._match`` on the parsed document, because ``QuickUMLS.match``
  ignores its ``best_match`` and ``ignore_syntax`` arguments.

Next to QuickUMLS's files the build writes ``conceptsvc-quickumls.json`` (preferred names, the
sources of every string, semantic types). An index made by QuickUMLS's own installer has no such
file: it can still be served, but mentions then carry the matched dictionary string as the
preferred name, an empty source, and the ``sources`` option is refused.

:class:`~conceptsvc.model.ExtractOptions` support:

===================  ======================================================================
option               QuickUMLS backend
===================  ======================================================================
semantic_types,      honoured: resolved to TUIs and applied by QuickUMLS before it picks the
semantic_groups      best span (a concept passes if any of its types is accepted)
sources              honoured when the index has the sidecar file (a candidate passes if the
                     matched string comes from an accepted source); refused otherwise
exclude_cuis         honoured, before overlap resolution
mode                 ``approximate``: QuickUMLS as is: simstring keeps the candidates whose
                     own trigram features reach ``threshold``, and QuickUMLS then reports
                     another similarity, so a mention can score below it ("Sjögren Sjögren"
                     → Sjögren syndrome at 0.47 with threshold 0.7); thresholds below about
                     1e-9 (cosine: 1e-5) find nothing, silently (the conceptsvc engine
                     serves every threshold in (0, 1]).
                     ``exact``: similarity 1.0 and the normalised window must equal the
                     dictionary string (QuickUMLS's normalisation: lower case, unidecode)
similarity,          honoured (QuickUMLS's simstring measure and threshold). For ``overlap``
threshold            QuickUMLS scores the raw count of shared trigrams; the mention score here
                     is the overlap coefficient (shared / smaller set) so that it stays in [0, 1]
overlap              ``longest`` → QuickUMLS ``length``; ``best_score`` → ``score``;
                     ``all`` → no best-match selection (every candidate window)
profile              only ``none``: profiles belong to the conceptsvc engine
include_negated      accepted; QuickUMLS detects no negation, so no mention is ever negated
include_mentions     honoured
===================  ======================================================================

``window`` and ``min_match_length`` are QuickUMLS settings with no per-request option; they are
constructor arguments (QuickUMLS's defaults: 5 and 3 — note that 3 drops "CT" and "MR").
Without a semantic-type filter every type is accepted (QuickUMLS's default
``ACCEPTED_SEMTYPES`` subset is deliberately not used, to match conceptsvc's "empty = all").

Security: QuickUMLS stores its CUI sets with :mod:`pickle`, so opening an index directory runs
``pickle.loads`` on its contents. Serve only index directories you built or trust. conceptsvc's
own index format never uses pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from conceptsvc.errors import ConceptIndexError, ConfigError, ExtractionError
from conceptsvc.model import (
    MODES,
    OVERLAPS,
    SIMILARITIES,
    Annotation,
    Candidate,
    ExtractOptions,
    Mention,
    batch_items,
)
from conceptsvc.semantic_network import UNKNOWN_TUI, load_semantic_network

__all__ = [
    "QUICKUMLS_INSTALL_HINT",
    "SIDECAR_NAME",
    "QuickUMLSBackend",
    "QuickUMLSBuildReport",
    "build_quickumls_index",
    "quickumls_available",
]

log = logging.getLogger(__name__)

QUICKUMLS_INSTALL_HINT = (
    "install the optional extra: pip install 'conceptsvc[quickumls]' "
    "(`make install` does this; it compiles leveldb and simstring: 1-2 minutes)"
)
SIDECAR_NAME = "conceptsvc-quickumls.json"
SIDECAR_FORMAT = 1
_NLTK_DATA = Path(__file__).resolve().parent.parent / "data" / "nltk"
_OVERLAP_CRITERIA = {"longest": "length", "best_score": "score"}
_DATABASE_BACKENDS = ("unqlite", "leveldb")
# QuickUMLS's own language flags (quickumls.constants.LANGUAGES) → spaCy blank language codes.
_SPACY_BLANK = {"ENG": "en", "GER": "de", "SPA": "es", "FRE": "fr", "ITA": "it", "DUT": "nl",
                "POR": "pt"}


def quickumls_available() -> bool:
    """True when the optional extra is importable (QuickUMLS and its compiled databases)."""
    try:
        _import_quickumls()
    except ConfigError:
        return False
    return True


@cache
def _import_quickumls() -> dict[str, ModuleType]:
    """Import QuickUMLS lazily, so that conceptsvc works without the optional extra."""
    try:
        with warnings.catch_warnings():
            # quickumls_simstring's SWIG wrapper imports the deprecated `imp` module; scoped to
            # this import so that the warning filter of the process stays as the user set it.
            warnings.filterwarnings("ignore", "the imp module is deprecated", DeprecationWarning)
            import nltk
            import quickumls.core
            import quickumls.install
            import quickumls.toolbox
            from quickumls_simstring import simstring
    except ImportError as exc:
        raise ConfigError(
            f"the QuickUMLS backend needs the quickumls package ({exc}); {QUICKUMLS_INSTALL_HINT}"
        ) from exc
    # QuickUMLS.__init__ calls nltk.download('stopwords') when NLTK finds none; ours are found.
    if str(_NLTK_DATA) not in nltk.data.path:
        nltk.data.path.append(str(_NLTK_DATA))
    return {
        "core": quickumls.core,
        "install": quickumls.install,
        "toolbox": quickumls.toolbox,
        "simstring": simstring,
    }


# ---------------------------------------------------------------------------------------------
# Building an index
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuickUMLSBuildReport:
    """What a build did.

    ``seconds`` is the whole build; ``seconds_quickumls`` the pass of the MRCONSO rows through
    QuickUMLS's writer (reading the rows and writing both databases, which interleave), without
    reading MRSTY and writing conceptsvc's sidecar file.
    """

    out: Path
    rows_read: int
    rows_used: int
    terms: int  # distinct (CUI, QuickUMLS-normalised string) pairs written
    strings: int  # distinct strings in the simstring database
    concepts: int
    concepts_without_types: int
    seconds: float
    seconds_quickumls: float
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["out"] = str(self.out)
        return d


def _term_key(s: str) -> str:
    # QuickUMLS keys both of its databases with NFKD strings (toolbox.safe_unicode).
    return unicodedata.normalize("NFKD", s)


def build_quickumls_index(
    meta_dir: str | Path,
    out: str | Path,
    *,
    language: str = "ENG",
    drop_suppressible: Sequence[str] = ("O", "E", "Y"),
    lowercase: bool = True,
    normalize_unicode: bool = True,
    database_backend: str = "unqlite",
) -> QuickUMLSBuildReport:
    """Build a QuickUMLS index at ``out`` from the RRF files in ``meta_dir``, without prompts.

    The rows are those of QuickUMLS's installer — one language, each (CUI, string) once — minus
    the suppressible atoms (SUPPRESS in ``drop_suppressible``), the same default as
    ``conceptsvc index build``, so that both tools see the same dictionary. ``lowercase`` and
    ``normalize_unicode`` are the installer's ``-L`` and ``-U`` options (on by default: without
    ``-L`` QuickUMLS lowercases an all-caps window, so "CT" would no longer meet a dictionary
    "CT"). A CUI without MRSTY rows is typed ``T000`` (unknown) instead of crashing the build
    as QuickUMLS's installer does.

    ``out`` must not exist; the index is built next to it and renamed into place, so an
    interrupted build leaves no half-written index under that name.
    """
    mods = _import_quickumls()
    from conceptsvc.sources.rrf import MetaDir, iter_mrconso, iter_mrsty

    if database_backend not in _DATABASE_BACKENDS:
        raise ConfigError(
            f"unknown QuickUMLS database backend {database_backend!r}; "
            f"choose one of {', '.join(_DATABASE_BACKENDS)}"
        )
    if language not in _SPACY_BLANK:
        raise ConfigError(
            f"language {language!r} is not supported by the QuickUMLS backend; "
            f"choose one of {', '.join(sorted(_SPACY_BLANK))}"
        )
    out = Path(out)
    if out.exists():
        raise ConceptIndexError(
            f"{out} already exists; give a new directory for the QuickUMLS index "
            "(it is never overwritten)"
        )
    meta = MetaDir(meta_dir)
    t0 = time.perf_counter()

    semtypes: dict[str, list[str]] = {}
    if meta.has("MRSTY.RRF"):
        for sty in iter_mrsty(meta):
            tuis = semtypes.setdefault(sty.cui, [])
            if sty.tui not in tuis:
                tuis.append(sty.tui)
    else:
        log.warning("%s has no MRSTY.RRF: every concept is typed %s", meta_dir, UNKNOWN_TUI)

    to_ascii: Callable[[str], str] | None = None
    if normalize_unicode:
        from unidecode import unidecode

        to_ascii = unidecode

    drop = frozenset(drop_suppressible)
    names: dict[str, str] = {}  # CUI → preferred name
    name_rank: dict[str, int] = {}
    sources: dict[str, dict[str, list[str]]] = {}  # CUI → term key → SABs
    counts = {"read": 0, "used": 0}

    def rows() -> Iterator[tuple[str, str, list[str], int]]:
        seen: set[tuple[str, str]] = set()
        for row in iter_mrconso(meta):
            counts["read"] += 1
            if row.lat != language or row.suppress in drop:
                continue
            counts["used"] += 1
            rank = 0 if (row.ts == "P" and row.stt == "PF" and row.ispref == "Y") else 1
            if row.cui not in name_rank or rank < name_rank[row.cui]:
                name_rank[row.cui] = rank
                names[row.cui] = row.string
            text = row.string.strip()
            if lowercase:
                text = text.lower()
            if to_ascii is not None:
                text = to_ascii(text)
            if not text:
                continue
            sabs = sources.setdefault(row.cui, {}).setdefault(_term_key(text), [])
            if row.sab not in sabs:
                sabs.append(row.sab)
            if (row.cui, text) in seen:
                continue
            seen.add((row.cui, text))
            yield text, row.cui, semtypes.get(row.cui) or [UNKNOWN_TUI], int(row.ispref == "Y")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.part-{os.getpid()}"
    if tmp.exists():
        raise ConceptIndexError(f"{tmp} exists (a build in progress?); remove it and retry")
    tmp.mkdir()
    try:
        (tmp / "language.flag").write_text(language)
        (tmp / "database_backend.flag").write_text(database_backend)
        if lowercase:
            (tmp / "lowercase.flag").touch()
        if normalize_unicode:
            (tmp / "normalize-unicode.flag").touch()
        tq = time.perf_counter()
        # QuickUMLS's own writer, so that the databases are exactly what its installer makes.
        mods["install"].parse_and_encode_ngrams(
            rows(),
            str(tmp / "umls-simstring.db"),
            str(tmp / "cui-semtypes.db"),
            database_backend=database_backend,
        )
        seconds_quickumls = time.perf_counter() - tq
        terms = sum(len(t) for t in sources.values())
        strings = len({k for t in sources.values() for k in t})
        sidecar = {
            "format": SIDECAR_FORMAT,
            "language": language,
            "lowercase": lowercase,
            "normalize_unicode": normalize_unicode,
            "drop_suppressible": sorted(drop),
            "concepts": {
                cui: [names[cui], semtypes.get(cui) or [UNKNOWN_TUI]] for cui in sorted(names)
            },
            "sources": sources,
        }
        with (tmp / SIDECAR_NAME).open("w", encoding="utf-8") as fh:
            json.dump(sidecar, fh, ensure_ascii=False, separators=(",", ":"))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary directory, never `out`
        raise
    report = QuickUMLSBuildReport(
        out=out,
        rows_read=counts["read"],
        rows_used=counts["used"],
        terms=terms,
        strings=strings,
        concepts=len(names),
        concepts_without_types=sum(1 for c in names if c not in semtypes),
        seconds=time.perf_counter() - t0,
        seconds_quickumls=seconds_quickumls,
        options={
            "language": language,
            "drop_suppressible": sorted(drop),
            "lowercase": lowercase,
            "normalize_unicode": normalize_unicode,
            "database_backend": database_backend,
        },
    )
    log.info("QuickUMLS index built in %.1f s: %s", report.seconds, out)
    return report


# ---------------------------------------------------------------------------------------------
# Serving an index
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Options compiled once per distinct option set."""

    tuis: frozenset[str] | None
    sources: frozenset[str] | None
    exclude: frozenset[str]
    exact: bool
    similarity: str
    threshold: float
    overlap: str
    include_mentions: bool


class QuickUMLSBackend:
    """Serve a QuickUMLS index with the :class:`~conceptsvc.extractor.Extractor` interface.

    QuickUMLS keeps its option state on one object and its databases are not safe for
    concurrent use, so calls are serialised by a lock. That costs little: QuickUMLS is pure
    Python and holds the GIL anyway; scale out with processes.
    """

    def __init__(
        self,
        index_dir: str | Path,
        *,
        window: int = 5,
        min_match_length: int = 3,
        ignore_syntax: bool = False,
        default_options: ExtractOptions | None = None,
    ) -> None:
        mods = _import_quickumls()
        self.index_dir = Path(index_dir)
        missing = [
            n for n in ("umls-simstring.db", "cui-semtypes.db")
            if not (self.index_dir / n).is_dir()
        ]
        if missing:
            raise ConceptIndexError(
                f"{self.index_dir} is not a QuickUMLS index (missing {', '.join(missing)}); "
                "build one with conceptsvc.backends.quickumls.build_quickumls_index"
            )
        if window < 1 or min_match_length < 1:
            raise ConfigError("window and min_match_length must be at least 1")
        if default_options is None:
            default_options = ExtractOptions()
        self.default_options = default_options
        self.window = window
        self.min_match_length = min_match_length
        self.ignore_syntax = ignore_syntax
        self._toolbox = mods["toolbox"]
        self._simstring = mods["simstring"]
        self._sidecar = self._read_sidecar()
        language_flag = self.index_dir / "language.flag"
        language = language_flag.read_text().strip() if language_flag.exists() else "ENG"
        if language not in _SPACY_BLANK:
            raise ConceptIndexError(
                f"{self.index_dir} was built for language {language!r}, which the QuickUMLS "
                f"backend cannot tokenise; supported: {', '.join(sorted(_SPACY_BLANK))}"
            )
        import spacy

        self._nlp = spacy.blank(_SPACY_BLANK[language])
        self._qu = mods["core"].QuickUMLS(
            str(self.index_dir),
            overlapping_criteria="length",
            threshold=0.7,
            window=window,
            similarity_name="jaccard",
            min_match_length=min_match_length,
            accepted_semtypes=None,
            spacy_component=True,  # do not spacy.load a trained model; we tokenise
        )
        self._lock = threading.Lock()
        self._closed = False
        from conceptsvc.extractor import PLAN_CACHE_BYTES, WeightedMemo

        # keyed by the options' canonical text, which holds every excluded CUI: weighed by it
        # and by the option sets, like the engine's plan cache (issue 18, item 5)
        self._plans: WeightedMemo[str, _Plan] = WeightedMemo(
            256, PLAN_CACHE_BYTES, lambda key, plan: 4096 + len(key)
        )
        self.check_options(default_options)

    # -- metadata -----------------------------------------------------------------------------

    def _read_sidecar(self) -> dict[str, Any] | None:
        path = self.index_dir / SIDECAR_NAME
        if not path.exists():
            log.info("%s has no %s: no preferred names or sources", self.index_dir, SIDECAR_NAME)
            return None
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConceptIndexError(f"{path} is unreadable ({exc}); rebuild the index") from exc
        if data.get("format") != SIDECAR_FORMAT:
            raise ConceptIndexError(
                f"{path} has format {data.get('format')!r}, expected {SIDECAR_FORMAT}; "
                "rebuild the index with this conceptsvc version"
            )
        return data

    @property
    def manifest(self) -> dict[str, Any]:
        """What is being served: enough to tell two QuickUMLS set-ups apart in a report."""
        qu = self._qu
        return {
            "backend": "quickumls",
            "index_dir": str(self.index_dir),
            "window": self.window,
            "min_match_length": self.min_match_length,
            "ignore_syntax": self.ignore_syntax,
            "lowercase": qu.to_lowercase_flag,
            "normalize_unicode": qu.normalize_unicode_flag,
            "language": qu.language_flag,
            "has_sidecar": self._sidecar is not None,
            "concepts": len(self._sidecar["concepts"]) if self._sidecar else None,
        }

    @property
    def sabs(self) -> frozenset[str]:
        """Sources present in the index (empty without the sidecar file)."""
        if self._sidecar is None:
            return frozenset()
        return frozenset(
            sab for terms in self._sidecar["sources"].values() for sabs in terms.values()
            for sab in sabs
        )

    def profiles(self) -> list[str]:
        return ["none"]

    # -- options ------------------------------------------------------------------------------

    def check_options(self, options: ExtractOptions) -> None:
        """Validate ``options`` for this backend (raises ExtractionError/SemanticNetworkError)."""
        self._plan(options)

    def _plan(self, options: ExtractOptions) -> _Plan:
        key = options.cache_key()
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if options.mode not in MODES:
            raise ExtractionError(f"unknown mode {options.mode!r}; use 'exact' or 'approximate'")
        if options.similarity not in SIMILARITIES:
            raise ExtractionError(
                f"unknown similarity {options.similarity!r}; use one of {', '.join(SIMILARITIES)}"
            )
        if not (0.0 < options.threshold <= 1.0):
            raise ExtractionError(f"threshold must be in (0, 1], got {options.threshold!r}")
        if options.overlap not in OVERLAPS:
            raise ExtractionError(
                f"unknown overlap policy {options.overlap!r}; use longest, best_score or all"
            )
        if options.profile != "none":
            raise ExtractionError(
                f"the QuickUMLS backend has no concept profiles (asked for {options.profile!r}); "
                "use profile 'none', or the conceptsvc engine for profiles"
            )
        tuis: frozenset[str] | None = None
        if options.semantic_types or options.semantic_groups:
            sn = load_semantic_network()
            tuis = sn.resolve_all(options.semantic_types) | sn.resolve_all(
                options.semantic_groups
            )
        sources: frozenset[str] | None = None
        if options.sources:
            if self._sidecar is None:
                raise ExtractionError(
                    f"{self.index_dir} has no source information ({SIDECAR_NAME}), so the "
                    "sources filter cannot be applied; rebuild it with build_quickumls_index"
                )
            known = self.sabs
            unknown = sorted(set(options.sources) - known)
            if unknown:
                raise ExtractionError(
                    f"unknown source(s) {', '.join(unknown)}; this index has "
                    f"{', '.join(sorted(known)) or 'none'}"
                )
            sources = frozenset(options.sources)
        plan = _Plan(
            tuis=tuis,
            sources=sources,
            exclude=frozenset(options.exclude_cuis),
            exact=options.mode == "exact",
            similarity=options.similarity,
            threshold=1.0 if options.mode == "exact" else float(options.threshold),
            overlap=options.overlap,
            include_mentions=options.include_mentions,
        )
        from conceptsvc.extractor import options_weight

        # the plan's frozensets keep the options' strings alive: they weigh as much
        self._plans.put(key, plan, 4096 + len(key) + options_weight(options))
        return plan

    # -- matching -----------------------------------------------------------------------------

    def _configure(self, plan: _Plan) -> None:
        qu = self._qu
        qu.similarity_name = plan.similarity
        qu.threshold = plan.threshold
        qu.ss_db.db.measure = getattr(self._simstring, plan.similarity)
        qu.ss_db.db.threshold = plan.threshold
        qu.accepted_semtypes = plan.tuis
        qu.overlapping_criteria = _OVERLAP_CRITERIA.get(plan.overlap, "score")
        qu._info = None

    def _normalise_window(self, ngram: str) -> str:
        """A window as QuickUMLS normalises it before looking it up (core._get_all_matches)."""
        qu = self._qu
        s = ngram
        if qu.normalize_unicode_flag:
            from unidecode import unidecode

            s = unidecode(s)
        if qu.to_lowercase_flag:
            s = s.lower()
        elif s.isupper() and not qu.keep_uppercase:
            s = s.lower()
        return _term_key(s)

    def _keep(self, plan: _Plan, cand: Mapping[str, Any]) -> bool:
        if cand["cui"] in plan.exclude:
            return False
        if plan.exact and self._normalise_window(cand["ngram"]) != cand["term"]:
            return False
        if plan.sources is not None:
            sabs = self._term_sources(cand["cui"], cand["term"])
            if not plan.sources.intersection(sabs):
                return False
        return True

    def _term_sources(self, cui: str, term: str) -> list[str]:
        if self._sidecar is None:
            return []
        sabs: list[str] = self._sidecar["sources"].get(cui, {}).get(term, [])
        return sabs

    def _score(self, plan: _Plan, cand: Mapping[str, Any]) -> float:
        if plan.similarity != "overlap":
            return float(cand["similarity"])
        # QuickUMLS reports the raw count of shared trigrams; report the overlap coefficient.
        make = self._toolbox.make_ngrams
        x = set(make(self._normalise_window(cand["ngram"]), 3))
        y = set(make(cand["term"], 3))
        return len(x & y) / min(len(x), len(y)) if x and y else 0.0

    def _mention(self, plan: _Plan, text: str, cand: Mapping[str, Any]) -> Mention:
        cui: str = cand["cui"]
        start, end = int(cand["start"]), int(cand["end"])
        sabs = self._term_sources(cui, cand["term"])
        if plan.sources is not None:
            sabs = [s for s in sabs if s in plan.sources]
        if self._sidecar is not None and cui in self._sidecar["concepts"]:
            preferred = self._sidecar["concepts"][cui][0]
        else:
            preferred = cand["term"]
        return Mention(
            cui=cui,
            preferred_name=preferred,
            text=text[start:end],
            start=start,
            end=end,
            score=self._score(plan, cand),
            semantic_types=tuple(sorted(cand["semtypes"])),
            source=sabs[0] if sabs else "",
        )

    def extract(
        self, text: str, options: ExtractOptions | None = None, *, id: str = ""
    ) -> Annotation:
        """Annotate one text; offsets are code-point offsets into ``text``."""
        plan = self._plan(options if options is not None else self.default_options)
        with self._lock:
            self._check_open()
            doc = self._nlp(text)  # spaCy's tokenizer caches are not meant for threads either
            self._configure(plan)
            groups = self._qu._match(doc, best_match=False, ignore_syntax=self.ignore_syntax)
            kept = []
            for group in groups:
                g = [c for c in group if self._keep(plan, c)]
                if g:
                    kept.append(g)
            if plan.overlap != "all":
                kept = self._qu._select_terms(kept)
        best: dict[tuple[int, int, str], Mention] = {}
        for group in kept:
            for cand in group:
                m = self._mention(plan, text, cand)
                key = (m.start, m.end, m.cui)
                if key not in best or m.score > best[key].score:
                    best[key] = m
        mentions = tuple(sorted(best.values(), key=lambda m: (m.start, m.end, -m.score, m.cui)))
        concepts = tuple(dict.fromkeys(m.cui for m in mentions))
        return Annotation(
            id=id, mentions=mentions if plan.include_mentions else (), concepts=concepts
        )

    def extract_batch(
        self,
        items: Iterable[str] | Iterable[tuple[str, str]] | Mapping[str, str],
        options: ExtractOptions | None = None,
    ) -> list[Annotation]:
        """Annotate many texts in order; ``items`` as for ``Extractor.extract_batch`` (plain
        texts get their position as id, or ``(id, text)`` pairs, or an id → text mapping)."""
        return [self.extract(text, options, id=id_) for id_, text in batch_items(items)]

    def search(
        self, query: str, *, limit: int = 10, options: ExtractOptions | None = None
    ) -> list[Candidate]:
        """Concepts whose dictionary strings are trigram-similar to the whole ``query``.

        Uses QuickUMLS's simstring database directly, with the options' similarity and
        threshold (``exact`` mode: identical strings only) and its filters.
        """
        if limit < 1:
            raise ExtractionError(f"limit must be at least 1, got {limit}")
        plan = self._plan(options if options is not None else self.default_options)
        window = query.strip()
        if not window:
            return []
        found: dict[str, Candidate] = {}
        with self._lock:
            self._check_open()
            self._configure(plan)
            key = self._normalise_window(window)
            for term in self._qu.ss_db.get(key):
                term = _term_key(term)
                sim = self._toolbox.get_similarity(key, term, 3, plan.similarity)
                if sim == 0:
                    continue
                for cui, semtypes, _preferred in self._qu.cuisem_db.get(term):
                    cand = {"cui": cui, "ngram": window, "term": term, "similarity": sim,
                            "semtypes": semtypes}
                    if plan.tuis is not None and not plan.tuis.intersection(semtypes):
                        continue
                    if not self._keep(plan, cand):
                        continue
                    m = self._mention(plan, window, {**cand, "start": 0, "end": len(window)})
                    prev = found.get(cui)
                    if prev is None or m.score > prev.score:
                        found[cui] = Candidate(
                            cui=cui,
                            preferred_name=m.preferred_name,
                            matched_string=term,
                            score=m.score,
                            semantic_types=m.semantic_types,
                            sources=tuple(self._term_sources(cui, term)),
                        )
        ranked = sorted(found.values(), key=lambda c: (-c.score, c.cui))
        return ranked[:limit]

    def _check_open(self) -> None:
        if self._closed:
            raise ExtractionError(f"the QuickUMLS backend on {self.index_dir} is closed")

    def close(self) -> None:
        """Release QuickUMLS's database handles (they also close when garbage-collected)."""
        with self._lock:
            self._closed = True
            self._qu.ss_db = None
            self._qu.cuisem_db = None

    def __enter__(self) -> QuickUMLSBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
