"""Readers of dictionary inputs, one module per format; what they share is here.

Each reader streams one format and yields plain rows, nothing more: :mod:`.rrf` the UMLS
Rich Release Format tables of a ``META`` directory, :mod:`.jsonl` a scispacy knowledge base,
:mod:`.table` a site's TSV/CSV terms. Filtering, merging and preferred names are
:mod:`conceptsvc.dictionary`'s job, and writing the index :mod:`conceptsvc.index`'s.

A malformed row is a :class:`~conceptsvc.errors.MalformedRowError` naming the file and the
line, or, with ``on_error="skip"``, a skip counted in :class:`ReadStats`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from conceptsvc.errors import MalformedRowError

__all__ = ["OnError", "Progress", "ReadStats"]

OnError = Literal["fail", "skip"]

# Progress callback: (table name, rows read so far, fraction done in [0, 1] or None).
Progress = Callable[[str, int, "float | None"], None]


@dataclass
class ReadStats:
    """What a read saw; the build report is made from these."""

    rows: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    # A few skipped rows as "file:line: problem", so a report can show what was wrong.
    examples: list[str] = field(default_factory=list)

    def skip(self, table: str, err: MalformedRowError) -> None:
        self.skipped[table] = self.skipped.get(table, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"{err.path}:{err.line}: {err.problem}")

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())
