"""medspaCy's ConText, the peer ``make bench-context`` compares conceptsvc's context with.

Run :mod:`benchmarks.context_peer.run` with ``.venv-context/bin/python`` (``make context-peer``
creates that venv from ``requirements.txt``: medspaCy only, never QuickUMLS, and not conceptsvc
either — the driver needs only spaCy, medspaCy and :mod:`benchmarks.context_peer.annotations`).
:mod:`benchmarks.bench_context` runs it in a subprocess and scores its JSON.
"""
