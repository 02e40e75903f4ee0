"""The synthetic UMLS generator writes files our readers accept, with the promised shape: its
identifiers are never real ones, and its ambiguity is the published one (module docstring)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import synth_umls
from benchmarks.synth_umls import (
    CUI_FLOOR,
    CUI_TOP,
    AmbiguityStats,
    ambiguity_stats,
    generate,
)
from conceptsvc.dictionary import UmlsSource, build_dictionary_index
from conceptsvc.embedded import DEMO_META
from conceptsvc.index import ConceptIndex
from conceptsvc.sources.rrf import MetaDir, iter_mrconso, iter_mrrank, iter_mrsab, iter_mrsty

SAMPLE_ROWS = 200_000


def test_synth_umls_shape_and_build(tmp_path: Path) -> None:
    meta_dir = tmp_path / "META"
    counts = generate(meta_dir, 3000, seed=3)
    assert counts["MRCONSO.RRF"] == 3000
    meta = MetaDir(meta_dir)
    assert meta.expected_rows("MRCONSO.RRF") == 3000
    atoms = list(iter_mrconso(meta))
    assert len(atoms) == 3000
    cuis = Counter(a.cui for a in atoms)
    assert 3.8 < len(atoms) / len(cuis) < 5.8  # 4.8 atoms per concept, as in a real release
    langs = Counter(a.lat for a in atoms)
    assert 0.55 < langs["ENG"] / 3000 < 0.8
    assert Counter(a.suppress for a in atoms)["N"] / 3000 > 0.8
    assert len({a.sab for a in atoms}) > 40
    assert sum(" " in a.string for a in atoms) / 3000 > 0.5  # mostly multiword
    assert len({s.tui for s in iter_mrsty(meta)}) > 60
    assert len(list(iter_mrsab(meta))) == 101 and len(list(iter_mrrank(meta))) > 50
    assert generate(tmp_path / "again", 3000, seed=3) == counts
    assert (tmp_path / "again" / "MRCONSO.RRF").read_bytes() == (
        meta_dir / "MRCONSO.RRF").read_bytes()
    report = build_dictionary_index([UmlsSource(meta_dir)], tmp_path / "ix")
    assert report.source_release == "UMLS 2024AA"
    assert len(ConceptIndex.load(tmp_path / "ix")) == report.concepts > 300


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AmbiguityStats]:
    """A 200k-row realistic release (its META; the index built from it is META/../ix) and
    the ambiguity of that index."""
    root = tmp_path_factory.mktemp("synth-realistic")
    generate(root / "META", SAMPLE_ROWS)
    build_dictionary_index([UmlsSource(root / "META")], root / "ix")
    return root / "META", ambiguity_stats(ConceptIndex.load(root / "ix"))


def _cuis_of(meta: Path) -> tuple[set[str], set[str], set[str]]:
    """CUIs of MRCONSO, MRSTY and MRSAB (VCUI and RCUI) of ``meta``."""
    m = MetaDir(meta)
    sab_cuis = set()
    for line in (meta / "MRSAB.RRF").read_text(encoding="utf-8").splitlines():
        vcui, rcui = line.split("|")[:2]
        sab_cuis.update(c for c in (vcui, rcui) if c)
    return {a.cui for a in iter_mrconso(m)}, {s.cui for s in iter_mrsty(m)}, sab_cuis


def test_synth_umls_identifiers_are_never_real(realistic: tuple[Path, AmbiguityStats]) -> None:
    """Every identifier has UMLS's shape, in a block no release has reached, and no CUI is one
    of the demo dictionary's (merged with it, a synthetic concept would take its names)."""
    meta, _ = realistic
    conso, sty, sab = _cuis_of(meta)
    assert sty <= conso and not conso & sab
    for cui in conso | sab:
        assert re.fullmatch(r"C\d{7}", cui), cui
        assert CUI_FLOOR <= int(cui[1:]) <= CUI_TOP, cui
    demo = set().union(*_cuis_of(DEMO_META))
    assert max(int(c[1:]) for c in demo) < CUI_FLOOR  # the range check covers the demo too
    assert not (conso | sab) & demo
    with (meta / "MRCONSO.RRF").open(encoding="utf-8") as f:
        for line in f:
            fields = line.split("|")
            lui, sui, aui = fields[3], fields[5], fields[7]
            for ident, letter in ((lui, "L"), (sui, "S"), (aui, "A")):
                assert re.fullmatch(rf"{letter}\d{{8}}", ident) and int(ident[1:]) >= 80_000_000
    for line in (meta / "MRSTY.RRF").read_text(encoding="utf-8").splitlines():
        atui = line.split("|")[4]
        assert re.fullmatch(r"AT\d{9}", atui) and int(atui[2:]) >= 800_000_000


def test_synth_umls_realistic_names_never_only_real_words(
    realistic: tuple[Path, AmbiguityStats],
) -> None:
    """Merged with a real dictionary, a synthetic concept must not take a real concept's
    mentions: every key of the realistic release but an abbreviation has a made-up word."""
    from benchmarks.synth_umls import _REAL_WORDS
    from conceptsvc.normalize import normalize_term

    meta, _ = realistic
    real = {normalize_term(w) for w in _REAL_WORDS} - {""}
    index = ConceptIndex.load(meta.parent / "ix")
    only_real = [k for k in index.keys()
                 if all(t in real for t in k.split()) and not (len(k) <= 6 and " " not in k)]
    assert not only_real, only_real[:10]


def test_synth_umls_refuses_more_concepts_than_the_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bottom of the CUI block it stops with an error, never writes a real-range CUI."""
    monkeypatch.setattr(synth_umls, "CUI_FLOOR", CUI_TOP - 500)
    with pytest.raises(ValueError, match="synthetic CUI block"):
        generate(tmp_path / "META", 5000)


def test_synth_umls_realistic_ambiguity_matches_the_docstring(
    realistic: tuple[Path, AmbiguityStats],
) -> None:
    """The targets of the module docstring (Aronson 2001/2005, Liu et al. 2001), measured on
    the index built from a 200k-row release."""
    _, s = realistic
    assert 35_000 < s.concepts < 48_000  # 4.8 atoms per concept
    assert 0.03 <= s.ambiguous_concept_share <= 0.06
    assert 0.005 <= s.ambiguous_key_share <= 0.015
    assert 0.60 <= s.share_of_ambiguous_keys_with_2 <= 0.80
    assert 2.3 <= s.concepts_per_ambiguous_key <= 3.5
    assert 0.25 <= s.ambiguous_abbreviation_share <= 0.41
    assert s.abbreviation_keys > 500  # enough abbreviations for the share to mean something
    # short abbreviations are the most ambiguous; the tail is in the tens, not the thousands
    assert s.concepts_per_short_ambiguous_key > s.concepts_per_multiword_ambiguous_key
    assert 8 <= s.max_concepts_per_key <= 100


def test_synth_umls_stress_keeps_the_heavy_ambiguity(
    tmp_path: Path, realistic: tuple[Path, AmbiguityStats]
) -> None:
    """``--ambiguity stress``: common words and initials shared by many concepts, far above
    the realistic release at the same size."""
    _, real = realistic
    generate(tmp_path / "META", SAMPLE_ROWS, ambiguity="stress")
    build_dictionary_index([UmlsSource(tmp_path / "META")], tmp_path / "ix")
    s = ambiguity_stats(ConceptIndex.load(tmp_path / "ix"))
    assert s.ambiguous_concept_share > 4 * real.ambiguous_concept_share
    assert s.concepts_per_ambiguous_key > real.concepts_per_ambiguous_key + 1
    assert s.max_concepts_per_key > real.max_concepts_per_key
    top = {key for key, _ in s.most_ambiguous}
    assert top & {"left", "right", "of", "the", "acute", "chronic"}
