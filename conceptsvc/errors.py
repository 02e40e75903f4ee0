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
    │   ├── InputTooLargeError      text over the configured limit
    │   │   └── ReplyFullError      a batch item whose answer did not fit beside the others in
    │   │                           the reply (E503): send it again in a smaller batch
    │   └── ExtractArgumentError    a Python call passed a value of a shape the engine cannot
    │                               take (E502); also a ``TypeError``
    ├── ClientError                 batch/lookup client failures (E6xx)
    │   ├── ServiceCallError        an RPC failed with a gRPC status (E610); ``status``, ``details``
    │   │   └── ConceptNotFoundError a CUI the dictionary does not have (E623): GetConcept's
    │   │                           NOT_FOUND, or an in-process lookup's miss; carries ``cui``
    │   ├── BadInputError           malformed input records, nothing sent (E620); carries ``bad``
    │   ├── RunIncompatibleError    results of one run would mix indexes (E621)
    │   │   └── IndexChangedError   the service's index changed during a run (E627)
    │   ├── ServiceUnreachableError no service answers at the target(s) (E622)
    │   ├── OutputClashError        an output would overwrite the input, another output or a
    │   │                           run's side file (E624); nothing was started
    │   ├── OutputFormatError       an output's extension names another format (E625)
    │   ├── EmptyCorpusError        the input holds no captions (E626), unless allowed
    │   └── MissingExtraError       an optional dependency the request needs is missing (E628)
    └── EvaluationError             scoring options the evaluator cannot honour (E7xx)

The gRPC servicer maps these to status codes in one place (``server/``); nothing else
translates them. ``conceptsvc`` prints any of them as one line with its code and exits 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

__all__ = [
    "BadInputError",
    "ClientError",
    "ConceptIndexError",
    "ConceptNotFoundError",
    "ConceptsvcError",
    "ConfigError",
    "DictionaryError",
    "EmptyCorpusError",
    "EvaluationError",
    "ExtractArgumentError",
    "ExtractionError",
    "IndexChangedError",
    "InputTooLargeError",
    "MalformedRowError",
    "MissingExtraError",
    "OutputClashError",
    "OutputFormatError",
    "ReplyFullError",
    "RunIncompatibleError",
    "SemanticNetworkError",
    "ServiceCallError",
    "ServiceUnreachableError",
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

    BUILD_ADVICE = ("Fix the row, or rebuild with `--on-error skip` to skip malformed rows and "
                    "count them in the build report.")

    def __init__(
        self, path: Path | str, line: int, problem: str, advice: str | None = None
    ) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        super().__init__(f"{path}:{line}: {problem}. {advice or self.BUILD_ADVICE}")


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


class ReplyFullError(InputTooLargeError):
    """An AnnotateBatch item answered with this error instead of its result, because the
    reply held as much as the message limit allows; nothing is wrong with the item."""

    code = "E503"


class ExtractArgumentError(ExtractionError, TypeError):
    """A value of the wrong shape passed to the Python API (``ExtractOptions``,
    ``extract_batch``); the message shows the call that works. A ``TypeError`` too, because
    that is what Python code expects of a wrong argument type."""

    code = "E502"


class ClientError(ConceptsvcError):
    code = "E600"


class ServiceCallError(ClientError):
    """An RPC failed with a gRPC status (after the client's retries, if it was retryable).

    ``status`` is the gRPC status name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"`` …) and
    ``details`` the server's message; ``hint`` the caller's own advice ("" when it had none,
    and then the message carries the status's general advice).
    """

    code = "E610"

    def __init__(self, method: str, status: str, details: str, hint: str = "") -> None:
        """``hint`` (" " and a sentence) replaces the status's general advice when the caller
        knows better (a TLS mismatch, a draining server)."""
        self.method = method
        self.status = status
        self.details = details
        self.hint = hint
        hint = hint or {
            "UNAVAILABLE": (
                " Is the service running and reachable (check --target), or still loading its "
                "index?"
            ),
            "UNAUTHENTICATED": " Pass the service's token (--token / CONCEPTSVC_TOKEN).",
            "DEADLINE_EXCEEDED": " Raise the deadline (--timeout) or send smaller batches.",
        }.get(status, "")
        super().__init__(f"{method} failed: {status}: {details.rstrip('.')}.{hint}")


class _BadRecord(Protocol):
    """What :class:`BadInputError` needs of a bad record (``client.corpus.BadRecord``)."""

    @property
    def line(self) -> int: ...
    @property
    def problem(self) -> str: ...
    def location(self, source: str) -> str: ...


# Bad records named in BadInputError's message; the full list is its ``bad`` (and the errors
# file of the run).
_MAX_SHOWN = 20


class BadInputError(ClientError):
    """The input has malformed records and the run was asked to stop before sending anything."""

    code = "E620"

    def __init__(self, source: str, bad: Sequence[_BadRecord]) -> None:
        self.source = source
        self.bad = bad
        shown = "\n".join(f"  {b.location(source)}: {b.problem}" for b in bad[:_MAX_SHOWN])
        more = f"\n  ... and {len(bad) - _MAX_SHOWN} more" if len(bad) > _MAX_SHOWN else ""
        super().__init__(
            f"{source}: {len(bad)} malformed record(s); nothing was sent.\n{shown}{more}\n"
            "Fix them, or rerun with `--on-bad-input skip` to annotate the rest and record the "
            "skipped ones in the errors file."
        )


class RunIncompatibleError(ClientError):
    """The work directory holds results that cannot be mixed with this run's."""

    code = "E621"


class IndexChangedError(RunIncompatibleError):
    """The service answered part of a run with another index than the rest (a reload, a
    deployment): the run stopped rather than write a corpus made by two dictionaries.

    ``run_hash`` is the index the run's results so far come from, ``new_hash`` the one that
    answered since; ``done`` how many captions the journal holds (all of ``run_hash``).
    """

    code = "E627"

    def __init__(self, run_hash: str, new_hash: str, done: int, work: str) -> None:
        self.run_hash = run_hash
        self.new_hash = new_hash
        self.done = done
        super().__init__(
            f"the service's index changed during the run, from {run_hash[:12]} to "
            f"{new_hash[:12]}; the run stopped so that its output does not mix the two. "
            f"{work} keeps the {done} result(s) made with {run_hash[:12]}. Either rerun with "
            f"`--on-index-change redo` to annotate them again with {new_hash[:12]} (the output "
            f"is then all {new_hash[:12]}), or point --target at a service with "
            f"{run_hash[:12]} and rerun to finish the run with it."
        )


class ServiceUnreachableError(ClientError):
    code = "E622"


class ConceptNotFoundError(ServiceCallError):
    """A CUI the dictionary does not have. ``ConceptClient.get_concept`` raises it for the
    service's NOT_FOUND, and the lookup commands for a miss in-process too. It is a
    ServiceCallError (``status`` NOT_FOUND, ``details`` the service's message) because that is
    what the client raised for an unknown CUI before: code catching it still does."""

    code = "E623"

    def __init__(
        self,
        cui: str,
        details: str = "",
        hint: str = "`conceptsvc search TEXT` finds concepts by name",
    ) -> None:
        """``hint`` says how to find a concept: by default the command, for command-line
        users; the client names its own method."""
        self.cui = cui
        self.method = "GetConcept"
        self.status = "NOT_FOUND"
        self.details = details or f"concept {cui} is not in the dictionary"
        self.hint = hint
        ClientError.__init__(self, f"{cui} is not in the dictionary; {hint}.")


# The three below are raised by the client library (``resolve_outputs``, ``annotate_corpus``),
# which Python callers use without a command line, so they are ClientErrors rather than
# UsageError (E001); each names the flag or argument to change.
class OutputClashError(ClientError):
    """Two files of one run would be the same file: an output and the input, two outputs, or an
    output and the run's manifest, errors file or work directory. Raised before anything is
    read or written."""

    code = "E624"


class OutputFormatError(ClientError):
    """An output's file name ends in the extension of another format than the one it would
    be written in (CSV into ``run.jsonl``)."""

    code = "E625"


class EmptyCorpusError(ClientError):
    """The input holds no caption to annotate (an empty file, a header alone, blank lines)."""

    code = "E626"


class MissingExtraError(ClientError):
    """The input or output asks for an optional dependency that is not installed (pyarrow for
    Parquet); the message names the extra to install."""

    code = "E628"


class EvaluationError(ConceptsvcError):
    code = "E700"
