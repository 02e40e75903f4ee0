"""Negation and temporality on the NegEx/ConText annotated sentences: conceptsvc and medspaCy.

    python -m benchmarks.bench context [--tsv FILE] [--write BENCHMARKS.md] [--no-peer]

(``make bench-context`` runs it after creating medspaCy's venv.) A quality measurement, not a
speed one; issue 17's targets are negation F1 >= 0.96, above medspaCy's ConText in the same run
and above GenNegEx's published 0.946, temporality accuracy above ConText's, and at most 1 % of
the conditions not found.

How each system is run:

- **conceptsvc**: every annotated condition goes into a dictionary of its own making — a site
  TSV (``cui, term, tui``) built with :func:`~conceptsvc.dictionary.build_dictionary_index`,
  one concept per distinct index key (conditions that conceptsvc's normalisation folds together,
  "Edema"/"edema", could not be told apart by any dictionary, so they share a concept), with a
  synthetic CUI from ``C9700000`` up, a block no UMLS release uses. Each term is the condition
  as annotated, its case included (conceptsvc treats an all-caps word of up to four letters,
  "AIDS", as an acronym that keeps its case, as it would a site's own term; "FEVER" matches
  "Fever"). :class:`~conceptsvc.
  extractor.Extractor` runs on every sentence with ``include_negated=True`` and
  ``overlap="all"``, so that another condition of the same dictionary ("chest pain") never hides
  the row's own ("pain"): the dictionary stands for UMLS, where both would be concepts. Since
  no two concepts share an index key, nothing else in the sentence changes the row's own
  mention: the result is that of a dictionary holding the row's condition alone.
- **medspaCy 1.3.1's ConText** (default rules), in ``.venv-context`` through
  :mod:`benchmarks.context_peer.run`, one TargetRule per row (its docstring says why).

A row's condition is *found* when a mention of its concept (an entity, for medspaCy) overlaps
the condition in the sentence, located by :func:`~benchmarks.context_peer.annotations.locate`
(case-insensitive, any run of whitespace between the condition's words); it is *negated* when
such a mention is flagged. A condition not found counts as affirmed and recent. Negation is
scored with Negated as the positive class, on all rows and on the rows both systems find.
Temporality (recent / historical / hypothetical) is read from ``Mention.historical`` and
``Mention.hypothetical`` (hypothetical wins when both are set, as a row has one label), and
from medspaCy's ``is_historical`` / ``is_hypothetical``; conceptsvc runs with
``include_hypothetical=True``.

The data (Chapman et al., Apache-2.0) is read from ``../shared`` by this benchmark only.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import CHECKOUT, run_in_venv, venv_python
from benchmarks.context_peer.annotations import AnnotatedRow, read_annotations
from benchmarks.soak import write_section
from conceptsvc.errors import ConfigError

__all__ = [
    "DEFAULT_TSV",
    "GENNEGEX",
    "Prediction",
    "Scores",
    "main",
    "run_conceptsvc",
    "run_medspacy",
    "score_negation",
    "score_temporality",
    "why_not_found",
    "write_condition_table",
]

log = logging.getLogger(__name__)

#: The development half of the NegEx test set, beside the checkout.
DEFAULT_TSV = CHECKOUT.parent / "shared" / "data" / "negation" / "negex_annotations_dev.tsv"
#: GenNegEx 1.2 on the whole set (both halves), its authors' figures (../shared/data/README.md).
GENNEGEX = {"precision": 0.933, "recall": 0.959, "f1": 0.946, "accuracy": 0.977}
#: First synthetic CUI: real CUIs are C0000005..C5xxxxxx, tests use C8888888 and C999xxxx.
_CUI_BASE = 9_700_000
_TUI = "T033"  # Finding: conditions here are findings, diseases and symptoms alike


@dataclass(frozen=True, slots=True)
class Prediction:
    """What one system said about one row's condition."""

    found: bool
    negated: bool = False
    historical: bool | None = None  # None: the system does not tell
    hypothetical: bool | None = None

    @property
    def temporality(self) -> str | None:
        if self.historical is None and self.hypothetical is None:
            return None
        if self.hypothetical:
            return "hypothetical"
        return "historical" if self.historical else "recent"


@dataclass(frozen=True, slots=True)
class Scores:
    """A binary confusion matrix; the ratios are 0 where their denominator is."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def accuracy(self) -> float:
        n = self.tp + self.fp + self.fn + self.tn
        return (self.tp + self.tn) / n if n else 0.0


def _confusion(gold: Sequence[bool], pred: Sequence[bool]) -> Scores:
    tp = sum(g and p for g, p in zip(gold, pred, strict=True))
    fp = sum(p and not g for g, p in zip(gold, pred, strict=True))
    fn = sum(g and not p for g, p in zip(gold, pred, strict=True))
    return Scores(tp, fp, fn, len(gold) - tp - fp - fn)


def score_negation(rows: Sequence[AnnotatedRow], preds: Sequence[Prediction]) -> Scores:
    """Negated is the positive class; a condition not found is affirmed."""
    return _confusion([r.negated for r in rows], [p.found and p.negated for p in preds])


def score_temporality(
    rows: Sequence[AnnotatedRow], preds: Sequence[Prediction]
) -> dict[str, Any] | None:
    """Accuracy over the three classes and each non-default class's scores; None when the
    system does not tell temporality. A condition not found is recent."""
    if not preds or all(p.temporality is None for p in preds if p.found):
        return None
    labels = [(p.temporality or "recent") if p.found else "recent" for p in preds]
    gold = [r.temporality for r in rows]
    right = sum(g == p for g, p in zip(gold, labels, strict=True))
    out: dict[str, Any] = {"accuracy": right / len(rows) if rows else 0.0}
    for cls in ("historical", "hypothetical"):
        out[cls] = _confusion([g == cls for g in gold], [p == cls for p in labels])
    return out


# -- conceptsvc ------------------------------------------------------------------------------
def write_condition_table(rows: Sequence[AnnotatedRow], path: Path) -> list[str]:
    """Write the conditions as a site TSV; return each row's synthetic CUI.

    One concept per index key (:func:`~conceptsvc.normalize.normalize_term`): conditions that
    normalise alike would otherwise be ambiguous, and the resolver would pick one of them.
    """
    from conceptsvc.normalize import normalize_term

    cui_of_key: dict[str, str] = {}
    terms: dict[str, list[str]] = {}
    cuis: list[str] = []
    for row in rows:
        key = normalize_term(row.condition) or row.condition.casefold()
        cui = cui_of_key.setdefault(key, f"C{_CUI_BASE + len(cui_of_key):07d}")
        if row.condition not in terms.setdefault(cui, []):
            terms[cui].append(row.condition)
        cuis.append(cui)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["cui", "term", "tui"])
        for cui, strings in terms.items():
            w.writerows([cui, s, _TUI] for s in strings)
    return cuis


def run_conceptsvc(rows: Sequence[AnnotatedRow], work: Path) -> tuple[list[Prediction], str]:
    """conceptsvc's prediction for every row, and the engine that ran."""
    from conceptsvc.dictionary import TableSource, build_dictionary_index
    from conceptsvc.extractor import Extractor
    from conceptsvc.index import ConceptIndex
    from conceptsvc.model import ExtractOptions

    table = work / "conditions.tsv"
    cuis = write_condition_table(rows, table)
    build_dictionary_index([TableSource(table, sab="NEGEX")], work / "index")
    extractor = Extractor(ConceptIndex.load(work / "index"))
    options = ExtractOptions(include_negated=True, include_hypothetical=True, overlap="all")
    preds = []
    for row, cui in zip(rows, cuis, strict=True):
        mentions = [
            m for m in extractor.extract(row.sentence, options).mentions
            if m.cui == cui and any(m.start < e and s < m.end for s, e in row.spans)
        ]
        preds.append(Prediction(
            found=bool(mentions),
            negated=any(m.negated for m in mentions),
            historical=any(m.historical for m in mentions),
            hypothetical=any(m.hypothetical for m in mentions),
        ))
    return preds, extractor.engine


# -- medspaCy --------------------------------------------------------------------------------
def context_python(python: str | Path | None = None) -> Path:
    """The interpreter of medspaCy's venv; a clear error when it has not been made."""
    return venv_python(
        python, ".venv-context",
        "medspaCy's ConText runs in a venv of its own; run `make context-peer` "
        "(medspacy 1.3.1, spaCy 3.7, a minute or two)",
    )


def run_medspacy(
    tsv: Path, rows: Sequence[AnnotatedRow], python: Path, out: Path, *, timeout: float = 1800
) -> tuple[list[Prediction], dict[str, str]]:
    """medspaCy's prediction for every row (from its driver's JSON), and its versions."""
    run_in_venv(python, "benchmarks.context_peer.run", ["--tsv", str(tsv), "--out", str(out)],
                timeout=timeout, what="medspaCy's run")
    result = json.loads(out.read_text(encoding="utf-8"))
    got = result["rows"]
    if [g["line"] for g in got] != [r.line for r in rows]:
        raise ConfigError("medspaCy's results are not the rows of the TSV, in order")
    preds = [
        Prediction(g["found"], g["negated"], g["historical"], g["hypothetical"]) for g in got
    ]
    return preds, dict(result["versions"])


# -- report ----------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _system_line(name: str, rows: Sequence[AnnotatedRow], preds: Sequence[Prediction]) -> str:
    neg = score_negation(rows, preds)
    temp = score_temporality(rows, preds)
    found = sum(p.found for p in preds)
    if temp is None:
        tcols = "not available | – | –"
    else:
        tcols = (f"{_fmt(temp['accuracy'])} | {_fmt(temp['historical'].f1)} | "
                 f"{_fmt(temp['hypothetical'].f1)}")
    return (
        f"| {name} | {len(rows)} | {found} ({100 * (len(rows) - found) / max(len(rows), 1):.1f} %"
        f" not found) | {_fmt(neg.precision)} | {_fmt(neg.recall)} | {_fmt(neg.f1)} | "
        f"{_fmt(neg.accuracy)} | {neg.tp}/{neg.fp}/{neg.fn} | {tcols} |"
    )


_REASONS = (
    "not in the sentence as written (the annotation runs past the sentence's end)",
    "only inside a longer word (a typo: `transplantatio` in `TRANSPLANTATIOn`)",
    "punctuation inside the condition (`,` `:` `;` `.` `(`): a clause, not a name",
    "a run of spaces inside the condition or its place in the sentence",
    "case: an all-caps word of up to four letters written otherwise in the sentence",
    "other",
)


def why_not_found(row: AnnotatedRow) -> str:
    """The first of :data:`_REASONS` that applies to a condition a system did not find."""
    if not row.spans:
        return _REASONS[0]
    start, end = row.spans[0]
    text = row.sentence[start:end]
    if (start > 0 and row.sentence[start - 1].isalnum()) or (
        end < len(row.sentence) and row.sentence[end].isalnum()
    ):
        return _REASONS[1]
    if re.search(r"[^\w\s'/-]", row.condition):
        return _REASONS[2]
    if re.search(r"\s\s", row.condition) or re.search(r"\s\s", text):
        return _REASONS[3]
    caps = [w for w in row.condition.split() if w.isalnum() and w.isupper() and len(w) <= 4]
    if caps and any(c not in text.split() for c in caps):
        return _REASONS[4]
    return _REASONS[5]


def _reasons_table(rows: Sequence[AnnotatedRow], systems: dict[str, list[Prediction]]) -> list[str]:
    counts = {
        name: Counter(why_not_found(r) for r, p in zip(rows, preds, strict=True) if not p.found)
        for name, preds in systems.items()
    }
    lines = [
        "| why a condition was not found | " + " | ".join(systems) + " |",
        "|---|" + "---:|" * len(systems),
    ]
    for reason in _REASONS:
        if any(c[reason] for c in counts.values()):
            lines.append(f"| {reason} | " + " | ".join(str(c[reason]) for c in counts.values())
                         + " |")
    return lines


def _examples(rows: Sequence[AnnotatedRow], preds: Sequence[Prediction], n: int) -> list[str]:
    out: list[str] = []
    for r, p in zip(rows, preds, strict=True):
        if not p.found and len(out) < n:
            where = "not in the sentence as written" if not r.spans else "in the sentence"
            # in code spans, so that the spacing that made the difference stays visible
            out.append(f"- line {r.line}: `{r.condition}` ({where}): `{r.sentence[:120]}`")
    return out


def report(
    rows: Sequence[AnnotatedRow],
    systems: dict[str, list[Prediction]],
    *,
    command: str,
    when: str,
    machine: str,
    notes: Sequence[str] = (),
) -> str:
    """The Markdown of BENCHMARKS.md's section for one run."""
    head = (
        "| system | rows | found | negation P | R | F1 | accuracy | TP/FP/FN | "
        "temporality accuracy | historical F1 | hypothetical F1 |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    both = [i for i in range(len(rows)) if all(p[i].found for p in systems.values())]
    lines = [
        f"### Run of {when} — {len(rows):,} annotated sentences "
        f"({sum(r.negated for r in rows)} negated)",
        "",
        f"Command: `{command}`; {machine}.",
        *(["", *notes] if notes else []),
        "",
        "All rows (a condition not found counts as affirmed and recent):",
        "",
        head,
        *(_system_line(name, rows, preds) for name, preds in systems.items()),
        f"| GenNegEx 1.2, published, whole set (both halves) | 2376 | – | "
        f"{_fmt(GENNEGEX['precision'])} | {_fmt(GENNEGEX['recall'])} | {_fmt(GENNEGEX['f1'])} | "
        f"{_fmt(GENNEGEX['accuracy'])} | – | – | – | – |",
        "",
        f"Rows where {' and '.join(systems)} find the condition ({len(both)}):",
        "",
        head,
        *(
            _system_line(name, [rows[i] for i in both], [preds[i] for i in both])
            for name, preds in systems.items()
        ),
    ]
    if any(not p.found for preds in systems.values() for p in preds):
        lines += ["", *_reasons_table(rows, systems)]
    for name, preds in systems.items():
        missing = sum(not p.found for p in preds)
        if missing:
            lines += ["", f"{name}: {missing} conditions not found, the first ones:", "",
                      *_examples(rows, preds, 8)]
    return "\n".join(lines)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench context", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tsv", type=Path, default=DEFAULT_TSV,
                        help="annotated sentences (default ../shared/data/negation/"
                        "negex_annotations_dev.tsv beside the checkout)")
    parser.add_argument("--context-python", help="interpreter of medspaCy's venv "
                        "(default .venv-context/bin/python)")
    parser.add_argument("--no-peer", action="store_true",
                        help="conceptsvc only (no medspaCy venv needed)")
    parser.add_argument("--write", type=Path, nargs="?", const=CHECKOUT / "BENCHMARKS.md",
                        default=None, help="replace this run's section of BENCHMARKS.md "
                        "(or of the file given)")
    parser.add_argument("--json", type=Path, help="also write every row's predictions here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.tsv.is_file():
        raise ConfigError(f"{args.tsv}: no such file; give the annotated sentences with --tsv")

    rows = read_annotations(args.tsv)
    load = [f"{v:.2f}" for v in os.getloadavg()]
    started = dt.datetime.now(dt.UTC)
    systems: dict[str, list[Prediction]] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-context-") as tmp:
        t0 = time.perf_counter()
        preds, engine = run_conceptsvc(rows, Path(tmp))
        systems["conceptsvc"] = preds
        notes.append(f"conceptsvc: {engine} engine, {time.perf_counter() - t0:.1f} s with "
                     "the dictionary build.")
        if not args.no_peer:
            mpreds, versions = run_medspacy(
                args.tsv, rows, context_python(args.context_python), Path(tmp) / "medspacy.json"
            )
            systems[f"medspaCy {versions['medspacy']} ConText"] = mpreds
            notes.append("medspaCy: " + ", ".join(f"{k} {v}" for k, v in versions.items())
                         + ", default ConText rules.")
    load_end = [f"{v:.2f}" for v in os.getloadavg()]
    machine = (f"{_machine()}; load average {' / '.join(load)} at the start, "
               f"{' / '.join(load_end)} at the end")
    text = report(
        rows, systems, machine=machine,
        command="python -m benchmarks.bench context " + " ".join(
            str(a) for a in (sys.argv[1:] if argv is None else argv)
        ),
        when=started.strftime("%Y-%m-%d %H:%M UTC"), notes=notes,
    )
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {name: [dataclasses.asdict(p) | {"line": r.line} for r, p in zip(rows, ps, strict=True)]
             for name, ps in systems.items()}, indent=1) + "\n", encoding="utf-8")
    if args.write:
        write_section(args.write, text, tag="bench-context",
                      heading="Context (negation, temporality)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
