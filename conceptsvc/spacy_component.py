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
``kb_id`` = CUI, so two concepts on one span keep separate extension values); ``doc.ents`` gets
the non-overlapping ones (longest first, as :func:`spacy.util.filter_spans` picks) when
``set_ents`` is true, replacing entities set earlier in the pipeline on the same tokens.

Extension attributes on ``Span``: ``cui``, ``preferred_name``, ``score``, ``semantic_types``,
``source``, ``negated``, ``hypothetical``, ``historical``, ``experiencer`` (ConText's
properties, :class:`~conceptsvc.model.Mention`). The ``Doc`` gets ``conceptsvc_concepts``: the
caption's concept set, including concepts a profile inferred without a mention.

Configuration (all optional): ``index_path`` (default: the embedded demo dictionary) and the
:class:`~conceptsvc.model.ExtractOptions` fields. Invalid options fail when the pipeline is
built, not on the first document.

spaCy is an extra (``conceptsvc[spacy]``): the service, the client and the index build do not
need it. Importing this module without it is a :class:`~conceptsvc.errors.ConfigError` that
says how to install it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from conceptsvc.errors import ConfigError

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


def _register_extensions() -> None:
    for name, default in _SPAN_EXTENSIONS.items():
        if not Span.has_extension(name):
            Span.set_extension(name, default=default)
    if not Doc.has_extension("conceptsvc_concepts"):
        Doc.set_extension("conceptsvc_concepts", default=())


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
        for m in ann.mentions:
            span = doc.char_span(m.start, m.end, label=m.cui, kb_id=m.cui, alignment_mode="expand")
            if span is None:  # pragma: no cover - "expand" always finds tokens for a mention
                continue
            ext = span._
            ext.cui = m.cui
            ext.preferred_name = m.preferred_name
            ext.score = m.score
            ext.semantic_types = m.semantic_types
            ext.source = m.source
            ext.negated = m.negated
            ext.hypothetical = m.hypothetical
            ext.historical = m.historical
            ext.experiencer = m.experiencer
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
