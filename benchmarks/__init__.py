"""Benchmarks, the soak and the peer tools, run from a checkout (``python -m benchmarks.bench``).

They live beside the package, not in it: ``pip install conceptsvc`` does not install them
(``[tool.setuptools.packages.find]`` takes ``conceptsvc*`` only), so they can rely on the checkout
around them. Their default paths are computed here, once; every one is an argument too.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BENCH_OUT", "CHECKOUT", "ROCOV2", "run_in_venv", "venv_python"]

log = logging.getLogger(__name__)

#: The checkout root (this package is never installed, so its parent is always the checkout).
CHECKOUT = Path(__file__).resolve().parents[1]
#: Where benchmark runs write their work files and results (git-ignored).
BENCH_OUT = CHECKOUT / "bench-out"
#: The ROCOv2 reference data sits beside the checkout, in ``../shared/data/rocov2``.
ROCOV2 = CHECKOUT.parent / "shared" / "data" / "rocov2"


def venv_python(python: str | Path | None, venv: str, why: str) -> Path:
    """The interpreter of a peer tool's own venv (``python`` if given, else ``CHECKOUT/venv``);
    a clear error, saying ``why`` (how to make it), when it is not there."""
    # Imported here: the peers' own venvs import this package and need not have conceptsvc's
    # dependencies.
    from conceptsvc.errors import ConfigError

    path = Path(python) if python is not None else CHECKOUT / venv / "bin" / "python"
    if not path.exists():
        raise ConfigError(f"{path} not found: {why}")
    return path


def run_in_venv(
    python: Path, module: str, args: Sequence[str], *, timeout: float, what: str
) -> str:
    """Run ``python -m module args`` (a fixed module of this checkout, in a peer tool's venv)
    from the checkout, and return its standard output; a ConfigError naming ``what``, with the
    tail of its standard error, when it fails."""
    from conceptsvc.errors import ConfigError  # see venv_python

    env = dict(os.environ)
    # This checkout's code, whichever checkout the peer's venv was installed from.
    env["PYTHONPATH"] = str(CHECKOUT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [str(python), "-m", module, *args]
    log.info("running %s", " ".join(cmd))
    # The module is fixed by the caller; the arguments are built there, not taken from a client.
    proc = subprocess.run(
        cmd, cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ConfigError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout
