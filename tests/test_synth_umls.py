"""The synthetic UMLS generator writes files our readers accept, with the promised shape."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from benchmarks.synth_umls import generate
from conceptsvc.dictionary import UmlsSource, build_dictionary_index
from conceptsvc.index import ConceptIndex
from conceptsvc.sources.rrf import MetaDir, iter_mrconso, iter_mrrank, iter_mrsab, iter_mrsty


def test_synth_umls_shape_and_build(tmp_path: Path) -> None:
    meta_dir = tmp_path / "META"
    counts = generate(meta_dir, 3000, seed=3)
    assert counts["MRCONSO.RRF"] == 3000
    meta = MetaDir(meta_dir)
    assert meta.expected_rows("MRCONSO.RRF") == 3000
    atoms = list(iter_mrconso(meta))
    assert len(atoms) == 3000
    cuis = Counter(a.cui for a in atoms)
    assert 2.0 < len(atoms) / len(cuis) < 5.0  # several atoms per concept
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
    assert len(ConceptIndex.load(tmp_path / "ix")) == report.concepts > 500
