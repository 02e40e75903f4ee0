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


def _own_profile(directory: Path, name: str, modality_term: str = "zorbography") -> Path:
    """A profile file of one's own: the rocov2 profile renamed, with one more evidence term
    for MRI (so that its effect shows)."""
    text = (Path(__file__).parent.parent / "conceptsvc" / "profiles" / "rocov2.yaml").read_text(
        encoding="utf-8"
    )
    assert text.count("\nname: rocov2\n") == 1
    path = directory / f"{name}.yaml"
    path.write_text(text.replace("\nname: rocov2\n", f"\nname: {name}\n"), encoding="utf-8")
    return path


def test_profile_files_of_ones_own_are_registered_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A profile file is registered under its name (the file name), beside the shipped ones;
    the same file again is a no-op, a shipped profile's name or a second file of the same name
    is refused; an Extractor serves the profiles there were when it was made."""
    import conceptsvc.profile as profile_module
    from conceptsvc.embedded import demo_index
    from conceptsvc.extractor import Extractor
    from conceptsvc.model import ExtractOptions
    from conceptsvc.profile import register_profile_file

    monkeypatch.setattr(profile_module, "_REGISTERED", {})  # this test's registrations only
    index = demo_index()
    before = Extractor(index)
    own = register_profile_file(_own_profile(tmp_path, "myprof"))
    assert own.name == "myprof" and load_profile("myprof") is own
    assert available_profiles() == ["myprof", "none", "rocov2"]
    assert register_profile_file(tmp_path / "myprof.yaml") is not None  # again: a no-op
    (tmp_path / "other").mkdir()
    with pytest.raises(ExtractionError, match="two profile files are named 'myprof'"):
        register_profile_file(_own_profile(tmp_path / "other", "myprof"))
    with pytest.raises(ExtractionError, match="as a shipped profile is"):
        register_profile_file(_own_profile(tmp_path / "other", "rocov2"))
    text = "Axial T2-weighted image shows a pleural effusion."
    after = Extractor(index)
    assert "myprof" in after.profiles() and "myprof" not in before.profiles()
    assert (after.extract(text, ExtractOptions(profile="myprof")).concepts
            == after.extract(text, ExtractOptions(profile="rocov2")).concepts)
    with pytest.raises(ExtractionError, match="registered after this Extractor was made"):
        before.extract(text, ExtractOptions(profile="myprof"))
    with pytest.raises(ExtractionError, match="unknown profile 'nosuch'"):
        after.extract(text, ExtractOptions(profile="nosuch"))


def test_profile_files_in_the_cli_and_the_service_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--profile FILE.yaml` with --local (lookup, evaluate) uses one's own profile, and is
    refused for a service, which serves the `profile_files` it was started with, by name (a
    default profile may be one of them; a bad file is refused at start-up)."""
    import json

    import conceptsvc.profile as profile_module
    from conceptsvc.cli import main
    from conceptsvc.config import load_settings
    from conceptsvc.errors import ConfigError

    monkeypatch.setattr(profile_module, "_REGISTERED", {})
    path = _own_profile(tmp_path, "myprof")
    text = "Axial T2-weighted image shows a pleural effusion."
    assert main(["lookup", text, "--local", "--profile", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["concepts"] == ["C0032227", "C0024485"]
    assert main(["lookup", text, "--target", "127.0.0.1:1", "--profile", str(path)]) == 2
    assert "a service serves the profiles it was started with" in capsys.readouterr().err
    settings = load_settings(profile_files=str(path), defaults={"profile": "myprof"})
    assert settings.defaults.profile == "myprof" and settings.profile_files == (path,)
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\nslots: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"profile_files.*broken\.yaml is invalid"):
        load_settings(profile_files=str(bad))


def test_profile_files_served_by_name_through_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service started with `profile_files` lists them in GetInfo and answers requests that
    name them, as it does the shipped ones."""
    import conceptsvc.profile as profile_module
    from conceptsvc.client.service import ConceptClient
    from conceptsvc.config import load_settings
    from conceptsvc.model import ExtractOptions
    from conceptsvc.server.app import create_server

    monkeypatch.setattr(profile_module, "_REGISTERED", {})
    settings = load_settings(port=0, workers=1, host="127.0.0.1",
                             profile_files=str(_own_profile(tmp_path, "myprof")))
    server, port = create_server(settings)
    server.start()
    try:
        with ConceptClient(f"127.0.0.1:{port}") as client:
            assert "myprof" in client.get_info().profiles
            a = client.annotate("Axial T2-weighted image shows a pleural effusion.",
                                options=ExtractOptions(profile="myprof"))
            assert a.concepts == ("C0032227", "C0024485")
    finally:
        server.stop(0)
