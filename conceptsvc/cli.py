"""The ``conceptsvc`` command: thin, validating wrappers over library functions.

Each subcommand parses and validates its arguments, calls one plain function, and prints.
Errors derived from :class:`~conceptsvc.errors.ConceptsvcError` are printed as one line with
their code and exit status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from conceptsvc import __version__
from conceptsvc.errors import ConceptsvcError, EvaluationError, UsageError
from conceptsvc.grpc_io import prefer_poller_io

if TYPE_CHECKING:
    from conceptsvc.index import ConceptIndex
    from conceptsvc.model import Annotation

__all__ = ["main", "run"]

Handler = Callable[[argparse.Namespace], int]

# A process killed by SIGPIPE exits 128 + 13 in a shell; a reader that stopped early (``| head``)
# gets the same status from us, not a traceback.
EXIT_BROKEN_PIPE = 141

# CONCEPTSVC_* variables the client commands read (conceptsvc.config knows them too): with no
# other one set, main need not load the settings model to look for unknown ones.
_CLIENT_ENV = frozenset({"CONCEPTSVC_TOKEN"})

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)$")


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but keeps a text with line breaks (the examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that suggests the closest option or command for a misspelt one
    (Python 3.14's ``suggest_on_error``, which 3.11 lacks)."""

    _SUGGEST_FROM = "_conceptsvc_suggest_from"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self._suggest_from: argparse.ArgumentParser = self

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            # The innermost (sub)parser returns first: its options are the ones to suggest from.
            self._suggest_from = vars(ns).setdefault(self._SUGGEST_FROM, self)
        return ns, extras

    def error(self, message: str) -> NoReturn:
        hint = self._suggestion(message)
        # An option unknown to a subcommand is reported by the top-level parser; the usage
        # shown is the subcommand's, where the option would have to go.
        where = self._suggest_from
        where.print_usage(sys.stderr)
        self.exit(2, f"{where.prog}: error: {message}"
                     + (f"; did you mean {hint}?" if hint else "") + "\n")

    def _suggestion(self, message: str) -> str | None:
        if message.startswith("unrecognized arguments:"):
            options = [s for a in self._suggest_from._actions for s in a.option_strings]
            for word in message.removeprefix("unrecognized arguments:").split():
                flag = word.split("=", 1)[0]
                if flag.startswith("--"):
                    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
                    if close:
                        return close[0]
            return None
        match = _INVALID_CHOICE.search(message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2))
            close = difflib.get_close_matches(match.group(1), choices, n=1, cutoff=0.6)
            return close[0] if close else None
        return None


def _examples(*lines: str) -> str:
    """An epilog of example command lines (kept as written by :class:`_HelpFormatter`)."""
    return "examples:\n" + "\n".join("  " + line for line in lines)


def _describe(p: argparse.ArgumentParser, *, description: str, epilog: str) -> None:
    """What a subcommand's ``--help`` shows above and below its options."""
    p.description = description
    p.epilog = epilog


if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsers = argparse._SubParsersAction


class _LazySubcommands(_SubParsers):
    """Subcommands whose options are added only when argparse picks one.

    Some commands' options cost more to build than a small command takes to run (``serve``'s
    come from the pydantic-settings model, ``evaluate``'s from the scoring module), and
    ``conceptsvc annotate`` should not pay for them. Each subcommand's parser is made with its
    name and one-line help — all that ``conceptsvc --help`` and the suggestion for a misspelt
    command use — and filled in (description, examples, options) when argparse hands it the
    rest of the command line, before it parses it or prints its ``--help``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unfilled: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def add_lazy(
        self, name: str, summary: str, fill: Callable[[argparse.ArgumentParser], None]
    ) -> None:
        self.add_parser(name, help=summary)
        self._unfilled[name] = fill

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        fill = self._unfilled.pop(values[0], None)  # an unknown name: argparse reports it
        if fill is not None:
            fill(self._name_parser_map[values[0]])
        super().__call__(parser, namespace, values, option_string)


def _cmd_semtypes(args: argparse.Namespace) -> int:
    from conceptsvc.semantic_network import load_semantic_network

    sn = load_semantic_network()
    for g in sorted(sn.groups.values(), key=lambda g: g.code):
        print(f"{g.code}  {g.name}")
        for tui in g.tuis:
            t = sn.types[tui]
            print(f"    {t.tui}  {t.abbrev:<5} {t.name}")
    return 0


def _fill_semtypes(p: argparse.ArgumentParser) -> None:
    _describe(
        p,
        description="List the UMLS semantic groups, each with its semantic types (TUI, "
        "abbreviation, name). Any of these names may be given wherever an option takes "
        "semantic types or groups; group codes in capitals (CHEM, ORGA name the groups, chem "
        "and orga the types T103 and T032).",
        epilog=_examples(
            "conceptsvc semtypes",
            "conceptsvc semtypes | grep -i neoplastic",
        ),
    )
    p.set_defaults(handler=_cmd_semtypes)


def _load_index_arg(path: str | None) -> ConceptIndex:
    """The index at ``--index``, or the embedded demo index when none is given."""
    from conceptsvc.index import ConceptIndex

    if path:
        return ConceptIndex.load(path)
    try:
        from conceptsvc.embedded import demo_index
    except ImportError as exc:
        raise UsageError(
            "the embedded demo dictionary is not available in this installation; "
            "pass --index DIR (build one with `conceptsvc index build`)"
        ) from exc
    return demo_index()


def _evaluation_captions(path: str) -> list[tuple[str, str]]:
    """``evaluate --local``'s captions, read as ``annotate`` reads its input (CSV, ROCO TSV,
    JSONL, text, Parquet; gzipped or not); a malformed record or a repeated id is refused with
    its line, since a caption scored twice or not at all changes the F1."""
    from conceptsvc.client.corpus import Corpus

    corpus = Corpus(path)
    scan = corpus.scan()
    if scan.bad:
        shown = "; ".join(f"{b.location(path)}: {b.problem}" for b in scan.bad[:3])
        more = f" (and {len(scan.bad) - 3:,} more)" if len(scan.bad) > 3 else ""
        raise EvaluationError(
            f"{len(scan.bad):,} caption record(s) of {path} cannot be scored: {shown}{more}. "
            "Fix them (`conceptsvc annotate` reads the same formats and lists them all)."
        )
    return [(c.id, c.text) for c in corpus.captions()]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from conceptsvc.evaluation import (
        read_concepts,
        score,
        secondary_cuis,
        write_concepts_csv,
    )

    if args.local and not args.captions:
        raise UsageError(
            "--local needs --captions FILE (an ID,Caption CSV, or any input annotate reads)"
        )
    if not args.local and (args.captions or args.write_predictions):
        raise UsageError("--captions and --write-predictions only apply with --local")
    if args.top < 0:
        raise UsageError(f"--top must be >= 0, got {args.top}")
    if args.write_predictions:
        from pathlib import Path

        from conceptsvc.client.outputs import same_file

        out = Path(args.write_predictions)
        for flag, given in (("captions", args.captions), ("gold", args.gold),
                            ("manual", args.manual)):
            if given and same_file(out, Path(given)):
                raise UsageError(
                    f"--write-predictions {out} is the --{flag} file {given}; writing the "
                    "predictions would overwrite it. Give --write-predictions another path."
                )
    given = [f for f, v in (("--pred", args.pred), ("--gold", args.gold),
                            ("--manual", args.manual), ("--captions", args.captions)) if v == "-"]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} are both '-': only one input can be stdin")
    secondary_cuis(args.edition)  # an unknown edition fails before any file is read
    gold = read_concepts(args.gold)
    manual = read_concepts(args.manual) if args.manual else None
    index = None
    if args.local:
        from conceptsvc.client import arguments
        from conceptsvc.extractor import Extractor
        from conceptsvc.model import ExtractOptions

        index = _load_index_arg(args.index)
        options = ExtractOptions(
            mode=args.mode,
            threshold=args.threshold,
            similarity=args.similarity,
            profile=arguments.profile_arg(args.profile, True),
            include_negated=not args.drop_negated,
            include_hypothetical=False if args.drop_hypothetical else None,
            include_mentions=False,
        )
        extractor = Extractor(index, default_options=options)
        captions = _evaluation_captions(args.captions)
        annotations = extractor.extract_batch(captions)
        pred: dict[str, list[str]] = {a.id: list(a.concepts) for a in annotations}
        if args.write_predictions:
            write_concepts_csv(args.write_predictions, pred.items())
    else:
        pred = read_concepts(args.pred)
    result = score(pred, gold, manual, edition=args.edition)
    if pred and result.n_images and result.missing_predictions == result.n_images:
        raise EvaluationError(
            f"none of the {len(pred):,} predicted image ids is a gold image id (predicted: "
            f"{', '.join(list(pred)[:3])}; gold: {', '.join(list(gold)[:3])}): are the "
            "predictions and the gold of the same split, with the same ids?"
        )
    if args.json:
        print(json.dumps(result.as_dict(top=args.top), indent=2))
        return 0
    print(f"images scored      {result.n_images}")
    print(f"primary F1         {result.primary_f1:.4f}")
    if result.secondary_f1 is not None:
        print(
            f"secondary F1       {result.secondary_f1:.4f}  ({result.n_secondary} images, "
            f"ImageCLEFmedical {result.edition} list)"
        )
    print(
        f"micro P / R / F1   {result.micro_precision:.4f} / {result.micro_recall:.4f} / "
        f"{result.micro_f1:.4f}"
    )
    if result.missing_predictions:
        print(
            f"no prediction for  {result.missing_predictions} gold images "
            "(scored as empty predictions)"
        )
    if result.unscored_predictions:
        print(f"not in the gold    {result.unscored_predictions} predicted images (not scored)")
    if args.top:
        if index is None:
            try:  # names only; scoring never needs the dictionary
                index = _load_index_arg(args.index)
            except ConceptsvcError as exc:
                print(f"(concept names unavailable: {exc})", file=sys.stderr)
        for label, counts in (
            ("false negatives", result.false_negatives),
            ("false positives", result.false_positives),
        ):
            print(f"top {args.top} {label}:")
            for cui, n in counts.most_common(args.top):
                info = index.concept(cui) if index is not None else None
                print(f"  {cui}  {n:>6}  {info.preferred_name if info else '(not in the index)'}")
    return 0


def _fill_evaluate(p: argparse.ArgumentParser) -> None:
    from conceptsvc.evaluation import DEFAULT_EDITION, SECONDARY_CUIS_BY_EDITION
    from conceptsvc.model import MODES, SIMILARITIES

    _describe(
        p,
        description=(
            "Score predicted concepts against gold with the ImageCLEFmedical concept-detection "
            "measures. Either give --pred FILE (ImageCLEF CSV, submission TSV or JSONL), or "
            "--local --captions FILE to extract in this process first."
        ),
        epilog=_examples(
            "conceptsvc evaluate --pred run.csv --gold valid_concepts.csv",
            "conceptsvc evaluate --local --captions valid_captions.csv --gold "
            "valid_concepts.csv --profile rocov2 --json",
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred", help="predictions file (CSV ID,CUIs / TSV / JSONL; - for stdin)")
    src.add_argument("--local", action="store_true", help="extract in-process from --captions")
    p.add_argument("--gold", required=True, help="gold concepts (ImageCLEF CSV ID,CUIs)")
    p.add_argument("--manual", help="manual gold concepts, for the secondary F1")
    p.add_argument(
        "--edition", type=int, default=DEFAULT_EDITION, metavar="YEAR",
        help="ImageCLEFmedical edition whose secondary-concept list is scored (known: "
        f"{', '.join(map(str, sorted(SECONDARY_CUIS_BY_EDITION)))}; default {DEFAULT_EDITION}, "
        "ROCOv2's)",
    )
    p.add_argument("--captions", help="captions to extract from, with --local: any input "
                   "`annotate` reads (ID,Caption CSV, ROCO TSV, JSONL, text, Parquet; gzipped)")
    p.add_argument("--index", help="index directory for --local, and for concept names in "
                   "the false-negative/positive lists (default: the embedded demo dictionary)")
    p.add_argument("--profile", default="rocov2", help="concept profile (default: rocov2), or "
                   "a profile file of your own (FILE.yaml)")
    p.add_argument("--mode", default="exact", choices=MODES)
    p.add_argument("--similarity", default="jaccard", choices=SIMILARITIES)
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--drop-negated", action="store_true", help="drop negated mentions")
    p.add_argument("--drop-hypothetical", action="store_true",
                   help="drop hypothetical mentions (default: as the profile says)")
    p.add_argument("--write-predictions", metavar="PRED.csv",
                   help="with --local: write predictions as ImageCLEF CSV")
    p.add_argument("--top", type=int, default=10, help="false negatives/positives to list")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_serve(args: argparse.Namespace) -> int:
    from conceptsvc.config import settings_from_args
    from conceptsvc.server import serve
    from conceptsvc.server.launcher import ready_line

    settings = settings_from_args(args)
    if settings.log_level is not None:  # (before the workers start: they take this level)
        logging.getLogger().setLevel(settings.log_level.upper())
    if settings.log_format != "text":
        from conceptsvc.server.app import use_log_format

        use_log_format(settings.log_format)

    def ready(port: int) -> None:
        print(ready_line(settings.host, port, settings.workers), flush=True)

    return serve(settings, on_ready=ready)


def _fill_serve(p: argparse.ArgumentParser) -> None:
    from conceptsvc.config import add_settings_arguments

    _describe(
        p,
        description=(
            "Run the conceptsvc gRPC service. Every option can also be set by a CONCEPTSVC_* "
            "environment variable or in a TOML/YAML file (--config); flags win over the "
            "environment, which wins over the file. With no --index the embedded demo "
            "dictionary is served. SIGHUP reloads the index; SIGTERM/SIGINT drain gracefully. "
            "It logs at INFO (to stderr) which index it serves and every reload, never caption "
            "text. Unknown CONCEPTSVC_* variables are warned about at start-up."
        ),
        epilog=_examples(
            "conceptsvc serve --index indexes/umls-2024AA --port 50051",
            "CONCEPTSVC_WORKERS=2 conceptsvc serve --config conceptsvc.toml",
        ),
    )
    add_settings_arguments(p)
    p.set_defaults(handler=_cmd_serve)


def _cmd_health(args: argparse.Namespace) -> int:
    from conceptsvc.client import ConceptClient

    with ConceptClient(
        args.target,
        tls=args.tls,
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
        server_name=args.server_name,
    ) as client:
        status = client.health(args.service, timeout=args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


def _fill_health(p: argparse.ArgumentParser) -> None:
    _describe(
        p,
        description=(
            "Ask a service's standard gRPC health service for its status and print it. Exit "
            "status: 0 SERVING, 1 NOT_SERVING or unknown service, 2 unreachable."
        ),
        epilog=_examples(
            "conceptsvc health --target 127.0.0.1:50051",
            "conceptsvc health --service conceptsvc.v1.ConceptService --timeout 2",
        ),
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the service")
    p.add_argument(
        "--service", default="", help="service name to check (default: the whole server)"
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca-cert", help="CA certificate (PEM) to verify the server with")
    p.add_argument("--client-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--client-key", help="client private key (PEM) for mutual TLS")
    p.add_argument("--server-name", help="expected server name in its certificate")
    p.set_defaults(handler=_cmd_health)


# -- batch annotation and ad-hoc lookups (conceptsvc.client) -----------------------------------
def _cmd_annotate(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from conceptsvc.client import arguments
    from conceptsvc.client.batch import BatchSettings, annotate_corpus
    from conceptsvc.client.corpus import Corpus
    from conceptsvc.client.outputs import resolve_outputs
    from conceptsvc.client.progress import ProgressMode

    to_stdout = args.out == "-"
    scratch: Path | None = None
    if to_stdout:
        # The run still needs files (journal, part files, manifest): they go to a private
        # directory that is removed at the end, so `--out -` never resumes an earlier run.
        items = [i for f in args.format or () for i in f.split(",") if i.strip()]
        if len(items) > 1 or any("=" in i for i in items):
            raise UsageError("--out - writes one format to standard output; give one --format "
                             "without =PATH, or write files with --out FILE")
        if args.report:
            raise UsageError("--report writes files next to --out; give --out FILE with it")
        scratch = Path(tempfile.mkdtemp(prefix="conceptsvc-annotate-"))
        fmt = items[0] if items else "jsonl"
        specs = resolve_outputs(scratch / "stdout", [fmt])
    else:
        specs = resolve_outputs(args.out, args.format or ())
    if args.include_text and not any(s.format.value == "jsonl" for s in specs):
        raise UsageError("--include-text adds the caption to the jsonl output; no jsonl "
                         "output is requested (add --format jsonl)")
    settings = BatchSettings(
        targets=tuple(args.target or (arguments.DEFAULT_TARGET,)),
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        deadline=args.deadline,
        retries=args.retries,
        on_bad_input=args.on_bad_input,
        allow_empty=args.allow_empty,
        on_index_change=args.on_index_change,
        restart=args.restart,
        report=args.report,
        report_samples=args.report_samples,
        progress=ProgressMode.QUIET if args.quiet else ProgressMode(args.progress),
        progress_interval=args.progress_interval,
        security=arguments.security(args),
    )
    overrides = arguments.extract_overrides(args)
    try:
        corpus = Corpus(args.input, args.input_format, id_column=args.id_column,
                        text_column=args.text_column)
        try:
            result = annotate_corpus(corpus, specs, settings, overrides=overrides,
                                     include_text=args.include_text)
        except KeyboardInterrupt:
            if to_stdout:
                print("\nconceptsvc: interrupted; with --out - nothing is kept, a rerun starts "
                      "over", file=sys.stderr)
            else:
                print(f"\nconceptsvc: interrupted; the captions annotated so far are kept next "
                      f"to {args.out} — rerun the same command to resume (--restart starts "
                      "over)", file=sys.stderr)
            return 130
        if to_stdout:
            sys.stdout.flush()
            binary = getattr(sys.stdout, "buffer", None)  # absent when stdout is redirected
            with result.outputs[0].open("rb") as fh:
                if binary is not None:
                    shutil.copyfileobj(fh, binary)
                    binary.flush()
                else:
                    sys.stdout.write(fh.read().decode("utf-8"))
            if result.errors is not None:
                sys.stderr.write(result.errors.read_text(encoding="utf-8"))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if result.report is not None:
        from conceptsvc.client.report import render_table

        print(render_table(result.report), end="")
    if not args.quiet:
        c = result.counts
        state = "already complete" if result.already_complete else (
            "complete" if result.complete else "INCOMPLETE")
        print(f"annotate: {c.annotated}/{c.captions} captions in the output ({state}); "
              f"{c.failed} failed, {c.skipped_bad_input} bad input records skipped, "
              f"{c.resumed} resumed from an earlier run", file=sys.stderr)
        if to_stdout:
            print(f"  output   (standard output) ({specs[0].format.value})", file=sys.stderr)
        else:
            for spec in specs:
                print(f"  output   {spec.path} ({spec.format.value})", file=sys.stderr)
            print(f"  manifest {result.manifest}", file=sys.stderr)
            if result.errors is not None:
                print(f"  errors   {result.errors}", file=sys.stderr)
        if result.report_files is not None:
            print(f"  report   {result.report_files.markdown}", file=sys.stderr)
            print(f"  report   {result.report_files.html}", file=sys.stderr)
    if not result.complete:
        if to_stdout:
            print("conceptsvc: the run is incomplete; the failed captions are listed above "
                  "(rerun with --out FILE to be able to retry only those)", file=sys.stderr)
        else:
            print("conceptsvc: the run is incomplete; rerun the same command to retry the "
                  "failed captions (listed in the errors file)", file=sys.stderr)
    return result.exit_code


def _fill_annotate(p: argparse.ArgumentParser) -> None:
    from conceptsvc.client import arguments

    _describe(
        p,
        description=(
            "Annotate every caption of INPUT through the service and write the results. "
            "Killed at any point and run again with the same arguments, it continues where it "
            "stopped; outputs are written in input order and moved into place at the end of the "
            "run (an incomplete run writes what it annotated, marked complete: false in the "
            "manifest; a run stopped by an error writes nothing). Every answer names its index "
            "and the output never mixes two. "
            "Exit status: 0 complete, 3 incomplete (see the errors file), 2 error."
        ),
        epilog=_examples(
            "conceptsvc annotate captions.csv --out run.jsonl --format jsonl --format csv",
            "conceptsvc annotate data.csv --id-column image_id --text-column caption "
            "--out run.jsonl --include-text",
            "zcat captions.txt.gz | conceptsvc annotate - --out - --format submission > run.tsv",
        ),
    )
    p.add_argument("input", help="captions: .csv (ID,Caption), .tsv/.txt ROCO (ID<TAB> caption), "
                                 ".jsonl ({id,text}), .txt (one per line), .parquet (an id and "
                                 "a caption column), or - for stdin")
    p.add_argument("--out", required=True,
                   help="output file; the first --format goes here, and an extension that names "
                        "a format (.jsonl, .csv, .submission.tsv, .roco.tsv, .tsv, .parquet) "
                        "must name that one; - writes one format to standard output (no "
                        "resume: its journal lives in a temporary directory; no --report)")
    p.add_argument("--input-format", choices=["csv", "roco", "jsonl", "text", "parquet"],
                   help="input format (default: from the file name)")
    p.add_argument("--id-column", metavar="NAME",
                   help="CSV header column / JSONL key / Parquet column holding the id "
                        "(default ID / id; Parquet: the first of the pairs ID/Caption, id/text, "
                        "id/caption the file has)")
    p.add_argument("--text-column", metavar="NAME",
                   help="CSV header column / JSONL key / Parquet column holding the caption "
                        "(default Caption / text; Parquet: as for --id-column)")
    p.add_argument("--include-text", action="store_true",
                   help="put each caption's text into the jsonl output (after the id), so "
                        "mention offsets can be checked without the input")
    p.add_argument("--format", action="append", metavar="FORMAT[=PATH]",
                   help="jsonl (default; with mentions), csv (ImageCLEF ID,CUIs), submission "
                        "(ID<TAB>CUI;CUI), roco (ID<TAB><TAB>CUI<TAB>...), parquet (the jsonl "
                        "fields as columns); repeatable. Without it, --out's extension "
                        "chooses: .csv, .parquet, .roco.tsv, .submission.tsv, else jsonl")
    p.add_argument("--concurrency", type=int, default=4,
                   help="batches in flight at once (default 4)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="captions per AnnotateBatch message (default 512; at most the "
                        "service's max_batch_items)")
    p.add_argument("--deadline", type=float, default=60.0,
                   help="seconds one batch's AnnotateBatch call may take (default 60)")
    p.add_argument("--retries", type=int, default=8,
                   help="retries of a caption whose batch failed (UNAVAILABLE, "
                        "DEADLINE_EXCEEDED, ...) before it goes to the errors file (default 8)")
    p.add_argument("--on-bad-input", choices=["fail", "skip"], default="fail",
                   help="malformed input records: stop before sending anything (default) or "
                        "skip them and list them in the errors file")
    p.add_argument("--allow-empty", action="store_true",
                   help="accept an input without captions (empty file, header only): write "
                        "empty outputs and a manifest and exit 0, instead of failing with E626")
    p.add_argument("--on-index-change", choices=["stop", "redo"], default="stop",
                   help="when the service's index changes during the run (a reload) or since "
                        "the earlier run: stop with an error, E627/E621 (default), or annotate "
                        "the captions of the old index again so the output is all the new one")
    p.add_argument("--restart", action="store_true",
                   help="discard the results of an earlier run (interrupted, or complete but "
                        "made with another index or options) and start over")
    p.add_argument("--report", action="store_true",
                   help="print a corpus report and write it as markdown with PNG plots and as "
                        "an HTML page (OUT.report.html) that also shows annotated captions")
    p.add_argument("--report-samples", type=int, default=20, metavar="N",
                   help="captions the HTML report shows highlighted: the first N (default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress display and no summary")
    p.add_argument("--progress", choices=["auto", "bar", "log"], default="auto",
                   help="progress display (default: a bar on a terminal, log lines otherwise)")
    p.add_argument("--progress-interval", type=float, default=10.0,
                   help="seconds between progress log lines (default 10)")
    arguments.add_connection(p, several=True)
    arguments.add_extract_options(p, local=False)
    p.set_defaults(handler=_cmd_annotate)


def _cmd_lookup(args: argparse.Namespace) -> int:
    import json

    from conceptsvc.client import arguments
    from conceptsvc.client.lookup import annotation_json, format_annotation

    overrides = arguments.extract_overrides(args)
    backend = arguments.lookup_backend(args)
    try:
        answers: Iterator[tuple[str, Annotation]]
        many = args.text == "-"
        if many:
            if args.html:
                raise UsageError("--html writes one caption's page; give the caption, not -")
            # One caption per line, answered as they come (a pipe may never end) on one
            # stream; blank lines have no caption to answer. A caption's id is its line
            # number, as `annotate` numbers a text file's captions.
            lines = (line.rstrip("\r\n") for line in sys.stdin)
            answers = backend.annotate_many(
                ((str(n), t) for n, t in enumerate(lines, 1) if t.strip()), overrides
            )
        else:
            answers = iter([(args.text, backend.annotate(args.text, overrides))])
        for n, (text, a) in enumerate(answers):
            inferred: dict[str, str] = {}
            if not args.json or args.html:
                named = {m.cui for m in a.mentions}
                inferred = {c: backend.concept(c, synonyms=False).preferred_name
                            for c in a.concepts if c not in named}
            if args.html:
                from conceptsvc.client.html_page import write_lookup_page

                write_lookup_page(args.html, text, a, inferred)
                print(f"wrote {args.html}", file=sys.stderr)
            if args.json:
                obj = annotation_json(text, a)
                print(json.dumps(obj, ensure_ascii=False, indent=None if many else 2),
                      flush=many)
                continue
            if many:
                print(("\n" if n else "") + f"== {text}")
            print(format_annotation(text, a, inferred), end="", flush=many)
    finally:
        backend.close()
    return 0


def _fill_lookup(p: argparse.ArgumentParser) -> None:
    from conceptsvc.client import arguments

    _describe(
        p,
        description="Annotate TEXT through the service (or in this process with --local) and "
        "show its mentions and concepts. With - every line of standard input is a caption of "
        "its own, answered in turn (one JSON object per line with --json).",
        epilog=_examples(
            'conceptsvc lookup "Chest X-ray showing pleural effusion." --local',
            "conceptsvc lookup - --json --target 10.0.0.5:50051 < captions.txt",
        ),
    )
    p.add_argument("text", help="the text, or - to read one caption per line from stdin")
    p.add_argument("--html", metavar="FILE",
                   help="also write the caption with its mentions highlighted as a "
                        "self-contained HTML page")
    arguments.add_lookup_common(p)
    arguments.add_extract_options(p)
    p.set_defaults(handler=_cmd_lookup)


def _cmd_concept(args: argparse.Namespace) -> int:
    import json

    from conceptsvc.client import arguments
    from conceptsvc.client.lookup import concept_json, format_concept

    backend = arguments.lookup_backend(args)
    try:
        record = backend.concept(args.cui, synonyms=not args.no_synonyms)
    finally:
        backend.close()
    if args.json:
        print(json.dumps(concept_json(record), ensure_ascii=False, indent=2))
    else:
        print(format_concept(record), end="")
    return 0


def _fill_concept(p: argparse.ArgumentParser) -> None:
    from conceptsvc.client import arguments

    _describe(
        p,
        description="Show one concept of the dictionary the service (or --local index) uses.",
        epilog=_examples("conceptsvc concept C0032227", "conceptsvc concept C0032227 --local "
                         "--no-synonyms --json"),
    )
    p.add_argument("cui", help="the concept id, e.g. C0032227")
    p.add_argument("--no-synonyms", action="store_true", help="leave out the synonyms")
    arguments.add_lookup_common(p)
    p.set_defaults(handler=_cmd_concept)


def _cmd_search(args: argparse.Namespace) -> int:
    import json

    from conceptsvc.client import arguments
    from conceptsvc.client.lookup import candidates_json, format_candidates

    if args.limit < 1:
        raise UsageError("--limit must be >= 1")
    overrides = arguments.extract_overrides(args)
    backend = arguments.lookup_backend(args)
    try:
        cands = backend.search(args.text, overrides, args.limit)
    finally:
        backend.close()
    if args.json:
        print(json.dumps(candidates_json(cands), ensure_ascii=False, indent=2))
    else:
        print(format_candidates(args.text, cands), end="")
    return 0


def _fill_search(p: argparse.ArgumentParser) -> None:
    from conceptsvc.client import arguments

    _describe(
        p,
        description="Rank the concepts whose strings best match TERM (approximately), with "
        "their scores and the string that matched.",
        epilog=_examples('conceptsvc search "pleural efusion" --local',
                         'conceptsvc search "pneumothora" --semantic-groups DISO '
                         '--threshold 0.6 --limit 5 --local'),
    )
    p.add_argument("text", help="the term")
    p.add_argument("--limit", type=int, default=10, help="candidates to show (default 10)")
    arguments.add_lookup_common(p)
    arguments.add_extract_options(p, search=True)
    p.set_defaults(handler=_cmd_search)


def _csv_list(values: Sequence[str] | None) -> tuple[str, ...]:
    """Repeatable options that also accept comma-separated values: ``--sab MSH,NCI --sab RAD``."""
    out: list[str] = []
    for v in values or ():
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return tuple(dict.fromkeys(out))


class BuildProgress:
    """Shows ``index build`` progress (the :data:`~conceptsvc.sources.Progress` callbacks of
    the readers and the build): a ``\\r`` line on a terminal, a log line every ``interval``
    seconds otherwise (a CI log should not fill with carriage returns)."""

    def __init__(self, stream: TextIO, *, interval: float | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self._stage = ""
        self._t0 = self._last = self._prev = time.monotonic()
        self._open_line = False

    def __call__(self, stage: str, count: int, frac: float | None) -> None:
        now = time.monotonic()
        if stage != self._stage:
            self._end_line()
            # A stage began when the previous one reported its end.
            self._stage, self._t0, self._last = stage, self._prev, 0.0
        self._prev = now
        done = frac is not None and frac >= 1.0
        if not done and now - self._last < self.interval:
            return
        self._last = now
        elapsed = now - self._t0
        text = f"{stage}: {count:,} rows"
        if elapsed >= 0.5:
            text += f", {count / elapsed:,.0f} rows/s"
        if frac is not None:
            text += f", {100 * frac:.0f}%"
            if 0 < frac < 1:
                # progress.py imports no gRPC (the client package loads its client lazily)
                from conceptsvc.client.progress import format_duration

                text += f", ETA {format_duration(elapsed * (1 - frac) / frac)}"
        if frac is None and stage == "writing index":
            text = f"writing index ({count:,} concepts)"
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self._open_line = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _end_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False

    def close(self) -> None:
        self._end_line()
        self.stream.flush()


def _cmd_index_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from conceptsvc.client.arguments import name_list
    from conceptsvc.dictionary import (
        DictionaryFilters,
        DictionarySource,
        JsonlSource,
        TableSource,
        UmlsSource,
        build_dictionary_index,
    )

    sources: list[DictionarySource] = [
        *(UmlsSource(Path(p)) for p in args.umls or ()),
        *(JsonlSource(Path(p), sab=args.jsonl_sab) for p in args.jsonl or ()),
        *(TableSource(Path(p), sab=args.tsv_sab) for p in args.tsv or ()),
    ]
    if not sources:
        raise UsageError("give at least one input: --umls DIR, --jsonl FILE or --tsv FILE")
    langs = _csv_list(args.lang) or ("ENG",)
    suppress = _csv_list(args.suppress) or ("O", "E", "Y")
    filters = DictionaryFilters(
        languages=() if [x.lower() for x in langs] == ["any"] else langs,
        sabs=_csv_list(args.sab),
        exclude_sabs=_csv_list(args.exclude_sab),
        drop_suppress=() if [x.lower() for x in suppress] == ["none"] else suppress,
        exclude_ttys=_csv_list(args.exclude_tty),
        semantic_types=name_list(args.semantic_type) or (),
        exclude_semantic_types=name_list(args.exclude_semantic_type) or (),
        include_descendants=args.descendants,
        min_length=args.min_length,
    )
    progress = None if args.quiet else BuildProgress(sys.stderr)
    try:
        report = build_dictionary_index(
            sources,
            args.out,
            filters=filters,
            source_release=args.source_release,
            on_error=args.on_error,
            progress=progress,
            workers=args.workers,
        )
    finally:
        if progress is not None:
            progress.close()
    for line in report.lines():
        print(line, file=sys.stderr)
    print(args.out)
    return 0


def _cmd_index_info(args: argparse.Namespace) -> int:
    from conceptsvc.index import ConceptIndex
    from conceptsvc.semantic_network import UNKNOWN_TUI, load_semantic_network

    ix = ConceptIndex.load(args.path, verify=not args.no_verify)
    m = ix.manifest
    c = m["counts"]
    print(f"index            {ix.path}")
    print(f"format version   {m['format_version']} (normaliser {m['normalizer_version']})")
    print(f"source release   {m['source_release']}")
    print(f"created          {m['created_at']}")
    print(f"content hash     {ix.content_hash}")
    for inp in m.get("inputs", []):
        print(f"input            {inp.get('kind')}: {inp.get('path')}")
    print(f"filters          {json.dumps(m.get('filters', {}), sort_keys=True)}")
    print(f"concepts         {c['concepts']:,}")
    print(f"keys             {c['keys']:,} (longest {c.get('max_key_tokens', '?')} tokens)")
    print(f"strings          {c['strings']:,}")
    print(f"postings         {c['postings']:,}")
    report = m.get("report", {})
    if report.get("concepts_without_semantic_type"):
        print(f"without type     {report['concepts_without_semantic_type']:,} ({UNKNOWN_TUI})")
    per_concepts = c.get("concepts_per_sab", {})
    print("per source (strings, concepts):")
    for sab, n in sorted(c["per_sab"].items(), key=lambda kv: -kv[1]):
        print(f"  {sab:<20} {n:>12,} {per_concepts.get(sab, 0):>12,}")
    sn = load_semantic_network()
    print("per semantic type (concepts):")
    for tui, n in sorted(c["per_semantic_type"].items(), key=lambda kv: -kv[1]):
        t = sn.types.get(tui)
        name = f"{t.abbrev:<5} {t.name}" if t is not None else "unknown"
        print(f"  {tui}  {n:>10,}  {name}")
    if args.ambiguous:
        print("ambiguous keys (key -> concepts):")
        for key, cuis in ix.ambiguous_keys():
            print(f"  {key}\t{' '.join(cuis)}")
    return 0


def _fill_index(p: argparse.ArgumentParser) -> None:
    _describe(
        p,
        description="Build a compiled concept index from dictionaries, or describe one.",
        epilog=_examples("conceptsvc index build --umls META --out indexes/umls",
                         "conceptsvc index info indexes/umls"),
    )
    isub = p.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")
    b = isub.add_parser(
        "build",
        help="compile UMLS RRF / scispacy JSONL / TSV dictionaries into an index",
        description="Inputs are merged; every string keeps its source (SAB). List options "
        "are repeatable and accept commas. Semantic types may be TUIs, abbreviations, names "
        "or groups (see `conceptsvc semtypes`).",
        epilog=_examples(
            "conceptsvc index build --umls 2024AA/META --semantic-type DISO,ANAT --out "
            "indexes/umls-disorders",
            "conceptsvc index build --jsonl umls_kb.jsonl --tsv site_terms.tsv --out indexes/kb",
        ),
    )
    b.add_argument("--umls", action="append", metavar="DIR",
                   help="UMLS META directory (plain, .gz or split .RRF.aa.gz files)")
    b.add_argument("--jsonl", action="append", metavar="FILE", help="scispacy KB (JSON Lines)")
    b.add_argument("--tsv", action="append", metavar="FILE",
                   help="site terms: TSV or .csv rows cui,term,tui[,sab]")
    b.add_argument("--jsonl-sab", default="SCISPACY", help="SAB for --jsonl strings")
    b.add_argument("--tsv-sab", default="LOCAL", help="SAB for --tsv rows without one")
    b.add_argument("--out", required=True, metavar="DIR", help="index directory to write")
    b.add_argument("--lang", action="append", metavar="LAT",
                   help="languages to keep (default ENG; 'any' keeps all)")
    b.add_argument("--sab", action="append", metavar="SAB", help="keep only these sources")
    b.add_argument("--exclude-sab", action="append", metavar="SAB", help="drop these sources")
    b.add_argument("--suppress", action="append", metavar="FLAG",
                   help="SUPPRESS values to drop (default O,E,Y; 'none' keeps all)")
    b.add_argument("--exclude-tty", action="append", metavar="TTY", help="drop these term types")
    b.add_argument("--semantic-type", action="append", metavar="TYPE",
                   help="keep only concepts of these types/groups")
    b.add_argument("--exclude-semantic-type", action="append", metavar="TYPE",
                   help="drop concepts of these types/groups")
    b.add_argument("--descendants", action="store_true",
                   help="a semantic type also selects the types below it in the hierarchy")
    b.add_argument("--min-length", type=int, default=2, metavar="N",
                   help="drop strings shorter than N characters (default 2)")
    b.add_argument("--source-release", help="release label for the manifest (default: detected)")
    b.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="malformed rows: stop with file:line (default) or skip and count")
    b.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes for normalising strings (default 1; 2 roughly halves the "
                   "build time of a full UMLS on an otherwise idle 2-core machine)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    b.set_defaults(handler=_cmd_index_build)
    i = isub.add_parser(
        "info",
        help="print an index's manifest and counts",
        description="Print what an index directory holds: format and normaliser versions, "
        "source release, content hash (what `serve` logs and `annotate` records), inputs, "
        "filters, and counts per source and per semantic type. The files are checked "
        "against the manifest's hashes first (--no-verify skips that).",
        epilog=_examples("conceptsvc index info indexes/umls",
                         "conceptsvc index info indexes/umls --ambiguous | less"),
    )
    i.add_argument("path", metavar="DIR", help="the index directory")
    i.add_argument("--ambiguous", action="store_true",
                   help="also list every key that maps to more than one concept")
    i.add_argument("--no-verify", action="store_true", help="skip the file hash check")
    i.set_defaults(handler=_cmd_index_info)


# The subcommands in the order ``conceptsvc --help`` lists them: name, one-line help, and the
# function that gives the subcommand's parser its description, examples and options.
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = [
    ("semtypes", "list the semantic types and groups", _fill_semtypes),
    ("index", "build or inspect a compiled concept index", _fill_index),
    ("evaluate", "ImageCLEFmedical scoring of predictions (or of an in-process run with --local)",
     _fill_evaluate),
    ("serve", "run the gRPC service", _fill_serve),
    ("health", "check a running service (exit 0 only when SERVING)", _fill_health),
    ("annotate", "annotate a caption corpus through the service (parallel, resumable)",
     _fill_annotate),
    ("lookup", "annotate a phrase or caption and show the mentions", _fill_lookup),
    ("concept", "show a concept: name, synonyms, semantic types, sources", _fill_concept),
    ("search", "rank candidate concepts for a term", _fill_search),
]


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """The whole command line. ``lazy``: each subcommand's options are added only when it is
    the one being parsed (what :func:`main` does, so that a command builds and imports only
    what its own options need); otherwise every subcommand is complete at once (for
    walking the tree, as the tests do)."""
    parser: argparse.ArgumentParser = _Parser(
        prog="conceptsvc", description="UMLS concept mapping for radiology captions.",
        epilog=_examples("conceptsvc lookup \"pleural effusion\" --local",
                         "conceptsvc COMMAND --help"),
    )
    parser.add_argument("--version", action="version", version=f"conceptsvc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                action=_LazySubcommands)
    assert isinstance(sub, _LazySubcommands)
    for name, summary, fill in _COMMANDS:
        if lazy:
            sub.add_lazy(name, summary, fill)
        else:
            fill(sub.add_parser(name, help=summary))
    return parser


def run() -> int:
    """The ``conceptsvc`` command (console script and ``python -m conceptsvc.cli``): picks
    gRPC's poller layer for this process and its ``serve`` workers before any command imports
    grpc (:mod:`conceptsvc.grpc_io` says why; a ``GRPC_EXPERIMENTS`` of the user's own wins),
    then :func:`main`. ``main`` itself leaves the layer alone: called in a process that runs
    gRPC already (tests, a notebook) it must not change what that process's children get."""
    prefer_poller_io(os.environ, sys.modules)
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(lazy=True).parse_args(argv)
    # The service says at INFO which index it serves and every reload (an operator's first
    # question); the other commands print their results and log only what went wrong.
    quiet = logging.INFO if args.command == "serve" else logging.WARNING
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else quiet
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if {n.upper() for n in os.environ if n.upper().startswith("CONCEPTSVC_")} - _CLIENT_ENV:
        # Checked against the settings model, which only `serve` needs otherwise (importing
        # pydantic-settings costs a client command more than its own start).
        from conceptsvc.config import unknown_environment

        for warning in unknown_environment(os.environ):
            logging.getLogger("conceptsvc").warning("%s", warning)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConceptsvcError as exc:
        print(f"conceptsvc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`conceptsvc semtypes | head -1`): what it wanted, it has.
        # Python would flush stdout again at exit and fail a second time, so stdout is pointed
        # at /dev/null first; the exit status is a SIGPIPE death's, as `yes | head -1` gives.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(run())
