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
  benchmark machine is shared); also the first request of the fresh extractor, a first
  ``search`` ("pleural efusion", approximate beyond exact hits) and the process's peak RSS;
* the share of time per pipeline stage — tokenisation, matching, approximate matching,
  abbreviations, negation, profile, and the extractor's own glue. For the pure-Python reference,
  one pass under ``cProfile``, each function's time going to the stage of its module. For the
  compiled engine (``conceptsvc/_speedups.pyx``) cProfile would charge all the C time to the one
  Python frame around it, so a child process loops the warm extraction for ``--stage-seconds``
  under ``py-spy record --native``, and each sample goes to the stage of its innermost frame,
  native or Python, that belongs to one (:func:`stage_shares_py_spy`). The result says which
  profiler ran (``stage_profiler``), or why py-spy could not (``stage_profile_error``: not
  installed, ptrace refused), in which case the benchmark still reports its rates.

Usage::

    .venv/bin/python -m benchmarks.bench_extract \
        --captions ../shared/data/rocov2/valid_captions.csv
    .venv/bin/python -m benchmarks.bench_extract --captions FILE --mode approximate \
        --json out.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from benchmarks import CHECKOUT, ROCOV2
from conceptsvc.demo import CAPTIONS as _DEMO_CAPTIONS
from conceptsvc.evaluation import read_captions
from conceptsvc.extractor import Extractor
from conceptsvc.index import ConceptIndex
from conceptsvc.model import ExtractOptions
from conceptsvc.normalize import clear_token_memo

__all__ = [
    "bench",
    "compare_tokenizers",
    "main",
    "profile_stages_py_spy",
    "stage_shares",
    "stage_shares_py_spy",
]

log = logging.getLogger(__name__)

_DEFAULT_CAPTIONS = ROCOV2 / "valid_captions.csv"

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
_GLUE = _STAGES["extractor.py"]

# The compiled engine's functions as py-spy names them (from the extension's symbols; these
# names do not depend on debug information): a cdef method is "Class_method", a module-level
# function "_speedups_" + its name. Only entry points are named here: a frame of the extension
# that is not (helpers such as _valid_short or _gap_has, Cython's __Pyx_* utilities, inlined
# refcounting), like a frame of CPython (allocation, dict and set internals), or of index.py
# (postings and concept lookups on first use), counts for the nearest enclosing frame that is.
_NATIVE_STAGES = {
    "_scan_tokens": "tokenise+normalise",
    "FastPath__match": "exact match",
    "_may_define": "abbreviations+ambiguity",
    "_find_definitions": "abbreviations+ambiguity",
    "find_definitions": "abbreviations+ambiguity",
    "_apply_definitions": "abbreviations+ambiguity",
    "_resolve_overlaps": _GLUE,
}
# Any other method of these classes (FastPath: _extract, _mention, _annotation, ...).
_NATIVE_CLASS_STAGES = {
    "SpanTokenizer": "tokenise+normalise",
    "AsciiNormalizer": "tokenise+normalise",
    "_TokenTable": "tokenise+normalise",
    "_KeyTrie": "exact match",
    "NegationScanner": "negation",
    "ProfileRunner": "profile",
    "FastPath": _GLUE,
}
_NATIVE_MODULE = "_speedups"
# The child's loop (see profile_stages_py_spy): only samples taken inside it are counted.
_STAGE_LOOP = "_stage_loop"
_PY_SPY_RATE = 200  # samples per second (at 1,000 native unwinding stalls the child: 30x slower)


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


def _frame_stage(frame: str) -> str | None:
    """Stage of one py-spy frame (``name (file:line)``, ``name (library)`` or a bare address),
    or None if the frame belongs to none."""
    name, _, where = frame.rpartition(" (")
    if not name or not where.endswith(")"):
        return None
    file = Path(where[:-1].rsplit(":", 1)[0])
    if file.name.startswith(_NATIVE_MODULE + "."):  # .pyx with line numbers, else the .so
        name = name.removeprefix(_NATIVE_MODULE + "_")
        if name in _NATIVE_STAGES:
            return _NATIVE_STAGES[name]
        return next(
            (st for cls, st in _NATIVE_CLASS_STAGES.items() if name.startswith(cls + "_")), None
        )
    if file.parent.name == "conceptsvc":  # not a stdlib or library module of the same name
        return _STAGES.get(file.name)
    return None


def stage_shares_py_spy(raw: Iterable[str]) -> tuple[dict[str, float], int]:
    """Share of samples per stage, and the number of samples counted, from the lines of
    ``py-spy record --native --format raw`` (``outermost;...;innermost COUNT``).

    Only samples taken inside this module's extraction loop count (not the child's start-up,
    index loading or warm-up); each goes to the stage of its innermost frame that belongs to one
    (see ``_NATIVE_STAGES``). A sample in the loop with no stage frame is the loop's own
    iteration, not the engine's, and is left out, as cProfile leaves it out of the reference's
    shares.
    """
    totals: dict[str, int] = {}
    for line in raw:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        inside = next(
            (i for i, f in enumerate(frames)
             if f.startswith(_STAGE_LOOP + " (") and "bench_extract.py:" in f),
            None,
        )
        if inside is None:
            continue
        for frame in reversed(frames[inside + 1:]):
            stage = _frame_stage(frame)
            if stage is not None:
                totals[stage] = totals.get(stage, 0) + int(count)
                break
    samples = sum(totals.values())
    shares = {
        k: round(v / samples, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
    }
    return shares, samples


def _py_spy() -> str | None:
    """The py-spy of this interpreter's environment (the venv's bin/ need not be on PATH)."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _last_words(output: str) -> str:
    """The last line py-spy's child printed, else py-spy's own last line."""
    said = [ln.strip() for ln in output.splitlines() if ln.strip()]
    child = [ln for ln in said if not ln.startswith("py-spy>")]
    return (child or said or ["no output"])[-1]


def _run_py_spy(
    cmd: Sequence[str], env: dict[str, str], out: Path, done: Path, *, timeout: float
) -> tuple[str | None, str]:
    """Run ``py-spy record`` on its child and stop it while the child is still alive.

    py-spy 0.4.3 with ``--native`` can hang for good when the child it samples exits under it
    (seen here: the child a zombie, py-spy's threads waiting on each other, no output file;
    about 1 run in 10 of the stage test). So the child, when its loop is over, writes ``done``
    (its pid) and waits; py-spy is then stopped with SIGINT, as Ctrl-C would, which makes it
    write its samples (to ``out``, which ``cmd`` names) and end the child. Returns (an error
    or None, what both printed)."""
    log_path = out.with_name("py-spy.log")
    with log_path.open("w+", encoding="utf-8", errors="replace") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and not done.is_file():
                if time.monotonic() > deadline:
                    return f"py-spy did not finish in {timeout:.0f} s", ""
                time.sleep(0.05)
            if proc.poll() is None:  # the loop is over: stop sampling while the child lives
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            return "py-spy did not stop within 60 s of SIGINT", ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _end_child(done)
        log_file.seek(0)
        said = log_file.read()
    if proc.returncode != 0 or not out.is_file():
        return f"py-spy exited with status {proc.returncode}: {_last_words(said)}", said
    return None, said


def _end_child(done: Path) -> None:
    """Kill the stage child named in ``done`` if py-spy left it running."""
    try:
        pid = int(done.read_text(encoding="ascii"))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return  # no marker (the child ended before its loop was over), or the child is gone
    if b"--stage-done" in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def profile_stages_py_spy(child_args: Sequence[str], *, seconds: float) -> dict[str, Any]:
    """Stage shares of the compiled engine under ``py-spy record --native``.

    py-spy launches ``python -m benchmarks.bench_extract CHILD_ARGS --stage-loop SECONDS``
    (same index, captions and options; one mode) and samples it: launching the child needs only
    ptrace of one's own child, which is allowed where attaching to another process is not.
    Returns ``stage_profiler`` with either ``stage_shares`` and ``stage_samples``, or
    ``stage_profile_error`` saying why there are none; never raises for a profiler failure.
    """
    result: dict[str, Any] = {"stage_profiler": "py-spy --native"}
    py_spy = _py_spy()
    if py_spy is None:
        result["stage_profile_error"] = (
            "py-spy not found: it comes with the dev extra (make install), or pip install py-spy"
        )
        return result
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        out, done = Path(tmp) / "samples.txt", Path(tmp) / "loop-done"
        cmd = [
            py_spy, "record", "--native", "--rate", str(_PY_SPY_RATE), "--format", "raw",
            "--output", str(out), "--",
            sys.executable, "-m", "benchmarks.bench_extract", *child_args,
            "--stage-loop", str(seconds), "--stage-done", str(done),
        ]
        # The child imports this module from the checkout (it is not installed), whatever the
        # working directory; its paths are passed as given, so the cwd stays.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(CHECKOUT), env.get("PYTHONPATH", "")) if p
        )
        error, said = _run_py_spy(cmd, env, out, done, timeout=seconds + 600)
        if error is not None:
            result["stage_profile_error"] = error
            return result
        with out.open(encoding="utf-8", errors="replace") as f:
            shares, samples = stage_shares_py_spy(f)
    if not samples:
        # py-spy exits 0 when its child fails: the child's last words say why
        result["stage_profile_error"] = (
            f"py-spy recorded no sample inside the extraction loop: {_last_words(said)}"
        )
        return result
    result["stage_shares"] = shares
    result["stage_samples"] = samples
    return result


def _stage_loop(
    extract: Callable[..., Any],
    captions: Sequence[tuple[str, str]],
    options: ExtractOptions,
    seconds: float,
) -> int:
    """Warm extraction over ``captions`` for ``seconds`` (at least one pass), in the child of
    profile_stages_py_spy; the frame py-spy's samples are kept under. Returns the passes."""
    deadline = time.perf_counter() + seconds
    passes = 0
    while True:
        for id_, text in captions:
            extract(text, options, id=id_)
        passes += 1
        if time.perf_counter() >= deadline:
            return passes


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

    ``repeat=0`` measures the cold pass only (no warm-up, no warm passes).
    ``profile`` adds the cProfile stage shares for the pure-Python reference engine only; the
    compiled engine's are sampled in a child process (:func:`profile_stages_py_spy`).
    ``reference`` times the pure-Python reference pipeline instead of the compiled one
    (``extractor`` must then be a reference extractor too: ``engine="reference"``).
    """
    cold_extractor = Extractor(extractor.index, engine="reference" if reference else "auto")
    cold_extractor.check_options(options)  # the profile file is parsed outside the timing
    # Cold means cold: the process-wide normalisation caches are emptied too (a fresh
    # extractor has its own empty token table and memo tables).
    clear_token_memo()
    w0, c0 = time.perf_counter(), time.process_time()
    first_ms = None
    for id_, text in captions:
        cold_extractor.extract(text, options, id=id_)
        if first_ms is None:  # the first request of a fresh extractor (approximate: issue 14)
            first_ms = (time.perf_counter() - w0) * 1000
    cold_wall, cold_cpu = time.perf_counter() - w0, time.process_time() - c0
    t0 = time.perf_counter()
    Extractor(extractor.index, engine="reference" if reference else "auto").search(
        "pleural efusion", options=options)
    search_ms = (time.perf_counter() - t0) * 1000
    n = len(captions)
    result: dict[str, Any] = {
        "engine": "pure Python (reference)" if extractor.engine == "reference" else "compiled",
        "mode": options.mode,
        "profile": options.profile,
        "similarity": options.similarity,
        "threshold": options.threshold,
        "captions": n,
        "cold_captions_per_s_wall": round(n / cold_wall, 1),
        "cold_captions_per_s_cpu": round(n / cold_cpu, 1),
        "first_request_ms": round(first_ms, 2) if first_ms is not None else None,
        # SearchConcepts' ad-hoc lookup on a fresh extractor (approximate beyond exact hits)
        "first_search_ms": round(search_ms, 2),
    }
    if repeat == 0:
        result["max_rss_mb"] = _max_rss_mb()
        return result
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
    result |= {
        "captions_per_s_wall": round(n / best_wall, 1),
        "captions_per_s_cpu": round(n / best_cpu, 1),
        "median_us_per_caption": round(statistics.median(per_caption) / 1000, 1),
        "p95_us_per_caption": round(
            statistics.quantiles(per_caption, n=20)[-1] / 1000, 1
        ) if n >= 20 else None,
        "max_rss_mb": _max_rss_mb(),
    }
    if profile and extractor.engine == "reference":
        prof = cProfile.Profile()
        prof.enable()
        for id_, text in captions:
            extract(text, options, id=id_)
        prof.disable()
        result["stage_profiler"] = "cProfile"
        result["stage_shares"] = stage_shares(pstats.Stats(prof))
    return result


def _max_rss_mb() -> float:
    """This process's peak RSS so far (Linux reports ``ru_maxrss`` in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


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
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the stage profile (py-spy for the compiled engine, cProfile for "
                    "the reference)")
    ap.add_argument("--stage-seconds", type=float, default=5.0,
                    help="seconds of warm extraction sampled by py-spy for the compiled "
                    "engine's stage shares (default: 5)")
    # internal: the child that py-spy samples (see profile_stages_py_spy)
    ap.add_argument("--stage-loop", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    ap.add_argument("--stage-done", type=Path, metavar="PATH", help=argparse.SUPPRESS)
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
    if args.stage_loop is not None:
        _stage_child(args, extractor, captions)
    results: list[dict[str, Any]] = []
    if args.tokenizers:
        tok = compare_tokenizers([t for _, t in captions])
        results.append({"tokenizers": tok})
        print(json.dumps(tok, indent=2))
    for mode in args.mode or ["exact", "approximate"]:
        options = _options(args, mode)
        r = bench(extractor, captions, options, repeat=args.repeat, profile=not args.no_profile)
        if not args.no_profile and extractor.engine == "compiled":
            child = [
                "--captions", str(path), "--profile", args.profile, "--mode", mode,
                "--similarity", args.similarity, "--threshold", str(args.threshold),
            ]
            if args.index:
                child += ["--index", str(args.index)]
            r.update(profile_stages_py_spy(child, seconds=args.stage_seconds))
            if "stage_profile_error" in r:
                log.warning("no stage shares for %s mode: %s", mode, r["stage_profile_error"])
        results.append(r)
        print(json.dumps(r, indent=2))
        if args.reference and extractor.engine == "compiled":
            ref = Extractor(index, engine="reference")
            r = bench(ref, captions, options, repeat=1, profile=False, reference=True)
            results.append(r)
            print(json.dumps(r, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def _options(args: argparse.Namespace, mode: str) -> ExtractOptions:
    return ExtractOptions(
        mode=mode, similarity=args.similarity, threshold=args.threshold, profile=args.profile
    )


def _stage_child(
    args: argparse.Namespace, extractor: Extractor, captions: Sequence[tuple[str, str]]
) -> NoReturn:
    """``--stage-loop``: one warm-up pass, then :func:`_stage_loop`; never returns."""
    if not args.mode or len(args.mode) != 1:
        raise SystemExit("--stage-loop needs exactly one --mode")
    options = _options(args, args.mode[0])
    extractor.check_options(options)
    for id_, text in captions:
        extractor.extract(text, options, id=id_)
    passes = _stage_loop(extractor.extract, captions, options, args.stage_loop)
    log.info("stage loop: %d passes over %d captions", passes, len(captions))
    logging.shutdown()
    sys.stdout.flush()
    if args.stage_done is not None:
        # say the loop is over and wait to be ended by py-spy (see _run_py_spy); sleeping,
        # so that no sample lands in the loop
        args.stage_done.write_text(str(os.getpid()), encoding="ascii")
        time.sleep(600)
    # Skip the interpreter's teardown: freeing the index under ptrace costs seconds of
    # sampling that are thrown away.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
