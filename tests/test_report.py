from __future__ import annotations

from pathlib import Path

from conceptsvc.client.report import ReportBuilder, render_markdown, render_table, write_report
from conceptsvc.model import Annotation, Mention

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def m(cui: str, name: str, types: tuple[str, ...]) -> Mention:
    return Mention(cui, name, name.lower(), 0, len(name), 1.0, types, "TEST")


C1 = ("C0000001", "Pneumonia", ("T047",))
C2 = ("C0000002", "Lung", ("T023",))
C3 = ("C0000003", "Computed tomography", ("T060",))
C4 = ("C0000004", "Lung lesion", ("T023", "T047"))

# Hand-computed below: concepts per caption 2, 1, 0, 3, 1.
KNOWN = [
    Annotation("a", (m(*C1), m(*C2), m(*C1)), ("C0000001", "C0000002")),
    Annotation("b", (m(*C1),), ("C0000001",)),
    Annotation("c", (), ()),
    Annotation("d", (m(*C3), m(*C1), m(*C4)), ("C0000003", "C0000001", "C0000004")),
    Annotation("e", (), ("C0000005",)),  # inferred by a profile: no mention
]


def describe(cui: str) -> tuple[str, tuple[str, ...]] | None:
    return ("Radiotherapy", ("T061",)) if cui == "C0000005" else None


def test_report_numbers_on_a_known_corpus() -> None:
    r = ReportBuilder().add_all(KNOWN).build(describe=describe)
    assert (r.captions, r.with_concepts, r.without_concepts) == (5, 4, 1)
    assert (r.concept_occurrences, r.distinct_concepts, r.mentions) == (7, 5, 7)
    assert r.mean == 7 / 5 and r.median == 1.0
    assert r.distribution == {0: 1, 1: 2, 2: 1, 3: 1}
    assert [(c.cui, c.captions) for c in r.top] == [
        ("C0000001", 3), ("C0000002", 1), ("C0000003", 1), ("C0000004", 1), ("C0000005", 1),
    ]
    assert r.top[0].name == "Pneumonia" and r.top[4].name == "Radiotherapy"
    assert r.top[4].semantic_types == ("T061",)
    assert [(t.tui, t.group, t.count) for t in r.semantic_types] == [
        ("T047", "DISO", 4), ("T023", "ANAT", 2), ("T060", "PROC", 1), ("T061", "PROC", 1),
    ]
    assert [(g.code, g.count) for g in r.semantic_groups] == [
        ("DISO", 4), ("ANAT", 2), ("PROC", 2),
    ]
    assert r.semantic_types[0].name == "Disease or Syndrome"
    assert r.semantic_groups[0].name == "Disorders"


def test_report_without_describe_counts_unknown_concepts() -> None:
    r = ReportBuilder().add_all(KNOWN).build()
    assert r.top[4].name == "" and r.top[4].semantic_types == ()
    assert ("UNKNOWN", 1) in [(g.code, g.count) for g in r.semantic_groups]


def test_report_median_of_an_even_count_and_empty_corpus() -> None:
    anns = [Annotation(str(i), (), tuple(f"C{j:07d}" for j in range(i))) for i in range(4)]
    assert ReportBuilder().add_all(anns).build().median == 1.5
    empty = ReportBuilder().build()
    assert (empty.captions, empty.mean, empty.median, empty.top) == (0, 0.0, 0.0, [])
    assert "captions                 0" in render_table(empty)


def test_report_table_and_markdown() -> None:
    r = ReportBuilder().add_all(KNOWN).build(describe=describe)
    table = render_table(r)
    assert "with concepts            4 (80.0%)" in table
    assert "without concepts         1 (20.0%)" in table
    assert "mean 1.40, median 1" in table
    assert "C0000001  Pneumonia" in table
    assert "DISO   Disorders" in table
    md = render_markdown(r, images={"Top": "x.png"})
    assert "| concepts per caption, mean | 1.40 |" in md
    assert "| 1 | C0000001 | Pneumonia | 3 | 60.0% | T047 |" in md
    assert "![Top](x.png)" in md


def test_report_writes_markdown_and_png_plots(tmp_path: Path) -> None:
    many = [
        Annotation(str(i), (), tuple(f"C{j:07d}" for j in range(i % 40 + 1)))
        for i in range(120)
    ]
    r = ReportBuilder().add_all(many + KNOWN).build(describe=describe)
    assert len(r.top) == 30
    assert r.distribution[40] == 3 and max(r.distribution) == 40
    files = write_report(r, tmp_path / "run.jsonl")
    assert files.markdown == tmp_path / "run.jsonl.report.md"
    for png in (files.histogram, files.top_concepts):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    md = files.markdown.read_text()
    assert f"]({files.histogram.name})" in md and f"]({files.top_concepts.name})" in md
    assert "| 25+ |" in md  # the long tail is bucketed
