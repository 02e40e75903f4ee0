"""The QuickUMLS backend: a real QuickUMLS index built from a tiny RRF fixture, then annotated.

These tests need the optional extra ``conceptsvc[quickumls]`` (``make install`` installs it).
Under CI a missing extra is a failure, never a silent skip.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from offsets import check_quickumls_annotation

from conceptsvc.backends.quickumls import (
    QUICKUMLS_INSTALL_HINT,
    SIDECAR_NAME,
    QuickUMLSBackend,
    build_quickumls_index,
    quickumls_available,
)
from conceptsvc.errors import ConceptIndexError, ExtractionError, SemanticNetworkError
from conceptsvc.model import ExtractOptions

META = Path(__file__).parent / "fixtures" / "quickumls_META"

if not quickumls_available():
    if os.environ.get("CI"):
        pytest.fail(
            f"quickumls is not installed in this venv; {QUICKUMLS_INSTALL_HINT}", pytrace=False
        )
    pytest.skip(f"quickumls is not installed; {QUICKUMLS_INSTALL_HINT}", allow_module_level=True)

APPROX = ExtractOptions(mode="approximate")


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quickumls") / "index"
    build_quickumls_index(META, out)
    return out


@pytest.fixture(scope="module")
def backend(index_dir: Path) -> QuickUMLSBackend:
    # min_match_length=2 keeps "CT" and "MR" (QuickUMLS's default of 3 drops them).
    return QuickUMLSBackend(index_dir, min_match_length=2)


def spans(annotation: object) -> set[tuple[str, str, int, int]]:
    return {(m.cui, m.text, m.start, m.end) for m in annotation.mentions}  # type: ignore[attr-defined]


def test_backend_quickumls_build_report_and_layout(tmp_path: Path) -> None:
    report = build_quickumls_index(META, tmp_path / "q")
    assert report.rows_read == 14
    # The German row and the suppressible (SUPPRESS=O) row are not part of the dictionary.
    assert report.rows_used == 12
    assert report.concepts == 8
    assert report.concepts_without_types == 1  # C9999999 has no MRSTY row: typed T000
    assert report.strings == 11  # "ct" is one string shared by two concepts
    for name in ("umls-simstring.db", "cui-semtypes.db"):
        assert (tmp_path / "q" / name).is_dir()
    for flag in ("lowercase.flag", "normalize-unicode.flag"):
        assert (tmp_path / "q" / flag).exists()
    assert (tmp_path / "q" / "language.flag").read_text() == "ENG"
    sidecar = json.loads((tmp_path / "q" / SIDECAR_NAME).read_text(encoding="utf-8"))
    assert sidecar["concepts"]["C0032227"] == ["Pleural effusion", ["T047", "T033"]]
    assert sidecar["sources"]["C0008149"]["ct"] == ["CHV"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_backend_quickumls_build_refuses_existing_directory(tmp_path: Path) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConceptIndexError, match="already exists"):
        build_quickumls_index(META, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_backend_quickumls_exact_offsets_and_ambiguity(backend: QuickUMLSBackend) -> None:
    text = "CT of the Abdomen shows a pleural effusion."
    ann = backend.extract(text, id="c1")
    assert ann.id == "c1"
    check_quickumls_annotation(backend.index_dir, text, ann)
    # QuickUMLS keeps every concept of the chosen span: "CT" is also Chlamydia trachomatis.
    assert spans(ann) == {
        ("C0040405", "CT", 0, 2),
        ("C0008149", "CT", 0, 2),
        ("C0000726", "Abdomen", 10, 17),
        ("C0032227", "pleural effusion", 26, 42),
    }
    assert ann.concepts[0] in {"C0040405", "C0008149"}
    effusion = next(m for m in ann.mentions if m.cui == "C0032227")
    assert effusion.preferred_name == "Pleural effusion"
    assert effusion.semantic_types == ("T033", "T047")
    assert effusion.source == "MSH"
    assert effusion.score == 1.0
    assert effusion.negated is False


def test_backend_quickumls_default_min_match_length_drops_two_letter_words(
    index_dir: Path,
) -> None:
    default = QuickUMLSBackend(index_dir)
    assert default.min_match_length == 3
    assert "C0040405" not in default.extract("CT of the abdomen").concepts
    assert "C0000726" in default.extract("CT of the abdomen").concepts


def test_backend_quickumls_semantic_type_and_group_filters(backend: QuickUMLSBackend) -> None:
    text = "CT of the abdomen shows a pleural effusion."
    procedures = backend.extract(text, ExtractOptions(semantic_types=("T060",)))
    assert set(procedures.concepts) == {"C0040405"}
    # A multi-typed concept passes when any of its types is accepted (Finding here).
    findings = backend.extract(text, ExtractOptions(semantic_types=("Finding",)))
    assert set(findings.concepts) == {"C0032227"}
    anatomy = backend.extract(text, ExtractOptions(semantic_groups=("ANAT",)))
    assert set(anatomy.concepts) == {"C0000726"}
    with pytest.raises(SemanticNetworkError):
        backend.extract(text, ExtractOptions(semantic_types=("T999x",)))


def test_backend_quickumls_exact_versus_approximate(backend: QuickUMLSBackend) -> None:
    text = "Bilateral pleural effusions."
    assert backend.extract(text).concepts == ()
    approx = backend.extract(text, APPROX)
    (m,) = approx.mentions
    assert (m.cui, m.text) == ("C0032227", "pleural effusions")
    assert 0.7 <= m.score < 1.0
    strict = backend.extract(text, ExtractOptions(mode="approximate", threshold=0.95))
    assert strict.concepts == ()

    def on_same_span(similarity: str) -> float:
        opts = ExtractOptions(mode="approximate", similarity=similarity, overlap="all")
        ann = backend.extract(text, opts)
        return next(x.score for x in ann.mentions if (x.start, x.end) == (m.start, m.end))

    assert on_same_span("dice") > m.score  # dice > jaccard on the same trigram sets
    assert on_same_span("overlap") == 1.0  # every trigram of the shorter string is shared
    # With "longest", dice's lower bar lets the wider window win (QuickUMLS's "length").
    dice = backend.extract(text, ExtractOptions(mode="approximate", similarity="dice"))
    assert [x.text for x in dice.mentions] == ["Bilateral pleural effusions"]


def test_backend_quickumls_overlap_policies(backend: QuickUMLSBackend) -> None:
    text = "Magnetic resonance imaging"
    longest = backend.extract(text)
    assert spans(longest) == {("C0024485", "Magnetic resonance imaging", 0, 26)}
    everything = backend.extract(text, ExtractOptions(overlap="all"))
    assert ("C0011923", "imaging", 19, 26) in spans(everything)
    assert ("C0024485", "Magnetic resonance imaging", 0, 26) in spans(everything)
    assert spans(backend.extract(text, ExtractOptions(overlap="best_score"))) == spans(longest)


def test_backend_quickumls_sources_and_excluded_cuis(backend: QuickUMLSBackend) -> None:
    text = "CT of the belly"
    both = backend.extract(text)
    assert set(both.concepts) == {"C0040405", "C0008149", "C0000726"}
    msh = backend.extract(text, ExtractOptions(sources=("MSH",)))
    # "belly" comes from CHV only; "CT" as Chlamydia trachomatis too.
    assert set(msh.concepts) == {"C0040405"}
    assert all(m.source == "MSH" for m in msh.mentions)
    excluded = backend.extract(text, ExtractOptions(exclude_cuis=("C0008149",)))
    assert set(excluded.concepts) == {"C0040405", "C0000726"}
    with pytest.raises(ExtractionError, match="unknown source"):
        backend.extract(text, ExtractOptions(sources=("SNOMEDCT_US",)))


def test_backend_quickumls_unicode_offsets(backend: QuickUMLSBackend) -> None:
    text = "Ⅱ. Patiënt with Sjögren syndrome 🙂 and MRI"
    ann = backend.extract(text)
    assert ("C1527336", "Sjögren syndrome", 16, 32) in spans(ann)
    assert ("C0024485", "MRI", 39, 42) in spans(ann)
    check_quickumls_annotation(backend.index_dir, text, ann)


def test_backend_quickumls_unsupported_and_invalid_options(backend: QuickUMLSBackend) -> None:
    with pytest.raises(ExtractionError, match="no concept profiles"):
        backend.check_options(ExtractOptions(profile="rocov2"))
    with pytest.raises(ExtractionError, match="threshold"):
        backend.check_options(ExtractOptions(threshold=0.0))
    with pytest.raises(ExtractionError, match="similarity"):
        backend.check_options(ExtractOptions(similarity="levenshtein"))
    with pytest.raises(ExtractionError, match="mode"):
        backend.check_options(ExtractOptions(mode="fuzzy"))
    assert backend.profiles() == ["none"]


def test_backend_quickumls_batch_and_no_mentions(backend: QuickUMLSBackend) -> None:
    items = [("a", "MRI of the abdomen"), ("b", "nothing here"), ("c", "CT")]
    batch = backend.extract_batch(items)
    assert [a.id for a in batch] == ["a", "b", "c"]
    assert batch == [backend.extract(t, id=i) for i, t in items]
    quiet = backend.extract("MRI of the abdomen", ExtractOptions(include_mentions=False))
    assert quiet.mentions == ()
    assert quiet.concepts == batch[0].concepts


def test_backend_quickumls_search(backend: QuickUMLSBackend) -> None:
    found = backend.search("magnetic resonance imaging")
    assert [c.cui for c in found] == ["C0024485"]
    assert found[0].score == 1.0
    assert found[0].sources == ("MSH",)
    fuzzy = backend.search("magnetic resonance imagery", options=APPROX)
    assert fuzzy and fuzzy[0].cui == "C0024485" and fuzzy[0].score < 1.0
    assert backend.search("   ") == []


def test_backend_quickumls_serves_index_without_sidecar(index_dir: Path, tmp_path: Path) -> None:
    # What QuickUMLS's own installer leaves: its databases and flags, no conceptsvc metadata.
    bare = tmp_path / "bare"
    shutil.copytree(index_dir, bare)
    (bare / SIDECAR_NAME).unlink()
    b = QuickUMLSBackend(bare, min_match_length=2)
    (m,) = b.extract("Pleural effusion").mentions
    assert (m.cui, m.preferred_name, m.source) == ("C0032227", "pleural effusion", "")
    with pytest.raises(ExtractionError, match="no source information"):
        b.check_options(ExtractOptions(sources=("MSH",)))
    assert b.manifest["has_sidecar"] is False


def test_backend_quickumls_closed_backend_refuses_work(index_dir: Path) -> None:
    with QuickUMLSBackend(index_dir) as b:
        assert b.extract("abdomen").concepts == ("C0000726",)
    with pytest.raises(ExtractionError, match="closed"):
        b.extract("abdomen")


def test_backend_quickumls_threads_share_one_backend(backend: QuickUMLSBackend) -> None:
    # Calls with different options from several threads must not see each other's settings.
    from concurrent.futures import ThreadPoolExecutor

    text = "Bilateral pleural effusions and CT"
    jobs = [ExtractOptions(), APPROX, ExtractOptions(semantic_types=("T060",))] * 20
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda o: backend.extract(text, o).concepts, jobs))
    expected = [backend.extract(text, o).concepts for o in jobs[:3]]
    assert expected[0] != expected[1]
    assert got == expected * 20


def test_backend_quickumls_rejects_non_index(tmp_path: Path) -> None:
    with pytest.raises(ConceptIndexError, match="not a QuickUMLS index"):
        QuickUMLSBackend(tmp_path)


def test_backend_quickumls_matches_quickumls_itself_on_demo_captions(tmp_path: Path) -> None:
    # The backend adds offsets, names and filters around QuickUMLS; with no filter it must
    # find exactly what QuickUMLS's own best-match run finds, caption by caption.
    import spacy

    from conceptsvc.backends.quickumls import _import_quickumls
    from conceptsvc.evaluation import read_captions

    demo = Path(__file__).parents[1] / "conceptsvc" / "data" / "demo"
    build_quickumls_index(demo / "META", tmp_path / "q")
    captions = read_captions(demo / "captions.csv")[:100]
    b = QuickUMLSBackend(tmp_path / "q", min_match_length=2)
    opts = ExtractOptions(mode="approximate", threshold=0.7, overlap="best_score")
    got = [set(b.extract(text, opts).concepts) for _, text in captions]
    b.close()
    qu = _import_quickumls()["core"].QuickUMLS(
        str(tmp_path / "q"), overlapping_criteria="score", threshold=0.7, window=5,
        similarity_name="jaccard", min_match_length=2, accepted_semtypes=None,
        spacy_component=True,
    )
    nlp = spacy.blank("en")
    expected = [
        {c["cui"] for group in qu._match(nlp(text), best_match=True) for c in group}
        for _, text in captions
    ]
    assert sum(map(len, expected)) > 100  # the comparison is not vacuous
    assert got == expected


_WORDS = ["CT", "ct", "MRI", "abdomen", "Belly", "pleural", "effusion", "effusions", "of", "the",
          "Sjögren", "syndrome", "imaging", "magnetic", "resonance", "🙂", "ﬁle", "İ", "—", ",",
          "(", ")", "widget", "X-Ray", "computed", "tomography"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    words=st.lists(st.sampled_from(_WORDS), min_size=0, max_size=12),
    seps=st.lists(st.sampled_from([" ", "  ", "\n", "-", "/", ""]), min_size=12, max_size=12),
    approximate=st.booleans(),
)
def test_backend_quickumls_offsets_slice_original_text(
    backend: QuickUMLSBackend, words: list[str], seps: list[str], approximate: bool
) -> None:
    text = "".join(w + s for w, s in zip(words, seps, strict=False))
    options = APPROX if approximate else ExtractOptions()
    ann = backend.extract(text, options)
    check_quickumls_annotation(backend.index_dir, text, ann, options)
    assert list(ann.concepts) == list(dict.fromkeys(m.cui for m in ann.mentions))
