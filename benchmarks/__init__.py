"""Benchmarks, the soak and the peer tools, run from a checkout (``python -m benchmarks.bench``).

They live beside the package, not in it: ``pip install conceptsvc`` does not install them
(``[tool.setuptools.packages.find]`` takes ``conceptsvc*`` only), so they can rely on the checkout
around them. Their default paths are computed here, once; every one is an argument too.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BENCH_OUT", "CHECKOUT", "ROCOV2", "venv_python"]

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
