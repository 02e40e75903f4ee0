"""The ``conceptsvc`` command: thin, validating wrappers over library functions.

Each subcommand parses and validates its arguments, calls one plain function, and prints.
Errors derived from :class:`~conceptsvc.errors.ConceptsvcError` are printed as one line with
their code and exit status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from conceptsvc import __version__
from conceptsvc.errors import ConceptsvcError

if TYPE_CHECKING:
    from conceptsvc.index import ConceptIndex

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _cmd_semtypes(args: argparse.Namespace) -> int:
    from conceptsvc.semantic_network import load_semantic_network

    sn = load_semantic_network()
    for g in sorted(sn.groups.values(), key=lambda g: g.code):
        print(f"{g.code}  {g.name}")
        for tui in g.tuis:
            t = sn.types[tui]
            print(f"    {t.tui}  {t.abbrev:<5} {t.name}")
    return 0


def _add_semtypes(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("semtypes", help="list the semantic types and groups")
    p.set_defaults(handler=_cmd_semtypes)


def _load_index_arg(path: str | None) -> ConceptIndex:
    """The index at ``--index``, or the embedded demo index when none is given."""
    from conceptsvc.index import ConceptIndex

    if path:
        return ConceptIndex.load(path)
    try:
        from conceptsvc.embedded import demo_index
    except ImportError as exc:
        raise ConceptsvcError(
            "the embedded demo dictionary is not available in this installation; "
            "pass --index DIR (build one with `conceptsvc index build`)"
        ) from exc
    return demo_index()


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from conceptsvc.evaluation import read_captions, read_concepts, score, write_concepts_csv

    if args.local and not args.captions:
        raise ConceptsvcError("--local needs --captions FILE (an ID,Caption CSV)")
    if not args.local and (args.captions or args.index or args.write_predictions):
        raise ConceptsvcError(
            "--captions, --index and --write-predictions only apply with --local"
        )
    if args.top < 0:
        raise ConceptsvcError(f"--top must be >= 0, got {args.top}")
    gold = read_concepts(args.gold)
    manual = read_concepts(args.manual) if args.manual else None
    if args.local:
        from conceptsvc.extractor import ExtractOptions, Extractor

        index = _load_index_arg(args.index)
        options = ExtractOptions(
            mode=args.mode,
            threshold=args.threshold,
            similarity=args.similarity,
            profile=args.profile,
            include_negated=not args.drop_negated,
            include_mentions=False,
        )
        extractor = Extractor(index, default_options=options)
        captions = read_captions(args.captions)
        annotations = extractor.extract_batch(captions)
        pred: dict[str, list[str]] = {a.id: list(a.concepts) for a in annotations}
        if args.write_predictions:
            write_concepts_csv(args.write_predictions, pred.items())
    else:
        pred = read_concepts(args.pred)
    result = score(pred, gold, manual)
    if args.json:
        print(json.dumps(result.as_dict(top=args.top), indent=2))
        return 0
    print(f"images scored      {result.n_images}")
    print(f"primary F1         {result.primary_f1:.4f}")
    if result.secondary_f1 is not None:
        print(f"secondary F1       {result.secondary_f1:.4f}  ({result.n_secondary} images)")
    print(
        f"micro P / R / F1   {result.micro_precision:.4f} / {result.micro_recall:.4f} / "
        f"{result.micro_f1:.4f}"
    )
    if result.missing_predictions:
        print(f"no prediction for  {result.missing_predictions} gold images (scored 0)")
    if args.top:
        print(f"top {args.top} false negatives: " + ", ".join(
            f"{c} {n}" for c, n in result.false_negatives.most_common(args.top)))
        print(f"top {args.top} false positives: " + ", ".join(
            f"{c} {n}" for c, n in result.false_positives.most_common(args.top)))
    return 0


def _add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "evaluate",
        help="ImageCLEFmedical scoring of predictions (or of an in-process run with --local)",
        description=(
            "Score predicted concepts against gold with the ImageCLEFmedical concept-detection "
            "measures. Either give --pred FILE (ImageCLEF CSV, submission TSV or JSONL), or "
            "--local --captions FILE to extract in this process first."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred", help="predictions file (CSV ID,CUIs / TSV / JSONL)")
    src.add_argument("--local", action="store_true", help="extract in-process from --captions")
    p.add_argument("--gold", required=True, help="gold concepts (ImageCLEF CSV ID,CUIs)")
    p.add_argument("--manual", help="manual gold concepts, for the secondary F1")
    p.add_argument("--captions", help="captions CSV (ID,Caption); with --local")
    p.add_argument("--index", help="index directory (default: the embedded demo dictionary)")
    p.add_argument("--profile", default="rocov2", help="concept profile (default: rocov2)")
    p.add_argument("--mode", default="exact", choices=["exact", "approximate"])
    p.add_argument("--similarity", default="jaccard",
                   choices=["jaccard", "cosine", "dice", "overlap"])
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--drop-negated", action="store_true", help="drop negated mentions")
    p.add_argument("--write-predictions", metavar="PRED.csv",
                   help="with --local: write predictions as ImageCLEF CSV")
    p.add_argument("--top", type=int, default=10, help="false negatives/positives to list")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_evaluate)


# Subcommand registrars; each module-level command adds itself here.
_REGISTRARS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_semtypes,
    _add_evaluate,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conceptsvc", description="UMLS concept mapping for radiology captions."
    )
    parser.add_argument("--version", action="version", version=f"conceptsvc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConceptsvcError as exc:
        print(f"conceptsvc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
