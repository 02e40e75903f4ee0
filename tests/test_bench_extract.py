from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_extract import (
    bench,
    main,
    profile_stages_py_spy,
    stage_shares_py_spy,
)
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.model import ExtractOptions

DEMO_CAPTIONS = Path(__file__).parent.parent / "conceptsvc" / "data" / "demo" / "captions.csv"

# Frames as `py-spy record --native --format raw` writes them (outermost first, then the
# sample count), taken from a real record of the compiled engine.
_LOOP = (
    "0x7f1a15c4524a (libc.so.6);<module> (benchmarks/bench_extract.py:560);"
    "main (benchmarks/bench_extract.py:470);"
    "_stage_child (benchmarks/bench_extract.py:548);"
    "_stage_loop (benchmarks/bench_extract.py:330)"
)
_EXTRACT = (
    _LOOP + ";Extractor.extract (conceptsvc/extractor.py:309);"
    "extract (conceptsvc/_speedups.pyx:1006);extract (conceptsvc/_speedups.pyx:1013);"
    "FastPath__extract (conceptsvc/_speedups.pyx:1023)"
)
_RAW = [
    # start-up and index loading: outside the loop, not counted
    "0x7f1a15c4524a (libc.so.6);<module> (benchmarks/bench_extract.py:560);"
    "Extractor.__init__ (conceptsvc/extractor.py:175);"
    "load_profile (conceptsvc/profile.py:385) 50",
    # teardown without a Python stack: not counted
    "0x7f1a15c4524a (libc.so.6);gc_collect_main (libpython3.11.so.1.0) 40",
    # the loop's own iteration: not the engine's
    _LOOP + " 5",
    # tokenisation: the token table, and refcounting inlined into the token scan
    _EXTRACT + ";_speedups__scan_tokens (conceptsvc/_speedups.pyx:925);"
    "_TokenTable_find (conceptsvc/_speedups.pyx:371) 30",
    _EXTRACT + ";_speedups__scan_tokens (conceptsvc/_speedups.pyx:927);"
    "Py_XDECREF (object.h:601) 10",
    # exact match: the trie, and an index lookup on first use of a key
    _EXTRACT + ";FastPath__match (conceptsvc/_speedups.pyx:1000);"
    "_KeyTrie_child (conceptsvc/_speedups.pyx:287) 12",
    _EXTRACT + ";FastPath__match (conceptsvc/_speedups.pyx:962);"
    "ExactMatcher._entry (conceptsvc/matcher.py:120);"
    "ConceptIndex.postings_of (conceptsvc/index.py:300) 3",
    # abbreviations, an extension built without debug information (names from the .so)
    _LOOP + ";Extractor.extract (conceptsvc/extractor.py:309);"
    "FastPath__extract (conceptsvc/_speedups.cpython-311-x86_64-linux-gnu.so);"
    "_speedups__find_definitions (conceptsvc/_speedups.cpython-311-x86_64-linux-gnu.so);"
    "_speedups__valid_short (conceptsvc/_speedups.cpython-311-x86_64-linux-gnu.so) 8",
    # negation, CPython's unicode comparison under it
    _EXTRACT + ";NegationScanner_negated_tokens (conceptsvc/_speedups.pyx:1145);"
    "PyUnicode_Compare (libpython3.11.so.1.0) 7",
    # profile: a Cython utility under the runner
    _EXTRACT + ";ProfileRunner_apply_ids (conceptsvc/_speedups.pyx:1343);"
    "ProfileRunner__slots (conceptsvc/_speedups.pyx:1380);"
    "__Pyx_CallUnboundCMethod1 (conceptsvc/_speedups.pyx:1380) 15",
    # glue: _extract's own time, overlaps, the output objects, a concept looked up for output
    _EXTRACT + " 6",
    _EXTRACT + ";_speedups__resolve_overlaps (conceptsvc/_speedups.pyx:744);malloc (libc.so.6) 2",
    _EXTRACT + ";FastPath__mention (conceptsvc/_speedups.pyx:866) 1",
    _EXTRACT + ";Extractor.concept_info (conceptsvc/extractor.py:420);"
    "ConceptIndex.concept (conceptsvc/index.py:250) 1",
    # approximate matching in Python, a stdlib frame under it
    _EXTRACT + ";ApproximateMatcher.match (conceptsvc/approximate.py:200);"
    "Counter.update (collections/__init__.py:670) 5",
]


def test_bench_extract_stage_shares_py_spy_innermost_stage_frame() -> None:
    shares, samples = stage_shares_py_spy(line + "\n" for line in _RAW)
    counts = {
        "tokenise+normalise": 40,
        "exact match": 15,
        "abbreviations+ambiguity": 8,
        "negation": 7,
        "profile": 15,
        "extractor (filter, overlaps, output)": 10,
        "approximate match": 5,
    }
    assert samples == sum(counts.values())
    assert shares == {k: round(v / samples, 4) for k, v in counts.items()}
    assert list(shares.values()) == sorted(shares.values(), reverse=True)  # largest first


def test_bench_extract_stage_shares_py_spy_ignores_other_lines() -> None:
    assert stage_shares_py_spy(["", "garbage", _LOOP + " x"]) == ({}, 0)
    # a module of the same name outside conceptsvc is not a stage (the stdlib has profile.py)
    shares, _ = stage_shares_py_spy([
        _EXTRACT + ";NegationScanner_negated_tokens (conceptsvc/_speedups.pyx:1145);"
        "Profile.run (/usr/lib/python3.11/profile.py:100) 4",
    ])
    assert shares == {"negation": 1.0}


def test_bench_extract_reports_rates_and_stages(tmp_path: Path, engine_index_path: Path) -> None:
    caps = tmp_path / "c.csv"
    # misspellings, so that approximate matching finds mentions (its compiled search alone is
    # too quick, warm, for half a second of sampling to be sure to land in it)
    rows = ["ID,Caption"] + [
        f'c{i},"Axial CT of the chest: lung cancer and no pleural effusion ({i}); lung canser, '
        + "pleural efusion, pleurel effusion, lunng cancer, " * 4 + '."'
        for i in range(30)
    ]
    caps.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "bench.json"
    rc = main([
        "--captions", str(caps), "--index", str(engine_index_path), "--repeat", "1",
        "--tokenizers", "--stage-seconds", "0.5", "--json", str(out),
    ])
    assert rc == 0
    tok, exact, approx = json.loads(out.read_text(encoding="utf-8"))
    assert set(tok["tokenizers"]) >= {"conceptsvc tokenize_spans (normalised, offsets)"}
    assert exact["mode"] == "exact" and approx["mode"] == "approximate"
    for r in (exact, approx):
        assert r["captions"] == 30
        assert r["captions_per_s_cpu"] > 0 and r["cold_captions_per_s_cpu"] > 0
        assert "stage_profile_error" not in r, r.get("stage_profile_error")
        assert abs(sum(r["stage_shares"].values()) - 1.0) < 0.01
    assert "approximate match" in approx["stage_shares"]


def test_bench_extract_reference_stages_by_cprofile(engine_index_path: Path) -> None:
    reference = Extractor(ConceptIndex.load(engine_index_path), engine="reference")
    captions = [("c1", "Chest CT: lung cancer, no pleural effusion.")]
    r = bench(reference, captions, ExtractOptions(), repeat=1, reference=True)
    assert r["engine"] == "pure Python (reference)" and r["stage_profiler"] == "cProfile"
    assert abs(sum(r["stage_shares"].values()) - 1.0) < 0.01


def test_bench_extract_compiled_stages_by_py_spy_on_demo_sample(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main([
        "--captions", str(DEMO_CAPTIONS), "--mode", "exact", "--repeat", "1",
        "--stage-seconds", "1", "--json", str(out),
    ]) == 0
    (r,) = json.loads(out.read_text(encoding="utf-8"))
    assert r["engine"] == "compiled"
    assert r["stage_profiler"] == "py-spy --native", r.get("stage_profile_error")
    shares = r["stage_shares"]
    assert set(shares) == {
        "tokenise+normalise", "exact match", "abbreviations+ambiguity", "negation", "profile",
        "extractor (filter, overlaps, output)",
    }
    assert abs(sum(shares.values()) - 1.0) < 0.01
    assert r["stage_samples"] >= 100


def test_bench_extract_py_spy_child_failure_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    r = profile_stages_py_spy(["--captions", str(missing), "--mode", "exact"], seconds=0.1)
    assert "stage_shares" not in r
    assert "cannot read captions file" in r["stage_profile_error"]
