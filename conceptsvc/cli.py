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

from conceptsvc import __version__
from conceptsvc.errors import ConceptsvcError

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


# Subcommand registrars; each module-level command adds itself here.
_REGISTRARS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_semtypes,
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
