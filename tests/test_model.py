"""The domain types of conceptsvc.model: ExtractOptions' own checks (the engine's, which need
an index, are in tests/test_extractor.py)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from conceptsvc import model
from conceptsvc.errors import ExtractArgumentError, ExtractionError
from conceptsvc.model import ExtractOptions

# A value of the wrong type for each field that is not a name list, and what the error says.
WRONG_TYPES = [
    ({"include_negated": "no"}, "include_negated=...) takes True or False; got 'no' (a str)"),
    ({"include_mentions": 0}, "include_mentions=...) takes True or False; got 0 (a int)"),
    ({"include_hypothetical": 1}, "include_hypothetical=...) takes True, False or None"),
    ({"threshold": "0.7"}, "threshold=...) takes a number in (0, 1]; got '0.7' (a str)"),
    ({"threshold": True}, "threshold=...) takes a number in (0, 1]; got True (a bool)"),
    ({"mode": None}, "mode=...) takes a name (a string); got None"),
    ({"similarity": 1}, "similarity=...) takes a name (a string)"),
    ({"overlap": ["all"]}, "overlap=...) takes a name (a string)"),
    ({"profile": b"rocov2"}, "profile=...) takes a name (a string)"),
]


@pytest.mark.parametrize(("kwargs", "says"), WRONG_TYPES)
def test_model_options_validate_checks_every_fields_type(
    kwargs: dict[str, object], says: str
) -> None:
    options = ExtractOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ExtractArgumentError) as err:
        options.validate()
    assert isinstance(err.value, ExtractionError) and isinstance(err.value, TypeError)
    assert says in str(err.value) and "For example: ExtractOptions(" in str(err.value)


def test_model_options_of_the_right_types_pass() -> None:
    ExtractOptions(threshold=1, include_hypothetical=None).validate()
    ExtractOptions(threshold=0.5, include_hypothetical=False, include_negated=False).validate()
    with pytest.raises(ExtractionError, match=r"threshold 1\.5 must be in"):
        ExtractOptions(threshold=1.5).validate()


def test_model_options_exclude_cuis_are_stripped_and_upper_cased() -> None:
    """Every door builds ExtractOptions (in-process, spaCy, the wire's replace over defaults),
    so " c0032227" excludes C0032227 wherever it came from."""
    from dataclasses import replace

    options = ExtractOptions(exclude_cuis=[" c0032227", "C0024109"])
    assert options.exclude_cuis == ("C0032227", "C0024109")
    assert replace(ExtractOptions(), exclude_cuis=("c1 ",)).exclude_cuis == ("C1",)
    assert options == ExtractOptions(exclude_cuis=("C0032227", "C0024109"))


def _typed_init() -> ast.FunctionDef:
    """ExtractOptions' ``__init__`` written for type checkers (under ``if TYPE_CHECKING``)."""
    tree = ast.parse(Path(model.__file__).read_text(encoding="utf-8"))
    (cls,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ExtractOptions")
    (init,) = (f for n in cls.body if isinstance(n, ast.If)
               for f in n.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    return init


def test_model_options_typed_init_matches_the_dataclass() -> None:
    """The signature type checkers see and the dataclass's run-time ``__init__`` take the same
    parameters, in the same order, with the same defaults; the name lists take one name or an
    iterable of them."""
    init = _typed_init()
    params = init.args.args[1:]
    assert [p.arg for p in params] == [f.name for f in fields(ExtractOptions)]
    assert not init.args.kwonlyargs and not init.args.vararg and not init.args.kwarg
    assert [ast.literal_eval(d) for d in init.args.defaults] == [
        f.default for f in fields(ExtractOptions)]
    run_time = inspect.signature(ExtractOptions)
    assert list(run_time.parameters) == [p.arg for p in params]
    for p in params:
        if p.arg in ("semantic_types", "semantic_groups", "sources", "exclude_cuis"):
            assert ast.unparse(p.annotation) == "str | Iterable[str]"


def test_model_options_name_lists_type_check_under_mypy_strict(tmp_path: Path) -> None:
    """``mypy --strict`` accepts the calls the options take at run time (one name, a list, a
    set) and still refuses a value of the wrong type."""
    snippet = tmp_path / "uses_options.py"
    snippet.write_text(
        "from conceptsvc.model import ExtractOptions\n"
        'ok = ExtractOptions(semantic_groups="DISO", sources=["HPO"], exclude_cuis={"C0000001"},\n'
        '                    semantic_types=("T047", "dsyn"))\n'
        'bad = ExtractOptions(include_negated="no")\n',
        encoding="utf-8",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "cache"), str(snippet)],
        capture_output=True, text=True, timeout=300, cwd=Path(model.__file__).parents[1],
    )
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, proc.stdout + proc.stderr
    assert "uses_options.py:4:" in errors[0] and '"include_negated"' in errors[0]
