"""Developer tools run from a checkout (``make proto``, ``make audit``), not part of the package.

``pip install conceptsvc`` does not install them (``[tool.setuptools.packages.find]`` takes
``conceptsvc*`` only), so they can rely on the checkout around them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHECKOUT"]

#: The checkout root (this package is never installed, so its parent is always the checkout).
CHECKOUT = Path(__file__).resolve().parents[1]
