"""What a batch run found in a corpus, as a table, a markdown file, two plots and an HTML page.

Before anyone trains on a concept set they want to know its shape: how many captions got no
concept at all, how many concepts a caption usually gets, which concepts dominate, and which
semantic groups they come from. :class:`ReportBuilder` accumulates that in one streaming pass
over the results (memory grows with the number of distinct concepts, not captions), and
:func:`write_report` renders it — the HTML page also shows a sample of the captions with their
mentions highlighted (:mod:`conceptsvc.client.html_page`).

Counting conventions (also stated in the markdown): a concept counts once per caption however
often it is mentioned ("captions" columns are document frequencies); semantic types and groups
are counted over caption-concept pairs, and a concept with types in two groups counts in both,
so group percentages may add up to more than 100 %.

Names and semantic types come from the mentions; concepts that have none (a profile can infer a
concept, or mentions were not requested) are looked up through ``describe`` — the service's
GetConcept or the local index.
"""

from __future__ import annotations

import html
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conceptsvc.client import html_page as hp
from conceptsvc.client.html_page import AnnotatedCaption
from conceptsvc.client.outputs import atomic_write_text
from conceptsvc.model import Annotation
from conceptsvc.semantic_network import SemanticNetwork, load_semantic_network

__all__ = [
    "ConceptStat",
    "CorpusReport",
    "Describe",
    "GroupStat",
    "ReportBuilder",
    "ReportFiles",
    "TypeStat",
    "render_html",
    "render_markdown",
    "render_table",
    "report_files",
    "write_report",
]

# (preferred name, semantic types) of a CUI, or None when unknown.
Describe = Callable[[str], tuple[str, tuple[str, ...]] | None]

TOP_N = 30
# The histogram of concepts per caption puts everything from here on in one "N+" bar.
HIST_CAP = 25


@dataclass(frozen=True, slots=True)
class ConceptStat:
    cui: str
    name: str
    captions: int
    semantic_types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TypeStat:
    tui: str
    name: str
    group: str
    count: int


@dataclass(frozen=True, slots=True)
class GroupStat:
    code: str
    name: str
    count: int


@dataclass(frozen=True)
class CorpusReport:
    captions: int
    with_concepts: int
    concept_occurrences: int  # caption-concept pairs
    distinct_concepts: int
    mentions: int
    mean: float
    median: float
    distribution: dict[int, int]  # concepts per caption → number of captions
    top: list[ConceptStat] = field(default_factory=list)
    semantic_types: list[TypeStat] = field(default_factory=list)
    semantic_groups: list[GroupStat] = field(default_factory=list)

    @property
    def without_concepts(self) -> int:
        return self.captions - self.with_concepts


class ReportBuilder:
    """Streaming accumulator; ``add`` every annotation, then ``build``."""

    def __init__(self) -> None:
        self._per_caption: Counter[int] = Counter()
        self._df: Counter[str] = Counter()
        self._names: dict[str, str] = {}
        self._types: dict[str, tuple[str, ...]] = {}
        self._mentions = 0

    def add(self, a: Annotation) -> None:
        concepts = set(a.concepts)
        self._per_caption[len(concepts)] += 1
        self._df.update(concepts)
        self._mentions += len(a.mentions)
        for m in a.mentions:
            if m.cui not in self._names:
                self._names[m.cui] = m.preferred_name
                self._types[m.cui] = tuple(m.semantic_types)

    def missing_names(self) -> list[str]:
        """Concepts seen only in concept sets, never in a mention: they need ``describe``."""
        return sorted(c for c in self._df if c not in self._types)

    def add_all(self, annotations: Iterable[Annotation]) -> ReportBuilder:
        for a in annotations:
            self.add(a)
        return self

    def build(
        self,
        *,
        describe: Describe | None = None,
        top_n: int = TOP_N,
        network: SemanticNetwork | None = None,
    ) -> CorpusReport:
        sn = network if network is not None else load_semantic_network()
        for cui in self.missing_names():
            found = describe(cui) if describe is not None else None
            if found is not None:
                self._names[cui], self._types[cui] = found[0], tuple(found[1])
        captions = sum(self._per_caption.values())
        occurrences = sum(n * k for n, k in self._per_caption.items())
        tui_counts: Counter[str] = Counter()
        group_counts: Counter[str] = Counter()
        for cui, df in self._df.items():
            tuis = self._types.get(cui, ())
            for tui in tuis:
                tui_counts[tui] += df
            for group in {sn.group_of(t) for t in tuis} or {"UNKNOWN"}:
                group_counts[group] += df
        top = sorted(self._df.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
        return CorpusReport(
            captions=captions,
            with_concepts=captions - self._per_caption.get(0, 0),
            concept_occurrences=occurrences,
            distinct_concepts=len(self._df),
            mentions=self._mentions,
            mean=occurrences / captions if captions else 0.0,
            median=_median(self._per_caption),
            distribution=dict(sorted(self._per_caption.items())),
            top=[
                ConceptStat(cui, self._names.get(cui, ""), n, self._types.get(cui, ()))
                for cui, n in top
            ],
            semantic_types=[
                TypeStat(
                    tui,
                    sn.types[tui].name if tui in sn.types else "(unknown type)",
                    sn.group_of(tui),
                    n,
                )
                for tui, n in sorted(tui_counts.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            semantic_groups=[
                GroupStat(g, sn.groups[g].name if g in sn.groups else "(no semantic type)", n)
                for g, n in sorted(group_counts.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
        )


def _median(hist: Mapping[int, int]) -> float:
    """Median of the values a histogram (value → count) describes, without expanding it."""
    total = sum(hist.values())
    if total == 0:
        return 0.0

    def at_rank(rank: int) -> int:
        seen = 0
        for value in sorted(hist):
            seen += hist[value]
            if seen > rank:
                return value
        return max(hist)

    return (at_rank((total - 1) // 2) + at_rank(total // 2)) / 2


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def _bucketed(dist: Mapping[int, int]) -> list[tuple[str, int]]:
    rows = [(str(k), v) for k, v in dist.items() if k < HIST_CAP]
    tail = sum(v for k, v in dist.items() if k >= HIST_CAP)
    if tail:
        rows.append((f"{HIST_CAP}+", tail))
    return rows


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                    strict=True))
        ).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def render_table(r: CorpusReport, *, top_n: int = 20) -> str:
    """The report as plain text for a terminal."""
    out = [
        "Corpus report",
        f"  captions                 {r.captions}",
        f"  with concepts            {r.with_concepts} ({_pct(r.with_concepts, r.captions)})",
        f"  without concepts         {r.without_concepts} ({_pct(r.without_concepts, r.captions)})",
        f"  distinct concepts        {r.distinct_concepts}",
        f"  concepts per caption     mean {r.mean:.2f}, median {r.median:g}",
        f"  mentions                 {r.mentions}",
        "",
        "Concepts per caption",
        *("  " + x for x in _table(
            ["concepts", "captions", "share"],
            [[k, str(v), _pct(v, r.captions)] for k, v in _bucketed(r.distribution)],
            {1, 2},
        )),
        "",
        f"Top {min(top_n, len(r.top))} concepts (captions containing them)",
        *("  " + x for x in _table(
            ["#", "CUI", "name", "captions", "share", "types"],
            [[str(i), c.cui, c.name, str(c.captions), _pct(c.captions, r.captions),
              ",".join(c.semantic_types)] for i, c in enumerate(r.top[:top_n], 1)],
            {0, 3, 4},
        )),
        "",
        "Semantic groups (caption-concept pairs)",
        *("  " + x for x in _table(
            ["group", "name", "count", "share"],
            [[g.code, g.name, str(g.count), _pct(g.count, r.concept_occurrences)]
             for g in r.semantic_groups],
            {2, 3},
        )),
        "",
        "Semantic types (caption-concept pairs)",
        *("  " + x for x in _table(
            ["TUI", "name", "group", "count", "share"],
            [[t.tui, t.name, t.group, str(t.count), _pct(t.count, r.concept_occurrences)]
             for t in r.semantic_types],
            {3, 4},
        )),
    ]
    return "\n".join(out) + "\n"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _md_table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    return [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows),
    ]


_NOTE = ("A concept counts once per caption; semantic types and groups are counted over "
         "caption-concept pairs (a concept in two groups counts in both).")


def _summary_rows(r: CorpusReport) -> list[list[str]]:
    return [
        ["captions", str(r.captions)],
        ["with concepts", f"{r.with_concepts} ({_pct(r.with_concepts, r.captions)})"],
        ["without concepts", f"{r.without_concepts} ({_pct(r.without_concepts, r.captions)})"],
        ["distinct concepts", str(r.distinct_concepts)],
        ["concepts per caption, mean", f"{r.mean:.2f}"],
        ["concepts per caption, median", f"{r.median:g}"],
        ["mentions", str(r.mentions)],
    ]


def _sections(r: CorpusReport) -> list[tuple[str, list[str], list[list[str]], set[int]]]:
    """(heading, headers, rows, right-aligned columns) of the report's tables after the
    summary, shared by the markdown and the HTML."""
    return [
        ("Concepts per caption", ["concepts", "captions", "share"],
         [[k, str(v), _pct(v, r.captions)] for k, v in _bucketed(r.distribution)], {1, 2}),
        (f"Top {len(r.top)} concepts", ["#", "CUI", "name", "captions", "share", "semantic types"],
         [[str(i), c.cui, c.name, str(c.captions), _pct(c.captions, r.captions),
           ", ".join(c.semantic_types)] for i, c in enumerate(r.top, 1)], {0, 3, 4}),
        ("Semantic groups", ["group", "name", "count", "share"],
         [[g.code, g.name, str(g.count), _pct(g.count, r.concept_occurrences)]
          for g in r.semantic_groups], {2, 3}),
        ("Semantic types", ["TUI", "name", "group", "count", "share"],
         [[t.tui, t.name, t.group, str(t.count), _pct(t.count, r.concept_occurrences)]
          for t in r.semantic_types], {3, 4}),
    ]


def render_markdown(
    r: CorpusReport, *, title: str = "Corpus report", images: Mapping[str, str] | None = None
) -> str:
    """The report as markdown; ``images`` maps a caption to a (relative) PNG path."""
    lines = [f"# {title}", "", *_md_table(["", "value"], _summary_rows(r), {1}), "", _NOTE, ""]
    for caption, path in (images or {}).items():
        lines += [f"![{caption}]({path})", ""]
    for heading, headers, rows, right in _sections(r):
        lines += [f"## {heading}", "", *_md_table(headers, rows, right), ""]
    return "\n".join(lines)


def render_html(
    r: CorpusReport,
    *,
    title: str = "Corpus report",
    images: Mapping[str, bytes] | None = None,
    samples: Sequence[AnnotatedCaption] = (),
) -> str:
    """The report as one self-contained HTML page: the tables, ``images`` (caption → PNG
    bytes) embedded, and ``samples`` — captions with their mentions highlighted."""
    parts = [hp.table_html(["", "value"], _summary_rows(r), {1}), f'<p class="note">{_NOTE}</p>']
    parts += [hp.png_img(png, caption) for caption, png in (images or {}).items()]
    for heading, headers, rows, right in _sections(r):
        parts += [f"<h2>{html.escape(heading)}</h2>", hp.table_html(headers, rows, right)]
    if samples:
        parts += [
            f"<h2>The first {len(samples)} annotated captions</h2>",
            hp.legend_html(hp.groups_in(samples)),
            hp.captions_html(samples),
        ]
    return hp.page(title, "\n".join(parts))


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    histogram: Path
    top_concepts: Path
    html: Path


def _plot_histogram(r: CorpusReport, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = _bucketed(r.distribution)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(rows)), [v for _, v in rows], color="#4878a8")
    ax.set_xticks(range(len(rows)), [k for k, _ in rows], fontsize=8)
    ax.set_xlabel("concepts per caption")
    ax.set_ylabel("captions")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Concepts per caption (n={r.captions}, mean {r.mean:.2f}, median {r.median:g})")
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plot_top(r: CorpusReport, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    top = r.top[:TOP_N]
    fig = Figure(figsize=(9, max(3.0, 0.28 * len(top) + 1.2)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{(c.name or c.cui)[:40]} ({c.cui})" for c in top]
    ax.barh(range(len(top)), [c.captions for c in top], color="#6a9f58")
    ax.set_yticks(range(len(top)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("captions containing the concept")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Top {len(top)} concepts")
    fig.tight_layout()
    fig.savefig(path, format="png")


def report_files(base: str | Path) -> ReportFiles:
    """Where :func:`write_report` writes for ``base`` (a run checks none of them is its input)."""
    base = Path(base)
    return ReportFiles(
        markdown=base.with_name(base.name + ".report.md"),
        histogram=base.with_name(base.name + ".report-concepts-per-caption.png"),
        top_concepts=base.with_name(base.name + ".report-top-concepts.png"),
        html=base.with_name(base.name + ".report.html"),
    )


def write_report(
    r: CorpusReport,
    base: str | Path,
    *,
    title: str = "Corpus report",
    samples: Sequence[AnnotatedCaption] = (),
) -> ReportFiles:
    """Write ``<base>.report.md`` with its two PNG plots next to it, and ``<base>.report.html``
    with the same tables, the plots embedded and ``samples`` highlighted."""
    files = report_files(base)
    files.markdown.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # A concept name with a character the default font lacks draws as a box; that is not
        # worth failing a finished batch run over.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        _plot_histogram(r, files.histogram)
        _plot_top(r, files.top_concepts)
    plots = {
        "Concepts per caption": files.histogram,
        f"Top {min(TOP_N, len(r.top))} concepts": files.top_concepts,
    }
    atomic_write_text(
        files.markdown,
        render_markdown(r, title=title, images={k: p.name for k, p in plots.items()}),
    )
    atomic_write_text(
        files.html,
        render_html(r, title=title, images={k: p.read_bytes() for k, p in plots.items()},
                    samples=samples),
    )
    return files
