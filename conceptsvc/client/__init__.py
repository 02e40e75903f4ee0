"""Client side of conceptsvc: the typed service client and the tools built on it.

``ConceptClient`` (``service``) talks to the gRPC service and returns the domain types of
:mod:`conceptsvc.model`; :mod:`conceptsvc.wire` maps protobuf messages to and from them, and
``channel`` holds what every client needs to reach a service (TLS, token, effective options).
Its errors are :class:`~conceptsvc.errors.ClientError` and its subclasses, but for arguments
the engine would refuse in-process too, which raise what the engine raises before anything is
sent: items of the wrong shape :class:`~conceptsvc.errors.ExtractArgumentError`, as
``Extractor.extract_batch`` does.

``ConceptClient`` is imported on first use: the commands built on the client modules
(``conceptsvc annotate`` uses ``batch``, ``lookup`` uses ``arguments``) should not pay for the
typed client's imports when they do not use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conceptsvc.client.service import ConceptClient

__all__ = ["ConceptClient"]


def __getattr__(name: str) -> Any:
    # An explicit branch, not getattr(module, name): no attribute is looked up by a computed
    # name (tests/test_security.py holds the package to that).
    if name == "ConceptClient":
        from conceptsvc.client.service import ConceptClient

        return ConceptClient
    raise AttributeError(f"module 'conceptsvc.client' has no attribute {name!r}")
