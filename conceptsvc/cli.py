"""The ``conceptsvc`` command: thin, validating wrappers over library functions.

Each subcommand parses and validates its arguments, calls one plain function, and prints.
Errors derived from :class:`~conceptsvc.errors.ConceptsvcError` are printed as one line with
their code and exit status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from conceptsvc import __version__
from conceptsvc.errors import ConceptsvcError, UsageError

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
        raise UsageError(
            "the embedded demo dictionary is not available in this installation; "
            "pass --index DIR (build one with `conceptsvc index build`)"
        ) from exc
    return demo_index()


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from conceptsvc.evaluation import (
        read_captions,
        read_concepts,
        score,
        secondary_cuis,
        write_concepts_csv,
    )

    if args.local and not args.captions:
        raise UsageError("--local needs --captions FILE (an ID,Caption CSV)")
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
    secondary_cuis(args.edition)  # an unknown edition fails before any file is read
    gold = read_concepts(args.gold)
    manual = read_concepts(args.manual) if args.manual else None
    index = None
    if args.local:
        from conceptsvc.extractor import Extractor
        from conceptsvc.model import ExtractOptions

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
    result = score(pred, gold, manual, edition=args.edition)
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


def _add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conceptsvc.evaluation import DEFAULT_EDITION, SECONDARY_CUIS_BY_EDITION
    from conceptsvc.model import MODES, SIMILARITIES

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
    p.add_argument(
        "--edition", type=int, default=DEFAULT_EDITION, metavar="YEAR",
        help="ImageCLEFmedical edition whose secondary-concept list is scored (known: "
        f"{', '.join(map(str, sorted(SECONDARY_CUIS_BY_EDITION)))}; default {DEFAULT_EDITION}, "
        "ROCOv2's)",
    )
    p.add_argument("--captions", help="captions CSV (ID,Caption); with --local")
    p.add_argument("--index", help="index directory for --local, and for concept names in "
                   "the false-negative/positive lists (default: the embedded demo dictionary)")
    p.add_argument("--profile", default="rocov2", help="concept profile (default: rocov2)")
    p.add_argument("--mode", default="exact", choices=MODES)
    p.add_argument("--similarity", default="jaccard", choices=SIMILARITIES)
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--drop-negated", action="store_true", help="drop negated mentions")
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

    def ready(port: int) -> None:
        print(ready_line(settings.host, port, settings.workers), flush=True)

    return serve(settings, on_ready=ready)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conceptsvc.config import add_settings_arguments

    p = sub.add_parser(
        "serve",
        help="run the gRPC service",
        description=(
            "Run the conceptsvc gRPC service. Every option can also be set by a CONCEPTSVC_* "
            "environment variable or in a TOML/YAML file (--config); flags win over the "
            "environment, which wins over the file. With no --index the embedded demo "
            "dictionary is served. SIGHUP reloads the index; SIGTERM/SIGINT drain gracefully."
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


def _add_health(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "health",
        help="check a running service (exit 0 only when SERVING)",
        description=(
            "Ask a service's standard gRPC health service for its status and print it. Exit "
            "status: 0 SERVING, 1 NOT_SERVING or unknown service, 2 unreachable."
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
    from conceptsvc.client import arguments
    from conceptsvc.client.batch import BatchSettings, annotate_corpus
    from conceptsvc.client.corpus import Corpus
    from conceptsvc.client.outputs import resolve_outputs
    from conceptsvc.client.progress import ProgressMode
    from conceptsvc.client.report import render_table

    specs = resolve_outputs(args.out, args.format or ())
    settings = BatchSettings(
        targets=tuple(args.target or (arguments.DEFAULT_TARGET,)),
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        deadline=args.deadline,
        retries=args.retries,
        on_bad_input=args.on_bad_input,
        allow_empty=args.allow_empty,
        restart=args.restart,
        report=args.report,
        report_samples=args.report_samples,
        progress=ProgressMode.QUIET if args.quiet else ProgressMode(args.progress),
        progress_interval=args.progress_interval,
        security=arguments.security(args),
    )
    overrides = arguments.extract_overrides(args)
    corpus = Corpus(args.input, args.input_format)
    result = annotate_corpus(corpus, specs, settings, overrides=overrides)
    if result.report is not None:
        print(render_table(result.report), end="")
    if not args.quiet:
        c = result.counts
        state = "already complete" if result.already_complete else (
            "complete" if result.complete else "INCOMPLETE")
        print(f"annotate: {c.annotated}/{c.captions} captions in the output ({state}); "
              f"{c.failed} failed, {c.skipped_bad_input} bad input records skipped, "
              f"{c.resumed} resumed from an earlier run", file=sys.stderr)
        for spec in specs:
            print(f"  output   {spec.path} ({spec.format.value})", file=sys.stderr)
        print(f"  manifest {result.manifest}", file=sys.stderr)
        if result.errors is not None:
            print(f"  errors   {result.errors}", file=sys.stderr)
        if result.report_files is not None:
            print(f"  report   {result.report_files.markdown}", file=sys.stderr)
            print(f"  report   {result.report_files.html}", file=sys.stderr)
    if not result.complete:
        print("conceptsvc: the run is incomplete; rerun the same command to retry the failed "
              "captions (listed in the errors file)", file=sys.stderr)
    return result.exit_code


def _add_annotate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conceptsvc.client import arguments

    p = sub.add_parser(
        "annotate",
        help="annotate a caption corpus through the service (parallel, resumable)",
        description=(
            "Annotate every caption of INPUT through the service and write the results. "
            "Killed at any point and run again with the same arguments, it continues where it "
            "stopped; outputs are written in input order and moved into place when complete. "
            "Exit status: 0 complete, 3 incomplete (see the errors file), 2 error."
        ),
    )
    p.add_argument("input", help="captions: .csv (ID,Caption), .tsv/.txt ROCO (ID<TAB> caption), "
                                 ".jsonl ({id,text}), .txt (one per line), or - for stdin")
    p.add_argument("--out", required=True,
                   help="output file; the first --format goes here, and an extension that names "
                        "a format (.jsonl, .csv, .submission.tsv, .roco.tsv, .tsv) must name "
                        "that one")
    p.add_argument("--input-format", choices=["csv", "roco", "jsonl", "text"],
                   help="input format (default: from the file name)")
    p.add_argument("--format", action="append", metavar="FORMAT[=PATH]",
                   help="jsonl (default; with mentions), csv (ImageCLEF ID,CUIs), submission "
                        "(ID<TAB>CUI;CUI), roco (ID<TAB><TAB>CUI<TAB>...); repeatable")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent streams (default 4)")
    p.add_argument("--batch-size", type=int, default=64, help="captions per stream (default 64)")
    p.add_argument("--deadline", type=float, default=60.0,
                   help="seconds one batch's stream may take (default 60)")
    p.add_argument("--retries", type=int, default=8,
                   help="retries of a caption whose stream failed (UNAVAILABLE, "
                        "DEADLINE_EXCEEDED, ...) before it goes to the errors file (default 8)")
    p.add_argument("--on-bad-input", choices=["fail", "skip"], default="fail",
                   help="malformed input records: stop before sending anything (default) or "
                        "skip them and list them in the errors file")
    p.add_argument("--allow-empty", action="store_true",
                   help="accept an input without captions (empty file, header only): write "
                        "empty outputs and a manifest and exit 0, instead of failing with E626")
    p.add_argument("--restart", action="store_true",
                   help="discard the results of an interrupted earlier run and start over")
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
    arguments.add_extract_options(p)
    p.set_defaults(handler=_cmd_annotate)


def _cmd_lookup(args: argparse.Namespace) -> int:
    import json

    from conceptsvc.client import arguments
    from conceptsvc.client.lookup import annotation_json, format_annotation

    text = sys.stdin.read() if args.text == "-" else args.text
    overrides = arguments.extract_overrides(args)
    backend = arguments.lookup_backend(args)
    try:
        a = backend.annotate(text, overrides)
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
            print(json.dumps(annotation_json(text, a), ensure_ascii=False, indent=2))
        else:
            print(format_annotation(text, a, inferred), end="")
    finally:
        backend.close()
    return 0


def _add_lookup(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conceptsvc.client import arguments

    p = sub.add_parser("lookup", help="annotate a phrase or caption and show the mentions")
    p.add_argument("text", help="the text (- reads standard input)")
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


def _add_concept(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conceptsvc.client import arguments

    p = sub.add_parser("concept", help="show a concept: name, synonyms, semantic types, sources")
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


def _add_search(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conceptsvc.client import arguments

    p = sub.add_parser("search", help="rank candidate concepts for a term")
    p.add_argument("text", help="the term")
    p.add_argument("--limit", type=int, default=10, help="candidates to show (default 10)")
    arguments.add_lookup_common(p)
    arguments.add_extract_options(p)
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
                text += f", ETA {_duration(elapsed * (1 - frac) / frac)}"
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


def _duration(seconds: float) -> str:
    # conceptsvc.client.progress.format_duration, without importing the gRPC client here.
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _cmd_index_build(args: argparse.Namespace) -> int:
    from pathlib import Path

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
        semantic_types=_csv_list(args.semantic_type),
        exclude_semantic_types=_csv_list(args.exclude_semantic_type),
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


def _add_index(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("index", help="build or inspect a compiled concept index")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")
    b = isub.add_parser(
        "build",
        help="compile UMLS RRF / scispacy JSONL / TSV dictionaries into an index",
        description="Inputs are merged; every string keeps its source (SAB). List options "
        "are repeatable and accept commas. Semantic types may be TUIs, abbreviations, names "
        "or groups (see `conceptsvc semtypes`).",
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
    i = isub.add_parser("info", help="print an index's manifest and counts")
    i.add_argument("path", metavar="DIR")
    i.add_argument("--ambiguous", action="store_true",
                   help="also list every key that maps to more than one concept")
    i.add_argument("--no-verify", action="store_true", help="skip the file hash check")
    i.set_defaults(handler=_cmd_index_info)


# Subcommand registrars; each module-level command adds itself here.
_REGISTRARS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_semtypes,
    _add_index,
    _add_evaluate,
    _add_serve,
    _add_health,
    _add_annotate,
    _add_lookup,
    _add_concept,
    _add_search,
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
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(
        level=level,
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
