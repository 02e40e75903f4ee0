"""Properties that must hold for every caption, checked with hypothesis.

- the normaliser: every token's span slices the original text to a surface whose normal form is
  the token; the fast (ASCII) and general tokenisers agree; normalisation is idempotent on keys;
- the extractor: every mention's offsets are token boundaries of the original text, and what the
  span spells explains its concept (a key of it, a similar key in approximate mode, or a short
  form whose caption-defined long form is one; ``tests/offsets.py``); annotating twice — or
  with a fresh extractor — gives the same result; ``extract_batch`` equals one-by-one
  extraction;
- the service, with a real Redis: results do not depend on the stream batch size, the client's
  window, or whether they came from the engine, the in-process cache or Redis.

Captions are drawn from dictionary strings in random case and spacing, glued with arbitrary
Unicode (lone surrogates included where Python strings, not protobuf, carry them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from offsets import check_annotation
from service_helpers import running_server, settings_for

from conceptsvc.client import ConceptClient
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.model import ExtractOptions
from conceptsvc.normalize import normalize_term, normalize_token, tokenize, tokenize_spans

FIXTURES = Path(__file__).parent / "fixtures"

TERMS = sorted(
    {
        line.split("\t")[3]
        for line in (FIXTURES / "engine_dictionary.tsv").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    }
)

_FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
_SERVICE = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _variant(term: str, style: int) -> str:
    return [term, term.upper(), term.lower(), term.title(), term.replace(" ", "  "),
            term.replace(" ", "-"), term + "s"][style % 7]


# Glue between terms: punctuation, whitespace, and arbitrary Unicode (NUL, combining marks,
# RTL, astral emoji, full-width, ligatures, control characters).
_GLUE_ALPHABET = st.characters(codec=None, exclude_categories=())
_GLUE_NO_SURROGATES = st.characters(exclude_categories=("Cs",))
_SPECIAL = st.sampled_from(
    [" ", ", ", ". ", " (", ") ", "\x00", "\u0301", "\u202e", "🫁", "Ｃｈｅｓｔ", "ﬁ", "\t",
     " no ", " without ", " of the ", "\u200d", "\r\n", "'s ", " CT ", " US ", " (CT) ",
     " pleural effusion (PE) ", " PE "]
)


def captions(*, surrogates: bool) -> st.SearchStrategy[str]:
    glue_chars = _GLUE_ALPHABET if surrogates else _GLUE_NO_SURROGATES
    piece = st.one_of(
        st.builds(_variant, st.sampled_from(TERMS), st.integers(0, 6)),
        _SPECIAL,
        st.text(glue_chars, max_size=6),
    )
    return st.lists(piece, max_size=14).map("".join)


@pytest.fixture(scope="module")
def ex(engine_index_path: Path) -> Extractor:
    return Extractor(ConceptIndex.load(engine_index_path))


# -- the normaliser -------------------------------------------------------------------------------
@_FAST
@given(st.text(st.characters(codec=None), max_size=80) | captions(surrogates=True))
def test_reliability_properties_token_spans_slice_the_original(text: str) -> None:
    tokens = tokenize(text)
    last_end = 0
    for t in tokens:
        assert last_end <= t.start < t.end <= len(text)
        assert normalize_token(text[t.start : t.end]) == t.norm != ""
        last_end = t.end
    norms, starts, ends = tokenize_spans(text)
    assert (norms, starts, ends) == (
        [t.norm for t in tokens], [t.start for t in tokens], [t.end for t in tokens]
    )


@_FAST
@given(st.sampled_from(TERMS) | st.text(max_size=40))
def test_reliability_properties_normalised_keys_are_fixed_points(term: str) -> None:
    key = normalize_term(term)
    assert normalize_term(key) == key
    assert "  " not in key and key == key.strip()


# -- the extractor --------------------------------------------------------------------------------
@_FAST
@given(
    captions(surrogates=True),
    st.sampled_from(["exact", "approximate"]),
    st.sampled_from(["longest", "best_score", "all"]),
)
def test_reliability_properties_mentions_slice_the_matched_surface(
    ex: Extractor, text: str, mode: str, overlap: str
) -> None:
    options = ExtractOptions(mode=mode, overlap=overlap, threshold=0.6)
    a = ex.extract(text, options, id="p")
    check_annotation(ex.index, text, a, options)
    assert ex.extract(text, options, id="p") == a  # twice: the same


@_FAST
@given(captions(surrogates=True))
def test_reliability_properties_fresh_extractor_agrees(ex: Extractor, text: str) -> None:
    fresh = Extractor(ex.index)
    assert fresh.extract(text, id="f") == ex.extract(text, id="f")


@_FAST
@given(st.lists(captions(surrogates=True), max_size=12))
def test_reliability_properties_batch_equals_one_by_one(ex: Extractor, texts: list[str]) -> None:
    items = [(f"id{i}", t) for i, t in enumerate(texts)]
    assert ex.extract_batch(items) == [ex.extract(t, id=i) for i, t in items]


# -- the service with a real Redis ----------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url(shared_redis: object) -> str:
    return shared_redis.url  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="module")
def services(engine_index_path: Path, redis_url: str) -> Iterator[dict[str, int]]:
    """Four real servers on one index: batch size 1 with Redis, batch size 64 with Redis (and
    a separate in-process cache), batch size 3 with Redis as its only cache tier, and one
    without any cache at all."""
    configs = {
        "redis_b1": settings_for(engine_index_path, redis_url=redis_url, stream_batch_size=1,
                                 redis_prefix="prop:"),
        "redis_b64": settings_for(engine_index_path, redis_url=redis_url, stream_batch_size=64,
                                  redis_prefix="prop:"),
        "redis_only_b3": settings_for(engine_index_path, redis_url=redis_url, cache_size=0,
                                      stream_batch_size=3, redis_prefix="prop:"),
        "nocache_b7": settings_for(engine_index_path, cache_size=0, stream_batch_size=7),
    }
    ports: dict[str, int] = {}
    stack = []
    try:
        for name, s in configs.items():
            cm = running_server(s)
            _srv, port = cm.__enter__()
            stack.append(cm)
            ports[name] = port
        yield ports
    finally:
        for cm in reversed(stack):
            cm.__exit__(None, None, None)


@_SERVICE
@given(st.lists(captions(surrogates=False), min_size=1, max_size=20), st.integers(1, 9))
def test_reliability_properties_service_results_independent_of_batching_and_cache(
    ex: Extractor, services: dict[str, int], texts: list[str], window: int
) -> None:
    items = [(f"c{i}", t) for i, t in enumerate(texts)]
    expected = [ex.extract(t, id=i) for i, t in items]
    cached: dict[str, list[list[bool]]] = {}
    rounds = ("redis_b1", "redis_only_b3", "redis_b64", "nocache_b7", "redis_b1", "redis_b64")
    for name in rounds:
        with ConceptClient(f"127.0.0.1:{services[name]}", retries=0) as c:
            results = list(c.annotate_stream(items, window=window))
            assert [r.id for r in results] == [i for i, _ in items]
            assert [r.error for r in results] == [None] * len(items)
            assert [r.annotation for r in results] == expected, name
            cached.setdefault(name, []).append([r.cached for r in results])
            for (i, t), want in zip(items, expected, strict=True):
                assert c.annotate(t, id=i) == want
    everything = [True] * len(items)
    # redis_b1 wrote every result to Redis before answering it; the server without an
    # in-process tier can only have read them back from there.
    assert cached["redis_only_b3"] == [everything]
    assert cached["nocache_b7"] == [[False] * len(items)]
    # The second round on the other Redis servers was answered from a cache.
    assert cached["redis_b1"][1] == cached["redis_b64"][1] == everything


def test_reliability_properties_redis_hit_equals_engine_result(
    ex: Extractor, engine_index_path: Path, redis_url: str
) -> None:
    """A result read back from Redis by a *new* server (empty in-process cache) is identical to
    the engine's, so a hit can never differ from a miss."""
    items = [(f"r{i}", f"{t} and {t.upper()}; no {t.lower()}") for i, t in enumerate(TERMS)]
    expected = [ex.extract(t, id=i) for i, t in items]
    s = settings_for(engine_index_path, redis_url=redis_url, redis_prefix="prop-hit:")
    with running_server(s) as (_srv, port), ConceptClient(f"127.0.0.1:{port}") as c:
        first = list(c.annotate_stream(items))
    assert [r.cached for r in first] == [False] * len(items)
    with running_server(s) as (_srv, port), ConceptClient(f"127.0.0.1:{port}") as c:
        second = list(c.annotate_stream(items))
    assert [r.cached for r in second] == [True] * len(items)
    assert [r.annotation for r in first] == [r.annotation for r in second] == expected
