"""Result caches: a bounded in-process LRU in front of an optional shared Redis tier.

Why two tiers: the LRU answers repeated captions within one worker in microseconds; Redis shares
results between workers, replicas and restarts. Captions repeat a lot in practice (templated
findings), so both pay.

Correctness rules:

- Keys are derived from the index ``content_hash``, the canonical options text
  (``ExtractOptions.cache_key()``) and the caption, so a new dictionary or different options can
  never be served a stale result (:func:`result_key`).
- Values are opaque ``bytes`` produced by the caller (the servicer stores serialised protobuf
  messages). Nothing here deserialises objects; there is no pickle anywhere.
- Redis is not trusted with the answers. Keys are made of values any client knows (the index
  content hash is in every reply), so whoever could write to the Redis could otherwise store
  an answer of their choosing under the key of a caption, and every replica would serve it
  (and copy it into its in-process tier). The Redis tier therefore takes a secret
  (``cache_secret``, which the settings require with a Redis URL): an entry's name is a keyed
  digest of its key (the key's readable head, up to its last colon, kept in front), and its
  value is signed — a keyed digest of that digest and the bytes, stored before them. An entry
  whose signature does not check (forged, blanked, cut, damaged) is a miss: counted through
  the observer (``redis_rejected``), logged at most once per :data:`REJECTED_LOG_SECONDS`, and
  overwritten by the fresh answer; it never reaches the in-process tier. Entries written with
  another secret or an older :data:`CACHE_FORMAT` have other names, so they are never read
  (they age out by their TTL). Values are signed, not encrypted: mention text in them stays
  readable to whoever can read the Redis, which is why it needs a password and a network of
  its own (``deploy/``).
- Both digests are BLAKE2b in its keyed mode, a MAC by design (RFC 7693) where HMAC builds one
  from a plain hash, and in CPython a third of ``hmac``'s time a name. What signing costs the
  tier in the client's CPU (512-key batches of 490-byte values, one process): a lookup
  ≈ 0.7 µs more a key, a hit ≈ 1.8 µs more, a write ≈ 1.6 µs more (from 0.2, 0.35 and 0.5).
- The cache never fails a request. A Redis that is down, slow (socket timeout) or flushed is a
  miss: one warning per outage is logged, every error is counted through the observer, and the
  tier is retried with exponential backoff until it answers again.
- Batch operations (:meth:`get_many` / :meth:`put_many`) are one ``MGET`` / one script call,
  so a batch of N captions costs two Redis round trips, not 2N. The write is a short Lua script
  (``SET key value EX ttl`` for every pair, one ``EVALSHA``): a pipeline of N ``SET`` s costs
  redis-py about 5 µs a key to build, as much as a third of the engine's time for a caption;
  one command of 2N arguments costs under 1 µs a key. A Redis that refuses scripts (some
  managed services do) gets the pipeline instead, from then on. The tier expects one Redis
  (or a proxy that keeps a script's keys together), not a Redis Cluster.
- Those commands are packed by the compiled ``conceptsvc._wire.RespPacker`` (redis-py's
  ``command_packer``) when it is built: hiredis grows its buffer argument by argument, with a
  ``sprintf`` for each length, and on a cold batch that cost the server ≈ 1–2 µs a caption
  (its ``malloc``/``realloc``/``memmove`` as much as the ``sprintf``); the compiled packer
  sizes the command first and writes it once. Commands with arguments it does not take go to
  redis-py's own packer.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from conceptsvc.config import Settings

__all__ = [
    "CACHE_FORMAT",
    "REJECTED_LOG_SECONDS",
    "CacheObserver",
    "LruCache",
    "NullObserver",
    "RedisCache",
    "ResultCache",
    "TieredCache",
    "build_cache",
    "command_packer",
    "result_key",
    "result_keys",
]

log = logging.getLogger(__name__)

# Bump when the bytes stored under a key change meaning, so old entries are never read.
# v2: Redis entries are named by a keyed digest and signed (see the module docstring).
CACHE_FORMAT = "v2"

#: Redis entries refused for their signature are logged at most once per this many seconds
#: (with how many were refused meanwhile): a Redis full of forged entries must not flood the log.
REJECTED_LOG_SECONDS = 10.0

_DIGEST_BYTES = 20  # of an entry name's keyed digest (160 bits, written as 40 hex digits)
_TAG_BYTES = 32  # of a value's signature, stored in front of it in Redis


def result_key(content_hash: str, options_key: str, text: str) -> str:
    """The cache key of one (index, options, caption) triple.

    A short prefix of the content hash stays readable (operators can see which index a key
    belongs to); the full hash, the options and the text go into the digest.
    """
    h = hashlib.sha256()
    for part in (content_hash, options_key, text):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return f"{CACHE_FORMAT}:{content_hash[:16]}:{h.hexdigest()[:40]}"


def result_keys(content_hash: str, options_key: str, texts: Sequence[str]) -> list[str]:
    """:func:`result_key` of many captions with the same index and options: the digest of
    the shared prefix is taken once and copied for each caption (the same keys, less work)."""
    base = hashlib.sha256()
    for part in (content_hash, options_key):
        base.update(part.encode("utf-8", "surrogatepass"))
        base.update(b"\0")
    prefix = f"{CACHE_FORMAT}:{content_hash[:16]}:"
    out = []
    for text in texts:
        h = base.copy()
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
        out.append(prefix + h.hexdigest()[:40])
    return out


_SET_ALL = """
local ttl = ARGV[#ARGV]
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i], 'EX', ttl)
end
return #KEYS
"""


class CacheObserver(Protocol):
    """Receives cache events (the service's metrics implement this)."""

    def cache_lookups(self, tier: str, hits: int, misses: int) -> None: ...
    def redis_error(self) -> None: ...
    def redis_rejected(self, entries: int) -> None: ...


class NullObserver:
    """Observer for callers that do not export metrics (library use, the CLI)."""

    def cache_lookups(self, tier: str, hits: int, misses: int) -> None:
        pass

    def redis_error(self) -> None:
        pass

    def redis_rejected(self, entries: int) -> None:
        pass


class ResultCache(Protocol):
    """What the servicer needs from a cache: batched, bytes in and bytes out, never raising."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...
    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None: ...


class LruCache:
    """Thread-safe LRU bounded by entry count and by total value bytes."""

    tier = "memory"

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("LruCache needs max_entries >= 1 and max_bytes >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        data = self._data
        with self._lock:
            out = list(map(data.get, keys))
            if out.count(None) < len(out):  # a cold batch has no hit to move
                move = data.move_to_end
                for k, v in zip(keys, out, strict=True):
                    if v is not None:
                        move(k)
        return out

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        with self._lock:
            for k, v in items:
                if len(v) > self.max_bytes:
                    continue  # a single huge value would evict everything; not worth it
                old = self._data.pop(k, None)
                if old is not None:
                    self._bytes -= len(old)
                self._data[k] = v
                self._bytes += len(v)
            while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


def command_packer() -> Any | None:
    """The compiled RESP packer, with redis-py's pure-Python packer behind it for arguments
    other than bytes, str and int; None when the extension is not built (redis-py packs)."""
    try:
        from redis._parsers.encoders import Encoder
        from redis.connection import PythonRespSerializer

        from conceptsvc._wire import RespPacker
    except ImportError:
        return None
    # redis-py's defaults: UTF-8, strict errors, bytes back; 6000 is its buffer cutoff.
    encoder = Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]
    return RespPacker(PythonRespSerializer(6000, encoder.encode))


class RedisCache:
    """The shared tier. Every failure becomes a miss; see the module docstring for the rules.

    ``secret`` names and signs the entries: replicas share entries only when they have the
    same one.
    """

    tier = "redis"

    def __init__(
        self,
        url: str,
        *,
        secret: str | bytes,
        prefix: str = "conceptsvc:",
        ttl_seconds: int = 7 * 86400,
        timeout_seconds: float = 0.25,
        backoff_seconds: float = 0.5,
        backoff_max_seconds: float = 30.0,
        observer: CacheObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if not raw:
            raise ValueError("RedisCache needs a non-empty secret (settings: cache_secret)")
        # BLAKE2b takes keys of up to 64 bytes: the secret, of any length, is hashed to one.
        # Names and signatures use it under two personalisations, so that no name can be read
        # as a signature. The keyed states are made once and copied for each entry.
        key = hashlib.blake2b(raw, digest_size=64, person=b"conceptsvc-cache").digest()
        self._names = hashlib.blake2b(
            key=key, digest_size=_DIGEST_BYTES, person=b"cache-names"
        )
        self._signer = hashlib.blake2b(key=key, digest_size=_TAG_BYTES, person=b"cache-values")
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self._observer = observer or NullObserver()
        self._clock = clock
        self._backoff_initial = backoff_seconds
        self._backoff_max = backoff_max_seconds
        # One transparent retry on a connection error re-dials a pooled connection that died
        # with a Redis restart; timeouts are not retried (a slow Redis must not slow requests).
        packer = command_packer()
        self._client = redis.Redis.from_url(
            url,
            **({"command_packer": packer} if packer is not None else {}),
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        # SET with EX for each key (KEYS) and value (ARGV), the TTL last in ARGV.
        self._set_all = self._client.register_script(_SET_ALL)
        self._scripts = True  # False once Redis refused to run the script
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._next_attempt = 0.0
        self._backoff = backoff_seconds
        self.outages = 0  # how many distinct outages were seen (for tests and logs)
        self._rejected_logged_at = -REJECTED_LOG_SECONDS
        self._rejected_unlogged = 0

    def _named(self, keys: Sequence[str]) -> tuple[list[str], list[bytes]]:
        """Each key's Redis name (prefix, the key's head up to its last colon, the keyed
        digest of the whole key in hex) and that digest, which its signature covers.

        Names are encoded as redis-py encodes them (UTF-8, strict). The loop is written for
        its cost: it runs for every caption that reaches the Redis tier (≈ 0.7 µs a key)."""
        prefix = self.prefix
        copy = self._names.copy
        names: list[str] = []
        digests: list[bytes] = []
        add_name, add_digest = names.append, digests.append
        for key in keys:
            h = copy()
            h.update(key.encode())
            digest = h.digest()
            add_digest(digest)
            add_name(f"{prefix}{key[: key.rfind(':') + 1]}{digest.hex()}")
        return names, digests

    def name(self, key: str) -> str:
        """The Redis name the entry of ``key`` is stored under (for operators and tests)."""
        return self._named([key])[0][0]

    def _signed(self, digests: Sequence[bytes], values: Sequence[bytes]) -> list[bytes]:
        """Each value with its signature (over its name's digest and itself) in front. The
        signature is written out here and in :meth:`_opened` rather than called: a method call
        a key cost 5–10 % of signing (0.88 → 0.92–0.97 µs a key, 512-key batches)."""
        copy = self._signer.copy
        out: list[bytes] = []
        for digest, value in zip(digests, values, strict=True):
            h = copy()
            h.update(digest)
            h.update(value)
            out.append(h.digest() + value)
        return out

    def _opened(
        self, names: Sequence[str], digests: Sequence[bytes], stored: Sequence[Any]
    ) -> list[bytes | None]:
        """The values stored entries carry; None for a missing entry and for one whose
        signature does not check (those are counted and logged)."""
        copy = self._signer.copy
        equal = hmac.compare_digest
        out: list[bytes | None] = []
        rejected = 0
        example = ""
        for name, digest, entry in zip(names, digests, stored, strict=True):
            if entry is None:
                out.append(None)
                continue
            if isinstance(entry, bytes) and len(entry) >= _TAG_BYTES:
                value = entry[_TAG_BYTES:]
                h = copy()
                h.update(digest)
                h.update(value)
                if equal(h.digest(), entry[:_TAG_BYTES]):
                    out.append(value)
                    continue
            out.append(None)
            rejected += 1
            example = example or name
        if rejected:
            self._rejected(rejected, example)
        return out

    def _rejected(self, count: int, example: str) -> None:
        self._observer.redis_rejected(count)
        now = self._clock()
        with self._lock:
            if now - self._rejected_logged_at < REJECTED_LOG_SECONDS:
                self._rejected_unlogged += count
                return
            before = self._rejected_unlogged
            self._rejected_unlogged, self._rejected_logged_at = 0, now
        log.warning(
            "ignoring %d Redis cache entr%s without a valid signature (%s%s): written by "
            "something that does not hold this server's cache_secret, or damaged; each is a "
            "miss, answered by the engine and overwritten",
            count, "y" if count == 1 else "ies", example,
            f"; {before} more since the last such line" if before else "",
        )

    @property
    def available(self) -> bool:
        """False while waiting out the backoff after an error (no Redis call is made)."""
        with self._lock:
            return self._down_since is None or self._clock() >= self._next_attempt

    def _failed(self, op: str, exc: Exception) -> None:
        self._observer.redis_error()
        now = self._clock()
        with self._lock:
            if self._down_since is None:
                self._down_since = now
                self._backoff = self._backoff_initial
                self.outages += 1
                log.warning(
                    "Redis cache tier unavailable (%s failed: %s: %s); requests are served "
                    "without it and it is retried with backoff (first retry in %.1fs)",
                    op,
                    type(exc).__name__,
                    exc,
                    self._backoff,
                )
            else:
                self._backoff = min(self._backoff * 2, self._backoff_max)
            self._next_attempt = now + self._backoff

    def _succeeded(self) -> None:
        if self._down_since is None:  # fast path without the lock
            return
        with self._lock:
            if self._down_since is not None:
                log.warning(
                    "Redis cache tier is back after %.1fs", self._clock() - self._down_since
                )
                self._down_since = None
                self._backoff = self._backoff_initial

    def probe(self) -> bool:
        """PING Redis once (at start-up): whether it answers. A failure is an outage like any
        other (logged once, retried with backoff), so it shows before the first request."""
        try:
            self._client.ping()
        except (redis.RedisError, OSError) as exc:
            self._failed("PING", exc)
            return False
        self._succeeded()
        return True

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys or not self.available:
            return [None] * len(keys)
        names, digests = self._named(keys)
        try:
            # The sync client returns a list; redis-py's stubs also allow its async variant.
            values = cast(list[Any], self._client.mget(names))
        except (redis.RedisError, OSError) as exc:
            self._failed("MGET", exc)
            return [None] * len(keys)
        self._succeeded()
        if values.count(None) == len(values):  # all missed: nothing to check one by one
            return values
        return self._opened(names, digests, values)

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items or not self.available:
            return
        names, digests = self._named([k for k, _ in items])
        values = self._signed(digests, [v for _, v in items])
        try:
            if self._scripts:
                try:
                    args: list[bytes | int] = list(values)
                    args.append(self.ttl_seconds)
                    self._set_all(keys=names, args=args)
                except redis.ResponseError as exc:  # scripts refused: the pipeline for good
                    self._scripts = False
                    log.warning(
                        "Redis refused the cache's write script (%s); writing with pipelined "
                        "SETs instead", exc,
                    )
            if not self._scripts:
                pipe = self._client.pipeline(transaction=False)
                for name, value in zip(names, values, strict=True):
                    pipe.set(name, value, ex=self.ttl_seconds)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._failed("SET", exc)
            return
        self._succeeded()

    def close(self) -> None:
        self._client.close()


class TieredCache:
    """The LRU first, then Redis; Redis hits are copied into the LRU. Either tier may be off."""

    def __init__(
        self,
        memory: LruCache | None,
        redis_tier: RedisCache | None,
        observer: CacheObserver | None = None,
    ) -> None:
        self.memory = memory
        self.redis = redis_tier
        self._observer = observer or NullObserver()

    @property
    def enabled(self) -> bool:
        return self.memory is not None or self.redis is not None

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        # Counted with list.count and skipped when there is nothing to copy: on a cold batch
        # every key misses both tiers, and a Python step per key here is paid by every caption.
        n = len(keys)
        results: list[bytes | None] = [None] * n
        misses = n
        if self.memory is not None and keys:
            results = self.memory.get_many(keys)
            misses = results.count(None)
            self._observer.cache_lookups("memory", n - misses, misses)
        if self.redis is not None and misses:
            if misses == n:
                missing: Sequence[int] = range(n)
                asked: Sequence[str] = keys
            else:
                missing = [i for i, r in enumerate(results) if r is None]
                asked = [keys[i] for i in missing]
            found = self.redis.get_many(asked)
            absent = found.count(None)
            self._observer.cache_lookups("redis", misses - absent, absent)
            if absent < misses:
                fill: list[tuple[str, bytes]] = []
                for i, v in zip(missing, found, strict=True):
                    if v is not None:
                        results[i] = v
                        fill.append((keys[i], v))
                if self.memory is not None:
                    self.memory.put_many(fill)
        return results

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if self.memory is not None:
            self.memory.put_many(items)
        if self.redis is not None:
            self.redis.put_many(items)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()


def build_cache(settings: Settings, observer: CacheObserver | None = None) -> TieredCache:
    """The cache the settings describe (either tier can be switched off)."""
    memory = (
        LruCache(settings.cache_size, settings.cache_max_bytes)
        if settings.cache_size > 0 and settings.cache_max_bytes > 0
        else None
    )
    remote = None
    if settings.redis_url:
        if settings.cache_secret is None:  # (the settings refuse this; a model_copy may not)
            raise ValueError("redis_url needs cache_secret: the Redis tier signs its entries")
        remote = RedisCache(
            settings.redis_url,
            secret=settings.cache_secret.get_secret_value(),
            prefix=settings.redis_prefix,
            ttl_seconds=settings.redis_ttl_seconds,
            timeout_seconds=settings.redis_timeout_seconds,
            backoff_seconds=settings.redis_backoff_seconds,
            backoff_max_seconds=settings.redis_backoff_max_seconds,
            observer=observer,
        )
    return TieredCache(memory, remote, observer)
