"""Annotated captions as a self-contained HTML page — for looking at mentions rather than reading
a table of offsets.

``conceptsvc lookup --html`` and the ``annotate --report`` page both render captions here: every
mention is highlighted under its text by a bar in the colour of its semantic group, labelled
with its CUI and preferred name (full details in the ``title`` tooltip and in a table under the
caption); negated mentions get a striped bar, a "negated" label and a class of their own, and
the label, tooltip and table name ConText's other properties too ("hypothetical",
"historical", "experiencer other").
Overlapping mentions are drawn as stacked bars, one track per overlap depth, in the style of
spaCy's displaCy span renderer.

Why our own renderer rather than displaCy: spaCy is an optional extra (``conceptsvc[spacy]``)
and the CLI must not need it; displaCy works on a spaCy ``Doc`` of tokens, while our mentions
are code-point offsets into the original caption that need not fall on token boundaries.
So a caption is cut into segments at every mention start and end, and each segment carries its
own code-point offsets (``data-start``/``data-end``) and one bar per mention covering it; a
mention spanning several segments has a bar in each, all with the same ``data-mention``. Labels
are CSS generated content (``attr(data-label)``), so a caption element's text is exactly the
caption — which the browser tests check.

The page is self-contained: inline CSS, no script, no fonts, plots as ``data:`` PNGs; its
Content-Security-Policy forbids every fetch, so viewing it needs no network and leaks nothing.
"""

from __future__ import annotations

import base64
import html
import itertools
import logging
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from conceptsvc.client.outputs import atomic_write_text
from conceptsvc.model import Annotation, Mention
from conceptsvc.semantic_network import SemanticNetwork, load_semantic_network

__all__ = [
    "GROUP_COLOURS",
    "AnnotatedCaption",
    "captions_html",
    "group_of",
    "groups_in",
    "legend_html",
    "lookup_page",
    "page",
    "png_img",
    "table_html",
    "write_lookup_page",
]

log = logging.getLogger(__name__)

# One colour per semantic group (SemGroups 2018), chosen to stay apart from each other.
GROUP_COLOURS: dict[str, str] = {
    "DISO": "#e15759",
    "ANAT": "#4e79a7",
    "PROC": "#59a14f",
    "CHEM": "#b07aa1",
    "DEVI": "#f28e2b",
    "PHYS": "#76b7b2",
    "CONC": "#9c755f",
    "LIVB": "#d4b031",
    "PHEN": "#ff9da7",
    "GENE": "#17becf",
    "OBJC": "#a39891",
    "ACTI": "#8cd17d",
    "GEOG": "#499894",
    "OCCU": "#d4a6c8",
    "ORGA": "#86bcb6",
    "UNKNOWN": "#5f5a58",
}
# Labels are cut here (the tooltip and the table have the whole name).
LABEL_NAME_CHARS = 24

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em 2em;
       color: #222; max-width: 1200px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; font-size: 0.85em; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 0.85em; margin: 0.5em 0; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px;
          vertical-align: -0.1em; margin-right: 4px; }
.item { border-top: 1px solid #ddd; padding: 0.8em 0 0.2em; }
.item-id { font-size: 0.8em; color: #666; }
.caption { font-size: 16px; line-height: 1.6; white-space: pre-wrap; margin: 0.4em 0; }
.seg.hit { display: inline-block; position: relative; white-space: pre-wrap;
           padding-bottom: calc(var(--tracks) * 18px + 2px); background-clip: content-box; }
.seg.hit.all-negated { text-decoration: line-through; text-decoration-color: #888; }
.bar { position: absolute; left: 0; right: 0; height: 3px; background: var(--c);
       top: calc(1.6em + var(--track) * 18px); }
.bar.negated { height: 4px;
  background: repeating-linear-gradient(90deg, var(--c) 0 5px, transparent 5px 8px); }
.bar.first::after { content: attr(data-label); position: absolute; left: 0; top: 3px;
  font: 600 10.5px/13px ui-monospace, "DejaVu Sans Mono", monospace; padding: 0 3px;
  white-space: pre; color: var(--ink);
  background: var(--c); border-radius: 0 0 3px 3px; z-index: 1; }
.bar.first.negated::after { background: #fff; color: #333; border: 1px dashed var(--c); }
.mentions td.neg { color: #b00; font-weight: 600; }
img.plot { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
"""

# Nothing may be fetched: images only from data: URLs, styles only inline, no scripts at all.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True, slots=True)
class AnnotatedCaption:
    """A caption's text with its annotation; ``names`` names concepts inferred without a
    mention (a profile), for the concept line."""

    id: str
    text: str
    annotation: Annotation
    names: Mapping[str, str] | None = None


def _esc(s: str) -> str:
    # An HTML parser turns a CR (and CRLF) in the source into LF; a character reference keeps
    # it, so the caption element's text stays exactly the caption.
    return html.escape(s, quote=True).replace("\r", "&#13;")


def _attrs(**values: object) -> str:
    return "".join(
        f' {k.rstrip("_").replace("_", "-")}="{_esc(str(v))}"' for k, v in values.items()
    )


def group_of(m: Mention, sn: SemanticNetwork) -> str:
    """The group a mention is coloured by: that of its first semantic type."""
    return sn.group_of(m.semantic_types[0]) if m.semantic_types else "UNKNOWN"


def _colour(group: str) -> str:
    return GROUP_COLOURS.get(group, GROUP_COLOURS["UNKNOWN"])


def _ink(colour: str) -> str:
    """Label text colour readable on ``colour`` (#rrggbb): dark on the light ones."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#222" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#fff"


def _label(m: Mention) -> str:
    name = m.preferred_name
    if len(name) > LABEL_NAME_CHARS:
        name = name[: LABEL_NAME_CHARS - 1] + "…"
    return f"{m.cui} {name}" + (" · " + ", ".join(m.context) if m.context else "")


def _tooltip(m: Mention, sn: SemanticNetwork) -> str:
    types = ", ".join(f"{t} {sn.describe(t).name}" for t in m.semantic_types) or "no type"
    neg = " — " + ", ".join(m.context).upper() if m.context else ""
    return (f"{m.cui} {m.preferred_name}{neg}\n{types}\n[{m.start}, {m.end}) "
            f"score {m.score:.2f}, source {m.source}")


def _label_reach(m: Mention) -> int:
    """How many caption characters a mention's label covers, roughly: labels are 10.5 px
    monospace (about 6.3 px a character) under 16 px text (about 7.5 px a character), plus
    their padding and a gap."""
    return m.start + max(m.end - m.start, int(len(_label(m)) * 0.85) + 3)


def _tracks(mentions: Sequence[Mention]) -> list[int]:
    """A track (stacking level) per mention such that neither the bars nor the labels of two
    mentions on one track overlap; at a shared start the longer mention takes the upper track.
    (Where a line wraps, labels may still meet; the table under the caption is exact.)"""
    order = sorted(range(len(mentions)),
                   key=lambda i: (mentions[i].start, -mentions[i].end, mentions[i].cui))
    reach: list[int] = []  # per track, how far its last mention's bar or label reaches
    track = [0] * len(mentions)
    for i in order:
        m = mentions[i]
        for t, end in enumerate(reach):
            if end <= m.start:
                reach[t] = _label_reach(m)
                track[i] = t
                break
        else:
            track[i] = len(reach)
            reach.append(_label_reach(m))
    return track


def _drawable(
    text: str, mentions: Iterable[Mention], item_id: str
) -> tuple[list[Mention], list[Mention]]:
    """The mentions that lie within the caption (sorted), and those that do not."""
    inside, outside = [], []
    for m in mentions:
        if 0 <= m.start < m.end <= len(text):
            inside.append(m)
        else:
            # Offsets outside the caption mean the annotation is not of this text; drawing it
            # anywhere would mislead, so it is only listed in the table, marked.
            log.warning("caption %s: mention %s [%d, %d) is not a span of its %d characters; "
                        "not highlighted", item_id, m.cui, m.start, m.end, len(text))
            outside.append(m)
    key = operator.attrgetter("start", "end", "cui")
    return sorted(inside, key=key), sorted(outside, key=key)


def caption_html(
    item: AnnotatedCaption, index: int, network: SemanticNetwork | None = None
) -> str:
    """One caption: its highlighted text, its mentions table and its concept line."""
    sn = network if network is not None else load_semantic_network()
    text = item.text
    mentions, outside = _drawable(text, item.annotation.mentions, item.id)
    tracks = _tracks(mentions)
    n_tracks = max(tracks, default=-1) + 1
    mids = [f"c{index}-m{i}" for i in range(len(mentions))]
    cuts = sorted({0, len(text), *(m.start for m in mentions), *(m.end for m in mentions)})
    segs: list[str] = []
    for a, b in itertools.pairwise(cuts):
        covering = [i for i, m in enumerate(mentions) if m.start <= a and b <= m.end]
        piece = _esc(text[a:b])
        if not covering:
            segs.append(f'<span class="seg"{_attrs(data_start=a, data_end=b)}>{piece}</span>')
            continue
        bars = []
        for i in sorted(covering, key=lambda i: tracks[i]):
            m = mentions[i]
            classes = "bar" + (" first" if m.start == a else "") + (
                " negated" if m.negated else "")
            bars.append(
                f'<span class="{classes}"'
                + _attrs(
                    style=f"--track:{tracks[i]};--c:{_colour(group_of(m, sn))};"
                          f"--ink:{_ink(_colour(group_of(m, sn)))}",
                    data_mention=mids[i], data_start=m.start, data_end=m.end, data_cui=m.cui,
                    data_group=group_of(m, sn), data_negated=str(m.negated).lower(),
                    data_label=_label(m), title=_tooltip(m, sn),
                )
                + "></span>"
            )
        # The background takes the colour of the top bar.
        top = mentions[min(covering, key=lambda i: tracks[i])]
        tint = _colour(group_of(top, sn)) + "22"
        all_neg = all(mentions[i].negated for i in covering)
        segs.append(
            f'<span class="seg hit{" all-negated" if all_neg else ""}"'
            + _attrs(data_start=a, data_end=b, style=f"background-color:{tint}")
            + f">{piece}{''.join(bars)}</span>"
        )

    def cells(m: Mention) -> str:
        group = group_of(m, sn)
        return "".join([
            f"<td>{_esc(m.text)}</td>",
            f'<td class="num">{m.start}–{m.end}</td>',
            f"<td>{_esc(m.cui)}</td>",
            f"<td>{_esc(m.preferred_name)}</td>",
            f"<td>{_esc(', '.join(m.semantic_types))}</td>",
            f"<td>{_swatch(group)}{_esc(group)}</td>",
            f'<td class="neg">{_esc(", ".join(m.context))}</td>' if m.context else "<td></td>",
            f'<td class="num">{m.score:.2f}</td>',
        ])

    body = "".join(
        f'<tr data-mention="{mids[i]}"><td class="num">{i + 1}</td>{cells(m)}</tr>'
        for i, m in enumerate(mentions)
    ) + "".join(
        f'<tr class="outside"><td>–</td>{cells(m)}</tr>' for m in outside
    )
    if outside:
        body += ('<tr><td colspan="9" class="neg">the rows marked – have offsets outside the '
                 "caption and are not highlighted</td></tr>")
    table = (
        '<table class="mentions"><tr><th>#</th><th>text</th><th>span</th><th>CUI</th>'
        "<th>preferred name</th><th>semantic types</th><th>group</th><th>context</th>"
        f"<th>score</th></tr>{body}</table>"
        if body else '<p class="note">no mentions</p>'
    )
    named = {m.cui for m in item.annotation.mentions}
    names = item.names or {}
    concepts = ", ".join(
        _esc(c) if c in named else f"{_esc(c)} {_esc(names.get(c, ''))} (inferred, no mention)"
        for c in item.annotation.concepts
    ) or "none"
    return (
        f'<div class="item"{_attrs(data_id=item.id)}>'
        f'<div class="item-id">{_esc(item.id)}</div>'
        f'<div class="caption"{_attrs(data_id=item.id, style=f"--tracks:{n_tracks}")}>'
        f"{''.join(segs)}</div>{table}"
        f'<p class="note">concepts: {concepts}</p></div>'
    )


def _swatch(group: str) -> str:
    return f'<span class="swatch" style="background:{_colour(group)}"></span>'


def captions_html(
    items: Iterable[AnnotatedCaption], network: SemanticNetwork | None = None
) -> str:
    sn = network if network is not None else load_semantic_network()
    return "".join(caption_html(item, i, sn) for i, item in enumerate(items))


def legend_html(groups: Iterable[str], network: SemanticNetwork | None = None) -> str:
    """The colours of ``groups`` (codes), in the fixed order of :data:`GROUP_COLOURS`."""
    sn = network if network is not None else load_semantic_network()
    present = set(groups)
    entries = []
    for code in GROUP_COLOURS:
        if code in present:
            name = sn.groups[code].name if code in sn.groups else "Unknown"
            entries.append(f'<span{_attrs(data_group=code)}>{_swatch(code)}'
                           f"{_esc(code)} {_esc(name)}</span>")
    return f'<div class="legend">{"".join(entries)}</div>' if entries else ""


def groups_in(items: Iterable[AnnotatedCaption], network: SemanticNetwork | None = None
              ) -> set[str]:
    sn = network if network is not None else load_semantic_network()
    return {group_of(m, sn) for item in items for m in item.annotation.mentions}


def table_html(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """A plain table; columns in ``right`` are numbers (right-aligned)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{_esc(c)}</td>' if j in right else f"<td>{_esc(c)}</td>"
            for j, c in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def png_img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def page(title: str, body: str) -> str:
    """A whole document around ``body`` (already HTML)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><h1>{_esc(title)}</h1>\n{body}\n</body></html>\n"
    )


def lookup_page(
    items: Sequence[AnnotatedCaption], *, title: str = "conceptsvc lookup",
    network: SemanticNetwork | None = None,
) -> str:
    """The page ``conceptsvc lookup --html`` writes."""
    sn = network if network is not None else load_semantic_network()
    return page(title, legend_html(groups_in(items, sn), sn) + captions_html(items, sn))


def write_lookup_page(
    path: str | Path, text: str, annotation: Annotation, names: Mapping[str, str] | None = None
) -> Path:
    """Write the lookup page of one caption to ``path`` (atomically)."""
    path = Path(path)
    atomic_write_text(path, lookup_page([AnnotatedCaption("lookup", text, annotation, names)]))
    return path
