"""Alternative matching backends behind the :class:`~conceptsvc.extractor.Extractor` interface.

Each backend needs an optional extra and imports it only when used, so importing this package
is cheap and works without the extras:

- :class:`QuickUMLSBackend` (``conceptsvc[quickumls]``): QuickUMLS's matching on an index built
  from the same RRF files (:func:`build_quickumls_index`) or made by QuickUMLS's installer.
"""

from __future__ import annotations

from conceptsvc.backends.quickumls import (
    QuickUMLSBackend,
    QuickUMLSBuildReport,
    build_quickumls_index,
    quickumls_available,
)

__all__ = [
    "QuickUMLSBackend",
    "QuickUMLSBuildReport",
    "build_quickumls_index",
    "quickumls_available",
]
