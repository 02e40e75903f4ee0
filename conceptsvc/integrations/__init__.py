"""Adapters that run conceptsvc inside other people's data tools (optional extras).

Each submodule imports its tool lazily and names the extra to install when it is missing:
``conceptsvc.integrations.spark`` needs ``pip install 'conceptsvc[spark]'``.
"""

from __future__ import annotations

__all__: list[str] = []
