"""Extraction speed benchmark: captions/s, median µs per caption, and time per pipeline stage.

Runs the in-process :class:`~conceptsvc.extractor.Extractor` over a captions file (an
``ID,Caption`` CSV, e.g. the ROCOv2 validation captions, given by path) in one process:

* a *cold* pass with a fresh extractor (empty memo tables, as when a corpus is annotated once:
  every approximate-matching window is searched for the first time, except those repeated
  earlier in the corpus) — the figure to compare with peers that keep no memo;
* ``--repeat`` *warm* passes over the same captions (memo tables as a long-running service has
  them; for approximate mode this flatters, since every window has been seen); each caption is
  timed individually (``perf_counter_ns``) for the median, and the pass as a whole for
  captions/s (best pass reported, with process CPU time next to wall time because the
  benchmark machine is shared);
* one pass under ``cProfile``, with the time attributed to the pipeline stage (module) whose
  code ran — tokenisation, matching, approximate matching, abbreviations, negation, profile,
  and the extractor's own glue — shown as shares of the profiled total.

Usage::

    .venv/bin/python -m conceptsvc.dev.bench_extract \
        --captions ../shared/data/rocov2/valid_captions.csv
    .venv/bin/python -m conceptsvc.dev.bench_extract --captions FILE --mode approximate \
        --json out.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import pstats
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conceptsvc.evaluation import read_captions
from conceptsvc.extractor import ExtractOptions, Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.normalize import normalize_token

__all__ = ["bench", "compare_tokenizers", "main", "stage_shares"]

log = logging.getLogger(__name__)

_DEFAULT_CAPTIONS = Path("/work/shared/data/rocov2/valid_captions.csv")
_DEMO_CAPTIONS = Path(__file__).resolve().parent.parent / "data" / "demo" / "captions.csv"

# Module file name → pipeline stage (see conceptsvc/extractor.py for the order).
_STAGES = {
    "normalize.py": "tokenise+normalise",
    "matcher.py": "exact match",
    "approximate.py": "approximate match",
    "abbreviations.py": "abbreviations+ambiguity",
    "negation.py": "negation",
    "profile.py": "profile",
    "extractor.py": "extractor (filter, overlaps, output)",
    "model.py": "extractor (filter, overlaps, output)",
}


def stage_shares(stats: pstats.Stats) -> dict[str, float]:
    """Share of profiled time per stage: each function's *own* time goes to its module's stage;
    builtins (dict lookups, regex, str methods) count for the stage of their caller."""
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    totals: dict[str, float] = {}
    for (filename, _line, _name), (_cc, _nc, tt, _ct, callers) in raw.items():
        stage = _STAGES.get(Path(filename).name)
        if stage is not None:
            totals[stage] = totals.get(stage, 0.0) + tt
            continue
        # a builtin or library function: split its time among its callers' stages
        caller_tt = {k: v[2] for k, v in callers.items()} if callers else {}
        whole = sum(caller_tt.values())
        for (cfile, _cl, _cn), share_tt in caller_tt.items():
            cstage = _STAGES.get(Path(cfile).name, "other")
            totals[cstage] = totals.get(cstage, 0.0) + (tt * share_tt / whole if whole else 0.0)
        if not caller_tt:
            totals["other"] = totals.get("other", 0.0) + tt
    grand = sum(totals.values()) or 1.0
    return {k: round(v / grand, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def bench(
    extractor: Extractor,
    captions: Sequence[tuple[str, str]],
    options: ExtractOptions,
    *,
    repeat: int = 3,
    profile: bool = True,
    reference: bool = False,
) -> dict[str, Any]:
    """Time ``extractor`` over ``captions``; see the module docstring for what is measured.

    ``reference`` times the pure-Python reference pipeline instead of the compiled one
    (``extractor`` must then be a reference extractor too: ``_fast`` set to None).
    """
    cold_extractor = Extractor(extractor.index)
    if reference:
        cold_extractor._fast = None
    cold_extractor.check_options(options)  # the profile file is parsed outside the timing
    # Cold means cold: the process-wide normalisation caches are emptied too (a fresh
    # extractor has its own empty token table and memo tables).
    normalize_token.cache_clear()
    w0, c0 = time.perf_counter(), time.process_time()
    for id_, text in captions:
        cold_extractor.extract(text, options, id=id_)
    cold_wall, cold_cpu = time.perf_counter() - w0, time.process_time() - c0
    extract = extractor.extract
    for id_, text in captions:  # warm-up
        extract(text, options, id=id_)
    best_wall = best_cpu = float("inf")
    per_caption: list[int] = []
    for _ in range(repeat):
        times: list[int] = []
        w0, c0 = time.perf_counter(), time.process_time()
        for id_, text in captions:
            t0 = time.perf_counter_ns()
            extract(text, options, id=id_)
            times.append(time.perf_counter_ns() - t0)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if wall < best_wall:
            best_wall, per_caption = wall, times
        best_cpu = min(best_cpu, cpu)
    n = len(captions)
    result: dict[str, Any] = {
        "engine": "pure Python (reference)" if extractor._fast is None else "compiled",
        "mode": options.mode,
        "profile": options.profile,
        "similarity": options.similarity,
        "threshold": options.threshold,
        "captions": n,
        "cold_captions_per_s_wall": round(n / cold_wall, 1),
        "cold_captions_per_s_cpu": round(n / cold_cpu, 1),
        "captions_per_s_wall": round(n / best_wall, 1),
        "captions_per_s_cpu": round(n / best_cpu, 1),
        "median_us_per_caption": round(statistics.median(per_caption) / 1000, 1),
        "p95_us_per_caption": round(
            statistics.quantiles(per_caption, n=20)[-1] / 1000, 1
        ) if n >= 20 else None,
    }
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for id_, text in captions:
            extract(text, options, id=id_)
        prof.disable()
        result["stage_shares"] = stage_shares(pstats.Stats(prof))
    return result


def compare_tokenizers(texts: Sequence[str], *, repeat: int = 3) -> dict[str, Any]:
    """µs per caption (best of ``repeat``, process CPU time) for the tokenisers we could use.

    ``tokenize_spans`` is what the extractor runs (tokens + normalisation + offsets);
    ``tokenize`` is the same with a Token object per token; spaCy's blank English tokenizer only
    tokenises (no normalisation), and still costs more. Token counts show the two tokenisations
    differ: spaCy keeps punctuation tokens and splits differently ("X-ray" is 3 tokens there).
    """
    import spacy

    from conceptsvc.normalize import tokenize, tokenize_spans

    nlp = spacy.blank("en")
    candidates: dict[str, Any] = {
        "conceptsvc tokenize_spans (normalised, offsets)": tokenize_spans,
        "conceptsvc tokenize (Token objects)": tokenize,
        "spaCy blank('en') tokenizer (no normalisation)": nlp.tokenizer,
    }
    out: dict[str, Any] = {}
    for name, fn in candidates.items():
        for t in texts:
            fn(t)  # warm caches
        best = float("inf")
        for _ in range(repeat):
            c0 = time.process_time()
            for t in texts:
                fn(t)
            best = min(best, time.process_time() - c0)
        n_tokens = sum(len(fn(t)) if name.startswith("spaCy") or "Token" in name
                       else len(fn(t)[0]) for t in texts)
        out[name] = {
            "us_per_caption_cpu": round(best / len(texts) * 1e6, 1),
            "tokens_per_caption": round(n_tokens / len(texts), 1),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=Path, default=_DEFAULT_CAPTIONS,
                    help="ID,Caption CSV (default: the ROCOv2 validation captions of the "
                    "reference data, else the packaged demo sample)")
    ap.add_argument("--index", help="index directory (default: the embedded demo dictionary)")
    ap.add_argument("--profile", default="rocov2")
    ap.add_argument("--mode", action="append", choices=["exact", "approximate"],
                    help="mode(s) to run (default: both)")
    ap.add_argument("--similarity", default="jaccard")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile stage pass")
    ap.add_argument("--tokenizers", action="store_true",
                    help="also compare tokenisers (ours vs spaCy's blank English tokenizer)")
    ap.add_argument("--reference", action="store_true",
                    help="also time the pure-Python reference pipeline (the compiled path's "
                    "speed-up; CONCEPTSVC_PURE_PYTHON=1 times only the reference)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.index:
        index = ConceptIndex.load(args.index)
    else:
        from conceptsvc.embedded import demo_index

        index = demo_index()
    path = args.captions
    if not path.is_file() and path == _DEFAULT_CAPTIONS:
        path = _DEMO_CAPTIONS
        log.info("%s not found; benchmarking the packaged demo sample %s", args.captions, path)
    captions = read_captions(path)
    extractor = Extractor(index)
    results: list[dict[str, Any]] = []
    if args.tokenizers:
        tok = compare_tokenizers([t for _, t in captions])
        results.append({"tokenizers": tok})
        print(json.dumps(tok, indent=2))
    for mode in args.mode or ["exact", "approximate"]:
        options = ExtractOptions(
            mode=mode,
            similarity=args.similarity,
            threshold=args.threshold,
            profile=args.profile,
        )
        r = bench(extractor, captions, options, repeat=args.repeat, profile=not args.no_profile)
        results.append(r)
        print(json.dumps(r, indent=2))
        if args.reference and extractor._fast is not None:
            ref = Extractor(index)
            ref._fast = None
            r = bench(ref, captions, options, repeat=1, profile=False, reference=True)
            results.append(r)
            print(json.dumps(r, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
