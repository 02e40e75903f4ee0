"""The RPC thread pool (``conceptsvc.server.pool``): results, the backlog, shutdown, and the
reason it exists — a call wakes one thread, and idle threads stay asleep."""

from __future__ import annotations

import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import pytest

from conceptsvc.server.pool import RpcThreadPool


def _hold(pool: RpcThreadPool, n: int) -> tuple[list[futures.Future[int]], threading.Event]:
    """Occupy ``n`` threads of ``pool`` at once; each reports its native thread id once the
    returned event is set. Returns after all ``n`` are running."""
    release = threading.Event()
    started = threading.Barrier(n + 1)

    def held() -> int:
        started.wait(10)
        release.wait(10)
        return threading.get_native_id()

    held_futures = [pool.submit(held) for _ in range(n)]
    started.wait(10)
    return held_futures, release


def test_pool_returns_results_and_exceptions_through_the_future() -> None:
    pool = RpcThreadPool(4)
    try:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(10) == 5

        def fail() -> None:
            raise ValueError("from the call")

        future = pool.submit(fail)
        assert isinstance(future.exception(10), ValueError)
        # The thread that ran the failed call is still there for the next one.
        assert pool.submit(lambda: 7).result(10) == 7
        assert pool.threads == 1
    finally:
        pool.shutdown()


def test_pool_hands_a_call_to_the_thread_that_went_idle_last() -> None:
    pool = RpcThreadPool(8)
    try:
        held, release = _hold(pool, 3)
        release.set()
        ids = {f.result(10) for f in held}
        assert len(ids) == 3 and pool.threads == 3
        time.sleep(0.2)  # all three back on the idle stack
        # One call at a time: every one goes to the same thread (the standard pool takes the
        # idle threads in turn), and no thread is added.
        ran_on = {pool.submit(threading.get_native_id).result(10) for _ in range(50)}
        assert len(ran_on) == 1 and ran_on <= ids
        assert pool.threads == 3
    finally:
        pool.shutdown()


def _context_switches(tid: int) -> int:
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    return sum(
        int(line.split(":")[1]) for line in status.splitlines() if "ctxt_switches" in line
    )


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/task")
def test_pool_idle_threads_are_not_woken_by_other_calls() -> None:
    """``concurrent.futures.ThreadPoolExecutor`` wakes an idle thread at every call besides the
    one that runs it (its queue's lock passes from waiter to waiter); here the idle threads do
    not run at all while another thread takes 300 calls one after the other."""
    pool = RpcThreadPool(8)
    try:
        held, release = _hold(pool, 4)
        release.set()
        ids = [f.result(10) for f in held]
        time.sleep(0.2)
        busy = pool.submit(threading.get_native_id).result(10)
        idle = [t for t in ids if t != busy]
        before = {t: _context_switches(t) for t in idle}
        for _ in range(300):
            assert pool.submit(threading.get_native_id).result(10) == busy
        after = {t: _context_switches(t) for t in idle}
        assert after == before
    finally:
        pool.shutdown()


def test_pool_queues_calls_beyond_its_threads_in_order() -> None:
    pool = RpcThreadPool(1)
    try:
        held, release = _hold(pool, 1)
        order: list[int] = []
        queued = [pool.submit(order.append, k) for k in range(5)]
        time.sleep(0.1)
        assert order == [] and pool.threads == 1  # waiting, not on new threads
        release.set()
        for f in queued:
            f.result(10)
        assert order == [0, 1, 2, 3, 4]
        assert held[0].result(10) > 0
    finally:
        pool.shutdown()


def test_pool_cancelled_call_never_runs() -> None:
    pool = RpcThreadPool(1)
    try:
        _, release = _hold(pool, 1)
        ran = threading.Event()
        queued = pool.submit(ran.set)
        assert queued.cancel()
        after = pool.submit(lambda: "next")
        release.set()
        assert after.result(10) == "next"
        assert not ran.is_set() and queued.cancelled()
    finally:
        pool.shutdown()


def test_pool_shutdown_ends_idle_threads_and_refuses_new_calls() -> None:
    pool = RpcThreadPool(4)
    held, release = _hold(pool, 2)
    release.set()
    for f in held:
        f.result(10)
    threads = [t for t in threading.enumerate() if t.name.startswith("rpc_")]
    assert len(threads) >= 2
    pool.shutdown(wait=True)
    assert not any(t.is_alive() for t in threads if t.name in {"rpc_0", "rpc_1"})
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: None)


def test_pool_shutdown_lets_a_running_call_finish_and_can_cancel_the_backlog() -> None:
    pool = RpcThreadPool(1)
    held, release = _hold(pool, 1)
    queued = pool.submit(lambda: "queued")
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    release.set()
    assert held[0].result(10) > 0  # the running call was not interrupted


def test_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RpcThreadPool(0)
