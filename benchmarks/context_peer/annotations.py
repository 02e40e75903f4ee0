"""The NegEx/ConText annotated sentences, and where each condition sits in its sentence.

Standard library only: both sides of ``make bench-context`` import it — the scorer in the main
venv (:mod:`benchmarks.bench_context`) and medspaCy's driver in ``.venv-context``
(:mod:`benchmarks.context_peer.run`) — so the two systems are judged on the same spans.

The file is the test set distributed with NegEx and ConText (Chapman et al., Apache-2.0),
read from ``../shared`` at run time by the benchmark only. Tab-separated, one header line:
line number, condition, sentence, negation status (``Negated``/``Affirmed``), temporality
(``Recent``/``Historical``/``Not particular``, the last meaning hypothetical), experiencer
(``Patient``/``Family member``).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TEMPORALITIES", "AnnotatedRow", "locate", "read_annotations"]

#: The dataset's temporality values, and the names this benchmark reports them under.
TEMPORALITIES = {"Recent": "recent", "Historical": "historical", "Not particular": "hypothetical"}


@dataclass(frozen=True, slots=True)
class AnnotatedRow:
    line: str  # the dataset's own line number, kept to name rows in reports
    condition: str
    sentence: str
    negated: bool
    temporality: str  # "recent" | "historical" | "hypothetical"
    family: bool
    spans: tuple[tuple[int, int], ...]  # where the condition is in the sentence (locate())


def locate(condition: str, sentence: str) -> tuple[tuple[int, int], ...]:
    """Every place ``condition`` occurs in ``sentence``, ignoring case and runs of whitespace.

    The annotators copied conditions with their own case and spacing ("MVP with regurg" for
    "MVP WITH REGURG", "chest  pain" for "chest pain"), so the condition's whitespace-separated
    pieces are matched case-insensitively with any whitespace between them. Occurrences inside a
    longer word ("PE" in "PEEP") are skipped, unless there is no other: then those count.
    Empty when the condition is not in the sentence in any case or spacing.
    """
    pieces = condition.split()
    if not pieces:
        return ()
    body = r"\s+".join(re.escape(p) for p in pieces)
    for pattern in (rf"(?<!\w){body}(?!\w)", body):
        spans = tuple(m.span() for m in re.finditer(pattern, sentence, re.IGNORECASE))
        if spans:
            return spans
    return ()


def read_annotations(path: str | Path) -> list[AnnotatedRow]:
    """The rows of an annotation TSV in file order; ValueError names a malformed line."""
    rows: list[AnnotatedRow] = []
    with Path(path).open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        for n, rec in enumerate(reader, start=1):
            if n == 1 or not rec or not "".join(rec).strip():
                continue  # the header, blank lines
            if len(rec) < 6:
                raise ValueError(f"{path}:{n}: expected 6 tab-separated columns, got {len(rec)}")
            line, condition, sentence, negation, temporality, experiencer = (
                c.strip() for c in rec[:6]
            )
            if negation not in ("Negated", "Affirmed"):
                raise ValueError(
                    f"{path}:{n}: negation status {negation!r} is not Negated or Affirmed"
                )
            if temporality not in TEMPORALITIES:
                raise ValueError(
                    f"{path}:{n}: temporality {temporality!r} is not one of "
                    f"{', '.join(TEMPORALITIES)}"
                )
            rows.append(
                AnnotatedRow(
                    line=line,
                    condition=condition,
                    sentence=sentence,
                    negated=negation == "Negated",
                    temporality=TEMPORALITIES[temporality],
                    family=experiencer.lower().startswith("family"),
                    spans=locate(condition, sentence),
                )
            )
    return rows
