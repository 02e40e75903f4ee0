"""The error tree: every coded error has its own code, and the tree drawn in the module
docstring names each of them with that code (users and scripts match on codes)."""

from __future__ import annotations

import inspect
import re

import conceptsvc.errors as errors


def _coded() -> list[type[errors.ConceptsvcError]]:
    return [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.ConceptsvcError) and obj.__module__ == errors.__name__
    ]


def test_errors_codes_are_unique() -> None:
    # Two classes sharing a code would make ``[E6xx]`` ambiguous (it happened once: two
    # changes of one session both took E627).
    seen: dict[str, str] = {}
    for cls in _coded():
        code = cls.__dict__.get("code")
        if code is None:
            continue  # inherits its parent's code on purpose (none does today)
        assert re.fullmatch(r"E\d{3}", code), (cls.__name__, code)
        assert code not in seen, f"{cls.__name__} and {seen[code]} both use {code}"
        seen[code] = cls.__name__


def test_errors_tree_docstring_names_every_class_with_its_code() -> None:
    doc = errors.__doc__ or ""
    for cls in _coded():
        line = next((x for x in doc.splitlines() if re.search(rf"\b{cls.__name__}\b", x)), None)
        assert line is not None, f"{cls.__name__} is missing from the tree in errors.py"
        code = cls.__dict__.get("code")
        if code is not None and cls is not errors.ConceptsvcError and re.search(r"E\d{3}", line):
            assert code in line or code[:2] in line, (cls.__name__, code, line)


def test_errors_all_lists_every_class() -> None:
    assert {c.__name__ for c in _coded()} <= set(errors.__all__)
