"""Annotate a whole caption corpus through the service: parallel, resumable, observable.

:func:`annotate_corpus` is the plain function behind ``conceptsvc annotate``. One run:

1. **validates the input** (:meth:`Corpus.scan`): malformed records stop the run before any
   request is sent, or — with ``on_bad_input="skip"`` — are skipped and listed in the errors
   file;
2. **asks every target for its GetInfo**: all replicas must serve the same index; the server's
   default options, overridden by the caller's, become the run's *effective options*, sent in
   full with every request (so a later change of server defaults cannot silently mix results);
3. **opens the resume journal** (:mod:`conceptsvc.client.journal`) in ``OUT.<key>.part/``,
   ``key`` being a hash of the input bytes, its format and the effective options. Captions the
   journal already holds are not sent again; a journal written against another index is refused
   (E621) unless ``on_index_change="redo"``, which annotates its captions again;
4. **sends** the remaining captions: ``concurrency`` workers each take a batch of up to
   ``batch_size`` captions (closed earlier when it would pass the service's message limit or
   its ``max_batch_items``) and
   send it as one ``AnnotateBatch`` message with a deadline of ``deadline`` seconds; the reply
   holds every caption's answer in one message. Workers rotate over the targets (one channel
   per ``--target``; a ``dns:///`` target is one channel whose addresses grpc balances
   ``round_robin``). A batch's answers are journaled with one write;
5. **retries** what did not come back: when a call fails (UNAVAILABLE, DEADLINE_EXCEEDED, …;
   authentication failures end the run instead) its items are retried after an exponential
   backoff with jitter, on the next target (a target that just failed is rested for the
   backoff period). Unless the failure concerns the connection or the server as a whole
   (UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED, CANCELLED), a caption may be at fault (one that
   always exceeds the deadline, say) and a batch's failure does not say which: the batch is
   split in halves, charging nobody, until that caption is alone, so it cannot hold its
   batch-mates hostage. Items the service rejects one by one (INVALID_ARGUMENT, oversize…)
   are not retried; items a full reply had no room for (E503), and a batch the service refused
   whole as too big for it (before reading any caption), are sent again at once in smaller
   batches, uncharged. A call the service turns away as busy (RESOURCE_EXHAUSTED: more
   calls at once than it admits) read no caption: it is sent again after the backoff without
   charging anybody (up to ``_BUSY_TRIES`` times in a row), counted in the manifest's
   ``busy_refusals`` and warned about once, since a lower ``concurrency`` avoids it. After
   ``retries`` failed attempts an item is given up and written to the errors file; the run
   then reports itself incomplete;
5a. **checks the index of every answer**: each response names the index that produced it. A
   reload (or a deployment) in the middle of a run would otherwise leave a corpus whose rows
   come from two dictionaries, with a manifest naming one of them. By default
   (``on_index_change="stop"``) the first answer from another index stops the run with
   :class:`~conceptsvc.errors.IndexChangedError` (E627): that answer is not journaled, the
   journal keeps only the old index's rows, nothing is written at the output paths. With
   ``"redo"`` the run asks the service which index it now serves, adopts it, and annotates
   again every caption the old index made, so the output is all the new index and the manifest
   names it (``timing.invocations[].index_changes`` records the change);
6. **finalises**: the outputs are rendered from the journal *in input order* into part files
   and moved into place, so an interrupted-and-resumed run writes the same bytes as an
   uninterrupted one; then the errors file, the optional report and the run manifest
   (``OUT.manifest.json``). A complete run removes its work directory; an incomplete one keeps
   it, so that rerunning the same command retries only what failed. An incomplete run (exit 3:
   captions given up or rejected) still writes its outputs — every caption it annotated, in
   input order — with ``complete: false`` in the manifest and the missing captions in the errors
   file: a caption the service rejects (over its size limit, say) is rejected on every rerun,
   and its corpus must still get an output. A run that stops with an error (E6xx), or is
   killed, writes nothing at the output paths.

Rerunning a command whose outputs are complete and unchanged is a no-op — when the service still
serves the index the manifest names. A complete output of the same input made with another
index or other options is not silently kept, nor replaced: the run stops with E621 and says to
pass ``restart`` (``--restart``) to annotate it again (or, when only the index differs,
``on_index_change="redo"``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import grpc
import grpc.aio
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from conceptsvc import __version__
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2_grpc as pb_grpc
from conceptsvc.client.channel import (
    ChannelSecurity,
    effective_options,
    unavailable_hint,
    warn_token_in_plaintext,
)
from conceptsvc.client.corpus import STDIN, BadRecord, Caption, Corpus, CorpusScan
from conceptsvc.client.journal import Journal
from conceptsvc.client.outputs import (
    SCORE_DECIMALS,
    OutputFormat,
    OutputSet,
    OutputSpec,
    ResultText,
    annotation_from_json,
    annotation_to_json,
    atomic_write_text,
    dumps,
    same_file,
)
from conceptsvc.client.progress import Progress, ProgressMode
from conceptsvc.errors import (
    BadInputError,
    ClientError,
    EmptyCorpusError,
    IndexChangedError,
    OutputClashError,
    ReplyFullError,
    RunIncompatibleError,
    ServiceUnreachableError,
)
from conceptsvc.model import Annotation, ExtractOptions, ServiceInfo
from conceptsvc.wire import (
    BATCH_SPLIT_HINT,
    batch_reader,
    concept_from_pb,
    info_from_pb,
    options_to_pb,
    stream_result_from_pb,
)

if TYPE_CHECKING:
    # (the report's modules are imported when a report is asked for)
    from conceptsvc.client.html_page import AnnotatedCaption
    from conceptsvc.client.report import CorpusReport, ReportFiles

__all__ = [
    "EXIT_INCOMPLETE",
    "BatchSettings",
    "RunCounts",
    "RunResult",
    "annotate_corpus",
]

log = logging.getLogger(__name__)

EXIT_INCOMPLETE = 3

# Unary calls (GetInfo, the options probe) are retried on these. RESOURCE_EXHAUSTED is the
# server's concurrency limit (oversized items are caught before sending); CANCELLED can only
# come from the server side (a stopping replica): this client never cancels a call it needs.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
# Stream failures that say nothing about the items (the connection or the server as a whole):
# the unanswered items are retried together. Any other stream failure (DEADLINE_EXCEEDED,
# INTERNAL, UNKNOWN…) may have been caused by the item the server was working on, so that item
# is retried on its own.
_NO_BLAME = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
_RETRYABLE_ITEM = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"})
_FATAL = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_ANNOTATE_BATCH_PATH = "/{}/{}".format(
    *pb.DESCRIPTOR.services_by_name["ConceptService"].methods_by_name["AnnotateBatch"]
    .full_name.rsplit(".", 1)
)
# A call the service turns away as busy (RESOURCE_EXHAUSTED: every RPC it admits at once is in
# progress) was refused before any caption was read: it is backpressure, retried after a
# backoff without costing its captions an attempt. Only after this many refusals of the same
# batch in a row (minutes, with the backoff at its maximum) are they charged, so that a
# service that refuses everything still ends the run.
_BUSY_TRIES = 32


def _turned_away(code: grpc.StatusCode, details: str) -> bool:
    """Whether a failed AnnotateBatch call was the service refusing it as busy: its own limit
    of calls in progress, or gRPC's. Not a message over gRPC's size limit (RESOURCE_EXHAUSTED
    too, "... message larger than max ..."), which sending again would not cure, nor a batch
    too big for the service (:func:`_too_big`), which is sent again in halves instead."""
    return (
        code is grpc.StatusCode.RESOURCE_EXHAUSTED
        and "larger than max" not in details
        and BATCH_SPLIT_HINT not in details
    )


def _too_big(code: grpc.StatusCode, details: str) -> bool:
    """Whether a failed AnnotateBatch call was refused whole as too big for the service (more
    items than its ``max_batch_items``, a reply too small for their refusals), before any
    caption was read: it is sent again in halves at once, charging nobody."""
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED and BATCH_SPLIT_HINT in details


# Deadline of the run's small control calls (GetInfo, the options probe, GetConcept); the
# --deadline setting is for the AnnotateBatch calls.
_CONTROL_TIMEOUT = 10.0


@dataclass(frozen=True)
class BatchSettings:
    """How to run (none of this changes the results)."""

    targets: tuple[str, ...] = ("127.0.0.1:50051",)
    concurrency: int = 4
    batch_size: int = 512
    deadline: float = 60.0
    retries: int = 8
    backoff_base: float = 0.25
    backoff_max: float = 10.0
    on_bad_input: Literal["fail", "skip"] = "fail"
    # An input without a single caption is almost always the wrong file (or a failed step
    # before this one), so it is refused unless the caller says it can be empty.
    allow_empty: bool = False
    # What to do when the service's index changes during the run (or since the journal or a
    # complete output was made): "stop" with E627/E621, or "redo" the old index's captions.
    on_index_change: Literal["stop", "redo"] = "stop"
    restart: bool = False
    report: bool = False
    report_samples: int = 20  # captions shown highlighted in the HTML report
    progress: ProgressMode = ProgressMode.AUTO
    progress_interval: float = 10.0
    security: ChannelSecurity = field(default_factory=ChannelSecurity)

    def __post_init__(self) -> None:
        problems = []
        if not self.targets:
            problems.append("at least one --target is needed")
        if self.concurrency < 1:
            problems.append("--concurrency must be >= 1")
        if self.batch_size < 1:
            problems.append("--batch-size must be >= 1")
        if self.deadline <= 0:
            problems.append("--deadline must be > 0 seconds")
        if self.retries < 0:
            problems.append("--retries must be >= 0")
        if self.report_samples < 0:
            problems.append("--report-samples must be >= 0")
        if self.on_bad_input not in ("fail", "skip"):
            problems.append("--on-bad-input must be 'fail' or 'skip'")
        if self.on_index_change not in ("stop", "redo"):
            problems.append("--on-index-change must be 'stop' or 'redo'")
        if problems:
            raise ClientError("; ".join(problems) + ".")


# RunCounts fields that describe this invocation rather than the result (manifest "timing").
_HISTORY_COUNTS = ("resumed", "retried_batches", "busy_refusals")


@dataclass(frozen=True)
class RunCounts:
    records: int  # records in the input, good and bad
    captions: int  # good records
    annotated: int  # in the output
    failed: int  # given up after retries or rejected by the service
    skipped_bad_input: int
    resumed: int  # found done in the journal when this invocation started
    with_concepts: int = 0
    concepts: int = 0  # caption-concept pairs
    mentions: int = 0
    retried_batches: int = 0
    busy_refusals: int = 0  # calls the service turned away as busy (retried, uncharged)


@dataclass(frozen=True)
class RunResult:
    outputs: list[Path]
    manifest: Path
    errors: Path | None
    counts: RunCounts
    complete: bool
    report: CorpusReport | None = None
    report_files: ReportFiles | None = None
    already_complete: bool = False

    @property
    def exit_code(self) -> int:
        return 0 if self.complete else EXIT_INCOMPLETE


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _run_key(scan: CorpusScan, corpus: Corpus, options_key: str) -> str:
    ident: dict[str, object] = {"input_sha256": scan.sha256, "input_format": corpus.format.value,
             "options": options_key, "journal_version": 1}
    if corpus.columns is not None:  # other columns of the same bytes are other captions
        ident["columns"] = list(corpus.columns)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def _is_work_dir(path: Path, out0: Path) -> bool:
    """Whether ``path`` is, or lies in, a work directory of ``out0`` (``OUT.<key>.part``, or one
    being removed), which runs remove or rewrite."""
    parent = out0.parent.resolve()
    pattern = re.compile(re.escape(out0.name) + r"\.[0-9a-f]{16}\.part(\.done-\d+)?")
    p = path.resolve()
    return any(q.parent == parent and pattern.fullmatch(q.name) for q in (p, p.parent))


def _check_run_files(corpus: Corpus, specs: Sequence[OutputSpec], *, report: bool) -> None:
    """Refuse a run that would write over its own input, or write two of its files into one.

    Outputs among themselves are checked by ``resolve_outputs``; here the input (a path unless
    it is stdin) against every file the run writes, and the outputs against the run's side
    files (manifest, errors file, report, work directory), all named after the first output.
    """
    out0 = specs[0].path
    side = [
        (_sidecar(out0, ".manifest.json"), "the run manifest"),
        (_sidecar(out0, ".errors.jsonl"), "the errors file"),
    ]
    if report:
        from conceptsvc.client.report import report_files

        files = report_files(out0)
        side += [(files.markdown, "the report"), (files.html, "the HTML report"),
                 (files.histogram, "a report plot"), (files.top_concepts, "a report plot")]
    for spec in specs:
        what = f"{spec.path} (the {spec.format} output, from {spec.flag()})"
        for path, role in side:
            if same_file(spec.path, path):
                raise OutputClashError(
                    f"output {what} would also be {role} of --out {out0}; give the "
                    f"{spec.format} output another path."
                )
        if _is_work_dir(spec.path, out0):
            raise OutputClashError(
                f"output {what} is in the work directory of --out {out0}, which the run "
                "removes; give it another path."
            )
    if corpus.source == STDIN:
        return  # no path to collide with
    src = Path(corpus.source)
    for spec in specs:
        if same_file(src, spec.path):
            raise OutputClashError(
                f"the {spec.format} output {spec.path} is the input {corpus.source}: the run "
                f"would overwrite the captions it reads. Change {spec.flag()}."
            )
    for path, role in side:
        if same_file(src, path):
            raise OutputClashError(
                f"the input {corpus.source} is {path}, {role} of --out {out0}, which the run "
                "rewrites; choose another --out."
            )
    if _is_work_dir(src, out0):
        raise OutputClashError(
            f"the input {corpus.source} is in a work directory of --out {out0} "
            f"({out0.name}.<key>.part), which runs rewrite and remove; move the input out of "
            "it, or choose another --out."
        )


# -- channels ---------------------------------------------------------------------------------
class _Targets:
    """Channels to every target, picked round-robin; a target that just failed is rested.

    Each target gets ``connections`` channels, each its own TCP connection (a local subchannel
    pool), because a server running several worker processes on one port (SO_REUSEPORT)
    balances *connections*, not streams: one shared connection would pin every stream of the
    run to one server process.
    """

    def __init__(
        self, targets: Sequence[str], security: ChannelSecurity, connections: int = 1
    ) -> None:
        creds = security.credentials()
        options: list[tuple[str, Any]] = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.enable_retries", 0),
            ("grpc.keepalive_time_ms", 30_000),
            *security.channel_options(),
        ]
        self.names = list(targets)
        for t in targets:
            warn_token_in_plaintext(t, security.uses_tls, bool(security.token))
        self.channels = [
            [
                grpc.aio.secure_channel(t, creds, options=options)
                if creds is not None
                else grpc.aio.insecure_channel(t, options=options)
                for _ in range(max(1, connections))
            ]
            for t in targets
        ]
        self._stubs = [
            [pb_grpc.ConceptServiceStub(ch) for ch in chs]  # type: ignore[no-untyped-call]
            for chs in self.channels
        ]
        # AnnotateBatch with its reply left as bytes: the run reads them straight into the
        # journal's JSON form (wire.batch_reader), never building the messages.
        self._batch_calls = [
            [
                ch.unary_unary(
                    _ANNOTATE_BATCH_PATH,
                    request_serializer=pb.AnnotateBatchRequest.SerializeToString,
                    response_deserializer=None,
                )
                for ch in chs
            ]
            for chs in self.channels
        ]
        self.metadata = security.metadata()
        self._next = 0
        self._next_conn = [0] * len(targets)
        self._rest_until = [0.0] * len(targets)

    def stub(self, i: int) -> Any:
        """A stub for target ``i``, rotating over its connections."""
        return self._stubs[i][self._rotate(i)]

    def annotate_batch(self, i: int) -> Any:
        """AnnotateBatch on target ``i`` (next connection), its reply as bytes."""
        return self._batch_calls[i][self._rotate(i)]

    def _rotate(self, i: int) -> int:
        k = self._next_conn[i]
        self._next_conn[i] = (k + 1) % len(self._stubs[i])
        return k

    def pick(self) -> int:
        now = time.monotonic()
        n = len(self.names)
        for k in range(n):
            i = (self._next + k) % n
            if self._rest_until[i] <= now:
                self._next = i + 1
                return i
        i = min(range(n), key=lambda j: self._rest_until[j])
        self._next = i + 1
        return i

    def rest(self, i: int, seconds: float) -> None:
        self._rest_until[i] = max(self._rest_until[i], time.monotonic() + seconds)

    async def close(self) -> None:
        for chs in self.channels:
            for ch in chs:
                await ch.close()


# -- the run ----------------------------------------------------------------------------------
@dataclass
class _Failure:
    caption: Caption
    status: str
    reason: str
    attempts: int

    def to_json(self, unit: str = "line") -> dict[str, Any]:
        return {"id": self.caption.id, unit: self.caption.line, "stage": "annotate",
                "status": self.status, "reason": self.reason, "attempts": self.attempts}


class _Runner:
    def __init__(
        self,
        corpus: Corpus,
        scan: CorpusScan,
        settings: BatchSettings,
        journal_for: Callable[[ServiceInfo, ExtractOptions], Journal],
        overrides: Mapping[str, Any],
        progress_stream: TextIO | None,
        index_adopted: Callable[[str], None] = lambda _hash: None,
    ) -> None:
        self.corpus = corpus
        self.scan = scan
        self.s = settings
        self.journal_for = journal_for
        self.index_adopted = index_adopted
        self.overrides = overrides
        self.progress_stream = progress_stream
        self.failures: list[_Failure] = []
        self.retried_batches = 0
        self.busy_refusals = 0
        self.names: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.journal: Journal | None = None
        self.info: ServiceInfo | None = None
        self.resumed = 0
        # The index every journaled result of this run comes from; answers from any other are
        # never journaled (see _other_index).
        self.index_hash = ""
        # The index unlabelled journal lines belong to (written before lines named theirs).
        self.unlabelled = ""
        self.retired: set[str] = set()  # indexes this run moved away from (redo)
        self.index_changes: list[dict[str, Any]] = []
        self.failed_seqs: set[int] = set()
        self._switch_lock: asyncio.Lock | None = None
        self._reader = batch_reader(annotation_to_json, dumps, SCORE_DECIMALS)

    # -- helpers -------------------------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        base = min(self.s.backoff_max, self.s.backoff_base * (2 ** max(attempt - 1, 0)))
        jitter: float = random.uniform(0.5, 1.0)  # spreads retries of parallel workers
        return float(base * jitter)

    async def _get_info(self, targets: _Targets) -> ServiceInfo:
        """GetInfo from every target (waiting for them to come up); all must agree."""
        infos: dict[str, ServiceInfo] = {}
        last: dict[str, str] = {}
        hints: dict[str, str] = {}  # what to change, when an UNAVAILABLE says (unavailable_hint)
        for attempt in range(self.s.retries + 1):
            for i, name in enumerate(targets.names):
                if name in infos:
                    continue
                try:
                    msg = await targets.stub(i).GetInfo(
                        pb.GetInfoRequest(), timeout=_CONTROL_TIMEOUT,
                        metadata=targets.metadata,
                    )
                    infos[name] = info_from_pb(msg)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in _FATAL:
                        raise ClientError(f"{name}: {exc.code().name}: {exc.details()}") from None
                    last[name] = f"{exc.code().name}: {exc.details()}"
                    hints[name] = (
                        unavailable_hint(exc.details() or "", self.s.security.uses_tls)
                        if exc.code() is grpc.StatusCode.UNAVAILABLE else ""
                    )
            if infos and (len(infos) == len(targets.names) or attempt >= 1):
                break
            if attempt < self.s.retries:
                if attempt == 0 and not infos:  # said once: the wait can take many seconds
                    log.warning(
                        "waiting for %s to answer (%s); trying %d more time(s) with backoff "
                        "(--retries)", ", ".join(targets.names), "; ".join(last.values()),
                        self.s.retries,
                    )
                await asyncio.sleep(self._backoff(attempt + 1))
        if not infos:
            detail = "; ".join(f"{t}: {m}" for t, m in last.items())
            hint = next(
                (hints[t] for t in last if hints.get(t)),
                " Is the service running (check `conceptsvc health --target ...`)?",
            )
            raise ServiceUnreachableError(f"no target answered GetInfo ({detail}).{hint}")
        for name, why in last.items():
            if name not in infos:
                log.warning("target %s is not answering yet (%s); using the others", name, why)
        hashes = {n: i.index.content_hash for n, i in infos.items()}
        if len(set(hashes.values())) > 1:
            raise RunIncompatibleError(
                "the targets serve different indexes ("
                + ", ".join(f"{n}: {h[:12]}" for n, h in hashes.items())
                + "); results would depend on which replica answered. Point all --target "
                "values at replicas of the same dictionary."
            )
        return next(iter(infos.values()))

    async def _probe(self, targets: _Targets, options: pb.AnnotateOptions) -> None:
        """One tiny request with the run's options, so bad options fail before the corpus."""
        for attempt in range(self.s.retries + 1):
            i = targets.pick()
            try:
                await targets.stub(i).Annotate(
                    pb.AnnotateRequest(id="conceptsvc-probe", text="probe", options=options),
                    timeout=_CONTROL_TIMEOUT, metadata=targets.metadata,
                )
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _RETRYABLE and attempt < self.s.retries:
                    targets.rest(i, self._backoff(attempt + 1))
                    await asyncio.sleep(self._backoff(attempt + 1))
                    continue
                what = (
                    f"the service did not answer after {attempt + 1} tries"
                    if exc.code() in _RETRYABLE
                    else "the service rejected the run's options"
                )
                raise ClientError(f"{what}: {exc.code().name}: {exc.details()}") from None

    # -- main ----------------------------------------------------------------------------------
    async def run(self) -> None:
        targets = _Targets(self.s.targets, self.s.security, self.s.concurrency)
        self._switch_lock = asyncio.Lock()
        try:
            self.info = await self._get_info(targets)
            self.index_hash = self.info.index.content_hash
            options = effective_options(self.info.default_options, self.overrides)
            options_pb = options_to_pb(options)
            await self._probe(targets, options_pb)
            self.journal = journal = self.journal_for(self.info, options)
            good_done = len(journal.done)
            self.resumed = good_done
            if good_done and self.s.progress is not ProgressMode.QUIET:
                # Said before the first rate line, so that a rate far above the service's speed
                # (the resumed captions count as done) is not a mystery.
                stream = self.progress_stream if self.progress_stream is not None else sys.stderr
                stream.write(
                    f"annotate: resuming: {good_done} of {self.scan.n_good} captions were "
                    f"annotated by an earlier run ({journal.work_dir}); "
                    f"{self.scan.n_good - good_done} to go\n"
                )
                stream.flush()
            progress = Progress(
                self.scan.n_good, done=good_done, stream=self.progress_stream,
                mode=self.s.progress, interval=self.s.progress_interval,
            )
            try:
                # One pass sends every caption not yet done. A pass in which the run adopted
                # another index (redo) left captions of the old one undone: another pass.
                while True:
                    changes = len(self.index_changes)
                    await self._pass(targets, options_pb, journal, progress)
                    if len(self.index_changes) == changes:
                        break
            finally:
                journal.sync()
                progress.close()
        finally:
            await targets.close()

    async def _pass(
        self,
        targets: _Targets,
        options_pb: pb.AnnotateOptions,
        journal: Journal,
        progress: Progress,
    ) -> None:
        assert self.info is not None
        limits = self.info.limits
        queue: asyncio.Queue[list[Caption] | None] = asyncio.Queue(self.s.concurrency * 2)

        def refuse(cap: Caption, reason: str) -> None:
            self.failures.append(_Failure(cap, "RESOURCE_EXHAUSTED", reason, 0))
            self.failed_seqs.add(cap.seq)
            progress.update(0, errors=1)

        # A batch goes in one message: it is closed before it could pass the service's message
        # limit (4 bytes per code point bound the UTF-8 size; 16 bytes the framing of an item).
        room = (limits.max_message_bytes or 4 << 20) - options_pb.ByteSize() - 1024
        # (0: a service older than max_batch_items)
        batch_size = min(self.s.batch_size, limits.max_batch_items or self.s.batch_size)

        async def produce() -> None:
            batch: list[Caption] = []
            size = 0
            for cap in self.corpus.captions():
                if cap.seq in journal.done or cap.seq in self.failed_seqs:
                    continue
                if limits.max_text_chars and len(cap.text) > limits.max_text_chars:
                    refuse(cap, f"caption is {len(cap.text)} code points, over the service's "
                                f"limit of {limits.max_text_chars}; not sent")
                    continue
                # 4 bytes per code point bounds the UTF-8 size; only near the limit is
                # the exact message size worth computing.
                max_bytes = limits.max_message_bytes
                if max_bytes and 4 * (len(cap.text) + len(cap.id)) + 4096 > max_bytes:
                    size = pb.AnnotateRequest(
                        id=cap.id, text=cap.text, options=options_pb
                    ).ByteSize()
                    if size > max_bytes:
                        refuse(cap, f"the request would be {size} bytes, over the service's "
                                    f"message limit of {max_bytes}; not sent")
                        continue
                item = 4 * (len(cap.text) + len(cap.id)) + 16
                if batch and size + item > room:
                    await queue.put(batch)
                    batch, size = [], 0
                batch.append(cap)
                size += item
                if len(batch) >= batch_size:
                    await queue.put(batch)
                    batch, size = [], 0
            if batch:
                await queue.put(batch)
            for _ in range(self.s.concurrency):
                await queue.put(None)

        async def work() -> None:
            while (batch := await queue.get()) is not None:
                await self._annotate_batch(targets, options_pb, batch, progress)

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(produce())
                for _ in range(self.s.concurrency):
                    tg.create_task(work())
        except* ClientError as eg:
            raise eg.exceptions[0] from None

    def _journal(self, rows: list[tuple[int, bytes, str]], progress: Progress) -> None:
        """Journal the rows (results as JSON text) made with the run's index. A row made with
        an index the run has since moved away from is dropped: its caption is not done, the
        next pass sends it."""
        assert self.journal is not None
        keep = [(seq, r) for seq, r, ix in rows if ix == self.index_hash]
        self.journal.append_json(keep, self.index_hash)
        progress.update(len(keep))

    async def _other_index(self, targets: _Targets, seen: str) -> bool:
        """An answer came from index ``seen``, not the run's: stop (E627), or — redo — adopt
        the index the service now serves. True when ``seen`` is the run's index afterwards
        (the answer can be kept); False when the item must be sent again (an answer from an
        index the run has left, still in flight on a stream opened before the change)."""
        assert self.journal is not None and self._switch_lock is not None
        if self.s.on_index_change == "stop":
            raise IndexChangedError(
                self.index_hash, seen, len(self.journal.done), str(self.journal.work_dir)
            )
        if seen in self.retired:
            return False
        async with self._switch_lock:
            if seen == self.index_hash:
                return True  # another worker adopted it meanwhile
            if seen in self.retired:
                return False
            info = await self._get_info(targets)
            new = info.index.content_hash
            if new != self.index_hash:
                self._adopt(info)
            return new == seen

    def _adopt(self, info: ServiceInfo) -> None:
        """Make ``info``'s index the run's; the old index's captions become undone."""
        assert self.journal is not None
        old, new = self.index_hash, info.index.content_hash
        self.retired.add(old)
        self.retired.discard(new)
        redone = self.journal.retire(new, self.unlabelled)
        self.index_changes.append({"from": old, "to": new, "redone": redone})
        self.info, self.index_hash = info, new
        self.index_adopted(new)
        log.warning(
            "the service's index changed from %s to %s during the run; the %d caption(s) "
            "annotated with %s are annotated again (--on-index-change redo)",
            old[:12], new[:12], redone, old[:12],
        )

    async def _annotate_batch(
        self,
        targets: _Targets,
        options: pb.AnnotateOptions,
        batch: list[Caption],
        progress: Progress,
    ) -> None:
        attempts: dict[int, int] = {c.seq: 0 for c in batch}
        last_error: dict[int, tuple[str, str]] = {}
        todo: deque[list[Caption]] = deque([batch])
        busy_in_row = 0  # refusals as busy of this batch's calls since one was served
        while todo:
            part = todo.popleft()
            pending: dict[str, Caption] = {c.id: c for c in part}
            i = targets.pick()
            ok: list[tuple[int, bytes, str]] = []
            resend_ix: set[str] = set()  # indexes whose answers on this call are resent
            reply_full: set[int] = set()  # seqs the reply had no room for (E503)
            try:
                msg = pb.AnnotateBatchRequest(options=options)
                add = msg.items.add  # in place: no item message built and then copied in
                for c in part:
                    add(id=c.id, text=c.text)
                reply = await targets.annotate_batch(i)(
                    msg, timeout=self.s.deadline, metadata=targets.metadata
                )
                try:
                    answers = self._reader.read_json(reply)
                except DecodeError as exc:  # the server's fault, not the captions': the run stops
                    raise ClientError(
                        f"{targets.names[i]}: AnnotateBatch: the server's reply cannot be read "
                        f"({exc})"
                    ) from None
                for rid, seen, code, _, answer in answers:
                    cap = pending.pop(rid, None)
                    if cap is None:
                        log.warning("%s answered an id it was not asked", targets.names[i])
                        continue
                    # (an empty hash: a server older than the field; nothing to check)
                    ix = seen or self.index_hash
                    if ix != self.index_hash:
                        self._journal(ok, progress)
                        ok = []
                        # (one call is answered by one index: asked once per call)
                        if ix in resend_ix or not await self._other_index(targets, ix):
                            resend_ix.add(ix)
                            pending[cap.id] = cap
                            last_error[cap.seq] = (
                                "ABORTED",
                                f"answered with index {ix[:12]}, not the run's "
                                f"{self.index_hash[:12]}; sent again",
                            )
                            continue
                    if code == 0:
                        ok.append((cap.seq, answer, ix))  # the journal's JSON text already
                        continue
                    res = stream_result_from_pb(pb.AnnotateResponse.FromString(answer))
                    if res.error is not None and res.error.error_code == ReplyFullError.code:
                        pending[cap.id] = cap  # not the item's fault: again, in a smaller batch
                        reply_full.add(cap.seq)
                        last_error[cap.seq] = (res.error.status, res.error.message)
                    elif res.error is not None and res.error.status in _RETRYABLE_ITEM:
                        pending[cap.id] = cap
                        last_error[cap.seq] = (res.error.status, res.error.message)
                    else:
                        err = res.error
                        self.failures.append(_Failure(
                            cap, err.status if err else "UNKNOWN",
                            err.message if err else "no result", attempts[cap.seq] + 1,
                        ))
                        self.failed_seqs.add(cap.seq)
                        progress.update(0, errors=1)
                # (status, reason, whether to blame the first unanswered item)
                stream_error: tuple[grpc.StatusCode, str, bool] | None = None
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                stream_error = (code, exc.details() or code.name, code not in _NO_BLAME)
            except asyncio.CancelledError:
                # grpc.aio cancels a call itself when writing a request fails (typically: the
                # deadline expired while the batch was still being sent) and then raises
                # CancelledError from the read. That is a failed call, not a cancelled
                # worker; only a cancellation of this task itself is passed on.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                stream_error = (
                    grpc.StatusCode.CANCELLED,
                    "the call was cancelled inside the gRPC client (usually: the deadline "
                    "expired while its requests were being sent)",
                    True,
                )
            if ok:
                self._journal(ok, progress)
            if stream_error is not None and _too_big(*stream_error[:2]) and len(part) > 1:
                half = (len(part) + 1) // 2
                todo.extendleft([part[half:], part[:half]])
                continue
            if (stream_error is not None and _turned_away(*stream_error[:2])
                    and busy_in_row < _BUSY_TRIES):
                # turned away as busy, before any caption was read (_BUSY_TRIES)
                busy_in_row += 1
                self._busy(targets.names[i], stream_error[1])
                await asyncio.sleep(self._backoff(busy_in_row))
                todo.appendleft([c for c in part if c.id in pending])
                continue
            busy_in_row = 0
            if not pending:
                continue
            # Something was not answered: charge one attempt to every unanswered item.
            left = [c for c in part if c.id in pending]
            isolate_head = False
            if stream_error is not None:
                code, reason, isolate_head = stream_error
                if code in _FATAL:
                    raise ClientError(
                        f"{targets.names[i]}: {code.name}: {reason}. Pass the service's token "
                        "with --token."
                    )
                status = code.name
                if code is grpc.StatusCode.UNAVAILABLE:
                    targets.rest(i, self._backoff(1))
            else:
                status, reason = "UNKNOWN", "the call ended without answering every item"
            # A batch answers nothing until it is done, so when the failure may be an item's
            # fault (a caption the server was still on at the deadline), which item it was is
            # unknown: the batch is split in halves and nobody is charged, until the item is
            # alone — then it is. A pathological caption costs a failed call per halving
            # (log2 of the batch size), and its batch-mates are never charged for it. Items a
            # full reply had no room for are never charged either.
            bisect = isolate_head and len(part) > 1
            if bisect:
                charged: list[Caption] = []
            else:
                charged = [c for c in left if c.seq not in reply_full]
            for c in charged:
                attempts[c.seq] += 1
                if c.seq not in last_error or stream_error is not None:
                    last_error[c.seq] = (status, reason)
            give_up = [c for c in left if attempts[c.seq] > self.s.retries]
            for c in give_up:
                st, why = last_error[c.seq]
                self.failures.append(_Failure(c, st, why, attempts[c.seq]))
                self.failed_seqs.add(c.seq)
            if give_up:
                progress.update(0, errors=len(give_up))
            again = [c for c in left if c not in give_up]
            if not again:
                continue
            half = (len(again) + 1) // 2
            if stream_error is None and all(c.seq in reply_full for c in again):
                # Only what a full reply could not hold: at once, in two smaller batches.
                todo.extend(p for p in (again[:half], again[half:]) if p)
                continue
            self.retried_batches += 1
            log.info(
                "%s: %s on %d caption(s); retrying after backoff",
                targets.names[i], status, len(again),
            )
            await asyncio.sleep(self._backoff(max(1, *(attempts[c.seq] for c in again))))
            if bisect:
                todo.extend(p for p in (again[:half], again[half:]) if p)
            else:
                todo.append(again)

    def _busy(self, target: str, reason: str) -> None:
        """Count a call refused as busy; say so once a run, with what to do about it."""
        self.busy_refusals += 1
        if self.busy_refusals == 1:
            limit = self.info.limits.max_concurrent_rpcs if self.info is not None else 0
            log.warning(
                "%s refuses calls as busy (%s); they are sent again after a backoff and cost "
                "no caption an attempt, but the run goes slower than it could: --concurrency "
                "%d is more than the service admits at once%s",
                target, reason, self.s.concurrency,
                f" ({limit} calls per server process)" if limit else "",
            )

    async def describe(self, cuis: Sequence[str]) -> None:
        """Names for report concepts that no mention named (GetConcept, best effort)."""
        if not cuis:
            return
        targets = _Targets(self.s.targets, self.s.security)
        try:
            for cui in cuis:
                i = targets.pick()
                try:
                    msg = await targets.stub(i).GetConcept(
                        pb.GetConceptRequest(cui=cui), timeout=_CONTROL_TIMEOUT,
                        metadata=targets.metadata,
                    )
                except grpc.aio.AioRpcError as exc:
                    log.info("GetConcept %s: %s", cui, exc.code().name)
                    continue
                rec = concept_from_pb(msg)
                self.names[cui] = (rec.preferred_name, tuple(t.tui for t in rec.semantic_types))
        finally:
            await targets.close()


# -- finishing ---------------------------------------------------------------------------------
def _already_complete(
    manifest_path: Path, key: str, specs: Sequence[OutputSpec], serving: str, *, report: bool
) -> bool:
    """True when the manifest says this exact run finished with the index the service serves
    and its outputs are untouched."""
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        made_with = m["service"]["index_content_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not (m.get("complete") and m.get("run_key") == key and made_with == serving):
        return False
    if report and not all(m.get(k) and Path(m[k]).is_file() for k in ("report", "report_html")):
        return False  # asked for a report the earlier run did not write (whole)
    recorded = {(o["format"], o["path"], o["sha256"]) for o in m.get("outputs", [])}
    for spec in specs:
        if not spec.path.is_file():
            return False
        if (spec.format.value, str(spec.path), _file_sha256(spec.path)) not in recorded:
            return False
    return True


def _check_not_stale(
    manifest_path: Path,
    scan: CorpusScan,
    corpus: Corpus,
    options: ExtractOptions,
    serving: str,
    *,
    redo: bool,
) -> None:
    """Refuse to pass over a complete output of this input made with another index or other
    options: reporting it "already complete" would present stale results as current, and
    replacing it unasked would throw away a finished run. ``--restart`` replaces it; when only
    the index differs, so does ``redo``."""
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        complete = m.get("complete") is True
        same_input = (m["input"]["sha256"], m["input"]["format"]) == (
            scan.sha256, corpus.format.value
        )
        made_with = str(m["service"]["index_content_hash"])
        made_options = m["options"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no manifest of a complete run to compare with
    if not (complete and same_input):
        return
    now_options = json.loads(json.dumps(asdict(options)))
    changed = sorted(
        k for k in {*made_options, *now_options} if made_options.get(k) != now_options.get(k)
    )
    index_changed = made_with != serving
    if not changed and (not index_changed or redo):
        return
    what = []
    if index_changed:
        what.append(f"index {made_with[:12]}, but the service now serves {serving[:12]}")
    if changed:
        what.append(
            "other options ("
            + "; ".join(f"{k}: {made_options.get(k)!r} then, {now_options.get(k)!r} now"
                        for k in changed)
            + ")"
        )
    raise RunIncompatibleError(
        f"{manifest_path} records a complete run of this input made with "
        + " and with ".join(what)
        + "; its outputs are not current for this command and are left as they are. Rerun with "
        "--restart to annotate the input again and replace them"
        + (" (or, as only the index differs, with `--on-index-change redo`)"
           if index_changed and not changed else "")
        + ", or write to another --out."
    )


def _write_errors(
    path: Path, bad: Sequence[BadRecord], failures: Sequence[_Failure], unit: str = "line"
) -> Path | None:
    rows = [(b.line, b.to_json()) for b in bad]
    rows += [(f.caption.line, f.to_json(unit)) for f in failures]
    if not rows:
        path.unlink(missing_ok=True)
        return None
    rows.sort(key=lambda r: r[0])
    atomic_write_text(path, "".join(dumps(r) + "\n" for _, r in rows))
    return path


def annotate_corpus(
    corpus: Corpus,
    specs: Sequence[OutputSpec],
    settings: BatchSettings,
    *,
    overrides: Mapping[str, Any] | None = None,
    progress_stream: TextIO | None = None,
    include_text: bool = False,
) -> RunResult:
    """Annotate ``corpus`` through the service into ``specs``; see the module docstring.

    ``include_text`` puts each caption's text into the JSONL output (taken from the input when
    the outputs are written, so the journal and a resume are unaffected).

    ``overrides`` are the extraction options the caller chose (names of
    :class:`~conceptsvc.model.ExtractOptions` fields); the rest come from the service.
    Raises :class:`~conceptsvc.errors.BadInputError` for malformed input (unless
    skipping), :class:`~conceptsvc.errors.ClientError` when the run cannot start; returns a
    :class:`RunResult` whose ``exit_code`` tells complete from incomplete.
    """
    if not specs:
        raise ClientError("no output requested.")
    _check_run_files(corpus, specs, report=settings.report)
    if any(s.format is OutputFormat.PARQUET for s in specs):
        from conceptsvc.client.parquet import require_pyarrow

        require_pyarrow()
    overrides = dict(overrides or {})
    started = _now()
    out0 = specs[0].path
    manifest_path = _sidecar(out0, ".manifest.json")
    errors_path = _sidecar(out0, ".errors.jsonl")
    scan = corpus.scan()
    if scan.bad and settings.on_bad_input == "fail":
        _write_errors(errors_path, scan.bad, [])
        raise BadInputError(corpus.source, scan.bad)
    if scan.n_good == 0 and not settings.allow_empty:
        where = "stdin" if corpus.source == STDIN else corpus.source
        skipped = ""
        if scan.bad:
            _write_errors(errors_path, scan.bad, [])
            skipped = (f" (all {len(scan.bad)} record(s) are malformed; they are listed in "
                       f"{errors_path})")
        raise EmptyCorpusError(
            f"no captions in {where}{skipped}; nothing was sent and no output written. Check "
            "the input file (and --input-format), or pass --allow-empty to write empty "
            "outputs and a manifest for it."
        )

    state: dict[str, Any] = {}
    work_holder: dict[str, Path] = {}

    def journal_for(info: ServiceInfo, options: ExtractOptions) -> Journal:
        key = _run_key(scan, corpus, options.cache_key())
        work = _sidecar(out0, f".{key[:16]}.part")
        work_holder["work"] = work
        state["key"] = key
        state["options"] = asdict(options)
        serving = info.index.content_hash
        if not settings.restart:
            _check_not_stale(
                manifest_path, scan, corpus, options, serving,
                redo=settings.on_index_change == "redo",
            )
        if not settings.restart and not work.exists() and _already_complete(
            manifest_path, key, specs, serving, report=settings.report
        ):
            raise _AlreadyComplete()
        for other in out0.parent.glob(f"{out0.name}.*.part"):
            if other != work and other.is_dir():
                log.warning(
                    "%s is the work directory of an earlier run of %s with a different input or "
                    "options; it is not used (remove it when you no longer need it)", other, out0,
                )
        journal = Journal(work)
        if settings.restart:
            journal.close()
            shutil.rmtree(work)
            journal = Journal(work)
        prior = journal.load_state()
        # Lines without an index hash were written against the index run.json named first.
        unlabelled = str(
            (prior.get("unlabelled_index") or prior.get("index_content_hash") or "")
            if prior else serving
        )
        runner.unlabelled = unlabelled
        if (
            prior is not None
            and prior.get("index_content_hash") != serving
            and settings.on_index_change != "redo"
        ):
            n = len(journal.done)
            journal.close()
            old_hash = str(prior.get("index_content_hash"))[:12]
            raise RunIncompatibleError(
                f"{work} holds {n} result(s) made with index {old_hash}, "
                f"but the service now serves {serving[:12]}; mixing them would "
                "give an inconsistent corpus. Rerun with `--on-index-change redo` to annotate "
                f"them again with {serving[:12]}, or with --restart to start over, or point "
                "--target at a service with the earlier index."
            )
        # Captions of any other index are annotated again: the ones of an earlier index when
        # redo was asked for, and those a redo left undone when its run was interrupted.
        redone = journal.retire(serving, unlabelled)
        if prior is not None and prior.get("index_content_hash") != serving:
            runner.index_changes.append(
                {"from": prior.get("index_content_hash"), "to": serving, "redone": redone}
            )
        if redone:
            log.warning(
                "%s: %d result(s) were made with another index than the service's %s; they "
                "are annotated again (--on-index-change redo)", work, redone, serving[:12],
            )
        runs = list(prior.get("runs", [])) if prior else []
        runs.append({"started_at": started, "resumed": len(journal.done), "pid": os.getpid()})
        new_state = {
            "run_key": key,
            "input": {"path": corpus.source, "format": corpus.format.value,
                      "sha256": scan.sha256, **corpus.identity()},
            "options": asdict(options),
            "index_content_hash": serving,
            "unlabelled_index": unlabelled,
            "first_started_at": prior.get("first_started_at", started) if prior else started,
            "runs": runs,
        }
        journal.save_state(new_state)
        state.update(new_state)
        return journal

    def index_adopted(new_hash: str) -> None:
        # run.json names the index the journal's results now come from, so that a resume
        # after an interruption is checked against it.
        state["index_content_hash"] = new_hash
        journal = runner.journal
        assert journal is not None
        journal.save_state({k: v for k, v in state.items() if k not in ("key",)})

    runner = _Runner(
        corpus, scan, settings, journal_for, overrides, progress_stream, index_adopted
    )
    try:
        asyncio.run(runner.run())
    except _AlreadyComplete:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        log.info("%s is already complete for this input and these options", out0)
        return RunResult(
            outputs=[s.path for s in specs], manifest=manifest_path,
            errors=errors_path if errors_path.exists() else None,
            counts=RunCounts(**{**m["counts"], "resumed": m["counts"]["annotated"]}),
            complete=True, already_complete=True,
        )
    except BaseException:
        if runner.journal is not None:
            runner.journal.close()
        raise
    journal = runner.journal
    assert journal is not None and runner.info is not None
    try:
        return _finish(
            corpus, scan, specs, settings, runner, journal, state, manifest_path, errors_path,
            work_holder["work"], include_text=include_text,
        )
    finally:
        journal.close()


class _AlreadyComplete(Exception):
    pass


def _samples(corpus: Corpus, annotations: Mapping[int, Annotation]) -> list[AnnotatedCaption]:
    """The captions' texts (the results hold only offsets) for the report's sample; the corpus
    is read again only as far as the last sampled caption."""
    from conceptsvc.client.html_page import AnnotatedCaption

    out: list[AnnotatedCaption] = []
    if not annotations:
        return out
    last = max(annotations)
    for cap in corpus.captions():
        a = annotations.get(cap.seq)
        if a is not None:
            out.append(AnnotatedCaption(cap.id, cap.text, a))
        if cap.seq >= last:
            break
    return out


def _caption_texts(corpus: Corpus) -> Callable[[int], str]:
    """``text_of(seq)`` for ascending ``seq`` (the journal's order): the caption's text, read
    from the input in step with the journal — never the whole corpus in memory."""
    captions = corpus.captions()

    def text_of(seq: int) -> str:
        for cap in captions:
            if cap.seq == seq:
                return cap.text
            if cap.seq > seq:
                break
        raise ClientError(
            f"{corpus.source} changed during the run (caption {seq} is gone); rerun the command."
        )

    return text_of


def _finish(
    corpus: Corpus,
    scan: CorpusScan,
    specs: Sequence[OutputSpec],
    settings: BatchSettings,
    runner: _Runner,
    journal: Journal,
    state: Mapping[str, Any],
    manifest_path: Path,
    errors_path: Path,
    work: Path,
    *,
    include_text: bool = False,
) -> RunResult:
    info = runner.info
    assert info is not None
    made_with = journal.index_counts(runner.unlabelled)
    if set(made_with) - {runner.index_hash}:
        # Never expected (results of other indexes are retired or not journaled at all), but
        # this is the last point before a corpus of two dictionaries would be written.
        raise RunIncompatibleError(
            f"{work} holds results of several indexes ("
            + ", ".join(f"{h[:12]}: {n}" for h, n in sorted(made_with.items()))
            + f"); nothing was written. Rerun with `--on-index-change redo` to annotate "
            f"those of other indexes again with {runner.index_hash[:12]}."
        )
    builder = None
    if settings.report:
        from conceptsvc.client.report import ReportBuilder

        builder = ReportBuilder()
    with_concepts = concepts = mentions = 0
    sample: dict[int, Annotation] = {}  # the first report_samples captions, by seq
    texts = _caption_texts(corpus) if include_text else None
    with OutputSet(specs, work) as out:
        # The outputs are rendered from the journal's JSON text (ResultText); the dataclasses
        # are built only for the report.
        for seq, text in journal.texts():
            result = ResultText(text)
            out.write_result(result, texts(seq) if texts is not None else None)
            distinct = result.distinct_concepts()
            with_concepts += distinct > 0
            concepts += distinct
            mentions += result.mention_count()
            if builder is not None:
                a = annotation_from_json(result.obj())
                builder.add(a)
                if len(sample) < settings.report_samples:
                    sample[seq] = a
        annotated = out.count
        paths = out.commit()
    if annotated + len(runner.failures) < scan.n_good:
        # Never expected; but a caption that is in neither list must not vanish silently.
        failed = {f.caption.seq for f in runner.failures}
        for cap in corpus.captions():
            if cap.seq not in journal.done and cap.seq not in failed:
                log.error("caption %s (line %d) was neither annotated nor failed", cap.id, cap.line)
                runner.failures.append(_Failure(
                    cap, "INTERNAL", "the client lost track of this caption; rerun to retry it", 0
                ))
    skipped = list(scan.bad)
    errors = _write_errors(errors_path, skipped, runner.failures, corpus.record_unit)
    complete = not runner.failures and annotated == scan.n_good
    report = report_files = None
    if builder is not None:
        from conceptsvc.client.report import write_report

        missing = builder.missing_names()
        asyncio.run(runner.describe(missing))
        report = builder.build(describe=runner.names.get)
        report_files = write_report(report, specs[0].path, title=f"Corpus report: {corpus.source}",
                                    samples=_samples(corpus, sample))
    counts = RunCounts(
        records=scan.n_records, captions=scan.n_good, annotated=annotated,
        failed=len(runner.failures), skipped_bad_input=len(skipped), resumed=runner.resumed,
        with_concepts=with_concepts, concepts=concepts, mentions=mentions,
        retried_batches=runner.retried_batches, busy_refusals=runner.busy_refusals,
    )
    finished = _now()
    manifest = {
        "conceptsvc_version": __version__,
        "complete": complete,
        "run_key": state["key"],
        "input": {
            "path": corpus.source if corpus.source == "-" else str(Path(corpus.source).resolve()),
            "format": corpus.format.value, "sha256": scan.sha256, "bytes": scan.size_bytes,
            **corpus.identity(),
        },
        "options": state["options"],
        "service": {
            "targets": list(settings.targets),
            "service_version": info.service_version,
            "api_version": info.api_version,
            "index_content_hash": info.index.content_hash,
            "index_manifest_sha256": hashlib.sha256(
                json.dumps(info.index.manifest, sort_keys=True).encode()
            ).hexdigest(),
            "index_source_release": info.index.source_release,
            "index_concepts": info.index.concepts,
        },
        "settings": {
            "concurrency": settings.concurrency, "batch_size": settings.batch_size,
            "deadline_seconds": settings.deadline, "retries": settings.retries,
            "on_bad_input": settings.on_bad_input,
        },
        "outputs": [
            {"format": s.format.value, "path": str(s.path), "sha256": _file_sha256(p)}
            for s, p in zip(specs, paths, strict=True)
        ],
        "errors_file": str(errors) if errors else None,
        "report": str(report_files.markdown) if report_files else None,
        "report_html": str(report_files.html) if report_files else None,
        "counts": {k: v for k, v in asdict(counts).items() if k not in _HISTORY_COUNTS},
        # Everything that differs between an interrupted-and-resumed run and an uninterrupted
        # one is in here; the rest of the manifest is the same for both.
        "timing": {
            "started_at": state["first_started_at"],
            "finished_at": finished,
            "invocations": [
                *state["runs"][:-1],
                {**state["runs"][-1], "finished_at": finished,
                 "retried_batches": runner.retried_batches,
                 **({"busy_refusals": runner.busy_refusals} if runner.busy_refusals else {}),
                 **({"index_changes": runner.index_changes} if runner.index_changes else {})},
            ],
        },
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    if complete:
        journal.close()
        doomed = work.with_name(work.name + f".done-{os.getpid()}")
        os.replace(work, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return RunResult(
        outputs=paths, manifest=manifest_path, errors=errors, counts=counts,
        complete=complete, report=report, report_files=report_files,
    )
