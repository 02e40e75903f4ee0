"""Dictionaries in, one compiled index out: build-time filters, merging, preferred names.

A dictionary here is concepts (CUI → semantic types) plus their strings (CUI, string, source,
term type). Three kinds of input can be merged into one index, each string remembering the
source (SAB) it came from; each is read by its own module in :mod:`conceptsvc.sources`:

- a UMLS ``META`` directory (:class:`UmlsSource`, :mod:`~conceptsvc.sources.rrf`: MRCONSO,
  MRSTY, and MRSAB/MRRANK when present);
- a scispacy knowledge base (:class:`JsonlSource`, :mod:`~conceptsvc.sources.jsonl`: JSON
  Lines, or one JSON array, of ``{"concept_id", "canonical_name", "aliases", "types"}``);
- a site table (:class:`TableSource`, :mod:`~conceptsvc.sources.table`: TSV or CSV rows
  ``cui, term, tui[, sab]``, optionally with a header naming those columns, and ``tty``).

Filters (:class:`DictionaryFilters`) are applied while reading, so a full UMLS never has to sit
in memory unfiltered. Semantic filters are decided per concept after all inputs' types are
known (types of one CUI from several inputs are merged), so inputs are read in two passes.
JSONL and table inputs have no language or SUPPRESS column; they pass those filters.
Kept strings are normalised into index keys, in worker processes when ``workers`` > 1
(:class:`_KeyPipeline`), the index being the same byte for byte either way.

Preferred names are chosen among the strings that survive the filters, so an excluded source
never leaks a name: by MRRANK rank when the META directory has MRRANK.RRF, then TS=P, STT=PF,
ISPREF=Y (the flags NLM derives from that ranking); UMLS strings win over a scispacy canonical
name, which wins over a site table's first term for the concept.

A concept with no string left after filtering is absent. A concept without semantic types
(no MRSTY row — QuickUMLS crashes on those with a KeyError) is kept, typed
:data:`~conceptsvc.semantic_network.UNKNOWN_TUI`, and counted in the build report.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from conceptsvc.errors import DictionaryError
from conceptsvc.index import FLAG_ABBREVIATION, FLAG_CASE_SENSITIVE, IndexBuilder
from conceptsvc.normalize import normalize_term
from conceptsvc.semantic_network import UNKNOWN_TUI, SemanticNetwork, load_semantic_network
from conceptsvc.sources import OnError, Progress, ReadStats
from conceptsvc.sources.jsonl import iter_concepts
from conceptsvc.sources.rrf import (
    MetaDir,
    iter_mrconso,
    iter_mrrank,
    iter_mrsty,
    read_release,
)
from conceptsvc.sources.table import TableRow, iter_rows

__all__ = [
    "ABBREVIATION_TTYS",
    "TERM_RULES_VERSION",
    "BuildReport",
    "DictionaryFilters",
    "DictionarySource",
    "JsonlSource",
    "TableSource",
    "UmlsSource",
    "build_dictionary_index",
    "term_flags",
]

log = logging.getLogger(__name__)

# UMLS term types that are abbreviations or acronyms (UMLS abbreviations.html, TTY table).
ABBREVIATION_TTYS = frozenset({"AA", "AB", "ACR", "AM", "CA2", "CA3", "OA", "OAM"})
SUPPRESS_VALUES = frozenset({"N", "O", "E", "Y"})
_ABBREV_MAX = 6  # an all-caps single word this short reads as an abbreviation
_CASE_SENSITIVE_MAX = 4  # …and this short, as an acronym that must keep its case ("US")
TERM_RULES_VERSION = "2"
"""Version of :func:`term_flags`' rules; a cache of indexes built by them (the embedded demo
dictionary's) keys on it. 2: an all-caps word of five letters is matched in any case."""

def term_flags(string: str, tty: str) -> int:
    """FLAG_* bits a dictionary string carries, from its term type and its shape.

    An all-caps single word of at most four characters is case-sensitive: "US" (ultrasound)
    must not match the pronoun "us", nor "AIDS" the verb "aids", nor "ALL" (the leukaemia)
    the word "all". From five letters on, an all-caps string is a word written in capitals
    ("FEVER", a condition from a report's heading, must find "Fever") or an acronym that no
    English word spells ("SPECT", "NSCLC"), so it matches in any case (issue 17). Abbreviation
    TTYs in lower or mixed case ("abd") are abbreviations but match in any case.
    """
    flags = FLAG_ABBREVIATION if tty in ABBREVIATION_TTYS else 0
    s = string.strip()
    if 2 <= len(s) <= _ABBREV_MAX and s.isalnum() and s.isupper() and sum(
        c.isalpha() for c in s
    ) >= 2:
        flags |= FLAG_ABBREVIATION
        if len(s) <= _CASE_SENSITIVE_MAX:
            flags |= FLAG_CASE_SENSITIVE
    return flags


@dataclass(frozen=True)
class DictionaryFilters:
    """What to keep from the inputs. Empty include lists mean "everything".

    ``drop_suppress`` lists MRCONSO SUPPRESS values to drop (O obsolete, E suppressed by the
    editors, Y suppressible by the source; N is "not suppressed"). ``semantic_types`` and
    ``exclude_semantic_types`` take TUIs, abbreviations, type names or group codes/names;
    ``unknown`` names concepts without semantic types. ``min_length`` counts characters of
    the string; the default 2 drops one-letter strings ("A", "T"), which are noise in captions.
    Languages, term types and SUPPRESS values are UMLS codes, written in capitals (``ENG``,
    ``PT``, ``O``): they are compared in capitals whatever case they are given in. Sources are
    compared as given (a site's own source name may be in lower case); a source or term type
    filter that drops nothing is warned about when the build ends.
    """

    languages: tuple[str, ...] = ("ENG",)
    sabs: tuple[str, ...] = ()
    exclude_sabs: tuple[str, ...] = ()
    drop_suppress: tuple[str, ...] = ("O", "E", "Y")
    exclude_ttys: tuple[str, ...] = ()
    semantic_types: tuple[str, ...] = ()
    exclude_semantic_types: tuple[str, ...] = ()
    include_descendants: bool = False
    min_length: int = 2

    def __post_init__(self) -> None:
        for name in ("languages", "exclude_ttys", "drop_suppress"):
            object.__setattr__(self, name, tuple(v.strip().upper() for v in getattr(self, name)))
        bad = [s for s in self.drop_suppress if s not in SUPPRESS_VALUES]
        if bad:
            raise DictionaryError(
                f"unknown SUPPRESS value(s) {', '.join(bad)}; use some of N, O, E, Y "
                "(or none to keep all atoms)."
            )
        if self.min_length < 0:
            raise DictionaryError(f"min_length must be >= 0, not {self.min_length}")
        overlap = set(self.sabs) & set(self.exclude_sabs)
        if overlap:
            raise DictionaryError(
                f"source(s) {', '.join(sorted(overlap))} are both included and excluded."
            )

    def to_manifest(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class UmlsSource:
    """A UMLS META directory (or a release root containing ``META/``)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True)
class JsonlSource:
    """A scispacy KB file; its strings get ``sab`` (scispacy keeps no per-alias source)."""

    path: Path
    sab: str = "SCISPACY"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True)
class TableSource:
    """A TSV/CSV of site terms; ``sab`` is used for rows without a sab column value."""

    path: Path
    sab: str = "LOCAL"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


DictionarySource = UmlsSource | JsonlSource | TableSource


@dataclass
class BuildReport:
    """What a build read, kept and dropped; printed by the CLI and stored in the manifest."""

    inputs: list[dict[str, Any]] = field(default_factory=list)
    rows_read: dict[str, int] = field(default_factory=dict)
    atoms_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    malformed_skipped: dict[str, int] = field(default_factory=dict)
    malformed_examples: list[str] = field(default_factory=list)
    concepts: int = 0
    concepts_without_semantic_type: int = 0
    concepts_filtered_by_semantic_type: int = 0
    keys: int = 0
    postings: int = 0
    seconds: float = 0.0
    source_release: str = "unknown"

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable report, one fact per line."""
        out = [f"source release: {self.source_release}"]
        for name, n in self.rows_read.items():
            out.append(f"read {n:,} rows from {name}")
        out.append(f"kept {self.atoms_kept:,} strings")
        for reason, n in sorted(self.dropped.items()):
            out.append(f"dropped {n:,} strings: {reason}")
        for name, n in self.malformed_skipped.items():
            out.append(f"skipped {n:,} malformed rows in {name}")
        out.extend(f"  e.g. {ex}" for ex in self.malformed_examples[:5])
        out.append(
            f"index: {self.concepts:,} concepts, {self.keys:,} keys, {self.postings:,} postings"
        )
        if self.concepts_filtered_by_semantic_type:
            out.append(
                f"{self.concepts_filtered_by_semantic_type:,} concepts left out by the "
                "semantic type filter"
            )
        out.append(
            f"{self.concepts_without_semantic_type:,} concepts have no semantic type "
            f"(kept, typed {UNKNOWN_TUI})"
        )
        out.append(f"built in {self.seconds:.1f} s")
        return out


@dataclass
class _SemanticFilter:
    include: frozenset[str] | None
    exclude: frozenset[str]

    def passes(self, tuis: Iterable[str]) -> bool:
        ts = set(tuis)
        if self.include is not None and not ts & self.include:
            return False
        return not ts & self.exclude


def _resolve_semantic(filters: DictionaryFilters, sn: SemanticNetwork) -> _SemanticFilter:
    include = (
        sn.resolve_all(filters.semantic_types, include_descendants=filters.include_descendants)
        if filters.semantic_types
        else None
    )
    exclude = sn.resolve_all(
        filters.exclude_semantic_types, include_descendants=filters.include_descendants
    )
    return _SemanticFilter(include, exclude)


class _Build:
    """State of one build: concept types, preferred-name candidates, the index builder."""

    def __init__(
        self,
        filters: DictionaryFilters,
        on_error: OnError,
        progress: Progress | None,
        report: BuildReport,
        workers: int = 1,
    ) -> None:
        self.filters = filters
        self.on_error = on_error
        self.progress = progress
        self.report = report
        self.stats = ReadStats()
        self.sn = load_semantic_network()
        self.semantic = _resolve_semantic(filters, self.sn)
        self.types: dict[str, tuple[str, ...]] = {}
        self._tuples: dict[tuple[str, ...], tuple[str, ...]] = {}
        # CUI → (score, preferred-name candidate); highest score wins, first seen on ties.
        self.pref: dict[str, tuple[int, str]] = {}
        self.builder = IndexBuilder()
        self.blocked: set[str] = set()
        self.pipeline = _KeyPipeline(self, workers)

    # -- types (pass 1) -------------------------------------------------------------------
    def add_types(self, cui: str, tuis: Iterable[str]) -> None:
        old = self.types.get(cui, ())
        merged = tuple(sorted({*old, *tuis}))
        if merged != old:
            self.types[cui] = self._tuples.setdefault(merged, merged)

    def finish_types(self) -> None:
        """Decide the semantic filter per concept once every input's types are known."""
        sem = self.semantic
        if sem.include is None and not sem.exclude:
            return
        verdict: dict[tuple[str, ...], bool] = {}
        for cui, tuis in self.types.items():
            ok = verdict.get(tuis)
            if ok is None:
                ok = verdict[tuis] = sem.passes(tuis)
            if not ok:
                self.blocked.add(cui)
        self.report.concepts_filtered_by_semantic_type = len(self.blocked)

    @property
    def unknown_passes(self) -> bool:
        return self.semantic.passes((UNKNOWN_TUI,))

    # -- strings (pass 2) -----------------------------------------------------------------
    def common_filters(self, cui: str, string: str, sab: str, tty: str) -> str | None:
        """Reason to drop a string by the filters every input shares, or None to keep it."""
        f = self.filters
        if f.sabs and sab not in f.sabs:
            return "source not included"
        if sab in f.exclude_sabs:
            return "source excluded"
        if tty in f.exclude_ttys:
            return "term type excluded"
        if cui in self.blocked or (cui not in self.types and not self.unknown_passes):
            return "semantic type filter"
        if len(string.strip()) < f.min_length:
            return "shorter than min_length"
        return None

    def keep(self, cui: str, string: str, sab: str, tty: str, score: int) -> None:
        if not self.builder.add_term(cui, string, sab=sab, tty=tty, flags=term_flags(string, tty)):
            self.report.drop("normalises to nothing")
            return
        self.report.atoms_kept += 1
        cur = self.pref.get(cui)
        if cur is None or score > cur[0]:
            self.pref[cui] = (score, string)


def _normalize_all(strings: list[str]) -> list[str]:
    """Worker-process side of :class:`_KeyPipeline`: index keys of ``strings``."""
    return [normalize_term(s) for s in strings]


class _KeyPipeline:
    """Feeds kept strings to the builder in file order, normalising new strings ahead.

    Normalising each distinct string (:func:`~conceptsvc.normalize.normalize_term`) is about
    half of a full-UMLS build. With ``workers > 1`` it runs in ``workers - 1`` processes
    while this process goes on reading and filtering: each batch's new strings are sent out
    when the batch is read, and the batch is added to the builder one batch later, with its
    keys primed. Rows are added in the same order either way, so the index (and its content
    hash) is identical whatever ``workers`` is.
    """

    def __init__(self, build: _Build, workers: int, batch_size: int = 50_000) -> None:
        self.build = build
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        self._inflight: deque[tuple[list[tuple[str, str, str, str, int, int]], list[str],
                                    list[Future[list[str]]]]] = deque()
        self._inflight_strings: set[str] = set()

    def submit(self, rows: list[tuple[str, str, str, str, int, int]]) -> None:
        if not rows:
            return
        if self.workers == 1:
            self._add(rows)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers - 1, mp_context=multiprocessing.get_context("spawn")
            )
        known = self.build.builder.key_known
        inflight = self._inflight_strings
        new = [s for s in dict.fromkeys(r[1] for r in rows) if s not in inflight and not known(s)]
        n = self.workers - 1
        step = -(-len(new) // n) if new else 1
        futures = [self._pool.submit(_normalize_all, new[i : i + step])
                   for i in range(0, len(new), step)]
        self._inflight.append((rows, new, futures))
        inflight.update(new)
        while len(self._inflight) > 1:
            self._consume()

    def drain(self) -> None:
        while self._inflight:
            self._consume()
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _consume(self) -> None:
        rows, new, futures = self._inflight.popleft()
        keys = [k for fut in futures for k in fut.result()]
        self.build.builder.prime_keys(new, keys)
        self._inflight_strings.difference_update(new)
        self._add(rows)

    def _add(self, rows: list[tuple[str, str, str, str, int, int]]) -> None:
        add = self.build.builder.add_term
        pref = self.build.pref
        pref_get = pref.get
        kept = empty = 0
        for cui, string, sab, tty, flags, score in rows:
            if not add(cui, string, sab=sab, tty=tty, flags=flags):
                empty += 1
                continue
            kept += 1
            cur = pref_get(cui)
            if cur is None or score > cur[0]:
                pref[cui] = (score, string)
        report = self.build.report
        report.atoms_kept += kept
        if empty:
            report.drop("normalises to nothing", empty)


# Preferred-name scores: the input kind dominates, then MRRANK, then TS/STT/ISPREF.
_SCORE_UMLS = 2 << 40
_SCORE_JSONL = 1 << 40
_SCORE_TABLE = 0


def _umls_source_info(meta: MetaDir, b: _Build) -> tuple[dict[str, Any], str | None]:
    info: dict[str, Any] = {"kind": "umls", "path": str(meta.path), "files": meta.signature()}
    release = read_release(meta, on_error=b.on_error, stats=b.stats)
    if release.source_versions is not None:
        info["source_versions"] = release.source_versions
    return info, release.name


def _read_umls(src: UmlsSource, b: _Build, phase: int) -> str | None:
    meta = MetaDir(src.path)
    if phase == 1:
        if not meta.has("MRSTY.RRF"):
            raise DictionaryError(
                f"{meta.path}: no MRSTY.RRF (nor .gz, nor split parts) beside MRCONSO.RRF. "
                "Every UMLS release and MetamorphoSys subset has it: copy it in from the same "
                "release. (Concepts that have no row in it are kept as T000; the table itself "
                "is needed for the semantic types and their filters.)"
            )
        # MRSTY has ~7 M rows in a full release: the common case (a CUI's first type) is one
        # dict probe and one store; merging with earlier types goes through add_types.
        types, interned = b.types, b._tuples
        add_types = b.add_types
        for cui, tui, _sty in iter_mrsty(
            meta, on_error=b.on_error, stats=b.stats, progress=b.progress
        ):
            if cui in types:
                add_types(cui, (tui,))
            else:
                one = (tui,)
                types[cui] = interned.setdefault(one, one)
        return None
    info, release = _umls_source_info(meta, b)
    b.report.inputs.append(info)
    ranks: dict[tuple[str, str, str], int] = {}
    if meta.has("MRRANK.RRF"):
        for r in iter_mrrank(meta, on_error=b.on_error, stats=b.stats):
            try:
                ranks[(r.sab, r.tty, r.suppress)] = int(r.rank)
            except ValueError:
                raise DictionaryError(
                    f"{meta.path}/MRRANK.RRF: rank {r.rank!r} of {r.sab}/{r.tty} is not a number"
                ) from None
        info["preferred_names"] = "MRRANK"
    else:
        info["preferred_names"] = "TS/STT/ISPREF"
    f = b.filters
    langs = frozenset(f.languages)
    drop_sup = frozenset(f.drop_suppress)
    include_sabs = frozenset(f.sabs)
    exclude_sabs = frozenset(f.exclude_sabs)
    exclude_ttys = frozenset(f.exclude_ttys)
    min_length = f.min_length
    blocked, types, unknown_ok = b.blocked, b.types, b.unknown_passes
    rank_get = ranks.get
    abbrev_ttys = ABBREVIATION_TTYS
    pipeline = b.pipeline
    batch: list[tuple[str, str, str, str, int, int]] = []
    append = batch.append
    batch_size = pipeline.batch_size
    # One loop for up to 16 M rows: filters inline, counters in locals (see common_filters
    # for the same rules as the other inputs apply them). Kept rows go to the pipeline in
    # batches, in file order.
    n_lang = n_sup = n_inc = n_exc = n_tty = n_sem = n_len = 0
    for row in iter_mrconso(meta, on_error=b.on_error, stats=b.stats, progress=b.progress):
        cui, lat, ts, stt, ispref, sab, tty, string, suppress = row
        if langs and lat not in langs:
            n_lang += 1
            continue
        if suppress in drop_sup:
            n_sup += 1
            continue
        if include_sabs and sab not in include_sabs:
            n_inc += 1
            continue
        if sab in exclude_sabs:
            n_exc += 1
            continue
        if tty in exclude_ttys:
            n_tty += 1
            continue
        if cui in blocked or (not unknown_ok and cui not in types):
            n_sem += 1
            continue
        length = len(string.strip())
        if length < min_length:
            n_len += 1
            continue
        flags = term_flags(string, tty) if tty in abbrev_ttys or length <= _ABBREV_MAX else 0
        score = (
            _SCORE_UMLS
            | rank_get((sab, tty, suppress), 0) << 3
            | (ts == "P") << 2
            | (stt == "PF") << 1
            | (ispref == "Y")
        )
        append((cui, string, sab, tty, flags, score))
        if len(batch) >= batch_size:
            pipeline.submit(batch)
            batch = []
            append = batch.append
    pipeline.submit(batch)
    pipeline.drain()
    report = b.report
    for reason, n in (
        ("language", n_lang), ("suppressed", n_sup), ("source not included", n_inc),
        ("source excluded", n_exc), ("term type excluded", n_tty),
        ("semantic type filter", n_sem), ("shorter than min_length", n_len),
    ):
        if n:
            report.drop(reason, n)
    return release


def _read_jsonl(src: JsonlSource, b: _Build, phase: int) -> None:
    if phase == 1:
        for cui, _name, _aliases, types in iter_concepts(
            src.path, on_error=b.on_error, stats=b.stats
        ):
            if types:
                b.add_types(cui, types)
        return
    b.report.inputs.append({"kind": "jsonl", "path": str(src.path), "sab": src.sab})
    for cui, name, aliases, _types in iter_concepts(
        src.path, on_error=b.on_error, stats=b.stats
    ):
        seen: set[str] = set()
        for string, tty, bonus in ((name, "PT", 1), *((a, "SY", 0) for a in aliases)):
            if string in seen:
                continue
            seen.add(string)
            reason = b.common_filters(cui, string, src.sab, tty)
            if reason is not None:
                b.report.drop(reason)
                continue
            b.keep(cui, string, src.sab, tty, _SCORE_JSONL | bonus)


def _read_table(src: TableSource, b: _Build, phase: int) -> None:
    def rows() -> Iterator[TableRow]:
        return iter_rows(
            src.path, b.sn, default_sab=src.sab, on_error=b.on_error, stats=b.stats
        )

    if phase == 1:
        for cui, _term, tuis, _sab, _tty in rows():
            if tuis:
                b.add_types(cui, tuis)
        return
    b.report.inputs.append({"kind": "table", "path": str(src.path), "sab": src.sab})
    for cui, term, _tuis, sab, tty in rows():
        reason = b.common_filters(cui, term, sab, tty)
        if reason is not None:
            b.report.drop(reason)
            continue
        b.keep(cui, term, sab, tty, _SCORE_TABLE)


def build_dictionary_index(
    sources: Iterable[DictionarySource],
    out: str | Path,
    *,
    filters: DictionaryFilters | None = None,
    source_release: str | None = None,
    on_error: OnError = "fail",
    progress: Progress | None = None,
    workers: int = 1,
) -> BuildReport:
    """Read, filter and merge ``sources`` and write the compiled index to ``out``.

    ``workers`` > 1 normalises UMLS strings in ``workers - 1`` extra processes (see
    :class:`_KeyPipeline`); the result is identical, only faster on a machine with spare cores.

    Raises :class:`~conceptsvc.errors.SemanticNetworkError` for an unknown semantic filter
    (before reading anything), :class:`~conceptsvc.errors.MalformedRowError` for a bad row
    when ``on_error="fail"``, and :class:`~conceptsvc.errors.DictionaryError` for unusable
    inputs.
    """
    t0 = time.monotonic()
    srcs = list(sources)
    if not srcs:
        raise DictionaryError("no dictionary input given; use --umls, --jsonl or --tsv.")
    for s in srcs:
        if not s.path.exists():
            raise DictionaryError(f"{s.path}: no such file or directory")
    f = filters if filters is not None else DictionaryFilters()
    report = BuildReport()
    if workers < 1:
        raise DictionaryError(f"workers must be at least 1, not {workers}")
    b = _Build(f, on_error, progress, report, workers)
    readers: dict[type, Callable[[Any, _Build, int], str | None]] = {
        UmlsSource: _read_umls,
        JsonlSource: _read_jsonl,
        TableSource: _read_table,
    }
    # Pass 1: semantic types of every concept, from every input.
    for s in srcs:
        readers[type(s)](s, b, 1)
    b.finish_types()
    # Pass 2: strings. Row counts are those of pass 2 (pass 1 reads other tables or the same).
    b.stats = ReadStats(skipped={}, rows={})
    releases: list[str] = []
    try:
        for s in srcs:
            rel = readers[type(s)](s, b, 2)
            if rel:
                releases.append(f"UMLS {rel}")
    finally:
        b.pipeline.close()
    report.rows_read = dict(b.stats.rows)
    report.malformed_skipped = dict(b.stats.skipped)
    report.malformed_examples = list(b.stats.examples)
    if source_release:
        report.source_release = source_release
    elif releases:
        report.source_release = " + ".join(releases)
    else:
        report.source_release = " + ".join(
            f"{i['kind']}:{Path(i['path']).name}" for i in report.inputs
        )
    without = 0
    builder = b.builder
    for cui, (_score, name) in b.pref.items():
        tuis = b.types.get(cui)
        if not tuis:
            without += 1
            tuis = (UNKNOWN_TUI,)
        builder.set_concept(cui, preferred_name=name, semantic_types=tuis)
    report.concepts = len(b.pref)
    report.concepts_without_semantic_type = without
    if without:
        log.info("%d concepts have no MRSTY row; typed %s", without, UNKNOWN_TUI)
    if not report.concepts:
        facts = [x for x in report.lines()
                 if x.startswith(("read ", "kept ", "dropped ", "skipped ", "  e.g. "))]
        raise DictionaryError(
            f"the inputs and filters kept no concept, so no index was written to {out} "
            f"({'; '.join(facts)}); check the filters (sources, languages, semantic types) "
            "against the inputs, and the inputs' format"
        )
    if progress is not None:
        progress("writing index", report.concepts, None)
    builder.source_release = report.source_release
    builder.filters = f.to_manifest()
    builder.inputs = report.inputs
    # Key and posting counts are the index's own (manifest "counts"), known after writing.
    builder.report = {
        k: v for k, v in report.to_dict().items() if k not in ("keys", "postings", "seconds")
    }
    path = builder.write(out)
    counts = json.loads((path / "manifest.json").read_text(encoding="utf-8"))["counts"]
    report.keys, report.postings = int(counts["keys"]), int(counts["postings"])
    report.seconds = round(time.monotonic() - t0, 3)
    kept_sabs = counts.get("per_sab", {})
    unused = [sab for sab in f.sabs if not kept_sabs.get(sab)]
    if unused:
        log.warning(
            "source filter %s kept no strings (not in the inputs, or every string of it was "
            "filtered out); the index has: %s",
            ", ".join(unused), ", ".join(sorted(kept_sabs)),
        )
    for given, reason, what in ((f.exclude_sabs, "source excluded", "--exclude-sab"),
                                (f.exclude_ttys, "term type excluded", "--exclude-tty")):
        if given and not report.dropped.get(reason):
            log.warning(
                "%s %s dropped no string: no input string has %s (the index has the sources "
                "%s)", what, ", ".join(given), "it" if len(given) == 1 else "them",
                ", ".join(sorted(kept_sabs)),
            )
    log.info("built %s: %s", path, "; ".join(report.lines()))
    return report
