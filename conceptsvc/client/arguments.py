"""Command-line arguments shared by the client commands (annotate, lookup, concept, search).

The commands themselves live in :mod:`conceptsvc.cli`; this module keeps the argument groups
they have in common — extraction options, the service connection — in one place, so that
``annotate`` and ``lookup`` spell an option the same way, and turns parsed arguments into the
library's types. It imports nothing heavy at module level: ``conceptsvc --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from conceptsvc.errors import ClientError
from conceptsvc.model import MODES, OVERLAPS, SIMILARITIES

if TYPE_CHECKING:
    from conceptsvc.client.channel import ChannelSecurity
    from conceptsvc.client.lookup import Lookup

__all__ = [
    "DEFAULT_TARGET",
    "add_connection",
    "add_extract_options",
    "add_lookup_common",
    "extract_overrides",
    "lookup_backend",
    "name_list",
    "profile_arg",
    "security",
]

DEFAULT_TARGET = "127.0.0.1:50051"
TOKEN_ENV = "CONCEPTSVC_TOKEN"


def name_list(values: list[str] | None) -> tuple[str, ...] | None:
    """Repeatable, comma-separated name lists; a semantic type *name* that contains commas
    ("Body Part, Organ, or Organ Component") is kept whole."""
    if values is None:
        return None
    from conceptsvc.errors import SemanticNetworkError
    from conceptsvc.semantic_network import load_semantic_network

    sn = load_semantic_network()

    def is_name(text: str) -> bool:
        try:
            sn.resolve(text)
        except SemanticNetworkError:
            return False
        return True

    out: list[str] = []
    for value in values:
        pieces = [v.strip() for v in value.split(",")]
        i = 0
        while i < len(pieces):
            # the longest run of pieces from here that is one name with commas, else one piece
            for j in range(len(pieces), i + 1, -1):
                joined = ", ".join(pieces[i:j])
                if is_name(joined):
                    out.append(joined)
                    i = j
                    break
            else:
                if pieces[i]:
                    out.append(pieces[i])
                i += 1
    return tuple(out)


def add_extract_options(
    p: argparse.ArgumentParser, *, local: bool = True, search: bool = False
) -> None:
    """``local``: the command has ``--local`` (annotate does not: it always uses a service).
    ``search``: only the options a concept search uses (filters, similarity, threshold): the
    matching mode, overlaps, profile and context options would be accepted and ignored."""
    g = p.add_argument_group(
        "extraction options",
        "options left unset take the service's defaults"
        + (" (the engine's with --local)" if local else ""),
    )
    g.add_argument("--semantic-types", action="append", metavar="NAMES",
                   help="accept only these semantic types (TUI, abbreviation or name); "
                        "comma-separated, repeatable")
    g.add_argument("--semantic-groups", action="append", metavar="NAMES",
                   help="accept only these semantic groups (code or name, e.g. DISO)")
    g.add_argument("--sources", action="append", metavar="SABS",
                   help="accept only strings from these source vocabularies")
    g.add_argument("--exclude-cuis", action="append", metavar="CUIS",
                   help="never report these concepts")
    if not search:
        g.add_argument("--mode", choices=MODES, help="matching mode")
        g.add_argument("--approximate", dest="mode", action="store_const",
                       const="approximate", help="shorthand for --mode approximate")
    else:  # a search is always approximate; the flag is lookup's, so a habit does not fail
        g.add_argument("--approximate", action="store_true",
                       help="(always on: a search ranks exact matches, then approximate ones)")
    g.add_argument("--similarity", choices=SIMILARITIES,
                   help="similarity measure for approximate matching")
    g.add_argument("--threshold", type=float, help="approximate matching threshold, in (0, 1]")
    if search:
        return
    g.add_argument("--overlap", choices=OVERLAPS,
                   help="which of overlapping mentions to keep")
    g.add_argument("--profile", help="concept profile (none, rocov2, ...)"
                   + (", or a profile file of your own (FILE.yaml)" if local else ""))
    g.add_argument("--include-negated", action=argparse.BooleanOptionalAction, default=None,
                   help="report negated mentions (flagged) or drop them")
    g.add_argument("--include-hypothetical", action=argparse.BooleanOptionalAction, default=None,
                   help="report hypothetical mentions ('rule out pneumonia', flagged) or drop "
                   "them (default: as the profile says)")


def extract_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The extraction options given on the command line, as ExtractOptions field values."""
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise ClientError(f"--threshold must be in (0, 1], got {args.threshold}.")
    found: dict[str, Any] = {
        "semantic_types": name_list(args.semantic_types),
        "semantic_groups": name_list(args.semantic_groups),
        "sources": name_list(args.sources),
        "exclude_cuis": name_list(args.exclude_cuis),
        "mode": getattr(args, "mode", None),  # (a search has no mode, overlap, profile...)
        "similarity": args.similarity,
        "threshold": args.threshold,
        "overlap": getattr(args, "overlap", None),
        "profile": profile_arg(getattr(args, "profile", None), getattr(args, "local", False)),
        "include_negated": getattr(args, "include_negated", None),
        "include_hypothetical": getattr(args, "include_hypothetical", None),
    }
    return {k: v for k, v in found.items() if v is not None}


@overload
def profile_arg(value: str, local: bool) -> str: ...
@overload
def profile_arg(value: None, local: bool) -> None: ...
def profile_arg(value: str | None, local: bool) -> str | None:
    """A ``--profile`` value: a profile's name, or, in this process only (``local``), a
    profile file of one's own, registered here and named by its profile's name."""
    if value is None or (not value.lower().endswith((".yaml", ".yml")) and "/" not in value):
        return value
    if not local:
        raise ClientError(
            f"--profile {value}: a profile file is read by the engine in this process "
            "(--local); a service serves the profiles it was started with (`conceptsvc serve "
            "--profile-files FILE`), by name"
        )
    from conceptsvc.profile import register_profile_file

    return register_profile_file(value).name


def add_connection(p: argparse.ArgumentParser, *, several: bool) -> None:
    g = p.add_argument_group("service connection")
    g.add_argument(
        "--target", action="append" if several else "store", metavar="ADDRESS",
        help=f"service address host:port (default {DEFAULT_TARGET}), or dns:///name:port to "
             "balance round-robin over all its addresses"
             + ("; repeat for several replicas" if several else ""),
    )
    g.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    g.add_argument("--tls", action="store_true", help="connect with TLS (system root CAs)")
    g.add_argument("--ca-cert", metavar="PEM", help="CA certificate to verify the server with")
    g.add_argument("--client-cert", metavar="PEM", help="client certificate (mutual TLS)")
    g.add_argument("--client-key", metavar="PEM", help="client private key (mutual TLS)")
    g.add_argument("--server-name", help="expected server name in its certificate")


def security(args: argparse.Namespace) -> ChannelSecurity:
    from conceptsvc.client.channel import ChannelSecurity

    return ChannelSecurity(
        tls=args.tls,
        ca_cert=Path(args.ca_cert) if args.ca_cert else None,
        client_cert=Path(args.client_cert) if args.client_cert else None,
        client_key=Path(args.client_key) if args.client_key else None,
        server_name=args.server_name,
        # (stripped: a token file's newline is not part of the token; the service strips too)
        token=(args.token or os.environ.get(TOKEN_ENV) or "").strip() or None,
    )


def add_lookup_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local", action="store_true",
                   help="run the engine in this process instead of calling a service")
    p.add_argument("--index", help="with --local: index directory (default: the demo dictionary)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="seconds each call to the service may take (default 10)")
    add_connection(p, several=False)


def lookup_backend(args: argparse.Namespace) -> Lookup:
    from conceptsvc.client.lookup import LocalLookup, RemoteLookup

    if args.local:
        if args.target:
            raise ClientError("--local and --target exclude each other.")
        if args.timeout is not None:
            raise ClientError("--timeout bounds calls to a service; --local makes none.")
        return LocalLookup(args.index)
    if args.index:
        raise ClientError("--index only applies with --local (a service uses its own index).")
    if args.timeout is not None and not args.timeout > 0:
        raise ClientError(f"--timeout must be > 0 seconds, got {args.timeout}")
    return RemoteLookup(args.target or DEFAULT_TARGET, security=security(args),
                        timeout=10.0 if args.timeout is None else args.timeout)
