"""Cache tiers against a real Redis: batching, bounds, and outages that never fail a lookup."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer
from redis.exceptions import DataError

from conceptsvc.cache import (
    REJECTED_LOG_SECONDS,
    LruCache,
    RedisCache,
    TieredCache,
    build_cache,
    command_packer,
    result_key,
)
from conceptsvc.config import load_settings

if TYPE_CHECKING:
    from conftest import RedisServer


class RecordingObserver:
    """Counts cache events the way the metrics do."""

    def __init__(self) -> None:
        self.lookups: Counter[tuple[str, str]] = Counter()
        self.redis_errors = 0
        self.rejected = 0

    def cache_lookups(self, tier: str, hits: int, misses: int) -> None:
        self.lookups[tier, "hit"] += hits
        self.lookups[tier, "miss"] += misses

    def redis_error(self) -> None:
        self.redis_errors += 1

    def redis_rejected(self, entries: int) -> None:
        self.rejected += entries


SECRET = "cache-test-secret-" + "c" * 24


def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def test_cache_result_key_depends_on_index_options_and_text() -> None:
    base = result_key("a" * 64, "mode=exact", "chest x-ray")
    assert base == result_key("a" * 64, "mode=exact", "chest x-ray")
    assert base.startswith("v2:" + "a" * 16 + ":")
    others = {
        result_key("b" * 64, "mode=exact", "chest x-ray"),
        result_key("a" * 63 + "b", "mode=exact", "chest x-ray"),  # same short prefix
        result_key("a" * 64, "mode=approximate", "chest x-ray"),
        result_key("a" * 64, "mode=exact", "chest x-ray "),
        result_key("a" * 64, "mode=exact\0chest", " x-ray"),  # separators are not ambiguous
    }
    assert base not in others and len(others) == 5
    # Lone surrogates (possible in Python strings) still give a key rather than crashing.
    assert result_key("a" * 64, "", "bad \ud800 text")


def test_cache_lru_bounds_entries_and_bytes() -> None:
    lru = LruCache(max_entries=3, max_bytes=50)
    lru.put_many([("a", b"1"), ("b", b"2"), ("c", b"3")])
    assert lru.get_many(["a"]) == [b"1"]  # a is now the most recent
    lru.put_many([("d", b"4")])  # over the entry bound: b (least recent) goes
    assert lru.get_many(["b", "c", "d", "a"]) == [None, b"3", b"4", b"1"]
    lru.put_many([("big", b"x" * 49)])  # entries: c goes; bytes: d too (1 + 1 + 49 > 50)
    assert lru.get_many(["c", "d", "a", "big"]) == [None, None, b"1", b"x" * 49]
    assert len(lru) == 2 and lru.size_bytes == 50
    lru.put_many([("huge", b"x" * 51)])  # larger than the whole cache: not stored
    assert lru.get_many(["huge"]) == [None] and lru.size_bytes == 50
    lru.put_many([("big", b"y")])  # replacing a value updates the byte count
    assert lru.size_bytes == 2
    with pytest.raises(ValueError):
        LruCache(0, 10)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.sampled_from("abcdefgh"), st.binary(max_size=12)), max_size=6),
        max_size=8,
    ),
    st.integers(1, 6),
    st.integers(1, 30),
)
def test_cache_lru_batch_puts_leave_what_the_entry_by_entry_loop_leaves(
    batches: list[list[tuple[str, bytes]]], max_entries: int, max_bytes: int
) -> None:
    """Batches with repeated keys, replaced keys and values over the byte bound: the same
    entries, in the same recency order, and the same byte count as the reference below (each
    pair in turn — a value over the bound skipped, a replaced entry moved to the end — then
    the least recent entries evicted until both bounds hold). ``put_many`` is that loop
    today; the test is there for any faster put (one tried in C loops gained nothing)."""
    lru = LruCache(max_entries, max_bytes)
    ref: OrderedDict[str, bytes] = OrderedDict()
    for batch in batches:
        lru.put_many(batch)
        for k, v in batch:
            if len(v) <= max_bytes:
                ref.pop(k, None)
                ref[k] = v
        while len(ref) > max_entries or sum(map(len, ref.values())) > max_bytes:
            ref.popitem(last=False)
        assert list(lru._data.items()) == list(ref.items())
        assert lru.size_bytes == sum(map(len, ref.values()))


def test_cache_lru_batch_put_counts_bytes_like_one_by_one() -> None:
    """A key twice in a batch, a key already there, a value too big: the byte count stays
    what the entries hold."""
    lru = LruCache(max_entries=10, max_bytes=20)
    lru.put_many([("a", b"11"), ("b", b"22")])
    assert lru.size_bytes == 4
    lru.put_many([("c", b"3"), ("c", b"333")])  # twice in one batch: the last one stays
    assert lru.get_many(["c"]) == [b"333"] and lru.size_bytes == 7
    lru.put_many([("d", b"4"), ("a", b"1")])  # one key already there
    assert lru.get_many(["a", "d"]) == [b"1", b"4"] and lru.size_bytes == 7
    lru.put_many([("e", b"5"), ("f", b"x" * 21)])  # one value over the whole cache
    assert lru.get_many(["e", "f"]) == [b"5", None] and lru.size_bytes == 8
    lru.put_many([("g", b"y" * 14), ("h", b"z")])  # new keys, over the byte bound: b, c go
    assert lru.get_many(["b", "c", "g", "h"]) == [None, None, b"y" * 14, b"z"]
    assert lru.size_bytes == 1 + 1 + 1 + 14 + 1  # d, a, e, g, h
    lru.put_many([])
    assert len(lru) == 5


# redis-py's own pure-Python packer with its default encoder: the reference the compiled one
# is held to (joined: it splits large arguments into chunks of its own).
_REFERENCE_PACKER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
_ARGS = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=40),  # any code point but lone surrogates: UTF-8 as redis-py encodes it
    st.integers(min_value=-(2**70), max_value=2**70),
)


def _packed(packer: object, *args: object) -> bytes:
    return b"".join(packer.pack(*args))  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None)
@given(
    head=st.sampled_from(["GET", "CONFIG GET", b"MGET", b"SCRIPT LOAD", "EVALSHA", 7, b"X"]),
    args=st.lists(_ARGS, max_size=40),
)
def test_cache_compiled_packer_writes_what_redis_py_writes(
    head: object, args: list[object]
) -> None:
    """The same bytes, or the same error (a command name that is not text: redis-py's
    TypeError)."""
    packer = command_packer()
    assert packer is not None and type(packer).__module__ == "conceptsvc._wire"
    try:
        expected = _packed(_REFERENCE_PACKER, head, *args)
    except TypeError:
        with pytest.raises(TypeError):
            packer.pack(head, *args)
        return
    assert _packed(packer, head, *args) == expected


def test_cache_compiled_packer_at_the_sizes_the_tier_sends() -> None:
    """Commands of the write script's shape (thousands of arguments: four- and five-digit
    counts) and lengths at the digit boundaries, compared whole with redis-py's packer."""
    packer = command_packer()
    assert packer is not None
    for n in (999, 1000, 10_000):
        args = ("EVALSHA", "f" * 40, n // 2, *(f"k{i}" for i in range(n // 2)),
                *(bytes([i % 256]) * (i % 300) for i in range(n - n // 2)), 604800)
        assert _packed(packer, *args) == _packed(_REFERENCE_PACKER, *args)
    for size in (9, 10, 99, 100, 9_999, 10_000, 99_999, 100_000):
        args = ("SET", "k", b"v" * size, "EX", 60)
        assert _packed(packer, *args) == _packed(_REFERENCE_PACKER, *args)


def test_cache_compiled_packer_hands_other_arguments_to_redis_py() -> None:
    """Floats and memoryviews are packed by redis-py's rules; a bool is its DataError; a
    string that is not UTF-8 (a lone surrogate) fails as redis-py's encoder fails."""
    packer = command_packer()
    assert packer is not None
    for args in (("SET", "k", 1.5), ("SET", "k", memoryview(b"xy")), ("SET", b"k", 2.0, "v")):
        assert _packed(packer, *args) == _packed(_REFERENCE_PACKER, *args)
    with pytest.raises(DataError):
        packer.pack("SET", "k", True)
    with pytest.raises(UnicodeEncodeError):
        packer.pack("SET", "k\ud800", b"v")
    with pytest.raises(UnicodeEncodeError):
        _REFERENCE_PACKER.pack("SET", "k\ud800", b"v")


def test_cache_redis_tier_packs_with_the_compiled_packer(shared_redis: RedisServer) -> None:
    """The tier's connections use the compiled packer, and what it sends round-trips through
    a real Redis: keys with non-ASCII text, empty and large values, the TTL as an int."""
    cache = RedisCache(shared_redis.url, secret=SECRET, prefix="t-packer:", ttl_seconds=90)
    conn = cache._client.connection_pool.get_connection()
    try:
        assert type(conn._command_packer).__name__ == "RespPacker"
    finally:
        cache._client.connection_pool.release(conn)
    items = [("é-key", b""), ("k\x00z", b"\r\n$3\r\n"), ("big", bytes(range(256)) * 400)]
    cache.put_many(items)
    assert cache.get_many([k for k, _ in items] + ["none"]) == [v for _, v in items] + [None]
    assert 0 < _redis(shared_redis.url).ttl(cache.name("é-key")) <= 90
    cache.close()


def test_cache_redis_round_trip_uses_one_mget_and_ttl(shared_redis: RedisServer) -> None:
    r = _redis(shared_redis.url)
    r.config_resetstat()
    cache = RedisCache(shared_redis.url, secret=SECRET, prefix="t-roundtrip:", ttl_seconds=120)
    items = [(f"k{i}", f"value {i}".encode()) for i in range(50)]
    cache.put_many(items)
    got = cache.get_many([k for k, _ in items] + ["absent"])
    assert got == [v for _, v in items] + [None]
    stats = r.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1
    assert 0 < r.ttl(cache.name("k0")) <= 120
    stored = r.get(cache.name("k7"))  # the value after its 32-byte signature
    assert stored is not None and len(stored) == 32 + 7 and stored.endswith(b"value 7")
    # the 50 writes were one script call, not 50 commands (EVALSHA twice: the first finds the
    # script not loaded yet, redis-py loads it and calls again)
    assert stats["cmdstat_set"]["calls"] == 50  # inside the script
    assert stats["cmdstat_evalsha"]["calls"] <= 2 and "cmdstat_eval" not in stats
    # a flushed script cache (a Redis restart, SCRIPT FLUSH) is reloaded, not an error
    r.script_flush()
    cache.put_many([("again", b"A")])
    assert cache.get_many(["again"]) == [b"A"] and cache.available
    cache.close()


def test_cache_redis_names_entries_by_the_secret_and_refuses_unsigned_values(
    shared_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who can write to the Redis knows every key (the index hash is in every reply):
    an entry's name is a keyed digest, and a value without its signature is a miss (counted,
    logged once per REJECTED_LOG_SECONDS, overwritten by the next write), never an answer.
    Under the name the key alone gives (where entries used to be) nothing is read."""
    obs = RecordingObserver()
    clock = [0.0]
    cache = RedisCache(
        shared_redis.url, secret=SECRET, prefix="t-signed:", observer=obs, clock=lambda: clock[0]
    )
    other = RedisCache(shared_redis.url, secret=SECRET + "2", prefix="t-signed:")
    r = _redis(shared_redis.url)
    keys = [result_key("f" * 64, "mode=exact", f"caption {i}") for i in range(6)]
    name = cache.name(keys[0])
    # readable head (prefix, format, index hash) kept; the digest is keyed by the secret
    head = "t-signed:v2:" + "f" * 16 + ":"
    assert name.startswith(head) and len(name) == len(head) + 40
    assert name != "t-signed:" + keys[0] and name != other.name(keys[0])
    r.set("t-signed:" + keys[0], b"planted where the key alone points")
    assert cache.get_many(keys[:1]) == [None] and obs.rejected == 0  # not even read

    cache.put_many([(k, f"answer {i}".encode()) for i, k in enumerate(keys)])
    assert cache.get_many(keys) == [f"answer {i}".encode() for i in range(6)]
    stored = [r.get(cache.name(k)) for k in keys]
    # forged: unsigned bytes, an empty value, a signature cut short, one bit flipped in the
    # answer, another key's entry moved here, this key's answer signed with another secret
    other.put_many([(keys[5], b"answer 5")])
    forged = [
        b"attacker's answer",
        b"",
        stored[2][:20],
        stored[3][:-1] + bytes([stored[3][-1] ^ 1]),
        stored[0],
        r.get(other.name(keys[5])),
    ]
    for k, value in zip(keys, forged, strict=True):
        r.set(cache.name(k), value)
    with caplog.at_level(logging.WARNING, logger="conceptsvc.cache"):
        assert cache.get_many(keys) == [None] * 6
        assert cache.get_many(keys[:2]) == [None, None]  # within the interval: not logged
    assert obs.rejected == 8
    lines = [r.getMessage() for r in caplog.records if "signature" in r.getMessage()]
    assert len(lines) == 1 and "ignoring 6 Redis cache entries" in lines[0]
    assert "caption" not in lines[0]  # names only: no key material, no caption
    clock[0] = REJECTED_LOG_SECONDS
    with caplog.at_level(logging.WARNING, logger="conceptsvc.cache"):
        assert cache.get_many(keys[:1]) == [None]
    assert "1 more since the last such line" not in caplog.text
    assert "2 more since the last such line" in caplog.text
    # the fresh answer overwrites a refused entry
    cache.put_many([(keys[0], b"answer 0")])
    assert cache.get_many(keys[:1]) == [b"answer 0"] and r.get(cache.name(keys[0])) == stored[0]
    # another secret shares nothing: other names, so a miss, not a refusal
    assert other.get_many(keys[:5]) == [None] * 5
    r.delete(*[cache.name(k) for k in keys], *[other.name(k) for k in keys],
             "t-signed:" + keys[0])
    cache.close()
    other.close()


def test_cache_tiered_never_copies_a_refused_redis_entry_into_memory(
    shared_redis: RedisServer,
) -> None:
    """A refused Redis entry is a Redis miss, and the in-process tier stays without it (it
    used to copy whatever Redis returned, so every worker kept serving a forged answer)."""
    obs = RecordingObserver()
    remote = RedisCache(shared_redis.url, secret=SECRET, prefix="t-tier-forged:", observer=obs)
    memory = LruCache(10, 1000)
    cache = TieredCache(memory, remote, obs)
    _redis(shared_redis.url).set(remote.name("k"), b"forged")
    assert cache.get_many(["k"]) == [None]
    assert memory.get_many(["k"]) == [None] and obs.rejected == 1
    assert obs.lookups["redis", "miss"] == 1 and obs.lookups["redis", "hit"] == 0
    _redis(shared_redis.url).delete(remote.name("k"))
    cache.close()


def test_cache_redis_probe_answers_or_starts_an_outage(
    shared_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """`probe` (a PING at start-up) is True against a real Redis; against a port where nothing
    listens it is False and starts an outage: logged once, retried with backoff."""
    from conftest import free_port

    up = RedisCache(shared_redis.url, secret=SECRET, prefix="t-probe:")
    assert up.probe() and up.available and up.outages == 0
    up.close()
    with caplog.at_level("WARNING", logger="conceptsvc.cache"):
        down = RedisCache(
            f"redis://127.0.0.1:{free_port()}/0", secret=SECRET, prefix="t-probe:"
        )
        assert not down.probe() and not down.available and down.outages == 1
    assert any("PING failed" in r.getMessage() for r in caplog.records)
    down.close()


def test_cache_redis_without_scripts_writes_with_a_pipeline(
    shared_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that refuses scripts (renamed or disabled EVAL, as some managed services do)
    still gets the entries, through pipelined SETs, after one warning."""
    cache = RedisCache(shared_redis.url, secret=SECRET, prefix="t-noscript:", ttl_seconds=60)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise redis.ResponseError("ERR unknown command 'EVALSHA'")

    cache._set_all = refuse  # type: ignore[assignment]  # the one command such a Redis lacks
    with caplog.at_level(logging.WARNING, logger="conceptsvc.cache"):
        cache.put_many([("a", b"1"), ("b", b"2")])
        cache.put_many([("c", b"3")])
    assert cache.get_many(["a", "b", "c"]) == [b"1", b"2", b"3"]
    assert 0 < _redis(shared_redis.url).ttl(cache.name("a")) <= 60
    assert sum("refused the cache's write script" in r.getMessage() for r in caplog.records) == 1
    assert cache.available
    cache.close()


def test_cache_redis_down_is_a_miss_with_one_warning_then_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    obs = RecordingObserver()
    clock = [0.0]
    cache = RedisCache(
        redis_server.url, secret=SECRET, backoff_seconds=1.0, backoff_max_seconds=4.0,
        observer=obs,
        clock=lambda: clock[0],
    )
    cache.put_many([("k", b"v")])
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="conceptsvc.cache"):
        assert cache.get_many(["k", "j"]) == [None, None]
        assert obs.redis_errors == 1 and not cache.available
        for _ in range(20):  # inside the backoff window: no Redis call, no new error
            assert cache.get_many(["k"]) == [None]
            cache.put_many([("k", b"v")])
        assert obs.redis_errors == 1
        clock[0] = 1.5  # window over: one attempt, still down, backoff doubles
        assert cache.get_many(["k"]) == [None]
        assert obs.redis_errors == 2
        clock[0] = 3.0  # 1.5 + 2 = 3.5 not reached yet
        assert not cache.available
        redis_server.start()  # same port, empty data (like a flush)
        clock[0] = 4.0
        assert cache.get_many(["k"]) == [None]  # back, but the data is gone
        cache.put_many([("k", b"again")])
        assert cache.get_many(["k"]) == [b"again"]
    outage_warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_warnings) == 1
    assert any("is back" in r.getMessage() for r in caplog.records)
    assert cache.outages == 1
    cache.close()


def test_cache_redis_slow_times_out_as_a_miss(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    obs = RecordingObserver()
    cache = RedisCache(redis_server.url, secret=SECRET, timeout_seconds=0.1, observer=obs)
    cache.put_many([("k", b"v")])
    assert cache.get_many(["k"]) == [b"v"]
    # Redis freezes (SIGSTOP): connected, but nothing answers — as slow as a Redis gets. A
    # timer thaws it after 30 s, so a cache that waited instead of timing out gets b"v" back
    # and fails here rather than hanging.
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    thaw = threading.Timer(30, os.kill, (pid, signal.SIGCONT))
    os.kill(pid, signal.SIGSTOP)
    thaw.start()
    try:
        with caplog.at_level(logging.WARNING, logger="conceptsvc.cache"):
            assert cache.get_many(["k"]) == [None]
        assert obs.redis_errors == 1 and not cache.available
        assert "MGET failed: TimeoutError" in caplog.text
    finally:
        thaw.cancel()
        os.kill(pid, signal.SIGCONT)
    cache.close()


def test_cache_tiered_fills_memory_from_redis_and_counts_per_tier(
    shared_redis: RedisServer,
) -> None:
    obs = RecordingObserver()
    remote = RedisCache(shared_redis.url, secret=SECRET, prefix="t-tiered:", observer=obs)
    remote.put_many([("a", b"A")])
    cache = TieredCache(LruCache(10, 1000), remote, obs)
    assert cache.get_many(["a", "b"]) == [b"A", None]
    assert obs.lookups == {
        ("memory", "hit"): 0, ("memory", "miss"): 2, ("redis", "hit"): 1, ("redis", "miss"): 1,
    }
    _redis(shared_redis.url).delete(remote.name("a"))
    assert cache.get_many(["a"]) == [b"A"]  # now from memory
    assert obs.lookups["memory", "hit"] == 1
    cache.put_many([("b", b"B")])
    assert remote.get_many(["b"]) == [b"B"]
    assert (_redis(shared_redis.url).get(remote.name("b")) or b"").endswith(b"B")
    cache.close()


def test_cache_tiered_mixed_batch_keeps_order_counts_and_fills_only_redis_hits(
    shared_redis: RedisServer,
) -> None:
    """One batch with a memory hit, a Redis-only hit and misses (the path that picks the
    missing keys out), then one that misses everything (the path that skips that work)."""
    obs = RecordingObserver()
    remote = RedisCache(shared_redis.url, secret=SECRET, prefix="t-mixed:", observer=obs)
    _redis(shared_redis.url).delete(*map(remote.name, "mrxy"))
    remote.put_many([("r", b"R")])
    memory = LruCache(10, 1000)
    memory.put_many([("m", b"M")])
    cache = TieredCache(memory, remote, obs)
    assert cache.get_many(["x", "m", "r", "y"]) == [None, b"M", b"R", None]
    assert obs.lookups == {
        ("memory", "hit"): 1, ("memory", "miss"): 3, ("redis", "hit"): 1, ("redis", "miss"): 2,
    }
    assert memory.get_many(["r", "x", "y"]) == [b"R", None, None]  # only the Redis hit copied
    obs.lookups.clear()
    assert cache.get_many(["x", "y"]) == [None, None]
    assert obs.lookups == {
        ("memory", "hit"): 0, ("memory", "miss"): 2, ("redis", "hit"): 0, ("redis", "miss"): 2,
    }
    assert len(memory) == 2
    cache.close()


def test_cache_build_from_settings_switches_tiers(shared_redis: RedisServer) -> None:
    none = build_cache(load_settings(cache_size=0))
    assert not none.enabled and none.get_many(["x"]) == [None]
    none.put_many([("x", b"1")])
    mem = build_cache(load_settings())
    assert mem.memory is not None and mem.redis is None
    both = build_cache(
        load_settings(redis_url=shared_redis.url, redis_prefix="t-build:", cache_secret=SECRET)
    )
    assert both.redis is not None and both.redis.prefix == "t-build:"
    both.put_many([("x", b"1")])
    assert both.redis.name("x").startswith("t-build:")
    assert (_redis(shared_redis.url).get(both.redis.name("x")) or b"").endswith(b"1")
    both.close()
