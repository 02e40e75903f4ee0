from __future__ import annotations

import gc
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from offsets import check_annotation

from conceptsvc.errors import ExtractArgumentError, ExtractionError, SemanticNetworkError
from conceptsvc.extractor import PLAN_CACHE_BYTES, Extractor, WeightedMemo, options_weight
from conceptsvc.index import ConceptIndex, IndexBuilder
from conceptsvc.model import Annotation, ExtractOptions, Mention
from conceptsvc.profile import Profile, ProfileModel, load_profile


@pytest.fixture(scope="module")
def ex(engine_index_path: Path) -> Extractor:
    return Extractor(ConceptIndex.load(engine_index_path))


def spans(a: object) -> list[tuple[str, str]]:
    return [(m.text, m.cui) for m in a.mentions]  # type: ignore[attr-defined]


def test_extractor_offsets_point_into_original_text(ex: Extractor) -> None:
    text = "Axial ＣＴ: ﬁnal Haematomas and PLEURAL EFFUSIONS (arrows)."
    a = ex.extract(text, id="x1")
    assert a.id == "x1"
    check_annotation(ex.index, text, a)
    assert ("Haematomas", "C0018944") in spans(a)
    assert ("PLEURAL EFFUSIONS", "C0032227") in spans(a)


def test_extractor_longest_match_by_default(ex: Extractor) -> None:
    a = ex.extract("Known lung cancer.")
    assert spans(a) == [("lung cancer", "C0242379")]
    assert a.concepts == ("C0242379",)


def test_extractor_overlap_strategies(ex: Extractor) -> None:
    text = "Known lung cancer."
    every = ex.extract(text, ExtractOptions(overlap="all"))
    assert set(spans(every)) == {("lung cancer", "C0242379"), ("lung", "C0024109")}
    best = ex.extract(text, ExtractOptions(overlap="best_score"))
    # equal scores: best_score falls back to the longer span
    assert spans(best) == [("lung cancer", "C0242379")]


def test_extractor_type_filter_lets_shorter_match_win(ex: Extractor) -> None:
    a = ex.extract("Known lung cancer.", ExtractOptions(semantic_types=("T023",)))
    assert spans(a) == [("lung", "C0024109")]


def test_extractor_multityped_concept_passes_if_any_type_accepted(ex: Extractor) -> None:
    text = "Large pleural effusion."
    assert ex.extract(text, ExtractOptions(semantic_types=("Finding",))).concepts == ("C0032227",)
    assert ex.extract(text, ExtractOptions(semantic_types=("dsyn",))).concepts == ("C0032227",)
    assert ex.extract(text, ExtractOptions(semantic_types=("T023",))).concepts == ()


def test_extractor_group_source_and_exclusion_filters(ex: Extractor) -> None:
    text = "Chest X-ray: pleural effusion and lung cancer."
    anat = ex.extract(text, ExtractOptions(semantic_groups=("ANAT",)))
    assert set(anat.concepts) == {"C0817096", "C0024109"}  # "lung" once "lung cancer" is out
    hpo = ex.extract(text, ExtractOptions(sources=("HPO",)))
    assert hpo.concepts == ("C0032227",)
    assert all(m.source == "HPO" for m in hpo.mentions)
    excl = ex.extract(text, ExtractOptions(exclude_cuis=("C0032227",)))
    assert "C0032227" not in excl.concepts


def test_extractor_ambiguous_abbreviation_prefers_procedure_type(ex: Extractor) -> None:
    # "CT" is both computed tomography (T060) and Chlamydia trachomatis (T007)
    assert ex.extract("CT of the chest.").concepts == ("C0040405", "C0817096")
    bacteria = ex.extract("CT of the chest.", ExtractOptions(semantic_types=("Bacterium",)))
    assert bacteria.concepts == ("C0008149",)


def test_extractor_ambiguous_abbreviation_uses_context(ex: Extractor) -> None:
    # MS: mitral stenosis vs multiple sclerosis, both T047; "mitral" in the caption decides
    a = ex.extract("Severe MS with a calcified mitral annulus.")
    assert a.concepts == ("C0026269",)


def test_extractor_unresolvable_ambiguity_keeps_all(ex: Extractor) -> None:
    a = ex.extract("MS.")
    assert set(a.concepts) == {"C0026269", "C0026769"}


def test_extractor_caption_definition_wins(ex: Extractor) -> None:
    text = "Multiple sclerosis (MS). MS plaques near the mitral annulus."
    a = ex.extract(text)
    ms = [m for m in a.mentions if m.text == "MS"]
    assert len(ms) == 2
    assert {m.cui for m in ms} == {"C0026769"}


def test_extractor_negation_flag_and_drop(ex: Extractor) -> None:
    text = "No pleural effusion; lung cancer."
    a = ex.extract(text)
    flags = {m.cui: m.negated for m in a.mentions}
    assert flags == {"C0032227": True, "C0242379": False}
    kept = ex.extract(text, ExtractOptions(include_negated=False))
    assert kept.concepts == ("C0242379",)


def test_extractor_without_mentions_keeps_concepts(ex: Extractor) -> None:
    a = ex.extract("Lung cancer.", ExtractOptions(include_mentions=False))
    assert a.mentions == ()
    assert a.concepts == ("C0242379",)


def test_extractor_approximate_mode_finds_misspellings(ex: Extractor) -> None:
    text = "Right pleural efusion and lung cancer."
    assert "C0032227" not in ex.extract(text).concepts
    a = ex.extract(text, ExtractOptions(mode="approximate", threshold=0.6))
    m = next(m for m in a.mentions if m.cui == "C0032227")
    assert m.text == "pleural efusion"
    assert 0.6 <= m.score < 1.0
    exact = next(m for m in a.mentions if m.cui == "C0242379")
    assert exact.score == 1.0


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (ExtractOptions(mode="fuzzy"), ExtractionError),
        (ExtractOptions(similarity="levenshtein"), ExtractionError),
        (ExtractOptions(threshold=0.0), ExtractionError),
        (ExtractOptions(threshold=1.5), ExtractionError),
        (ExtractOptions(threshold=float("nan")), ExtractionError),
        (ExtractOptions(overlap="first"), ExtractionError),
        (ExtractOptions(profile="nope"), ExtractionError),
        (ExtractOptions(sources=("SNOMEDCT_US",)), ExtractionError),
        (ExtractOptions(semantic_types=("T999",)), SemanticNetworkError),
        (ExtractOptions(semantic_groups=("Disorderz",)), SemanticNetworkError),
    ],
)
def test_extractor_check_options_rejects(
    ex: Extractor, options: ExtractOptions, error: type[Exception]
) -> None:
    with pytest.raises(error):
        ex.check_options(options)
    with pytest.raises(error):
        ex.extract("lung", options)


def test_extractor_unknown_group_suggests_the_close_ones(ex: Extractor) -> None:
    with pytest.raises(SemanticNetworkError) as info:
        ex.check_options(ExtractOptions(semantic_groups=("DISOX",)))
    assert info.value.suggestions == ("DISO",)
    with pytest.raises(SemanticNetworkError) as info:  # nothing close: all the codes
        ex.check_options(ExtractOptions(semantic_groups=("zzzz",)))
    assert len(info.value.suggestions) == 15 and "ANAT" in info.value.suggestions


def test_extractor_cache_key_is_order_insensitive() -> None:
    a = ExtractOptions(semantic_types=("T047", "T033"), sources=("HPO", "ROCO"))
    b = ExtractOptions(semantic_types=("T033", "T047", "T033"), sources=("ROCO", "HPO"))
    assert a.cache_key() == b.cache_key()
    assert a.cache_key() != ExtractOptions(threshold=0.8).cache_key()
    assert ExtractOptions(threshold=0.7).cache_key() == ExtractOptions(threshold=0.70).cache_key()


def test_extractor_search_exact_then_approximate(ex: Extractor) -> None:
    res = ex.search("Pleural effusions")
    assert res[0].cui == "C0032227"
    assert res[0].score == 1.0
    assert res[0].sources == ("HPO",)
    fuzzy = ex.search("pleural efusion", options=ExtractOptions(threshold=0.5))
    assert fuzzy and fuzzy[0].cui == "C0032227" and fuzzy[0].score < 1.0
    with pytest.raises(ExtractionError):
        ex.search("lung", limit=0)


def test_extractor_profiles_listed(ex: Extractor) -> None:
    assert {"none", "rocov2"} <= set(ex.profiles())


def test_extractor_rocov2_profile_infers_modality(ex: Extractor) -> None:
    rocov2 = ExtractOptions(profile="rocov2")
    a = ex.extract("Axial T2-weighted image shows a lung cancer.", rocov2)
    assert "C0024485" in a.concepts  # MRI, from indirect evidence
    assert not any(m.cui == "C0024485" for m in a.mentions)  # inferred, no mention
    b = ex.extract("CT of the chest shows pleural effusion.", rocov2)
    assert b.concepts[0] == "C0040405"
    assert "C0817096" not in b.concepts  # X-ray body regions only with Plain x-ray
    c = ex.extract("Chest X-ray (AP) shows pleural effusion.", rocov2)
    assert set(c.concepts) == {"C1306645", "C0817096", "C1999039", "C0032227"}
    for text, annotation in [
        ("Axial T2-weighted image shows a lung cancer.", a),
        ("CT of the chest shows pleural effusion.", b),
        ("Chest X-ray (AP) shows pleural effusion.", c),
    ]:
        check_annotation(ex.index, text, annotation, rocov2)


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_extractor_profile_inferred_concepts_pass_the_request_filters(
    engine_index_path: Path, engine: str
) -> None:
    """A concept the profile infers without a mention (MRI from "T2-weighted") is reported
    only if the request's filters let it through: ``exclude_cuis`` always wins, the semantic
    types and groups apply as to a mentioned concept, and a sources filter passes no inferred
    concept (no string of it was matched). Nothing is inferred in its place."""
    ex = Extractor(ConceptIndex.load(engine_index_path), engine=engine)
    mri = "C0024485"
    text = "Axial T2-weighted image shows a pleural effusion."
    base = ex.extract(text, ExtractOptions(profile="rocov2"))
    assert base.concepts == ("C0032227", mri) and not any(m.cui == mri for m in base.mentions)
    sab = base.mentions[0].source
    for filters in (
        {"exclude_cuis": (mri,)},
        {"semantic_groups": ("DISO", "ANAT")},
        {"semantic_types": ("T191",)},
        {"sources": (sab,)},
    ):
        opts = ExtractOptions(profile="rocov2", **filters)  # type: ignore[arg-type]
        a = ex.extract(text, opts)
        assert mri not in a.concepts, filters
        assert set(a.concepts) == {m.cui for m in a.mentions}, filters  # none inferred
        check_annotation(ex.index, text, a, opts)
    kept = ex.extract(text, ExtractOptions(profile="rocov2", semantic_groups=("DISO", "PROC")))
    assert mri in kept.concepts  # MRI is a procedure (T060): that group passes it


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_extractor_profile_infers_only_concepts_the_index_has(
    tmp_path_factory: pytest.TempPathFactory, engine: str
) -> None:
    """An index built with disorders only (--semantic-type DISO) has no modality concepts: the
    rocov2 profile's inferred MRI is not reported (it was, and `concept` then could not
    describe it), while the disorder mentioned still is."""
    from conceptsvc.dictionary import DictionaryFilters, UmlsSource, build_dictionary_index
    from conceptsvc.embedded import DEMO_META

    out = tmp_path_factory.mktemp("diso") / "index"
    build_dictionary_index([UmlsSource(DEMO_META)], out,
                           filters=DictionaryFilters(semantic_types=("DISO",)))
    index = ConceptIndex.load(out)
    mri = "C0024485"
    assert index.name_and_types(mri) is None and index.name_and_types("C0032227") is not None
    ex = Extractor(index, engine=engine)
    text = "Axial T2-weighted image shows a pleural effusion."
    for opts in (ExtractOptions(profile="rocov2"),
                 ExtractOptions(profile="rocov2", exclude_cuis=("C0000000",))):
        a = ex.extract(text, opts)
        assert a.concepts == ("C0032227",), (opts, a.concepts)


def test_extractor_warns_once_of_profile_labels_the_index_lacks(
    tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's radiology build (--semantic-type DISO,ANAT,PROC) drops the X-ray
    projections (T082), so rocov2 can never report one: the first plan of that profile says so,
    naming the slot and the concepts, once; the demo index, which has them all, says nothing."""
    import logging

    from conceptsvc.dictionary import DictionaryFilters, UmlsSource, build_dictionary_index
    from conceptsvc.embedded import DEMO_META, demo_index

    out = tmp_path_factory.mktemp("rad") / "index"
    build_dictionary_index([UmlsSource(DEMO_META)], out,
                           filters=DictionaryFilters(semantic_types=("DISO", "ANAT", "PROC")))
    ex = Extractor(ConceptIndex.load(out))
    projections = ("C1999039", "C1996865", "C0205129", "C0205106")
    assert ex.profile_gaps(load_profile("rocov2")) == {"projection": projections}
    text = "Chest X-ray (PA view) showing pleural effusion."
    with caplog.at_level(logging.WARNING, logger="conceptsvc.extractor"):
        ex.extract(text, ExtractOptions(profile="rocov2"))
        ex.extract(text, ExtractOptions(profile="rocov2", exclude_cuis=("C0000001",)))
        ex.extract(text, ExtractOptions(profile="none"))
    said = [r.getMessage() for r in caplog.records if "lacks concepts" in r.getMessage()]
    assert len(said) == 1, said
    assert "profile rocov2" in said[0] and "slot 'projection'" in said[0]
    assert all(c in said[0] for c in projections) and "(4 of 4 members)" in said[0]
    caplog.clear()
    full = Extractor(demo_index())
    assert full.profile_gaps(load_profile("rocov2")) == {}
    with caplog.at_level(logging.WARNING, logger="conceptsvc.extractor"):
        full.extract(text, ExtractOptions(profile="rocov2"))
    assert not [r for r in caplog.records if "lacks concepts" in r.getMessage()]


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_extractor_anatomy_takes_no_context(engine: str) -> None:
    """A body part in a negated phrase is where the finding is not, not what is absent: "no
    fracture of the femur" negated the femur (T023), and --drop-negated dropped it. The
    finding itself is still negated, and the femur stays with negated mentions dropped."""
    from conceptsvc.embedded import demo_index

    ex = Extractor(demo_index(), engine=engine)
    text = "No fracture of the femur. No intracranial hemorrhage."
    a = ex.extract(text, ExtractOptions())
    by_text = {m.text: m for m in a.mentions}
    assert by_text["femur"].semantic_types == ("T023",) and not by_text["femur"].negated
    assert by_text["intracranial hemorrhage"].negated
    dropped = ex.extract(text, ExtractOptions(include_negated=False))
    assert [m.text for m in dropped.mentions] == ["femur"]
    assert dropped.concepts == ("C0015811",)


def test_extractor_offsets_check_rejects_what_the_engine_must_not_do(ex: Extractor) -> None:
    """The shared offsets check (tests/offsets.py) fails on each way a mention can be wrong."""
    text = "Right pleural effusion (PE). PE persists; left pleural efusion."
    approximate = ExtractOptions(mode="approximate", threshold=0.6)
    a = ex.extract(text, approximate)
    check_annotation(ex.index, text, a, approximate)
    defined = next(m for m in a.mentions if m.text == "PE")
    fuzzy = next(m for m in a.mentions if m.score < 1.0)
    # "PE" is pulmonary embolism in the dictionary: only the caption's definition explains it
    assert defined.cui == "C0032227" not in {p.cui for p in ex.index.postings("pe")}

    def fails(*mentions: Mention, concepts: tuple[str, ...] = (), on: str = text) -> None:
        cuis = concepts or tuple(dict.fromkeys(m.cui for m in mentions))
        with pytest.raises(AssertionError):
            check_annotation(ex.index, on, Annotation("", mentions, cuis), approximate)

    fails(replace(fuzzy, start=fuzzy.start + 1, text=text[fuzzy.start + 1 : fuzzy.end]))
    fails(replace(fuzzy, end=fuzzy.end - 7, text=text[fuzzy.start : fuzzy.end - 7]))
    fails(replace(fuzzy, score=fuzzy.score + 0.01))  # not its similarity to any key
    fails(defined, on=text.replace("(PE)", "[PE]"))  # the same mention, no definition
    fails(defined, concepts=(defined.cui, "C0024485"))  # an inferred concept without a profile
    strict = ExtractOptions(mode="approximate", threshold=0.9)
    with pytest.raises(AssertionError):
        check_annotation(ex.index, text, Annotation("", (fuzzy,), (fuzzy.cui,)), strict)


TEXT = st.lists(
    st.sampled_from(
        ["lung", "cancer", "CT", "MS", "(MS)", "multiple", "sclerosis", "no", "pleural",
         "efusion", "effusion", "ＣＴ", "ﬁbrosis", "Haematoma", ",", ".", "X-ray", "é", "US",
         "\u0301", "ﬃ", "  ", "\t", "left ventricle", "dilatation",
         # a short form whose own key is another concept's (pulmonary embolism); a misspelling
         "pleural effusion (PE)", "PE", "pleural efusion"]
    ),
    max_size=30,
).map(" ".join)


@settings(max_examples=100, deadline=None)
@given(
    TEXT,
    st.sampled_from(["exact", "approximate"]),
    st.sampled_from(["longest", "all"]),
    st.sampled_from(["none", "rocov2"]),
)
def test_extractor_offsets_property(
    ex: Extractor, text: str, mode: str, overlap: str, profile: str
) -> None:
    options = ExtractOptions(mode=mode, overlap=overlap, threshold=0.6, profile=profile)
    a = ex.extract(text, options)
    check_annotation(ex.index, text, a, options)


@settings(max_examples=25, deadline=None)
@given(st.lists(TEXT, max_size=8), st.integers(min_value=1, max_value=5))
def test_extractor_batch_size_does_not_change_results(
    ex: Extractor, texts: list[str], size: int
) -> None:
    items = [(f"id{i}", t) for i, t in enumerate(texts)]
    one = [ex.extract(t, id=i) for i, t in items]
    batched = []
    for k in range(0, len(items), size):
        batched.extend(ex.extract_batch(items[k : k + size]))
    assert batched == one


def test_extractor_exported_lazily_from_package() -> None:
    import conceptsvc

    assert conceptsvc.Extractor is Extractor
    assert conceptsvc.ExtractOptions is ExtractOptions
    with pytest.raises(AttributeError):
        _ = conceptsvc.NotAThing  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_extractor_engines_keep_the_phrase_and_negation_rules(
    engine_index_path: Path, engine: str
) -> None:
    # The rules' one source is Python (matcher.BREAK_CHARS, negation.SENTENCE_BREAKS, ...);
    # both engines follow it ("auto" is the compiled one when the extension is built).
    ex = Extractor(ConceptIndex.load(engine_index_path), engine=engine)
    options = ExtractOptions(overlap="all")
    def lung_cancer(text: str) -> bool:
        return any(m.cui == "C0242379" for m in ex.extract(text, options).mentions)

    for c in ",;:.!?()[]{}":  # punctuation that ends a phrase
        assert not lung_cancer(f"lung{c} cancer"), c
    for c in "-/":  # word-internal
        assert lung_cancer(f"lung{c}cancer"), c
    # a negation scope ends at sentence punctuation, not at a comma (the lung, a place in
    # the body, takes no context either way)
    def negated(text: str) -> list[tuple[str, bool]]:
        return [(m.text, m.negated) for m in ex.extract(text, options).mentions]

    assert negated("No pleural effusion, lung cancer") == [
        ("pleural effusion", True), ("lung", False), ("lung cancer", True)
    ]
    for c in ".;:!?":
        assert negated(f"No pleural effusion{c} lung cancer") == [
            ("pleural effusion", True), ("lung", False), ("lung cancer", False)
        ], c


def test_extractor_engine_reports_which_runs(engine_index_path: Path) -> None:
    index = ConceptIndex.load(engine_index_path)
    assert Extractor(index, engine="reference").engine == "reference"
    assert Extractor(index).engine in ("compiled", "reference")
    with pytest.raises(ExtractionError, match="engine 'fast' is not one of"):
        Extractor(index, engine="fast")


# Issue 18: thresholds near the bottom of (0, 1] crashed approximate extraction (OverflowError
# in approximate.size_bounds). Captions are dictionary strings, misspelt, between words that
# are not in it.
_STRINGS = sorted({
    line.split("\t")[3]
    for line in (Path(__file__).parent / "fixtures" / "engine_dictionary.tsv")
    .read_text(encoding="utf-8").splitlines()
    if line and not line.startswith("#")
})
_FILLER = ("left", "showing", "the", "no", "with", "axial", "mass", "of", "and")


@st.composite
def _captions(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        s = draw(st.sampled_from(_STRINGS))
        if len(s) > 3 and draw(st.booleans()):  # drop, double or swap one character
            p = draw(st.integers(1, len(s) - 2))
            s = draw(st.sampled_from([s[:p] + s[p + 1 :], s[:p] + s[p] + s[p:],
                                      s[:p] + s[p + 1] + s[p] + s[p + 2 :]]))
        parts.append(s)
        parts.extend(draw(st.lists(st.sampled_from(_FILLER), max_size=2)))
    return " ".join(parts) + draw(st.sampled_from(["", ".", " (arrows)."]))


_REFERENCE_ALPHA = 1e-4  # below the least positive similarity any window here can have


@pytest.fixture(scope="module")
def engines(engine_index_path: Path) -> tuple[Extractor, Extractor]:
    index = ConceptIndex.load(engine_index_path)
    return Extractor(index), Extractor(index, engine="reference")


@settings(max_examples=150, deadline=None)
@given(
    _captions(),
    st.sampled_from(["jaccard", "cosine", "dice", "overlap"]),
    st.one_of(
        st.floats(min_value=0, max_value=1, exclude_min=True, allow_subnormal=True),
        st.sampled_from([5e-324, 1e-310, 2.2250738585072014e-308, 1e-200, 1e-162]),
    ),
    st.sampled_from(["longest", "best_score", "all"]),
)
def test_issue_18_every_threshold_in_the_unit_interval_extracts(
    engines: tuple[Extractor, Extractor], text: str, measure: str, alpha: float, overlap: str
) -> None:
    fast, ref = engines
    o = ExtractOptions(mode="approximate", similarity=measure, threshold=alpha, overlap=overlap)
    a = fast.extract(text, o)
    check_annotation(fast.index, text, a, o)  # every approximate mention reaches alpha
    assert ref.extract(text, o) == a
    if alpha < _REFERENCE_ALPHA:
        # Every positive similarity here is far above 1e-4 (windows and keys have fewer than
        # 100 trigrams), so any smaller threshold admits exactly the same keys.
        assert a == fast.extract(text, replace(o, threshold=_REFERENCE_ALPHA))
    fast.search(text, options=o)


def test_extractor_weighted_memo_evicts_oldest_by_weight_and_skips_heavy_entries() -> None:
    memo: WeightedMemo[str, str] = WeightedMemo(10, 100, lambda k, v: len(v))
    for key, n in (("a", 25), ("b", 20), ("c", 25), ("d", 20)):
        assert memo.put(key, key * n)
    assert memo.size_bytes == 90 and len(memo) == 4
    # 15 more would pass 100 bytes: the oldest ("a", 25) goes, nothing else
    assert memo.put("e", "e" * 15)
    assert memo.get("a") is None and [memo.get(k) is not None for k in "bcde"] == [True] * 4
    assert memo.size_bytes == 80
    assert memo.put("f", "f" * 25)  # evicts "b" (20)
    assert memo.get("b") is None and memo.size_bytes == 85 and len(memo) == 4
    # over a quarter of the bound: not kept, and nothing is evicted for it
    assert not memo.put("g", "g" * 26)
    assert memo.get("g") is None and memo.size_bytes == 85 and len(memo) == 4
    # replacing a key re-weighs it; an explicit weight wins over the weigh function
    assert memo.put("c", "c", weight=5) and memo.size_bytes == 65 and memo.get("c") == "c"
    memo.clear()
    assert len(memo) == 0 and memo.size_bytes == 0
    # the entry bound holds whatever the weights
    few: WeightedMemo[int, int] = WeightedMemo(2, 1000, lambda k, v: 1)
    for k in range(3):
        few.put(k, k)
    assert len(few) == 2 and few.get(0) is None and few.get(2) == 2 and few.size_bytes == 2
    with pytest.raises(ValueError):
        WeightedMemo(0, 10, lambda k, v: 1)


def test_issue_18_plan_cache_holds_at_most_its_byte_bound(ex: Extractor) -> None:
    """Issue 18, item 5: 120 distinct 10,000-CUI option sets through one extractor. The plan
    cache was bounded by count only (256 plans), so it kept all of them (≈ 143 MB held, by
    the tracemalloc measure below); now it keeps at most PLAN_CACHE_BYTES (64 MiB) of option
    sets. Held memory is measured with tracemalloc, independently of the cache's own
    accounting, which must agree with it. (Since the thirteenth session the 9,999 CUIs the
    index lacks are dropped from the plans, so the 120 sets share two; plans of known CUIs
    are held to the bound by test_extractor_plan_memos_count_in_the_plan_cache_bound.)"""
    base = ex.extract("lung and heart").concepts
    assert len(base) == 2
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in range(120):
            cuis = tuple(f"C{k:03d}{i:06d}" for i in range(9_999))
            options = ExtractOptions(exclude_cuis=(*cuis, base[k % 2]))
            assert ex.extract("lung and heart", options).concepts == (base[1 - k % 2],)
            del cuis, options
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 1.25 * PLAN_CACHE_BYTES
    plans = ex.plan_cache
    assert 0 < plans.size_bytes <= PLAN_CACHE_BYTES and len(plans) < 120
    # what is really held: the cached plans and the last request's plan, within 25 % of
    # the accounting (the weights are measured estimates)
    assert held < 1.25 * (plans.size_bytes + options_weight(ex._last[0] or ExtractOptions()))
    assert held > 0.75 * plans.size_bytes


def test_extractor_excluded_cuis_the_index_lacks_make_no_plan_of_their_own(ex: Extractor) -> None:
    """An excluded CUI that is not in the index excludes nothing, so it does not change the
    plan: option sets that differ only in such CUIs share one (each made a plan with memos of
    its own before: 256 of them held 560 MiB of a worker). Known exclusions still apply, and
    a bad one is still refused."""
    base = ex.extract("lung and heart")
    heart = base.concepts[1]
    plans = len(ex.plan_cache)
    for k in range(40):
        o = ExtractOptions(exclude_cuis=(f"C91{k:05d}",))
        assert ex.extract("lung and heart", o) == base
        o = ExtractOptions(exclude_cuis=(f"C91{k:05d}", heart))
        assert ex.extract("lung and heart", o).concepts == base.concepts[:1]
    assert len(ex.plan_cache) <= plans + 1  # the plan excluding `heart`, if it is new
    o = ExtractOptions(exclude_cuis=("C9100000", heart))
    assert ex.plan_options(o) == ExtractOptions(exclude_cuis=(heart,))
    assert ex.plan_options(ExtractOptions(exclude_cuis=("C9100000",))) == ExtractOptions()
    with pytest.raises(ExtractionError, match="non-empty"):
        ex.extract("lung", ExtractOptions(exclude_cuis=("C9100000", " ")))


def test_extractor_plan_memos_count_in_the_plan_cache_bound(
    demo_index_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan's memos (keys → accepted concepts) grow with the keys its captions reach, and
    they count in the plan cache's byte bound now: before, a plan weighed its option sets
    only, so plans of distinct exclusions, each with memos full of the dictionary's keys,
    were all kept (≈ 2 MB each on the demo dictionary). The bound is lowered to 16 MiB so that
    a dozen plans pass it; held memory is measured by tracemalloc."""
    bound = 16 << 20
    monkeypatch.setattr("conceptsvc.extractor.PLAN_CACHE_BYTES", bound)
    index = ConceptIndex.load(demo_index_dir)
    demo = Extractor(index)
    captions: list[str] = []
    part: list[str] = []
    for key in index.keys():
        part.append(key)
        if len(part) == 500:
            captions.append(" ; ".join(part))
            part = []
    captions.append(" ; ".join(part))
    for caption in captions:  # the extractor's shared memos, filled before measuring
        demo.extract(caption)
    cuis = [c for c in index.cuis[:12]]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for cui in cuis:
            options = ExtractOptions(exclude_cuis=(cui,))
            for caption in captions:
                demo.extract(caption, options)
        demo.extract("lung")  # (the last plan is weighed when the extractor leaves it)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    plans = demo.plan_cache
    assert plans.size_bytes <= bound and len(plans) < len(cuis)
    assert held < 1.25 * bound, held


# -- issue 16: the Python API takes what a user passes, or says what the right call is -----------
def test_issue_16_extract_options_take_lists_sets_and_a_single_name(ex: Extractor) -> None:
    as_tuple = ExtractOptions(semantic_groups=("DISO",), sources=("HPO", "ROCO"))
    for groups, sources in (
        (["DISO"], ["HPO", "ROCO"]),
        ("DISO", {"ROCO", "HPO"}),
        (("DISO",), frozenset({"HPO", "ROCO"})),
        (iter(["DISO"]), ("HPO", "ROCO")),
    ):
        opts = ExtractOptions(semantic_groups=groups, sources=sources)  # type: ignore[arg-type]
        assert opts == as_tuple and hash(opts) == hash(as_tuple)
        assert opts.cache_key() == as_tuple.cache_key()
        assert opts.semantic_groups == ("DISO",) and opts.sources == ("HPO", "ROCO")
    # one name is one name, commas included (semantic type names contain them)
    organ = "Body Part, Organ, or Organ Component"
    assert ExtractOptions(semantic_types=organ).semantic_types == (organ,)  # type: ignore[arg-type]
    # the options work as the engine's (hashed) plan key, and filter as the tuple form does
    text = "Pleural effusion and cardiomegaly on chest CT."
    listed = ExtractOptions(semantic_groups=["DISO"])  # type: ignore[arg-type]
    assert ex.extract(text, listed) == ex.extract(text, ExtractOptions(semantic_groups=("DISO",)))
    assert ex.extract(text, listed).concepts  # not an empty answer that would hide a bug
    with pytest.raises(AttributeError):
        listed.semantic_groups = ("ANAT",)  # type: ignore[misc]


@pytest.mark.parametrize("bad", [[1, 2], 5, b"DISO", {"DISO": 1}, ["DISO", None]])
def test_issue_16_extract_options_reject_what_is_not_names(bad: object) -> None:
    with pytest.raises(ExtractArgumentError) as info:
        ExtractOptions(semantic_groups=bad)  # type: ignore[arg-type]
    assert info.value.code == "E502" and isinstance(info.value, TypeError)
    assert 'ExtractOptions(semantic_groups=("DISO", "ANAT"))' in str(info.value)
    assert repr(bad) in str(info.value)


def test_issue_16_extract_batch_takes_plain_texts_pairs_or_a_mapping(ex: Extractor) -> None:
    texts = ["CT chest", "Pleural effusion.", "nothing"]
    plain = ex.extract_batch(texts)
    assert [a.id for a in plain] == ["0", "1", "2"]
    assert plain == [ex.extract(t, id=str(i)) for i, t in enumerate(texts)]
    assert plain[1].concepts
    pairs = [("a", "CT chest"), ("b", "Pleural effusion.")]
    assert ex.extract_batch(pairs) == [ex.extract(t, id=i) for i, t in pairs]
    assert ex.extract_batch(dict(pairs)) == ex.extract_batch(pairs)
    assert [a.id for a in ex.extract_batch([(7, "CT chest")])] == ["7"]  # type: ignore[list-item]
    assert ex.extract_batch([]) == []


@pytest.mark.parametrize(
    ("items", "says"),
    [
        ("CT chest", "not one string ('CT chest'); use extract(text)"),
        (["CT chest", ("b", "MRI")], "item 0 is a text ('CT chest') but others are (id, text)"),
        ([("a", "CT chest"), "MRI"], "item 1 is a text ('MRI')"),
        ([("a", "b", "c")], "item 0 is ('a', 'b', 'c')"),
        ([("a", None)], "item 0 is ('a', None)"),
        (42, "got int"),
    ],
)
def test_issue_16_extract_batch_rejects_odd_items_showing_both_calls(
    ex: Extractor, items: object, says: str
) -> None:
    with pytest.raises(ExtractArgumentError) as info:
        ex.extract_batch(items)  # type: ignore[arg-type]
    text = str(info.value)
    assert says in text
    assert 'extract_batch(["CT of the chest", "MRI of the brain"])' in text
    assert 'extract_batch([("cap1", "CT of the chest"), ("cap2", "MRI of the brain")])' in text


_ISSUE_17_CONCEPTS = {
    "C0032326": "pneumothorax", "C0817096": "chest", "C1306645": "radiograph",
    "C0040405": "CT", "C0034065": "pulmonary embolism", "C0032227": "pleural effusion",
    "C0013404": "shortness of breath", "C0700590": "diaphoresis",
}
# caption → {mention text: negated}
_ISSUE_17_CASES = {
    "No evidence of pneumothorax on the chest radiograph.": {
        "pneumothorax": True, "chest": False, "radiograph": False,
    },
    "CT of the chest excluded pulmonary embolism": {
        "CT": False, "chest": False, "pulmonary embolism": True,
    },
    "no pleural effusion, pneumothorax present": {"pleural effusion": True, "pneumothorax": False},
    "Denies any shortness of breath or DIAPHORESIS.": {
        "shortness of breath": True, "DIAPHORESIS": True,
    },
}


@pytest.fixture(scope="module")
def issue_17_index(tmp_path_factory: pytest.TempPathFactory) -> ConceptIndex:
    from conceptsvc.index import IndexBuilder

    builder = IndexBuilder(source_release="issue-17")
    for cui, name in _ISSUE_17_CONCEPTS.items():
        builder.set_concept(cui, preferred_name=name, semantic_types=["T047"])
        builder.add_term(cui, name, sab="TEST", tty="PT", flags=0)
    return ConceptIndex.load(builder.write(tmp_path_factory.mktemp("issue17") / "index"))


@pytest.mark.parametrize("engine", ["reference", "compiled"])
@pytest.mark.parametrize("text", sorted(_ISSUE_17_CASES))
def test_issue_17_negation_scope_in_the_extractor(
    issue_17_index: ConceptIndex, engine: str, text: str
) -> None:
    from conceptsvc.normalize import SPEEDUPS

    if engine == "compiled" and SPEEDUPS is None:
        pytest.skip("the compiled extension is not built")
    ex = Extractor(issue_17_index, engine=engine)
    a = ex.extract(text, ExtractOptions(include_negated=True))
    assert {m.text: m.negated for m in a.mentions} == _ISSUE_17_CASES[text]
    # context changes flags, never offsets: each mention points at its own text
    for m in a.mentions:
        assert text[m.start : m.end] == m.text
    check_annotation(issue_17_index, text, a)
    kept = ex.extract(text, ExtractOptions(include_negated=False))
    assert kept.mentions == tuple(m for m in a.mentions if not m.negated)
    assert kept.concepts == tuple(dict.fromkeys(m.cui for m in kept.mentions))


# -- ConText's properties (issue 17) ----------------------------------------------------------
@pytest.fixture(scope="module")
def context_ex(tmp_path_factory: pytest.TempPathFactory) -> Extractor:
    b = IndexBuilder(source_release="context")
    for cui, name in (("C0032285", "pneumonia"), ("C0038454", "stroke"),
                      ("C0009402", "colon cancer"), ("C0032227", "pleural effusion"),
                      ("C0817096", "chest")):
        b.set_concept(cui, preferred_name=name, semantic_types=["T047"])
        b.add_term(cui, name, sab="TEST", tty="PT")
    return Extractor(ConceptIndex.load(b.write(tmp_path_factory.mktemp("context") / "ix")))


def _props(a: Annotation) -> dict[str, tuple[bool, bool, bool, str]]:
    return {m.text: (m.negated, m.hypothetical, m.historical, m.experiencer) for m in a.mentions}


def test_issue_17_mentions_carry_context_and_hypothetical_ones_can_be_dropped(
    context_ex: Extractor,
) -> None:
    text = ("Rule out pneumonia. History of stroke. Family history of colon cancer. "
            "No pleural effusion. Chest")
    assert _props(context_ex.extract(text)) == {
        "pneumonia": (False, True, False, "patient"),
        "stroke": (False, False, True, "patient"),
        "colon cancer": (False, False, False, "other"),
        "pleural effusion": (True, False, False, "patient"),
        "Chest": (False, False, False, "patient"),
    }
    dropped = context_ex.extract(text, ExtractOptions(include_hypothetical=False))
    assert "C0032285" not in dropped.concepts and "pneumonia" not in _props(dropped)
    assert len(dropped.mentions) == 4
    both = context_ex.extract(text, ExtractOptions(include_hypothetical=False,
                                                   include_negated=False))
    assert sorted(_props(both)) == ["Chest", "colon cancer", "stroke"]


def test_issue_17_include_hypothetical_unset_follows_the_profile(context_ex: Extractor) -> None:
    # both shipped profiles keep hypothetical mentions (ROCOv2's gold ignores context:
    # dropping them scores lower on the validation set, see BENCHMARKS.md)
    for name in ("none", "rocov2"):
        assert load_profile(name).include_hypothetical is True
        assert context_ex._plan(ExtractOptions(profile=name)).include_hypothetical is True
    strict = Profile(ProfileModel(name="strict", description="d", include_hypothetical=False))
    assert strict.include_hypothetical is False
    with pytest.raises(ExtractionError, match="include_hypothetical"):
        ExtractOptions(include_hypothetical="no").validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    ["Rule out pneumonia in the chest.", "History of stroke; chest clear.",
     "Mother had colon cancer, if pneumonia then chest.", "no pleural effusion, chest."],
)
def test_issue_17_offsets_are_untouched_by_context(context_ex: Extractor, text: str) -> None:
    # the same spans, offsets and concepts whether or not the triggers are there: a trigger
    # replaced by filler of its length changes the flags only
    plain = text
    for trigger in ("Rule out", "History of", "Mother had", "if", "no"):
        plain = plain.replace(trigger, "x" * len(trigger))
    got, base = context_ex.extract(text), context_ex.extract(plain)
    assert [(m.cui, m.start, m.end, m.text) for m in got.mentions] == [
        (m.cui, m.start, m.end, m.text) for m in base.mentions
    ]
    assert any(_props(got)[m.text] != _props(base)[m.text] for m in got.mentions)
    check_annotation(context_ex.index, text, got, ExtractOptions())


def test_extractor_exclude_cuis_in_any_case(ex: Extractor) -> None:
    caption = "Pleural effusion."
    assert "C0032227" in ex.extract(caption).concepts
    assert "C0032227" not in ex.extract(caption, ExtractOptions(exclude_cuis="c0032227")).concepts


def test_extractor_extract_id_is_a_string_as_in_extract_batch(ex: Extractor) -> None:
    a = ex.extract("CT chest", id=5)  # type: ignore[arg-type]
    assert a.id == "5" and a == ex.extract_batch([(5, "CT chest")])[0]  # type: ignore[list-item]
    for bad in (None, 1.5, True):
        with pytest.raises(ExtractArgumentError, match="takes a string"):
            ex.extract("CT chest", id=bad)  # type: ignore[arg-type]
