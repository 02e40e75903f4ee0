"""The domain types of conceptsvc.model: ExtractOptions' own checks (the engine's, which need
an index, are in tests/test_extractor.py)."""

from __future__ import annotations

import pytest

from conceptsvc.errors import ExtractArgumentError, ExtractionError
from conceptsvc.model import ExtractOptions

# A value of the wrong type for each field that is not a name list, and what the error says.
WRONG_TYPES = [
    ({"include_negated": "no"}, "include_negated=...) takes True or False; got 'no' (a str)"),
    ({"include_mentions": 0}, "include_mentions=...) takes True or False; got 0 (a int)"),
    ({"include_hypothetical": 1}, "include_hypothetical=...) takes True, False or None"),
    ({"threshold": "0.7"}, "threshold=...) takes a number in (0, 1]; got '0.7' (a str)"),
    ({"threshold": True}, "threshold=...) takes a number in (0, 1]; got True (a bool)"),
    ({"mode": None}, "mode=...) takes a name (a string); got None"),
    ({"similarity": 1}, "similarity=...) takes a name (a string)"),
    ({"overlap": ["all"]}, "overlap=...) takes a name (a string)"),
    ({"profile": b"rocov2"}, "profile=...) takes a name (a string)"),
]


@pytest.mark.parametrize(("kwargs", "says"), WRONG_TYPES)
def test_model_options_validate_checks_every_fields_type(
    kwargs: dict[str, object], says: str
) -> None:
    options = ExtractOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ExtractArgumentError) as err:
        options.validate()
    assert isinstance(err.value, ExtractionError) and isinstance(err.value, TypeError)
    assert says in str(err.value) and "For example: ExtractOptions(" in str(err.value)


def test_model_options_of_the_right_types_pass() -> None:
    ExtractOptions(threshold=1, include_hypothetical=None).validate()
    ExtractOptions(threshold=0.5, include_hypothetical=False, include_negated=False).validate()
    with pytest.raises(ExtractionError, match=r"threshold 1\.5 must be in"):
        ExtractOptions(threshold=1.5).validate()


def test_model_options_exclude_cuis_are_stripped_and_upper_cased() -> None:
    """Every door builds ExtractOptions (in-process, spaCy, the wire's replace over defaults),
    so " c0032227" excludes C0032227 wherever it came from."""
    from dataclasses import replace

    options = ExtractOptions(exclude_cuis=[" c0032227", "C0024109"])
    assert options.exclude_cuis == ("C0032227", "C0024109")
    assert replace(ExtractOptions(), exclude_cuis=("c1 ",)).exclude_cuis == ("C1",)
    assert options == ExtractOptions(exclude_cuis=("C0032227", "C0024109"))
