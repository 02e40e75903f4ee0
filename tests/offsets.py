"""What a mention's offsets promise, checked against the dictionary (shared by the tests that
annotate).

``text[m.start:m.end] == m.text`` proves nothing: ``Mention.text`` is built as that slice. What
the offsets promise is that the span is a run of whole tokens of the *original* text and that
what it spells is why the mention carries its concept. Each way a mention can come to exist is
checked for what it must satisfy:

- **exact** (score 1.0): the window's normalised tokens, joined, are a dictionary key with a
  posting of the mention's concept from the mention's source;
- **approximate** (approximate mode only): the window's key reaches the request's threshold
  against a key of the concept, and its trigram similarity to that key *is* the score;
- **caption definition** ("computed tomography (CT) ... CT"): the surface is a short form the
  caption defines (:func:`~conceptsvc.abbreviations.find_definitions`), and a token window
  ending where the long form ends satisfies the exact or approximate rule for the concept;
- **profile inference**: no mention at all; such concepts follow the mentioned ones in
  ``Annotation.concepts`` and must be members or defaults of one of the profile's slots.

Tokens and keys come from the pure-Python reference (:func:`~conceptsvc.normalize.tokenize`,
:func:`~conceptsvc.normalize.normalize_term`) and trigram similarity is recomputed here, so the
check holds the compiled engine to the same rules as the reference.

For the QuickUMLS backend, :func:`check_quickumls_annotation` checks what QuickUMLS itself
guarantees: spans on spaCy token boundaries, and a score that is the span's trigram similarity
to one of the concept's strings in its own dictionary (lower-cased, transliterated to ASCII) —
equal to it in exact mode. Not that the score reaches the threshold: simstring applies the
threshold to its own features when it retrieves candidates, and QuickUMLS then reports its
unpadded similarity without checking it again ("Sjögren Sjögren" is Sjögren syndrome at 0.47
with threshold 0.7).
"""

from __future__ import annotations

import json
import math
import unicodedata
from functools import cache
from pathlib import Path
from typing import Any

from conceptsvc.abbreviations import find_definitions
from conceptsvc.index import ConceptIndex
from conceptsvc.model import Annotation, ExtractOptions, Mention
from conceptsvc.normalize import normalize_term, tokenize
from conceptsvc.profile import load_profile

__all__ = ["check_annotation", "check_quickumls_annotation", "similarity", "trigrams"]

_TOL = 1e-9


def _show(text: str) -> str:
    """``text`` for an assertion message (a megabyte caption is not printed whole)."""
    return repr(text) if len(text) <= 200 else f"{text[:200]!r}... ({len(text)} characters)"


def trigrams(s: str) -> frozenset[str]:
    """Character trigrams without padding; a string shorter than three is one gram (QuickUMLS's
    and simstring's convention, which conceptsvc's approximate matcher follows)."""
    if len(s) < 3:
        return frozenset((s,)) if s else frozenset()
    return frozenset(s[i : i + 3] for i in range(len(s) - 2))


def similarity(measure: str, a: str, b: str) -> float:
    """Trigram similarity of two strings; ``overlap`` is the overlap coefficient."""
    x, y = trigrams(a), trigrams(b)
    if not x or not y:
        return 0.0
    shared = len(x & y)
    if measure == "jaccard":
        return shared / (len(x) + len(y) - shared)
    if measure == "cosine":
        return shared / math.sqrt(len(x) * len(y))
    if measure == "dice":
        return 2 * shared / (len(x) + len(y))
    if measure == "overlap":
        return shared / min(len(x), len(y))
    raise ValueError(f"unknown similarity {measure!r}")


def _token_windows(text: str) -> tuple[list[str], dict[int, int], dict[int, int]]:
    """Reference tokens of ``text``: norms, token index by start offset and by end offset."""
    tokens = tokenize(text)
    return (
        [t.norm for t in tokens],
        {t.start: i for i, t in enumerate(tokens)},
        {t.end: i for i, t in enumerate(tokens)},
    )


def _spells(
    index: ConceptIndex, key: str, m: Mention, options: ExtractOptions
) -> str | None:
    """Why the window key ``key`` carries ``m``'s concept, or None when nothing explains it."""
    if m.score == 1.0 and any(
        p.cui == m.cui and p.sab == m.source for p in index.postings(key)
    ):
        return "exact"
    if options.mode != "approximate" or m.score < options.threshold - _TOL:
        return None
    for p in index.concept_postings(m.cui):
        if p.sab != m.source:
            continue
        k = normalize_term(p.string)
        if math.isclose(similarity(options.similarity, key, k), m.score, abs_tol=_TOL) and any(
            q.cui == m.cui and q.sab == m.source for q in index.postings(k)
        ):
            return "approximate"
    return None


def check_annotation(
    index: ConceptIndex,
    text: str,
    a: Annotation,
    options: ExtractOptions | None = None,
) -> None:
    """Assert that every mention of ``a`` (the engine's annotation of ``text`` with
    ``options``) is explained by ``index``, and that concepts without a mention are a profile's
    inferences (see the module docstring)."""
    o = options or ExtractOptions()
    norms, tok_at_start, tok_at_end = _token_windows(text)
    definitions = None
    for m in a.mentions:
        assert 0 <= m.start < m.end <= len(text), m
        assert m.text == text[m.start : m.end], m  # the wire (protobuf) keeps the slice
        i, j = tok_at_start.get(m.start), tok_at_end.get(m.end)
        assert i is not None and j is not None and i <= j, (
            f"{m} does not start and end on token boundaries of {_show(text)}"
        )
        assert (m.preferred_name, m.semantic_types) == index.name_and_types(m.cui), m
        assert o.include_negated or not m.negated, m
        if _spells(index, " ".join(norms[i : j + 1]), m, o):
            continue
        # Not its own surface: only a short form defined in the caption takes another
        # window's concept, that of its long form.
        if definitions is None:
            definitions = find_definitions(text)
        explained = False
        for d in definitions:
            if d.short != m.text:
                continue
            lf_end = tok_at_end.get(d.long_end)
            if lf_end is None:
                continue
            for s, k in tok_at_start.items():
                if s >= d.long_start and k <= lf_end and _spells(
                    index, " ".join(norms[k : lf_end + 1]), m, o
                ):
                    explained = True
                    break
            if explained:
                break
        assert explained, (
            f"{m}: {text[m.start : m.end]!r} (key {' '.join(norms[i : j + 1])!r}) is not a "
            f"key of {m.cui}, not within {o.threshold} of one, and no caption definition "
            "gives it that concept"
        )
    if not o.include_mentions:
        assert a.mentions == ()
        return
    mentioned = list(dict.fromkeys(m.cui for m in a.mentions))
    assert list(a.concepts[: len(mentioned)]) == mentioned, a
    inferred = a.concepts[len(mentioned) :]
    assert len(set(a.concepts)) == len(a.concepts), a
    if inferred:
        slots = load_profile(o.profile).model.slots
        candidates = {m.cui for s in slots for m in s.members} | {
            d.cui for s in slots for d in s.defaults
        }
        assert set(inferred) <= candidates, (
            f"{a}: {set(inferred) - candidates} have no mention and profile {o.profile!r} "
            "cannot infer them"
        )


# -- the QuickUMLS backend -----------------------------------------------------------------------


@cache
def _quickumls_dictionary(index_dir: Path) -> dict[str, Any]:
    """The backend's record of its QuickUMLS dictionary: CUI → string → sources."""
    from conceptsvc.backends.quickumls import SIDECAR_NAME

    data: dict[str, Any] = json.loads((index_dir / SIDECAR_NAME).read_text(encoding="utf-8"))
    return data


@cache
def _spacy_tokenizer() -> Any:
    import spacy

    return spacy.blank("en")


def check_quickumls_annotation(
    index_dir: Path, text: str, a: Annotation, options: ExtractOptions | None = None
) -> None:
    """Assert QuickUMLS's guarantees for every mention of the backend's annotation of ``text``
    (see the module docstring)."""
    from unidecode import unidecode

    o = options or ExtractOptions()
    sidecar = _quickumls_dictionary(index_dir)
    doc = _spacy_tokenizer()(text)
    starts = {t.idx for t in doc}
    ends = {t.idx + len(t.text) for t in doc}
    for m in a.mentions:
        assert 0 <= m.start < m.end <= len(text), m
        assert m.text == text[m.start : m.end], m
        assert m.start in starts and m.end in ends, (
            f"{m} does not start and end on spaCy token boundaries of {_show(text)}"
        )
        window = text[m.start : m.end]
        if sidecar["normalize_unicode"]:
            window = unidecode(window)
        if sidecar["lowercase"]:
            window = window.lower()
        window = unicodedata.normalize("NFKD", window)
        strings: dict[str, list[str]] = sidecar["sources"].get(m.cui, {})
        if o.mode == "exact":
            ok = [s for s in strings if s == window and m.score == 1.0]
        else:
            ok = [
                s
                for s in strings
                if math.isclose(similarity(o.similarity, window, s), m.score, abs_tol=_TOL)
                and m.score > 0
            ]
        assert ok, (
            f"{m}: the score is not the {o.similarity} similarity of {window!r} to any "
            f"dictionary string of {m.cui}: {sorted(strings)}"
        )
        assert any(m.source in strings[s] for s in ok), m
