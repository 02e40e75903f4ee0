"""The service benchmark's py-spy stage shares: waiting threads are not counted as work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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


def test_bench_service_ratio_is_the_medians_of_alternated_rounds() -> None:
    from benchmarks.bench_service import ratio_of_medians

    r = ratio_of_medians([16.0, 20.0, 17.0], [33.0, 44.0, 35.0])
    # medians 17.0 and 35.0: one slow round on either side moves neither
    assert (r["engine_median"], r["server_median"], r["ratio"], r["rounds"]) == (
        17.0, 35.0, 2.06, 3
    )
    with pytest.raises(ValueError):
        ratio_of_medians([16.0], [33.0, 35.0])


def test_bench_service_target_row_reads_the_rounds_not_the_single_pass() -> None:
    from benchmarks.bench_service import _cpu_ratios, ratio_of_medians, to_markdown

    s: dict[str, Any] = {
        "date": "2026-12-06T08:00:00+00:00", "captions": 10, "workers": 2,
        "machine": "vm", "python": "3.11", "index": "idx/demo", "streams": 4,
        "batch_size": 512, "load_average_at_start": [0.1, 0.1, 0.1],
        "engine_in_process": {"captions_per_s": 1.0, "cpu_us_per_caption": 10.0},
        "batch_cold": {"captions_per_s": 1.0, "seconds": 10.0, "captions": 10,
                       "server_cpu_us_per_caption": 23.0, "client_cpu_us_per_caption": 5.0},
    }
    _cpu_ratios(s)  # no rounds: the single passes' ratio
    assert s["server_cpu_vs_engine_cold"] == s["server_cpu_vs_engine_single_pass"] == 2.3
    s["ratio_rounds"] = ratio_of_medians([10.0, 10.0, 11.0], [19.0, 19.5, 30.0])
    _cpu_ratios(s)
    assert (s["server_cpu_vs_engine_cold"], s["server_cpu_vs_engine_single_pass"]) == (1.95, 2.3)
    md = to_markdown(s, "python -m benchmarks.bench service")
    assert "| server CPU per caption, cold, vs the engine's | ≤ 2.0 | 1.95 | met |" in md
    assert "medians of 3 alternated rounds" in md and "give 2.3×" in md


def test_bench_service_latency_measures_each_client_layer_in_a_process_of_its_own(
    tmp_path: Path,
) -> None:
    import json

    from service_helpers import build_index_a, running_server, settings_for

    from benchmarks.bench_service import _latency

    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(["chest CT", "lung", "no pneumothorax"]), encoding="utf-8")
    with running_server(settings_for(build_index_a(tmp_path / "idx"))) as (_server, port):
        out = _latency(f"127.0.0.1:{port}", texts, 2, 5, ("poller", "default"), 2)
    assert set(out) == {"poller", "default"}
    for layer, r in out.items():
        assert r["client_layer"] == layer and r["clients"] == 2
        assert r["requests"] == 2 * 2 * 5  # clients × rounds × calls
        assert len(r["round_p50_ms"]) == 2 and 0 < r["p50_ms"] <= r["p99_ms"]
