from __future__ import annotations

import pytest

from conceptsvc.negation import NegationDetector, NegationRules
from conceptsvc.normalize import tokenize_spans

DETECTOR = NegationDetector()


def negated_words(text: str, detector: NegationDetector = DETECTOR) -> list[str]:
    norms, starts, ends = tokenize_spans(text)
    flags = detector.negated_tokens(text, norms, starts, ends)
    if flags is None:
        return []
    return [text[s:e] for s, e, f in zip(starts, ends, flags, strict=True) if f]


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


def test_negation_lists_continue_over_commas() -> None:
    assert negated_words("No fracture, dislocation or effusion.") == [
        "fracture", "dislocation", "or", "effusion"
    ]


def test_negation_scope_ends_at_sentence_and_terminators() -> None:
    assert negated_words("No effusion. Large mass.") == ["effusion"]
    assert negated_words("CT without contrast showing a mass") == ["contrast"]
    assert negated_words("No fracture but a large hematoma") == ["fracture"]


def test_negation_scope_limit() -> None:
    text = "No signs of a b c d e f g h"  # "no signs of" is one trigger
    assert negated_words(text) == ["a", "b", "c", "d", "e"]
    short = NegationDetector(NegationRules(scope=2))
    assert negated_words(text, short) == ["a", "b"]


def test_negation_pseudo_triggers_do_not_negate() -> None:
    assert negated_words("No change in the large mass.") == []
    assert negated_words("Not only a cyst but a tumour") == []
    assert negated_words("Gram negative bacteria") == []


def test_negation_fast_path_without_triggers() -> None:
    norms, starts, ends = tokenize_spans("Axial CT with contrast showing a mass.")
    assert DETECTOR.negated_tokens("Axial CT with contrast showing a mass.", norms, starts,
                                   ends) is None
