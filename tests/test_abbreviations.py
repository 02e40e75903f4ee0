from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conceptsvc.abbreviations import MAX_CANDIDATES, AmbiguityResolver, find_definitions
from conceptsvc.index import FLAG_ABBREVIATION, ConceptIndex, IndexBuilder


def defs(text: str) -> list[tuple[str, str]]:
    return [(text[d.short_start : d.short_end], text[d.long_start : d.long_end]) for d in
            find_definitions(text)]


def test_abbreviations_schwartz_hearst_basic() -> None:
    assert defs("Contrast-enhanced computed tomography (CT) of the chest.") == [
        ("CT", "computed tomography")
    ]
    assert defs("Axial fluid-attenuated inversion recovery (FLAIR) image") == [
        ("FLAIR", "fluid-attenuated inversion recovery")
    ]
    assert defs("magnetic resonance imaging (MRI) and more") == [
        ("MRI", "magnetic resonance imaging")
    ]


def test_abbreviations_first_letter_starts_a_word() -> None:
    # the C of "CT" must start a word: "contrast" cannot be skipped into
    assert defs("right coronary artery (RCA) stenosis") == [("RCA", "right coronary artery")]


def test_abbreviations_reverse_pattern() -> None:
    assert defs("an MPR (multiplanar reconstruction) image") == [
        ("MPR", "multiplanar reconstruction")
    ]


def test_abbreviations_rejects_non_definitions() -> None:
    assert defs("Mass in the liver (arrow).") == []
    assert defs("Chest X-ray (A) and CT (B).") == []
    assert defs("Lesion (red arrows) and (2)") == []
    assert defs("unclosed (CT") == []


def test_abbreviations_offsets_and_semicolons() -> None:
    text = "pulmonary embolism (PE; arrow)"
    (d,) = find_definitions(text)
    assert text[d.short_start : d.short_end] == "PE"
    assert text[d.long_start : d.long_end] == "pulmonary embolism"


def test_issue_19_long_form_offsets_with_runs_of_whitespace() -> None:
    # The forward pattern looks for the long form in the clause's words joined by single
    # spaces; its offset in that string is not its offset in a caption with two spaces, a tab
    # or a space after the clause break (found by test_abbreviations_offsets_property).
    text = "Findings.  Computed  tomography (CT) of the chest"
    assert defs(text) == [("CT", "Computed  tomography")]
    assert defs("C \t computed\ttomography (CT)") == [("CT", "computed\ttomography")]



def test_abbreviations_reverse_long_form_starts_after_any_whitespace() -> None:
    # Found by the scispacy reference check (ROCOv2 validation): the long form's first word
    # was looked for after a plain space only, so with a thin space before it the long form
    # started at the parenthesis ("MPGR = multiplanar gradient-recalled"). The words are
    # str.split()'s, so every Unicode whitespace character separates them.
    text = "Axi MPGR (MPGR\u2009=\u2009multiplanar gradient-recalled) image"
    assert defs(text) == [("MPGR", "multiplanar gradient-recalled")]
    for space in ("\u00a0", "\t", "\u3000", "\u202f"):
        text = f"an MPR (see{space}multiplanar reconstruction) image"
        assert defs(text) == [("MPR", "multiplanar reconstruction")], repr(space)


def test_abbreviations_reverse_long_form_never_contains_short_form() -> None:
    # Found by the scispacy reference check: "RA (... RA = 25 cm2)" read "RA = 25 cm2" as
    # the long form of RA. Schwartz & Hearst reject a long form holding the short form as a
    # word, and the forward pattern already did.
    assert defs("The RA (right atrial area RA = 25 cm2) is enlarged") == []
    assert defs("an enlarged RA (rest of the RA area) here") == []
    # the short form inside a longer word is no reason to reject (the shortest long form)
    assert defs("an MPR (multiplanar MPRAGE reconstruction) image") == [
        ("MPR", "MPRAGE reconstruction")
    ]

# Long-form words with distinct initials: the short form is their initials, and Schwartz–Hearst
# then has exactly one word start for the short form's first letter (a repeated initial lets it
# settle on a shorter long form, correctly). Each word has five letters or more, so that two of
# them are too long to be read as a short form in the reverse pattern.
_LONG_WORDS = (
    "computed", "tomography", "magnetic", "resonance", "imaging", "pulmonary", "embolism",
    "fluid", "attenuated", "inversion", "recovery", "right", "coronary", "artery", "venous",
    "thrombosis", "bilateral", "hypertrophy",
)
_NOISE = st.text(alphabet="abcdeCTMRI ()-;,.", max_size=40)


@st.composite
def defined(draw: st.DrawFn) -> tuple[str, str, str, bool]:
    """(caption, short form, long form, forward): "long form (SF)" or "SF (long form)" between
    random text, as a caption writes them."""
    words = draw(st.lists(st.sampled_from(_LONG_WORDS), min_size=2, max_size=4,
                          unique_by=lambda w: w[0]))
    long = " ".join(draw(st.sampled_from([str.lower, str.title]))(w) for w in words)
    short = "".join(w[0] for w in words).upper()
    forward = draw(st.booleans())
    pair = f"{long} ({short})" if forward else f"{short} ({long})"
    return f"{draw(_NOISE)} {pair}{draw(_NOISE)}", short, long, forward


@given(defined())
def test_abbreviations_offsets_property(case: tuple[str, str, str, bool]) -> None:
    text, short, long, forward = case
    found = find_definitions(text)
    assert found  # the property below has something to hold for
    for d in found:
        assert text[d.short_start : d.short_end] == d.short
        assert 0 <= d.long_start < d.long_end <= len(text)
        assert d.long_end <= d.short_start or d.short_end <= d.long_start
    pairs = {(d.short, text[d.long_start : d.long_end]) for d in found}
    assert (short, long) in pairs, (text, "forward" if forward else "reverse", found)


@pytest.fixture(scope="module")
def index(engine_index_path: Path) -> ConceptIndex:
    return ConceptIndex.load(engine_index_path)


def test_abbreviations_resolver_order(index: ConceptIndex) -> None:
    types = {"C0026269": ("T047",), "C0026769": ("T047",), "C0040405": ("T060",),
             "C0008149": ("T007",)}
    r = AmbiguityResolver(index, type_preference=("T060", "T047", "T007"),
                          priors={"C0026769": 0.5})
    empty: frozenset[str] = frozenset()
    # 1. definition beats everything
    assert r.choose(["C0040405", "C0008149"], types, context=empty, own_tokens=empty,
                    defined=frozenset({"C0008149"})) == ["C0008149"]
    # 2. context beats type preference and priors
    ctx = frozenset({"mitral", "annulus"})
    assert r.choose(["C0026269", "C0026769"], types, context=ctx,
                    own_tokens=frozenset({"ms"})) == ["C0026269"]
    # 3. type preference
    assert r.choose(["C0008149", "C0040405"], types, context=empty,
                    own_tokens=empty) == ["C0040405"]
    # 4. prior decides between equal types without context
    assert r.choose(["C0026269", "C0026769"], types, context=empty,
                    own_tokens=empty) == ["C0026769"]


def test_abbreviations_resolver_keeps_ties(index: ConceptIndex) -> None:
    types = {"C0026269": ("T047",), "C0026769": ("T047",)}
    r = AmbiguityResolver(index)
    empty: frozenset[str] = frozenset()
    assert sorted(r.choose(["C0026769", "C0026269"], types, context=empty,
                           own_tokens=empty)) == ["C0026269", "C0026769"]


# -- the ranking at bounded cost (issue 13, item 4) ---------------------------------------------

_VOCAB = ["mitral", "valve", "stenosis", "sclerosis", "multiple", "lung", "mass", "artery"]


@pytest.fixture(scope="module")
def ranked_index(tmp_path_factory: pytest.TempPathFactory) -> ConceptIndex:
    """200 concepts sharing the key "ms", each with a second string of two vocabulary words,
    one of 7 types."""
    b = IndexBuilder(source_release="ranking-test")
    for k in range(200):
        cui = f"C9{k:07d}"
        words = f"{_VOCAB[k % 8]} {_VOCAB[(k * 3 + 1) % 8]} {k}"
        b.set_concept(cui, preferred_name=words, semantic_types=(f"T0{40 + k % 7}",))
        b.add_term(cui, words, sab="X", tty="PT")
        b.add_term(cui, "ms", sab="X", tty="AB", flags=FLAG_ABBREVIATION)
    return ConceptIndex.load(b.write(tmp_path_factory.mktemp("ranked") / "ix"))


def brute_force_choose(r: AmbiguityResolver, index: ConceptIndex, cuis: list[str],
                       types: dict[str, tuple[str, ...]], prefs: list[str],
                       priors: dict[str, float], ctx: frozenset[str]) -> list[str]:
    """The documented rule, spelled out: the shortlist (64 best by type rank, prior, CUI),
    then (−shared context words, type rank, −prior), ties kept, in the given order."""
    rank = {t: i for i, t in enumerate(prefs)}

    def type_rank(c: str) -> int:
        return min((rank.get(t, len(prefs)) for t in types[c]), default=len(prefs))

    short = sorted(cuis, key=lambda c: (type_rank(c), -priors.get(c, 0.0), c))
    short = short[:MAX_CANDIDATES]
    vocab = {c: {w for p in index.concept_postings(c) for w in p.string.split()} for c in short}
    full = {c: (-len(ctx & vocab[c]), type_rank(c), -priors.get(c, 0.0)) for c in short}
    best = min(full.values())
    return [c for c in cuis if c in full and full[c] == best]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_abbreviations_ranking_equals_brute_force(ranked_index: ConceptIndex,
                                                  data: st.DataObject) -> None:
    all_cuis = [f"C9{k:07d}" for k in range(200)]
    cuis = data.draw(st.lists(st.sampled_from(all_cuis), min_size=2, max_size=120, unique=True))
    prefs = data.draw(st.lists(st.sampled_from([f"T0{40 + k}" for k in range(7)]), unique=True))
    priors = data.draw(st.dictionaries(st.sampled_from(all_cuis), st.sampled_from([0.1, 0.5])))
    ctx = frozenset(data.draw(st.lists(st.sampled_from([*_VOCAB, "other"]), max_size=4)))
    types = {c: ranked_index.name_and_types(c)[1] for c in all_cuis}  # type: ignore[index]
    r = AmbiguityResolver(ranked_index, type_preference=prefs, priors=priors)
    got = r.choose(cuis, types, context=ctx | {"ms"}, own_tokens=frozenset({"ms"}))
    assert got == brute_force_choose(r, ranked_index, cuis, types, prefs, priors, ctx)
    ranking = r.ranking(cuis, types)
    assert len(ranking.cuis) == min(len(cuis), MAX_CANDIDATES)
    assert ranking.best(ctx) == got  # the memoised form answers the same


def test_abbreviations_shortlist_is_the_best_64(ranked_index: ConceptIndex) -> None:
    all_cuis = [f"C9{k:07d}" for k in range(200)][::-1]
    types = {c: ranked_index.name_and_types(c)[1] for c in all_cuis}  # type: ignore[index]
    prefs = ["T042", "T045"]
    r = AmbiguityResolver(ranked_index, type_preference=prefs, priors={"C90000199": 0.5})
    short = r.shortlist(all_cuis, types)
    # the 57 of types T042 and T045, then C90000199 (T043, the only prior), then the lowest
    # CUIs of the others; in the given order
    want = {c for c in all_cuis if types[c] in (("T042",), ("T045",))}
    rest = sorted(c for c in all_cuis if c not in want and c != "C90000199")
    want |= {"C90000199", *rest[: MAX_CANDIDATES - len(want) - 1]}
    assert len(want) == MAX_CANDIDATES and short == [c for c in all_cuis if c in want]
    for ctx in (frozenset(), frozenset({"lung"}), frozenset({"mitral", "valve"})):
        got = r.choose(all_cuis, types, context=ctx, own_tokens=frozenset())
        assert got == brute_force_choose(r, ranked_index, all_cuis, types, prefs,
                                         {"C90000199": 0.5}, ctx)
