"""``make demo``: the main job, end to end, on the embedded demo dictionary.

What a dataset builder would do, in the order they would do it, each step the real command:

1. build the demo index from the packaged RRF (cached after the first time);
2. start the service as its own process (``conceptsvc serve``, embedded dictionary, in-process
   cache only, a free port) and wait until its health check says SERVING;
3. annotate the shipped demo captions through it with ``conceptsvc annotate`` (profile rocov2,
   ImageCLEF CSV + JSONL outputs, ``--report``), which prints the corpus report;
4. score the result against the shipped ROCOv2 gold with ``conceptsvc evaluate``;
5. stop the service gracefully (SIGTERM).

Outputs go to ``demo-out/`` (``--out-dir``); the commands are printed so they can be rerun by
hand. Exit status: 0 when every step succeeded.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from conceptsvc.server.launcher import READY_RE

__all__ = ["main"]

DATA = Path(__file__).parent / "data" / "demo"
CAPTIONS = DATA / "captions.csv"
GOLD = DATA / "concepts.csv"
GOLD_MANUAL = DATA / "concepts_manual.csv"
# Files the demo writes (removed before a run, so that each run really annotates).
_OUTPUTS = (
    "demo.csv",
    "demo.jsonl",
    "demo.csv.manifest.json",
    "demo.csv.errors.jsonl",
    "demo.csv.report.md",
    "demo.csv.report.html",
    "demo.csv.report-concepts-per-caption.png",
    "demo.csv.report-top-concepts.png",
)


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.monotonic()


def _done(t0: float) -> None:
    print(f"    ({time.monotonic() - t0:.1f} s)", flush=True)


def _command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "conceptsvc.cli", *args]


def _show(args: Sequence[str]) -> None:
    print("$ conceptsvc " + " ".join(args), flush=True)


def _start_service(workers: int, timeout: float) -> tuple[subprocess.Popen[str], str]:
    args = ["serve", "--port", "0", "--host", "127.0.0.1", "--workers", str(workers)]
    _show(args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCEPTSVC_")
           or k == "CONCEPTSVC_CACHE_DIR"}  # the embedded dictionary, whatever the shell says
    proc = subprocess.Popen(
        _command(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:  # forward the server's output; notice the ready line
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"    [service] {line.rstrip()}", flush=True)
            m = READY_RE.search(line)
            if m and not found:
                found.append(f"127.0.0.1:{m.group(2)}")
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        raise RuntimeError(f"the service did not start within {timeout:.0f} s")
    return proc, found[0]


def _stop_service(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conceptsvc.demo", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--out-dir", default="demo-out", help="where the outputs go")
    parser.add_argument("--workers", type=int, default=2, help="service worker processes")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    started = time.monotonic()

    t0 = _step("1. Build the demo index from the packaged RRF (cached after the first run)")
    from conceptsvc.embedded import demo_index_path
    from conceptsvc.index import ConceptIndex

    path = demo_index_path()
    ix = ConceptIndex.load(path, verify=False)
    print(f"    {path}: {len(ix)} concepts, {len(ix.key_ids)} keys, "
          f"content hash {ix.content_hash[:12]}")
    _done(t0)

    t0 = _step("2. Start the service (embedded dictionary, in-process cache) and wait for health")
    proc, target = _start_service(args.workers, timeout=90)
    try:
        from conceptsvc.client import ConceptClient

        with ConceptClient(target) as client:
            client.wait_until_serving(60)
            health = client.health()
        _show(["health", "--target", target])
        print(f"    {health}")
        _done(t0)

        t0 = _step("3. Annotate the demo captions through the service, with a corpus report")
        out = out_dir / "demo.csv"
        annotate = [
            "annotate", str(CAPTIONS), "--out", str(out), "--format", "csv",
            "--format", f"jsonl={out_dir / 'demo.jsonl'}", "--target", target,
            "--profile", "rocov2", "--report", "--progress", "log", "--progress-interval", "2",
        ]
        _show(annotate)
        rc = subprocess.run(_command(annotate), check=False).returncode
        if rc != 0:
            print(f"conceptsvc demo: annotate failed (exit {rc})", file=sys.stderr)
            return rc
        _done(t0)

        t0 = _step("4. Score against the shipped ROCOv2 gold (ImageCLEFmedical measures)")
        evaluate = ["evaluate", "--pred", str(out), "--gold", str(GOLD), "--manual",
                    str(GOLD_MANUAL)]
        _show(evaluate)
        rc = subprocess.run(_command(evaluate), check=False).returncode
        if rc != 0:
            print(f"conceptsvc demo: evaluate failed (exit {rc})", file=sys.stderr)
            return rc
        _done(t0)
    finally:
        t0 = _step("5. Stop the service (SIGTERM: drain, then exit)")
        rc_service = _stop_service(proc)
        print(f"    service exited with status {rc_service}")
        _done(t0)
    print(f"\nDemo finished in {time.monotonic() - started:.1f} s. Outputs in {out_dir}/: "
          "demo.csv (ImageCLEF), demo.jsonl (mentions), demo.csv.manifest.json, "
          "demo.csv.report.md, demo.csv.report.html (open it in a browser) and the report's "
          "two PNG plots.")
    return 0 if rc_service == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
