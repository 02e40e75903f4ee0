from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conceptsvc.normalize import (
    STOPWORDS,
    normalize_term,
    normalize_token,
    tokenize,
    tokenize_spans,
    tokenize_spans_py,
)


def norms(text: str) -> list[str]:
    return [t.norm for t in tokenize(text)]


def test_normalize_hyphens_slashes_apostrophes() -> None:
    assert norms("T2-weighted") == ["t2", "weighted"]
    assert norms("X-ray") == ["x", "ray"]
    assert norms("CT-scan") == ["ct", "scan"]
    assert norms("PET/CT") == ["pet", "ct"]
    assert norms("patient's") == ["patient"]
    assert norms("Crohn’s disease") == ["crohn", "disease"]


def test_normalize_plurals() -> None:
    assert norms("cysts metastases vertebrae diverticula") == [
        "cyst", "metastasis", "vertebra", "diverticulum",
    ]
    assert norms("arteries masses stenoses bronchi apices") == [
        "artery", "mass", "stenosis", "bronchus", "apex",
    ]
    # singular forms are fixed points
    assert norms("pelvis pancreas thorax virus abscess") == [
        "pelvis", "pancreas", "thorax", "virus", "abscess",
    ]
    # short tokens are abbreviations, never singularised; an acronym's plural is the acronym
    assert norms("US CTs MRIs") == ["us", "ct", "mri"]
    assert norms("X-rays kidneys airways") == ["x", "ray", "kidney", "airway"]
    # -us singulars: "paranasal sinuses" must meet "Paranasal sinus"; other -uses are -use
    assert norms("sinuses viruses fetuses causes uses") == [
        "sinus", "virus", "fetus", "cause", "use",
    ]


def test_normalize_british_american() -> None:
    assert normalize_term("Haemorrhage") == normalize_term("hemorrhage")
    assert normalize_term("oedema") == normalize_term("edema")
    assert normalize_term("oesophageal tumour") == normalize_term("esophageal tumor")
    assert normalize_term("paediatric") == "pediatric"


def test_normalize_unicode_forms() -> None:
    assert norms("ﬁbrosis") == ["fibrosis"]
    assert norms("ＣＴ") == ["ct"]
    assert norms("café") == norms("cafe\u0301") == ["cafe"]


def test_tokenize_offsets_slice_original() -> None:
    text = "Axial ＣＴ of the ﬁbrotic lungs — haemorrhage (arrow)."
    for tok in tokenize(text):
        assert normalize_token(text[tok.start : tok.end]) == tok.norm


def test_stopwords_are_normalised() -> None:
    assert all(normalize_token(w) == w for w in STOPWORDS)


@given(st.text(max_size=200))
def test_normalize_term_idempotent(text: str) -> None:
    once = normalize_term(text)
    assert normalize_term(once) == once


@given(st.text(max_size=200))
def test_tokenize_offsets_property(text: str) -> None:
    last = 0
    for tok in tokenize(text):
        assert last <= tok.start < tok.end <= len(text)
        assert normalize_token(text[tok.start : tok.end]) == tok.norm
        last = tok.end


@given(st.text(max_size=200))
def test_tokenize_spans_equals_tokenize(text: str) -> None:
    toks = tokenize(text)
    assert tokenize_spans(text) == (
        [t.norm for t in toks], [t.start for t in toks], [t.end for t in toks]
    )


@given(st.text(alphabet="abcXYZ09'’ -./(),é", max_size=120))
def test_tokenize_spans_ascii_fast_path_matches_unicode_path(text: str) -> None:
    toks = tokenize(text)
    want = ([t.start for t in toks], [t.end for t in toks])
    # the bound name (compiled when built) and the Python reference's own ASCII branch
    for name, spans in (("bound", tokenize_spans), ("reference", tokenize_spans_py)):
        _norms, starts, ends = spans(text)
        assert (starts, ends) == want, name
