"""The HTML pages of ``lookup --html`` and ``annotate --report``, checked as written and as a real
browser renders them.

The browser tests open the page in headless Chromium (Debian's ``chromium``, which
``make install`` installs), read back the DOM it built, and check every highlighted mention
against the annotation the same command produced: its CUI, its code-point offsets and the text
under it. Chromium's console must stay silent (a script error or a blocked fetch would show
there), and a screenshot of each page is kept in ``test-artefacts/`` to look at.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conceptsvc.cli import main
from conceptsvc.client.html_page import AnnotatedCaption, caption_html, group_of, lookup_page
from conceptsvc.model import Annotation, Mention
from conceptsvc.semantic_network import load_semantic_network

ARTEFACTS = Path(__file__).parent.parent / "test-artefacts"
# An astral character before the mentions (one code point, two UTF-16 units: offsets must stay
# code points), markup-like text to escape, a CR to keep, a negated mention, and overlapping
# mentions ("pleural effusion" / "effusion" with --overlap all).
CAPTION = ("𝛼-view 😀 <b>&amp;</b>\r\nNo pneumonia or pleural effusion; "
           "CT of the chest shows a mass in the right lower lobe of the lung.")


# -- reading a page back --------------------------------------------------------------------------
@dataclass
class Seg:
    start: int
    end: int
    text: str = ""
    bars: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Caption:
    id: str
    segs: list[Seg] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segs)


class PageReader(HTMLParser):
    """The captions (segments with their bars), images and console-error marks of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.captions: list[Caption] = []
        self.images: list[str] = []
        self.stray_text: list[str] = []  # text inside a caption but outside any segment
        self._caption: Caption | None = None
        self._seg: Seg | None = None
        self._depth = 0  # open spans inside the current caption div

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "div" and "caption" in classes:
            self._caption = Caption(a["data-id"])
            self.captions.append(self._caption)
        elif self._caption is not None and tag == "span":
            self._depth += 1
            if "seg" in classes:
                self._seg = Seg(int(a["data-start"]), int(a["data-end"]))
                self._caption.segs.append(self._seg)
            elif "bar" in classes:
                assert self._seg is not None, "a bar outside a segment"
                self._seg.bars.append(a)

    def handle_endtag(self, tag: str) -> None:
        if self._caption is None:
            return
        if tag == "span":
            self._depth -= 1
            if self._depth == 0:
                self._seg = None
        elif tag == "div":
            self._caption = None

    def handle_data(self, data: str) -> None:
        if self._seg is not None:
            self._seg.text += data
        elif self._caption is not None:
            self.stray_text.append(data)


def read_page(html: str) -> PageReader:
    reader = PageReader()
    reader.feed(html)
    reader.close()
    return reader


def check_caption(c: Caption, text: str, mentions: list[dict[str, Any]]) -> None:
    """The rendered caption is exactly ``text``, and its highlighted mentions are exactly
    ``mentions`` (JSON output objects), each over exactly its own text."""
    assert c.text == text
    pos = 0
    for s in c.segs:  # segments tile the caption, offsets in code points
        assert s.start == pos and s.end > s.start and s.text == text[s.start:s.end]
        pos = s.end
    assert pos == len(text)
    by_id: dict[str, list[tuple[Seg, dict[str, str]]]] = {}
    for s in c.segs:
        tracks = [b["style"].split(";")[0] for b in s.bars]
        assert len(set(tracks)) == len(tracks), f"overlapping bars share a track at {s.start}"
        for b in s.bars:
            by_id.setdefault(b["data-mention"], []).append((s, b))
    sn = load_semantic_network()
    drawn: Counter[tuple[int, int, str, bool, str]] = Counter()
    for parts in by_id.values():
        first = parts[0][1]
        start, end = int(first["data-start"]), int(first["data-end"])
        assert parts[0][0].start == start and parts[-1][0].end == end
        assert "".join(s.text for s, _ in parts) == text[start:end]
        assert [("first" in b["class"].split()) for _, b in parts] == [True] + [False] * (
            len(parts) - 1)
        assert all(b["data-cui"] == first["data-cui"] for _, b in parts)
        assert first["data-cui"] in first["data-label"]
        assert ("negated" in first["class"].split()) == (first["data-negated"] == "true")
        drawn[(start, end, first["data-cui"], first["data-negated"] == "true",
               first["data-group"])] += 1
    expected = Counter(
        (m["start"], m["end"], m["cui"], m["negated"],
         sn.group_of(m["semantic_types"][0]) if m["semantic_types"] else "UNKNOWN")
        for m in mentions
    )
    assert drawn == expected


# -- Chromium ---------------------------------------------------------------------------------
def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("chromium not found: `make install` installs Debian's chromium package "
                "(make system-deps); the HTML pages are checked in a real browser")


@dataclass
class Rendered:
    dom: str
    console: list[str]


def in_chromium(page: Path, profile: Path, screenshot: Path | None = None) -> Rendered:
    """The DOM Chromium builds from ``page``, and what the page wrote to its console."""
    base = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
    ]
    url = page.resolve().as_uri()
    # Bytes, not text=True: universal newlines would turn the caption's CR LF into LF.
    proc = subprocess.run([*base, "--dump-dom", url], capture_output=True, timeout=60,
                          check=False)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, stderr[-2000:]
    # Every console message (errors, warnings, CSP refusals, uncaught exceptions) is logged
    # as a CONSOLE line; the page has no script, so any line at all is a fault.
    console = [line for line in stderr.splitlines() if ":CONSOLE" in line]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run(
            [*base, f"--screenshot={screenshot}", "--window-size=1200,900",
             "--hide-scrollbars", url],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert screenshot.read_bytes().startswith(b"\x89PNG")
    return Rendered(proc.stdout.decode("utf-8"), console)


def test_html_page_lookup_in_chromium_highlights_every_mention(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], demo_index_dir: Path
) -> None:
    page = tmp_path / "lookup.html"
    code = main(["lookup", CAPTION, "--local", "--index", str(demo_index_dir), "--overlap", "all",
                 "--json", "--html", str(page)])
    out, err = capsys.readouterr()
    assert code == 0 and f"wrote {page}" in err
    mentions = json.loads(out)["mentions"]
    # The caption exercises what it should: a negated mention and overlapping ones.
    assert any(m["negated"] for m in mentions)
    assert any(a["start"] < b["start"] < a["end"] for a in mentions for b in mentions)

    written = read_page(page.read_text(encoding="utf-8"))
    assert len(written.captions) == 1
    check_caption(written.captions[0], CAPTION, mentions)

    shown = in_chromium(page, tmp_path / "profile", ARTEFACTS / "lookup.png")
    assert shown.console == []
    dom = read_page(shown.dom)
    assert len(dom.captions) == 1 and not "".join(dom.stray_text).strip()
    check_caption(dom.captions[0], CAPTION, mentions)


def test_html_page_report_in_chromium(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    rows = [
        ("r1", "No pneumonia. Pleural effusion in the left lung."),
        ("r2", "CT of the chest <normal> & clear"),
        ("r3", "Nothing to see here."),
        ("r4", "Mass in the right lower lobe."),
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows),
                   encoding="utf-8")
    out = tmp_path / "run.jsonl"
    code = main(["annotate", str(src), "--out", str(out), "--target", target, "--report",
                 "--report-samples", "3", "--quiet"])
    capsys.readouterr()
    assert code == 0
    results = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    page = tmp_path / "run.jsonl.report.html"

    shown = in_chromium(page, tmp_path / "profile", ARTEFACTS / "report.png")
    assert shown.console == []
    dom = read_page(shown.dom)
    # the first three captions, each exactly its annotation
    assert [c.id for c in dom.captions] == ["r1", "r2", "r3"]
    for c, (_, text), result in zip(dom.captions, rows, results, strict=False):
        check_caption(c, text, result["mentions"])
    # both plots, embedded: the very PNGs written next to the markdown
    plots = [tmp_path / f"run.jsonl.report-{n}.png" for n in ("concepts-per-caption",
                                                              "top-concepts")]
    assert dom.images == [
        "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in plots
    ]
    # the tables of the markdown report are there too
    for heading in ("Concepts per caption", "Semantic groups", "Semantic types"):
        assert f"<h2>{heading}</h2>" in shown.dom
    manifest = json.loads((tmp_path / "run.jsonl.manifest.json").read_text())
    assert manifest["report_html"] == str(page)


def test_html_page_console_check_sees_a_blocked_fetch_and_script(tmp_path: Path) -> None:
    """The console check above can fail: a page that tries to fetch an image from the network
    or to run a script — both refused by the page's Content-Security-Policy — shows up."""
    a = Annotation("x", (), ())
    html = lookup_page([AnnotatedCaption("x", "text", a)])
    bad = tmp_path / "bad.html"
    bad.write_text(html.replace("</body>", '<img src="https://example.invalid/p.png">'
                                          "<script>undefinedFunction()</script></body>"),
                   encoding="utf-8")
    console = "\n".join(in_chromium(bad, tmp_path / "profile").console)
    assert "Content Security Policy" in console
    assert "example.invalid" in console
    assert "inline script" in console


# -- without a browser --------------------------------------------------------------------------
SN = load_semantic_network()
TYPES = ["T047", "T023", "T060", "T999", "T000"]


@st.composite
def captions_with_mentions(draw: st.DrawFn) -> tuple[str, list[Mention]]:
    text = draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                        min_size=1, max_size=40))
    spans = draw(st.lists(st.tuples(st.integers(0, len(text) - 1), st.integers(1, 12)),
                          max_size=8))
    mentions = [
        Mention(cui=f"C{i:07d}", preferred_name=draw(st.text(max_size=40)),
                text=text[s:min(len(text), s + n)], start=s, end=min(len(text), s + n),
                score=1.0, semantic_types=tuple(draw(st.lists(st.sampled_from(TYPES),
                                                              max_size=2))),
                source="T", negated=draw(st.booleans()))
        for i, (s, n) in enumerate(spans)
    ]
    return text, mentions


@settings(max_examples=150, deadline=None)
@given(captions_with_mentions())
def test_html_page_any_caption_and_any_overlaps_render_exactly(
    case: tuple[str, list[Mention]],
) -> None:
    text, mentions = case
    a = Annotation("p", tuple(mentions), tuple(dict.fromkeys(m.cui for m in mentions)))
    page = read_page(caption_html(AnnotatedCaption("p", text, a), 0))
    assert not page.stray_text
    check_caption(page.captions[0], text, [
        {"start": m.start, "end": m.end, "cui": m.cui, "negated": m.negated,
         "semantic_types": list(m.semantic_types)}
        for m in mentions
    ])
    for m in mentions:
        assert group_of(m, SN) in {"DISO", "ANAT", "PROC", "UNKNOWN"}


def test_html_page_mention_outside_its_caption_is_listed_not_drawn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inside = Mention("C0000001", "Lung", "lung", 0, 4, 1.0, ("T023",), "T")
    outside = Mention("C0000002", "Heart", "heart", 10, 15, 1.0, ("T023",), "T")
    a = Annotation("p", (inside, outside), ("C0000001", "C0000002"))
    html = caption_html(AnnotatedCaption("p", "lung", a), 0)
    check_caption(read_page(html).captions[0], "lung", [
        {"start": 0, "end": 4, "cui": "C0000001", "negated": False, "semantic_types": ["T023"]}
    ])
    assert '<tr class="outside">' in html and "C0000002" in html
    assert "is not a span of its 4 characters" in caplog.text


def test_html_page_report_samples_must_not_be_negative() -> None:
    from conceptsvc.client.batch import BatchSettings
    from conceptsvc.errors import ClientError

    with pytest.raises(ClientError, match="--report-samples must be >= 0"):
        BatchSettings(report_samples=-1)


def test_issue_17_html_page_names_every_context_property() -> None:
    m = Mention("C0032285", "Pneumonia", "pneumonia", 9, 18, 1.0, ("T047",), "T",
                hypothetical=True, historical=True, experiencer="other")
    assert m.context == ("hypothetical", "historical", "experiencer other")
    html = caption_html(AnnotatedCaption("p", "rule out pneumonia", Annotation(
        "p", (m,), ("C0032285",))), 0)
    assert 'data-label="C0032285 Pneumonia · hypothetical, historical, experiencer other"' in html
    assert '<td class="neg">hypothetical, historical, experiencer other</td>' in html
    assert Mention("C1", "A", "a", 0, 1, 1.0, (), "T").context == ()
