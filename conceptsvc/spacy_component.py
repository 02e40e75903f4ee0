"""The ``conceptsvc`` spaCy pipeline component: concepts on ``doc.spans`` and ``doc.ents``.

For users who already run spaCy (medspaCy, scispaCy pipelines)::

    import spacy
    nlp = spacy.blank("en")
    nlp.add_pipe("conceptsvc", config={"profile": "rocov2"})
    doc = nlp("Axial CT shows a left pleural effusion.")
    for span in doc.spans["conceptsvc"]:
        print(span.text, span._.cui, span._.score, span._.semantic_types, span._.negated)

The factory is registered through the ``spacy_factories`` entry point, so ``add_pipe`` works
without importing this module first. The component runs the same
:class:`~conceptsvc.extractor.Extractor` as the service on ``doc.text`` and maps the mentions'
character offsets onto the doc's tokens (``alignment_mode="expand"``: a mention that ends inside
a spaCy token covers the whole token). Every mention goes to ``doc.spans[spans_key]`` (label and
``kb_id`` = CUI); two mentions of one concept that expand onto the same tokens (``"CT.CT"`` is
one spaCy token) are one span, the first mention's. ``doc.ents`` gets the non-overlapping spans
(longest first, as :func:`spacy.util.filter_spans` picks) when ``set_ents`` is true, replacing
entities set earlier in the pipeline on the same tokens.

Extension attributes on ``Span``: ``cui``, ``preferred_name``, ``score``, ``semantic_types``,
``source``, ``negated``, ``hypothetical``, ``historical``, ``experiencer`` (ConText's
properties, :class:`~conceptsvc.model.Mention`). The ``Doc`` gets ``conceptsvc_concepts``: the
caption's concept set (a tuple), including concepts a profile inferred without a mention.

spaCy keys a span's own extension values by its characters alone (``Underscore._get_key``), so
two spans on the same characters — two concepts on one phrase with ``overlap="all"``, or two
mentions widened onto one token — would share them. These attributes are therefore getters
over the mentions' values kept in ``doc.user_data`` per character range *and label* (the CUI):
each span reads its own concept's values, and a span this component did not make (another
component's entity on the same characters) reads the defaults. They are stored as spaCy stores
extension values (a ``"._."`` key with character offsets), so ``Doc.to_bytes`` / ``DocBin``
(with user data), ``Doc.from_docs``, ``Span.as_doc(copy_user_data=True)`` and
``nlp.pipe(n_process=...)`` carry them.

Configuration (all optional): ``index_path`` (default: the embedded demo dictionary) and the
:class:`~conceptsvc.model.ExtractOptions` fields. Invalid options fail when the pipeline is
built, not on the first document.

``nlp.pipe(texts, n_process=N)`` works under either start method: the component pickles as
its configuration (the index's path and content hash, the options), and each worker process
loads the index from that path — so the index must stay in place while it runs (one rebuilt
in place is refused with a :class:`~conceptsvc.errors.ConceptIndexError`). Docs come back
with the same values as in-process (``conceptsvc_concepts`` and ``semantic_types`` tuples).

spaCy is an extra (``conceptsvc[spacy]``): the service, the client and the index build do not
need it. Importing this module without it is a :class:`~conceptsvc.errors.ConfigError` that
says how to install it.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any, cast

from conceptsvc.errors import ConceptIndexError, ConfigError

try:
    from spacy.language import Language
    from spacy.tokens import Doc, Span
    from spacy.util import filter_spans
except ImportError as exc:
    raise ConfigError(
        f"the spaCy component needs spaCy ({exc}); install it with "
        "pip install 'conceptsvc[spacy]'"
    ) from exc

from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.model import ExtractOptions

__all__ = ["ConceptsvcComponent", "make_conceptsvc"]

_SPAN_EXTENSIONS: dict[str, Any] = {
    "cui": None,
    "preferred_name": None,
    "score": None,
    "semantic_types": (),
    "source": None,
    "negated": False,
    "hypothetical": False,
    "historical": False,
    "experiencer": "patient",
}
# Fields that are tuples in Python: msgpack (Doc.to_bytes, nlp.pipe's worker processes) gives
# them back as lists.
_TUPLE_FIELDS = frozenset({"semantic_types"})
# The name under which a character range's mentions live in ``doc.user_data``:
# ``("._.", _MENTIONS, start_char, end_char) -> {label: {field: value}}``, the shape of spaCy's
# own extension keys, so that spaCy shifts the offsets where it shifts its own (Doc.from_docs,
# Span.as_doc). Not a registered extension.
_MENTIONS = "conceptsvc_mentions"
_CONCEPTS_KEY = ("._.", "conceptsvc_concepts", None, None)


def _user_data(doc: Doc) -> dict[Any, Any]:
    # spaCy's stubs say dict[str, Any]; its own extension keys are tuples, as ours are
    return cast("dict[Any, Any]", doc.user_data)


def _mentions_at(span: Span) -> dict[str, dict[str, Any]] | None:
    found: dict[str, dict[str, Any]] | None = _user_data(span.doc).get(
        ("._.", _MENTIONS, span.start_char, span.end_char)
    )
    return found


def _get_span_value(name: str, span: Span) -> Any:
    record = (_mentions_at(span) or {}).get(span.label_)
    if record is None or name not in record:
        return _SPAN_EXTENSIONS[name]
    value = record[name]
    return tuple(value) if name in _TUPLE_FIELDS and value is not None else value


def _set_span_value(name: str, span: Span, value: Any) -> None:
    at = _user_data(span.doc).setdefault(("._.", _MENTIONS, span.start_char, span.end_char), {})
    at.setdefault(span.label_, {})[name] = value


def _get_concepts(doc: Doc) -> tuple[str, ...]:
    return tuple(_user_data(doc).get(_CONCEPTS_KEY, ()))


def _set_concepts(doc: Doc, value: Iterable[str]) -> None:
    _user_data(doc)[_CONCEPTS_KEY] = tuple(value)


def _register_extensions() -> None:
    # partials of module functions, not closures: nlp.pipe(n_process=...) pickles the
    # extensions for its worker processes
    for name in _SPAN_EXTENSIONS:
        if not Span.has_extension(name):
            Span.set_extension(
                name,
                getter=partial(_get_span_value, name),
                setter=partial(_set_span_value, name),
            )
    if not Doc.has_extension("conceptsvc_concepts"):
        Doc.set_extension("conceptsvc_concepts", getter=_get_concepts, setter=_set_concepts)


class ConceptsvcComponent:
    """Annotates docs with an :class:`Extractor`; one instance per pipeline."""

    def __init__(
        self,
        extractor: Extractor,
        options: ExtractOptions,
        *,
        spans_key: str = "conceptsvc",
        set_ents: bool = True,
    ) -> None:
        extractor.check_options(options)
        _register_extensions()
        self.extractor = extractor
        self.options = options
        self.spans_key = spans_key
        self.set_ents = set_ents

    def __call__(self, doc: Doc) -> Doc:
        ann = self.extractor.extract(doc.text, self.options)
        spans: list[Span] = []
        seen: set[tuple[int, int, str]] = set()
        for m in ann.mentions:
            span = doc.char_span(m.start, m.end, label=m.cui, kb_id=m.cui, alignment_mode="expand")
            if span is None:  # pragma: no cover - "expand" always finds tokens for a mention
                continue
            key = (span.start_char, span.end_char, m.cui)
            if key in seen:  # the same concept already on these tokens: one span, the first
                continue
            seen.add(key)
            at = _user_data(doc).setdefault(("._.", _MENTIONS, key[0], key[1]), {})
            at[m.cui] = {
                "cui": m.cui,
                "preferred_name": m.preferred_name,
                "score": m.score,
                "semantic_types": tuple(m.semantic_types),
                "source": m.source,
                "negated": m.negated,
                "hypothetical": m.hypothetical,
                "historical": m.historical,
                "experiencer": m.experiencer,
            }
            spans.append(span)
        doc.spans[self.spans_key] = spans
        doc._.conceptsvc_concepts = ann.concepts
        if self.set_ents and spans:
            chosen = filter_spans(spans)
            taken = {i for s in chosen for i in range(s.start, s.end)}
            kept = [e for e in doc.ents if not any(i in taken for i in range(e.start, e.end))]
            doc.ents = filter_spans([*kept, *chosen])
        return doc

    def pipe(self, docs: Iterable[Doc], batch_size: int = 128) -> Iterable[Doc]:
        for doc in docs:
            yield self(doc)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its configuration: the index's path (and content hash), options, spans
        key and engine. The memory-mapped index does not pickle, and copying it would be the
        wrong cost anyway; ``nlp.pipe(n_process=...)`` under the spawn start method pickles the
        pipeline, and each worker process loads the index from its path once."""
        index = self.extractor.index
        return (
            _restore_component,
            (str(index.path), index.content_hash, self.options, self.spans_key, self.set_ents,
             self.extractor.engine),
        )


def _restore_component(
    index_path: str,
    content_hash: str,
    options: ExtractOptions,
    spans_key: str,
    set_ents: bool,
    engine: str,
) -> ConceptsvcComponent:
    """The component :meth:`ConceptsvcComponent.__reduce__` describes, in another process."""
    index = ConceptIndex.load(index_path)
    if index.content_hash != content_hash:
        raise ConceptIndexError(
            f"{index_path}: the index changed after the spaCy pipeline was built (content hash "
            f"{content_hash[:12]}, now {index.content_hash[:12]}), so a worker process would "
            "annotate with another index; build the pipeline again, or keep the index in "
            "place while nlp.pipe(n_process=...) runs"
        )
    return ConceptsvcComponent(
        Extractor(index, default_options=options, engine=engine),
        options,
        spans_key=spans_key,
        set_ents=set_ents,
    )


@Language.factory(
    "conceptsvc",
    default_config={
        "index_path": "",
        "profile": "none",
        "mode": "exact",
        "similarity": "jaccard",
        "threshold": 0.7,
        "overlap": "longest",
        "semantic_types": [],
        "semantic_groups": [],
        "sources": [],
        "exclude_cuis": [],
        "include_negated": True,
        "include_hypothetical": None,
        "spans_key": "conceptsvc",
        "set_ents": True,
    },
)
def make_conceptsvc(
    nlp: Language,
    name: str,
    index_path: str,
    profile: str,
    mode: str,
    similarity: str,
    threshold: float,
    overlap: str,
    semantic_types: list[str],
    semantic_groups: list[str],
    sources: list[str],
    exclude_cuis: list[str],
    include_negated: bool,
    include_hypothetical: bool | None,
    spans_key: str,
    set_ents: bool,
) -> ConceptsvcComponent:
    """spaCy factory (see the module docstring for the configuration)."""
    if index_path:
        index = ConceptIndex.load(index_path)
    else:
        from conceptsvc.embedded import demo_index

        index = demo_index()
    options = ExtractOptions(
        semantic_types=tuple(semantic_types),
        semantic_groups=tuple(semantic_groups),
        sources=tuple(sources),
        exclude_cuis=tuple(exclude_cuis),
        mode=mode,
        similarity=similarity,
        threshold=float(threshold),
        overlap=overlap,
        profile=profile,
        include_negated=include_negated,
        include_hypothetical=include_hypothetical,
        include_mentions=True,
    )
    return ConceptsvcComponent(
        Extractor(index, default_options=options),
        options,
        spans_key=spans_key,
        set_ents=set_ents,
    )
