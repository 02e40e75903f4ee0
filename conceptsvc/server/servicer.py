"""The gRPC servicers: requests in, engine and cache in the middle, responses out.

Data is loaded once (into a :class:`LoadedIndex`) and swapped atomically on reload: every RPC
takes one reference to the current :class:`LoadedIndex` when it starts and uses only that, so a
reload never changes the index under a request that is already running (a whole stream stays on
the index it started with). Every AnnotateResponse names that index (``index_hash``, its content
hash), cached or fresh, failed item or not: the next stream of the same client may already be
answered by another one. Failures become statuses only through
:func:`conceptsvc.server.status.status_for`.

Answers are wire bytes, not messages: the engine's dataclasses are written by
``wire.annotation_writer`` (compiled), the cache holds exactly those bytes (AnnotateResponse
fields without id, cached flag and index hash), and a reply is the bytes of each answer with
its id, cached flag and index hash appended (protobuf reads fields in any order), so a cache hit
is copied into the reply, never parsed and rebuilt. ``add_concept_service`` registers the
annotation methods without a response serialiser for that.

AnnotateBatch: one message of many captions, answered by one message in request order; cache
lookups and writes are one batched call each, items fail one by one (their ``status``), the
reply is kept under the message limit (E501 for an answer over it alone, E503 for the items
that do not fit beside the earlier ones), and a batch whose deadline comes close answers what it
has. A batch of more than ``max_batch_items`` items, or whose reply could not hold even a
refusal of each item, is refused whole with RESOURCE_EXHAUSTED before any item is annotated.
A batch whose client has gone (cancelled, or its deadline passed) starts no more items: what
it annotated is cached, and the call is recorded with the status that ended it, not OK.

Streams: a reader thread moves incoming items into a bounded queue; the handler takes whatever
has arrived (up to ``stream_batch_size``), looks the batch up in the cache with one batched call,
extracts the misses, writes them back with one batched call, and answers in request order. A bad
item — one whose answer would be over the message limit too — gets an error ``status`` in its
own response; the stream goes on. Between items the handler stops when the client's deadline
has passed or the call was cancelled (recorded as such in the metrics), and ends with
UNAVAILABLE once the server is draining (the client resends the unanswered items elsewhere) or
once the stream has sent nothing for ``stream_idle_seconds`` with every item answered (an open
stream holds a pool thread; see :mod:`conceptsvc.server.admission`).

A unary Annotate is one caption: the engine has no check inside it, so a huge caption is
annotated to its end after its client has gone; the call is then recorded with the status that
ended it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from grpc_health.v1 import health, health_pb2

from conceptsvc import __version__, wire
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2 as pb
from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2_grpc as pb_grpc
from conceptsvc.cache import ResultCache, result_keys
from conceptsvc.errors import InputTooLargeError, ReplyFullError
from conceptsvc.extractor import WeightedMemo, options_weight
from conceptsvc.model import ExtractOptions
from conceptsvc.semantic_network import load_semantic_network
from conceptsvc.server.status import (
    RpcFailure,
    client_gone,
    deadline_exceeded,
    draining,
    invalid_argument,
    not_found,
    not_ready,
    status_for,
    stream_idle,
    too_large,
)

if TYPE_CHECKING:
    from conceptsvc.config import Settings
    from conceptsvc.extractor import Extractor
    from conceptsvc.metrics import ServiceMetrics

__all__ = [
    "ADMIN_SERVICE_NAME",
    "SERVICE_NAME",
    "AdminServicer",
    "ConceptServicer",
    "LoadedIndex",
    "ReloadOutcome",
    "ServiceState",
    "add_concept_service",
]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConceptService"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdminService"].full_name
_OPTIONS_MEMO_SIZE = 1024
OPTIONS_MEMO_BYTES = 32 << 20
"""Approximate bytes of the request options a worker's options memo holds (wire bytes plus
:func:`~conceptsvc.extractor.options_weight`), with ``_OPTIONS_MEMO_SIZE`` entries at most."""
_OPTION_LISTS = ("semantic_types", "semantic_groups", "sources", "exclude_cuis")
_ERROR_WEIGHT = 1024  # a remembered refusal: the exception and its message
_END = object()
_NEVER = threading.Event()  # the end of a call that has none to watch: never set
# An AnnotateBatch stops starting new items this close to its deadline and answers the ones it
# has: an answer that arrives after the deadline is lost, with the work of every item in it.
_DEADLINE_MARGIN = 0.05
# Bytes of an AnnotateBatch reply item beyond its answer, id and index hash: the item's tag and
# length, the id's tag and length, the cached flag (at most 11 under a 2 GiB message limit).
_ITEM_FRAMING = 24
# The methods whose replies the servicer writes as bytes (see add_concept_service).
_BYTES_REPLIES = frozenset({"Annotate", "AnnotateStream", "AnnotateBatch"})
_HAS_FIELD = pb.AnnotateRequest.HasField


@dataclass
class LoadedIndex:
    """One loaded index with everything derived from it; replaced whole, never mutated."""

    extractor: Extractor
    content_hash: str
    defaults: ExtractOptions
    index_info: pb.IndexInfo
    profiles: tuple[str, ...]
    concepts: int
    keys: int
    max_option_items: int = 10_000
    # The fields every answer of this index ends with (its index_hash), as wire bytes.
    tail: bytes = b""
    options_memo: WeightedMemo[bytes, ExtractOptions | Exception] = field(
        default_factory=lambda: WeightedMemo(
            _OPTIONS_MEMO_SIZE, OPTIONS_MEMO_BYTES, _options_entry_weight
        )
    )

    @classmethod
    def build(
        cls, extractor: Extractor, defaults: ExtractOptions, *, max_option_items: int = 10_000
    ) -> LoadedIndex:
        index = extractor.index
        extractor.check_options(defaults)
        manifest = index.manifest
        return cls(
            extractor=extractor,
            content_hash=index.content_hash,
            defaults=defaults,
            index_info=wire.index_info_to_pb(manifest),
            profiles=tuple(extractor.profiles()),
            concepts=len(index),
            keys=int(manifest.get("counts", {}).get("keys", len(index.key_ids))),
            max_option_items=max_option_items,
            tail=bytes(pb.AnnotateResponse(index_hash=index.content_hash).SerializeToString()),
        )

    def options(self, msg: pb.AnnotateOptions | None) -> ExtractOptions:
        """Request options merged over the defaults and checked; memoised by wire bytes.

        A list over ``max_option_items`` names is refused before anything is built from it
        (and is not remembered): its cost in memory and time grows with its length.
        """
        if msg is None:
            return self.defaults
        limit = self.max_option_items
        lists = (msg.semantic_types, msg.semantic_groups, msg.sources, msg.exclude_cuis)
        for name, names in zip(_OPTION_LISTS, lists, strict=True):
            n = len(names.values)
            if n > limit:
                raise InputTooLargeError(
                    f"options.{name} has {n} names, over this server's limit of {limit} "
                    "(max_option_items); send a shorter list — for a large set of unwanted "
                    "concepts, build the index without them or drop them from the results on "
                    "the client"
                )
        raw = msg.SerializeToString(deterministic=True)
        if not raw:
            return self.defaults
        hit = self.options_memo.get(raw)
        if hit is None:
            try:
                hit = wire.options_from_pb(msg, self.defaults)
                self.extractor.check_options(hit)
                # (excluded CUIs the index lacks exclude nothing: one plan, one cache key)
                hit = self.extractor.plan_options(hit)
            except Exception as exc:  # remembered, so a bad option costs one check
                hit = exc
            self.options_memo.put(raw, hit)
        if isinstance(hit, Exception):
            raise hit
        return hit


def _options_entry_weight(raw: bytes, value: ExtractOptions | Exception) -> int:
    """Approximate bytes of one options memo entry: its key plus what it holds."""
    return len(raw) + (
        _ERROR_WEIGHT if isinstance(value, Exception) else options_weight(value)
    )


@dataclass(frozen=True)
class ReloadOutcome:
    previous_content_hash: str
    content_hash: str
    changed: bool
    concepts: int
    load_seconds: float


class ServiceState:
    """The current index, readiness and draining, shared by all servicers of one server."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        health_servicer: health.HealthServicer,
        index_path: Callable[[], Path],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health_servicer
        self._index_path = index_path
        self._current: LoadedIndex | None = None
        self._reload_lock = threading.Lock()
        self.draining = False
        # RPCs in a handler now (the drain waits for them while the server still answers)
        self._calls = 0
        self._last_call = 0.0  # time.monotonic() when the last RPC entered a handler
        self._idle = threading.Condition(threading.Lock())
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def current(self) -> LoadedIndex | None:
        return self._current

    def index_path(self) -> Path:
        """The index directory a reload reads (the demo dictionary's when none is set)."""
        return self._index_path()

    def require(self) -> LoadedIndex:
        """The index to serve this request with, or the status that says why there is none."""
        if self.draining:
            raise draining()
        current = self._current
        if current is None:
            raise not_ready()
        return current

    def _set_health(self, status: Any) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def install(self, extractor: Extractor) -> ReloadOutcome:
        """Serve ``extractor`` from now on (the swap is one reference assignment)."""
        defaults = self.settings.defaults.to_extract_options()
        loaded = LoadedIndex.build(
            extractor, defaults, max_option_items=self.settings.max_option_items
        )
        previous = self._current
        self._current = loaded
        self.metrics.index_loaded(loaded.concepts, loaded.keys)
        if not self.draining:
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return ReloadOutcome(
            previous.content_hash if previous else "",
            loaded.content_hash,
            previous is None or previous.content_hash != loaded.content_hash,
            loaded.concepts,
            0.0,
        )

    def reload(self) -> ReloadOutcome:
        """Load the configured index and swap it in; the old one keeps serving on failure.

        Reloads are serialised. When the manifest on disk names the index already being
        served, nothing is loaded (``changed`` is False), but its files are checked against
        their hashes: a reload is how an operator checks a deployment, and files changed in
        place (the served index maps them) must not pass for "nothing to do".
        """
        from conceptsvc.extractor import Extractor
        from conceptsvc.index import ConceptIndex

        with self._reload_lock:
            t0 = time.perf_counter()
            path = self._index_path()
            current = self._current
            try:
                if current is not None and _manifest_hash(path) == current.content_hash:
                    ConceptIndex.check_files(path)
                    log.info(
                        "reload: %s still holds the loaded index (content hash %s); nothing "
                        "to do", path, current.content_hash,
                    )
                    return ReloadOutcome(
                        current.content_hash, current.content_hash, False,
                        current.concepts, time.perf_counter() - t0,
                    )
                index = ConceptIndex.load(path, verify=True)
                defaults = self.settings.defaults.to_extract_options()
                outcome = self.install(Extractor(index, default_options=defaults))
            except Exception:
                self.metrics.index_load_failed()
                raise
            seconds = time.perf_counter() - t0
            # The whole hash, as `conceptsvc index info` and annotate's manifest show it.
            if outcome.previous_content_hash:
                log.info(
                    "reloaded index %s: content hash %s -> %s (%d concepts) in %.2fs",
                    path, outcome.previous_content_hash, outcome.content_hash,
                    outcome.concepts, seconds,
                )
            else:
                log.info(
                    "loaded index %s: content hash %s (%d concepts) in %.2fs",
                    path, outcome.content_hash, outcome.concepts, seconds,
                )
            return ReloadOutcome(
                outcome.previous_content_hash, outcome.content_hash, outcome.changed,
                outcome.concepts, seconds,
            )

    def start_draining(self, refuse: bool = True) -> None:
        """Health NOT_SERVING (for good); with ``refuse``, new RPCs are refused from now on
        (without: they are still answered, during the drain delay)."""
        self.health.enter_graceful_shutdown()
        if refuse:
            self.draining = True
            with self._idle:  # the drain's quiet period counts from the first refusal
                self._last_call = max(self._last_call, time.monotonic())

    def call_started(self) -> None:
        """An RPC entered its handler (counted here for the drain, and in the metrics)."""
        with self._idle:
            self._calls += 1
            self._last_call = time.monotonic()
        self.metrics.inflight.inc()

    def call_ended(self) -> None:
        self.metrics.inflight.dec()
        with self._idle:
            self._calls -= 1
            if self._calls == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float, quiet: float = 0.0) -> bool:
        """Wait until no RPC is in a handler and none has entered one for ``quiet`` seconds,
        at most ``timeout`` seconds; whether that came."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._idle:
            while True:
                now = time.monotonic()
                if self._calls == 0 and now - self._last_call >= quiet:
                    return True
                if now >= deadline:
                    return False
                if self._calls:
                    self._idle.wait(deadline - now)
                else:  # idle, not yet for long enough
                    self._idle.wait(min(deadline, self._last_call + quiet) - now)


def _manifest_hash(path: Path) -> str | None:
    """The content hash an index directory's manifest claims (None if unreadable: the full
    load then reports the problem properly)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = manifest.get("content_hash") if isinstance(manifest, dict) else None
    return value if isinstance(value, str) else None


def _readable(blob: bytes, key: str) -> bool:
    """Whether a cache entry parses as an answer. Entries go into the reply as they are, so a
    damaged one would break every item of it; checking is a parse in C, far cheaper than the
    engine — and such an entry is then a miss, as the cache's rules say.

    A parse says nothing of where an entry came from (any bytes of the right shape parse, an
    empty value too): what Redis returns has already passed the Redis tier's signature check
    (``cache_secret``, see :mod:`conceptsvc.cache`), so a forged entry never reaches here, nor
    the in-process tier."""
    try:
        pb.AnnotateResponse.FromString(blob)
    except DecodeError:
        log.warning("ignoring an undecodable cache entry %s", key)
        return False
    return True


def _item_options(
    loaded: LoadedIndex,
    req: pb.AnnotateRequest,
    req_id: str,
    text: str,
    fallback: ExtractOptions | Exception,
    max_chars: int,
    require_id: bool,
) -> ExtractOptions:
    """The options one item is annotated with (its own, or ``fallback``: the call's shared
    options or the defaults), after the checks every item passes; raises what it fails."""
    if require_id and not req_id:
        raise invalid_argument(
            "every AnnotateStream and AnnotateBatch item needs a non-empty id "
            "(responses are matched to requests by id)"
        )
    size = len(text)
    if size > max_chars:
        raise InputTooLargeError(
            f"text of {size} characters is over the limit of {max_chars} "
            "(max_text_chars); split the text or raise the server's limit"
        )
    opts = loaded.options(req.options) if req.HasField("options") else fallback
    if isinstance(opts, Exception):
        raise opts
    return opts


def _uniform(
    requests: Sequence[pb.AnnotateRequest],
    ids: list[str],
    texts: list[str],
    max_chars: int,
    require_id: bool,
) -> bool:
    """Whether every item passes :func:`_item_options` with the call's options: no item sets
    options of its own, every id is there (if required) and every text is within
    ``max_chars`` — the usual batch, whose items then need no check one by one."""
    return (
        (not require_id or all(ids))
        and (not texts or max(map(len, texts)) <= max_chars)
        and not any(map(_HAS_FIELD, requests, repeat("options", len(requests))))
    )


def _reply_too_large(size: int, max_bytes: int) -> InputTooLargeError:
    return InputTooLargeError(
        f"the annotation of this caption is {size} bytes, over the server's message limit of "
        f"{max_bytes} (max_message_bytes); split the caption, leave out the mentions "
        "(include_mentions=false) or raise the limit"
    )


def _gone(context: grpc.ServicerContext) -> RpcFailure | None:
    """Why the call ended under its handler — the client cancelled it (CANCELLED) or its
    deadline passed (DEADLINE_EXCEEDED) — or None while it is active."""
    if context.is_active():
        return None
    remaining = context.time_remaining()
    return client_gone(remaining is not None and remaining <= 0)


def _check_deadline(context: grpc.ServicerContext) -> None:
    gone = _gone(context)
    if gone is not None:
        raise gone
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise deadline_exceeded()


class _Observed:
    """Metrics and status mapping around one RPC (the only place errors become statuses)."""

    def __init__(self, state: ServiceState, method: str) -> None:
        self.state = state
        self.method = method

    def unary(self, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        metrics = self.state.metrics
        t0 = time.perf_counter()
        # The status's name as a constant: StatusCode.OK.name is an enum property lookup
        # (≈ 3.5k instructions under callgrind, a tenth of the metrics' cost a call).
        code_name = "OK"
        state = self.state
        state.call_started()
        try:
            reply = fn()
            gone = _gone(context)  # answered for nobody: recorded as what ended the call
            if gone is not None:
                code_name = gone.code.name
            return reply
        except Exception as exc:
            code, message = self._failure(exc)
            code_name = code.name
            context.abort(code, message)
        finally:
            state.call_ended()
            metrics.observe_rpc(self.method, code_name, time.perf_counter() - t0)

    def stream(self, context: grpc.ServicerContext, gen: Iterator[Any]) -> Iterator[Any]:
        metrics = self.state.metrics
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        state = self.state
        state.call_started()
        try:
            yield from gen
            gone = _gone(context)  # the handler stopped because its client went away
            if gone is not None:
                code = gone.code
        except GeneratorExit:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = self._failure(exc)
            context.abort(code, message)
        finally:
            gen_close = getattr(gen, "close", None)
            if gen_close is not None:
                gen_close()
            state.call_ended()
            metrics.observe_rpc(self.method, code.name, time.perf_counter() - t0)

    def _failure(self, exc: Exception) -> tuple[grpc.StatusCode, str]:
        code, message, _ = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed", self.method, exc_info=exc)
        return code, message


class ConceptServicer(pb_grpc.ConceptServiceServicer):
    """``conceptsvc.v1.ConceptService``."""

    def __init__(self, state: ServiceState, cache: ResultCache | None) -> None:
        self.state = state
        self.settings = state.settings
        self.metrics = state.metrics
        self.cache = cache
        self._sn = load_semantic_network()
        self._catalog = wire.catalog_to_pb(self._sn)
        self._observed = {
            name: _Observed(state, name)
            for name in pb.DESCRIPTOR.services_by_name["ConceptService"].methods_by_name
        }
        self._writer = wire.annotation_writer()
        self._joiner = wire.item_joiner()
        self._full_blob = self._error_blob(
            ReplyFullError(
                "this item's answer did not fit in the reply beside the items before it "
                f"(max_message_bytes {self.settings.max_message_bytes}); send it again in a "
                "smaller batch"
            ),
            "", "AnnotateBatch", count=False,
        )

    # -- annotation ------------------------------------------------------------------------------
    def _answer(
        self,
        loaded: LoadedIndex,
        requests: Sequence[pb.AnnotateRequest],
        shared: pb.AnnotateOptions | None,
        *,
        require_id: bool,
        context: grpc.ServicerContext | None = None,
        ended: threading.Event | None = None,
        whole_reply: bool = False,
    ) -> tuple[list[bytes | Exception], bytearray, list[str]]:
        """Answer a batch: per item, its result as wire bytes (AnnotateResponse fields without
        id, cached flag and index hash — what the cache holds) or the exception it failed with,
        whether it came from the cache, and its id. Cache lookups and writes are one batched
        call each.

        ``shared`` are the options of items that set none (AnnotateBatch's). ``ended`` is set
        when the call ends under the handler (``context.add_callback``): the client cancelled
        it or its deadline passed. It is looked at before each item is annotated, and once it
        is set no item is started: the answers made so far are cached and the call fails with
        the status that ended it (from ``context``), so the metrics record that, not OK.
        With ``whole_reply`` (AnnotateBatch's: one reply for all) and a ``context``, the batch
        is refused by :meth:`_check_room` as soon as its ids are read when its reply could not
        hold a refusal of every item, and items not yet started when the deadline is closer
        than a tenth of the call's time (at least ``_DEADLINE_MARGIN``) fail with
        DEADLINE_EXCEEDED, so that the answers made so far reach the client.

        Each request field is read once (protobuf makes a new string at every read), the
        deadline is turned into a point on the monotonic clock once, and cache keys are only
        made when there is a cache: per caption, this loop is all the servicer adds to the
        engine and the writer.
        """
        stop_at: float | None = None
        if context is not None and whole_reply:
            remaining = context.time_remaining()
            if remaining is not None:
                stop_at = time.monotonic() + remaining - max(_DEADLINE_MARGIN, 0.1 * remaining)
        n = len(requests)
        out: list[bytes | Exception | None] = [None] * n
        cached = bytearray(n)
        # One Python object per item, kept: protobuf makes a new one at each read of a
        # repeated field's element (and every pass below would make one per item again).
        requests = list(requests)
        ids = [req.id for req in requests]
        if whole_reply:
            self._check_room(loaded, ids)
        texts = [req.text for req in requests]
        limit = self.settings.max_text_chars
        batch_opts: ExtractOptions | Exception = loaded.defaults
        if shared is not None:
            try:
                batch_opts = loaded.options(shared)
            except Exception as exc:
                batch_opts = exc
        # Items grouped by their options, so that the key prefix is hashed once per group.
        groups: dict[int, tuple[ExtractOptions, list[int]]] = {}
        log_payloads = self.settings.log_payloads
        checked: Sequence[pb.AnnotateRequest] = requests
        if (
            not log_payloads
            and not isinstance(batch_opts, Exception)
            and _uniform(requests, ids, texts, limit, require_id)
        ):
            # What the loop below would find for every item, checked in C loops (the loop's
            # call and checks cost ≈ 1 µs a caption).
            groups[id(batch_opts)] = (batch_opts, list(range(n)))
            checked = ()
        for i, req in enumerate(checked):
            try:
                opts = _item_options(loaded, req, ids[i], texts[i], batch_opts, limit, require_id)
            except Exception as exc:
                out[i] = exc
                continue
            if log_payloads:
                log.debug("annotate id=%r text=%r", ids[i], texts[i])
            group = groups.get(id(opts))
            if group is None:
                groups[id(opts)] = group = (opts, [])
            group[1].append(i)
        cache = self.cache
        todo: list[int] = []
        todo_opts: list[ExtractOptions] = []
        keys: list[str] = []
        for opts, members in groups.values():
            todo += members
            todo_opts += [opts] * len(members)
            if cache is not None:
                keys += result_keys(
                    loaded.content_hash, opts.cache_key(), [texts[i] for i in members]
                )
        blobs: list[bytes | None] = cache.get_many(keys) if keys and cache is not None else []
        if blobs.count(None) == len(blobs):
            blobs = []  # all missed (a cold batch): no item needs the hit check below
        puts: list[tuple[str, bytes]] = []
        n_cached = n_fresh = 0
        extract = loaded.extractor.extract_rows
        encode = self._writer.encode_rows
        monotonic = time.monotonic
        max_bytes = self.settings.max_message_bytes
        is_ended = (ended or _NEVER).is_set
        gone = False
        for k, i in enumerate(todo):
            if blobs:
                blob = blobs[k]
                if blob is not None and _readable(blob, keys[k]):
                    out[i] = blob
                    cached[i] = 1
                    n_cached += 1
                    continue
            if is_ended():
                gone = True  # nobody to answer: the items left are not started
                break
            if stop_at is not None and monotonic() > stop_at:
                late = deadline_exceeded(
                    "the batch's deadline came close before this item was started; the items "
                    "before it are answered — send it again"
                )
                for j in todo[k:]:
                    if out[j] is None:
                        out[j] = late
                break
            try:
                blob = encode(extract(texts[i], todo_opts[k]))
            except Exception as exc:
                out[i] = exc
                continue
            n_fresh += 1
            out[i] = blob
            if keys and len(blob) <= max_bytes:
                puts.append((keys[k], blob))
        if puts and cache is not None:
            cache.put_many(puts)
        self.metrics.captions_annotated(n_fresh, n_cached)
        if gone:
            raise (_gone(context) if context is not None else None) or client_gone(False)
        answers = [r if r is not None else RuntimeError("unanswered item") for r in out]
        return answers, cached, ids

    def _answer_one(self, loaded: LoadedIndex, request: pb.AnnotateRequest) -> tuple[bytes, bool]:
        """:meth:`_answer` for the one caption of a unary ``Annotate``: its answer's bytes and
        whether they came from the cache; raises what the item failed with. The same checks,
        cache entries and metrics, without the batch's lists, groups and deadline bookkeeping,
        which a unary call would pay for in full (it is on every call's critical path)."""
        req_id, text = request.id, request.text
        settings = self.settings
        opts = _item_options(
            loaded, request, req_id, text, loaded.defaults, settings.max_text_chars, False
        )
        if settings.log_payloads:
            log.debug("annotate id=%r text=%r", req_id, text)
        cache = self.cache
        key = None
        if cache is not None:
            key = result_keys(loaded.content_hash, opts.cache_key(), [text])[0]
            blob = cache.get_many([key])[0]
            if blob is not None and _readable(blob, key):
                self.metrics.captions_annotated(0, 1)
                return blob, True
        blob = self._writer.encode_rows(loaded.extractor.extract_rows(text, opts))
        if cache is not None and key is not None and len(blob) <= settings.max_message_bytes:
            cache.put_many([(key, blob)])
        self.metrics.captions_annotated(1, 0)
        return blob, False

    def _error_blob(
        self, exc: Exception, req_id: str, method: str, *, count: bool = True
    ) -> bytes:
        """A failed item's status as AnnotateResponse bytes (without id and index hash)."""
        code, message, error_code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s item %r failed", method, req_id, exc_info=exc)
        if count:
            self.metrics.item_error(code.name)
        status = pb.ItemStatus(code=code.value[0], message=message, error_code=error_code)
        return bytes(pb.AnnotateResponse(status=status).SerializeToString())

    def _replies(
        self,
        loaded: LoadedIndex,
        ids: list[str],
        answers: list[bytes | Exception],
        cached: bytearray,
        method: str,
    ) -> list[bytes]:
        """Every item's bytes for the reply (failures as statuses); an answer over the message
        limit on its own fails its item (gRPC would fail the whole call: every other item)."""
        max_bytes = self.settings.max_message_bytes
        tail_size = len(loaded.tail) + 16
        if answers and not any(map(isinstance, answers, repeat(Exception, len(answers)))):
            plain = cast(list[bytes], answers)
            if max(map(len, plain)) + tail_size + 4 * max(map(len, ids)) <= max_bytes:
                # The usual batch: no failure, and even its largest answer beside its longest
                # id is under the limit (so is every item): the loop below would keep them all.
                return list(plain)
        blobs: list[bytes] = []
        for i, answer in enumerate(answers):
            if not isinstance(answer, Exception):
                size = len(answer) + tail_size + 4 * len(ids[i])
                if size <= max_bytes:
                    blobs.append(answer)
                    continue
                answer = _reply_too_large(len(answer), max_bytes)
                cached[i] = 0
            blobs.append(self._error_blob(answer, ids[i], method))
        return blobs

    def _check_room(self, loaded: LoadedIndex, ids: list[str]) -> None:
        """Refuse an AnnotateBatch whose reply could not hold a refusal (E503) of every item:
        the least reply :meth:`_fit` may have to send. It depends on the ids alone, so it is
        checked before any item is annotated — found after all of them were, the work was
        thrown away (a 4 MB batch of one-letter captions held 380 MiB for 2.6 s, then failed)."""
        max_bytes = self.settings.max_message_bytes
        per_item = len(self._full_blob) + len(loaded.tail) + _ITEM_FRAMING
        least = per_item * len(ids)
        if least + 4 * sum(map(len, ids)) <= max_bytes:  # 4 bytes a code point bound UTF-8
            return
        if least + len("".join(ids).encode()) <= max_bytes:
            return
        raise too_large(
            f"the answers of this batch of {len(ids)} items cannot fit one reply of at most "
            f"{max_bytes} bytes (max_message_bytes), not even as refusals; "
            f"{wire.BATCH_SPLIT_HINT}"
        )

    def _fit(
        self,
        loaded: LoadedIndex,
        blobs: list[bytes],
        ids: list[str],
        cached: bytearray,
    ) -> None:
        """Keep an AnnotateBatch reply under the message limit: from the first item that does
        not fit beside the ones before it (with room for the refusals after it), every item
        fails with E503 — the client sends those again in a smaller batch. Never truncated:
        the refusals of every item fit, :meth:`_check_room` refused the batch otherwise (so
        the first item that does not fit always has room for its refusal and the rest)."""
        max_bytes = self.settings.max_message_bytes
        per_item = len(loaded.tail) + _ITEM_FRAMING
        total = sum(map(len, blobs)) + 4 * sum(map(len, ids)) + per_item * len(blobs)
        if total <= max_bytes:
            return
        full = self._full_blob
        id_bytes = [len(r.encode()) for r in ids]  # as _check_room counts them
        refusals = [len(full) + b + per_item for b in id_bytes]
        rest = sum(refusals)
        used = 0
        for i, blob in enumerate(blobs):
            rest -= refusals[i]
            size = len(blob) + id_bytes[i] + per_item
            if used + size + rest > max_bytes:
                for j in range(i, len(blobs)):
                    blobs[j] = full
                    cached[j] = 0
                    self.metrics.item_error(grpc.StatusCode.RESOURCE_EXHAUSTED.name)
                return
            used += size

    def Annotate(self, request: pb.AnnotateRequest, context: grpc.ServicerContext) -> Any:
        def run() -> bytes:
            loaded = self.state.require()
            _check_deadline(context)
            answer, cached = self._answer_one(loaded, request)
            if len(answer) + len(loaded.tail) + 16 + 4 * len(request.id) > (
                self.settings.max_message_bytes
            ):
                raise _reply_too_large(len(answer), self.settings.max_message_bytes)
            return wire.response_bytes(answer, request.id, cached, loaded.tail)

        return self._observed["Annotate"].unary(context, run)

    def AnnotateBatch(
        self, request: pb.AnnotateBatchRequest, context: grpc.ServicerContext
    ) -> Any:
        def run() -> bytes:
            loaded = self.state.require()
            _check_deadline(context)
            items = request.items
            n, limit = len(items), self.settings.max_batch_items
            if n > limit:
                raise too_large(
                    f"this batch has {n} items, over this server's limit of {limit} "
                    f"(max_batch_items); {wire.BATCH_SPLIT_HINT}"
                )
            shared = request.options if request.HasField("options") else None
            ended = threading.Event()
            if not context.add_callback(ended.set):
                ended.set()  # already over
            answers, cached, ids = self._answer(
                loaded, items, shared, require_id=True, context=context, ended=ended,
                whole_reply=True,
            )
            blobs = self._replies(loaded, ids, answers, cached, "AnnotateBatch")
            self._fit(loaded, blobs, ids, cached)
            return self._joiner.join(blobs, ids, cached, loaded.tail)

        return self._observed["AnnotateBatch"].unary(context, run)

    def AnnotateStream(
        self, request_iterator: Iterator[pb.AnnotateRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        return self._observed["AnnotateStream"].stream(
            context, self._annotate_stream(request_iterator, context)
        )

    def _annotate_stream(
        self, request_iterator: Iterator[pb.AnnotateRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        loaded = self.state.require()  # the whole stream stays on this index
        batch_size = self.settings.stream_batch_size
        idle_seconds = self.settings.stream_idle_seconds
        q: queue.Queue[Any] = queue.Queue(maxsize=2 * batch_size)
        stop = threading.Event()
        context.add_callback(stop.set)
        reader = threading.Thread(
            target=_pump, args=(request_iterator, q, stop), name="stream-reader", daemon=True
        )
        reader.start()
        try:
            ended = False
            while not ended:
                first = _next_item(q, stop, context, self.state, idle_seconds)
                if first is _END:
                    # A request stream cut off by the deadline is not a clean end: ending the
                    # handler normally here would let the call finish OK, racing the
                    # client's own deadline timer.
                    remaining = context.time_remaining()
                    if remaining is not None and remaining <= 0:
                        raise deadline_exceeded()
                    return
                if isinstance(first, BaseException):
                    if not context.is_active():
                        return  # the client went away (cancel, deadline): nobody to answer
                    raise first
                batch: list[pb.AnnotateRequest] = [first]
                while len(batch) < batch_size:
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        break
                    if item is _END:
                        ended = True
                        break
                    if isinstance(item, BaseException):
                        if not context.is_active():
                            return
                        raise item
                    batch.append(item)
                _check_deadline(context)
                answers, cached, ids = self._answer(
                    loaded, batch, None, require_id=True, context=context, ended=stop
                )
                blobs = self._replies(loaded, ids, answers, cached, "AnnotateStream")
                for blob, rid, hit in zip(blobs, ids, cached, strict=True):
                    yield wire.response_bytes(blob, rid, hit, loaded.tail)
                if self.state.draining and not ended:
                    raise draining()
        finally:
            stop.set()

    # -- lookups -----------------------------------------------------------------------------------
    def GetConcept(self, request: pb.GetConceptRequest, context: grpc.ServicerContext) -> Any:
        def run() -> pb.Concept:
            loaded = self.state.require()
            cui = request.cui.strip()
            if not cui:
                raise invalid_argument("cui is required, e.g. C0032326")
            index = loaded.extractor.index
            info = index.concept(cui)
            if info is None:
                raise not_found(
                    f"concept {cui} is not in the loaded index ({loaded.content_hash[:12]}); "
                    "SearchConcepts finds concepts by name"
                )
            synonyms = index.concept_postings(cui) if request.include_synonyms else None
            return wire.concept_to_pb(info, self._sn, synonyms)

        return self._observed["GetConcept"].unary(context, run)

    def SearchConcepts(
        self, request: pb.SearchConceptsRequest, context: grpc.ServicerContext
    ) -> Any:
        def run() -> pb.SearchConceptsResponse:
            loaded = self.state.require()
            query = request.query
            if not query.strip():
                raise invalid_argument("query is required")
            if len(query) > self.settings.max_text_chars:
                raise too_large(
                    f"query of {len(query)} characters is over max_text_chars "
                    f"({self.settings.max_text_chars})"
                )
            limit = request.limit or 10
            if limit > self.settings.max_search_limit:
                raise invalid_argument(
                    f"limit {limit} is over this server's max_search_limit "
                    f"({self.settings.max_search_limit})"
                )
            opts = loaded.options(request.options if request.HasField("options") else None)
            _check_deadline(context)
            cands = loaded.extractor.search(query, limit=limit, options=opts)
            return wire.candidates_to_pb(cands, self._sn)

        return self._observed["SearchConcepts"].unary(context, run)

    def ListSemanticTypes(
        self, request: pb.ListSemanticTypesRequest, context: grpc.ServicerContext
    ) -> Any:
        def run() -> pb.ListSemanticTypesResponse:
            if self.state.draining:
                raise draining()
            return self._catalog

        return self._observed["ListSemanticTypes"].unary(context, run)

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> Any:
        def run() -> pb.GetInfoResponse:
            loaded = self.state.require()
            s = self.settings
            return pb.GetInfoResponse(
                service_version=__version__,
                api_version="v1",
                index=loaded.index_info,
                default_options=wire.options_to_pb(loaded.defaults),
                limits=pb.Limits(
                    max_text_chars=s.max_text_chars,
                    max_message_bytes=s.max_message_bytes,
                    max_search_limit=s.max_search_limit,
                    max_concurrent_rpcs=s.rpc_limit,
                    max_option_items=s.max_option_items,
                    max_batch_items=s.max_batch_items,
                ),
                profiles=loaded.profiles,
            )

        return self._observed["GetInfo"].unary(context, run)


def _pump(request_iterator: Iterator[Any], q: queue.Queue[Any], stop: threading.Event) -> None:
    """Reader thread: move incoming stream items into ``q`` until the stream or the RPC ends."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in request_iterator:
            if not put(item):
                return
    except Exception as exc:  # the RPC failed or was cancelled while reading
        if not stop.is_set():
            put(exc)
        return
    put(_END)


def _next_item(
    q: queue.Queue[Any],
    stop: threading.Event,
    context: grpc.ServicerContext,
    state: ServiceState,
    idle_seconds: float,
) -> Any:
    """Block for the next item, waking up to notice a cancelled call, a passed deadline, a
    drain (an idle stream must not hold up shutdown: nothing of it is unanswered) or a stream
    idle for ``idle_seconds`` (0 = never). The handler only waits here once every item received
    has been answered, so this wait is exactly the time with nothing in flight."""
    idle_until = time.monotonic() + idle_seconds if idle_seconds else None
    while True:
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            if stop.is_set() or not context.is_active():
                return _END
            _check_deadline(context)
            if state.draining:
                raise draining() from None
            if idle_until is not None and time.monotonic() >= idle_until:
                raise stream_idle(idle_seconds) from None


def add_concept_service(servicer: ConceptServicer, server: grpc.Server) -> None:
    """Register ``servicer`` as ``conceptsvc.v1.ConceptService`` on ``server``.

    The generated ``add_ConceptServiceServicer_to_server``, except that the annotation methods
    return their replies as wire bytes (no serialiser): the servicer writes them from the
    engine's dataclasses and the cache's bytes without building messages. Clients see the
    same messages.
    """
    service = pb.DESCRIPTOR.services_by_name["ConceptService"]
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        factory = factories[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=request_cls.FromString,
            response_serializer=(
                None if method.name in _BYTES_REPLIES else response_cls.SerializeToString
            ),
        )
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(service.full_name, handlers)


class AdminServicer(pb_grpc.AdminServiceServicer):
    """``conceptsvc.v1.AdminService`` (the interceptor has already checked the admin token)."""

    def __init__(self, state: ServiceState, reload: Callable[[], ReloadOutcome]) -> None:
        self.state = state
        self._reload = reload
        self._observed = _Observed(state, "ReloadIndex")

    def ReloadIndex(
        self, request: pb.ReloadIndexRequest, context: grpc.ServicerContext
    ) -> Any:
        def run() -> pb.ReloadIndexResponse:
            if self.state.draining:
                raise draining()
            o = self._reload()
            return pb.ReloadIndexResponse(
                previous_content_hash=o.previous_content_hash,
                content_hash=o.content_hash,
                changed=o.changed,
                concepts=o.concepts,
                load_seconds=o.load_seconds,
            )

        return self._observed.unary(context, run)

