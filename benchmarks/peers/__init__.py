"""The tools conceptsvc is compared with — QuickUMLS, MedCAT 2, mmlite — run on our dictionary.

Run these modules with ``.venv-peers/bin/python`` (``make peers`` creates that venv from
``requirements.txt``, separate from ``.venv`` so that the peers' pins never meet ours; conceptsvc
is installed there with ``--no-deps``, and only its standard-library modules are imported here).
These modules are not installed anywhere: they run from the checkout's root (``-m`` puts the
working directory on the path; :mod:`benchmarks.bench_peers` also sets ``PYTHONPATH``).
The entry point is :mod:`benchmarks.peers.run`; :mod:`benchmarks.bench_peers` drives it
from the main venv and scores the predictions with :mod:`conceptsvc.evaluation`.

Each peer module offers the same small protocol (:class:`~benchmarks.peers.run.Peer`):
build its dictionary from a META directory of RRF files (timed), then annotate one caption at a
time and return CUIs. Every peer sees the same rows: English atoms, suppressible ones (O, E, Y)
dropped — the defaults of ``conceptsvc index build``.
"""
