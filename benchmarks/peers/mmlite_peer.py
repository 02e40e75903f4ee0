"""mmlite 0.1.4 (a Python port of NLM's MetaMapLite) on an index built from our dictionary.

mmlite's own index builder reads plain ``MRCONSO.RRF`` and ``MRSTY.RRF`` (it drops
suppressible atoms itself, as we do); a META directory without MRSTY gets an empty one. No
trained spaCy tagger exists offline, so part-of-speech tagging is off (mmlite's ``--no-postag``).
Negation detection is off too: concepts are kept whether negated or not, as in the other peers.
Every semantic type and source is accepted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conceptsvc.errors import DictionaryError


class MMLitePeer:
    name = "mmlite"
    variants: tuple[str, ...] = ("all",)

    def __init__(self) -> None:
        self._mml: Any = None

    def build(self, meta: Path, work: Path) -> dict[str, Any]:
        from mmlite.index import build_index

        mrconso = meta / "MRCONSO.RRF"
        if not mrconso.is_file():
            raise DictionaryError(
                f"mmlite reads a plain {mrconso}; decompress or join the split files first"
            )
        mrsty = meta / "MRSTY.RRF"
        if not mrsty.is_file():
            mrsty = work / "MRSTY.empty.RRF"
            mrsty.write_text("")
        t0 = time.perf_counter()
        build_index(mrconso, mrsty, work / "mmlite")
        return {"seconds": time.perf_counter() - t0}

    def load(self, work: Path) -> None:
        from mmlite import MetaMapLite
        from mmlite.config import Settings

        settings = Settings(
            index_directory=work / "mmlite", enable_postagging=False, detect_negations=False
        )
        self._mml = MetaMapLite(settings)

    def annotate(self, text: str) -> dict[str, list[str]]:
        cuis: dict[str, None] = {}
        for ent in self._mml.process_text(text):
            for ev in ent.evs:
                cuis[ev.cui] = None
        return {"all": list(cuis)}

    def settings(self) -> dict[str, Any]:
        return {"postagging": False, "negation": False, "restrict_to_sts": "all"}
