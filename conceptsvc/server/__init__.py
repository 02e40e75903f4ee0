"""The gRPC service: servicers (``servicer``), status mapping (``status``), authentication
(``auth``) and the process model (``app``)."""

from __future__ import annotations

from conceptsvc.server.app import ConceptServer, Supervisor, create_server, run_worker, serve

__all__ = ["ConceptServer", "Supervisor", "create_server", "run_worker", "serve"]
