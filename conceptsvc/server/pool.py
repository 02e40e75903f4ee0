"""The RPC thread pool: each call wakes exactly one thread, the one that ran last.

gRPC's synchronous server runs every call with ``executor.submit``. With
:class:`concurrent.futures.ThreadPoolExecutor` a submit wakes one more thread than it needs:
its idle threads all wait on one lock inside its work queue (``queue.SimpleQueue``), and the
thread that takes the item releases that lock, which wakes the next idle thread only for it to
take the GIL, find the queue empty and sleep again. That wake-up lands in the middle of the
call: the thread running it loses the GIL to the woken one and waits for it back, and on an
otherwise idle machine every such hand-over costs a sleeping CPU's wake-up. A unary call on
this server used to take three more GIL waits before its reply was sent than on a bare echo
server (traced with ``perf record -e sched:*,syscalls:*``; NOTES.md, issue 15).

Here each idle thread waits on a lock of its own, and a submit hands the call to the thread
that went idle last (a stack, so a steady stream of calls keeps using one warm thread) and
wakes that one alone. Threads are started on demand up to ``max_workers``, as the standard
pool does; a call submitted while every thread is busy waits in a FIFO backlog (gRPC's
``maximum_concurrent_rpcs`` keeps that from happening in conceptsvc, but the executor does not
depend on it).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent import futures
from typing import Any

__all__ = ["RpcThreadPool"]

_Item = tuple["futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class _Worker:
    __slots__ = ("item", "wake")

    def __init__(self) -> None:
        self.item: _Item | None = None
        self.wake = threading.Lock()
        self.wake.acquire()  # held while the worker has nothing to do; released to hand it work


class RpcThreadPool(futures.Executor):
    """A :class:`concurrent.futures.Executor` whose submit wakes one idle thread, the last one
    to go idle (see the module docstring). Threads are daemon threads: :meth:`shutdown` ends
    the idle ones, and a call still running at interpreter exit does not hold the process up
    (the server's own grace period has already passed by then)."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "rpc") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._backlog: deque[_Item] = deque()
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    @property
    def threads(self) -> int:
        """Threads started so far (they are kept until shutdown)."""
        return len(self._threads)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        item: _Item = (future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            if self._idle:
                worker = self._idle.pop()
                worker.item = item
                worker.wake.release()
                return future
            if len(self._threads) >= self.max_workers:
                self._backlog.append(item)
                return future
            worker = _Worker()
            worker.item = item
            thread = threading.Thread(
                target=self._run,
                args=(worker,),
                name=f"{self._prefix}_{len(self._threads)}",
                daemon=True,
            )
            self._threads.append(thread)
        thread.start()
        return future

    def _run(self, worker: _Worker) -> None:
        item = worker.item
        while item is not None:
            worker.item = None
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs  # hold nothing of a finished call while idle
            with self._lock:
                if self._backlog:
                    item = self._backlog.popleft()
                    continue
                if self._shutdown:
                    return
                self._idle.append(worker)
            worker.wake.acquire()
            item = worker.item

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; idle threads end, busy ones end after their call (and after the
        backlog, unless ``cancel_futures``). With ``wait``, returns when all have ended."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._backlog:
                    self._backlog.popleft()[0].cancel()
            idle, self._idle = self._idle, []
            threads = list(self._threads)
        for worker in idle:
            worker.item = None
            worker.wake.release()
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
