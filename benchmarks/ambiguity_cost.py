"""Instructions per caption as a key's ambiguity grows: the load-independent measure of issue 13.

Wall clock on a shared machine says little; valgrind's callgrind counts instructions whatever
else runs. This script is what callgrind runs. ``build`` writes an index of the demo dictionary
plus synthetic concepts attached to three made-up words — ``quixal`` (1 concept), ``brevat``
(1,000) and ``corvex`` (8,000), each concept with a second, longer string so that context
ranking has words to compare — and ``run`` extracts one caption set: warm-up pass first (the
steady state is what is measured), then ``--passes`` passes. Per caption = (Ir with 2 passes −
Ir with 0 passes) / (2 × captions)::

    python -m benchmarks.ambiguity_cost build --out bench-out/ambiguity-index
    for p in 0 2; do
      valgrind --tool=callgrind --callgrind-out-file=cg.$p.out \\
        python -m benchmarks.ambiguity_cost run --index bench-out/ambiguity-index \\
          --set corvex --passes $p
    done

``--set demo`` runs the ROCOv2 validation captions (``--captions``) on the same index: the
demo dictionary's exact-mode figure. Options: ``rocov2`` profile, exact mode.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import conceptsvc
from conceptsvc.dictionary import TableSource, UmlsSource, build_dictionary_index
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.model import ExtractOptions

__all__ = ["SETS", "build", "captions", "main"]

_DEMO_META = Path(conceptsvc.__file__).parent / "data" / "demo" / "META"
_DEMO_CAPTIONS = _DEMO_META.parent / "captions.csv"
SETS = {"quixal": 1, "brevat": 1_000, "corvex": 8_000}
"""Made-up word → how many synthetic concepts its key maps to."""
_TUIS = ("T047", "T033", "T023", "T060", "T121", "T061")
_OTHER = ("lung", "liver", "kidney", "mass", "fracture", "artery", "nodule", "cyst", "bone")


def build(out: Path) -> None:
    """The demo dictionary plus the synthetic concepts of :data:`SETS`."""
    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "ambiguous.tsv"
        n = 0
        with tsv.open("w", encoding="utf-8") as fh:
            fh.write("cui\tterm\ttui\tsab\n")
            for word, count in SETS.items():
                for k in range(count):
                    cui = f"C9{n:06d}"
                    n += 1
                    tui = _TUIS[k % len(_TUIS)]
                    fh.write(f"{cui}\t{word}\t{tui}\tSYNTH\n")
                    fh.write(f"{cui}\t{word} of the {_OTHER[k % len(_OTHER)]} {k}\t{tui}\tSYNTH\n")
        build_dictionary_index([UmlsSource(_DEMO_META), TableSource(tsv)], out)


def captions(which: str, path: Path) -> list[str]:
    """``demo``: every caption of the ``ID,Caption`` CSV; a word of :data:`SETS`: the first
    50 of them, each with a sentence using that word."""
    with path.open(encoding="utf-8", newline="") as fh:
        texts = [row[1] for row in csv.reader(fh)][1:]
    if which == "demo":
        return texts
    return [f"{t} A {which} lesion is seen." for t in texts[:50]]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--index", type=Path, required=True)
    r.add_argument("--set", choices=("demo", *SETS), required=True)
    r.add_argument("--passes", type=int, default=2)
    r.add_argument("--captions", type=Path, default=_DEMO_CAPTIONS,
                   help="ID,Caption CSV (default: the demo captions)")
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args.out)
        return 0
    ex = Extractor(ConceptIndex.load(args.index))
    opts = ExtractOptions(profile="rocov2")
    texts = captions(args.set, args.captions)
    mentions = 0
    for t in texts:  # warm-up: first-use work is not what is measured
        mentions += len(ex.extract(t, opts).mentions)
    for _ in range(args.passes):
        for t in texts:
            ex.extract(t, opts)
    print(f"{ex.engine} engine, {len(texts)} captions, {mentions} mentions a pass", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
