"""The UMLS Semantic Network: 127 semantic types (TUIs), their hierarchy and 15 groups.

Filters are written by people, so a type can be named four ways — TUI (``T047``), abbreviation
(``dsyn``), name (``Disease or Syndrome``) or semantic group (``DISO``) — and all resolve to a
set of TUIs here, once, before any matching happens. An unknown name is an error that lists
near matches rather than a filter that silently matches nothing.
"""

from __future__ import annotations

import csv
import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from conceptsvc.errors import SemanticNetworkError

__all__ = [
    "UNKNOWN_TUI",
    "SemanticGroup",
    "SemanticNetwork",
    "SemanticType",
    "load_semantic_network",
]

# Concepts without MRSTY rows are kept and typed with this sentinel (not a real TUI).
UNKNOWN_TUI = "T000"


@dataclass(frozen=True, slots=True)
class SemanticType:
    tui: str
    abbrev: str
    name: str
    tree_number: str
    group: str
    group_name: str
    definition: str


@dataclass(frozen=True, slots=True)
class SemanticGroup:
    code: str
    name: str
    tuis: tuple[str, ...]


class SemanticNetwork:
    """Lookup tables over the shipped Semantic Network; immutable after construction."""

    def __init__(self, types: Iterable[SemanticType], groups: Iterable[SemanticGroup]) -> None:
        self.types: dict[str, SemanticType] = {t.tui: t for t in types}
        self.groups: dict[str, SemanticGroup] = {g.code: g for g in groups}
        self._by_abbrev = {t.abbrev.casefold(): t.tui for t in self.types.values()}
        self._by_name = {t.name.casefold(): t.tui for t in self.types.values()}
        self._group_by_name = {g.name.casefold(): g.code for g in self.groups.values()}

    def type(self, tui: str) -> SemanticType:
        try:
            return self.types[tui]
        except KeyError:
            raise SemanticNetworkError(tui, self._suggest(tui)) from None

    def describe(self, tui: str) -> SemanticType:
        """The entry for ``tui``, or a placeholder for one the network lacks (the unknown
        sentinel T000, or a TUI from a newer UMLS release): for showing, never an error."""
        t = self.types.get(tui)
        if t is not None:
            return t
        return SemanticType(
            tui=tui,
            abbrev="unkn",
            name="Unknown" if tui == UNKNOWN_TUI else f"Unknown type {tui}",
            tree_number="",
            group="UNKNOWN",
            group_name="Unknown",
            definition="The source vocabularies assign this concept no semantic type.",
        )

    def group_of(self, tui: str) -> str:
        """The semantic group code of a TUI; ``UNKNOWN`` for the unknown sentinel."""
        t = self.types.get(tui)
        return t.group if t is not None else "UNKNOWN"

    def descendants(self, tui: str) -> frozenset[str]:
        """``tui`` and every type below it in the is-a tree (by tree number prefix)."""
        root = self.type(tui).tree_number
        return frozenset(
            t.tui
            for t in self.types.values()
            if t.tree_number == root or t.tree_number.startswith(root + ".")
        )

    def resolve(self, name: str, *, include_descendants: bool = False) -> frozenset[str]:
        """Resolve one filter name to the TUIs it stands for.

        A group resolves to all its types (descendants are already in the group). A type
        resolves to itself, plus its descendants when ``include_descendants`` is set.

        Two group codes are also type abbreviations: ``CHEM`` (Chemicals & Drugs; ``chem`` is
        T103, Chemical) and ``ORGA`` (Organizations; ``orga`` is T032, Organism Attribute).
        Written in capitals, as group codes are, they name the group; in lower case, the type.
        """
        key = name.strip()
        if not key:
            raise SemanticNetworkError(name)
        folded = key.casefold()
        if key.upper() == UNKNOWN_TUI or folded == "unknown":
            return frozenset({UNKNOWN_TUI})
        if key in self.groups:  # a group code as written (capitals): the group
            return frozenset(self.groups[key].tuis)
        tui: str | None = None
        if key.upper() in self.types:
            tui = key.upper()
        elif folded in self._by_abbrev:
            tui = self._by_abbrev[folded]
        elif folded in self._by_name:
            tui = self._by_name[folded]
        if tui is not None:
            return self.descendants(tui) if include_descendants else frozenset({tui})
        group = key.upper() if key.upper() in self.groups else self._group_by_name.get(folded)
        if group is not None:
            return frozenset(self.groups[group].tuis)
        raise SemanticNetworkError(name, self._suggest(key))

    def resolve_all(
        self, names: Iterable[str], *, include_descendants: bool = False
    ) -> frozenset[str]:
        out: set[str] = set()
        for n in names:
            out |= self.resolve(n, include_descendants=include_descendants)
        return frozenset(out)

    def _suggest(self, name: str) -> list[str]:
        vocabulary = [
            *self.types,
            *(t.abbrev for t in self.types.values()),
            *(t.name for t in self.types.values()),
            *self.groups,
            *(g.name for g in self.groups.values()),
        ]
        by_fold = {v.casefold(): v for v in vocabulary}
        close = difflib.get_close_matches(name.casefold(), list(by_fold), n=5, cutoff=0.6)
        return [by_fold[c] for c in close]


@cache
def load_semantic_network() -> SemanticNetwork:
    """The shipped network (package data); parsed once per process."""
    base = Path(__file__).parent / "data" / "semantic_network"
    with (base / "semantic_types_127.tsv").open(encoding="utf-8", newline="") as fh:
        types = [
            SemanticType(
                tui=row["tui"],
                abbrev=row["abbrev"],
                name=row["name"],
                tree_number=row["tree_number_2013"],
                group=row["group"],
                group_name=row["group_name"],
                definition=row["definition_2013"],
            )
            for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]
    members: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    with (base / "SemGroups_2018.txt").open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            code, gname, tui, _tname = line.split("|")
            members.setdefault(code, []).append(tui)
            names[code] = gname
    groups = [SemanticGroup(code, names[code], tuple(sorted(t))) for code, t in members.items()]
    return SemanticNetwork(types, groups)
