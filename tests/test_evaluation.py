from __future__ import annotations

import json
from pathlib import Path

import pytest

from conceptsvc.cli import main
from conceptsvc.demo import GOLD_MANUAL
from conceptsvc.errors import DictionaryError, EvaluationError, MalformedRowError
from conceptsvc.evaluation import (
    DEFAULT_EDITION,
    SECONDARY_CUIS_BY_EDITION,
    f1,
    read_captions,
    read_concepts,
    score,
    secondary_cuis,
    write_concepts_csv,
)
from conceptsvc.index import ConceptIndex

CT, XR, MRI = "C0040405", "C1306645", "C0024485"
CHEST, SKULL = "C0817096", "C0037303"
AP = "C1999039"


def test_evaluation_f1_per_image() -> None:
    assert f1({"a", "b"}, {"a", "b"}) == 1.0
    assert f1(set(), {"a"}) == 0.0
    assert f1({"a", "x"}, {"a", "b", "c"}) == pytest.approx(2 * 1 / 5)


def test_evaluation_hand_computed_example() -> None:
    gold = {
        "i1": [XR, CHEST, AP, "C0018787"],  # 4 gold
        "i2": [CT, "C0027651"],
        "i3": [MRI],
        "i4": [],  # empty gold: the evaluator leaves the image out of the mean
    }
    manual = {"i1": [XR, CHEST, AP], "i2": [CT], "i3": [MRI], "i4": []}
    pred = {
        "i1": [XR, CHEST, "C0024109"],  # 2 of 4 right, 1 wrong: 2*2/(3+4) = 4/7
        "i2": [MRI, "C0027651"],  # 1 of 2: 2*1/4 = 1/2
        # i3 missing: scores 0
        "i4": ["C0000726"],  # not scored (no gold), not counted in micro either
        "extra": [CT],  # ignored (not in gold)
    }
    r = score(pred, gold, manual)
    assert r.n_images == 3
    assert r.primary_f1 == pytest.approx((4 / 7 + 1 / 2 + 0) / 3)
    # secondary: restricted to modality+region; AP is a projection, so i1 gold is {XR, CHEST}
    # i1: pred {XR, CHEST} -> 1; i2: pred {MRI} vs {CT} -> 0; i3: {} vs {MRI} -> 0; i4 skipped
    assert r.n_secondary == 3
    assert r.secondary_f1 == pytest.approx(1 / 3)
    # micro over scored images: tp = 2 + 1 = 3, fp = 1 + 1 = 2, fn = 2 + 1 + 1 = 4
    assert r.micro_precision == pytest.approx(3 / 5)
    assert r.micro_recall == pytest.approx(3 / 7)
    assert r.micro_f1 == pytest.approx(2 * 3 / (2 * 3 + 2 + 4))  # 2tp / (2tp + fp + fn)
    assert r.false_negatives[AP] == 1
    assert r.false_negatives[MRI] == 1
    assert r.false_positives[MRI] == 1
    assert r.false_positives["C0000726"] == 0
    assert r.missing_predictions == 1


def test_evaluation_empty_gold_is_left_out_as_the_imageclef_evaluator_does() -> None:
    # The evaluator takes an image whose gold is empty out of the mean (``max_score -= 1``),
    # whatever was predicted for it; the secondary score does the same with the restricted gold.
    gold = {"i1": [CT], "i2": [], "i3": []}
    r = score({"i1": [CT], "i2": [], "i3": ["C0018787", XR]}, gold, gold)
    assert (r.n_images, r.primary_f1) == (1, 1.0)
    assert (r.n_secondary, r.secondary_f1) == (1, 1.0)
    assert r.micro_precision == 1.0  # i3's predictions are not false positives
    r = score({"i1": [MRI], "i2": [XR]}, gold, gold)
    assert (r.n_images, r.primary_f1, r.secondary_f1) == (1, 0.0, 0.0)


def test_evaluation_secondary_skips_images_without_restricted_gold() -> None:
    gold = {"i1": [AP, "C0018787"], "i2": [SKULL, XR]}
    manual = {"i1": [AP], "i2": [SKULL, XR]}
    # i1: the projection AP is outside the list, so its restricted gold is empty: skipped
    r = score({"i1": [CT], "i2": [XR]}, gold, manual)
    assert r.n_secondary == 1
    assert r.secondary_f1 == pytest.approx(2 * 1 / 3)
    assert score({"i1": [AP]}, gold).secondary_f1 is None


def test_evaluation_cuis_compared_upper_cased() -> None:
    # the ImageCLEF evaluator upper-cases both sides before comparing
    gold = {"i1": [CT, CHEST.lower()], "i2": [MRI]}
    pred = {"i1": [CT.lower(), CHEST], "i2": ["c0024485"]}
    r = score(pred, gold, gold)
    assert r.primary_f1 == 1.0
    assert r.secondary_f1 == 1.0  # lower-case listed CUIs are still listed
    assert r.micro_f1 == 1.0
    assert set(r.true_positives) == {CT, CHEST, MRI}
    assert not r.false_positives and not r.false_negatives


def test_evaluation_duplicate_predictions_count_once(tmp_path: Path) -> None:
    gold = {"i1": [CT]}
    # the evaluator asks "is this concept predicted?", so a repeat adds nothing, even one that
    # differs only in case
    r = score({"i1": [CT, CT, CHEST, CT.lower()]}, gold, gold)
    assert r.primary_f1 == pytest.approx(2 * 1 / (2 + 1))
    assert r.secondary_f1 == pytest.approx(2 * 1 / (2 + 1))
    assert (r.micro_precision, r.micro_recall) == (pytest.approx(1 / 2), 1.0)
    assert r.true_positives[CT] == 1
    assert r.false_positives == {CHEST: 1}
    # the same through a submission file that repeats a concept
    sub = tmp_path / "p.csv"
    sub.write_text(f"ID,CUIs\ni1,{CT};{CHEST};{CT}\n", encoding="utf-8")
    assert score(read_concepts(sub), gold).primary_f1 == pytest.approx(2 / 3)


def test_evaluation_secondary_cuis_of_imageclefmedical_2023_and_2024() -> None:
    # The manually validated concepts scored by ImageCLEFmedical Caption 2023 and 2024 (both
    # on ROCOv2): six imaging modalities and eight X-ray body regions.
    listed_2023 = frozenset({
        "C0040405",  # X-Ray Computed Tomography
        "C1306645",  # Plain x-ray
        "C0024485",  # Magnetic Resonance Imaging
        "C0041618",  # Ultrasonography
        "C0002978",  # angiogram
        "C0032743",  # Positron-Emission Tomography
        "C0817096",  # Chest
        "C0037303",  # Bone structure of cranium
        "C0023216",  # Lower Extremity
        "C0000726",  # Abdomen
        "C0030797",  # Pelvis
        "C1140618",  # Upper Extremity
        "C0037949",  # Vertebral column
        "C0006141",  # Breast
    })
    assert secondary_cuis(2023) == listed_2023
    assert secondary_cuis(2024) == listed_2023
    assert sorted(SECONDARY_CUIS_BY_EDITION) == [2023, 2024]
    assert DEFAULT_EDITION == 2024  # ROCOv2 is the 2024 edition's data set
    assert secondary_cuis() == secondary_cuis(2024)
    # the shipped ROCOv2 manual concepts are exactly the list plus the X-ray projections,
    # which the secondary score leaves out
    shipped = {c for cuis in read_concepts(GOLD_MANUAL).values() for c in cuis}
    projections = {AP, "C1996865", "C0205129", "C0205106"}
    assert shipped == listed_2023 | projections
    with pytest.raises(EvaluationError) as exc:
        secondary_cuis(2025)
    assert exc.value.code == "E700"
    assert "2023, 2024" in str(exc.value)
    with pytest.raises(EvaluationError):
        score({}, {}, edition=2022)


def test_evaluation_readers_agree(tmp_path: Path) -> None:
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('ID,CUIs\r\ni1,C0040405;C0817096\r\n"i2",\r\n', encoding="utf-8")
    tsv = tmp_path / "p.tsv"
    tsv.write_text("i1\tC0040405;C0817096\ni2\t\n", encoding="utf-8")
    roco = tmp_path / "p.roco"
    roco.write_text("i1\t\tC0040405\tC0817096\ni2\t\n", encoding="utf-8")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"id": "i1", "concepts": [CT, CHEST], "mentions": []})
        + "\n"
        + json.dumps({"id": "i2", "mentions": []})
        + "\n",
        encoding="utf-8",
    )
    expected = {"i1": [CT, CHEST], "i2": []}
    for p in (csv_file, tsv, roco, jsonl):
        assert read_concepts(p) == expected, p.name


def test_evaluation_reader_reports_malformed_rows(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,CUIs\ni1,C1,C2\n", encoding="utf-8")
    with pytest.raises(MalformedRowError) as exc:
        read_concepts(bad)
    assert exc.value.line == 2
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"id": "i1", "concepts": []}\n{oops\n', encoding="utf-8")
    with pytest.raises(MalformedRowError) as exc2:
        read_concepts(bad_json)
    assert exc2.value.line == 2


def test_evaluation_reader_refuses_what_is_not_a_concepts_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files of another kind are refused with a coded error, never scored as empty
    predictions (F1 0) and never a traceback; a gzipped concepts file is read."""
    import gzip

    good = tmp_path / "p.csv"
    good.write_text("ID,CUIs\ni1,C0040405;C0817096\n", encoding="utf-8")
    gz = tmp_path / "p.csv.gz"
    gz.write_bytes(gzip.compress(good.read_bytes()))
    assert read_concepts(gz) == read_concepts(good) == {"i1": [CT, CHEST]}
    captions = tmp_path / "captions.csv"
    captions.write_text('ID,Caption\ni1,"Chest CT shows a mass."\n', encoding="utf-8")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": "i1", "caption": "Chest CT"}) + "\n", encoding="utf-8")
    parquet = tmp_path / "p.parquet"
    parquet.write_bytes(b"PAR1" + bytes(range(256)) + b"PAR1")
    binary = tmp_path / "p.bin"
    binary.write_bytes(b"i1,\xf8\xff\n")
    for path, why in [
        (captions, "'Chest CT shows a mass.' is not a concept id"),
        (inputs, "neither 'concepts' nor 'mentions'"),
        (parquet, "is Parquet, which evaluate does not read"),
        (binary, "is not UTF-8 text"),
    ]:
        with pytest.raises(DictionaryError, match=why):
            read_concepts(path)
        assert main(["evaluate", "--pred", str(path), "--gold", str(good)]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err, err
        assert "--on-error skip" not in err  # build advice belongs to index builds


def test_evaluation_captions_and_prediction_round_trip(tmp_path: Path) -> None:
    caps = tmp_path / "c.csv"
    caps.write_text('ID,Caption\ni1,"CT, axial"\ni2,MRI\n', encoding="utf-8")
    assert read_captions(caps) == [("i1", "CT, axial"), ("i2", "MRI")]
    out = tmp_path / "pred.csv"
    write_concepts_csv(out, [("i1", [CT, CHEST]), ("i2", [])])
    assert read_concepts(out) == {"i1": [CT, CHEST], "i2": []}


def test_evaluation_cli_pred_and_local(
    tmp_path: Path, engine_index_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    caps = tmp_path / "c.csv"
    caps.write_text(
        'ID,Caption\ni1,"Chest X-ray, AP view."\ni2,"Axial CT: pleural effusion."\n',
        encoding="utf-8",
    )
    gold = tmp_path / "g.csv"
    gold.write_text(f"ID,CUIs\ni1,{XR};{CHEST};{AP}\ni2,{CT};C0032227\n", encoding="utf-8")
    pred = tmp_path / "pred.csv"
    rc = main([
        "evaluate", "--local", "--index", str(engine_index_path), "--captions", str(caps),
        "--gold", str(gold), "--manual", str(gold), "--write-predictions", str(pred), "--json",
    ])
    assert rc == 0
    local = json.loads(capsys.readouterr().out)
    assert local["primary_f1"] == 1.0
    assert read_concepts(pred)["i2"] == [CT, "C0032227"]
    rc = main(["evaluate", "--pred", str(pred), "--gold", str(gold), "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["primary_f1"] == 1.0
    assert main(["evaluate", "--local", "--gold", str(gold)]) == 2


def test_evaluation_headers_other_than_id_cuis_and_repeated_ids(tmp_path: Path) -> None:
    """A first row naming the id or concepts column in other words than ID,CUIs is a header
    (it was scored as an image "image_id" with concept "CUIS"); an image id given twice is a
    malformed row at its line, as the ImageCLEF evaluator refuses it."""
    for header in ("image_id,cuis", "Image,Concepts", "\ufeffid,labels"):
        f = tmp_path / "h.csv"
        f.write_text(f"{header}\nA,{CT};{CHEST}\nB,{XR}\n", encoding="utf-8")
        assert read_concepts(f) == {"A": [CT, CHEST], "B": [XR]}, header
    f = tmp_path / "h.tsv"
    f.write_text(f"\nimage_id\tcuis\nA\t{CT}\n", encoding="utf-8")
    assert read_concepts(f) == {"A": [CT]}
    f = tmp_path / "noheader.csv"
    f.write_text(f"A,{CT}\nB,{XR}\n", encoding="utf-8")
    assert read_concepts(f) == {"A": [CT], "B": [XR]}
    for name, text in (("d.csv", f"ID,CUIs\nA,{CT}\nB,{XR}\nA,{CHEST}\n"),
                       ("d.tsv", f"A\t{CT}\nA\t{XR}\n"),
                       ("d.jsonl", '{"id": "A", "concepts": []}\n{"id": "A", "concepts": []}\n')):
        f = tmp_path / name
        f.write_text(text, encoding="utf-8")
        with pytest.raises(MalformedRowError, match="image id 'A' again"):
            read_concepts(f)


def test_evaluation_cli_reports_ids_the_gold_does_not_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Predicted ids that are not gold ids are counted; when none is, the run fails instead of
    reporting an F1 of 0 (ids of another split, or rewritten ids)."""
    gold = tmp_path / "g.csv"
    gold.write_text(f"ID,CUIs\ni1,{CT}\ni2,{XR}\n", encoding="utf-8")
    pred = tmp_path / "p.csv"
    pred.write_text(f"ID,CUIs\ni1,{CT}\nx9,{XR}\n", encoding="utf-8")
    assert main(["evaluate", "--pred", str(pred), "--gold", str(gold)]) == 0
    out = capsys.readouterr().out
    assert "not in the gold    1 predicted images" in out and "no prediction for  1" in out
    assert main(["evaluate", "--pred", str(pred), "--gold", str(gold), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unscored_predictions"] == 1
    pred.write_text(f"ID,CUIs\nx1,{CT}\nx2,{XR}\n", encoding="utf-8")
    assert main(["evaluate", "--pred", str(pred), "--gold", str(gold)]) == 2
    err = capsys.readouterr().err
    assert "E700" in err and "none of the 2 predicted image ids is a gold image id" in err


def test_evaluation_cli_local_reads_what_annotate_reads(
    tmp_path: Path, engine_index_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--local --captions takes annotate's inputs (gzipped CSV, ROCO TSV, JSONL) and refuses
    a repeated id with its line, instead of a traceback or index-build advice."""
    import gzip

    gold = tmp_path / "g.csv"
    gold.write_text(f"ID,CUIs\ni1,{XR};{CHEST};{AP}\ni2,{CT};C0032227\n", encoding="utf-8")
    base = ["evaluate", "--local", "--index", str(engine_index_path), "--gold", str(gold),
            "--json"]
    inputs = {
        "c.csv.gz": gzip.compress(b'ID,Caption\ni1,"Chest X-ray, AP view."\n'
                                  b'i2,"Axial CT: pleural effusion."\n'),
        "c.tsv": b"i1\t Chest X-ray, AP view.\ni2\t Axial CT: pleural effusion.\n",
        "c.jsonl": b'{"id": "i1", "text": "Chest X-ray, AP view."}\n'
                   b'{"id": "i2", "text": "Axial CT: pleural effusion."}\n',
    }
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
        assert main([*base, "--captions", str(tmp_path / name)]) == 0, name
        assert json.loads(capsys.readouterr().out)["primary_f1"] == 1.0, name
    dup = tmp_path / "dup.csv"
    dup.write_text("ID,Caption\ni1,CT chest\ni1,MRI brain\n", encoding="utf-8")
    assert main([*base, "--captions", str(dup)]) == 2
    err = capsys.readouterr().err
    assert "E700" in err and f"{dup}:3" in err and "--on-error skip" not in err


def test_issue_16_evaluate_never_writes_predictions_over_its_inputs(
    tmp_path: Path, engine_index_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    caps = tmp_path / "c.csv"
    caps.write_text('ID,Caption\ni1,"Chest X-ray, AP view."\n', encoding="utf-8")
    gold = tmp_path / "g.csv"
    gold.write_text(f"ID,CUIs\ni1,{XR};{CHEST};{AP}\n", encoding="utf-8")
    (tmp_path / "g-link.csv").symlink_to(gold)
    base = ["evaluate", "--local", "--index", str(engine_index_path), "--captions", str(caps),
            "--gold", str(gold)]
    for target, flag in ((caps, "captions"), (gold, "gold"), (tmp_path / "g-link.csv", "gold")):
        before = {p: p.read_bytes() for p in (caps, gold)}
        assert main([*base, "--write-predictions", str(target)]) == 2
        err = capsys.readouterr().err
        assert "E001" in err and f"--write-predictions {target} is the --{flag} file" in err
        assert {p: p.read_bytes() for p in (caps, gold)} == before


def test_evaluation_cli_names_the_top_errors(
    tmp_path: Path, engine_index_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gold = tmp_path / "g.csv"
    gold.write_text(f"ID,CUIs\ni1,{CT};{CHEST}\ni2,{CT}\n", encoding="utf-8")
    pred = tmp_path / "p.csv"
    pred.write_text(f"ID,CUIs\ni1,{XR}\ni2,{CT};C9999999\n", encoding="utf-8")
    rc = main(["evaluate", "--pred", str(pred), "--gold", str(gold),
               "--index", str(engine_index_path), "--top", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    fn = out.split("top 3 false negatives:")[1].split("top 3 false positives:")[0]
    fp = out.split("top 3 false positives:")[1]
    ct_name = ConceptIndex.load(engine_index_path).concept(CT)
    assert ct_name is not None
    assert f"{CT}       1  {ct_name.preferred_name}" in fn
    assert "C9999999       1  (not in the index)" in fp


def test_evaluation_cli_edition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gold = tmp_path / "g.csv"
    gold.write_text(f"ID,CUIs\ni1,{XR};{CHEST};{AP}\ni2,{CT}\n", encoding="utf-8")
    pred = tmp_path / "p.csv"
    pred.write_text(f"ID,CUIs\ni1,{XR};{AP}\ni2,{CT}\n", encoding="utf-8")
    base = ["evaluate", "--pred", str(pred), "--gold", str(gold), "--manual", str(gold)]
    assert main([*base, "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["edition"] == 2024
    # i1: {XR} vs {XR, CHEST} -> 2/3 (AP is not listed); i2: 1
    assert default["secondary_f1"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)
    assert main([*base, "--edition", "2023", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edition"] == 2023
    assert main([*base, "--edition", "2023", "--top", "0"]) == 0
    assert "ImageCLEFmedical 2023 list" in capsys.readouterr().out
    # an edition whose list conceptsvc does not have is refused before anything is scored
    assert main([*base, "--edition", "2025"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "conceptsvc: [E700] unknown ImageCLEFmedical edition 2025" in captured.err
    assert "--edition 2023 or --edition 2024" in captured.err


def test_evaluation_cli_reads_predictions_or_captions_from_stdin(
    tmp_path: Path, engine_index_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`annotate ... --out - | evaluate --pred -`: predictions (or --local captions) from
    standard input; two inputs cannot both be it."""
    import io

    gold = tmp_path / "g.csv"
    gold.write_text(f"ID,CUIs\ni1,{CT}\ni2,{XR}\n", encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(
        f'{{"id": "i1", "concepts": ["{CT}"]}}\n{{"id": "i2", "concepts": ["{XR}"]}}\n'.encode()
    )))
    assert main(["evaluate", "--pred", "-", "--gold", str(gold), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["primary_f1"] == 1.0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(
        b'ID,Caption\ni1,"Axial CT: pleural effusion."\ni2,"Chest X-ray, AP view."\n'
    )))
    assert main(["evaluate", "--local", "--index", str(engine_index_path), "--captions", "-",
                 "--gold", str(gold), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["micro_recall"] == 1.0
    assert main(["evaluate", "--pred", "-", "--gold", "-"]) == 2
    assert "--pred and --gold are both '-'" in capsys.readouterr().err
