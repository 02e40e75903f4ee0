"""Every error conceptsvc raises on purpose, with a stable code and a next step.

The whole tree, so callers can catch at the level they care about::

    ConceptsvcError                 base; ``code`` is stable (E1xx …), ``str()`` says what to do
    ├── UsageError                  the command line asks for something impossible (E0xx)
    ├── ConfigError                 invalid settings (E1xx)
    ├── DictionaryError             reading dictionaries: RRF, JSONL, TSV (E2xx)
    │   └── MalformedRowError       one bad row; carries ``path`` and ``line``
    ├── SemanticNetworkError        unknown semantic type or group (E3xx); carries ``suggestions``
    ├── ConceptIndexError           compiled index missing, corrupt or incompatible (E4xx)
    ├── ExtractionError             bad per-request options for the extractor (E5xx)
    │   └── InputTooLargeError      text over the configured limit
    ├── ClientError                 batch/lookup client failures (E6xx)
    └── EvaluationError             scoring options the evaluator cannot honour (E7xx)

The gRPC servicer maps these to status codes in one place (``server/``); nothing else
translates them. ``conceptsvc`` prints any of them as one line with its code and exits 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ClientError",
    "ConceptIndexError",
    "ConceptsvcError",
    "ConfigError",
    "DictionaryError",
    "EvaluationError",
    "ExtractionError",
    "InputTooLargeError",
    "MalformedRowError",
    "SemanticNetworkError",
    "UsageError",
]


class ConceptsvcError(Exception):
    """Base class. ``code`` is stable across releases so that scripts can match on it."""

    code = "E000"

    def __init__(self, message: str) -> None:
        super().__init__(f"[{self.code}] {message}")
        self.message = message


class UsageError(ConceptsvcError):
    """Command-line arguments that cannot work together (argparse catches the rest)."""

    code = "E001"


class ConfigError(ConceptsvcError):
    code = "E100"


class DictionaryError(ConceptsvcError):
    code = "E200"


class MalformedRowError(DictionaryError):
    """A row that does not have the shape its file promises."""

    code = "E201"

    def __init__(self, path: Path | str, line: int, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        super().__init__(
            f"{path}:{line}: {problem}. Fix the row, or rebuild with `--on-error skip` "
            "to skip malformed rows and count them in the build report."
        )


class SemanticNetworkError(ConceptsvcError):
    code = "E300"

    def __init__(self, name: str, suggestions: Sequence[str] = ()) -> None:
        self.name = name
        self.suggestions = tuple(suggestions)
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(
            f"unknown semantic type or group {name!r}.{hint} "
            "Give a TUI (T047), an abbreviation (dsyn), a type name or a group (DISO); "
            "`conceptsvc semtypes` lists them all."
        )


class ConceptIndexError(ConceptsvcError):
    code = "E400"


class ExtractionError(ConceptsvcError):
    code = "E500"


class InputTooLargeError(ExtractionError):
    code = "E501"


class ClientError(ConceptsvcError):
    code = "E600"


class EvaluationError(ConceptsvcError):
    code = "E700"
