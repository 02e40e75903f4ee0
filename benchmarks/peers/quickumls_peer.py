"""QuickUMLS as the benchmarks run it: threshold 0.7, jaccard, window 5, min_match_length 2.

The index is built by :func:`conceptsvc.backends.quickumls.build_quickumls_index` (QuickUMLS's
own writer, driven without prompts or downloads). Matching calls QuickUMLS directly — not
through conceptsvc's backend — so that the measured speed is QuickUMLS's own: a blank spaCy
English pipeline parses the caption and ``QuickUMLS._match(doc, best_match=True)`` selects
non-overlapping spans (``QuickUMLS.match`` ignores ``best_match``). Every semantic type is
accepted.

Two concept sets come from one run: ``all`` keeps every concept QuickUMLS lists for a selected
span, as QuickUMLS's own spaCy component does (the default, reported in BENCHMARKS.md);
``top1`` keeps only the best-ranked concept per span.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conceptsvc.backends.quickumls import _import_quickumls, build_quickumls_index

THRESHOLD = 0.7
SIMILARITY = "jaccard"
WINDOW = 5
MIN_MATCH_LENGTH = 2


class QuickUMLSPeer:
    name = "quickumls"
    variants: tuple[str, ...] = ("all", "top1")

    def __init__(self) -> None:
        self._qu: Any = None
        self._nlp: Any = None

    def build(self, meta: Path, work: Path) -> dict[str, Any]:
        report = build_quickumls_index(meta, work / "quickumls")
        return {"seconds": report.seconds, **report.as_dict()}

    def load(self, work: Path) -> None:
        import spacy

        core = _import_quickumls()["core"]
        self._nlp = spacy.blank("en")
        self._qu = core.QuickUMLS(
            str(work / "quickumls"),
            overlapping_criteria="score",
            threshold=THRESHOLD,
            window=WINDOW,
            similarity_name=SIMILARITY,
            min_match_length=MIN_MATCH_LENGTH,
            accepted_semtypes=None,
            spacy_component=True,
        )

    def annotate(self, text: str) -> dict[str, list[str]]:
        groups = self._qu._match(self._nlp(text), best_match=True, ignore_syntax=False)
        everything: dict[str, None] = {}
        top: dict[str, None] = {}
        for group in groups:
            top[group[0]["cui"]] = None
            for cand in group:
                everything[cand["cui"]] = None
        return {"all": list(everything), "top1": list(top)}

    def settings(self) -> dict[str, Any]:
        return {
            "threshold": THRESHOLD,
            "similarity": SIMILARITY,
            "window": WINDOW,
            "min_match_length": MIN_MATCH_LENGTH,
            "overlapping_criteria": "score",
            "best_match": True,
            "ignore_syntax": False,
            "spacy": "blank en (no POS heuristics)",
            "lowercase": True,
            "normalize_unicode": True,
        }
