"""Domain types: what a request asks and what comes back, however it travelled.

The engine, the server, the client, the CLIs and the integrations all speak these types, so a
module that only needs one of them imports this module, not the engine. Frozen dataclasses
inside the package; protobuf exists only at the edge (:mod:`conceptsvc.wire`). Offsets are
code-point offsets into the ORIGINAL text the caller passed in.

- **requests**: :class:`ExtractOptions` and the choices its enumerated fields take
  (:data:`MODES`, :data:`SIMILARITIES`, :data:`OVERLAPS`; ``config.DefaultOptions`` is typed
  with the same ``Literal`` types);
- **results**: :class:`Annotation` of a caption with its :class:`Mention` s, and the
  :class:`Candidate` s a search ranks;
- **service answers**: what only exists because there is a service in between — a stream
  item's outcome (:class:`StreamResult`), the service's description of itself
  (:class:`ServiceInfo`), a concept with its synonyms (:class:`ConceptRecord`, also what an
  in-process lookup returns), the semantic-type catalog and a reload's result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, get_args

from conceptsvc.errors import ExtractArgumentError, ExtractionError
from conceptsvc.semantic_network import SemanticGroup, SemanticType

__all__ = [
    "CAPTION_HEADERS",
    "EXPERIENCERS",
    "ID_HEADERS",
    "MAX_BATCH_ITEMS",
    "MODES",
    "OVERLAPS",
    "SIMILARITIES",
    "Annotation",
    "Candidate",
    "ConceptRecord",
    "ExtractOptions",
    "IndexSummary",
    "ItemError",
    "Mention",
    "MentionRows",
    "Mode",
    "Overlap",
    "ReloadResult",
    "SemanticCatalog",
    "ServiceInfo",
    "ServiceLimits",
    "Similarity",
    "StreamResult",
    "Synonym",
    "batch_items",
    "id_string",
    "stream_items",
]

# -- requests --------------------------------------------------------------------------------
Mode = Literal["exact", "approximate"]
Similarity = Literal["jaccard", "cosine", "dice", "overlap"]
Overlap = Literal["longest", "best_score", "all"]
# The choices as values, in the order error messages and ``--help`` list them.
MODES: tuple[str, ...] = get_args(Mode)
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
OVERLAPS: tuple[str, ...] = get_args(Overlap)


# The name-list fields of ExtractOptions, each with an example for error messages.
_NAME_FIELDS = {
    "semantic_types": '("T047", "dsyn")',
    "semantic_groups": '("DISO", "ANAT")',
    "sources": '("MSH", "SNOMEDCT_US")',
    "exclude_cuis": '("C0000001",)',
}


def _names(name: str, value: object) -> tuple[str, ...]:
    """A name-list option as the tuple the options hold (hashable, so options can key caches).

    A single string is one name — never its letters, and not split at commas either, as a
    semantic type name may contain them ("Body Part, Organ, or Organ Component"). Sets are
    sorted, so equal options look equal however they were built.
    """
    if type(value) is tuple and all(type(v) is str for v in value):
        return value  # what the wire, the CLI and the configuration pass: nothing to do
    if isinstance(value, str):
        return (value,)
    items: list[object] | None = None
    if isinstance(value, set | frozenset):
        if all(isinstance(v, str) for v in value):
            items = sorted(value)
    elif isinstance(value, Iterable) and not isinstance(value, bytes | bytearray | Mapping):
        items = list(value)
    if items is None or not all(isinstance(v, str) for v in items):
        raise ExtractArgumentError(
            f"ExtractOptions({name}=...) takes names (strings): a tuple, list or set of them, or "
            f"one name; got {value!r}. For example: ExtractOptions({name}={_NAME_FIELDS[name]})."
        )
    return tuple(str(v) for v in items)


def _wrong_type(name: str, value: object, takes: str, example: str) -> ExtractArgumentError:
    return ExtractArgumentError(
        f"ExtractOptions({name}=...) takes {takes}; got {_clip(value)} (a "
        f"{type(value).__name__}). For example: ExtractOptions({name}={example})."
    )


@dataclass(frozen=True)
class ExtractOptions:
    """Per-request options (see :mod:`conceptsvc.extractor` for the filter semantics).

    The enumerated fields are typed ``str``, not their ``Literal``: options arrive from the
    command line, the wire and files, and :meth:`validate` is what checks them.

    The name-list fields (``semantic_types``, ``semantic_groups``, ``sources``,
    ``exclude_cuis``) take a tuple, list or set of names, or a single name
    (``semantic_groups="DISO"`` is ``("DISO",)``), and hold a tuple; anything else raises
    :class:`~conceptsvc.errors.ExtractArgumentError` showing the right call. ``exclude_cuis``
    holds its CUIs stripped and in upper case (``"c0032227"`` is ``"C0032227"``).
    """

    semantic_types: tuple[str, ...] = ()  # filter names (TUI, abbrev, name); empty = all
    semantic_groups: tuple[str, ...] = ()  # group codes/names; empty = all
    sources: tuple[str, ...] = ()  # SABs accepted; empty = all
    exclude_cuis: tuple[str, ...] = ()
    mode: str = "exact"  # one of MODES
    similarity: str = "jaccard"  # one of SIMILARITIES
    threshold: float = 0.7  # (0, 1]
    overlap: str = "longest"  # one of OVERLAPS
    profile: str = "none"  # "none" | "rocov2" | other shipped profile names
    include_negated: bool = True
    include_mentions: bool = True
    # Report hypothetical mentions ("rule out pneumonia"); None: as the profile says
    # (``Profile.include_hypothetical``), so a dataset's convention travels with its profile.
    include_hypothetical: bool | None = None

    if TYPE_CHECKING:
        # What a caller may pass, for type checkers: a name-list field takes one name or any
        # iterable of names and holds a tuple (``__post_init__``), which the dataclass's own
        # signature, typed by the fields, would refuse under ``mypy --strict``. At run time
        # the dataclass's generated ``__init__`` is the one (same names, order and defaults;
        # tests/test_model.py holds the two together).
        def __init__(
            self,
            semantic_types: str | Iterable[str] = (),
            semantic_groups: str | Iterable[str] = (),
            sources: str | Iterable[str] = (),
            exclude_cuis: str | Iterable[str] = (),
            mode: str = "exact",
            similarity: str = "jaccard",
            threshold: float = 0.7,
            overlap: str = "longest",
            profile: str = "none",
            include_negated: bool = True,
            include_mentions: bool = True,
            include_hypothetical: bool | None = None,
        ) -> None: ...

    def __post_init__(self) -> None:
        for name in _NAME_FIELDS:
            value = getattr(self, name)
            names = _names(name, value)
            if name == "exclude_cuis" and any(c != c.strip().upper() for c in names):
                # CUIs are upper case in every index: " c0032227" excludes C0032227 (semantic
                # names are matched in any case too), whichever door the options came through
                names = tuple(c.strip().upper() for c in names)
            if names is not value:
                object.__setattr__(self, name, names)  # frozen: set once, before anyone sees it

    def check_types(self) -> None:
        """Raise :class:`~conceptsvc.errors.ExtractArgumentError` for a field whose value is not
        of its type (``include_negated="no"``, ``threshold="0.7"``), showing the right call.

        Run by :meth:`validate` and, before anything is sent, by the client's conversion to the
        wire (:func:`conceptsvc.wire.options_to_pb`), so every door refuses the same values
        with the same error rather than reading ``"no"`` as true or failing in protobuf.
        """
        for name in _NAME_FIELDS:
            value = getattr(self, name)
            if type(value) is not tuple or not all(isinstance(v, str) for v in value):
                _names(name, value)  # raises, showing the right call
        for name, example in (("mode", '"exact"'), ("similarity", '"jaccard"'),
                              ("overlap", '"longest"'), ("profile", '"rocov2"')):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise _wrong_type(name, value, "a name (a string)", example)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise _wrong_type("threshold", t, "a number in (0, 1]", "0.7")
        for name in ("include_negated", "include_mentions"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise _wrong_type(name, value, "True or False", "False")
        if self.include_hypothetical is not None and not isinstance(
            self.include_hypothetical, bool
        ):
            raise _wrong_type(
                "include_hypothetical", self.include_hypothetical,
                "True, False or None (the profile's choice)", "False",
            )

    def validate(self) -> None:
        """Raise ExtractionError for a value of the wrong type (:meth:`check_types`), or a
        choice or threshold no engine can serve.

        What depends on an index (semantic names, sources, profiles) is checked by the
        engine's ``check_options``.
        """
        self.check_types()
        if self.mode not in MODES:
            raise ExtractionError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.similarity not in SIMILARITIES:
            raise ExtractionError(
                f"similarity {self.similarity!r} is not one of {', '.join(SIMILARITIES)}"
            )
        if not (math.isfinite(self.threshold) and 0 < self.threshold <= 1):
            raise ExtractionError(f"threshold {self.threshold!r} must be in (0, 1], e.g. 0.7")
        if self.overlap not in OVERLAPS:
            raise ExtractionError(
                f"overlap {self.overlap!r} is not one of {', '.join(OVERLAPS)}"
            )

    def cache_key(self) -> str:
        """Canonical text of the options: equal for options that extract the same thing.

        List-valued options are sorted and deduplicated (their order never matters); the
        threshold is printed with repr so that 0.7 and 0.70 agree.
        """
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = ",".join(sorted(set(v)))
            elif isinstance(v, float):
                v = repr(float(v))
            parts.append(f"{f.name}={v}")
        return "|".join(parts)


# -- results ---------------------------------------------------------------------------------
EXPERIENCERS: tuple[str, ...] = ("patient", "other")
"""Whose condition a mention is (ConText's experiencer): the patient's, or another person's
("family history of colon cancer")."""


@dataclass(frozen=True, slots=True)
class Mention:
    """One concept found in a caption, with ConText's properties of that finding: ``negated``
    ("no pneumothorax"), ``hypothetical`` ("rule out pneumonia", "return if fever"),
    ``historical`` ("history of stroke", "status post CABG") and ``experiencer`` (one of
    :data:`EXPERIENCERS`; "other" in "mother had breast cancer"). See
    :mod:`conceptsvc.negation`."""

    cui: str
    preferred_name: str
    text: str  # exactly original_text[start:end]
    start: int
    end: int
    score: float
    semantic_types: tuple[str, ...]
    source: str  # SAB of the dictionary string that matched
    negated: bool = False
    hypothetical: bool = False
    historical: bool = False
    experiencer: str = "patient"

    def row(self) -> tuple[Any, ...]:
        """The fields as a tuple, in their order (one mention of :data:`MentionRows`)."""
        return (self.cui, self.preferred_name, self.text, self.start, self.end, self.score,
                self.semantic_types, self.source, self.negated, self.hypothetical,
                self.historical, self.experiencer)

    @property
    def context(self) -> tuple[str, ...]:
        """The ConText properties that are set, as words for people: ("negated",
        "historical"); empty for a present finding of the patient's."""
        out = [name for name, on in (("negated", self.negated),
                                     ("hypothetical", self.hypothetical),
                                     ("historical", self.historical)) if on]
        if self.experiencer != "patient":
            out.append(f"experiencer {self.experiencer}")
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Annotation:
    id: str
    mentions: tuple[Mention, ...]
    concepts: tuple[str, ...]  # deduplicated CUIs, in order of first evidence


# An annotation for a writer of wire bytes (``Extractor.extract_rows``): its mentions, each as
# the tuple of the Mention's fields in their order (:meth:`Mention.row`), and its concepts.
MentionRows = tuple[tuple[tuple[Any, ...], ...], tuple[str, ...]]


def _shapes(call: str) -> str:
    """Both call shapes of a batch method, for its error messages."""
    return (
        f'{call}(["CT of the chest", "MRI of the brain"]) (ids "0", "1", ...) or '
        f'{call}([("cap1", "CT of the chest"), ("cap2", "MRI of the brain")])'
    )


def _item_source(items: object, call: str, one: str) -> Iterable[object]:
    """What a batch method iterates: the items, or a mapping's ``(id, text)`` pairs. A single
    string or a value that is not iterable raises ExtractArgumentError."""
    if isinstance(items, str | bytes | bytearray):
        raise ExtractArgumentError(
            f"{call} takes many texts, not one string ({_clip(items)}); use {one} for one text, "
            f"or {_shapes(call)}."
        )
    if isinstance(items, Mapping):
        return items.items()
    if isinstance(items, Iterable):
        return items
    raise ExtractArgumentError(
        f"{call} takes a list of texts or of (id, text) pairs, got {type(items).__name__}; "
        f"call {_shapes(call)}."
    )


ID_HEADERS = frozenset({"id", "ids", "image", "image_id", "imageid", "image id", "image_name",
                        "figure", "figure_id", "file", "filename", "file_name"})
"""Column names (case-folded) that name an annotation's id in a header row, of a caption corpus
(:mod:`conceptsvc.client.corpus`) or a concepts file (:mod:`conceptsvc.evaluation`): ROCOv2
writes ``ID``, others ``image_id``, ``filename``, ... An id spelt like one of these is not
plausible."""


CAPTION_HEADERS = frozenset({"caption", "captions", "text", "caption_text", "description"})
"""Column names (case-folded) that name a caption column in a corpus's header or a Parquet
file's schema (:mod:`conceptsvc.client.corpus`, :mod:`conceptsvc.client.parquet`): ROCOv2
writes ``Caption``, others ``caption`` or ``text``."""


def id_string(rid: object) -> str | None:
    """An annotation id as the engines take it: a string as it is, an integer as its string
    (not a bool); None for anything else."""
    if isinstance(rid, str):
        return rid
    if isinstance(rid, int) and not isinstance(rid, bool):
        return str(rid)
    return None


def _pair(i: int, item: object, call: str, texts: bool) -> tuple[str, str]:
    """Item ``i`` as an ``(id, text)`` pair: a text when ``texts`` (its position is its id), else
    a pair whose integer id becomes its string; anything else raises ExtractArgumentError."""
    if texts and isinstance(item, str):
        return str(i), item
    if not texts and isinstance(item, tuple | list) and len(item) == 2:
        rid, text = id_string(item[0]), item[1]
        if rid is not None and isinstance(text, str):
            return rid, text
    if texts:
        what = f"{_clip(item)} but the items before it are texts"
    elif isinstance(item, str):
        what = f"a text ({_clip(item)}) but others are (id, text) pairs"
    else:
        what = _clip(item)
    raise ExtractArgumentError(
        f"{call}: item {i} is {what}; give either only texts or only (id, text) "
        f"pairs of strings: {_shapes(call)}."
    )


def batch_items(
    items: Iterable[str] | Iterable[tuple[str, str]] | Mapping[str, str],
    *,
    call: str = "extract_batch",
    one: str = "extract(text)",
) -> list[tuple[str, str]]:
    """What an engine's ``extract_batch`` was given, as ``(id, text)`` pairs.

    ``items`` is either plain texts — each gets its position as its id, as a string
    (``"0"``, ``"1"``, ...) — or ``(id, text)`` pairs (an integer id becomes its string), or a
    mapping of id to text. A single string, a mix of the two shapes, or any other item raises
    :class:`~conceptsvc.errors.ExtractArgumentError` showing both call shapes (of ``call``;
    ``one`` is the method for a single text).
    """
    pairs = list(_item_source(items, call, one))
    texts = all(isinstance(item, str) for item in pairs)
    return [_pair(i, item, call, texts) for i, item in enumerate(pairs)]


def stream_items(
    items: Iterable[str] | Iterable[tuple[str, str]] | Mapping[str, str],
    *,
    call: str,
    one: str,
) -> Iterator[tuple[str, str]]:
    """:func:`batch_items` item by item, for a stream that must not read ahead: the first
    item says which shape all of them have (texts, or ``(id, text)`` pairs), and an item of
    another shape raises :class:`~conceptsvc.errors.ExtractArgumentError` when it is reached.
    Exceptions of ``items`` itself pass through as they are."""
    texts: bool | None = None
    for i, item in enumerate(_item_source(items, call, one)):
        if texts is None:
            texts = isinstance(item, str)
        yield _pair(i, item, call, texts)


def _clip(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Candidate:
    """One concept proposed for a search query."""

    cui: str
    preferred_name: str
    matched_string: str
    score: float
    semantic_types: tuple[str, ...]
    sources: tuple[str, ...]


# -- service answers -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ItemError:
    """Why one stream item failed; the stream itself went on."""

    status: str  # gRPC status name, e.g. "INVALID_ARGUMENT"
    message: str
    error_code: str = ""  # conceptsvc's E-code when the error has one


@dataclass(frozen=True, slots=True)
class StreamResult:
    """The outcome of one item of ``ConceptClient.annotate_stream``."""

    id: str
    annotation: Annotation | None
    error: ItemError | None = None
    cached: bool = False
    # Content hash of the index that answered (empty from servers that predate the field). It
    # lives here, not on Annotation, whose fields the compiled engine builds directly.
    index_hash: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Synonym:
    string: str
    source: str
    tty: str
    preferred: bool
    abbreviation: bool


@dataclass(frozen=True, slots=True)
class ConceptRecord:
    """One concept as the service (or an in-process lookup) describes it."""

    cui: str
    preferred_name: str
    semantic_types: tuple[SemanticType, ...]
    sources: tuple[str, ...]
    synonyms: tuple[Synonym, ...] = ()


@dataclass(frozen=True, slots=True)
class SemanticCatalog:
    types: tuple[SemanticType, ...]
    groups: tuple[SemanticGroup, ...]


@dataclass(frozen=True, slots=True)
class IndexSummary:
    content_hash: str
    source_release: str
    format_version: int
    normalizer_version: str
    created_at: str
    concepts: int
    keys: int
    manifest: dict[str, Any] = field(default_factory=dict)


MAX_BATCH_ITEMS = 10_000
"""The service's default ``max_batch_items`` (the setting's description says why this number),
and so the most items ``ConceptClient.annotate_batch`` puts in one AnnotateBatch request."""


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    max_text_chars: int
    max_message_bytes: int
    max_search_limit: int
    max_concurrent_rpcs: int
    max_option_items: int = 0
    """Most names in one option list (0: a server that does not report it)."""
    max_batch_items: int = 0
    """Most items in one AnnotateBatch request (0: a server that does not report it)."""


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    service_version: str
    api_version: str
    index: IndexSummary
    default_options: ExtractOptions
    limits: ServiceLimits
    profiles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    previous_content_hash: str
    content_hash: str
    changed: bool
    concepts: int
    load_seconds: float
