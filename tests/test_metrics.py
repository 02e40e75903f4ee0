"""The service's metrics: every labelled series counts on its own (the children are looked up
through a memo, ``metrics._Children``)."""

from __future__ import annotations

from conceptsvc.metrics import ServiceMetrics


def test_metrics_each_label_set_counts_separately() -> None:
    m = ServiceMetrics()
    for method, code, n in (("Annotate", "OK", 3), ("Annotate", "INTERNAL", 1),
                            ("AnnotateBatch", "OK", 2)):
        for _ in range(n):
            m.observe_rpc(method, code, 0.002)
    assert m.value("conceptsvc_requests_total", {"method": "Annotate", "code": "OK"}) == 3
    assert m.value("conceptsvc_requests_total", {"method": "Annotate", "code": "INTERNAL"}) == 1
    assert m.value("conceptsvc_requests_total", {"method": "AnnotateBatch", "code": "OK"}) == 2
    assert m.value(
        "conceptsvc_request_duration_seconds_bucket",
        {"method": "Annotate", "code": "OK", "le": "0.0025"},
    ) == 3
    assert m.value(
        "conceptsvc_request_duration_seconds_bucket",
        {"method": "Annotate", "code": "OK", "le": "0.001"},
    ) == 0
    m.captions_annotated(5, 2)
    m.captions_annotated(1, 0)
    assert m.value("conceptsvc_captions_annotated_total", {"source": "engine"}) == 6
    assert m.value("conceptsvc_captions_annotated_total", {"source": "cache"}) == 2
    m.item_error("INVALID_ARGUMENT")
    m.item_error("RESOURCE_EXHAUSTED")
    m.item_error("INVALID_ARGUMENT")
    assert m.value("conceptsvc_stream_item_errors_total", {"code": "INVALID_ARGUMENT"}) == 2
    m.cache_lookups("memory", 4, 1)
    m.cache_lookups("redis", 0, 3)
    assert m.value("conceptsvc_cache_lookups_total", {"tier": "memory", "result": "hit"}) == 4
    assert m.value("conceptsvc_cache_lookups_total", {"tier": "redis", "result": "miss"}) == 3
    assert m.value("conceptsvc_cache_lookups_total", {"tier": "redis", "result": "hit"}) == 0


def test_metrics_servers_in_one_process_do_not_share_series() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    a.observe_rpc("Annotate", "OK", 0.001)
    assert a.value("conceptsvc_requests_total", {"method": "Annotate", "code": "OK"}) == 1
    assert b.value("conceptsvc_requests_total", {"method": "Annotate", "code": "OK"}) == 0
