"""MedCAT 2 (2.9.0) with a concept database built from our dictionary, and no training.

ROCOv2 labelled its captions with a MedCAT model trained over the full UMLS; no such model
exists here (nor may one be downloaded), so this is MedCAT as a user gets it from a dictionary
alone: :class:`medcat.model_creation.cdb_maker.CDBMaker` over a table made from the RRF rows
(``cui, name, ontologies, name_status, type_ids``; the concept's preferred name has status
``P``, every other string ``A``), an empty vocabulary, spell checking off (it needs a
vocabulary), and the ``primary_name_only_linker`` — MedCAT's linker for untrained models: it
links a name that has one concept, or one concept with the name as its primary name, and
skips the rest (the default context linker has no context vectors without training). Other
settings are MedCAT's defaults (e.g. names shorter than 3 characters are not detected).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from conceptsvc.sources.rrf import MetaDir, iter_mrconso, iter_mrsty

LANGUAGE = "ENG"
DROP_SUPPRESSIBLE = frozenset({"O", "E", "Y"})


def dictionary_table(meta: Path) -> dict[str, list[str]]:
    """The RRF rows as MedCAT's CDB-maker columns (one row per distinct concept/string)."""
    md = MetaDir(meta)
    types: dict[str, list[str]] = {}
    if md.has("MRSTY.RRF"):
        for sty in iter_mrsty(md):
            types.setdefault(sty.cui, []).append(sty.tui)
    preferred: dict[str, tuple[int, str]] = {}
    rows: dict[tuple[str, str], set[str]] = {}
    for row in iter_mrconso(md):
        if row.lat != LANGUAGE or row.suppress in DROP_SUPPRESSIBLE or not row.string.strip():
            continue
        rank = 0 if (row.ts == "P" and row.stt == "PF" and row.ispref == "Y") else 1
        if row.cui not in preferred or rank < preferred[row.cui][0]:
            preferred[row.cui] = (rank, row.string)
        rows.setdefault((row.cui, row.string), set()).add(row.sab)
    table: dict[str, list[str]] = {
        "cui": [], "name": [], "ontologies": [], "name_status": [], "type_ids": []
    }
    for (cui, name), sabs in rows.items():
        table["cui"].append(cui)
        table["name"].append(name)
        table["ontologies"].append("|".join(sorted(sabs)))
        table["name_status"].append("P" if preferred[cui][1] == name else "A")
        table["type_ids"].append("|".join(types.get(cui, [])))
    return table


class MedCATPeer:
    name = "medcat"
    variants: tuple[str, ...] = ("all",)

    def __init__(self) -> None:
        # MedCAT checks PyPI for newer versions at start-up unless told not to.
        os.environ.setdefault("MEDCAT_DISABLE_VERSION_CHECK", "true")
        self._cat: Any = None
        self._cdb: Any = None

    def _config(self) -> Any:
        from medcat.config import Config

        cnf = Config()
        cnf.general.spell_check = False
        cnf.components.linking.comp_name = "primary_name_only_linker"
        return cnf

    def build(self, meta: Path, work: Path) -> dict[str, Any]:
        import pandas as pd
        from medcat.model_creation.cdb_maker import CDBMaker

        t0 = time.perf_counter()
        table = dictionary_table(meta)
        maker = CDBMaker(self._config())
        self._cdb = maker.prepare_csvs([pd.DataFrame(table)])
        return {
            "seconds": time.perf_counter() - t0,
            "names": len(self._cdb.name2info),
            "concepts": len(self._cdb.cui2info),
            "rows": len(table["cui"]),
        }

    def load(self, work: Path) -> None:
        from medcat.cat import CAT
        from medcat.vocab import Vocab

        self._cat = CAT(self._cdb, vocab=Vocab(), config=self._cdb.config)

    def annotate(self, text: str) -> dict[str, list[str]]:
        # get_entities returns {} (no "entities" key) for a text MedCAT parses to nothing.
        ents = self._cat.get_entities(text).get("entities", {})
        return {"all": list(dict.fromkeys(e["cui"] for e in ents.values()))}

    def settings(self) -> dict[str, Any]:
        import medcat

        return {
            "medcat": getattr(medcat, "__version__", "2.9.0"),
            "linker": "primary_name_only_linker",
            "spell_check": False,
            "training": "none",
        }
