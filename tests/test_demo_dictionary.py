"""The embedded demo dictionary: its generator's rules, its determinism and its invariants.

The generator (``scripts/demo_dictionary/build.py``) is not part of the package, so it is loaded
from its file. The committed RRF must equal a fresh build from the committed snapshot and
curated files: a curated edit without a rebuild fails here, not in production.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from conceptsvc.embedded import demo_index
from conceptsvc.semantic_network import load_semantic_network
from conceptsvc.sources import ReadStats
from conceptsvc.sources.rrf import MetaDir, iter_mrconso, iter_mrsab, iter_mrsty

REPO = Path(__file__).resolve().parent.parent
GEN_DIR = REPO / "scripts" / "demo_dictionary"
DEMO = REPO / "conceptsvc" / "data" / "demo"
META = DEMO / "META"


def _load_build() -> ModuleType:
    name = "conceptsvc_demo_dictionary_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, GEN_DIR / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


build = _load_build()
RULES = {r.id: r for r in build.load_rules()}


def _rows(name: str) -> list[list[str]]:
    text = (META / name).read_text(encoding="utf-8")
    return [line.split("|") for line in text.splitlines()]


@pytest.fixture(scope="module")
def conso() -> list[list[str]]:
    return _rows("MRCONSO.RRF")


# -- generator rules ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule_id", "name", "expected"),
    [(r.id, a, b) for r in build.load_rules() for a, b in r.examples],
)
def test_demo_dictionary_rule_examples(rule_id: str, name: str, expected: str | None) -> None:
    """Every example written next to a rule in name_rules.yaml holds."""
    assert RULES[rule_id].apply(name) == expected


def test_demo_dictionary_every_rule_has_positive_and_negative_examples() -> None:
    for rule in RULES.values():
        outs = [b for _, b in rule.examples]
        assert any(o is not None for o in outs), rule.id
        assert any(o is None for o in outs), rule.id


def test_demo_dictionary_rules_apply_to_fixpoint() -> None:
    variants = build.derive_variants(
        "Structure of left renal vein (body structure)", list(RULES.values())
    )
    assert "Structure of left renal vein" in variants
    assert variants["left renal vein"] in ("strip_structure_of",)
    assert "left renal vein (body structure)" not in variants
    sided = build.derive_variants("Structure of left knee region", list(RULES.values()))
    assert {"left knee region", "left knee"} <= set(sided)
    assert build.derive_variants("Abdomen", list(RULES.values())) == {}


def test_demo_dictionary_uninvert() -> None:
    assert build.uninvert("Aortic Aneurysm, Abdominal") == "Abdominal Aortic Aneurysm"
    assert build.uninvert("Lens, Crystalline") == "Crystalline Lens"
    assert build.uninvert("Pleural effusion, NOS") is None
    assert build.uninvert("Abdomen") is None
    assert build.uninvert("Neck and chest") is None


def test_demo_dictionary_synthetic_ids_are_stable_and_outside_nlm_range() -> None:
    a = build.synthetic_ids(["x", "y", "z"], "L", "LUI")
    b = build.synthetic_ids(["z", "y", "x", "w"], "L", "LUI")
    assert {k: a[k] for k in "xyz"} == {k: b[k] for k in "xyz"}  # adding a key renumbers nothing
    assert all(re.fullmatch(r"L9\d{9}", v) for v in b.values())
    assert len(set(b.values())) == 4


def test_demo_dictionary_lexical_form() -> None:
    assert build.lexical_form("Foramen Ovale, Patent") == build.lexical_form(
        "foramen  ovale patent"
    )
    assert build.lexical_form("Ménière") == "meniere"


# -- determinism and freshness -----------------------------------------------------------------
def test_demo_dictionary_committed_output_equals_fresh_build() -> None:
    first = build.outputs(build.build_dictionary())
    second = build.outputs(build.build_dictionary())
    assert first == second  # deterministic: same inputs, byte-identical output
    for path, text in first.items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(REPO)} is stale: run scripts/demo_dictionary/build.py"
        )


def test_demo_dictionary_no_unreviewed_ambiguities() -> None:
    d = build.build_dictionary()
    assert d.unreviewed == {}


def _tiny_shared(root: Path) -> Path:
    """A miniature reference-data tree in the real file formats."""
    (root / "rocov2").mkdir(parents=True)
    (root / "open_vocab").mkdir()
    (root / "roco_v1").mkdir()
    (root / "rocov2" / "cui_mapping.csv").write_bytes(
        b'CUI,Canonical name\r\nC0016522,"Foramen Ovale, Patent"\r\nC0000726,Abdomen\r\n'
    )
    (root / "rocov2" / "valid_captions.csv").write_text(
        'ID,Caption\nv2,"Patent foramen ovale, CT."\nv1,Abdomen X-ray\n', encoding="utf-8"
    )
    for name in ("valid_concepts.csv", "valid_concepts_manual.csv", "train_concepts.csv"):
        (root / "rocov2" / name).write_text(
            "ID,CUIs\nv1,C0000726;C1306645\nv2,C0016522;C0040405\n", encoding="utf-8"
        )
    (root / "open_vocab" / "hpo_umls.tsv").write_text(
        "hpo_id\tcuis\tname\tsynonyms_exact\tsynonyms_other\ttop_branch\n"
        "HP:0001655\tC0016522|C9999999\tPatent foramen ovale\tPFO\tHole in heart#BROAD|x\t\n",
        encoding="utf-8",
    )
    (root / "open_vocab" / "mondo_exactmatch_umls.sssom.tsv").write_text(
        "# curie_map:\nsubject_id\tsubject_label\tpredicate_id\tobject_id\tmapping_justification\n"
        "MONDO:1\tpatent foramen ovale\tskos:exactMatch\tUMLS:C0016522\tx\n"
        "MONDO:2\tother\tskos:closeMatch\tUMLS:C0000726\tx\n",
        encoding="utf-8",
    )
    (root / "open_vocab" / "doid_umls.tsv").write_text(
        "doid\tcuis\tname\tsynonyms_exact\tsynonyms_other\nDOID:1\tC0016522\tPFO \t\t\n",
        encoding="utf-8",
    )
    (root / "open_vocab" / "dicom_segcontext_umls.tsv").write_text(
        "cui\tcode_meanings\tdicom_codes\tcontext_groups\n"
        "C0000726\tAbdomen|abdomen\tSCT:113345001\tCommonAnatomicRegions\n",
        encoding="utf-8",
    )
    (root / "roco_v1" / "validation_radiology_semtypes.txt").write_text(
        "ROCO_1\t\tT029\tBody Location or Region\tT060\tDiagnostic Procedure\n"
        "ROCO_2\t\tT029\tBody Location or Region\n",
        encoding="utf-8",
    )
    (root / "roco_v1" / "validation_radiology_cuis.txt").write_text(
        "ROCO_1\t\tC0000726\tC1306645\nROCO_2\t\tC0000726\n", encoding="utf-8"
    )
    return root


def test_demo_dictionary_snapshot_reads_the_real_formats(tmp_path: Path) -> None:
    shared = _tiny_shared(tmp_path / "shared")
    out1, out2 = tmp_path / "s1", tmp_path / "s2"
    build.snapshot(shared, out1 / "sources", out1 / "demo", expected_cuis=None)
    build.snapshot(shared, out2 / "sources", out2 / "demo", expected_cuis=None)
    for f in sorted((out1 / "sources").iterdir()):
        assert f.read_bytes() == (out2 / "sources" / f.name).read_bytes(), f.name
    mapping = (out1 / "sources" / "rocov2_cui_mapping.tsv").read_text(encoding="utf-8")
    assert "C0016522\tForamen Ovale, Patent\n" in mapping  # CSV quoting and CRLF handled
    terms = build._read_tsv(out1 / "sources" / "open_vocab_terms.tsv")
    got = {(t["sab"], t["cuis"], t["kind"], t["string"]) for t in terms}
    assert ("HPO", "C0016522", "name", "Patent foramen ovale") in got
    assert ("HPO", "C0016522", "exact", "PFO") in got
    assert ("HPO", "C0016522", "other:BROAD", "Hole in heart") in got
    assert ("HPO", "C0016522", "other:RELATED", "x") in got  # untagged "other" synonym
    assert ("MONDO", "C0016522", "name", "patent foramen ovale") in got
    assert ("DOID", "C0016522", "name", "PFO") in got  # trailing space stripped
    assert ("DICOM", "C0000726", "exact", "abdomen") in got
    assert not any(t["sab"] == "MONDO" and t["cuis"] == "C0000726" for t in terms)  # closeMatch
    evidence = build._read_tsv(out1 / "sources" / "roco_v1_semtype_evidence.tsv")
    assert {(e["cui"], e["candidate_tuis"]) for e in evidence} == {("C0000726", "T029")}
    caps = (out1 / "demo" / "captions.csv").read_text(encoding="utf-8").splitlines()
    assert caps == ["ID,Caption", "v1,Abdomen X-ray", 'v2,"Patent foramen ovale, CT."']


# -- invariants of the committed dictionary ----------------------------------------------------
def test_demo_dictionary_rrf_shape(conso: list[list[str]]) -> None:
    """Real RRF: UMLS column counts and a trailing '|' on every row."""
    for row in conso:
        assert len(row) == 19 and row[-1] == "", row  # 18 columns + the trailing empty field
    for row in _rows("MRSTY.RRF"):
        assert len(row) == 7 and row[-1] == "", row
    for row in _rows("MRSAB.RRF"):
        assert len(row) == 26 and row[-1] == "", row


def test_demo_dictionary_project_reader_finds_no_malformed_rows() -> None:
    stats = ReadStats()
    meta = MetaDir(META)
    n_conso = sum(1 for _ in iter_mrconso(meta, stats=stats))
    n_sty = sum(1 for _ in iter_mrsty(meta, stats=stats))
    n_sab = sum(1 for _ in iter_mrsab(meta, stats=stats))
    assert n_conso > 5000 and n_sty >= 1948 and n_sab == len(build.SAB_INFO)
    assert not stats.skipped


def test_demo_dictionary_all_concepts_named_and_typed(conso: list[list[str]]) -> None:
    mapping = build._read_tsv(GEN_DIR / "sources" / "rocov2_cui_mapping.tsv")
    expected = {r["cui"] for r in mapping} | set(build.MISSING_CUIS)
    assert len(expected) == 1948
    preferred: dict[str, list[str]] = {}
    for r in conso:
        if r[2] == "P" and r[4] == "PF" and r[6] == "Y":
            preferred.setdefault(r[0], []).append(r[14])
    assert set(preferred) == expected
    assert all(len(v) == 1 and v[0].strip() for v in preferred.values())
    assert {r[0] for r in conso} == expected
    net = load_semantic_network()
    types: dict[str, set[str]] = {}
    for cui, tui, stn, sty, atui, _cvf, _ in _rows("MRSTY.RRF"):
        assert tui in net.types and net.types[tui].name == sty and net.types[tui].tree_number == stn
        assert re.fullmatch(r"AT9\d{9}", atui)
        types.setdefault(cui, set()).add(tui)
    assert set(types) == expected


def test_demo_dictionary_identifiers(conso: list[list[str]]) -> None:
    auis = [r[7] for r in conso]
    assert len(set(auis)) == len(auis)
    for r in conso:
        assert re.fullmatch(r"L9\d{9}", r[3]) and re.fullmatch(r"S9\d{9}", r[5])
        assert re.fullmatch(r"A9\d{9}", r[7])
        assert r[1] == "ENG" and r[16] in ("N", "E") and r[15] == "0"
    sabs = {r[11] for r in conso}
    assert sabs == set(build.SAB_INFO)


def test_demo_dictionary_inferred_concepts_are_marked(conso: list[list[str]]) -> None:
    by_cui: dict[str, set[str]] = {}
    for r in conso:
        by_cui.setdefault(r[0], set()).add(r[11])
    for cui in build.MISSING_CUIS:
        assert "ROCOV2INF" in by_cui[cui] and "ROCOV2" not in by_cui[cui]
    inf = {r[0] for r in conso if r[11] == "ROCOV2INF"}
    assert inf == set(build.MISSING_CUIS)
    with (GEN_DIR / "semantic_types.tsv").open(encoding="utf-8") as fh:
        notes = {r["cui"]: r["note"] for r in csv.DictReader(fh, delimiter="\t")}
    assert all("inferred" in notes[c] for c in build.MISSING_CUIS)


def test_demo_dictionary_curated_file_is_reviewable() -> None:
    data = yaml.safe_load((GEN_DIR / "curated_synonyms.yaml").read_text(encoding="utf-8"))
    seen = set()
    for block in data["concepts"]:
        assert re.fullmatch(r"C\d{7}", block["cui"]) and block["cui"] not in seen
        seen.add(block["cui"])
        assert block.get("name"), block["cui"]
        for key in ("synonyms", "abbreviations", "suppress"):
            for entry in block.get(key) or ():
                if isinstance(entry, dict):
                    assert entry.get("name") and (key != "suppress" or entry.get("reason"))
        if block.get("inferred"):
            assert block.get("evidence")
    for amb in data["ambiguities"]:
        assert amb["decision"] in ("keep", "assign") and amb["reason"] and amb["cuis"]


def test_demo_dictionary_semantic_types_file() -> None:
    net = load_semantic_network()
    with (GEN_DIR / "semantic_types.tsv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) == 1948 and len({r["cui"] for r in rows}) == 1948
    for r in rows:
        assert r["basis"] in ("curated", "roco_v1", "curated+roco_v1")
        assert all(t in net.types for t in r["tuis"].split(","))
    by = {r["cui"]: r["tuis"] for r in rows}
    assert by["C0040405"] == "T060"  # X-Ray Computed Tomography is a diagnostic procedure


def test_demo_dictionary_build_rejects_bad_curation(tmp_path: Path) -> None:
    bad = tmp_path / "curated.yaml"
    text = (GEN_DIR / "curated_synonyms.yaml").read_text(encoding="utf-8")
    bad.write_text(text + "\n- cui: C9999999\n  name: nothing\n", encoding="utf-8")
    with pytest.raises(build.BuildError):
        build.build_dictionary(curated_path=bad)
    bad.write_text(
        text.replace("  name: Aortic Aneurysm\n", "  name: Aorta thing\n", 1), encoding="utf-8"
    )
    with pytest.raises(build.BuildError, match="preferred_name"):
        build.build_dictionary(curated_path=bad)
    types = tmp_path / "types.tsv"
    shutil.copy(GEN_DIR / "semantic_types.tsv", types)
    lines = types.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace("\tT029\t", "\tT999\t", 1)
    types.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(build.BuildError, match="invalid TUIs"):
        build.build_dictionary(semtypes_path=types)


# -- through the real ingestion path -----------------------------------------------------------
def test_demo_dictionary_demo_index(tmp_path: Path) -> None:
    index = demo_index(tmp_path)
    assert len(index) == 1948
    for cui in index.cuis:
        info = index.concept(cui)
        assert info is not None and info.preferred_name
        assert info.semantic_types and "T000" not in info.semantic_types
    assert index.concept("C0003486").preferred_name == "Aortic Aneurysm"
    assert index.concept("C0016522").preferred_name == "Foramen Ovale, Patent"
    ct = index.postings("ct")
    assert {p.cui for p in ct} == {"C0040405"}  # never Chlamydia trachomatis
    (us,) = index.postings("us")
    assert us.cui == "C0041618" and us.flags & 4  # case-sensitive: not the pronoun
    assert {p.cui for p in index.postings("patent foramen ovale")} == {"C0016522"}
    assert {p.cui for p in index.postings("left renal vein")} == {"C0508001"}


def test_demo_dictionary_demo_sample() -> None:
    def read(name: str, col: str) -> dict[str, str]:
        with (DEMO / name).open(encoding="utf-8", newline="") as fh:
            return {r["ID"]: r[col] for r in csv.DictReader(fh)}

    caps = read("captions.csv", "Caption")
    gold = read("concepts.csv", "CUIs")
    manual = read("concepts_manual.csv", "CUIs")
    assert 0 < len(caps) <= 500
    assert set(caps) == set(gold) == set(manual)
    assert all(i.startswith("ROCOv2_2023_valid_") for i in caps)
    vocab = {r[0] for r in _rows("MRSTY.RRF")}
    assert {c for v in gold.values() for c in v.split(";") if c} <= vocab
    assert "PMC" in (DEMO / "ATTRIBUTION.md").read_text(encoding="utf-8")
