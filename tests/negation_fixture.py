"""The negation fixture (``fixtures/negation_sentences.tsv``: NegEx and caption sentences, each
with its status and condition), read once for the tests that use it (the negation rules and
the compiled engine's parity)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

SENTENCES = Path(__file__).parent / "fixtures" / "negation_sentences.tsv"


@cache
def negation_rows() -> tuple[tuple[str, str, str], ...]:
    """(status, condition, sentence) of every fixture row; ``#`` lines are comments."""
    rows = []
    for line in SENTENCES.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            status, condition, _source, sentence = line.split("\t")
            rows.append((status, condition, sentence))
    return tuple(rows)
