"""Print the runtime (or build-system) subset of a pip-compile hashed lock file (stdlib only).

The project's lock pins everything the tests use (dev tools, PySpark, QuickUMLS …), but the
service image needs only ``[project].dependencies`` and what they pull in. This keeps exactly
that closure, with its pins and hashes, so the image installs a tested, hash-checked set and
nothing more (QuickUMLS would even need a compiler the slim image lacks).

The closure is read from pip-compile's own ``# via`` annotations: a package is kept when it is
a runtime dependency of the project or when anything that depends on it is kept. Keeping a
package because an optional extra of a kept package wants it is harmless; missing one is not,
so the Docker build runs ``pip check`` afterwards.

With ``--build-system`` the roots are ``[build-system].requires`` instead (setuptools, wheel,
Cython): the image builds its wheel with those exact, hash-checked tools, in a virtualenv of the
build stage that the runtime stage never sees.

usage: python runtime_lock.py [--build-system] LOCK_FILE PYPROJECT_TOML > subset.lock
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_roots(pyproject: Path) -> set[str]:
    with pyproject.open("rb") as fh:
        return _names(tomllib.load(fh)["project"]["dependencies"], pyproject)


def build_system_roots(pyproject: Path) -> set[str]:
    with pyproject.open("rb") as fh:
        return _names(tomllib.load(fh)["build-system"]["requires"], pyproject)


def _names(requirements: list[str], pyproject: Path) -> set[str]:
    roots = set()
    for requirement in requirements:
        match = _NAME.match(requirement)
        if match is None:
            raise SystemExit(f"{pyproject}: cannot read the dependency {requirement!r}")
        roots.add(canonical(match.group(1)))
    return roots


def parse_lock(lock: Path) -> dict[str, tuple[list[str], set[str]]]:
    """name → (the entry's requirement and hash lines, the names it is required via)."""
    entries: dict[str, tuple[list[str], set[str]]] = {}
    current: str | None = None
    in_via = False
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = _ENTRY.match(line)
        if match:
            current = canonical(match.group(1))
            entries[current] = ([line], set())
            in_via = False
            continue
        if current is None:
            continue
        stripped = line.strip()
        if stripped.startswith("--hash="):
            entries[current][0].append(line)
        elif stripped.startswith("# via"):
            rest = stripped[len("# via") :].strip()
            in_via = not rest
            if rest:
                entries[current][1].add(canonical(rest.split()[0]))
        elif in_via and stripped.startswith("#   "):
            entries[current][1].add(canonical(stripped[len("#   ") :].split()[0]))
        elif not stripped:
            current, in_via = None, False
    return entries


def runtime_subset(lock: Path, pyproject: Path) -> list[str]:
    return _closure(lock, pyproject, runtime_roots(pyproject), "runtime dependencies")


def build_system_subset(lock: Path, pyproject: Path) -> list[str]:
    return _closure(lock, pyproject, build_system_roots(pyproject), "build requirements")


def _closure(lock: Path, pyproject: Path, roots: set[str], what: str) -> list[str]:
    entries = parse_lock(lock)
    missing = sorted(roots - entries.keys())
    if missing:
        raise SystemExit(
            f"{lock} does not pin the {what} {missing}; regenerate it from "
            f"{pyproject} (pip-compile --generate-hashes)"
        )
    keep = set(roots)
    changed = True
    while changed:
        changed = False
        for name, (_, via) in entries.items():
            if name not in keep and via & keep:
                keep.add(name)
                changed = True
    lines = []
    for name in sorted(keep):
        requirement = entries[name][0]
        if len(requirement) < 2:
            raise SystemExit(f"{lock}: {name} has no --hash; the lock must be hash-pinned")
        lines.extend(requirement)
    # The last hash line of each entry ends without a continuation; keep the file valid.
    return [re.sub(r"\s*\\$", "", line) if _is_last(lines, i) else line
            for i, line in enumerate(lines)]


def _is_last(lines: list[str], i: int) -> bool:
    return i + 1 == len(lines) or _ENTRY.match(lines[i + 1]) is not None


def main(argv: list[str]) -> int:
    subset = runtime_subset
    if argv[:1] == ["--build-system"]:
        subset, argv = build_system_subset, argv[1:]
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for line in subset(Path(argv[0]), Path(argv[1])):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
