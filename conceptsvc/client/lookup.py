"""Ad-hoc lookups — "what does this phrase map to?" — against the service or in-process.

Three questions, one interface (:class:`Lookup`) with two implementations that give the same
answers: :class:`RemoteLookup` asks a running service over gRPC; :class:`LocalLookup` runs the
engine in this process on an index directory (by default the embedded demo dictionary), for
when there is no server at hand. Both apply the caller's option overrides on top of the
defaults of whoever does the work (the service's configured defaults, or the engine's).

The ``format_*`` functions turn the answers into the readable tables ``conceptsvc lookup``,
``concept`` and ``search`` print; the ``*_json`` functions into what ``--json`` prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from conceptsvc.client.channel import ChannelSecurity, effective_options
from conceptsvc.client.outputs import annotation_to_json
from conceptsvc.errors import (
    ClientError,
    ConceptNotFoundError,
    ServiceCallError,
    ServiceUnreachableError,
)
from conceptsvc.model import (
    Annotation,
    Candidate,
    ConceptRecord,
    ExtractOptions,
    Mention,
    ServiceInfo,
    Synonym,
)
from conceptsvc.semantic_network import load_semantic_network

if TYPE_CHECKING:
    from conceptsvc.extractor import Extractor

__all__ = [
    "LocalLookup",
    "Lookup",
    "RemoteLookup",
    "candidates_json",
    "concept_json",
    "format_annotation",
    "format_candidates",
    "format_concept",
]


T = TypeVar("T")


class Lookup(Protocol):
    def annotate(self, text: str, overrides: Mapping[str, Any]) -> Annotation: ...
    def annotate_many(
        self, items: Iterable[tuple[str, str]], overrides: Mapping[str, Any]
    ) -> Iterator[tuple[str, Annotation]]: ...
    def concept(self, cui: str, *, synonyms: bool = True) -> ConceptRecord: ...
    def search(self, query: str, overrides: Mapping[str, Any], limit: int) -> list[Candidate]: ...
    def close(self) -> None: ...


# -- in-process -------------------------------------------------------------------------------
class LocalLookup:
    """The engine in this process; ``index`` is an index directory (default: the demo one)."""

    def __init__(self, index: str | Path | None = None) -> None:
        from conceptsvc.extractor import Extractor
        from conceptsvc.index import ConceptIndex

        if index is None:
            from conceptsvc.embedded import demo_index

            ix = demo_index()
        else:
            ix = ConceptIndex.load(index)
        self.extractor: Extractor = Extractor(ix)

    def _options(self, overrides: Mapping[str, Any]) -> ExtractOptions:
        options = effective_options(ExtractOptions(), overrides)
        self.extractor.check_options(options)
        return options

    def annotate(self, text: str, overrides: Mapping[str, Any]) -> Annotation:
        return self.extractor.extract(text, self._options(overrides), id="lookup")

    def annotate_many(
        self, items: Iterable[tuple[str, str]], overrides: Mapping[str, Any]
    ) -> Iterator[tuple[str, Annotation]]:
        """Every (id, text) of ``items`` annotated, in order."""
        options = self._options(overrides)
        for id_, text in items:
            yield text, self.extractor.extract(text, options, id=id_)

    def concept(self, cui: str, *, synonyms: bool = True) -> ConceptRecord:
        # (here, not at the top: the remote commands do without the index module and numpy)
        from conceptsvc.index import FLAG_ABBREVIATION, FLAG_PREFERRED

        ix = self.extractor.index
        info = ix.concept(cui.strip().upper())
        if info is None:
            raise ConceptNotFoundError(cui)
        sn = load_semantic_network()
        return ConceptRecord(
            cui=info.cui,
            preferred_name=info.preferred_name,
            semantic_types=tuple(sn.describe(t) for t in info.semantic_types),
            sources=info.sources,
            synonyms=tuple(
                Synonym(p.string, p.sab, p.tty, bool(p.flags & FLAG_PREFERRED),
                        bool(p.flags & FLAG_ABBREVIATION))
                for p in ix.concept_postings(info.cui)
            ) if synonyms else (),
        )

    def search(self, query: str, overrides: Mapping[str, Any], limit: int) -> list[Candidate]:
        return self.extractor.search(query, limit=limit, options=self._options(overrides))

    def close(self) -> None:
        pass


# -- over gRPC --------------------------------------------------------------------------------
class RemoteLookup:
    """A running service; option overrides go on top of the service's defaults (GetInfo)."""

    def __init__(
        self,
        target: str,
        *,
        security: ChannelSecurity | None = None,
        timeout: float = 10.0,
    ) -> None:
        from conceptsvc.client.service import ConceptClient

        security = security or ChannelSecurity()
        self.target = target
        self.client = ConceptClient(target, timeout=timeout, **security.client_kwargs())
        self._info: ServiceInfo | None = None

    def _call(self, fn: Callable[[], T]) -> T:
        """``fn()``, with "nothing listens there" said plainly instead of as a gRPC status."""
        try:
            return fn()
        except ServiceCallError as exc:
            if exc.status == "UNAVAILABLE":
                hint = exc.hint  # the client's unavailable_hint: a TLS mismatch, a draining server
                if hint:
                    raise ServiceUnreachableError(
                        f"cannot connect to {self.target} (UNAVAILABLE: {exc.details}).{hint}"
                    ) from None
                raise ServiceUnreachableError(
                    f"no conceptsvc service answers at {self.target} (UNAVAILABLE: "
                    f"{exc.details}); if one is starting, wait until it has loaded its index; "
                    "else start one with `conceptsvc serve`, point --target at one, or run the "
                    "engine in this process with --local"
                ) from None
            raise

    def info(self) -> ServiceInfo:
        if self._info is None:
            self._info = self._call(self.client.get_info)
        return self._info

    def _options(self, overrides: Mapping[str, Any]) -> ExtractOptions:
        return effective_options(self.info().default_options, overrides)

    def annotate(self, text: str, overrides: Mapping[str, Any]) -> Annotation:
        options = self._options(overrides)
        return self._call(lambda: self.client.annotate(text, id="lookup", options=options))

    def annotate_many(
        self, items: Iterable[tuple[str, str]], overrides: Mapping[str, Any]
    ) -> Iterator[tuple[str, Annotation]]:
        """Every (id, text) of ``items`` on one stream, answered in order as the answers come
        (ids must be distinct)."""
        options = self._options(overrides)
        sent: dict[str, str] = {}

        def send() -> Iterator[tuple[str, str]]:
            for id_, text in items:
                sent[id_] = text
                yield id_, text

        results = self._call(lambda: self.client.annotate_stream(send(), options=options))
        while True:
            res = self._call(lambda: next(results, None))
            if res is None:
                return
            text = sent.pop(res.id)
            if res.annotation is None:
                err = res.error
                raise ClientError(
                    f"caption {res.id} ({text[:60]!r}): "
                    + (f"{err.status}: {err.message}" if err else "no result")
                )
            yield text, res.annotation

    def concept(self, cui: str, *, synonyms: bool = True) -> ConceptRecord:
        try:
            return self._call(
                lambda: self.client.get_concept(cui.strip().upper(), synonyms=synonyms)
            )
        except ConceptNotFoundError:  # said as the commands say it (the client names itself)
            raise ConceptNotFoundError(cui) from None

    def search(self, query: str, overrides: Mapping[str, Any], limit: int) -> list[Candidate]:
        options = self._options(overrides)
        return self._call(lambda: self.client.search(query, limit=limit, options=options))

    def close(self) -> None:
        self.client.close()


# -- rendering ----------------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def _types(tuis: Sequence[str]) -> str:
    sn = load_semantic_network()
    return ", ".join(f"{t} {sn.describe(t).name}" for t in tuis)


def _context_label(m: Mention) -> str:
    """ConText's properties of a mention, as a suffix: " (negated, historical)"."""
    return f" ({', '.join(m.context)})" if m.context else ""


def format_annotation(
    text: str, a: Annotation, names: Mapping[str, str] | None = None
) -> str:
    """The mentions as a table, then the caption's concept set; ``names`` names the concepts a
    profile inferred without a mention."""
    if not a.mentions and not a.concepts:
        return "no concepts found\n"
    rows = [
        [
            m.text + _context_label(m),
            f"{m.start}-{m.end}",
            m.cui,
            m.preferred_name,
            _types(m.semantic_types),
            f"{m.score:.2f}",
        ]
        for m in sorted(a.mentions, key=lambda m: (m.start, m.end, m.cui))
    ]
    lines = _table(
        ["matched text", "span", "CUI", "preferred name", "semantic types", "score"], rows, {5}
    ) if rows else ["no mentions"]
    named = {m.cui: m.preferred_name for m in a.mentions}
    inferred = [c for c in a.concepts if c not in named]
    lines += ["", "concepts: " + ", ".join(a.concepts)]
    if inferred:
        lines.append(
            "inferred without a mention (profile): "
            + ", ".join(f"{c} {names[c]}" if names and c in names else c for c in inferred)
        )
    return "\n".join(lines) + "\n"


def format_concept(c: ConceptRecord) -> str:
    lines = [f"{c.cui}  {c.preferred_name}", "", "semantic types:"]
    lines += [
        f"  {t.tui}  {t.name}  (group {t.group} {t.group_name})" for t in c.semantic_types
    ] or ["  (none)"]
    lines += ["", "sources: " + (", ".join(c.sources) or "(none)")]
    if c.synonyms:
        lines += ["", f"synonyms ({len(c.synonyms)}):"]
        rows = [
            [s.string, s.source, s.tty,
             ", ".join(x for x, on in (("preferred", s.preferred),
                                      ("abbreviation", s.abbreviation)) if on)]
            for s in c.synonyms
        ]
        lines += ["  " + x for x in _table(["string", "source", "TTY", "flags"], rows, set())]
    return "\n".join(lines) + "\n"


def format_candidates(query: str, cands: Sequence[Candidate]) -> str:
    if not cands:
        return f"no candidates for {query!r}\n"
    rows = [
        [str(i), f"{c.score:.3f}", c.cui, c.preferred_name, c.matched_string,
         ", ".join(c.semantic_types), ", ".join(c.sources)]
        for i, c in enumerate(cands, 1)
    ]
    return "\n".join(_table(
        ["#", "score", "CUI", "preferred name", "matched string", "types", "sources"], rows,
        {0, 1},
    )) + "\n"


def annotation_json(text: str, a: Annotation) -> dict[str, Any]:
    return {"text": text, **annotation_to_json(a)}


def concept_json(c: ConceptRecord) -> dict[str, Any]:
    return {
        "cui": c.cui,
        "preferred_name": c.preferred_name,
        "semantic_types": [
            {"tui": t.tui, "name": t.name, "abbreviation": t.abbrev, "group": t.group,
             "group_name": t.group_name}
            for t in c.semantic_types
        ],
        "sources": list(c.sources),
        "synonyms": [
            {"string": s.string, "source": s.source, "tty": s.tty, "preferred": s.preferred,
             "abbreviation": s.abbreviation}
            for s in c.synonyms
        ],
    }


def candidates_json(cands: Sequence[Candidate]) -> list[dict[str, Any]]:
    return [
        {"cui": c.cui, "preferred_name": c.preferred_name, "matched_string": c.matched_string,
         "score": c.score, "semantic_types": list(c.semantic_types), "sources": list(c.sources)}
        for c in cands
    ]
