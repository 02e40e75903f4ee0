from __future__ import annotations

import json
from pathlib import Path

from conceptsvc.dev.bench_extract import main


def test_bench_extract_reports_rates_and_stages(tmp_path: Path, engine_index_path: Path) -> None:
    caps = tmp_path / "c.csv"
    rows = ["ID,Caption"] + [
        f'c{i},"Axial CT of the chest: lung cancer and no pleural effusion ({i})."'
        for i in range(30)
    ]
    caps.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "bench.json"
    rc = main([
        "--captions", str(caps), "--index", str(engine_index_path), "--repeat", "1",
        "--tokenizers", "--json", str(out),
    ])
    assert rc == 0
    tok, exact, approx = json.loads(out.read_text(encoding="utf-8"))
    assert set(tok["tokenizers"]) >= {"conceptsvc tokenize_spans (normalised, offsets)"}
    assert exact["mode"] == "exact" and approx["mode"] == "approximate"
    for r in (exact, approx):
        assert r["captions"] == 30
        assert r["captions_per_s_cpu"] > 0 and r["cold_captions_per_s_cpu"] > 0
        assert abs(sum(r["stage_shares"].values()) - 1.0) < 0.01
    assert "approximate match" in approx["stage_shares"]
