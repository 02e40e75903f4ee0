from __future__ import annotations

import pytest

from conceptsvc.errors import SemanticNetworkError
from conceptsvc.semantic_network import UNKNOWN_TUI, load_semantic_network


def test_semantic_network_has_127_types_and_15_groups() -> None:
    sn = load_semantic_network()
    assert len(sn.types) == 127
    assert len(sn.groups) == 15
    assert sum(len(g.tuis) for g in sn.groups.values()) == 127


@pytest.mark.parametrize("name", ["T047", "t047", "dsyn", "Disease or Syndrome"])
def test_semantic_network_resolve_type_forms(name: str) -> None:
    assert load_semantic_network().resolve(name) == {"T047"}


def test_semantic_network_resolve_group() -> None:
    sn = load_semantic_network()
    anat = sn.resolve("ANAT")
    assert "T023" in anat and "T047" not in anat
    assert sn.resolve("Anatomy") == anat


def test_semantic_network_group_codes_that_are_also_type_abbreviations() -> None:
    """CHEM and ORGA are group codes (Chemicals & Drugs, Organizations) and, in lower case,
    the abbreviations of T103 (Chemical) and T032 (Organism Attribute):
    in capitals they name the group (every group code does), in lower case the type."""
    sn = load_semantic_network()
    for code in sn.groups:
        assert sn.resolve(code) == frozenset(sn.groups[code].tuis), code
    assert len(sn.resolve("CHEM")) > 1 and "T116" in sn.resolve("CHEM")
    assert sn.resolve("ORGA") == {"T092", "T093", "T094", "T095"}  # Organizations
    assert sn.resolve("chem") == {"T103"} and sn.resolve("orga") == {"T032"}
    assert sn.resolve("Chemicals & Drugs") == sn.resolve("CHEM")


def test_semantic_network_descendants() -> None:
    sn = load_semantic_network()
    below = sn.resolve("T046", include_descendants=True)  # Pathologic Function
    assert {"T046", "T047", "T191"} <= below
    assert sn.resolve("T046") == {"T046"}


def test_semantic_network_unknown_name_suggests() -> None:
    with pytest.raises(SemanticNetworkError) as err:
        load_semantic_network().resolve("Disese or Syndrom")
    assert "Disease or Syndrome" in err.value.suggestions
    assert "E300" in str(err.value)


def test_semantic_network_unknown_sentinel() -> None:
    assert load_semantic_network().resolve("unknown") == {UNKNOWN_TUI}


def test_semantic_network_describe_gives_placeholders_for_types_it_lacks() -> None:
    sn = load_semantic_network()
    assert sn.describe("T047") is sn.types["T047"]
    unknown = sn.describe(UNKNOWN_TUI)
    assert (unknown.name, unknown.group, unknown.group_name) == ("Unknown", "UNKNOWN", "Unknown")
    assert sn.describe("T999").name == "Unknown type T999"  # a TUI from a newer release
