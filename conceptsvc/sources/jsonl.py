"""Reader for a scispacy knowledge base: concepts with their canonical name, aliases and types.

scispacy's ``KnowledgeBase`` reads JSON Lines of ``{"concept_id", "canonical_name", "aliases",
"types"}`` (and an optional ``"definition"``, which we do not use), or one JSON array of those
objects; so does :func:`iter_concepts`. ``scripts/scispacy_reference/`` checks that both read
the same concepts and aliases from the same file.

A record that is not JSON, not an object, or lacks those fields in those types is a
:class:`~conceptsvc.errors.MalformedRowError` with its line (with ``on_error="skip"``, a
counted skip): the file has no other way to say which concept was meant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from conceptsvc.errors import DictionaryError, MalformedRowError
from conceptsvc.sources import OnError, ReadStats

__all__ = ["KbConcept", "iter_concepts"]


class KbConcept(NamedTuple):
    """One knowledge-base record. ``aliases`` are as written: they may repeat the canonical
    name (scispacy's own files do) or each other."""

    cui: str
    canonical_name: str
    aliases: list[str]
    types: list[str]


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, record) from JSON Lines, or from a file holding one JSON array.

    A line that is not JSON is yielded as a :class:`MalformedRowError` (not raised), so the
    caller can skip it and go on reading.
    """
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            records = json.loads(path.read_bytes())
        except ValueError as exc:
            yield getattr(exc, "lineno", 1), MalformedRowError(path, getattr(exc, "lineno", 1),
                                                               f"invalid JSON: {exc}")
            return
        if not isinstance(records, list):
            yield 1, MalformedRowError(path, 1, "expected a JSON array of concept objects")
            return
        yield from enumerate(records, 1)
        return
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except ValueError as exc:
                yield lineno, MalformedRowError(path, lineno, f"invalid JSON: {exc}")


def iter_concepts(
    path: str | Path, *, on_error: OnError = "fail", stats: ReadStats | None = None
) -> Iterator[KbConcept]:
    """Every well-formed record of the file, in file order; malformed ones fail or are skipped.

    ``stats`` counts rows and skips under the file's name.
    """
    if on_error not in ("fail", "skip"):
        raise DictionaryError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    path = Path(path)
    st = stats if stats is not None else ReadStats()
    table = path.name
    count = 0
    for lineno, rec in _records(path):
        try:
            if isinstance(rec, MalformedRowError):
                raise rec
            if not isinstance(rec, dict):
                raise MalformedRowError(path, lineno, "record is not a JSON object")
            cui = rec.get("concept_id")
            name = rec.get("canonical_name")
            aliases = rec.get("aliases", [])
            types = rec.get("types", [])
            if not isinstance(cui, str) or not cui:
                raise MalformedRowError(path, lineno, "missing or empty 'concept_id'")
            if not isinstance(name, str):
                raise MalformedRowError(path, lineno, "missing 'canonical_name' string")
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise MalformedRowError(path, lineno, "'aliases' must be a list of strings")
            if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
                raise MalformedRowError(path, lineno, "'types' must be a list of strings")
        except MalformedRowError as err:
            if on_error == "fail":
                raise
            st.skip(table, err)
            continue
        count += 1
        yield KbConcept(cui, name, aliases, types)
    st.rows[table] = count
