from __future__ import annotations

import re

import pytest
from negation_fixture import negation_rows

from conceptsvc.negation import (
    BACKWARD_SCOPE,
    CONTEXT_RULES,
    EXPERIENCER_RULES,
    FORWARD_SCOPE,
    HISTORICAL_RULES,
    HYPOTHETICAL_RULES,
    Category,
    ContextRule,
    Kind,
    NegationDetector,
    NegationRules,
    mention_context,
    mention_negated,
)
from conceptsvc.normalize import normalize_term, tokenize_spans

DETECTOR = NegationDetector()


def negated_words(text: str, detector: NegationDetector = DETECTOR) -> list[str]:
    """The words in any negation scope."""
    norms, starts, ends = tokenize_spans(text)
    flags = detector.negated_tokens(text, norms, starts, ends)
    if flags is None:
        return []
    both = FORWARD_SCOPE | BACKWARD_SCOPE
    return [text[s:e] for s, e, f in zip(starts, ends, flags, strict=True) if f & both]


def is_negated(text: str, phrase: str, detector: NegationDetector = DETECTOR) -> bool:
    """Whether a mention of ``phrase`` (its first occurrence, case and spacing ignored) is
    negated, as the extractor decides it."""
    m = re.search(r"\s+".join(map(re.escape, phrase.split())), text, re.IGNORECASE)
    assert m is not None, (phrase, text)
    norms, starts, ends = tokenize_spans(text)
    toks = [i for i in range(len(norms)) if starts[i] < m.end() and ends[i] > m.start()]
    flags = detector.negated_tokens(text, norms, starts, ends)
    return mention_negated(flags, toks[0], toks[-1] + 1)


def only(*rules: tuple[Kind, str], scope: int | None = None) -> NegationDetector:
    return NegationDetector(
        NegationRules(rules=tuple(ContextRule(p, k) for k, p in rules), scope=scope)
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No pleural effusion.", ["pleural", "effusion"]),
        ("Chest X-ray without pneumothorax", ["pneumothorax"]),
        ("Absence of contrast extravasation", ["contrast", "extravasation"]),
        ("Negative for malignancy", ["malignancy"]),
        ("Lungs free of nodules", ["nodules"]),
        ("Pulmonary embolism was ruled out.", ["Pulmonary", "embolism"]),
        ("No evidence of recurrence", ["recurrence"]),
    ],
)
def test_negation_caption_triggers(text: str, expected: list[str]) -> None:
    assert negated_words(text) == expected


def test_issue_17_location_phrase_after_the_finding_is_not_negated() -> None:
    text = "No evidence of pneumothorax on the chest radiograph."
    assert negated_words(text) == ["pneumothorax"]
    assert not is_negated(text, "chest") and not is_negated(text, "radiograph")


def test_issue_17_exam_verb_negates_the_finding_not_the_exam() -> None:
    text = "CT of the chest excluded pulmonary embolism"
    assert negated_words(text) == ["pulmonary", "embolism"]


def test_issue_17_present_closes_the_scope() -> None:
    text = "no pleural effusion, pneumothorax present"
    assert is_negated(text, "pleural effusion")
    assert not is_negated(text, "pneumothorax")


def test_issue_17_scope_runs_through_a_coordination() -> None:
    text = "Denies any shortness of breath or DIAPHORESIS."
    assert is_negated(text, "shortness of breath") and is_negated(text, "diaphoresis")


def test_negation_forward_trigger_scopes_forward_only() -> None:
    d = only((Kind.FORWARD, "no"))
    assert negated_words("mass no effusion", d) == ["effusion"]


def test_negation_backward_trigger_scopes_backward_only() -> None:
    d = only((Kind.BACKWARD, "not seen"))
    assert negated_words("effusion not seen mass", d) == ["effusion"]
    flags = d.negated_tokens("effusion not seen", ["effusion", "not", "seen"], [0, 9, 13],
                             [8, 12, 17])
    assert flags == [BACKWARD_SCOPE, 0, 0]


def test_negation_bidirectional_trigger_scopes_both_ways() -> None:
    d = only((Kind.BIDIRECTIONAL, "absent"))
    assert negated_words("pulses absent reflexes", d) == ["pulses", "reflexes"]
    assert negated_words("Absent pulses in the left foot.") == ["pulses"]


def test_negation_clause_trigger_direction_follows_its_clause() -> None:
    d = only((Kind.CLAUSE, "excluded"), (Kind.TERMINATE, "showing"))
    assert negated_words("CT excluded embolism", d) == ["embolism"]
    assert negated_words("embolism excluded.", d) == ["embolism"]
    assert negated_words("embolism excluded, mass", d) == ["embolism"]
    # right after another phrase it is an adjective ("excluded stomach")
    assert negated_words("CT showing excluded stomach", d) == []


def test_negation_pseudo_triggers_do_not_negate() -> None:
    assert negated_words("No change in the large mass.") == []
    assert negated_words("Not only a cyst but a tumour") == []
    assert negated_words("Gram negative bacteria") == []
    assert negated_words("Rule out pneumonia.") == []
    assert negated_words("Pneumonia cannot be excluded.") == []


def test_negation_terminations_end_a_scope() -> None:
    assert negated_words("No effusion. Large mass.") == ["effusion"]
    assert negated_words("CT without contrast showing a mass") == ["contrast"]
    assert negated_words("No fracture but a large hematoma") == ["fracture"]
    assert negated_words("No fracture however hematoma") == ["fracture"]
    assert negated_words("absent ostium and a large artery") == ["ostium"]
    for brk in ".;:!?":
        assert negated_words(f"No effusion{brk} mass") == ["effusion"]


def test_negation_closing_word_ends_the_scope_at_the_last_comma() -> None:
    assert negated_words("no effusion, pneumothorax present") == ["effusion"]
    # without a comma the closing word only ends the scope
    assert negated_words("No pleural effusion present.") == ["pleural", "effusion"]
    assert negated_words("no effusion, mass, pneumothorax seen") == ["effusion", "mass"]


def test_negation_location_phrases_are_not_negated_and_the_scope_goes_on() -> None:
    text = "No mass in the liver, cyst or effusion"
    assert negated_words(text) == ["mass", "cyst", "or", "effusion"]
    assert negated_words("No mass in the liver or spleen") == ["mass", "or", "spleen"]
    assert negated_words("Embolism on the right was excluded.") == ["Embolism"]
    # "of" does not start a location phrase
    assert negated_words("No fever or symptoms of infection") == [
        "fever", "or", "symptoms", "of", "infection"
    ]


def test_negation_lists_continue_over_commas() -> None:
    assert negated_words("No fracture, dislocation or effusion.") == [
        "fracture", "dislocation", "or", "effusion"
    ]


def test_negation_scope_limit() -> None:
    text = "No signs of a b c d e f g h"  # "no signs of" is one trigger
    assert negated_words(text) == list("abcdefgh")
    short = NegationDetector(NegationRules(scope=2))
    assert negated_words(text, short) == ["a", "b"]
    back = NegationDetector(NegationRules(scope=2))
    assert negated_words("a b c d was ruled out", back) == ["c", "d"]


def test_negation_a_trigger_inside_a_mention_does_not_negate_it() -> None:
    text = "Right shoulder hemiarthroplasty without hardware complication."
    assert not is_negated(text, "hemiarthroplasty without hardware complication")
    assert is_negated(text, "hardware complication")
    norms, starts, ends = tokenize_spans("no effusion")
    flags = DETECTOR.negated_tokens("no effusion", norms, starts, ends)
    assert flags == [0, FORWARD_SCOPE]
    assert mention_negated(flags, 1, 2) and not mention_negated(flags, 0, 2)
    assert not mention_negated(None, 0, 1)


@pytest.mark.parametrize(("status", "condition", "sentence"), negation_rows())
def test_negation_fixture_sentences(status: str, condition: str, sentence: str) -> None:
    assert is_negated(sentence, condition) == (status == "Negated")


def test_negation_rule_table_gives_each_normalised_phrase_one_kind() -> None:
    # two phrases that normalise alike ("rules out", "rule out") would silently lose one kind
    kinds: dict[str, set[Kind]] = {}
    for r in CONTEXT_RULES:
        kinds.setdefault(normalize_term(r.phrase), set()).add(r.kind)
    assert {p: k for p, k in kinds.items() if len(k) > 1} == {}
    # every negating trigger holds a word of the fast path's check, which holds no word as
    # frequent as "with" or "is"
    negating = {Kind.FORWARD, Kind.BACKWARD, Kind.BIDIRECTIONAL, Kind.CLAUSE}
    triggers = [p.split() for p, k in kinds.items() if k <= negating]
    assert all(not DETECTOR.trigger_words.isdisjoint(p) for p in triggers)
    assert DETECTOR.trigger_words.isdisjoint({"with", "is", "to", "was", "the", "of", "in"})
    for text in ("CT with contrast.", "Lesion is seen, to the left."):
        norms, starts, ends = tokenize_spans(text)
        assert DETECTOR.negated_tokens(text, norms, starts, ends) is None


def test_negation_a_phrase_under_two_kinds_keeps_the_lowest() -> None:
    d = only((Kind.BACKWARD, "free"), (Kind.FORWARD, "free"))
    assert negated_words("a free b", d) == ["b"]


def test_negation_fast_path_without_triggers() -> None:
    norms, starts, ends = tokenize_spans("Axial CT with contrast showing a mass.")
    assert DETECTOR.negated_tokens("Axial CT with contrast showing a mass.", norms, starts,
                                   ends) is None


# -- ConText's other categories (issue 17) ----------------------------------------------------
def properties(text: str, phrase: str, detector: NegationDetector = DETECTOR) -> set[str]:
    """ConText's properties of a mention of ``phrase`` (first occurrence, case and spacing
    ignored), as the extractor decides them: "negated", "hypothetical", "historical", "other"."""
    m = re.search(r"\s+".join(map(re.escape, phrase.split())), text, re.IGNORECASE)
    assert m is not None, (phrase, text)
    norms, starts, ends = tokenize_spans(text)
    toks = [i for i in range(len(norms)) if starts[i] < m.end() and ends[i] > m.start()]
    bits = mention_context(detector.negated_tokens(text, norms, starts, ends), toks[0],
                           toks[-1] + 1)
    names = {Category.NEGATED: "negated", Category.HYPOTHETICAL: "hypothetical",
             Category.HISTORICAL: "historical", Category.OTHER_EXPERIENCER: "other"}
    return {name for c, name in names.items() if bits & 1 << c}


@pytest.mark.parametrize(
    ("text", "phrase", "expected"),
    [
        # hypothetical: forward triggers
        ("Rule out pneumonia.", "pneumonia", {"hypothetical"}),
        ("CT to rule out pulmonary embolism", "pulmonary embolism", {"hypothetical"}),
        ("Evaluate for DVT.", "DVT", {"hypothetical"}),
        ("Suspected fracture of the radius", "fracture", {"hypothetical"}),
        ("Return if fever or chills develop.", "chills", {"hypothetical"}),
        ("Should there be bleeding, call the office.", "bleeding", {"hypothetical"}),
        # historical: forward and backward triggers
        ("History of stroke.", "stroke", {"historical"}),
        ("Status post CABG with sternal wires", "CABG", {"historical"}),
        ("Prior appendectomy.", "appendectomy", {"historical"}),
        ("Stroke in the past.", "stroke", {"historical"}),
        # experiencer
        ("Family history of colon cancer.", "colon cancer", {"other"}),
        ("Mother had breast cancer.", "breast cancer", {"other"}),
        # nothing
        ("Large pleural effusion.", "pleural effusion", set()),
    ],
)
def test_context_categories(text: str, phrase: str, expected: set[str]) -> None:
    assert properties(text, phrase) == expected


def test_context_trigger_directions_per_category() -> None:
    # forward triggers look forward only, backward ones backward only
    assert properties("Pneumonia, rule out", "pneumonia") == set()
    assert properties("Stroke, history of", "stroke") == set()
    assert properties("Colon cancer, family history", "colon cancer") == set()
    assert properties("In the past stroke", "stroke") == set()
    d = only_context(
        (Kind.BIDIRECTIONAL, "remote", Category.HISTORICAL),
        (Kind.BACKWARD, "unlikely", Category.HYPOTHETICAL),
    )
    assert properties("remote stroke", "stroke", d) == {"historical"}
    assert properties("stroke remote", "stroke", d) == {"historical"}
    assert properties("infection unlikely", "infection", d) == {"hypothetical"}
    assert properties("unlikely infection", "infection", d) == set()


def only_context(*rules: tuple[Kind, str, Category | None]) -> NegationDetector:
    return NegationDetector(NegationRules(rules=tuple(ContextRule(p, k, c) for k, p, c in rules)))


def test_context_terminations_per_category() -> None:
    # a category's own termination ends its scope ...
    text = "History of diabetes who presents with chest pain."
    assert properties(text, "diabetes") == {"historical"}
    assert properties(text, "chest pain") == set()
    text = "Family history of colon cancer and personal history of polyps."
    assert properties(text, "colon cancer") == {"other"}
    assert properties(text, "polyps") == {"historical"}
    # ... a general one ends every category's ...
    assert properties("Rule out pneumonia but effusion", "effusion") == set()
    assert properties("History of asthma, however wheezing", "wheezing") == set()
    # ... negation's caption terminations end negation only
    assert properties("Return if there is any fever.", "fever") == {"hypothetical"}
    assert properties("No mass with calcification", "calcification") == set()
    # and another category's trigger ends no scope: negated and historical
    assert properties("Denies any history of asthma.", "asthma") == {"negated", "historical"}
    # a sentence end ends them all
    assert properties("History of asthma. Wheezing.", "wheezing") == set()


def test_context_pseudo_triggers_per_category() -> None:
    assert properties("History of present illness: cough for two days.", "cough") == set()
    assert properties("One-week history of pain.", "pain") == set()
    assert properties("Take as needed if needed for pain", "pain") == set()


def test_context_scopes_cross_a_colon_but_negation_does_not() -> None:
    text = "PAST MEDICAL HISTORY:  Hypertension, gout."
    assert properties(text, "gout") == {"historical"}
    assert properties("Call if any of the following are noted: fever, rash", "rash") == {
        "hypothetical"
    }
    assert properties("No acute disease: effusion", "effusion") == set()


def test_context_a_trigger_inside_a_mention_does_not_apply_to_it() -> None:
    norms, starts, ends = tokenize_spans("history of stroke")
    flags = DETECTOR.negated_tokens("history of stroke", norms, starts, ends)
    assert mention_context(flags, 0, 3) == 0
    assert mention_context(flags, 2, 3) == 1 << Category.HISTORICAL
    assert mention_context(None, 0, 1) == 0


def test_context_rule_tables_name_their_categories() -> None:
    for table, category in ((HYPOTHETICAL_RULES, Category.HYPOTHETICAL),
                            (HISTORICAL_RULES, Category.HISTORICAL),
                            (EXPERIENCER_RULES, Category.OTHER_EXPERIENCER)):
        assert {r.category for r in table} == {category}
        assert set(table) <= set(CONTEXT_RULES)
