from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conceptsvc.dictionary import term_flags
from conceptsvc.index import FLAG_CASE_SENSITIVE, ConceptIndex, IndexBuilder
from conceptsvc.matcher import MIN_MATCH_CHARS, ExactMatcher, same_case
from conceptsvc.normalize import STOPWORDS, tokenize_spans


@pytest.fixture(scope="module", params=["prefix-table", "first-token-max"])
def matcher(engine_index_path: Path, request: pytest.FixtureRequest) -> ExactMatcher:
    """Both matching strategies: the prefix table (small indexes) and first_token_max (large)."""
    small = request.param == "prefix-table"
    return ExactMatcher(ConceptIndex.load(engine_index_path, materialize=small))


def windows(m: ExactMatcher, text: str) -> list[tuple[str, set[str]]]:
    norms, starts, ends = tokenize_spans(text)
    out = []
    for match in m.match(text, norms, starts, ends):
        surface = text[starts[match.start_tok] : ends[match.end_tok - 1]]
        out.append((surface, {p.cui for p in match.postings}))
    return out


def test_matcher_reports_nested_windows(matcher: ExactMatcher) -> None:
    found = windows(matcher, "Axial image shows lung cancer.")
    assert ("lung cancer", {"C0242379"}) in found
    assert ("lung", {"C0024109"}) in found


def test_matcher_normalises_both_sides(matcher: ExactMatcher) -> None:
    assert ("Haematomas", {"C0018944"}) in windows(matcher, "Haematomas (arrows)")
    assert ("tumours", {"C0027651"}) in windows(matcher, "two tumours")
    assert ("X-ray", {"C1306645"}) in windows(matcher, "Chest X-ray.")


def test_matcher_two_letter_abbreviations_need_capitals(matcher: ExactMatcher) -> None:
    assert ("CT", {"C0040405", "C0008149"}) in windows(matcher, "CT of the chest")
    assert not [w for w in windows(matcher, "ct of the chest") if w[0] == "ct"]
    assert not [w for w in windows(matcher, "Ct of the chest") if w[0] == "Ct"]


def test_matcher_case_sensitive_postings(matcher: ExactMatcher) -> None:
    assert ("US", {"C0041618"}) in windows(matcher, "US of the abdomen")
    assert not [w for w in windows(matcher, "let us see") if w[0] == "us"]


def test_matcher_rejects_stopword_only_windows(matcher: ExactMatcher) -> None:
    # "no" is a dictionary string of C1266909 but a stopword: never a match on its own
    assert not [w for w in windows(matcher, "no effusion") if w[0] == "no"]
    # "in" is a stopword, but "IN" is a case-sensitive string of Indium
    assert not [w for w in windows(matcher, "in the lung") if w[0] == "in"]
    assert ("IN", {"C0021261"}) in windows(matcher, "IN labelled leukocytes")


def test_matcher_rejects_single_letters(matcher: ExactMatcher) -> None:
    # "B" is a dictionary string of Boron, a case-sensitive abbreviation: every other rule
    # accepts it written in capitals, as they accept "AP"; only its length keeps it out.
    assert {p.cui for p in matcher.index.postings("b")} == {"C0006030"}
    assert ("AP", {"C1999039"}) in windows(matcher, "(A) (AP) X T")
    found = windows(matcher, "(A) (B) X T; B and Boron")
    assert ("Boron", {"C0006030"}) in found
    assert [w for w in found if len(w[0]) < 2] == []
    # a one-letter token inside a longer key is no panel label
    assert ("X-ray", {"C1306645"}) in windows(matcher, "(B) X-ray")


def test_matcher_does_not_cross_phrase_punctuation(matcher: ExactMatcher) -> None:
    # (windows are compared by concept: their surface keeps the punctuation)
    for text in ("the lung. Cancer", "lung (cancer)", "lung, cancer", "lung; cancer"):
        assert not [w for w in windows(matcher, text) if "C0242379" in w[1]], text
    for c in ",;:.!?()[]{}":
        assert not [w for w in windows(matcher, f"lung{c}cancer") if "C0242379" in w[1]], c
    # hyphens and slashes are word-internal
    assert ("lung-cancer", {"C0242379"}) in windows(matcher, "lung-cancer")
    assert ("lung/cancer", {"C0242379"}) in windows(matcher, "lung/cancer")


def test_matcher_same_case() -> None:
    assert same_case("US", "US")
    assert not same_case("us", "US")
    assert same_case("CTs", "CT") is True  # plural: only capitals compared
    assert not same_case("Us", "US")
    assert same_case("ＣＴ", "CT")  # full-width letters compare in NFKC form


VOCAB = [
    "lung", "cancer", "pleural", "effusion", "chest", "x", "ray", "left", "ventricle",
    "computed", "tomography", "malignant", "neoplasm", "of", "the", "no", "in", "mitral",
    "stenosis", "heart", "shock", "dilatation", "abdominal", "arteries", "with", "scan",
]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(VOCAB), max_size=25))
def test_matcher_agrees_with_brute_force(matcher: ExactMatcher, words: list[str]) -> None:
    index = matcher.index
    m = matcher
    text = " ".join(words)
    norms, starts, ends = tokenize_spans(text)
    got = {(x.start_tok, x.end_tok, x.key) for x in m.match(text, norms, starts, ends)}
    expected = set()
    for i in range(len(norms)):
        for j in range(i + 1, len(norms) + 1):
            key = " ".join(norms[i:j])
            if key not in index.key_ids:
                continue
            toks = key.split(" ")
            if all(t in STOPWORDS for t in toks) or len(key.replace(" ", "")) < MIN_MATCH_CHARS:
                continue  # lower-case text: no case-sensitive or short posting can match
            expected.add((i, j, key))
    assert got == expected



@pytest.fixture(scope="module", params=["prefix-table", "first-token-max"])
def punctuated(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
               ) -> ExactMatcher:
    """Dictionary strings with punctuation inside (issue 17), and one without, on both
    matching strategies."""
    b = IndexBuilder(source_release="punctuated")
    for cui, string in (("C9000001", "ABDOMEN:  Soft"), ("C9000002", "chest tightness, pressure"),
                        ("C9000003", "chest tightness"), ("C9000004", "liver spleen"),
                        ("C9000005", "Fracture, femur (shaft)")):
        b.set_concept(cui, preferred_name=string, semantic_types=["T033"])
        b.add_term(cui, string, sab="TEST", tty="PT", flags=term_flags(string, "PT"))
    small = request.param == "prefix-table"
    path = b.write(tmp_path_factory.mktemp("punctuated") / "index")
    return ExactMatcher(ConceptIndex.load(path, materialize=small))


def test_issue_17_windows_cross_the_punctuation_of_their_dictionary_string(
    punctuated: ExactMatcher,
) -> None:
    assert ("ABDOMEN:  SOFT", {"C9000001"}) in windows(punctuated, "ABDOMEN:  SOFT, nontender")
    assert ("Abdomen: soft", {"C9000001"}) in windows(punctuated, "Abdomen: soft")
    got = windows(punctuated, "complaint of chest tightness,   pressure, as well")
    assert ("chest tightness,   pressure", {"C9000002"}) in got
    assert ("chest tightness", {"C9000003"}) in got
    assert ("fracture, femur (shaft", {"C9000005"}) in windows(
        punctuated, "a fracture, femur (shaft) and"
    )
    # other punctuation, or punctuation the string does not have, is still a break
    assert windows(punctuated, "abdomen. Soft") == []
    assert windows(punctuated, "abdomen, soft") == []
    assert windows(punctuated, "liver, spleen") == []
    assert windows(punctuated, "fracture, femur, shaft") == []
    # and a string with punctuation matches where the caption has none, as before
    assert windows(punctuated, "abdomen soft") == [("abdomen soft", {"C9000001"})]


def test_issue_17_all_caps_words_of_five_letters_match_in_any_case() -> None:
    assert not term_flags("FEVER", "PT") & FLAG_CASE_SENSITIVE
    assert not term_flags("SPECT", "PT") & FLAG_CASE_SENSITIVE
    for acronym in ("AIDS", "ALL", "US", "CT"):
        assert term_flags(acronym, "PT") & FLAG_CASE_SENSITIVE, acronym
