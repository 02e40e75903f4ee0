from __future__ import annotations

from pathlib import Path

import pytest

from conceptsvc.errors import ConceptsvcError, ExtractionError
from conceptsvc.normalize import tokenize_spans
from conceptsvc.profile import Profile, available_profiles, load_profile, load_profile_file

CT, XR, MRI, US, ANGIO, PET = (
    "C0040405", "C1306645", "C0024485", "C0041618", "C0002978", "C0032743"
)
CHEST, LOWER_LIMB, SKULL = "C0817096", "C0023216", "C0037303"
AP, PA, SAGITTAL = "C1999039", "C1996865", "C0205129"


def apply(profile: Profile, text: str, mentioned: list[str]) -> tuple[set[str], tuple[str, ...]]:
    norms, starts, ends = tokenize_spans(text)
    res = profile.apply(mentioned, text, norms, starts, ends)
    return set(res.kept), res.inferred


def test_profile_shipped_profiles_validate() -> None:
    assert {"none", "rocov2"} <= set(available_profiles())
    assert load_profile("none").is_identity
    rocov2 = load_profile("rocov2")
    assert rocov2.vocabulary is not None and len(rocov2.vocabulary) == 1948
    assert [s.name for s in rocov2.model.slots] == ["modality", "region", "projection"]
    with pytest.raises(ExtractionError):
        load_profile("../none")
    with pytest.raises(ExtractionError):
        load_profile("missing")


def write(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(body, encoding="utf-8")
    return p


def test_profile_schema_rejects_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ExtractionError, match="invalid"):
        load_profile_file(write(tmp_path, "p1", "name: p1\ndescription: x\nslotz: []\n"))
    with pytest.raises(ExtractionError, match="invalid"):
        load_profile_file(write(tmp_path, "p2", "name: p2\ndescription: x\ndrop: [X123]\n"))
    with pytest.raises(ConceptsvcError):
        load_profile_file(write(
            tmp_path, "p3", "name: p3\ndescription: x\ndisambiguation:\n  type_preference: [T999]\n"
        ))
    with pytest.raises(ExtractionError, match="file name"):
        load_profile_file(write(tmp_path, "p4", "name: other\ndescription: x\n"))
    with pytest.raises(ExtractionError, match="twice"):
        load_profile_file(write(tmp_path, "p5", """
name: p5
description: x
slots:
  - {name: a, members: [{cui: C0000001}]}
  - {name: a, members: [{cui: C0000002}]}
"""))


TOY = """
name: toy
description: a two-slot toy
vocabulary: [C0000001, C0000002, C0000003, C0000010, C0000011, C0000099]
drop: [C0000099]
slots:
  - name: kind
    max: 1
    mention_weight: 3
    members:
      - cui: C0000001
        priority: 1
        evidence: [{weight: 1.0, terms: [alpha, AB]}]
      - cui: C0000002
        priority: 2
        evidence: [{weight: 1.0, terms: [beta gamma]}, {weight: 5.0, cuis: [C0000003]}]
    defaults: [{cui: C0000002}]
  - name: detail
    when: [C0000001]
    without_when: drop
    members:
      - cui: C0000010
        evidence: [{terms: [ten]}]
      - cui: C0000011
        evidence: [{terms: [eleven]}]
    defaults: [{cui: C0000011, when: [C0000001]}]
"""


@pytest.fixture
def toy(tmp_path: Path) -> Profile:
    return load_profile_file(write(tmp_path, "toy", TOY))


def test_profile_slot_evidence_priority_and_default(toy: Profile) -> None:
    # term evidence for both members, tie broken by priority
    assert apply(toy, "alpha and beta gamma", []) == ({"C0000001", "C0000011"},
                                                       ("C0000001", "C0000011"))
    # a mention outweighs a term
    assert apply(toy, "alpha", ["C0000002"])[0] == {"C0000002"}
    # concept evidence
    assert apply(toy, "alpha", ["C0000003"])[0] == {"C0000002", "C0000003"}
    # no evidence: the default is inferred
    assert apply(toy, "nothing here", []) == ({"C0000002"}, ("C0000002",))


def test_profile_capitalised_terms_need_capitals(toy: Profile) -> None:
    assert "C0000001" in apply(toy, "an AB view", [])[0]
    assert "C0000001" not in apply(toy, "an ab view", [])[0]


def test_profile_when_and_without_when(toy: Profile) -> None:
    # detail members only with C0000001; mentions of them are dropped otherwise
    assert apply(toy, "beta gamma ten", ["C0000010"])[0] == {"C0000002"}
    assert apply(toy, "alpha ten", ["C0000010"])[0] == {"C0000001", "C0000010"}


def test_profile_vocabulary_and_drop(toy: Profile) -> None:
    kept, _ = apply(toy, "alpha", ["C0000001", "C0000099", "C0009999"])
    assert kept == {"C0000001", "C0000011"}


ROCOV2_CASES = [
    ("Axial T2-weighted image of the brain.", [], {MRI}),
    ("FLAIR hyperintensity in the left frontal lobe.", [], {MRI}),
    ("Attenuation of 45 Hounsfield units.", [], {CT}),
    ("Colour Doppler of the carotid bifurcation.", [], {US}),
    ("PET/CT shows FDG-avid nodes.", [CT], {PET}),
    ("CT angiography of the aorta.", [CT, ANGIO], {CT}),
    ("Coronary angiography (RAO view).", [ANGIO], {ANGIO}),
    ("Chest X-ray on admission.", [CHEST, XR], {XR, CHEST, PA}),
    ("AP radiograph of the right knee.", [XR, AP], {XR, LOWER_LIMB, AP}),
    ("Lateral radiograph of the knee.", [XR], {XR, LOWER_LIMB, SAGITTAL}),
    ("Panoramic radiograph showing a periapical lesion.", [XR], {XR, SKULL}),
    ("CT of the chest in the sagittal plane.", [CT, CHEST, SAGITTAL], {CT}),
    ("Mass in the liver (arrow).", [], {CT}),
]


@pytest.mark.parametrize(("text", "mentioned", "expected"), ROCOV2_CASES)
def test_profile_rocov2_conventions(text: str, mentioned: list[str], expected: set[str]) -> None:
    kept, _ = apply(load_profile("rocov2"), text, mentioned)
    assert kept == expected
