"""Reader for a site's own terms: TSV or CSV rows ``cui, term, tui[, sab]``.

Sites keep local synonyms in spreadsheets, so the format is forgiving where that costs nothing:
``.csv`` files are comma-separated (with CSV quoting), anything else tab-separated; an optional
header names the columns (``cui``, ``term``, ``tui``, ``sab``, ``tty`` or their usual synonyms)
in any order; lines starting with ``#`` are comments; a row may list several types separated by
``;``, ``,`` or ``|``, each a TUI, an abbreviation or a type name. A semantic group is refused
(it names many types, and the row one concept). Without a sab or tty column, rows get the
caller's ``default_sab`` and the term type ``SY``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from conceptsvc.errors import DictionaryError, MalformedRowError, SemanticNetworkError
from conceptsvc.semantic_network import SemanticNetwork
from conceptsvc.sources import OnError, ReadStats

__all__ = ["TableRow", "iter_rows"]

_HEADER_NAMES = {
    "cui": "cui", "concept_id": "cui", "id": "cui",
    "term": "term", "string": "term", "str": "term", "name": "term", "alias": "term",
    "tui": "tui", "tuis": "tui", "type": "tui", "types": "tui", "semantic_type": "tui",
    "semantic_types": "tui",
    "sab": "sab", "source": "sab",
    "tty": "tty",
}
_TUI_SPLIT = re.compile(r"[;,|]\s*")
_HEADER_ADVICE = (
    "A header row starts with cui, concept_id or id and names each column (cui, term, tui, sab, "
    "tty, or their synonyms: concept_id, string, name, alias, type, semantic_type, source); "
    "fix it, or remove it to use the order cui, term, tui[, sab]. (--on-error skip skips bad "
    "rows, not a bad header.)"
)


class TableRow(NamedTuple):
    cui: str
    term: str
    tuis: tuple[str, ...]
    sab: str
    tty: str


def _column(row: list[str], positions: dict[str, int], name: str) -> str:
    i = positions.get(name)
    return row[i].strip() if i is not None and i < len(row) else ""


def iter_rows(
    path: str | Path,
    sn: SemanticNetwork,
    *,
    default_sab: str = "LOCAL",
    on_error: OnError = "fail",
    stats: ReadStats | None = None,
) -> Iterator[TableRow]:
    """Every well-formed row, in file order, its types resolved to TUIs through ``sn``.

    ``stats`` counts rows and skips under the file's name.
    """
    if on_error not in ("fail", "skip"):
        raise DictionaryError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    path = Path(path)
    st = stats if stats is not None else ReadStats()
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    table = path.name
    positions = {"cui": 0, "term": 1, "tui": 2, "sab": 3}
    count = 0
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        for row in reader:
            lineno = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()) or row[0].startswith("#"):
                continue
            if count == 0 and not st.skipped.get(table) and row[0].strip().lower() in (
                "cui", "concept_id", "id"
            ):
                names = [_HEADER_NAMES.get(c.strip().lower()) for c in row]
                unknown = [c for c, n in zip(row, names, strict=True) if n is None]
                if unknown or "term" not in names:
                    raise MalformedRowError(
                        path, lineno,
                        f"header has unknown column(s) {unknown} or no term column; "
                        "use cui, term, tui, sab, tty",
                        _HEADER_ADVICE,
                    )
                positions = {n: i for i, n in enumerate(names) if n is not None}
                continue
            try:
                if len(row) < 2 or len(row) > max(len(positions), 4):
                    first = count == 0 and not st.skipped.get(table)
                    raise MalformedRowError(
                        path, lineno,
                        f"{len(row)} fields; expected cui, term, tui[, sab]"
                        + (" (if this row is a header, its first column must be cui, "
                           "concept_id or id)" if first else ""),
                    )
                cui = _column(row, positions, "cui")
                term = row[positions["term"]] if positions["term"] < len(row) else ""
                if not cui:
                    raise MalformedRowError(path, lineno, "empty cui")
                if not term.strip():
                    raise MalformedRowError(path, lineno, "empty term")
                tuis: list[str] = []
                for t in _TUI_SPLIT.split(_column(row, positions, "tui")):
                    if not t:
                        continue
                    resolved = sn.resolve(t) if t.upper() not in sn.types else {t.upper()}
                    if len(resolved) != 1:
                        raise MalformedRowError(
                            path, lineno, f"{t!r} is a semantic group, not a type"
                        )
                    tuis.extend(resolved)
            except MalformedRowError as err:
                if on_error == "fail":
                    raise
                st.skip(table, err)
                continue
            except SemanticNetworkError as exc:  # an unknown type named in the row
                bad_type = MalformedRowError(path, lineno, exc.message)
                if on_error == "fail":
                    raise bad_type from None
                st.skip(table, bad_type)
                continue
            count += 1
            sab = _column(row, positions, "sab") or default_sab
            yield TableRow(cui, term, tuple(tuis), sab, _column(row, positions, "tty") or "SY")
    st.rows[table] = count
