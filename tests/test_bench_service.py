"""The service benchmark's py-spy stage shares: waiting threads are not counted as work."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_service import _SERVER_STAGES, _stage_shares

_POOL = (
    "thread (7): rpc_0;Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982);"
    "RpcThreadPool._run (conceptsvc/server/pool.py:111)"
)


def test_bench_service_stage_shares_leave_idle_rpc_threads_out(tmp_path: Path) -> None:
    raw = tmp_path / "server.raw"
    raw.write_text(
        f"{_POOL} 900\n"  # an idle RPC thread, waiting for a call
        f"{_POOL.rsplit(';', 1)[0]};RpcThreadPool._run (conceptsvc/server/pool.py:98);"
        "ConceptServicer.Annotate (conceptsvc/server/servicer.py:640) 3\n"
        f"{_POOL.rsplit(';', 1)[0]};RpcThreadPool._run (conceptsvc/server/pool.py:98);"
        "ServiceMetrics.observe_rpc (conceptsvc/metrics.py:120) 1\n",
        encoding="utf-8",
    )
    assert _stage_shares(raw, _SERVER_STAGES) == {
        "servicer (batching, limits)": 0.75, "metrics": 0.25,
    }
