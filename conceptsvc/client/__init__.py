"""Client side of conceptsvc: the typed service client and the tools built on it.

``ConceptClient`` (``service``) talks to the gRPC service and returns the domain types of
:mod:`conceptsvc.model`; :mod:`conceptsvc.wire` maps protobuf messages to and from them, and
``channel`` holds what every client needs to reach a service (TLS, token, effective options).
Its errors are :class:`~conceptsvc.errors.ClientError` and its subclasses.
"""

from __future__ import annotations

from conceptsvc.client.service import ConceptClient

__all__ = ["ConceptClient"]
