"""The compiled hot path (``conceptsvc/_speedups.pyx``) gives the pure-Python reference's results.

Guaranteed here, with the extension built (a silent fallback fails the first test): the same
tokens, offsets and normalised forms for every code point and random Unicode; the same negation
flags, caption definitions and profile results; and equal Annotations (same repr too) for every
demo caption under every family of options, for generated captions, in any order, batch, thread
or cache state. The two sides are ``Extractor(index, engine="compiled")`` and
``Extractor(index, engine="reference")``, which runs no compiled code; one test runs the
reference in a child process with ``CONCEPTSVC_PURE_PYTHON=1``.

The compiled code has no rule constants of its own (it is handed the Python modules' tables),
so a rule changed in Python changes both engines: the unit tests of each module
(``test_matcher.py``, ``test_negation.py``, ...) hold the rules themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import random
import re
import string
import subprocess
import sys
import time
import types
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import LARGE_AMBIGUOUS, builder_from, large_words
from hypothesis import given, settings
from hypothesis import strategies as st
from negation_fixture import negation_rows

from benchmarks.synth_umls import generate
from conceptsvc import _speedups, abbreviations, normalize
from conceptsvc.approximate import APPROX, ApproximateMatcher
from conceptsvc.demo import CAPTIONS
from conceptsvc.dictionary import UmlsSource, build_dictionary_index
from conceptsvc.embedded import DEMO_META, demo_index
from conceptsvc.errors import ExtractionError
from conceptsvc.evaluation import read_captions
from conceptsvc.extractor import Extractor
from conceptsvc.index import FLAG_ABBREVIATION, FLAG_CASE_SENSITIVE, ConceptIndex, IndexBuilder
from conceptsvc.matcher import ExactMatcher
from conceptsvc.model import SIMILARITIES, Annotation, ExtractOptions
from conceptsvc.negation import (
    CONTEXT_RULES,
    Category,
    ContextRule,
    Kind,
    NegationDetector,
    NegationRules,
)
from conceptsvc.normalize import normalize_token, tokenize_spans_py
from conceptsvc.profile import Profile, ProfileModel, load_profile

Items = list[tuple[str, str]]

# -- the reference and the comparison ----------------------------------------------------------


def differences(items: Items, got: Sequence[Any], want: Sequence[Any]) -> list[str]:
    """One line per item whose results differ; repr catches 1 vs 1.0 and True vs 1 too."""
    return [
        f"{id_} {text!r}:\n    fast:      {g!r}\n    reference: {w!r}"
        for (id_, text), g, w in zip(items, got, want, strict=True)
        if g != w or repr(g) != repr(w)
    ]


def summary(bad: list[str], total: int) -> str:
    return f"{len(bad)} of {total} differ; the first ones:\n" + "\n".join(bad[:3])


class Engines:
    """A fast-path extractor and a reference extractor over the same index."""

    def __init__(self, index: ConceptIndex) -> None:
        self.index = index
        self.fast = Extractor(index, engine="compiled")  # (raises when it cannot run)
        self.ref = Extractor(index, engine="reference")
        assert (self.fast.engine, self.ref.engine) == ("compiled", "reference")

    def reference(self, items: Items, options: ExtractOptions | None) -> list[Annotation]:
        return [self.ref.extract(text, options, id=id_) for id_, text in items]

    def differences(self, items: Items, options: ExtractOptions | None) -> list[str]:
        fast = [self.fast.extract(text, options, id=id_) for id_, text in items]
        return differences(items, fast, self.reference(items, options))

    def check(self, text: str, options: ExtractOptions | None) -> None:
        bad = self.differences([("x", text)], options)
        assert not bad, bad[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> ConceptIndex:
    return demo_index(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def demo_engines(demo: ConceptIndex) -> Engines:
    return Engines(demo)


@pytest.fixture(scope="module")
def engine_engines(engine_index_path: Path) -> Engines:
    return Engines(ConceptIndex.load(engine_index_path))


@pytest.fixture(scope="module")
def sample() -> Items:
    items = read_captions(CAPTIONS)
    assert len(items) == 500
    return items


# -- 1. the extension is there, and the switch turns it off ------------------------------------


def test_speedups_extension_is_built_and_used(demo_engines: Engines) -> None:
    assert normalize.SPEEDUPS is not None, (
        "conceptsvc._speedups is not importable: run `make install` to build it"
    )
    assert isinstance(normalize.tokenize_spans, normalize.SPEEDUPS.SpanTokenizer)
    assert normalize.tokenize_spans is not tokenize_spans_py
    assert Extractor(demo_engines.index).engine == "compiled"  # engine="auto"


def test_speedups_engine_names_are_checked(demo: ConceptIndex) -> None:
    with pytest.raises(ExtractionError, match="'fast' is not one of auto, compiled, reference"):
        Extractor(demo, engine="fast")


_PURE_CHILD = """
import dataclasses, json, sys
from conceptsvc import normalize
from conceptsvc.evaluation import read_captions
from conceptsvc.errors import ExtractionError
from conceptsvc.extractor import Extractor
from conceptsvc.model import ExtractOptions
from conceptsvc.index import ConceptIndex

from conceptsvc.errors import ExtractionError

index = ConceptIndex.load(sys.argv[1])
ex = Extractor(index)
try:
    Extractor(index, engine="compiled")
    compiled_error = ""
except ExtractionError as e:
    compiled_error = str(e)
items = read_captions(sys.argv[2])
runs = []
for raw in json.loads(sys.argv[3]):
    o = ExtractOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    runs.append([dataclasses.asdict(ex.extract(t, o, id=i)) for i, t in items])
json.dump({
    "speedups": normalize.SPEEDUPS is not None,
    "engine": ex.engine,
    "compiled_error": compiled_error,
    "pure_tokenizer": normalize.tokenize_spans is normalize.tokenize_spans_py,
    "runs": runs,
}, sys.stdout)
"""


def test_speedups_pure_python_switch_gives_same_annotations(
    demo: ConceptIndex, demo_engines: Engines, sample: Items
) -> None:
    options = [
        ExtractOptions(),
        ExtractOptions(profile="rocov2"),
        ExtractOptions(mode="approximate", overlap="all"),
    ]
    proc = subprocess.run(
        [
            sys.executable, "-c", _PURE_CHILD, str(demo.path), str(CAPTIONS),
            json.dumps([dataclasses.asdict(o) for o in options]),
        ],
        env={**os.environ, "CONCEPTSVC_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout)
    assert (child["speedups"], child["engine"], child["pure_tokenizer"]) == (
        False, "reference", True
    )
    # asking for the compiled engine then fails and says why
    assert "compiled engine cannot run" in child["compiled_error"]
    assert "CONCEPTSVC_PURE_PYTHON=1" in child["compiled_error"]
    for o, run in zip(options, child["runs"], strict=True):
        fast = [
            json.loads(json.dumps(dataclasses.asdict(demo_engines.fast.extract(t, o, id=i))))
            for i, t in sample
        ]
        bad = differences(sample, fast, run)
        assert not bad, f"{o}: " + summary(bad, len(sample))


# -- 2. tokeniser ------------------------------------------------------------------------------

# Code points the tokeniser or the normaliser treats specially: apostrophes and look-alikes,
# separators, compatibility forms (ligatures, full-width, superscripts, fractions), case-folding
# expansions, combining marks inside and outside normalize._MARKS, astral letters and symbols.
_SPECIAL = (
    "'", "’", "‘", "ʼ", "`", "-", "‐", "–", "/", "\\", ".", ",", ";", ":", "(", ")", "_", " ",
    "\t", "\n", "\u00a0", "\u2009", "\u200b", "\u00ad", "ﬁ", "ﬂ", "ﬃ", "Ａ", "ｚ", "１", "²",
    "₂", "½", "ⅻ", "Ⅻ", "㉑", "ß", "ẞ", "İ", "ı", "ǅ", "Σ", "ς", "ŉ", "é", "ø", "Å",
    "\u0301", "\u0308", "\u036f", "\u0483", "\u0489", "\u05b0", "\u05bd", "\u05be", "\u0610",
    "\u064b", "\u065f", "\u0670", "\u1ab0", "\u1dc0", "\u20d7", "\u20ff", "\ufe20", "\ufe2f",
    "\u0e31", "\u093f", "\u0900", "\u302a", "\u0345", "\U0001d167", "\U000e0100", "٣", "𝐀",
    "𝟙", "😀", "𠀀", "𐐀", "Ω", "ｶ", "ﾞ", "ー", "々", "〇",
)
_CHARS = st.one_of(
    st.sampled_from(_SPECIAL),
    st.sampled_from("aeiostCTMRIUSx019'’ -"),
    st.characters(codec="utf-8", categories=("L", "N", "M", "P", "Zs", "S")),
    st.characters(min_codepoint=0x10000, codec="utf-8"),
)
_WORDS = ("CT", "CTs", "MRIs", "patient's", "Crohn’s", "T2-weighted", "oedema", "vertebrae")
_TEXTS = st.one_of(
    st.text(_CHARS, max_size=40),
    st.text(st.characters(max_codepoint=127), max_size=40),  # the reference's ASCII branch
    st.lists(st.one_of(st.text(_CHARS, max_size=3), st.sampled_from(_WORDS)), max_size=12).map(
        "".join
    ),
)

_HARD_TEXTS = (
    "", " ", "'", "''", "’", "x''y", "x'’y", "'tis", "dogs'", "'quoted'", "a'b'c", "a'", "’s",
    "T2-weighted", "X-ray", "PET/CT", "patient's", "patients'", "CTs", "MRIs", "Ct", "cTs",
    "Crohn’s", "Crohn's disease", "cafe\u0301", "e\u0301\u0301", "\u0301abc", "a\u0301'b",
    "a'\u0301b", "a\u0e31b", "a\u20d7b", "a\u0345b", "ﬁbrosis", "ＣＴ scan", "Ｘ－ray", "x²",
    "H₂O", "½", "¼x", "İstanbul", "ǅemal", "straße", "ŉ", "ß'ß", "𝐀𝐁𝐂", "😀abc😀", "𠀀𠀁",
    "abc_def", "9am", "rays kidneys airways", "x\u200by", "x\u00ady", "ⅫⅫ", "㉑", "٣٤",
    "haemorrhagic tumours (arrows); metastases.", "A\u0308rger", "\U000e0100a",
)


@pytest.mark.parametrize("text", _HARD_TEXTS)
def test_speedups_tokenizer_hard_cases(text: str) -> None:
    assert normalize.tokenize_spans(text) == tokenize_spans_py(text)


@settings(max_examples=500, deadline=None)
@given(text=_TEXTS)
def test_speedups_tokenizer_random_unicode(text: str) -> None:
    assert normalize.tokenize_spans(text) == tokenize_spans_py(text)


def test_speedups_tokenizer_every_code_point() -> None:
    # Alone, a code point is a token iff it is a word character; between two letters it also
    # joins them iff it is a combining mark of normalize._MARKS or an apostrophe. All of the
    # BMP, and the assigned code points of the other planes.
    cps = [
        chr(c)
        for c in range(0x110000)
        if c < 0xD800 or 0xDFFF < c < 0x10000 or unicodedata.category(chr(c)) not in ("Cn", "Co")
    ]
    for text in (" ".join(cps), " ".join("a" + c + "b" for c in cps if not c.isalnum())):
        assert normalize.tokenize_spans(text) == tokenize_spans_py(text)


def test_speedups_compiled_code_follows_the_rules_it_is_handed() -> None:
    """The compiled objects hold no rules of their own: handed other tables than the Python
    modules', they follow those (so a rule edited in Python reaches both engines)."""
    # tokeniser: without combining marks and the typographic apostrophe, both split words
    text = "cafe\u0301s Crohn’s"
    assert normalize.tokenize_spans(text)[0] == tokenize_spans_py(text)[0] == ["cafe", "crohn"]
    bare = _speedups.SpanTokenizer(normalize_token, marks=(), apostrophes="'")
    assert bare(text)[0] == ["cafe", "s", "crohn", "s"]
    # normaliser: no plural suffix rules, another acronym threshold
    plain = _speedups.AsciiNormalizer(
        normalize_token, british_words={}, british_stem_markers=(), irregular_plurals={},
        not_plural=frozenset(), never_singular_len=3, plural_suffixes=(),
        acronym_min_letters=3,
    )
    assert [normalize.fast_normalize_token(w) for w in ("lesions", "CTs")] == ["lesion", "ct"]
    assert [plain(w) for w in ("lesions", "CTs")] == ["lesions", "cts"]
    # definitions: short forms of at most two characters
    text = "computed tomography (CT); magnetic resonance imaging (MRI)"
    assert [d.short for d in abbreviations.fast_find_definitions(text)] == ["CT", "MRI"]
    assert [d.short for d in abbreviations.find_definitions(text)] == ["CT", "MRI"]
    narrow = _speedups.DefinitionFinder(
        abbreviations.Definition, max_definitions=50, min_short_len=2, max_short_len=2,
        max_short_words=2, look_back=40, clause_breaks=".;:!?()[]", inner_cuts=(";", ","),
        long_form_extra_words=5, long_form_words_per_char=2, whitespace=" ",
    )
    assert [d.short for d in narrow(text)] == ["CT"]
    # definitions: words end at plain spaces only, so the long form takes in "see\u2009"
    text = "an MR (see\u2009multiplanar reconstruction) image"
    assert [text[d.long_start : d.long_end] for d in narrow(text)] == [
        "see\u2009multiplanar reconstruction"
    ]
    assert [
        text[d.long_start : d.long_end] for d in abbreviations.fast_find_definitions(text)
    ] == ["multiplanar reconstruction"]
    # negation: a comma ends the scope, and "no, evidence of" is a trigger phrase
    detector = NegationDetector()
    norms, starts, ends = _spans("no fracture, effusion")
    assert _speedups.NegationScanner(detector).negated_tokens(
        "no fracture, effusion", norms, starts, ends
    ) == detector.negated_tokens("no fracture, effusion", norms, starts, ends) == [
        False, True, True
    ]
    commas = types.SimpleNamespace(
        phrase_table=detector.phrase_table, trigger_words=detector.trigger_words,
        scope_limit=detector.scope_limit, list_words=detector.list_words, kinds=detector.kinds,
        sentence_breaks=frozenset(".,"), phrase_breaks=frozenset(), list_breaks=frozenset(),
        header_breaks=frozenset(), header_crossing=detector.header_crossing,
        category_names=detector.category_names,
        forward_scope=detector.forward_scope, backward_scope=detector.backward_scope,
    )
    scanner = _speedups.NegationScanner(commas)
    assert scanner.negated_tokens("no fracture, effusion", norms, starts, ends) == [
        False, True, False
    ]
    norms, starts, ends = _spans("no, evidence of mass")
    assert detector.negated_tokens("no, evidence of mass", norms, starts, ends) == [
        False, True, True, True
    ]
    assert scanner.negated_tokens("no, evidence of mass", norms, starts, ends) == [
        False, False, False, True
    ]


def test_speedups_fresh_tokenizer_equals_warm_one(sample: Items) -> None:
    fresh = normalize.SPEEDUPS.SpanTokenizer(
        normalize_token, marks=normalize._MARK_RANGES, apostrophes=normalize._APOSTROPHES
    )
    for _, text in sample:
        assert fresh(text) == normalize.tokenize_spans(text) == tokenize_spans_py(text), text


# The compiled normaliser of ASCII tokens (normalize.fast_normalize_token) against
# normalize_token: the reference's tables with every suffix its rules look at, in every case.
_TABLE_WORDS = sorted(
    {
        *normalize._BRITISH_WORDS, *normalize._BRITISH_WORDS.values(),
        *normalize._IRREGULAR_PLURALS, *normalize._IRREGULAR_PLURALS.values(),
        *normalize._NOT_PLURAL, *normalize._STOPWORDS_RAW,
        *(w for pair in normalize._BRITISH_STEMS for w in pair),
    }
)
_SUFFIXES = (
    "", "", "s", "S", "es", "ies", "ae", "oses", "yses", "eses", "sses", "xes", "ches", "shes",
    "zes", "uses", "ays", "eys", "oys", "uys", "ss", "us", "is", "ys", "'s", "'S", "'t", "'ss",
    "a", "i", "e", "oe", "Ae", "OE", "s's", "2", "2s",
)
_ASCII_TOKEN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z0-9]+)*")
_ASCII_WORDS = st.builds(
    lambda stem, suffix, case: case(stem + suffix),
    st.one_of(
        st.from_regex(r"[A-Za-z0-9']{0,7}", fullmatch=True),
        st.from_regex(r"[aeiosuyhcxzSCT]{0,5}", fullmatch=True),
        st.sampled_from(_TABLE_WORDS),
    ),
    st.sampled_from(_SUFFIXES),
    st.sampled_from((str, str.lower, str.upper, str.title, str.capitalize, str.swapcase)),
).filter(_ASCII_TOKEN.fullmatch)


def test_speedups_ascii_normalizer_is_compiled() -> None:
    assert normalize.fast_normalize_token is not normalize_token


def test_speedups_ascii_normalizer_on_reference_tables() -> None:
    words = {
        case(w + suffix)
        for w in _TABLE_WORDS
        for suffix in _SUFFIXES
        for case in (str, str.upper, str.title)
    }
    bad = [w for w in sorted(words) if normalize.fast_normalize_token(w) != normalize_token(w)]
    assert not bad, [(w, normalize.fast_normalize_token(w), normalize_token(w)) for w in bad[:5]]


def test_speedups_ascii_normalizer_on_every_short_token() -> None:
    # every ASCII token of up to three characters (the singular and acronym thresholds)
    chars = string.ascii_letters + string.digits
    words = [*chars, *(a + b for a in chars for b in chars)]
    words += [a + b + c for a in chars for b in chars for c in chars]
    words += [a + "'" + b for a in chars for b in chars]
    bad = [w for w in words if normalize.fast_normalize_token(w) != normalize_token(w)]
    assert not bad, [(w, normalize.fast_normalize_token(w), normalize_token(w)) for w in bad[:5]]


def test_speedups_ascii_normalizer_on_dictionary_and_captions(
    demo: ConceptIndex, sample: Items
) -> None:
    texts = [p.string for kid in range(demo.n_keys) for p in demo.postings_of(kid)]
    texts += [text for _, text in sample]
    raws: set[str] = set()
    for text in texts:
        _, starts, ends = tokenize_spans_py(text)
        for s, e in zip(starts, ends, strict=True):
            raw = text[s:e]
            raws.update((raw, raw.upper(), raw.lower(), raw.title(), raw + "s", raw.upper() + "s"))
    bad = [w for w in sorted(raws) if normalize.fast_normalize_token(w) != normalize_token(w)]
    assert not bad, [(w, normalize.fast_normalize_token(w), normalize_token(w)) for w in bad[:5]]


@settings(max_examples=500, deadline=None)
@given(word=_ASCII_WORDS)
def test_speedups_ascii_normalizer_random_words(word: str) -> None:
    assert normalize.fast_normalize_token(word) == normalize_token(word)


# -- 3. whole pipeline over the demo sample ----------------------------------------------------


def _id(options: ExtractOptions | None) -> str:
    """A test id: the options' non-default fields."""
    if options is None:
        return "default"
    default = ExtractOptions()
    changed = [
        f"{f.name}={','.join(v) if isinstance(v, tuple) else v}"
        for f in dataclasses.fields(options)
        if (v := getattr(options, f.name)) != getattr(default, f.name)
    ]
    return "|".join(changed) or "none"


DEMO_OPTIONS = [
    None,
    ExtractOptions(profile="rocov2"),
    ExtractOptions(overlap="best_score"),
    ExtractOptions(overlap="best_score", profile="rocov2"),
    ExtractOptions(overlap="all"),
    ExtractOptions(overlap="all", profile="rocov2"),
    ExtractOptions(include_negated=False),
    ExtractOptions(include_negated=False, profile="rocov2", overlap="all"),
    ExtractOptions(include_mentions=False),
    ExtractOptions(include_mentions=False, profile="rocov2"),
    ExtractOptions(semantic_groups=("DISO",)),
    ExtractOptions(semantic_groups=("ANAT", "Procedures"), overlap="best_score"),
    ExtractOptions(semantic_types=("T047", "Finding", "dsyn")),
    ExtractOptions(semantic_types=("T023", "T029"), profile="rocov2"),
    ExtractOptions(semantic_types=("T060",), semantic_groups=("DISO",), overlap="all"),
    ExtractOptions(sources=("CSVRAD", "HPO")),
    ExtractOptions(sources=("ROCOV2", "DICOM"), profile="rocov2"),
    # the sample's two most frequent concepts (CT, plain x-ray)
    ExtractOptions(exclude_cuis=("C0040405", "C1306645")),
    ExtractOptions(exclude_cuis=("C0040405",), profile="rocov2", include_negated=False),
]
APPROXIMATE_OPTIONS = [
    ExtractOptions(mode="approximate"),
    ExtractOptions(mode="approximate", profile="rocov2", overlap="all", threshold=0.6),
    ExtractOptions(
        mode="approximate", similarity="cosine", overlap="best_score", semantic_groups=("DISO",)
    ),
    ExtractOptions(mode="approximate", similarity="dice", include_negated=False, threshold=0.8),
]


@pytest.mark.parametrize("options", DEMO_OPTIONS, ids=_id)
def test_speedups_demo_sample_equals_reference(
    demo_engines: Engines, sample: Items, options: ExtractOptions | None
) -> None:
    bad = demo_engines.differences(sample, options)
    assert not bad, summary(bad, len(sample))


@pytest.mark.parametrize("options", APPROXIMATE_OPTIONS, ids=_id)
def test_speedups_demo_sample_approximate_equals_reference(
    demo_engines: Engines, sample: Items, options: ExtractOptions
) -> None:
    subset = sample[::3]
    bad = demo_engines.differences(subset, options)
    assert not bad, summary(bad, len(subset))


# -- approximate search on its own, and on an index of a few hundred thousand keys ------------

GENERATED_ROWS = 600_000
"""Rows of the generated release merged with the demo dictionary: about 180k keys, enough for
trigram lists of tens of thousands of keys (the demo's longest has a few hundred)."""


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> ConceptIndex:
    """A synthetic UMLS-like release merged with the demo dictionary, built once per session."""
    d = tmp_path_factory.mktemp("generated")
    generate(d / "META", GENERATED_ROWS, seed=14)
    build_dictionary_index([UmlsSource(d / "META"), UmlsSource(DEMO_META)], d / "ix")
    return ConceptIndex.load(d / "ix")


def approximate_queries(index: ConceptIndex, sample: Items, n: int, seed: int) -> list[str]:
    """Keys with letters dropped, doubled or swapped, caption windows, and short strings."""
    rng = random.Random(seed)
    keys = [index.key(rng.randrange(index.n_keys)) for _ in range(n)]
    out = []
    for k in keys:
        p = rng.randrange(len(k))
        out += [k, k[:p] + k[p + 1 :], k[:p] + k[p] + k[p:], k[:p] + "e" + k[p + 1 :]]
    for _, text in rng.sample(sample, n):
        words = text.lower().split()
        i = rng.randrange(len(words))
        out.append(" ".join(words[i : i + rng.randint(1, 4)]))
    return [*out, "ct", "x", "pleural efusion", "lung canser", "éñ中", ""]


def assert_search_parity(index: ConceptIndex, queries: list[str],
                         thresholds: Sequence[float]) -> None:
    exact = ExactMatcher(index)
    fast = ApproximateMatcher(exact, compiled=True)
    ref = ApproximateMatcher(exact, compiled=False)
    assert fast.compiled and not ref.compiled
    found = 0
    for measure in SIMILARITIES:
        # overlap has no size bound: every key sharing a trigram is a candidate, which the
        # reference counts in Python (about a second a query at 200k keys), so fewer queries
        for q in queries[::4] if measure == "overlap" else queries:
            for alpha in thresholds:
                got = fast.search(q, measure, alpha)
                assert got == ref.search(q, measure, alpha), (q, measure, alpha)
                found += len(got)
    assert found > len(queries)  # the queries do find keys


def test_speedups_approximate_search_equals_reference_demo(demo: ConceptIndex,
                                                           sample: Items) -> None:
    queries = approximate_queries(demo, sample, 60, seed=1)
    assert_search_parity(demo, queries, (0.3, 0.5, 0.7, 0.85, 1.0))


def test_speedups_approximate_search_equals_reference_generated(generated: ConceptIndex,
                                                                sample: Items) -> None:
    assert generated.n_keys > 150_000
    assert_search_parity(generated, approximate_queries(generated, sample, 6, seed=2),
                         (0.6, 0.8, 1.0))


def test_speedups_approximate_search_without_simd_equals_reference(generated: ConceptIndex,
                                                                  demo: ConceptIndex,
                                                                  sample: Items) -> None:
    """The runs a search only tests against a bitmap are read 16 postings at a time with
    AVX-512 where the CPU has it (the searches above), else one at a time; switched to the
    scalar loop, the compiled search still answers as the reference does. (Without AVX-512
    the searches above already run the scalar loop, and this would repeat them.)"""
    assert APPROX is not None
    if not APPROX.set_simd(True):
        pytest.skip("this CPU has no AVX-512: the parity tests above run the scalar loop")
    try:
        assert not APPROX.set_simd(False)
        assert_search_parity(demo, approximate_queries(demo, sample, 30, seed=3), (0.5, 0.7))
        assert_search_parity(generated, approximate_queries(generated, sample, 4, seed=4),
                             (0.7, 0.9))
    finally:
        APPROX.set_simd(True)  # the default: on where the CPU has it


GENERATED_OPTIONS = [
    ExtractOptions(mode="approximate"),
    ExtractOptions(mode="approximate", similarity="cosine", threshold=0.8, overlap="all"),
    ExtractOptions(mode="approximate", similarity="dice", threshold=0.6, profile="rocov2"),
    ExtractOptions(mode="approximate", similarity="overlap", threshold=0.9),
]


@pytest.mark.parametrize("options", GENERATED_OPTIONS, ids=_id)
def test_speedups_generated_index_approximate_equals_reference(
    generated: ConceptIndex, sample: Items, options: ExtractOptions
) -> None:
    engines = Engines(generated)
    rng = random.Random(3)
    keys = [generated.key(rng.randrange(generated.n_keys)) for _ in range(30)]
    typos = [(f"g{i}", f"Known {k[:-2]}{k[-1]}, {k}e and the {k} (arrows).")
             for i, k in enumerate(keys)]
    items = typos + sample[::10]
    if options.similarity == "overlap":
        items = typos[:8] + sample[::50]  # see assert_search_parity
    bad = engines.differences(items, options)
    assert not bad, summary(bad, len(items))


ENGINE_CAPTIONS = [
    "Axial ＣＴ: ﬁnal Haematomas and PLEURAL EFFUSIONS (arrows).",
    "Known lung cancer.",
    "Chest X-ray: pleural effusion and lung cancer.",
    "CT of the chest.",
    "Severe MS with a calcified mitral annulus.",
    "MS.",
    "Multiple sclerosis (MS). MS plaques near the mitral annulus.",
    "MS (multiple sclerosis) and ms; Ms near the mitral valve stenosis",
    "No pleural effusion; lung cancer.",
    "Right pleural efusion and lung cancer.",
    "US of the abdomen, us and Us; USs. IN in In indium.",
    "Computed tomography (CT) and CT scan; CTs (computed tomography) without contrast.",
    "pulmonary embolism (PE) ruled out, no PE, AP view; ap chest radiograph",
    "Left ventricle dilatation is absent, heart without shock.",
    "MRI, MR imaging and magnetic resonance imaging (MRI) of the thorax; no tumour.",
    "", " ", "(", "()", "(CT)", "CT (", ") CT (", "No", "no.", "none no None NO",
]
ENGINE_OPTIONS = [
    None,
    ExtractOptions(profile="rocov2"),
    ExtractOptions(overlap="best_score"),
    ExtractOptions(overlap="all", include_negated=False),
    ExtractOptions(include_mentions=False, profile="rocov2"),
    ExtractOptions(semantic_types=("Bacterium",)),
    ExtractOptions(semantic_types=("T023",), overlap="all"),
    ExtractOptions(semantic_groups=("ANAT", "DISO")),
    ExtractOptions(sources=("HPO", "CURATED")),
    ExtractOptions(exclude_cuis=("C0040405", "C0026269")),
    ExtractOptions(mode="approximate", threshold=0.6),
    ExtractOptions(mode="approximate", overlap="all", profile="rocov2"),
]


@pytest.mark.parametrize("options", ENGINE_OPTIONS, ids=_id)
def test_speedups_engine_fixture_equals_reference(
    engine_engines: Engines, sample: Items, options: ExtractOptions | None
) -> None:
    items = [(f"e{k}", t) for k, t in enumerate(ENGINE_CAPTIONS)] + sample[::2]
    bad = engine_engines.differences(items, options)
    assert not bad, summary(bad, len(items))


# -- 3b. an index above the old 2M-key cap (issue 13) ------------------------------------------

LARGE_OPTIONS: list[ExtractOptions | None] = [
    None,
    ExtractOptions(profile="rocov2"),
    ExtractOptions(overlap="all", include_negated=False),
    ExtractOptions(semantic_types=("T047", "T033")),
]


@pytest.fixture(scope="module")
def large_engines(large_index_path: Path) -> Engines:
    index = ConceptIndex.load(large_index_path, verify=False)
    assert index.n_keys > 2_000_000 and not index.materialized
    return Engines(index)


def large_captions(index: ConceptIndex, sample: Items) -> Items:
    """ROCOv2-like captions that hit the large index's synthetic keys: demo captions with a
    synthetic key, or one cut short or run on, put into them."""
    rng = random.Random(5)
    words = large_words()
    anchors = ("left", "lung", "chest", "ct", "artery")
    out: Items = []
    for k, (id_, text) in enumerate(sample[:300]):
        key = index.key(rng.randrange(index.n_keys))
        if k % 3 == 0:  # a caption word, then synthetic tokens: known, cut short or run on
            key = f"{rng.choice(anchors)} {' '.join(rng.choices(words, k=rng.choice((1, 2, 3))))}"
        cut = text.find(" ", len(text) // 2)
        out.append((f"L{id_}", f"{text[:cut]} the {key} (arrow),{text[cut:]}"))
    return out


@pytest.mark.parametrize("options", LARGE_OPTIONS, ids=_id)
def test_speedups_large_index_equals_reference(
    large_engines: Engines, sample: Items, options: ExtractOptions | None
) -> None:
    items = large_captions(large_engines.index, sample) + sample[1::3]
    bad = large_engines.differences(items, options)
    assert not bad, summary(bad, len(items))
    # the synthetic part of the trie is reached: synthetic concepts are found
    found = {c for a in large_engines.reference(items[:300], None) for c in a.concepts}
    assert any(c.startswith("C8") for c in found)


def test_speedups_large_index_builds_nothing_at_load(large_index_path: Path) -> None:
    # What the extractor uses is what the index build wrote, mapped: no prefix dict, no key
    # or token dicts, the token trie read in place; constructing the extractor and a first
    # request allocate little next to the index (Python allocations, tracemalloc).
    import tracemalloc

    index = ConceptIndex.load(large_index_path, verify=False)
    tracemalloc.start()
    try:
        ex = Extractor(index)
        ex.extract("Chest CT of the left lung bacedi shows a mass.")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ex.engine == "compiled"
    matcher = ex._exact
    assert matcher.prefixes is None and not index.materialized
    assert index.key_ids.as_dict() is None and matcher.key_trie.token_dict is None
    trie = matcher.key_trie
    for arr in (trie.edge_keys, trie.edge_child, trie.node_key):
        assert isinstance(arr, np.memmap), type(arr)
    assert len(trie.node_key) > index.n_keys  # (every key and every token-prefix of one)
    index_bytes = sum(f.stat().st_size for f in large_index_path.iterdir())
    assert peak < 30 << 20 < index_bytes // 4, (peak, index_bytes)


def test_speedups_large_index_ambiguity_is_bounded(large_engines: Engines) -> None:
    # "left" has 300 synthetic concepts beyond the demo's: both engines rank the same 64
    # (abbreviations.MAX_CANDIDATES) — the best by type preference, then CUI — and what the
    # ranking keeps is among them
    word, n = LARGE_AMBIGUOUS
    text = f"Chest radiograph: {word} pleural effusion."
    plan = large_engines.fast._plan(ExtractOptions())
    pairs = large_engines.fast._filter_postings(plan, large_engines.index.postings(word))
    assert len(large_engines.index.postings(word)) >= n
    assert len(pairs) == abbreviations.MAX_CANDIDATES
    large_engines.check(text, ExtractOptions(overlap="all"))
    got = large_engines.fast.extract(text, ExtractOptions(overlap="all"))
    on_word = {m.cui for m in got.mentions if m.text == word}
    assert on_word and on_word <= {c for c, _ in pairs}


# -- 3c. keys with hundreds of concepts: the compiled posting filter (issue 13) ----------------

AMBIGUOUS_TUIS = ("T047", "T033", "T023", "T060", "T121", "T061", "T029", "T080")
PRIOR_CUIS = sorted(load_profile("rocov2").priors)[:12]
MASS_BOTH = range(340, 400, 3)


def _syn(k: int) -> str:
    """Synthetic concept ``k`` of the ambiguous index: CUIs below every real one's."""
    return f"C00{k:05d}"


def build_ambiguous_index(demo: ConceptIndex, out: Path) -> Path:
    """The demo dictionary plus keys with hundreds of concepts, built to reach every branch
    of the compiled filter: "left" (free postings; two sources; a preferred-name posting after
    another one of the same concept; real concepts with ROCOv2 priors among them), "CT"/"ct"
    (a short key: abbreviations, capitals, case-sensitive strings and rejected ones),
    "mass" (free postings, and case-sensitive ones of other concepts before them in CUI
    order, so a surface's postings come out of concept order) and "of" (a stopword with
    case-sensitive strings). The synthetic CUIs sort before the real ones, and twelve real
    concepts with ROCOv2 priors are retyped to the type at which "left"'s shortlist is cut:
    without priors they lose on CUI order, with ROCOv2's they are kept."""
    b = builder_from(demo, "ambiguous-test-index")
    for k, cui in enumerate(PRIOR_CUIS):
        b.set_concept(cui, preferred_name=demo.name_and_types(cui)[0],  # type: ignore[index]
                      semantic_types=("T061",))
        b.add_term(cui, "left" if k % 2 else "Left", sab="SYNTHA", tty="SY")
    for k in range(400):
        cui = _syn(k)
        assert cui not in demo
        types = (AMBIGUOUS_TUIS[k % 8],) if k % 5 else (AMBIGUOUS_TUIS[k % 8], "T033")
        if k in MASS_BOTH:
            types = ("T080",)  # (so that "MaSS" under a T080 filter is a tie of all of them)
        # (some: a preferred name after another string of the key in posting order)
        pref = "Left." if k % 40 == 20 else f"left thing {k}" if k % 3 else "left"
        b.set_concept(cui, preferred_name=pref,
                      semantic_types=types if k % 17 or k in MASS_BOTH else ())
        if k < 300:
            b.add_term(cui, "LEFT", sab="SYNTHA", tty="SY")
            if k % 4 == 0:
                b.add_term(cui, pref if pref == "Left." else "left", sab="SYNTHB", tty="PT")
        elif k < 340:
            b.add_term(cui, "CT", sab="SYNTHA" if k % 2 else "SYNTHB", tty="AB",
                       flags=FLAG_ABBREVIATION)
        elif k < 360:
            b.add_term(cui, "Ct", sab="SYNTHB", tty="SY", flags=FLAG_CASE_SENSITIVE)
            b.add_term(cui, "ct", sab="SYNTHA", tty="SY")  # no evidence: never matched
        elif k < 380:
            b.add_term(cui, "MASS", sab="SYNTHA", tty="SY", flags=FLAG_CASE_SENSITIVE)
            b.add_term(cui, "OF", sab="SYNTHB", tty="AB", flags=FLAG_CASE_SENSITIVE)
        else:
            b.add_term(cui, "Mass", sab="SYNTHB", tty="SY")
            b.add_term(cui, "Mass", sab="SYNTHA", tty="SY")
        b.add_term(cui, f"left thing {k}", sab="SYNTHA", tty="PT")
    for k in MASS_BOTH:  # (those from 380 on have both kinds of "mass" postings)
        b.add_term(_syn(k), "MaSS", sab="SYNTHB", tty="SY", flags=FLAG_CASE_SENSITIVE)
    return b.write(out)


@pytest.fixture(scope="module")
def ambiguous_engines(demo: ConceptIndex, tmp_path_factory: pytest.TempPathFactory) -> Engines:
    path = build_ambiguous_index(demo, tmp_path_factory.mktemp("ambiguous") / "index")
    return Engines(ConceptIndex.load(path))


AMBIGUOUS_CAPTIONS = [
    "Chest CT of the left lung: mass in the LEFT lower lobe (arrow).",
    "Ct scan OF the Left hip shows a Mass; MASS effect on the left thing 7.",
    "Axial CT: MaSS near the left kidney, ct of the abdomen, CT again.",
    "Left thing 12 and left thing 301 (CT) computed tomography, MASS OF LEFT.",
    "left left LEFT Left: mass, Mass, MASS, MaSS, ct, Ct, CT, of, OF.",
    "The left.",
    "MaSS.",
]
AMBIGUOUS_OPTIONS: list[ExtractOptions | None] = [
    None,
    ExtractOptions(profile="rocov2"),
    ExtractOptions(overlap="all"),
    ExtractOptions(overlap="all", profile="rocov2", include_negated=False),
    ExtractOptions(semantic_types=("T047", "T033"), overlap="all"),
    ExtractOptions(semantic_types=("T080",), profile="rocov2", overlap="all"),
    ExtractOptions(semantic_types=("T121",), overlap="all"),
    ExtractOptions(semantic_types=("T080",), overlap="all"),
    ExtractOptions(semantic_groups=("PROC",), overlap="all"),
    ExtractOptions(sources=("SYNTHB",), overlap="all"),
    ExtractOptions(sources=("SYNTHA", "CSVRAD"), semantic_types=("T060", "T061"),
                   overlap="all"),
    ExtractOptions(exclude_cuis=tuple(_syn(k) for k in range(0, 400, 2)), overlap="all"),
    ExtractOptions(exclude_cuis=(_syn(3), _syn(305), _syn(342), PRIOR_CUIS[1], "C0040405"),
                   profile="rocov2", overlap="all"),
]


@pytest.mark.parametrize("options", AMBIGUOUS_OPTIONS, ids=_id)
def test_speedups_keys_with_hundreds_of_concepts_equal_reference(
    ambiguous_engines: Engines, sample: Items, options: ExtractOptions | None
) -> None:
    # The compiled filter (sources, types, exclusions, best posting, the 64-concept shortlist
    # by type preference, prior and CUI) over the index's arrays gives the Python filter's
    # candidates, whatever the options; fresh extractors, so every key is met for the first
    # time under these options
    engines = Engines(ambiguous_engines.index)
    items = [(f"a{k}", t) for k, t in enumerate(AMBIGUOUS_CAPTIONS)] + sample[::7]
    bad = engines.differences(items, options)
    assert not bad, summary(bad, len(items))


def test_speedups_keys_with_hundreds_of_concepts_are_shortlisted(
    ambiguous_engines: Engines,
) -> None:
    # "left" is far above the ranking bound; the shortlist (type preference, prior, CUI) is the
    # Python filter's in both engines, and priors decide it where types tie
    index = ambiguous_engines.index
    assert len({p.cui for p in index.postings("left")}) > 3 * abbreviations.MAX_CANDIDATES
    ex = Extractor(index, engine="compiled")
    kept = {}
    for profile in ("none", "rocov2"):
        options = ExtractOptions(overlap="all", profile=profile)
        plan = ex._plan(options)
        pairs = ex._filter_postings(plan, index.postings("left"))
        assert len(pairs) == abbreviations.MAX_CANDIDATES
        kept[profile] = {c for c, _ in pairs}
        got = ex.extract("left", options)
        assert {m.cui for m in got.mentions} <= kept[profile]
        ambiguous_engines.check("left", options)
    assert ex.extract("left", ExtractOptions(overlap="all")).mentions
    assert set(PRIOR_CUIS) <= kept["rocov2"]
    assert not set(PRIOR_CUIS) & kept["none"]


def test_speedups_compiled_filter_builds_no_posting_per_posting(
    ambiguous_engines: Engines,
) -> None:
    # First use of a key with hundreds of postings reads them in place: the matcher's
    # per-key entries (a Posting per posting) stay empty, and the postings built are those
    # of the concepts kept (at most MAX_CANDIDATES per key), not one per posting.
    index = ambiguous_engines.index
    ex = Extractor(index, engine="compiled")
    built = 0
    real = index.posting

    def counting(i: int) -> Any:
        nonlocal built
        built += 1
        return real(i)

    index.posting = counting  # type: ignore[method-assign]
    try:
        got = ex.extract("left and LEFT; mass, MASS and CT", ExtractOptions(overlap="all"))
    finally:
        del index.posting
    assert got.mentions
    assert not ex._exact.entries
    n_left = len(index.postings("left"))
    assert built == 0 and n_left > 300
    assert ex._rankings  # (the ambiguous spans were ranked)


def test_speedups_concept_strings_equal_the_postings_strings(
    ambiguous_engines: Engines,
) -> None:
    index = ambiguous_engines.index
    postings = ambiguous_engines.fast._postings
    assert postings is not None
    for cui in [*list(index.cuis)[::7], _syn(1), _syn(399), *PRIOR_CUIS]:
        want = list(dict.fromkeys(p.string for p in index.concept_postings(cui)))
        assert postings.concept_strings(cui) == want, cui
    assert postings.concept_strings("C9999999") == []


def test_speedups_every_code_point_through_the_pipeline(engine_engines: Engines) -> None:
    # "lung?cancer" for every code point that is not a word character (BMP, and assigned
    # beyond) and for one word character in 16: one token, or the key "lung cancer", or "lung"
    # alone (a break) — the fast path's own tokeniser, offsets and phrase breaks against the
    # reference's, visible in the mentions (all of them: overlap "all").
    cps = [
        chr(c)
        for c in range(0x110000)
        if c < 0xD800 or 0xDFFF < c < 0x10000 or unicodedata.category(chr(c)) not in ("Cn", "Co")
    ]
    cps = [c for c in cps if not c.isalnum()] + [c for c in cps if c.isalnum()][::16]
    text = " ".join(f"lung{c}cancer" for c in cps)
    bad = engine_engines.differences([("all", text)], ExtractOptions(overlap="all"))
    assert not bad, bad[0][:2000]


# -- 4. generated captions ---------------------------------------------------------------------

_TRIGGERS = (
    "no", "No", "NO", "not", "without", "Without", "ruled out", "was ruled out", "is absent",
    "are absent", "absent", "negative for", "no evidence of", "free of", "free", "not seen",
    "excluded", "resolved", "no change", "no significant change", "gram negative", "not only",
    "but", "however", "with", "showing", "which", "due to", "there is", "and then",
    # every phrase of the rule table, so that generated captions reach every rule
    *sorted({r.phrase for r in CONTEXT_RULES}),
)
_GLUE = (
    " ", " ", " ", " ", ", ", ". ", "; ", ": ", " (", ") ", "(", ")", " - ", "-", "/", " and ",
    " or ", " of the ", " in ", "\n", " (A) ", "! ", "? ", "  ", " [", "] ", "’s ", "'s ", "",
    "_", "'", "’", "\u0301 ", "\u00a0", " {", "} ",
)
_EXTRA = (
    "T2-weighted", "X-ray", "x-ray", "PET/CT", "CT", "ct", "Ct", "CTs", "MRI", "MRIs", "mri",
    "US", "us", "MS", "Ms", "AP", "ap", "IN", "in", "PE", "(arrow)", "(arrows)", "3 cm",
    "patient's", "Crohn’s", "ﬁbrosis", "ＣＴ", "oedema", "haematoma", "tumours", "vertebrae",
    "metastases", "e.g.", "", "Computed tomography (CT)", "CT (computed tomography)",
    "magnetic resonance imaging (MRI)", "MRI (magnetic resonance imaging)", "(CT)", "(ct)",
    "( CT )", "(CT, MRI)", "(CT; see text)", "(C.T.)", "(CT-A)", "((CT))", "(CT", "CT)",
    "(a) (B)", "CT_", "_CT", "xCT", "CTé", "ÉCT", "CT\u0301", "CT's", "CT’s", "(CTA)",
    "(computed tomography angiography)", "Computed Tomography Angiography (CTA) CTA",
    "CTA (computed tomography angiography) CTA", "A B (some long words here as well)",
)
_CASES: tuple[Callable[[str], str], ...] = (
    str, str, str.lower, str.upper, str.title, str.capitalize, str.swapcase,
)


def _define(long: str, forward: bool) -> str:
    """A Schwartz–Hearst definition of ``long`` by its initials, either way round."""
    short = "".join(w[0] for w in long.split() if w[:1].isalnum()).upper() or "X"
    return f"{long} ({short})" if forward else f"{short} ({long})"


def _split(phrase: str, glue: str, k: int) -> str:
    """``phrase`` with one of its spaces replaced by ``glue`` (a break inside a term/trigger)."""
    spaces = [i for i, c in enumerate(phrase) if c == " "]
    if not spaces:
        return phrase
    i = spaces[k % len(spaces)]
    return phrase[:i] + glue + phrase[i + 1 :]


def _insert(phrase: str, char: str, k: int) -> str:
    """``phrase`` with ``char`` inserted at position ``k`` (mod its length + 1)."""
    k %= len(phrase) + 1
    return phrase[:k] + char + phrase[k:]


def caption_strategy(phrases: Sequence[str], tokens: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """Captions glued from dictionary-like phrases (in several letter cases, defined by their
    initials, or broken by punctuation), tokens, negation triggers, hard words and Unicode."""
    phrase = st.sampled_from(sorted(set(phrases)))
    multi = sorted({p for p in (*phrases, *_TRIGGERS) if " " in p})
    glue = st.sampled_from(_GLUE)
    word = st.one_of(
        phrase,
        st.builds(lambda t, case: case(t), phrase, st.sampled_from(_CASES)),
        st.builds(_insert, phrase, _CHARS, st.integers(0, 30)),
        st.builds(_define, phrase, st.booleans()),
        st.builds(_split, st.sampled_from(multi), glue, st.integers(0, 7)),
        st.sampled_from(sorted(set(tokens)) or _EXTRA),
        st.sampled_from(_TRIGGERS),
        st.sampled_from(_EXTRA),
        st.text(_CHARS, max_size=4),
    )
    return st.lists(st.tuples(word, glue), max_size=14).map(
        lambda parts: "".join(w + g for w, g in parts)
    )


def index_captions(index: ConceptIndex, extra: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """:func:`caption_strategy` over an index's dictionary strings and key tokens, the strings
    of its ambiguous keys twice over, and definitions of its abbreviations by their concepts'
    preferred names."""
    phrases: list[str] = list(extra)
    tokens: set[str] = set()
    for kid in range(index.n_keys):
        tokens.update(index.key(kid).split(" "))
        for p in index.postings_of(kid):
            phrases.append(p.string)
            concept = index.concept(p.cui)
            if p.flags & FLAG_ABBREVIATION and concept is not None:
                phrases.append(f"{concept.preferred_name} ({p.string})")
                phrases.append(f"{p.string} ({concept.preferred_name})")
    ambiguous = {p.string for key, _ in index.ambiguous_keys() for p in index.postings(key)}
    strategies = [caption_strategy(phrases, sorted(tokens))]
    if ambiguous:
        strategies.append(caption_strategy(sorted(ambiguous)))
    return st.one_of(strategies)


@pytest.fixture(scope="module")
def demo_captions(demo: ConceptIndex) -> st.SearchStrategy[str]:
    return index_captions(demo, _evidence_terms("rocov2"))


@pytest.fixture(scope="module")
def engine_captions(engine_engines: Engines) -> st.SearchStrategy[str]:
    return index_captions(engine_engines.index)


PROPERTY_OPTIONS = [
    ExtractOptions(),
    ExtractOptions(profile="rocov2", overlap="all", include_negated=False),
    ExtractOptions(mode="approximate", overlap="best_score", threshold=0.6, profile="rocov2"),
]


@settings(max_examples=400, deadline=None)
@given(data=st.data(), options=st.sampled_from(PROPERTY_OPTIONS))
def test_speedups_generated_captions_demo(
    demo_engines: Engines,
    demo_captions: st.SearchStrategy[str],
    data: st.DataObject,
    options: ExtractOptions,
) -> None:
    demo_engines.check(data.draw(demo_captions, label="caption"), options)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    options=st.sampled_from(
        [
            ExtractOptions(),
            ExtractOptions(semantic_types=("Bacterium", "T047"), overlap="all"),
            ExtractOptions(mode="approximate", threshold=0.6, include_negated=False),
        ]
    ),
)
def test_speedups_generated_captions_engine(
    engine_engines: Engines,
    engine_captions: st.SearchStrategy[str],
    data: st.DataObject,
    options: ExtractOptions,
) -> None:
    engine_engines.check(data.draw(engine_captions, label="caption"), options)


def _rules(
    kind: Kind, *phrases: str, category: Category | None = Category.NEGATED
) -> tuple[ContextRule, ...]:
    return tuple(ContextRule(p, kind, category) for p in phrases)


_DETECTORS = [
    NegationDetector(),
    NegationDetector(NegationRules(scope=1)),
    NegationDetector(NegationRules(scope=12)),
    NegationDetector(NegationRules(scope=0)),
    # every kind; one phrase under two kinds, a pseudo-trigger inside a trigger, a location
    # word that is also a list word, a closing word inside a trigger
    NegationDetector(
        NegationRules(
            rules=(
                *_rules(Kind.FORWARD, "no", "free", "not seen", "absent"),
                *_rules(Kind.BACKWARD, "free", "absent", "seen", "negative"),
                *_rules(Kind.BIDIRECTIONAL, "ruled out", "gram negative"),
                *_rules(Kind.CLAUSE, "excluded", "ruled out", "rules out"),
                *_rules(Kind.PSEUDO, "no change", "free text"),
                *_rules(Kind.TERMINATE, "but", "with", "and the"),
                *_rules(Kind.CLOSE, "present", "is present", "seen"),
                *_rules(Kind.LOCATION, "in", "on", "and"),
            ),
            scope=3,
            list_words=frozenset({"or", "nor"}),
        )
    ),
    # every category: triggers of each kind, category terminations and pseudo-triggers, a
    # general termination, a phrase under two categories, a closing word of another category
    NegationDetector(
        NegationRules(
            rules=(
                *_rules(Kind.FORWARD, "no", "without"),
                *_rules(Kind.BACKWARD, "absent"),
                *_rules(Kind.FORWARD, "if", "rule out", category=Category.HYPOTHETICAL),
                *_rules(Kind.BACKWARD, "unlikely", category=Category.HYPOTHETICAL),
                *_rules(Kind.PSEUDO, "if needed", category=Category.HYPOTHETICAL),
                *_rules(Kind.FORWARD, "history of", "prior", category=Category.HISTORICAL),
                *_rules(Kind.BIDIRECTIONAL, "remote", category=Category.HISTORICAL),
                *_rules(Kind.CLAUSE, "resolved", category=Category.HISTORICAL),
                *_rules(Kind.TERMINATE, "now", "presents", category=Category.HISTORICAL),
                *_rules(Kind.PSEUDO, "history of present illness",
                        category=Category.HISTORICAL),
                *_rules(Kind.FORWARD, "mother", "family history",
                        category=Category.OTHER_EXPERIENCER),
                *_rules(Kind.BACKWARD, "in his father", category=Category.OTHER_EXPERIENCER),
                *_rules(Kind.TERMINATE, "patient", category=Category.OTHER_EXPERIENCER),
                ContextRule("personal history", Kind.FORWARD, Category.HISTORICAL,
                            (Category.OTHER_EXPERIENCER,)),
                *_rules(Kind.CLOSE, "noted", category=Category.HYPOTHETICAL),
                *_rules(Kind.CLOSE, "present"),
                *_rules(Kind.TERMINATE, "but", "with", category=None),
                *_rules(Kind.LOCATION, "in", "on", category=None),
            ),
        )
    ),
]


def _spans(text: str) -> tuple[list[str], list[int], list[int]]:
    norms, starts, ends = tokenize_spans_py(text)
    return list(norms), list(starts), list(ends)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), k=st.integers(0, len(_DETECTORS) - 1))
def test_speedups_negation_scanner_equals_detector(
    demo_captions: st.SearchStrategy[str], data: st.DataObject, k: int
) -> None:
    text = data.draw(demo_captions, label="caption")
    detector = _DETECTORS[k]
    scanner = normalize.SPEEDUPS.NegationScanner(detector)
    norms, starts, ends = _spans(text)
    got = scanner.negated_tokens(text, norms, starts, ends)
    want = detector.negated_tokens(text, norms, starts, ends)
    assert (got, repr(got)) == (want, repr(want))


def test_speedups_negation_scanner_on_the_sample(sample: Items) -> None:
    for detector in _DETECTORS:
        scanner = normalize.SPEEDUPS.NegationScanner(detector)
        for _, text in [*sample, ("", ""), ("", "no"), ("", "No. Absent")]:
            norms, starts, ends = _spans(text)
            got = scanner.negated_tokens(text, norms, starts, ends)
            assert got == detector.negated_tokens(text, norms, starts, ends), text


def _negation_variants(sentence: str) -> list[str]:
    """A sentence and the same with its punctuation moved about (commas, breaks, no breaks)."""
    return [
        sentence, sentence.lower(), sentence.replace(",", ""), sentence.replace(" ", ", "),
        sentence.replace(" ", ". ", 1), re.sub(r"\s+", " ", sentence).rstrip(".") + " present.",
    ]


def test_speedups_negation_scanner_on_the_negation_sentences() -> None:
    for detector in _DETECTORS:
        scanner = normalize.SPEEDUPS.NegationScanner(detector)
        for _, _, sentence in negation_rows():
            for text in _negation_variants(sentence):
                norms, starts, ends = _spans(text)
                got = scanner.negated_tokens(text, norms, starts, ends)
                assert got == detector.negated_tokens(text, norms, starts, ends), text


NEGEX_DEV = Path(__file__).parent / "fixtures" / "negex_dev.tsv"


def _negex_dev_rows() -> list[tuple[str, str]]:
    """(condition, sentence) of the NegEx development half (see fixtures/ATTRIBUTION.md)."""
    rows = []
    for line in NEGEX_DEV.read_text(encoding="utf-8").splitlines()[1:]:
        if line:
            cols = line.split("\t")
            rows.append((cols[1], cols[2]))
    return rows


@pytest.fixture(scope="module")
def negation_engines(tmp_path_factory: pytest.TempPathFactory) -> Engines:
    """Engines over a dictionary with each condition of the negation fixture and of the NegEx
    development half as a concept, as annotated: case, inner spacing and punctuation kept
    (so windows across punctuation are exercised too)."""
    builder = IndexBuilder(source_release="negation-test-fixture")
    conditions = sorted(
        {re.sub(r"\s+", " ", c).lower() for _, c, _ in negation_rows()}
        | {c for c, _ in _negex_dev_rows()}
    )
    for k, condition in enumerate(conditions):
        cui = f"C9{k:06d}"
        builder.set_concept(cui, preferred_name=condition, semantic_types=["T047"])
        builder.add_term(cui, condition, sab="TEST", tty="PT", flags=0)
    path = builder.write(tmp_path_factory.mktemp("negation") / "index")
    return Engines(ConceptIndex.load(path))


_CONTEXT_OPTIONS = [
    ExtractOptions(), ExtractOptions(include_negated=False),
    ExtractOptions(overlap="all"), ExtractOptions(overlap="all", include_negated=False),
    ExtractOptions(include_hypothetical=False),
    ExtractOptions(overlap="all", include_negated=False, include_hypothetical=False),
]


def test_speedups_engines_agree_on_the_negation_sentences(negation_engines: Engines) -> None:
    for o in _CONTEXT_OPTIONS:
        for _, _, sentence in negation_rows():
            for text in _negation_variants(sentence):
                negation_engines.check(text, o)


def test_speedups_engines_agree_on_the_development_sentences(negation_engines: Engines) -> None:
    # issue 17: the NegEx development half, every ConText property and the conditions across
    # punctuation; the test is only worth something if those occur, so that is checked too
    items = [(str(k), s) for k, (_, s) in enumerate(_negex_dev_rows())]
    seen: Counter[str] = Counter()
    for o in _CONTEXT_OPTIONS:
        bad = negation_engines.differences(items, o)
        assert not bad, summary(bad, len(items))
        for a in negation_engines.reference(items, o):
            for m in a.mentions:
                seen.update(name for name in ("negated", "hypothetical", "historical")
                            if getattr(m, name))
                seen["other"] += m.experiencer == "other"
                seen["across punctuation"] += any(ch in m.text for ch in ",:")
    assert min(seen[k] for k in ("negated", "hypothetical", "historical", "other",
                                 "across punctuation")) > 0, seen


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(
        st.tuples(
            st.sampled_from(sorted({r.phrase for r in CONTEXT_RULES})),
            st.sampled_from(sorted({c for _, c, _ in negation_rows()})),
            st.sampled_from((" ", ", ", ". ", ": ", " or ", " and ", " in the ")),
        ),
        max_size=6,
    ),
    overlap=st.sampled_from(("longest", "all")),
)
def test_speedups_engines_agree_on_sentences_from_the_rule_table(
    negation_engines: Engines, parts: list[tuple[str, str, str]], overlap: str
) -> None:
    # triggers of every kind around the fixture's conditions
    text = "".join(f"{rule} {condition}{glue}" for rule, condition, glue in parts)
    negation_engines.check(text, ExtractOptions(overlap=overlap))
    negation_engines.check(text, ExtractOptions(overlap=overlap, include_negated=False))
    negation_engines.check(text, ExtractOptions(overlap=overlap, include_hypothetical=False))


@functools.cache
def _profile_cuis(name: str) -> list[str]:
    """Every CUI the profile's rules name, a slice of its vocabulary and one it never names."""
    profile = load_profile(name)
    cuis: set[str] = set(profile.drop) | {"C9999999"}
    for s in profile.slots:
        cuis |= s.member_set | s.when
        cuis.update(c for c, _ in s.defaults)
        for _cui, when in s.defaults:
            cuis |= when
        cuis.update(ev for ev, _, _ in s.cui_evidence)
    cuis.update(sorted(profile.vocabulary or ())[:40])
    return sorted(cuis)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), name=st.sampled_from(["rocov2", "none"]))
def test_speedups_profile_runner_equals_profile(
    demo_captions: st.SearchStrategy[str], data: st.DataObject, name: str
) -> None:
    profile = load_profile(name)
    runner = normalize.SPEEDUPS.ProfileRunner(profile)
    text = data.draw(demo_captions, label="caption")
    mentioned = data.draw(
        st.lists(st.sampled_from(_profile_cuis("rocov2")), unique=True, max_size=10),
        label="mentioned",
    )
    norms, starts, ends = _spans(text)
    kept, inferred = runner.apply(mentioned, text, norms, starts, ends)
    want = profile.apply(mentioned, text, norms, starts, ends)
    assert (kept, inferred) == (want.kept, want.inferred)
    assert repr(inferred) == repr(want.inferred)


# rocov2's members all have distinct priorities; this profile has the constructs it lacks:
# tied priorities with max > 1, evidence phrases that are prefixes of one another, capitals-only
# terms, CUI evidence, conditional defaults, keep_mentioned, a vocabulary and a drop list.
_TOY = {
    "name": "toy",
    "description": "every construct a profile file can use",
    "slots": [
        {
            "name": "a", "max": 2, "mention_weight": 1.0,
            "members": [
                {"cui": "C0000001", "evidence": [{"terms": ["alpha", "gamma ray"]}]},
                {
                    "cui": "C0000002",
                    "evidence": [{"terms": ["BETA", "gamma"], "cuis": ["C0000009"]}],
                },
                {"cui": "C0000003", "evidence": [{"terms": ["gamma ray burst"], "weight": 2.0}]},
                {"cui": "C0000004"},
            ],
            "defaults": [{"cui": "C0000003", "when": ["C0000009"]}, {"cui": "C0000004"}],
        },
        {
            "name": "b", "when": ["C0000001"], "without_when": "keep_mentioned",
            "members": [
                {"cui": "C0000011", "evidence": [{"terms": ["epsilon"]}]},
                {"cui": "C0000012", "evidence": [{"terms": ["EPS", "epsilon"]}]},
            ],
        },
        {
            "name": "c", "when": ["C0000011", "C0000002"],
            "members": [
                {"cui": "C0000021", "priority": 5, "evidence": [{"terms": ["zeta"]}]},
                {"cui": "C0000022", "priority": 5, "evidence": [{"terms": ["eta", "Zeta"]}]},
            ],
            "defaults": [{"cui": "C0000022", "when": ["C0000012"]}],
        },
    ],
    "drop": ["C0000031"],
}
_TOY_CUIS = [
    "C0000001", "C0000002", "C0000003", "C0000004", "C0000009", "C0000011", "C0000012",
    "C0000021", "C0000022", "C0000031", "C0000099",
]
_TOY_PROFILES = [
    Profile(ProfileModel.model_validate(_TOY)),
    Profile(ProfileModel.model_validate({**_TOY, "vocabulary": _TOY_CUIS[::2]})),
]
_TOY_CAPTIONS = caption_strategy(
    ["alpha", "BETA", "gamma", "gamma ray", "gamma ray burst", "epsilon", "EPS", "zeta", "eta"]
)


@settings(max_examples=300, deadline=None)
@given(
    profile=st.sampled_from(_TOY_PROFILES),
    text=_TOY_CAPTIONS,
    mentioned=st.lists(st.sampled_from(_TOY_CUIS), unique=True, max_size=8),
)
def test_speedups_profile_runner_equals_profile_on_every_construct(
    profile: Profile, text: str, mentioned: list[str]
) -> None:
    runner = normalize.SPEEDUPS.ProfileRunner(profile)
    norms, starts, ends = _spans(text)
    kept, inferred = runner.apply(mentioned, text, norms, starts, ends)
    want = profile.apply(mentioned, text, norms, starts, ends)
    assert (kept, inferred, repr(inferred)) == (want.kept, want.inferred, repr(want.inferred))


def test_speedups_profile_runner_on_the_sample(demo_engines: Engines, sample: Items) -> None:
    profile = load_profile("rocov2")
    runner = normalize.SPEEDUPS.ProfileRunner(profile)
    for _, text in sample:
        mentioned = list(demo_engines.ref.extract(text, ExtractOptions(overlap="all")).concepts)
        norms, starts, ends = _spans(text)
        got = runner.apply(mentioned, text, norms, starts, ends)
        assert got == tuple(profile.apply(mentioned, text, norms, starts, ends)), text


def _evidence_terms(name: str) -> list[str]:
    profile = load_profile(name)
    terms = (t for s in profile.model.slots for m in s.members for e in m.evidence for t in e.terms)
    return list(dict.fromkeys(terms))


def test_speedups_captions_with_many_evidence_phrases(demo_engines: Engines) -> None:
    # Captions with from a few to all of rocov2's distinct evidence phrases (the compiled
    # path may keep the phrases seen in a caption in a bounded array), shuffled, in capitals
    # or not, with and without a modality mentioned.
    terms = _evidence_terms("rocov2")
    assert len(terms) > 100
    rng = random.Random(3)
    items: Items = []
    for k in [*range(1, 12), *range(40, 90), 150, len(terms)]:
        picked = rng.sample(terms, min(k, len(terms)))
        for case in (str, str.upper):
            text = case(", ".join(picked))
            items += [(f"{k}", text), (f"{k}+CT", "CT of the chest: " + text)]
    for overlap in ("longest", "all"):
        options = ExtractOptions(profile="rocov2", overlap=overlap)
        bad = demo_engines.differences(items, options)
        assert not bad, summary(bad, len(items))


# -- 5. order, batches and memo tables do not change results -----------------------------------


def test_speedups_batch_order_and_warmth_do_not_change_results(
    demo: ConceptIndex, demo_engines: Engines, sample: Items
) -> None:
    options = [
        ExtractOptions(),
        ExtractOptions(profile="rocov2"),
        ExtractOptions(overlap="all", include_negated=False, semantic_groups=("DISO", "ANAT")),
        ExtractOptions(mode="approximate", overlap="best_score"),
    ]
    # cold: a fresh extractor per options, one caption at a time, is the reference
    cold: dict[ExtractOptions, list[Annotation]] = {}
    for o in options:
        ex = Extractor(demo)
        cold[o] = [ex.extract(t, o, id=i) for i, t in sample]
        bad = differences(sample, cold[o], demo_engines.reference(sample, o))
        assert not bad, f"cold {_id(o)}: " + summary(bad, len(sample))
    # warm: every memo table filled under all the option sets first, then batches
    warm = Extractor(demo)
    for o in options:
        warm.extract_batch(sample, o)
    for o in options:
        bad = differences(sample, warm.extract_batch(sample, o), cold[o])
        assert not bad, f"warm batch {_id(o)}: " + summary(bad, len(sample))
    # shuffled and interleaved: the options change at every call, each time as an equal but
    # new object (the extractor's last-plan shortcut is by identity)
    mixed = Extractor(demo)
    order = list(range(len(sample)))
    random.Random(7).shuffle(order)
    got: dict[ExtractOptions, list[Annotation | None]] = {o: [None] * len(sample) for o in options}
    for k in order:
        id_, text = sample[k]
        for o in options:
            got[o][k] = mixed.extract(text, dataclasses.replace(o), id=id_)
    for o in options:
        bad = differences(sample, got[o], cold[o])
        assert not bad, f"shuffled {_id(o)}: " + summary(bad, len(sample))


def test_speedups_one_instance_switching_paths_shares_memo_tables_safely(
    demo: ConceptIndex, demo_engines: Engines, sample: Items
) -> None:
    # Both paths of one extractor read and write the same plan memos: whichever runs first,
    # the other's results must not change. (Only the benchmark switches an extractor's path,
    # by its private ``_fast``; the Python path then keeps the compiled tokeniser.)
    options = [ExtractOptions(), ExtractOptions(profile="rocov2", overlap="all")]
    want = {o: demo_engines.reference(sample, o) for o in options}
    for fast_first in (True, False):
        ex = Extractor(demo, engine="compiled")
        fast_path = ex._fast
        for step in ("fast", "reference") if fast_first else ("reference", "fast"):
            ex._fast = fast_path if step == "fast" else None
            for o in options:
                got = [ex.extract(t, o, id=i) for i, t in sample]
                bad = differences(sample, got, want[o])
                assert not bad, f"{step} (fast first: {fast_first}) {_id(o)}: " + summary(
                    bad, len(sample)
                )


def test_speedups_threads_share_one_extractor(
    demo: ConceptIndex, demo_engines: Engines, sample: Items
) -> None:
    # The extractor is shared by the service's worker threads; its tables fill concurrently.
    options = [ExtractOptions(), ExtractOptions(profile="rocov2", include_negated=False)]
    want = {o: demo_engines.reference(sample, o) for o in options}
    ex = Extractor(demo)

    def run(seed: int) -> list[str]:
        order = list(range(len(sample)))
        random.Random(seed).shuffle(order)
        got: dict[ExtractOptions, list[Any]] = {o: [None] * len(sample) for o in options}
        for k in order:
            for o in options:
                got[o][k] = ex.extract(sample[k][1], o, id=sample[k][0])
        return [line for o in options for line in differences(sample, got[o], want[o])]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(run, range(4)))
    finally:
        sys.setswitchinterval(interval)
    bad = [line for r in results for line in r]
    assert not bad, summary(bad, 4 * len(options) * len(sample))


def _word(n: int) -> str:
    """The n-th of a run of distinct made-up words ("qa", "qb", ..., "qba", ...)."""
    out = "q"
    while True:
        n, r = divmod(n, 26)
        out += chr(97 + r)
        if n == 0:
            return out


def test_speedups_many_distinct_words_keep_results(demo_engines: Engines, sample: Items) -> None:
    # 200,000 new surface forms, more than any of the compiled path's bounded tables holds,
    # mixed into real captions; results before and after must still be the reference's.
    items = [
        (id_, text + " " + " ".join(_word(k * 800 + j) for j in range(800)) + " " + text)
        for k, (id_, text) in enumerate(sample[:250])
    ]
    bad = demo_engines.differences(items, ExtractOptions(profile="rocov2"))
    assert not bad, summary(bad, len(items))
    bad = demo_engines.differences(sample, ExtractOptions(profile="rocov2"))
    assert not bad, summary(bad, len(sample))


# -- 6. hardening found in review --------------------------------------------------------------


def test_speedups_definitions_are_capped_the_same_in_both_engines(demo_engines: Engines) -> None:
    """A caption of nothing but definitions: both engines read MAX_DEFINITIONS of them (it took
    28 s at 100 KB before the cap) and agree."""
    from conceptsvc.abbreviations import MAX_DEFINITIONS, fast_find_definitions, find_definitions

    text = "computed tomography (CT) " * 400
    assert len(find_definitions(text)) == MAX_DEFINITIONS
    assert isinstance(fast_find_definitions, _speedups.DefinitionFinder)
    assert fast_find_definitions(text) == find_definitions(text)
    demo_engines.check(text, ExtractOptions())


def test_speedups_definitions_with_runs_of_whitespace_equal_reference() -> None:
    """Issue 19: a long form's offset in a caption whose clause has two spaces or a tab."""
    from conceptsvc.abbreviations import fast_find_definitions, find_definitions

    assert isinstance(fast_find_definitions, _speedups.DefinitionFinder)
    for text in ("Findings.  Computed  tomography (CT) of the chest",
                 "C \t computed\ttomography (CT)", " x\n\npleural   effusion (PE); PE"):
        compiled = fast_find_definitions(text)
        assert compiled == find_definitions(text) != []
        assert all(text[d.long_start] not in " \t\n" for d in compiled)


def test_speedups_reverse_definitions_equal_reference() -> None:
    """The two reverse-pattern fixes of the scispacy reference check, in both engines: the long
    form starts after any whitespace, and never holds the short form as a word."""
    from conceptsvc.abbreviations import fast_find_definitions, find_definitions

    assert isinstance(fast_find_definitions, _speedups.DefinitionFinder)
    cases = {
        "Axi MPGR (MPGR\u2009=\u2009multiplanar gradient-recalled) image": [
            ("MPGR", "multiplanar gradient-recalled")
        ],
        "an MPR (see\u00a0multiplanar reconstruction) image": [
            ("MPR", "multiplanar reconstruction")
        ],
        "The RA (right atrial area RA = 25 cm2) is enlarged": [],
        "an enlarged RA (rest of the RA area) here": [],
        "an MPR (multiplanar MPRAGE reconstruction) image": [("MPR", "MPRAGE reconstruction")],
    }
    for text, want in cases.items():
        compiled = fast_find_definitions(text)
        assert compiled == find_definitions(text), text
        assert [(d.short, text[d.long_start : d.long_end]) for d in compiled] == want, text
    # every whitespace character str.split() knows, before the long form's first word
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    for space in spaces:
        text = f"an MPR (see{space}multiplanar reconstruction) image"
        assert fast_find_definitions(text) == find_definitions(text), repr(space)
        (d,) = find_definitions(text)
        assert text[d.long_start : d.long_end] == "multiplanar reconstruction", repr(space)


def test_speedups_case_check_memo_stays_bounded(demo_engines: Engines) -> None:
    """Keys that need a case check are memoised per surface, and surfaces are caption text
    (combining marks normalise away): the memo is emptied at its cap instead of growing."""
    from conceptsvc._speedups import FAST_MEMO_MAX

    fast = Extractor(demo_engines.index)
    options = ExtractOptions()
    plan = fast._plan(options)
    for k in range(FAST_MEMO_MAX + 10):
        fast.extract("C" + "\u0301" * (k % 500 + 1) + "T" + "\u0300" * (k // 500) + " scan",
                     options)
    assert len(plan.fast_memo) <= FAST_MEMO_MAX
    demo_engines.check("C\u0301T scan of the chest", options)


@pytest.mark.parametrize("engine", ["compiled", "reference"])
def test_speedups_concept_memos_stay_bounded_and_change_nothing(
    demo: ConceptIndex, sample: Items, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    """The extractor's concept memo (name and types, filled by both engines) and the ambiguity
    resolvers' word memos are emptied at their caps (``extractor.CONCEPT_MEMO_SIZE``,
    ``abbreviations.VOCAB_MEMO_SIZE``) instead of keeping every concept a long-lived worker's
    captions reach. With caps far below what 200 captions reach, after every caption the
    memos are within them, and every annotation is what an extractor with the shipped caps
    gives."""
    from conceptsvc import extractor as extractor_module

    items = sample[:200]
    options = [ExtractOptions(), ExtractOptions(profile="rocov2"),
               ExtractOptions(mode="approximate", overlap="all")]
    free = Extractor(demo, engine=engine)
    want = [[free.extract(text, o, id=id_) for id_, text in items] for o in options]
    # the shipped caps hold all of it, and it is more than the caps below
    assert len(free._info) > 100
    assert max(len(r._vocab) for r in free._resolvers.values()) > 2
    monkeypatch.setattr(extractor_module, "CONCEPT_MEMO_SIZE", 8)
    monkeypatch.setattr(abbreviations, "VOCAB_MEMO_SIZE", 2)
    capped = Extractor(demo, engine=engine)
    assert capped.engine == engine
    for o, expected in zip(options, want, strict=True):
        for (id_, text), ann in zip(items, expected, strict=True):
            assert capped.extract(text, o, id=id_) == ann, text
            assert len(capped._info) <= 8
            assert all(len(r._vocab) <= 2 for r in capped._resolvers.values())
    assert any(r._vocab for r in capped._resolvers.values())


def test_speedups_public_entry_points_reject_none_and_half_built_objects() -> None:
    with pytest.raises(TypeError):
        _speedups.FastPath.__new__(_speedups.FastPath).extract("CT scan", object())
    detector = NegationDetector()
    scanner = _speedups.NegationScanner(detector)
    with pytest.raises(TypeError):
        scanner.negated_tokens(None, ["no", "mass"], [0, 3], [2, 7])
    with pytest.raises(TypeError):
        normalize.tokenize_spans(None)
    with pytest.raises(TypeError):
        abbreviations.fast_find_definitions(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _speedups.DefinitionFinder.__new__(_speedups.DefinitionFinder)("CT (computed tomography)")
    with pytest.raises(TypeError):  # (a segmentation fault before)
        _speedups.SpanTokenizer.__new__(_speedups.SpanTokenizer)("CT scan")


def _legacy_str(text: str) -> str:
    """``text`` as a "legacy" str of Python 3.11's deprecated Py_UNICODE API: its length is 0
    and its data NULL until something readies it, as some C extensions still make them."""
    import ctypes

    api = ctypes.pythonapi
    api.PyUnicode_FromUnicode.restype = ctypes.py_object
    api.PyUnicode_FromUnicode.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    api.PyUnicode_AsUnicode.restype = ctypes.c_void_p
    api.PyUnicode_AsUnicode.argtypes = [ctypes.py_object]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out: str = api.PyUnicode_FromUnicode(None, len(text))
        units = (ctypes.c_wchar * len(text)).from_address(api.PyUnicode_AsUnicode(out))
    units[:] = text
    return out


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12 has no legacy strings")
def test_speedups_legacy_strings_are_readied(demo_engines: Engines) -> None:
    # The compiled scan read a caption's code units through PyUnicode_DATA without readying
    # it: a legacy str gave no tokens, and no annotation, where the reference finds them.
    text = "Left pleural effusion (PE); no CT evidence of a pneumothorax."
    assert normalize.tokenize_spans(_legacy_str(text)) == tokenize_spans_py(text)
    assert demo_engines.fast.extract(_legacy_str(text)) == demo_engines.ref.extract(text)
    assert demo_engines.ref.extract(text).concepts


def test_speedups_threads_share_tokenizers_through_resets_and_collections(
    demo: ConceptIndex, sample: Items
) -> None:
    """Threads tokenising and extracting at once while the token tables overflow and reset
    (a tokeniser bounded at 8 forms) or grow (a fresh one), with a garbage collection at
    almost every allocation whose finalizers release the GIL and tokenise too: thread
    switches land inside every Python call the compiled scan makes. Same tokens and
    annotations as the reference; with the extension built under AddressSanitizer it also
    reports a table slot used across such a call (RELIABILITY.md)."""
    tiny = _speedups.SpanTokenizer(normalize.fast_normalize_token, marks=normalize._MARK_RANGES,
                                   apostrophes=normalize._APOSTROPHES, max_cache=8)
    fast = Extractor(demo, engine="compiled")
    ref = Extractor(demo, engine="reference")
    options = [ExtractOptions(), ExtractOptions(mode="approximate"),
               ExtractOptions(profile="rocov2", overlap="all")]
    noise = "ab CT’s e\u0301 \u4e2d\U0001d400 x-ray ("
    rng = random.Random(7)
    texts = [t + " " + "".join(rng.choice(noise) for _ in range(30)) for _, t in sample[:120]]
    want = {o: [ref.extract(t, o) for t in texts] for o in options}
    bad: list[str] = []

    class Finalised:  # a cycle, so only a collection frees it
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            time.sleep(0)
            tiny("finalizer " + str(id(self)))

    # new forms beyond ASCII, so normalising each runs Python code (a thread switch), while a
    # fresh table grows from 4,096 slots to 32,768: 3,000 forms from each thread
    salt = rng.randrange(1 << 30)
    growing = _speedups.SpanTokenizer(normalize.fast_normalize_token,
                                      marks=normalize._MARK_RANGES,
                                      apostrophes=normalize._APOSTROPHES, max_cache=1 << 16)

    def run(seed: int) -> None:
        order = random.Random(seed)
        for k in range(0, 3000, 3):
            text = " ".join(f"\u00e9{_word(n)}x{seed}x{salt}" for n in range(k, k + 3))
            if growing(text) != tokenize_spans_py(text):
                bad.append(f"tokens {text!r}")
        for k in order.sample(range(len(texts)), len(texts)):
            Finalised()
            o = options[k % len(options)]
            for tok in (tiny, normalize.tokenize_spans):
                if tok(texts[k]) != tokenize_spans_py(texts[k]):
                    bad.append(f"tokens {texts[k]!r}")
            if fast.extract(texts[k], o) != want[o][k]:
                bad.append(f"{_id(o)} {texts[k]!r}")

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(5, 2, 2)
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(run, range(6)))
    finally:
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(interval)
    assert not bad, summary(bad, 6 * len(texts))


def test_speedups_ids_need_not_be_strings(demo_engines: Engines) -> None:
    assert demo_engines.fast.extract("CT scan", id=5) == demo_engines.ref.extract("CT scan", id=5)
