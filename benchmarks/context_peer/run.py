"""medspaCy's ConText on the NegEx/ConText annotated sentences (run in ``.venv-context``).

Usage (from the checkout's root)::

    .venv-context/bin/python -m benchmarks.context_peer.run --tsv FILE --out RESULT.json

For each row, medspaCy's default pipeline (its tokenizer, PyRuSH, a TargetMatcher, ConText with
its default rules) runs on the sentence with one TargetRule: the row's condition, as annotated.
Each row gets a target matcher of its own because spaCy entities cannot overlap — with every
condition in one rule set, a longer condition ("chest pain") would hide the annotated one
("pain"); conceptsvc is run with ``overlap="all"`` for the same reason. The condition is found
when an entity overlaps where :func:`~benchmarks.context_peer.annotations.locate` puts it in
the sentence; its ConText attributes are those of the overlapping entities (any of them).

The JSON written (the contract with :mod:`benchmarks.bench_context`)::

    {"system": "medspacy", "versions": {...}, "seconds": s,
     "rows": [{"line": "1", "found": true, "negated": true, "historical": false,
               "hypothetical": false, "family": false}, ...]}

Only this file prints: it is the command-line edge.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.context_peer.annotations import AnnotatedRow, read_annotations

__all__ = ["main", "run"]


def _import_medspacy() -> Any:
    """medspacy, imported in a venv without QuickUMLS.

    ``medspacy/util.py`` imports ``quickumls.spacy_component`` at import time, only to register
    QuickUMLS's spaCy factory; ConText, the target matcher and PyRuSH never use it. This venv
    must not contain QuickUMLS (medspacy_quickumls ships a module named ``quickumls`` that
    clashes with QuickUMLS proper), so the import gets an empty module — and refuses to run
    where a real one is installed, which would mean the venv is not the one intended.
    """
    if importlib.util.find_spec("quickumls") is not None:
        raise SystemExit(
            "error: a quickumls module is installed in this venv; medspaCy's ConText runs in "
            ".venv-context, which must not contain QuickUMLS (rebuild it: make context-peer)"
        )
    stub = types.ModuleType("quickumls")
    component = types.ModuleType("quickumls.spacy_component")
    stub.spacy_component = component  # type: ignore[attr-defined]
    sys.modules["quickumls"] = stub
    sys.modules["quickumls.spacy_component"] = component
    import medspacy

    return medspacy


def run(rows: list[AnnotatedRow]) -> dict[str, Any]:
    medspacy = _import_medspacy()
    from loguru import logger  # PyRuSH's logger, which logs every sentence split at DEBUG

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from medspacy.target_matcher import TargetMatcher, TargetRule

    # the default pipeline less the target matcher, which each row gets afresh
    nlp = medspacy.load(
        medspacy_enable=["medspacy_tokenizer", "medspacy_pyrush", "medspacy_context"]
    )
    context = nlp.get_pipe("medspacy_context")
    pyrush = nlp.get_pipe("medspacy_pyrush")
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for row in rows:
        matcher = TargetMatcher(nlp)
        matcher.add([TargetRule(row.condition, "CONDITION")])
        doc = context(matcher(pyrush(nlp.make_doc(row.sentence))))
        hits = [
            e for e in doc.ents
            if any(e.start_char < end and start < e.end_char for start, end in row.spans)
        ]
        out.append({
            "line": row.line,
            "found": bool(hits),
            "negated": any(e._.is_negated for e in hits),
            "historical": any(e._.is_historical for e in hits),
            "hypothetical": any(e._.is_hypothetical for e in hits),
            "family": any(e._.is_family for e in hits),
        })
    seconds = time.perf_counter() - t0
    versions = {d: metadata.version(d) for d in ("medspacy", "spacy", "PyRuSH")}
    return {"system": "medspacy", "versions": versions, "seconds": seconds, "rows": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tsv", required=True, help="the annotated sentences (TSV)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    result = run(read_annotations(args.tsv))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"medspacy: {len(result['rows'])} rows in {result['seconds']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
